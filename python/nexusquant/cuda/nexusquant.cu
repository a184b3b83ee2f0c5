// nexusquant CUDA kernels: quantize, dequantize and decode attention over E8 codes.
//
// Loaded by python/nexusquant/gpu/build.py with cupy.RawModule (NVRTC). One source, three kinds
// of module, chosen by the macros the loader injects (one compiled module per option set, cached
// per device):
//
//   (none)                       generic codec kernels for any head_dim (80, 96, ...):
//                                nq_quantize_*, nq_dequantize_*; one warp per vector, FWHT in shared
//                                memory over the codec's block table.
//   NQ_CODEC_P, NQ_CODEC_BITS    fast codec kernels for one power-of-two padded dim P (64/128/256)
//                                and one bit width: nq_quantize_fast_*, nq_dequantize_fast_*.
//   NQ_ATT_P, NQ_ATT_KB0, ...    the decode-attention kernel nq_attend_* for one P and the bit
//                                widths of up to two tiers.
//   NQ_PCA                       transform-coded keys: nq_pca_coeffs_* (codes to coefficients),
//                                nq_pca_place_* (rebuilt keys to the head layout, RoPE redone).
//
// The codec modules are compiled with --fmad=false: every float operation is written in the same
// order as the Rust encoder (rust/codec.rs, rust/e8p.rs, rust/hadamard.rs) and no multiply-add may
// be fused, so codes and decoded values are bit-identical to the CPU reference. The attention
// module is not bound by that (it is tested against a float32 reference within a tolerance).
//
// Layouts (row-major):
//   x, out      [n, d]            one vector per row, float / __half / __nv_bfloat16
//   codes       [n, code_bytes]   stage-1 codes (u16 LE, or u8 for 1 bit), then stage-2 codes
//   scales      [n]               fp16 bit patterns
//   blocks      int array: n_pass, then per pass: n_blocks, then (offset, length) pairs
//   block_scale float per block, in the same order: 1/sqrt(length) as the CPU computes it
// Tables (from the Rust codebook, copied once per device):
//   abs_table [256*8] f32, parity [256] u8, key_to_index [6561] u16,
//   half_table [256] x 16 bytes: the 8 magnitudes of a pattern as fp16 pairs, coordinate 7 negated
//   where the pattern's parity bit is set (attention only).

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifndef NQ_MAX_PADDED
#define NQ_MAX_PADDED 512
#endif
#ifndef NQ_WARPS
#define NQ_WARPS 4
#endif

#define NQ_FULL 0xffffffffu

__device__ __forceinline__ float nq_to_f32(float v) { return v; }
__device__ __forceinline__ float nq_to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float nq_to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void nq_from_f32(float v, float* o) { *o = v; }
__device__ __forceinline__ void nq_from_f32(float v, __half* o) { *o = __float2half_rn(v); }
__device__ __forceinline__ void nq_from_f32(float v, __nv_bfloat16* o) { *o = __float2bfloat16_rn(v); }

