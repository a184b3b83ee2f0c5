//! Fuzz the .nqkv reader: any bytes must give sections or an error, never a panic, a hang or an
//! allocation beyond the input's size and the cap.
//!
//! Random bytes almost never pass the CRC checks, which would leave everything behind them
//! unexplored; so every input is read twice: as is, and with all checksums recomputed, which
//! sends the mutations into the length checks, the coders and the array directories.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexusquant::format::{decode_arrays, read_nqkv_bytes, FILE_HEADER_LEN, SECTION_HEADER_LEN};

/// Recompute the header CRC, and each section's header and payload CRCs, in place.
fn fix_checksums(b: &mut [u8]) {
    if b.len() < FILE_HEADER_LEN {
        return;
    }
    let crc = crc32fast::hash(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    let mut pos = FILE_HEADER_LEN;
    while pos + SECTION_HEADER_LEN <= b.len() {
        let stored = u64::from_le_bytes(b[pos + 8..pos + 16].try_into().unwrap());
        let start = pos + SECTION_HEADER_LEN;
        let end = start
            .saturating_add(stored.min(usize::MAX as u64) as usize)
            .min(b.len());
        let pcrc = crc32fast::hash(&b[start..end]);
        b[pos + 24..pos + 28].copy_from_slice(&pcrc.to_le_bytes());
        let hcrc = crc32fast::hash(&b[pos..pos + 28]);
        b[pos + 28..pos + 32].copy_from_slice(&hcrc.to_le_bytes());
        pos = end;
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = read_nqkv_bytes(data, 1 << 24);
    let mut fixed = data.to_vec();
    fix_checksums(&mut fixed);
    if let Ok(sections) = read_nqkv_bytes(&fixed, 1 << 24) {
        for s in &sections {
            if s.header.kind == *b"LAYR" {
                assert!(
                    decode_arrays(&s.payload).is_ok(),
                    "the reader checked this directory"
                );
            }
        }
    }
});
