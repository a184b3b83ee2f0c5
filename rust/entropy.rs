//! Entropy coding: block coders (none, zstd, rANS) and the at-rest packer of E8 code streams.
//!
//! **Coders.** A block is coded by one [`Coder`], named by a one-byte tag stored beside it. The
//! rANS coder is written here: order-0 over bytes, a normalised frequency table (8–12 bits of
//! precision, chosen per block) in the block header, four interleaved 32-bit states renormalised
//! 16 bits at a time. Decoding takes
//! the expected output length and checks it against a hard cap and against the most the stored
//! bytes can expand to ([`max_decoded_len`]) before it allocates; corrupt or truncated input is
//! `NqError::Corrupt`, never a panic.
//!
//! **Packer.** [`pack_codes`] turns one stream (the codes and fp16 scales of one (layer, KV head),
//! one row per token) into bytes, losslessly; [`unpack_codes`] inverts it. The layouts measured by
//! `benches/entropy_study.py` on real SmolLM2-135M KV (12 tensors: 4 texts × {k post-RoPE, k
//! pre-RoPE, v}, 30 layers × 3 heads × 2048 tokens × head_dim 64, 1080 streams per bit width) are
//! in [`Layout`]; the default ([`PackOptions::default`]) and the table that chose it are on
//! [`PackOptions`]'s `Default` impl.

use crate::delta;
use crate::error::{NqError, Result};

// =============================================================================================
// Coders
// =============================================================================================

/// How a block of bytes is coded. The discriminant is the tag stored with the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Coder {
    /// Stored as is.
    Raw = 0,
    /// One zstd frame that records its content size.
    Zstd = 1,
    /// Order-0 rANS, this module's format (see [`rans_encode`]).
    Rans = 2,
}

impl Coder {
    /// The one-byte tag stored with a block.
    ///
    /// Returns:
    ///     0 raw, 1 zstd, 2 rANS.
    pub fn tag(self) -> u8 {
        self as u8
    }

    /// The coder of a stored tag.
    ///
    /// Args:
    ///     tag: a byte read from a file or a packed stream.
    /// Returns:
    ///     the coder, or `Corrupt` for an unknown tag.
    pub fn from_tag(tag: u8) -> Result<Coder> {
        match tag {
            0 => Ok(Coder::Raw),
            1 => Ok(Coder::Zstd),
            2 => Ok(Coder::Rans),
            t => Err(NqError::Corrupt(format!("unknown entropy coder tag {t}"))),
        }
    }

    /// The coder of a name.
    ///
    /// Args:
    ///     name: "raw", "zstd" or "rans".
    /// Returns:
    ///     the coder, or `InvalidArgument`.
    pub fn from_name(name: &str) -> Result<Coder> {
        match name {
            "raw" => Ok(Coder::Raw),
            "zstd" => Ok(Coder::Zstd),
            "rans" => Ok(Coder::Rans),
            n => Err(NqError::InvalidArgument(format!(
                "unknown coder {n:?}: use raw, zstd or rans"
            ))),
        }
    }

    /// The coder's name ("raw", "zstd", "rans").
    pub fn name(self) -> &'static str {
        match self {
            Coder::Raw => "raw",
            Coder::Zstd => "zstd",
            Coder::Rans => "rans",
        }
    }
}

/// zstd level used unless a caller picks one: zstd's default. On the raw code bytes level 19 was
/// 4–5% smaller (1.85 against 1.96 bits/dim at 2 bits) at 1/20 of the packing speed
/// (`benches/entropy_study.py`); the default packing does not use zstd at all.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Most output bytes one stored byte of a zstd or rANS block can decode to. zstd: a 4-byte RLE
/// block (3-byte header + 1 byte) is at most 128 KiB, 2^15 per byte. rANS: a symbol's frequency
/// is at most 4095/4096, so it costs at least log2(4096/4095) = 3.5e-4 bits, ≤ 22 711 symbols per
/// stored byte, plus [`RANS_SLACK`] that the four states absorb without emitting anything.
pub const MAX_EXPANSION: u64 = 1 << 15;
/// Symbols a rANS block can hold beyond `MAX_EXPANSION × stored bytes`: 4 states × 16 bits of
/// headroom / 3.5e-4 bits per symbol < 2^18.
pub const RANS_SLACK: u64 = 1 << 18;

/// The most bytes a stored block can decode to: what a decoder checks a claimed length against
/// before allocating.
///
/// Args:
///     coder: the block's coder.
///     stored_len: the stored (coded) length in bytes.
/// Returns:
///     the bound: `stored_len` for raw, `2^15 · stored_len` for zstd, that plus 2^18 for rANS.
pub fn max_decoded_len(coder: Coder, stored_len: u64) -> u64 {
    match coder {
        Coder::Raw => stored_len,
        Coder::Zstd => stored_len.saturating_mul(MAX_EXPANSION),
        Coder::Rans => stored_len
            .saturating_mul(MAX_EXPANSION)
            .saturating_add(RANS_SLACK),
    }
}

/// Code a block.
///
/// Args:
///     coder: which coder.
///     data: the bytes.
///     zstd_level: zstd's level (1–22; 0 means zstd's default); ignored by the other coders.
/// Returns:
///     the coded block (raw: a copy).
pub fn encode(coder: Coder, data: &[u8], zstd_level: i32) -> Result<Vec<u8>> {
    match coder {
        Coder::Raw => Ok(data.to_vec()),
        Coder::Zstd => zstd::bulk::compress(data, zstd_level)
            .map_err(|e| NqError::InvalidArgument(format!("zstd compression failed: {e}"))),
        Coder::Rans => Ok(rans_encode(data)),
    }
}

/// Decode a block into a new buffer, allocating only after the length checks.
///
/// Args:
///     coder: the block's coder.
///     data: the stored block.
///     expected_len: how many bytes it must decode to (from the container).
///     cap: the most the caller will allocate.
/// Returns:
///     the decoded bytes, or `Corrupt` when `expected_len` exceeds `cap` or what `data` can hold,
///     or the block is damaged or decodes to another length.
pub fn decode(coder: Coder, data: &[u8], expected_len: usize, cap: usize) -> Result<Vec<u8>> {
    check_decoded_len(coder, data.len(), expected_len, cap)?;
    // Tighter bounds from the block itself, still before allocating: zstd's bound from walking
    // the frame and block headers, rANS's stored symbol count.
    match coder {
        Coder::Raw => {}
        Coder::Zstd => {
            // Our zstd blocks are exactly one frame that records its content size.
            let one_frame =
                zstd::zstd_safe::find_frame_compressed_size(data).ok() == Some(data.len());
            let size = zstd::zstd_safe::get_frame_content_size(data).ok().flatten();
            if !one_frame || size != Some(expected_len as u64) {
                return Err(NqError::Corrupt(format!(
                    "zstd block is not one frame of the expected {expected_len} bytes (it records {size:?})"
                )));
            }
        }
        Coder::Rans => {
            let n = get_varint(data, &mut 0, "rANS symbol count")?;
            if n != expected_len as u64 {
                return Err(NqError::Corrupt(format!(
                    "rANS block holds {n} symbols, expected {expected_len}"
                )));
            }
        }
    }
    let mut out = vec![0u8; expected_len];
    decode_into(coder, data, &mut out)?;
    Ok(out)
}

/// Check a claimed decoded length against a cap and against what the stored bytes can hold.
///
/// Args:
///     coder: the block's coder.
///     stored_len: stored bytes.
///     expected_len: claimed decoded bytes.
///     cap: the caller's limit.
/// Returns:
///     `Corrupt` naming the violated bound.
pub fn check_decoded_len(
    coder: Coder,
    stored_len: usize,
    expected_len: usize,
    cap: usize,
) -> Result<()> {
    if expected_len > cap {
        return Err(NqError::Corrupt(format!(
            "a {} block claims {expected_len} decoded bytes, more than the limit of {cap}",
            coder.name()
        )));
    }
    let most = max_decoded_len(coder, stored_len as u64);
    if expected_len as u64 > most {
        return Err(NqError::Corrupt(format!(
            "a {} block of {stored_len} bytes claims {expected_len} decoded bytes; it can hold at most {most}",
            coder.name()
        )));
    }
    if coder == Coder::Raw && expected_len != stored_len {
        return Err(NqError::Corrupt(format!(
            "a raw block of {stored_len} bytes claims {expected_len} decoded bytes"
        )));
    }
    Ok(())
}

/// Decode a block into a caller's buffer of exactly the expected length (no allocation of output).
///
/// Args:
///     coder: the block's coder.
///     data: the stored block.
///     out: overwritten; its length is the expected decoded length.
/// Returns:
///     `Corrupt` when the block is damaged or decodes to another length.
pub fn decode_into(coder: Coder, data: &[u8], out: &mut [u8]) -> Result<()> {
    match coder {
        Coder::Raw => {
            if data.len() != out.len() {
                return Err(NqError::Corrupt(format!(
                    "raw block holds {} bytes, expected {}",
                    data.len(),
                    out.len()
                )));
            }
            out.copy_from_slice(data);
            Ok(())
        }
        Coder::Zstd => {
            if out.is_empty() && data.is_empty() {
                return Ok(());
            }
            let mut d = zstd::bulk::Decompressor::new().map_err(|e| {
                NqError::Io(std::io::ErrorKind::Other, format!("zstd decoder: {e}"))
            })?;
            let got = d
                .decompress_to_buffer(data, out)
                .map_err(|e| NqError::Corrupt(format!("zstd block does not decode: {e}")))?;
            if got != out.len() {
                return Err(NqError::Corrupt(format!(
                    "zstd block decodes to {got} bytes, expected {}",
                    out.len()
                )));
            }
            Ok(())
        }
        Coder::Rans => rans_decode_into(data, out),
    }
}

// =============================================================================================
// rANS
// =============================================================================================

/// Largest precision of the normalised frequencies (they sum to 2^scale_bits). 12 bits keep the
/// decoder's tables L1-resident and `freq << 20` in u32.
pub const RANS_MAX_SCALE_BITS: u32 = 12;
/// Smallest precision the encoder considers.
pub const RANS_MIN_SCALE_BITS: u32 = 8;
/// Lower bound of a state; states live in [2^16, 2^32) and move 16 bits at a time.
const RANS_L: u32 = 1 << 16;
/// Interleaved states: four independent dependency chains hide the multiply/divide latency.
const RANS_STATES: usize = 4;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Read a LEB128 varint at `*pos`, advancing it.
fn get_varint(data: &[u8], pos: &mut usize, what: &str) -> Result<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let Some(&b) = data.get(*pos) else {
            return Err(NqError::Corrupt(format!("{what} is truncated")));
        };
        *pos += 1;
        if i == 9 && b > 1 {
            return Err(NqError::Corrupt(format!("{what} overflows 64 bits")));
        }
        v |= ((b & 0x7F) as u64) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(NqError::Corrupt(format!("{what} overflows 64 bits")))
}

