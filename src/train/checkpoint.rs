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
//! The `quantizer.` tensors are a quantizer checkpoint's ([`crate::checkpoint::Checkpoint`]),
//! written and read by the same code.
//!
//! Metadata: `format = "vqx-train"`, `version = "1"`, `step`, `config` (the [`TrainConfig`] as
//! JSON), `quantizer_step`, `quantizer_initialized`, `writer`.

use super::{AdamW, Dataset, TrainConfig, Trainer, parameter_names};
use crate::backend::Device;
use crate::checkpoint::Checkpoint;
use crate::checkpoint::tensors::{F32, TRAINING, TensorFile, TensorWriter, err};
use crate::ema::EmaState;
use crate::error::{Error, Result};
use crate::model::{Mlp, VqVae};
use crate::quantizer::VectorQuantizer;
use std::path::Path;

/// The file name of a run's checkpoint inside its output directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// Writes the trainer's whole state to `path` atomically (brought from the device first when
/// the step runs there).
pub fn save_trainer(t: &mut Trainer, path: &Path) -> Result<()> {
    t.sync()?;
    let m = &t.model;
    let mut w = TensorWriter::new(&TRAINING);
    for (part, mlp) in [("encoder", &m.encoder), ("decoder", &m.decoder)] {
        for (name, shape, v) in mlp.tensors() {
            w.tensor(format!("{part}.{name}"), &shape, v)?;
        }
    }
    let q = &m.quantizer;
    q.to_checkpoint()?.put_tensors(&mut w, "quantizer.")?;
    for (i, (name, _, _)) in parameter_names(m).iter().enumerate() {
        for (moment, values) in [("m", &t.optimizer.m[i]), ("v", &t.optimizer.v[i])] {
            w.tensor(format!("adam.{moment}.{name}"), &[values.len()], values)?;
        }
    }
    let config = serde_json::to_string(&t.config)
        .map_err(|e| Error::internal("encoding the training configuration as JSON", e))?;
    w.meta("step", t.step);
    w.meta("config", config);
    w.meta("quantizer_step", q.step());
    w.meta("quantizer_initialized", q.initialized());
    w.write(path)
}

/// Tensor `name` of `shape`, f32 and finite.
fn finite(file: &TensorFile, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let v = file.required(name, &F32, shape)?;
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(file.err(format!("`{name}` holds {} at {i}", v[i]))),
        None => Ok(v),
    }
}

fn mlp_into(file: &TensorFile, part: &str, mlp: &mut Mlp) -> Result<()> {
    let shapes: Vec<(String, Vec<usize>)> =
        mlp.tensors().into_iter().map(|(n, s, _)| (n, s)).collect();
    for ((name, shape), dst) in shapes.iter().zip(mlp.tensors_mut()) {
        dst.copy_from_slice(&finite(file, &format!("{part}.{name}"), shape)?);
    }
    Ok(())
}

/// The quantizer of a checkpoint, configured as `qcfg`: its tensors (`quantizer.` and the
/// quantizer checkpoint's names) when it was initialised, a fresh one otherwise.
fn quantizer(
    file: &TensorFile,
    qcfg: crate::quantizer::QuantizerConfig,
) -> Result<VectorQuantizer> {
    if !file.parse_meta::<bool>("quantizer_initialized", "true or false")? {
        return VectorQuantizer::new(qcfg);
    }
    let step = file.parse_meta("quantizer_step", "a non-negative integer")?;
    // The configuration's shape first: the other tensors are checked against the codebook's.
    let (k, d) = (qcfg.codebook_size, qcfg.dim);
    let [rows, cols] = file.dims("quantizer.codebook", "K×D")?;
    if (rows, cols) != (k, d) {
        return Err(file.err(format!(
            "`quantizer.codebook` is {rows}×{cols} but the configuration has codebook_size \
             {k}, dim {d}; expected {k}×{d}"
        )));
    }
    let c = Checkpoint::read_tensors(file, "quantizer.")?;
    let ema = match (c.cluster_size, c.embed_avg) {
        (Some(n), Some(m)) => Some(EmaState::from_parts(n, m)?),
        _ => None,
    };
    let usage = c
        .usage_total
        .ok_or_else(|| file.missing("quantizer.usage.total"))?
        .into_iter()
        .map(|c| c.max(0.0) as u64)
        .collect();
    VectorQuantizer::from_state(qcfg, c.codebook, ema, step, Some(usage))
}

/// A checkpoint's configuration, step, model and optimiser, with the quantizer on `device`.
pub(crate) fn read(path: &Path, device: Device) -> Result<(TrainConfig, u64, VqVae, AdamW)> {
    let file = TensorFile::read(path)?;
    file.check_layout(&TRAINING)?;
    let config: TrainConfig = serde_json::from_str(
        file.meta("config")
            .ok_or_else(|| file.err("no `config` metadata"))?,
    )
    .map_err(|e| {
        file.err(format!(
            "config metadata is not a vqx training configuration: {e}"
        ))
    })?;
    config
        .validate()
        .map_err(|e| file.err(format!("stored configuration: {e}")))?;
    let step: u64 = file.parse_meta("step", "a non-negative integer")?;
    let qcfg = config.quantizer.clone().device(device);
    let fresh = VqVae::new(config.model.clone(), qcfg.clone())?;
    let (mut encoder, mut decoder) = (fresh.encoder, fresh.decoder);
    mlp_into(&file, "encoder", &mut encoder)?;
    mlp_into(&file, "decoder", &mut decoder)?;
    let quantizer = quantizer(&file, qcfg)?;
    let model = VqVae::from_parts(config.model.clone(), encoder, decoder, quantizer)?;
    let names = parameter_names(&model);
    let mut opt = AdamW::new(config.adam, &names.iter().map(|n| n.1).collect::<Vec<_>>());
    for (i, (name, len, _)) in names.iter().enumerate() {
        opt.m[i] = finite(&file, &format!("adam.m.{name}"), &[*len])?;
        opt.v[i] = finite(&file, &format!("adam.v.{name}"), &[*len])?;
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