// Eight consecutive elements (16- or 32-byte aligned) as floats; the conversions are exact.
__device__ __forceinline__ void nq_load8(const float* p, float v[8]) {
    float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void nq_load8(const __half* p, float v[8]) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
    #pragma unroll
    for (int k = 0; k < 4; ++k) {
        v[2 * k] = __half2float(__ushort_as_half((unsigned short)(w[k] & 0xFFFFu)));
        v[2 * k + 1] = __half2float(__ushort_as_half((unsigned short)(w[k] >> 16)));
    }
}
__device__ __forceinline__ void nq_load8(const __nv_bfloat16* p, float v[8]) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
    #pragma unroll
    for (int k = 0; k < 4; ++k) {
        v[2 * k] = __uint_as_float(w[k] << 16);
        v[2 * k + 1] = __uint_as_float(w[k] & 0xFFFF0000u);
    }
}
__device__ __forceinline__ void nq_store8(float* p, const float v[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void nq_store8(__half* p, const float v[8]) {
    unsigned w[4];
    #pragma unroll
    for (int k = 0; k < 4; ++k)
        w[k] = (unsigned)__half_as_ushort(__float2half_rn(v[2 * k])) |
               ((unsigned)__half_as_ushort(__float2half_rn(v[2 * k + 1])) << 16);
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}
__device__ __forceinline__ void nq_store8(__nv_bfloat16* p, const float v[8]) {
    unsigned w[4];
    #pragma unroll
    for (int k = 0; k < 4; ++k)
        w[k] = (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(v[2 * k])) |
               ((unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(v[2 * k + 1])) << 16);
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// ----------------------------------------------------------------------------- codebook
// The nine permutation classes of E8P16 magnitude patterns: (#5/2 entries, #3/2 entries). Written
// as functions so that, in unrolled loops, every constant folds at compile time (a __constant__
// table indexed by a run-time lane value would not).
__device__ __forceinline__ constexpr int nq_n5(int t) { return (t == 5 || t == 6) ? 1 : (t == 7 ? 2 : 0); }
__device__ __forceinline__ constexpr int nq_n3(int t) { return t <= 4 ? t : (t == 6 ? 1 : (t == 8 ? 8 : 0)); }

struct NqTypeConsts {
    int n_big, n5, parity;
    float norm2, amin;
};

__device__ __forceinline__ NqTypeConsts nq_type(int t) {
    NqTypeConsts c;
    int n5 = nq_n5(t), n3 = nq_n3(t), n1 = 8 - n5 - n3;
    c.n_big = n5 + n3;
    c.n5 = n5;
    c.norm2 = (float)(25 * n5 + 9 * n3 + n1) / 4.0f;
    c.parity = ((5 * n5 + 3 * n3 + n1) / 2) % 2;
    c.amin = n1 > 0 ? 0.5f : (n3 > 0 ? 1.5f : 2.5f);
    return c;
}

// Nearest E8P16 code of one group (port of e8p::encode16_lanes with one lane). The float
// operations are the CPU's, in its order; the integer bookkeeping is free to differ. Both shifts'
// ranks stay in named registers (selecting by the winning shift at the end), so nothing is indexed
// at run time.
__device__ __forceinline__ unsigned nq_encode16(const float z[8], const unsigned short* __restrict__ key_to_index) {
    const float INF = __int_as_float(0x7f800000);
    float best = INF;
    int best_t = 0, best_s = 0;
    int rk0[8], rk1[8];
    unsigned nb0 = 0, nb1 = 0;
    #pragma unroll
    for (int si = 0; si < 2; ++si) {
        const float shift = si == 0 ? 0.25f : -0.25f;
        float u[8];
        unsigned negc = 0, nb = 0;
        #pragma unroll
        for (int c = 0; c < 8; ++c) {
            float y = __fsub_rn(z[c], shift);
            u[c] = fabsf(y);
            unsigned neg = y < 0.0f ? 1u : 0u;
            negc += neg;
            nb |= neg << c;
        }
        int rank[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        #pragma unroll
        for (int i = 0; i < 8; ++i) {
            #pragma unroll
            for (int j = i + 1; j < 8; ++j) {
                int jf = u[j] > u[i] ? 1 : 0;
                rank[i] += jf;
                rank[j] += 1 - jf;
            }
        }
        float top[5] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        float sq = 0.0f, umin = INF;
        #pragma unroll
        for (int c = 0; c < 8; ++c) {
            float v = u[c];
            int r = rank[c];
            #pragma unroll
            for (int k = 0; k < 4; ++k) top[k] = __fadd_rn(top[k], r <= k ? v : 0.0f);
            top[4] = __fadd_rn(top[4], v);
            sq = __fadd_rn(sq, __fmul_rn(v, v));
            umin = v < umin ? v : umin;
        }
        // mismatch * 4 * umin * amin: 0 when the sign parity matches (umin is finite, so the CPU's
        // product is +0 too), else (4 * umin) * amin, computed once per distinct amin.
        const float u4 = __fmul_rn(4.0f, umin);
        const float w05 = __fmul_rn(u4, 0.5f), w15 = __fmul_rn(u4, 1.5f), w25 = __fmul_rn(u4, 2.5f);
        const float half_top = __fmul_rn(0.5f, top[4]);
        #pragma unroll
        for (int t = 0; t < 9; ++t) {
            NqTypeConsts tc = nq_type(t);
            float s_big = tc.n_big == 0 ? 0.0f : (tc.n_big == 8 ? top[4] : top[tc.n_big - 1]);
            float s_5 = tc.n5 == 0 ? 0.0f : top[tc.n5 - 1];
            float dot = __fadd_rn(__fadd_rn(half_top, s_big), s_5);
            bool mismatch = ((negc + (unsigned)tc.parity) & 1u) != 0u;
            float w = tc.amin == 0.5f ? w05 : (tc.amin == 1.5f ? w15 : w25);
            float d = __fadd_rn(__fsub_rn(__fadd_rn(sq, tc.norm2), __fmul_rn(2.0f, dot)), mismatch ? w : 0.0f);
            if (d < best) {
                best = d;
                best_t = t;
                best_s = si;
            }
        }
        #pragma unroll
        for (int c = 0; c < 8; ++c) {
            if (si == 0) rk0[c] = rank[c];
            else rk1[c] = rank[c];
        }
        if (si == 0) nb0 = nb;
        else nb1 = nb;
    }
    const int n5 = nq_n5(best_t), n3 = nq_n3(best_t), n1 = 8 - n5 - n3;
    const int n_big = n5 + n3;
    const unsigned parity = (unsigned)(((5 * n5 + 3 * n3 + n1) / 2) & 1);
    int key = 0, pow3 = 1, smallest = 0;
    #pragma unroll
    for (int c = 0; c < 8; ++c) {
        int r = best_s ? rk1[c] : rk0[c];
        int digit = (r < n_big ? 1 : 0) + (r < n5 ? 1 : 0);
        key += digit * pow3;
        pow3 *= 3;
        smallest = r == 7 ? c : smallest;
    }
    unsigned idx = __ldg(&key_to_index[key]);
    unsigned negs = best_s ? nb1 : nb0;
    if (((unsigned)__popc(negs) + parity) & 1u) negs ^= 1u << smallest;
    return idx | ((negs & 0x7Fu) << 8) | ((unsigned)best_s << 15);
}

// Nearest E8P8 code of one group (port of e8p::encode8_lanes with one lane).
__device__ __forceinline__ unsigned nq_encode8(const float z[8]) {
    float best = __int_as_float(0x7f800000);
    unsigned best_code = 0;
    #pragma unroll
    for (int si = 0; si < 2; ++si) {
        float shift = si == 0 ? 0.25f : -0.25f;
        unsigned negs = 0;
        float d = 0.0f, umin = __int_as_float(0x7f800000);
        unsigned argmin = 0;
        #pragma unroll
        for (int c = 0; c < 8; ++c) {
            float y = __fsub_rn(z[c], shift);
            float u = fabsf(y);
            negs |= (y < 0.0f ? 1u : 0u) << c;
            float e = __fsub_rn(u, 0.5f);
            d = __fadd_rn(d, __fmul_rn(e, e));
            bool smaller = u < umin;
            umin = smaller ? u : umin;
            argmin = smaller ? (unsigned)c : argmin;
        }
        unsigned mismatch = (unsigned)__popc(negs) & 1u;
        float dist = __fadd_rn(d, __fmul_rn(__fmul_rn((float)mismatch, 2.0f), umin));
        if (dist < best) {
            best = dist;
            unsigned n = negs ^ (mismatch << argmin);
            best_code = (n & 0x7Fu) | ((unsigned)si << 7);
        }
    }
    return best_code;
}

__device__ __forceinline__ void nq_decode16(unsigned code, const float* abs_table, const unsigned char* parity, float* out) {
    unsigned idx = code & 0xFFu;
    unsigned signs = (code >> 8) & 0x7Fu;
    float shift = (code & 0x8000u) ? -0.25f : 0.25f;
    unsigned neg7 = ((unsigned)__popc(signs) + parity[idx]) & 1u;
    unsigned negs = signs | (neg7 << 7);
    #pragma unroll
    for (int c = 0; c < 8; ++c) {
        float a = abs_table[idx * 8 + c];
        out[c] = __fadd_rn(((negs >> c) & 1u) ? -a : a, shift);
    }
}

__device__ __forceinline__ void nq_decode8(unsigned code, float* out) {
    unsigned signs = code & 0x7Fu;
    float shift = (code & 0x80u) ? -0.25f : 0.25f;
    unsigned neg7 = (unsigned)__popc(signs) & 1u;
    unsigned negs = signs | (neg7 << 7);
    #pragma unroll
    for (int c = 0; c < 8; ++c) out[c] = __fadd_rn(((negs >> c) & 1u) ? -0.5f : 0.5f, shift);
}

// Codewords of one group in the rotated domain, scaled: s * (c1 + r * c2).
__device__ __forceinline__ void nq_group_value(const unsigned char* cr, int g, int gi, int bits, float sc, float r,
                                               const float* abs_table, const unsigned char* parity, float* out) {
    if (bits == 1) {
        nq_decode8(cr[gi], out);
        #pragma unroll
        for (int c = 0; c < 8; ++c) out[c] = __fmul_rn(sc, out[c]);
        return;
    }
    unsigned c1 = (unsigned)cr[2 * gi] | ((unsigned)cr[2 * gi + 1] << 8);
    nq_decode16(c1, abs_table, parity, out);
    if (bits == 2) {
        #pragma unroll
        for (int c = 0; c < 8; ++c) out[c] = __fmul_rn(sc, out[c]);
        return;
    }
    float c2v[8];
    if (bits == 3) {
        nq_decode8(cr[2 * g + gi], c2v);
    } else {
        unsigned c2 = (unsigned)cr[2 * g + 2 * gi] | ((unsigned)cr[2 * g + 2 * gi + 1] << 8);
        nq_decode16(c2, abs_table, parity, c2v);
    }
    #pragma unroll
    for (int c = 0; c < 8; ++c) out[c] = __fmul_rn(sc, __fadd_rn(out[c], __fmul_rn(r, c2v[c])));
}

#if !defined(NQ_CODEC_P) && !defined(NQ_ATT_P) && !defined(NQ_PCA)
// ============================================================================= generic codec
// In-place orthonormal Walsh-Hadamard transform of s[off .. off+len) by one warp: the same
// butterflies (a+b, a-b) and the same final scaling as hadamard::fwht_inplace. len and h are
// powers of two, so the butterfly index needs shifts, not divisions.
__device__ void nq_fwht_warp(float* s, int off, int len, float scale, int lane) {
    for (int h = 1, lh = 0; h < len; h <<= 1, ++lh) {
        for (int k = lane; k < len / 2; k += 32) {
            int i = off + ((k >> lh) << (lh + 1)) + (k & (h - 1));
            float a = s[i], b = s[i + h];
            s[i] = __fadd_rn(a, b);
            s[i + h] = __fsub_rn(a, b);
        }
        __syncwarp();
    }
    for (int i = lane; i < len; i += 32) s[off + i] = __fmul_rn(s[off + i], scale);
    __syncwarp();
}

// Apply all passes (forward order, or backward for the inverse).
__device__ void nq_rotate_warp(float* s, const int* blocks, const float* block_scale, bool inverse, int lane) {
    int n_pass = blocks[0];
    int pos[2] = {0, 0}, spos[2] = {0, 0};
    int p = 1, sp = 0;
    for (int q = 0; q < n_pass && q < 2; ++q) {
        if (q == 0) { pos[0] = p; spos[0] = sp; } else { pos[1] = p; spos[1] = sp; }
        int nb = blocks[p];
        p += 1 + 2 * nb;
        sp += nb;
    }
    for (int qq = 0; qq < n_pass; ++qq) {
        int q = inverse ? n_pass - 1 - qq : qq;
        int ps = q == 0 ? pos[0] : pos[1], ss = q == 0 ? spos[0] : spos[1];
        int nb = blocks[ps];
        for (int b = 0; b < nb; ++b) {
            nq_fwht_warp(s, blocks[ps + 1 + 2 * b], blocks[ps + 2 + 2 * b], block_scale[ss + b], lane);
        }
    }
}

// One warp per vector. errors[0] is set to 1 + row for a row with NaN/inf, errors[1] for a scale
// beyond fp16 (the Python side raises NexusQuantError naming it).
template <typename T>
__device__ void nq_quantize(const T* __restrict__ x, int n, int d, int p, const float* __restrict__ signs,
                            const int* __restrict__ blocks, const float* __restrict__ block_scale,
                            float scale_factor, float residual_ratio, int bits,
                            const float* __restrict__ abs_table, const unsigned char* __restrict__ parity,
                            const unsigned short* __restrict__ key_to_index,
                            unsigned char* __restrict__ codes, unsigned short* __restrict__ scales, int* errors) {
    __shared__ float buf[NQ_WARPS][NQ_MAX_PADDED];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int row = blockIdx.x * NQ_WARPS + warp;
    if (row >= n) return;
    float* s = buf[warp];
    const T* xr = x + (size_t)row * d;
    bool finite = true;
    for (int i = lane; i < p; i += 32) {
        float v = 0.0f;
        if (i < d) {
            v = nq_to_f32(xr[i]);
            finite = finite && isfinite(v);
            v = __fmul_rn(v, signs[i]);
        }
        s[i] = v;
    }
    if (!__all_sync(NQ_FULL, finite)) {
        if (lane == 0) atomicCAS(&errors[0], 0, row + 1);
        return;
    }
    __syncwarp();
    nq_rotate_warp(s, blocks, block_scale, false, lane);
    // Sum of squares in the CPU's order: 8 running sums over the groups, then a fixed tree.
    float acc = 0.0f;
    if (lane < 8) {
        for (int i = lane; i < p; i += 8) acc = __fadd_rn(acc, __fmul_rn(s[i], s[i]));
    }
    float a[8];
    #pragma unroll
    for (int k = 0; k < 8; ++k) a[k] = __shfl_sync(NQ_FULL, acc, k);
    float ss = __fadd_rn(__fadd_rn(__fadd_rn(a[0], a[1]), __fadd_rn(a[2], a[3])),
                         __fadd_rn(__fadd_rn(a[4], a[5]), __fadd_rn(a[6], a[7])));
    float rms = __fsqrt_rn(__fdiv_rn(ss, (float)p));
    __half hs = __float2half_rn(__fmul_rn(rms, scale_factor));
    float sc = __half2float(hs);
    if (!isfinite(sc)) {
        if (lane == 0) atomicCAS(&errors[1], 0, row + 1);
        return;
    }
    float inv = sc > 0.0f ? __fdiv_rn(1.0f, sc) : 0.0f;
    if (lane == 0) scales[row] = __half_as_ushort(hs);
    int g = p / 8;
    int code_bytes = g * bits;
    unsigned char* cr = codes + (size_t)row * code_bytes;
    float inv_r = bits >= 3 ? __fdiv_rn(1.0f, residual_ratio) : 0.0f;
    for (int gi = lane; gi < g; gi += 32) {
        float z[8];
        #pragma unroll
        for (int c = 0; c < 8; ++c) z[c] = __fmul_rn(s[gi * 8 + c], inv);
        if (bits == 1) {
            cr[gi] = (unsigned char)nq_encode8(z);
            continue;
        }
        unsigned c1 = nq_encode16(z, key_to_index);
        cr[2 * gi] = (unsigned char)(c1 & 0xFFu);
        cr[2 * gi + 1] = (unsigned char)(c1 >> 8);
        if (bits >= 3) {
            float dec[8];
            nq_decode16(c1, abs_table, parity, dec);
            #pragma unroll
            for (int c = 0; c < 8; ++c) z[c] = __fmul_rn(__fsub_rn(z[c], dec[c]), inv_r);
            if (bits == 3) {
                cr[2 * g + gi] = (unsigned char)nq_encode8(z);
            } else {
                unsigned c2 = nq_encode16(z, key_to_index);
                cr[2 * g + 2 * gi] = (unsigned char)(c2 & 0xFFu);
                cr[2 * g + 2 * gi + 1] = (unsigned char)(c2 >> 8);
            }
        }
    }
}

template <typename T>
__device__ void nq_dequantize(const unsigned char* __restrict__ codes, const unsigned short* __restrict__ scales,
                              int n, int d, int p, const float* __restrict__ signs, const int* __restrict__ blocks,
                              const float* __restrict__ block_scale, float residual_ratio, int bits,
                              const float* __restrict__ abs_table, const unsigned char* __restrict__ parity,
                              T* __restrict__ out) {
    __shared__ float buf[NQ_WARPS][NQ_MAX_PADDED];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int row = blockIdx.x * NQ_WARPS + warp;
    if (row >= n) return;
    float* s = buf[warp];
    int g = p / 8;
    const unsigned char* cr = codes + (size_t)row * (g * bits);
    float sc = __half2float(__ushort_as_half(scales[row]));
    for (int gi = lane; gi < g; gi += 32) {
        float v[8];
        nq_group_value(cr, g, gi, bits, sc, residual_ratio, abs_table, parity, v);
        #pragma unroll
        for (int c = 0; c < 8; ++c) s[gi * 8 + c] = v[c];
    }
    __syncwarp();
    nq_rotate_warp(s, blocks, block_scale, true, lane);
    T* orow = out + (size_t)row * d;
    for (int i = lane; i < d; i += 32) nq_from_f32(__fmul_rn(s[i], signs[i]), &orow[i]);
}

#define NQ_QUANTIZE_ENTRY(NAME, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(NQ_WARPS * 32) NAME(                                        \
        const T* x, int n, int d, int p, const float* signs, const int* blocks, const float* block_scale,     \
        float scale_factor, float residual_ratio, int bits, const float* abs_table, const unsigned char* parity, \
        const unsigned short* key_to_index, unsigned char* codes, unsigned short* scales, int* errors) {       \
        nq_quantize<T>(x, n, d, p, signs, blocks, block_scale, scale_factor, residual_ratio, bits, abs_table,  \
                       parity, key_to_index, codes, scales, errors);                                          \
    }
NQ_QUANTIZE_ENTRY(nq_quantize_f32, float)
NQ_QUANTIZE_ENTRY(nq_quantize_f16, __half)
NQ_QUANTIZE_ENTRY(nq_quantize_bf16, __nv_bfloat16)

#define NQ_DEQUANTIZE_ENTRY(NAME, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(NQ_WARPS * 32) NAME(                                        \
        const unsigned char* codes, const unsigned short* scales, int n, int d, int p, const float* signs,    \
        const int* blocks, const float* block_scale, float residual_ratio, int bits, const float* abs_table,  \
        const unsigned char* parity, T* out) {                                                                \
        nq_dequantize<T>(codes, scales, n, d, p, signs, blocks, block_scale, residual_ratio, bits, abs_table, \
                         parity, out);                                                                        \
    }
NQ_DEQUANTIZE_ENTRY(nq_dequantize_f32, float)
NQ_DEQUANTIZE_ENTRY(nq_dequantize_f16, __half)
NQ_DEQUANTIZE_ENTRY(nq_dequantize_bf16, __nv_bfloat16)
#endif  // generic codec

#ifdef NQ_CODEC_P
// ============================================================================= fast codec
// Padded dim P = 64, 128 or 256 with a single Hadamard block (head_dim == P). L = P/8 lanes own one
// vector, one 8-dim group per lane, so a warp holds 32/L vectors: the group's values stay in
// registers from the load through the rotation to the encoder. Butterflies h = 1, 2, 4 run inside a
// lane, h = 8 .. P/2 across lanes with shuffles; each output element gets exactly the CPU's chain
// of adds (a+b for the lower index, a-b for the upper), so the rotation is bit-identical. The grid
// strides over vectors so each block loads its tables once.
#ifndef NQ_CODEC_BITS
#error "NQ_CODEC_BITS must be defined with NQ_CODEC_P"
#endif
#define NQ_CL (NQ_CODEC_P / 8)
#define NQ_CVPW (32 / NQ_CL)

// The rotation's butterflies on a lane's 8 values and across the L lanes of a vector.
__device__ __forceinline__ void nq_fwht_lanes(float s[8], int gi, float scale) {
    #pragma unroll
    for (int h = 1; h < 8; h <<= 1) {
        #pragma unroll
        for (int i = 0; i < 8; ++i) {
            if ((i & h) == 0) {
                float a = s[i], b = s[i + h];
                s[i] = __fadd_rn(a, b);
                s[i + h] = __fsub_rn(a, b);
            }
        }
    }
    // Across lanes: the lower lane computes a + b, the upper one a - b, written (-b) + a (the same
    // IEEE operation), so both lanes run one multiply by +-1 (exact) and one add.
    #pragma unroll
    for (int m = 1; m < NQ_CL; m <<= 1) {
        const float sgn = (gi & m) ? -1.0f : 1.0f;
        #pragma unroll
        for (int c = 0; c < 8; ++c) {
            float o = __shfl_xor_sync(NQ_FULL, s[c], m);
            s[c] = __fadd_rn(__fmul_rn(s[c], sgn), o);
        }
    }
    #pragma unroll
    for (int c = 0; c < 8; ++c) s[c] = __fmul_rn(s[c], scale);
}

template <typename T>
__device__ __forceinline__ void nq_quantize_fast(const T* __restrict__ x, long long n, const float* __restrict__ signs,
                                                 float bscale, float scale_factor, float residual_ratio,
                                                 const float* __restrict__ abs_table, const unsigned char* __restrict__ parity,
                                                 const unsigned short* __restrict__ key_to_index,
                                                 unsigned char* __restrict__ codes, unsigned short* __restrict__ scales,
                                                 int* errors) {
    constexpr int P = NQ_CODEC_P, L = NQ_CL, VPW = NQ_CVPW, NG = P / 8, BITS = NQ_CODEC_BITS;
    constexpr int CB = NG * BITS;
    __shared__ __align__(16) float buf[NQ_WARPS][256];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gi = lane % L, vs = lane / L;
    const unsigned vmask = L == 32 ? NQ_FULL : (((1u << L) - 1u) << (vs * L));
    float* wb = buf[warp];
    float sg[8];
    #pragma unroll
    for (int c = 0; c < 8; ++c) sg[c] = signs[gi * 8 + c];
    const float inv_r = BITS >= 3 ? __fdiv_rn(1.0f, residual_ratio) : 0.0f;
    const long long step = (long long)gridDim.x * NQ_WARPS * VPW;
    for (long long base = ((long long)blockIdx.x * NQ_WARPS + warp) * VPW; base < n; base += step) {
        const long long row = base + vs;
        const bool inb = row < n;
        float s[8];
        if (inb) nq_load8(x + row * P + gi * 8, s);
        else {
            #pragma unroll
            for (int c = 0; c < 8; ++c) s[c] = 0.0f;
        }
        bool fin = true;
        #pragma unroll
        for (int c = 0; c < 8; ++c) fin = fin && isfinite(s[c]);
        const bool bad = (__ballot_sync(NQ_FULL, inb && !fin) & vmask) != 0u;
        if (bad && inb && gi == 0) atomicCAS(&errors[0], 0, (int)(row + 1));
        #pragma unroll
        for (int c = 0; c < 8; ++c) s[c] = __fmul_rn(s[c], sg[c]);
        nq_fwht_lanes(s, gi, bscale);
        // Sum of squares in the CPU's order: running sum k of the elements k, k+8, k+16, ...
        // (a column of the lane-major layout), then a fixed tree over the 8 sums.
        reinterpret_cast<float4*>(wb)[lane * 2] = make_float4(s[0], s[1], s[2], s[3]);
        reinterpret_cast<float4*>(wb)[lane * 2 + 1] = make_float4(s[4], s[5], s[6], s[7]);
        __syncwarp();
        float acc = 0.0f;
        if (gi < 8) {
            #pragma unroll 8
            for (int k = 0; k < NG; ++k) {
                float e = wb[vs * P + k * 8 + gi];
                acc = __fadd_rn(acc, __fmul_rn(e, e));
            }
        }
        float a[8];
        #pragma unroll
        for (int k = 0; k < 8; ++k) a[k] = __shfl_sync(NQ_FULL, acc, vs * L + k);
        __syncwarp();
        const float ss = __fadd_rn(__fadd_rn(__fadd_rn(a[0], a[1]), __fadd_rn(a[2], a[3])),
                                   __fadd_rn(__fadd_rn(a[4], a[5]), __fadd_rn(a[6], a[7])));
        const float rms = __fsqrt_rn(__fdiv_rn(ss, (float)P));
        const __half hs = __float2half_rn(__fmul_rn(rms, scale_factor));
        const float sc = __half2float(hs);
        if (inb && !bad && !isfinite(sc) && gi == 0) atomicCAS(&errors[1], 0, (int)(row + 1));
        if (!(inb && !bad && isfinite(sc))) continue;
        const float inv = sc > 0.0f ? __fdiv_rn(1.0f, sc) : 0.0f;
        if (gi == 0) scales[row] = __half_as_ushort(hs);
        float z[8];
        #pragma unroll
        for (int c = 0; c < 8; ++c) z[c] = __fmul_rn(s[c], inv);
        unsigned char* cr = codes + row * CB;
        if (BITS == 1) {
            cr[gi] = (unsigned char)nq_encode8(z);
        } else {
            const unsigned c1 = nq_encode16(z, key_to_index);
            reinterpret_cast<unsigned short*>(cr)[gi] = (unsigned short)c1;
            if (BITS >= 3) {
                float dec[8];
                nq_decode16(c1, abs_table, parity, dec);
                #pragma unroll
                for (int c = 0; c < 8; ++c) z[c] = __fmul_rn(__fsub_rn(z[c], dec[c]), inv_r);
                if (BITS == 3) cr[2 * NG + gi] = (unsigned char)nq_encode8(z);
                else reinterpret_cast<unsigned short*>(cr + 2 * NG)[gi] = (unsigned short)nq_encode16(z, key_to_index);
            }
        }
    }
}

template <typename T>
__device__ __forceinline__ void nq_dequantize_fast(const unsigned char* __restrict__ codes,
                                                   const unsigned short* __restrict__ scales, long long n,
                                                   const float* __restrict__ signs, float bscale, float residual_ratio,
                                                   const float* __restrict__ abs_table_g,
                                                   const unsigned char* __restrict__ parity_g, T* __restrict__ out) {
    constexpr int P = NQ_CODEC_P, L = NQ_CL, VPW = NQ_CVPW, NG = P / 8, BITS = NQ_CODEC_BITS;
    constexpr int CB = NG * BITS;
    __shared__ __align__(16) float abs_table[256 * 8];
    __shared__ unsigned char parity[256];
    if (BITS >= 2) {
        for (int i = threadIdx.x; i < 256 * 8; i += blockDim.x) abs_table[i] = abs_table_g[i];
        for (int i = threadIdx.x; i < 256; i += blockDim.x) parity[i] = parity_g[i];
        __syncthreads();
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gi = lane % L, vs = lane / L;
    float sg[8];
    #pragma unroll
    for (int c = 0; c < 8; ++c) sg[c] = signs[gi * 8 + c];
    const long long step = (long long)gridDim.x * NQ_WARPS * VPW;
    for (long long base = ((long long)blockIdx.x * NQ_WARPS + warp) * VPW; base < n; base += step) {
        const long long row = base + vs;
        const bool inb = row < n;
        const long long r = inb ? row : n - 1;
        const float sc = __half2float(__ushort_as_half(scales[r]));
        float s[8];
        nq_group_value(codes + r * CB, NG, gi, BITS, sc, residual_ratio, abs_table, parity, s);
        nq_fwht_lanes(s, gi, bscale);
        #pragma unroll
        for (int c = 0; c < 8; ++c) s[c] = __fmul_rn(s[c], sg[c]);
        if (inb) nq_store8(out + row * P + gi * 8, s);
    }
}

#define NQ_QUANTIZE_FAST_ENTRY(NAME, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(NQ_WARPS * 32) NAME(                                        \
        const T* x, long long n, const float* signs, float bscale, float scale_factor, float residual_ratio,  \
        const float* abs_table, const unsigned char* parity, const unsigned short* key_to_index,              \
        unsigned char* codes, unsigned short* scales, int* errors) {                                          \
        nq_quantize_fast<T>(x, n, signs, bscale, scale_factor, residual_ratio, abs_table, parity, key_to_index, \
                            codes, scales, errors);                                                           \
    }
NQ_QUANTIZE_FAST_ENTRY(nq_quantize_fast_f32, float)
NQ_QUANTIZE_FAST_ENTRY(nq_quantize_fast_f16, __half)
NQ_QUANTIZE_FAST_ENTRY(nq_quantize_fast_bf16, __nv_bfloat16)

#define NQ_DEQUANTIZE_FAST_ENTRY(NAME, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(NQ_WARPS * 32) NAME(                                        \
        const unsigned char* codes, const unsigned short* scales, long long n, const float* signs,           \
        float bscale, float residual_ratio, const float* abs_table, const unsigned char* parity, T* out) {   \
        nq_dequantize_fast<T>(codes, scales, n, signs, bscale, residual_ratio, abs_table, parity, out);      \
    }
NQ_DEQUANTIZE_FAST_ENTRY(nq_dequantize_fast_f32, float)
NQ_DEQUANTIZE_FAST_ENTRY(nq_dequantize_fast_f16, __half)
NQ_DEQUANTIZE_FAST_ENTRY(nq_dequantize_fast_bf16, __nv_bfloat16)
#endif  // NQ_CODEC_P

#ifdef NQ_ATT_P
// ============================================================================= decode attention
// One new query per sequence against everything one (batch, KV head) holds: the compressed tiers
// (codes) and the full-precision sinks and window, in ONE launch. Grid (S0 + S1 + 1, B * H_kv):
// blocks [0, S0) take a chunk of tier 0's tokens, [S0, S0 + S1) of tier 1's, the last block the
// full-precision tokens. Each block writes a partial softmax state (max m, sum l, accumulator);
// the last block of a (batch, KV head) to finish (an atomic counter) merges them, turns the codes'
// accumulator back from the rotated domain (inverse Hadamard, signs), adds l * value_center and
// the full-precision part, and writes the output in the model's dtype.
//
// Scores without dequantized keys: q.k = q.center + s * (R q).c, with c the codeword; the kernel
// scores fp16 codewords against R q on the tensor cores (mma.sync m16n8k16, fp32 accumulate):
//   S^T (16 tokens x 8 heads) = K' (16 tokens x 16 dims) . Q' (16 dims x 8 heads), P/16 k-steps;
//   O^T (16 dims x 8 heads)  += V'^T (16 dims x 16 tokens) . P' (16 tokens x 8 heads), P/16 m-tiles.
// The order of the reduced dimension inside an mma is free, so dims are permuted such that a lane
// decodes whole groups straight into its fragment registers: for keys, lane (gid, tig) holds
// tokens gid and gid+8 and the groups [tig*P/32, (tig+1)*P/32); for values, tokens 2tig, 2tig+1,
// 2tig+8, 2tig+9 and the groups [gid*P/64, (gid+1)*P/64), with token pairs formed by byte
// permutes. Probabilities go from the S^T accumulator layout to the P' operand layout with
// movmatrix (an 8x8 transpose in registers). GQA: up to 8 query heads share one KV head (the
// mma's N); scores are kept in log2 units (q is scaled by scale * log2 e) for ex2.
// A codeword is (signed magnitudes) + shift * (1, ..., 1), the shift +-1/4 per group (and r times
// that for a second stage). The decode builds only the signed magnitudes; the shifts go through one
// more mma per tile each: for keys S^T += Sh (16 tokens x 16 groups) . Qsum (16 groups x 8 heads),
// Qsum the per-group sums of R q, into the score accumulators; for values Osh (16 groups x 8 heads)
// += Sh^T (16 groups x 16 tokens) . P', added to each of a group's 8 dims at the end. That takes
// four fp16 adds and the shift's own bit work off every codeword.
#ifndef NQ_ATT_KB0
#error "NQ_ATT_KB0/VB0 (and KB1/VB1, 0 for one tier) must be defined with NQ_ATT_P"
#endif
#ifndef NQ_ATT_KB1
#define NQ_ATT_KB1 0
#define NQ_ATT_VB1 0
#endif

#ifndef NQ_AW
#define NQ_AW 4     // warps per block
#endif
#define NQ_AT (NQ_AW * 32)  // threads per block
#ifndef NQ_ATT_PREFETCH
#define NQ_ATT_PREFETCH 1  // load the next tile's codes while decoding this one
#endif
#ifndef NQ_DIAG
#define NQ_DIAG 0  // timing diagnostics only (wrong results): 1 skips the values, 2 the key decode
#endif
#define NQ_AMAXG 8  // query heads per KV head (the mma's N)
#define NQ_AREP 8   // copies of the pattern table, one per lane of a quarter warp: no bank conflicts
#define NQ_AMAXS 256
#define NQ_APS (2 * NQ_AMAXG + NQ_AMAXG * NQ_ATT_P)  // floats per partial state
#define NQ_NSK ((NQ_ATT_P / 32 + 3) / 4)  // key shift mmas per tile: 4 groups per lane each

struct NqTier {
    const unsigned char* kcodes;
    const unsigned short* kscales;
    const unsigned char* vcodes;
    const unsigned short* vscales;
    const unsigned char* valid;  // [B*Hkv, T] or null
    long long tokens, splits, chunk;
    float kres, vres;
};

struct NqAttnParams {
    const void* q;              // [B*Hq, D] (the one new query), model dtype
    void* out;                  // [B*Hq, D], model dtype
    const void* kfp;            // [B*Hkv, Tfp, D]: sinks then window, model dtype
    const void* vfp;
    const unsigned char* fp_mask;    // [B*Hkv, Tfp] or null (then sinks are visible and the window follows win_valid)
    const unsigned char* win_valid;  // [B, win_total]: the window is its last Tfp - n_sink entries
    const void* kcent;          // [B*Hkv, D] or null
    const void* vcent;
    const float* signs;         // [D]
    const uint4* table;         // [256] fp16 magnitude patterns
    float* part;                // [B*Hkv, S_total, NQ_APS]
    int* counters;              // [B*Hkv], zero between launches
    long long tfp, n_sink, win_total, g, hkv;
    float bscale, qscale;       // 1/sqrt(P) of the rotation; softmax scale * log2(e)
    NqTier tier[2];
};
static_assert(sizeof(NqTier) == 72 && sizeof(NqAttnParams) == 288, "gpu/attention.py (ATTN_PARAM_FIELDS) mirrors this layout");

__device__ __forceinline__ float nq_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ unsigned nq_pack_h2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ unsigned nq_hadd2(unsigned a, unsigned b) {
    unsigned r;
    asm("add.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
__device__ __forceinline__ unsigned nq_hfma2(unsigned a, unsigned b, unsigned c) {
    unsigned r;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}
__device__ __forceinline__ unsigned nq_movtrans(unsigned a) {
    unsigned r;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(a));
    return r;
}
__device__ __forceinline__ void nq_mma(float c[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                       unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ float nq_ldcg(const float* p) { return __ldcg(p); }

// Compile-time loop: f(NqInt<I>{}) for I in [I0, N), so array indices inside stay constants.
template <int I>
struct NqInt {
    static constexpr int value = I;
};
template <int I, int N, typename F>
__device__ __forceinline__ void nq_for(F&& f) {
    if constexpr (I < N) {
        f(NqInt<I>{});
        nq_for<I + 1, N>(f);
    }
}

// The four fp16 pairs of a group without its shift: magnitudes a (pair k = coordinates 2k, 2k+1,
// low half first) with the signs from x = the code's byte holding the 7 stored signs (bits 0-6)
// and the shift (bit 7). The eighth sign is the parity of the 7 stored ones (the magnitude table
// already carries the pattern's own parity), i.e. x7 ^ popc(x): c2 holds x twice, 15 bits apart,
// so that (c2 << (15 - 2k)) puts sign 2k at bit 15 and sign 2k+1 at bit 31, and adding
// popc(x) << 22 flips the copy of bit 7 that lands on bit 31 for pair 3 (carries only reach bits
// shifted out). The shift (+-1/4 on all 8 coordinates) is not added here: it is the same for the
// whole group, so the kernel applies it with one mma per tile against per-group sums (see
// NqChunk::shifts and nq_attend_tier).
__device__ __forceinline__ void nq_pairs(unsigned x, uint4 a, unsigned h[4]) {
    const unsigned c2 = x * 0x8001u + ((unsigned)__popc(x) << 22);
    h[0] = a.x ^ ((c2 << 15) & 0x80008000u);
    h[1] = a.y ^ ((c2 << 13) & 0x80008000u);
    h[2] = a.z ^ ((c2 << 11) & 0x80008000u);
    h[3] = a.w ^ ((c2 << 9) & 0x80008000u);
}

// This lane's copy of the pattern table (NQ_AREP copies interleaved, one per lane of a quarter warp).
#ifndef NQ_ATT_SHADDR
#define NQ_ATT_SHADDR 1  // address it with one 32-bit multiply-add per lookup (a shared-space address)
#endif
struct NqTbl {
#if NQ_ATT_SHADDR
    unsigned base;  // shared-space address of entry 0 of this lane's copy
    __device__ __forceinline__ uint4 at(unsigned idx) const {
        uint4 v;
        asm("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
            : "r"(base + idx * (NQ_AREP * 16u)));
        return v;
    }
    __device__ __forceinline__ void set(const uint4* p) { base = (unsigned)__cvta_generic_to_shared(p); }
#else
    const uint4* p;
    __device__ __forceinline__ uint4 at(unsigned idx) const { return p[idx * NQ_AREP]; }
    __device__ __forceinline__ void set(const uint4* q) { p = q; }
#endif
};

// An E8P16 codeword's signed magnitudes (the u16 in half `hi` of word w) as 4 fp16 pairs (exact:
// all values are odd multiples of 1/4 up to 11/4).
template <int HI>
__device__ __forceinline__ void nq_h16(unsigned w, const NqTbl& tbl, unsigned h[4]) {
    const unsigned idx = __byte_perm(w, 0u, HI ? 0x4442u : 0x4440u);
    const unsigned x = __byte_perm(w, 0u, HI ? 0x4443u : 0x4441u);
    nq_pairs(x, tbl.at(idx), h);
}

// An E8P8 codeword's signed magnitudes (byte B of word w: 7 signs, shift bit 7): 4 fp16 pairs of +-1/2.
template <int B>
__device__ __forceinline__ void nq_h8(unsigned w, unsigned h[4]) {
    const unsigned x = __byte_perm(w, 0u, 0x4440u + B);
    nq_pairs(x, make_uint4(0x38003800u, 0x38003800u, 0x38003800u, 0x38003800u), h);
}

// The shifts of two codewords as one fp16 pair (+1/4, or -1/4 where the shift bit is set): the low
// half from bit 7 of byte BA of wa, the high half from bit 7 of byte BB of wb.
template <int BA, int BB>
__device__ __forceinline__ unsigned nq_shift2(unsigned wa, unsigned wb) {
    const unsigned x = __byte_perm(wa, wb, (unsigned)((BA << 4) | ((4 + BB) << 12)));
    return (x & 0x80008000u) | 0x34003400u;
}
// Where the shift bit of group I of a chunk lives: byte 2I+1 of an E8P16 row, byte I of an E8P8 one.
template <bool P16, int I>
struct NqShiftAt {
    static constexpr int byte = P16 ? 2 * I + 1 : I;
    static constexpr int w = byte / 4, b = byte % 4;
};

// N bytes of a code row, loaded with one aligned access.
template <int N>
struct NqBytes {
    unsigned w[(N + 3) / 4];
    __device__ __forceinline__ void load(const unsigned char* p) {
        if constexpr (N == 16) {
            const uint4 v = *reinterpret_cast<const uint4*>(p);
            w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
        } else if constexpr (N == 8) {
            const uint2 v = *reinterpret_cast<const uint2*>(p);
            w[0] = v.x; w[1] = v.y;
        } else if constexpr (N == 4) {
            w[0] = *reinterpret_cast<const unsigned*>(p);
        } else if constexpr (N == 2) {
            w[0] = *reinterpret_cast<const unsigned short*>(p);
        } else {
            static_assert(N == 1, "code chunks are 1, 2, 4, 8 or 16 bytes");
            w[0] = *p;
        }
    }
};

// Group i of a chunk as 4 fp16 pairs without the shifts: stage 1 plus r * stage 2 for 3 and 4 bits.
template <int BITS, int NGRP>
struct NqChunk {
    static constexpr int B1 = BITS == 1 ? NGRP : 2 * NGRP;
    static constexpr int B2 = BITS == 3 ? NGRP : (BITS == 4 ? 2 * NGRP : 1);
    static constexpr bool P16_1 = BITS != 1, P16_2 = BITS == 4;
    NqBytes<B1> s1;
    NqBytes<B2> s2;
    // p1, p2: this chunk's stage-1 and stage-2 bytes.
    __device__ __forceinline__ void load(const unsigned char* p1, const unsigned char* p2) {
        s1.load(p1);
        if constexpr (BITS >= 3) s2.load(p2);
    }
    template <int I>
    __device__ __forceinline__ void decode(const NqTbl& tbl, unsigned r2, unsigned h[4]) const {
        if constexpr (BITS == 1) {
            nq_h8<I & 3>(s1.w[I >> 2], h);
        } else {
            nq_h16<I & 1>(s1.w[I >> 1], tbl, h);
            if constexpr (BITS >= 3) {
                unsigned e[4];
                if constexpr (BITS == 3) nq_h8<I & 3>(s2.w[I >> 2], e);
                else nq_h16<I & 1>(s2.w[I >> 1], tbl, e);
                #pragma unroll
                for (int k = 0; k < 4; ++k) h[k] = nq_hfma2(r2, e[k], h[k]);
            }
        }
    }
};

// The shifts (stage 1 + r * stage 2) of group IA of chunk a and group IB of chunk b as one fp16
// pair (low half a): the A operand of the shift mma.
// SAME: a and b are one chunk (then two E8P16 groups 2i, 2i+1 already sit at bits 15 and 31).
template <int IA, int IB, bool SAME, int BITS, int NA, int NB>
__device__ __forceinline__ unsigned nq_shifts(const NqChunk<BITS, NA>& a, const NqChunk<BITS, NB>& b, unsigned r2) {
    using C = NqChunk<BITS, NA>;
    using A1 = NqShiftAt<C::P16_1, IA>;
    using B1 = NqShiftAt<C::P16_1, IB>;
    unsigned s;
    if constexpr (SAME && A1::w == B1::w && A1::b == 1 && B1::b == 3) s = (a.s1.w[A1::w] & 0x80008000u) | 0x34003400u;
    else s = nq_shift2<A1::b, B1::b>(a.s1.w[A1::w], b.s1.w[B1::w]);
    if constexpr (BITS >= 3) {
        using A2 = NqShiftAt<C::P16_2, IA>;
        using B2 = NqShiftAt<C::P16_2, IB>;
        unsigned t;
        if constexpr (SAME && A2::w == B2::w && A2::b == 1 && B2::b == 3) t = (a.s2.w[A2::w] & 0x80008000u) | 0x34003400u;
        else t = nq_shift2<A2::b, B2::b>(a.s2.w[A2::w], b.s2.w[B2::w]);
        s = nq_hfma2(r2, t, s);
    }
    return s;
}

// Where one lane reads a tier's split: base pointers of its own key chunks (token gid of the split),
// value chunks (token 2tig) and scales (token gid), with the lane's group offsets folded in (64-bit
// arithmetic once per split; a tile then adds one 32-bit offset per array).
template <int KB, int VB>
struct NqSplitPtrs {
    static constexpr int P = NQ_ATT_P, NG = P / 8, KG = NG / 4, VG = NG / 8;
    static constexpr int KCB = NG * KB, VCB = NG * VB;
    using KC = NqChunk<KB, KG>;
    using VC = NqChunk<VB, VG>;
    static constexpr int K1 = KB == 1 ? 1 : 2, K2 = KB == 3 ? 1 : 2;  // bytes per group, stage 1 and 2
    static constexpr int V1 = VB == 1 ? 1 : 2, V2 = VB == 3 ? 1 : 2;
    const unsigned char* k1;   // + token * KCB: this lane's key chunk, stage 1 (token gid + t)
    const unsigned char* k2;   // stage 2
    const unsigned char* v1;   // + token * VCB: this lane's value chunk (token 2tig + t)
    const unsigned char* v2;
    const unsigned short* ks;  // key scales, token gid + t
    const unsigned short* vs;
    const unsigned char* valid;
    int n;                     // tokens in the split
    __device__ __forceinline__ void init(const NqTier& tr, long long bh, long long t_begin, long long t_end, int gid, int tig) {
        const long long row0 = bh * tr.tokens + t_begin;
        const unsigned char* kr = tr.kcodes + (row0 + gid) * KCB;
        k1 = kr + KG * tig * K1;
        k2 = kr + NG * K1 + KG * tig * K2;
        const unsigned char* vr = tr.vcodes + (row0 + 2 * tig) * VCB;
        v1 = vr + VG * gid * V1;
        v2 = vr + NG * V1 + VG * gid * V2;
        ks = tr.kscales + row0 + gid;
        vs = tr.vscales + row0 + gid;
        valid = tr.valid != nullptr ? tr.valid + row0 + gid : nullptr;
        n = (int)(t_end - t_begin);
    }
};

// The raw loads of one 16-token tile for one lane.
template <int KB, int VB>
struct NqTile {
    static constexpr int P = NQ_ATT_P, NG = P / 8, KG = NG / 4, VG = NG / 8;
    static constexpr int KCB = NG * KB, VCB = NG * VB;
    NqChunk<KB, KG> ka, kb;                   // tokens gid, gid + 8
    NqChunk<VB, VG> v[4];                     // tokens 2tig, 2tig+1, 2tig+8, 2tig+9
    unsigned short ksa, ksb, vsa, vsb;
    bool oka, okb;
    __device__ __forceinline__ void load(const NqSplitPtrs<KB, VB>& sp, int t0, int gid, int tig) {
        if (t0 + 16 <= sp.n) {  // a full tile: fixed offsets from the lane's pointers
            const int ok_ = t0 * KCB, ov = t0 * VCB;
            ka.load(sp.k1 + ok_, sp.k2 + ok_);
            kb.load(sp.k1 + ok_ + 8 * KCB, sp.k2 + ok_ + 8 * KCB);
            ksa = sp.ks[t0];
            ksb = sp.ks[t0 + 8];
            vsa = sp.vs[t0];
            vsb = sp.vs[t0 + 8];
            oka = okb = true;
            if (sp.valid != nullptr) {
                oka = sp.valid[t0];
                okb = sp.valid[t0 + 8];
            }
            v[0].load(sp.v1 + ov, sp.v2 + ov);
            v[1].load(sp.v1 + ov + VCB, sp.v2 + ov + VCB);
            v[2].load(sp.v1 + ov + 8 * VCB, sp.v2 + ov + 8 * VCB);
            v[3].load(sp.v1 + ov + 9 * VCB, sp.v2 + ov + 9 * VCB);
            return;
        }
        // The split's last, partial tile: tokens past its end read the last token and are masked.
        const int last = sp.n - 1;
        const int ta = t0 + gid, tb = ta + 8;
        oka = ta <= last;
        okb = tb <= last;
        const int la = min(ta, last) - gid, lb = min(tb, last) - gid;  // offsets from the lane's token gid
        ka.load(sp.k1 + la * KCB, sp.k2 + la * KCB);
        kb.load(sp.k1 + lb * KCB, sp.k2 + lb * KCB);
        ksa = sp.ks[la];
        ksb = sp.ks[lb];
        vsa = sp.vs[la];
        vsb = sp.vs[lb];
        if (sp.valid != nullptr) {
            oka = oka && sp.valid[la];
            okb = okb && sp.valid[lb];
        }
        const int tv = t0 + 2 * tig;
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int o = (min(tv + (i & 1) + 8 * (i >> 1), last) - 2 * tig) * VCB;
            v[i].load(sp.v1 + o, sp.v2 + o);
        }
    }
};

template <int KB, int VB>
__device__ __forceinline__ void nq_attend_tier(const NqTier& tr, long long bh, int split, const NqTbl& tbl,
                                               const unsigned (&qf)[NQ_ATT_P / 16][2],
                                               const unsigned (&qsf)[NQ_NSK][2], float* wm, float* wl,
                                               float* wacc, float& m0o, float& m1o) {
    constexpr int P = NQ_ATT_P, NG = P / 8, KG = NG / 4, VG = NG / 8, MT = P / 16, NSV = (VG + 1) / 2;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const float NEG_INF = __int_as_float(0xff800000);
    const long long t_begin = (long long)split * tr.chunk;
    const long long t_end = min(tr.tokens, t_begin + tr.chunk);
    const int n_tiles = (int)((t_end - t_begin + 15) / 16);
    const unsigned kr2 = nq_pack_h2(tr.kres, tr.kres), vr2 = nq_pack_h2(tr.vres, tr.vres);

    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;  // heads 2tig, 2tig+1
    float o[MT][4];
    #pragma unroll
    for (int i = 0; i < MT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    // The values' shifts: per (group, head) sums of p * scale * shift, one mma per tile; group row
    // gid of mma s is the lane's value group 2s, row gid + 8 its group 2s + 1.
    float osh[NSV][4];
    #pragma unroll
    for (int i = 0; i < NSV; ++i) osh[i][0] = osh[i][1] = osh[i][2] = osh[i][3] = 0.0f;

    NqSplitPtrs<KB, VB> sp;
    sp.init(tr, bh, t_begin, t_end, gid, tig);
    NqTile<KB, VB> cur, nxt;
    if (NQ_ATT_PREFETCH && warp < n_tiles) cur.load(sp, warp * 16, gid, tig);
    for (int tile = warp; tile < n_tiles; tile += NQ_AW) {
        if (NQ_ATT_PREFETCH) {
            if (tile + NQ_AW < n_tiles) nxt.load(sp, (tile + NQ_AW) * 16, gid, tig);
        } else {
            cur.load(sp, tile * 16, gid, tig);
        }
        // Scores: S^T[token][head], this lane holds (gid, 2tig), (gid, 2tig+1), (gid+8, 2tig), (gid+8, 2tig+1).
        // Two accumulators (even and odd k-steps) halve the chain of dependent mma.
        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f}, c2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        nq_for<0, KG>([&](auto gi) {
            constexpr int gk = decltype(gi)::value;
            unsigned ha[4], hb[4];
            if constexpr (NQ_DIAG == 2) {
                ha[0] = ha[1] = ha[2] = ha[3] = cur.ka.s1.w[0];
                hb[0] = hb[1] = hb[2] = hb[3] = cur.kb.s1.w[0];
            } else {
                cur.ka.template decode<gk>(tbl, kr2, ha);
                cur.kb.template decode<gk>(tbl, kr2, hb);
            }
            nq_mma(c, ha[0], hb[0], ha[1], hb[1], qf[2 * gk][0], qf[2 * gk][1]);
            nq_mma(c2, ha[2], hb[2], ha[3], hb[3], qf[2 * gk + 1][0], qf[2 * gk + 1][1]);
        });
        // The keys' shifts: S^T += Sh (16 tokens x 16 groups) . Qsum (16 groups x 8 heads); k index
        // 2tig, 2tig+1 of mma s is the lane's key group 4s, 4s+1, index 2tig+8, 2tig+9 its 4s+2, 4s+3.
        nq_for<0, NQ_NSK>([&](auto si) {
            constexpr int sk = decltype(si)::value, g0 = 4 * sk;
            const unsigned a0 = nq_shifts<g0, g0 + 1, true>(cur.ka, cur.ka, kr2);
            const unsigned a1 = nq_shifts<g0, g0 + 1, true>(cur.kb, cur.kb, kr2);
            unsigned a2 = 0u, a3 = 0u;
            if constexpr (g0 + 2 < KG) {
                a2 = nq_shifts<g0 + 2, g0 + 3, true>(cur.ka, cur.ka, kr2);
                a3 = nq_shifts<g0 + 2, g0 + 3, true>(cur.kb, cur.kb, kr2);
            }
            nq_mma((sk & 1) ? c2 : c, a0, a1, a2, a3, qsf[sk][0], qsf[sk][1]);
        });
        #pragma unroll
        for (int i = 0; i < 4; ++i) c[i] += c2[i];
        const float ska = __half2float(__ushort_as_half(cur.ksa)), skb = __half2float(__ushort_as_half(cur.ksb));
        const float x0 = cur.oka ? c[0] * ska : NEG_INF, x1 = cur.oka ? c[1] * ska : NEG_INF;
        const float x2 = cur.okb ? c[2] * skb : NEG_INF, x3 = cur.okb ? c[3] * skb : NEG_INF;
        float mx0 = fmaxf(x0, x2), mx1 = fmaxf(x1, x3);
        #pragma unroll
        for (int off = 4; off < 32; off <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(NQ_FULL, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(NQ_FULL, mx1, off));
        }
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float mu0 = mn0 == NEG_INF ? 0.0f : mn0, mu1 = mn1 == NEG_INF ? 0.0f : mn1;
        const float al0 = nq_ex2(m0 - mu0), al1 = nq_ex2(m1 - mu1);
        const float p0 = nq_ex2(x0 - mu0), p1 = nq_ex2(x1 - mu1), p2 = nq_ex2(x2 - mu0), p3 = nq_ex2(x3 - mu1);
        l0 = l0 * al0 + (p0 + p2);
        l1 = l1 * al1 + (p1 + p3);
        m0 = mn0;
        m1 = mn1;
        // Rescale the accumulators only when some running max moved (rare after the first tiles).
        if (!__all_sync(NQ_FULL, al0 == 1.0f && al1 == 1.0f)) {
            #pragma unroll
            for (int i = 0; i < MT; ++i) {
                o[i][0] *= al0; o[i][1] *= al1; o[i][2] *= al0; o[i][3] *= al1;
            }
            #pragma unroll
            for (int i = 0; i < NSV; ++i) {
                osh[i][0] *= al0; osh[i][1] *= al1; osh[i][2] *= al0; osh[i][3] *= al1;
            }
        }
        // P' = p * value scale, as fp16; transposed into the B operand of the value mma.
        const float sva = __half2float(__ushort_as_half(cur.vsa)), svb = __half2float(__ushort_as_half(cur.vsb));
        const unsigned b0 = nq_movtrans(nq_pack_h2(p0 * sva, p1 * sva));
        const unsigned b1 = nq_movtrans(nq_pack_h2(p2 * svb, p3 * svb));
        if constexpr (NQ_DIAG != 1) nq_for<0, VG>([&](auto ji) {
            constexpr int j = decltype(ji)::value;
            unsigned h[4][4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) cur.v[i].template decode<j>(tbl, vr2, h[i]);
            #pragma unroll
            for (int cp = 0; cp < 4; ++cp) {
                const unsigned a0 = __byte_perm(h[0][cp], h[1][cp], 0x5410);
                const unsigned a1 = __byte_perm(h[0][cp], h[1][cp], 0x7632);
                const unsigned a2 = __byte_perm(h[2][cp], h[3][cp], 0x5410);
                const unsigned a3 = __byte_perm(h[2][cp], h[3][cp], 0x7632);
                nq_mma(o[4 * j + cp], a0, a1, a2, a3, b0, b1);
            }
        });
        if constexpr (NQ_DIAG != 1) nq_for<0, NSV>([&](auto si) {
            constexpr int sv = decltype(si)::value, g0 = 2 * sv;
            const unsigned a0 = nq_shifts<g0, g0, false>(cur.v[0], cur.v[1], vr2);
            const unsigned a2 = nq_shifts<g0, g0, false>(cur.v[2], cur.v[3], vr2);
            unsigned a1 = 0u, a3 = 0u;
            if constexpr (g0 + 1 < VG) {
                a1 = nq_shifts<g0 + 1, g0 + 1, false>(cur.v[0], cur.v[1], vr2);
                a3 = nq_shifts<g0 + 1, g0 + 1, false>(cur.v[2], cur.v[3], vr2);
            }
            nq_mma(osh[sv], a0, a1, a2, a3, b0, b1);
        });
        if (NQ_ATT_PREFETCH) cur = nxt;
    }
    #pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
        l0 += __shfl_xor_sync(NQ_FULL, l0, off);
        l1 += __shfl_xor_sync(NQ_FULL, l1, off);
    }
    __syncthreads();  // every warp is done with the pattern table, whose space wacc reuses
    if (gid == 0) {
        wm[warp * NQ_AMAXG + 2 * tig] = m0;
        wm[warp * NQ_AMAXG + 2 * tig + 1] = m1;
        wl[warp * NQ_AMAXG + 2 * tig] = l0;
        wl[warp * NQ_AMAXG + 2 * tig + 1] = l1;
    }
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        // o[mt]: the lane's value group mt / 4 (osh row gid of mma j/2 for even j, row gid + 8 for odd).
        const int j = mt / 4;
        const float s0 = osh[j / 2][(j & 1) * 2], s1 = osh[j / 2][(j & 1) * 2 + 1];
        o[mt][0] += s0;
        o[mt][2] += s0;
        o[mt][1] += s1;
        o[mt][3] += s1;
        const int dim = 8 * (VG * gid + mt / 4) + 2 * (mt % 4);
        float* r0 = wacc + (warp * NQ_AMAXG + 2 * tig) * P;
        float* r1 = r0 + P;
        r0[dim] = o[mt][0];
        r1[dim] = o[mt][1];
        r0[dim + 1] = o[mt][2];
        r1[dim + 1] = o[mt][3];
    }
    m0o = m0;
    m1o = m1;
}

// In-place FWHT of P floats in shared memory by one warp (scale applied by the caller).
__device__ __forceinline__ void nq_fwht_smem(float* s, int lane) {
    constexpr int P = NQ_ATT_P;
    #pragma unroll
    for (int h = 1; h < P; h <<= 1) {
        #pragma unroll
        for (int k = lane; k < P / 2; k += 32) {
            const int i = (k / h) * 2 * h + (k % h);
            const float a = s[i], b = s[i + h];
            s[i] = a + b;
            s[i + h] = a - b;
        }
        __syncwarp();
    }
}

// The full-precision sinks and window of one (batch, KV head): two-pass softmax over chunks of
// NQ_AT tokens (one token per thread for the scores, one dimension per thread for the values).
template <typename T>
__device__ __forceinline__ void nq_attend_fp(const NqAttnParams& p, long long bh, float* qs, float* sc, float* mls,
                                             float* part) {
    constexpr int D = NQ_ATT_P, DPT = (D + NQ_AT - 1) / NQ_AT;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = (int)p.g;
    const long long tfp = p.tfp;
    const float NEG_INF = __int_as_float(0xff800000);
    const T* q = static_cast<const T*>(p.q) + bh * g * D;
    for (int i = tid; i < NQ_AMAXG * D; i += blockDim.x) qs[i] = i < g * D ? nq_to_f32(q[i]) * p.qscale : 0.0f;
    if (tid < NQ_AMAXG) {
        mls[tid] = NEG_INF;  // running max
        mls[NQ_AMAXG + tid] = 0.0f;  // running sum
    }
    float acc[NQ_AMAXG][DPT];
    #pragma unroll
    for (int j = 0; j < NQ_AMAXG; ++j)
        #pragma unroll
        for (int k = 0; k < DPT; ++k) acc[j][k] = 0.0f;
    __syncthreads();
    const T* kb = static_cast<const T*>(p.kfp) + bh * tfp * D;
    const T* vb = static_cast<const T*>(p.vfp) + bh * tfp * D;
    const long long b = bh / p.hkv;
    const long long win_off = p.win_total - (tfp - p.n_sink);
    for (long long c0 = 0; c0 < tfp; c0 += NQ_AT) {
        const long long t = c0 + tid;
        float s[NQ_AMAXG];
        #pragma unroll
        for (int j = 0; j < NQ_AMAXG; ++j) s[j] = 0.0f;
        bool ok = t < tfp;
        if (ok) {
            const T* kr = kb + t * D;
            #pragma unroll 4
            for (int d = 0; d < D; d += 8) {
                float kv[8];
                nq_load8(kr + d, kv);
                #pragma unroll
                for (int j = 0; j < NQ_AMAXG; ++j) {
                    if (j < g) {
                        #pragma unroll
                        for (int e = 0; e < 8; ++e) s[j] = fmaf(qs[j * D + d + e], kv[e], s[j]);
                    }
                }
            }
            if (p.fp_mask != nullptr) ok = p.fp_mask[bh * tfp + t] != 0;
            else if (t >= p.n_sink) ok = p.win_valid[b * p.win_total + win_off + (t - p.n_sink)] != 0;
        }
        #pragma unroll
        for (int j = 0; j < NQ_AMAXG; ++j) sc[j * NQ_AT + tid] = ok ? s[j] : NEG_INF;
        __syncthreads();
        for (int j = warp; j < g; j += NQ_AW) {
            float mx = NEG_INF;
            for (int i = lane; i < NQ_AT; i += 32) mx = fmaxf(mx, sc[j * NQ_AT + i]);
            #pragma unroll
            for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(NQ_FULL, mx, off));
            const float m_old = mls[j];
            const float mn = fmaxf(m_old, mx);
            const float mu = mn == NEG_INF ? 0.0f : mn;
            float sum = 0.0f;
            for (int i = lane; i < NQ_AT; i += 32) {
                const float e = nq_ex2(sc[j * NQ_AT + i] - mu);
                sc[j * NQ_AT + i] = e;
                sum += e;
            }
            #pragma unroll
            for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(NQ_FULL, sum, off);
            __syncwarp();
            if (lane == 0) {
                const float al = nq_ex2(m_old - mu);
                mls[j] = mn;
                mls[NQ_AMAXG + j] = mls[NQ_AMAXG + j] * al + sum;
                mls[2 * NQ_AMAXG + j] = al;
            }
        }
        __syncthreads();
        const int nt = (int)min((long long)NQ_AT, tfp - c0);
        #pragma unroll
        for (int k = 0; k < DPT; ++k) {
            const int d = tid + NQ_AT * k;
            if (d < D) {
                #pragma unroll
                for (int j = 0; j < NQ_AMAXG; ++j) acc[j][k] *= (j < g ? mls[2 * NQ_AMAXG + j] : 0.0f);
                #pragma unroll 4
                for (int i = 0; i < nt; ++i) {
                    const float v = nq_to_f32(vb[(c0 + i) * D + d]);
                    #pragma unroll
                    for (int j = 0; j < NQ_AMAXG; ++j)
                        if (j < g) acc[j][k] = fmaf(sc[j * NQ_AT + i], v, acc[j][k]);
                }
            }
        }
        __syncthreads();
    }
    #pragma unroll
    for (int k = 0; k < DPT; ++k) {
        const int d = tid + NQ_AT * k;
        if (d < D) {
            #pragma unroll
            for (int j = 0; j < NQ_AMAXG; ++j)
                if (j < g) part[2 * NQ_AMAXG + j * NQ_ATT_P + d] = acc[j][k];
        }
    }
    if (tid < g) {
        part[tid] = mls[tid];
        part[NQ_AMAXG + tid] = mls[NQ_AMAXG + tid];
    }
}

