//! The one error type of the pack format.
//!
//! Every variant names what was wrong (a header field, the manifest path, a
//! tensor or an expert) because the person reading it usually has a 50 GB file
//! and no hex editor: "expert L3 E17: checksum mismatch" tells them which
//! download or which prep step to redo.

use std::path::PathBuf;

/// Errors from reading, validating, verifying or writing a `.mfx` pack.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The I/O error is shown in the message rather than chained as a
    /// `source`: the CLI prints every cause after the message, which
    /// repeated "No such file or directory" twice.
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
    #[error("not an mfx pack: bad magic {found:02x?} (expected \"MFXPACK\\0\")")]
    BadMagic { found: Vec<u8> },
    #[error("unsupported .mfx format version {found} (this build reads version {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("file truncated in the {section} section: need {need} bytes, the file has {have}")]
    Truncated {
        section: &'static str,
        need: u64,
        have: u64,
    },
    #[error(
        "{have} trailing bytes after the end of the pack recorded in the header ({expected} bytes)"
    )]
    TrailingBytes { expected: u64, have: u64 },
    #[error("checksum mismatch in {what}: expected {expected:016x}, found {found:016x}")]
    Checksum {
        what: String,
        expected: u64,
        found: u64,
    },
    #[error("bad header field `{field}`: {reason}")]
    BadHeader { field: &'static str, reason: String },
    #[error("manifest {path}: {message}")]
    Manifest { path: String, message: String },
    #[error(
        "{what}: range [{offset}, {offset}+{length}) is outside the {section} ([{start}, {end}))"
    )]
    RangeOutOfFile {
        what: String,
        section: &'static str,
        offset: u64,
        length: u64,
        start: u64,
        end: u64,
    },
    #[error("{what}: offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned {
        what: String,
        offset: u64,
        alignment: u64,
    },
    #[error("{a} overlaps {b}")]
    Overlap { a: String, b: String },
    #[error("too many {field}: {count} (the cap is {cap})")]
    TooMany {
        field: &'static str,
        count: u64,
        cap: u64,
    },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("{what}: not in canonical order or duplicated: {got} after {prev}")]
    Order {
        what: &'static str,
        prev: String,
        got: String,
    },
    #[error("{what}: {codec} decode failed: {reason}")]
    Codec {
        what: String,
        codec: &'static str,
        reason: String,
    },
    #[error("{what}: buffer is {got} bytes, expected {expected}")]
    BufferSize {
        what: String,
        expected: u64,
        got: u64,
    },
    #[error("{what}: tensor is stored as {scheme}, not {wanted}")]
    WrongScheme {
        what: String,
        scheme: String,
        wanted: &'static str,
    },
    #[error(transparent)]
    Quant(#[from] crate::quant::QuantError),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FormatError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        FormatError::Io {
            context: context.into(),
            error: source,
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        FormatError::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
