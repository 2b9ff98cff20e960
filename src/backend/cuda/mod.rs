//! The CUDA backend: the kernels of `kernels/*.cu` on a device, behind the [`Backend`] trait.
//!
//! One host-side implementation, [`GpuBackend`], over two devices:
//! - [`CudaGpu`] (`--device cuda`): a real GPU through cudarc, PTX compiled by nvcc in build.rs;
//! - [`EmuGpu`] (`--device cuda-emu`): the same .cu files compiled for the CPU and run by an
//!   emulator that treats every CUDA thread as a fiber and checks barriers and warp collectives.
//!   Slow, never chosen by `auto`: it is how every kernel and this launch code run in CI.
//!
//! Every primitive validates its inputs with the same `validate` function as the CPU backend
//! before anything is uploaded, so all backends fail alike on bad input. The nearest kernels
//! leave per row (best index, best score, runner-up score) in f32, and [`nearest::finish`]
//! rechecks in f64 the rows whose margin is inside the rounding bound: the indices are those
//! of an exact computation, identical to the CPU backend's.
//!
//! ```
//! use vqx::backend::{Backend, cuda::EmuBackend};
//! use vqx::{Matrix, nearest::Metric};
//! let b = EmuBackend::new()?;
//! let x = Matrix::new(vec![0.9, 0.1, -1.0, 0.2], 2, 2)?;
//! let c = Matrix::new(vec![1.0, 0.0, -1.0, 0.0], 2, 2)?;
//! assert_eq!(b.nearest(x.as_ref(), c.as_ref(), Metric::L2)?.indices, vec![0, 1]);
//! # Ok::<(), vqx::Error>(())
//! ```

mod device;
pub mod driver;
pub mod emu;
pub mod kernels;
pub mod launch;
pub mod mlp;
pub mod optim;
pub mod resident;
pub mod sort;
pub mod step;
mod timing;

pub use device::{Arg, Elem, GemmShape, Gpu, LaunchShape};
pub use driver::{CudaGpu, CudaStatus, KERNELS_COMPILED, status};
pub use emu::EmuGpu;
pub use launch::USAGE_SHARED_CODES;
pub use resident::{DeviceAssignment, DeviceCodebook, DeviceMatrix, OnDevice, Storage};

use super::{Backend, Device, PrimitiveTimes, Transfers};
use crate::ema::{self, CodeSums, SumMode};
use crate::error::Result;
use crate::matrix::{MatRef, Matrix};
use crate::nearest::{self, Assignment, Candidates, LowerBounds, Metric, Precision, Prepared};
use crate::{gather, usage};
use launch::{NearestInputs, NearestOut};

/// Rows per block of `nearest_f32` (kernels/tiles.cuh).
pub const NEAREST_ROWS_PER_BLOCK: usize = kernels::tiles::NEAREST_BM;
/// Codes per tile of `nearest_f32` (kernels/tiles.cuh).
pub const NEAREST_CODES_PER_TILE: usize = kernels::tiles::NEAREST_BN;
/// Dimensions per shared-memory chunk of `nearest_f32` (kernels/tiles.cuh).
pub const NEAREST_DIM_CHUNK: usize = kernels::tiles::NEAREST_BK;
/// Rows per block of the tensor-core kernels (kernels/tiles.cuh).
pub const NEAREST_TC_ROWS_PER_BLOCK: usize = kernels::tiles::TC_BM;

/// The four primitives on one device.
///
/// `nearest` scores at the backend's [`Precision`] (exact f32 unless [`Self::with_precision`]
/// says otherwise); whatever the precision, rows whose margin is inside its rounding bound are
/// recomputed exactly, so the indices are the same.
pub struct GpuBackend<G: Gpu> {
    gpu: G,
    precision: Precision,
}

/// The backend on a real GPU (`--device cuda`).
pub type CudaBackend = GpuBackend<CudaGpu>;
/// The backend on the emulated device (`--device cuda-emu`).
pub type EmuBackend = GpuBackend<EmuGpu>;

impl CudaBackend {
    /// Opens device `ordinal` and loads every kernel module once.
    ///
    /// Fails with [`crate::Error::CudaUnavailable`] (never panics) when the kernels were not
    /// compiled into this build, libcuda is missing or the device cannot be opened.
    pub fn new(ordinal: usize) -> Result<Self> {
        Ok(GpuBackend::on(CudaGpu::new(ordinal)?))
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> &str {
        self.gpu.device_name()
    }

    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.gpu.compute_capability()
    }
}

impl EmuBackend {
    /// The emulated device: every kernel of kernels/*.cu, run on the CPU.
    pub fn new() -> Result<Self> {
        Ok(GpuBackend::on(EmuGpu::new()?))
    }
}

