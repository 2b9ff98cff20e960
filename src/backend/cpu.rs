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
#[derive(Clone, Copy, Debug)]
pub struct CpuBackend {
    kernel: CpuKernel,
    bf16_screen: bool,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend {
            kernel: CpuKernel::Auto,
            bf16_screen: true,
        }
    }
}

/// Largest |value| the bf16 screen takes (rows and codes): far from f32's and bf16's overflow
/// (products below 2^80), so every screened score is finite.
#[cfg(target_arch = "x86_64")]
const SCREEN_MAX_ABS: f32 = (1u64 << 40) as f32;

impl CpuBackend {
    /// The fastest kernel this CPU supports.
    pub fn new() -> Self {
        CpuBackend::default()
    }
    /// A backend whose nearest search uses `kernel` (where the CPU supports it).
    pub fn with_kernel(kernel: CpuKernel) -> Self {
        CpuBackend {
            kernel,
            ..CpuBackend::default()
        }
    }
    /// Whether k-means' bounded searches ([`Backend::nearest_rows_for_bounds`]) may score in
    /// bf16 first, on CPUs with AVX512_BF16 and under the AVX-512 kernel (on by default). The
    /// indices are the exact search's either way (`nearest::avx512::screen_bf16`); only the
    /// lower bounds are looser.
    pub fn with_bf16_screen(self, on: bool) -> Self {
        CpuBackend {
            bf16_screen: on,
            ..self
        }
    }
    /// Whether the bf16 screen runs at all on this CPU with this backend.
    fn screens(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self.bf16_screen
            && self.kernel.resolve() == CpuKernel::Avx512
            && nearest::avx512::bf16_available()
        {
            return true;
        }
        false
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
            CpuKernel::Avx512 if self.screens() => {
                "fused AVX-512 nearest kernel; k-means searches screened in bf16 (AVX512_BF16)"
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
            Precision::Exact.model(),
            |picked, prepared| {
                Ok(nearest::cpu::candidates_rows(
                    self.kernel,
                    picked,
                    codebook,
                    prepared,
                ))
            },
            true,
        )
    }
    fn nearest_rows_for_bounds(
        &self,
        x: &nearest::CheckedRows<'_>,
        rows: &[u32],
        codebook: MatRef<'_>,
        metric: Metric,
    ) -> Result<(Vec<u32>, LowerBounds)> {
        #[cfg(target_arch = "x86_64")]
        if self.screens()
            && metric == Metric::L2
            && x.max_abs() <= SCREEN_MAX_ABS
            && codebook.data().iter().all(|v| v.abs() <= SCREEN_MAX_ABS)
        {
            let (a, bounds) = nearest::search_picked_with_bounds(
                x,
                rows,
                codebook,
                metric,
                nearest::RoundingModel::BF16_F32_SUMS,
                |picked, prepared| Ok(nearest::avx512::screen_bf16(picked, codebook, prepared)),
                false,
            )?;
            return Ok((a.indices, bounds));
        }
        let (a, bounds) = self.nearest_rows_with_bounds(x, rows, codebook, metric)?;
        Ok((a.indices, bounds))
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
