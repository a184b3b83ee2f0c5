//! The vector quantizer: randomized Hadamard rotation, one fp16 scale per vector, E8 codes.
//!
//! A vector of `head_dim` floats is rotated (see [`crate::hadamard`]), divided by its scale
//! s = fp16(rms · SCALE_FACTOR[bits]) and cut into groups of 8, each mapped to the nearest codeword:
//!
//! | bits | stages                              | code bytes per group | bits/dim at head_dim 128 |
//! |------|-------------------------------------|----------------------|--------------------------|
//! | 1    | E8P8                                | 1                    | 1.125                    |
//! | 2    | E8P16                               | 2                    | 2.125                    |
//! | 3    | E8P16, then E8P8 on the residual    | 3                    | 3.125                    |
//! | 4    | E8P16, then E8P16 on the residual   | 4                    | 4.125                    |
//!
//! The residual stage quantizes (z − c₁) / r with a fixed ratio r, so it needs no second scale:
//! decode is s · (c₁ + r·c₂). Per-vector code layout: all first-stage codes (u16 little-endian, or
//! u8 for bits = 1), then all second-stage codes.

use crate::e8p::{decode16_with, decode8_with, encode16_lanes, encode8_lanes, tables, E8P16Tables};
use crate::element::Element;
use crate::error::{NqError, Result};
use crate::hadamard::Hadamard;
use half::f16;

/// Scale of a vector = its RMS after rotation times this factor, per bit width (index = bits).
/// Chosen by a grid search for the least mean squared error on 20000 unit Gaussian vectors of
/// dimension 128 (`python benches/tune_codec.py` reruns it): MSE per dimension 0.339, 0.0901,
/// 0.0307, 0.0081 at 1–4 bits (Shannon's bound at the code rate: 0.25, 0.0625, 0.0156, 0.0039).
pub const SCALE_FACTOR: [f32; 5] = [0.0, 1.575, 0.95, 1.025, 1.1];
/// Residual ratio r of the second stage, per bit width (bits 3 and 4 only), tuned the same way.
pub const RESIDUAL_RATIO: [f32; 5] = [0.0, 0.0, 0.0, 0.475, 0.26];

/// A quantizer for vectors of one head dimension at one bit width.
#[derive(Clone, Debug)]
pub struct E8Codec {
    head_dim: usize,
    bits: u8,
    rot: Hadamard,
    groups: usize,
    scale_factor: f32,
    residual_ratio: f32,
}

/// Codes and scales of `n` vectors, as held in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// The head dimension the vectors had.
    pub head_dim: usize,
    /// The bit width (1–4) of the codes.
    pub bits: u8,
    /// The seed of the rotation.
    pub seed: u64,
    /// How many vectors.
    pub n: usize,
    /// `n × code_bytes_per_vector` bytes of codes.
    pub codes: Vec<u8>,
    /// `n` fp16 scales, as raw bits.
    pub scales: Vec<u16>,
}

const ENCODED_MAGIC: &[u8; 4] = b"NQE8";
const ENCODED_VERSION: u8 = 1;
/// Serialized header: magic, version, bits, 2 reserved bytes, head_dim u32, seed u64, n u64.
pub const ENCODED_HEADER_BYTES: usize = 4 + 1 + 1 + 2 + 4 + 8 + 8;

impl Encoded {
    /// Every byte this encoding holds: codes, scales and its header fields.
    pub fn nbytes(&self) -> usize {
        self.codes.len() + 2 * self.scales.len() + ENCODED_HEADER_BYTES
    }

