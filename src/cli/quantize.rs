//! `vqx quantize`: nearest code for every row of an input .npy, streamed in chunks.

use super::args::{Scoring, count};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;
use vqx::backend::select_with_precision;
use vqx::npy::{NpyMatrixReader, NpyStreamWriter};
use vqx::usage::UsageSummary;
use vqx::{Error, Matrix, Result};

/// Default chunk: about this many bytes of f32 input rows.
const DEFAULT_CHUNK_BYTES: usize = 256 << 20;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Codebook, K×D: a .npy (float32 or float16), a vqx checkpoint, or a vector-quantize-pytorch
    /// or ESM3 state dict saved as safetensors (recognised by its keys).
    #[arg(long, short)]
    pub codebook: PathBuf,
    /// Input vectors, N×D (.npy, float32 or float16); read in chunks, so it may exceed memory.
    #[arg(long, short)]
    pub input: PathBuf,
    /// Where to write the N indices (.npy, int64).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Also write the N winning distances (.npy, float32).
    #[arg(long)]
    pub distances: Option<PathBuf>,
    /// Also write the quantized rows, the codebook rows of the indices (.npy, float32, N×D).
    #[arg(long)]
    pub quantized: Option<PathBuf>,
    #[command(flatten)]
    pub scoring: Scoring,
    /// Rows per chunk (default: about 256 MiB of f32 input).
    #[arg(long, value_parser = count::<usize>)]
    pub chunk_rows: Option<usize>,
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

fn check_outputs(args: &Args) -> Result<()> {
    let mut outs: Vec<(&str, &Path)> = vec![("--output", &args.output)];
    if let Some(p) = &args.distances {
        outs.push(("--distances", p));
    }
    if let Some(p) = &args.quantized {
        outs.push(("--quantized", p));
    }
    for (i, (na, a)) in outs.iter().enumerate() {
        for (nb, b) in &outs[i + 1..] {
            if same_file(a, b) {
                return Err(Error::InvalidArgument(format!(
                    "{na} and {nb} name the same file {}",
                    a.display()
                )));
            }
        }
        for (ni, input) in [("--input", &args.input), ("--codebook", &args.codebook)] {
            if same_file(a, input) {
                return Err(Error::InvalidArgument(format!(
                    "{na} would overwrite the {ni} file {}",
                    a.display()
                )));
            }
        }
    }
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let start = Instant::now();
    check_outputs(&args)?;
    let codebook = super::load_codebook(&args.codebook)?;
    let (k, d) = (codebook.rows(), codebook.cols());
    let reader = NpyMatrixReader::open(&args.input)?;
    let (n, input_d) = (reader.rows(), reader.cols());
    if n == 0 || input_d == 0 {
        return Err(Error::Empty {
            what: format!("input {}", args.input.display()),
            detail: format!("shape {n} × {input_d}"),
        });
    }
    if input_d != d {
        return Err(Error::shape(
            "input vs codebook",
            format!(
                "input rows of width {d}, the width of codebook {} ({k} × {d})",
                args.codebook.display()
            ),
            format!("input {} of shape {n} × {input_d}", args.input.display()),
        ));
    }
    let backend = select_with_precision(args.scoring.device(), args.scoring.precision())?;
    let chunk_rows = args
        .chunk_rows
        .unwrap_or_else(|| (DEFAULT_CHUNK_BYTES / (4 * d)).max(1))
        .min(n);

    let mut out_idx = NpyStreamWriter::indices(&args.output, n)?;
    let mut out_dist = match &args.distances {
        Some(p) => Some(NpyStreamWriter::vector(p, n)?),
        None => None,
    };
    let mut out_q = match &args.quantized {
        Some(p) => Some(NpyStreamWriter::matrix(p, n, d)?),
        None => None,
    };

    let metric = args.scoring.metric();
    let input_name = format!("input {}", args.input.display());
    let mut counts = vec![0u32; k];
    let mut rechecked = 0usize;
    // Read the next chunk on a second thread while this one computes and writes.
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = mpsc::sync_channel::<Result<(usize, Matrix)>>(1);
        let mut reader = reader;
        scope.spawn(move || {
            loop {
                let offset = reader.position();
                let chunk = match reader.next_chunk(chunk_rows) {
                    Ok(Some(m)) => Ok((offset, m)),
                    Ok(None) => break,
                    Err(e) => Err(e),
                };
                let failed = chunk.is_err();
                if tx.send(chunk).is_err() || failed {
                    break;
                }
            }
        });
        for chunk in rx {
            let (offset, x) = chunk?;
            x.as_ref().check_finite_from(&input_name, offset)?;
            let a = backend.nearest(x.as_ref(), codebook.as_ref(), metric)?;
            rechecked += a.rechecked;
            for &i in &a.indices {
                counts[i as usize] = counts[i as usize].saturating_add(1);
            }
            out_idx.append_u32(&a.indices)?;
            if let Some(w) = out_dist.as_mut() {
                w.append(&a.distances)?;
            }
            if let Some(w) = out_q.as_mut() {
                let q = backend.gather(codebook.as_ref(), &a.indices)?;
                w.append_rows(q.as_ref())?;
            }
        }
        Ok(())
    })?;
    // Every output is complete before any is published.
    out_idx.finish()?;
    if let Some(w) = out_dist {
        w.finish()?;
    }
    if let Some(w) = out_q {
        w.finish()?;
    }

    let secs = start.elapsed().as_secs_f64();
    let usage = UsageSummary::from_counts(&counts);
    eprintln!(
        "quantized {n} rows × {d} against {k} codes ({}) on {} in {secs:.3} s ({:.0} rows/s, \
         chunks of {chunk_rows}); {rechecked} rows rechecked in f64; codes used {}/{k}, \
         perplexity {:.1}",
        metric,
        backend.name(),
        n as f64 / secs,
        usage.used,
        usage.perplexity
    );
    Ok(())
}