fn varint_len(v: u64) -> usize {
    let mut n = 1;
    let mut v = v >> 7;
    while v > 0 {
        n += 1;
        v >>= 7;
    }
    n
}

/// Byte histogram of a block.
///
/// Args:
///     data: the bytes.
/// Returns:
///     how often each byte value occurs.
pub fn histogram(data: &[u8]) -> [u64; 256] {
    let mut out = [0u64; 256];
    // Four u32 sub-histograms break the store-to-load dependency on runs of one value (code planes
    // of biased columns have long ones); chunks of 2^30 bytes keep the u32 counts from overflowing.
    for block in data.chunks(1 << 30) {
        let mut h = [[0u32; 256]; 4];
        let mut chunks = block.chunks_exact(4);
        for c in &mut chunks {
            h[0][c[0] as usize] += 1;
            h[1][c[1] as usize] += 1;
            h[2][c[2] as usize] += 1;
            h[3][c[3] as usize] += 1;
        }
        for &b in chunks.remainder() {
            h[0][b as usize] += 1;
        }
        for s in 0..256 {
            out[s] += h[0][s] as u64 + h[1][s] as u64 + h[2][s] as u64 + h[3][s] as u64;
        }
    }
    out
}

/// Normalise counts to frequencies summing to 2^sb, each at least 1 and at most 2^sb − 1.
///
/// Args (internal): `counts` of the k ≥ 2 present symbols, `n` their sum; `f` receives the
/// frequencies in the same order.
fn normalize(counts: &[u64], n: u64, sb: u32, imax: usize, f: &mut [u32]) {
    let m = 1u32 << sb;
    let scale = m as f64 / n as f64;
    let mut sum = 0i64;
    for (fi, &c) in f.iter_mut().zip(counts) {
        *fi = ((c as f64 * scale + 0.5) as u32).clamp(1, m - 1);
        sum += *fi as i64;
    }
    // Fix the rounding on the most frequent symbol (`imax`, the largest count, hence the largest
    // frequency), where a change of one costs the least: one step almost always; the loop covers
    // many rare symbols rounded up to 1.
    let mut i = imax;
    while sum != m as i64 {
        if sum < m as i64 {
            // With two or more symbols the largest is below m − 1 while sum < m, so one step ends it.
            let add = ((m as i64 - sum) as u32).min(m - 1 - f[i]);
            debug_assert!(add > 0);
            f[i] += add;
            sum += add as i64;
        } else {
            // sum > m ≥ k means the largest is at least 2, so this leaves it at least 1.
            let take = ((sum - m as i64) as u32).min(f[i] / 2).max(1);
            f[i] -= take;
            sum -= take as i64;
        }
        i = f.iter().enumerate().max_by_key(|&(_, &v)| v).unwrap().0;
    }
}

/// Bits of the Exp-Golomb code of order k of v.
fn eg_bits(v: u32, k: u32) -> u32 {
    let w = v + (1 << k);
    2 * (31 - w.leading_zeros()) + 1 - k
}

/// A block's coding plan: precision, frequencies and the Exp-Golomb order of its table.
struct RansPlan {
    sb: u32,
    egk: u32,
    f: [u32; 256],
    /// Header bytes after the symbol count: precision/order byte, k byte, symbol set, frequencies.
    table_len: usize,
}

/// Choose the precision (8–12 bits) and table code that minimise table + payload, from the
/// histogram alone. Small blocks of skewed data gain most: measured on the 2-bit code planes of
/// real KV, precisions 8–12 against 12 alone gave 1.7073 against 1.7264 bits per dimension.
/// Returns the plan and the payload's size in bits.
fn plan(hist: &[u64; 256]) -> (RansPlan, f64) {
    let log2 = log2_table();
    // The present symbols, compacted: every loop below runs over k entries, not 256.
    let mut syms = [0u8; 257];
    let mut counts = [0u64; 257];
    let mut k = 0;
    for (s, &c) in hist.iter().enumerate() {
        if c > 0 {
            syms[k] = s as u8;
            counts[k] = c;
            k += 1;
        }
    }
    let n: u64 = counts[..k].iter().sum();
    if k == 1 {
        // A lone symbol gets a phantom neighbour of frequency 1, so the state arithmetic stays in
        // u32 and each symbol costs at least log2(4096/4095) bits, which bounds the expansion.
        let s = syms[0] as usize;
        let sb = RANS_MIN_SCALE_BITS;
        let mut f = [0u32; 256];
        f[s] = (1 << sb) - 1;
        f[(s + 1) & 255] = 1;
        let payload = n as f64 * (sb as f64 - log2[f[s] as usize] as f64 / 65536.0);
        return (
            RansPlan {
                sb,
                egk: 0,
                f,
                table_len: 2 + 2 + 1,
            },
            payload,
        );
    }
    let imax = (0..k).max_by_key(|&i| counts[i]).unwrap();
    let mut fk = [0u32; 256];
    let mut best: Option<(u32, u32, usize, f64, [u32; 256])> = None;
    let mut cost = |sb: u32, best: &mut Option<(u32, u32, usize, f64, [u32; 256])>| -> f64 {
        let m = 1u32 << sb;
        if k > m as usize / 2 && sb < RANS_MAX_SCALE_BITS {
            return f64::INFINITY;
        }
        normalize(&counts[..k], n, sb, imax, &mut fk[..k]);
        // Σ count · log2(freq) in 16.16 fixed point: integer adds, no FP dependency chain.
        let mut acc = 0u64;
        for i in 0..k {
            acc += counts[i] * log2[fk[i] as usize] as u64;
        }
        let payload = n as f64 * sb as f64 - acc as f64 / 65536.0;
        // The best order is near log2 of the mean frequency; three candidates around it.
        let mean = (m as usize / k).max(1);
        let centre = (usize::BITS - 1 - mean.leading_zeros()).min(sb - 1);
        let (egk, eg) = (centre.saturating_sub(2)..=centre)
            .map(|egk| {
                (
                    egk,
                    fk[..k - 1]
                        .iter()
                        .map(|&v| eg_bits(v - 1, egk) as usize)
                        .sum::<usize>(),
                )
            })
            .min_by_key(|&(_, b)| b)
            .unwrap();
        let table_len = 2 + if k < 32 { k } else { 32 } + eg.div_ceil(8);
        let total = table_len as f64 * 8.0 + payload;
        if best.as_ref().map_or(true, |b| total < b.3) {
            *best = Some((sb, egk, table_len, total, fk));
        }
        total
    };
    // Table + payload is close to convex in the precision: walk down from 12 bits while it
    // improves (2–3 evaluations instead of 5; the same sizes on the real planes).
    let mut prev = cost(RANS_MAX_SCALE_BITS, &mut best);
    for sb in (RANS_MIN_SCALE_BITS..RANS_MAX_SCALE_BITS).rev() {
        let c = cost(sb, &mut best);
        if c > prev {
            break;
        }
        prev = c;
    }
    let (sb, egk, table_len, total, fk) =
        best.expect("at least the 12-bit precision is always tried");
    let mut f = [0u32; 256];
    for i in 0..k {
        f[syms[i] as usize] = fk[i];
    }
    (
        RansPlan {
            sb,
            egk,
            f,
            table_len,
        },
        total - table_len as f64 * 8.0,
    )
}

/// log2 of 0..=4096 in 16.16 fixed point (entry 0 unused), for cost estimates without a libm call
/// per symbol.
fn log2_table() -> &'static [u32; 4097] {
    static T: std::sync::OnceLock<Box<[u32; 4097]>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut t = Box::new([0u32; 4097]);
        for (i, v) in t.iter_mut().enumerate().skip(1) {
            *v = ((i as f64).log2() * 65536.0).round() as u32;
        }
        t
    })
}

struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    fn put(&mut self, v: u32, bits: u32) {
        self.acc = (self.acc << bits) | v as u64;
        self.n += bits;
        while self.n >= 8 {
            self.n -= 8;
            self.out.push((self.acc >> self.n) as u8);
        }
    }
    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push((self.acc << (8 - self.n)) as u8);
        }
        self.out
    }
}

struct BitReader<'a> {
    data: &'a [u8],
    bit: usize,
}

impl BitReader<'_> {
    fn get(&mut self) -> Result<u32> {
        let b = *self
            .data
            .get(self.bit / 8)
            .ok_or_else(|| NqError::Corrupt("rANS frequency table is truncated".into()))?;
        let v = (b >> (7 - self.bit % 8)) & 1;
        self.bit += 1;
        Ok(v as u32)
    }
    fn eg(&mut self, k: u32) -> Result<u32> {
        let mut z = 0;
        while self.get()? == 0 {
            z += 1;
            if z > 16 {
                return Err(NqError::Corrupt("rANS frequency code is too long".into()));
            }
        }
        let mut w = 1u32;
        for _ in 0..z + k {
            w = (w << 1) | self.get()?;
        }
        Ok(w - (1 << k))
    }
}

/// Table layout: one byte `scale_bits | egk << 4`; (k − 1) as u8; the k symbols as bytes (k < 32)
/// or a 256-bit set (k ≥ 32); then, bit-packed MSB first and padded to a byte, the Exp-Golomb
/// codes of order egk of (frequency − 1) for all but the last present symbol (whose frequency is
/// 2^scale_bits minus the rest).
fn write_table(p: &RansPlan, out: &mut Vec<u8>) {
    let present: Vec<usize> = (0..256).filter(|&s| p.f[s] > 0).collect();
    let k = present.len();
    out.push(p.sb as u8 | (p.egk as u8) << 4);
    out.push((k - 1) as u8);
    if k < 32 {
        out.extend(present.iter().map(|&s| s as u8));
    } else {
        let mut set = [0u8; 32];
        for &s in &present {
            set[s / 8] |= 1 << (s % 8);
        }
        out.extend_from_slice(&set);
    }
    let mut w = BitWriter {
        out: Vec::new(),
        acc: 0,
        n: 0,
    };
    for &s in &present[..k - 1] {
        let v = p.f[s] - 1;
        let wv = v + (1 << p.egk);
        let nb = 32 - wv.leading_zeros();
        w.put(0, nb - 1 - p.egk);
        w.put(wv, nb);
    }
    out.extend_from_slice(&w.finish());
}