impl<G: Gpu> GpuBackend<G> {
    /// The backend on `gpu`, scoring `nearest` exactly.
    pub fn on(gpu: G) -> Self {
        GpuBackend {
            gpu,
            precision: Precision::Exact,
        }
    }

    /// This backend with `nearest` scoring at `precision`: [`Precision::Exact`] runs
    /// `nearest_f32`, [`Precision::Tf32`] / [`Precision::Bf16`] the tensor-core kernels of
    /// kernels/nearest_tc.cu, re-checked against their wider rounding bound.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// The precision `nearest` scores at.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The device.
    pub fn gpu(&self) -> &G {
        &self.gpu
    }

    /// The nearest code of every row of `x` into `out`, on the device: scored at this
    /// backend's precision, rechecked on the device (the indices are those of an exact
    /// computation). Rows already on the device ([`DeviceMatrix`]) are read in place; host rows
    /// ([`MatRef`]) are uploaded first. See [`resident::nearest`].
    pub fn nearest_device<'a>(
        &self,
        x: impl Into<Storage<'a, G>>,
        codebook: &DeviceCodebook<G>,
        out: &mut DeviceAssignment<G>,
    ) -> Result<()> {
        let x = x.into().on_device(&self.gpu, "input")?;
        resident::nearest(&self.gpu, self.precision, &x, codebook, out)
    }

    /// `out` (n × D) = the codebook rows named by the n `indices` (all < K), on the device.
    pub fn gather_device(
        &self,
        codebook: &DeviceMatrix<G>,
        indices: &G::Buf<u32>,
        out: &mut DeviceMatrix<G>,
    ) -> Result<()> {
        let (n, d) = (out.rows(), out.cols());
        device_shape("gathered rows vs codebook", d, codebook.cols(), "columns")?;
        launch::check_len(&self.gpu, indices, n, "indices")?;
        launch::gather(&self.gpu, codebook.buf(), indices, out.buf_mut(), n, d)
    }

    /// Per-code sums (K × D) and counts (K) of the rows of `x` by `indices` (one per row, all
    /// < K), accumulated with atomics ([`SumMode::Fast`]) on the device.
    pub fn code_sums_device(
        &self,
        x: &DeviceMatrix<G>,
        indices: &G::Buf<u32>,
        sums: &mut DeviceMatrix<G>,
        counts: &mut G::Buf<u32>,
    ) -> Result<()> {
        let g = &self.gpu;
        let (n, d, k) = (x.rows(), x.cols(), sums.rows());
        device_shape("sums vs input", d, sums.cols(), "columns")?;
        launch::check_len(g, indices, n, "indices")?;
        launch::check_len(g, counts, k, "counts")?;
        g.zero("sums", sums.buf_mut())?;
        g.zero("counts", counts)?;
        launch::sums_atomic(g, x.buf(), indices, sums.buf_mut(), counts, n, d)
    }

    /// The histogram of the first `n` `indices` (all < K) into `counts` (K values), on the
    /// device.
    pub fn usage_device(
        &self,
        indices: &G::Buf<u32>,
        n: usize,
        counts: &mut G::Buf<u32>,
    ) -> Result<()> {
        let g = &self.gpu;
        launch::check_len(g, indices, n, "indices")?;
        let k = g.len(counts);
        g.zero("counts", counts)?;
        if n == 0 {
            return Ok(());
        }
        launch::usage(g, indices, counts, n, k)
    }

    /// Per-row candidates of the fused exact-f32 kernel, before [`nearest::finish`]: `x` is
    /// the raw input (normalised here for cosine), `prepared` comes from the same codebook.
    ///
    /// Inputs must already be validated with [`nearest::validate`].
    pub fn candidates(
        &self,
        x: MatRef<'_>,
        codebook: MatRef<'_>,
        prepared: &Prepared,
    ) -> Result<Candidates> {
        self.candidates_with_precision(x, codebook, prepared, Precision::Exact)
    }

    /// Per-row candidates of the kernel for `precision` (`nearest_f32`, `nearest_tf32` or
    /// `nearest_bf16`), before [`nearest::finish`], which must then use
    /// [`Precision::model`]`(precision)`. The operands are uploaded in f32; the tensor-core
    /// kernels round them as they stage them to shared memory (no conversion kernel).
    ///
    /// Inputs must already be validated with [`nearest::validate`].
    pub fn candidates_with_precision(
        &self,
        x: MatRef<'_>,
        codebook: MatRef<'_>,
        prepared: &Prepared,
        precision: Precision,
    ) -> Result<Candidates> {
        let g = &self.gpu;
        let input = NearestInputs::upload(g, x, codebook, prepared)?;
        let mut out = NearestOut::new(g, input.n)?;
        launch::nearest(g, precision, &input, &mut out)?;
        Ok(Candidates {
            best: g.download("best indices", &out.best)?,
            best_score: g.download("best scores", &out.best_score)?,
            second_score: g.download("runner-up scores", &out.second_score)?,
            row_norm_sq: None,
            shortlist: None,
        })
    }
}

