//! `vqx train`: train a VQ-VAE (MLP encoder → quantizer → MLP decoder) on a .npy file or a
//! built-in synthetic data set, with a progress bar, per-step JSON-lines metrics, atomic
//! checkpoints, bit-for-bit resume and a checkpoint on Ctrl-C.

use super::args::{ActivationChoice, Backend, InitChoice, LearningChoice, RunArgs, choice, count};
use super::report::{MetricsLog, json, progress_bar};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use vqx::backend::Device;
use vqx::collective::{Collective, in_process};
use vqx::error::IoContext;
use vqx::model::VqVaeConfig;
use vqx::quantizer::QuantizerConfig;
use vqx::train::{
    self, AdamWConfig, DataSource, ShardedTrainer, StepMetrics, TrainConfig, Trainer,
};
use vqx::{Error, Result};

/// Metrics file in the output directory (one JSON object per step).
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Lloyd iterations of `--init kmeans`.
const KMEANS_ITERS: usize = 10;
/// Exit status after Ctrl-C (128 + SIGINT, as shells report it).
const INTERRUPTED_EXIT: i32 = 130;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Training vectors (.npy, N×D, f32 or f16).
    #[arg(long, conflicts_with_all = ["synthetic", "resume"])]
    pub data: Option<PathBuf>,
    /// A built-in data set: gmm or manifold, optionally with options, e.g.
    /// gmm:dim=64,components=64,std=0.1 or manifold:dim=64,intrinsic=2,noise=0.01.
    #[arg(long, conflicts_with = "resume")]
    pub synthetic: Option<String>,
    /// Training rows generated for --synthetic.
    #[arg(long, default_value_t = 16384, value_parser = count::<usize>)]
    pub rows: usize,
    /// Held-out rows for the evaluation: generated for --synthetic (default 2048), set aside
    /// from --data (default: a tenth of the file, at most 2048). A split that leaves fewer
    /// training rows than one batch is refused.
    #[arg(long)]
    pub eval_rows: Option<usize>,
    /// K, the number of codes.
    #[arg(long, default_value_t = 256)]
    pub codebook_size: usize,
    /// Dimension of the codes (the encoder's output).
    #[arg(long, default_value_t = 8)]
    pub code_dim: usize,
    /// Hidden widths of the encoder, comma-separated (the decoder mirrors them); "" for none.
    #[arg(long, default_value = "256,256")]
    pub hidden: String,
    /// Activation of the hidden layers.
    #[arg(long, default_value = "gelu", value_parser = choice::<ActivationChoice>())]
    pub activation: ActivationChoice,
    /// A layer norm before every hidden activation.
    #[arg(long)]
    pub layer_norm: bool,
    /// Total optimisation steps (with --resume: the new total).
    #[arg(long, value_parser = count::<u64>)]
    pub steps: Option<u64>,
    /// Rows per batch.
    #[arg(long, default_value_t = 256, value_parser = count::<usize>)]
    pub batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Linear warm-up steps before the cosine decay.
    #[arg(long, default_value_t = 100)]
    pub warmup: u64,
    /// Final learning rate as a fraction of the peak.
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    /// AdamW's decoupled weight decay (linear weights only).
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Global gradient-norm clipping; 0 = off.
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// β of the commitment loss.
    #[arg(long, default_value_t = 0.25)]
    pub commitment_weight: f32,
    /// How the codebook learns.
    #[arg(long, default_value = "ema", value_parser = choice::<LearningChoice>())]
    pub codebook: LearningChoice,
    /// EMA decay γ.
    #[arg(long, default_value_t = 0.99)]
    pub ema_decay: f32,
    /// Re-seed codes whose EMA count falls below this; 0 = off (EMA only).
    #[arg(long, default_value_t = 0.0)]
    pub dead_code_threshold: f32,
    /// Codebook init on the first batch (k-means: 10 Lloyd iterations).
    #[arg(long, default_value = "data", value_parser = choice::<InitChoice>())]
    pub init: InitChoice,
    #[command(flatten)]
    pub backend: Backend,
    /// Keep the encoder at its initial weights (the control experiment).
    #[arg(long)]
    pub freeze_encoder: bool,
    #[command(flatten)]
    pub run: RunArgs,
    /// Write a checkpoint every N steps (and always at the end); 0 = only at the end.
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: u64,
    /// Held-out reconstruction MSE every N steps (and at the end); 0 = only at the end.
    #[arg(long, default_value_t = 100)]
    pub eval_every: u64,
    /// Stop after this step with a checkpoint, as Ctrl-C does (exit status 0); the run
    /// continues with --resume on the configured schedule.
    #[arg(long, value_name = "STEP")]
    pub stop_at: Option<u64>,
    /// Train as this many ranks, threads of this process: each holds its shard of the data
    /// and takes its part of every batch (--batch-size is the global batch); the run
    /// `mpirun -np S vqx train` gives, bit for bit (docs/train-ranks.md).
    #[arg(long, default_value_t = 1, value_parser = count::<usize>)]
    pub shards: usize,
    /// Output directory: checkpoint.safetensors, metrics.jsonl, config.json, summary.json.
    #[arg(long, short, conflicts_with = "resume")]
    pub output: Option<PathBuf>,
    /// Replace the run already in --output (its checkpoint, metrics, configuration and summary
    /// are deleted first). Without it an existing run is refused: continue it with --resume.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Continue the run in DIR from its checkpoint, with its stored configuration (only
    /// --steps, --device, --deterministic, --checkpoint-every, --eval-every, --stop-at,
    /// --shards and --quiet apply). Bit for bit the uninterrupted run, unless --steps changes
    /// the total (and with it the learning-rate schedule) or the rank count changes (the
    /// batches then differ from the resumed step on).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
}

