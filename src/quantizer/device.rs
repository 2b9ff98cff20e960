//! The quantizer layer with its state on the device: codebook, EMA counts and sums and usage
//! totals stay in device memory across steps; forward, backward, losses, the EMA update,
//! dead-code re-seeding and statistics run as kernels. What crosses the bus per training step
//! is a handful of scalars (the input check, the kept-row count under a mask, the dead-code
//! count) plus, only when codes are dead, their ids and the (code, row) pairs that re-seed them;
//! losses and statistics are read back only when asked. The step is the one
//! [`super::VectorQuantizer`] takes on the CPU, in the same order and arithmetic: in
//! deterministic mode its codebook is bit-identical to the CPU layer's after every step.
//!
//! One exception: the initialising step (the first training batch of a quantizer built with
//! [`DeviceQuantizer::new`]) copies that batch to the host once, where the data or k-means++
//! seeding runs exactly as on the CPU. A quantizer built from a codebook never does.
//!
//! ```
//! use std::sync::Arc;
//! use vqx::backend::cuda::{DeviceMatrix, EmuBackend, Gpu};
//! use vqx::quantizer::{DeviceQuantizer, QuantizerConfig};
//! use vqx::Matrix;
//! let backend = Arc::new(EmuBackend::new()?); // the caller keeps a handle on the device
//! let gpu = backend.gpu();
//! let codebook = Matrix::new(vec![0.0, 0.0, 5.0, 5.0], 2, 2)?;
//! let mut vq = DeviceQuantizer::with_codebook(QuantizerConfig::new(2, 2), codebook, backend.clone())?;
//! let x = DeviceMatrix::upload(gpu, "x", Matrix::new(vec![0.1, 0.0, 4.9, 5.2], 2, 2)?.as_ref())?;
//! vq.forward(&x, None, true)?;
//! assert_eq!(gpu.download("indices", vq.indices()?)?, vec![0, 1]);
//! assert!(vq.losses()?.commitment > 0.0);
//! # Ok::<(), vqx::Error>(())
//! ```

use super::grad::check_like_forward;
use super::{
    CodebookLearning, Estimator, Init, QuantizerConfig, StepStats, check_codebook_dims,
    check_codebook_shape, check_input_width, choose_reseeds, losses, seed_codebook, start_step,
    step_rng,
};
use crate::backend::cuda::launch::{self, DeviceList};
use crate::backend::cuda::sort::{self, SortScratch};
use crate::backend::cuda::step::{self, EmaDevice, StepScratch};
use crate::backend::cuda::{
    DeviceAssignment, DeviceCodebook, DeviceMatrix, Gpu, GpuBackend, Storage,
};
use crate::ema::EmaState;
use crate::error::{Error, Result};
use crate::matrix::Matrix;
use crate::nearest::{Metric, check_max_abs};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

/// Losses of the last forward pass, read from the device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceLosses {
    /// β·mean((x − sg(q))²) over the kept rows.
    pub commitment: f32,
    /// mean((sg(x) − q)²) over the kept rows under gradient learning; 0 under EMA.
    pub codebook: f32,
}

/// A vector-quantization layer whose state lives on a device (`G`: a GPU, or the emulated
/// device). See the module documentation.
pub struct DeviceQuantizer<G: Gpu> {
    config: QuantizerConfig,
    backend: Arc<GpuBackend<G>>,
    codebook: DeviceCodebook<G>,
    /// EMA counts, sums and the codebook they imply (EMA learning only).
    ema: Option<EmaDevice<G>>,
    usage_total: G::Buf<u64>,
    initted: bool,
    step: u64,
    rng: ChaCha8Rng,
    /// This step's histogram of the kept rows' codes (K).
    counts: G::Buf<u32>,
    /// This step's per-code sums (K × D).
    sums: G::Buf<f32>,
    /// Σ (x − q)² over the kept rows (one f64).
    sq_err: G::Buf<f64>,
    /// (total, used) of `counts` and its entropy (usage_stats).
    usage_totals: G::Buf<u64>,
    entropy: G::Buf<f64>,
    /// Dead-code flags (K), their ids in increasing order and their count.
    dead_flags: G::Buf<u32>,
    dead_list: DeviceList<G>,
    step_scratch: StepScratch<G>,
    sort_scratch: SortScratch<G>,
    batch: Option<Batch<G>>,
    /// Rows that counted in the last forward pass.
    kept: usize,
}