// The last block of a (batch, KV head): merge every partial state and write the output.
template <typename T>
__device__ __forceinline__ void nq_attend_merge(const NqAttnParams& p, long long bh, int s_total, float* region) {
    constexpr int P = NQ_ATT_P, D = NQ_ATT_P;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = (int)p.g;
    const int s_rot = s_total - 1;
    const float NEG_INF = __int_as_float(0xff800000);
    const float* base = p.part + bh * s_total * NQ_APS;
    float* wts = region;                          // [s_rot][8]: maxima, then weights
    float* ls = wts + NQ_AMAXS * NQ_AMAXG;        // [s_rot][8]: sums
    float* red = ls + NQ_AMAXS * NQ_AMAXG;        // M[8], L[8], qc[8]
    float* orot = red + 4 * NQ_AMAXG;             // [8][P]
    for (int i = tid; i < s_rot * g; i += blockDim.x) {
        const int s = i / g, j = i % g;
        wts[s * NQ_AMAXG + j] = nq_ldcg(base + s * NQ_APS + j);
        ls[s * NQ_AMAXG + j] = nq_ldcg(base + s * NQ_APS + NQ_AMAXG + j);
    }
    __syncthreads();
    for (int j = warp; j < g; j += NQ_AW) {
        float mx = NEG_INF;
        for (int s = lane; s < s_rot; s += 32) mx = fmaxf(mx, wts[s * NQ_AMAXG + j]);
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(NQ_FULL, mx, off));
        float l = 0.0f;
        for (int s = lane; s < s_rot; s += 32) {
            const float m = wts[s * NQ_AMAXG + j];
            const float w = m == NEG_INF ? 0.0f : nq_ex2(m - mx);
            wts[s * NQ_AMAXG + j] = w;
            l += w * ls[s * NQ_AMAXG + j];
        }
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(NQ_FULL, l, off);
        if (lane == 0) {
            red[j] = mx;
            red[NQ_AMAXG + j] = l;
        }
    }
    __syncthreads();
    for (int i = tid; i < g * (P / 4); i += blockDim.x) {
        const int j = i / (P / 4), d4 = i % (P / 4);
        float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        #pragma unroll 16
        for (int s = 0; s < s_rot; ++s) {
            const float w = wts[s * NQ_AMAXG + j];
            const float4 v = __ldcg(reinterpret_cast<const float4*>(base + s * NQ_APS + 2 * NQ_AMAXG + j * P) + d4);
            a.x += w * v.x; a.y += w * v.y; a.z += w * v.z; a.w += w * v.w;
        }
        reinterpret_cast<float4*>(orot + j * P)[d4] = a;
    }
    __syncthreads();
    const T* q = static_cast<const T*>(p.q) + bh * g * D;
    const T* kc = p.kcent != nullptr ? static_cast<const T*>(p.kcent) + bh * D : nullptr;
    for (int j = warp; j < g; j += NQ_AW) {
        nq_fwht_smem(orot + j * P, lane);
        for (int d = lane; d < D; d += 32) orot[j * P + d] = orot[j * P + d] * p.bscale * p.signs[d];
        float qc = 0.0f;
        if (kc != nullptr) {
            for (int d = lane; d < D; d += 32) qc = fmaf(nq_to_f32(q[j * D + d]), nq_to_f32(kc[d]), qc);
            #pragma unroll
            for (int off = 16; off > 0; off >>= 1) qc += __shfl_xor_sync(NQ_FULL, qc, off);
        }
        if (lane == 0) red[2 * NQ_AMAXG + j] = qc * p.qscale;
    }
    __syncthreads();
    const float* fp = base + s_rot * NQ_APS;
    const T* vc = p.vcent != nullptr ? static_cast<const T*>(p.vcent) + bh * D : nullptr;
    T* out = static_cast<T*>(p.out) + bh * g * D;
    for (int i = tid; i < g * D; i += blockDim.x) {
        const int j = i / D, d = i % D;
        const float mr = red[j] == NEG_INF ? NEG_INF : red[j] + red[2 * NQ_AMAXG + j];
        const float mf = nq_ldcg(fp + j), lf = nq_ldcg(fp + NQ_AMAXG + j);
        const float mx = fmaxf(mr, mf);
        const float a = mr == NEG_INF ? 0.0f : nq_ex2(mr - mx);
        const float b = mf == NEG_INF ? 0.0f : nq_ex2(mf - mx);
        const float l = red[NQ_AMAXG + j];
        float num = orot[j * P + d];
        if (vc != nullptr) num += l * nq_to_f32(vc[d]);
        num = a * num + b * nq_ldcg(fp + 2 * NQ_AMAXG + j * P + d);
        nq_from_f32(num / (a * l + b * lf), &out[i]);
    }
}

