//! Randomized fast Walsh–Hadamard transform over a head dimension.
//!
//! y = H · diag(signs) · x with H orthonormal, O(d log d), no matrix. The signs come from a stored
//! seed, so the same seed always gives the same rotation (in Rust, Python and CUDA alike: the CUDA
//! kernels receive the sign vector computed here).
//!
//! A dimension that is not a power of two is never refused: it is zero-padded to a multiple of 8
//! (the E8 group size) and split into power-of-two blocks, largest first (80 = 64 + 16,
//! 96 = 64 + 32, 192 = 128 + 64). A second pass with the blocks in the opposite order
//! (16 + 64 for 80) mixes coordinates across the block boundary, so an outlier in one block is still
//! spread over the whole vector. A power-of-two dimension gets one ordinary transform.

/// The rotation for one head dimension and seed.
#[derive(Clone, Debug)]
pub struct Hadamard {
    dim: usize,
    padded: usize,
    passes: Vec<Vec<(usize, usize)>>,
    signs: Vec<f32>,
    // The signs as IEEE sign bits (0 or 0x8000_0000): xoring them is the exact multiply by ±1
    // without a multiply, and it is what the SIMD row loops load.
    sign_bits: Vec<u32>,
    seed: u64,
}

/// splitmix64: a tiny, well-mixed generator, enough for a sign pattern and easy to port.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The random ±1 signs of a rotation of `n` coordinates.
///
/// Args:
///     n: how many signs.
///     seed: the stored seed.
/// Returns:
///     `n` values, each +1.0 or −1.0.
pub fn random_signs(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    let mut out = Vec::with_capacity(n);
    let mut bits = 0u64;
    for i in 0..n {
        if i % 64 == 0 {
            bits = splitmix64(&mut state);
        }
        out.push(if (bits >> (i % 64)) & 1 == 1 {
            -1.0
        } else {
            1.0
        });
    }
    out
}

/// Power-of-two blocks (offset, length) covering `n`, largest first.
fn blocks_of(n: usize) -> Vec<(usize, usize)> {
    let mut blocks = Vec::new();
    let mut off = 0;
    let mut rest = n;
    while rest > 0 {
        let b = 1usize << (usize::BITS - 1 - rest.leading_zeros());
        blocks.push((off, b));
        off += b;
        rest -= b;
    }
    blocks
}

/// In-place orthonormal Walsh–Hadamard transform of a power-of-two slice.
#[inline(always)]
pub fn fwht_inplace(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            let (lo, hi) = x[i..i + 2 * h].split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
        h *= 2;
    }
    let scale = 1.0 / (n as f32).sqrt();
    for v in x.iter_mut() {
        *v *= scale;
    }
}

/// The three butterfly stages (h = 1, 2, 4) of an 8-point block, unrolled.
#[inline(always)]
fn fwht8_stages(x: &mut [f32]) {
    let x: &mut [f32; 8] = x.try_into().unwrap();
    let mut h = 1;
    while h < 8 {
        for i in 0..8 {
            if i & h == 0 {
                let (u, v) = (x[i], x[i + h]);
                x[i] = u + v;
                x[i + h] = u - v;
            }
        }
        h *= 2;
    }
}