fn read_table(data: &[u8], pos: &mut usize) -> Result<(u32, [u32; 256])> {
    let trunc = || NqError::Corrupt("rANS frequency table is truncated".into());
    let head = data.get(*pos..*pos + 2).ok_or_else(trunc)?;
    let (sb, egk) = ((head[0] & 15) as u32, (head[0] >> 4) as u32);
    if !(RANS_MIN_SCALE_BITS..=RANS_MAX_SCALE_BITS).contains(&sb) || egk >= sb {
        return Err(NqError::Corrupt(format!(
            "rANS table has precision {sb} and code order {egk}"
        )));
    }
    let m = 1u32 << sb;
    let k = head[1] as usize + 1;
    *pos += 2;
    let mut present = Vec::with_capacity(k);
    if k < 32 {
        let syms = data.get(*pos..*pos + k).ok_or_else(trunc)?;
        if syms.windows(2).any(|w| w[0] >= w[1]) {
            return Err(NqError::Corrupt(
                "rANS symbol list is not strictly increasing".into(),
            ));
        }
        present.extend(syms.iter().map(|&s| s as usize));
        *pos += k;
    } else {
        let set = data.get(*pos..*pos + 32).ok_or_else(trunc)?;
        present.extend((0..256).filter(|&s| set[s / 8] >> (s % 8) & 1 != 0));
        if present.len() != k {
            return Err(NqError::Corrupt(format!(
                "rANS symbol set has {} members, header says {k}",
                present.len()
            )));
        }
        *pos += 32;
    }
    if k < 2 || k > m as usize {
        return Err(NqError::Corrupt(format!(
            "rANS table holds {k} symbols at precision {sb}"
        )));
    }
    let mut f = [0u32; 256];
    let mut sum = 0u32;
    let mut r = BitReader {
        data: &data[*pos..],
        bit: 0,
    };
    for &s in &present[..k - 1] {
        let v = r.eg(egk)? + 1;
        if v >= m || sum + v >= m {
            return Err(NqError::Corrupt(format!("rANS frequencies exceed {m}")));
        }
        f[s] = v;
        sum += v;
    }
    *pos += r.bit.div_ceil(8);
    f[present[k - 1]] = m - sum;
    Ok((sb, f))
}

/// Estimated coded size of a block from its histogram, header included (the packer's choice
/// between coders uses it instead of coding the block twice).
///
/// Args:
///     hist: the block's byte histogram.
/// Returns:
///     the rANS block size in bytes, within a few bytes of the real one.
pub fn rans_estimate(hist: &[u64; 256]) -> usize {
    let n: u64 = hist.iter().sum();
    if n == 0 {
        return 1;
    }
    let (p, payload) = plan(hist);
    // Each state flushes 4 bytes; its final value carries up to 16 bits of the data.
    varint_len(n)
        + p.table_len
        + 4 * RANS_STATES
        + ((payload / 8.0).ceil() as usize).saturating_sub(RANS_STATES)
}

/// Encode a block with the order-0 rANS coder.
///
/// Block layout: varint symbol count n; if n > 0 the frequency table (see `write_table`), the
/// four final states (u32 LE) and the renormalisation words (u16 LE) in decoding order.
///
/// Args:
///     data: the bytes.
/// Returns:
///     the block.
pub fn rans_encode(data: &[u8]) -> Vec<u8> {
    if data.is_empty() {
        return vec![0];
    }
    rans_encode_with(data, &plan(&histogram(data)).0)
}

fn rans_encode_with(data: &[u8], p: &RansPlan) -> Vec<u8> {
    let n = data.len();
    let mut out = Vec::with_capacity(n / 2 + 64);
    put_varint(&mut out, n as u64);
    if n == 0 {
        return out;
    }
    write_table(p, &mut out);
    let sb = p.sb;
    // Per symbol: start, frequency, the bound above which the state must emit 16 bits, and an
    // exact reciprocal for x / freq (Granlund–Montgomery: m = ⌈2^(32+l)/f⌉, l = ⌈log2 f⌉, exact
    // for every 32-bit x; a 64×64→128 multiply instead of a 32-bit division).
    #[derive(Clone, Copy, Default)]
    struct Sym {
        rcp: u64,
        xmax: u32,
        freq: u32,
        start: u32,
        shift: u32,
    }
    let mut sym = [Sym::default(); 256];
    let mut acc = 0;
    for (e, &f) in sym.iter_mut().zip(&p.f) {
        if f > 0 {
            let l = 32 - (f - 1).leading_zeros();
            let rcp = (1u128 << (32 + l)).div_ceil(f as u128);
            // Emit when x ≥ ((L >> sb) << 16) · f; f < 2^sb keeps that in u32.
            *e = Sym {
                rcp: rcp as u64,
                xmax: ((RANS_L >> sb) << 16) * f,
                freq: f,
                start: acc,
                shift: 32 + l,
            };
        }
        acc += f;
    }
    // At most one word per symbol; written back to front so they come out in decoding order.
    // Branch-free emission (store always, advance by the flag): the emit test is a coin flip on
    // high-entropy planes, and the branchy form ran 1.6× slower.
    let mut words = vec![0u16; n + 1];
    let mut wp = n + 1;
    let mut x = [RANS_L; RANS_STATES];
    let mut put = |x: &mut u32, s: u8| {
        let e = &sym[s as usize];
        let emit = *x >= e.xmax;
        words[wp - 1] = *x as u16;
        wp -= emit as usize;
        let xs = if emit { *x >> 16 } else { *x };
        let q = ((xs as u128 * e.rcp as u128) >> e.shift) as u32;
        *x = (q << sb) + (xs - q * e.freq) + e.start;
    };
    // Symbol i goes to state i % 4; encoding runs backwards so decoding runs forwards.
    let body = n - n % RANS_STATES;
    for i in (body..n).rev() {
        put(&mut x[i % RANS_STATES], data[i]);
    }
    for q in data[..body].chunks_exact(RANS_STATES).rev() {
        put(&mut x[3], q[3]);
        put(&mut x[2], q[2]);
        put(&mut x[1], q[1]);
        put(&mut x[0], q[0]);
    }
    for s in x {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.reserve((n + 1 - wp) * 2);
    for w in &words[wp..] {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

/// Decode a rANS block into a buffer of exactly the expected length.
///
/// Args:
///     data: the block.
///     out: overwritten; its length must equal the block's symbol count.
/// Returns:
///     `Corrupt` when the header is invalid, the count differs, the words run out, or the final
///     states and word count do not match the encoder's (which catches most damage to the payload).
pub fn rans_decode_into(data: &[u8], out: &mut [u8]) -> Result<()> {
    let mut pos = 0usize;
    let n = get_varint(data, &mut pos, "rANS symbol count")?;
    if n != out.len() as u64 {
        return Err(NqError::Corrupt(format!(
            "rANS block holds {n} symbols, expected {}",
            out.len()
        )));
    }
    if n == 0 {
        if pos != data.len() {
            return Err(NqError::Corrupt(
                "empty rANS block has trailing bytes".into(),
            ));
        }
        return Ok(());
    }
    let (sb, f) = read_table(data, &mut pos)?;
    let m = 1usize << sb;
    // Slot → symbol by memset, plus per-symbol frequency and start: building this costs less
    // than a combined u32 (symbol, freq, bias) table for the 2048-symbol column blocks the
    // packer makes (the table build dominated their decode time).
    let mut slot = [0u8; 1 << RANS_MAX_SCALE_BITS];
    let mut info = [0u32; 256]; // frequency | start << 16
    let mut st = 0usize;
    for s in 0..256 {
        let fr = f[s] as usize;
        slot[st..st + fr].fill(s as u8);
        info[s] = fr as u32 | (st as u32) << 16;
        st += fr;
    }
    debug_assert_eq!(st, m);
    let states = data
        .get(pos..pos + 4 * RANS_STATES)
        .ok_or_else(|| NqError::Corrupt("rANS block is truncated before its states".into()))?;
    let mut x = [0u32; RANS_STATES];
    for (j, xs) in x.iter_mut().enumerate() {
        *xs = u32::from_le_bytes(states[4 * j..4 * j + 4].try_into().unwrap());
        if *xs < RANS_L {
            return Err(NqError::Corrupt("rANS state is out of range".into()));
        }
    }
    let words = &data[pos + 4 * RANS_STATES..];
    if words.len() % 2 != 0 {
        return Err(NqError::Corrupt(
            "rANS payload has an odd number of bytes".into(),
        ));
    }
    let mut wp = 0usize;
    let mask = (m - 1) as u32;
    // Branch-free renormalisation: read the next word (0 past the end), take it if the state is
    // low. A read past the end is caught by the final position check.
    macro_rules! step {
        ($x:expr, $o:expr) => {{
            let sl = $x & mask;
            let s = slot[sl as usize];
            let e = info[s as usize];
            $o = s;
            let y = (e & 0xFFFF) * ($x >> sb) + sl - (e >> 16);
            let w = match words.get(wp..wp + 2) {
                Some(b) => u16::from_le_bytes([b[0], b[1]]) as u32,
                None => 0,
            };
            let low = y < RANS_L;
            $x = if low { (y << 16) | w } else { y };
            wp += 2 * low as usize;
        }};
    }
    let body = out.len() - out.len() % RANS_STATES;
    let (head, tail) = out.split_at_mut(body);
    for q in head.chunks_exact_mut(RANS_STATES) {
        step!(x[0], q[0]);
        step!(x[1], q[1]);
        step!(x[2], q[2]);
        step!(x[3], q[3]);
        // Stop a truncated block early instead of decoding its whole claimed length from zeros.
        if wp > words.len() {
            return Err(NqError::Corrupt("rANS payload is truncated".into()));
        }
    }
    for (j, o) in tail.iter_mut().enumerate() {
        step!(x[j], *o);
    }
    if wp > words.len() {
        return Err(NqError::Corrupt("rANS payload is truncated".into()));
    }
    if wp != words.len() || x.iter().any(|&s| s != RANS_L) {
        return Err(NqError::Corrupt(
            "rANS block does not end where its encoder ended (damaged payload)".into(),
        ));
    }
    Ok(())
}

// =============================================================================================
// The at-rest packer
// =============================================================================================

/// How a stream's code bytes are arranged before entropy coding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Layout {
    /// (a) The raw bytes: codes row by row, then the scales (u16 LE), as one block.
    Raw = 0,
    /// (b) Byte planes, column-major: E8P16 pattern-index bytes and sign/shift bytes per stage
    /// (an E8P8 stage is one sign/shift plane), scale low bytes, scale high bytes; each plane coded
    /// on its own.
    Planes = 1,
    /// (c) Codes expanded to doubled lattice coordinates (odd integers in ±{1,3,5}, zigzagged;
    /// one byte each, 8 per group) and shift bits (one byte per group), per stage; each plane
    /// coded on its own.
    Lattice = 2,
}

impl Layout {
    fn from_u8(v: u8) -> Result<Layout> {
        match v {
            0 => Ok(Layout::Raw),
            1 => Ok(Layout::Planes),
            2 => Ok(Layout::Lattice),
            v => Err(NqError::Corrupt(format!("unknown packed layout {v}"))),
        }
    }

    /// The layout of a name.
    ///
    /// Args:
    ///     name: "raw", "planes" or "lattice".
    /// Returns:
    ///     the layout, or `InvalidArgument`.
    pub fn from_name(name: &str) -> Result<Layout> {
        match name {
            "raw" => Ok(Layout::Raw),
            "planes" => Ok(Layout::Planes),
            "lattice" => Ok(Layout::Lattice),
            n => Err(NqError::InvalidArgument(format!(
                "unknown layout {n:?}: use raw, planes or lattice"
            ))),
        }
    }

    /// The layout's name.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Raw => "raw",
            Layout::Planes => "planes",
            Layout::Lattice => "lattice",
        }
    }
}

