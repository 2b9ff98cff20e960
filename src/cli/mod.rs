//! Command-line interface: one module per subcommand.

pub mod bench;
pub mod info;
pub mod quantize;

use clap::{Parser, Subcommand};
use std::path::Path;
use vqx::{Error, Matrix, Result};

/// Vector quantization engine: fused nearest-code search, gather, EMA statistics and usage
/// counting on CPU and CUDA.
#[derive(Debug, Parser)]
#[command(name = "vqx", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Version, available backends (and why not), GPU, compiled kernels, CPU threads.
    Info(info::Args),
    /// Nearest code for every row of an input .npy, streamed in chunks.
    Quantize(quantize::Args),
    /// Time the four primitives and compare them with the machine's physical floors.
    Bench(bench::Args),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Bench(a) => bench::run(a),
    }
}

/// Reads a K×D codebook. Only .npy so far; vqx checkpoints and safetensors state dicts
/// (SPEC §9) are to come here.
pub fn load_codebook(path: &Path) -> Result<Matrix> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("npy") => {}
        other => {
            return Err(Error::Npy {
                path: path.to_path_buf(),
                msg: format!(
                    "only .npy codebooks are supported so far ({}); safetensors state dicts \
                     and vqx checkpoints are not yet",
                    match other {
                        Some(e) => format!("this file ends in .{e}"),
                        None => "this file has no extension".into(),
                    }
                ),
            });
        }
    }
    let codebook = vqx::npy::read_matrix(path)?;
    let what = format!("codebook {}", path.display());
    codebook.as_ref().check_nonempty(&what)?;
    codebook.as_ref().check_finite(&what)?;
    Ok(codebook)
}
