//! vqx checkpoints, and reading the codebook files users already have (SPEC §9).
//!
//! A vqx checkpoint is a [safetensors](https://github.com/huggingface/safetensors) file with
//!
//! | tensor | shape, dtype | |
//! |---|---|---|
//! | `codebook` | K×D f32 | the code rows |
//! | `ema.cluster_size` | K f32 | the EMA counts N_k (optional) |
//! | `ema.embed_avg` | K×D f32 | the EMA sums m_k (optional; present iff `ema.cluster_size` is) |
//! | `usage.total` | K f64 | cumulative usage counts (optional) |
//!
//! and the `__metadata__` strings `format = "vqx-checkpoint"`, `version = "1"`, `step` (decimal)
//! and `config` (a JSON document, kept opaque here), plus `writer` (the vqx version, for
//! information). [`Checkpoint::save`] writes atomically: a temporary file in the destination's
//! directory, synced, then renamed, so a crash or an error never leaves a half-written file at
//! the path (an existing file there stays as it was).
//!
//! [`load_codebook`] reads any codebook file vqx accepts — .npy, a vqx checkpoint, a
//! vector-quantize-pytorch `VectorQuantize` state dict or an ESM3 `EMACodebook` saved as
//! safetensors — recognising the format by its keys (`docs/interop.md` lists them).
//!
//! ```
//! # fn main() -> vqx::Result<()> {
//! use vqx::checkpoint::{load_codebook, Checkpoint, CodebookFormat};
//! let dir = std::env::temp_dir().join(format!("vqx-ckpt-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("vq.safetensors");
//!
//! let codebook = vqx::Matrix::new(vec![0.0, 0.0, 1.0, 1.0, -1.0, 2.0], 3, 2)?;
//! let mut ckpt = Checkpoint::new(codebook.clone());
//! ckpt.cluster_size = Some(vec![1.0, 2.0, 0.5]);
//! ckpt.embed_avg = Some(vqx::Matrix::new(vec![0.0, 0.0, 2.0, 2.0, -0.5, 1.0], 3, 2)?);
//! ckpt.step = 100;
//! ckpt.config = serde_json::json!({"decay": 0.99});
//! ckpt.save(&path)?;
//!
//! assert_eq!(Checkpoint::load(&path)?, ckpt);
//! let loaded = load_codebook(&path)?;
//! assert_eq!(loaded.format, CodebookFormat::VqxCheckpoint);
//! assert_eq!(loaded.codebook, codebook);
//! assert_eq!(loaded.step, Some(100));
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok(()) }
//! ```

mod formats;
pub(crate) mod tensors;

pub use formats::{CodebookFormat, LoadedCodebook, load_codebook};

use crate::error::{Error, Result};
use crate::matrix::Matrix;
use std::fmt::Display;
use std::path::Path;
use tensors::{COUNT, FLOAT, QUANTIZER, Shape, TensorFile, TensorWriter};

/// `format` metadata value of a vqx checkpoint.
pub const FORMAT: &str = QUANTIZER.format;
/// The checkpoint layout version this vqx writes and reads.
pub const VERSION: &str = QUANTIZER.version;
/// Tensor names.
pub const CODEBOOK: &str = "codebook";
pub const CLUSTER_SIZE: &str = "ema.cluster_size";
pub const EMBED_AVG: &str = "ema.embed_avg";
pub const USAGE_TOTAL: &str = "usage.total";

/// A quantizer's state: the codebook, its EMA statistics, cumulative usage, the step and the
/// configuration that produced it. See the [module docs](self) for the file layout.
///
/// ```
/// use vqx::checkpoint::Checkpoint;
/// let ckpt = Checkpoint::new(vqx::Matrix::zeros(4, 2));
/// assert_eq!((ckpt.step, ckpt.cluster_size.is_none()), (0, true));
/// assert!(ckpt.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// K×D code rows.
    pub codebook: Matrix,
    /// EMA counts N_k (K values).
    pub cluster_size: Option<Vec<f32>>,
    /// EMA sums m_k (K×D).
    pub embed_avg: Option<Matrix>,
    /// Cumulative usage counts (K values; integers stored as f64, exact below 2^53).
    pub usage_total: Option<Vec<f64>>,
    /// Training steps taken.
    pub step: u64,
    /// The run's configuration, stored as a JSON string; opaque here.
    pub config: serde_json::Value,
}

