//! Training a [`VqVae`] (issue 5): the configuration, one optimisation step (forward, backward,
//! global-norm clipping, AdamW under a warm-up + cosine schedule, the codebook by EMA or by
//! AdamW), evaluation on held-out rows, and checkpoints that resume bit for bit.
//!
//! A resumed run is the uninterrupted one: the checkpoint holds every parameter, AdamW's
//! moments, the step and the quantizer's state; the batches and the quantizer's random draws
//! are functions of (seed, step), so nothing else carries state.
//!
//! Data-parallel training over the ranks of a [`crate::collective::Collective`] (threads or
//! MPI processes, each with its shard of the data): [`ShardedTrainer`].

mod checkpoint;
mod data;
mod device;
mod optim;
mod ranks;

pub use checkpoint::{CHECKPOINT_FILE, load_model, load_trainer, save_trainer};
pub use data::{
    BatchSampler, DataShard, DataSource, Dataset, MAX_DEFAULT_EVAL_ROWS, Synthetic,
    default_eval_rows,
};
pub use optim::{AdamW, AdamWConfig, WarmupCosine, clip_global_norm, clip_scale, global_norm};
pub use ranks::{SYNC_CHECK_EVERY, ShardedTrainer, batch_part, rank_seed};

use crate::error::{Error, Result, setting};
use crate::matrix::MatRef;
use crate::model::{PhaseSeconds, StepWorkspace, VqVae, VqVaeConfig};
use crate::quantizer::{CodebookLearning, QuantizerConfig};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Everything that defines a training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: VqVaeConfig,
    pub quantizer: QuantizerConfig,
    pub data: DataSource,
    /// Total optimisation steps.
    pub steps: u64,
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: u64,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f64,
    pub adam: AdamWConfig,
    /// Global gradient-norm limit; 0 = no clipping.
    pub clip: f64,
    /// Keep the encoder at its initial weights (the control of the "encoder learns through
    /// the straight-through estimator" experiment).
    pub freeze_encoder: bool,
    /// Seed of the batch order.
    pub seed: u64,
    /// Ranks of the data-parallel job that trains it (`--shards`, `mpirun -np`): each takes
    /// its part of every batch from its own shard of the data ([`ShardedTrainer`]), so the
    /// batches depend on it. 1 for a run in one process.
    #[serde(default = "one_rank")]
    pub ranks: usize,
}

fn one_rank() -> usize {
    1
}

impl TrainConfig {
    /// A run on `data` with the defaults: 2000 steps of 256 rows, lr 1e-3 with 100 warm-up
    /// steps down to 0.1·lr, AdamW (0.9, 0.95, wd 0.05), clipping at 1.0.
    ///
    /// ```
    /// use vqx::model::VqVaeConfig;
    /// use vqx::quantizer::QuantizerConfig;
    /// use vqx::train::{DataSource, Synthetic, TrainConfig};
    /// let data = DataSource::Synthetic {
    ///     spec: "gmm:dim=16".parse()?, rows: 1024, eval_rows: 256, seed: 0,
    /// };
    /// let cfg = TrainConfig::new(VqVaeConfig::new(16, 4, vec![32]), QuantizerConfig::new(16, 4), data);
    /// assert!(cfg.validate().is_ok());
    /// # Ok::<(), vqx::Error>(())
    /// ```
    pub fn new(model: VqVaeConfig, quantizer: QuantizerConfig, data: DataSource) -> Self {
        TrainConfig {
            model,
            quantizer,
            data,
            steps: 2000,
            batch_size: 256,
            lr: 1e-3,
            warmup: 100,
            min_lr_ratio: 0.1,
            adam: AdamWConfig::default(),
            clip: 1.0,
            freeze_encoder: false,
            seed: 0,
            ranks: 1,
        }
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> WarmupCosine {
        WarmupCosine {
            peak: self.lr,
            warmup: self.warmup,
            total: self.steps,
            min_ratio: self.min_lr_ratio,
        }
    }

    /// Every setting in range, or an error naming the one that is not.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.quantizer.validate()?;
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.quantizer.dim != self.model.code_dim {
            return bad(format!(
                "quantizer dimension {} differs from the code dimension {}",
                self.quantizer.dim, self.model.code_dim
            ));
        }
        setting::at_least_one("steps", self.steps)?;
        setting::at_least_one("batch size", self.batch_size as u64)?;
        setting::non_negative("learning rate", self.lr)?;
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(format!(
                "min-lr ratio must be in [0, 1], got {}",
                self.min_lr_ratio
            ));
        }
        let a = self.adam;
        if !((0.0..1.0).contains(&a.beta1) && (0.0..1.0).contains(&a.beta2)) {
            return bad(format!(
                "AdamW betas must be in [0, 1), got ({}, {})",
                a.beta1, a.beta2
            ));
        }
        if !(a.eps > 0.0 && a.weight_decay >= 0.0 && a.weight_decay.is_finite()) {
            return bad("AdamW eps must be > 0 and weight decay finite and ≥ 0".into());
        }
        setting::non_negative("clip", self.clip)?;
        setting::at_least_one("ranks", self.ranks as u64)?;
        Ok(())
    }
}

