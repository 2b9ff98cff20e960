//! The quantizer layer users embed in their training code (SPEC §2–§5): nearest code,
//! straight-through output, commitment and codebook losses, their gradients, EMA codebook
//! updates, dead-code re-seeding, data or k-means init, and usage statistics.
//!
//! One training step, as vector-quantize-pytorch orders it: assign with the current codebook,
//! return q from that codebook, then update the EMA counts and sums, recompute the codebook,
//! and re-seed dead codes.

mod config;
mod device;
mod grad;
mod init;
mod persist;

pub use config::{CodebookLearning, Estimator, Init, QuantizerConfig};
pub use device::{DeviceLosses, DeviceQuantizer};
pub use grad::{Gradients, normalize_backward, rotate_gradient, rotation_trick_value};

use crate::backend::{self, Backend};
use crate::ema::{CodeSums, EmaState, SumMode};
use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};
use crate::nearest::{Metric, normalize_rows};
use crate::usage::UsageSummary;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// Statistics of one forward pass (over the rows the mask keeps).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StepStats {
    /// Training steps taken so far, this one included (0 in eval).
    pub step: u64,
    /// Rows that counted (mask true).
    pub rows: usize,
    /// exp(entropy) of this batch's code usage.
    pub perplexity: f64,
    /// Codes used by this batch.
    pub used: usize,
    /// Codes whose EMA count is below the dead-code threshold after this step (before
    /// re-seeding); 0 when the threshold is 0.
    pub dead: usize,
    /// Codes re-seeded from this batch.
    pub replaced: usize,
    /// Rows whose nearest code was recomputed in f64.
    pub rechecked: usize,
    /// Whether this step initialised the codebook.
    pub initialized: bool,
}

/// Cumulative statistics of a quantizer (SPEC §5).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct QuantizerStats {
    /// Training steps taken.
    pub step: u64,
    /// exp(entropy) of the usage summed over all training steps.
    pub cumulative_perplexity: f64,
    /// Codes used at least once over all training steps.
    pub cumulative_used: usize,
    /// Codes whose EMA count N_k is below the dead-code threshold (ESM3's 1e-5 when the
    /// threshold is 0); None without EMA counts.
    pub dead: Option<usize>,
    /// Distribution of the EMA counts N_k (mean, std, min, median, max); None without them.
    pub ema_counts: Option<crate::usage::CountDistribution>,
}

/// What a forward pass returns. The layer's output value is `quantized` (q); its gradient
/// is given by [`VectorQuantizer::backward`].
#[derive(Clone, Debug)]
pub struct Forward {
    pub indices: Vec<u32>,
    /// q_n = C[i(n)] from the codebook the rows were assigned with.
    pub quantized: Matrix,
    /// Winning distance per row.
    pub distances: Vec<f32>,
    /// β·mean((x − sg(q))²) over the kept rows (x̂ = x/‖x‖ in place of x under cosine).
    pub commitment_loss: f32,
    /// mean((sg(x) − q)²) over the kept rows in gradient mode (x̂ under cosine); 0 under EMA.
    pub codebook_loss: f32,
    pub stats: StepStats,
    mask: Option<Vec<bool>>,
    kept: usize,
}

/// A vector-quantization layer with its codebook and EMA state.
///
/// ```
/// use vqx::quantizer::{QuantizerConfig, VectorQuantizer};
/// use vqx::{backend::Device, MatRef};
/// let cfg = QuantizerConfig::new(4, 2).device(Device::Cpu).seed(1);
/// let mut vq = VectorQuantizer::new(cfg)?;
/// let x = [0.0f32, 0.1, 5.0, 5.0, 0.1, 0.0, 5.1, 4.9, -3.0, 2.0, 3.0, -2.0];
/// let out = vq.forward(MatRef::new(&x, 6, 2)?, None, true)?; // first batch initialises
/// assert_eq!(out.indices.len(), 6);
/// let grads = vq.backward(&out, MatRef::new(&x, 6, 2)?, MatRef::new(&[1.0; 12], 6, 2)?)?;
/// assert_eq!(grads.x.rows(), 6);
/// # Ok::<(), vqx::Error>(())
/// ```
pub struct VectorQuantizer {
    config: QuantizerConfig,
    backend: Box<dyn Backend>,
    codebook: Matrix,
    /// Present under EMA learning.
    ema: Option<EmaState>,
    initted: bool,
    step: u64,
    rng: ChaCha8Rng,
    usage_total: Vec<u64>,
}