fn parse_hidden(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<usize>().ok().filter(|&v| v > 0).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "--hidden {s:?}: {p:?} is not a positive width (e.g. --hidden 256,256)"
                ))
            })
        })
        .collect()
}

fn fresh_config(args: &Args) -> Result<(TrainConfig, PathBuf)> {
    let output = args.output.clone().ok_or_else(|| {
        Error::InvalidArgument("--output DIR is required (or --resume DIR)".into())
    })?;
    let (data, data_dim) = match (&args.data, &args.synthetic) {
        (Some(p), None) => {
            let file = vqx::npy::NpyMatrixReader::open(p)?;
            let source = DataSource::Npy {
                path: std::path::absolute(p).unwrap_or_else(|_| p.clone()),
                eval_rows: args
                    .eval_rows
                    .unwrap_or_else(|| train::default_eval_rows(file.rows())),
                seed: args.run.seed,
            };
            (source, file.cols())
        }
        (None, Some(s)) => {
            let spec: train::Synthetic = s.parse()?;
            let dim = spec.dim();
            let source = DataSource::Synthetic {
                spec,
                rows: args.rows,
                eval_rows: args.eval_rows.unwrap_or(train::MAX_DEFAULT_EVAL_ROWS),
                seed: args.run.seed,
            };
            (source, dim)
        }
        _ => {
            return Err(Error::InvalidArgument(
                "give the training data: --data X.npy or --synthetic NAME (or --resume DIR)".into(),
            ));
        }
    };
    let quantizer = QuantizerConfig::new(args.codebook_size, args.code_dim)
        .metric(args.backend.metric())
        .commitment_weight(args.commitment_weight)
        .learning(args.codebook.learning(args.ema_decay))
        .dead_code_threshold(args.dead_code_threshold)
        .init(args.init.init(KMEANS_ITERS))
        .deterministic(args.run.deterministic)
        .seed(args.run.seed)
        .device(args.backend.device());
    let mut model = VqVaeConfig::new(data_dim, args.code_dim, parse_hidden(&args.hidden)?);
    model.activation = args.activation.into();
    model.layer_norm = args.layer_norm;
    model.seed = args.run.seed;
    let mut c = TrainConfig::new(model, quantizer, data);
    c.steps = args.steps.unwrap_or(2000);
    c.batch_size = args.batch_size;
    c.lr = args.lr;
    c.warmup = args.warmup;
    c.min_lr_ratio = args.min_lr_ratio;
    c.adam = AdamWConfig {
        weight_decay: args.weight_decay,
        ..AdamWConfig::default()
    };
    c.clip = args.clip;
    c.freeze_encoder = args.freeze_encoder;
    c.seed = args.run.seed;
    c.validate()?;
    Ok((c, output))
}