    /// Serialize: header, scales, codes, then a CRC-32 of everything before it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.nbytes() + 4);
        out.extend_from_slice(ENCODED_MAGIC);
        out.push(ENCODED_VERSION);
        out.push(self.bits);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(self.head_dim as u32).to_le_bytes());
        out.extend_from_slice(&self.seed.to_le_bytes());
        out.extend_from_slice(&(self.n as u64).to_le_bytes());
        for s in &self.scales {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out.extend_from_slice(&self.codes);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parse bytes written by [`Encoded::to_bytes`], checking every field and the checksum before
    /// allocating anything the header claims.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        if b.len() < ENCODED_HEADER_BYTES + 4 {
            return Err(NqError::Corrupt(format!(
                "{} bytes is too short for an E8 encoding (at least {})",
                b.len(),
                ENCODED_HEADER_BYTES + 4
            )));
        }
        if &b[0..4] != ENCODED_MAGIC {
            return Err(NqError::Corrupt(
                "not an E8 encoding (bad magic bytes)".into(),
            ));
        }
        if b[4] > ENCODED_VERSION {
            return Err(NqError::UnsupportedVersion(format!(
                "E8 encoding version {} is newer than this build reads ({ENCODED_VERSION})",
                b[4]
            )));
        }
        if b[4] == 0 {
            return Err(NqError::Corrupt(
                "E8 encoding version 0 does not exist".into(),
            ));
        }
        let bits = b[5];
        let head_dim = u32::from_le_bytes(b[8..12].try_into().unwrap()) as usize;
        let seed = u64::from_le_bytes(b[12..20].try_into().unwrap());
        let n64 = u64::from_le_bytes(b[20..28].try_into().unwrap());
        if !(1..=4).contains(&bits) || head_dim == 0 || head_dim > MAX_HEAD_DIM {
            return Err(NqError::Corrupt(format!(
                "E8 encoding header holds bits={bits}, head_dim={head_dim}"
            )));
        }
        let per_vec = code_bytes_per_vector(head_dim, bits) as u64;
        let expected = n64
            .checked_mul(per_vec + 2)
            .and_then(|p| p.checked_add((ENCODED_HEADER_BYTES + 4) as u64));
        if expected != Some(b.len() as u64) {
            return Err(NqError::Corrupt(format!(
                "E8 encoding claims {n64} vectors, which does not match its length of {} bytes",
                b.len()
            )));
        }
        let body = &b[..b.len() - 4];
        let crc = u32::from_le_bytes(b[b.len() - 4..].try_into().unwrap());
        if crc32fast::hash(body) != crc {
            return Err(NqError::Corrupt("E8 encoding checksum mismatch".into()));
        }
        let n = n64 as usize;
        let scales_end = ENCODED_HEADER_BYTES + 2 * n;
        let scales = b[ENCODED_HEADER_BYTES..scales_end]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        let codes = b[scales_end..b.len() - 4].to_vec();
        Ok(Encoded {
            head_dim,
            bits,
            seed,
            n,
            codes,
            scales,
        })
    }
}

/// Largest head dimension accepted (far above any model's).
pub const MAX_HEAD_DIM: usize = 1 << 16;

/// Code bytes per vector for a head dimension and bit width.
pub fn code_bytes_per_vector(head_dim: usize, bits: u8) -> usize {
    head_dim.div_ceil(8) * bits as usize
}

impl E8Codec {
    /// Build a codec with the tuned scale factor and residual ratio.
    ///
    /// Args:
    ///     head_dim: vector length, 1..=65536 (any value; not a multiple of 8 is zero-padded).
    ///     bits: 1, 2, 3 or 4 bits per dimension for the codes (the scale adds 16/head_dim).
    ///     seed: seed of the rotation's random signs.
    /// Returns:
    ///     the codec, or `InvalidArgument` for an unsupported head_dim or bit width.
    pub fn new(head_dim: usize, bits: u8, seed: u64) -> Result<Self> {
        let b = bits as usize;
        if !(1..=4).contains(&bits) {
            return Err(NqError::InvalidArgument(format!(
                "bits must be 1, 2, 3 or 4, got {bits}"
            )));
        }
        Self::with_factors(head_dim, bits, seed, SCALE_FACTOR[b], RESIDUAL_RATIO[b])
    }

    /// Build a codec with explicit scale factor and residual ratio (for tuning them).
    pub fn with_factors(
        head_dim: usize,
        bits: u8,
        seed: u64,
        scale_factor: f32,
        residual_ratio: f32,
    ) -> Result<Self> {
        if head_dim == 0 || head_dim > MAX_HEAD_DIM {
            return Err(NqError::InvalidArgument(format!(
                "head_dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}"
            )));
        }
        if !(1..=4).contains(&bits) {
            return Err(NqError::InvalidArgument(format!(
                "bits must be 1, 2, 3 or 4, got {bits}"
            )));
        }
        if !(scale_factor.is_finite() && scale_factor > 0.0) {
            return Err(NqError::InvalidArgument(format!(
                "scale_factor must be positive, got {scale_factor}"
            )));
        }
        if bits >= 3 && !(residual_ratio.is_finite() && residual_ratio > 0.0) {
            return Err(NqError::InvalidArgument(format!(
                "residual_ratio must be positive, got {residual_ratio}"
            )));
        }
        let rot = Hadamard::new(head_dim, seed);
        let groups = rot.padded_dim() / 8;
        Ok(E8Codec {
            head_dim,
            bits,
            rot,
            groups,
            scale_factor,
            residual_ratio,
        })
    }

    /// The head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The bit width of the codes.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// The seed of the rotation.
    pub fn seed(&self) -> u64 {
        self.rot.seed()
    }

    /// The rotation.
    pub fn rotation(&self) -> &Hadamard {
        &self.rot
    }

    /// The scale factor (scale = RMS · factor).
    pub fn scale_factor(&self) -> f32 {
        self.scale_factor
    }

    /// The residual ratio of the second stage (0 for one-stage codes).
    pub fn residual_ratio(&self) -> f32 {
        if self.bits >= 3 {
            self.residual_ratio
        } else {
            0.0
        }
    }

