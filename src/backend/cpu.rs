//! The CPU backend: rayon threads over row blocks, the reference every kernel is tested against.

use super::{Backend, Device, Hardware};
use crate::ema::{self, CodeSums, SumMode};
use crate::error::Result;
use crate::matrix::{MatRef, Matrix};
use crate::nearest::cpu::CpuKernel;
use crate::nearest::{self, Assignment, LowerBounds, Metric, Precision};
use crate::{gather, usage};

/// Runs every primitive on the CPU with rayon's global thread pool.
///
/// ```
/// use vqx::backend::{Backend, CpuBackend};
/// use vqx::nearest::cpu::CpuKernel;
/// let portable = CpuBackend::with_kernel(CpuKernel::Portable);
/// assert!(portable.describe().contains("portable"));
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend {
    kernel: CpuKernel,
}

impl CpuBackend {
    /// The fastest kernel this CPU supports.
    pub fn new() -> Self {
        CpuBackend::default()
    }
    /// A backend whose nearest search uses `kernel` (where the CPU supports it).
    pub fn with_kernel(kernel: CpuKernel) -> Self {
        CpuBackend { kernel }
    }

    /// Whether [`Backend::nearest_approx`] scores in bf16: with the AVX-512 kernel on a CPU
    /// with AVX512_BF16.
    fn approx_in_bf16(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self.kernel.resolve() == CpuKernel::Avx512 && nearest::avx512::bf16_available()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn hardware(&self) -> Hardware {
        Hardware::Cpu(self.kernel.resolve())
    }
    fn describe(&self) -> String {
        let kernel = match self.kernel.resolve() {
            CpuKernel::Avx512 if self.approx_in_bf16() => {
                "fused AVX-512 nearest kernel (approximate searches in bf16)"
            }
            CpuKernel::Avx512 => "fused AVX-512 nearest kernel",
            _ => "portable nearest (f32 GEMM tiles through the `gemm` crate)",
        };
        format!(
            "cpu: {} rayon threads, {kernel}",
            rayon::current_num_threads()
        )
    }
    fn nearest(&self, x: MatRef<'_>, codebook: MatRef<'_>, metric: Metric) -> Result<Assignment> {
        nearest::search(x, codebook, metric, |prepared| {
            Ok(nearest::cpu::candidates_with(
                self.kernel,
                x,
                codebook,
                prepared,
            ))
        })
    }
    fn nearest_approx(&self, x: MatRef<'_>, codebook: MatRef<'_>) -> Result<Assignment> {
        #[cfg(target_arch = "x86_64")]
        if self.approx_in_bf16() {
            use rayon::prelude::*;
            nearest::validate(x, codebook)?;
            let prepared = nearest::Prepared::new(codebook, Metric::L2);
            let rows = nearest::Rows::all(x);
            let c = nearest::avx512::candidates_bf16(rows, codebook, &prepared);
            let distances = c
                .best
                .par_iter()
                .enumerate()
                .with_min_len(1024)
                .map(|(i, &k)| nearest::l2_sq_f32(x.row(i), codebook.row(k as usize)))
                .collect();
            return Ok(Assignment {
                indices: c.best,
                distances,
                rechecked: 0,
            });
        }
        self.nearest(x, codebook, Metric::L2)
    }
    fn nearest_with_bounds(
        &self,
        x: MatRef<'_>,
        codebook: MatRef<'_>,
        metric: Metric,
    ) -> Result<(Assignment, LowerBounds)> {
        nearest::search_with_bounds(x, codebook, metric, Precision::Exact, |prepared| {
            Ok(nearest::cpu::candidates_with(
                self.kernel,
                x,
                codebook,
                prepared,
            ))
        })
    }
    fn nearest_rows_with_bounds(
        &self,
        x: &nearest::CheckedRows<'_>,
        rows: &[u32],
        codebook: MatRef<'_>,
        metric: Metric,
    ) -> Result<(Assignment, LowerBounds)> {
        nearest::search_picked_with_bounds(
            x,
            rows,
            codebook,
            metric,
            Precision::Exact,
            |picked, prepared| {
                Ok(nearest::cpu::candidates_rows(
                    self.kernel,
                    picked,
                    codebook,
                    prepared,
                ))
            },
        )
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
