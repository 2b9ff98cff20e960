//! Seeding: the K codes k-means starts from.
//!
//! k-means|| (Bahmani, Moseley, Vattani, Kumar, Vassilvitskii, "Scalable K-Means++", VLDB 2012)
//! replaces k-means++'s K sequential passes over the data by a few rounds that each sample
//! about ℓ rows at once with probability ∝ ℓ·d²(x)/φ, then reduces the few·K candidates to K by
//! weighted k-means++ (each candidate weighted by the rows nearest to it). A round costs one
//! nearest search of every row against that round's new candidates (blocked, on the backend),
//! so the rounds cost about `rounds·oversampling` passes of K codes. The reduction reads the
//! candidates' pairwise distances from one table ([`PairDistances`]) where it fits.

use super::pairs::PairDistances;
use super::shard::{Shard, fetch_rows, gather_rows};
use crate::backend::Backend;
use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};
use crate::nearest::l2_sq_f32;
use crate::nearest::{CheckedRows, Metric};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::time::Instant;

/// Where k-means starts.
#[derive(Clone, Debug)]
pub enum Seeding {
    /// k-means||: `rounds` sampling rounds of about `oversampling`·K rows each, reduced to K by
    /// weighted k-means++.
    Parallel { rounds: usize, oversampling: f64 },
    /// K distinct rows drawn uniformly (FAISS's and vector-quantize-pytorch's init).
    RandomRows,
    /// These K codes (a codebook file).
    Given(Matrix),
}

impl Seeding {
    /// k-means|| rounds by default: 5 rounds of 0.3·K rows (about 1.5·K candidates, the cost
    /// of 1.5 passes) gave lower errors after Lloyd than 3 of K or 3 of 0.5·K on 20,000 real
    /// 256-D embeddings at K = 1,024, seeds 1–3 (docs/fit.md).
    pub const ROUNDS: usize = 5;
    /// Rows drawn per k-means|| round, as a multiple of K, by default.
    pub const OVERSAMPLING: f64 = 0.3;
}

impl Default for Seeding {
    fn default() -> Self {
        Seeding::Parallel {
            rounds: Seeding::ROUNDS,
            oversampling: Seeding::OVERSAMPLING,
        }
    }
}

/// What the seeding did and cost.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SeedReport {
    /// "k-means||", "random rows" or "given".
    pub method: &'static str,
    /// Candidate rows k-means|| sampled before the reduction to K (K for the others).
    pub candidates: usize,
    /// Row-code distances computed, over all ranks.
    pub distances: u64,
    pub seconds: f64,
}

/// K codes for the rows of `shard` (all ranks get the same codes). `metric` only says whether
/// the rows are already unit vectors (cosine); distances are L2 either way.
///
/// `checked`: the shard's rows already checked, when the caller has them (k-means|| searches
/// them; checked here otherwise).
pub fn seed(
    backend: &dyn Backend,
    comm: &dyn Collective,
    shard: &Shard<'_>,
    checked: Option<&CheckedRows<'_>>,
    k: usize,
    seeding: &Seeding,
    seed: u64,
) -> Result<(Matrix, SeedReport)> {
    let start = Instant::now();
    let d = shard.rows().cols();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6b6d_6561_6e73_7c7c);
    let (codes, method, candidates, distances) = match seeding {
        Seeding::Given(m) => {
            if (m.rows(), m.cols()) != (k, d) {
                return Err(Error::shape(
                    "initial codebook",
                    format!("{k} × {d}"),
                    format!("{} × {}", m.rows(), m.cols()),
                ));
            }
            m.as_ref().check_finite("initial codebook")?;
            (m.clone(), "given", k, 0)
        }
        Seeding::RandomRows => {
            let picks = rand::seq::index::sample(&mut rng, shard.total(), k).into_vec();
            (fetch_rows(comm, shard, &picks)?, "random rows", k, 0)
        }
        &Seeding::Parallel {
            rounds,
            oversampling,
        } => {
            if !(oversampling > 0.0 && oversampling.is_finite()) {
                return Err(Error::InvalidArgument(format!(
                    "k-means|| oversampling must be a positive number; got {oversampling}"
                )));
            }
            let (c, n, dist) = parallel(
                backend,
                comm,
                shard,
                checked,
                k,
                rounds,
                oversampling,
                seed,
                &mut rng,
            )?;
            (c, "k-means||", n, dist)
        }
    };
    let report = SeedReport {
        method,
        candidates,
        distances,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((codes, report))
}