/// The files a run writes into its directory.
const RUN_FILES: [&str; 4] = [
    train::CHECKPOINT_FILE,
    METRICS_FILE,
    "config.json",
    "summary.json",
];

/// The files of a run already in `dir`, refused unless `overwrite`: checked before the data is
/// loaded, so a repeated command fails at once.
fn existing_run(dir: &std::path::Path, overwrite: bool) -> Result<Vec<PathBuf>> {
    let existing: Vec<PathBuf> = RUN_FILES
        .into_iter()
        .map(|f| dir.join(f))
        .filter(|p| p.exists())
        .collect();
    if !existing.is_empty() && !overwrite {
        let names: Vec<String> = existing
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        return Err(Error::InvalidArgument(format!(
            "{} already holds a run ({}): continue it with `vqx train --resume {}`, or \
             pass --overwrite to replace it",
            dir.display(),
            names.join(", "),
            dir.display()
        )));
    }
    Ok(existing)
}

pub fn run(args: Args) -> Result<()> {
    #[cfg(feature = "mpi")]
    if super::launched_by_mpi() {
        let mpi = vqx::collective::mpi::Mpi::init()?;
        if mpi.size() > 1 {
            return run_mpi(&args, &mpi);
        }
    }
    let stop = stop_flag();
    if args.shards > 1 {
        let outcomes = in_process::run(args.shards, |rank| rank_job(&args, rank, &stop))?;
        return finish(outcomes.first().copied().unwrap_or(Outcome::Done));
    }
    let (trainer, dir) = match &args.resume {
        Some(dir) => {
            let path = dir.join(train::CHECKPOINT_FILE);
            let mut t = train::load_trainer(&path, args.backend.device())?;
            if let Some(s) = args.steps {
                t.config.steps = s;
                t.config.validate()?;
            }
            if args.run.deterministic {
                t.config.quantizer.deterministic = true;
            }
            eprintln!(
                "resuming {} at step {} of {}",
                path.display(),
                t.step,
                t.config.steps
            );
            note_rank_change(t.config.ranks, 1);
            t.config.ranks = 1;
            (t, dir.clone())
        }
        None => {
            let (config, dir) = fresh_config(&args)?;
            let old_run = existing_run(&dir, args.overwrite)?;
            let trainer = Trainer::new(config)?;
            replace_old_run(old_run, &dir)?;
            eprintln!(
                "data: {} rows for training, {} held out for evaluation",
                trainer.data.train.rows(),
                trainer.data.eval.rows()
            );
            (trainer, dir)
        }
    };
    let mut trainer = trainer;
    finish(train_loop(&mut trainer, &args, &dir, &stop)?)
}

/// How a run's loop ended: all its steps (or --stop-at), or Ctrl-C (exit status 130).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    Interrupted,
}

fn finish(outcome: Outcome) -> Result<()> {
    if outcome == Outcome::Interrupted {
        std::process::exit(INTERRUPTED_EXIT);
    }
    Ok(())
}

/// Ctrl-C only raises this flag; the loop saves a checkpoint at the end of the current step.
fn stop_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    if let Err(e) = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)) {
        eprintln!("warning: cannot catch Ctrl-C ({e}): an interrupted run saves nothing");
    }
    stop
}

/// Says so when a run continues with another rank count than it was trained with.
fn note_rank_change(before: usize, now: usize) {
    if before != now {
        eprintln!(
            "note: the run was trained with {before} rank{} and continues with {now}: each \
             rank's part of every batch differs from here on, so the result is not bit for \
             bit the run continued with {before}",
            if before == 1 { "" } else { "s" }
        );
    }
}

