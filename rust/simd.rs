//! Runtime dispatch of the codec's row loops: the same source compiled twice, once for the
//! baseline target and once with AVX2, chosen at run time. The search in `e8p::encode16_lanes` works
//! on 8 groups at once in coordinate-major arrays, which LLVM turns into 8-wide AVX2 code; no
//! reassociation is allowed, so both builds give bit-identical codes (`simd_equals_portable`).

use crate::codec::E8Codec;
use crate::element::Element;
use crate::error::{NqError, Result};

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
            return Err(NqError::InvalidData(format!(
                "vector {} holds NaN or infinity",
                row_offset + i
            )));
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
    let mut y = vec![0f32; c.rotation().padded_dim()];
    let mut row = vec![0f32; d];
    for ((cr, &s), or) in codes.chunks_exact(cb).zip(scales).zip(out.chunks_exact_mut(d)) {
        c.decode_vector_rotated(cr, s, &mut y);
        c.rotation().inverse(&mut y, &mut row);
        T::row_from_f32(&row, or);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn encode_rows_avx2<T: Element>(
    c: &E8Codec,
    x: &[T],
    codes: &mut [u8],
    scales: &mut [u16],
    row_offset: usize,
) -> Result<()> {
    encode_rows_impl(c, x, codes, scales, row_offset)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn decode_rows_avx2<T: Element>(c: &E8Codec, codes: &[u8], scales: &[u16], out: &mut [T]) {
    decode_rows_impl(c, codes, scales, out)
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Encode rows, with AVX2 where the CPU has it.
pub(crate) fn encode_rows_at<T: Element>(
    c: &E8Codec,
    x: &[T],
    codes: &mut [u8],
    scales: &mut [u16],
    row_offset: usize,
) -> Result<()> {
    if has_avx2() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 (checked above).
        return unsafe { encode_rows_avx2(c, x, codes, scales, row_offset) };
    }
    encode_rows_impl(c, x, codes, scales, row_offset)
}

/// Encode rows, with AVX2 where the CPU has it; errors name rows from 0.
pub(crate) fn encode_rows<T: Element>(c: &E8Codec, x: &[T], codes: &mut [u8], scales: &mut [u16]) -> Result<()> {
    encode_rows_at(c, x, codes, scales, 0)
}

/// Decode rows, with AVX2 where the CPU has it.
pub(crate) fn decode_rows<T: Element>(c: &E8Codec, codes: &[u8], scales: &[u16], out: &mut [T]) {
    if has_avx2() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 (checked above).
        return unsafe { decode_rows_avx2(c, codes, scales, out) };
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
pub(crate) fn decode_rows_portable<T: Element>(c: &E8Codec, codes: &[u8], scales: &[u16], out: &mut [T]) {
    decode_rows_impl(c, codes, scales, out)
}