/// What one training step reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepMetrics {
    /// Steps taken, this one included.
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub reconstruction: f64,
    pub commitment: f64,
    pub codebook_loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub perplexity: f64,
    pub used: usize,
    pub dead: usize,
    pub replaced: usize,
    /// Seconds of the whole step (batch gather, passes, optimiser).
    pub step_seconds: f64,
    /// Seconds of it in the quantizer's forward and backward.
    pub quantizer_seconds: f64,
    /// Bytes the quantizer's backend copied host → device during the step (0 on the CPU).
    pub h2d_bytes: u64,
    /// Bytes it copied device → host.
    pub d2h_bytes: u64,
    /// Where the step's time went, phase by phase (the CPU trainer; absent on a device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases: Option<PhaseSeconds>,
    /// Seconds of it in the all-reduce across ranks, with packing its buffer (the gradients
    /// to f64, the EMA sums) and waiting for the slowest rank (a job of ranks only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allreduce_seconds: Option<f64>,
}

/// A model, its optimiser state and the data, at a step.
///
/// ```
/// use vqx::model::VqVaeConfig;
/// use vqx::quantizer::QuantizerConfig;
/// use vqx::train::{DataSource, Trainer, TrainConfig};
/// let data = DataSource::Synthetic {
///     spec: "gmm:dim=8,components=4".parse()?, rows: 256, eval_rows: 64, seed: 0,
/// };
/// let mut cfg = TrainConfig::new(
///     VqVaeConfig::new(8, 2, vec![16]),
///     QuantizerConfig::new(8, 2).device(vqx::backend::Device::Cpu),
///     data,
/// );
/// cfg.steps = 5;
/// cfg.batch_size = 32;
/// let mut t = Trainer::new(cfg)?;
/// while !t.finished() {
///     let m = t.step()?;
///     assert!(m.loss.is_finite());
/// }
/// assert!(t.evaluate()? > 0.0);
/// # Ok::<(), vqx::Error>(())
/// ```
pub struct Trainer {
    pub config: TrainConfig,
    /// The model. With the step on a device (`--device cuda|cuda-emu`) the device holds the
    /// current parameters: [`Trainer::sync`] brings them here (evaluation and checkpoints do).
    pub model: VqVae,
    pub optimizer: AdamW,
    /// Steps taken.
    pub step: u64,
    pub data: Dataset,
    sampler: BatchSampler,
    /// The whole step on a device, when the quantizer's device is one.
    engine: Option<Box<dyn device::DeviceEngine>>,
    /// Whether `model` and `optimizer` lag the device's state.
    stale: bool,
    /// The CPU step's buffers and gradients, kept from step to step, and which of the
    /// parameter tensors take weight decay.
    workspace: Option<(StepWorkspace, Vec<bool>)>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("step", &self.step)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Names of the trained tensors in optimiser order, and whether weight decay applies.
pub(crate) fn parameter_names(model: &VqVae) -> Vec<(String, usize, bool)> {
    let mut out = Vec::new();
    for (part, mlp) in [("encoder", &model.encoder), ("decoder", &model.decoder)] {
        for (name, _, v) in mlp.tensors() {
            let decay = name.starts_with("linears.") && name.ends_with(".weight");
            out.push((format!("{part}.{name}"), v.len(), decay));
        }
    }
    if model.quantizer.config().learning == CodebookLearning::Gradient {
        out.push((
            "quantizer.codebook".into(),
            model.quantizer.codebook().data().len(),
            false,
        ));
    }
    out
}

/// How many tensors [`parameter_names`] lists, without building the names.
fn tensor_count(model: &VqVae) -> usize {
    let per_mlp = |m: &crate::model::Mlp| 2 * (m.linears.len() + m.norms.len());
    let codebook = model.quantizer.config().learning == CodebookLearning::Gradient;
    per_mlp(&model.encoder) + per_mlp(&model.decoder) + usize::from(codebook)
}

impl Trainer {
    /// A fresh run: loads or generates the data, initialises the model (seeded).
    pub fn new(config: TrainConfig) -> Result<Self> {
        config.validate()?;
        let data = Dataset::load(&config.data)?;
        let model = VqVae::new(config.model.clone(), config.quantizer.clone())?;
        let sizes: Vec<usize> = parameter_names(&model).iter().map(|p| p.1).collect();
        let optimizer = AdamW::new(config.adam, &sizes);
        Self::from_parts(config, model, optimizer, 0, data)
    }