template <typename T>
__device__ __forceinline__ void nq_attend(const NqAttnParams& p) {
    constexpr int P = NQ_ATT_P, KS = P / 16, KG = P / 32;
    // Region A: the pattern table (8 copies) during the main loop, then the warps' states, the
    // merge's weights and accumulators, or the full-precision block's scores.
    constexpr int REGION_FLOATS_T = 256 * NQ_AREP * 4;
    constexpr int REGION_FLOATS_W = NQ_AW * NQ_AMAXG * P;
    constexpr int REGION_FLOATS_M = 2 * NQ_AMAXS * NQ_AMAXG + 4 * NQ_AMAXG + NQ_AMAXG * P;
    constexpr int RA = REGION_FLOATS_T > REGION_FLOATS_W ? (REGION_FLOATS_T > REGION_FLOATS_M ? REGION_FLOATS_T : REGION_FLOATS_M)
                                                         : (REGION_FLOATS_W > REGION_FLOATS_M ? REGION_FLOATS_W : REGION_FLOATS_M);
    __shared__ __align__(16) float region[RA];
    __shared__ __align__(16) float qrot[NQ_AMAXG * P];
    __shared__ float wm[NQ_AW * NQ_AMAXG], wl[NQ_AW * NQ_AMAXG];
    __shared__ int last;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
    const long long bh = blockIdx.y;
    const int split = blockIdx.x, s_total = gridDim.x;
    const int g = (int)p.g;
    const float NEG_INF = __int_as_float(0xff800000);
    float* part = p.part + (bh * s_total + split) * NQ_APS;
    const int s0 = (int)p.tier[0].splits, s1 = (int)p.tier[1].splits;

    if (split < s0 + s1) {
        uint4* tbl = reinterpret_cast<uint4*>(region);
        for (int i = tid; i < 256; i += blockDim.x) {
            const uint4 v = p.table[i];
            #pragma unroll
            for (int r = 0; r < NQ_AREP; ++r) tbl[i * NQ_AREP + r] = v;
        }
        // R q * scale * log2(e): signs, FWHT, 1/sqrt(P).
        const T* q = static_cast<const T*>(p.q) + bh * g * P;
        for (int i = tid; i < NQ_AMAXG * P; i += blockDim.x)
            qrot[i] = i < g * P ? nq_to_f32(q[i]) * p.signs[i % P] : 0.0f;
        __syncthreads();
        for (int j = warp; j < g; j += NQ_AW) {
            nq_fwht_smem(qrot + j * P, lane);
            for (int d = lane; d < P; d += 32) qrot[j * P + d] *= p.bscale * p.qscale;
        }
        __syncthreads();
        // Q' fragments: k-step ks covers group KG*tig + ks/2, coordinates 4*(ks&1) .. +3.
        unsigned qf[KS][2];
        #pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            const float* qr = qrot + gid * P + 8 * (KG * tig + (ks >> 1)) + 4 * (ks & 1);
            qf[ks][0] = nq_pack_h2(qr[0], qr[1]);
            qf[ks][1] = nq_pack_h2(qr[2], qr[3]);
        }
        // Qsum fragments for the keys' shifts: head gid, the lane's key groups KG*tig + 4s .. + 3
        // (b0: +0, +1; b1: +2, +3), each the sum of the group's 8 scaled rotated coordinates.
        unsigned qsf[NQ_NSK][2];
        #pragma unroll
        for (int sk = 0; sk < NQ_NSK; ++sk) {
            float gs[4];
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                gs[e] = 0.0f;
                if (4 * sk + e < KG) {
                    const float* qr = qrot + gid * P + 8 * (KG * tig + 4 * sk + e);
                    #pragma unroll
                    for (int d = 0; d < 8; ++d) gs[e] += qr[d];
                }
            }
            qsf[sk][0] = nq_pack_h2(gs[0], gs[1]);
            qsf[sk][1] = nq_pack_h2(gs[2], gs[3]);
        }
        NqTbl tb;
        tb.set(tbl + (lane & (NQ_AREP - 1)));
        float m0, m1;
        if (split < s0) nq_attend_tier<NQ_ATT_KB0, NQ_ATT_VB0>(p.tier[0], bh, split, tb, qf, qsf, wm, wl, region, m0, m1);
