//! k-means on a fixed set of rows: `vqx fit`'s full-pass mode.
//!
//! Lloyd's algorithm: every pass assigns each row to its exact nearest code (the backend's
//! `nearest`, exact on every row that is not a true tie) and moves each code to the mean of its
//! rows; a code left with no rows is re-seeded with a random row. Under cosine the rows are
//! normalised once and each code is the normalised mean of its rows (spherical k-means).
//!
//! **Bounds** ([`KMeansConfig::bounds`], Hamerly 2010, "Making k-means even faster"): each row
//! keeps a lower bound on its distance to every code other than its own. After a pass moves the
//! codes by δ_j, the bound drops by the largest δ of the other codes (triangle inequality); a
//! row whose exact distance to its own, moved code is still below its bound cannot change code,
//! and is not searched. The bounds are kept with a margin for their own f64 rounding, so a row
//! is skipped only when plain Lloyd would give it the same code: both give the same indices on
//! every pass and, since the means are then computed from the same rows in the same order, the
//! same codebook bit for bit (`tests/kmeans.rs`).
//!
//! **Seeding**: k-means|| by default ([`Seeding`]).
//!
//! **Ranks.** [`fit`] runs on one shard of the rows per rank of a [`Collective`]: per-code sums
//! are added per shard in f64 in row order, then over shards in rank order, so a job of S ranks
//! gives the same bits as one process running S in-process ranks (`vqx fit --shards S`).
//!
//! ```
//! use vqx::backend::CpuBackend;
//! use vqx::collective::Single;
//! use vqx::kmeans::{self, KMeansConfig, Shard};
//! use vqx::MatRef;
//! // Two tight groups in 1-D: the codes land on their means.
//! let x = [0.0f32, 0.2, 0.1, 10.0, 10.2, 10.1];
//! let cfg = KMeansConfig::new(2);
//! let fit = kmeans::fit(&CpuBackend::new(), &Single, Shard::whole(MatRef::new(&x, 6, 1)?), &cfg, |_, _| Ok(()))?;
//! let mut codes = fit.codebook.data().to_vec();
//! codes.sort_by(f32::total_cmp);
//! assert!((codes[0] - 0.1).abs() < 1e-6 && (codes[1] - 10.1).abs() < 1e-6);
//! # Ok::<(), vqx::Error>(())
//! ```

mod bounds;
mod pairs;
mod seed;
mod shard;
mod sums;

pub use seed::{SeedReport, Seeding, seed};
pub use shard::{Shard, fetch_rows, gather_rows};

use crate::backend::Backend;
use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};
use crate::nearest::{CheckedRows, Metric, normalize_rows};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::time::Instant;

/// What [`fit`] runs.
#[derive(Clone, Debug)]
pub struct KMeansConfig {
    /// K, the number of codes.
    pub codes: usize,
    /// L2, or cosine (spherical k-means on the normalised rows).
    pub metric: Metric,
    /// Most passes.
    pub max_passes: usize,
    /// Stop once a pass lowers the error by less than this fraction of it (0: only at a fixed
    /// point, where no row changes code).
    pub tolerance: f64,
    /// Skip the searches the bounds prove useless (same result as without).
    pub bounds: bool,
    /// Codes per bound group (the bounds keep one lower bound per group and row). Smaller
    /// groups skip more distances but cost more per distance searched (one call per group, each
    /// row read and its lanes reduced per group). On real 256-D embeddings (docs/fit.md) 512 was
    /// the fastest of 128, 256, 512 and 1,024 with the bf16 screen (all 117,659 rows, K =
    /// 1,024: 4.83–5.02 s against 5.58–5.94 s at 256; 20,000 rows, K = 4,096: 0.92–0.95 s
    /// against 1.01–1.05 s), and as fast as 256 in f32.
    pub group_codes: usize,
    pub seeding: Seeding,
    pub seed: u64,
    /// Rows per code of the sample stage (0: none). When the data hold at least twice
    /// `sample_per_code`·K rows, Lloyd first runs on a uniform sample of that many rows (seeded
    /// as configured, to the same tolerance), and the passes over all rows start from its
    /// codebook: most of the codes' travel is then paid for on the sample, and the full passes
    /// start near a fixed point, where the bounds skip most distances.
    pub sample_per_code: usize,
    /// Continue a fit that stopped after some passes (from `Seeding::Given` codes, which must be
    /// the codebook those passes left).
    pub resume: Option<Resume>,
}