/// How each plane (or the one raw block) is entropy coded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaneCoding {
    /// Every plane with one coder, as one block.
    Whole(Coder),
    /// Every plane with one coder, one block per column (each column its own statistics).
    Columns(Coder),
    /// Per plane, the smallest of raw, rANS on the whole plane and rANS per column, chosen from
    /// histograms (the estimate is within a few bytes of the real size, so nothing is coded twice).
    Auto,
    /// Auto's candidates plus zstd on the whole plane (really compressed), the smallest kept.
    Best,
}

impl PlaneCoding {
    /// The plane coding of a name.
    ///
    /// Args:
    ///     name: "auto", "best", a coder name ("raw", "zstd", "rans") for whole planes, or a coder
    ///         name with the suffix "-columns" for one block per column.
    /// Returns:
    ///     the plane coding, or `InvalidArgument`.
    pub fn from_name(name: &str) -> Result<PlaneCoding> {
        match name {
            "auto" => return Ok(PlaneCoding::Auto),
            "best" => return Ok(PlaneCoding::Best),
            _ => {}
        }
        if let Some(c) = name.strip_suffix("-columns") {
            return Ok(PlaneCoding::Columns(Coder::from_name(c)?));
        }
        Ok(PlaneCoding::Whole(Coder::from_name(name)?))
    }
}

/// Whether an optional transform (a delta, row deduplication) is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Never.
    Off,
    /// Always.
    On,
    /// Whichever codes smaller (per plane for token deltas, per stream otherwise).
    Auto,
}

impl Choice {
    /// From Python's `None` / `False` / `True`.
    ///
    /// Args:
    ///     v: None for Auto, else Off or On.
    /// Returns:
    ///     the choice.
    pub fn from_option(v: Option<bool>) -> Choice {
        match v {
            None => Choice::Auto,
            Some(false) => Choice::Off,
            Some(true) => Choice::On,
        }
    }

    fn candidates(self) -> &'static [bool] {
        match self {
            Choice::Off => &[false],
            Choice::On => &[true],
            Choice::Auto => &[false, true],
        }
    }
}

/// Options of [`pack_codes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackOptions {
    /// The arrangement of the bytes.
    pub layout: Layout,
    /// The entropy coding of the planes.
    pub coding: PlaneCoding,
    /// Delta of the code planes along tokens: XOR for byte planes and shift bits, subtraction
    /// (zigzagged) for lattice coordinates. Ignored by the raw layout.
    pub token_delta: Choice,
    /// (d) Delta of the scales along tokens (zigzagged u16) before the byte split. Ignored by the
    /// raw layout.
    pub scale_delta: Choice,
    /// Store each row (codes + scale) that repeats an earlier row as a reference to it. Repeats
    /// are common where a vector depends on the token alone (values and pre-RoPE keys of the first
    /// layers on repeated tokens). Ignored by the raw layout.
    pub dedup_rows: Choice,
    /// zstd level where zstd is used.
    pub zstd_level: i32,
}

/// Why this default. `python benches/entropy_study.py` on real SmolLM2-135M KV (4 texts × {k
/// post-RoPE, k pre-RoPE, v}, 30 layers × 3 KV heads = 1080 streams of 2048 tokens × head_dim 64
/// per bit width), bits per dimension with every byte counted (codes, scales, headers, tables):
///
/// | option                                   | 1 bit  | 2 bits | 3 bits | 4 bits |
/// |------------------------------------------|--------|--------|--------|--------|
/// | uncoded                                  | 1.2500 | 2.2500 | 3.2500 | 4.2500 |
/// | (a) raw bytes + zstd-3                   | 0.9842 | 1.9607 | 2.9576 | 3.9439 |
/// | (a) raw bytes + zstd-19                  | 0.9196 | 1.8535 | 2.8360 | 3.7856 |
/// | (b) byte planes + zstd-3                 | 0.9198 | 1.8879 | 2.8303 | 3.8030 |
/// | (b) byte planes + rANS                   | 0.9996 | 1.9609 | 2.9108 | 3.8840 |
/// | (b) byte planes + rANS per column        | 0.8388 | 1.7511 | 2.7358 | 3.7556 |
/// | (b) byte planes + auto                   | 0.8320 | 1.7338 | 2.6831 | 3.6535 |
/// | (b) + XOR delta on every plane           | 0.8979 | 1.8708 | 2.8606 | 3.8403 |
/// | (b) + delta per plane (auto)             | 0.8262 | 1.7240 | 2.6761 | 3.6486 |
/// | (c) lattice coords + delta + zstd-3      | 1.5731 | 2.5267 | 4.2485 | 5.5928 |
/// | (c) lattice coords + delta + auto        | 1.3423 | 2.0973 | 3.6830 | 4.7364 |
/// | (c) lattice coords, no delta, auto       | 1.0725 | 1.9439 | 3.0285 | 4.0686 |
/// | (d) + scale delta always                 | 0.8307 | 1.7288 | 2.6807 | 3.6531 |
/// | (d) + scale delta auto                   | 0.8258 | 1.7236 | 2.6756 | 3.6481 |
/// | (e) + repeated rows as references: **default** | **0.8173** | **1.7030** | **2.6425** | **3.6021** |
/// | default + zstd per plane ("best")        | 0.8132 | 1.6967 | 2.6305 | 3.5922 |
///
/// What the numbers say. Per-column statistics are the big win (planes + rANS 1.96 → per column
/// 1.75 at 2 bits): after the Hadamard rotation each key dimension keeps its own bias, so sign
/// and pattern bytes are skewed differently per column; keys pre-RoPE gain most (1.31 bits/dim
/// at 2 bits against 1.76 post-RoPE). Values are near-uniform and need one table per plane, which
/// is why a per-plane choice (auto) beats either fixed form. Delta along tokens mostly hurts
/// (adjacent tokens' codes are nearly independent) but helps some planes, so auto tries it per
/// plane. Lattice coordinates cost more than the bytes they expand (8 symbols of ≥ 1 bit each
/// where a code byte spends under 8 bits), with or without delta. Scale deltas help few streams.
/// Repeated rows (first layers' values and pre-RoPE keys on repeated tokens: 35–68% of rows in
/// layers 0–1) stored as references save 1–2%. Adding zstd per plane ("best") saves another
/// 0.2–0.5% at half the packing speed, so it is not the default. Single-thread speed of the
/// default in that run (load average 7.7 on 2 shared cores, memcpy 4–14 GB/s): pack 32–43 MB/s,
/// unpack 170–240 MB/s; raw + zstd-3: 90–190 and 230–480 MB/s.
impl Default for PackOptions {
    /// Byte planes; per plane raw / rANS / rANS per column, with or without a delta along
    /// tokens; scale delta and row references where they code smaller (see the table above).
    fn default() -> Self {
        PackOptions {
            layout: Layout::Planes,
            coding: PlaneCoding::Auto,
            token_delta: Choice::Auto,
            scale_delta: Choice::Auto,
            dedup_rows: Choice::Auto,
            zstd_level: DEFAULT_ZSTD_LEVEL,
        }
    }
}

const PACK_MAGIC: &[u8; 4] = b"NQPK";
const PACK_VERSION: u8 = 1;
const FLAG_DEDUP: u8 = 1;
const FLAG_SCALE_DELTA: u8 = 2;
/// Fixed part of a packed stream's header: magic, version, bits, layout, flags, rows u64,
/// row_bytes u32, plane count u8, 3 reserved bytes.
const PACK_HEADER: usize = 4 + 4 + 8 + 4 + 4;

/// Default limit on the decoded size of one packed stream (codes + scales): 4 GiB.
pub const DEFAULT_MAX_UNPACKED: usize = 1 << 32;
/// Most code bytes per row: 4 bits at the codec's largest head dimension. A reader checks the
/// header against it before building anything sized by it (cargo-fuzz found a header with
/// row_bytes near 2^32 and zero rows that made the plane column lists allocate 11 GB).
pub const MAX_ROW_BYTES: usize = crate::codec::MAX_HEAD_DIM / 8 * 4;

/// A decoded stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unpacked {
    /// Bit width (1–4) of the codes.
    pub bits: u8,
    /// Code bytes per row (per token).
    pub row_bytes: usize,
    /// `rows × row_bytes` code bytes, row-major.
    pub codes: Vec<u8>,
    /// `rows` fp16 scales as raw bits.
    pub scales: Vec<u16>,
}

/// Column lists of the code planes of the planes layout: for each stage, pattern bytes (E8P16
/// low bytes) then sign/shift bytes (E8P16 high bytes, or the E8P8 byte).
fn byte_plane_columns(bits: u8, g: usize) -> Vec<Vec<usize>> {
    let p16 = |base: usize| -> [Vec<usize>; 2] {
        [
            (0..g).map(|i| base + 2 * i).collect(),
            (0..g).map(|i| base + 2 * i + 1).collect(),
        ]
    };
    let p8 = |base: usize| -> Vec<usize> { (base..base + g).collect() };
    match bits {
        1 => vec![p8(0)],
        2 => p16(0).into(),
        3 => {
            let [a, b] = p16(0);
            vec![a, b, p8(2 * g)]
        }
        _ => {
            let [a, b] = p16(0);
            let [c, d] = p16(2 * g);
            vec![a, b, c, d]
        }
    }
}

/// Stages of a code row: (is E8P16, byte offset in the row).
fn stages(bits: u8, g: usize) -> Vec<(bool, usize)> {
    match bits {
        1 => vec![(false, 0)],
        2 => vec![(true, 0)],
        3 => vec![(true, 0), (false, 2 * g)],
        _ => vec![(true, 0), (true, 2 * g)],
    }
}

/// Column counts of the planes of a layout, scales (two planes of one column) last; computed
/// without building the column lists.
fn plane_cols(layout: Layout, bits: u8, g: usize, row_bytes: usize) -> Vec<usize> {
    let mut v: Vec<usize> = match layout {
        Layout::Raw => return vec![row_bytes + 2],
        Layout::Planes => vec![g; [1, 2, 3, 4][bits as usize - 1]],
        Layout::Lattice => stages(bits, g).iter().flat_map(|_| [8 * g, g]).collect(),
    };
    v.extend([1, 1]);
    v
}

