//! `vqx bench`: time the primitives against the machine's floors.

use std::path::PathBuf;
use vqx::backend::{Backend, CpuBackend, Device, select_with_precision};
use vqx::bench::{BenchConfig, BenchShape};
use vqx::nearest::Precision;
use vqx::nearest::cpu::CpuKernel;
use vqx::{Error, Metric, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rows N (with --dim and --codebook-size; default: the shapes of SPEC §7, N scaled down on
    /// the CPU).
    #[arg(long, requires_all = ["dim", "codebook_size"])]
    pub n: Option<usize>,
    /// Vector width D.
    #[arg(long, requires_all = ["n", "codebook_size"])]
    pub dim: Option<usize>,
    /// Codebook size K.
    #[arg(long, requires_all = ["n", "dim"])]
    pub codebook_size: Option<usize>,
    /// Time on this input (.npy, N×D) instead of random data; needs --codebook.
    #[arg(long, requires = "codebook", conflicts_with_all = ["n", "dim", "codebook_size"])]
    pub input: Option<PathBuf>,
    /// Codebook (K×D: .npy, vqx checkpoint or safetensors state dict) to time with --input.
    #[arg(long, requires = "input")]
    pub codebook: Option<PathBuf>,
    /// CPU nearest kernel: auto (AVX-512 where the CPU has it), avx512 or portable.
    #[arg(long, default_value = "auto")]
    pub cpu_kernel: CpuKernel,
    /// Distance: l2 or cosine.
    #[arg(long, default_value = "l2")]
    pub metric: Metric,
    /// Backend: auto, cpu, cuda or cuda-emu (the emulated device: slow, for checking).
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Arithmetic of the nearest-code scores: exact (f32), tf32 or bf16 (tensor cores, CUDA
    /// only; refused on the CPU). Every precision returns the exact indices: rows whose margin
    /// is inside the precision's rounding bound are recomputed exactly. Default exact, until a
    /// GPU run shows a re-checked tensor-core path is faster (docs/gpu.md).
    #[arg(long, default_value = "exact")]
    pub precision: Precision,
    /// Timed runs per primitive (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
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
    let mut cfg = BenchConfig {
        metric: args.metric,
        reps: args.reps.max(1),
        seed: args.seed,
        ..BenchConfig::default()
    };
    if let (Some(n), Some(dim), Some(codes)) = (args.n, args.dim, args.codebook_size) {
        if n == 0 || dim == 0 || codes == 0 {
            return Err(Error::InvalidArgument(format!(
                "--n, --dim and --codebook-size must be positive (got {n}, {dim}, {codes})"
            )));
        }
        cfg.shapes = vec![BenchShape { n, dim, codes }];
        cfg.scale_for_cpu = false;
    }
    if let (Some(input), Some(codebook)) = (&args.input, &args.codebook) {
        let codebook = super::load_codebook(codebook)?;
        let x = vqx::npy::read_matrix(input)?;
        if x.cols() != codebook.cols() {
            return Err(Error::Shape {
                what: format!("{} vs codebook width", input.display()),
                expected: format!("{} columns", codebook.cols()),
                got: format!("{} columns", x.cols()),
            });
        }
        cfg.data = Some((x, codebook));
    }
    let backend: Box<dyn Backend> = match (args.device, args.cpu_kernel) {
        (_, CpuKernel::Auto) => select_with_precision(args.device, args.precision)?,
        (Device::Cpu, _) if args.precision != Precision::Exact => {
            return Err(Error::InvalidArgument(format!(
                "--precision {} needs the CUDA backend (tensor cores); --device cpu was asked \
                 for. Use --precision exact on the CPU.",
                args.precision
            )));
        }
        (Device::Cpu, kernel) => Box::new(CpuBackend::with_kernel(kernel)),
        (device, kernel) => {
            return Err(Error::InvalidArgument(format!(
                "--cpu-kernel {kernel} needs --device cpu (got --device {device})"
            )));
        }
    };
    let report = vqx::bench::run(backend.as_ref(), &cfg)?;
    let text = if args.json {
        let mut t = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::internal("encoding the report as JSON", e))?;
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