/// Deletes an old run's files (only once the new run has started, so a new run that fails
/// to start never leaves the directory empty) and makes the directory.
fn replace_old_run(old_run: Vec<PathBuf>, dir: &Path) -> Result<()> {
    for path in old_run {
        std::fs::remove_file(&path).at(&path)?;
    }
    std::fs::create_dir_all(dir).at(dir)
}

/// One rank of `mpirun -np S vqx train`: reads only its shard of the data, trains with the
/// other ranks, and rank 0 writes. An error on any rank ends the whole job (MPI_Abort) naming
/// the rank and the cause, so no rank waits on it for ever.
#[cfg(feature = "mpi")]
fn run_mpi(args: &Args, mpi: &vqx::collective::mpi::Mpi) -> Result<()> {
    let size = mpi.size();
    let job = || -> Result<Outcome> {
        if args.shards != 1 && args.shards != size {
            return Err(Error::InvalidArgument(format!(
                "--shards {} in a job of {size} MPI ranks: each rank holds one shard (leave \
                 --shards out, or give {size})",
                args.shards
            )));
        }
        rank_job(args, mpi, &stop_flag())
    };
    match job() {
        Err(e) => {
            mpi.abort(&e.to_string());
            Err(e)
        }
        Ok(outcome) => finish(outcome),
    }
}

/// One rank's run of a data-parallel job (a thread of `--shards S`, or a process of
/// `mpirun -np S`): every rank steps, evaluates and checks, rank 0 alone writes and reports.
fn rank_job(args: &Args, comm: &dyn Collective, stop: &AtomicBool) -> Result<Outcome> {
    let lead = comm.rank() == 0;
    let size = comm.size();
    let (mut t, dir) = match &args.resume {
        Some(dir) => {
            let path = dir.join(train::CHECKPOINT_FILE);
            // The step runs on the CPU across ranks: only cpu or auto is accepted.
            let device = args.backend.device();
            if !matches!(device, Device::Cpu | Device::Auto) {
                return Err(Error::InvalidArgument(format!(
                    "--device {device}: training across ranks (--shards, mpirun) runs its step \
                     on the CPU; leave --device out or give cpu"
                )));
            }
            // (--deterministic changes nothing here: the CPU always sums in a fixed order.)
            let (t, before) = ShardedTrainer::resume(comm, &path, args.steps)?;
            if lead {
                eprintln!(
                    "resuming {} at step {} of {} on {size} ranks",
                    path.display(),
                    t.trainer().step,
                    t.trainer().config.steps
                );
                note_rank_change(before, size);
            }
            (t, dir.clone())
        }
        None => {
            let (config, dir) = fresh_config(args)?;
            let old_run = if lead {
                existing_run(&dir, args.overwrite)?
            } else {
                Vec::new()
            };
            let t = ShardedTrainer::new(comm, config)?;
            // Every rank started (and holds the same weights) before the old run goes.
            t.check_in_sync()?;
            if lead {
                replace_old_run(old_run, &dir)?;
                let (train_rows, eval_rows) = t.rows();
                eprintln!(
                    "data: {train_rows} rows for training, {eval_rows} held out for \
                     evaluation, in {size} shards (rank 0 holds {} and {})",
                    t.trainer().data.train.rows(),
                    t.trainer().data.eval.rows()
                );
            }
            (t, dir)
        }
    };
    train_loop(&mut t, args, &dir, stop)
}

/// What the training loop needs of a run: one process's [`Trainer`], or one rank's
/// [`ShardedTrainer`] (whose step, evaluation, checkpoint and stop are collectives).
trait Job {
    fn trainer(&self) -> &Trainer;
    /// Brings a device's state to the host (for the summary's statistics).
    fn sync(&mut self) -> Result<()>;
    /// Whether this process reports and writes (rank 0).
    fn lead(&self) -> bool;
    /// One step; returns its metrics and whether to stop after it because `stop` (Ctrl-C)
    /// was raised here or, across ranks, on any rank.
    fn step(&mut self, stop: &AtomicBool) -> Result<(StepMetrics, bool)>;
    fn evaluate(&mut self) -> Result<f64>;
    fn save(&mut self, path: &Path) -> Result<()>;
    /// Checks after each step (ranks: that every rank holds the same state, now and then).
    fn check(&mut self) -> Result<()>;
    /// Training and held-out rows over the whole job.
    fn rows(&mut self) -> (usize, usize);
    fn runs_on(&mut self) -> String;
}