/// Where a resumed fit stands: the passes over all rows already made and the last one's error
/// (the --tol stop compares the next pass's error with it).
///
/// Each pass depends only on the codebook it starts from (the bounds restart from a full
/// search, and give the same indices as one; re-seeded rows are drawn by the pass's number), so
/// a fit resumed from a checkpoint continues with the bits of the uninterrupted fit, on the
/// same number of ranks. One difference: the first resumed pass does not know the previous
/// assignment, so it reports every row as reassigned and cannot end the fit at a fixed point;
/// a fit that would have converged on that pass converges on the next, with the same codebook.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Resume {
    pub passes: usize,
    pub error: f64,
}

/// What `on_pass` sees besides the [`Pass`]: the codebook after the pass moved the codes and
/// the pass's rows per code (over all ranks): what a checkpoint of the fit so far holds.
pub struct PassState<'a> {
    pub codebook: MatRef<'a>,
    pub counts: &'a [u64],
}

impl KMeansConfig {
    /// Default rows per code of the sample stage: none. On 117,659 real 256-D embeddings a
    /// sample stage saved at most a tenth of the time (the passes over all rows that follow it
    /// are most of the work either way) and at K = 1,024 ended at a higher error
    /// (docs/fit.md): an option for inputs far larger than K·`sample_per_code`, not a default.
    pub const SAMPLE_PER_CODE: usize = 0;

    /// K codes, L2, k-means|| seeding, bounds on, at most 300 passes, tolerance 1e-4, seed 0,
    /// no sample stage.
    pub fn new(codes: usize) -> Self {
        KMeansConfig {
            codes,
            metric: Metric::L2,
            max_passes: 300,
            tolerance: 1e-4,
            bounds: true,
            group_codes: 512,
            seeding: Seeding::default(),
            seed: 0,
            sample_per_code: KMeansConfig::SAMPLE_PER_CODE,
            resume: None,
        }
    }
}

/// One Lloyd pass, over all ranks.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Pass {
    /// 1 for the first (counted separately in the sample stage and over all rows).
    pub pass: usize,
    /// Rows the pass ran over, over all ranks: the sample's in the sample stage.
    pub rows: u64,
    /// Whether the pass belongs to the sample stage.
    pub sample: bool,
    /// Mean squared distance of the rows to the codes they were assigned this pass (before the
    /// codes moved to their means). Under cosine, ||x̂ − ĉ||² = 2(1 − cos).
    pub error: f64,
    /// Codes with at least one row.
    pub used: usize,
    /// Rows whose code changed (every row on the first pass).
    pub reassigned: u64,
    /// Row–code distances computed by the search (N·K on a pass without bounds).
    pub distances: u64,
    /// Fraction of the N·K distances the bounds skipped.
    pub skipped: f64,
    /// Codes left without rows and re-seeded with a random row.
    pub reseeded: usize,
    /// Seconds since the fit started (seeding included).
    pub elapsed_s: f64,
}

/// Why [`fit`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// No row changed code and no code was empty: further passes change nothing.
    Converged,
    /// A pass lowered the error by less than the tolerance.
    Tolerance,
    /// The pass limit.
    MaxPasses,
}

/// The result of [`fit`].
#[derive(Clone, Debug)]
pub struct KMeans {
    /// K × D (unit rows under cosine).
    pub codebook: Matrix,
    /// Rows per code in the last pass's assignment, over all ranks.
    pub counts: Vec<u64>,
    /// This shard's rows' codes in the last pass's assignment.
    pub indices: Vec<u32>,
    pub seeding: SeedReport,
    /// The sample stage's passes (empty without one); its seeding is `seeding`.
    pub sample_passes: Vec<Pass>,
    pub passes: Vec<Pass>,
    pub stop: Stop,
}