/// [`fwht_inplace`] with the same butterflies in the same order per element, so bit-identical, but
/// stage-blocked: the three stages inside each 8-float chunk run unrolled first (they never mix
/// chunks, so running them chunk by chunk changes no operand), and the stages h ≥ 8 run over whole
/// chunks, which LLVM vectorises.
#[inline(always)]
pub(crate) fn fwht_blocked(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    if n < 8 {
        fwht_inplace(x);
        return;
    }
    for c in x.chunks_exact_mut(8) {
        fwht8_stages(c);
    }
    let mut h = 8;
    while h < n {
        for blk in x.chunks_exact_mut(2 * h) {
            let (lo, hi) = blk.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
        h *= 2;
    }
    let scale = 1.0 / (n as f32).sqrt();
    for v in x.iter_mut() {
        *v *= scale;
    }
}

/// Flip the sign of `v` where `bit` holds 0x8000_0000: exact, like multiplying by ±1.
#[inline(always)]
fn flip(v: f32, bit: u32) -> f32 {
    f32::from_bits(v.to_bits() ^ bit)
}

impl Hadamard {
    /// Build the rotation.
    ///
    /// Args:
    ///     dim: the head dimension (≥ 1).
    ///     seed: the seed of the random signs.
    /// Returns:
    ///     the rotation; its output has `padded_dim()` coordinates.
    pub fn new(dim: usize, seed: u64) -> Self {
        let padded = dim.div_ceil(8) * 8;
        let first = blocks_of(padded);
        let mut passes = vec![first.clone()];
        if first.len() > 1 {
            let mut second = Vec::new();
            let mut off = 0;
            for &(_, b) in first.iter().rev() {
                second.push((off, b));
                off += b;
            }
            passes.push(second);
        }
        let signs = random_signs(padded, seed);
        let sign_bits = signs.iter().map(|s| s.to_bits() & 0x8000_0000).collect();
        Hadamard {
            dim,
            padded,
            passes,
            signs,
            sign_bits,
            seed,
        }
    }

    /// The input dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The output dimension: `dim` rounded up to a multiple of 8.
    pub fn padded_dim(&self) -> usize {
        self.padded
    }

    /// The seed of the random signs.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The random signs (length `padded_dim()`), applied before the transform.
    pub fn signs(&self) -> &[f32] {
        &self.signs
    }

    /// The block structure: one or two passes of (offset, length) power-of-two blocks.
    pub fn passes(&self) -> &[Vec<(usize, usize)>] {
        &self.passes
    }

    /// Rotate one vector.
    ///
    /// Args:
    ///     x: `dim()` values.
    ///     out: `padded_dim()` values, overwritten.
    #[inline]
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU supports AVX2 (checked above).
            return unsafe { avx2::forward(self, x, out) };
        }
        self.forward_portable(x, out)
    }

    /// [`Hadamard::forward`] without SIMD dispatch, for the codec's portable loops (the reference
    /// the SIMD loops are tested against).
    #[inline(always)]
    pub(crate) fn forward_portable(&self, x: &[f32], out: &mut [f32]) {
        debug_assert_eq!(x.len(), self.dim);
        debug_assert_eq!(out.len(), self.padded);
        for ((o, &v), &b) in out.iter_mut().zip(&x[..self.dim]).zip(&self.sign_bits) {
            *o = flip(v, b);
        }
        for v in out[self.dim..].iter_mut() {
            *v = 0.0;
        }
        for pass in &self.passes {
            for &(off, n) in pass {
                fwht_blocked(&mut out[off..off + n]);
            }
        }
    }

    /// Undo [`Hadamard::forward`] in place and write the first `dim()` coordinates to `out`.
    ///
    /// Args:
    ///     y: `padded_dim()` rotated values; used as scratch.
    ///     out: `dim()` values, overwritten.
    #[inline]
    pub fn inverse(&self, y: &mut [f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU supports AVX2 (checked above).
            return unsafe { avx2::inverse(self, y, out) };
        }
        self.inverse_portable(y, out)
    }

    /// [`Hadamard::inverse`] without SIMD dispatch.
    #[inline(always)]
    pub(crate) fn inverse_portable(&self, y: &mut [f32], out: &mut [f32]) {
        debug_assert_eq!(y.len(), self.padded);
        for pass in self.passes.iter().rev() {
            for &(off, n) in pass {
                fwht_blocked(&mut y[off..off + n]);
            }
        }
        for ((o, &v), &b) in out[..self.dim]
            .iter_mut()
            .zip(y.iter())
            .zip(&self.sign_bits)
        {
            *o = flip(v, b);
        }
    }

    /// The signs as IEEE sign bits (0 or 0x8000_0000), length `padded_dim()`.
    #[inline(always)]
    pub(crate) fn sign_bits(&self) -> &[u32] {
        &self.sign_bits
    }

    /// Whether the rotation is one power-of-two block (every power-of-two padded dimension).
    #[inline(always)]
    pub(crate) fn is_single_block(&self) -> bool {
        self.passes.len() == 1 && self.passes[0].len() == 1
    }
}