/// Buffers sized for one batch shape, reused while the batch size stays the same.
struct Batch<G: Gpu> {
    n: usize,
    assign: DeviceAssignment<G>,
    quantized: DeviceMatrix<G>,
    /// The kept rows' ids, count, codes and values (under a mask).
    kept_rows: G::Buf<u32>,
    kept_count: G::Buf<u32>,
    kept_idx: G::Buf<u32>,
    kept_x: G::Buf<f32>,
    /// dL/dx of the last backward pass.
    grad_x: DeviceMatrix<G>,
    /// Gradient learning: (q − x) of the kept rows, and the codebook gradient (K × D).
    diff: G::Buf<f32>,
    grad_codebook: Option<DeviceMatrix<G>>,
    /// Cosine: the kept rows L2-normalised under a mask (made on first use).
    unit: Option<G::Buf<f32>>,
    /// Cosine: every row of the input L2-normalised, x̂ (n × D, made on first use).
    x_unit: Option<G::Buf<f32>>,
    /// The mask of the last forward pass, when there was one (n flags).
    mask: Option<G::Buf<u32>>,
}

impl<G: Gpu> DeviceQuantizer<G> {
    /// A quantizer whose codebook is initialised from its first training batch (that batch is
    /// copied to the host once: see the module documentation).
    pub fn new(config: QuantizerConfig, backend: Arc<GpuBackend<G>>) -> Result<Self> {
        config.validate()?;
        if config.init == Init::Given {
            return Err(Error::InvalidArgument(
                "init = given needs a codebook: use DeviceQuantizer::with_codebook".into(),
            ));
        }
        let codebook = Matrix::zeros(config.codebook_size, config.dim);
        Self::build(config, backend, codebook, None, false)
    }

    /// A quantizer starting from `codebook` (K × D as configured); EMA counts start at 1.
    pub fn with_codebook(
        mut config: QuantizerConfig,
        codebook: Matrix,
        backend: Arc<GpuBackend<G>>,
    ) -> Result<Self> {
        config.init = Init::Given;
        config.validate()?;
        check_codebook_shape(&config, &codebook)?;
        codebook.as_ref().check_finite("codebook")?;
        Self::build(config, backend, codebook, None, true)
    }

    /// The device twin of a host quantizer: its configuration, codebook, EMA state, step and
    /// usage totals copied to the device once.
    pub fn from_host(vq: &super::VectorQuantizer, backend: Arc<GpuBackend<G>>) -> Result<Self> {
        let mut d = Self::build(
            vq.config().clone(),
            backend,
            vq.codebook().clone(),
            vq.ema().cloned(),
            vq.initialized(),
        )?;
        d.step = vq.step();
        let g = d.backend.gpu();
        g.write("usage totals", &mut d.usage_total, vq.usage_total())?;
        Ok(d)
    }

    fn build(
        config: QuantizerConfig,
        backend: Arc<GpuBackend<G>>,
        codebook: Matrix,
        ema: Option<EmaState>,
        initted: bool,
    ) -> Result<Self> {
        let (k, d) = (config.codebook_size, config.dim);
        let g = backend.gpu();
        let ema = match config.learning {
            CodebookLearning::Ema { .. } => {
                let state = ema.unwrap_or_else(|| EmaState::seeded(codebook.as_ref()));
                Some(EmaDevice::upload(g, &state, codebook.as_ref())?)
            }
            CodebookLearning::Gradient => None,
        };
        let cb = DeviceCodebook::from_device(
            g,
            DeviceMatrix::upload(g, "codebook", codebook.as_ref())?,
            config.metric,
        )?;
        Ok(DeviceQuantizer {
            rng: step_rng(config.seed, 0),
            usage_total: g.alloc_zeros("usage totals", k)?,
            counts: g.alloc_zeros("batch usage", k)?,
            sums: g.alloc_zeros("batch sums", k * d)?,
            sq_err: g.alloc_zeros("squared error", 1)?,
            usage_totals: g.alloc_zeros("usage totals of the batch", 2)?,
            entropy: g.alloc_zeros("usage entropy", 1)?,
            dead_flags: g.alloc_zeros("dead-code flags", k)?,
            dead_list: DeviceList::new(g, k, "dead codes")?,
            step_scratch: StepScratch::new(g)?,
            sort_scratch: SortScratch::new(),
            batch: None,
            kept: 0,
            codebook: cb,
            ema,
            initted,
            step: 0,
            config,
            backend,
        })
    }

