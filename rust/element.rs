//! The element types the codec reads and writes: f32, fp16 and bf16, converted a row at a time
//! (the `half` crate's slice conversions use F16C where the CPU has it).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// A float type vectors can be read from and written to.
pub trait Element: Copy + Send + Sync + 'static {
    /// Copy a row into f32.
    fn row_to_f32(src: &[Self], dst: &mut [f32]);
    /// Write an f32 row into this type (round to nearest even).
    fn row_from_f32(src: &[f32], dst: &mut [Self]);
    /// Whether a value is finite.
    fn is_finite(self) -> bool;
}

impl Element for f32 {
    #[inline(always)]
    fn row_to_f32(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn row_from_f32(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
}

impl Element for f16 {
    #[inline(always)]
    fn row_to_f32(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    #[inline(always)]
    fn row_from_f32(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f16::is_finite(self)
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn row_to_f32(src: &[bf16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    #[inline(always)]
    fn row_from_f32(src: &[f32], dst: &mut [bf16]) {
        dst.convert_from_f32_slice(src);
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        bf16::is_finite(self)
    }
}