/// AVX2 kernels of the transform for the row loops in `crate::simd`: the same butterflies as
/// [`fwht_inplace`] on the same operands, so the results are bit-identical to it.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// Stages h = 1, 2, 4 of an 8-float chunk inside one register. Each stage is a lane swap and
    /// one add: lane i gets swapped + v = v[i^h] + v[i] (the sum, addition commutes) and lane i^h
    /// gets swapped + (−v) = v[i] − v[i^h] (IEEE defines a − b as a + (−b)), so no blend is needed.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn fwht8(v: __m256) -> __m256 {
        let m = i32::MIN;
        let neg1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, m, 0, m, 0, m, 0, m));
        let neg2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, m, m, 0, 0, m, m));
        let neg4 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, 0, m, m, m, m));
        let v = _mm256_add_ps(
            _mm256_permute_ps::<0b10_11_00_01>(v),
            _mm256_xor_ps(v, neg1),
        );
        let v = _mm256_add_ps(
            _mm256_permute_ps::<0b01_00_11_10>(v),
            _mm256_xor_ps(v, neg2),
        );
        _mm256_add_ps(_mm256_permute2f128_ps::<0x01>(v, v), _mm256_xor_ps(v, neg4))
    }

    /// The orthonormal scale of an `n`-point transform, computed as [`super::fwht_inplace`] does.
    #[inline(always)]
    pub(crate) fn scale_of(n: usize) -> f32 {
        1.0 / (n as f32).sqrt()
    }

    /// Stages h ≥ 8 and the scaling of a power-of-two block held in `R` registers (8 floats each)
    /// that already went through [`fwht8`]. The scaling is fused into the last stage; it is still
    /// one rounding after the last butterfly, as in the reference.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn fwht_cross_regs<const R: usize>(v: &mut [__m256; R]) {
        let scale = _mm256_set1_ps(scale_of(8 * R));
        if R == 1 {
            v[0] = _mm256_mul_ps(v[0], scale);
            return;
        }
        let mut h = 1;
        while h < R / 2 {
            for i in 0..R {
                if i & h == 0 {
                    let (a, b) = (v[i], v[i + h]);
                    v[i] = _mm256_add_ps(a, b);
                    v[i + h] = _mm256_sub_ps(a, b);
                }
            }
            h *= 2;
        }
        for i in 0..R / 2 {
            let (a, b) = (v[i], v[i + h]);
            v[i] = _mm256_mul_ps(_mm256_add_ps(a, b), scale);
            v[i + h] = _mm256_mul_ps(_mm256_sub_ps(a, b), scale);
        }
    }

    /// Stages h ≥ 8 and the scaling of a power-of-two block (≥ 8 floats) in memory whose 8-float
    /// chunks already went through [`fwht8`].
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn fwht_cross(x: &mut [f32]) {
        let n = x.len();
        debug_assert!(n.is_power_of_two() && n >= 8);
        let p = x.as_mut_ptr();
        let scale = _mm256_set1_ps(scale_of(n));
        if n == 8 {
            _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_loadu_ps(p), scale));
            return;
        }
        let mut h = 8;
        while h < n / 2 {
            for blk in (0..n).step_by(2 * h) {
                for i in (blk..blk + h).step_by(8) {
                    let a = _mm256_loadu_ps(p.add(i));
                    let b = _mm256_loadu_ps(p.add(i + h));
                    _mm256_storeu_ps(p.add(i), _mm256_add_ps(a, b));
                    _mm256_storeu_ps(p.add(i + h), _mm256_sub_ps(a, b));
                }
            }
            h *= 2;
        }
        for i in (0..h).step_by(8) {
            let a = _mm256_loadu_ps(p.add(i));
            let b = _mm256_loadu_ps(p.add(i + h));
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_add_ps(a, b), scale));
            _mm256_storeu_ps(p.add(i + h), _mm256_mul_ps(_mm256_sub_ps(a, b), scale));
        }
    }

    /// The whole transform of a power-of-two block (≥ 8 floats) in memory.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn fwht(x: &mut [f32]) {
        for c in x.chunks_exact_mut(8) {
            let p = c.as_mut_ptr();
            _mm256_storeu_ps(p, fwht8(_mm256_loadu_ps(p)));
        }
        fwht_cross(x);
    }

    /// Whether this CPU runs these kernels.
    #[inline]
    pub(crate) fn available() -> bool {
        std::is_x86_feature_detected!("avx2")
    }

    /// The number of registers of a rotation kept in registers from load to store (one
    /// power-of-two block of 64 or 128 floats, no padding), or 0.
    #[inline]
    fn regs_of(h: &super::Hadamard) -> usize {
        if h.is_single_block() && h.dim() == h.padded_dim() && matches!(h.dim(), 64 | 128) {
            h.dim() / 8
        } else {
            0
        }
    }

    /// One block of `8 · R` floats from `src` to `dst` in registers: the signs on the way in
    /// (forward) or out (inverse).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn block_regs<const R: usize>(
        bits: &[u32],
        src: &[f32],
        dst: &mut [f32],
        sign_in: bool,
    ) {
        let mut v = [_mm256_setzero_ps(); R];
        for (r, vr) in v.iter_mut().enumerate() {
            let mut x = _mm256_loadu_ps(src.as_ptr().add(8 * r));
            if sign_in {
                x = _mm256_xor_ps(x, _mm256_loadu_ps(bits.as_ptr().add(8 * r).cast()));
            }
            *vr = fwht8(x);
        }
        fwht_cross_regs(&mut v);
        for (r, &vr) in v.iter().enumerate() {
            let x = if sign_in {
                vr
            } else {
                _mm256_xor_ps(vr, _mm256_loadu_ps(bits.as_ptr().add(8 * r).cast()))
            };
            _mm256_storeu_ps(dst.as_mut_ptr().add(8 * r), x);
        }
    }

    /// [`Hadamard::forward`](super::Hadamard::forward): the signs and the first pass's
    /// in-register stages as the row is loaded, then the rest in memory.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn forward(h: &super::Hadamard, x: &[f32], out: &mut [f32]) {
        let d = h.dim();
        assert!(x.len() == d && out.len() == h.padded_dim());
        match regs_of(h) {
            8 => return block_regs::<8>(h.sign_bits(), x, out, true),
            16 => return block_regs::<16>(h.sign_bits(), x, out, true),
            _ => {}
        }
        let bits = h.sign_bits();
        let full = d / 8 * 8;
        for i in (0..full).step_by(8) {
            let s = _mm256_loadu_ps(bits.as_ptr().add(i).cast());
            let v = _mm256_xor_ps(_mm256_loadu_ps(x.as_ptr().add(i)), s);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), fwht8(v));
        }
        let mut next = full;
        if full < d {
            // The padding stays +0.0: it gets no sign.
            let mut tail = [0f32; 8];
            for (k, t) in tail[..d - full].iter_mut().enumerate() {
                *t = super::flip(x[full + k], bits[full + k]);
            }
            _mm256_storeu_ps(
                out.as_mut_ptr().add(full),
                fwht8(_mm256_loadu_ps(tail.as_ptr())),
            );
            next += 8;
        }
        for i in (next..out.len()).step_by(8) {
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_setzero_ps());
        }
        for (pi, pass) in h.passes().iter().enumerate() {
            for &(off, n) in pass {
                if pi == 0 {
                    fwht_cross(&mut out[off..off + n]);
                } else {
                    fwht(&mut out[off..off + n]);
                }
            }
        }
    }

    /// [`Hadamard::inverse`](super::Hadamard::inverse).
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn inverse(h: &super::Hadamard, y: &mut [f32], out: &mut [f32]) {
        let d = h.dim();
        assert!(y.len() == h.padded_dim() && out.len() == d);
        // `inverse` documents `y` as scratch: the register path leaves it as it was.
        match regs_of(h) {
            8 => return block_regs::<8>(h.sign_bits(), y, out, false),
            16 => return block_regs::<16>(h.sign_bits(), y, out, false),
            _ => {}
        }
        for pass in h.passes().iter().rev() {
            for &(off, n) in pass {
                fwht(&mut y[off..off + n]);
            }
        }
        let bits = h.sign_bits();
        let full = d / 8 * 8;
        for i in (0..full).step_by(8) {
            let s = _mm256_loadu_ps(bits.as_ptr().add(i).cast());
            _mm256_storeu_ps(
                out.as_mut_ptr().add(i),
                _mm256_xor_ps(_mm256_loadu_ps(y.as_ptr().add(i)), s),
            );
        }
        for i in full..d {
            out[i] = super::flip(y[i], bits[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The register kernel on the first `R` of 16 registers.
    #[cfg(target_arch = "x86_64")]
    unsafe fn cross<const R: usize>(r: &mut [std::arch::x86_64::__m256; 16]) {
        let mut a: [std::arch::x86_64::__m256; R] = r[..R].try_into().unwrap();
        avx2::fwht_cross_regs(&mut a);
        r[..R].copy_from_slice(&a);
    }

    #[test]
    fn blocks_cover_non_powers_of_two() {
        assert_eq!(blocks_of(80), vec![(0, 64), (64, 16)]);
        assert_eq!(blocks_of(96), vec![(0, 64), (64, 32)]);
        assert_eq!(blocks_of(192), vec![(0, 128), (128, 64)]);
        assert_eq!(Hadamard::new(100, 0).padded_dim(), 104);
        assert_eq!(Hadamard::new(128, 0).passes().len(), 1);
        assert_eq!(Hadamard::new(80, 0).passes()[1], vec![(0, 16), (16, 64)]);
    }

    #[test]
    fn matches_dense_hadamard() {
        // H_n built by Sylvester's construction, normalised.
        let n: usize = 16;
        let mut x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let orig = x.clone();
        fwht_inplace(&mut x);
        for (i, &xi) in x.iter().enumerate() {
            let mut s = 0f32;
            for (j, &o) in orig.iter().enumerate() {
                let sign = if (i & j).count_ones() % 2 == 0 {
                    1.0
                } else {
                    -1.0
                };
                s += sign * o;
            }
            assert!((xi - s / 4.0).abs() < 1e-5);
        }
    }

    #[test]
    fn blocked_equals_reference_bitwise() {
        for log in 0..=10 {
            let n = 1usize << log;
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) as f32 * 0.013).sin() * 3.0)
                .collect();
            let (mut a, mut b) = (x.clone(), x.clone());
            fwht_inplace(&mut a);
            fwht_blocked(&mut b);
            assert_eq!(bits(&a), bits(&b), "n = {n}");
        }
    }

    #[test]
    fn signs_depend_on_seed() {
        assert_ne!(random_signs(64, 1), random_signs(64, 2));
        assert_eq!(random_signs(64, 7), random_signs(64, 7));
        let s = random_signs(4096, 3);
        let neg = s.iter().filter(|&&v| v < 0.0).count();
        assert!((1800..2300).contains(&neg));
    }

    proptest! {
        #[test]
        fn inverse_undoes_forward_and_keeps_norm(
            dim in prop::sample::select(vec![8usize, 64, 72, 80, 96, 100, 128, 192, 256]),
            seed in any::<u64>(),
            vals in proptest::collection::vec(-10.0f32..10.0, 256),
        ) {
            let h = Hadamard::new(dim, seed);
            let x = &vals[..dim];
            let mut y = vec![0f32; h.padded_dim()];
            h.forward(x, &mut y);
            let nx: f32 = x.iter().map(|v| v * v).sum();
            let ny: f32 = y.iter().map(|v| v * v).sum();
            prop_assert!((nx - ny).abs() <= 1e-4 * nx.max(1.0));
            let mut back = vec![0f32; dim];
            h.inverse(&mut y, &mut back);
            for i in 0..dim {
                prop_assert!((back[i] - x[i]).abs() <= 1e-4 * (1.0 + x[i].abs()));
            }
        }

        #[test]
        fn forward_and_inverse_equal_reference_bitwise(
            dim in prop::sample::select(vec![1usize, 3, 8, 13, 64, 72, 80, 96, 100, 128, 192, 256, 1000]),
            seed in any::<u64>(),
            vals in proptest::collection::vec(-10.0f32..10.0, 1000),
        ) {
            let h = Hadamard::new(dim, seed);
            let x = &vals[..dim];
            // The reference: multiply by the signs, zero padding, fwht_inplace pass by pass.
            let mut want = vec![0f32; h.padded_dim()];
            for i in 0..dim {
                want[i] = x[i] * h.signs()[i];
            }
            for pass in h.passes() {
                for &(off, n) in pass {
                    fwht_inplace(&mut want[off..off + n]);
                }
            }
            let mut got = vec![1f32; h.padded_dim()];
            h.forward(x, &mut got);
            prop_assert_eq!(bits(&got), bits(&want));
            let mut port = vec![1f32; h.padded_dim()];
            h.forward_portable(x, &mut port);
            prop_assert_eq!(bits(&port), bits(&want));
            let mut back_ref = want.clone();
            for pass in h.passes().iter().rev() {
                for &(off, n) in pass {
                    fwht_inplace(&mut back_ref[off..off + n]);
                }
            }
            let back_ref: Vec<f32> = (0..dim).map(|i| back_ref[i] * h.signs()[i]).collect();
            let (mut y1, mut y2) = (want.clone(), want.clone());
            let (mut b1, mut b2) = (vec![0f32; dim], vec![0f32; dim]);
            h.inverse(&mut y1, &mut b1);
            h.inverse_portable(&mut y2, &mut b2);
            prop_assert_eq!(bits(&b1), bits(&back_ref));
            prop_assert_eq!(bits(&b2), bits(&back_ref));
        }

        #[test]
        fn avx2_kernels_equal_reference_bitwise(
            log in 3usize..=10,
            vals in proptest::collection::vec(-100.0f32..100.0, 1024),
        ) {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                use std::arch::x86_64::*;
                let n = 1usize << log;
                let mut want = vals[..n].to_vec();
                fwht_inplace(&mut want);
                let mut got = vals[..n].to_vec();
                // SAFETY: AVX2 is present (checked above).
                unsafe { avx2::fwht(&mut got) };
                prop_assert_eq!(bits(&got), bits(&want));
                if n <= 128 {
                    // SAFETY: as above; the array holds exactly n floats.
                    let regs = unsafe {
                        let mut r = [_mm256_setzero_ps(); 16];
                        for (i, c) in vals[..n].chunks_exact(8).enumerate() {
                            r[i] = avx2::fwht8(_mm256_loadu_ps(c.as_ptr()));
                        }
                        match n / 8 {
                            1 => cross::<1>(&mut r),
                            2 => cross::<2>(&mut r),
                            4 => cross::<4>(&mut r),
                            8 => cross::<8>(&mut r),
                            _ => cross::<16>(&mut r),
                        }
                        let mut out = vec![0f32; 128];
                        for (i, c) in out.chunks_exact_mut(8).enumerate() {
                            _mm256_storeu_ps(c.as_mut_ptr(), r[i]);
                        }
                        out.truncate(n);
                        out
                    };
                    prop_assert_eq!(bits(&regs), bits(&want));
                }
            }
        }
    }
}
