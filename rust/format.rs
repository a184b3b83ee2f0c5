//! The `.nqkv` container: a compressed KV cache on disk. The byte layout is specified in
//! `docs/FORMAT.md` (version 1); this module is its only implementation.
//!
//! Python decides what goes in (a JSON metadata blob, the prefix token ids, per-layer arrays);
//! this module owns the bytes: fixed little-endian headers, a CRC-32 on every header and payload,
//! an atomic writer and a streaming reader that checks every length against the real file size
//! before it allocates, so a truncated, damaged, foreign or newer file is an error, never a panic,
//! a hang or a huge allocation.

use crate::entropy::{self, Coder};
use crate::error::{NqError, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The file's first 8 bytes. Like PNG's: a non-ASCII first byte, CR LF and ^Z catch text-mode
/// transfers, and no text file starts with it.
pub const MAGIC: [u8; 8] = *b"\x89NQKV\r\n\x1a";
/// The format version this build writes and the newest it reads.
pub const VERSION: u16 = 1;
/// Bytes of the file header.
pub const FILE_HEADER_LEN: usize = 64;
/// Bytes of a section header.
pub const SECTION_HEADER_LEN: usize = 32;
/// Default limit on one section's decoded size: 4 GiB (a layer of a 70B model's cache at 128K
/// tokens in fp16 is under 1 GiB, compressed far less).
pub const DEFAULT_MAX_SECTION_BYTES: u64 = 1 << 32;
/// Most sections a file may declare (a model has at most a few hundred layers).
pub const MAX_SECTIONS: u32 = 1 << 20;
/// Section kind of the metadata: UTF-8 JSON; the first section of every file.
pub const KIND_META: [u8; 4] = *b"META";
/// Section kind of the prefix token ids: u32 little-endian.
pub const KIND_TOKENS: [u8; 4] = *b"TOKN";
/// Section kind of one layer's arrays: an array directory (see [`encode_arrays`]).
pub const KIND_LAYER: [u8; 4] = *b"LAYR";

fn corrupt(msg: impl Into<String>) -> NqError {
    NqError::Corrupt(msg.into())
}

fn kind_str(k: &[u8; 4]) -> String {
    k.iter()
        .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
        .collect()
}

/// Whether 4 bytes are a valid section kind: ASCII capital letters and digits.
///
/// Args:
///     k: the kind bytes.
/// Returns:
///     true for kinds such as `META`, `TOKN`, `LAYR`.
pub fn is_valid_kind(k: &[u8; 4]) -> bool {
    k.iter()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

// =============================================================================================
// Headers
// =============================================================================================

/// The fixed file header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHeader {
    /// Format version of the file.
    pub version: u16,
    /// Flags (none defined in version 1; must be 0).
    pub flags: u16,
    /// How many sections follow.
    pub section_count: u32,
    /// The file's total length in bytes.
    pub total_len: u64,
}

impl FileHeader {
    /// Serialize: magic, version, flags, section count, total length, 36 zero bytes, CRC-32.
    ///
    /// Returns:
    ///     the 64 header bytes.
    pub fn to_bytes(&self) -> [u8; FILE_HEADER_LEN] {
        let mut b = [0u8; FILE_HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.section_count.to_le_bytes());
        b[16..24].copy_from_slice(&self.total_len.to_le_bytes());
        let crc = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parse and check a file header.
    ///
    /// Args:
    ///     b: the first bytes of the file (fewer than 64 means truncated).
    ///     real_len: the file's real length.
    /// Returns:
    ///     the header, `UnsupportedVersion` for a newer version, or `Corrupt` naming the problem
    ///     (not an .nqkv file, truncated, checksum, length mismatch, reserved bits set).
    pub fn parse(b: &[u8], real_len: u64) -> Result<FileHeader> {
        if b.len() < 8 || b[..8] != MAGIC {
            return Err(corrupt("not an .nqkv file (bad magic bytes)"));
        }
        if b.len() < FILE_HEADER_LEN {
            return Err(corrupt(format!(
                "file is truncated: {} bytes, shorter than the {FILE_HEADER_LEN}-byte header",
                b.len()
            )));
        }
        let crc = u32::from_le_bytes(b[60..64].try_into().unwrap());
        let version = u16::from_le_bytes(b[8..10].try_into().unwrap());
        if crc32fast::hash(&b[..60]) != crc {
            return Err(corrupt(
                "file header checksum mismatch (the header is damaged)",
            ));
        }
        // Checked after the CRC, so a damaged version field reads as damage, not as a new version.
        if version > VERSION {
            return Err(NqError::UnsupportedVersion(format!(
                ".nqkv format version {version} is newer than this build reads (up to {VERSION}); upgrade nexusquant"
            )));
        }
        if version == 0 {
            return Err(corrupt(".nqkv format version 0 does not exist"));
        }
        let flags = u16::from_le_bytes(b[10..12].try_into().unwrap());
        let section_count = u32::from_le_bytes(b[12..16].try_into().unwrap());
        let total_len = u64::from_le_bytes(b[16..24].try_into().unwrap());
        if flags != 0 {
            return Err(corrupt(format!(
                "file header has unknown flags {flags:#06x}"
            )));
        }
        if b[24..60].iter().any(|&v| v != 0) {
            return Err(corrupt("file header's reserved bytes are not zero"));
        }
        if total_len != real_len {
            return Err(corrupt(format!(
                "file is {real_len} bytes but its header says {total_len} (truncated or appended to)"
            )));
        }
        if section_count == 0 || section_count > MAX_SECTIONS {
            return Err(corrupt(format!(
                "file header declares {section_count} sections"
            )));
        }
        let min_len = FILE_HEADER_LEN as u64 + section_count as u64 * SECTION_HEADER_LEN as u64;
        if min_len > real_len {
            return Err(corrupt(format!(
                "file header declares {section_count} sections, which cannot fit in {real_len} bytes"
            )));
        }
        Ok(FileHeader {
            version,
            flags,
            section_count,
            total_len,
        })
    }
}

/// A section header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionHeader {
    /// Kind, 4 ASCII capitals/digits (`META`, `TOKN`, `LAYR`, …).
    pub kind: [u8; 4],
    /// The payload's coder.
    pub coder: Coder,
    /// Flags (none defined in version 1; must be 0).
    pub flags: u8,
    /// Bytes of payload that follow the header.
    pub stored_len: u64,
    /// Bytes the payload decodes to.
    pub decoded_len: u64,
    /// CRC-32 of the stored payload.
    pub payload_crc: u32,
}

impl SectionHeader {
    /// Serialize: kind, coder tag, flags, 2 zero bytes, stored length, decoded length, payload
    /// CRC-32, CRC-32 of the first 28 bytes.
    ///
    /// Returns:
    ///     the 32 header bytes.
    pub fn to_bytes(&self) -> [u8; SECTION_HEADER_LEN] {
        let mut b = [0u8; SECTION_HEADER_LEN];
        b[0..4].copy_from_slice(&self.kind);
        b[4] = self.coder.tag();
        b[5] = self.flags;
        b[8..16].copy_from_slice(&self.stored_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.decoded_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parse and check a section header against the bytes left in the file and the size cap.
    ///
    /// Args:
    ///     b: the 32 header bytes.
    ///     index: the section's index (for messages).
    ///     remaining: file bytes after this header.
    ///     max_decoded: the largest decoded payload the reader accepts.
    /// Returns:
    ///     the header, or `Corrupt` naming the section and the problem.
    pub fn parse(
        b: &[u8; SECTION_HEADER_LEN],
        index: u32,
        remaining: u64,
        max_decoded: u64,
    ) -> Result<SectionHeader> {
        let crc = u32::from_le_bytes(b[28..32].try_into().unwrap());
        if crc32fast::hash(&b[..28]) != crc {
            return Err(corrupt(format!(
                "section {index}: header checksum mismatch (the header is damaged)"
            )));
        }
        let kind: [u8; 4] = b[0..4].try_into().unwrap();
        let name = kind_str(&kind);
        if !is_valid_kind(&kind) {
            return Err(corrupt(format!(
                "section {index}: kind {name:?} is not 4 ASCII capitals or digits"
            )));
        }
        let coder =
            Coder::from_tag(b[4]).map_err(|e| corrupt(format!("section {index} ({name}): {e}")))?;
        let flags = b[5];
        if flags != 0 || b[6] != 0 || b[7] != 0 {
            return Err(corrupt(format!(
                "section {index} ({name}): unknown flags or nonzero reserved bytes"
            )));
        }
        let stored_len = u64::from_le_bytes(b[8..16].try_into().unwrap());
        let decoded_len = u64::from_le_bytes(b[16..24].try_into().unwrap());
        let payload_crc = u32::from_le_bytes(b[24..28].try_into().unwrap());
        if stored_len > remaining {
            return Err(corrupt(format!(
                "section {index} ({name}): claims {stored_len} stored bytes but only {remaining} remain in the file"
            )));
        }
        if decoded_len > max_decoded {
            return Err(corrupt(format!(
                "section {index} ({name}): claims {decoded_len} decoded bytes, more than the limit of {max_decoded}"
            )));
        }
        let most = entropy::max_decoded_len(coder, stored_len);
        if decoded_len > most || (coder == Coder::Raw && decoded_len != stored_len) {
            return Err(corrupt(format!(
                "section {index} ({name}): {stored_len} {} bytes cannot decode to the claimed {decoded_len}",
                coder.name()
            )));
        }
        Ok(SectionHeader {
            kind,
            coder,
            flags,
            stored_len,
            decoded_len,
            payload_crc,
        })
    }
}

// =============================================================================================
// Array directory (the payload of a LAYR section)
// =============================================================================================

/// Element type of an array in a section's directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    /// Opaque bytes (e.g. a packed code stream), 1-byte elements.
    Bytes = 0,
    /// bool, one byte (0 or 1).
    Bool = 1,
    /// u8.
    U8 = 2,
    /// i8.
    I8 = 3,
    /// u16.
    U16 = 4,
    /// i16.
    I16 = 5,
    /// u32.
    U32 = 6,
    /// i32.
    I32 = 7,
    /// u64.
    U64 = 8,
    /// i64.
    I64 = 9,
    /// IEEE half.
    F16 = 10,
    /// bfloat16 (stored as its 16 bits).
    BF16 = 11,
    /// f32.
    F32 = 12,
    /// f64.
    F64 = 13,
}

const DTYPES: [(DType, &str, usize); 14] = [
    (DType::Bytes, "bytes", 1),
    (DType::Bool, "bool", 1),
    (DType::U8, "uint8", 1),
    (DType::I8, "int8", 1),
    (DType::U16, "uint16", 2),
    (DType::I16, "int16", 2),
    (DType::U32, "uint32", 4),
    (DType::I32, "int32", 4),
    (DType::U64, "uint64", 8),
    (DType::I64, "int64", 8),
    (DType::F16, "float16", 2),
    (DType::BF16, "bfloat16", 2),
    (DType::F32, "float32", 4),
    (DType::F64, "float64", 8),
];

impl DType {
    /// The dtype of a stored code.
    ///
    /// Args:
    ///     v: the code byte.
    /// Returns:
    ///     the dtype, or `Corrupt`.
    pub fn from_u8(v: u8) -> Result<DType> {
        DTYPES
            .get(v as usize)
            .map(|d| d.0)
            .ok_or_else(|| corrupt(format!("unknown array dtype code {v}")))
    }

    /// The dtype of a numpy-style name ("float16", "uint8", …, "bytes", "bfloat16").
    ///
    /// Args:
    ///     name: the name.
    /// Returns:
    ///     the dtype, or `InvalidArgument`.
    pub fn from_name(name: &str) -> Result<DType> {
        DTYPES
            .iter()
            .find(|d| d.1 == name)
            .map(|d| d.0)
            .ok_or_else(|| NqError::InvalidArgument(format!("unsupported array dtype {name:?}")))
    }

    /// The numpy-style name.
    pub fn name(self) -> &'static str {
        DTYPES[self as usize].1
    }

    /// Bytes per element.
    pub fn itemsize(self) -> usize {
        DTYPES[self as usize].2
    }
}

/// Most dimensions of an array in a directory.
pub const MAX_NDIM: usize = 8;
/// Longest array name in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// One array of a section's directory, borrowing its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArrayRef<'a> {
    /// Its name, unique within the section.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (C order).
    pub shape: Vec<u64>,
    /// `product(shape) × itemsize` bytes, little-endian elements.
    pub data: &'a [u8],
}

