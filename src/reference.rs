//! Naive f64 implementations of every primitive: the oracle the CPU twins are tested against.
//! Written for obviousness, not speed; nothing here is shared with the fast paths.

use crate::matrix::MatRef;
use crate::nearest::Metric;

/// Distance of `x` to `c` in f64, straight from the definition.
pub fn distance(x: &[f32], c: &[f32], metric: Metric) -> f64 {
    match metric {
        Metric::L2 => x
            .iter()
            .zip(c)
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum(),
        Metric::Cosine => {
            let nx: f64 = x.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
            let nc: f64 = c.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
            let dot: f64 = x.iter().zip(c).map(|(&a, &b)| a as f64 * b as f64).sum();
            if nx == 0.0 || nc == 0.0 {
                1.0
            } else {
                1.0 - dot / (nx * nc)
            }
        }
    }
}

/// All K distances of every row: the N×K matrix the fast paths never build.
pub fn distances(x: MatRef<'_>, codebook: MatRef<'_>, metric: Metric) -> Vec<Vec<f64>> {
    (0..x.rows())
        .map(|n| {
            (0..codebook.rows())
                .map(|k| distance(x.row(n), codebook.row(k), metric))
                .collect()
        })
        .collect()
}

/// Argmin per row of [`distances`] (first minimum) and the distance.
pub fn nearest(x: MatRef<'_>, codebook: MatRef<'_>, metric: Metric) -> Vec<(u32, f64)> {
    distances(x, codebook, metric)
        .into_iter()
        .map(|row| {
            let mut best = (0u32, f64::INFINITY);
            for (k, &d) in row.iter().enumerate() {
                if d < best.1 {
                    best = (k as u32, d);
                }
            }
            best
        })
        .collect()
}

/// Codebook rows by index, in f64.
pub fn gather(codebook: MatRef<'_>, indices: &[u32]) -> Vec<Vec<f64>> {
    indices
        .iter()
        .map(|&i| codebook.row(i as usize).iter().map(|&v| v as f64).collect())
        .collect()
}

/// Per-code sums (f64) and counts.
pub fn code_sums(x: MatRef<'_>, indices: &[u32], codes: usize) -> (Vec<Vec<f64>>, Vec<u64>) {
    let mut sums = vec![vec![0f64; x.cols()]; codes];
    let mut counts = vec![0u64; codes];
    for (n, &k) in indices.iter().enumerate() {
        counts[k as usize] += 1;
        for (s, &v) in sums[k as usize].iter_mut().zip(x.row(n)) {
            *s += v as f64;
        }
    }
    (sums, counts)
}

/// Histogram of indices.
pub fn usage(indices: &[u32], codes: usize) -> Vec<u64> {
    let mut h = vec![0u64; codes];
    for &i in indices {
        h[i as usize] += 1;
    }
    h
}
