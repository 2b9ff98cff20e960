//! `vqx fit`: learn a codebook for a fixed set of vectors, by Lloyd's k-means over the whole
//! set (the default) or by the EMA rule over batches (`--mode ema`, vector-quantize-pytorch's
//! update, for parity with a training run).

use super::args::{Backend, InitChoice, RunArgs, count};
use super::report::{MetricsLog, progress_bar};
use clap::ValueEnum;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use vqx::collective::{Collective, in_process};
use vqx::ema::EmaState;
use vqx::kmeans::{self, KMeansConfig, Seeding, Shard};
use vqx::quantizer::{CodebookLearning, QuantizerConfig, VectorQuantizer};
use vqx::{Error, MatRef, Matrix, Result};

/// `--mode`: how the codebook learns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Lloyd's k-means over every row each pass, exact bounds skipping searches that cannot
    /// change a row's code, stopping at convergence.
    Lloyd,
    /// The EMA rule on batches (vector-quantize-pytorch's update; for streams and parity).
    Ema,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Vectors to tokenize (.npy, N×D, f32 or f16).
    #[arg(long)]
    pub input: PathBuf,
    /// K, the number of codes.
    #[arg(long)]
    pub codebook_size: usize,
    /// lloyd: k-means over all rows each pass; ema: the EMA rule on batches.
    #[arg(long, value_enum, default_value = "lloyd")]
    pub mode: Mode,
    /// lloyd: exactly this many passes (still ending early at a fixed point, where no row
    /// changes code); default: until a pass gains less than --tol. ema: training steps
    /// (default 1000).
    #[arg(long, value_parser = count::<u64>)]
    pub steps: Option<u64>,
    /// lloyd: stop once a pass lowers the mean squared error by less than this fraction.
    #[arg(long, default_value_t = 1e-4)]
    pub tol: f64,
    /// lloyd: most passes when --steps is not given.
    #[arg(long, default_value_t = 300, value_parser = count::<usize>)]
    pub max_passes: usize,
    /// lloyd: search every row every pass (plain Lloyd; same result, slower).
    #[arg(long)]
    pub no_bounds: bool,
    /// lloyd: codes per bound group (smaller: more distances skipped, each searched one
    /// costing more).
    #[arg(long, default_value_t = KMeansConfig::new(1).group_codes, value_parser = count::<usize>)]
    pub group_codes: usize,
    /// lloyd: k-means|| sampling rounds of --init kmeans.
    #[arg(long, default_value_t = Seeding::ROUNDS)]
    pub seed_rounds: usize,
    /// lloyd: rows k-means|| draws per round, as a multiple of K.
    #[arg(long, default_value_t = Seeding::OVERSAMPLING)]
    pub oversampling: f64,
    /// lloyd: rows per code of a sample stage: Lloyd on a uniform sample of this many rows per
    /// code first, then over all rows, when the input holds at least twice that (0: none).
    #[arg(long, default_value_t = KMeansConfig::SAMPLE_PER_CODE)]
    pub sample_per_code: usize,
    /// lloyd: passes between checkpoints of the fit so far, written atomically to --output
    /// (0: only at the end); a killed fit continues from the last with --resume.
    #[arg(long, default_value_t = 10)]
    pub checkpoint_every: usize,
    /// lloyd: continue the fit whose checkpoint is at --output: the fit's own command with
    /// --resume added (same input, seed, metric and --tol; the seeding flags are moot, the
    /// seeding is done). On the same number of ranks it continues with the uninterrupted fit's
    /// bits; --steps/--max-passes count the passes already made.
    #[arg(long)]
    pub resume: bool,
    /// Split the rows into this many shards, one in-process rank each: the codebook
    /// `mpirun -np S` gives, bit for bit (ema: --batch-size is the global batch).
    #[arg(long, default_value_t = 1, value_parser = count::<usize>)]
    pub shards: usize,
    /// ema: rows per batch (capped at N; default 1024).
    #[arg(long, value_parser = count::<usize>)]
    pub batch_size: Option<usize>,
    /// EMA decay γ of the written EMA state and of --mode ema (vector-quantize-pytorch's
    /// default is 0.8; ours, the VQ-VAE paper's, 0.99).
    #[arg(long, default_value_t = 0.99)]
    pub decay: f32,
    /// EMA Laplace smoothing ε.
    #[arg(long, default_value_t = 1e-5)]
    pub eps: f32,
    /// β of the commitment loss (reported; nothing is trained through it here).
    #[arg(long, default_value_t = 0.25)]
    pub commitment_weight: f32,
    /// ema: re-seed codes whose EMA count falls below this; 0 = off.
    #[arg(long)]
    pub dead_code_threshold: Option<f32>,
    /// ema: count a re-seeded code restarts with (default: the threshold, as
    /// vector-quantize-pytorch).
    #[arg(long)]
    pub reset_count: Option<f32>,
    /// kmeans (lloyd: k-means|| seeding; ema: Lloyd iterations on the first batch), data
    /// (random rows), or a codebook file (.npy, vqx checkpoint, vector-quantize-pytorch or ESM3
    /// state dict). Default: kmeans for lloyd, data for ema.
    #[arg(long, value_name = "data|kmeans|FILE", value_parser = init_from)]
    pub init: Option<InitFrom>,
    /// ema: Lloyd iterations for --init kmeans (default 10).
    #[arg(long, value_parser = count::<usize>)]
    pub kmeans_iters: Option<usize>,
    #[command(flatten)]
    pub backend: Backend,
    /// ema: take batches in file order instead of a seeded shuffle.
    #[arg(long)]
    pub no_shuffle: bool,
    #[command(flatten)]
    pub run: RunArgs,
    /// Per-pass (lloyd) or per-step (ema) metrics as JSON lines.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Checkpoint to write (.safetensors), atomically.
    #[arg(long, short)]
    pub output: PathBuf,
}

