//! One error type for the whole pipeline; every variant names the file,
//! tensor or option at fault and what was expected.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    #[error("{0}")]
    ModelNotFound(String),
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    #[error("config.json of {model}: {msg}")]
    Config { model: PathBuf, msg: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tensor {name}: {msg}")]
    Tensor { name: String, msg: String },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("calibration: {0}")]
    Calibration(String),
    #[error("bad --ram value {value:?}: {msg}")]
    BadRam { value: String, msg: &'static str },
    /// A budget below the runtime's minimum for the model (the runtime's
    /// typed refusal, so the minimum can be read).
    /// (Shown in the message, so not also a `source`: the CLI prints the
    /// causes after the message and would repeat it.)
    #[error("--ram {ram} is too small: {budget}; the minimum budget falls with --dense-bits 4 or a smaller --hot-bits")]
    Budget {
        ram: String,
        budget: mfx_runtime::cache::BudgetError,
    },
    #[error("bad option: {0}")]
    Option(String),
    #[error(transparent)]
    Profile(#[from] mfx_formats::profile::ProfileError),
    #[error(transparent)]
    Quant(#[from] mfx_formats::quant::QuantError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("merge: {0}")]
    Merge(String),
    #[error("pack: {0}")]
    Pack(String),
    #[error(transparent)]
    Runtime(#[from] mfx_runtime::RuntimeError),
}

pub type Result<T, E = PrepError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> PrepError {
    let path = path.into();
    move |source| PrepError::Io { path, source }
}