impl VectorQuantizer {
    /// A quantizer whose codebook is initialised on the first training batch.
    pub fn new(config: QuantizerConfig) -> Result<Self> {
        config.validate()?;
        if config.init == Init::Given {
            return Err(Error::InvalidArgument(
                "init = given needs a codebook: use VectorQuantizer::with_codebook".into(),
            ));
        }
        let codebook = Matrix::zeros(config.codebook_size, config.dim);
        Self::build(config, codebook, false)
    }

    /// A quantizer starting from `codebook` (K × D as configured); EMA counts start at 1.
    pub fn with_codebook(mut config: QuantizerConfig, codebook: Matrix) -> Result<Self> {
        config.init = Init::Given;
        config.validate()?;
        check_codebook_shape(&config, &codebook)?;
        codebook.as_ref().check_finite("codebook")?;
        Self::build(config, codebook, true)
    }

    /// A quantizer resumed from its codebook, EMA state and step (e.g. a checkpoint).
    pub fn from_state(
        config: QuantizerConfig,
        codebook: Matrix,
        ema: Option<EmaState>,
        step: u64,
        usage_total: Option<Vec<u64>>,
    ) -> Result<Self> {
        config.validate()?;
        check_codebook_shape(&config, &codebook)?;
        codebook.as_ref().check_finite("codebook")?;
        let mut vq = Self::build(config, codebook, true)?;
        if let Some(e) = ema {
            if (e.codes(), e.dim()) != (vq.config.codebook_size, vq.config.dim) {
                return Err(Error::shape(
                    "EMA state vs codebook",
                    format!("{} × {}", vq.config.codebook_size, vq.config.dim),
                    format!("{} × {}", e.codes(), e.dim()),
                ));
            }
            if vq.ema.is_some() {
                vq.ema = Some(e);
            }
        }
        if let Some(u) = usage_total {
            if u.len() != vq.config.codebook_size {
                return Err(Error::shape(
                    "cumulative usage vs codebook",
                    format!("{} counts", vq.config.codebook_size),
                    format!("{} counts", u.len()),
                ));
            }
            vq.usage_total = u;
        }
        vq.step = step;
        Ok(vq)
    }

    fn build(config: QuantizerConfig, codebook: Matrix, initted: bool) -> Result<Self> {
        let backend = backend::select(config.device)?;
        let ema = match config.learning {
            CodebookLearning::Ema { .. } => Some(EmaState::seeded(codebook.as_ref())),
            CodebookLearning::Gradient => None,
        };
        Ok(VectorQuantizer {
            rng: step_rng(config.seed, 0),
            usage_total: vec![0; config.codebook_size],
            config,
            backend,
            codebook,
            ema,
            initted,
            step: 0,
        })
    }

    pub fn config(&self) -> &QuantizerConfig {
        &self.config
    }
    pub fn codebook(&self) -> &Matrix {
        &self.codebook
    }
    /// The EMA counts and sums (EMA learning only).
    pub fn ema(&self) -> Option<&EmaState> {
        self.ema.as_ref()
    }
    pub fn step(&self) -> u64 {
        self.step
    }
    pub fn initialized(&self) -> bool {
        self.initted
    }
    /// Codes assigned over all training steps.
    pub fn usage_total(&self) -> &[u64] {
        &self.usage_total
    }
    /// Cumulative statistics: usage over all steps and the distribution of the EMA counts.
    pub fn statistics(&self) -> QuantizerStats {
        let threshold = if self.config.dead_code_threshold > 0.0 {
            self.config.dead_code_threshold
        } else {
            1e-5
        };
        QuantizerStats {
            step: self.step,
            cumulative_perplexity: crate::usage::perplexity(
                &self
                    .usage_total
                    .iter()
                    .map(|&c| c as f64)
                    .collect::<Vec<_>>(),
            ),
            cumulative_used: self.usage_total.iter().filter(|&&c| c > 0).count(),
            dead: self
                .ema
                .as_ref()
                .map(|e| e.cluster_size().iter().filter(|&&n| n < threshold).count()),
            ema_counts: self
                .ema
                .as_ref()
                .and_then(|e| crate::usage::CountDistribution::from_values(e.cluster_size()).ok()),
        }
    }

