// nexusquant CUDA kernels: quantize, dequantize and decode attention over E8 codes.
//
// Loaded by python/nexusquant/gpu/__init__.py with cupy.RawModule (NVRTC), compiled with
// --fmad=false: every float operation below is written in the same order as the Rust encoder
// (rust/codec.rs, rust/e8p.rs, rust/hadamard.rs) and no multiply-add may be fused, so the codes
// and decoded values are bit-identical to the CPU reference.
//
// Layouts (row-major):
//   x, out      [n, d]            one vector per row, float / __half / __nv_bfloat16
//   codes       [n, code_bytes]   stage-1 codes (u16 LE, or u8 for 1 bit), then stage-2 codes
//   scales      [n]               fp16 bit patterns
//   blocks      int array: n_pass, then per pass: n_blocks, then (offset, length) pairs
//   block_scale float per block, in the same order: 1/sqrt(length) as the CPU computes it
// Tables (from the Rust codebook, copied once per device):
//   abs_table [256*8] f32, parity [256] u8, key_to_index [6561] u16

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifndef NQ_MAX_PADDED
#define NQ_MAX_PADDED 512
#endif
#ifndef NQ_WARPS
#define NQ_WARPS 4
#endif

__device__ __forceinline__ float nq_to_f32(float v) { return v; }
__device__ __forceinline__ float nq_to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float nq_to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void nq_from_f32(float v, float* o) { *o = v; }
__device__ __forceinline__ void nq_from_f32(float v, __half* o) { *o = __float2half_rn(v); }
__device__ __forceinline__ void nq_from_f32(float v, __nv_bfloat16* o) { *o = __float2bfloat16_rn(v); }

// ----------------------------------------------------------------------------- codebook
// The nine permutation classes of E8P16 magnitude patterns: (#5/2 entries, #3/2 entries).
__constant__ int NQ_N5[9] = {0, 0, 0, 0, 0, 1, 1, 2, 0};
__constant__ int NQ_N3[9] = {0, 1, 2, 3, 4, 0, 1, 0, 8};

struct NqTypeConsts {
    int n_big, n5, parity;
    float norm2, amin;
};

__device__ __forceinline__ NqTypeConsts nq_type(int t) {
    NqTypeConsts c;
    int n5 = NQ_N5[t], n3 = NQ_N3[t], n1 = 8 - n5 - n3;
    c.n_big = n5 + n3;
    c.n5 = n5;
    c.norm2 = (float)(25 * n5 + 9 * n3 + n1) / 4.0f;
    c.parity = ((5 * n5 + 3 * n3 + n1) / 2) % 2;
    c.amin = n1 > 0 ? 0.5f : (n3 > 0 ? 1.5f : 2.5f);
    return c;
}

// Nearest E8P16 code of one group (port of e8p::encode16_lanes with one lane).
__device__ unsigned short nq_encode16(const float* z, const unsigned short* key_to_index) {
    float best = __int_as_float(0x7f800000);
    int best_t = 0, best_s = 0;
    int ranks[2][8];
    unsigned negbits[2];
    #pragma unroll
    for (int si = 0; si < 2; ++si) {
        float shift = si == 0 ? 0.25f : -0.25f;
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
        negbits[si] = nb;
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
        float sq = 0.0f, umin = __int_as_float(0x7f800000);
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
        #pragma unroll
        for (int t = 0; t < 9; ++t) {
            NqTypeConsts tc = nq_type(t);
            float s_big = tc.n_big == 0 ? 0.0f : (tc.n_big == 8 ? top[4] : top[tc.n_big - 1]);
            float s_5 = tc.n5 == 0 ? 0.0f : top[tc.n5 - 1];
            float dot = __fadd_rn(__fadd_rn(__fmul_rn(0.5f, top[4]), s_big), s_5);
            float mismatch = (float)((negc + tc.parity) & 1u);
            float d = __fadd_rn(__fsub_rn(__fadd_rn(sq, tc.norm2), __fmul_rn(2.0f, dot)),
                                __fmul_rn(__fmul_rn(__fmul_rn(mismatch, 4.0f), umin), tc.amin));
            if (d < best) {
                best = d;
                best_t = t;
                best_s = si;
            }
        }
        #pragma unroll
        for (int c = 0; c < 8; ++c) ranks[si][c] = rank[c];
    }
    NqTypeConsts tc = nq_type(best_t);
    int key = 0, pow3 = 1, smallest = 0;
    #pragma unroll
    for (int c = 0; c < 8; ++c) {
        int r = ranks[best_s][c];
        int digit = (r < tc.n_big ? 1 : 0) + (r < tc.n5 ? 1 : 0);
        key += digit * pow3;
        pow3 *= 3;
        if (r == 7) smallest = c;
    }
    unsigned idx = key_to_index[key];
    unsigned negs = negbits[best_s];
    if (((unsigned)__popc(negs) + (unsigned)tc.parity) & 1u) negs ^= 1u << smallest;
    return (unsigned short)(idx | ((negs & 0x7Fu) << 8) | ((unsigned)best_s << 15));
}

