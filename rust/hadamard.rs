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
        out.push(if (bits >> (i % 64)) & 1 == 1 { -1.0 } else { 1.0 });
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
        Hadamard { dim, padded, passes, signs: random_signs(padded, seed), seed }
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
    #[inline(always)]
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        debug_assert_eq!(x.len(), self.dim);
        debug_assert_eq!(out.len(), self.padded);
        for i in 0..self.dim {
            out[i] = x[i] * self.signs[i];
        }
        for v in out[self.dim..].iter_mut() {
            *v = 0.0;
        }
        for pass in &self.passes {
            for &(off, n) in pass {
                fwht_inplace(&mut out[off..off + n]);
            }
        }
    }

    /// Undo [`Hadamard::forward`] in place and write the first `dim()` coordinates to `out`.
    ///
    /// Args:
    ///     y: `padded_dim()` rotated values; used as scratch.
    ///     out: `dim()` values, overwritten.
    #[inline(always)]
    pub fn inverse(&self, y: &mut [f32], out: &mut [f32]) {
        debug_assert_eq!(y.len(), self.padded);
        for pass in self.passes.iter().rev() {
            for &(off, n) in pass {
                fwht_inplace(&mut y[off..off + n]);
            }
        }
        for i in 0..self.dim {
            out[i] = y[i] * self.signs[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
        for i in 0..n {
            let mut s = 0f32;
            for j in 0..n {
                let sign = if (i & j).count_ones() % 2 == 0 { 1.0 } else { -1.0 };
                s += sign * orig[j];
            }
            assert!((x[i] - s / 4.0).abs() < 1e-5);
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
    }
}
