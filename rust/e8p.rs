//! Fixed-rate E8 codebooks: random access codes for the resident cache.
//!
//! `E8P16` (2 bits per dimension): 2^16 codewords in 8 dimensions, built the way QuIP#'s E8P is:
//! 256 absolute-value patterns × 7 sign bits × a ±¼ shift. Every pattern is a point of |D̂8| (all
//! coordinates in {½, 3⁄2, 5⁄2}); the eighth sign is fixed by the parity that keeps the signed point in
//! D̂8 = D8 + ½ (even coordinate sum), so every codeword is a point of E8 + ¼·1.
//!
//! Which 256 patterns: the 227 with squared norm ≤ 10 (the E8P choice) plus 29 more. E8P adds 29 of
//! squared norm 12; we add the 28 permutations of (5,5,1,1,1,1,1,1)/2 and (3,…,3)/2. That keeps the
//! pattern set closed under permutation, which makes exact nearest-codeword search cheap (sort the
//! magnitudes, nine candidate types instead of 256 dot products), and it measured the same:
//! mean squared error per dimension on unit Gaussians with the best global scale was 0.0917 for our
//! set against 0.0916–0.0925 for E8P-style sets of norm-12 patterns (8000 vectors, brute-force
//! nearest codeword over all 2^16 points, in an exploratory script).
//!
//! `E8P8` (1 bit per dimension): the first pattern alone, (½,…,½) × 7 sign bits × ±¼ shift:
//! 256 codewords, used for the coarse tier and for the residual stage of the 3-bit codes.
//!
//! Code layout (little-endian u16): bits 0–7 pattern index, bits 8–14 the signs of coordinates 0–6
//! (1 = negative), bit 15 the shift (0: +¼, 1: −¼). E8P8 (u8): bits 0–6 signs, bit 7 shift.

use std::sync::OnceLock;

/// The nine permutation classes of patterns, as (number of 5⁄2 entries, number of 3⁄2 entries);
/// the rest are ½. Pattern indices are assigned class by class in this order.
pub const PATTERN_TYPES: [(u32, u32); 9] = [
    (0, 0),
    (0, 1),
    (0, 2),
    (0, 3),
    (0, 4),
    (1, 0),
    (1, 1),
    (2, 0),
    (0, 8),
];

struct TypeConsts {
    n_big: u32,  // n5 + n3: how many entries exceed ½
    n5: u32,     // how many entries are 5⁄2
    norm2: f32,  // squared norm of the pattern
    parity: u32, // (sum of the pattern) mod 2 = required number of negative signs mod 2
    amin: f32,   // smallest entry
}

const fn type_consts(t: usize) -> TypeConsts {
    let (n5, n3) = PATTERN_TYPES[t];
    let n1 = 8 - n5 - n3;
    // In quarter units: (5/2)^2 = 25/4, (3/2)^2 = 9/4, (1/2)^2 = 1/4.
    let norm2_q = 25 * n5 + 9 * n3 + n1;
    // Sum in half units: 5 n5 + 3 n3 + n1, always even; the sum itself is half of that.
    let sum = (5 * n5 + 3 * n3 + n1) / 2;
    TypeConsts {
        n_big: n5 + n3,
        n5,
        norm2: norm2_q as f32 / 4.0,
        parity: sum % 2,
        amin: if n1 > 0 {
            0.5
        } else if n3 > 0 {
            1.5
        } else {
            2.5
        },
    }
}

const TYPES: [TypeConsts; 9] = [
    type_consts(0),
    type_consts(1),
    type_consts(2),
    type_consts(3),
    type_consts(4),
    type_consts(5),
    type_consts(6),
    type_consts(7),
    type_consts(8),
];

/// Eight lanes of 32 bits, aligned so that one table row is one aligned 32-byte load.
#[repr(C, align(32))]
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Row8<T>(pub(crate) [T; 8]);

/// Lookup tables of the E8P16 codebook.
pub struct E8P16Tables {
    /// `abs[i]`: the magnitudes of pattern `i`.
    pub abs: [[f32; 8]; 256],
    /// `parity[i]`: required number of negative signs of pattern `i`, mod 2.
    pub parity: [u8; 256],
    /// Pattern index of each arrangement, keyed by Σ digit_c·3^c with digit 0,1,2 for ½, 3⁄2, 5⁄2;
    /// `u16::MAX` where the arrangement is not in the codebook.
    key_to_index: Vec<u16>,
    // Decode without branches or popcounts: `abs` as f32 bits with the sign bit of coordinate 7 set
    // where the pattern's parity is odd, and for each 7 sign bits the sign masks of coordinates 0–6
    // plus, on coordinate 7, the parity of those bits. Their xor is the codeword's sign pattern
    // (the eighth sign is the parity of the seven and the pattern's), so a codeword is two loads, a
    // xor and the shift. 8 KiB + 4 KiB: L1-resident.
    pub(crate) abs_par: [Row8<u32>; 256],
    pub(crate) sign_masks: [Row8<u32>; 128],
    // The 256 E8P8 codewords (8 KiB): decoding one is a single load.
    pub(crate) cw8: [Row8<f32>; 256],
}

static TABLES: OnceLock<E8P16Tables> = OnceLock::new();

/// The E8P16 tables, built once.
pub fn tables() -> &'static E8P16Tables {
    TABLES.get_or_init(|| {
        let mut abs = [[0f32; 8]; 256];
        let mut parity = [0u8; 256];
        let mut key_to_index = vec![u16::MAX; 6561];
        let mut next = 0usize;
        for (t, &(n5, n3)) in PATTERN_TYPES.iter().enumerate() {
            for key in 0..6561u32 {
                let mut k = key;
                let (mut c5, mut c3) = (0, 0);
                let mut pat = [0f32; 8];
                for p in pat.iter_mut() {
                    let d = k % 3;
                    k /= 3;
                    *p = [0.5, 1.5, 2.5][d as usize];
                    c5 += (d == 2) as u32;
                    c3 += (d == 1) as u32;
                }
                if c5 == n5 && c3 == n3 {
                    abs[next] = pat;
                    parity[next] = TYPES[t].parity as u8;
                    key_to_index[key as usize] = next as u16;
                    next += 1;
                }
            }
        }
        assert_eq!(next, 256, "the E8P16 pattern set must have 256 entries");
        let abs_par = std::array::from_fn(|i| {
            Row8(std::array::from_fn(|c| {
                abs[i][c].to_bits() | if c == 7 { (parity[i] as u32) << 31 } else { 0 }
            }))
        });
        let sign_masks = std::array::from_fn(|s: usize| {
            Row8(std::array::from_fn(|c| {
                let neg = if c < 7 {
                    (s >> c) & 1
                } else {
                    (s.count_ones() & 1) as usize
                };
                (neg as u32) << 31
            }))
        });
        let cw8 = std::array::from_fn(|code| Row8(decode8(code as u8)));
        E8P16Tables {
            abs,
            parity,
            key_to_index,
            abs_par,
            sign_masks,
            cw8,
        }
    })
}

