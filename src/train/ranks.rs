//! Data-parallel training (issue 12): one [`Trainer`] per rank of a [`Collective`], each on its
//! own shard of the data, all holding the same model.
//!
//! **The batch.** `batch_size` is the global batch B. Rank r of S takes `batch_part(B, S, r)`
//! of it (contiguous, sizes differing by at most one row), sampled from its own shard of the
//! training rows ([`DataSource::load_shard`]) by a [`BatchSampler`] seeded with
//! `rank_seed(seed, r)`: epochs of a seeded permutation of the shard. The global batch is the
//! ranks' parts in rank order. Rank 0's stream is the one-process run's, so one rank samples
//! exactly what [`Trainer`] samples.
//!
//! **The step.** Each rank runs forward and backward on its part. One f64 all-reduce (added in
//! rank order, so the bits do not depend on the transport) then sums, over the ranks: the
//! gradients weighted by n_r/B (the mean over the global batch, as one process takes it), the
//! per-code EMA sums and counts of the encoder outputs (x̂ under cosine), and the losses.
//! Every rank then applies the same EMA update and the same clipped AdamW step. Before the
//! first step the encoder outputs of the whole batch are gathered to every rank and the
//! codebook initialised from them; dead codes are re-seeded from rows of the batch chosen by
//! the generator every rank shares (it depends on (seed, step) only) and delivered to every
//! rank by the ranks that hold them. So every rank holds the same bits, and a job of S
//! ranks gives the same bits whether its ranks are threads (`--shards S`) or processes
//! (`mpirun -np S`). [`ShardedTrainer::check_in_sync`] compares a hash of every rank's state.
//!
//! The step runs on the CPU (the device engine of [`Trainer`] is one process's).

use super::{BatchSampler, DataSource, StepMetrics, TrainConfig, Trainer, parameter_names};
use crate::backend::{Device, Transfers};
use crate::collective::Collective;
use crate::ema::{CodeSums, SumMode};
use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};
use crate::model::{VqVae, VqVaeGrads};
use crate::nearest::{Metric, normalize_rows};
use crate::quantizer::{CodebookLearning, StepStats};
use crate::usage::UsageSummary;
use std::ops::Range;
use std::path::Path;
use std::time::Instant;

/// Positions `start..end` of the global batch of `batch` rows that rank `rank` of `ranks`
/// takes: contiguous, in rank order, sizes differing by at most one.
///
/// ```
/// use vqx::train::batch_part;
/// assert_eq!(batch_part(10, 3, 0), 0..3);
/// assert_eq!(batch_part(10, 3, 2), 6..10);
/// ```
pub fn batch_part(batch: usize, ranks: usize, rank: usize) -> Range<usize> {
    crate::kmeans::Shard::range(batch, ranks, rank)
}