    /// The backend running the primitives.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// Replaces the codebook (gradient learning: after the user's optimiser step).
    pub fn set_codebook(&mut self, codebook: Matrix) -> Result<()> {
        check_codebook_shape(&self.config, &codebook)?;
        codebook.as_ref().check_finite("codebook")?;
        self.codebook = codebook;
        self.initted = true;
        Ok(())
    }

    /// Quantizes `x` (N × D). `mask[n] = false` marks padding rows: they get indices and
    /// outputs but count in no loss, statistic, init or EMA update. `train` runs the
    /// training-side effects (init on the first batch, EMA update, dead-code re-seeding).
    pub fn forward(
        &mut self,
        x: MatRef<'_>,
        mask: Option<&[bool]>,
        train: bool,
    ) -> Result<Forward> {
        check_input_width(&self.config, x.cols())?;
        x.check_nonempty("input")?;
        if let Some(m) = mask
            && m.len() != x.rows()
        {
            return Err(Error::shape(
                "mask vs input rows",
                format!("{} flags (one per row)", x.rows()),
                format!("{} flags", m.len()),
            ));
        }
        x.check_finite("input")?;
        let kept_rows: Option<Vec<usize>> = mask.map(|m| (0..m.len()).filter(|&i| m[i]).collect());
        let kept = kept_rows.as_ref().map_or(x.rows(), Vec::len);
        // The rows that count, compacted when a mask drops some (None: all rows count).
        let kept_of = |m: MatRef<'_>| match &kept_rows {
            Some(rows) if rows.len() < m.rows() => Some(gather_rows(m, rows)),
            _ => None,
        };
        let compact = kept_of(x);
        let xk = compact.as_ref().map_or(x, Matrix::as_ref);

        let mut initialized = false;
        if let Some(rng) = start_step(&self.config, self.step, train, self.initted, kept)? {
            self.rng = rng;
            if !self.initted {
                self.initialize(xk)?;
                initialized = true;
            }
        }

        let assignment = self
            .backend
            .nearest(x, self.codebook.as_ref(), self.config.metric)?;
        let quantized = self
            .backend
            .gather(self.codebook.as_ref(), &assignment.indices)?;

        let kept_idx: Vec<u32> = match &kept_rows {
            Some(rows) => rows.iter().map(|&r| assignment.indices[r]).collect(),
            None => assignment.indices.clone(),
        };
        // Under cosine the library compares q with x̂ = x/‖x‖ (its input after `l2norm`) in
        // the losses, the EMA sums and the re-seeded rows: the spherical k-means update.
        let unit = (self.config.metric == Metric::Cosine).then(|| normalize_rows(x));
        let xt = unit.as_ref().map_or(x, Matrix::as_ref);
        let mse = match &kept_rows {
            Some(rows) => mean_sq_diff(xt, quantized.as_ref(), rows.iter().copied(), kept),
            None => mean_sq_diff(xt, quantized.as_ref(), 0..x.rows(), kept),
        };
        let counts = self.backend.usage(&kept_idx, self.config.codebook_size)?;
        let summary = UsageSummary::from_counts(&counts);

        let (mut dead, mut replaced) = (0, 0);
        if train {
            let ema_on = self.ema.is_some()
                && matches!(self.config.learning, CodebookLearning::Ema { .. })
                && kept > 0;
            // The kept rows of x̂ under cosine (normalising is row-wise: the same bits before
            // or after compaction).
            let unit_kept = if ema_on {
                unit.as_ref().and_then(|u| kept_of(u.as_ref()))
            } else {
                None
            };
            let xs = unit_kept
                .as_ref()
                .or(unit.as_ref())
                .map_or(xk, Matrix::as_ref);
            let sums = if ema_on {
                let mode = if self.config.deterministic {
                    SumMode::Deterministic
                } else {
                    SumMode::Fast
                };
                Some(
                    self.backend
                        .code_sums(xs, &kept_idx, self.config.codebook_size, mode)?,
                )
            } else {
                None
            };
            (dead, replaced) = self.finish_step(&counts, sums.as_ref(), xs.rows(), |rows| {
                Ok(gather_rows(xs, rows))
            })?;
        }