/// [`decode16`] with the tables passed in (no `OnceLock` lookup per group).
///
/// Args:
///     t: the tables from [`tables`].
///     code: a 16-bit code.
/// Returns:
///     the 8 coordinates of the codeword, bit-identical to [`decode16`]: every codeword coordinate
///     is a small multiple of ¼, exact in f32 however it is formed.
#[inline(always)]
pub(crate) fn decode16_with(t: &E8P16Tables, code: u16) -> [f32; 8] {
    let a = &t.abs_par[(code & 0xFF) as usize].0;
    let m = &t.sign_masks[((code >> 8) & 0x7F) as usize].0;
    let shift = if code & 0x8000 != 0 { -0.25f32 } else { 0.25 };
    std::array::from_fn(|c| f32::from_bits(a[c] ^ m[c]) + shift)
}

/// [`decode8`] from the tables: one lookup.
#[inline(always)]
pub(crate) fn decode8_with(t: &E8P16Tables, code: u8) -> [f32; 8] {
    t.cw8[code as usize].0
}

/// Decode one E8P16 code to its codeword (before scaling).
///
/// Args:
///     code: a 16-bit code.
/// Returns:
///     the 8 coordinates of the codeword.
#[inline]
pub fn decode16(code: u16) -> [f32; 8] {
    let t = tables();
    let idx = (code & 0xFF) as usize;
    let signs = ((code >> 8) & 0x7F) as u32;
    let shift = if code & 0x8000 != 0 { -0.25 } else { 0.25 };
    let neg7 = (signs.count_ones() + t.parity[idx] as u32) & 1;
    let negs = signs | (neg7 << 7);
    let mut out = [0f32; 8];
    for (c, (o, &a)) in out.iter_mut().zip(&t.abs[idx]).enumerate() {
        *o = if (negs >> c) & 1 != 0 { -a } else { a } + shift;
    }
    out
}

/// Decode one E8P8 code to its codeword (before scaling).
#[inline]
pub fn decode8(code: u8) -> [f32; 8] {
    let signs = (code & 0x7F) as u32;
    let shift = if code & 0x80 != 0 { -0.25 } else { 0.25 };
    let neg7 = signs.count_ones() & 1;
    let negs = signs | (neg7 << 7);
    let mut out = [0f32; 8];
    for (c, o) in out.iter_mut().enumerate() {
        *o = if (negs >> c) & 1 != 0 { -0.5 } else { 0.5 } + shift;
    }
    out
}

/// Nearest E8P16 codes for `L` groups at once, laid out coordinate-major (`y[c][lane]`), so that the
/// search vectorises across lanes. With `L = 1` it is the scalar reference.
///
/// For each shift and each of the nine pattern classes, the best arrangement puts the largest
/// entries on the largest magnitudes (rearrangement inequality), the best signs follow the signs of
/// y, and if their parity is wrong the cheapest fix flips the sign of the smallest magnitude, which
/// costs 4·|y|min·a_min. Both choices are optimal at once, so the search is exact.
#[inline(always)]
pub fn encode16_lanes<const L: usize>(y0: &[[f32; L]; 8], codes: &mut [u16; L]) {
    let mut best = [f32::INFINITY; L];
    let mut best_t = [0u32; L];
    let mut best_s = [0usize; L];
    let mut ranks = [[[0u32; L]; 8]; 2];
    let mut negbits = [[0u32; L]; 2];
    for (si, &shift) in [0.25f32, -0.25].iter().enumerate() {
        let mut u = [[0f32; L]; 8];
        let mut negc = [0u32; L];
        for c in 0..8 {
            for l in 0..L {
                let y = y0[c][l] - shift;
                u[c][l] = y.abs();
                let neg = (y < 0.0) as u32;
                negc[l] += neg;
                negbits[si][l] |= neg << c;
            }
        }
        // rank[c] = how many coordinates come before c in descending order of magnitude
        // (ties: the lower index first).
        let rank = &mut ranks[si];
        for i in 0..8 {
            for j in (i + 1)..8 {
                for l in 0..L {
                    let j_first = (u[j][l] > u[i][l]) as u32;
                    rank[i][l] += j_first;
                    rank[j][l] += 1 - j_first;
                }
            }
        }
        // Sums of the k largest magnitudes, k = 1..4, and of all 8.
        let mut top = [[0f32; L]; 5];
        let mut sq = [0f32; L];
        let mut umin = [f32::INFINITY; L];
        for c in 0..8 {
            for l in 0..L {
                let v = u[c][l];
                let r = rank[c][l];
                for (k, tk) in top[..4].iter_mut().enumerate() {
                    tk[l] += if r <= k as u32 { v } else { 0.0 };
                }
                top[4][l] += v;
                sq[l] += v * v;
                umin[l] = if v < umin[l] { v } else { umin[l] };
            }
        }
        for (t, tc) in TYPES.iter().enumerate() {
            for l in 0..L {
                let s_of = |k: u32| -> f32 {
                    match k {
                        0 => 0.0,
                        8 => top[4][l],
                        k => top[(k - 1) as usize][l],
                    }
                };
                let dot = 0.5 * top[4][l] + s_of(tc.n_big) + s_of(tc.n5);
                let mismatch = ((negc[l] + tc.parity) & 1) as f32;
                let d = sq[l] + tc.norm2 - 2.0 * dot + mismatch * 4.0 * umin[l] * tc.amin;
                if d < best[l] {
                    best[l] = d;
                    best_t[l] = t as u32;
                    best_s[l] = si;
                }
            }
        }
    }
    let tabs = tables();
    for l in 0..L {
        let si = best_s[l];
        let tc = &TYPES[best_t[l] as usize];
        let mut key = 0u32;
        let mut pow = 1u32;
        let mut smallest = 0usize;
        for (c, rc) in ranks[si].iter().enumerate() {
            let r = rc[l];
            let digit = (r < tc.n_big) as u32 + (r < tc.n5) as u32;
            key += digit * pow;
            pow *= 3;
            if r == 7 {
                smallest = c;
            }
        }
        let idx = tabs.key_to_index[key as usize];
        debug_assert!(idx != u16::MAX);
        let mut negs = negbits[si][l];
        if (negs.count_ones() + tc.parity) & 1 != 0 {
            negs ^= 1 << smallest;
        }
        codes[l] = idx | (((negs & 0x7F) as u16) << 8) | ((si as u16) << 15);
    }
}