#if NQ_ATT_KB1 > 0
        else nq_attend_tier<NQ_ATT_KB1, NQ_ATT_VB1>(p.tier[1], bh, split - s0, tb, qf, qsf, wm, wl, region, m0, m1);
#endif
        __syncthreads();
        // Merge the warps into this block's partial state.
        for (int i = tid; i < g * P; i += blockDim.x) {
            const int j = i / P, d = i % P;
            float mx = NEG_INF;
            #pragma unroll
            for (int w = 0; w < NQ_AW; ++w) mx = fmaxf(mx, wm[w * NQ_AMAXG + j]);
            float a = 0.0f, l = 0.0f;
            #pragma unroll
            for (int w = 0; w < NQ_AW; ++w) {
                const float mw = wm[w * NQ_AMAXG + j];
                const float f = mw == NEG_INF ? 0.0f : nq_ex2(mw - mx);
                a += f * region[(w * NQ_AMAXG + j) * P + d];
                l += f * wl[w * NQ_AMAXG + j];
            }
            part[2 * NQ_AMAXG + j * P + d] = a;
            if (d == 0) {
                part[j] = mx;
                part[NQ_AMAXG + j] = l;
            }
        }
    } else {
        nq_attend_fp<T>(p, bh, qrot, region, wm, part);
    }
    // The last block to finish merges (threadFenceReduction pattern).
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        const int prev = atomicAdd(&p.counters[bh], 1);
        last = prev == s_total - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    nq_attend_merge<T>(p, bh, s_total, region);
    if (tid == 0) p.counters[bh] = 0;
}

