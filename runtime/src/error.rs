//! The runtime's error type. Every variant names the file, config key or
//! tensor it is about, because the person reading the message has a
//! multi-gigabyte checkpoint and needs to know which of its parts is wrong.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: missing required key `{key}`")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: key `{key}`: {msg}")]
    BadKey {
        path: PathBuf,
        key: String,
        msg: String,
    },
    #[error("{path}: unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArch {
        path: PathBuf,
        arch: String,
        /// The registered families (`models::registry::names`).
        supported: String,
    },
    #[error("{path}: not a model: expected a directory with config.json and *.safetensors, or a .mfx pack")]
    NotAModel { path: PathBuf },
    #[error("{path}: invalid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("tensor `{name}` not found in {location}")]
    MissingTensor { name: String, location: String },
    #[error("tensor `{name}` in {location}: expected shape {expected}, found {found:?}")]
    Shape {
        name: String,
        location: String,
        expected: String,
        found: Vec<usize>,
    },
    #[error("tensor `{name}` in {location}: unsupported dtype {dtype} (expected {expected})")]
    Dtype {
        name: String,
        location: String,
        dtype: String,
        expected: String,
    },
    #[error("tensor `{name}` in {location}: {source}")]
    Quant {
        name: String,
        location: String,
        #[source]
        source: mfx_formats::quant::QuantError,
    },
    #[error("token id {id} is out of range (vocab size {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("context is full: {needed} positions needed, the limit is {max}")]
    ContextFull { needed: usize, max: usize },
    #[error("{path}: {msg}")]
    Pack { path: PathBuf, msg: String },
    /// A `--ram` budget that cannot hold the model (typed, as issue 17
    /// asks, so callers can read the minimum). Shown in the message, not
    /// chained as a `source`, so the CLI does not print it twice.
    #[error("{budget}{hint}")]
    Budget {
        budget: crate::cache::BudgetError,
        hint: String,
    },
    #[error("{0}")]
    Other(String),
}

impl RuntimeError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            path: path.into(),
            source,
        }
    }
}
