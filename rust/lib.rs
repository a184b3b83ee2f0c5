//! nexusquant's byte-level core: E8 lattice codes, the randomized Hadamard transform, delta coding,
//! entropy packing and the `.nqkv` container.
//!
//! Everything here is plain Rust and compiles and tests without Python; the PyO3 bindings live in
//! `py.rs` alone, behind the `python` feature (maturin turns it on).

pub mod codec;
pub mod delta;
pub mod e8;
pub mod e8p;
pub mod element;
pub mod entropy;
pub mod error;
pub mod format;
pub mod hadamard;
mod simd;

pub use codec::{E8Codec, Encoded};
pub use error::{NqError, Result};

#[cfg(feature = "python")]
mod py;
