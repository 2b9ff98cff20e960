//! Training checkpoints: one safetensors file holding the whole run's state, written
//! atomically ([`crate::atomic::write_atomic`]).
//!
//! | tensor | |
//! |---|---|
//! | `encoder.linears.{i}.weight` (out×in), `.bias`; `encoder.norms.{i}.weight`, `.bias` | f32 |
//! | `decoder.…` | the same for the decoder |
//! | `quantizer.codebook` K×D, `quantizer.ema.cluster_size` K, `quantizer.ema.embed_avg` K×D | f32 |
//! | `quantizer.usage.total` K | f64 |
//! | `adam.m.{param}`, `adam.v.{param}` for every trained tensor | f32 |
//!
//! Metadata: `format = "vqx-train"`, `version = "1"`, `step`, `config` (the [`TrainConfig`] as
//! JSON), `quantizer_step`, `quantizer_initialized`, `writer`.

use super::{AdamW, Dataset, TrainConfig, Trainer, parameter_names};
use crate::backend::Device;
use crate::ema::EmaState;
use crate::error::{Error, Result};
use crate::matrix::Matrix;
use crate::model::{Mlp, VqVae};
use crate::quantizer::VectorQuantizer;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// The file name of a run's checkpoint inside its output directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
const FORMAT: &str = "vqx-train";
const VERSION: &str = "1";

fn le32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes the trainer's whole state to `path` atomically (brought from the device first when
/// the step runs there).
pub fn save_trainer(t: &mut Trainer, path: &Path) -> Result<()> {
    t.sync()?;
    let m = &t.model;
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (part, mlp) in [("encoder", &m.encoder), ("decoder", &m.decoder)] {
        for (name, shape, v) in mlp.tensors() {
            owned.push((format!("{part}.{name}"), Dtype::F32, shape, le32(v)));
        }
    }
    let q = &m.quantizer;
    let (k, d) = (q.codebook().rows(), q.codebook().cols());
    owned.push((
        "quantizer.codebook".into(),
        Dtype::F32,
        vec![k, d],
        le32(q.codebook().data()),
    ));
    if let Some(e) = q.ema() {
        owned.push((
            "quantizer.ema.cluster_size".into(),
            Dtype::F32,
            vec![k],
            le32(e.cluster_size()),
        ));
        owned.push((
            "quantizer.ema.embed_avg".into(),
            Dtype::F32,
            vec![k, d],
            le32(e.embed_avg().data()),
        ));
    }
    owned.push((
        "quantizer.usage.total".into(),
        Dtype::F64,
        vec![k],
        q.usage_total()
            .iter()
            .flat_map(|&c| (c as f64).to_le_bytes())
            .collect(),
    ));
    for (i, (name, _, _)) in parameter_names(m).iter().enumerate() {
        let n = t.optimizer.m[i].len();
        owned.push((
            format!("adam.m.{name}"),
            Dtype::F32,
            vec![n],
            le32(&t.optimizer.m[i]),
        ));
        owned.push((
            format!("adam.v.{name}"),
            Dtype::F32,
            vec![n],
            le32(&t.optimizer.v[i]),
        ));
    }
    let mut views = Vec::with_capacity(owned.len());
    for (name, dtype, shape, bytes) in &owned {
        let v = TensorView::new(*dtype, shape.clone(), bytes)
            .map_err(|e| Error::InvalidArgument(format!("checkpoint tensor {name}: {e}")))?;
        views.push((name.as_str(), v));
    }
    let config = serde_json::to_string(&t.config)
        .map_err(|e| Error::InvalidArgument(format!("cannot encode the configuration: {e}")))?;
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("version".to_string(), VERSION.to_string()),
        ("step".to_string(), t.step.to_string()),
        ("config".to_string(), config),
        ("quantizer_step".to_string(), q.step().to_string()),
        (
            "quantizer_initialized".to_string(),
            q.initialized().to_string(),
        ),
        (
            "writer".to_string(),
            format!("vqx {}", env!("CARGO_PKG_VERSION")),
        ),
    ]);
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::InvalidArgument(format!("checkpoint: cannot serialize: {e}")))?;
    crate::atomic::write_atomic(path, &bytes)
}

fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Tensors and metadata of a training checkpoint.
struct Reader<'a> {
    path: &'a Path,
    st: SafeTensors<'a>,
    meta: HashMap<String, String>,
}