/// Passes between two checks that every rank holds the same codebook.
const CHECK_EVERY: usize = 4;

/// Every rank's codebook hashed and compared: ranks that computed different codes (a bug, or
/// different binaries or inputs on different machines) end the job with a clear error instead
/// of writing a codebook that depends on the rank.
pub(crate) fn check_same_codes(
    comm: &dyn Collective,
    codes: MatRef<'_>,
    pass: usize,
) -> Result<()> {
    check_same_codebook(comm, codes, "k-means", &format!("pass {pass}"))
}

/// [`check_same_codes`] for any job (`what`) at any point (`when`, e.g. "step 40").
pub fn check_same_codebook(
    comm: &dyn Collective,
    codes: MatRef<'_>,
    what: &str,
    when: &str,
) -> Result<()> {
    use std::hash::{Hash, Hasher};
    // DefaultHasher::new() has fixed keys: the same hash in every process of one build.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for v in codes.data() {
        v.to_bits().hash(&mut h);
    }
    let parts = comm.all_gather_bytes(&h.finish().to_le_bytes())?;
    if let Some(r) = parts.iter().position(|p| *p != parts[0]) {
        return Err(Error::internal(
            what,
            format!(
                "after {when} rank {r}'s codebook differs from rank 0's: the ranks no \
                 longer compute the same codes (different vqx builds or inputs on the ranks?)"
            ),
        ));
    }
    Ok(())
}

/// Relative margin that covers the f64 rounding of the bounds and distances (≤ (D + 2)·2^-53
/// per quantity, far below this for any D an f32 index can reach).
const MARGIN: f64 = 1e-10;