        let (commitment_loss, codebook_loss) = losses(&self.config, mse);
        Ok(Forward {
            indices: assignment.indices,
            quantized,
            distances: assignment.distances,
            commitment_loss,
            codebook_loss,
            stats: StepStats {
                step: if train { self.step } else { 0 },
                rows: kept,
                perplexity: summary.perplexity,
                used: summary.used,
                dead,
                replaced,
                rechecked: assignment.rechecked,
                initialized,
            },
            mask: mask.map(<[bool]>::to_vec),
            kept,
        })
    }

    /// Starts a training step whose batch is split over the ranks of a data-parallel job
    /// (`vqx train --shards`, `mpirun`): draws the step's random stream and, before the first
    /// step, initialises the codebook from `batch()`, which must return the whole batch's rows
    /// (the encoder outputs of every rank, in batch order; called only when needed). Every rank
    /// given the same rows draws the same codebook. Returns whether it initialised.
    ///
    /// A step split over ranks runs [`Self::forward`] with `train = false` on each rank's
    /// part, then [`Self::end_shared_step`] with the statistics summed over the ranks: together
    /// they are one training `forward` over the whole batch.
    ///
    /// ```
    /// use vqx::quantizer::{QuantizerConfig, VectorQuantizer};
    /// use vqx::{backend::Device, MatRef, Matrix};
    /// let cfg = QuantizerConfig::new(2, 2).device(Device::Cpu).seed(3);
    /// let x = Matrix::new(vec![0.0, 0.0, 5.0, 5.0, 0.1, 0.0, 5.0, 5.1], 4, 2)?;
    /// let mut vq = VectorQuantizer::new(cfg)?;
    /// assert!(vq.begin_shared_step(|| Ok(x.clone()))?);
    /// let out = vq.forward(x.as_ref(), None, false)?;
    /// let sums = vq.backend().code_sums(x.as_ref(), &out.indices, 2, Default::default())?;
    /// let counts = sums.counts.clone();
    /// let (dead, replaced) = vq.end_shared_step(&counts, Some(&sums), 4, |_| unreachable!())?;
    /// assert_eq!((vq.step(), dead, replaced), (1, 0, 0));
    /// # Ok::<(), vqx::Error>(())
    /// ```
    pub fn begin_shared_step(&mut self, batch: impl FnOnce() -> Result<Matrix>) -> Result<bool> {
        // The batch is never empty here: the init rows are checked below.
        let rng = start_step(&self.config, self.step, true, true, 1)?;
        self.rng = rng.expect("a training step has a stream");
        if self.initted {
            return Ok(false);
        }
        let x = batch()?;
        check_input_width(&self.config, x.cols())?;
        x.as_ref().check_nonempty("first training batch")?;
        x.as_ref().check_finite("first training batch")?;
        self.initialize(x.as_ref())?;
        Ok(true)
    }

    /// Ends a training step split over ranks (see [`Self::begin_shared_step`]) with the whole
    /// batch's statistics, summed over the ranks: `counts` (K codes used), `sums` (the EMA
    /// sums of the batch's rows, x̂ under cosine; `None` in gradient mode), `rows` (the
    /// batch's rows). Updates the usage and the EMA state, recomputes the codebook and
    /// re-seeds dead codes from rows `fetch(positions)` of the batch (x̂ under cosine; the
    /// positions are in `0..rows`, the same on every rank holding the same state, so `fetch`
    /// may be a collective). Returns (dead, replaced) as [`StepStats`] counts them.
    pub fn end_shared_step(
        &mut self,
        counts: &[u32],
        sums: Option<&CodeSums>,
        rows: usize,
        fetch: impl FnOnce(&[usize]) -> Result<Matrix>,
    ) -> Result<(usize, usize)> {
        let k = self.config.codebook_size;
        if counts.len() != k {
            return Err(Error::shape(
                "shared step's code counts vs codebook",
                format!("{k} counts"),
                format!("{} counts", counts.len()),
            ));
        }
        let sums = sums.filter(|_| rows > 0);
        self.finish_step(counts, sums, rows, fetch)
    }

    /// The training side of a step after its assignment: usage, the EMA update from `sums`
    /// (when given, under EMA learning), dead-code re-seeding from rows `fetch` returns out of
    /// the step's `rows` (x̂ under cosine), and the step count. Returns (dead, replaced).
    fn finish_step(
        &mut self,
        counts: &[u32],
        sums: Option<&CodeSums>,
        rows: usize,
        fetch: impl FnOnce(&[usize]) -> Result<Matrix>,
    ) -> Result<(usize, usize)> {
        for (t, &c) in self.usage_total.iter_mut().zip(counts) {
            *t += c as u64;
        }
        let mut out = (0, 0);
        if let (Some(ema), Some(sums), CodebookLearning::Ema { decay, eps }) =
            (self.ema.as_mut(), sums, self.config.learning)
        {
            ema.update(sums, decay)?;
            self.codebook = ema.codebook(eps);
            if self.config.metric == Metric::Cosine {
                self.codebook = normalize_rows(self.codebook.as_ref());
            }
            out = self.reseed_dead_codes(rows, fetch)?;
        }
        self.step += 1;
        Ok(out)
    }

    /// Re-seeds codes whose EMA count is below the threshold from distinct rows of the step's
    /// `rows` (fetched by `fetch`; normalised already under cosine; masked replace: live codes
    /// stay bit-identical). With more dead codes than rows, a random subset is re-seeded now
    /// and the rest on later steps. Returns (dead, replaced).
    fn reseed_dead_codes(
        &mut self,
        rows: usize,
        fetch: impl FnOnce(&[usize]) -> Result<Matrix>,
    ) -> Result<(usize, usize)> {
        let threshold = self.config.dead_code_threshold;
        let Some(ema) = self.ema.as_mut() else {
            return Ok((0, 0));
        };
        if threshold <= 0.0 {
            return Ok((0, 0));
        }
        let dead: Vec<usize> = (0..ema.codes())
            .filter(|&k| ema.cluster_size()[k] < threshold)
            .collect();
        let n_dead = dead.len();
        let (dead, picked) = choose_reseeds(dead, rows, &mut self.rng);
        let take = dead.len();
        if take == 0 {
            return Ok((n_dead, 0));
        }
        let d = self.config.dim;
        let x = fetch(&picked)?;
        if (x.rows(), x.cols()) != (take, d) {
            return Err(Error::internal(
                "dead-code re-seeding",
                format!(
                    "{take} rows of {d} asked for, {} × {} given",
                    x.rows(),
                    x.cols()
                ),
            ));
        }
        let count = self.config.effective_reset_count();
        for (i, &k) in dead.iter().enumerate() {
            let row = x.as_ref().row(i);
            self.codebook.data_mut()[k * d..(k + 1) * d].copy_from_slice(row);
            ema.reset(k, row, count);
        }
        Ok((n_dead, take))
    }

    /// Gradients of the layer given dL/d(output) (N × D, the decoder's gradient): see
    /// [`Gradients`].
    pub fn backward(
        &self,
        fwd: &Forward,
        x: MatRef<'_>,
        grad_output: MatRef<'_>,
    ) -> Result<Gradients> {
        grad::backward(self, fwd, x, grad_output)
    }

    fn initialize(&mut self, x: MatRef<'_>) -> Result<()> {
        let (codebook, ema) = seed_codebook(&self.config, self.backend.as_ref(), x, &mut self.rng)?;
        self.codebook = codebook;
        if self.ema.is_some() {
            self.ema = Some(ema);
        }
        self.initted = true;
        Ok(())
    }
}