    /// Assembles a trainer (e.g. from a checkpoint), checking the data width.
    pub fn from_parts(
        config: TrainConfig,
        model: VqVae,
        optimizer: AdamW,
        step: u64,
        data: Dataset,
    ) -> Result<Self> {
        if data.train.cols() != config.model.data_dim {
            return Err(Error::shape(
                "data width vs the model's data dimension",
                format!("{} columns", config.model.data_dim),
                format!("{} columns", data.train.cols()),
            ));
        }
        data.train.as_ref().check_nonempty("training data")?;
        data.check_batch(&config.data, config.batch_size)?;
        let sampler = BatchSampler::new(data.train.rows(), config.batch_size, config.seed);
        let engine = device_engine(&config, &model, &optimizer, &data)?;
        Ok(Trainer {
            config,
            model,
            optimizer,
            step,
            data,
            sampler,
            engine,
            stale: false,
            workspace: None,
        })
    }

    /// Where the step runs: "cpu", or the device that runs all of it ("cuda", "cuda-emu").
    pub fn runs_on(&self) -> &'static str {
        match &self.engine {
            Some(e) => e.device_name(),
            None => "cpu",
        }
    }

    /// Brings the device's parameters, optimiser moments and quantizer state into `model` and
    /// `optimizer` (a no-op when the step runs on the CPU or nothing changed since).
    pub fn sync(&mut self) -> Result<()> {
        if let (Some(e), true) = (&self.engine, self.stale) {
            e.sync_to_host(&mut self.model, &mut self.optimizer)?;
            self.stale = false;
        }
        Ok(())
    }

    /// Whether every configured step has been taken.
    pub fn finished(&self) -> bool {
        self.step >= self.config.steps
    }

    /// One optimisation step on the next batch.
    pub fn step(&mut self) -> Result<StepMetrics> {
        if self.engine.is_some() {
            return self.device_step();
        }
        let start = Instant::now();
        let moved_before = self.model.quantizer.backend().transfers();
        let d = self.data.train.cols();
        let rows = self.sampler.indices(self.step);
        let batch = crate::quantizer::gather_rows(self.data.train.as_ref(), &rows);
        let (mut ws, decay) = self.take_workspace();
        let out = self.model.forward_backward_with(
            MatRef::new(batch.data(), rows.len(), d)?,
            true,
            &mut ws,
        )?;

        let t_opt = Instant::now();
        let lr = self.config.schedule().lr(self.step);
        let grad_norm = self.apply_gradients(&mut ws.grads, &decay, lr)?;
        let mut phases = out.phases;
        phases.optimizer = t_opt.elapsed().as_secs_f64();
        self.workspace = Some((ws, decay));
        self.step += 1;
        let moved = self
            .model
            .quantizer
            .backend()
            .transfers()
            .since(moved_before);
        let out = device::DeviceStepOut {
            reconstruction: out.reconstruction,
            commitment: out.commitment,
            codebook: out.codebook,
            grad_norm,
            stats: out.stats,
            quantizer_seconds: out.quantizer_seconds,
        };
        let mut m = self.metrics(lr, out, start, moved);
        m.phases = Some(phases);
        Ok(m)
    }

    /// The step's buffers, kept from the last step when they still fit the model, and which
    /// parameter tensors take weight decay.
    fn take_workspace(&mut self) -> (StepWorkspace, Vec<bool>) {
        match self.workspace.take() {
            Some((ws, decay))
                if ws.fits(&self.model) && decay.len() == tensor_count(&self.model) =>
            {
                (ws, decay)
            }
            _ => (
                StepWorkspace::new(&self.model),
                parameter_names(&self.model).iter().map(|n| n.2).collect(),
            ),
        }
    }

