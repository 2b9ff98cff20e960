//! Usage counting: the exact integer histogram of code indices (SPEC §5), and the
//! statistics reported from it.

use crate::error::Result;
use rayon::prelude::*;

/// Checks a histogram's inputs: indices in range of `codes`, at least one code.
pub fn validate(indices: &[u32], codes: usize) -> Result<()> {
    if codes == 0 {
        return Err(crate::Error::Empty {
            what: "codebook".into(),
            detail: "0 codes".into(),
        });
    }
    if indices.len() > u32::MAX as usize {
        return Err(crate::Error::InvalidArgument(format!(
            "{} indices: counts are u32, at most {} per call",
            indices.len(),
            u32::MAX
        )));
    }
    crate::gather::validate_indices(indices, codes)
}

/// CPU twin of the usage kernel: counts[k] = #{n : indices[n] = k}. Inputs must be validated.
pub fn cpu(indices: &[u32], codes: usize) -> Vec<u32> {
    indices
        .par_chunks(1 << 16)
        .fold(
            || vec![0u32; codes],
            |mut acc, chunk| {
                for &i in chunk {
                    acc[i as usize] += 1;
                }
                acc
            },
        )
        .reduce(
            || vec![0u32; codes],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// Summary of a usage histogram.
///
/// ```
/// let s = vqx::usage::UsageSummary::from_counts(&[2, 2, 0, 0]);
/// assert_eq!(s.used, 2);
/// assert!((s.perplexity - 2.0).abs() < 1e-9);
/// ```
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct UsageSummary {
    /// exp(−Σ p_k log(p_k + 1e-10)), p the usage distribution (SPEC §5).
    pub perplexity: f64,
    /// Codes used at least once.
    pub used: usize,
    /// Total count.
    pub total: u64,
}

impl UsageSummary {
    pub fn from_counts(counts: &[u32]) -> Self {
        let total: u64 = counts.iter().map(|&c| c as u64).sum();
        let entropy: f64 = if total == 0 {
            0.0
        } else {
            counts
                .iter()
                .map(|&c| {
                    let p = c as f64 / total as f64;
                    -p * (p + 1e-10).ln()
                })
                .sum()
        };
        UsageSummary {
            perplexity: entropy.exp(),
            used: counts.iter().filter(|&&c| c > 0).count(),
            total,
        }
    }
}

/// The distribution of per-code values, typically the EMA counts N_k (SPEC §5): mean, standard
/// deviation, minimum, median and maximum.
///
/// `std` is the **population** standard deviation (divides by K, numpy's default `ddof=0`;
/// `torch.std` divides by K − 1 by default, larger by a factor √(K/(K−1)), 1.00012 at
/// K = 4096). The median of an even count is the mean of the two middle values (numpy's and
/// not torch's, which takes the lower one). Computed in f64. ESM3's released 4096-code
/// codebook gives mean 64.0, std 111.2, min 0.0005, median 48.25, max 3376.
///
/// ```
/// let d = vqx::usage::CountDistribution::from_values(&[4.0f32, 1.0, 0.0, 3.0])?;
/// assert_eq!((d.mean, d.min, d.median, d.max), (2.0, 0.0, 2.0, 4.0));
/// assert!((d.std - 2.5f64.sqrt()).abs() < 1e-12); // population: √(10/4)
/// # Ok::<(), vqx::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct CountDistribution {
    pub mean: f64,
    /// Population standard deviation (÷K).
    pub std: f64,
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl CountDistribution {
    /// Summarises `values` (f32, f64, u32, …); errors on an empty slice or a NaN/infinity.
    pub fn from_values<T: Copy + Into<f64>>(values: &[T]) -> Result<Self> {
        if values.is_empty() {
            return Err(crate::Error::Empty {
                what: "count distribution".into(),
                detail: "no values".into(),
            });
        }
        let mut v: Vec<f64> = values.iter().map(|&x| x.into()).collect();
        if let Some(pos) = v.iter().position(|x| !x.is_finite()) {
            return Err(crate::Error::NonFinite {
                what: "count distribution".into(),
                row: pos,
                col: 0,
                value: v[pos] as f32,
            });
        }
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        // Two passes: the mean first, then squared deviations (no cancellation).
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Ok(CountDistribution {
            mean,
            std: var.sqrt(),
            min: v[0],
            median,
            max: v[v.len() - 1],
        })
    }
}

/// Perplexity of non-negative weights normalised to a distribution (e.g. the EMA counts N_k):
/// exp(−Σ p_k log(p_k + 1e-10)), p = w / Σ w, the same formula as [`UsageSummary`]. All-zero
/// weights give 1.
///
/// ```
/// let p = vqx::usage::perplexity(&[2.0f32, 2.0, 0.0, 0.0]);
/// assert!((p - 2.0).abs() < 1e-6);
/// ```
pub fn perplexity<T: Copy + Into<f64>>(weights: &[T]) -> f64 {
    let total: f64 = weights.iter().map(|&w| w.into()).sum();
    if total <= 0.0 {
        return 1.0;
    }
    let entropy: f64 = weights
        .iter()
        .map(|&w| {
            let p = w.into() / total;
            -p * (p + 1e-10).ln()
        })
        .sum();
    entropy.exp()
}