impl Job for Trainer {
    fn trainer(&self) -> &Trainer {
        self
    }
    fn sync(&mut self) -> Result<()> {
        Trainer::sync(self)
    }
    fn lead(&self) -> bool {
        true
    }
    fn step(&mut self, stop: &AtomicBool) -> Result<(StepMetrics, bool)> {
        let m = Trainer::step(self)?;
        Ok((m, stop.load(Ordering::SeqCst)))
    }
    fn evaluate(&mut self) -> Result<f64> {
        Trainer::evaluate(self)
    }
    fn save(&mut self, path: &Path) -> Result<()> {
        train::save_trainer(self, path)
    }
    fn check(&mut self) -> Result<()> {
        Ok(())
    }
    fn rows(&mut self) -> (usize, usize) {
        (self.data.train.rows(), self.data.eval.rows())
    }
    fn runs_on(&mut self) -> String {
        Trainer::runs_on(self).to_string()
    }
}

impl Job for ShardedTrainer<'_> {
    fn trainer(&self) -> &Trainer {
        ShardedTrainer::trainer(self)
    }
    fn sync(&mut self) -> Result<()> {
        Ok(())
    }
    fn lead(&self) -> bool {
        self.rank().0 == 0
    }
    fn step(&mut self, stop: &AtomicBool) -> Result<(StepMetrics, bool)> {
        // Read before the step, so the vote rides in its all-reduce and every rank stops
        // after the same step, whichever saw Ctrl-C.
        self.step_voting(stop.load(Ordering::SeqCst))
    }
    fn evaluate(&mut self) -> Result<f64> {
        ShardedTrainer::evaluate(self)
    }
    fn save(&mut self, path: &Path) -> Result<()> {
        ShardedTrainer::save(self, path)
    }
    fn check(&mut self) -> Result<()> {
        if self.trainer().step.is_multiple_of(train::SYNC_CHECK_EVERY) {
            self.check_in_sync()?;
        }
        Ok(())
    }
    fn rows(&mut self) -> (usize, usize) {
        ShardedTrainer::rows(self)
    }
    fn runs_on(&mut self) -> String {
        format!("cpu, {} ranks", self.rank().1)
    }
}

