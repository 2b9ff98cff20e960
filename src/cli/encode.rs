//! `vqx encode` (vectors → tokens) and `vqx decode` (tokens → vectors) with a model trained by
//! `vqx train`.

use super::args::{OnDevice, count};
use std::path::PathBuf;
use vqx::model::VqVae;
use vqx::npy::{NpyMatrixReader, NpyStreamWriter};
use vqx::{Error, Result};

/// What `vqx encode` and `vqx decode` take (each command says what its input, output and
/// chunks are).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run directory `vqx train` wrote (or its checkpoint.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Vectors (encode) or tokens (decode).
    #[arg(long)]
    pub input: PathBuf,
    /// Tokens (encode) or vectors (decode) to write.
    #[arg(long, short)]
    pub output: PathBuf,
    #[command(flatten)]
    pub on: OnDevice,
    /// Rows (encode) or tokens (decode) per chunk.
    #[arg(long, default_value_t = 65536, value_parser = count::<usize>)]
    pub chunk_rows: usize,
}

impl Args {
    /// The model of the run directory or checkpoint file.
    fn load(&self) -> Result<VqVae> {
        let m = &self.model;
        let is_file = m.is_file() || m.extension().is_some_and(|e| e == "safetensors");
        let path = if is_file {
            m.clone()
        } else {
            m.join(vqx::train::CHECKPOINT_FILE)
        };
        Ok(vqx::train::load_model(&path, self.on.device())?.0)
    }
}

pub fn encode(args: Args) -> Result<()> {
    let model = args.load()?;
    let mut reader = NpyMatrixReader::open(&args.input)?;
    if reader.cols() != model.config().data_dim {
        return Err(Error::shape(
            format!("{} vs the model's data dimension", args.input.display()),
            format!("{} columns", model.config().data_dim),
            format!("{} columns", reader.cols()),
        ));
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

pub fn decode(args: Args) -> Result<()> {
    let model = args.load()?;
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