/// The seed of rank `rank`'s batch order in a run seeded `seed`: `seed` itself for rank 0 (a
/// run of one rank samples as one process does), a well-mixed function of both otherwise.
///
/// ```
/// use vqx::train::rank_seed;
/// assert_eq!(rank_seed(7, 0), 7);
/// assert_ne!(rank_seed(7, 1), rank_seed(7, 2));
/// ```
pub fn rank_seed(seed: u64, rank: usize) -> u64 {
    if rank == 0 {
        return seed;
    }
    // SplitMix64's finaliser over (seed, rank).
    let mut z = seed ^ (rank as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One rank of a data-parallel training job (see the module docs).
///
/// ```
/// use vqx::collective::in_process;
/// use vqx::model::VqVaeConfig;
/// use vqx::quantizer::QuantizerConfig;
/// use vqx::train::{DataSource, ShardedTrainer, TrainConfig};
/// let data = DataSource::Synthetic {
///     spec: "gmm:dim=8,components=4".parse()?, rows: 256, eval_rows: 64, seed: 0,
/// };
/// let mut cfg = TrainConfig::new(VqVaeConfig::new(8, 2, vec![16]), QuantizerConfig::new(8, 2), data);
/// cfg.steps = 3;
/// cfg.batch_size = 32;
/// // Two ranks as threads: each trains on its half of the data, both end with the same model.
/// let hashes = in_process::run(2, |comm| {
///     let mut t = ShardedTrainer::new(comm, cfg.clone())?;
///     while !t.finished() {
///         t.step()?;
///     }
///     assert!(t.evaluate()? > 0.0);
///     t.check_in_sync()?;
///     Ok(t.state_hash())
/// })?;
/// assert_eq!(hashes[0], hashes[1]);
/// # Ok::<(), vqx::Error>(())
/// ```
pub struct ShardedTrainer<'c> {
    comm: &'c dyn Collective,
    /// This rank's trainer: the model (the same on every rank), the optimiser, the step, and
    /// this rank's shard of the data. Private: its own `step` would leave the other ranks.
    trainer: Trainer,
    /// This rank's positions in the global batch.
    part: Range<usize>,
    /// Training and held-out rows over all ranks.
    train_total: usize,
    eval_total: usize,
}

impl std::fmt::Debug for ShardedTrainer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedTrainer")
            .field("rank", &self.comm.rank())
            .field("ranks", &self.comm.size())
            .field("part", &self.part)
            .field("trainer", &self.trainer)
            .finish()
    }
}

impl<'c> ShardedTrainer<'c> {
    /// A fresh run on this rank: loads its shard of the data and initialises the model (the
    /// same seeded weights on every rank). `config.ranks` becomes the job's size.
    pub fn new(comm: &'c dyn Collective, mut config: TrainConfig) -> Result<Self> {
        config.ranks = comm.size();
        config.validate()?;
        let model = VqVae::new(config.model.clone(), cpu_quantizer(&config)?)?;
        let sizes: Vec<usize> = parameter_names(&model).iter().map(|p| p.1).collect();
        let optimizer = super::AdamW::new(config.adam, &sizes);
        Self::build(comm, config, model, optimizer, 0)
    }

    /// Continues the run whose checkpoint is `path` (every rank reads it: it must be where
    /// all ranks see it, as the data must), with the job's rank count. Returns the trainer and
    /// the rank count the run was trained with until now: with another count the batches
    /// differ from here on, so the result is a valid run but not bit for bit the
    /// uninterrupted one.
    pub fn resume(
        comm: &'c dyn Collective,
        path: &Path,
        steps: Option<u64>,
    ) -> Result<(Self, usize)> {
        let (mut config, step, model, optimizer) = super::checkpoint::read(path, Device::Cpu)?;
        let before = config.ranks;
        config.ranks = comm.size();
        if let Some(s) = steps {
            config.steps = s;
        }
        config.validate()?;
        let t = Self::build(comm, config, model, optimizer, step)?;
        // Every rank read the same file: a rank that did not is caught here, not steps later.
        t.check_in_sync()?;
        Ok((t, before))
    }

    fn build(
        comm: &'c dyn Collective,
        config: TrainConfig,
        model: VqVae,
        optimizer: super::AdamW,
        step: u64,
    ) -> Result<Self> {
        let (rank, ranks) = (comm.rank(), comm.size());
        let batch = config.batch_size;
        if batch < ranks {
            return Err(Error::InvalidArgument(format!(
                "a batch of {batch} rows (--batch-size) across {ranks} ranks: every rank needs \
                 at least one row of each batch"
            )));
        }
        cpu_quantizer(&config)?;
        let part = batch_part(batch, ranks, rank);
        let shard = config.data.load_shard(ranks, rank)?;
        let data = shard.data;
        if data.train.cols() != config.model.data_dim {
            return Err(Error::shape(
                "data width vs the model's data dimension",
                format!("{} columns", config.model.data_dim),
                format!("{} columns", data.train.cols()),
            ));
        }
        if data.train.rows() < part.len() {
            return Err(Error::InvalidArgument(format!(
                "rank {rank} holds {} training rows, fewer than its {} rows of each batch of \
                 {batch} (--batch-size across {ranks} ranks): {}",
                data.train.rows(),
                part.len(),
                match config.data {
                    DataSource::Synthetic { .. } => "raise --rows or lower --batch-size",
                    DataSource::Npy { .. } =>
                        "lower --batch-size or --eval-rows, or use fewer ranks",
                }
            )));
        }
        let sampler =
            BatchSampler::new(data.train.rows(), part.len(), rank_seed(config.seed, rank));
        let trainer = Trainer {
            config,
            model,
            optimizer,
            step,
            data,
            sampler,
            engine: None,
            stale: false,
            workspace: None,
        };
        Ok(ShardedTrainer {
            comm,
            trainer,
            part,
            train_total: shard.train_total,
            eval_total: shard.eval_total,
        })
    }