/// Says which value of `counts` (tensor `name`) is not a finite, non-negative number.
fn check_counts<T>(name: &str, counts: &[T]) -> std::result::Result<(), String>
where
    T: Copy + Into<f64> + Display,
{
    match counts.iter().enumerate().find(|(_, c)| {
        let c: f64 = (**c).into();
        !c.is_finite() || c < 0.0
    }) {
        Some((i, c)) => Err(format!(
            "{name} holds {c} at code {i}; counts must be finite and non-negative"
        )),
        None => Ok(()),
    }
}

impl Checkpoint {
    /// A checkpoint holding only `codebook`, at step 0, with a null config.
    pub fn new(codebook: Matrix) -> Self {
        Checkpoint {
            codebook,
            cluster_size: None,
            embed_avg: None,
            usage_total: None,
            step: 0,
            config: serde_json::Value::Null,
        }
    }

    /// K, the number of codes.
    pub fn codes(&self) -> usize {
        self.codebook.rows()
    }

    /// Checks what [`Self::save`] needs: a non-empty, finite codebook; EMA counts and sums
    /// present together, of K and K×D values, finite, counts non-negative; usage of K
    /// non-negative values.
    pub fn validate(&self) -> Result<()> {
        let (k, d) = (self.codebook.rows(), self.codebook.cols());
        let counts = |r: std::result::Result<(), String>| {
            r.map_err(|m| Error::InvalidArgument(format!("checkpoint {m}")))
        };
        self.codebook
            .as_ref()
            .check_nonempty("checkpoint codebook")?;
        self.codebook.as_ref().check_finite("checkpoint codebook")?;
        match (&self.cluster_size, &self.embed_avg) {
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return Err(Error::InvalidArgument(
                    "checkpoint: ema.cluster_size and ema.embed_avg go together (one is set, \
                     the other is not)"
                        .into(),
                ));
            }
            (Some(n), Some(m)) => {
                if n.len() != k {
                    return Err(Error::shape(
                        "checkpoint ema.cluster_size",
                        format!("{k} values (one per code)"),
                        format!("{} values", n.len()),
                    ));
                }
                if (m.rows(), m.cols()) != (k, d) {
                    return Err(Error::shape(
                        "checkpoint ema.embed_avg",
                        format!("{k}×{d} (the codebook's shape)"),
                        format!("{}×{}", m.rows(), m.cols()),
                    ));
                }
                counts(check_counts(CLUSTER_SIZE, n))?;
                m.as_ref().check_finite("checkpoint ema.embed_avg")?;
            }
        }
        if let Some(u) = &self.usage_total {
            if u.len() != k {
                return Err(Error::shape(
                    "checkpoint usage.total",
                    format!("{k} values (one per code)"),
                    format!("{} values", u.len()),
                ));
            }
            counts(check_counts(USAGE_TOTAL, u))?;
        }
        Ok(())
    }

    /// The safetensors bytes of this checkpoint (validated first).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let config = serde_json::to_string(&self.config)
            .map_err(|e| Error::internal("encoding the checkpoint's config as JSON", e))?;
        let mut w = TensorWriter::new(&QUANTIZER);
        w.meta("step", self.step);
        w.meta("config", config);
        self.put_tensors(&mut w, "")?;
        w.to_bytes()
    }

    /// Adds the tensors (codebook, EMA statistics, usage) to `w`, each name behind `prefix`:
    /// the quantizer checkpoint's layout, and the quantizer's part of a training checkpoint.
    pub(crate) fn put_tensors(&self, w: &mut TensorWriter, prefix: &str) -> Result<()> {
        let (k, d) = (self.codebook.rows(), self.codebook.cols());
        w.tensor(format!("{prefix}{CODEBOOK}"), &[k, d], self.codebook.data())?;
        if let (Some(n), Some(m)) = (&self.cluster_size, &self.embed_avg) {
            w.tensor(format!("{prefix}{CLUSTER_SIZE}"), &[k], n)?;
            w.tensor(format!("{prefix}{EMBED_AVG}"), &[k, d], m.data())?;
        }
        if let Some(u) = &self.usage_total {
            w.tensor(format!("{prefix}{USAGE_TOTAL}"), &[k], u)?;
        }
        Ok(())
    }

    /// Writes the checkpoint to `path` atomically (see the [module docs](self)); validates it
    /// first, so an invalid checkpoint writes nothing.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::atomic::write_atomic(path.as_ref(), &self.to_bytes()?)
    }

    /// Reads a vqx checkpoint, checking its metadata, every tensor's dtype and shape against
    /// the codebook's, and saying exactly what is wrong.
    pub fn load(path: impl AsRef<Path>) -> Result<Checkpoint> {
        Self::from_file(&TensorFile::read(path.as_ref())?)
    }

    fn from_file(file: &TensorFile) -> Result<Checkpoint> {
        file.check_layout(&QUANTIZER)?;
        let step = file.parse_meta("step", "a non-negative integer")?;
        let config = match file.meta("config") {
            Some(s) => serde_json::from_str(s)
                .map_err(|e| file.err(format!("metadata config is not valid JSON: {e}")))?,
            None => serde_json::Value::Null,
        };
        Ok(Checkpoint {
            step,
            config,
            ..Self::read_tensors(file, "")?
        })
    }

    /// The tensors [`Self::put_tensors`] wrote under `prefix` (step 0, null config), with
    /// their shapes checked against the codebook's and their values against what
    /// [`Self::validate`] asks.
    pub(crate) fn read_tensors(file: &TensorFile, prefix: &str) -> Result<Checkpoint> {
        let name = |t: &str| format!("{prefix}{t}");
        let [k, d] = file.dims(&name(CODEBOOK), "K×D")?;
        let codebook = file.required_matrix(&name(CODEBOOK), (k, d), [k, d])?;
        let what = format!("{} in {}", name(CODEBOOK), file.path().display());
        codebook.as_ref().check_nonempty(&what)?;
        codebook.as_ref().check_finite(&what)?;

        let codes = format!("the codebook has {k} codes");
        let (cs, avg, usage) = (name(CLUSTER_SIZE), name(EMBED_AVG), name(USAGE_TOTAL));
        let cluster_size = file.optional(&cs, &FLOAT, Shape::of(&[k]).but(&codes).unquoted())?;
        if let Some(n) = &cluster_size {
            check_counts(&cs, n).map_err(|m| file.err(m))?;
        }
        let shape = Shape::of(&[k, d]).but(format!("codebook is {k}×{d}"));
        let embed_avg = file.optional_matrix(&avg, (k, d), shape.unquoted())?;
        if let Some(m) = &embed_avg {
            m.as_ref()
                .check_finite(&format!("{avg} in {}", file.path().display()))?;
        }
        match (&cluster_size, &embed_avg) {
            (Some(_), None) => return Err(file.err(format!("has {cs} but not {avg}"))),
            (None, Some(_)) => return Err(file.err(format!("has {avg} but not {cs}"))),
            _ => {}
        }
        let usage_total = file.optional(&usage, &COUNT, Shape::of(&[k]).but(&codes).unquoted())?;
        if let Some(u) = &usage_total {
            check_counts(&usage, u).map_err(|m| file.err(m))?;
        }
        Ok(Checkpoint {
            cluster_size,
            embed_avg,
            usage_total,
            ..Checkpoint::new(codebook)
        })
    }
}
