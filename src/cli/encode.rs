//! `vqx encode` (vectors → tokens) and `vqx decode` (tokens → vectors) with a model trained by
//! `vqx train`.

use std::path::{Path, PathBuf};
use vqx::backend::Device;
use vqx::model::VqVae;
use vqx::npy::{NpyMatrixReader, NpyStreamWriter};
use vqx::{Error, Result};

#[derive(Debug, clap::Args)]
pub struct EncodeArgs {
    /// The run directory `vqx train` wrote (or its checkpoint.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Vectors (.npy, N×D, f32 or f16), D the model's data dimension.
    #[arg(long)]
    pub input: PathBuf,
    /// Tokens to write (.npy, int64, N).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Quantizer backend: auto, cpu, cuda or cuda-emu (the emulated device: slow, for checking).
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Rows per chunk.
    #[arg(long, default_value_t = 65536)]
    pub chunk_rows: usize,
}

#[derive(Debug, clap::Args)]
pub struct DecodeArgs {
    /// The run directory `vqx train` wrote (or its checkpoint.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Tokens (.npy, 1-D integers in 0..K).
    #[arg(long)]
    pub input: PathBuf,
    /// Vectors to write (.npy, f32, N×D).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Quantizer backend: auto, cpu, cuda or cuda-emu (the emulated device: slow, for checking).
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 65536)]
    pub chunk_rows: usize,
}

/// The model of a run directory or checkpoint file.
fn load(model: &Path, device: Device) -> Result<VqVae> {
    let is_file = model.is_file() || model.extension().is_some_and(|e| e == "safetensors");
    let path = if !is_file {
        model.join(vqx::train::CHECKPOINT_FILE)
    } else {
        model.to_path_buf()
    };
    Ok(vqx::train::load_model(&path, device)?.0)
}

fn check_chunk(rows: usize) -> Result<()> {
    if rows == 0 {
        return Err(Error::InvalidArgument(
            "--chunk-rows must be at least 1".into(),
        ));
    }
    Ok(())
}

pub fn encode(args: EncodeArgs) -> Result<()> {
    check_chunk(args.chunk_rows)?;
    let model = load(&args.model, args.device)?;
    let mut reader = NpyMatrixReader::open(&args.input)?;
    if reader.cols() != model.config().data_dim {
        return Err(Error::Shape {
            what: format!("{} vs the model's data dimension", args.input.display()),
            expected: format!("{} columns", model.config().data_dim),
            got: format!("{} columns", reader.cols()),
        });
    }
    let n = reader.rows();
    if n == 0 {
        return Err(Error::Empty {
            what: format!("input {}", args.input.display()),
            detail: "no rows to encode".into(),
        });
    }
    let mut w = NpyStreamWriter::indices(&args.output, n)?;
    let mut counts = vec![0u64; model.quantizer.config().codebook_size];
    while let Some(chunk) = reader.next_chunk(args.chunk_rows)? {
        let tokens = model.encode(chunk.as_ref())?;
        for &t in &tokens {
            counts[t as usize] += 1;
        }
        w.append_u32(&tokens)?;
    }
    w.finish()?;
    let p = vqx::usage::perplexity(&counts.iter().map(|&c| c as f64).collect::<Vec<_>>());
    eprintln!(
        "encoded {n} rows to {}: {} of {} codes used, perplexity {p:.1}",
        args.output.display(),
        counts.iter().filter(|&&c| c > 0).count(),
        counts.len()
    );
    Ok(())
}

pub fn decode(args: DecodeArgs) -> Result<()> {
    check_chunk(args.chunk_rows)?;
    let model = load(&args.model, args.device)?;
    let k = model.quantizer.config().codebook_size;
    let tokens = vqx::npy::read_indices(&args.input)?;
    if tokens.is_empty() {
        return Err(Error::Empty {
            what: format!("tokens {}", args.input.display()),
            detail: "no tokens to decode".into(),
        });
    }
    if let Some((i, &t)) = tokens
        .iter()
        .enumerate()
        .find(|&(_, &t)| t < 0 || t as u64 >= k as u64)
    {
        return Err(Error::IndexOutOfRange {
            position: i,
            index: t as u64,
            codes: k,
        });
    }
    let d = model.config().data_dim;
    let mut w = NpyStreamWriter::matrix(&args.output, tokens.len(), d)?;
    for chunk in tokens.chunks(args.chunk_rows) {
        let ids: Vec<u32> = chunk.iter().map(|&t| t as u32).collect();
        w.append_rows(model.decode(&ids)?.as_ref())?;
    }
    w.finish()?;
    eprintln!(
        "decoded {} tokens to {} ({} × {d})",
        tokens.len(),
        args.output.display(),
        tokens.len()
    );
    Ok(())
}