    pub fn config(&self) -> &QuantizerConfig {
        &self.config
    }
    /// The backend (and through it the device) the layer runs on, shared with the caller.
    pub fn backend(&self) -> &Arc<GpuBackend<G>> {
        &self.backend
    }
    pub fn step(&self) -> u64 {
        self.step
    }
    pub fn initialized(&self) -> bool {
        self.initted
    }
    /// The codebook on the device.
    pub fn codebook(&self) -> &DeviceCodebook<G> {
        &self.codebook
    }
    /// Codes assigned over all training steps (K values on the device).
    pub fn usage_total(&self) -> &G::Buf<u64> {
        &self.usage_total
    }
    /// The EMA counts N_k (K values on the device; EMA learning only).
    pub fn ema_counts(&self) -> Option<&G::Buf<f32>> {
        self.ema.as_ref().map(|e| &e.cluster_size)
    }
    /// The EMA sums m_k (K × D values on the device; EMA learning only).
    pub fn ema_sums(&self) -> Option<&G::Buf<f32>> {
        self.ema.as_ref().map(|e| &e.embed_avg)
    }

    fn batch(&self) -> Result<&Batch<G>> {
        self.batch
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("no forward pass has run yet".into()))
    }
    /// The winning code per row of the last forward pass (n values on the device); an error
    /// before the first forward pass.
    pub fn indices(&self) -> Result<&G::Buf<u32>> {
        Ok(self.batch()?.assign.indices())
    }
    /// The winning distance per row of the last forward pass.
    pub fn distances(&self) -> Result<&G::Buf<f32>> {
        Ok(self.batch()?.assign.distances())
    }
    /// q = C[i] of the last forward pass, from the codebook the rows were assigned with.
    pub fn quantized(&self) -> Result<&DeviceMatrix<G>> {
        Ok(&self.batch()?.quantized)
    }
    /// dL/dx of the last backward pass (zeros before one).
    pub fn grad_x(&self) -> Result<&DeviceMatrix<G>> {
        Ok(&self.batch()?.grad_x)
    }
    /// dL/dC of the last backward pass (gradient learning only).
    pub fn grad_codebook(&self) -> Option<&DeviceMatrix<G>> {
        self.batch.as_ref().and_then(|b| b.grad_codebook.as_ref())
    }

    /// Quantizes `x` (n × D: rows on the device, or host rows, uploaded first) on the device.
    /// `mask` (n flags, non-zero = the row counts) marks padding rows: they get indices and
    /// outputs but count in no loss, statistic, init or EMA update. `train` runs the training-side effects (init on the first batch, EMA update,
    /// dead-code re-seeding). The outputs stay on the device ([`Self::indices`],
    /// [`Self::quantized`]); [`Self::losses`] and [`Self::stats`] read scalars back.
    pub fn forward<'a>(
        &mut self,
        x: impl Into<Storage<'a, G>>,
        mask: Option<&G::Buf<u32>>,
        train: bool,
    ) -> Result<StepStats> {
        let x = x.into().on_device(self.backend.gpu(), "input")?;
        let (d, n) = (self.config.dim, x.rows());
        check_input_width(&self.config, x.cols())?;
        if n == 0 {
            return Err(Error::Empty {
                what: "input".into(),
                detail: "no rows".into(),
            });
        }
        let g = self.backend.gpu();
        let max_x = x.check_finite(g, "input")?;
        check_max_abs("input", max_x as f64, d)?;
        let mut batch = match self.batch.take() {
            Some(b) if b.n == n => b,
            _ => Batch::new(g, n, d, &mut self.sort_scratch)?,
        };
        let result = self.forward_batch(&mut batch, &x, mask, train);
        self.batch = Some(batch);
        result
    }

    fn forward_batch(
        &mut self,
        batch: &mut Batch<G>,
        x: &DeviceMatrix<G>,
        mask: Option<&G::Buf<u32>>,
        train: bool,
    ) -> Result<StepStats> {
        let (k, d, n) = (self.config.codebook_size, self.config.dim, x.rows());
        let g = self.backend.gpu();
        batch.mask = match mask {
            Some(m) => {
                launch::check_len(g, m, n, "mask (one flag per row)")?;
                let mut own = batch.mask.take().unwrap_or(g.alloc_zeros("mask", n)?);
                g.copy("mask", m, &mut own)?;
                Some(own)
            }
            None => None,
        };
        // The rows that count: all, or the mask's (compacted on the device; its count is read).
        let kept = match &batch.mask {
            None => n,
            Some(m) => {
                sort::compact(
                    g,
                    m,
                    n,
                    &mut batch.kept_rows,
                    &mut batch.kept_count,
                    &mut self.sort_scratch,
                )?;
                g.download("kept-row count", &batch.kept_count)?[0] as usize
            }
        };
        self.kept = kept;
        if kept < n && kept > 0 {
            launch::gather(g, x.buf(), &batch.kept_rows, &mut batch.kept_x, kept, d)?;
        }
        let xk: &G::Buf<f32> = if kept < n { &batch.kept_x } else { x.buf() };

        let mut initialized = false;
        // As on the CPU: the step's generator, and the first batch must keep a row.
        if let Some(rng) = start_step(&self.config, self.step, train, self.initted, kept)? {
            self.rng = rng;
            if !self.initted {
                // The one host copy: the seeding runs exactly as on the CPU.
                let rows = g.read("first batch", xk, 0, kept * d)?;
                self.initialize(&Matrix::new(rows, kept, d)?)?;
                initialized = true;
            }
        }
        let g = self.backend.gpu();
        self.backend
            .nearest_device(x, &self.codebook, &mut batch.assign)?;
        self.backend.gather_device(
            self.codebook.rows(),
            batch.assign.indices(),
            &mut batch.quantized,
        )?;
        // Under cosine the losses, sums and re-seeded rows use x̂ = x/‖x‖, as on the CPU.
        let cosine = self.config.metric == Metric::Cosine;
        let xt = transformed(g, cosine, x.buf(), &mut batch.x_unit, n, d)?;
        step::squared_error(
            g,
            xt,
            batch.quantized.buf(),
            batch.mask.as_ref(),
            n,
            d,
            &mut self.step_scratch,
            &mut self.sq_err,
        )?;
        let kept_idx: &G::Buf<u32> = if kept < n {
            sort::gather_counted(
                g,
                batch.assign.indices(),
                &batch.kept_rows,
                &batch.kept_count,
                &mut batch.kept_idx,
            )?;
            &batch.kept_idx
        } else {
            batch.assign.indices()
        };
        self.backend
            .usage_device(kept_idx, kept, &mut self.counts)?;
        step::usage_stats(
            g,
            &self.counts,
            k,
            &mut self.step_scratch,
            &mut self.usage_totals,
            &mut self.entropy,
        )?;

        let (mut dead, mut replaced) = (0, 0);
        if train {
            step::usage_accumulate(g, &mut self.usage_total, &self.counts, k)?;
            if let (Some(ema), CodebookLearning::Ema { decay, eps }) =
                (self.ema.as_mut(), self.config.learning)
                && kept > 0
            {
                // The kept rows of x̂ under cosine (normalised after compaction: the same bits).
                let xs: &G::Buf<f32> = if cosine && kept < n {
                    let unit = scratch(g, &mut batch.unit, n * d)?;
                    launch::normalize_rows(g, xk, unit, kept, d)?;
                    unit
                } else if cosine {
                    xt
                } else {
                    xk
                };
                if self.config.deterministic {
                    sort::code_sums_deterministic(
                        g,
                        xs,
                        kept_idx,
                        kept,
                        d,
                        k,
                        &mut self.sums,
                        &mut self.counts,
                        &mut self.sort_scratch,
                    )?;
                } else {
                    g.zero("batch sums", &mut self.sums)?;
                    g.zero("batch usage", &mut self.counts)?;
                    launch::sums_atomic(
                        g,
                        xs,
                        kept_idx,
                        &mut self.sums,
                        &mut self.counts,
                        kept,
                        d,
                    )?;
                }
                step::ema_update(g, ema, &self.counts, &self.sums, decay)?;
                step::ema_codebook(g, ema, eps, self.config.metric)?;
                (dead, replaced) = reseed_dead_codes(
                    g,
                    &self.config,
                    ema,
                    xs,
                    kept,
                    &mut self.rng,
                    DeadScratch {
                        flags: &mut self.dead_flags,
                        list: &mut self.dead_list,
                        sort: &mut self.sort_scratch,
                    },
                )?;
                g.copy(
                    "codebook",
                    &ema.codebook,
                    self.codebook.rows_mut().buf_mut(),
                )?;
                self.codebook.refresh(g)?;
            }
            self.step += 1;
        }
        Ok(StepStats {
            step: if train { self.step } else { 0 },
            rows: kept,
            // Read back by `stats` when asked.
            perplexity: f64::NAN,
            used: 0,
            dead,
            replaced,
            rechecked: 0,
            initialized,
        })
    }

    /// The losses of the last forward pass (reads 8 bytes back).
    pub fn losses(&self) -> Result<DeviceLosses> {
        let g = self.backend.gpu();
        let total = g.download("squared error", &self.sq_err)?[0];
        let mse = if self.kept == 0 {
            0.0
        } else {
            total / (self.kept as f64 * self.config.dim as f64)
        };
        let (commitment, codebook) = losses(&self.config, mse);
        Ok(DeviceLosses {
            commitment,
            codebook,
        })
    }

    /// `step` with the batch statistics filled in: perplexity and used codes of the last
    /// forward pass and its recheck count (reads 28 bytes back).
    pub fn stats(&self, mut step: StepStats) -> Result<StepStats> {
        let g = self.backend.gpu();
        let totals = g.download("batch usage totals", &self.usage_totals)?;
        let entropy = g.download("usage entropy", &self.entropy)?[0];
        step.perplexity = if totals[0] == 0 { 1.0 } else { entropy.exp() };
        step.used = totals[1] as usize;
        step.rechecked = self.batch()?.assign.rechecked(g)?;
        Ok(step)
    }

    /// dL/dx of the last forward pass given dL/d(output) (n × D), into [`Self::grad_x`]; under
    /// gradient learning also dL/dC into [`Self::grad_codebook`]. `x` is the forward's input.
    pub fn backward<'a, 'b>(
        &mut self,
        x: impl Into<Storage<'a, G>>,
        grad_output: impl Into<Storage<'b, G>>,
    ) -> Result<()> {
        let g = self.backend.gpu();
        let x = x.into().on_device(g, "input")?;
        let grad_output = grad_output.into().on_device(g, "output gradient")?;
        let (k, d) = (self.config.codebook_size, self.config.dim);
        let batch = self
            .batch
            .as_mut()
            .ok_or_else(|| Error::InvalidArgument("backward before any forward pass".into()))?;
        let n = batch.n;
        for (m, what) in [(&*x, "input"), (&*grad_output, "output gradient")] {
            check_like_forward(what, (m.rows(), m.cols()), (n, d))?;
        }
        grad_output.check_finite(g, "output gradient")?;
        let kept = self.kept;
        let scale = if kept == 0 {
            0.0
        } else {
            2.0 / (kept as f64 * d as f64)
        };
        let coef = self.config.commitment_weight as f64 * scale;
        let grad = match self.config.estimator {
            Estimator::StraightThrough => step::grad_straight_through,
            Estimator::RotationTrick => step::grad_rotation,
        };
        // Under cosine the estimator and the losses see x̂, and the gradient goes back through
        // the normalisation, as on the CPU.
        let cosine = self.config.metric == Metric::Cosine;
        let xt = transformed(g, cosine, x.buf(), &mut batch.x_unit, n, d)?;
        grad(
            g,
            grad_output.buf(),
            xt,
            batch.quantized.buf(),
            batch.mask.as_ref(),
            coef,
            n,
            d,
            &self.step_scratch,
            batch.grad_x.buf_mut(),
        )?;
        if cosine {
            step::grad_normalize(g, x.buf(), n, d, batch.grad_x.buf_mut())?;
        }
        if self.config.learning == CodebookLearning::Gradient {
            let gc = match &mut batch.grad_codebook {
                Some(gc) => gc,
                none => none.insert(DeviceMatrix::zeros(g, "codebook gradient", k, d)?),
            };
            if kept == 0 {
                g.zero("codebook gradient", gc.buf_mut())?;
                return Ok(());
            }
            // Σ over each code's kept rows of 2(q − x)/(kept·D): the deterministic scatter-add
            // over the differences, as on the CPU.
            let (rows, idx): (&G::Buf<u32>, &G::Buf<u32>) = if kept < n {
                (&batch.kept_rows, &batch.kept_idx)
            } else {
                // Every row: ids 0..n are the identity list, written once per batch shape.
                (&batch.kept_rows, batch.assign.indices())
            };
            step::grad_diff(
                g,
                batch.quantized.buf(),
                xt,
                n,
                rows,
                kept,
                d,
                &mut batch.diff,
            )?;
            sort::code_sums_deterministic(
                g,
                &batch.diff,
                idx,
                kept,
                d,
                k,
                gc.buf_mut(),
                &mut self.counts,
                &mut self.sort_scratch,
            )?;
            step::scale(g, gc.buf_mut(), k * d, scale)?;
        }
        Ok(())
    }

    /// Replaces the codebook (gradient learning: after the caller's optimiser step), from
    /// device memory; the norms are recomputed on the device.
    pub fn set_codebook(&mut self, codebook: &DeviceMatrix<G>) -> Result<()> {
        check_codebook_dims(&self.config, codebook.rows(), codebook.cols())?;
        let g = self.backend.gpu();
        codebook.check_finite(g, "codebook")?;
        g.copy(
            "codebook",
            codebook.buf(),
            self.codebook.rows_mut().buf_mut(),
        )?;
        if let Some(ema) = &mut self.ema {
            g.copy("codebook", codebook.buf(), &mut ema.codebook)?;
        }
        self.codebook.refresh(g)?;
        self.initted = true;
        Ok(())
    }

    /// The state back on the host: codebook, EMA state (EMA learning) and usage totals.
    pub fn download(&self) -> Result<(Matrix, Option<EmaState>, Vec<u64>)> {
        let g = self.backend.gpu();
        let codebook = self.codebook.download(g)?;
        let ema = match &self.ema {
            Some(e) => Some(e.download(g)?.0),
            None => None,
        };
        Ok((
            codebook,
            ema,
            g.download("usage totals", &self.usage_total)?,
        ))
    }

    /// Seeds the codebook from the first batch on the host, as `VectorQuantizer::initialize`.
    fn initialize(&mut self, x: &Matrix) -> Result<()> {
        let cpu = crate::backend::CpuBackend::new();
        let (codebook, ema) = seed_codebook(&self.config, &cpu, x.as_ref(), &mut self.rng)?;
        let g = self.backend.gpu();
        self.codebook
            .rows_mut()
            .write(g, "codebook", codebook.as_ref())?;
        self.codebook.refresh(g)?;
        if self.ema.is_some() {
            self.ema = Some(EmaDevice::upload(g, &ema, codebook.as_ref())?);
        }
        self.initted = true;
        Ok(())
    }
}

