//! Command-line interface: one module per subcommand.

pub mod args;
pub mod bench;
pub mod encode;
pub mod fit;
pub mod info;
pub mod plot;
pub mod quantize;
pub mod report;
pub mod schedule;
pub mod stats;
pub mod train;

use clap::{Parser, Subcommand};
use std::path::Path;
use vqx::{Matrix, Result};

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
    /// Learn a codebook for a set of vectors with the EMA rule; writes a checkpoint.
    Fit(fit::Args),
    /// Noise schedules for masked-token training: r(t) or samples of r as CSV, and a plot.
    Schedule(schedule::Args),
    /// What a codebook file holds and how its codes are used: K, D, EMA counts, dead codes,
    /// perplexity; optionally an SVG plot.
    Stats(stats::Args),
    /// Train a VQ-VAE (MLP encoder → quantizer → MLP decoder) on a .npy file or a built-in
    /// synthetic data set; checkpoints, metrics, resume, Ctrl-C saves.
    ///
    /// On --device cuda and cuda-emu the whole step (encoder, quantizer, decoder, clipping,
    /// AdamW) runs on the device with the training set resident; per step only the batch's row
    /// ids go up and scalars come back.
    Train(train::Args),
    /// Tokens of vectors with a model trained by `vqx train`.
    #[command(
        mut_arg("input", |a| a.help("Vectors (.npy, N×D, f32 or f16), D the model's data width")),
        mut_arg("output", |a| a.help("Tokens to write (.npy, int64, N)")),
        mut_arg("chunk_rows", |a| a.help("Rows per chunk"))
    )]
    Encode(encode::Args),
    /// Vectors from tokens with a model trained by `vqx train`.
    #[command(
        mut_arg("input", |a| a.help("Tokens (.npy, 1-D integers in 0..K)")),
        mut_arg("output", |a| a.help("Vectors to write (.npy, f32, N×D)")),
        mut_arg("chunk_rows", |a| a.help("Tokens per chunk"))
    )]
    Decode(encode::Args),
    /// Loss and codebook-usage curves of a `vqx train` run as an SVG.
    Plot(plot::Args),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Fit(a) => fit::run(a),
        Command::Schedule(a) => schedule::run(a),
        Command::Stats(a) => stats::run(a),
        Command::Train(a) => train::run(a),
        Command::Encode(a) => encode::encode(a),
        Command::Decode(a) => encode::decode(a),
        Command::Plot(a) => plot::run(a),
    }
}

/// Reads a K×D codebook from any file [`vqx::checkpoint::load_codebook`] accepts (.npy, vqx
/// checkpoint, vector-quantize-pytorch or ESM3 state dict; SPEC §9). For a state dict or
/// checkpoint it says on stderr which format and keys were used (nothing for a plain .npy).
pub fn load_codebook(path: &Path) -> Result<Matrix> {
    let loaded = vqx::checkpoint::load_codebook(path)?;
    if loaded.format != vqx::checkpoint::CodebookFormat::Npy {
        eprintln!("codebook {}: {}", path.display(), loaded.describe());
        if loaded.initted == Some(false) {
            eprintln!(
                "warning: `{}_codebook.initted` is false: the k-means init never ran, so this \
                 codebook was never trained",
                loaded.prefix
            );
        }
        if loaded.format == vqx::checkpoint::CodebookFormat::VqPytorch && loaded.rows_unit_norm() {
            eprintln!(
                "note: every code row has norm 1, as vector-quantize-pytorch stores a \
                 use_cosine_sim codebook; quantize with --metric cosine if it was trained so"
            );
        }
    }
    Ok(loaded.codebook)
}

/// Whether an MPI launcher (mpirun/mpiexec of OpenMPI or MPICH, srun with PMI or PMIx) started
/// this process: then `vqx fit` or `vqx train` is one rank of a job.
#[cfg(feature = "mpi")]
fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// clap's own checks of the declarations: flattened groups, ids, `mut_arg` names.
    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
