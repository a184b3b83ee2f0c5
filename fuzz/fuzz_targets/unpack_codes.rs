//! Fuzz the packed code stream decoder (and, through it, the rANS and zstd block decoders): any
//! bytes must unpack or fail, never panic. As for the reader, each input is also tried with its
//! trailing CRC recomputed so that mutations reach the plane directory and the coders.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexusquant::entropy::{decode, unpack_codes, Coder};

fuzz_target!(|data: &[u8]| {
    let _ = unpack_codes(data, 1 << 24);
    if data.len() >= 4 {
        let mut fixed = data.to_vec();
        let n = fixed.len();
        let crc = crc32fast::hash(&fixed[..n - 4]);
        fixed[n - 4..].copy_from_slice(&crc.to_le_bytes());
        if let Ok(u) = unpack_codes(&fixed, 1 << 24) {
            assert_eq!(u.codes.len(), u.scales.len() * u.row_bytes);
        }
    }
    // The raw block decoders, with the length a valid block would declare (rANS: its leading
    // varint) so that they get past the length check.
    let mut n = 0usize;
    for (i, &b) in data.iter().take(3).enumerate() {
        n |= ((b & 0x7F) as usize) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
    }
    let _ = decode(Coder::Rans, data, n, 1 << 20);
    let _ = decode(Coder::Zstd, data, n, 1 << 20);
});