/// Asks for the cache lines of `data` ahead of their use (a hint), for the bounds and the
/// exact sums, whose rows are scattered.
#[inline(always)]
pub(super) fn prefetch(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(16) {
        // SAFETY: a prefetch is a hint that never faults; the address is inside `data`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// k-means of the rows of `shard` (every rank of `comm` calls it with its own shard and the same
/// `config`; all get the same codebook). `on_pass` sees each pass as it ends (every rank calls
/// it; the caller decides which rank prints).
pub fn fit(
    backend: &dyn Backend,
    comm: &dyn Collective,
    shard: Shard<'_>,
    config: &KMeansConfig,
    mut on_pass: impl FnMut(&Pass, &PassState<'_>) -> Result<()>,
) -> Result<KMeans> {
    let start = Instant::now();
    let k = config.codes;
    let total = shard.total();
    if k == 0 {
        return Err(Error::InvalidArgument(
            "k-means needs at least 1 code".into(),
        ));
    }
    if total < k {
        return Err(Error::InvalidArgument(format!(
            "k-means of {k} codes needs at least {k} rows; the input has {total}"
        )));
    }
    if config.max_passes == 0 {
        return Err(Error::InvalidArgument(
            "k-means needs at least 1 pass".into(),
        ));
    }
    let first = shard.first();
    // Checked once (with the rows' norms, which the passes over these same rows reuse under L2).
    let checked = CheckedRows::named(
        shard.rows(),
        &format!("input rows {first}..{}", first + shard.rows().rows()),
    )?;
    let unit;
    let shard = if config.metric == Metric::Cosine {
        unit = normalize_rows(shard.rows());
        shard.with_rows(unit.as_ref())
    } else {
        shard
    };
    let on_pass: &mut dyn FnMut(&Pass, &PassState<'_>) -> Result<()> = &mut on_pass;
    if let Some(r) = config.resume {
        if !matches!(config.seeding, Seeding::Given(_)) {
            return Err(Error::InvalidArgument(
                "a resumed k-means starts from the codebook it stopped with (Seeding::Given)"
                    .into(),
            ));
        }
        if r.passes >= config.max_passes {
            return Err(Error::InvalidArgument(format!(
                "the fit to resume has made {} passes, the most asked for is {}: nothing to do",
                r.passes, config.max_passes
            )));
        }
    }
    let sample = match config.resume {
        Some(_) => None,
        None => Sample::draw(comm, &shard, config)?,
    };
    let first_stage = match &sample {
        Some(s) => Shard::new(s.rows.as_ref(), s.first, s.total)?,
        None => shard,
    };
    // The checked rows are the shard's own only under L2 and without a sample stage.
    let seed_checked = (config.metric == Metric::L2 && sample.is_none()).then_some(&checked);
    let (mut codes, seeding) = seed(
        backend,
        comm,
        &first_stage,
        seed_checked,
        k,
        &config.seeding,
        config.seed,
    )?;
    // A resumed fit's codes are already the unit vectors the passes left: normalising them
    // again could move their last bits.
    if config.metric == Metric::Cosine && config.resume.is_none() {
        codes = normalize_rows(codes.as_ref());
    }
    let mut sample_passes = Vec::new();
    if sample.is_some() {
        let stage = lloyd(
            backend,
            comm,
            first_stage,
            None,
            config,
            codes,
            start,
            true,
            on_pass,
        )?;
        codes = stage.codebook;
        sample_passes = stage.passes;
    }
    let checked = (config.metric == Metric::L2).then_some(checked);
    let stage = lloyd(
        backend, comm, shard, checked, config, codes, start, false, on_pass,
    )?;
    Ok(KMeans {
        seeding,
        sample_passes,
        ..stage
    })
}

/// The sample stage's rows on this rank: each row is drawn with probability
/// `sample_per_code`·K / N by a hash of (seed, global row index), so the sample, and its order
/// (the rows' global order), are the same however the rows are sharded.
struct Sample {
    rows: Matrix,
    /// The sample's index of this rank's first sampled row.
    first: usize,
    /// Rows in the sample, over all ranks.
    total: usize,
}

impl Sample {
    /// None when the configuration asks for no sample stage or the data are too few for one
    /// (fewer than twice the sample; or a sample drawn with fewer than K rows).
    fn draw(
        comm: &dyn Collective,
        shard: &Shard<'_>,
        config: &KMeansConfig,
    ) -> Result<Option<Self>> {
        let want = config.sample_per_code.saturating_mul(config.codes);
        if want == 0 || shard.total() < want.saturating_mul(2) {
            return Ok(None);
        }
        let p = want as f64 / shard.total() as f64;
        let x = shard.rows();
        let d = x.cols();
        let mut data = Vec::with_capacity((p * x.rows() as f64 * 1.1) as usize * d);
        for i in 0..x.rows() {
            if seed::unit_hash(config.seed ^ SAMPLE_SALT, 0, (shard.first() + i) as u64) < p {
                data.extend_from_slice(x.row(i));
            }
        }
        let mut per_rank = vec![0u64; comm.size()];
        per_rank[comm.rank()] = (data.len() / d.max(1)) as u64;
        comm.all_reduce_sum_u64(&mut per_rank)?;
        let total = per_rank.iter().sum::<u64>() as usize;
        if total < config.codes {
            return Ok(None);
        }
        let first = per_rank[..comm.rank()].iter().sum::<u64>() as usize;
        let rows = data.len() / d.max(1);
        Ok(Some(Sample {
            rows: Matrix::new(data, rows, d)?,
            first,
            total,
        }))
    }
}

/// Keeps the sample's draws apart from k-means||'s (which hash the same row indices).
const SAMPLE_SALT: u64 = 0x7361_6d70_6c65;

/// Lloyd's passes over `shard` from `codes`: one stage of [`fit`] (the sample's, or all rows').
#[allow(clippy::too_many_arguments)]
fn lloyd<'a>(
    backend: &dyn Backend,
    comm: &dyn Collective,
    shard: Shard<'a>,
    checked: Option<CheckedRows<'a>>,
    config: &KMeansConfig,
    mut codes: Matrix,
    start: Instant,
    sample: bool,
    on_pass: &mut dyn FnMut(&Pass, &PassState<'_>) -> Result<()>,
) -> Result<KMeans> {
    let k = config.codes;
    let total = shard.total();
    let x = shard.rows();
    let (n, d) = (x.rows(), x.cols());

    let mut indices = vec![0u32; n];
    // Checked once, with their norms, for every search of the stage (by the caller when it
    // already checked these rows); Σ||x||² over all ranks for the error (`squared_error`).
    let checked = match checked {
        Some(c) => c,
        None => CheckedRows::new(x)?,
    };
    let mut x_sq = [checked.norm_sq().iter().sum::<f64>()];
    comm.all_reduce_sum_f64(&mut x_sq)?;
    let mut bounds = if config.bounds {
        Some(bounds::Bounds::new(
            backend,
            codes.as_ref(),
            n,
            config.group_codes,
            config.seed,
        )?)
    } else {
        None
    };
    let mut passes: Vec<Pass> = Vec::new();
    let mut counts = vec![0u64; k];
    // The per-code sums, exact and order-free: each pass adds only the rows that moved.
    let mut exact = sums::ExactSums::new(x, checked.max_abs(), k);
    let mut previous_indices: Option<Vec<u32>> = None;
    let mut stop = Stop::MaxPasses;
    // A resumed fit (never a sample stage) continues the pass count and the error sequence.
    let (first_pass, mut previous) = match config.resume {
        Some(r) if !sample => (r.passes + 1, Some(r.error)),
        _ => (1, None),
    };
    for pass in first_pass..=config.max_passes {
        let (searched, reassigned) = match bounds.as_mut() {
            Some(b) => {
                if pass == first_pass {
                    b.reset(codes.as_ref());
                }
                let (searched, changed) =
                    b.assign(backend, &checked, codes.as_ref(), &mut indices)?;
                (searched, if pass == first_pass { n } else { changed })
            }
            None => assign_all(backend, x, codes.as_ref(), &mut indices, pass == first_pass)?,
        };
        // Two all-reduces per pass: the f64 sums, and the counts with the pass's two tallies
        // after them.
        exact.update(x, previous_indices.as_deref(), &indices);
        previous_indices = Some(indices.clone());
        let mut sums = exact.to_f64();
        comm.all_reduce_sum_f64(&mut sums)?;
        counts = vec![0u64; k];
        for &j in &indices {
            counts[j as usize] += 1;
        }
        counts.extend_from_slice(&[reassigned as u64, searched]);
        comm.all_reduce_sum_u64(&mut counts)?;
        let (searched, reassigned) = (counts.pop().expect("tally"), counts.pop().expect("tally"));
        let error = squared_error(x_sq[0], &sums, &counts, codes.as_ref()) / total as f64;
        let used = counts.iter().filter(|&&c| c > 0).count();
        let converged = pass > first_pass && reassigned == 0 && used == k;

        let mut reseeded = 0;
        if !converged {
            let empty: Vec<usize> = (0..k).filter(|&j| counts[j] == 0).collect();
            reseeded = empty.len();
            let mut next = means(&sums, &counts, codes.as_ref(), config.metric);
            if !empty.is_empty() {
                let mut rng = ChaCha8Rng::seed_from_u64(
                    config.seed ^ (pass as u64).rotate_left(32) ^ 0x7265_7365_6564,
                );
                let rows = rand::seq::index::sample(&mut rng, total, empty.len()).into_vec();
                let fresh = shard::fetch_rows(comm, &shard, &rows)?;
                for (e, &j) in empty.iter().enumerate() {
                    next.data_mut()[j * d..(j + 1) * d].copy_from_slice(fresh.row(e));
                }
            }
            if let Some(b) = bounds.as_mut() {
                b.loosen(codes.as_ref(), next.as_ref(), &indices);
            }
            codes = next;
        }
        if comm.size() > 1 && pass % CHECK_EVERY == 0 {
            check_same_codes(comm, codes.as_ref(), pass)?;
        }
        let report = Pass {
            pass,
            rows: total as u64,
            sample,
            error,
            used,
            reassigned,
            distances: searched,
            skipped: 1.0 - searched as f64 / (total as f64 * k as f64),
            reseeded,
            elapsed_s: start.elapsed().as_secs_f64(),
        };
        on_pass(
            &report,
            &PassState {
                codebook: codes.as_ref(),
                counts: &counts,
            },
        )?;
        passes.push(report);
        if converged {
            stop = Stop::Converged;
            break;
        }
        if let Some(prev) = previous {
            let gain = prev - error;
            if reseeded == 0 && gain >= 0.0 && gain <= config.tolerance * prev {
                stop = Stop::Tolerance;
                break;
            }
        }
        previous = Some(error);
    }
    // And once more at the end: the codebook every rank returns is the same.
    if comm.size() > 1 {
        check_same_codes(comm, codes.as_ref(), passes.len())?;
    }
    Ok(KMeans {
        codebook: codes,
        counts,
        indices,
        seeding: SeedReport::default(),
        sample_passes: Vec::new(),
        passes,
        stop,
    })
}

/// Every row searched in one blocked call (every pass of plain Lloyd); returns (distances
/// computed over this shard, rows whose code changed).
fn assign_all(
    backend: &dyn Backend,
    x: MatRef<'_>,
    codes: MatRef<'_>,
    indices: &mut [u32],
    first: bool,
) -> Result<(u64, usize)> {
    let n = x.rows();
    if n == 0 {
        return Ok((0, 0));
    }
    let a = backend.nearest(x, codes, Metric::L2)?;
    let changed = if first {
        n
    } else {
        changed(indices, &a.indices)
    };
    indices.copy_from_slice(&a.indices);
    Ok(((n * codes.rows()) as u64, changed))
}

/// Σ_i ||x_i − c_{a(i)}||² over all ranks from the pass's sums: for each code j with rows,
/// Σ_{i∈j} ||x_i − c_j||² = Σ_{i∈j} ||x_i||² − 2 c_j·S_j + n_j ||c_j||², all in f64. So the
/// error needs no distance per row (the bounds leave most rows unread), and bounded and plain
/// passes, which have the same sums, report the same bits (the --tol stop depends on them).
fn squared_error(x_sq: f64, sums: &[f64], counts: &[u64], codes: MatRef<'_>) -> f64 {
    let d = codes.cols();
    let mut off = 0.0;
    for (j, &c) in counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let (code, s) = (codes.row(j), &sums[j * d..(j + 1) * d]);
        let (mut dot, mut norm) = (0.0, 0.0);
        for (&cv, &sv) in code.iter().zip(s) {
            let cv = cv as f64;
            dot += cv * sv;
            norm += cv * cv;
        }
        off += 2.0 * dot - c as f64 * norm;
    }
    (x_sq - off).max(0.0)
}

/// Rows whose code differs between two assignments.
fn changed(before: &[u32], after: &[u32]) -> usize {
    before.iter().zip(after).filter(|(a, b)| a != b).count()
}

/// Each code with rows moved to their mean (normalised under cosine), computed in f64 and
/// rounded once; codes without rows keep their place (the caller re-seeds them).
fn means(sums: &[f64], counts: &[u64], codes: MatRef<'_>, metric: Metric) -> Matrix {
    let d = codes.cols();
    let mut out = codes.to_owned();
    out.data_mut()
        .par_chunks_mut(d.max(1))
        .enumerate()
        .filter(|(j, _)| counts[*j] > 0)
        .for_each(|(j, row)| {
            let c = counts[j] as f64;
            let mean: Vec<f64> = sums[j * d..(j + 1) * d].iter().map(|s| s / c).collect();
            let scale = match metric {
                Metric::L2 => 1.0,
                Metric::Cosine => {
                    let norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
                    if norm > 0.0 { 1.0 / norm } else { 1.0 }
                }
            };
            for (o, m) in row.iter_mut().zip(mean) {
                *o = (m * scale) as f32;
            }
        });
    out
}