/// A coded plane: coder, parts, and their total size with the directory entry.
struct CodedPlane {
    coder: Coder,
    delta: bool,
    parts: Vec<Vec<u8>>,
}

impl CodedPlane {
    fn size(&self) -> usize {
        2 + varint_len(self.parts.len() as u64)
            + self
                .parts
                .iter()
                .map(|p| p.len() + varint_len(p.len() as u64))
                .sum::<usize>()
    }
}

/// Code a plane of `cols` columns (column-major, `rows` each) with a fixed coding.
fn code_fixed(
    plane: &[u8],
    rows: usize,
    cols: usize,
    coding: PlaneCoding,
    level: i32,
) -> Result<CodedPlane> {
    let (coder, split) = match coding {
        PlaneCoding::Whole(c) => (c, false),
        PlaneCoding::Columns(c) => (c, rows > 0 && cols > 1),
        _ => unreachable!("only fixed codings here"),
    };
    let parts = if split {
        plane
            .chunks_exact(rows)
            .map(|col| encode(coder, col, level))
            .collect::<Result<_>>()?
    } else {
        vec![encode(coder, plane, level)?]
    };
    Ok(CodedPlane {
        coder,
        delta: false,
        parts,
    })
}

/// Auto's estimate for a plane: the cheapest of raw, rANS whole, rANS per column, from
/// histograms; returns (estimated size, a closure-free description to code it).
// `Whole` holds a 1 KB plan inline: one value per plane, built and consumed at once, so boxing it
// would add an allocation and save nothing.
#[allow(clippy::large_enum_variant)]
enum AutoChoice {
    Raw,
    Whole(RansPlan),
    Columns(Vec<RansPlan>),
}

fn auto_estimate(plane: &[u8], rows: usize, cols: usize) -> (usize, AutoChoice) {
    let raw = plane.len() + varint_len(plane.len() as u64) + 3;
    if plane.is_empty() {
        return (raw, AutoChoice::Raw);
    }
    let est = |h: &[u64; 256], n: usize| -> (RansPlan, usize) {
        let (p, payload) = plan(h);
        let size = varint_len(n as u64)
            + p.table_len
            + 4 * RANS_STATES
            + ((payload / 8.0).ceil() as usize).saturating_sub(RANS_STATES);
        (p, size + varint_len(size as u64))
    };
    let mut total = [0u64; 256];
    let mut col_plans = Vec::new();
    let mut per_col = usize::MAX;
    if rows > 0 && cols > 1 {
        per_col = 3;
        for col in plane.chunks_exact(rows) {
            let h = histogram(col);
            for s in 0..256 {
                total[s] += h[s];
            }
            let (p, size) = est(&h, rows);
            per_col += size;
            col_plans.push(p);
        }
    } else {
        total = histogram(plane);
    }
    let (one_plan, one) = est(&total, plane.len());
    let one = one + 3;
    if raw <= one && raw <= per_col {
        (raw, AutoChoice::Raw)
    } else if one <= per_col {
        (one, AutoChoice::Whole(one_plan))
    } else {
        (per_col, AutoChoice::Columns(col_plans))
    }
}

fn code_auto(plane: &[u8], rows: usize, choice: &AutoChoice) -> CodedPlane {
    match choice {
        AutoChoice::Raw => CodedPlane {
            coder: Coder::Raw,
            delta: false,
            parts: vec![plane.to_vec()],
        },
        AutoChoice::Whole(p) => CodedPlane {
            coder: Coder::Rans,
            delta: false,
            parts: vec![rans_encode_with(plane, p)],
        },
        AutoChoice::Columns(ps) => CodedPlane {
            coder: Coder::Rans,
            delta: false,
            parts: plane
                .chunks_exact(rows)
                .zip(ps)
                .map(|(c, p)| rans_encode_with(c, p))
                .collect(),
        },
    }
}

/// Code one plane given its variants (without and with the delta along tokens, where built),
/// keeping the smallest candidate the options allow.
fn code_plane(
    variants: &[(bool, &[u8])],
    rows: usize,
    cols: usize,
    opts: &PackOptions,
) -> Result<CodedPlane> {
    let mut best: Option<CodedPlane> = None;
    let mut keep = |c: CodedPlane| {
        if best.as_ref().map_or(true, |b| c.size() < b.size()) {
            best = Some(c);
        }
    };
    match opts.coding {
        PlaneCoding::Whole(_) | PlaneCoding::Columns(_) => {
            for &(delta, p) in variants {
                let mut c = code_fixed(p, rows, cols, opts.coding, opts.zstd_level)?;
                c.delta = delta;
                keep(c);
            }
        }
        PlaneCoding::Auto | PlaneCoding::Best => {
            let (delta, p, choice) = variants
                .iter()
                .map(|&(d, p)| {
                    let (size, choice) = auto_estimate(p, rows, cols);
                    (size, d, p, choice)
                })
                .min_by_key(|v| v.0)
                .map(|(_, d, p, c)| (d, p, c))
                .expect("at least one variant");
            let mut c = code_auto(p, rows, &choice);
            c.delta = delta;
            keep(c);
            if opts.coding == PlaneCoding::Best {
                for &(delta, p) in variants {
                    let mut c = code_fixed(
                        p,
                        rows,
                        cols,
                        PlaneCoding::Whole(Coder::Zstd),
                        opts.zstd_level,
                    )?;
                    c.delta = delta;
                    keep(c);
                }
            }
        }
    }
    Ok(best.expect("at least one candidate"))
}

/// Pack one stream of codes and scales, losslessly.
///
/// Format (all little-endian): "NQPK", version u8 (1), bits u8, layout u8, flags u8 (1: rows are
/// deduplicated, 2: the scales are delta-coded), rows u64, row_bytes u32, plane count u8, 3 zero
/// bytes; then per plane its coder tag u8, its transform u8 (0 none, 1 delta along tokens), its
/// part count (varint: 1, or its column count) and each part's stored length (varint); then the
/// parts' bytes in order; then a CRC-32 of everything before it. With deduplication the first
/// four planes are the byte planes of the u32 row references (see `dedup`), and the other planes
/// hold only the distinct rows.
///
/// Args:
///     codes: `rows × row_bytes` code bytes, row-major (one row per token).
///     row_bytes: code bytes per row: a multiple of `bits` (groups × bits).
///     scales: `rows` fp16 scales as raw bits.
///     bits: the codes' bit width, 1–4.
///     opts: layout, coders and deltas.
/// Returns:
///     the packed bytes, or `InvalidArgument` for inconsistent sizes.
pub fn pack_codes(
    codes: &[u8],
    row_bytes: usize,
    scales: &[u16],
    bits: u8,
    opts: &PackOptions,
) -> Result<Vec<u8>> {
    if !(1..=4).contains(&bits) {
        return Err(NqError::InvalidArgument(format!(
            "bits must be 1, 2, 3 or 4, got {bits}"
        )));
    }
    if row_bytes == 0 || row_bytes % bits as usize != 0 || row_bytes > MAX_ROW_BYTES {
        return Err(NqError::InvalidArgument(format!(
            "row_bytes {row_bytes} is not a positive multiple of bits {bits} up to {MAX_ROW_BYTES}"
        )));
    }
    let rows = scales.len();
    if Some(codes.len()) != rows.checked_mul(row_bytes) {
        return Err(NqError::InvalidArgument(format!(
            "{} code bytes do not make {rows} rows of {row_bytes} bytes",
            codes.len()
        )));
    }
    if opts.layout == Layout::Raw || opts.dedup_rows == Choice::Off {
        return pack_inner(codes, row_bytes, scales, bits, opts, None);
    }
    let Some((dc, ds, refs)) = dedup(codes, row_bytes, scales) else {
        return pack_inner(codes, row_bytes, scales, bits, opts, None);
    };
    let with = pack_inner(&dc, row_bytes, &ds, bits, opts, Some(&refs))?;
    if opts.dedup_rows == Choice::On {
        return Ok(with);
    }
    let without = pack_inner(codes, row_bytes, scales, bits, opts, None)?;
    Ok(if with.len() < without.len() {
        with
    } else {
        without
    })
}

/// Distinct rows (codes + scale) in order of first appearance, and per row a reference value:
/// 0 for a row seen for the first time, else 1 + zigzag(i − (p + 1)) where i is the distinct index
/// of the row it repeats and p the distinct index of the previous row (so a repeated run of
/// tokens codes as a run of 1s). `None` when no row repeats or there are 2^31 distinct rows.
fn dedup(codes: &[u8], row_bytes: usize, scales: &[u16]) -> Option<(Vec<u8>, Vec<u16>, Vec<u32>)> {
    use std::collections::HashMap;
    let rows = scales.len();
    let mut seen: HashMap<(&[u8], u16), u32> = HashMap::with_capacity(rows);
    let mut refs = Vec::with_capacity(rows);
    let (mut dc, mut ds) = (Vec::new(), Vec::new());
    let mut prev: i64 = -1;
    let mut repeats = 0usize;
    for t in 0..rows {
        let key = (&codes[t * row_bytes..(t + 1) * row_bytes], scales[t]);
        let next = seen.len() as u32;
        let idx = *seen.entry(key).or_insert(next);
        if idx == next {
            if next >= 1 << 31 {
                return None;
            }
            dc.extend_from_slice(key.0);
            ds.push(key.1);
            refs.push(0);
        } else {
            let d = idx as i64 - (prev + 1);
            refs.push(1 + ((d << 1) ^ (d >> 63)) as u32);
            repeats += 1;
        }
        prev = idx as i64;
    }
    (repeats > 0).then_some((dc, ds, refs))
}

/// Inverse of [`dedup`]'s references: the distinct-row index of every row, checked.
fn undedup_indices(refs: &[u32]) -> Result<(usize, Vec<u32>)> {
    let mut out = Vec::with_capacity(refs.len());
    let mut distinct: i64 = 0;
    let mut prev: i64 = -1;
    for &r in refs {
        let idx = if r == 0 {
            distinct += 1;
            distinct - 1
        } else {
            let z = (r - 1) as i64;
            let i = prev + 1 + ((z >> 1) ^ -(z & 1));
            if i < 0 || i >= distinct {
                return Err(NqError::Corrupt(format!(
                    "a repeated row refers to row {i} of {distinct} distinct rows"
                )));
            }
            i
        };
        out.push(idx as u32);
        prev = idx;
    }
    Ok((distinct as usize, out))
}