/// k-means||; returns the codes, the number of candidates and the distances computed.
#[allow(clippy::too_many_arguments)]
fn parallel(
    backend: &dyn Backend,
    comm: &dyn Collective,
    shard: &Shard<'_>,
    checked: Option<&CheckedRows<'_>>,
    k: usize,
    rounds: usize,
    oversampling: f64,
    seed: u64,
    rng: &mut ChaCha8Rng,
) -> Result<(Matrix, usize, u64)> {
    let x = shard.rows();
    let (n, d) = (x.rows(), x.cols());
    let first = rng.gen_range(0..shard.total());
    let mut cands = fetch_rows(comm, shard, &[first])?.into_vec();
    let mut newest = 0; // the first candidate of the latest round
    let mut d2 = vec![f64::INFINITY; n];
    let mut owner = vec![0u32; n];
    let mut distances = 0u64;
    let ell = oversampling * k as f64;
    // A rank may hold no rows: it searches nothing.
    let own;
    let checked = match checked {
        Some(c) => Some(c),
        None if n > 0 => {
            own = CheckedRows::new(x)?;
            Some(&own)
        }
        None => None,
    };
    let every: Vec<u32> = (0..n as u32).collect();
    for round in 0..=rounds {
        // Fold the latest round's candidates into each row's nearest candidate so far. The
        // search is the one k-means' bounds make (the exact nearest; screened in bf16 where
        // the CPU can), and each row's distance to its winner is then measured here by one
        // fixed f32 computation: the same bits whatever the backend, so are the draws.
        let fresh = MatRef::new(&cands[newest * d..], cands.len() / d - newest, d)?;
        if let Some(checked) = checked {
            // The first round's one candidate is every row's nearest: no search.
            let winners = if fresh.rows() == 1 {
                vec![0; n]
            } else {
                backend
                    .nearest_rows_for_bounds(checked, &every, fresh, Metric::L2)?
                    .0
            };
            let found: Vec<f64> = winners
                .par_iter()
                .enumerate()
                .with_min_len(1024)
                .map(|(i, &j)| l2_sq_f32(x.row(i), fresh.row(j as usize)) as f64)
                .collect();
            for (i, (&j, &v)) in winners.iter().zip(&found).enumerate() {
                if v < d2[i] {
                    d2[i] = v;
                    owner[i] = (newest + j as usize) as u32;
                }
            }
        }
        distances += (shard.total() * fresh.rows()) as u64;
        if round == rounds {
            break;
        }
        let mut phi = [d2.iter().sum::<f64>()];
        comm.all_reduce_sum_f64(&mut phi)?;
        if phi[0] <= 0.0 {
            break; // every row sits on a candidate
        }
        // Each row's draw depends on (seed, round, global row) alone, so the sample is the same
        // however the rows are sharded.
        let mut picked: Vec<f32> = Vec::new();
        for (i, &v) in d2.iter().enumerate() {
            if unit_hash(seed, round as u64, (shard.first() + i) as u64) * phi[0] < ell * v {
                picked.extend_from_slice(x.row(i));
            }
        }
        newest = cands.len() / d;
        cands.extend(gather_rows(comm, &picked, d)?.into_vec());
        if cands.len() / d == newest {
            break; // nothing drawn this round
        }
    }
    let c = cands.len() / d;
    let mut weights = vec![0u64; c];
    for &o in &owner[..n] {
        weights[o as usize] += 1;
    }
    comm.all_reduce_sum_u64(&mut weights)?;
    let cands = Matrix::new(cands, c, d)?;
    let codes = if c <= k {
        // Too few candidates: all of them, and random rows for the rest.
        let extra = rand::seq::index::sample(rng, shard.total(), k - c).into_vec();
        let mut all = cands.into_vec();
        all.extend(fetch_rows(comm, shard, &extra)?.into_vec());
        Matrix::new(all, k, d)?
    } else {
        weighted_plus_plus(cands.as_ref(), &weights, k, rng)
    };
    Ok((codes, c, distances))
}

/// Weighted k-means++ over `points`: each next centre drawn ∝ weight × squared distance to the
/// nearest centre so far. Every rank runs it on the same inputs and draws.
fn weighted_plus_plus(
    points: MatRef<'_>,
    weights: &[u64],
    k: usize,
    rng: &mut ChaCha8Rng,
) -> Matrix {
    // The candidates' pairwise distances when their table fits and this CPU has a vector kernel
    // for it: each step then reads one row (pairs.rs says why); otherwise each step measures
    // the new centre against every candidate. The two give slightly different f32 distances,
    // so a seeding can differ (rarely: a draw moves only when it falls within rounding of a
    // boundary) between a CPU with AVX2 or AVX-512 and one without.
    let table = PairDistances::worth_building(points.rows()).then(|| PairDistances::new(points));
    plus_plus_with(points, weights, k, rng, table.as_ref())
}