impl<'a> Reader<'a> {
    fn new(path: &'a Path, bytes: &'a [u8]) -> Result<Self> {
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| err(path, format!("not a valid safetensors file: {e}")))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| err(path, format!("not a valid safetensors file: {e}")))?;
        match meta.get("format").map(String::as_str) {
            Some(FORMAT) => {}
            Some("vqx-checkpoint") => {
                return Err(err(
                    path,
                    "is a quantizer checkpoint (vqx fit), not a training checkpoint (vqx train)",
                ));
            }
            other => {
                return Err(err(
                    path,
                    format!(
                        "format metadata is {other:?}, not {FORMAT:?}: not a vqx train checkpoint"
                    ),
                ));
            }
        }
        if meta.get("version").map(String::as_str) != Some(VERSION) {
            return Err(err(
                path,
                format!(
                    "training checkpoint version {:?}; this vqx reads {VERSION:?}",
                    meta.get("version")
                ),
            ));
        }
        Ok(Reader { path, st, meta })
    }

    fn meta<T: std::str::FromStr>(&self, key: &str) -> Result<T> {
        let s = self
            .meta
            .get(key)
            .ok_or_else(|| err(self.path, format!("no `{key}` metadata")))?;
        s.trim().parse().map_err(|_| {
            err(
                self.path,
                format!("metadata {key} = {s:?} cannot be parsed"),
            )
        })
    }

    fn has(&self, name: &str) -> bool {
        self.st.tensor(name).is_ok()
    }

    /// The values of tensor `name`, which must have `shape` and dtype f32 (or f64 when `f64`).
    fn values(&self, name: &str, shape: &[usize], f64: bool) -> Result<Vec<f64>> {
        let v = self
            .st
            .tensor(name)
            .map_err(|_| err(self.path, format!("no tensor `{name}`")))?;
        if v.shape() != shape {
            return Err(err(
                self.path,
                format!("`{name}` has shape {:?}, expected {shape:?}", v.shape()),
            ));
        }
        let want = if f64 { Dtype::F64 } else { Dtype::F32 };
        if v.dtype() != want {
            return Err(err(
                self.path,
                format!("`{name}` is {:?}, expected {want:?}", v.dtype()),
            ));
        }
        Ok(if f64 {
            v.data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect()
        } else {
            v.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64)
                .collect()
        })
    }

    fn f32s(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let v = self.values(name, shape, false)?;
        let out: Vec<f32> = v.into_iter().map(|x| x as f32).collect();
        if let Some(i) = out.iter().position(|x| !x.is_finite()) {
            return Err(err(self.path, format!("`{name}` holds {} at {i}", out[i])));
        }
        Ok(out)
    }

    fn mlp_into(&self, part: &str, mlp: &mut Mlp) -> Result<()> {
        let shapes: Vec<(String, Vec<usize>)> =
            mlp.tensors().into_iter().map(|(n, s, _)| (n, s)).collect();
        for ((name, shape), dst) in shapes.iter().zip(mlp.tensors_mut()) {
            dst.copy_from_slice(&self.f32s(&format!("{part}.{name}"), shape)?);
        }
        Ok(())
    }
}

/// A checkpoint's configuration, step, model and optimiser, with the quantizer on `device`.
pub(crate) fn read(path: &Path, device: Device) -> Result<(TrainConfig, u64, VqVae, AdamW)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let r = Reader::new(path, &bytes)?;
    let config: TrainConfig = serde_json::from_str(
        r.meta
            .get("config")
            .ok_or_else(|| err(path, "no `config` metadata"))?,
    )
    .map_err(|e| {
        err(
            path,
            format!("config metadata is not a vqx training configuration: {e}"),
        )
    })?;
    config
        .validate()
        .map_err(|e| err(path, format!("stored configuration: {e}")))?;
    let step: u64 = r.meta("step")?;
    let qstep: u64 = r.meta("quantizer_step")?;
    let initialized: bool = r.meta("quantizer_initialized")?;
    let qcfg = config.quantizer.clone().device(device);
    let fresh = VqVae::new(config.model.clone(), qcfg.clone())?;
    let (mut encoder, mut decoder) = (fresh.encoder, fresh.decoder);
    r.mlp_into("encoder", &mut encoder)?;
    r.mlp_into("decoder", &mut decoder)?;
    let (k, d) = (qcfg.codebook_size, qcfg.dim);
    let quantizer = if initialized {
        let codebook = Matrix::new(r.f32s("quantizer.codebook", &[k, d])?, k, d)?;
        let ema = if r.has("quantizer.ema.cluster_size") {
            Some(EmaState::from_parts(
                r.f32s("quantizer.ema.cluster_size", &[k])?,
                Matrix::new(r.f32s("quantizer.ema.embed_avg", &[k, d])?, k, d)?,
            )?)
        } else {
            None
        };
        let usage = r
            .values("quantizer.usage.total", &[k], true)?
            .into_iter()
            .map(|c| c.max(0.0) as u64)
            .collect();
        VectorQuantizer::from_state(qcfg, codebook, ema, qstep, Some(usage))?
    } else {
        VectorQuantizer::new(qcfg)?
    };
    let model = VqVae::from_parts(config.model.clone(), encoder, decoder, quantizer)?;
    let names = parameter_names(&model);
    let mut opt = AdamW::new(config.adam, &names.iter().map(|n| n.1).collect::<Vec<_>>());
    for (i, (name, len, _)) in names.iter().enumerate() {
        opt.m[i] = r.f32s(&format!("adam.m.{name}"), &[*len])?;
        opt.v[i] = r.f32s(&format!("adam.v.{name}"), &[*len])?;
    }
    Ok((config, step, model, opt))
}

/// Resumes a run from its checkpoint: reloads (or regenerates) its data and restores every
/// tensor, the step and the quantizer state.
pub fn load_trainer(path: &Path, device: Device) -> Result<Trainer> {
    let (config, step, model, opt) = read(path, device)?;
    let data = Dataset::load(&config.data)?;
    Trainer::from_parts(config, model, opt, step, data)
}

/// The trained model of a checkpoint (for encoding and decoding), with its configuration.
///
/// ```no_run
/// let (model, config) = vqx::train::load_model("run/checkpoint.safetensors".as_ref(),
///     vqx::backend::Device::Cpu)?;
/// # Ok::<(), vqx::Error>(())
/// ```
pub fn load_model(path: &Path, device: Device) -> Result<(VqVae, TrainConfig)> {
    let (config, _, model, _) = read(path, device)?;
    if !model.quantizer.initialized() {
        return Err(err(
            path,
            "the checkpoint was saved before the first training step: its codebook is not \
             initialised",
        ));
    }
    Ok((model, config))
}
