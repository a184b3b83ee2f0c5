//! Runtime dispatch of the codec's row loops: explicit AVX2 kernels where the CPU has AVX2 and
//! F16C, the portable loops elsewhere (wheels are built for baseline x86-64, so the choice is made
//! at run time).
//!
//! Both do the same float operations on the same operands in the same order: the AVX2 kernels only
//! lay eight groups (or eight coordinates) side by side in a register, never reassociate, and never
//! contract a multiply and an add into an FMA. So both give bit-identical codes, scales and decoded
//! values (`simd_equals_portable`), and the AVX2 codes equal the scalar reference
//! (`codes_match_scalar_reference`).

use crate::codec::E8Codec;
use crate::element::Element;
use crate::error::{NqError, Result};

fn non_finite(row: usize) -> NqError {
    NqError::InvalidData(format!("vector {row} holds NaN or infinity"))
}

#[inline(always)]
fn encode_rows_impl<T: Element>(
    c: &E8Codec,
    x: &[T],
    codes: &mut [u8],
    scales: &mut [u16],
    row_offset: usize,
) -> Result<()> {
    let d = c.head_dim();
    let cb = c.code_bytes_per_vector();
    let mut y = vec![0f32; c.rotation().padded_dim()];
    let mut row = vec![0f32; d];
    for (i, ((xr, cr), s)) in x
        .chunks_exact(d)
        .zip(codes.chunks_exact_mut(cb))
        .zip(scales.iter_mut())
        .enumerate()
    {
        if !xr.iter().all(|v| v.is_finite()) {
            return Err(non_finite(row_offset + i));
        }
        T::row_to_f32(xr, &mut row);
        *s = c.encode_vector(&row, &mut y, cr)?;
    }
    Ok(())
}

#[inline(always)]
fn decode_rows_impl<T: Element>(c: &E8Codec, codes: &[u8], scales: &[u16], out: &mut [T]) {
    let d = c.head_dim();
    let cb = c.code_bytes_per_vector();
    let t = crate::e8p::tables();
    let mut y = vec![0f32; c.rotation().padded_dim()];
    let mut row = vec![0f32; d];
    for ((cr, &s), or) in codes
        .chunks_exact(cb)
        .zip(scales)
        .zip(out.chunks_exact_mut(d))
    {
        c.decode_vector_rotated(t, cr, s, &mut y);
        c.rotation().inverse_portable(&mut y, &mut row);
        T::row_from_f32(&row, or);
    }
}

/// Whether the AVX2 kernels can run: AVX2 for the arithmetic, F16C for the fp16 loads and stores,
/// and an element type they know.
#[cfg(target_arch = "x86_64")]
fn use_avx2<T: Element>() -> bool {
    avx2::knows::<T>()
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("f16c")
}

/// Encode rows, with AVX2 where the CPU has it; errors name rows from `row_offset`.
pub(crate) fn encode_rows_at<T: Element>(
    c: &E8Codec,
    x: &[T],
    codes: &mut [u8],
    scales: &mut [u16],
    row_offset: usize,
) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    if use_avx2::<T>() {
        // SAFETY: the CPU supports AVX2 and F16C (checked above).
        return unsafe { avx2::encode_rows(c, x, codes, scales, row_offset) };
    }
    encode_rows_impl(c, x, codes, scales, row_offset)
}

/// Encode rows, with AVX2 where the CPU has it; errors name rows from 0.
pub(crate) fn encode_rows<T: Element>(
    c: &E8Codec,
    x: &[T],
    codes: &mut [u8],
    scales: &mut [u16],
) -> Result<()> {
    encode_rows_at(c, x, codes, scales, 0)
}

/// Decode rows, with AVX2 where the CPU has it.
pub(crate) fn decode_rows<T: Element>(c: &E8Codec, codes: &[u8], scales: &[u16], out: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2::<T>() {
        // SAFETY: the CPU supports AVX2 and F16C (checked above).
        return unsafe { avx2::decode_rows(c, codes, scales, out) };
    }
    decode_rows_impl(c, codes, scales, out)
}

/// The baseline build of [`encode_rows`], the reference the SIMD build is tested against.
#[allow(dead_code)]
pub(crate) fn encode_rows_portable<T: Element>(
    c: &E8Codec,
    x: &[T],
    codes: &mut [u8],
    scales: &mut [u16],
) -> Result<()> {
    encode_rows_impl(c, x, codes, scales, 0)
}