    /// Code bytes per vector.
    pub fn code_bytes_per_vector(&self) -> usize {
        code_bytes_per_vector(self.head_dim, self.bits)
    }

    /// Exact bits per dimension held: codes plus the fp16 scale.
    pub fn bits_per_dim(&self) -> f64 {
        (8 * self.code_bytes_per_vector() + 16) as f64 / self.head_dim as f64
    }

    fn check_rows(&self, len: usize, what: &str) -> Result<usize> {
        if len == 0 {
            return Err(NqError::InvalidArgument(format!("{what} is empty")));
        }
        if len % self.head_dim != 0 {
            return Err(NqError::InvalidArgument(format!(
                "{what} has {len} values, not a multiple of head_dim {}",
                self.head_dim
            )));
        }
        Ok(len / self.head_dim)
    }

    /// The fp16 scale of a rotated vector from its [`sum_sq`], and the reciprocal the vector is
    /// multiplied by. Every build computes both exactly so.
    ///
    /// Args:
    ///     sum: `sum_sq` of the `padded_dim` rotated values.
    /// Returns:
    ///     (scale bits, 1 / scale or 0 for a zero scale), or `InvalidData` when the scale overflows.
    #[inline(always)]
    pub(crate) fn scale_and_inverse(&self, sum: f32) -> Result<(u16, f32)> {
        self.scale_with(sum, |v| {
            let h = f16::from_f32(v);
            (h.to_bits(), h.to_f32())
        })
    }

    /// [`E8Codec::scale_and_inverse`] with the f32 → fp16 rounding (bits and value) passed in, so
    /// the SIMD loop can use F16C's: the same round-to-nearest-even, without `half`'s feature
    /// check and call per vector.
    #[inline(always)]
    pub(crate) fn scale_with(
        &self,
        sum: f32,
        to_f16: impl Fn(f32) -> (u16, f32),
    ) -> Result<(u16, f32)> {
        let rms = (sum / self.rot.padded_dim() as f32).sqrt();
        let (scale, s) = to_f16(rms * self.scale_factor);
        if !s.is_finite() {
            return Err(NqError::InvalidData(format!(
                "a vector's RMS ({rms:e}) is beyond what an fp16 scale can hold"
            )));
        }
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        Ok((scale, inv))
    }

    /// 1 / the residual ratio: the second stage's input is (z − c₁) times this.
    #[inline(always)]
    pub(crate) fn inv_residual_ratio(&self) -> f32 {
        1.0 / self.residual_ratio
    }

    /// Encode one vector: returns its fp16 scale bits. `y` is scratch of `padded_dim` floats.
    #[inline(always)]
    pub(crate) fn encode_vector(&self, x: &[f32], y: &mut [f32], codes: &mut [u8]) -> Result<u16> {
        self.rot.forward_portable(x, y);
        let (scale, inv) = self.scale_and_inverse(sum_sq(y))?;
        for v in y.iter_mut() {
            *v *= inv;
        }
        let g = self.groups;
        match self.bits {
            1 => encode_groups8(y, &mut codes[..g]),
            2 => encode_groups16(y, &mut codes[..2 * g]),
            3 | 4 => {
                encode_groups16(y, &mut codes[..2 * g]);
                let inv_r = self.inv_residual_ratio();
                let t = tables();
                for (gi, chunk) in y.chunks_exact_mut(8).enumerate() {
                    let c =
                        decode16_with(t, u16::from_le_bytes([codes[2 * gi], codes[2 * gi + 1]]));
                    for k in 0..8 {
                        chunk[k] = (chunk[k] - c[k]) * inv_r;
                    }
                }
                if self.bits == 3 {
                    encode_groups8(y, &mut codes[2 * g..3 * g]);
                } else {
                    encode_groups16(y, &mut codes[2 * g..4 * g]);
                }
            }
            _ => unreachable!(),
        }
        Ok(scale)
    }

    /// Decode one vector into the rotated domain (before the inverse rotation), scaled.
    #[inline(always)]
    pub(crate) fn decode_vector_rotated(
        &self,
        t: &E8P16Tables,
        codes: &[u8],
        scale: u16,
        y: &mut [f32],
    ) {
        let s = f16::from_bits(scale).to_f32();
        let g = self.groups;
        match self.bits {
            1 => {
                for gi in 0..g {
                    let c = decode8_with(t, codes[gi]);
                    for k in 0..8 {
                        y[gi * 8 + k] = s * c[k];
                    }
                }
            }
            2 => {
                for gi in 0..g {
                    let c =
                        decode16_with(t, u16::from_le_bytes([codes[2 * gi], codes[2 * gi + 1]]));
                    for k in 0..8 {
                        y[gi * 8 + k] = s * c[k];
                    }
                }
            }
            _ => {
                let r = self.residual_ratio;
                for gi in 0..g {
                    let c1 =
                        decode16_with(t, u16::from_le_bytes([codes[2 * gi], codes[2 * gi + 1]]));
                    let c2 = if self.bits == 3 {
                        decode8_with(t, codes[2 * g + gi])
                    } else {
                        decode16_with(
                            t,
                            u16::from_le_bytes([codes[2 * g + 2 * gi], codes[2 * g + 2 * gi + 1]]),
                        )
                    };
                    for k in 0..8 {
                        y[gi * 8 + k] = s * (c1[k] + r * c2[k]);
                    }
                }
            }
        }
    }

