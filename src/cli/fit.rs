//! `vqx fit`: learn a codebook for a fixed set of vectors with the EMA rule.

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::io::Write;
use std::path::PathBuf;
use vqx::backend::Device;
use vqx::quantizer::{CodebookLearning, Init, QuantizerConfig, VectorQuantizer};
use vqx::{Error, MatRef, Metric, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Vectors to tokenize (.npy, N×D, f32 or f16).
    #[arg(long)]
    pub input: PathBuf,
    /// K, the number of codes.
    #[arg(long)]
    pub codebook_size: usize,
    /// Training steps (one batch each).
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    /// Rows per batch (capped at N).
    #[arg(long, default_value_t = 1024)]
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
    #[arg(long, default_value = "data")]
    pub init: String,
    /// Lloyd iterations for --init kmeans.
    #[arg(long, default_value_t = 10)]
    pub kmeans_iters: usize,
    /// Distance: l2 or cosine.
    #[arg(long, default_value = "l2")]
    pub metric: Metric,
    /// Take batches in file order instead of a seeded shuffle.
    #[arg(long)]
    pub no_shuffle: bool,
    /// Seed of the shuffle, init sampling and dead-code sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Backend: auto, cpu, cuda or cuda-emu (the emulated device: slow, for checking).
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Sum EMA statistics in a fixed order on CUDA too (the CPU always does).
    #[arg(long)]
    pub deterministic: bool,
    /// Per-step metrics as JSON lines.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    /// Checkpoint to write (.safetensors), atomically.
    #[arg(long, short)]
    pub output: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let x = vqx::npy::read_matrix(&args.input)?;
    x.as_ref()
        .check_nonempty(&format!("input {}", args.input.display()))?;
    let (n, d) = (x.rows(), x.cols());
    if args.batch_size == 0 {
        return Err(Error::InvalidArgument(
            "--batch-size must be at least 1".into(),
        ));
    }
    if args.steps == 0 {
        return Err(Error::InvalidArgument("--steps must be at least 1".into()));
    }
    let mut config = QuantizerConfig::new(args.codebook_size, d)
        .metric(args.metric)
        .commitment_weight(args.commitment_weight)
        .learning(CodebookLearning::Ema {
            decay: args.decay,
            eps: args.eps,
        })
        .dead_code_threshold(args.dead_code_threshold)
        .deterministic(args.deterministic)
        .seed(args.seed)
        .device(args.device);
    if let Some(c) = args.reset_count {
        config = config.reset_count(c);
    }
    let mut vq = match args.init.as_str() {
        "data" => VectorQuantizer::new(config.init(Init::Data))?,
        "kmeans" => VectorQuantizer::new(config.init(Init::KMeans {
            iters: args.kmeans_iters,
        }))?,
        file => {
            let codebook = super::load_codebook(std::path::Path::new(file))?;
            VectorQuantizer::with_codebook(config, codebook)?
        }
    };

    let batch = args.batch_size.min(n);
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed_5eed);
    let mut cursor = n; // forces a (re)shuffle before the first batch
    let mut metrics = match &args.metrics {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p).map_err(
            |e| Error::Io {
                path: p.clone(),
                source: e,
            },
        )?)),
        None => None,
    };
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.steps)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
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
            writeln!(w, "{line}").map_err(|e| Error::Io {
                path: args.metrics.clone().unwrap_or_default(),
                source: e,
            })?;
        }
        last = Some((out.commitment_loss, out.stats));
    }
    bar.finish_and_clear();
    if let Some(mut w) = metrics {
        w.flush().map_err(|e| Error::Io {
            path: args.metrics.clone().unwrap_or_default(),
            source: e,
        })?;
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