/// `--init`: a built-in init, or the codebook file to start from.
#[derive(Clone, Debug)]
pub enum InitFrom {
    Builtin(InitChoice),
    File(PathBuf),
}

fn init_from(s: &str) -> std::result::Result<InitFrom, std::convert::Infallible> {
    Ok(InitChoice::from_str(s, false).map_or_else(|_| InitFrom::File(s.into()), InitFrom::Builtin))
}

pub fn run(args: Args) -> Result<()> {
    check_mode_flags(&args)?;
    #[cfg(feature = "mpi")]
    if super::launched_by_mpi() {
        return run_mpi(&args);
    }
    let input = Input::open(&args.input)?;
    let x = input.rows();
    x.check_nonempty(&format!("input {}", args.input.display()))?;
    match args.mode {
        Mode::Lloyd => run_sharded(&args, x, lloyd_job),
        // One process keeps the quantizer's own training step (device backends included);
        // ranks share theirs (with one rank it gives the same bits: checked on L2, cosine,
        // k-means init and re-seeded dead codes).
        Mode::Ema if args.shards == 1 => run_ema(&args, x),
        Mode::Ema => run_sharded(&args, x, ema_job),
    }
}

/// Flags of one mode given to the other are refused, not ignored.
fn check_mode_flags(args: &Args) -> Result<()> {
    let (mode, other, given): (&str, &str, Vec<&str>) = match args.mode {
        Mode::Lloyd => (
            "lloyd",
            "ema",
            [
                ("--batch-size", args.batch_size.is_some()),
                ("--dead-code-threshold", args.dead_code_threshold.is_some()),
                ("--reset-count", args.reset_count.is_some()),
                ("--kmeans-iters", args.kmeans_iters.is_some()),
                ("--no-shuffle", args.no_shuffle),
            ]
            .iter()
            .filter(|(_, g)| *g)
            .map(|(f, _)| *f)
            .collect(),
        ),
        Mode::Ema => (
            "ema",
            "lloyd",
            [
                ("--no-bounds", args.no_bounds),
                (
                    "--group-codes",
                    args.group_codes != KMeansConfig::new(1).group_codes,
                ),
                (
                    "--sample-per-code",
                    args.sample_per_code != KMeansConfig::SAMPLE_PER_CODE,
                ),
                ("--resume", args.resume),
                ("--checkpoint-every", args.checkpoint_every != 10),
            ]
            .iter()
            .filter(|(_, g)| *g)
            .map(|(f, _)| *f)
            .collect(),
        ),
    };
    if let Some(flag) = given.first() {
        return Err(Error::InvalidArgument(format!(
            "{flag} applies to --mode {other}, not to --mode {mode}"
        )));
    }
    if !(args.tol >= 0.0 && args.tol.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "--tol must be a non-negative number; got {}",
            args.tol
        )));
    }
    Ok(())
}

