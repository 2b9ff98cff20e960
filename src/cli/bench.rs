//! `vqx bench`: time the primitives against the machine's floors.

use super::args::{CpuKernelChoice, Scoring, choice, count};
use std::path::PathBuf;
use vqx::backend::{Backend, CpuBackend, Device, select_with_precision};
use vqx::bench::{BenchConfig, BenchShape};
use vqx::nearest::cpu::CpuKernel;
use vqx::{Error, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rows N (with --dim and --codebook-size; default: the shapes of SPEC §7, N scaled down on
    /// the CPU).
    #[arg(long, requires_all = ["dim", "codebook_size"], value_parser = count::<usize>)]
    pub n: Option<usize>,
    /// Vector width D.
    #[arg(long, requires_all = ["n", "codebook_size"], value_parser = count::<usize>)]
    pub dim: Option<usize>,
    /// Codebook size K.
    #[arg(long, requires_all = ["n", "dim"], value_parser = count::<usize>)]
    pub codebook_size: Option<usize>,
    /// Time on this input (.npy, N×D) instead of random data; needs --codebook.
    #[arg(long, requires = "codebook", conflicts_with_all = ["n", "dim", "codebook_size"])]
    pub input: Option<PathBuf>,
    /// Codebook (K×D: .npy, vqx checkpoint or safetensors state dict) to time with --input.
    #[arg(long, requires = "input")]
    pub codebook: Option<PathBuf>,
    /// CPU nearest kernel (with --device cpu).
    #[arg(long, default_value = "auto", value_parser = choice::<CpuKernelChoice>())]
    pub cpu_kernel: CpuKernelChoice,
    #[command(flatten)]
    pub scoring: Scoring,
    /// Timed runs per primitive (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5, value_parser = count::<usize>)]
    pub reps: usize,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = BenchConfig::default().seed)]
    pub seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write the report to this file instead of stdout.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let (device, precision) = (args.scoring.device(), args.scoring.precision());
    let mut cfg = BenchConfig {
        metric: args.scoring.metric(),
        reps: args.reps,
        seed: args.seed,
        ..BenchConfig::default()
    };
    if let (Some(n), Some(dim), Some(codes)) = (args.n, args.dim, args.codebook_size) {
        cfg.shapes = vec![BenchShape { n, dim, codes }];
        cfg.scale_for_cpu = false;
    }
    if let (Some(input), Some(codebook)) = (&args.input, &args.codebook) {
        let codebook = super::load_codebook(codebook)?;
        let x = vqx::npy::read_matrix(input)?;
        if x.cols() != codebook.cols() {
            return Err(Error::shape(
                format!("{} vs codebook width", input.display()),
                format!("{} columns", codebook.cols()),
                format!("{} columns", x.cols()),
            ));
        }
        cfg.data = Some((x, codebook));
    }
    let backend: Box<dyn Backend> = match (device, CpuKernel::from(args.cpu_kernel)) {
        (_, CpuKernel::Auto) => select_with_precision(device, precision)?,
        (Device::Cpu, kernel) => {
            // Refuses tf32 and bf16 on the CPU, with the library's advice.
            select_with_precision(Device::Cpu, precision)?;
            Box::new(CpuBackend::with_kernel(kernel))
        }
        (device, kernel) => {
            return Err(Error::InvalidArgument(format!(
                "--cpu-kernel {kernel} needs --device cpu (got --device {device})"
            )));
        }
    };
    let report = vqx::bench::run(backend.as_ref(), &cfg)?;
    let text = if args.json {
        let mut t = super::report::json(&report, "the report")?;
        t.push('\n');
        t
    } else {
        report.render_text()
    };
    match &args.output {
        Some(path) => vqx::atomic::write_atomic(path, text.as_bytes()),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}