/// Nearest E8P8 codes for `L` groups at once (coordinate-major), as [`encode16_lanes`] does for E8P16.
#[inline(always)]
pub fn encode8_lanes<const L: usize>(y0: &[[f32; L]; 8], codes: &mut [u8; L]) {
    let mut best = [f32::INFINITY; L];
    let mut best_code = [0u8; L];
    for (si, &shift) in [0.25f32, -0.25].iter().enumerate() {
        let mut negs = [0u32; L];
        let mut d = [0f32; L];
        let mut umin = [f32::INFINITY; L];
        let mut argmin = [0u32; L];
        for (c, yc) in y0.iter().enumerate() {
            for l in 0..L {
                let y = yc[l] - shift;
                let u = y.abs();
                negs[l] |= ((y < 0.0) as u32) << c;
                let e = u - 0.5;
                d[l] += e * e;
                let smaller = u < umin[l];
                umin[l] = if smaller { u } else { umin[l] };
                argmin[l] = if smaller { c as u32 } else { argmin[l] };
            }
        }
        for l in 0..L {
            let mismatch = negs[l].count_ones() & 1;
            let dist = d[l] + mismatch as f32 * 2.0 * umin[l];
            if dist < best[l] {
                best[l] = dist;
                let n = negs[l] ^ (mismatch << argmin[l]);
                best_code[l] = (n & 0x7F) as u8 | ((si as u8) << 7);
            }
        }
    }
    *codes = best_code;
}

/// Nearest E8P16 code of one group (scalar reference).
#[inline]
pub fn encode16(y: &[f32; 8]) -> u16 {
    let mut soa = [[0f32; 1]; 8];
    for c in 0..8 {
        soa[c][0] = y[c];
    }
    let mut code = [0u16; 1];
    encode16_lanes::<1>(&soa, &mut code);
    code[0]
}

/// Nearest E8P8 code of one group (scalar reference).
#[inline]
pub fn encode8(y: &[f32; 8]) -> u8 {
    let mut soa = [[0f32; 1]; 8];
    for c in 0..8 {
        soa[c][0] = y[c];
    }
    let mut code = [0u8; 1];
    encode8_lanes::<1>(&soa, &mut code);
    code[0]
}

