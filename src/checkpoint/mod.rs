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
mod tensors;

pub use formats::{CodebookFormat, LoadedCodebook, load_codebook};

use crate::error::{Error, Result};
use crate::matrix::Matrix;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;
use tensors::{err, shape_str};

/// `format` metadata value of a vqx checkpoint.
pub const FORMAT: &str = "vqx-checkpoint";
/// The checkpoint layout version this vqx writes and reads.
pub const VERSION: &str = "1";
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

fn shape_err(what: &str, expected: String, got: String) -> Error {
    Error::Shape {
        what: what.into(),
        expected,
        got,
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
                    return Err(shape_err(
                        "checkpoint ema.cluster_size",
                        format!("{k} values (one per code)"),
                        format!("{} values", n.len()),
                    ));
                }
                if (m.rows(), m.cols()) != (k, d) {
                    return Err(shape_err(
                        "checkpoint ema.embed_avg",
                        format!("{k}×{d} (the codebook's shape)"),
                        format!("{}×{}", m.rows(), m.cols()),
                    ));
                }
                if let Some((i, v)) = n
                    .iter()
                    .enumerate()
                    .find(|(_, v)| !v.is_finite() || **v < 0.0)
                {
                    return Err(Error::InvalidArgument(format!(
                        "checkpoint ema.cluster_size holds {v} at code {i}; counts must be \
                         finite and non-negative"
                    )));
                }
                m.as_ref().check_finite("checkpoint ema.embed_avg")?;
            }
        }
        if let Some(u) = &self.usage_total {
            if u.len() != k {
                return Err(shape_err(
                    "checkpoint usage.total",
                    format!("{k} values (one per code)"),
                    format!("{} values", u.len()),
                ));
            }
            if let Some((i, v)) = u
                .iter()
                .enumerate()
                .find(|(_, v)| !v.is_finite() || **v < 0.0)
            {
                return Err(Error::InvalidArgument(format!(
                    "checkpoint usage.total holds {v} at code {i}; counts must be finite and \
                     non-negative"
                )));
            }
        }
        Ok(())
    }

    /// The safetensors bytes of this checkpoint (validated first).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let (k, d) = (self.codebook.rows(), self.codebook.cols());
        let le32 = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mut owned: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> =
            vec![(CODEBOOK, Dtype::F32, vec![k, d], le32(self.codebook.data()))];
        if let (Some(n), Some(m)) = (&self.cluster_size, &self.embed_avg) {
            owned.push((CLUSTER_SIZE, Dtype::F32, vec![k], le32(n)));
            owned.push((EMBED_AVG, Dtype::F32, vec![k, d], le32(m.data())));
        }
        if let Some(u) = &self.usage_total {
            let bytes = u.iter().flat_map(|x| x.to_le_bytes()).collect();
            owned.push((USAGE_TOTAL, Dtype::F64, vec![k], bytes));
        }
        let mut views = Vec::with_capacity(owned.len());
        for (name, dtype, shape, bytes) in &owned {
            let v = TensorView::new(*dtype, shape.clone(), bytes)
                .map_err(|e| Error::InvalidArgument(format!("checkpoint {name}: {e}")))?;
            views.push((*name, v));
        }
        let config = serde_json::to_string(&self.config)
            .map_err(|e| Error::InvalidArgument(format!("checkpoint config: {e}")))?;
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), VERSION.to_string()),
            ("step".to_string(), self.step.to_string()),
            ("config".to_string(), config),
            (
                "writer".to_string(),
                format!("vqx {}", env!("CARGO_PKG_VERSION")),
            ),
        ]);
        safetensors::serialize(views, Some(metadata))
            .map_err(|e| Error::InvalidArgument(format!("checkpoint: cannot serialize: {e}")))
    }

    /// Writes the checkpoint to `path` atomically (see the [module docs](self)); validates it
    /// first, so an invalid checkpoint writes nothing.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        crate::atomic::write_atomic(path, &bytes)
    }

    /// Reads a vqx checkpoint, checking its metadata, every tensor's dtype and shape against
    /// the codebook's, and saying exactly what is wrong.
    pub fn load(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        let file = tensors::File::read(path)?;
        Self::from_file(&file, path)
    }

    fn from_file(file: &tensors::File, path: &Path) -> Result<Checkpoint> {
        match file.metadata.get("format").map(String::as_str) {
            Some(FORMAT) => {}
            Some(other) => {
                return Err(err(
                    path,
                    format!("metadata format is {other:?}, not {FORMAT:?}: not a vqx checkpoint"),
                ));
            }
            None => {
                return Err(err(
                    path,
                    format!(
                        "no `format` metadata: not a vqx checkpoint (tensors: {})",
                        formats::key_list(&file.keys())
                    ),
                ));
            }
        }
        match file.metadata.get("version").map(String::as_str) {
            Some(VERSION) => {}
            Some(v) => {
                return Err(err(
                    path,
                    format!(
                        "vqx checkpoint version {v:?}; this vqx reads version {VERSION:?} \
                         (written by {})",
                        file.metadata
                            .get("writer")
                            .map(String::as_str)
                            .unwrap_or("an unknown writer")
                    ),
                ));
            }
            None => return Err(err(path, "vqx checkpoint without `version` metadata")),
        }
        let step = match file.metadata.get("step") {
            Some(s) => s.trim().parse::<u64>().map_err(|_| {
                err(
                    path,
                    format!("metadata step is {s:?}, not a non-negative integer"),
                )
            })?,
            None => return Err(err(path, "vqx checkpoint without `step` metadata")),
        };
        let config = match file.metadata.get("config") {
            Some(s) => serde_json::from_str(s)
                .map_err(|e| err(path, format!("metadata config is not valid JSON: {e}")))?,
            None => serde_json::Value::Null,
        };

        let cb = file.view(CODEBOOK).ok_or_else(|| {
            err(
                path,
                format!(
                    "vqx checkpoint without a `{CODEBOOK}` tensor (tensors: {})",
                    formats::key_list(&file.keys())
                ),
            )
        })?;
        let &[k, d] = cb.shape() else {
            return Err(err(
                path,
                format!("`{CODEBOOK}` is {}; expected K×D", shape_str(cb.shape())),
            ));
        };
        let codebook = tensors::matrix(path, CODEBOOK, &cb, k, d)?;
        let what = format!("codebook in {}", path.display());
        codebook.as_ref().check_nonempty(&what)?;
        codebook.as_ref().check_finite(&what)?;

        let cluster_size = match file.view(CLUSTER_SIZE) {
            None => None,
            Some(v) => {
                if v.shape() != [k] {
                    return Err(err(
                        path,
                        format!(
                            "{CLUSTER_SIZE} is {} but the codebook has {k} codes",
                            shape_str(v.shape())
                        ),
                    ));
                }
                let n = tensors::floats(path, CLUSTER_SIZE, &v)?;
                if let Some((i, x)) = n
                    .iter()
                    .enumerate()
                    .find(|(_, x)| !x.is_finite() || **x < 0.0)
                {
                    return Err(err(
                        path,
                        format!("{CLUSTER_SIZE} holds {x} at code {i}; counts must be ≥ 0"),
                    ));
                }
                Some(n)
            }
        };
        let embed_avg = match file.view(EMBED_AVG) {
            None => None,
            Some(v) => {
                if v.shape() != [k, d] {
                    return Err(err(
                        path,
                        format!(
                            "{EMBED_AVG} is {} but codebook is {k}×{d}",
                            shape_str(v.shape())
                        ),
                    ));
                }
                let m = tensors::matrix(path, EMBED_AVG, &v, k, d)?;
                m.as_ref()
                    .check_finite(&format!("{EMBED_AVG} in {}", path.display()))?;
                Some(m)
            }
        };
        if cluster_size.is_some() != embed_avg.is_some() {
            let (has, lacks) = if cluster_size.is_some() {
                (CLUSTER_SIZE, EMBED_AVG)
            } else {
                (EMBED_AVG, CLUSTER_SIZE)
            };
            return Err(err(path, format!("has {has} but not {lacks}")));
        }
        let usage_total = match file.view(USAGE_TOTAL) {
            None => None,
            Some(v) => {
                if v.shape() != [k] {
                    return Err(err(
                        path,
                        format!(
                            "{USAGE_TOTAL} is {} but the codebook has {k} codes",
                            shape_str(v.shape())
                        ),
                    ));
                }
                Some(tensors::counts(path, USAGE_TOTAL, &v)?)
            }
        };
        Ok(Checkpoint {
            codebook,
            cluster_size,
            embed_avg,
            usage_total,
            step,
            config,
        })
    }
}