    /// This rank's trainer (read only: the job steps through [`Self::step`]): the model and
    /// optimiser every rank shares, the step, and this rank's shard of the data
    /// (`trainer().data`).
    pub fn trainer(&self) -> &Trainer {
        &self.trainer
    }

    /// Whether every configured step has been taken.
    pub fn finished(&self) -> bool {
        self.trainer.finished()
    }

    /// This rank and the job's size.
    pub fn rank(&self) -> (usize, usize) {
        (self.comm.rank(), self.comm.size())
    }

    /// Training and held-out rows over all ranks.
    pub fn rows(&self) -> (usize, usize) {
        (self.train_total, self.eval_total)
    }

    /// One optimisation step of the whole job on the next global batch (a collective: every
    /// rank calls it). The metrics are the global batch's, the same on every rank (but the
    /// timings, which are this rank's).
    pub fn step(&mut self) -> Result<StepMetrics> {
        self.step_voting(false).map(|(m, _)| m)
    }

    /// [`Self::step`], with this rank's vote to stop after it (e.g. it saw Ctrl-C): returns
    /// whether any rank voted so, the same on every rank. The vote rides in the step's
    /// all-reduce, so agreeing costs no collective of its own.
    pub fn step_voting(&mut self, stop: bool) -> Result<(StepMetrics, bool)> {
        let start = Instant::now();
        let comm = self.comm;
        let part = self.part.clone();
        let t = &mut self.trainer;
        let total = t.config.batch_size;
        let (k, code_dim) = (t.config.quantizer.codebook_size, t.config.model.code_dim);
        let d = t.data.train.cols();
        let rows = t.sampler.indices(t.step);
        let batch = crate::quantizer::gather_rows(t.data.train.as_ref(), &rows);
        let x = MatRef::new(batch.data(), rows.len(), d)?;

        let t_init = Instant::now();
        let encoder = &t.model.encoder;
        let initialized = t.model.quantizer.begin_shared_step(|| {
            let e = encoder.infer(x);
            crate::kmeans::gather_rows(comm, e.data(), e.cols())
        })?;
        let init_seconds = t_init.elapsed().as_secs_f64();

        let (mut ws, decay) = t.take_workspace();
        // No training side effects here: they follow from the sums over every rank.
        let out = t.model.forward_backward_with(x, false, &mut ws)?;
        let mut phases = out.phases;

        // One buffer, one all-reduce: the weighted gradients, the EMA sums, the counts, the
        // weighted losses and the stop vote (timed with its packing: `allreduce_seconds`).
        let t_comm = Instant::now();
        let weight = rows.len() as f64 / total as f64;
        let first = if t.config.freeze_encoder {
            ws.grads.encoder.tensors_mut().len()
        } else {
            0
        };
        let mut buf: Vec<f64> = Vec::new();
        for g in &grad_tensors(&mut ws.grads)[first..] {
            buf.extend(g.iter().map(|&v| v as f64 * weight));
        }
        let grad_len = buf.len();
        let ema = matches!(t.config.quantizer.learning, CodebookLearning::Ema { .. });
        // Under EMA: the rows the sums and re-seeds take (x̂ under cosine), copied out of
        // the workspace, which the optimiser step needs mutably.
        let xs: Option<Matrix> = ema.then(|| {
            let e = ws.encoder_output();
            match t.config.quantizer.metric {
                Metric::Cosine => normalize_rows(e),
                Metric::L2 => e.to_owned(),
            }
        });
        let counts = match &xs {
            Some(xs) => {
                let (sums, counts) = crate::ema::sums_f64(xs.as_ref(), &out.indices, k);
                buf.extend(sums);
                counts
            }
            None => crate::usage::cpu(&out.indices, k),
        };
        buf.extend(counts.iter().map(|&c| c as f64));
        buf.extend([
            out.reconstruction * weight,
            out.commitment * weight,
            out.codebook * weight,
            f64::from(u8::from(stop)),
        ]);
        comm.all_reduce_sum_f64(&mut buf)?;
        let comm_seconds = t_comm.elapsed().as_secs_f64();

        let (grads, rest) = buf.split_at(grad_len);
        let (sums, rest) = rest.split_at(if ema { k * code_dim } else { 0 });
        let (counts, losses) = rest.split_at(k);
        // Integer sums of integers below 2^53: exact in f64.
        let counts: Vec<u32> = counts.iter().map(|&c| c as u32).collect();
        let sums = ema.then(|| CodeSums {
            sums: sums.iter().map(|&s| s as f32).collect(),
            counts: counts.clone(),
            mode: SumMode::Deterministic,
        });
        let t_q = Instant::now();
        let (dead, replaced) =
            t.model
                .quantizer
                .end_shared_step(&counts, sums.as_ref(), total, |positions| {
                    let xs = xs.as_ref().ok_or_else(|| {
                        Error::internal("dead-code re-seeding", "rows asked for without EMA")
                    })?;
                    // The batch's rows as a data set sharded over the ranks.
                    let batch = crate::kmeans::Shard::new(xs.as_ref(), part.start, total)?;
                    crate::kmeans::fetch_rows(comm, &batch, positions)
                })?;
        let quantizer_seconds = out.quantizer_seconds + t_q.elapsed().as_secs_f64();

        let mut at = 0;
        for g in grad_tensors(&mut ws.grads).into_iter().skip(first) {
            for (v, &s) in g.iter_mut().zip(&grads[at..]) {
                *v = s as f32;
            }
            at += g.len();
        }
        let t_opt = Instant::now();
        let lr = t.config.schedule().lr(t.step);
        let grad_norm = t.apply_gradients(&mut ws.grads, &decay, lr)?;
        phases.optimizer = t_opt.elapsed().as_secs_f64();
        phases.quantizer += init_seconds;
        t.workspace = Some((ws, decay));
        t.step += 1;
        let usage = UsageSummary::from_counts(&counts);
        let stats = StepStats {
            step: t.model.quantizer.step(),
            rows: total,
            perplexity: usage.perplexity,
            used: usage.used,
            dead,
            replaced,
            rechecked: 0,
            initialized,
        };
        let step_out = super::device::DeviceStepOut {
            reconstruction: losses[0],
            commitment: losses[1],
            codebook: losses[2],
            grad_norm,
            stats,
            quantizer_seconds,
        };
        let mut m = t.metrics(lr, step_out, start, Transfers::default());
        m.phases = Some(phases);
        m.allreduce_seconds = Some(comm_seconds);
        Ok((m, losses[3] > 0.0))
    }