#ifdef NQ_ATT_MINB  // a register cap: at least NQ_ATT_MINB blocks per SM
#define NQ_ATT_BOUNDS __launch_bounds__(NQ_AT, NQ_ATT_MINB)
#else
#define NQ_ATT_BOUNDS __launch_bounds__(NQ_AT)
#endif
#ifndef NQ_ATT_PCA  // the transform-coded module builds only its own entry (below)
#define NQ_ATTEND_ENTRY(NAME, T) \
    extern "C" __global__ void NQ_ATT_BOUNDS NAME(const NqAttnParams p) { nq_attend<T>(p); }
// NQ_ATT_T picks the one model dtype to build (0 float, 1 half, 2 bfloat16; all three if unset):
// the loader compiles a module per dtype in use, which keeps each NVRTC compile short.
#if !defined(NQ_ATT_T) || NQ_ATT_T == 0
NQ_ATTEND_ENTRY(nq_attend_f32, float)
#endif
#if !defined(NQ_ATT_T) || NQ_ATT_T == 1
NQ_ATTEND_ENTRY(nq_attend_f16, __half)
#endif
#if !defined(NQ_ATT_T) || NQ_ATT_T == 2
NQ_ATTEND_ENTRY(nq_attend_bf16, __nv_bfloat16)
#endif
#endif  // !NQ_ATT_PCA
#ifdef NQ_ATT_PCA
// ============================================================================= fused decode over transform-coded keys
// One new query per sequence against a layer whose prompt keys are transform-coded (transform.py:
// per batch row an int8 basis F x K with the column scales folded into the coefficients, codes
// packed LSB-first at fixed bit offsets) and whose values are E8-coded, plus the full-precision
// part (sinks, the generated tier the caller dequantized, the window), in ONE launch with the
// layout of nq_attend: grid (S + 1, B * H_kv); blocks [0, S) take a chunk of the coded tokens each,
// the last one the full-precision tokens; the last block to finish merges (nq_attend_merge, with
// no key centre: the rebuilt keys already hold mean + k_center).
//
// Per warp and tile of 16 tokens (keys never leave the chip):
//  1. unpack the tile's coefficients, a chunk of NQ_PKC components at a time, as fp16 into the
//     warp's shared buffer (a lane takes two neighbouring components: one funnel shift reads both);
//  2. rebuild K^T (dims x tokens) of the block's KV head on the tensor cores: A = the head's
//     basis rows (16 dims x 16 components, int8 + 128 in shared memory in fragment order, two
//     byte permutes and one fp16 subtract per register), B = coefficients (16 components x 8
//     tokens), fp32 accumulators;
//  3. add mean + k_center; redo RoPE in registers (a dim and its split-half partner sit in the
//     same lane: m-tiles mt and mt + rot/32), with cos/sin computed from each token's position
//     and the rotary frequencies (tables of positions) or read from float32 rows;
//  4. transpose the keys to the score mma's A operand in registers (movmatrix), score against
//     the query group (S^T = K Q, Q scaled by scale * log2 e), online softmax, and accumulate the
//     E8 values exactly as nq_attend_tier does.
// NQ_ATT_KB0 (unused here) must equal NQ_ATT_VB0: the shared templates are instantiated with both.
#define NQ_PKC 128               // components per coefficient chunk
#define NQ_PCS (NQ_PKC + 8)      // halves per token row of the chunk buffer (skewed: conflict-free)
#define NQ_PNPASS (NQ_ATT_P > 128 ? 2 : 1)  // passes over the dims (accumulator registers)
// NQ_PCA_STAGE (the default build): the coefficients come unpacked (fp16 [T, ld], one
// nq_pca_coeffs_f16 launch before this one: every token unpacked once for all KV heads, not once
// per head's block), and each warp streams its tiles' chunks of NQ_SKC components into a
// double-buffered shared slot with 16-byte cp.async (L2-cached: the H_kv blocks of a token range
// run side by side and read the same bytes), the next chunk in flight while the current one is
// multiplied. Without it, step 1 below unpacks the codes in the kernel (the first version).
#define NQ_SKC 64                // components per staged chunk
#define NQ_SCS (NQ_SKC + 8)      // halves per token row of a staged slot (144 bytes: 16-byte rows, no conflicts)

struct NqPcaRow {                // one batch row's code (64 bytes)
    const unsigned char* codes;  // [T, code_bytes], 4-byte aligned
    const uint2* basis;          // [H][Kp/16][P/16][32]: 8 bytes per lane (rows gid, gid+8), int8 + 128
    const int2* meta_i;          // [Kp/2]: bit offset of component 2c, width 2c | width 2c+1 << 8
    const float4* meta_f;        // [Kp/2]: (0.5 - 2^(w-1), scale) of components 2c and 2c+1
    const float* bias;           // [H * P]: mean + k_center
    long long code_bytes;
    long long kp;                // components padded to a multiple of 16 (pad: width 0, scale 0)
    const __half* coeffs;        // NQ_PCA_STAGE: [T, ld] fp16 coefficients (nq_pca_coeffs_f16), 16-byte rows
    long long ld;                // NQ_PCA_STAGE: coefficients per row (a multiple of 64, >= kp; zeros past K)
};

struct NqPcaParams {
    NqAttnParams a;              // tier[0]: the values' codes and scales, valid, tokens/splits/chunk
    const NqPcaRow* rows;        // [B]
    const int* seq;              // [B, T]: each token's index into the rotary table; null: post-RoPE
    const float* cos;            // [table_rows, table_len, width] float32, or null (positions)
    const float* sin;
    const int* positions;        // [table_rows, table_len], or null (rows)
    const float* inv_freq;       // [rot / 2]
    long long table_rows, table_len, kp_cap;
    int width, rot;              // row width (rot, or rot / 2 for half rows); rotated dims
    float rscale;                // positions: cos/sin times this, then rounded to rdtype
    int rdtype;                  // 0 float32, 1 float16, 2 bfloat16
};
static_assert(sizeof(NqPcaRow) == 72, "gpu/pca_attention.py (_ROW) mirrors this layout");
static_assert(sizeof(NqPcaParams) == 288 + 9 * 8 + 16, "gpu/pca_attention.py mirrors this layout");

__device__ __forceinline__ unsigned nq_word(const unsigned char* base, long long wi, long long nbytes) {
    if ((wi + 1) * 4 <= nbytes) return reinterpret_cast<const unsigned*>(base)[wi];
    unsigned v = 0u;  // the last, partial word of the codes (never past their end)
    for (int b = 0; b < 4; ++b)
        if (wi * 4 + b < nbytes) v |= (unsigned)base[wi * 4 + b] << (8 * b);
    return v;
}
__device__ __forceinline__ void nq_cp16(void* dst, const void* src) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void nq_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void nq_cp_wait1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }
// Two int8 (+128) bytes as an fp16 pair: 0x64XX is 1024 + XX exactly; minus 1152.
__device__ __forceinline__ unsigned nq_i8pair(unsigned w, unsigned sel) {
    return nq_hadd2(__byte_perm(w, 0x64646464u, sel), 0xE480E480u);  // + (-1152, -1152)
}
__device__ __forceinline__ float nq_round_to(float x, int dt) {
    if (dt == 1) return __half2float(__float2half_rn(x));
    if (dt == 2) return __bfloat162float(__float2bfloat16_rn(x));
    return x;
}

// cos/sin of frequency f (< rot/2) for the lo and hi dims of a pair at table index s.
__device__ __forceinline__ void nq_pca_angle(const NqPcaParams& pp, long long r, int s, int f, float& clo, float& slo,
                                             float& chi, float& shi) {
    if (pp.positions != nullptr) {
        const float a = (float)pp.positions[r * pp.table_len + s] * pp.inv_freq[f];
        float sn, cs;
        sincosf(a, &sn, &cs);
        clo = chi = nq_round_to(cs * pp.rscale, pp.rdtype);
        slo = shi = nq_round_to(sn * pp.rscale, pp.rdtype);
    } else {
        const long long o = (r * pp.table_len + s) * pp.width;
        clo = pp.cos[o + f];
        slo = pp.sin[o + f];
        const int h = pp.width == pp.rot ? f + pp.rot / 2 : f;
        chi = pp.cos[o + h];
        shi = pp.sin[o + h];
    }
}

