//! The EMA codebook rule (SPEC §4): decayed counts N_k and sums m_k, Laplace-smoothed into the
//! codebook c_k = m_k / Ñ_k.
//!
//! Arithmetic follows vector-quantize-pytorch, so that from the same codebook and batches both
//! give the same codebook and counts: state in f32, each update a lerp
//! `old + (1 − γ)·(new − old)` evaluated as one fused multiply-add (what `torch.lerp_` does on
//! the CPU for weights below 0.5), the data-seeded start N = 1, m = c.

use super::CodeSums;
use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};

/// Decayed per-code counts and sums.
///
/// ```
/// use vqx::ema::{CodeSums, EmaState, SumMode};
/// let codebook = vqx::Matrix::new(vec![0.0, 0.0, 1.0, 1.0], 2, 2)?;
/// let mut ema = EmaState::seeded(codebook.as_ref());
/// // One batch: both rows went to code 1, summing to (4, 4).
/// let batch = CodeSums { sums: vec![0.0, 0.0, 4.0, 4.0], counts: vec![0, 2], mode: SumMode::Fast };
/// ema.update(&batch, 0.5)?;
/// assert_eq!(ema.cluster_size(), &[0.5, 1.5]);
/// let c = ema.codebook(1e-5);
/// assert!((c.row(1)[0] - 2.5 / 1.5).abs() < 1e-4);
/// # Ok::<(), vqx::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct EmaState {
    /// N_k, K values.
    cluster_size: Vec<f32>,
    /// m_k, K × D row-major.
    embed_avg: Vec<f32>,
    dim: usize,
}

impl EmaState {
    /// The data-seeded start of VideoGPT/ESM3 and vector-quantize-pytorch: N_k = 1, m_k = c_k.
    pub fn seeded(codebook: MatRef<'_>) -> Self {
        EmaState {
            cluster_size: vec![1.0; codebook.rows()],
            embed_avg: codebook.data().to_vec(),
            dim: codebook.cols(),
        }
    }

    /// State from stored counts (K) and sums (K × D), e.g. a checkpoint.
    pub fn from_parts(cluster_size: Vec<f32>, embed_avg: Matrix) -> Result<Self> {
        if cluster_size.len() != embed_avg.rows() {
            return Err(Error::shape(
                "EMA counts vs EMA sums",
                format!("{} counts (one per row of the sums)", embed_avg.rows()),
                format!("{} counts", cluster_size.len()),
            ));
        }
        let what = "EMA state";
        embed_avg.as_ref().check_finite(what)?;
        if let Some(k) = cluster_size.iter().position(|v| !v.is_finite() || *v < 0.0) {
            return Err(Error::InvalidArgument(format!(
                "{what}: count of code {k} is {}; counts must be finite and ≥ 0",
                cluster_size[k]
            )));
        }
        let dim = embed_avg.cols();
        Ok(EmaState {
            cluster_size,
            embed_avg: embed_avg.into_vec(),
            dim,
        })
    }

    pub fn codes(&self) -> usize {
        self.cluster_size.len()
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// N_k.
    pub fn cluster_size(&self) -> &[f32] {
        &self.cluster_size
    }
    /// m_k, K × D.
    pub fn embed_avg(&self) -> MatRef<'_> {
        MatRef::new(&self.embed_avg, self.codes(), self.dim).expect("shape kept by construction")
    }

    /// N_k ← N_k + (1 − γ)(n_k − N_k), m_k ← m_k + (1 − γ)(s_k − m_k).
    pub fn update(&mut self, batch: &CodeSums, decay: f32) -> Result<()> {
        if batch.counts.len() != self.codes() || batch.sums.len() != self.embed_avg.len() {
            return Err(Error::shape(
                "batch statistics vs EMA state",
                format!("{} codes × {}", self.codes(), self.dim),
                format!(
                    "{} counts and {} sums",
                    batch.counts.len(),
                    batch.sums.len()
                ),
            ));
        }
        // torch computes the weight as a Python double, then uses it as f32.
        let w = (1.0 - decay as f64) as f32;
        let lerp = |old: &mut f32, new: f32| *old = w.mul_add(new - *old, *old);
        for (n, &c) in self.cluster_size.iter_mut().zip(&batch.counts) {
            lerp(n, c as f32);
        }
        for (m, &s) in self.embed_avg.iter_mut().zip(&batch.sums) {
            lerp(m, s);
        }
        Ok(())
    }

    /// Laplace-smoothed counts Ñ_k = (N_k + ε) / (Σ_j N_j + K ε) · Σ_j N_j.
    pub fn smoothed_counts(&self, eps: f32) -> Vec<f32> {
        let total: f32 = self.cluster_size.iter().sum();
        let denom = total + self.codes() as f32 * eps;
        self.cluster_size
            .iter()
            .map(|&n| (n + eps) / denom * total)
            .collect()
    }

    /// The codebook the state implies: c_k = m_k / Ñ_k.
    pub fn codebook(&self, eps: f32) -> Matrix {
        let smoothed = self.smoothed_counts(eps);
        let mut data = self.embed_avg.clone();
        if self.dim > 0 {
            for (row, &n) in data.chunks_mut(self.dim).zip(&smoothed) {
                row.iter_mut().for_each(|v| *v /= n);
            }
        }
        Matrix::new(data, self.codes(), self.dim).expect("shape kept by construction")
    }

    /// Re-seeds code `k` at `row` with count `count`: N_k = count, m_k = count · row.
    pub fn reset(&mut self, k: usize, row: &[f32], count: f32) {
        self.cluster_size[k] = count;
        for (m, &v) in self.embed_avg[k * self.dim..(k + 1) * self.dim]
            .iter_mut()
            .zip(row)
        {
            *m = v * count;
        }
    }
}