impl<G: Gpu> Batch<G> {
    fn new(g: &G, n: usize, d: usize, sort_scratch: &mut SortScratch<G>) -> Result<Self> {
        if u32::try_from(n).is_err() {
            return Err(Error::InvalidArgument(format!(
                "{n} rows exceed the u32 row ids of the device step"
            )));
        }
        // The identity row list 0..n, made on the device: the gradient-mode scatter-add reads
        // row ids even when every row is kept (a mask overwrites the first `kept` entries).
        let mut kept_rows = g.alloc_zeros("row ids", n)?;
        let mut kept_count = g.alloc_zeros("kept-row count", 1)?;
        let mut ones = g.alloc_zeros("row flags", n)?;
        sort::fill(g, &mut ones, 1, n)?;
        sort::compact(g, &ones, n, &mut kept_rows, &mut kept_count, sort_scratch)?;
        Ok(Batch {
            n,
            assign: DeviceAssignment::new(g, n)?,
            quantized: DeviceMatrix::zeros(g, "quantized rows", n, d)?,
            kept_rows,
            kept_count,
            kept_idx: g.alloc_zeros("kept rows' codes", n)?,
            kept_x: g.alloc_zeros("kept rows", n * d)?,
            grad_x: DeviceMatrix::zeros(g, "input gradient", n, d)?,
            diff: g.alloc_zeros("differences", n * d)?,
            grad_codebook: None,
            unit: None,
            x_unit: None,
            mask: None,
        })
    }
}