template <int VB>
__device__ __forceinline__ void nq_pca_tier(const NqPcaParams& pp, long long bh, int split, const NqTbl& tbl,
                                            const unsigned (&qf)[NQ_ATT_P / 16][2], const uint2* sb,
                                            __half* scoef, const float* sbias, float* wm, float* wl, float* wacc,
                                            float& m0o, float& m1o) {
    constexpr int P = NQ_ATT_P, NG = P / 8, VG = NG / 8, MT = P / 16, NSV = (VG + 1) / 2;
    constexpr int NP = NQ_PNPASS, MTP = MT / NP;
    const NqAttnParams& p = pp.a;
    const NqTier& tr = p.tier[0];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const float NEG_INF = __int_as_float(0xff800000);
    const long long b = bh / p.hkv;
    const NqPcaRow row = pp.rows[b];
    const long long t_begin = (long long)split * tr.chunk;
    const long long t_end = min(tr.tokens, t_begin + tr.chunk);
    const int n = (int)(t_end - t_begin);
    const int n_tiles = (n + 15) / 16;
    const unsigned vr2 = nq_pack_h2(tr.vres, tr.vres);
#ifndef NQ_PCA_STAGE
    const long long nbytes = tr.tokens * row.code_bytes;
#endif
    const int kp = (int)row.kp;
    // RoPE over every dim (rot == P, checked by the caller): dim d < P/2 pairs with d + P/2, the
    // m-tile MT/2 above, which sits MTP/2 above in this pass's accumulators.
    constexpr int LO = MTP / 2;
    const long long trow = min(b, pp.table_rows - 1);
    constexpr int VCB = NG * VB;
    constexpr int V1 = VB == 1 ? 1 : 2, V2 = VB == 3 ? 1 : 2;
    const long long row0 = bh * tr.tokens + t_begin;
    const unsigned char* vbase = tr.vcodes + (row0 + 2 * tig) * VCB;
    const unsigned char* v1 = vbase + VG * gid * V1;
    const unsigned char* v2 = vbase + NG * V1 + VG * gid * V2;

    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;
    float o[MT][4];
    #pragma unroll
    for (int i = 0; i < MT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float osh[NSV][4];
    #pragma unroll
    for (int i = 0; i < NSV; ++i) osh[i][0] = osh[i][1] = osh[i][2] = osh[i][3] = 0.0f;

#ifdef NQ_PCA_STAGE
    // Chunk (tile, ps, ci) of this warp: 16 tokens x NQ_SKC components into slot `slot` (4 x 16
    // bytes per lane; tokens past the split's end repeat its last token, masked below).
    const int nchunk = (kp + NQ_SKC - 1) / NQ_SKC;
    auto stage = [&](int tile_, int ci, int slot_) {
        const __half* src = row.coeffs + (long long)ci * NQ_SKC;
        __half* dst = scoef + slot_ * 16 * NQ_SCS;
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int piece = lane + 32 * j, r = piece >> 3, cc = piece & 7;
            const long long tt = t_begin + min(tile_ * 16 + r, n - 1);
            nq_cp16(dst + r * NQ_SCS + cc * 8, src + tt * row.ld + cc * 8);
        }
    };
    int slot = 0;
    if (warp < n_tiles) stage(warp, 0, 0);
    nq_cp_commit();
#endif
    for (int tile = warp; tile < n_tiles; tile += NQ_AW) {
        const int t0 = tile * 16, last = n - 1;
        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        #pragma unroll
        for (int ps = 0; ps < NP; ++ps) {
            float acc[MTP][2][4];
            #pragma unroll
            for (int i = 0; i < MTP; ++i)
                #pragma unroll
                for (int j = 0; j < 2; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;
#ifdef NQ_PCA_STAGE
            for (int ci = 0; ci < nchunk; ++ci) {
                const int c0 = ci * NQ_SKC, kc = min(NQ_SKC, kp - c0);
                // The next chunk into the other slot (read by the previous iteration, synced after it).
                if (ci + 1 < nchunk) stage(tile, ci + 1, slot ^ 1);
                else if (ps + 1 < NP) stage(tile, 0, slot ^ 1);
                else if (tile + NQ_AW < n_tiles) stage(tile + NQ_AW, 0, slot ^ 1);
                nq_cp_commit();
                nq_cp_wait1();
                __syncwarp();
                const __half* cbuf = scoef + slot * 16 * NQ_SCS;
                for (int ks = 0; ks < kc / 16; ++ks) {
                    const unsigned* r0 = reinterpret_cast<const unsigned*>(cbuf + gid * NQ_SCS + ks * 16);
                    const unsigned* r1 = reinterpret_cast<const unsigned*>(cbuf + (gid + 8) * NQ_SCS + ks * 16);
                    const unsigned b00 = r0[tig], b01 = r0[4 + tig], b10 = r1[tig], b11 = r1[4 + tig];
                    const uint2* ab = sb + ((c0 / 16 + ks) * MT) * 32 + lane;
                    #pragma unroll
                    for (int i = 0; i < MTP; ++i) {
                        const int mt = NP == 1 ? i : (i < MTP / 2 ? ps * (MTP / 2) + i : MT / 2 + ps * (MTP / 2) + i - MTP / 2);
                        const uint2 w = ab[mt * 32];
                        const unsigned a0 = nq_i8pair(w.x, 0x4140u), a2 = nq_i8pair(w.x, 0x4342u);
                        const unsigned a1 = nq_i8pair(w.y, 0x4140u), a3 = nq_i8pair(w.y, 0x4342u);
                        nq_mma(acc[i][0], a0, a1, a2, a3, b00, b01);
                        nq_mma(acc[i][1], a0, a1, a2, a3, b10, b11);
                    }
                }
                __syncwarp();  // every lane is done with this slot before the next stage() refills it
                slot ^= 1;
            }
#else
            for (int c0 = 0; c0 < kp; c0 += NQ_PKC) {
                const int kc = min(NQ_PKC, kp - c0);
                __syncwarp();
                // 1. coefficients of the tile's 16 tokens, components c0 .. c0 + kc.
                for (int pi = lane; pi < kc / 2; pi += 32) {
                    const int2 mi = row.meta_i[c0 / 2 + pi];
                    const float4 mf = row.meta_f[c0 / 2 + pi];
                    const int wa = mi.y & 0xff, wb = mi.y >> 8;
                    const unsigned ma = (1u << wa) - 1u, mb = (1u << wb) - 1u;
                    #pragma unroll 4
                    for (int tk = 0; tk < 16; ++tk) {
                        const long long tt = t_begin + min(t0 + tk, last);
                        const long long bit = tt * row.code_bytes * 8 + mi.x;
                        const long long wi = bit >> 5;
                        const unsigned v = __funnelshift_r(nq_word(row.codes, wi, nbytes), nq_word(row.codes, wi + 1, nbytes),
                                                           (unsigned)(bit & 31));
                        const float ca = ((float)(v & ma) + mf.x) * mf.y;
                        const float cb = ((float)((v >> wa) & mb) + mf.z) * mf.w;
                        reinterpret_cast<unsigned*>(scoef + tk * NQ_PCS)[pi] = nq_pack_h2(ca, cb);
                    }
                }
                __syncwarp();
                // 2. K^T (dims x tokens) += basis (dims x components) . coefficients^T.
                for (int ks = 0; ks < kc / 16; ++ks) {
                    const unsigned* r0 = reinterpret_cast<const unsigned*>(scoef + gid * NQ_PCS + ks * 16);
                    const unsigned* r1 = reinterpret_cast<const unsigned*>(scoef + (gid + 8) * NQ_PCS + ks * 16);
                    const unsigned b00 = r0[tig], b01 = r0[4 + tig], b10 = r1[tig], b11 = r1[4 + tig];
                    const uint2* ab = sb + ((c0 / 16 + ks) * MT) * 32 + lane;
                    #pragma unroll
                    for (int i = 0; i < MTP; ++i) {
                        const int mt = NP == 1 ? i : (i < MTP / 2 ? ps * (MTP / 2) + i : MT / 2 + ps * (MTP / 2) + i - MTP / 2);
                        const uint2 w = ab[mt * 32];
                        const unsigned a0 = nq_i8pair(w.x, 0x4140u), a2 = nq_i8pair(w.x, 0x4342u);
                        const unsigned a1 = nq_i8pair(w.y, 0x4140u), a3 = nq_i8pair(w.y, 0x4342u);
                        nq_mma(acc[i][0], a0, a1, a2, a3, b00, b01);
                        nq_mma(acc[i][1], a0, a1, a2, a3, b10, b11);
                    }
                }
            }
#endif
            // 3. mean + k_center, then RoPE: lane holds dims mt*16 + gid (+8) of tokens n*8 + 2tig (+1).
            #pragma unroll
            for (int i = 0; i < MTP; ++i) {
                const int mt = NP == 1 ? i : (i < MTP / 2 ? ps * (MTP / 2) + i : MT / 2 + ps * (MTP / 2) + i - MTP / 2);
                const float bl = sbias[mt * 16 + gid], bu = sbias[mt * 16 + gid + 8];
                #pragma unroll
                for (int j = 0; j < 2; ++j) {
                    acc[i][j][0] += bl; acc[i][j][1] += bl; acc[i][j][2] += bu; acc[i][j][3] += bu;
                }
            }
            if (pp.seq != nullptr) {
                #pragma unroll
                for (int j = 0; j < 2; ++j) {
                    #pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const long long tt = t_begin + min(t0 + 8 * j + 2 * tig + e, last);
                        const int s = pp.seq[b * tr.tokens + tt];
                        #pragma unroll
                        for (int i = 0; i < MTP; ++i) {
                            if (i < LO) {
                                const int mt = NP == 1 ? i : ps * (MTP / 2) + i;
                                #pragma unroll
                                for (int u = 0; u < 2; ++u) {
                                    float clo, slo, chi, shi;
                                    nq_pca_angle(pp, trow, s, mt * 16 + gid + 8 * u, clo, slo, chi, shi);
                                    const float xl = acc[i][j][2 * u + e], xh = acc[i + LO][j][2 * u + e];
                                    acc[i][j][2 * u + e] = xl * clo - xh * slo;
                                    acc[i + LO][j][2 * u + e] = xh * chi + xl * shi;
                                }
                            }
                        }
                    }
                }
            }
            // 4. scores: S^T (16 tokens x 8 heads) += K (16 tokens x 16 dims) . Q (16 dims x 8 heads).
            #pragma unroll
            for (int i = 0; i < MTP; ++i) {
                const int mt = NP == 1 ? i : (i < MTP / 2 ? ps * (MTP / 2) + i : MT / 2 + ps * (MTP / 2) + i - MTP / 2);
                const unsigned x0 = nq_movtrans(nq_pack_h2(acc[i][0][0], acc[i][0][1]));
                const unsigned x1 = nq_movtrans(nq_pack_h2(acc[i][1][0], acc[i][1][1]));
                const unsigned x2 = nq_movtrans(nq_pack_h2(acc[i][0][2], acc[i][0][3]));
                const unsigned x3 = nq_movtrans(nq_pack_h2(acc[i][1][2], acc[i][1][3]));
                nq_mma(c, x0, x1, x2, x3, qf[mt][0], qf[mt][1]);
            }
        }
        // Validity of tokens gid and gid + 8 of the tile (past the split's end: masked).
        const int ta = t0 + gid, tb = ta + 8;
        bool oka = ta <= last, okb = tb <= last;
        if (tr.valid != nullptr) {
            oka = oka && tr.valid[row0 + min(ta, last)];
            okb = okb && tr.valid[row0 + min(tb, last)];
        }
        const float x0 = oka ? c[0] : NEG_INF, x1 = oka ? c[1] : NEG_INF;
        const float x2 = okb ? c[2] : NEG_INF, x3 = okb ? c[3] : NEG_INF;
        float mx0 = fmaxf(x0, x2), mx1 = fmaxf(x1, x3);
        #pragma unroll
        for (int off = 4; off < 32; off <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(NQ_FULL, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(NQ_FULL, mx1, off));
        }
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float mu0 = mn0 == NEG_INF ? 0.0f : mn0, mu1 = mn1 == NEG_INF ? 0.0f : mn1;
        const float al0 = nq_ex2(m0 - mu0), al1 = nq_ex2(m1 - mu1);
        const float p0 = nq_ex2(x0 - mu0), p1 = nq_ex2(x1 - mu1), p2 = nq_ex2(x2 - mu0), p3 = nq_ex2(x3 - mu1);
        l0 = l0 * al0 + (p0 + p2);
        l1 = l1 * al1 + (p1 + p3);
        m0 = mn0;
        m1 = mn1;
        if (!__all_sync(NQ_FULL, al0 == 1.0f && al1 == 1.0f)) {
            #pragma unroll
            for (int i = 0; i < MT; ++i) {
                o[i][0] *= al0; o[i][1] *= al1; o[i][2] *= al0; o[i][3] *= al1;
            }
            #pragma unroll
            for (int i = 0; i < NSV; ++i) {
                osh[i][0] *= al0; osh[i][1] *= al1; osh[i][2] *= al0; osh[i][3] *= al1;
            }
        }
        // Values: as nq_attend_tier (tokens 2tig, 2tig+1, 2tig+8, 2tig+9; scales of gid, gid+8).
        NqChunk<VB, VG> vc[4];
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int o_ = (min(t0 + 2 * tig + (i & 1) + 8 * (i >> 1), last) - 2 * tig) * VCB;
            vc[i].load(v1 + o_, v2 + o_);
        }
        const float sva = __half2float(__ushort_as_half(tr.vscales[row0 + min(ta, last)]));
        const float svb = __half2float(__ushort_as_half(tr.vscales[row0 + min(tb, last)]));
        const unsigned b0 = nq_movtrans(nq_pack_h2(p0 * sva, p1 * sva));
        const unsigned b1 = nq_movtrans(nq_pack_h2(p2 * svb, p3 * svb));
        nq_for<0, VG>([&](auto ji) {
            constexpr int j = decltype(ji)::value;
            unsigned h[4][4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) vc[i].template decode<j>(tbl, vr2, h[i]);
            #pragma unroll
            for (int cp = 0; cp < 4; ++cp) {
                const unsigned a0 = __byte_perm(h[0][cp], h[1][cp], 0x5410);
                const unsigned a1 = __byte_perm(h[0][cp], h[1][cp], 0x7632);
                const unsigned a2 = __byte_perm(h[2][cp], h[3][cp], 0x5410);
                const unsigned a3 = __byte_perm(h[2][cp], h[3][cp], 0x7632);
                nq_mma(o[4 * j + cp], a0, a1, a2, a3, b0, b1);
            }
        });
        nq_for<0, NSV>([&](auto si) {
            constexpr int sv = decltype(si)::value, g0 = 2 * sv;
            const unsigned a0 = nq_shifts<g0, g0, false>(vc[0], vc[1], vr2);
            const unsigned a2 = nq_shifts<g0, g0, false>(vc[2], vc[3], vr2);
            unsigned a1 = 0u, a3 = 0u;
            if constexpr (g0 + 1 < VG) {
                a1 = nq_shifts<g0 + 1, g0 + 1, false>(vc[0], vc[1], vr2);
                a3 = nq_shifts<g0 + 1, g0 + 1, false>(vc[2], vc[3], vr2);
            }
            nq_mma(osh[sv], a0, a1, a2, a3, b0, b1);
        });
    }
    #pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
        l0 += __shfl_xor_sync(NQ_FULL, l0, off);
        l1 += __shfl_xor_sync(NQ_FULL, l1, off);
    }
    __syncthreads();  // every warp is done with the pattern table, whose space wacc reuses
    if (gid == 0) {
        wm[warp * NQ_AMAXG + 2 * tig] = m0;
        wm[warp * NQ_AMAXG + 2 * tig + 1] = m1;
        wl[warp * NQ_AMAXG + 2 * tig] = l0;
        wl[warp * NQ_AMAXG + 2 * tig + 1] = l1;
    }
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int j = mt / 4;
        const float s0 = osh[j / 2][(j & 1) * 2], s1 = osh[j / 2][(j & 1) * 2 + 1];
        o[mt][0] += s0;
        o[mt][2] += s0;
        o[mt][1] += s1;
        o[mt][3] += s1;
        const int dim = 8 * (VG * gid + mt / 4) + 2 * (mt % 4);
        float* r0 = wacc + (warp * NQ_AMAXG + 2 * tig) * P;
        float* r1 = r0 + P;
        r0[dim] = o[mt][0];
        r1[dim] = o[mt][1];
        r0[dim + 1] = o[mt][2];
        r1[dim + 1] = o[mt][3];
    }
    m0o = m0;
    m1o = m1;
}