/// Build a directory payload: u32 count; per array: u16 name length, the UTF-8 name, u8 dtype,
/// u8 ndim, ndim × u64 shape, u64 offset and u64 length of its bytes in the data area; then the
/// data area, the arrays back to back in directory order.
///
/// Args:
///     arrays: the arrays (names unique, at most 256 bytes; at most 8 dimensions; data length =
///         product(shape) × itemsize).
/// Returns:
///     the payload, or `InvalidArgument`.
pub fn encode_arrays(arrays: &[ArrayRef<'_>]) -> Result<Vec<u8>> {
    let mut dir = Vec::new();
    dir.extend_from_slice(&(arrays.len() as u32).to_le_bytes());
    let mut offset = 0u64;
    let mut names = std::collections::HashSet::new();
    for a in arrays {
        if a.name.is_empty() || a.name.len() > MAX_NAME_LEN || !names.insert(a.name.as_str()) {
            return Err(NqError::InvalidArgument(format!(
                "array name {:?} is empty, longer than {MAX_NAME_LEN} bytes or repeated",
                a.name
            )));
        }
        if a.shape.len() > MAX_NDIM {
            return Err(NqError::InvalidArgument(format!(
                "array {:?} has more than {MAX_NDIM} dimensions",
                a.name
            )));
        }
        let n = a
            .shape
            .iter()
            .try_fold(a.dtype.itemsize() as u64, |p, &d| p.checked_mul(d));
        if n != Some(a.data.len() as u64) {
            return Err(NqError::InvalidArgument(format!(
                "array {:?}: {} bytes do not match shape {:?} of {}",
                a.name,
                a.data.len(),
                a.shape,
                a.dtype.name()
            )));
        }
        dir.extend_from_slice(&(a.name.len() as u16).to_le_bytes());
        dir.extend_from_slice(a.name.as_bytes());
        dir.push(a.dtype as u8);
        dir.push(a.shape.len() as u8);
        for &d in &a.shape {
            dir.extend_from_slice(&d.to_le_bytes());
        }
        dir.extend_from_slice(&offset.to_le_bytes());
        dir.extend_from_slice(&(a.data.len() as u64).to_le_bytes());
        offset += a.data.len() as u64;
    }
    dir.reserve(offset as usize);
    for a in arrays {
        dir.extend_from_slice(a.data);
    }
    Ok(dir)
}

/// Parse a directory payload written by [`encode_arrays`], borrowing the arrays' bytes.
///
/// Args:
///     payload: the decoded section payload.
/// Returns:
///     the arrays, or `Corrupt` (truncated directory, bad dtype or name, a length that does not
///     match the shape, arrays that overlap, leave gaps or run past the payload).
pub fn decode_arrays(payload: &[u8]) -> Result<Vec<ArrayRef<'_>>> {
    let mut p = 0usize;
    let take = |p: &mut usize, n: usize| -> Result<&[u8]> {
        let s = payload
            .get(
                *p..p
                    .checked_add(n)
                    .ok_or_else(|| corrupt("array directory is truncated"))?,
            )
            .ok_or_else(|| corrupt("array directory is truncated"))?;
        *p += n;
        Ok(s)
    };
    let count = u32::from_le_bytes(take(&mut p, 4)?.try_into().unwrap()) as usize;
    // Every entry takes at least 22 bytes, so the count is bounded by the payload before any
    // allocation that depends on it.
    if count > payload.len() / 22 {
        return Err(corrupt(format!(
            "array directory claims {count} arrays in {} bytes",
            payload.len()
        )));
    }
    let mut entries = Vec::with_capacity(count);
    let mut names = std::collections::HashSet::new();
    for i in 0..count {
        let nl = u16::from_le_bytes(take(&mut p, 2)?.try_into().unwrap()) as usize;
        if nl == 0 || nl > MAX_NAME_LEN {
            return Err(corrupt(format!("array {i}: name length {nl}")));
        }
        let name = std::str::from_utf8(take(&mut p, nl)?)
            .map_err(|_| corrupt(format!("array {i}: name is not UTF-8")))?
            .to_string();
        if !names.insert(name.clone()) {
            return Err(corrupt(format!("array name {name:?} is repeated")));
        }
        let dtype = DType::from_u8(take(&mut p, 1)?[0])?;
        let ndim = take(&mut p, 1)?[0] as usize;
        if ndim > MAX_NDIM {
            return Err(corrupt(format!("array {name:?} has {ndim} dimensions")));
        }
        let mut shape = Vec::with_capacity(ndim);
        for _ in 0..ndim {
            shape.push(u64::from_le_bytes(take(&mut p, 8)?.try_into().unwrap()));
        }
        let offset = u64::from_le_bytes(take(&mut p, 8)?.try_into().unwrap());
        let len = u64::from_le_bytes(take(&mut p, 8)?.try_into().unwrap());
        let n = shape
            .iter()
            .try_fold(dtype.itemsize() as u64, |a, &d| a.checked_mul(d));
        if n != Some(len) {
            return Err(corrupt(format!(
                "array {name:?}: {len} bytes do not match shape {shape:?} of {}",
                dtype.name()
            )));
        }
        entries.push((name, dtype, shape, offset, len));
    }
    let data = &payload[p..];
    let mut expect = 0u64;
    let mut out = Vec::with_capacity(count);
    for (name, dtype, shape, offset, len) in entries {
        if offset != expect
            || offset
                .checked_add(len)
                .map_or(true, |e| e > data.len() as u64)
        {
            return Err(corrupt(format!(
                "array {name:?}: bytes at offset {offset}, length {len} are out of place in a data area of {} bytes",
                data.len()
            )));
        }
        out.push(ArrayRef {
            name,
            dtype,
            shape,
            data: &data[offset as usize..(offset + len) as usize],
        });
        expect = offset + len;
    }
    if expect != data.len() as u64 {
        return Err(corrupt(format!(
            "array data area holds {} bytes, its directory accounts for {expect}",
            data.len()
        )));
    }
    Ok(out)
}