    /// Encode `n` vectors on the calling thread (SIMD where the CPU has it).
    ///
    /// Args:
    ///     x: `n × head_dim` finite values (f32, f16 or bf16), row-major.
    ///     codes: `n × code_bytes_per_vector()` bytes, overwritten.
    ///     scales: `n` fp16 scales (raw bits), overwritten.
    /// Returns:
    ///     `InvalidData` naming the first vector holding NaN or infinity.
    pub fn encode_into<T: Element>(
        &self,
        x: &[T],
        codes: &mut [u8],
        scales: &mut [u16],
    ) -> Result<()> {
        let n = self.check_rows(x.len(), "input")?;
        if codes.len() != n * self.code_bytes_per_vector() || scales.len() != n {
            return Err(NqError::InvalidArgument(
                "output buffers have the wrong size".into(),
            ));
        }
        crate::simd::encode_rows(self, x, codes, scales)
    }

    /// Decode `n` vectors on the calling thread.
    ///
    /// Args:
    ///     codes: `n × code_bytes_per_vector()` bytes.
    ///     scales: `n` fp16 scales.
    ///     out: `n × head_dim` values (f32, f16 or bf16), overwritten.
    pub fn decode_into<T: Element>(
        &self,
        codes: &[u8],
        scales: &[u16],
        out: &mut [T],
    ) -> Result<()> {
        let n = scales.len();
        if codes.len() != n * self.code_bytes_per_vector() || out.len() != n * self.head_dim {
            return Err(NqError::InvalidArgument(format!(
                "{} code bytes and {} output values do not fit {n} vectors of head_dim {}",
                codes.len(),
                out.len(),
                self.head_dim
            )));
        }
        crate::simd::decode_rows(self, codes, scales, out);
        Ok(())
    }

    /// Decode `n` vectors into the rotated domain (scaled codewords, no inverse rotation), as a
    /// fused attention kernel sees them.
    pub fn decode_rotated_into(&self, codes: &[u8], scales: &[u16], out: &mut [f32]) -> Result<()> {
        let n = scales.len();
        let p = self.rot.padded_dim();
        if codes.len() != n * self.code_bytes_per_vector() || out.len() != n * p {
            return Err(NqError::InvalidArgument(
                "buffers do not fit the vectors".into(),
            ));
        }
        let cb = self.code_bytes_per_vector();
        let t = tables();
        for i in 0..n {
            self.decode_vector_rotated(
                t,
                &codes[i * cb..(i + 1) * cb],
                scales[i],
                &mut out[i * p..(i + 1) * p],
            );
        }
        Ok(())
    }

    /// Encode `n` vectors, in parallel over chunks of rows when there are many.
    pub fn encode<T: Element>(&self, x: &[T]) -> Result<Encoded> {
        use rayon::prelude::*;
        let n = self.check_rows(x.len(), "input")?;
        let cb = self.code_bytes_per_vector();
        let mut codes = vec![0u8; n * cb];
        let mut scales = vec![0u16; n];
        let rows = PARALLEL_ROWS;
        if n <= rows {
            self.encode_into(x, &mut codes, &mut scales)?;
        } else {
            x.par_chunks(rows * self.head_dim)
                .zip(codes.par_chunks_mut(rows * cb))
                .zip(scales.par_chunks_mut(rows))
                .enumerate()
                .try_for_each(|(k, ((xc, cc), sc))| {
                    crate::simd::encode_rows_at(self, xc, cc, sc, k * rows)
                })?;
        }
        Ok(Encoded {
            head_dim: self.head_dim,
            bits: self.bits,
            seed: self.seed(),
            n,
            codes,
            scales,
        })
    }

    /// Decode an [`Encoded`] made by a codec with the same settings.
    pub fn decode(&self, enc: &Encoded) -> Result<Vec<f32>> {
        let mut out = vec![0f32; enc.n * self.head_dim];
        self.decode_par(enc, &mut out)?;
        Ok(out)
    }

