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