/// [`weighted_plus_plus`] with the distances from `table` when given, measured otherwise.
fn plus_plus_with(
    points: MatRef<'_>,
    weights: &[u64],
    k: usize,
    rng: &mut ChaCha8Rng,
    table: Option<&PairDistances>,
) -> Matrix {
    let (c, d) = (points.rows(), points.cols());
    let w: Vec<f64> = weights.iter().map(|&w| w as f64).collect();
    let mut nearest = vec![f32::INFINITY; c];
    let mut chosen = Vec::with_capacity(k);
    let mut pick = draw(&w, rng).unwrap_or(0);
    let mut taken = vec![false; c];
    // Per block of candidates, its mass (Σ weight × nearest of the untaken), summed while the
    // block is updated: the draw then walks the blocks and one block, not every candidate.
    let mut block_mass = vec![0f64; c.div_ceil(PP_BLOCK)];
    // One task per thread and step: each step is only ~1 ms of work, so rayon's finer split
    // costs more in hand-offs than it balances.
    let min_len = block_mass
        .len()
        .div_ceil(rayon::current_num_threads())
        .max(1);
    while chosen.len() < k {
        chosen.push(pick);
        taken[pick] = true;
        match table {
            Some(table) => {
                let row = table.row(pick);
                for (b, (m, mass)) in nearest
                    .chunks_mut(PP_BLOCK)
                    .zip(block_mass.iter_mut())
                    .enumerate()
                {
                    *mass = lower_block(m, b * PP_BLOCK, &w, &taken, |i| row[i]);
                }
            }
            None => {
                let centre = points.row(pick);
                let (w, taken) = (&w, &taken);
                nearest
                    .par_chunks_mut(PP_BLOCK)
                    .zip(block_mass.par_iter_mut())
                    .enumerate()
                    .with_min_len(min_len)
                    .for_each(|(b, (m, mass))| {
                        *mass = lower_block(m, b * PP_BLOCK, w, taken, |i| {
                            l2_sq_f32(points.row(i), centre)
                        })
                    });
            }
        }
        let mass = |i: usize| {
            if taken[i] {
                0.0
            } else {
                w[i] * nearest[i] as f64
            }
        };
        pick = match draw_blocked(&block_mass, PP_BLOCK, c, mass, rng) {
            Some(p) => p,
            // Every remaining candidate coincides with a centre or weighs nothing: the
            // untaken ones in order (duplicates become empty clusters, re-seeded by Lloyd).
            None => match taken.iter().position(|t| !t) {
                Some(p) => p,
                None => break,
            },
        };
    }
    let mut out = Vec::with_capacity(k * d);
    for &i in &chosen {
        out.extend_from_slice(points.row(i));
    }
    // Fewer candidates than K only when all were taken: repeat them (re-seeded as empty).
    let mut i = 0;
    while out.len() < k * d {
        out.extend_from_slice(points.row(chosen[i % chosen.len()]));
        i += 1;
    }
    Matrix::new(out, k, d).expect("k × d values")
}

/// One block of the weighted k-means++ update: each candidate's nearest value (`m`, candidates
/// `base..`) lowered to its distance to the new centre (`dist`), then the block's mass,
/// Σ weight × nearest over the untaken. Generic over `dist`, so it inlines into the loop.
fn lower_block(
    m: &mut [f32],
    base: usize,
    w: &[f64],
    taken: &[bool],
    dist: impl Fn(usize) -> f32,
) -> f64 {
    let mut sum = 0.0;
    for (t, v) in m.iter_mut().enumerate() {
        let i = base + t;
        *v = v.min(dist(i));
        if !taken[i] {
            sum += w[i] * *v as f64;
        }
    }
    sum
}

/// An index drawn with probability ∝ `mass` (None when the mass is all zero).
fn draw(mass: &[f64], rng: &mut ChaCha8Rng) -> Option<usize> {
    draw_blocked(mass, 1, mass.len(), |i| mass[i], rng)
}

/// Candidates per block of the weighted k-means++ update and draw.
const PP_BLOCK: usize = 64;