    /// Reconstruction MSE over every rank's held-out rows (over the training rows when the
    /// data holds none out), the same on every rank (a collective). Each rank's squared errors
    /// are summed in f64 and the sums added in rank order.
    pub fn evaluate(&mut self) -> Result<f64> {
        let t = &self.trainer;
        let x = if self.eval_total > 0 {
            &t.data.eval
        } else {
            &t.data.train
        };
        let mut sums = [t.model.reconstruction_sq_sum(x.as_ref())?, x.rows() as f64];
        self.comm.all_reduce_sum_f64(&mut sums)?;
        if sums[1] == 0.0 {
            return Err(Error::Empty {
                what: "evaluation data".into(),
                detail: "no rank holds a row".into(),
            });
        }
        Ok(sums[0] / (sums[1] * x.cols() as f64))
    }

    /// A hash of this rank's whole training state: parameters, codebook, EMA state, usage,
    /// AdamW's moments and the steps. Equal on every rank of a healthy job.
    pub fn state_hash(&self) -> u64 {
        let t = &self.trainer;
        let mut h = StateHash::default();
        for mlp in [&t.model.encoder, &t.model.decoder] {
            for (_, _, v) in mlp.tensors() {
                h.f32s(v);
            }
        }
        let q = &t.model.quantizer;
        h.f32s(q.codebook().data());
        if let Some(e) = q.ema() {
            h.f32s(e.cluster_size());
            h.f32s(e.embed_avg().data());
        }
        q.usage_total().iter().for_each(|&u| h.word(u));
        for moment in t.optimizer.m.iter().chain(&t.optimizer.v) {
            h.f32s(moment);
        }
        h.word(q.step());
        h.word(t.step);
        h.0
    }