fn pack_inner(
    codes: &[u8],
    row_bytes: usize,
    scales: &[u16],
    bits: u8,
    opts: &PackOptions,
    refs: Option<&[u32]>,
) -> Result<Vec<u8>> {
    let rows = scales.len();
    let g = row_bytes / bits as usize;
    let layout = opts.layout;
    let deltas = opts.token_delta.candidates();
    let want = |d: bool| deltas.contains(&d);

    // Each plane as (columns, variants), a variant being (delta?, column-major bytes).
    type Variant = (bool, Vec<u8>);
    let mut planes: Vec<(usize, Vec<Variant>)> = Vec::new();
    let mut flags = 0u8;
    let mut coded: Vec<CodedPlane> = Vec::new();
    if let Some(refs) = refs {
        // The references first (the decoder needs them to size the other planes): four byte
        // planes of the u32 values, low byte first.
        flags |= FLAG_DEDUP;
        let opts_r = PackOptions {
            token_delta: Choice::Off,
            ..*opts
        };
        for k in 0..4 {
            let b: Vec<u8> = refs.iter().map(|r| (r >> (8 * k)) as u8).collect();
            coded.push(code_plane(&[(false, &b)], refs.len(), 1, &opts_r)?);
        }
    }
    match layout {
        Layout::Raw => {
            let mut b = Vec::with_capacity(codes.len() + 2 * rows);
            b.extend_from_slice(codes);
            for s in scales {
                b.extend_from_slice(&s.to_le_bytes());
            }
            planes.push((1, vec![(false, b)]));
        }
        Layout::Planes => {
            let d = if want(true) {
                let mut d = vec![0u8; codes.len()];
                delta::delta_xor(codes, &mut d, row_bytes);
                Some(d)
            } else {
                None
            };
            for cols in byte_plane_columns(bits, g) {
                let mut vars = Vec::new();
                for (flag, m) in [(false, Some(codes)), (true, d.as_deref())] {
                    if let (true, Some(m)) = (want(flag), m) {
                        let mut p = vec![0u8; rows * cols.len()];
                        delta::gather_columns(m, row_bytes, &cols, &mut p);
                        vars.push((flag, p));
                    }
                }
                planes.push((cols.len(), vars));
            }
        }
        Layout::Lattice => {
            for (is16, off) in stages(bits, g) {
                let w = if is16 { 2 * g } else { g };
                let mut coords = vec![0u8; rows * 8 * g];
                let mut shifts = vec![0u8; rows * g];
                for t in 0..rows {
                    let cb = &codes[t * row_bytes + off..t * row_bytes + off + w];
                    let co = as_i8_mut(&mut coords[t * 8 * g..(t + 1) * 8 * g]);
                    let sh = &mut shifts[t * g..(t + 1) * g];
                    if is16 {
                        delta::expand16(cb, co, sh);
                    } else {
                        delta::expand8(cb, co, sh);
                    }
                }
                let mut cvars = Vec::new();
                let mut svars = Vec::new();
                for &flag in deltas {
                    let (mut c, s) = if flag {
                        let mut c = vec![0u8; coords.len()];
                        delta::delta_sub(&coords, &mut c, 8 * g);
                        let mut s = vec![0u8; shifts.len()];
                        delta::delta_xor(&shifts, &mut s, g);
                        (c, s)
                    } else {
                        (coords.clone(), shifts.clone())
                    };
                    delta::zigzag8(&mut c);
                    let mut pc = vec![0u8; c.len()];
                    delta::gather_columns(&c, 8 * g, &(0..8 * g).collect::<Vec<_>>(), &mut pc);
                    let mut ps = vec![0u8; s.len()];
                    delta::gather_columns(&s, g, &(0..g).collect::<Vec<_>>(), &mut ps);
                    cvars.push((flag, pc));
                    svars.push((flag, ps));
                }
                planes.push((8 * g, cvars));
                planes.push((g, svars));
            }
        }
    }

    for (cols, vars) in &planes {
        let v: Vec<(bool, &[u8])> = vars.iter().map(|(d, p)| (*d, p.as_slice())).collect();
        let opts_here = if layout == Layout::Raw
            && matches!(opts.coding, PlaneCoding::Auto | PlaneCoding::Best)
        {
            // One block of mixed bytes: zstd (measured below rANS's order-0 model on it).
            PackOptions {
                coding: PlaneCoding::Whole(Coder::Zstd),
                ..*opts
            }
        } else {
            *opts
        };
        coded.push(code_plane(&v, rows, *cols, &opts_here)?);
    }
    if layout != Layout::Raw {
        // The two scale planes, with and without the u16 delta; the pair that codes smaller.
        let mut best: Option<(bool, CodedPlane, CodedPlane)> = None;
        for &flag in opts.scale_delta.candidates() {
            let s: std::borrow::Cow<[u16]> = if flag {
                let mut d = vec![0u16; rows];
                delta::delta_zigzag16(scales, &mut d);
                d.into()
            } else {
                scales.into()
            };
            let lo: Vec<u8> = s.iter().map(|v| *v as u8).collect();
            let hi: Vec<u8> = s.iter().map(|v| (*v >> 8) as u8).collect();
            let opts_s = PackOptions {
                token_delta: Choice::Off,
                ..*opts
            };
            let a = code_plane(&[(false, &lo)], rows, 1, &opts_s)?;
            let b = code_plane(&[(false, &hi)], rows, 1, &opts_s)?;
            if best
                .as_ref()
                .map_or(true, |(_, x, y)| a.size() + b.size() < x.size() + y.size())
            {
                best = Some((flag, a, b));
            }
        }
        let (flag, a, b) = best.expect("at least one candidate");
        if flag {
            flags |= FLAG_SCALE_DELTA;
        }
        coded.push(a);
        coded.push(b);
    }

    let mut out =
        Vec::with_capacity(PACK_HEADER + coded.iter().map(|c| c.size()).sum::<usize>() + 4);
    out.extend_from_slice(PACK_MAGIC);
    out.extend_from_slice(&[PACK_VERSION, bits, layout as u8, flags]);
    out.extend_from_slice(&(refs.map_or(rows, |r| r.len()) as u64).to_le_bytes());
    out.extend_from_slice(&(row_bytes as u32).to_le_bytes());
    out.extend_from_slice(&[coded.len() as u8, 0, 0, 0]);
    for c in &coded {
        out.push(c.coder.tag());
        out.push(c.delta as u8);
        put_varint(&mut out, c.parts.len() as u64);
        for part in &c.parts {
            put_varint(&mut out, part.len() as u64);
        }
    }
    for part in coded.iter().flat_map(|c| &c.parts) {
        out.extend_from_slice(part);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// View bytes as i8 (same size and alignment).
fn as_i8_mut(b: &mut [u8]) -> &mut [i8] {
    // SAFETY: u8 and i8 have the same size, alignment and validity (every bit pattern).
    unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr() as *mut i8, b.len()) }
}

fn bytes_as_i8(b: &[u8]) -> &[i8] {
    // SAFETY: as in `as_i8_mut`.
    unsafe { std::slice::from_raw_parts(b.as_ptr() as *const i8, b.len()) }
}

/// The header fields of a packed stream, read without decoding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedInfo {
    /// Bit width of the codes.
    pub bits: u8,
    /// Rows (tokens).
    pub rows: u64,
    /// Code bytes per row.
    pub row_bytes: usize,
    /// The layout.
    pub layout: Layout,
}

/// Read a packed stream's header fields (checks magic, version and the checksum).
///
/// Args:
///     data: a packed stream.
/// Returns:
///     its bit width, rows, row bytes and layout, or `Corrupt` / `UnsupportedVersion`.
pub fn packed_info(data: &[u8]) -> Result<PackedInfo> {
    if data.len() < 4 || &data[..4] != PACK_MAGIC {
        return Err(NqError::Corrupt(
            "not a packed code stream (bad magic bytes)".into(),
        ));
    }
    if data.len() < PACK_HEADER + 4 {
        return Err(NqError::Corrupt(format!(
            "{} bytes is too short for a packed code stream",
            data.len()
        )));
    }
    let version = data[4];
    if version > PACK_VERSION {
        return Err(NqError::UnsupportedVersion(format!(
            "packed code stream version {version} is newer than this build reads ({PACK_VERSION}); upgrade nexusquant"
        )));
    }
    if version == 0 {
        return Err(NqError::Corrupt(
            "packed code stream version 0 does not exist".into(),
        ));
    }
    let body = &data[..data.len() - 4];
    let crc = u32::from_le_bytes(data[data.len() - 4..].try_into().unwrap());
    if crc32fast::hash(body) != crc {
        return Err(NqError::Corrupt(
            "packed code stream checksum mismatch (the data is damaged)".into(),
        ));
    }
    let bits = data[5];
    let layout = Layout::from_u8(data[6])?;
    let rows = u64::from_le_bytes(data[8..16].try_into().unwrap());
    let row_bytes = u32::from_le_bytes(data[16..20].try_into().unwrap()) as usize;
    if !(1..=4).contains(&bits)
        || row_bytes == 0
        || row_bytes % bits as usize != 0
        || row_bytes > MAX_ROW_BYTES
    {
        return Err(NqError::Corrupt(format!(
            "packed code stream header holds bits={bits}, row_bytes={row_bytes}"
        )));
    }
    Ok(PackedInfo {
        bits,
        rows,
        row_bytes,
        layout,
    })
}