impl std::fmt::Debug for VectorQuantizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorQuantizer")
            .field("config", &self.config)
            .field("backend", &self.backend.name())
            .field("step", &self.step)
            .field("initialized", &self.initted)
            .finish_non_exhaustive()
    }
}

/// The random stream of training step `step` (0-based: steps taken before it): the seed
/// itself for the first step, so the init draws what a fresh `seed_from_u64(seed)` would.
/// The start of a forward pass, as the CPU and device quantizers share it: for a training step
/// (`train`), the generator it draws from, and an error when the codebook is still to be
/// initialised (`!initted`) from a batch with no kept row; `None` when not training.
fn start_step(
    config: &QuantizerConfig,
    step: u64,
    train: bool,
    initted: bool,
    kept: usize,
) -> Result<Option<ChaCha8Rng>> {
    if !train {
        return Ok(None);
    }
    if !initted && kept == 0 {
        return Err(Error::Empty {
            what: "first training batch".into(),
            detail: "every row is masked: nothing to initialise the codebook from".into(),
        });
    }
    // Each training step draws from a stream that depends only on (seed, step), so a
    // quantizer resumed from a checkpoint samples exactly as an uninterrupted one.
    Ok(Some(step_rng(config.seed, step)))
}

fn step_rng(seed: u64, step: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

fn check_codebook_shape(config: &QuantizerConfig, codebook: &Matrix) -> Result<()> {
    check_codebook_dims(config, codebook.rows(), codebook.cols())
}

/// A codebook of `rows` × `cols` fits the configuration (K × D).
fn check_codebook_dims(config: &QuantizerConfig, rows: usize, cols: usize) -> Result<()> {
    if (rows, cols) != (config.codebook_size, config.dim) {
        return Err(Error::shape(
            "codebook vs quantizer configuration",
            format!("{} × {}", config.codebook_size, config.dim),
            format!("{rows} × {cols}"),
        ));
    }
    Ok(())
}

/// Input rows of `cols` values fit the quantizer's dimension.
fn check_input_width(config: &QuantizerConfig, cols: usize) -> Result<()> {
    let d = config.dim;
    if cols != d {
        return Err(Error::shape(
            "input width vs quantizer dimension",
            format!("{d} columns"),
            format!("{cols} columns"),
        ));
    }
    Ok(())
}

/// (commitment loss β·mse, codebook loss: mse under gradient learning, 0 under EMA) of a pass
/// whose mean squared error over the kept rows is `mse`.
fn losses(config: &QuantizerConfig, mse: f64) -> (f32, f32) {
    let codebook = match config.learning {
        CodebookLearning::Gradient => mse as f32,
        CodebookLearning::Ema { .. } => 0.0,
    };
    ((config.commitment_weight as f64 * mse) as f32, codebook)
}

/// Which of the `dead` codes (in increasing order) to re-seed this step, and from which of
/// `rows` batch rows: all of them from distinct rows, or, with more dead codes than rows, a
/// random subset now and the rest on later steps. The draws from `rng` are the one sequence
/// both the CPU and the device layer take, so both re-seed the same codes from the same rows.
fn choose_reseeds<T: Ord>(
    mut dead: Vec<T>,
    rows: usize,
    rng: &mut ChaCha8Rng,
) -> (Vec<T>, Vec<usize>) {
    if dead.is_empty() || rows == 0 {
        return (Vec::new(), Vec::new());
    }
    let take = dead.len().min(rows);
    if take < dead.len() {
        dead.shuffle(rng);
        dead.truncate(take);
        dead.sort_unstable();
    }
    let picked = rand::seq::index::sample(rng, rows, take).into_vec();
    (dead, picked)
}

/// The codebook seeded from the first training batch `x` (data sampling or k-means++, as
/// configured; normalised under cosine) and the EMA state that goes with it.
fn seed_codebook(
    config: &QuantizerConfig,
    backend: &dyn Backend,
    x: MatRef<'_>,
    rng: &mut ChaCha8Rng,
) -> Result<(Matrix, EmaState)> {
    let eps = match config.learning {
        CodebookLearning::Ema { eps, .. } => eps,
        CodebookLearning::Gradient => 1e-5,
    };
    let (codebook, ema) = match config.init {
        Init::Data | Init::Given => {
            let c = init::data_sample(x, config.codebook_size, rng);
            let e = EmaState::seeded(c.as_ref());
            (c, e)
        }
        Init::KMeans { iters } => init::kmeans(
            backend,
            x,
            config.codebook_size,
            iters,
            config.metric,
            eps,
            rng,
        )?,
    };
    let codebook = if config.metric == Metric::Cosine {
        normalize_rows(codebook.as_ref())
    } else {
        codebook
    };
    Ok((codebook, ema))
}

/// The rows of `x` named by `rows`, in that order.
pub(crate) fn gather_rows(x: MatRef<'_>, rows: &[usize]) -> Matrix {
    let mut data = Vec::with_capacity(rows.len() * x.cols());
    for &r in rows {
        data.extend_from_slice(x.row(r));
    }
    Matrix::new(data, rows.len(), x.cols()).expect("rows × cols values")
}

/// Σ over `rows` of ||x_n − q_n||², divided by (kept · D); 0 when nothing is kept.
fn mean_sq_diff(
    x: MatRef<'_>,
    q: MatRef<'_>,
    rows: impl Iterator<Item = usize>,
    kept: usize,
) -> f64 {
    if kept == 0 {
        return 0.0;
    }
    let total: f64 = rows
        .map(|r| {
            x.row(r)
                .iter()
                .zip(q.row(r))
                .map(|(&a, &b)| {
                    let t = a as f64 - b as f64;
                    t * t
                })
                .sum::<f64>()
        })
        .sum();
    total / (kept as f64 * x.cols() as f64)
}

impl Forward {
    /// Whether row `n` counted (not padding).
    pub fn kept(&self, n: usize) -> bool {
        self.mask.as_ref().is_none_or(|m| m[n])
    }
    /// Rows that counted.
    pub fn kept_rows(&self) -> usize {
        self.kept
    }
}
