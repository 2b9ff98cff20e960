//! EMA scatter-add: per-code sums of the assigned rows and per-code counts, the statistics the
//! EMA codebook update consumes (SPEC §4).

mod update;
pub use update::EmaState;

use crate::error::{Error, Result};
use crate::matrix::MatRef;
use rayon::prelude::*;

/// How the per-code sums are accumulated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub enum SumMode {
    /// Whatever order is fastest (float atomics on CUDA): the last bits may differ run to run.
    #[default]
    Fast,
    /// Rows of each code summed in increasing row order: bit-identical run to run.
    Deterministic,
}

crate::nearest::names!(SumMode, "sum mode": Fast => ["fast"], Deterministic => ["deterministic"]);

/// Per-code statistics of one batch: s_k = Σ_{i(n)=k} x_n and n_k = #{n : i(n) = k}.
///
/// ```
/// use vqx::{backend::{Backend, CpuBackend}, ema::SumMode, MatRef};
/// let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
/// let s = CpuBackend::new().code_sums(MatRef::new(&x, 3, 2)?, &[1, 0, 1], 2, SumMode::Fast)?;
/// assert_eq!(s.counts, vec![1, 2]);
/// assert_eq!(s.sums, vec![3.0, 4.0, 6.0, 8.0]);
/// # Ok::<(), vqx::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct CodeSums {
    /// K × D row-major sums.
    pub sums: Vec<f32>,
    /// K counts.
    pub counts: Vec<u32>,
    /// The mode the sums were computed in.
    pub mode: SumMode,
}

/// Checks a scatter-add's inputs: one index per row, indices in range, finite rows.
pub fn validate(x: MatRef<'_>, indices: &[u32], codes: usize) -> Result<()> {
    x.check_nonempty("input")?;
    if indices.len() != x.rows() {
        return Err(Error::shape(
            "indices vs input rows",
            format!("{} indices (one per input row)", x.rows()),
            format!("{} indices", indices.len()),
        ));
    }
    crate::usage::validate(indices, codes)?;
    x.check_finite("input")
}

/// Row ids grouped by code, each group in increasing row order (a stable counting sort):
/// returns (offsets of length K + 1, row ids).
pub fn group_by_code(indices: &[u32], codes: usize) -> (Vec<usize>, Vec<u32>) {
    let counts = crate::usage::cpu(indices, codes);
    let mut offsets = Vec::with_capacity(codes + 1);
    let mut acc = 0usize;
    offsets.push(0);
    for &c in &counts {
        acc += c as usize;
        offsets.push(acc);
    }
    let mut next = offsets[..codes].to_vec();
    let mut rows = vec![0u32; indices.len()];
    for (n, &k) in indices.iter().enumerate() {
        rows[next[k as usize]] = n as u32;
        next[k as usize] += 1;
    }
    (offsets, rows)
}

/// CPU twin of the scatter-add kernels. Always deterministic, whatever the thread count: each
/// code's rows are summed in increasing row order in f64 and rounded once, so `mode` only
/// labels the result.
///
/// Each code's rows are added in increasing row order in f64 and rounded once ([`sums_f64`]).
pub fn cpu(x: MatRef<'_>, indices: &[u32], codes: usize, mode: SumMode) -> CodeSums {
    let (sums, counts) = sums_f64(x, indices, codes);
    let sums = sums.into_par_iter().map(|a| a as f32).collect();
    CodeSums { sums, counts, mode }
}

/// [`cpu`]'s sums before their rounding to f32: each code's rows added in increasing row
/// order in f64 (K·D sums, K counts). k-means adds these per shard, then over shards.
///
/// Any split of the work that keeps each sum's row order gives the same bits. Wide rows are
/// split into column stripes, one rayon task each, every task walking all rows in order: x
/// is read once, front to back (the hardware prefetchers' pattern), and each task's sums are
/// K × stripe. Narrow rows are split by code ranges instead, every task scanning all indices
/// and adding only its own codes' rows.
pub fn sums_f64(x: MatRef<'_>, indices: &[u32], codes: usize) -> (Vec<f64>, Vec<u32>) {
    let d = x.cols();
    let threads = rayon::current_num_threads();
    let mut counts = vec![0u32; codes];
    for &k in indices {
        counts[k as usize] += 1;
    }
    // Stripes of at least 32 columns (a 128-byte run of each row per task).
    let stripes = (threads * 2).min(d / 32);
    if stripes >= 2 {
        let width = d.div_ceil(stripes);
        let parts: Vec<(usize, Vec<f64>)> = (0..d.div_ceil(width))
            .into_par_iter()
            .map(|p| {
                let (c0, c1) = (p * width, ((p + 1) * width).min(d));
                let w = c1 - c0;
                let mut acc = vec![0f64; codes * w];
                add_stripe_f64(&mut acc, x, indices, c0, c1);
                (c0, acc)
            })
            .collect();
        let mut sums = vec![0f64; codes * d];
        for (c0, acc) in parts {
            let w = acc.len() / codes.max(1);
            for (k, part) in acc.chunks_exact(w.max(1)).enumerate() {
                sums[k * d + c0..k * d + c0 + w].copy_from_slice(part);
            }
        }
        return (sums, counts);
    }
    // Several ranges per thread keep the tasks balanced when usage is skewed.
    let parts = (threads * 4).clamp(1, codes.max(1));
    let per = codes.div_ceil(parts).max(1);
    let mut sums = vec![0f64; codes * d];
    sums.par_chunks_mut(per * d)
        .enumerate()
        .for_each(|(p, acc)| {
            let k0 = p * per;
            let len = acc.len() / d.max(1);
            add_codes_f64(acc, x, indices, k0, len);
        });
    (sums, counts)
}

crate::model::simd::multiversion! {
    /// For each row n in order, columns c0..c1 of row n added to its code's stripe of `acc`
    /// (K × (c1 − c0)) in f64: one IEEE add per element, so the same bits at every width.
    /// Dispatched once per stripe, not once per row.
    fn add_stripe_f64(acc: &mut [f64], x: MatRef<'_>, indices: &[u32], c0: usize, c1: usize) {
        let w = c1 - c0;
        for (n, &k) in indices.iter().enumerate() {
            let k = k as usize;
            add_row(&mut acc[k * w..(k + 1) * w], &x.row(n)[c0..c1]);
        }
    }
}

crate::model::simd::multiversion! {
    /// For each row n in order whose code is one of k0..k0 + len, the row added to that code's
    /// sums in `acc` (len × D) in f64, as [`add_stripe_f64`].
    fn add_codes_f64(acc: &mut [f64], x: MatRef<'_>, indices: &[u32], k0: usize, len: usize) {
        let d = x.cols();
        for (n, &k) in indices.iter().enumerate() {
            let local = (k as usize).wrapping_sub(k0);
            if local < len {
                add_row(&mut acc[local * d..(local + 1) * d], x.row(n));
            }
        }
    }
}

/// acc_i += row_i in f64.
#[inline(always)]
fn add_row(acc: &mut [f64], row: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(row) {
        *a += v as f64;
    }
}