/// The scratch buffer in `slot` (`len` floats), allocated on first use.
fn scratch<'a, G: Gpu>(
    g: &G,
    slot: &'a mut Option<G::Buf<f32>>,
    len: usize,
) -> Result<&'a mut G::Buf<f32>> {
    Ok(match slot {
        Some(b) => b,
        none => none.insert(g.alloc_zeros("normalised rows", len)?),
    })
}

/// The layer's input as the losses and estimators see it: under cosine x̂, every row of `x`
/// (n × d) normalised into `slot`; otherwise `x` itself.
fn transformed<'a, G: Gpu>(
    g: &G,
    cosine: bool,
    x: &'a G::Buf<f32>,
    slot: &'a mut Option<G::Buf<f32>>,
    n: usize,
    d: usize,
) -> Result<&'a G::Buf<f32>> {
    if !cosine {
        return Ok(x);
    }
    let unit = scratch(g, slot, n * d)?;
    launch::normalize_rows(g, x, unit, n, d)?;
    Ok(unit)
}

/// The device buffers dead-code detection uses.
struct DeadScratch<'a, G: Gpu> {
    flags: &'a mut G::Buf<u32>,
    list: &'a mut DeviceList<G>,
    sort: &'a mut SortScratch<G>,
}

/// `VectorQuantizer::reseed_dead_codes` on the device: the dead codes are found and compacted
/// on the device, their count (and, when there are any, their ids) read back, the choice of
/// codes and rows drawn on the host from the same generator as the CPU's, and the (code, row)
/// pairs sent back to the re-seeding kernel. `x` holds the kept rows (normalised under
/// cosine). Returns (dead, replaced).
fn reseed_dead_codes<G: Gpu>(
    g: &G,
    config: &QuantizerConfig,
    ema: &mut EmaDevice<G>,
    x: &G::Buf<f32>,
    rows: usize,
    rng: &mut ChaCha8Rng,
    s: DeadScratch<'_, G>,
) -> Result<(usize, usize)> {
    let threshold = config.dead_code_threshold;
    if threshold <= 0.0 {
        return Ok((0, 0));
    }
    let k = config.codebook_size;
    sort::flags_below(g, &ema.cluster_size, threshold, k, s.flags)?;
    sort::compact(g, s.flags, k, &mut s.list.rows, &mut s.list.count, s.sort)?;
    let n_dead = g.download("dead-code count", &s.list.count)?[0] as usize;
    if n_dead == 0 || rows == 0 {
        return Ok((n_dead, 0));
    }
    let dead = g.read("dead codes", &s.list.rows, 0, n_dead)?;
    let (dead, picked) = choose_reseeds(dead, rows, rng);
    let take = dead.len();
    let picked: Vec<u32> = picked.into_iter().map(|r| r as u32).collect();
    let codes = g.upload("re-seeded codes", &dead)?;
    let from = g.upload("re-seeding rows", &picked)?;
    step::reseed(
        g,
        ema,
        x,
        rows,
        &codes,
        &from,
        take,
        config.effective_reset_count(),
        // The rows are normalised already under cosine: copied as they are.
        Metric::L2,
    )?;
    Ok((n_dead, take))
}
