//! The CPU backend: rayon threads over row blocks, the reference every kernel is tested against.

use super::Backend;
use crate::ema::{self, CodeSums, SumMode};
use crate::error::Result;
use crate::matrix::{MatRef, Matrix};
use crate::nearest::{self, Assignment, Metric};
use crate::{gather, usage};

/// Runs every primitive on the CPU with rayon's global thread pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn describe(&self) -> String {
        format!(
            "cpu: {} rayon threads, f32 GEMM tiles through the `gemm` crate",
            rayon::current_num_threads()
        )
    }
    fn nearest(&self, x: MatRef<'_>, codebook: MatRef<'_>, metric: Metric) -> Result<Assignment> {
        nearest::validate(x, codebook)?;
        let prepared = nearest::Prepared::new(codebook, metric);
        let candidates = nearest::cpu::candidates(x, codebook, &prepared);
        Ok(nearest::finish(
            x,
            codebook,
            &prepared,
            nearest::RoundingModel::F32,
            candidates,
        ))
    }
    fn gather(&self, codebook: MatRef<'_>, indices: &[u32]) -> Result<Matrix> {
        gather::validate(codebook, indices)?;
        Ok(gather::cpu(codebook, indices))
    }
    fn code_sums(
        &self,
        x: MatRef<'_>,
        indices: &[u32],
        codes: usize,
        mode: SumMode,
    ) -> Result<CodeSums> {
        ema::validate(x, indices, codes)?;
        Ok(ema::cpu(x, indices, codes, mode))
    }
    fn usage(&self, indices: &[u32], codes: usize) -> Result<Vec<u32>> {
        usage::validate(indices, codes)?;
        Ok(usage::cpu(indices, codes))
    }
}