    /// Decode an [`Encoded`] into `out` (`n × head_dim` values), in parallel over chunks of rows.
    pub fn decode_par<T: Element>(&self, enc: &Encoded, out: &mut [T]) -> Result<()> {
        use rayon::prelude::*;
        if enc.head_dim != self.head_dim || enc.bits != self.bits || enc.seed != self.seed() {
            return Err(NqError::InvalidArgument(format!(
                "encoding has head_dim={}, bits={}, seed={} but the codec has head_dim={}, bits={}, seed={}",
                enc.head_dim, enc.bits, enc.seed, self.head_dim, self.bits, self.seed()
            )));
        }
        let cb = self.code_bytes_per_vector();
        if enc.codes.len() != enc.n * cb || enc.scales.len() != enc.n {
            return Err(NqError::Corrupt(
                "encoding's buffers do not match its vector count".into(),
            ));
        }
        if out.len() != enc.n * self.head_dim {
            return Err(NqError::InvalidArgument(
                "output buffer has the wrong size".into(),
            ));
        }
        let rows = PARALLEL_ROWS;
        out.par_chunks_mut(rows * self.head_dim)
            .zip(enc.codes.par_chunks(rows * cb))
            .zip(enc.scales.par_chunks(rows))
            .for_each(|((oc, cc), sc)| crate::simd::decode_rows(self, cc, sc, oc));
        Ok(())
    }
}

/// Rows per parallel task: large enough that rayon's overhead is noise (~1 ms of work).
const PARALLEL_ROWS: usize = 4096;