    /// The optimiser's update from `grads` at learning rate `lr`: global-norm clipping, AdamW
    /// on the encoder (unless frozen), the decoder and a gradient-learned codebook. Returns
    /// the gradient norm before clipping.
    fn apply_gradients(
        &mut self,
        grads: &mut crate::model::VqVaeGrads,
        decay: &[bool],
        lr: f64,
    ) -> Result<f64> {
        let frozen = self.config.freeze_encoder;
        let learn_codebook = grads.codebook.is_some();
        let mut codebook = learn_codebook.then(|| self.model.quantizer.codebook().clone());
        let grad_norm;
        {
            let mut g: Vec<&mut [f32]> = grads.encoder.tensors_mut();
            let n_enc = g.len();
            g.extend(grads.decoder.tensors_mut());
            if let Some(c) = grads.codebook.as_mut() {
                g.push(c.data_mut());
            }
            // A frozen encoder's tensors (first in the order) keep their initial values, and
            // their gradient takes no part in the norm.
            let first = if frozen { n_enc } else { 0 };
            let gr: Vec<&[f32]> = g.iter().map(|s| &**s).collect();
            grad_norm = global_norm(&gr[first..]);
            // Clipping is applied inside the update (the same values as clip_global_norm's).
            let scale = clip_scale(grad_norm, self.config.clip);
            let mut p: Vec<&mut [f32]> = self.model.encoder.tensors_mut();
            p.extend(self.model.decoder.tensors_mut());
            if let Some(c) = codebook.as_mut() {
                p.push(c.data_mut());
            }
            self.optimizer
                .step_scaled(first, &mut p, &gr, decay, lr, self.step + 1, scale);
        }
        if let Some(c) = codebook {
            self.model.quantizer.set_codebook(c)?;
        }
        Ok(grad_norm)
    }

    /// One step with everything on the device: the batch's row ids go up, scalars come back.
    fn device_step(&mut self) -> Result<StepMetrics> {
        let start = Instant::now();
        let engine = self.engine.as_mut().expect("checked by step");
        let moved_before = engine.transfers();
        let rows: Vec<u32> = self
            .sampler
            .indices(self.step)
            .into_iter()
            .map(|r| r as u32)
            .collect();
        let lr = self.config.schedule().lr(self.step);
        let out = engine.step(
            &rows,
            &device::StepPlan {
                lr,
                t: self.step + 1,
                clip: self.config.clip,
                freeze_encoder: self.config.freeze_encoder,
            },
        )?;
        self.stale = true;
        self.step += 1;
        let moved = engine.transfers().since(moved_before);
        Ok(self.metrics(lr, out, start, moved))
    }

    /// The metrics of the step just taken, whichever engine took it.
    fn metrics(
        &self,
        lr: f64,
        out: device::DeviceStepOut,
        start: Instant,
        moved: crate::backend::Transfers,
    ) -> StepMetrics {
        StepMetrics {
            step: self.step,
            lr,
            // The sum in the order `VqVae::forward_backward` forms its loss.
            loss: out.reconstruction + out.commitment + out.codebook,
            reconstruction: out.reconstruction,
            commitment: out.commitment,
            codebook_loss: out.codebook,
            grad_norm: out.grad_norm,
            perplexity: out.stats.perplexity,
            used: out.stats.used,
            dead: out.stats.dead,
            replaced: out.stats.replaced,
            step_seconds: start.elapsed().as_secs_f64(),
            quantizer_seconds: out.quantizer_seconds,
            h2d_bytes: moved.h2d_bytes,
            d2h_bytes: moved.d2h_bytes,
            phases: None,
            allreduce_seconds: None,
        }
    }

    /// Reconstruction MSE on the held-out rows (on the training rows when none are held out).
    pub fn evaluate(&mut self) -> Result<f64> {
        self.sync()?;
        let x = if self.data.eval.rows() > 0 {
            &self.data.eval
        } else {
            &self.data.train
        };
        self.model.reconstruction_mse(x.as_ref())
    }
}

/// The device engine for the quantizer's device: none on the CPU (or `auto` without CUDA).
fn device_engine(
    config: &TrainConfig,
    model: &VqVae,
    optimizer: &AdamW,
    data: &Dataset,
) -> Result<Option<Box<dyn device::DeviceEngine>>> {
    use crate::backend::Device;
    use crate::backend::cuda::{CudaBackend, EmuBackend};
    let decay: Vec<bool> = parameter_names(model).iter().map(|p| p.2).collect();
    let (train, batch) = (&data.train, config.batch_size);
    fn engine<G: crate::backend::cuda::Gpu + 'static>(
        backend: Result<crate::backend::cuda::GpuBackend<G>>,
        model: &VqVae,
        optimizer: &AdamW,
        train: &crate::Matrix,
        batch: usize,
        decay: &[bool],
    ) -> Result<Box<dyn device::DeviceEngine>> {
        let t = device::DeviceTrainer::new(backend?, model, optimizer, train, batch, decay)?;
        Ok(Box::new(t))
    }
    let built = match config.quantizer.device {
        Device::Cpu => return Ok(None),
        Device::CudaEmu => engine(EmuBackend::new(), model, optimizer, train, batch, &decay),
        Device::Cuda | Device::Auto => {
            engine(CudaBackend::new(0), model, optimizer, train, batch, &decay)
        }
    };
    match (built, config.quantizer.device) {
        // `auto` never fails: without a GPU, the kernels or cuBLAS, the step runs on the CPU.
        (Err(_), Device::Auto) => Ok(None),
        (built, _) => built.map(Some),
    }
}