// =============================================================================================
// Writer
// =============================================================================================

/// Writes an `.nqkv` file atomically: sections stream into a temporary file in the same
/// directory; [`NqkvWriter::finish`] writes the header, fsyncs, renames it over the target and
/// fsyncs the directory. A crash or an error before the rename leaves the old file (or none);
/// dropping an unfinished writer removes the temporary file.
pub struct NqkvWriter {
    file: Option<File>,
    tmp: PathBuf,
    path: PathBuf,
    sections: u32,
    len: u64,
    zstd_level: i32,
}

impl NqkvWriter {
    /// Start writing `path`.
    ///
    /// Args:
    ///     path: the final file name; its directory must exist.
    ///     zstd_level: level for zstd-coded sections.
    /// Returns:
    ///     the writer, or `Io`.
    pub fn create(path: &Path, zstd_level: i32) -> Result<NqkvWriter> {
        let name = path.file_name().ok_or_else(|| {
            NqError::InvalidArgument(format!("{} is not a file path", path.display()))
        })?;
        let dir = parent_dir(path);
        let mut tmp = None;
        // A unique name; create_new never clobbers another writer's temporary file.
        for attempt in 0..100u32 {
            let nonce = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
                ^ attempt.wrapping_mul(0x9E37_79B9);
            let t = dir.join(format!(
                ".{}.{}-{nonce:08x}.tmp",
                name.to_string_lossy(),
                std::process::id()
            ));
            match OpenOptions::new().write(true).create_new(true).open(&t) {
                Ok(f) => {
                    tmp = Some((f, t));
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(NqError::Io(
                        e.kind(),
                        format!("cannot create a temporary file in {}: {e}", dir.display()),
                    ))
                }
            }
        }
        let (mut file, tmp) = tmp.ok_or_else(|| {
            NqError::Io(
                std::io::ErrorKind::AlreadyExists,
                "cannot find a free temporary file name".into(),
            )
        })?;
        let mut w = NqkvWriter {
            file: None,
            tmp,
            path: path.to_path_buf(),
            sections: 0,
            len: 0,
            zstd_level,
        };
        // The header is written last, when the section count and length are known.
        file.write_all(&[0u8; FILE_HEADER_LEN])
            .map_err(|e| w.io("write", e))?;
        w.file = Some(file);
        w.len = FILE_HEADER_LEN as u64;
        Ok(w)
    }