/// The baseline build of [`decode_rows`].
#[allow(dead_code)]
pub(crate) fn decode_rows_portable<T: Element>(
    c: &E8Codec,
    codes: &[u8],
    scales: &[u16],
    out: &mut [T],
) {
    decode_rows_impl(c, codes, scales, out)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::non_finite;
    use crate::codec::E8Codec;
    use crate::e8p::{avx2 as e8p, tables, E8P16Tables};
    use crate::element::Element;
    use crate::error::Result;
    use crate::hadamard::avx2 as had;
    use half::{bf16, f16};
    use std::any::TypeId;
    use std::arch::x86_64::*;

    #[inline(always)]
    fn is<T: 'static, U: 'static>() -> bool {
        TypeId::of::<T>() == TypeId::of::<U>()
    }

    /// The element types whose rows the kernels load and store directly.
    pub(super) fn knows<T: Element>() -> bool {
        is::<T, f32>() || is::<T, f16>() || is::<T, bf16>()
    }

    /// Eight elements as f32 (exact for all three types).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8<T: Element>(p: *const T) -> __m256 {
        if is::<T, f16>() {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        } else if is::<T, bf16>() {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(p.cast()),
            )))
        } else {
            _mm256_loadu_ps(p.cast())
        }
    }

    /// Store eight f32 as `T`, rounding to nearest even as `T::row_from_f32` does (F16C's
    /// conversion for fp16, which is what the `half` crate uses on such a CPU; `half`'s bit
    /// arithmetic, NaN rule included, for bf16).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn store8<T: Element>(p: *mut T, v: __m256) {
        if is::<T, f16>() {
            _mm_storeu_si128(p.cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v));
        } else if is::<T, bf16>() {
            let x = _mm256_castps_si256(v);
            let hi = _mm256_srli_epi32::<16>(x);
            let round = _mm256_add_epi32(
                _mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF)),
                _mm256_and_si256(hi, _mm256_set1_epi32(1)),
            );
            let nan = _mm256_cmpgt_epi32(
                _mm256_and_si256(x, _mm256_set1_epi32(0x7FFF_FFFF)),
                _mm256_set1_epi32(0x7F80_0000),
            );
            let b = _mm256_blendv_epi8(
                _mm256_srli_epi32::<16>(round),
                _mm256_or_si256(hi, _mm256_set1_epi32(0x40)),
                nan,
            );
            // packus works within 128-bit halves; the permute puts the two halves' words together.
            let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(b, b));
            _mm_storeu_si128(p.cast(), _mm256_castsi256_si128(packed));
        } else {
            _mm256_storeu_ps(p.cast(), v);
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn sign8(bits: &[u32], i: usize) -> __m256 {
        _mm256_loadu_ps(bits.as_ptr().add(i).cast())
    }

    /// `crate::codec::sum_sq`: eight partial sums, one per lane, added in row order, then the
    /// same pairwise reduction.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn sum_sq(y: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for c in y.chunks_exact(8) {
            let v = _mm256_loadu_ps(c.as_ptr());
            acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
        }
        reduce8(acc)
    }

    /// `sum_sq`'s final pairwise reduction of its eight partial sums.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn reduce8(acc: __m256) -> f32 {
        let mut a = [0f32; 8];
        _mm256_storeu_ps(a.as_mut_ptr(), acc);
        ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
    }

    /// `v` rounded to fp16, nearest even (F16C, as `half` does on such a CPU): bits and value.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn round_f16(v: f32) -> (u16, f32) {
        let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(v));
        (
            _mm_extract_epi16::<0>(h) as u16,
            _mm_cvtss_f32(_mm_cvtph_ps(h)),
        )
    }

    /// Load a row into `y` with the rotation's signs, zero padding and the first pass's
    /// in-register stages applied.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load_row<T: Element>(xr: &[T], sign_bits: &[u32], y: &mut [f32]) {
        let d = xr.len();
        let full = d / 8 * 8;
        for i in (0..full).step_by(8) {
            let v = _mm256_xor_ps(load8(xr.as_ptr().add(i)), sign8(sign_bits, i));
            _mm256_storeu_ps(y.as_mut_ptr().add(i), had::fwht8(v));
        }
        if full < d {
            // The last partial chunk: the padding stays +0.0 (it gets no sign, as in `forward`).
            let mut tail = [0f32; 8];
            T::row_to_f32(&xr[full..], &mut tail[..d - full]);
            for (k, v) in tail[..d - full].iter_mut().enumerate() {
                *v = f32::from_bits(v.to_bits() ^ sign_bits[full + k]);
            }
            _mm256_storeu_ps(
                y.as_mut_ptr().add(full),
                had::fwht8(_mm256_loadu_ps(tail.as_ptr())),
            );
        }
        for i in (full + 8 * (full < d) as usize..y.len()).step_by(8) {
            _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm256_setzero_ps());
        }
    }

    /// The scale of a rotated row from its `sum_sq`, or `None` where the input row is not finite.
    ///
    /// The input is checked only when the sum is not finite: a NaN or infinity in the input makes
    /// every output of its block NaN or infinite (butterflies only add and subtract), so a finite
    /// sum proves a finite row, and the per-element check leaves the hot loop.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn scale_of<T: Element>(c: &E8Codec, xr: &[T], sum: f32) -> Option<Result<(u16, f32)>> {
        if !sum.is_finite() && !all_finite(xr) {
            return None;
        }
        // SAFETY: F16C is enabled in this function, and so in its closures.
        Some(c.scale_with(sum, |v| unsafe { round_f16(v) }))
    }

    #[cold]
    fn all_finite<T: Element>(xr: &[T]) -> bool {
        xr.iter().all(|v| v.is_finite())
    }

    /// Rotate one row into `y` (any rotation, in memory) and compute its scale.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn prepare_row<T: Element>(
        c: &E8Codec,
        xr: &[T],
        y: &mut [f32],
    ) -> Option<Result<(u16, f32)>> {
        load_row(xr, c.rotation().sign_bits(), y);
        for (pi, pass) in c.rotation().passes().iter().enumerate() {
            for &(off, n) in pass {
                if pi == 0 {
                    had::fwht_cross(&mut y[off..off + n]);
                } else {
                    had::fwht(&mut y[off..off + n]);
                }
            }
        }
        scale_of(c, xr, sum_sq(y))
    }

    /// [`prepare_row`] for one power-of-two block of `8 · R` = head_dim floats, held in registers
    /// from the load to the store.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn prepare_row_regs<T: Element, const R: usize>(
        c: &E8Codec,
        xr: &[T],
        y: &mut [f32],
    ) -> Option<Result<(u16, f32)>> {
        let sign_bits = c.rotation().sign_bits();
        let mut v = [_mm256_setzero_ps(); R];
        for (r, vr) in v.iter_mut().enumerate() {
            *vr = had::fwht8(_mm256_xor_ps(
                load8(xr.as_ptr().add(8 * r)),
                sign8(sign_bits, 8 * r),
            ));
        }
        had::fwht_cross_regs(&mut v);
        let mut acc = _mm256_mul_ps(v[0], v[0]);
        _mm256_storeu_ps(y.as_mut_ptr(), v[0]);
        for (r, &vr) in v.iter().enumerate().skip(1) {
            acc = _mm256_add_ps(acc, _mm256_mul_ps(vr, vr));
            _mm256_storeu_ps(y.as_mut_ptr().add(8 * r), vr);
        }
        scale_of(c, xr, reduce8(acc))
    }

    /// Eight groups from `b` on of a rotated row, times `inv` (`encode_vector` scales the whole
    /// row first; the products are the same), transposed to coordinate-major. Missing groups of
    /// the last block are zeros, as in the reference's padding.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_block(
        y: &[f32],
        b: usize,
        lanes: usize,
        inv: __m256,
    ) -> ([__m256; 8], [__m256; 8]) {
        let mut z = [_mm256_setzero_ps(); 8];
        for (l, zl) in z[..lanes].iter_mut().enumerate() {
            *zl = _mm256_mul_ps(_mm256_loadu_ps(y.as_ptr().add(8 * (b + l))), inv);
        }
        (z, e8p::transpose8(&z))
    }

    /// Encode the groups of one rotated row `y` with scale reciprocal `inv`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn encode_groups(c: &E8Codec, t: &E8P16Tables, y: &[f32], inv: f32, codes: &mut [u8]) {
        let g = y.len() / 8;
        let invv = _mm256_set1_ps(inv);
        let bits = c.bits();
        for b in (0..g).step_by(8) {
            let lanes = (g - b).min(8);
            let (_, soa) = load_block(y, b, lanes, invv);
            if bits == 1 {
                let c8 = e8p::encode8(&soa);
                codes[b..b + lanes].copy_from_slice(&c8[..lanes]);
            } else {
                let c16 = e8p::encode16(t, &soa);
                for l in 0..lanes {
                    codes[2 * (b + l)..2 * (b + l) + 2].copy_from_slice(&c16[l].to_le_bytes());
                }
            }
        }
        if bits <= 2 {
            return;
        }
        // The residual stage in a second sweep: a block's residual waits on its first-stage codes
        // (search, table lookups, decode), and with the sweeps apart the next block's first-stage
        // search runs meanwhile instead of after.
        let inv_r = _mm256_set1_ps(c.inv_residual_ratio());
        for b in (0..g).step_by(8) {
            let lanes = (g - b).min(8);
            let (z, _) = load_block(y, b, lanes, invv);
            let mut r = [_mm256_setzero_ps(); 8];
            for l in 0..lanes {
                let code = u16::from_le_bytes([codes[2 * (b + l)], codes[2 * (b + l) + 1]]);
                r[l] = _mm256_mul_ps(_mm256_sub_ps(z[l], e8p::decode16(t, code)), inv_r);
            }
            let soa = e8p::transpose8(&r);
            if bits == 3 {
                let c8 = e8p::encode8(&soa);
                codes[2 * g + b..2 * g + b + lanes].copy_from_slice(&c8[..lanes]);
            } else {
                let c2 = e8p::encode16(t, &soa);
                for (l, code) in c2[..lanes].iter().enumerate() {
                    let o = 2 * g + 2 * (b + l);
                    codes[o..o + 2].copy_from_slice(&code.to_le_bytes());
                }
            }
        }
    }

    /// The AVX2 encode row loop, software-pipelined: row i+1 is rotated and its scale computed
    /// before row i is searched. The preparation is one long dependent chain (the in-order
    /// `sum_sq` adds, a square root, the fp16 rounding, a division), the search is wide
    /// independent work; placed first, the next row's chain runs in the shadow of this row's
    /// search instead of stalling it.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn encode_rows_with<T: Element, const R: usize>(
        c: &E8Codec,
        x: &[T],
        codes: &mut [u8],
        scales: &mut [u16],
        row_offset: usize,
    ) -> Result<()> {
        // R = 0: any rotation, in memory; else one block of 8 · R floats in registers.
        let prepare = |xr: &[T], y: &mut [f32]| {
            if R == 0 {
                prepare_row(c, xr, y)
            } else {
                prepare_row_regs::<T, R>(c, xr, y)
            }
        };
        let d = c.head_dim();
        let cb = c.code_bytes_per_vector();
        let t = tables();
        let p = c.rotation().padded_dim();
        let n = scales.len();
        let mut bufs = [vec![0f32; p], vec![0f32; p]];
        let mut ready = prepare(&x[..d], &mut bufs[0]);
        for i in 0..n {
            let (scale, inv) = match ready.take() {
                None => return Err(non_finite(row_offset + i)),
                Some(r) => r?,
            };
            let [b0, b1] = &mut bufs;
            let (cur, next) = if i % 2 == 0 { (b0, b1) } else { (b1, b0) };
            if i + 1 < n {
                ready = prepare(&x[(i + 1) * d..(i + 2) * d], next);
            }
            scales[i] = scale;
            encode_groups(c, t, cur, inv, &mut codes[i * cb..(i + 1) * cb]);
        }
        Ok(())
    }

    /// The AVX2 encode row loop.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn encode_rows<T: Element>(
        c: &E8Codec,
        x: &[T],
        codes: &mut [u8],
        scales: &mut [u16],
        row_offset: usize,
    ) -> Result<()> {
        let rot = c.rotation();
        let regs = if rot.is_single_block() && c.head_dim() == rot.padded_dim() {
            rot.padded_dim() / 8
        } else {
            0
        };
        match regs {
            8 => encode_rows_with::<T, 8>(c, x, codes, scales, row_offset),
            16 => encode_rows_with::<T, 16>(c, x, codes, scales, row_offset),
            _ => encode_rows_with::<T, 0>(c, x, codes, scales, row_offset),
        }
    }

    /// One group's scaled codeword, s · c₁ or s · (c₁ + r · c₂), as `decode_vector_rotated` forms it.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn group<const BITS: u8>(
        t: &E8P16Tables,
        codes: &[u8],
        g: usize,
        gi: usize,
        s: __m256,
        r: __m256,
    ) -> __m256 {
        let code16 = |o: usize| u16::from_le_bytes([codes[o], codes[o + 1]]);
        match BITS {
            1 => _mm256_mul_ps(s, e8p::decode8(t, codes[gi])),
            2 => _mm256_mul_ps(s, e8p::decode16(t, code16(2 * gi))),
            3 => {
                let c2 = e8p::decode8(t, codes[2 * g + gi]);
                _mm256_mul_ps(
                    s,
                    _mm256_add_ps(e8p::decode16(t, code16(2 * gi)), _mm256_mul_ps(r, c2)),
                )
            }
            _ => {
                let c2 = e8p::decode16(t, code16(2 * g + 2 * gi));
                _mm256_mul_ps(
                    s,
                    _mm256_add_ps(e8p::decode16(t, code16(2 * gi)), _mm256_mul_ps(r, c2)),
                )
            }
        }
    }

    /// Decode rows of any rotation: codewords into `y`, the inverse transform in memory, then the
    /// signs and the store.
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn decode_rows_mem<T: Element, const BITS: u8>(
        c: &E8Codec,
        codes: &[u8],
        scales: &[u16],
        out: &mut [T],
    ) {
        let d = c.head_dim();
        let cb = c.code_bytes_per_vector();
        let t = tables();
        let rot = c.rotation();
        let sign_bits = rot.sign_bits();
        let p = rot.padded_dim();
        let g = p / 8;
        let r = _mm256_set1_ps(c.residual_ratio());
        let mut y = vec![0f32; p];
        let full = d / 8 * 8;
        for ((cr, &s), or) in codes
            .chunks_exact(cb)
            .zip(scales)
            .zip(out.chunks_exact_mut(d))
        {
            let sv = _mm256_cvtph_ps(_mm_set1_epi16(s as i16));
            // The inverse applies the passes last first; that pass's in-register stages run on
            // each codeword as it is formed.
            for gi in 0..g {
                let v = group::<BITS>(t, cr, g, gi, sv, r);
                _mm256_storeu_ps(y.as_mut_ptr().add(8 * gi), had::fwht8(v));
            }
            for (pi, pass) in rot.passes().iter().rev().enumerate() {
                for &(off, n) in pass {
                    if pi == 0 {
                        had::fwht_cross(&mut y[off..off + n]);
                    } else {
                        had::fwht(&mut y[off..off + n]);
                    }
                }
            }
            for i in (0..full).step_by(8) {
                let v = _mm256_xor_ps(_mm256_loadu_ps(y.as_ptr().add(i)), sign8(sign_bits, i));
                store8(or.as_mut_ptr().add(i), v);
            }
            if full < d {
                let mut tail = [0f32; 8];
                for (k, v) in tail[..d - full].iter_mut().enumerate() {
                    *v = f32::from_bits(y[full + k].to_bits() ^ sign_bits[full + k]);
                }
                T::row_from_f32(&tail[..d - full], &mut or[full..]);
            }
        }
    }

    /// Decode rows of one power-of-two block of `8 · R` = head_dim floats: each row stays in
    /// registers from the table lookups to the store.
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn decode_rows_regs<T: Element, const R: usize, const BITS: u8>(
        c: &E8Codec,
        codes: &[u8],
        scales: &[u16],
        out: &mut [T],
    ) {
        let cb = c.code_bytes_per_vector();
        let t = tables();
        let sign_bits = c.rotation().sign_bits();
        let r = _mm256_set1_ps(c.residual_ratio());
        for ((cr, &s), or) in codes
            .chunks_exact(cb)
            .zip(scales)
            .zip(out.chunks_exact_mut(8 * R))
        {
            let sv = _mm256_cvtph_ps(_mm_set1_epi16(s as i16));
            let mut v = [_mm256_setzero_ps(); R];
            for (gi, vg) in v.iter_mut().enumerate() {
                *vg = had::fwht8(group::<BITS>(t, cr, R, gi, sv, r));
            }
            had::fwht_cross_regs(&mut v);
            for (gi, &vg) in v.iter().enumerate() {
                store8(
                    or.as_mut_ptr().add(8 * gi),
                    _mm256_xor_ps(vg, sign8(sign_bits, 8 * gi)),
                );
            }
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    unsafe fn decode_rows_bits<T: Element, const BITS: u8>(
        c: &E8Codec,
        codes: &[u8],
        scales: &[u16],
        out: &mut [T],
    ) {
        let rot = c.rotation();
        let regs = if rot.is_single_block() && c.head_dim() == rot.padded_dim() {
            rot.padded_dim() / 8
        } else {
            0
        };
        match regs {
            8 => decode_rows_regs::<T, 8, BITS>(c, codes, scales, out),
            16 => decode_rows_regs::<T, 16, BITS>(c, codes, scales, out),
            _ => decode_rows_mem::<T, BITS>(c, codes, scales, out),
        }
    }

    /// The AVX2 decode row loop.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn decode_rows<T: Element>(
        c: &E8Codec,
        codes: &[u8],
        scales: &[u16],
        out: &mut [T],
    ) {
        match c.bits() {
            1 => decode_rows_bits::<T, 1>(c, codes, scales, out),
            2 => decode_rows_bits::<T, 2>(c, codes, scales, out),
            3 => decode_rows_bits::<T, 3>(c, codes, scales, out),
            _ => decode_rows_bits::<T, 4>(c, codes, scales, out),
        }
    }
}