fn quantizer_config(args: &Args, d: usize) -> QuantizerConfig {
    QuantizerConfig::new(args.codebook_size, d)
        .metric(args.backend.metric())
        .commitment_weight(args.commitment_weight)
        .learning(CodebookLearning::Ema {
            decay: args.decay,
            eps: args.eps,
        })
        .deterministic(args.run.deterministic)
        .seed(args.run.seed)
        .device(args.backend.device())
}

/// The input's rows: a float32 .npy is mapped and read in place (paged in as the passes touch
/// it, so a file larger than the memory the process may hold can be fitted); float16 is read
/// and converted.
enum Input {
    Mapped(vqx::npy::MappedMatrix),
    Read(Matrix),
}

impl Input {
    fn open(path: &std::path::Path) -> Result<Self> {
        Ok(match vqx::npy::MappedMatrix::open(path)? {
            Some(m) => Input::Mapped(m),
            None => Input::Read(vqx::npy::read_matrix(path)?),
        })
    }

    fn rows(&self) -> MatRef<'_> {
        match self {
            Input::Mapped(m) => m.as_ref(),
            Input::Read(m) => m.as_ref(),
        }
    }
}

/// The EMA mode's quantizer: its config from the flags, initialised from --init (random rows of
/// the first batch by default, k-means of it, or a codebook file).
fn ema_quantizer(args: &Args, d: usize) -> Result<VectorQuantizer> {
    let mut config =
        quantizer_config(args, d).dead_code_threshold(args.dead_code_threshold.unwrap_or(0.0));
    if let Some(c) = args.reset_count {
        config = config.reset_count(c);
    }
    let init = args
        .init
        .clone()
        .unwrap_or(InitFrom::Builtin(InitChoice::Data));
    match &init {
        InitFrom::Builtin(init) => {
            VectorQuantizer::new(config.init(init.init(args.kmeans_iters.unwrap_or(10))))
        }
        InitFrom::File(file) => VectorQuantizer::with_codebook(config, super::load_codebook(file)?),
    }
}

/// Keeps the EMA mode's shuffle stream apart from the quantizer's (both derive from --seed).
const SHUFFLE_SEED: u64 = 0x5eed_5eed;

/// The order the EMA mode takes rows in: epochs over the rows, each reshuffled by a stream
/// seeded with `seed` (or in file order with --no-shuffle).
struct BatchOrder {
    order: Vec<usize>,
    rng: ChaCha8Rng,
    cursor: usize,
    shuffle: bool,
}