    fn io(&self, what: &str, e: std::io::Error) -> NqError {
        NqError::Io(e.kind(), format!("{what} {}: {e}", self.tmp.display()))
    }

    /// Append a section.
    ///
    /// Args:
    ///     kind: 4 ASCII capitals/digits; `META` must be the first section and appear once.
    ///     coder: how to code the payload (raw, zstd or rANS).
    ///     payload: the decoded payload (for `META`, UTF-8 JSON; for `TOKN`, u32 LE ids).
    /// Returns:
    ///     `InvalidArgument` for a bad kind or payload, `Io` for a failed write.
    pub fn add_section(&mut self, kind: [u8; 4], coder: Coder, payload: &[u8]) -> Result<()> {
        if !is_valid_kind(&kind) {
            return Err(NqError::InvalidArgument(format!(
                "section kind {:?} must be 4 ASCII capitals or digits",
                kind_str(&kind)
            )));
        }
        if (self.sections == 0) != (kind == KIND_META) {
            return Err(NqError::InvalidArgument(
                "META must be the first section, and only the first".into(),
            ));
        }
        check_payload(&kind, payload).map_err(|e| match e {
            NqError::Corrupt(m) => NqError::InvalidArgument(m),
            e => e,
        })?;
        if self.sections >= MAX_SECTIONS {
            return Err(NqError::InvalidArgument(format!(
                "a file holds at most {MAX_SECTIONS} sections"
            )));
        }
        let mut stored = entropy::encode(coder, payload, self.zstd_level)?;
        let mut coder = coder;
        // Never store a coded payload larger than the raw one.
        if stored.len() >= payload.len() && coder != Coder::Raw {
            coder = Coder::Raw;
            stored = payload.to_vec();
        }
        let h = SectionHeader {
            kind,
            coder,
            flags: 0,
            stored_len: stored.len() as u64,
            decoded_len: payload.len() as u64,
            payload_crc: crc32fast::hash(&stored),
        };
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| NqError::InvalidArgument("writer is finished or failed".into()))?;
        if let Err(e) = file
            .write_all(&h.to_bytes())
            .and_then(|_| file.write_all(&stored))
        {
            // A partial section cannot be taken back: the writer is dead, the temporary file goes.
            self.file = None;
            return Err(self.io("write", e));
        }
        self.sections += 1;
        self.len += (SECTION_HEADER_LEN + stored.len()) as u64;
        Ok(())
    }

    /// Write the header, fsync, rename over the target, fsync the directory.
    ///
    /// Returns:
    ///     the file's length in bytes, or `InvalidArgument` (no sections) / `Io`.
    pub fn finish(mut self) -> Result<u64> {
        if self.sections == 0 {
            return Err(NqError::InvalidArgument(
                "an .nqkv file needs at least a META section".into(),
            ));
        }
        let mut file = self
            .file
            .take()
            .ok_or_else(|| NqError::InvalidArgument("writer is finished".into()))?;
        let h = FileHeader {
            version: VERSION,
            flags: 0,
            section_count: self.sections,
            total_len: self.len,
        };
        let r = file
            .seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&h.to_bytes()))
            .and_then(|_| file.sync_all());
        r.map_err(|e| self.io("finish", e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| {
            NqError::Io(
                e.kind(),
                format!(
                    "rename {} to {}: {e}",
                    self.tmp.display(),
                    self.path.display()
                ),
            )
        })?;
        self.tmp = PathBuf::new();
        // The rename is durable only once the directory entry is on disk.
        #[cfg(unix)]
        {
            let dir = parent_dir(&self.path);
            File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| {
                NqError::Io(e.kind(), format!("fsync directory {}: {e}", dir.display()))
            })?;
        }
        Ok(self.len)
    }
}