/// The training loop: steps, per-step metrics, evaluation, checkpoints, --stop-at and Ctrl-C.
fn train_loop(job: &mut dyn Job, args: &Args, dir: &Path, stop: &AtomicBool) -> Result<Outcome> {
    let lead = job.lead();
    let ckpt_path = dir.join(train::CHECKPOINT_FILE);
    let mut metrics = None;
    if lead {
        let config_json = json(&job.trainer().config, "the configuration")?;
        vqx::atomic::write_atomic(&dir.join("config.json"), config_json.as_bytes())?;
        metrics = Some(MetricsLog::resume(
            &dir.join(METRICS_FILE),
            job.trainer().step,
        )?);
    }

    let total = job.trainer().config.steps;
    let k = job.trainer().config.quantizer.codebook_size;
    let bar = progress_bar(total, args.run.quiet || !lead);
    bar.set_position(job.trainer().step);
    let start = Instant::now();
    let (mut step_s, mut quant_s, mut timed) = (0.0f64, 0.0f64, 0u64);
    let mut last: Option<StepMetrics> = None;
    let mut eval = None;
    while !job.trainer().finished() {
        let (m, interrupted) = job.step(stop)?;
        job.check()?;
        // The first step of a run (codebook init) is left out of the timing.
        if m.step > 1 {
            step_s += m.step_seconds;
            quant_s += m.quantizer_seconds;
            timed += 1;
        }
        let finished = job.trainer().finished();
        let at_eval = finished || (args.eval_every > 0 && m.step.is_multiple_of(args.eval_every));
        let e = if at_eval { Some(job.evaluate()?) } else { None };
        if let Some(log) = metrics.as_mut() {
            let mut line = serde_json::to_value(&m)
                .map_err(|e| Error::internal("encoding the step's metrics", e))?;
            if let Some(e) = e {
                line["eval_reconstruction"] = serde_json::json!(e);
            }
            line["elapsed_s"] = serde_json::json!(start.elapsed().as_secs_f64());
            log.write(&line)?;
        }
        eval = e.or(eval);
        bar.set_message(format!(
            "loss {:.4}  recon {:.4}  perplexity {:.1}  used {}/{k}  dead {}",
            m.loss, m.reconstruction, m.perplexity, m.used, m.dead
        ));
        bar.inc(1);
        let stop_here = args.stop_at == Some(m.step);
        let periodic = args.checkpoint_every > 0 && m.step.is_multiple_of(args.checkpoint_every);
        if periodic || interrupted || stop_here || finished {
            if let Some(log) = metrics.as_mut() {
                log.flush()?;
            }
            job.save(&ckpt_path)?;
        }
        last = Some(m);
        let step = job.trainer().step;
        if interrupted && !finished {
            bar.finish_and_clear();
            if lead {
                eprintln!(
                    "interrupted at step {step} of {total}: checkpoint saved to {}; continue \
                     with `vqx train --resume {}`",
                    ckpt_path.display(),
                    dir.display()
                );
            }
            return Ok(Outcome::Interrupted);
        }
        if stop_here && !finished {
            bar.finish_and_clear();
            if lead {
                eprintln!(
                    "stopped at step {step} of {total} (--stop-at): checkpoint saved to {}; \
                     continue with `vqx train --resume {}`",
                    ckpt_path.display(),
                    dir.display()
                );
            }
            return Ok(Outcome::Done);
        }
    }
    bar.finish_and_clear();
    if let Some(log) = metrics.as_mut() {
        log.flush()?;
    }
    let Some(m) = last else {
        if lead {
            eprintln!(
                "nothing to do: the run in {} is at step {total}",
                dir.display()
            );
        }
        return Ok(Outcome::Done);
    };
    let eval = match eval {
        Some(e) => e,
        None => job.evaluate()?,
    };
    if !lead {
        return Ok(Outcome::Done);
    }
    let (train_rows, eval_rows) = job.rows();
    let runs_on = job.runs_on();
    job.sync()?;
    let trainer = job.trainer();
    let s = trainer.model.quantizer.statistics();
    let per_step_ms = if timed > 0 {
        1e3 * step_s / timed as f64
    } else {
        0.0
    };
    let quant_share = if step_s > 0.0 { quant_s / step_s } else { 0.0 };
    let summary = serde_json::json!({
        "step": trainer.step,
        "eval_reconstruction": eval,
        "last_loss": m.loss,
        "last_reconstruction": m.reconstruction,
        "last_perplexity": m.perplexity,
        "last_used": m.used,
        "cumulative_perplexity": s.cumulative_perplexity,
        "cumulative_used": s.cumulative_used,
        "dead_codes": s.dead,
        "codebook_size": k,
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "ranks": trainer.config.ranks,
        "mean_step_ms": per_step_ms,
        "quantizer_share": quant_share,
        "quantizer_backend": trainer.model.quantizer.backend().name(),
        "step_runs_on": runs_on,
        "seconds": start.elapsed().as_secs_f64(),
    });
    let text = json(&summary, "the summary")?;
    vqx::atomic::write_atomic(&dir.join("summary.json"), text.as_bytes())?;
    eprintln!(
        "trained {} steps in {:.1} s ({per_step_ms:.2} ms/step, {:.1}% in the quantizer on {}); \
         held-out reconstruction MSE {eval:.5}; last batch perplexity {:.1}, used {}/{k}; \
         cumulative perplexity {:.1}, dead codes {}; wrote {}",
        trainer.step,
        start.elapsed().as_secs_f64(),
        100.0 * quant_share,
        trainer.model.quantizer.backend().name(),
        m.perplexity,
        m.used,
        s.cumulative_perplexity,
        s.dead.map_or("n/a".to_string(), |d| d.to_string()),
        dir.display()
    );
    Ok(Outcome::Done)
}
