//! `vqx fit`: learn a codebook for a fixed set of vectors with the EMA rule.

use super::args::{Backend, InitChoice, RunArgs, count};
use super::report::{MetricsLog, progress_bar};
use clap::ValueEnum;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use vqx::quantizer::{CodebookLearning, QuantizerConfig, VectorQuantizer};
use vqx::{MatRef, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Vectors to tokenize (.npy, N×D, f32 or f16).
    #[arg(long)]
    pub input: PathBuf,
    /// K, the number of codes.
    #[arg(long)]
    pub codebook_size: usize,
    /// Training steps (one batch each).
    #[arg(long, default_value_t = 1000, value_parser = count::<u64>)]
    pub steps: u64,
    /// Rows per batch (capped at N).
    #[arg(long, default_value_t = 1024, value_parser = count::<usize>)]
    pub batch_size: usize,
    /// EMA decay γ (vector-quantize-pytorch's default is 0.8; ours, the VQ-VAE paper's, 0.99).
    #[arg(long, default_value_t = 0.99)]
    pub decay: f32,
    /// EMA Laplace smoothing ε.
    #[arg(long, default_value_t = 1e-5)]
    pub eps: f32,
    /// β of the commitment loss (reported; nothing is trained through it here).
    #[arg(long, default_value_t = 0.25)]
    pub commitment_weight: f32,
    /// Re-seed codes whose EMA count falls below this; 0 = off.
    #[arg(long, default_value_t = 0.0)]
    pub dead_code_threshold: f32,
    /// Count a re-seeded code restarts with (default: the threshold, as vector-quantize-pytorch).
    #[arg(long)]
    pub reset_count: Option<f32>,
    /// data (random rows of the first batch), kmeans, or a codebook file (.npy, vqx checkpoint,
    /// vector-quantize-pytorch or ESM3 state dict).
    #[arg(long, default_value = "data", value_name = "data|kmeans|FILE", value_parser = init_from)]
    pub init: InitFrom,
    /// Lloyd iterations for --init kmeans.
    #[arg(long, default_value_t = 10, value_parser = count::<usize>)]
    pub kmeans_iters: usize,
    #[command(flatten)]
    pub backend: Backend,
    /// Take batches in file order instead of a seeded shuffle.
    #[arg(long)]
    pub no_shuffle: bool,
    #[command(flatten)]
    pub run: RunArgs,
    /// Per-step metrics as JSON lines.
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
    let x = vqx::npy::read_matrix(&args.input)?;
    x.as_ref()
        .check_nonempty(&format!("input {}", args.input.display()))?;
    let (n, d) = (x.rows(), x.cols());
    let run = &args.run;
    let mut config = QuantizerConfig::new(args.codebook_size, d)
        .metric(args.backend.metric())
        .commitment_weight(args.commitment_weight)
        .learning(CodebookLearning::Ema {
            decay: args.decay,
            eps: args.eps,
        })
        .dead_code_threshold(args.dead_code_threshold)
        .deterministic(run.deterministic)
        .seed(run.seed)
        .device(args.backend.device());
    if let Some(c) = args.reset_count {
        config = config.reset_count(c);
    }
    let mut vq = match &args.init {
        InitFrom::Builtin(init) => VectorQuantizer::new(config.init(init.init(args.kmeans_iters)))?,
        InitFrom::File(file) => {
            VectorQuantizer::with_codebook(config, super::load_codebook(file)?)?
        }
    };

    let batch = args.batch_size.min(n);
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(run.seed ^ 0x5eed_5eed);
    let mut cursor = n; // forces a (re)shuffle before the first batch
    let mut metrics = args
        .metrics
        .as_deref()
        .map(MetricsLog::create)
        .transpose()?;
    let bar = progress_bar(args.steps, run.quiet);
    let start = std::time::Instant::now();
    let mut buf = Vec::with_capacity(batch * d);
    let mut last = None;
    for _ in 0..args.steps {
        buf.clear();
        for _ in 0..batch {
            if cursor == n {
                if !args.no_shuffle {
                    order.shuffle(&mut rng);
                }
                cursor = 0;
            }
            buf.extend_from_slice(x.row(order[cursor]));
            cursor += 1;
        }
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
        args.steps,
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