/// Unpack a stream written by [`pack_codes`].
///
/// Args:
///     data: the packed bytes.
///     max_decoded: the most bytes of codes + scales the caller accepts (see
///         [`DEFAULT_MAX_UNPACKED`]); every part is also checked against what its stored bytes can
///         hold before anything is allocated.
/// Returns:
///     the codes and scales, or `Corrupt` (damaged, truncated or foreign bytes, a size over the
///     limit) or `UnsupportedVersion`.
pub fn unpack_codes(data: &[u8], max_decoded: usize) -> Result<Unpacked> {
    let PackedInfo {
        bits,
        rows,
        row_bytes,
        layout,
    } = packed_info(data)?;
    let body = &data[..data.len() - 4];
    let flags = data[7];
    if flags & !(FLAG_SCALE_DELTA | FLAG_DEDUP) != 0 || (layout == Layout::Raw && flags != 0) {
        return Err(NqError::Corrupt(format!(
            "packed code stream has unknown flags {flags:#x}"
        )));
    }
    let total = (rows as u128) * (row_bytes as u128 + 2);
    if total > max_decoded as u128 {
        return Err(NqError::Corrupt(format!(
            "packed code stream claims {rows} rows of {row_bytes} + 2 bytes, more than the limit of {max_decoded} bytes"
        )));
    }
    let total_rows = rows as usize;
    let g = row_bytes / bits as usize;
    let n_refs = if flags & FLAG_DEDUP != 0 { 4 } else { 0 };
    // Column counts of all planes: the reference planes (one column of total_rows), then the
    // layout's planes (of the distinct rows, which the references tell).
    let cols: Vec<usize> = std::iter::repeat(1)
        .take(n_refs)
        .chain(plane_cols(layout, bits, g, row_bytes))
        .collect();
    let nplanes = data[20] as usize;
    if nplanes != cols.len() || data[21..24] != [0, 0, 0] {
        return Err(NqError::Corrupt(format!(
            "packed code stream has {nplanes} planes, its layout has {}",
            cols.len()
        )));
    }
    let code_planes = if layout == Layout::Raw {
        n_refs..n_refs + 1
    } else {
        n_refs..nplanes - 2
    };
    // Plane directory.
    let mut pos = PACK_HEADER;
    let mut dir: Vec<(Coder, bool, Vec<usize>)> = Vec::with_capacity(nplanes);
    let mut stored_total = 0u128;
    let trunc = || NqError::Corrupt("packed plane directory is truncated".into());
    for (i, &c) in cols.iter().enumerate() {
        let head = body.get(pos..pos + 2).ok_or_else(trunc)?;
        pos += 2;
        let coder = Coder::from_tag(head[0])?;
        let delta = match head[1] {
            0 => false,
            1 if code_planes.contains(&i) && layout != Layout::Raw => true,
            t => {
                return Err(NqError::Corrupt(format!(
                    "packed plane {i} has transform {t}"
                )))
            }
        };
        // The raw layout's one plane is never split.
        let ncols = if layout == Layout::Raw { 1 } else { c };
        let parts = get_varint(body, &mut pos, "packed plane part count")?;
        if parts != 1 && parts != ncols as u64 {
            return Err(NqError::Corrupt(format!(
                "packed plane {i} has {parts} parts; it has {ncols} columns"
            )));
        }
        let mut lens = Vec::with_capacity(parts as usize);
        for _ in 0..parts {
            let l = get_varint(body, &mut pos, "packed part length")?;
            if l > body.len() as u64 {
                return Err(NqError::Corrupt(
                    "packed part is longer than the stream".into(),
                ));
            }
            stored_total += l as u128;
            lens.push(l as usize);
        }
        dir.push((coder, delta, lens));
    }
    if stored_total != (body.len() - pos) as u128 {
        return Err(NqError::Corrupt(format!(
            "packed parts add up to {stored_total} bytes, the stream holds {}",
            body.len() - pos
        )));
    }
    // Decode every plane, each part checked against the bounds before its buffer is allocated.
    let mut planes: Vec<Vec<u8>> = Vec::with_capacity(nplanes);
    let mut rows = total_rows;
    let mut index: Option<Vec<u32>> = None;
    for (i, (&c, (coder, _, lens))) in cols.iter().zip(&dir).enumerate() {
        if n_refs > 0 && i == n_refs {
            let refs: Vec<u32> = (0..total_rows)
                .map(|t| (0..4).fold(0u32, |v, k| v | (planes[k][t] as u32) << (8 * k)))
                .collect();
            let (distinct, idx) = undedup_indices(&refs)?;
            rows = distinct;
            index = Some(idx);
        }
        let plane_len = if layout == Layout::Raw {
            rows * (row_bytes + 2)
        } else {
            rows * c
        };
        if lens.len() > 1 && rows == 0 {
            return Err(NqError::Corrupt(format!(
                "packed plane {i} is split but has no rows"
            )));
        }
        let part_len = plane_len / lens.len();
        for &l in lens {
            check_decoded_len(*coder, l, part_len, max_decoded)?;
        }
        let mut p = vec![0u8; plane_len];
        let outs: Vec<&mut [u8]> = if part_len == 0 {
            vec![&mut p[..]]
        } else {
            p.chunks_exact_mut(part_len).collect()
        };
        for (o, &l) in outs.into_iter().zip(lens) {
            decode_into(*coder, &body[pos..pos + l], o)?;
            pos += l;
        }
        planes.push(p);
    }
    let planes = planes.split_off(n_refs);
    let dir = &dir[n_refs..];
    let u = rebuild(&planes, dir, layout, bits, row_bytes, rows, flags)?;
    Ok(match index {
        None => u,
        Some(idx) => {
            let mut codes = Vec::with_capacity(total_rows * row_bytes);
            let mut scales = Vec::with_capacity(total_rows);
            for &i in &idx {
                let i = i as usize;
                codes.extend_from_slice(&u.codes[i * row_bytes..(i + 1) * row_bytes]);
                scales.push(u.scales[i]);
            }
            Unpacked {
                bits,
                row_bytes,
                codes,
                scales,
            }
        }
    })
}