/// Sum of squares in a fixed order (8 partial sums), so every build computes the same scale.
#[inline(always)]
pub(crate) fn sum_sq(y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for chunk in y.chunks_exact(8) {
        for k in 0..8 {
            acc[k] += chunk[k] * chunk[k];
        }
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// Encode all 8-float groups of `y` with E8P16 into little-endian u16 codes.
#[inline(always)]
fn encode_groups16(y: &[f32], out: &mut [u8]) {
    let g = y.len() / 8;
    let mut start = 0;
    while start < g {
        let lanes = (g - start).min(8);
        let mut soa = [[0f32; 8]; 8];
        for l in 0..lanes {
            for c in 0..8 {
                soa[c][l] = y[(start + l) * 8 + c];
            }
        }
        let mut codes = [0u16; 8];
        encode16_lanes::<8>(&soa, &mut codes);
        for l in 0..lanes {
            let b = codes[l].to_le_bytes();
            out[2 * (start + l)] = b[0];
            out[2 * (start + l) + 1] = b[1];
        }
        start += 8;
    }
}

/// Encode all 8-float groups of `y` with E8P8.
#[inline(always)]
fn encode_groups8(y: &[f32], out: &mut [u8]) {
    let g = y.len() / 8;
    let mut start = 0;
    while start < g {
        let lanes = (g - start).min(8);
        let mut soa = [[0f32; 8]; 8];
        for l in 0..lanes {
            for c in 0..8 {
                soa[c][l] = y[(start + l) * 8 + c];
            }
        }
        let mut codes = [0u8; 8];
        encode8_lanes::<8>(&soa, &mut codes);
        out[start..start + lanes].copy_from_slice(&codes[..lanes]);
        start += 8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e8p::{decode16, decode8, encode16, encode8};
    use proptest::prelude::*;

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        // Box–Muller over splitmix64, enough for tests.
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u1, u2) = (next().max(1e-300), next());
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect()
    }

    fn mse(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            / a.len() as f64
    }

    #[test]
    fn distortion_falls_with_bits() {
        let x = gaussian(2000 * 128, 1);
        let mut prev = f64::INFINITY;
        for bits in 1..=4u8 {
            let c = E8Codec::new(128, bits, 0).unwrap();
            let y = c.decode(&c.encode(&x).unwrap()).unwrap();
            let e = mse(&x, &y);
            // Shannon's bound for a unit Gaussian at the code rate: 2^(-2·bits).
            let bound = 2f64.powi(-2 * bits as i32);
            assert!(
                e > bound,
                "bits={bits}: mse {e} below Shannon's bound {bound}?"
            );
            assert!(
                e < prev * 0.5,
                "bits={bits}: mse {e} did not halve from {prev}"
            );
            prev = e;
        }
    }

    #[test]
    fn codes_match_scalar_reference() {
        for &(dim, bits) in &[(128usize, 2u8), (64, 1), (80, 3), (96, 4), (100, 2)] {
            let c = E8Codec::new(dim, bits, 5).unwrap();
            let x = gaussian(37 * dim, dim as u64);
            let enc = c.encode(&x).unwrap();
            let cb = c.code_bytes_per_vector();
            let p = c.rotation().padded_dim();
            let g = p / 8;
            for i in 0..37 {
                let mut y = vec![0f32; p];
                c.rotation().forward(&x[i * dim..(i + 1) * dim], &mut y);
                let s = half::f16::from_bits(enc.scales[i]).to_f32();
                let expect_s =
                    half::f16::from_f32((sum_sq(&y) / p as f32).sqrt() * c.scale_factor());
                assert_eq!(enc.scales[i], expect_s.to_bits());
                let z: Vec<f32> = y.iter().map(|v| v * (1.0 / s)).collect();
                let codes = &enc.codes[i * cb..(i + 1) * cb];
                for gi in 0..g {
                    let grp: [f32; 8] = z[gi * 8..gi * 8 + 8].try_into().unwrap();
                    if bits == 1 {
                        assert_eq!(codes[gi], encode8(&grp));
                    } else {
                        let code = u16::from_le_bytes([codes[2 * gi], codes[2 * gi + 1]]);
                        assert_eq!(code, encode16(&grp));
                    }
                }
            }
        }
    }

    #[test]
    fn simd_equals_portable() {
        for &(dim, bits) in &[(128usize, 2u8), (64, 1), (80, 3), (256, 4), (72, 2)] {
            let c = E8Codec::new(dim, bits, 9).unwrap();
            let n = 301;
            let x = gaussian(n * dim, 3 + dim as u64);
            let cb = c.code_bytes_per_vector();
            let (mut c1, mut s1) = (vec![0u8; n * cb], vec![0u16; n]);
            let (mut c2, mut s2) = (vec![0u8; n * cb], vec![0u16; n]);
            crate::simd::encode_rows(&c, &x[..], &mut c1, &mut s1).unwrap();
            crate::simd::encode_rows_portable(&c, &x, &mut c2, &mut s2).unwrap();
            assert_eq!(c1, c2);
            assert_eq!(s1, s2);
            let (mut o1, mut o2) = (vec![0f32; n * dim], vec![0f32; n * dim]);
            crate::simd::decode_rows(&c, &c1, &s1, &mut o1);
            crate::simd::decode_rows_portable(&c, &c1, &s1, &mut o2);
            assert_eq!(o1, o2);
        }
    }

    /// The codec from the scalar reference pieces alone, written as `encode_vector` was before the
    /// SIMD kernels: `fwht_inplace` pass by pass, `sum_sq`, `half`'s fp16 rounding, `encode16` /
    /// `encode8` / `decode16` one group at a time.
    fn reference_encode(c: &E8Codec, x: &[f32]) -> (Vec<u8>, Vec<u16>) {
        let (d, p) = (c.head_dim(), c.rotation().padded_dim());
        let g = p / 8;
        let mut codes = Vec::new();
        let mut scales = Vec::new();
        for xr in x.chunks_exact(d) {
            let mut y = vec![0f32; p];
            for i in 0..d {
                y[i] = xr[i] * c.rotation().signs()[i];
            }
            for pass in c.rotation().passes() {
                for &(off, n) in pass {
                    crate::hadamard::fwht_inplace(&mut y[off..off + n]);
                }
            }
            let rms = (sum_sq(&y) / p as f32).sqrt();
            let scale = half::f16::from_f32(rms * c.scale_factor());
            let s = scale.to_f32();
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            let z: Vec<f32> = y.iter().map(|v| v * inv).collect();
            let grp =
                |v: &[f32], gi: usize| -> [f32; 8] { v[gi * 8..gi * 8 + 8].try_into().unwrap() };
            let mut first = Vec::new();
            let mut second = Vec::new();
            let mut resid = vec![0f32; p];
            for gi in 0..g {
                if c.bits() == 1 {
                    first.push(encode8(&grp(&z, gi)));
                    continue;
                }
                let code = encode16(&grp(&z, gi));
                first.extend_from_slice(&code.to_le_bytes());
                let cw = decode16(code);
                for k in 0..8 {
                    resid[gi * 8 + k] = (z[gi * 8 + k] - cw[k]) * (1.0 / c.residual_ratio());
                }
            }
            for gi in 0..g {
                match c.bits() {
                    3 => second.push(encode8(&grp(&resid, gi))),
                    4 => second.extend_from_slice(&encode16(&grp(&resid, gi)).to_le_bytes()),
                    _ => {}
                }
            }
            codes.extend(first);
            codes.extend(second);
            scales.push(scale.to_bits());
        }
        (codes, scales)
    }

    /// Decoding from the scalar reference pieces alone.
    fn reference_decode(c: &E8Codec, codes: &[u8], scales: &[u16]) -> Vec<f32> {
        let (d, p) = (c.head_dim(), c.rotation().padded_dim());
        let g = p / 8;
        let cb = c.code_bytes_per_vector();
        let mut out = Vec::new();
        for (cr, &sb) in codes.chunks_exact(cb).zip(scales) {
            let s = half::f16::from_bits(sb).to_f32();
            let r = c.residual_ratio();
            let c16 = |o: usize| decode16(u16::from_le_bytes([cr[o], cr[o + 1]]));
            let mut y = vec![0f32; p];
            for gi in 0..g {
                for k in 0..8 {
                    y[gi * 8 + k] = match c.bits() {
                        1 => s * decode8(cr[gi])[k],
                        2 => s * c16(2 * gi)[k],
                        3 => s * (c16(2 * gi)[k] + r * decode8(cr[2 * g + gi])[k]),
                        _ => s * (c16(2 * gi)[k] + r * c16(2 * g + 2 * gi)[k]),
                    };
                }
            }
            for pass in c.rotation().passes().iter().rev() {
                for &(off, n) in pass {
                    crate::hadamard::fwht_inplace(&mut y[off..off + n]);
                }
            }
            out.extend((0..d).map(|i| y[i] * c.rotation().signs()[i]));
        }
        out
    }

    fn bits_of(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn kernels_equal_reference_codec_bitwise() {
        // Every dispatch path: registers (64, 128), memory (8, 256, 512), two passes (80, 96,
        // 192), padding (1, 3, 100, 72), the last partial block of groups (72, 80, 100).
        let dims = [1usize, 3, 8, 64, 72, 80, 96, 100, 128, 192, 256, 512];
        for (k, &dim) in dims.iter().enumerate() {
            for bits in 1..=4u8 {
                let c = E8Codec::new(dim, bits, 11 + k as u64).unwrap();
                let n = 37;
                let mut x = gaussian(n * dim, 7 * dim as u64 + bits as u64);
                // A zero row and a one-hot row: all magnitudes tie.
                x[..dim].iter_mut().for_each(|v| *v = 0.0);
                x[dim..2 * dim]
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, v)| *v = (i == 0) as u8 as f32);
                let (want_codes, want_scales) = reference_encode(&c, &x);
                let enc = c.encode(&x).unwrap();
                assert_eq!(enc.scales, want_scales, "dim {dim} bits {bits}");
                assert_eq!(enc.codes, want_codes, "dim {dim} bits {bits}");
                let want = reference_decode(&c, &enc.codes, &enc.scales);
                let got = c.decode(&enc).unwrap();
                assert_eq!(bits_of(&got), bits_of(&want), "dim {dim} bits {bits}");
            }
        }
    }

    #[test]
    fn every_element_type_equals_portable() {
        use half::{bf16, f16};
        for &(dim, bits) in &[
            (128usize, 2u8),
            (64, 3),
            (100, 4),
            (80, 1),
            (8, 2),
            (256, 2),
        ] {
            let c = E8Codec::new(dim, bits, 4).unwrap();
            let n = 53;
            let x = gaussian(n * dim, dim as u64);
            let cb = c.code_bytes_per_vector();
            let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let run = |simd: bool| {
                let mut out = Vec::new();
                let (mut codes, mut scales) = (vec![0u8; n * cb], vec![0u16; n]);
                let (mut oh, mut ob) = (vec![f16::ZERO; n * dim], vec![bf16::ZERO; n * dim]);
                if simd {
                    crate::simd::encode_rows(&c, &xh, &mut codes, &mut scales).unwrap();
                    crate::simd::decode_rows(&c, &codes, &scales, &mut oh);
                } else {
                    crate::simd::encode_rows_portable(&c, &xh, &mut codes, &mut scales).unwrap();
                    crate::simd::decode_rows_portable(&c, &codes, &scales, &mut oh);
                }
                out.push((codes.clone(), scales.clone()));
                if simd {
                    crate::simd::encode_rows(&c, &xb, &mut codes, &mut scales).unwrap();
                    crate::simd::decode_rows(&c, &codes, &scales, &mut ob);
                } else {
                    crate::simd::encode_rows_portable(&c, &xb, &mut codes, &mut scales).unwrap();
                    crate::simd::decode_rows_portable(&c, &codes, &scales, &mut ob);
                }
                out.push((codes, scales));
                let oh: Vec<u16> = oh.iter().map(|v| v.to_bits()).collect();
                let ob: Vec<u16> = ob.iter().map(|v| v.to_bits()).collect();
                (out, oh, ob)
            };
            assert!(run(true) == run(false), "dim {dim} bits {bits}");
        }
    }

    #[test]
    fn decode_of_corrupt_scales_equals_portable() {
        // Infinite and NaN scales (corrupt input is decoded, not validated). Finite outputs are
        // bit-identical; a NaN stays a NaN, but not always the same NaN: x86 returns the first
        // operand's payload, and the SIMD butterflies add in the other order (a + b as b + a).
        use half::{bf16, f16};
        for dim in [128usize, 100] {
            let c = E8Codec::new(dim, 2, 1).unwrap();
            let n = 6;
            let enc = c.encode(&gaussian(n * dim, 5)).unwrap();
            let mut scales = enc.scales.clone();
            scales[1] = 0x7C00; // +inf
            scales[2] = 0xFC00; // -inf
            scales[3] = 0x7E01; // NaN
            scales[4] = 0x7BFF; // fp16 max: large but finite outputs
            let (mut a, mut b) = (vec![bf16::ZERO; n * dim], vec![bf16::ZERO; n * dim]);
            crate::simd::decode_rows(&c, &enc.codes, &scales, &mut a);
            crate::simd::decode_rows_portable(&c, &enc.codes, &scales, &mut b);
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                    "{x} {y}"
                );
            }
            let (mut a, mut b) = (vec![f16::ZERO; n * dim], vec![f16::ZERO; n * dim]);
            crate::simd::decode_rows(&c, &enc.codes, &scales, &mut a);
            crate::simd::decode_rows_portable(&c, &enc.codes, &scales, &mut b);
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                    "{x} {y}"
                );
            }
            assert!(a[dim..4 * dim].iter().all(|v| !v.is_finite()));
            assert!(a[4 * dim..5 * dim].iter().any(|v| v.is_finite()));
        }
    }

    #[test]
    fn errors_name_the_row_and_earlier_rows_are_encoded() {
        use half::f16;
        for dim in [128usize, 100, 64] {
            let c = E8Codec::new(dim, 2, 3).unwrap();
            let n = 10;
            let x = gaussian(n * dim, 9);
            let cb = c.code_bytes_per_vector();
            let (want_codes, want_scales) = reference_encode(&c, &x[..5 * dim]);
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut xb = x.clone();
                xb[5 * dim + dim / 2] = bad;
                let (mut codes, mut scales) = (vec![0u8; n * cb], vec![0u16; n]);
                let e = c.encode_into(&xb, &mut codes, &mut scales).unwrap_err();
                assert!(
                    matches!(e, NqError::InvalidData(ref m) if m.contains("vector 5")),
                    "{e}"
                );
                assert_eq!(&codes[..5 * cb], &want_codes[..]);
                assert_eq!(&scales[..5], &want_scales[..]);
                let xh: Vec<f16> = xb.iter().map(|&v| f16::from_f32(v)).collect();
                let e = c.encode_into(&xh, &mut codes, &mut scales).unwrap_err();
                assert!(
                    matches!(e, NqError::InvalidData(ref m) if m.contains("vector 5")),
                    "{e}"
                );
            }
            // Finite but too large for an fp16 scale: the scale error, not the NaN one.
            let mut xb = x.clone();
            xb[3 * dim..4 * dim].iter_mut().for_each(|v| *v *= 1e30);
            let e = c.encode(&xb).unwrap_err();
            assert!(
                matches!(e, NqError::InvalidData(ref m) if m.contains("RMS")),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(E8Codec::new(0, 2, 0).is_err());
        assert!(E8Codec::new(64, 5, 0).is_err());
        let c = E8Codec::new(8, 2, 0).unwrap();
        assert!(matches!(
            c.encode::<f32>(&[]),
            Err(NqError::InvalidArgument(_))
        ));
        assert!(matches!(
            c.encode(&[1.0f32; 7]),
            Err(NqError::InvalidArgument(_))
        ));
        let mut x = vec![1.0f32; 16];
        x[9] = f32::NAN;
        let e = c.encode(&x).unwrap_err();
        assert!(
            matches!(e, NqError::InvalidData(ref m) if m.contains("vector 1")),
            "{e}"
        );
        x[9] = 1e30;
        assert!(matches!(c.encode(&x), Err(NqError::InvalidData(_))));
    }

    #[test]
    fn zero_vectors_decode_to_zero() {
        let c = E8Codec::new(64, 2, 0).unwrap();
        let x = vec![0f32; 128];
        assert_eq!(c.decode(&c.encode(&x).unwrap()).unwrap(), x);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn bytes_round_trip(bits in 1u8..=4, dim in 1usize..200, n in 1usize..6, seed in any::<u64>()) {
            let c = E8Codec::new(dim, bits, seed).unwrap();
            let x = gaussian(n * dim, seed);
            let enc = c.encode(&x).unwrap();
            let b = enc.to_bytes();
            prop_assert_eq!(b.len(), enc.nbytes() + 4);
            let back = Encoded::from_bytes(&b).unwrap();
            prop_assert_eq!(&back, &enc);
            let y = c.decode(&back).unwrap();
            prop_assert_eq!(y.len(), x.len());
            // Decoding the decoded vectors again gives the same codes (they are codewords).
            let enc2 = c.encode(&y).unwrap();
            prop_assert_eq!(c.decode(&enc2).unwrap().len(), y.len());
        }

        #[test]
        fn corrupt_bytes_never_panic(flip in 0usize..10_000, cut in 0usize..10_000) {
            let c = E8Codec::new(64, 2, 1).unwrap();
            let enc = c.encode(&gaussian(3 * 64, 2)).unwrap();
            let mut b = enc.to_bytes();
            let i = flip % b.len();
            b[i] ^= 0x10;
            prop_assert!(Encoded::from_bytes(&b).is_err());
            let b2 = enc.to_bytes();
            let cut = cut % b2.len();
            prop_assert!(Encoded::from_bytes(&b2[..cut]).is_err());
        }
    }
}