/// An index in 0..n drawn with probability ∝ `mass(i)`, given each block's total mass
/// (`block_mass`, blocks of `block` indices): the blocks are walked first, then the one the
/// draw falls in. None when the mass is all zero.
fn draw_blocked(
    block_mass: &[f64],
    block: usize,
    n: usize,
    mass: impl Fn(usize) -> f64,
    rng: &mut ChaCha8Rng,
) -> Option<usize> {
    let total: f64 = block_mass.iter().sum();
    if total.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) || !total.is_finite() {
        return None;
    }
    let mut target = rng.r#gen::<f64>() * total;
    let mut last = None;
    for (b, &bm) in block_mass.iter().enumerate() {
        if bm <= 0.0 {
            continue;
        }
        last = Some(b);
        if target < bm {
            break;
        }
        target -= bm;
    }
    // The block the draw fell in (or, past the end by rounding, the last with mass).
    let b = last?;
    let mut pick = None;
    for i in b * block..((b + 1) * block).min(n) {
        let m = mass(i);
        if m > 0.0 {
            pick = Some(i);
            target -= m;
            if target < 0.0 {
                break;
            }
        }
    }
    pick
}

/// A uniform draw in [0, 1) from (seed, round, row): SplitMix64's finaliser over the three.
pub(crate) fn unit_hash(seed: u64, round: u64, row: u64) -> f64 {
    let mut z = seed;
    for v in [round, row] {
        z = mix(z ^ mix(v.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    }
    (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_hash_is_uniform_enough() {
        let n = 100_000;
        let mean: f64 = (0..n).map(|i| unit_hash(7, 1, i)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        assert!((0..n).all(|i| (0.0..1.0).contains(&unit_hash(7, 1, i))));
    }

    #[test]
    fn draw_follows_the_mass() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(draw(&[0.0, 0.0], &mut rng), None);
        let mut hits = [0usize; 3];
        for _ in 0..30_000 {
            hits[draw(&[1.0, 0.0, 2.0], &mut rng).unwrap()] += 1;
        }
        assert_eq!(hits[1], 0);
        let ratio = hits[2] as f64 / hits[0] as f64;
        assert!((ratio - 2.0).abs() < 0.15, "ratio {ratio}");
    }

    /// Both ways of measuring (the table, and each centre against every candidate) pick one
    /// candidate per cluster when 16 tight clusters lie far apart: after a cluster has a centre,
    /// its candidates weigh ~(0.001/10)² of the others.
    #[test]
    fn plus_plus_picks_one_candidate_per_cluster() {
        for (d, seed) in [(3usize, 1u64), (16, 2), (33, 3), (256, 4)] {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            let (clusters, per) = (16usize, 7usize);
            let mut x = Vec::new();
            for g in 0..clusters {
                // Cluster g sits 10 away from the others along its own axis (and the origin).
                for _ in 0..per {
                    for t in 0..d {
                        let centre = if t == g % d {
                            10.0 * (1 + g / d) as f32
                        } else {
                            0.0
                        };
                        x.push(centre + r.gen_range(-0.001f32..0.001));
                    }
                }
            }
            let c = clusters * per;
            let pts = MatRef::new(&x, c, d).unwrap();
            let w: Vec<u64> = (0..c).map(|i| 1 + (i % 3) as u64).collect();
            let table = PairDistances::new(pts);
            for (how, t) in [("table", Some(&table)), ("measured", None)] {
                let mut rng = ChaCha8Rng::seed_from_u64(seed + 10);
                let codes = plus_plus_with(pts, &w, clusters, &mut rng, t);
                let mut hit = vec![0usize; clusters];
                for j in 0..clusters {
                    let row = codes.row(j);
                    let i = (0..c).find(|&i| pts.row(i) == row).expect("a candidate");
                    hit[i / per] += 1;
                }
                assert!(
                    hit.iter().all(|&h| h == 1),
                    "d {d}, {how}: codes per cluster {hit:?}"
                );
            }
        }
    }

    #[test]
    fn blocked_draw_follows_the_mass() {
        // Blocks of 2 over 5 indices (the last block short); index 1 and block 1 weigh nothing.
        let mass = [1.0, 0.0, 0.0, 0.0, 3.0];
        let blocks = [1.0, 0.0, 3.0];
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        assert_eq!(draw_blocked(&[0.0, 0.0], 2, 4, |_| 0.0, &mut rng), None);
        let mut hits = [0usize; 5];
        for _ in 0..40_000 {
            hits[draw_blocked(&blocks, 2, 5, |i| mass[i], &mut rng).unwrap()] += 1;
        }
        assert_eq!(hits[1] + hits[2] + hits[3], 0, "{hits:?}");
        let ratio = hits[4] as f64 / hits[0] as f64;
        assert!((ratio - 3.0).abs() < 0.2, "ratio {ratio}");
    }
}