/// Codes and scales from decoded planes.
fn rebuild(
    planes: &[Vec<u8>],
    dir: &[(Coder, bool, Vec<usize>)],
    layout: Layout,
    bits: u8,
    row_bytes: usize,
    rows: usize,
    flags: u8,
) -> Result<Unpacked> {
    let g = row_bytes / bits as usize;
    let nplanes = planes.len();
    let mut codes = vec![0u8; rows * row_bytes];
    let mut scales = vec![0u16; rows];
    match layout {
        Layout::Raw => {
            let p = &planes[0];
            codes.copy_from_slice(&p[..rows * row_bytes]);
            for (s, b) in scales.iter_mut().zip(p[rows * row_bytes..].chunks_exact(2)) {
                *s = u16::from_le_bytes([b[0], b[1]]);
            }
            return Ok(Unpacked {
                bits,
                row_bytes,
                codes,
                scales,
            });
        }
        Layout::Planes => {
            // Planes stored as deltas go to their own matrix, undone row-wise (vectorised) and
            // merged: their columns are zero in `codes` and the others zero in `d`.
            let mut d: Option<Vec<u8>> = None;
            for ((cols, p), (_, delta, _)) in
                byte_plane_columns(bits, g).iter().zip(planes).zip(dir)
            {
                let target = if *delta {
                    d.get_or_insert_with(|| vec![0u8; rows * row_bytes])
                } else {
                    &mut codes
                };
                delta::scatter_columns(p, row_bytes, cols, target);
            }
            if let Some(mut d) = d {
                delta::undelta_xor(&mut d, row_bytes);
                for (c, x) in codes.iter_mut().zip(&d) {
                    *c |= x;
                }
            }
        }
        Layout::Lattice => {
            for (k, (is16, off)) in stages(bits, g).into_iter().enumerate() {
                let w = if is16 { 2 * g } else { g };
                let mut coords = vec![0u8; rows * 8 * g];
                delta::scatter_columns(
                    &planes[2 * k],
                    8 * g,
                    &(0..8 * g).collect::<Vec<_>>(),
                    &mut coords,
                );
                let mut shifts = vec![0u8; rows * g];
                delta::scatter_columns(
                    &planes[2 * k + 1],
                    g,
                    &(0..g).collect::<Vec<_>>(),
                    &mut shifts,
                );
                delta::unzigzag8(&mut coords);
                if dir[2 * k].1 {
                    delta::undelta_sub(&mut coords, 8 * g);
                }
                if dir[2 * k + 1].1 {
                    delta::undelta_xor(&mut shifts, g);
                }
                for t in 0..rows {
                    let co = bytes_as_i8(&coords[t * 8 * g..(t + 1) * 8 * g]);
                    let sh = &shifts[t * g..(t + 1) * g];
                    let cb = &mut codes[t * row_bytes + off..t * row_bytes + off + w];
                    if is16 {
                        delta::collapse16(co, sh, cb)?;
                    } else {
                        delta::collapse8(co, sh, cb)?;
                    }
                }
            }
        }
    }
    let (lo, hi) = (&planes[nplanes - 2], &planes[nplanes - 1]);
    for ((s, &l), &h) in scales.iter_mut().zip(lo).zip(hi) {
        *s = l as u16 | (h as u16) << 8;
    }
    if flags & FLAG_SCALE_DELTA != 0 {
        delta::undelta_zigzag16(&mut scales);
    }
    Ok(Unpacked {
        bits,
        row_bytes,
        codes,
        scales,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::E8Codec;
    use proptest::prelude::*;

    fn xorshift(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    /// Skewed bytes: geometric-ish, like code planes.
    fn skewed(n: usize, seed: u64) -> Vec<u8> {
        let mut r = xorshift(seed);
        (0..n)
            .map(|_| (r().trailing_zeros() * 7 % 256) as u8)
            .collect()
    }

    fn real_codes(bits: u8, rows: usize, seed: u64) -> (Vec<u8>, Vec<u16>, usize) {
        let d = 64;
        let mut r = xorshift(seed);
        // A per-column bias plus noise, correlated along tokens, like keys.
        let bias: Vec<f32> = (0..d).map(|_| (r() % 1000) as f32 / 300.0 - 1.6).collect();
        let mut prev = vec![0f32; d];
        let mut x = Vec::with_capacity(rows * d);
        for _ in 0..rows {
            for c in 0..d {
                let noise = (r() % 2000) as f32 / 1000.0 - 1.0;
                prev[c] = 0.6 * prev[c] + noise;
                x.push(bias[c] + prev[c]);
            }
        }
        let codec = E8Codec::new(d, bits, 0).unwrap();
        let enc = codec.encode(&x).unwrap();
        (enc.codes, enc.scales, codec.code_bytes_per_vector())
    }

    fn all_options() -> Vec<PackOptions> {
        let mut v = Vec::new();
        for layout in [Layout::Raw, Layout::Planes, Layout::Lattice] {
            for coding in [
                PlaneCoding::Auto,
                PlaneCoding::Best,
                PlaneCoding::Whole(Coder::Raw),
                PlaneCoding::Whole(Coder::Zstd),
                PlaneCoding::Whole(Coder::Rans),
                PlaneCoding::Columns(Coder::Rans),
                PlaneCoding::Columns(Coder::Zstd),
            ] {
                for token_delta in [Choice::Off, Choice::On, Choice::Auto] {
                    for scale_delta in [Choice::Off, Choice::On] {
                        for dedup_rows in [Choice::Off, Choice::On] {
                            v.push(PackOptions {
                                layout,
                                coding,
                                token_delta,
                                scale_delta,
                                dedup_rows,
                                zstd_level: 1,
                            });
                        }
                    }
                }
            }
        }
        v
    }

    #[test]
    fn rans_round_trips_edge_cases() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![7],
            vec![7; 5],
            vec![0, 255],
            vec![255; 100_000],
            (0..=255u8).collect(),
            (0..100_003u32)
                .map(|i| (i.wrapping_mul(2654435761u32) >> 24) as u8)
                .collect(),
            skewed(65_537, 3),
        ];
        for c in cases {
            let e = rans_encode(&c);
            let d = decode(Coder::Rans, &e, c.len(), usize::MAX).unwrap();
            assert_eq!(d, c);
            let est = rans_estimate(&histogram(&c));
            assert!(
                (est as i64 - e.len() as i64).abs() <= 12,
                "estimate {est}, real {}",
                e.len()
            );
        }
    }

    #[test]
    fn reciprocal_division_is_exact() {
        let mut r = xorshift(11);
        for f in 1u32..4096 {
            let l = 32 - (f - 1).leading_zeros();
            let m = (1u128 << (32 + l)).div_ceil(f as u128) as u64;
            let edge = [
                0u32,
                1,
                f - 1,
                f,
                f + 1,
                u32::MAX,
                u32::MAX - 1,
                (u32::MAX / f) * f,
                (u32::MAX / f) * f - 1,
            ];
            for x in edge.into_iter().chain((0..64).map(|_| r() as u32)) {
                assert_eq!(
                    ((x as u128 * m as u128) >> (32 + l)) as u32,
                    x / f,
                    "x={x} f={f}"
                );
            }
        }
    }

    #[test]
    fn rans_compresses_near_entropy() {
        let c = skewed(1 << 20, 9);
        let h = histogram(&c);
        let n = c.len() as f64;
        let ent: f64 = h
            .iter()
            .filter(|&&v| v > 0)
            .map(|&v| -(v as f64) * (v as f64 / n).log2())
            .sum::<f64>()
            / 8.0;
        let e = rans_encode(&c);
        assert!(
            (e.len() as f64) < ent * 1.005 + 64.0,
            "{} vs entropy {ent}",
            e.len()
        );
    }

    #[test]
    fn decoders_reject_bad_lengths_before_allocating() {
        let data = vec![1u8; 1000];
        for coder in [Coder::Raw, Coder::Zstd, Coder::Rans] {
            let e = encode(coder, &data, 3).unwrap();
            // A claimed length of 2^60 fails on the bound, long before any allocation.
            assert!(matches!(
                decode(coder, &e, 1 << 60, usize::MAX),
                Err(NqError::Corrupt(_))
            ));
            assert!(matches!(
                decode(coder, &e, 1000, 999),
                Err(NqError::Corrupt(_))
            ));
            assert!(matches!(
                decode(coder, &e, 999, usize::MAX),
                Err(NqError::Corrupt(_))
            ));
            assert_eq!(decode(coder, &e, 1000, 1000).unwrap(), data);
        }
        assert!(Coder::from_tag(3).is_err());
    }

    #[test]
    fn damaged_blocks_are_errors_not_panics() {
        let data = skewed(5000, 1);
        for coder in [Coder::Zstd, Coder::Rans] {
            let e = encode(coder, &data, 3).unwrap();
            for cut in 0..e.len() {
                assert!(
                    decode(coder, &e[..cut], data.len(), usize::MAX).is_err(),
                    "{coder:?} cut {cut}"
                );
            }
            let mut caught = 0;
            let mut total = 0;
            for i in 0..e.len() {
                for bit in [0, 3, 7] {
                    let mut b = e.clone();
                    b[i] ^= 1 << bit;
                    total += 1;
                    match decode(coder, &b, data.len(), usize::MAX) {
                        Err(NqError::Corrupt(_)) => caught += 1,
                        Err(e) => panic!("{e}"),
                        Ok(d) => assert_eq!(d.len(), data.len()),
                    }
                }
            }
            // Neither block carries a checksum (the packer and the file format add one); rANS's
            // end-state check alone catches most flips, zstd (no frame checksum) fewer.
            if coder == Coder::Rans {
                assert!(caught * 2 > total, "{coder:?}: {caught} of {total}");
            }
        }
    }

    #[test]
    fn every_layout_round_trips_real_codes() {
        for bits in 1..=4u8 {
            let (codes, scales, rb) = real_codes(bits, 300, bits as u64);
            for opts in all_options() {
                let p = pack_codes(&codes, rb, &scales, bits, &opts).unwrap();
                let u = unpack_codes(&p, DEFAULT_MAX_UNPACKED).unwrap();
                assert_eq!(u.codes, codes, "{opts:?}");
                assert_eq!(u.scales, scales, "{opts:?}");
                assert_eq!((u.bits, u.row_bytes), (bits, rb));
            }
        }
    }

    #[test]
    fn repeated_rows_are_stored_once() {
        let (codes, scales, rb) = real_codes(2, 512, 3);
        // Tokens 256.. repeat tokens 0..256: the second half (4.6 KB raw) costs under a byte a row.
        let mut c2 = codes[..256 * rb].to_vec();
        c2.extend_from_slice(&codes[..256 * rb]);
        let mut s2 = scales[..256].to_vec();
        s2.extend_from_slice(&scales[..256]);
        let half = pack_codes(&c2[..256 * rb], rb, &s2[..256], 2, &PackOptions::default()).unwrap();
        let full = pack_codes(&c2, rb, &s2, 2, &PackOptions::default()).unwrap();
        assert!(
            full.len() < half.len() + 256,
            "{} vs {}",
            full.len(),
            half.len()
        );
        let u = unpack_codes(&full, DEFAULT_MAX_UNPACKED).unwrap();
        assert_eq!((u.codes, u.scales), (c2, s2));
        // References to rows that do not exist yet are refused.
        assert!(undedup_indices(&[1]).is_err());
        assert!(undedup_indices(&[0, 0, 2]).is_ok());
        assert!(undedup_indices(&[0, 5]).is_err());
    }

    #[test]
    fn empty_streams_round_trip() {
        for opts in all_options() {
            let p = pack_codes(&[], 16, &[], 2, &opts).unwrap();
            let u = unpack_codes(&p, DEFAULT_MAX_UNPACKED).unwrap();
            assert!(u.codes.is_empty() && u.scales.is_empty());
            assert_eq!(u.row_bytes, 16);
        }
    }

    #[test]
    fn default_packs_smaller_than_raw() {
        let (codes, scales, rb) = real_codes(2, 2048, 5);
        let p = pack_codes(&codes, rb, &scales, 2, &PackOptions::default()).unwrap();
        assert!(
            p.len() < codes.len() + 2 * scales.len(),
            "{} bytes",
            p.len()
        );
    }

    #[test]
    fn packed_damage_is_always_an_error() {
        let (codes, scales, rb) = real_codes(2, 64, 7);
        for opts in [
            PackOptions::default(),
            PackOptions {
                layout: Layout::Lattice,
                token_delta: Choice::On,
                ..Default::default()
            },
        ] {
            let p = pack_codes(&codes, rb, &scales, 2, &opts).unwrap();
            for cut in 0..p.len() {
                assert!(matches!(
                    unpack_codes(&p[..cut], DEFAULT_MAX_UNPACKED),
                    Err(NqError::Corrupt(_))
                ));
            }
            for i in 0..p.len() {
                for bit in 0..8 {
                    let mut b = p.clone();
                    b[i] ^= 1 << bit;
                    let r = unpack_codes(&b, DEFAULT_MAX_UNPACKED);
                    // The CRC catches every single flip, except in the version byte where a
                    // higher version is reported as such.
                    assert!(
                        matches!(
                            r,
                            Err(NqError::Corrupt(_)) | Err(NqError::UnsupportedVersion(_))
                        ),
                        "byte {i} bit {bit}: {r:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn fuzz_found_huge_row_bytes_fails_fast() {
        // cargo-fuzz (unpack_codes): zero rows and row_bytes near 2^32 once allocated 11 GB.
        let mut p = b"NQPK\x01\x03\x01\x02".to_vec();
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&0xFFFF_FFDEu32.to_le_bytes());
        p.extend_from_slice(&[3, 0, 0, 0]);
        let crc = crc32fast::hash(&p);
        p.extend_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            unpack_codes(&p, DEFAULT_MAX_UNPACKED),
            Err(NqError::Corrupt(_))
        ));
        assert!(pack_codes(&[], MAX_ROW_BYTES + 4, &[], 4, &PackOptions::default()).is_err());
    }

    #[test]
    fn absurd_sizes_fail_fast() {
        let (codes, scales, rb) = real_codes(1, 16, 1);
        let mut p = pack_codes(&codes, rb, &scales, 1, &PackOptions::default()).unwrap();
        // Claim 2^60 rows and fix the checksum: the limit check fires before any allocation.
        p[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let n = p.len();
        let crc = crc32fast::hash(&p[..n - 4]);
        p[n - 4..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            unpack_codes(&p, DEFAULT_MAX_UNPACKED),
            Err(NqError::Corrupt(_))
        ));
        assert!(matches!(
            unpack_codes(&p, usize::MAX),
            Err(NqError::Corrupt(_))
        ));
        // A newer version says so.
        let mut q = pack_codes(&codes, rb, &scales, 1, &PackOptions::default()).unwrap();
        q[4] = 9;
        assert!(matches!(
            unpack_codes(&q, DEFAULT_MAX_UNPACKED),
            Err(NqError::UnsupportedVersion(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn rans_round_trips(data in proptest::collection::vec(any::<u8>(), 0..3000), skew in 0u32..8) {
            let d: Vec<u8> = data.iter().map(|&b| b >> skew).collect();
            let e = rans_encode(&d);
            prop_assert_eq!(decode(Coder::Rans, &e, d.len(), usize::MAX).unwrap(), d);
        }

        #[test]
        fn zstd_round_trips(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let e = encode(Coder::Zstd, &data, 3).unwrap();
            prop_assert_eq!(decode(Coder::Zstd, &e, data.len(), usize::MAX).unwrap(), data);
        }

        #[test]
        fn random_valid_codes_round_trip(bits in 1u8..=4, rows in 0usize..40, groups in 1usize..5, seed in any::<u64>(), which in 0usize..252, dups in 0usize..4) {
            // Any code bytes are valid codes (every u16 / u8 is a codeword), so random bytes test
            // every layout, including the lattice expansion.
            let mut r = xorshift(seed);
            let rb = groups * bits as usize;
            // dups > 0 repeats earlier rows (runs and single rows), for the deduplication.
            let mut codes: Vec<u8> = (0..rows * rb).map(|_| r() as u8).collect();
            let mut scales: Vec<u16> = (0..rows).map(|_| r() as u16).collect();
            for t in 1..rows {
                if dups > 0 && r() % (dups as u64 + 1) != 0 {
                    let src = (r() as usize) % t;
                    codes.copy_within(src * rb..(src + 1) * rb, t * rb);
                    scales[t] = scales[src];
                }
            }
            let opts = all_options()[which];
            let p = pack_codes(&codes, rb, &scales, bits, &opts).unwrap();
            let u = unpack_codes(&p, DEFAULT_MAX_UNPACKED).unwrap();
            prop_assert_eq!(u.codes, codes);
            prop_assert_eq!(u.scales, scales);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200), n in 0usize..500) {
            let _ = decode(Coder::Rans, &data, n, 1 << 20);
            let _ = decode(Coder::Zstd, &data, n, 1 << 20);
            let _ = unpack_codes(&data, 1 << 20);
        }
    }
}