    /// Fails on every rank, naming the rank, when any rank's state differs from rank 0's (a
    /// collective). The job checks this every [`SYNC_CHECK_EVERY`] steps, before every
    /// checkpoint and at the end.
    pub fn check_in_sync(&self) -> Result<()> {
        let mine = self.state_hash();
        let all = self.comm.all_gather_bytes(&mine.to_le_bytes())?;
        let hash = |b: &[u8]| b.try_into().map(u64::from_le_bytes).unwrap_or(0);
        if let Some((r, b)) = all.iter().enumerate().find(|(_, b)| *b != &all[0]) {
            return Err(Error::internal(
                "keeping the ranks in step",
                format!(
                    "at step {} rank {r}'s parameters, codebook or optimiser state differ from \
                     rank 0's (state hash {:016x} vs {:016x}): the ranks diverged",
                    self.trainer.step,
                    hash(b),
                    hash(&all[0])
                ),
            ));
        }
        Ok(())
    }

    /// Writes the checkpoint from rank 0 (atomically, as [`super::save_trainer`] does) after
    /// checking that every rank holds the same state (a collective; the other ranks write
    /// nothing).
    pub fn save(&mut self, path: &Path) -> Result<()> {
        self.check_in_sync()?;
        if self.comm.rank() == 0 {
            super::save_trainer(&mut self.trainer, path)?;
        }
        Ok(())
    }
}

/// How often (in steps) a job compares its ranks' state hashes.
pub const SYNC_CHECK_EVERY: u64 = 10;

/// The step across ranks runs on the CPU: `auto` is taken as the CPU, a device is refused.
fn cpu_quantizer(config: &TrainConfig) -> Result<crate::quantizer::QuantizerConfig> {
    match config.quantizer.device {
        Device::Cpu | Device::Auto => Ok(config.quantizer.clone().device(Device::Cpu)),
        other => Err(Error::InvalidArgument(format!(
            "--device {other}: training across ranks (--shards, mpirun) runs its step on the \
             CPU; leave --device out or give cpu"
        ))),
    }
}

/// The gradient tensors in optimiser order (encoder, decoder, a learned codebook).
fn grad_tensors(g: &mut VqVaeGrads) -> Vec<&mut [f32]> {
    let mut out = g.encoder.tensors_mut();
    out.extend(g.decoder.tensors_mut());
    if let Some(c) = g.codebook.as_mut() {
        out.push(c.data_mut());
    }
    out
}

/// A fast 64-bit hash of words (FxHash's mixing): enough to tell two ranks' states apart.
#[derive(Default)]
struct StateHash(u64);

impl StateHash {
    fn word(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn f32s(&mut self, v: &[f32]) {
        self.word(v.len() as u64);
        for c in v.chunks(2) {
            let lo = c[0].to_bits() as u64;
            let hi = c.get(1).map_or(0, |x| x.to_bits() as u64);
            self.word(lo | hi << 32);
        }
    }
}
