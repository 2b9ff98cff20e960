//! Typed errors: every variant says what was wrong and where.

use std::path::PathBuf;

/// Everything that can go wrong in vqx.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two shapes that must agree do not.
    #[error("shape mismatch in {what}: expected {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },
    /// An input with no rows, no columns or no codes.
    #[error("{what} is empty ({detail})")]
    Empty { what: String, detail: String },
    /// A NaN or infinity in an input: never silently mapped to an index.
    #[error("non-finite value {value} in {what} at row {row}, column {col}")]
    NonFinite {
        what: String,
        row: usize,
        col: usize,
        value: f32,
    },
    /// An index that does not name a code.
    #[error("index {index} at position {position} is out of range for a codebook of {codes} codes")]
    IndexOutOfRange {
        position: usize,
        index: u64,
        codes: usize,
    },
    /// A .npy file that cannot be used (dtype, order, rank, header).
    #[error("{path}: {msg}")]
    Npy { path: PathBuf, msg: String },
    /// An I/O failure on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The CUDA backend was asked for but cannot run here.
    #[error("CUDA backend unavailable: {0}")]
    CudaUnavailable(String),
    /// A CUDA driver or launch failure.
    #[error("CUDA error in {op}: {msg}")]
    Cuda { op: String, msg: String },
    /// An argument outside what the operation supports.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A checkpoint or state dict (safetensors) that cannot be used: not safetensors, a
    /// missing or misshapen tensor, unknown keys, bad metadata.
    #[error("{path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
