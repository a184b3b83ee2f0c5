//! Nearest point of the E8 lattice (Conway & Sloane, "Fast quantizing and decoding algorithms for
//! lattice quantizers and codes", 1982).
//!
//! E8 = D8 ∪ (D8 + ½·1), where D8 is the set of integer vectors with an even coordinate sum.
//! The nearest D8 point is found by rounding every coordinate and, when the rounded sum is odd,
//! re-rounding the ONE coordinate whose rounding error was largest the other way (that costs the
//! least extra distance). The same on x − ½ gives the nearest point of the other coset; the nearer
//! of the two is the nearest E8 point. Exact for |x_i| < 2^22 (where f32 still has a fractional part).

/// Nearest point of D8 (integer coordinates, even sum) to `x`.
///
/// Args:
///     x: the point to quantize.
/// Returns:
///     the nearest D8 point; among equally near points, a deterministic one.
#[inline]
pub fn nearest_d8(x: &[f32; 8]) -> [f32; 8] {
    let mut r = [0f32; 8];
    let mut parity = 0i64;
    let mut worst = 0usize;
    let mut worst_err = -1f32;
    for i in 0..8 {
        r[i] = x[i].round_ties_even();
        parity += r[i] as i64;
        let err = (x[i] - r[i]).abs();
        // Strict `>` keeps the first of equal errors, so the result is deterministic.
        if err > worst_err {
            worst_err = err;
            worst = i;
        }
    }
    if parity & 1 != 0 {
        // Re-round the worst coordinate towards x: the second-nearest integer for that coordinate.
        r[worst] += if x[worst] >= r[worst] { 1.0 } else { -1.0 };
    }
    r
}

#[inline]
fn dist2(a: &[f32; 8], b: &[f32; 8]) -> f32 {
    let mut s = 0f32;
    for i in 0..8 {
        let d = a[i] - b[i];
        s += d * d;
    }
    s
}

/// Nearest point of E8 = D8 ∪ (D8 + ½) to `x`.
///
/// Args:
///     x: the point to quantize.
/// Returns:
///     the nearest E8 point (integer or half-integer coordinates); the D8 point on a tie.
#[inline]
pub fn nearest_e8(x: &[f32; 8]) -> [f32; 8] {
    let a = nearest_d8(x);
    let mut shifted = [0f32; 8];
    for i in 0..8 {
        shifted[i] = x[i] - 0.5;
    }
    let mut b = nearest_d8(&shifted);
    for v in b.iter_mut() {
        *v += 0.5;
    }
    if dist2(x, &b) < dist2(x, &a) {
        b
    } else {
        a
    }
}

/// Nearest E8 points for a flat buffer of 8-float groups, written in place of `out`.
///
/// Args:
///     x: `n * 8` floats.
///     out: `n * 8` floats, overwritten with the nearest lattice points.
pub fn nearest_e8_slice(x: &[f32], out: &mut [f32]) {
    debug_assert_eq!(x.len(), out.len());
    debug_assert_eq!(x.len() % 8, 0);
    for (xi, oi) in x.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
        let p = nearest_e8(xi.try_into().unwrap());
        oi.copy_from_slice(&p);
    }
}

/// Doubled coordinates of an E8 point (all integers, all of one parity): the lossless integer form
/// that delta and entropy coding work on.
#[inline]
pub fn doubled(p: &[f32; 8]) -> [i32; 8] {
    let mut d = [0i32; 8];
    for i in 0..8 {
        d[i] = (p[i] * 2.0) as i32;
    }
    d
}

/// Whether `p` is a point of E8: all integers or all half-integers, with an even coordinate sum.
pub fn is_e8_point(p: &[f32; 8]) -> bool {
    let d = doubled(p);
    for i in 0..8 {
        if (d[i] as f32) != p[i] * 2.0 {
            return false;
        }
    }
    let all_even = d.iter().all(|v| v & 1 == 0);
    let all_odd = d.iter().all(|v| v & 1 != 0);
    if !(all_even || all_odd) {
        return false;
    }
    let sum: i64 = d.iter().map(|&v| v as i64).sum();
    // sum of coordinates = sum(d) / 2 must be even, so sum(d) ≡ 0 (mod 4).
    sum.rem_euclid(4) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Brute force: every D8 and D8+½ point within ±2 of the rounded coordinates of `x`,
    /// a box that always contains the nearest point (the covering radius of E8 is 1).
    fn brute_nearest(x: &[f32; 8]) -> f32 {
        let mut best = f32::INFINITY;
        for coset in [0.0f32, 0.5] {
            let base: Vec<f32> = x.iter().map(|v| (v - coset).floor()).collect();
            // 4^8 = 65536 candidates per coset: offsets -1..=2 around the floor.
            for m in 0..(1u32 << 16) {
                let mut p = [0f32; 8];
                let mut sum = 0i64;
                for i in 0..8 {
                    let off = ((m >> (2 * i)) & 3) as f32 - 1.0;
                    let v = base[i] + off;
                    sum += v as i64;
                    p[i] = v + coset;
                }
                if sum & 1 != 0 {
                    continue;
                }
                best = best.min(dist2(x, &p));
            }
        }
        best
    }

    #[test]
    fn known_points() {
        let x = [0.6f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        // (1,0,...) has odd sum; nearest D8 is the origin or (1,1,0..) variants; nearest E8 is 0.
        assert_eq!(nearest_e8(&x), [0.0; 8]);
        let h = [0.5f32; 8];
        assert_eq!(nearest_e8(&h), h);
        let y = [0.4f32; 8];
        assert_eq!(nearest_e8(&y), [0.5; 8]);
    }

    #[test]
    fn parity_fix_uses_the_largest_error() {
        // Rounds to (1,0,0,0,0,0,0,0)+... with odd sum; the largest rounding error is x[1] = 0.45,
        // so the fix must move x[1] to 1, not x[2] (error 0.1).
        let x = [1.0f32, 0.45, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0];
        assert_eq!(nearest_d8(&x), [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn nearest_is_optimal(v in proptest::collection::vec(-4.0f32..4.0, 8)) {
            let x: [f32; 8] = v.try_into().unwrap();
            let p = nearest_e8(&x);
            prop_assert!(is_e8_point(&p));
            let d = dist2(&x, &p);
            let b = brute_nearest(&x);
            prop_assert!(d <= b + 1e-5, "found {d}, brute force {b}");
        }

        #[test]
        fn lattice_points_are_fixed(v in proptest::collection::vec(-6i32..6, 8), half in any::<bool>()) {
            let mut p = [0f32; 8];
            for i in 0..8 { p[i] = v[i] as f32 + if half { 0.5 } else { 0.0 }; }
            let s: i64 = p.iter().map(|&f| f.floor() as i64).sum();
            if s & 1 != 0 { p[0] += 1.0; }
            prop_assert!(is_e8_point(&p));
            prop_assert_eq!(nearest_e8(&p), p);
        }
    }
}
