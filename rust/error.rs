//! The crate's one error type. The bindings turn `Io` into Python's `OSError` (the subclass its
//! kind names), `Corrupt` and `UnsupportedVersion` into subclasses of `nexusquant.NexusQuantError`,
//! and the rest into `NexusQuantError` itself.

use std::fmt;

/// Everything that can go wrong in the core. Each variant carries a message meant for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NqError {
    /// An argument is outside what the function accepts (a shape, a bit width, a size).
    InvalidArgument(String),
    /// Input data holds a value the codec cannot represent (NaN, infinity, a scale beyond fp16).
    InvalidData(String),
    /// Bytes that should hold an encoding or a file are truncated, corrupted or not ours.
    Corrupt(String),
    /// A file or encoding written by a newer format version than this build reads.
    UnsupportedVersion(String),
    /// An operating-system I/O failure (open, write, fsync, rename), with the OS error's kind so
    /// that the bindings can raise the matching `OSError` subclass (`FileNotFoundError`, ...).
    Io(std::io::ErrorKind, String),
}

/// Shorthand used across the crate.
pub type Result<T> = std::result::Result<T, NqError>;

impl fmt::Display for NqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NqError::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            NqError::InvalidData(m) => write!(f, "invalid data: {m}"),
            NqError::Corrupt(m) => write!(f, "corrupt input: {m}"),
            NqError::UnsupportedVersion(m) => write!(f, "unsupported version: {m}"),
            NqError::Io(_, m) => write!(f, "I/O error: {m}"),
        }
    }
}

impl std::error::Error for NqError {}

impl From<std::io::Error> for NqError {
    fn from(e: std::io::Error) -> Self {
        NqError::Io(e.kind(), e.to_string())
    }
}