impl BatchOrder {
    fn new(rows: usize, seed: u64, shuffle: bool) -> Self {
        BatchOrder {
            order: (0..rows).collect(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            // At the end: the first batch starts an epoch (and shuffles).
            cursor: rows,
            shuffle,
        }
    }

    /// The next `batch` rows of `x` into `buf`, continuing into a new epoch as needed.
    fn fill(&mut self, buf: &mut Vec<f32>, x: MatRef<'_>, batch: usize) {
        buf.clear();
        for _ in 0..batch {
            if self.cursor == self.order.len() {
                if self.shuffle {
                    self.order.shuffle(&mut self.rng);
                }
                self.cursor = 0;
            }
            buf.extend_from_slice(x.row(self.order[self.cursor]));
            self.cursor += 1;
        }
    }
}

fn run_ema(args: &Args, x: MatRef<'_>) -> Result<()> {
    let (n, d) = (x.rows(), x.cols());
    let steps = args.steps.unwrap_or(1000);
    let run = &args.run;
    let mut vq = ema_quantizer(args, d)?;

    let batch = args.batch_size.unwrap_or(1024).min(n);
    let mut order = BatchOrder::new(n, run.seed ^ SHUFFLE_SEED, !args.no_shuffle);
    let mut metrics = args
        .metrics
        .as_deref()
        .map(MetricsLog::create)
        .transpose()?;
    let bar = progress_bar(steps, run.quiet);
    let start = std::time::Instant::now();
    let mut buf = Vec::with_capacity(batch * d);
    let mut last = None;
    for _ in 0..steps {
        order.fill(&mut buf, x, batch);
        let out = vq.forward(MatRef::new(&buf, batch, d)?, None, true)?;
        let s = &out.stats;
        bar.set_message(format!(
            "commit {:.4}  perplexity {:.1}  used {}/{}  dead {}",
            out.commitment_loss, s.perplexity, s.used, args.codebook_size, s.dead
        ));
        bar.inc(1);
        if let Some(w) = metrics.as_mut() {
            let line = serde_json::json!({
                "step": s.step,
                "commitment_loss": out.commitment_loss,
                "perplexity": s.perplexity,
                "used": s.used,
                "dead": s.dead,
                "replaced": s.replaced,
                "rechecked": s.rechecked,
                "initialized": s.initialized,
                "elapsed_s": start.elapsed().as_secs_f64(),
            });
            w.write(&line)?;
        }
        last = Some((out.commitment_loss, out.stats));
    }
    bar.finish_and_clear();
    if let Some(w) = metrics.as_mut() {
        w.flush()?;
    }
    vq.to_checkpoint()?.save(&args.output)?;
    let (commit, s) = last.expect("at least one step");
    eprintln!(
        "fit {} codes × {d} on {n} rows: {} steps of {batch} on {} in {:.2} s; last step: \
         commitment {commit:.5}, perplexity {:.1}, used {}/{}, dead {}; wrote {}",
        args.codebook_size,
        steps,
        vq.backend().name(),
        start.elapsed().as_secs_f64(),
        s.perplexity,
        s.used,
        args.codebook_size,
        s.dead,
        args.output.display()
    );
    Ok(())
}

/// The EMA fit on this rank's `shard`, data-parallel: `--batch-size` is the global batch; rank
/// r takes its part (`train::batch_part`) from its own rows, in its own seeded order (rank 0's
/// is the one-process order), and each step's statistics (per-code counts and f64 sums, the
/// commitment loss) are added over the ranks in rank order before the one EMA update every rank
/// makes; the first batch (for the init) and re-seeded rows are gathered from the ranks that
/// hold them. Every rank holds the same codebook (checked every 10 steps and at the end);
/// rank 0 alone reports and writes.
fn ema_job(args: &Args, comm: &dyn Collective, shard: Shard<'_>) -> Result<()> {
    use vqx::ema::{CodeSums, SumMode};
    let x = shard.rows();
    let (n, d) = (x.rows(), x.cols());
    let (ranks, rank) = (comm.size(), comm.rank());
    let lead = rank == 0;
    let steps = args.steps.unwrap_or(1000);
    let run = &args.run;
    let k = args.codebook_size;
    let batch = args.batch_size.unwrap_or(1024).min(shard.total());
    if batch < ranks {
        return Err(Error::InvalidArgument(format!(
            "--batch-size {batch} is smaller than the {ranks} ranks: each rank needs a row of \
             every batch"
        )));
    }
    let part = vqx::train::batch_part(batch, ranks, rank);
    if n == 0 {
        return Err(Error::InvalidArgument(format!(
            "rank {rank} holds no rows of {}",
            args.input.display()
        )));
    }
    let mut vq = ema_quantizer(args, d)?;
    let cosine = args.backend.metric() == vqx::Metric::Cosine;
    let mut order = BatchOrder::new(
        n,
        vqx::train::rank_seed(run.seed ^ SHUFFLE_SEED, rank),
        !args.no_shuffle,
    );
    let mut metrics = match (&args.metrics, lead) {
        (Some(path), true) => Some(MetricsLog::create(path)?),
        _ => None,
    };
    let bar = progress_bar(steps, run.quiet || !lead);
    let start = std::time::Instant::now();
    let mut buf = Vec::with_capacity(part.len() * d);
    let mut last = None;
    for step in 0..steps {
        order.fill(&mut buf, x, part.len());
        let mine = MatRef::new(&buf, part.len(), d)?;
        let initialized = vq.begin_shared_step(|| kmeans::gather_rows(comm, mine.data(), d))?;
        let out = vq.forward(mine, None, false)?;
        // The EMA statistics of x̂ under cosine (vector-quantize-pytorch's spherical update).
        let unit = cosine.then(|| vqx::nearest::normalize_rows(mine));
        let xs = unit.as_ref().map_or(mine, Matrix::as_ref);
        let (sums, counts) = vqx::ema::sums_f64(xs, &out.indices, k);
        let mut reduced = sums;
        reduced.extend(counts.iter().map(|&c| c as f64));
        // β·mse over this rank's rows, weighted to the global batch's mean.
        reduced.push(out.commitment_loss as f64 * part.len() as f64 / batch as f64);
        comm.all_reduce_sum_f64(&mut reduced)?;
        let commitment = reduced.pop().expect("the loss term");
        let (sums, counts) = reduced.split_at(k * d);
        // Integer sums of integers below 2^53: exact in f64.
        let counts: Vec<u32> = counts.iter().map(|&c| c as u32).collect();
        let sums = CodeSums {
            sums: sums.iter().map(|&v| v as f32).collect(),
            counts: counts.clone(),
            mode: SumMode::Deterministic,
        };
        let (dead, replaced) = vq.end_shared_step(&counts, Some(&sums), batch, |positions| {
            let rows = Shard::new(xs, part.start, batch)?;
            kmeans::fetch_rows(comm, &rows, positions)
        })?;
        let usage = vqx::usage::UsageSummary::from_counts(&counts);
        if (step + 1) % 10 == 0 || step + 1 == steps {
            kmeans::check_same_codebook(
                comm,
                vq.codebook().as_ref(),
                "fit --mode ema",
                &format!("step {}", step + 1),
            )?;
        }
        if lead {
            bar.set_message(format!(
                "commit {commitment:.4}  perplexity {:.1}  used {}/{k}  dead {dead}",
                usage.perplexity, usage.used
            ));
            bar.inc(1);
            if let Some(w) = metrics.as_mut() {
                w.write(&serde_json::json!({
                    "step": vq.step(),
                    "commitment_loss": commitment,
                    "perplexity": usage.perplexity,
                    "used": usage.used,
                    "dead": dead,
                    "replaced": replaced,
                    "initialized": initialized,
                    "elapsed_s": start.elapsed().as_secs_f64(),
                }))?;
            }
        }
        last = Some((commitment, usage.perplexity, usage.used, dead));
    }
    bar.finish_and_clear();
    if !lead {
        return Ok(());
    }
    if let Some(w) = metrics.as_mut() {
        w.flush()?;
    }
    vq.to_checkpoint()?.save(&args.output)?;
    let (commit, perplexity, used, dead) = last.expect("at least one step");
    eprintln!(
        "fit {k} codes × {d} on {} rows in {ranks} shards: {steps} steps of {batch} on {} in \
         {:.2} s; last step: commitment {commit:.5}, perplexity {perplexity:.1}, used {used}/{k}, \
         dead {dead}; wrote {}",
        shard.total(),
        vq.backend().name(),
        start.elapsed().as_secs_f64(),
        args.output.display()
    );
    Ok(())
}

/// A fit job on one rank's shard: [`lloyd_job`] or [`ema_job`].
type Job = fn(&Args, &dyn Collective, Shard<'_>) -> Result<()>;

/// `job` on `--shards` in-process ranks (one rank: this thread).
fn run_sharded(args: &Args, x: MatRef<'_>, job: Job) -> Result<()> {
    let n = x.rows();
    if args.shards == 1 {
        let comm = vqx::collective::Single;
        return job(args, &comm, Shard::whole(x));
    }
    if args.shards > n {
        return Err(Error::InvalidArgument(format!(
            "--shards {} exceeds the input's {n} rows",
            args.shards
        )));
    }
    in_process::run(args.shards, |rank| {
        job(args, rank, Shard::split(x, args.shards, rank.rank()))
    })
    .map(drop)
}

/// One rank of `mpirun -np S vqx fit`: reads only its shard's rows of the input, fits with the
/// other ranks, and rank 0 writes. An error on any rank ends the whole job (MPI_Abort) naming
/// the rank and the cause, so no rank waits on it for ever.
#[cfg(feature = "mpi")]
fn run_mpi(args: &Args) -> Result<()> {
    let mpi = vqx::collective::mpi::Mpi::init()?;
    let (rank, size) = (mpi.rank(), mpi.size());
    let job = || -> Result<()> {
        if args.shards != 1 && args.shards != size {
            return Err(Error::InvalidArgument(format!(
                "--shards {} in a job of {size} MPI ranks: each rank holds one shard (leave \
                 --shards out, or give {size})",
                args.shards
            )));
        }
        // Each rank touches only its rows (mapped in place, or read alone).
        let input = vqx::npy::MappedMatrix::open(&args.input)?;
        let read;
        let (x, range, total) = match &input {
            Some(m) => {
                let all = m.as_ref();
                let range = Shard::range(all.rows(), size, rank);
                (all.slice_rows(range.start, range.end), range, all.rows())
            }
            None => {
                let total = vqx::npy::NpyMatrixReader::open(&args.input)?.rows();
                let range = Shard::range(total, size, rank);
                read = vqx::npy::read_rows(&args.input, range.clone())?.0;
                (read.as_ref(), range, total)
            }
        };
        let shard = Shard::new(x, range.start, total)?;
        match args.mode {
            Mode::Lloyd => lloyd_job(args, &mpi, shard),
            Mode::Ema => ema_job(args, &mpi, shard),
        }
    };
    let out = job();
    if let Err(e) = &out
        && size > 1
    {
        mpi.abort(&e.to_string());
    }
    out
}

/// The Lloyd passes of `vqx fit` on this rank's `shard`; rank 0 alone reports, logs and writes
/// the checkpoint.
fn lloyd_job(args: &Args, comm: &dyn Collective, shard: Shard<'_>) -> Result<()> {
    let d = shard.rows().cols();
    let run = &args.run;
    let lead = comm.rank() == 0;
    let resumed = if args.resume {
        Some(resume_point(args, comm, &shard)?)
    } else {
        None
    };
    let seeding = match args
        .init
        .clone()
        .unwrap_or(InitFrom::Builtin(InitChoice::KMeans))
    {
        _ if resumed.is_some() => Seeding::Given(resumed.as_ref().expect("resumed").0.clone()),
        InitFrom::Builtin(InitChoice::KMeans) => Seeding::Parallel {
            rounds: args.seed_rounds,
            oversampling: args.oversampling,
        },
        InitFrom::Builtin(InitChoice::Data) => Seeding::RandomRows,
        InitFrom::File(file) => Seeding::Given(super::load_codebook(&file)?),
    };
    let config = KMeansConfig {
        codes: args.codebook_size,
        metric: args.backend.metric(),
        max_passes: args.steps.map_or(args.max_passes, |s| s as usize),
        // A given pass count runs in full (a fixed point still ends it: nothing would change).
        tolerance: if args.steps.is_some() { 0.0 } else { args.tol },
        bounds: !args.no_bounds,
        group_codes: args.group_codes,
        seeding,
        seed: run.seed,
        sample_per_code: args.sample_per_code,
        resume: resumed.as_ref().map(|r| r.1),
    };
    // Validated before any work, as the EMA mode's quantizer does.
    quantizer_config(args, d).validate()?;
    let backend = vqx::backend::select(args.backend.device())?;
    let mut metrics = match (&args.metrics, lead) {
        (Some(path), true) => Some(MetricsLog::create(path)?),
        _ => None,
    };
    let k = args.codebook_size;
    let total = shard.total();
    let fit = kmeans::fit(&*backend, comm, shard, &config, |p, state| {
        if !lead {
            return Ok(());
        }
        if !p.sample && args.checkpoint_every > 0 && p.pass % args.checkpoint_every == 0 {
            let meta = fit_meta(args, comm, total, p.pass, p.error, None);
            save_fit(args, state.codebook, state.counts, p.pass, meta, d)?;
        }
        if !run.quiet {
            eprintln!(
                "{}pass {:>3}  error {:.6e}  used {}/{k}  reassigned {}  skipped {:.1}%{}  {:.2} s",
                if p.sample {
                    format!("sample of {} rows: ", p.rows)
                } else {
                    String::new()
                },
                p.pass,
                p.error,
                p.used,
                p.reassigned,
                100.0 * p.skipped,
                if p.reseeded > 0 {
                    format!("  re-seeded {}", p.reseeded)
                } else {
                    String::new()
                },
                p.elapsed_s
            );
        }
        if let Some(w) = metrics.as_mut() {
            w.write(&serde_json::to_value(p).map_err(|e| Error::internal("metrics", e))?)?;
        }
        Ok(())
    })?;
    if !lead {
        return Ok(());
    }
    if let Some(w) = metrics.as_mut() {
        w.flush()?;
    }
    let last = fit.passes.last().expect("at least one pass");
    let meta = fit_meta(args, comm, total, last.pass, last.error, Some(fit.stop));
    save_fit(args, fit.codebook.as_ref(), &fit.counts, last.pass, meta, d)?;
    let n = shard.total();
    let passes = fit.passes.len();
    let last = fit.passes.last().expect("at least one pass");
    let searched: f64 = fit.passes.iter().map(|p| p.distances as f64).sum();
    eprintln!(
        "fit {k} codes × {d} on {n} rows{}: {} seeding ({} candidates) in {:.2} s, {passes} \
         {}Lloyd passes ({}), {:.2} s in all; last pass: error {:.6e}, used {}/{k}, \
         skipped {:.1}% of distances ({:.1}% over all passes); wrote {}; ran on {}",
        if comm.size() > 1 {
            format!(" in {} shards", comm.size())
        } else {
            String::new()
        },
        fit.seeding.method,
        fit.seeding.candidates,
        fit.seeding.seconds,
        match fit.sample_passes.last() {
            Some(p) => format!(
                "{} passes over a sample of {} rows ({:.2} s), then ",
                fit.sample_passes.len(),
                p.rows,
                p.elapsed_s
            ),
            None => String::new(),
        },
        match fit.stop {
            kmeans::Stop::Converged => "converged: no row changed code",
            kmeans::Stop::Tolerance => "stopped: the error gain fell below --tol",
            kmeans::Stop::MaxPasses => "the pass limit",
        },
        last.elapsed_s,
        last.error,
        last.used,
        100.0 * last.skipped,
        100.0 * (1.0 - searched / (passes as f64 * n as f64 * k as f64)),
        args.output.display(),
        backend.describe()
    );
    Ok(())
}

/// What a checkpoint of a Lloyd fit says about the fit, under the `fit` key of its config:
/// enough for --resume to continue it and to refuse a different fit. The error is stored as
/// its f64 bits too, since the --tol stop compares the next error with it exactly.
fn fit_meta(
    args: &Args,
    comm: &dyn Collective,
    rows: usize,
    passes: usize,
    error: f64,
    stop: Option<kmeans::Stop>,
) -> serde_json::Value {
    serde_json::json!({
        "mode": "lloyd",
        "passes": passes,
        "error": error,
        "error_bits": format!("{:016x}", error.to_bits()),
        "finished": stop.is_some_and(|s| s != kmeans::Stop::MaxPasses),
        "stop": stop,
        "rows": rows,
        "metric": args.backend.metric().name(),
        "seed": args.run.seed,
        "tol": if args.steps.is_some() { 0.0 } else { args.tol },
        "ranks": comm.size(),
    })
}

/// The codebook and pass count of the checkpoint --resume continues, after checking that it
/// is an unfinished Lloyd fit of this input with these settings.
fn resume_point(
    args: &Args,
    comm: &dyn Collective,
    shard: &Shard<'_>,
) -> Result<(Matrix, kmeans::Resume)> {
    let path = &args.output;
    let ckpt = vqx::checkpoint::Checkpoint::load(path)?;
    let bad = |what: String| Error::InvalidArgument(format!("--resume {}: {what}", path.display()));
    let meta = ckpt
        .config
        .get("fit")
        .filter(|m| m.get("mode").and_then(|v| v.as_str()) == Some("lloyd"))
        .ok_or_else(|| bad("not a checkpoint of `vqx fit --mode lloyd`".into()))?;
    let field = |name: &str| {
        meta.get(name)
            .cloned()
            .ok_or_else(|| bad(format!("its fit record lacks `{name}`")))
    };
    if field("finished")?.as_bool() == Some(true) {
        return Err(bad(format!(
            "that fit finished ({}) after {} passes: nothing to resume",
            field("stop")?,
            field("passes")?
        )));
    }
    let d = shard.rows().cols();
    let (k, cd) = (ckpt.codebook.rows(), ckpt.codebook.cols());
    if (k, cd) != (args.codebook_size, d) {
        return Err(bad(format!(
            "its codebook is {k} × {cd}; this fit asks for {} × {d}",
            args.codebook_size
        )));
    }
    let tol = if args.steps.is_some() { 0.0 } else { args.tol };
    let wanted = [
        ("rows", serde_json::json!(shard.total()), "input rows"),
        (
            "metric",
            serde_json::json!(args.backend.metric().name()),
            "--metric",
        ),
        ("seed", serde_json::json!(args.run.seed), "--seed"),
        ("tol", serde_json::json!(tol), "--tol (0 with --steps)"),
    ];
    for (name, want, flag) in wanted {
        let have = field(name)?;
        if have != want {
            return Err(bad(format!(
                "it was fitted with {flag} {have}; this run has {want}: resume with the same"
            )));
        }
    }
    let passes = field("passes")?
        .as_u64()
        .ok_or_else(|| bad("`passes` is not a count".into()))? as usize;
    let error = field("error_bits")?
        .as_str()
        .and_then(|b| u64::from_str_radix(b, 16).ok())
        .map(f64::from_bits)
        .ok_or_else(|| bad("`error_bits` is not 16 hex digits".into()))?;
    let ranks = field("ranks")?.as_u64().unwrap_or(0) as usize;
    if ranks != comm.size() && comm.rank() == 0 && !args.run.quiet {
        eprintln!(
            "note: the fit ran on {ranks} ranks and resumes on {}: it continues, but the sums \
             are added in another order, so not with the uninterrupted fit's bits",
            comm.size()
        );
    }
    Ok((ckpt.codebook, kmeans::Resume { passes, error }))
}

/// A Lloyd fit's codebook as a vqx checkpoint, with `meta` under the config's `fit` key.
/// Its EMA state is what the pass's assignment implies
/// (counts N_k, sums N_k·c_k), so an EMA run resumed from it starts where k-means ended; a
/// code that had no rows (re-seeded on the last pass) starts at count 1, as a given codebook.
fn save_fit(
    args: &Args,
    codebook: MatRef<'_>,
    counts: &[u64],
    passes: usize,
    meta: serde_json::Value,
    d: usize,
) -> Result<()> {
    let sizes: Vec<f32> = counts
        .iter()
        .map(|&c| if c == 0 { 1.0 } else { c as f32 })
        .collect();
    let codebook = codebook.to_owned();
    let mut sums = codebook.clone();
    for (row, &c) in sums.data_mut().chunks_mut(d).zip(&sizes) {
        row.iter_mut().for_each(|v| *v *= c);
    }
    let ema = EmaState::from_parts(sizes, sums)?;
    let config = quantizer_config(args, d).init(vqx::quantizer::Init::Given);
    let vq = VectorQuantizer::from_state(
        config,
        codebook,
        Some(ema),
        passes as u64,
        Some(counts.to_vec()),
    )?;
    let mut ckpt = vq.to_checkpoint()?;
    match ckpt.config.as_object_mut() {
        Some(obj) => {
            obj.insert("fit".into(), meta);
        }
        None => ckpt.config = serde_json::json!({ "quantizer": ckpt.config, "fit": meta }),
    }
    ckpt.save(&args.output)
}
