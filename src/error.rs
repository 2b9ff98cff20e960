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
    /// A data-parallel job ended because one of its ranks failed.
    #[error("rank {rank} failed: {cause}")]
    Aborted { rank: usize, cause: String },
    /// A failure that is not the input's fault: encoding JSON, drawing a plot, a library
    /// vqx calls reporting an error of its own.
    #[error("{what} failed: {msg}")]
    Internal { what: String, msg: String },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O failure on `path`.
    ///
    /// ```
    /// let e = vqx::Error::io("codes.npy", std::io::ErrorKind::NotFound.into());
    /// assert!(e.to_string().starts_with("codes.npy: "));
    /// ```
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Two shapes that must agree do not: `what` is compared, `expected` against `got`.
    ///
    /// ```
    /// let e = vqx::Error::shape("indices vs input rows", "3 indices", "2 indices");
    /// assert!(e.to_string().contains("expected 3 indices, got 2 indices"));
    /// ```
    pub fn shape(
        what: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Error::Shape {
            what: what.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }

    /// A failure of `what` (say "encoding the summary as JSON") that is not the input's fault.
    ///
    /// ```
    /// let e = vqx::Error::internal("drawing the plot", "font not found");
    /// assert_eq!(e.to_string(), "drawing the plot failed: font not found");
    /// ```
    pub fn internal(what: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Internal {
            what: what.into(),
            msg: msg.to_string(),
        }
    }
}

/// Attaches the path an I/O operation was on: `std::fs::read(p).at(p)?`.
///
/// ```
/// use vqx::error::IoContext;
/// let err = std::fs::read("/no/such/file.npy").at("/no/such/file.npy").unwrap_err();
/// assert!(err.to_string().starts_with("/no/such/file.npy: "));
/// ```
pub trait IoContext<T> {
    /// This result, its error as an [`Error::Io`] on `path`.
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

/// Range checks of settings, written once for every configuration: each error names the
/// setting and the value it got.
pub(crate) mod setting {
    use super::{Error, Result};
    use std::fmt::Display;

    /// `value` ≥ 1.
    pub fn at_least_one(what: &str, value: u64) -> Result<()> {
        if value == 0 {
            return Err(Error::InvalidArgument(format!(
                "{what} must be at least 1, got 0"
            )));
        }
        Ok(())
    }

    /// `value` finite and ≥ 0 (f32 or f64, said as given).
    pub fn non_negative<T: Into<f64> + Copy + Display>(what: &str, value: T) -> Result<()> {
        let v: f64 = value.into();
        if !(v.is_finite() && v >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "{what} must be finite and ≥ 0, got {value}"
            )));
        }
        Ok(())
    }

    /// `value` finite and > 0 (f32 or f64, said as given).
    pub fn positive<T: Into<f64> + Copy + Display>(what: &str, value: T) -> Result<()> {
        let v: f64 = value.into();
        if !(v.is_finite() && v > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "{what} must be finite and > 0, got {value}"
            )));
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn each_check_names_the_setting_and_the_value() {
            let e = super::at_least_one("steps", 0).unwrap_err().to_string();
            assert!(e.contains("steps must be at least 1, got 0"), "{e}");
            assert!(super::at_least_one("steps", 1).is_ok());
            let e = super::non_negative("clip", f64::NAN)
                .unwrap_err()
                .to_string();
            assert!(e.contains("clip must be finite and ≥ 0, got NaN"), "{e}");
            assert!(super::non_negative("clip", 0.0).is_ok());
            let e = super::positive("EMA eps", 0.0f32).unwrap_err().to_string();
            assert!(e.contains("EMA eps must be finite and > 0, got 0"), "{e}");
            assert!(super::positive("EMA eps", f64::INFINITY).is_err());
            let e = super::non_negative("decay", -0.1f32)
                .unwrap_err()
                .to_string();
            assert!(e.ends_with("got -0.1"), "f32 said as given: {e}");
        }
    }
}