impl Drop for NqkvWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.file = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Write a whole file atomically (see [`NqkvWriter`]).
///
/// Args:
///     path: the target file.
///     sections: (kind, coder, decoded payload), `META` first.
///     zstd_level: level for zstd-coded sections.
/// Returns:
///     the file's length, or the first error (the target is then untouched).
pub fn write_nqkv(
    path: &Path,
    sections: &[([u8; 4], Coder, &[u8])],
    zstd_level: i32,
) -> Result<u64> {
    let mut w = NqkvWriter::create(path, zstd_level)?;
    for (kind, coder, payload) in sections {
        w.add_section(*kind, *coder, payload)?;
    }
    w.finish()
}

/// Checks on the decoded payload of the kinds this version defines.
fn check_payload(kind: &[u8; 4], payload: &[u8]) -> Result<()> {
    match *kind {
        KIND_META => {
            std::str::from_utf8(payload).map_err(|e| corrupt(format!("META is not UTF-8: {e}")))?;
        }
        KIND_TOKENS if payload.len() % 4 != 0 => {
            return Err(corrupt(format!(
                "TOKN holds {} bytes, not a whole number of u32 ids",
                payload.len()
            )));
        }
        KIND_LAYER => {
            decode_arrays(payload)?;
        }
        _ => {}
    }
    Ok(())
}

// =============================================================================================
// Reader
// =============================================================================================

/// A section as read: its header and decoded, verified payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// The section header.
    pub header: SectionHeader,
    /// The decoded payload.
    pub payload: Vec<u8>,
}

impl Section {
    /// The kind as a string.
    pub fn kind(&self) -> String {
        kind_str(&self.header.kind)
    }
}

/// Reads an `.nqkv` file section by section. Only one section's bytes (stored, then decoded) are
/// held at a time; every length is checked against the bytes left in the file and the cap before
/// it is allocated; each header and payload checksum is verified before the payload is used.
pub struct NqkvReader<R: Read> {
    src: R,
    header: FileHeader,
    next: u32,
    pos: u64,
    max_section_bytes: u64,
    failed: bool,
}

impl NqkvReader<BufReader<File>> {
    /// Open a file and check its header.
    ///
    /// Args:
    ///     path: the file.
    ///     max_section_bytes: the largest decoded section accepted ([`DEFAULT_MAX_SECTION_BYTES`]).
    /// Returns:
    ///     the reader, `Io` when the file cannot be opened, `InvalidArgument` when it is not a
    ///     regular file (a FIFO, a device, a directory), or the header's `Corrupt` /
    ///     `UnsupportedVersion`.
    pub fn open(path: &Path, max_section_bytes: u64) -> Result<Self> {
        let (file, len) = open_regular(path)?;
        NqkvReader::new(
            BufReader::with_capacity(1 << 16, file),
            len,
            max_section_bytes,
        )
    }
}