// Nearest E8P8 code of one group (port of e8p::encode8_lanes with one lane).
__device__ unsigned char nq_encode8(const float* z) {
    float best = __int_as_float(0x7f800000);
    unsigned char best_code = 0;
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
            best_code = (unsigned char)((n & 0x7Fu) | ((unsigned)si << 7));
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

// ----------------------------------------------------------------------------- rotation
// In-place orthonormal Walsh-Hadamard transform of s[off .. off+len) by one warp: the same
// butterflies (a+b, a-b) and the same final scaling as hadamard::fwht_inplace.
__device__ void nq_fwht_warp(float* s, int off, int len, float scale, int lane) {
    for (int h = 1; h < len; h <<= 1) {
        for (int k = lane; k < len / 2; k += 32) {
            int i = off + (k / h) * 2 * h + (k % h);
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
    // Offsets of each pass's description in `blocks` and `block_scale`.
    int pos[2], spos[2];
    int p = 1, sp = 0;
    for (int q = 0; q < n_pass; ++q) {
        pos[q] = p;
        spos[q] = sp;
        p += 1 + 2 * blocks[p];
        sp += blocks[pos[q]];
    }
    for (int qq = 0; qq < n_pass; ++qq) {
        int q = inverse ? n_pass - 1 - qq : qq;
        int nb = blocks[pos[q]];
        for (int b = 0; b < nb; ++b) {
            nq_fwht_warp(s, blocks[pos[q] + 1 + 2 * b], blocks[pos[q] + 2 + 2 * b], block_scale[spos[q] + b], lane);
        }
    }
}

// ----------------------------------------------------------------------------- quantize
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
    if (!__all_sync(0xffffffffu, finite)) {
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
    for (int k = 0; k < 8; ++k) a[k] = __shfl_sync(0xffffffffu, acc, k);
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
            cr[gi] = nq_encode8(z);
            continue;
        }
        unsigned short c1 = nq_encode16(z, key_to_index);
        cr[2 * gi] = (unsigned char)(c1 & 0xFFu);
        cr[2 * gi + 1] = (unsigned char)(c1 >> 8);
        if (bits >= 3) {
            float dec[8];
            nq_decode16(c1, abs_table, parity, dec);
            #pragma unroll
            for (int c = 0; c < 8; ++c) z[c] = __fmul_rn(__fsub_rn(z[c], dec[c]), inv_r);
            if (bits == 3) {
                cr[2 * g + gi] = nq_encode8(z);
            } else {
                unsigned short c2 = nq_encode16(z, key_to_index);
                cr[2 * g + 2 * gi] = (unsigned char)(c2 & 0xFFu);
                cr[2 * g + 2 * gi + 1] = (unsigned char)(c2 >> 8);
            }
        }
    }
}

// ----------------------------------------------------------------------------- dequantize
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

// ----------------------------------------------------------------------------- decode attention
// One new query per sequence against the compressed tokens of one (batch, KV head), split over
// tokens (flash-decoding): each block writes a partial softmax state (max m, sum l, accumulator
// in the rotated domain) per query head of the group; Python merges splits and the
// full-precision tokens and applies the inverse rotation once.
//
// Scores need no dequantized key: q·k = q·center + s·(R q)·c where c is the codeword and R the
// rotation, so the kernel dots the rotated query with codewords straight from the table.
// G = padded_dim / 8 lanes share a token (G in {8, 16, 32}); a warp covers 32 / G tokens.
// Launch: grid (n_splits, B * Hkv), block NQ_WARPS * 32.
#ifndef NQ_MAX_GROUP_HEADS
#define NQ_MAX_GROUP_HEADS 8
#endif

extern "C" __global__ void __launch_bounds__(NQ_WARPS * 32) nq_decode_attention(
    const float* __restrict__ q_rot,      // [B*Hkv, g, P]: rotated query, already times the attention scale
    const float* __restrict__ q_center,   // [B*Hkv, g]: scale * q . key_center
    const unsigned char* __restrict__ kcodes, const unsigned short* __restrict__ kscales, int kbits,
    const unsigned char* __restrict__ vcodes, const unsigned short* __restrict__ vscales, int vbits,
    const unsigned char* __restrict__ valid,  // [B*Hkv, T] or null
    int T, int P, int g, int chunk, float kres, float vres,
    const float* __restrict__ abs_table_g, const unsigned char* __restrict__ parity_g,
    float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_acc) {
    __shared__ float abs_table[256 * 8];
    __shared__ unsigned char parity[256];
    __shared__ float red_m[NQ_WARPS][NQ_MAX_GROUP_HEADS];
    __shared__ float red_l[NQ_WARPS][NQ_MAX_GROUP_HEADS];
    __shared__ float red_acc[NQ_WARPS][NQ_MAX_GROUP_HEADS][256];
    for (int i = threadIdx.x; i < 256 * 8; i += blockDim.x) abs_table[i] = abs_table_g[i];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) parity[i] = parity_g[i];
    __syncthreads();

    const int bh = blockIdx.y, split = blockIdx.x, n_splits = gridDim.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int G = P / 8;
    const int tpw = 32 / G;            // tokens per warp step
    const int gi = lane % G;           // this lane's group
    const int slot = lane / G;         // this lane's token within the step
    const int kcb = G * kbits, vcb = G * vbits;
    const float NEG_INF = __int_as_float(0xff800000);

    float q[NQ_MAX_GROUP_HEADS][8];
    float qc[NQ_MAX_GROUP_HEADS];
    for (int j = 0; j < g; ++j) {
        const float* qr = q_rot + ((size_t)bh * g + j) * P + gi * 8;
        #pragma unroll
        for (int c = 0; c < 8; ++c) q[j][c] = qr[c];
        qc[j] = q_center[(size_t)bh * g + j];
    }
    float m[NQ_MAX_GROUP_HEADS], l[NQ_MAX_GROUP_HEADS], acc[NQ_MAX_GROUP_HEADS][8];
    for (int j = 0; j < g; ++j) {
        m[j] = NEG_INF;
        l[j] = 0.0f;
        #pragma unroll
        for (int c = 0; c < 8; ++c) acc[j][c] = 0.0f;
    }

    const int t0 = split * chunk, t1 = min(T, t0 + chunk);
    const unsigned char* kc_base = kcodes + (size_t)bh * T * kcb;
    const unsigned char* vc_base = vcodes + (size_t)bh * T * vcb;
    for (int base = t0 + warp * tpw; base < t1; base += NQ_WARPS * tpw) {
        int t = base + slot;
        bool live = t < t1 && (valid == nullptr || valid[(size_t)bh * T + t]);
        float kv[8];
        float ks = 0.0f;
        if (t < t1) {
            ks = __half2float(__ushort_as_half(kscales[(size_t)bh * T + t]));
            nq_group_value(kc_base + (size_t)t * kcb, G, gi, kbits, 1.0f, kres, abs_table, parity, kv);
        } else {
            #pragma unroll
            for (int c = 0; c < 8; ++c) kv[c] = 0.0f;
        }
        float vv[8];
        float vs = 0.0f;
        if (t < t1) {
            vs = __half2float(__ushort_as_half(vscales[(size_t)bh * T + t]));
            nq_group_value(vc_base + (size_t)t * vcb, G, gi, vbits, vs, vres, abs_table, parity, vv);
        }
        for (int j = 0; j < g; ++j) {
            float part = 0.0f;
            #pragma unroll
            for (int c = 0; c < 8; ++c) part = fmaf(q[j][c], kv[c], part);
            for (int off = G / 2; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
            if (!live) continue;
            float score = fmaf(ks, part, qc[j]);
            float m_new = fmaxf(m[j], score);
            float alpha = __expf(m[j] - m_new);
            float pr = __expf(score - m_new);
            l[j] = l[j] * alpha + pr;
            #pragma unroll
            for (int c = 0; c < 8; ++c) acc[j][c] = acc[j][c] * alpha + pr * vv[c];
            m[j] = m_new;
        }
    }
    // Merge the token slots of the warp (lanes gi and gi + G*k hold the same dimensions).
    for (int off = G; off < 32; off <<= 1) {
        for (int j = 0; j < g; ++j) {
            float om = __shfl_xor_sync(0xffffffffu, m[j], off);
            float ol = __shfl_xor_sync(0xffffffffu, l[j], off);
            float mn = fmaxf(m[j], om);
            float a = mn == NEG_INF ? 0.0f : __expf(m[j] - mn);
            float b = mn == NEG_INF ? 0.0f : __expf(om - mn);
            l[j] = l[j] * a + ol * b;
            #pragma unroll
            for (int c = 0; c < 8; ++c) {
                float oa = __shfl_xor_sync(0xffffffffu, acc[j][c], off);
                acc[j][c] = acc[j][c] * a + oa * b;
            }
            m[j] = mn;
        }
    }
    if (slot == 0) {
        for (int j = 0; j < g; ++j) {
            if (gi == 0) {
                red_m[warp][j] = m[j];
                red_l[warp][j] = l[j];
            }
            #pragma unroll
            for (int c = 0; c < 8; ++c) red_acc[warp][j][gi * 8 + c] = acc[j][c];
        }
    }
    __syncthreads();
    // Merge the warps and write this split's state.
    for (int idx = threadIdx.x; idx < g * P; idx += blockDim.x) {
        int j = idx / P, dim = idx % P;
        float mn = NEG_INF;
        for (int w = 0; w < NQ_WARPS; ++w) mn = fmaxf(mn, red_m[w][j]);
        float lsum = 0.0f, asum = 0.0f;
        for (int w = 0; w < NQ_WARPS; ++w) {
            float f = mn == NEG_INF ? 0.0f : __expf(red_m[w][j] - mn);
            lsum += red_l[w][j] * f;
            asum += red_acc[w][j][dim] * f;
        }
        size_t o = ((size_t)bh * n_splits + split) * g + j;
        part_acc[o * P + dim] = asum;
        if (dim == 0) {
            part_m[o] = mn;
            part_l[o] = lsum;
        }
    }
}