/// AVX2 versions of the search and the decode: eight groups per register, lane l holding group l
/// (coordinate-major, as in [`encode16_lanes`]). Every float operation is the one the scalar
/// reference does, on the same operands and in the same order, so the codes are bit-identical to
/// [`encode16`] / [`encode8`] (the tests check it, ties included).
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{E8P16Tables, TYPES};
    use std::arch::x86_64::*;

    /// The E8P16 codeword of `code` in one register.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn decode16(t: &E8P16Tables, code: u16) -> __m256 {
        let a = _mm256_load_si256(t.abs_par[(code & 0xFF) as usize].0.as_ptr().cast());
        let m = _mm256_load_si256(
            t.sign_masks[((code >> 8) & 0x7F) as usize]
                .0
                .as_ptr()
                .cast(),
        );
        const SHIFT: [f32; 2] = [0.25, -0.25];
        let shift = _mm256_broadcast_ss(&SHIFT[(code >> 15) as usize]);
        _mm256_add_ps(_mm256_castsi256_ps(_mm256_xor_si256(a, m)), shift)
    }

    /// The E8P8 codeword of `code` in one register.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn decode8(t: &E8P16Tables, code: u8) -> __m256 {
        _mm256_load_ps(t.cw8[code as usize].0.as_ptr())
    }

    /// Transpose 8×8 floats: group-major registers (one group each) to coordinate-major (one
    /// coordinate of eight groups each), or back.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn transpose8(r: &[__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    #[inline(always)]
    fn bit(c: usize) -> i32 {
        1 << c
    }

    /// A per-type constant for types 0–7 as a lane table for `permutevar8x32`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn tab(f: fn(usize) -> i32) -> __m256i {
        _mm256_setr_epi32(f(0), f(1), f(2), f(3), f(4), f(5), f(6), f(7))
    }

    /// Sort eight registers lane-wise, largest first (a 19-comparator network of depth 6).
    /// Inputs are magnitudes: no NaN and no −0, so max and min are exact and order-free.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn sort8_desc(a: [__m256; 8]) -> [__m256; 8] {
        // Written out: a loop over a table of pairs is not unrolled, and indexes the registers
        // through the stack.
        let [a0, a1, a2, a3, a4, a5, a6, a7] = a;
        macro_rules! cx {
            ($x:ident, $y:ident) => {
                let (hi, lo) = (_mm256_max_ps($x, $y), _mm256_min_ps($x, $y));
                let ($x, $y) = (hi, lo);
            };
        }
        cx!(a0, a2);
        cx!(a1, a3);
        cx!(a4, a6);
        cx!(a5, a7);
        cx!(a0, a4);
        cx!(a1, a5);
        cx!(a2, a6);
        cx!(a3, a7);
        cx!(a0, a1);
        cx!(a2, a3);
        cx!(a4, a5);
        cx!(a6, a7);
        cx!(a2, a4);
        cx!(a3, a5);
        cx!(a1, a4);
        cx!(a3, a6);
        cx!(a1, a2);
        cx!(a3, a4);
        cx!(a5, a6);
        [a0, a1, a2, a3, a4, a5, a6, a7]
    }

    /// The best of two candidates (distance, index), `a` tried before `b`: `b` wins only if
    /// strictly nearer, as in the reference's sequential `if d < best`. Its index is larger, so
    /// the choice is a max with the masked index. Reducing the 18 candidates as a tree instead
    /// of a chain gives the same winner (the first of the minimal distances) with a dependency
    /// chain of 5 comparisons instead of 18.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn first_min(a: (__m256, __m256i), b: (__m256, __m256i)) -> (__m256, __m256i) {
        let lt = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(b.0, a.0));
        (
            _mm256_min_ps(b.0, a.0),
            _mm256_max_epi32(a.1, _mm256_and_si256(lt, b.1)),
        )
    }

    /// What one shift of [`encode16`] leaves for the rest.
    struct ShiftPass {
        /// Best distance and its index (type + 9 · shift) over the nine types.
        best: (__m256, __m256i),
        /// s0, s1, s2, s3 (the thresholds of the top 1–4) and s7 (the minimum).
        order: [__m256; 5],
        /// Sign bit set in lanes whose count of negative coordinates is odd.
        odd: __m256,
        /// All-ones in lanes with a tie at a boundary the search reads.
        ties: __m256,
    }

    /// One shift of [`encode16`]: the order statistics, the top-k sums and the nine distances.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn shift_pass<const SI: usize>(y0: &[__m256; 8]) -> ShiftPass {
        let zero = _mm256_setzero_ps();
        let sh = _mm256_set1_ps(if SI == 0 { 0.25 } else { -0.25 });
        let sign = _mm256_set1_ps(-0.0);
        let mut u = [zero; 8];
        let mut par = zero;
        let mut sq = zero;
        for (c, &yc) in y0.iter().enumerate() {
            let y = _mm256_sub_ps(yc, sh);
            u[c] = _mm256_andnot_ps(sign, y);
            // y = y0 ∓ ¼ with y0 finite is never NaN and never −0 (x − y is −0 only for
            // x = −0, y = +0), so its sign bit is exactly the reference's `y < 0.0`: the xor of
            // the sign bits is the parity of the negative count.
            par = _mm256_xor_ps(par, y);
            // u · u = y · y exactly; the reference's 0.0 + first term is the first term.
            let y2 = _mm256_mul_ps(y, y);
            sq = if c == 0 { y2 } else { _mm256_add_ps(sq, y2) };
        }
        let s = sort8_desc(u);
        let mut ties = zero;
        for (a, b) in [(0, 1), (1, 2), (2, 3), (3, 4), (6, 7)] {
            ties = _mm256_or_ps(ties, _mm256_cmp_ps::<_CMP_EQ_OQ>(s[a], s[b]));
        }
        // The top-1 and top-2 sums have one and two nonzero terms: s0, and s0 + s1 in either
        // order (addition commutes), whatever the ties.
        let top0 = s[0];
        let top1 = _mm256_add_ps(s[0], s[1]);
        let mut top2 = zero;
        let mut top3 = zero;
        let mut top4 = u[0];
        for (c, &uc) in u.iter().enumerate() {
            let t2 = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(uc, s[2]), uc);
            let t3 = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(uc, s[3]), uc);
            top2 = if c == 0 { t2 } else { _mm256_add_ps(top2, t2) };
            top3 = if c == 0 { t3 } else { _mm256_add_ps(top3, t3) };
            if c > 0 {
                top4 = _mm256_add_ps(top4, uc);
            }
        }
        let s_of = |k: u32| -> Option<__m256> {
            match k {
                0 => None,
                1 => Some(top0),
                2 => Some(top1),
                3 => Some(top2),
                4 => Some(top3),
                _ => Some(top4),
            }
        };
        let half = _mm256_mul_ps(_mm256_set1_ps(0.5), top4);
        // mismatch · 4 · umin · amin: 4 · umin is exact, then one rounding by amin; +0.0 where
        // the parity is right (the reference adds 0 · … = +0.0 there).
        let fu = _mm256_mul_ps(_mm256_set1_ps(4.0), s[7]);
        let mut cand = [(zero, _mm256_setzero_si256()); 9];
        for (ti, tc) in TYPES.iter().enumerate() {
            let mut dot = half;
            if let Some(s) = s_of(tc.n_big) {
                dot = _mm256_add_ps(dot, s);
            }
            if let Some(s) = s_of(tc.n5) {
                dot = _mm256_add_ps(dot, s);
            }
            let pen = _mm256_mul_ps(fu, _mm256_set1_ps(tc.amin));
            // blendv reads only the sign bit: the parity.
            let pen = if tc.parity == 0 {
                _mm256_blendv_ps(zero, pen, par)
            } else {
                _mm256_blendv_ps(pen, zero, par)
            };
            let d = _mm256_add_ps(
                _mm256_sub_ps(
                    _mm256_add_ps(sq, _mm256_set1_ps(tc.norm2)),
                    _mm256_mul_ps(_mm256_set1_ps(2.0), dot),
                ),
                pen,
            );
            cand[ti] = (d, _mm256_set1_epi32((ti + 9 * SI) as i32));
        }
        let m01 = first_min(cand[0], cand[1]);
        let m23 = first_min(cand[2], cand[3]);
        let m45 = first_min(cand[4], cand[5]);
        let m67 = first_min(cand[6], cand[7]);
        let m03 = first_min(m01, m23);
        let m47 = first_min(m45, m67);
        let best = first_min(first_min(m03, m47), cand[8]);
        ShiftPass {
            best,
            order: [s[0], s[1], s[2], s[3], s[7]],
            odd: par,
            ties,
        }
    }

    /// Nearest E8P16 codes of eight groups: [`super::encode16_lanes`] with `L = 8`.
    ///
    /// The reference ranks the magnitudes with 28 pairwise comparisons and sums the top k in
    /// coordinate order through rank masks. Here a sorting network gives the order statistics
    /// s0 ≥ … ≥ s7, and "rank ≤ k" is "u ≥ s_k" whenever s_k > s_(k+1): the same coordinates,
    /// summed in the same order, with about a quarter fewer operations (the search is bound by
    /// the vector ports). Where a boundary the search reads is tied (s_k = s_(k+1) for k < 4, or
    /// s6 = s7) "u ≥ s_k" would pick the wrong set, so a block with any such tie, in any lane,
    /// goes to [`encode16_ranked`], the transcription of the reference. Ties need equal
    /// magnitudes: exact codewords, zero or one-hot rows; never seen on real activations.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn encode16(t: &E8P16Tables, y0: &[__m256; 8]) -> [u16; 8] {
        match encode16_sorted(t, y0) {
            Some(codes) => codes,
            None => encode16_ranked(t, y0),
        }
    }

    /// [`encode16`] by order statistics, or `None` where a lane has a tie it cannot resolve.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn encode16_sorted(t: &E8P16Tables, y0: &[__m256; 8]) -> Option<[u16; 8]> {
        let zero = _mm256_setzero_ps();
        let sign = _mm256_set1_ps(-0.0);
        let p0 = shift_pass::<0>(y0);
        let p1 = shift_pass::<1>(y0);
        let ties = _mm256_or_ps(p0.ties, p1.ties);
        let best_i = first_min(p0.best, p1.best).1;
        let order = [p0.order, p1.order];
        let odd = [p0.odd, p1.odd];
        if _mm256_movemask_ps(ties) != 0 {
            return None;
        }
        let s1 = _mm256_cmpgt_epi32(best_i, _mm256_set1_epi32(8));
        let s1f = _mm256_castsi256_ps(s1);
        let ty = _mm256_sub_epi32(best_i, _mm256_and_si256(s1, _mm256_set1_epi32(9)));
        // Type 8 (3⁄2 everywhere) is the one index past the 8-lane permute; its n5 and parity are
        // 0 like type 0's, so only n_big needs the fix-up.
        let is8 = _mm256_cmpeq_epi32(ty, _mm256_set1_epi32(8));
        let n_big = _mm256_or_si256(
            _mm256_permutevar8x32_epi32(tab(|t| TYPES[t].n_big as i32), ty),
            _mm256_and_si256(is8, _mm256_set1_epi32(TYPES[8].n_big as i32)),
        );
        let n5 = _mm256_permutevar8x32_epi32(tab(|t| TYPES[t].n5 as i32), ty);
        let tpar = _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(
            tab(|t| TYPES[t].parity as i32),
            ty,
        ));
        let mut sk = [zero; 5];
        for (k, v) in sk.iter_mut().enumerate() {
            *v = _mm256_blendv_ps(order[0][k], order[1][k], s1f);
        }
        let umin = sk[4];
        // The threshold of the coordinates whose digit counts: s_(n−1) for n = 1..4, +∞ for
        // n = 0 (none), 0 for n = 8 (all; magnitudes are ≥ +0).
        let mut thr_big = _mm256_set1_ps(f32::INFINITY);
        let mut thr5 = thr_big;
        for (k, &v) in sk[..4].iter().enumerate() {
            let n = _mm256_set1_epi32(k as i32 + 1);
            thr_big = _mm256_blendv_ps(
                thr_big,
                v,
                _mm256_castsi256_ps(_mm256_cmpeq_epi32(n_big, n)),
            );
            if k < 2 {
                thr5 = _mm256_blendv_ps(thr5, v, _mm256_castsi256_ps(_mm256_cmpeq_epi32(n5, n)));
            }
        }
        let thr_big = _mm256_andnot_ps(_mm256_castsi256_ps(is8), thr_big);
        let sh = _mm256_blendv_ps(_mm256_set1_ps(0.25), _mm256_set1_ps(-0.25), s1f);
        // The parity fix flips the smallest coordinate where the sign parity disagrees with the
        // type's (the low bit of tpar; odd's sign bit).
        let flip = _mm256_xor_ps(
            _mm256_blendv_ps(odd[0], odd[1], s1f),
            _mm256_castsi256_ps(_mm256_slli_epi32::<31>(_mm256_castps_si256(tpar))),
        );
        let mut key = _mm256_setzero_si256();
        let mut negs = _mm256_setzero_si256();
        let mut pow = 1;
        for (c, &yc) in y0.iter().enumerate() {
            let y = _mm256_sub_ps(yc, sh);
            let u = _mm256_andnot_ps(sign, y);
            let p = _mm256_set1_epi32(pow);
            let big = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(u, thr_big));
            let five = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(u, thr5));
            key = _mm256_add_epi32(key, _mm256_and_si256(big, p));
            key = _mm256_add_epi32(key, _mm256_and_si256(five, p));
            // Sign bit of the coordinate after the fix: y's, flipped where it is the minimum
            // and the parity is wrong; then moved to bit c.
            // Only the seven stored signs (bits 8–14 of the code) are needed.
            if c < 7 {
                let last = _mm256_and_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(u, umin), flip);
                let neg = _mm256_srai_epi32::<31>(_mm256_castps_si256(_mm256_xor_ps(y, last)));
                negs = _mm256_or_si256(negs, _mm256_and_si256(neg, _mm256_set1_epi32(0x100 << c)));
            }
            pow *= 3;
        }
        let hi = _mm256_or_si256(negs, _mm256_and_si256(s1, _mm256_set1_epi32(0x8000)));
        let mut keys = [0u32; 8];
        let mut his = [0u32; 8];
        _mm256_storeu_si256(keys.as_mut_ptr().cast(), key);
        _mm256_storeu_si256(his.as_mut_ptr().cast(), hi);
        let mut out = [0u16; 8];
        for l in 0..8 {
            // Digits are 0–2, so a key is below 3^8 = key_to_index.len(): no bounds check needed.
            debug_assert!((keys[l] as usize) < t.key_to_index.len());
            let idx = *t.key_to_index.get_unchecked(keys[l] as usize);
            debug_assert!(idx != u16::MAX);
            out[l] = idx | his[l] as u16;
        }
        Some(out)
    }

    /// [`encode16`] by ranks, the transcription of [`super::encode16_lanes`]: exact with ties.
    ///
    /// The lanes' integer state (ranks, sign bits) lives in 32-bit vectors beside the floats, so
    /// the whole search, the final key and the sign fix run without leaving the registers; only
    /// the key → pattern index lookup is eight scalar loads (a gather is no faster here).
    #[inline(never)]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn encode16_ranked(t: &E8P16Tables, y0: &[__m256; 8]) -> [u16; 8] {
        let zero = _mm256_setzero_ps();
        let sign = _mm256_set1_ps(-0.0);
        let mut best = _mm256_set1_ps(f32::INFINITY);
        // Index of the best (shift, type) pair: type + 9 · shift.
        let mut best_i = _mm256_setzero_si256();
        let mut ranks = [[_mm256_setzero_si256(); 8]; 2];
        let mut negbits = [_mm256_setzero_si256(); 2];
        // All-ones in lanes whose count of negative coordinates is odd.
        let mut odd = [_mm256_setzero_si256(); 2];
        for (si, shift) in [0.25f32, -0.25].into_iter().enumerate() {
            let sh = _mm256_set1_ps(shift);
            let mut u = [zero; 8];
            let mut nb = _mm256_setzero_si256();
            let mut od = _mm256_setzero_si256();
            for (c, &yc) in y0.iter().enumerate() {
                let y = _mm256_sub_ps(yc, sh);
                u[c] = _mm256_andnot_ps(sign, y);
                let neg = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(y, zero));
                nb = _mm256_or_si256(nb, _mm256_and_si256(neg, _mm256_set1_epi32(bit(c))));
                od = _mm256_xor_si256(od, neg);
            }
            // rank[c] starts at c (every earlier coordinate counted as before c); each pair then
            // moves one count when the later coordinate is strictly larger: the same counts as the
            // reference's (ties: the lower index first).
            let r = &mut ranks[si];
            for (c, rc) in r.iter_mut().enumerate() {
                *rc = _mm256_set1_epi32(c as i32);
            }
            for i in 0..8 {
                for j in (i + 1)..8 {
                    let m = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(u[j], u[i]));
                    r[i] = _mm256_sub_epi32(r[i], m);
                    r[j] = _mm256_add_epi32(r[j], m);
                }
            }
            // top[k]: the reference's sum, in coordinate order, of the magnitudes of rank ≤ k.
            // top[0] has one nonzero term, so it is the maximum exactly; the reference's leading
            // 0.0 + v is exact, so each sum starts from its first term.
            let mut top0 = u[0];
            let mut top = [zero; 3];
            let mut top4 = u[0];
            let mut sq = _mm256_mul_ps(u[0], u[0]);
            let mut umin = u[0];
            for c in 0..8 {
                let v = u[c];
                for (k, tk) in top.iter_mut().enumerate() {
                    let m = _mm256_cmpgt_epi32(_mm256_set1_epi32(k as i32 + 2), r[c]);
                    let term = _mm256_and_ps(_mm256_castsi256_ps(m), v);
                    *tk = if c == 0 {
                        term
                    } else {
                        _mm256_add_ps(*tk, term)
                    };
                }
                if c > 0 {
                    top0 = _mm256_max_ps(top0, v);
                    top4 = _mm256_add_ps(top4, v);
                    sq = _mm256_add_ps(sq, _mm256_mul_ps(v, v));
                    umin = _mm256_min_ps(v, umin);
                }
            }
            let s_of = |k: u32| -> Option<__m256> {
                match k {
                    0 => None,
                    1 => Some(top0),
                    8 => Some(top4),
                    k => Some(top[k as usize - 2]),
                }
            };
            let half = _mm256_mul_ps(_mm256_set1_ps(0.5), top4);
            // mismatch · 4 · umin · amin, with mismatch 1 where the parity is wrong: 4 · umin is
            // exact, then one rounding by amin; where the parity is right the term is +0.0.
            let fu = _mm256_mul_ps(_mm256_set1_ps(4.0), umin);
            let oddf = _mm256_castsi256_ps(od);
            for (ti, tc) in TYPES.iter().enumerate() {
                let mut dot = half;
                if let Some(s) = s_of(tc.n_big) {
                    dot = _mm256_add_ps(dot, s);
                }
                if let Some(s) = s_of(tc.n5) {
                    dot = _mm256_add_ps(dot, s);
                }
                let pen = _mm256_mul_ps(fu, _mm256_set1_ps(tc.amin));
                let pen = if tc.parity == 0 {
                    _mm256_and_ps(oddf, pen)
                } else {
                    _mm256_andnot_ps(oddf, pen)
                };
                let d = _mm256_add_ps(
                    _mm256_sub_ps(
                        _mm256_add_ps(sq, _mm256_set1_ps(tc.norm2)),
                        _mm256_mul_ps(_mm256_set1_ps(2.0), dot),
                    ),
                    pen,
                );
                let lt = _mm256_cmp_ps::<_CMP_LT_OQ>(d, best);
                best = _mm256_min_ps(d, best);
                best_i = _mm256_blendv_epi8(
                    best_i,
                    _mm256_set1_epi32((ti + 9 * si) as i32),
                    _mm256_castps_si256(lt),
                );
            }
            negbits[si] = nb;
            odd[si] = od;
        }
        // Finalise all eight lanes at once: the chosen shift's ranks give the arrangement key and
        // the smallest coordinate, as in the reference's per-lane loop.
        let s1 = _mm256_cmpgt_epi32(best_i, _mm256_set1_epi32(8));
        let ty = _mm256_sub_epi32(best_i, _mm256_and_si256(s1, _mm256_set1_epi32(9)));
        // Type 8 (3⁄2 everywhere) is the one index past the 8-lane permute; its n5 and parity are
        // 0 like type 0's, so only n_big needs the fix-up.
        let is8 = _mm256_cmpeq_epi32(ty, _mm256_set1_epi32(8));
        let n_big = _mm256_or_si256(
            _mm256_permutevar8x32_epi32(tab(|t| TYPES[t].n_big as i32), ty),
            _mm256_and_si256(is8, _mm256_set1_epi32(TYPES[8].n_big as i32)),
        );
        let n5 = _mm256_permutevar8x32_epi32(tab(|t| TYPES[t].n5 as i32), ty);
        let tpar = _mm256_permutevar8x32_epi32(tab(|t| -(TYPES[t].parity as i32)), ty);
        let mut key = _mm256_setzero_si256();
        let mut smallest = _mm256_setzero_si256();
        let mut pow = 1;
        for (c, (&r0, &r1)) in ranks[0].iter().zip(&ranks[1]).enumerate() {
            let r = _mm256_blendv_epi8(r0, r1, s1);
            let p = _mm256_set1_epi32(pow);
            key = _mm256_add_epi32(key, _mm256_and_si256(_mm256_cmpgt_epi32(n_big, r), p));
            key = _mm256_add_epi32(key, _mm256_and_si256(_mm256_cmpgt_epi32(n5, r), p));
            let last = _mm256_cmpeq_epi32(r, _mm256_set1_epi32(7));
            smallest = _mm256_or_si256(smallest, _mm256_and_si256(last, _mm256_set1_epi32(bit(c))));
            pow *= 3;
        }
        let negs = _mm256_blendv_epi8(negbits[0], negbits[1], s1);
        let flip = _mm256_xor_si256(_mm256_blendv_epi8(odd[0], odd[1], s1), tpar);
        let negs = _mm256_xor_si256(negs, _mm256_and_si256(flip, smallest));
        let hi = _mm256_or_si256(
            _mm256_slli_epi32::<8>(_mm256_and_si256(negs, _mm256_set1_epi32(0x7F))),
            _mm256_and_si256(s1, _mm256_set1_epi32(0x8000)),
        );
        let mut keys = [0u32; 8];
        let mut his = [0u32; 8];
        _mm256_storeu_si256(keys.as_mut_ptr().cast(), key);
        _mm256_storeu_si256(his.as_mut_ptr().cast(), hi);
        std::array::from_fn(|l| {
            let idx = t.key_to_index[keys[l] as usize];
            debug_assert!(idx != u16::MAX);
            idx | his[l] as u16
        })
    }

    /// Nearest E8P8 codes of eight groups: [`super::encode8_lanes`] with `L = 8`.
    ///
    /// Per shift only what decides between the shifts is computed: the distance (same terms,
    /// same order) and the minimum magnitude. The signs and the coordinate the parity fix flips
    /// (the reference's first strict minimum: the lowest coordinate equal to the minimum) are
    /// found once, for the chosen shift.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn encode8(y0: &[__m256; 8]) -> [u8; 8] {
        let zero = _mm256_setzero_ps();
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5);
        let mut best = zero;
        let mut umins = [zero; 2];
        let mut pars = [zero; 2];
        let mut s1 = zero;
        for (si, shift) in [0.25f32, -0.25].into_iter().enumerate() {
            let sh = _mm256_set1_ps(shift);
            let mut par = zero;
            let mut d = zero;
            let mut umin = zero;
            for (c, &yc) in y0.iter().enumerate() {
                let y = _mm256_sub_ps(yc, sh);
                let u = _mm256_andnot_ps(sign, y);
                // Sign bit = `y < 0.0` (y is never NaN or −0, see `encode16`).
                par = _mm256_xor_ps(par, y);
                let e = _mm256_sub_ps(u, half);
                let e2 = _mm256_mul_ps(e, e);
                d = if c == 0 { e2 } else { _mm256_add_ps(d, e2) };
                umin = if c == 0 { u } else { _mm256_min_ps(u, umin) };
            }
            // mismatch · 2 · umin: exact, and +0.0 where the parity is right.
            let dist = _mm256_add_ps(d, _mm256_blendv_ps(zero, _mm256_add_ps(umin, umin), par));
            if si == 0 {
                best = dist;
            } else {
                s1 = _mm256_cmp_ps::<_CMP_LT_OQ>(dist, best);
            }
            umins[si] = umin;
            pars[si] = par;
        }
        let sh = _mm256_blendv_ps(_mm256_set1_ps(0.25), _mm256_set1_ps(-0.25), s1);
        let umin = _mm256_blendv_ps(umins[0], umins[1], s1);
        let mut negs = _mm256_setzero_si256();
        let mut at_min = _mm256_setzero_si256();
        for (c, &yc) in y0.iter().enumerate() {
            let y = _mm256_sub_ps(yc, sh);
            let u = _mm256_andnot_ps(sign, y);
            let b = _mm256_set1_epi32(bit(c));
            let m = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_EQ_OQ>(u, umin));
            at_min = _mm256_or_si256(at_min, _mm256_and_si256(m, b));
            if c < 7 {
                let neg = _mm256_srai_epi32::<31>(_mm256_castps_si256(y));
                negs = _mm256_or_si256(negs, _mm256_and_si256(neg, b));
            }
        }
        // Lowest set bit: the first coordinate at the minimum; flipped where the parity is odd.
        let first = _mm256_and_si256(at_min, _mm256_sub_epi32(_mm256_setzero_si256(), at_min));
        let odd =
            _mm256_srai_epi32::<31>(_mm256_castps_si256(_mm256_blendv_ps(pars[0], pars[1], s1)));
        let code = _mm256_or_si256(
            _mm256_and_si256(
                _mm256_xor_si256(negs, _mm256_and_si256(odd, first)),
                _mm256_set1_epi32(0x7F),
            ),
            _mm256_and_si256(_mm256_castps_si256(s1), _mm256_set1_epi32(0x80)),
        );
        // Lanes to bytes: 32 → 16 bits within each half, 16 → 8, then one dword per half.
        let w = _mm256_packus_epi32(code, code);
        let b = _mm256_packus_epi16(w, w);
        let lo = _mm256_extract_epi32::<0>(b) as u32 as u64;
        let hi = _mm256_extract_epi32::<4>(b) as u32 as u64;
        (lo | hi << 32).to_le_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e8::is_e8_point;
    use proptest::prelude::*;

    fn d2(a: &[f32; 8], b: &[f32; 8]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
    }

    #[test]
    fn codebook_is_65536_distinct_points_of_shifted_e8() {
        let mut seen = std::collections::HashSet::new();
        for code in 0..=u16::MAX {
            let p = decode16(code);
            let shift = if code & 0x8000 != 0 { -0.25 } else { 0.25 };
            let base: [f32; 8] = std::array::from_fn(|c| p[c] - shift);
            // Every codeword minus its shift is a point of D8 + ½ ⊂ E8.
            assert!(is_e8_point(&base), "{p:?}");
            assert!(base.iter().all(|v| (v - v.floor() - 0.5).abs() < 1e-6));
            let key: Vec<i32> = p.iter().map(|v| (v * 4.0) as i32).collect();
            assert!(seen.insert(key));
        }
        assert_eq!(seen.len(), 65536);
        let cb8: std::collections::HashSet<Vec<i32>> = (0..=255u8)
            .map(|c| decode8(c).iter().map(|v| (v * 4.0) as i32).collect())
            .collect();
        assert_eq!(cb8.len(), 256);
    }

    #[test]
    fn decode_encode_round_trip_every_code() {
        for code in 0..=u16::MAX {
            let p = decode16(code);
            assert_eq!(encode16(&p), code, "{p:?}");
        }
        for code in 0..=255u8 {
            assert_eq!(encode8(&decode8(code)), code);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn encode16_is_nearest(v in proptest::collection::vec(-3.5f32..3.5, 8)) {
            let y: [f32; 8] = v.try_into().unwrap();
            let code = encode16(&y);
            let d = d2(&y, &decode16(code));
            let best = (0..=u16::MAX).map(|c| d2(&y, &decode16(c))).fold(f32::INFINITY, f32::min);
            prop_assert!(d <= best + 1e-4, "got {d}, brute force {best}");
        }

        #[test]
        fn encode8_is_nearest(v in proptest::collection::vec(-2.0f32..2.0, 8)) {
            let y: [f32; 8] = v.try_into().unwrap();
            let d = d2(&y, &decode8(encode8(&y)));
            let best = (0..=255u8).map(|c| d2(&y, &decode8(c))).fold(f32::INFINITY, f32::min);
            prop_assert!(d <= best + 1e-5, "got {d}, brute force {best}");
        }

        #[test]
        fn lanes_equal_scalar(v in proptest::collection::vec(-4.0f32..4.0, 64)) {
            let mut soa = [[0f32; 8]; 8];
            for l in 0..8 { for c in 0..8 { soa[c][l] = v[l * 8 + c]; } }
            let mut c16 = [0u16; 8];
            let mut c8 = [0u8; 8];
            encode16_lanes::<8>(&soa, &mut c16);
            encode8_lanes::<8>(&soa, &mut c8);
            for l in 0..8 {
                let g: [f32; 8] = v[l * 8..l * 8 + 8].try_into().unwrap();
                prop_assert_eq!(c16[l], encode16(&g));
                prop_assert_eq!(c8[l], encode8(&g));
            }
        }

        #[test]
        fn avx2_equals_scalar(
            v in proptest::collection::vec(-4.0f32..4.0, 64),
            snap in proptest::collection::vec(any::<bool>(), 64),
            codes in proptest::collection::vec(any::<u16>(), 8),
        ) {
            // Half the coordinates snapped to quarter multiples, so magnitudes tie often and the
            // tie rules of the ranks are exercised, not only distinct values.
            let g: Vec<f32> = v.iter().zip(&snap).map(|(&x, &s)| if s { (x * 4.0).round() / 4.0 } else { x }).collect();
            check_avx2(&g)?;
            // Exact codewords, the most tied inputs there are.
            let cw: Vec<f32> = codes.iter().flat_map(|&c| decode16(c)).collect();
            check_avx2(&cw)?;
            // Distinct magnitudes: the order-statistics path must take them (it is the fast one).
            let took = check_avx2(&v)?;
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                let mut u: Vec<f32> = v.iter().flat_map(|&x| [(x - 0.25).abs(), (x + 0.25).abs()]).collect();
                u.sort_by(f32::total_cmp);
                if u.windows(2).all(|w| w[0] != w[1]) {
                    prop_assert!(took, "distinct magnitudes fell back to the ranked search");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn avx2_equals_scalar_with_ties_at_each_boundary(
            mags in proptest::collection::vec(0.3f32..2.2, 64),
            at in prop::sample::select(vec![0usize, 1, 2, 3, 6]),
            perm in proptest::collection::vec(any::<u64>(), 8),
            negs in proptest::collection::vec(any::<u8>(), 8),
            shift in proptest::collection::vec(any::<bool>(), 8),
        ) {
            // Each lane: eight magnitudes, sorted, with the (k+1)-th made equal to the k-th (the
            // boundaries the order-statistics search reads), shuffled, signed and shifted so one
            // of the two shifts sees exactly these magnitudes. One boundary for all eight lanes:
            // a tie at any boundary it checks sends the whole block to the ranked search, so
            // mixed boundaries would hide a boundary it fails to check.
            let mut g = vec![0f32; 64];
            for l in 0..8 {
                let mut m: Vec<f32> = mags[l * 8..l * 8 + 8].to_vec();
                m.sort_by(|a, b| b.total_cmp(a));
                m[at + 1] = m[at];
                let mut idx: Vec<usize> = (0..8).collect();
                let mut r = perm[l];
                for i in (1..8).rev() {
                    idx.swap(i, (r % (i as u64 + 1)) as usize);
                    r /= 8;
                }
                let sh = if shift[l] { 0.25 } else { -0.25 };
                // Opposite signs on the tied pair, so the other shift (magnitudes |±v ± ½|) does
                // not tie too: a block whose every lane ties only where the shift under test
                // does is what exposes an unchecked boundary.
                let pa = idx.iter().position(|&i| i == at).unwrap();
                let pb = idx.iter().position(|&i| i == at + 1).unwrap();
                let mut sbits = negs[l] & !(1 << pb);
                sbits |= (((sbits >> pa) & 1) ^ 1) << pb;
                for c in 0..8 {
                    let v = m[idx[c]];
                    g[l * 8 + c] = if (sbits >> c) & 1 == 1 { -v } else { v } + sh;
                }
            }
            check_avx2(&g)?;
        }
    }

    /// The AVX2 kernels on eight groups (`g`: 64 floats, group-major) against the scalar
    /// reference: the dispatching `encode16`, both of its paths on their own, and `encode8`.
    /// Returns whether the order-statistics path took the block (no unresolvable tie).
    fn check_avx2(g: &[f32]) -> Result<bool, TestCaseError> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            use std::arch::x86_64::*;
            let t = tables();
            // SAFETY: AVX2 is present (checked above).
            let (c16, sorted, ranked, c8) = unsafe {
                let rows: [__m256; 8] =
                    std::array::from_fn(|l| _mm256_loadu_ps(g[l * 8..].as_ptr()));
                let soa = avx2::transpose8(&rows);
                (
                    avx2::encode16(t, &soa),
                    avx2::encode16_sorted(t, &soa),
                    avx2::encode16_ranked(t, &soa),
                    avx2::encode8(&soa),
                )
            };
            for l in 0..8 {
                let grp: [f32; 8] = g[l * 8..l * 8 + 8].try_into().unwrap();
                let want = encode16(&grp);
                prop_assert_eq!(c16[l], want, "lane {} of {:?}", l, grp);
                prop_assert_eq!(ranked[l], want, "ranked, lane {} of {:?}", l, grp);
                if let Some(s) = sorted {
                    prop_assert_eq!(s[l], want, "sorted, lane {} of {:?}", l, grp);
                }
                prop_assert_eq!(c8[l], encode8(&grp), "lane {} of {:?}", l, grp);
            }
            return Ok(sorted.is_some());
        }
        Ok(false)
    }

    #[test]
    fn table_decode_equals_decode() {
        let t = tables();
        for code in 0..=u16::MAX {
            assert_eq!(decode16_with(t, code), decode16(code));
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                let mut got = [0f32; 8];
                // SAFETY: AVX2 is present (checked above).
                unsafe {
                    std::arch::x86_64::_mm256_storeu_ps(got.as_mut_ptr(), avx2::decode16(t, code))
                };
                assert_eq!(got, decode16(code));
            }
        }
        for code in 0..=255u8 {
            assert_eq!(decode8_with(t, code), decode8(code));
        }
    }

    #[test]
    fn avx2_equals_scalar_on_a_top_tie() {
        // The two largest magnitudes tie (2.0855 after the +¼ shift) and the best type, (1,1),
        // gives only one of them the 5⁄2: the reference takes the lower index.
        let lane = [
            2.3355403f32,
            2.3355403,
            1.2643219,
            -0.6593215,
            1.1479894,
            -0.63600844,
            -0.48799145,
            0.69615555,
        ];
        let mut g = Vec::new();
        for l in 0..8 {
            let mut v = lane;
            v.rotate_left(l);
            g.extend_from_slice(&v);
        }
        check_avx2(&g).unwrap();
    }

    #[test]
    fn avx2_equals_scalar_on_every_codeword() {
        // Every codeword, eight at a time, and every E8P8 codeword: all ties, all exact.
        for base in (0..=u16::MAX as u32).step_by(8) {
            let g: Vec<f32> = (base..base + 8).flat_map(|c| decode16(c as u16)).collect();
            check_avx2(&g).unwrap();
        }
        let g: Vec<f32> = (0..=255u8).flat_map(decode8).collect();
        for chunk in g.chunks_exact(64) {
            check_avx2(chunk).unwrap();
        }
        check_avx2(&[0.0; 64]).unwrap();
    }
}
