//! Codebook initialisation from the first training batch (SPEC §5).

use crate::backend::Backend;
use crate::ema::{EmaState, SumMode};
use crate::error::Result;
use crate::matrix::{MatRef, Matrix};
use crate::nearest::{Metric, normalize_rows};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// K rows of `x` drawn without replacement; when `x` has fewer than K rows it is first tiled
/// ⌈K/N⌉ times with Gaussian noise of std 0.01/√D on every copy (ESM3, VideoGPT), so no two
/// codes start identical.
pub fn data_sample(x: MatRef<'_>, k: usize, rng: &mut ChaCha8Rng) -> Matrix {
    let (n, d) = (x.rows(), x.cols());
    let mut out = Vec::with_capacity(k * d);
    if n >= k {
        for r in rand::seq::index::sample(rng, n, k).iter() {
            out.extend_from_slice(x.row(r));
        }
    } else {
        let copies = k.div_ceil(n);
        let noise = Normal::new(0.0f32, 0.01 / (d as f32).sqrt()).expect("positive std");
        for t in rand::seq::index::sample(rng, n * copies, k).iter() {
            out.extend(x.row(t % n).iter().map(|&v| v + noise.sample(rng)));
        }
    }
    Matrix::new(out, k, d).expect("k × d values")
}

/// k-means++ seeding (Arthur & Vassilvitskii): the first centre a random row, each next one a
/// row drawn with probability ∝ its squared distance to the nearest centre so far. Seeds from
/// at most 16·K rows (a random subset) to bound the cost at 16·K²·D; falls back to
/// [`data_sample`] when the batch has fewer than K distinct rows' worth of spread.
pub fn kmeans_plus_plus(x: MatRef<'_>, k: usize, rng: &mut ChaCha8Rng) -> Matrix {
    let (n, d) = (x.rows(), x.cols());
    if n < k {
        return data_sample(x, k, rng);
    }
    let m = n.min(16 * k);
    let pool: Vec<usize> = rand::seq::index::sample(rng, n, m).into_vec();
    let mut centers = Vec::with_capacity(k * d);
    let mut nearest = vec![f32::INFINITY; m];
    let mut pick = pool[rng.gen_range(0..m)];
    for _ in 0..k {
        let c = x.row(pick).to_vec();
        for (dist, &r) in nearest.iter_mut().zip(&pool) {
            let v: f32 = x
                .row(r)
                .iter()
                .zip(&c)
                .map(|(a, b)| (a - b) * (a - b))
                .sum();
            *dist = dist.min(v);
        }
        centers.extend_from_slice(&c);
        let total: f64 = nearest.iter().map(|&v| v as f64).sum();
        if total <= 0.0 {
            // Every pooled row is already a centre: the rest come from plain sampling.
            break;
        }
        let mut target = rng.r#gen::<f64>() * total;
        pick = pool[m - 1];
        for (i, &v) in nearest.iter().enumerate() {
            target -= v as f64;
            if target < 0.0 {
                pick = pool[i];
                break;
            }
        }
    }
    let have = centers.len() / d;
    if have < k {
        let extra = data_sample(x, k - have, rng);
        centers.extend_from_slice(extra.data());
    }
    Matrix::new(centers, k, d).expect("k × d values")
}

/// Lloyd's k-means on `x` (spherical under cosine: on the normalised rows), seeded by
/// [`kmeans_plus_plus`] (vector-quantize-pytorch seeds with a plain random sample, which more
/// often leaves two codes in one cluster): `iters` rounds of assign (the backend's exact
/// nearest) and mean update; an empty cluster keeps its centre. As in
/// vector-quantize-pytorch, the counts are the cluster sizes of the last assignment and the
/// EMA sums are centre × count, so the returned codebook is the Laplace-smoothed one the EMA
/// state implies (an empty cluster's code is then 0 and soon re-seeded as dead).
pub fn kmeans(
    backend: &dyn Backend,
    x: MatRef<'_>,
    k: usize,
    iters: usize,
    metric: Metric,
    eps: f32,
    rng: &mut ChaCha8Rng,
) -> Result<(Matrix, EmaState)> {
    let d = x.cols();
    // Spherical k-means under cosine (vector-quantize-pytorch's `use_cosine_sim`): the rows are
    // normalised once, and each centre is the normalised mean of its normalised rows.
    let unit;
    let x = if metric == Metric::Cosine {
        unit = normalize_rows(x);
        unit.as_ref()
    } else {
        x
    };
    let mut centers = kmeans_plus_plus(x, k, rng);
    if metric == Metric::Cosine {
        centers = normalize_rows(centers.as_ref());
    }
    let mut counts = vec![0u32; k];
    for _ in 0..iters {
        let a = backend.nearest(x, centers.as_ref(), metric)?;
        let sums = backend.code_sums(x, &a.indices, k, SumMode::Deterministic)?;
        counts = sums.counts;
        for (j, row) in centers.data_mut().chunks_mut(d).enumerate() {
            if counts[j] > 0 {
                let s = &sums.sums[j * d..(j + 1) * d];
                for (c, &v) in row.iter_mut().zip(s) {
                    *c = v / counts[j] as f32;
                }
            }
        }
        if metric == Metric::Cosine {
            centers = normalize_rows(centers.as_ref());
        }
    }
    let sizes: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
    let mut sums = centers.clone();
    for (row, &c) in sums.data_mut().chunks_mut(d).zip(&sizes) {
        row.iter_mut().for_each(|v| *v *= c);
    }
    let ema = EmaState::from_parts(sizes, sums)?;
    let codebook = ema.codebook(eps);
    Ok((codebook, ema))
}