template <typename T>
__device__ __forceinline__ void nq_attend_pca(const NqPcaParams& pp) {
    constexpr int P = NQ_ATT_P, MT = P / 16;
    const NqAttnParams& p = pp.a;
    constexpr int REGION_FLOATS_T = 256 * NQ_AREP * 4;
    constexpr int REGION_FLOATS_W = NQ_AW * NQ_AMAXG * P;
    constexpr int REGION_FLOATS_M = 2 * NQ_AMAXS * NQ_AMAXG + 4 * NQ_AMAXG + NQ_AMAXG * P;
    constexpr int RA = REGION_FLOATS_T > REGION_FLOATS_W ? (REGION_FLOATS_T > REGION_FLOATS_M ? REGION_FLOATS_T : REGION_FLOATS_M)
                                                         : (REGION_FLOATS_W > REGION_FLOATS_M ? REGION_FLOATS_W : REGION_FLOATS_M);
    __shared__ __align__(16) float region[RA];
    __shared__ __align__(16) float qrot[NQ_AMAXG * P];  // the fp block's queries; here the bias
    __shared__ float wm[NQ_AW * NQ_AMAXG], wl[NQ_AW * NQ_AMAXG];
    __shared__ int last;
    extern __shared__ __align__(16) unsigned char nq_dyn[];  // basis (P * kp_cap bytes), then chunks

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
    const long long bh = blockIdx.y;
    const int split = blockIdx.x, s_total = gridDim.x;
    const int g = (int)p.g;
    const float NEG_INF = __int_as_float(0xff800000);
    float* part = p.part + (bh * s_total + split) * NQ_APS;
    const int s0 = (int)p.tier[0].splits;

    if (split < s0) {
        const long long b = bh / p.hkv, h = bh % p.hkv;
        const NqPcaRow& row = pp.rows[b];
        uint4* tbl = reinterpret_cast<uint4*>(region);
        for (int i = tid; i < 256; i += blockDim.x) {
            const uint4 v = p.table[i];
            #pragma unroll
            for (int r = 0; r < NQ_AREP; ++r) tbl[i * NQ_AREP + r] = v;
        }
        // The head's basis (P * kp bytes, fragment order) into shared memory.
        const long long n16 = (long long)P * row.kp / 16;
        const uint4* src = reinterpret_cast<const uint4*>(row.basis) + h * n16;
        uint4* dst = reinterpret_cast<uint4*>(nq_dyn);
        for (long long i = tid; i < n16; i += blockDim.x) dst[i] = src[i];
        for (int i = tid; i < P; i += blockDim.x) qrot[i] = row.bias[h * P + i];
        __syncthreads();
        // Q fragments (B of the score mma): head gid, dims mt*16 + 2tig (+1) and + 8, scaled to log2 units.
        const T* q = static_cast<const T*>(p.q) + bh * g * P;
        unsigned qf[MT][2];
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float f[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (gid < g) {
                const T* qr = q + gid * P + mt * 16 + 2 * tig;
                f[0] = nq_to_f32(qr[0]) * p.qscale;
                f[1] = nq_to_f32(qr[1]) * p.qscale;
                f[2] = nq_to_f32(qr[8]) * p.qscale;
                f[3] = nq_to_f32(qr[9]) * p.qscale;
            }
            qf[mt][0] = nq_pack_h2(f[0], f[1]);
            qf[mt][1] = nq_pack_h2(f[2], f[3]);
        }
        NqTbl tb;
        tb.set(tbl + (lane & (NQ_AREP - 1)));
#ifdef NQ_PCA_STAGE
        __half* scoef = reinterpret_cast<__half*>(nq_dyn + P * pp.kp_cap) + warp * 2 * 16 * NQ_SCS;
#else
        __half* scoef = reinterpret_cast<__half*>(nq_dyn + P * pp.kp_cap) + warp * 16 * NQ_PCS;
#endif
        float m0, m1;
        nq_pca_tier<NQ_ATT_VB0>(pp, bh, split, tb, qf, reinterpret_cast<const uint2*>(nq_dyn), scoef, qrot, wm, wl,
                                region, m0, m1);
        __syncthreads();
        for (int i = tid; i < g * P; i += blockDim.x) {
            const int j = i / P, d = i % P;
            float mx = NEG_INF;
            #pragma unroll
            for (int w = 0; w < NQ_AW; ++w) mx = fmaxf(mx, wm[w * NQ_AMAXG + j]);
            float a = 0.0f, l = 0.0f;
            #pragma unroll
            for (int w = 0; w < NQ_AW; ++w) {
                const float mw = wm[w * NQ_AMAXG + j];
                const float f = mw == NEG_INF ? 0.0f : nq_ex2(mw - mx);
                a += f * region[(w * NQ_AMAXG + j) * P + d];
                l += f * wl[w * NQ_AMAXG + j];
            }
            part[2 * NQ_AMAXG + j * P + d] = a;
            if (d == 0) {
                part[j] = mx;
                part[NQ_AMAXG + j] = l;
            }
        }
    } else {
        nq_attend_fp<T>(p, bh, qrot, region, wm, part);
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        const int prev = atomicAdd(&p.counters[bh], 1);
        last = prev == s_total - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    nq_attend_merge<T>(p, bh, s_total, region);
    if (tid == 0) p.counters[bh] = 0;
}

#define NQ_ATTEND_PCA_ENTRY(NAME, T) \
    extern "C" __global__ void __launch_bounds__(NQ_AT, 1) NAME(const NqPcaParams p) { nq_attend_pca<T>(p); }
#if !defined(NQ_ATT_T) || NQ_ATT_T == 0
NQ_ATTEND_PCA_ENTRY(nq_attend_pca_f32, float)
#endif
#if !defined(NQ_ATT_T) || NQ_ATT_T == 1
NQ_ATTEND_PCA_ENTRY(nq_attend_pca_f16, __half)
#endif
#if !defined(NQ_ATT_T) || NQ_ATT_T == 2
NQ_ATTEND_PCA_ENTRY(nq_attend_pca_bf16, __nv_bfloat16)
#endif
#endif  // NQ_ATT_PCA
#endif  // NQ_ATT_P

#ifdef NQ_PCA
// ============================================================================= transform-coded keys
// The coefficients of keys coded by the transform coder (python/nexusquant/transform.py): component
// j of a token has width bits[j] (1-8) and starts at bit offset[j] of the token's code bytes, LSB
// first (pack_fixed). One warp per token (a token's bytes are read by its own warp, from L1), lanes
// stride over the components so that the writes of a row are coalesced. Each coefficient is
// (q - 2^bits/2 + 0.5) * scale[j], where scale = the quantizer step times the basis column's fp16
// scale: the int8 basis then multiplies the coefficients directly (a tensor-core GEMM in fp16 on
// the Python side rebuilds the keys; every head of a token shares its coefficients).
template <typename T>
__device__ __forceinline__ void nq_pca_coeffs(const unsigned char* __restrict__ codes, long long tokens,
                                              int code_bytes, int k, int ld, int split,
                                              const int* __restrict__ offset,
                                              const unsigned char* __restrict__ bits,
                                              const float* __restrict__ scale, T* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long t = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; t < tokens; t += warps) {
        const unsigned char* row = codes + t * code_bytes;
        T* orow = out + t * (split ? 2 * ld : ld);
        // Columns k .. ld are zeros: the GEMM's inner dimension padded for aligned tensor-core tiles.
        for (int j = k + lane; j < ld; j += 32) {
            nq_from_f32(0.0f, &orow[j]);
            if (split) nq_from_f32(0.0f, &orow[ld + j]);
        }
        for (int j = lane; j < k; j += 32) {
            const int off = offset[j];
            const int w = bits[j];
            const int byte = off >> 3;
            unsigned v = row[byte];
            // A code that ends in the token's last byte has no spill-over byte to read.
            if (byte + 1 < code_bytes) v |= (unsigned)row[byte + 1] << 8;
            const unsigned q = (v >> (off & 7)) & ((1u << w) - 1u);
            const float c = ((float)q - (float)(1 << (w - 1)) + 0.5f) * scale[j];
            nq_from_f32(c, &orow[j]);
            // split: the rounding error of the first part as a second one (columns ld ..), for a
            // GEMM against the basis twice: float32 accuracy from fp16 tensor cores.
            if (split) nq_from_f32(c - nq_to_f32(orow[j]), &orow[ld + j]);
        }
    }
}

#define NQ_PCA_COEFFS_ENTRY(NAME, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(NQ_WARPS * 32)                                                \
        NAME(const unsigned char* codes, long long tokens, int code_bytes, int k, int ld, int split,           \
             const int* offset, const unsigned char* bits, const float* scale, T* out) {                       \
        nq_pca_coeffs<T>(codes, tokens, code_bytes, k, ld, split, offset, bits, scale, out);                   \
    }
NQ_PCA_COEFFS_ENTRY(nq_pca_coeffs_f32, float)
NQ_PCA_COEFFS_ENTRY(nq_pca_coeffs_f16, __half)

// Rebuilt keys (T, H*D) of one batch row, the GEMM's output, into float32 (H, T, D) for decode
// attention, with the rotary embedding redone for pre-RoPE keys (cos == nullptr and positions ==
// nullptr: post-RoPE, only the layout changes). The split-half layout of transformers' rotate_half:
// within the first `rot` dims, out[i] = k[i] cos[i] - k[i + rot/2] sin[i] for i < rot/2 and
// k[i] cos[i] + k[i - rot/2] sin[i] above; dims from `rot` on pass through (partial rotary).
// cos/sin: float32 rows of `width` angles at each token's sequence index seq[t]; a half table
// (width rot/2) repeats its row. A rotary table of positions (positions != nullptr) gives the
// angles here, as nq_attend_pca does: sincos(positions[seq[t]] * inv_freq[i mod rot/2]) times
// rscale, rounded to the model dtype (rdtype 0 float32, 1 float16, 2 bfloat16) as transformers'
// default formula does; no table of rows is made. The caller checks once per model that this is
// what its apply_rotary_pos_emb computes.
__device__ __forceinline__ float nq_place_round(float x, int dt) {
    if (dt == 1) return __half2float(__float2half_rn(x));
    if (dt == 2) return __bfloat162float(__float2bfloat16_rn(x));
    return x;
}
template <typename T>
__device__ __forceinline__ void nq_pca_place(const T* __restrict__ keys, long long tokens, int heads, int d,
                                             const float* __restrict__ cos, const float* __restrict__ sin,
                                             int width, int rot, const int* __restrict__ seq,
                                             const int* __restrict__ positions, const float* __restrict__ inv_freq,
                                             float rscale, int rdtype, float* __restrict__ out) {
    const long long n = tokens * heads * d;
    const int half = rot >> 1;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(e % d);
        const long long ht = e / d;
        const long long t = ht % tokens;
        const int h = (int)(ht / tokens);
        const T* row = keys + t * (long long)heads * d + (long long)h * d;
        float x = nq_to_f32(row[i]);
        if ((cos != nullptr || positions != nullptr) && i < rot) {
            const float partner = nq_to_f32(row[i < half ? i + half : i - half]);
            float cs, sn;
            if (positions != nullptr) {
                const float a = (float)positions[seq[t]] * inv_freq[i < half ? i : i - half];
                sincosf(a, &sn, &cs);
                cs = nq_place_round(cs * rscale, rdtype);
                sn = nq_place_round(sn * rscale, rdtype);
            } else {
                const int a = width == rot ? i : (i < half ? i : i - half);
                cs = cos[(long long)seq[t] * width + a];
                sn = sin[(long long)seq[t] * width + a];
            }
            x = i < half ? x * cs - partner * sn : x * cs + partner * sn;
        }
        out[e] = x;
    }
}

#define NQ_PCA_PLACE_ENTRY(NAME, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(NQ_WARPS * 32)                                                \
        NAME(const T* keys, long long tokens, int heads, int d, const float* cos, const float* sin, int width, \
             int rot, const int* seq, const int* positions, const float* inv_freq, float rscale, int rdtype,  \
             float* out) {                                                                                     \
        nq_pca_place<T>(keys, tokens, heads, d, cos, sin, width, rot, seq, positions, inv_freq, rscale, rdtype, \
                        out);                                                                                  \
    }
NQ_PCA_PLACE_ENTRY(nq_pca_place_f32, float)
NQ_PCA_PLACE_ENTRY(nq_pca_place_f16, __half)
#endif  // NQ_PCA