/// Fails with [`crate::Error::Shape`] unless two sizes agree.
fn device_shape(what: &str, got: usize, expected: usize, unit: &str) -> Result<()> {
    if got != expected {
        return Err(crate::Error::shape(
            what,
            format!("{expected} {unit}"),
            format!("{got} {unit}"),
        ));
    }
    Ok(())
}

impl<G: Gpu> Backend for GpuBackend<G> {
    fn device(&self) -> Device {
        self.gpu.device()
    }

    fn describe(&self) -> String {
        format!(
            "{}: {}; nearest at precision {} ({})",
            self.name(),
            self.gpu.describe(),
            self.precision,
            match self.precision {
                Precision::Exact => "exact f32 SIMT kernel",
                Precision::Tf32 | Precision::Bf16 => {
                    "tensor-core kernel, margins inside the bound rechecked exactly"
                }
            }
        )
    }

    fn nearest(&self, x: MatRef<'_>, codebook: MatRef<'_>, metric: Metric) -> Result<Assignment> {
        nearest::validate(x, codebook)?;
        let g = &self.gpu;
        let cb =
            DeviceCodebook::from_device(g, DeviceMatrix::upload(g, "codebook", codebook)?, metric)?;
        let x = DeviceMatrix::upload(g, "x", x)?;
        let mut out = DeviceAssignment::new(g, x.rows())?;
        self.nearest_device(&x, &cb, &mut out)?;
        out.fetch(g)
    }

    fn nearest_with_bounds(
        &self,
        x: MatRef<'_>,
        codebook: MatRef<'_>,
        metric: Metric,
    ) -> Result<(Assignment, LowerBounds)> {
        nearest::search_with_bounds(x, codebook, metric, self.precision, |prepared| {
            self.candidates_with_precision(x, codebook, prepared, self.precision)
        })
    }

    fn gather(&self, codebook: MatRef<'_>, indices: &[u32]) -> Result<Matrix> {
        gather::validate(codebook, indices)?;
        let g = &self.gpu;
        let (n, d) = (indices.len(), codebook.cols());
        if n == 0 {
            return Ok(Matrix::zeros(0, d));
        }
        let c_d = g.upload("codebook", codebook.data())?;
        let i_d = g.upload("indices", indices)?;
        let mut out = g.alloc_zeros::<f32>("gathered rows", n * d)?;
        launch::gather(g, &c_d, &i_d, &mut out, n, d)?;
        Matrix::new(g.download("gathered rows", &out)?, n, d)
    }

    fn code_sums(
        &self,
        x: MatRef<'_>,
        indices: &[u32],
        codes: usize,
        mode: SumMode,
    ) -> Result<CodeSums> {
        ema::validate(x, indices, codes)?;
        let g = &self.gpu;
        let (n, d) = (x.rows(), x.cols());
        let x_d = g.upload("x", x.data())?;
        let i_d = g.upload("indices", indices)?;
        let mut sums = g.alloc_zeros::<f32>("sums", codes * d)?;
        let mut counts = g.alloc_zeros::<u32>("counts", codes)?;
        match mode {
            SumMode::Fast => {
                launch::sums_atomic(g, &x_d, &i_d, &mut sums, &mut counts, n, d)?;
            }
            SumMode::Deterministic => {
                // The counting sort runs on the device: only x and the indices cross the bus.
                let mut scratch = sort::SortScratch::new();
                sort::code_sums_deterministic(
                    g,
                    &x_d,
                    &i_d,
                    n,
                    d,
                    codes,
                    &mut sums,
                    &mut counts,
                    &mut scratch,
                )?;
            }
        }
        Ok(CodeSums {
            sums: g.download("sums", &sums)?,
            counts: g.download("counts", &counts)?,
            mode,
        })
    }

    fn usage(&self, indices: &[u32], codes: usize) -> Result<Vec<u32>> {
        usage::validate(indices, codes)?;
        if indices.is_empty() {
            return Ok(vec![0; codes]);
        }
        let g = &self.gpu;
        let i_d = g.upload("indices", indices)?;
        let mut counts = g.alloc_zeros::<u32>("counts", codes)?;
        launch::usage(g, &i_d, &mut counts, indices.len(), codes)?;
        g.download("counts", &counts)
    }

    fn transfers(&self) -> Transfers {
        self.gpu.transfers()
    }

    fn time_primitives(
        &self,
        x: MatRef<'_>,
        codebook: MatRef<'_>,
        metric: Metric,
        reps: usize,
    ) -> Result<PrimitiveTimes> {
        timing::time_primitives(&self.gpu, self.precision, x, codebook, metric, reps)
    }
}