/// Open `path` for reading if it is a regular file, and return it with its length.
///
/// A FIFO would block `open` until a writer comes, and a device may never end, so the path is
/// checked before it is opened. The check and the open are two steps: on Unix the open is also
/// non-blocking (`O_NONBLOCK`, which has no effect on a regular file's reads), and the opened
/// file's own metadata is checked again, so a FIFO swapped in between is refused, not waited on.
fn open_regular(path: &Path) -> Result<(File, u64)> {
    let not_regular =
        || NqError::InvalidArgument(format!("{} is not a regular file", path.display()));
    let meta = std::fs::metadata(path)
        .map_err(|e| NqError::Io(e.kind(), format!("open {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options
        .open(path)
        .map_err(|e| NqError::Io(e.kind(), format!("open {}: {e}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| NqError::Io(e.kind(), format!("stat {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    Ok((file, meta.len()))
}

impl<R: Read> NqkvReader<R> {
    /// Read and check the header from any reader.
    ///
    /// Args:
    ///     src: the bytes, positioned at the file's start.
    ///     real_len: how many bytes `src` holds in all.
    ///     max_section_bytes: the largest decoded section accepted.
    /// Returns:
    ///     the reader, or `Corrupt` / `UnsupportedVersion` / `Io`.
    pub fn new(mut src: R, real_len: u64, max_section_bytes: u64) -> Result<Self> {
        let mut b = [0u8; FILE_HEADER_LEN];
        let got = read_up_to(&mut src, &mut b)?;
        let header = FileHeader::parse(&b[..got], real_len)?;
        Ok(NqkvReader {
            src,
            header,
            next: 0,
            pos: FILE_HEADER_LEN as u64,
            max_section_bytes,
            failed: false,
        })
    }

    /// The file header.
    pub fn header(&self) -> &FileHeader {
        &self.header
    }

    /// Sections not yet read.
    pub fn remaining_sections(&self) -> u32 {
        self.header.section_count - self.next
    }

    fn next_header(&mut self) -> Result<Option<SectionHeader>> {
        if self.failed {
            return Err(corrupt("an earlier error stopped reading this file"));
        }
        if self.next == self.header.section_count {
            return Ok(None);
        }
        let i = self.next;
        let mut b = [0u8; SECTION_HEADER_LEN];
        let got = read_up_to(&mut self.src, &mut b)?;
        if got < SECTION_HEADER_LEN {
            return Err(corrupt(format!(
                "file is truncated in the header of section {i}"
            )));
        }
        self.pos += SECTION_HEADER_LEN as u64;
        let remaining = self.header.total_len.saturating_sub(self.pos);
        let h = SectionHeader::parse(&b, i, remaining, self.max_section_bytes)?;
        if (i == 0) != (h.kind == KIND_META) {
            return Err(corrupt(if i == 0 {
                format!("the first section is {}, not META", kind_str(&h.kind))
            } else {
                format!("section {i} is a second META")
            }));
        }
        let last = i + 1 == self.header.section_count;
        if last && h.stored_len != remaining {
            return Err(corrupt(format!(
                "the last section ends {} bytes before the end of the file",
                remaining - h.stored_len
            )));
        }
        Ok(Some(h))
    }

    fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let r = f(self);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    /// Read, verify and decode the next section.
    ///
    /// Returns:
    ///     the section, `None` after the last one, or `Corrupt` naming the section and the problem
    ///     (after an error, every later call fails too).
    pub fn next_section(&mut self) -> Result<Option<Section>> {
        self.guarded(|r| {
            let Some(h) = r.next_header()? else {
                return Ok(None);
            };
            let i = r.next;
            let name = kind_str(&h.kind);
            // stored_len ≤ bytes left in the file (checked), so this allocation is bounded by it.
            let mut stored = vec![0u8; h.stored_len as usize];
            let got = read_up_to(&mut r.src, &mut stored)?;
            if got < stored.len() {
                return Err(corrupt(format!(
                    "file is truncated in the payload of section {i} ({name})"
                )));
            }
            r.pos += h.stored_len;
            if crc32fast::hash(&stored) != h.payload_crc {
                return Err(corrupt(format!(
                    "section {i} ({name}): payload checksum mismatch (the data is damaged)"
                )));
            }
            let payload = if h.coder == Coder::Raw {
                stored
            } else {
                let p = entropy::decode(
                    h.coder,
                    &stored,
                    h.decoded_len as usize,
                    r.max_section_bytes as usize,
                )
                .map_err(|e| corrupt(format!("section {i} ({name}): {e}")))?;
                drop(stored);
                p
            };
            check_payload(&h.kind, &payload)
                .map_err(|e| corrupt(format!("section {i} ({name}): {e}")))?;
            r.next += 1;
            Ok(Some(Section { header: h, payload }))
        })
    }

    /// Skip the next section's payload, verifying its checksum as it streams past in 64 KiB
    /// pieces (nothing is decoded or kept).
    ///
    /// Returns:
    ///     the skipped section's header, `None` after the last one, or `Corrupt`.
    pub fn skip_section(&mut self) -> Result<Option<SectionHeader>> {
        self.guarded(|r| {
            let Some(h) = r.next_header()? else {
                return Ok(None);
            };
            let i = r.next;
            let mut left = h.stored_len;
            let mut buf = vec![0u8; 1 << 16];
            let mut crc = crc32fast::Hasher::new();
            while left > 0 {
                let k = left.min(buf.len() as u64) as usize;
                let got = read_up_to(&mut r.src, &mut buf[..k])?;
                if got < k {
                    return Err(corrupt(format!(
                        "file is truncated in the payload of section {i}"
                    )));
                }
                crc.update(&buf[..k]);
                left -= k as u64;
            }
            r.pos += h.stored_len;
            if crc.finalize() != h.payload_crc {
                return Err(corrupt(format!(
                    "section {i} ({}): payload checksum mismatch (the data is damaged)",
                    kind_str(&h.kind)
                )));
            }
            r.next += 1;
            Ok(Some(h))
        })
    }
}

impl<R: Read> Iterator for NqkvReader<R> {
    type Item = Result<Section>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        self.next_section().transpose()
    }
}

/// Read into `buf` until it is full or the source ends; I/O errors other than EOF are `Io`.
fn read_up_to<R: Read>(src: &mut R, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match src.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(NqError::Io(e.kind(), format!("read: {e}"))),
        }
    }
    Ok(got)
}

/// Read and verify every section of an in-memory file (the fuzz target's entry point).
///
/// Args:
///     bytes: a whole file.
///     max_section_bytes: the largest decoded section accepted.
/// Returns:
///     the sections, or the first error.
pub fn read_nqkv_bytes(bytes: &[u8], max_section_bytes: u64) -> Result<Vec<Section>> {
    let r = NqkvReader::new(bytes, bytes.len() as u64, max_section_bytes)?;
    r.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nqkv-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A FIFO, a directory and a missing path are refused at once (a FIFO used to block `open`).
    #[cfg(unix)]
    #[test]
    fn open_refuses_what_is_not_a_regular_file() {
        use std::os::unix::ffi::OsStrExt;
        let d = tmpdir("fifo");
        let fifo = d.join("f");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Run in a thread so that a regression fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        let p = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(NqkvReader::open(&p, DEFAULT_MAX_SECTION_BYTES).err());
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("opening a FIFO blocked");
        assert!(matches!(got, Some(NqError::InvalidArgument(_))), "{got:?}");
        assert!(matches!(
            NqkvReader::open(&d, DEFAULT_MAX_SECTION_BYTES).err(),
            Some(NqError::InvalidArgument(_))
        ));
        assert!(matches!(
            NqkvReader::open(&d.join("missing"), DEFAULT_MAX_SECTION_BYTES).err(),
            Some(NqError::Io(std::io::ErrorKind::NotFound, _))
        ));
        let _ = std::fs::remove_file(&fifo);
    }

    fn layer(seed: u8, n: usize) -> Vec<u8> {
        let codes: Vec<u8> = (0..n * 16)
            .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(i as u8 >> 3))
            .collect();
        let scales: Vec<u8> = (0..n * 2).map(|i| (i % 7) as u8).collect();
        let pos: Vec<u8> = (0..n as u32).flat_map(|i| i.to_le_bytes()).collect();
        encode_arrays(&[
            ArrayRef {
                name: "k.codes".into(),
                dtype: DType::U8,
                shape: vec![n as u64, 16],
                data: &codes,
            },
            ArrayRef {
                name: "k.scales".into(),
                dtype: DType::F16,
                shape: vec![n as u64],
                data: &scales,
            },
            ArrayRef {
                name: "positions".into(),
                dtype: DType::I32,
                shape: vec![n as u64],
                data: &pos,
            },
            ArrayRef {
                name: "empty".into(),
                dtype: DType::F32,
                shape: vec![0, 4],
                data: &[],
            },
        ])
        .unwrap()
    }

    /// A small real file: META (zstd), TOKN (raw), two LAYR (rANS and zstd).
    fn small_file(dir: &Path) -> (PathBuf, Vec<Vec<u8>>) {
        let meta = br#"{"model": "SmolLM2-135M", "layers": 2, "bits": 2}"#.to_vec();
        let toks: Vec<u8> = (0..40u32).flat_map(|t| (t * 31).to_le_bytes()).collect();
        let (l0, l1) = (layer(3, 20), layer(5, 12));
        let p = dir.join("small.nqkv");
        write_nqkv(
            &p,
            &[
                (KIND_META, Coder::Zstd, &meta),
                (KIND_TOKENS, Coder::Raw, &toks),
                (KIND_LAYER, Coder::Rans, &l0),
                (KIND_LAYER, Coder::Zstd, &l1),
            ],
            3,
        )
        .unwrap();
        (p, vec![meta, toks, l0, l1])
    }

    #[test]
    fn round_trip_and_lazy_skip() {
        let d = tmpdir("rt");
        let (p, payloads) = small_file(&d);
        let secs: Vec<Section> = NqkvReader::open(&p, DEFAULT_MAX_SECTION_BYTES)
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(secs.len(), 4);
        for (s, want) in secs.iter().zip(&payloads) {
            assert_eq!(&s.payload, want);
        }
        assert_eq!(secs[0].kind(), "META");
        let arrays = decode_arrays(&secs[2].payload).unwrap();
        assert_eq!(arrays[0].name, "k.codes");
        assert_eq!(arrays[0].shape, vec![20, 16]);
        assert_eq!(arrays[3].shape, vec![0, 4]);
        let mut r = NqkvReader::open(&p, DEFAULT_MAX_SECTION_BYTES).unwrap();
        assert_eq!(r.next_section().unwrap().unwrap().kind(), "META");
        assert_eq!(r.skip_section().unwrap().unwrap().kind, KIND_TOKENS);
        assert_eq!(r.skip_section().unwrap().unwrap().kind, KIND_LAYER);
        assert_eq!(r.next_section().unwrap().unwrap().payload, payloads[3]);
        assert!(r.next_section().unwrap().is_none());
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn every_bit_flip_and_truncation_is_an_error() {
        let d = tmpdir("flip");
        let (p, _) = small_file(&d);
        let bytes = std::fs::read(&p).unwrap();
        assert!(bytes.len() < 4000, "{}", bytes.len());
        for cut in 0..bytes.len() {
            let r = read_nqkv_bytes(&bytes[..cut], DEFAULT_MAX_SECTION_BYTES);
            assert!(matches!(r, Err(NqError::Corrupt(_))), "cut at {cut}: {r:?}");
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                let r = read_nqkv_bytes(&b, DEFAULT_MAX_SECTION_BYTES);
                assert!(
                    matches!(r, Err(NqError::Corrupt(_))),
                    "byte {i} bit {bit}: {r:?}"
                );
            }
        }
        // Appended bytes, too.
        let mut b = bytes.clone();
        b.push(0);
        assert!(read_nqkv_bytes(&b, DEFAULT_MAX_SECTION_BYTES).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn refresh_header(b: &mut [u8]) {
        let crc = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
    }

    fn refresh_section(b: &mut [u8], at: usize) {
        let crc = crc32fast::hash(&b[at..at + 28]);
        b[at + 28..at + 32].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn newer_version_foreign_and_absurd_sizes() {
        let d = tmpdir("abs");
        let (p, _) = small_file(&d);
        let bytes = std::fs::read(&p).unwrap();
        // Newer version with a valid checksum: UnsupportedVersion with a clear message.
        let mut b = bytes.clone();
        b[8..10].copy_from_slice(&2u16.to_le_bytes());
        refresh_header(&mut b);
        match read_nqkv_bytes(&b, DEFAULT_MAX_SECTION_BYTES) {
            Err(NqError::UnsupportedVersion(m)) => assert!(m.contains("version 2"), "{m}"),
            r => panic!("{r:?}"),
        }
        // Foreign files.
        for foreign in [
            &b"PK\x03\x04 a zip file"[..],
            b"",
            b"\x89PNG\r\n\x1a\n0000000000000000000000000000000000000000000000000000000000",
        ] {
            assert!(matches!(
                read_nqkv_bytes(foreign, DEFAULT_MAX_SECTION_BYTES),
                Err(NqError::Corrupt(_))
            ));
        }
        // A section claiming 2^60 stored or decoded bytes fails on the length check, at once.
        let at = FILE_HEADER_LEN;
        for field in [8usize, 16] {
            let mut b = bytes.clone();
            b[at + field..at + field + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
            refresh_section(&mut b, at);
            let t = std::time::Instant::now();
            let r = read_nqkv_bytes(&b, u64::MAX);
            assert!(matches!(r, Err(NqError::Corrupt(_))), "{r:?}");
            assert!(t.elapsed().as_millis() < 100);
        }
        // A decoded length over the caller's cap.
        assert!(matches!(
            read_nqkv_bytes(&bytes, 10),
            Err(NqError::Corrupt(_))
        ));
        // 2^30 sections in a small file.
        let mut b = bytes.clone();
        b[12..16].copy_from_slice(&(1u32 << 30).to_le_bytes());
        refresh_header(&mut b);
        assert!(matches!(
            read_nqkv_bytes(&b, DEFAULT_MAX_SECTION_BYTES),
            Err(NqError::Corrupt(_))
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn writer_is_atomic() {
        let d = tmpdir("atomic");
        let (p, payloads) = small_file(&d);
        let before = std::fs::read(&p).unwrap();
        // A failed write (bad section) leaves the old file and no temporary file.
        let r = write_nqkv(
            &p,
            &[
                (KIND_META, Coder::Raw, b"{}"),
                (KIND_LAYER, Coder::Raw, b"garbage"),
            ],
            3,
        );
        assert!(matches!(r, Err(NqError::InvalidArgument(_))));
        assert_eq!(std::fs::read(&p).unwrap(), before);
        // So does a writer dropped before finish.
        {
            let mut w = NqkvWriter::create(&p, 3).unwrap();
            w.add_section(KIND_META, Coder::Raw, b"{}").unwrap();
        }
        assert_eq!(std::fs::read(&p).unwrap(), before);
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        // Invalid uses.
        assert!(write_nqkv(&p, &[(KIND_TOKENS, Coder::Raw, &payloads[1])], 3).is_err());
        assert!(write_nqkv(&p, &[(KIND_META, Coder::Raw, b"\xff")], 3).is_err());
        assert!(write_nqkv(&p, &[(*b"meta", Coder::Raw, b"{}")], 3).is_err());
        assert!(write_nqkv(&p, &[], 3).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), before);
        // A successful write replaces it.
        write_nqkv(&p, &[(KIND_META, Coder::Raw, b"{}")], 3).unwrap();
        assert_eq!(
            read_nqkv_bytes(&std::fs::read(&p).unwrap(), 1 << 20)
                .unwrap()
                .len(),
            1
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn array_directory_rejects_bad_entries() {
        let good = layer(1, 3);
        assert!(decode_arrays(&good).is_ok());
        for cut in 0..good.len() {
            assert!(decode_arrays(&good[..cut]).is_err(), "cut {cut}");
        }
        let mut b = good.clone();
        b[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_arrays(&b).is_err());
        let bad = ArrayRef {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![3],
            data: &[0u8; 8],
        };
        assert!(encode_arrays(&[bad]).is_err());
        let a = ArrayRef {
            name: "x".into(),
            dtype: DType::U8,
            shape: vec![1],
            data: &[0u8],
        };
        assert!(encode_arrays(&[a.clone(), a]).is_err());
        assert_eq!(DType::from_name("bfloat16").unwrap(), DType::BF16);
        for v in 0..14u8 {
            let d = DType::from_u8(v).unwrap();
            assert_eq!(DType::from_name(d.name()).unwrap(), d);
        }
    }

    /// Bounded random-mutation fuzzing in the test suite (fixed seed), in addition to the
    /// cargo-fuzz target in fuzz/: flips, overwrites, insertions, deletions and header fields set
    /// to extreme values, each read must return an error or the original sections, never panic.
    #[test]
    fn random_mutations_never_panic() {
        let d = tmpdir("mut");
        let (p, payloads) = small_file(&d);
        let bytes = std::fs::read(&p).unwrap();
        let mut s = 0x5EED_u64;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let extremes = [0u64, 1, u32::MAX as u64, 1 << 32, 1 << 60, u64::MAX];
        for _ in 0..20_000 {
            let mut b = bytes.clone();
            for _ in 0..1 + rnd() % 4 {
                let i = (rnd() as usize) % b.len().max(1);
                match rnd() % 5 {
                    0 => b[i] ^= 1 << (rnd() % 8),
                    1 => b[i] = rnd() as u8,
                    2 => b.insert(i, rnd() as u8),
                    3 => {
                        b.remove(i);
                    }
                    _ => {
                        let v = extremes[(rnd() % extremes.len() as u64) as usize];
                        let j = i.min(b.len().saturating_sub(8));
                        b[j..j + 8].copy_from_slice(&v.to_le_bytes());
                    }
                }
                if b.is_empty() {
                    break;
                }
            }
            if rnd() % 2 == 0 && b.len() >= 64 {
                refresh_header(&mut b);
            }
            if let Ok(secs) = read_nqkv_bytes(&b, 1 << 24) {
                let got: Vec<&Vec<u8>> = secs.iter().map(|s| &s.payload).collect();
                assert_eq!(got, payloads.iter().collect::<Vec<_>>());
            }
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn arbitrary_sections_round_trip(
            meta in "[ -~]{0,200}",
            toks in proptest::collection::vec(any::<u32>(), 0..300),
            blobs in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..2000), 0u8..3), 0..4),
        ) {
            let d = tmpdir("prop");
            let p = d.join(format!("{}.nqkv", meta.len() ^ toks.len()));
            let tb: Vec<u8> = toks.iter().flat_map(|t| t.to_le_bytes()).collect();
            let layers: Vec<(Vec<u8>, Coder)> = blobs.iter().enumerate().map(|(i, (data, c))| {
                let arr = ArrayRef { name: format!("a{i}"), dtype: DType::Bytes, shape: vec![data.len() as u64], data };
                (encode_arrays(&[arr]).unwrap(), Coder::from_tag(*c).unwrap())
            }).collect();
            let mut secs: Vec<([u8; 4], Coder, &[u8])> = vec![(KIND_META, Coder::Zstd, meta.as_bytes()), (KIND_TOKENS, Coder::Rans, &tb)];
            for (l, c) in &layers {
                secs.push((KIND_LAYER, *c, l));
            }
            write_nqkv(&p, &secs, 1).unwrap();
            let got = read_nqkv_bytes(&std::fs::read(&p).unwrap(), 1 << 30).unwrap();
            prop_assert_eq!(got.len(), secs.len());
            for (g, s) in got.iter().zip(&secs) {
                prop_assert_eq!(&g.payload[..], s.2);
                prop_assert_eq!(g.header.kind, s.0);
            }
            std::fs::remove_file(&p).unwrap();
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = read_nqkv_bytes(&data, 1 << 20);
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&data);
            let _ = read_nqkv_bytes(&with_magic, 1 << 20);
            let _ = decode_arrays(&data);
        }
    }
}
