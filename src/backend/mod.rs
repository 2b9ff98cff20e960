//! Backends: one trait, two implementations that compute the same functions.
//!
//! [`CpuBackend`] is the reference and always works; [`CudaBackend`] runs the kernels in
//! `kernels/*.cu` through cudarc and is chosen by [`select`] only when libcuda, a device and the
//! compiled kernels are all present; [`EmuBackend`] runs the same kernels and launch code on an
//! emulated device on the CPU (`cuda-emu`: slow, for checking, never chosen by `auto`).

pub mod cpu;
pub mod cuda;

pub use cpu::CpuBackend;
pub use cuda::{CudaBackend, CudaStatus, EmuBackend};

use crate::ema::{CodeSums, SumMode};
use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};
use crate::nearest::cpu::CpuKernel;
use crate::nearest::{Assignment, CheckedRows, LowerBounds, Metric, Precision};
use std::time::Instant;

/// The four primitives of vector quantization.
///
/// Every method validates its inputs and returns a typed [`Error`] for bad ones; no method
/// panics on user input.
pub trait Backend: Send + Sync {
    /// The device this backend runs on: `Cpu`, `Cuda` or `CudaEmu` (never `Auto`).
    fn device(&self) -> Device;
    /// Short name: "cpu", "cuda" or "cuda-emu" (the device's).
    fn name(&self) -> &'static str {
        self.device().name()
    }
    /// One line on what runs: threads, GPU name and compute capability.
    fn describe(&self) -> String;
    /// What executes the kernels, for setting their times against its floors (`vqx bench`).
    /// The default follows [`Backend::device`]; the CPU backend names its `nearest` kernel.
    fn hardware(&self) -> Hardware {
        match self.device() {
            Device::Cuda => Hardware::Gpu,
            Device::CudaEmu => Hardware::Emulated,
            Device::Cpu | Device::Auto => Hardware::Cpu(CpuKernel::Auto.resolve()),
        }
    }
    /// Nearest code per row of `x` (SPEC §1). Never materialises the N×K distance matrix.
    fn nearest(&self, x: MatRef<'_>, codebook: MatRef<'_>, metric: Metric) -> Result<Assignment>;
    /// [`Backend::nearest`] and, per row, lower bounds on the squared distances to the winner
    /// and to every other code ([`LowerBounds`]): what the exact k-means bounds start from.
    fn nearest_with_bounds(
        &self,
        x: MatRef<'_>,
        codebook: MatRef<'_>,
        metric: Metric,
    ) -> Result<(Assignment, LowerBounds)>;
    /// [`Backend::nearest_with_bounds`] for the rows of `x` named by `rows`, in that order
    /// (result row t is row `rows[t]` of `x`): the exact k-means bounds search a different
    /// subset of the rows every pass. By default the rows are copied into a host matrix
    /// first (a device backend then uploads only those).
    fn nearest_rows_with_bounds(
        &self,
        x: &CheckedRows<'_>,
        rows: &[u32],
        codebook: MatRef<'_>,
        metric: Metric,
    ) -> Result<(Assignment, LowerBounds)> {
        crate::gather::validate(x.rows(), rows)?;
        let sub = crate::gather::cpu(x.rows(), rows);
        self.nearest_with_bounds(sub.as_ref(), codebook, metric)
    }
    /// What the exact k-means bounds need of [`Backend::nearest_rows_with_bounds`]: the
    /// winners (the exact search's, as ever) and the [`LowerBounds`], without the distances. A
    /// backend may score these searches at a lower precision and recheck close rows exactly
    /// (the CPU's bf16 screen); the bounds are then looser. By default: the full search.
    fn nearest_rows_for_bounds(
        &self,
        x: &CheckedRows<'_>,
        rows: &[u32],
        codebook: MatRef<'_>,
        metric: Metric,
    ) -> Result<(Vec<u32>, LowerBounds)> {
        let (a, bounds) = self.nearest_rows_with_bounds(x, rows, codebook, metric)?;
        Ok((a.indices, bounds))
    }
    /// Codebook rows named by `indices`, as an N×D matrix.
    fn gather(&self, codebook: MatRef<'_>, indices: &[u32]) -> Result<Matrix>;
    /// Per-code sums and counts of the rows of `x` assigned by `indices` (SPEC §4).
    fn code_sums(
        &self,
        x: MatRef<'_>,
        indices: &[u32],
        codes: usize,
        mode: SumMode,
    ) -> Result<CodeSums>;
    /// Exact histogram of `indices` over `codes` codes.
    fn usage(&self, indices: &[u32], codes: usize) -> Result<Vec<u32>>;

    /// Bytes this backend has copied between host and device memory so far (zero on the CPU,
    /// which has no device memory). The difference of two readings is what the calls between
    /// them moved across the bus.
    fn transfers(&self) -> Transfers {
        Transfers::default()
    }

    /// Median seconds per call of each primitive, `reps` runs after a warm-up.
    ///
    /// The default times the host-level calls with a wall clock. The CUDA backend overrides it
    /// to time the kernels alone with events, inputs resident on the device.
    fn time_primitives(
        &self,
        x: MatRef<'_>,
        codebook: MatRef<'_>,
        metric: Metric,
        reps: usize,
    ) -> Result<PrimitiveTimes> {
        let k = codebook.rows();
        let a = self.nearest(x, codebook, metric)?;
        let idx = &a.indices;
        Ok(PrimitiveTimes {
            nearest: median_secs(reps, || self.nearest(x, codebook, metric).map(drop))?,
            gather: median_secs(reps, || self.gather(codebook, idx).map(drop))?,
            code_sums: median_secs(reps, || self.code_sums(x, idx, k, SumMode::Fast).map(drop))?,
            code_sums_deterministic: median_secs(reps, || {
                self.code_sums(x, idx, k, SumMode::Deterministic).map(drop)
            })?,
            usage: median_secs(reps, || self.usage(idx, k).map(drop))?,
            timed_with: "wall clock around host calls",
        })
    }
}

/// What executes a backend's kernels: what bounds their speed.
///
/// ```
/// use vqx::backend::{Backend, CpuBackend, Hardware};
/// use vqx::nearest::cpu::CpuKernel;
/// let portable = CpuBackend::with_kernel(CpuKernel::Portable);
/// assert_eq!(portable.hardware(), Hardware::Cpu(CpuKernel::Portable));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hardware {
    /// The CPU's cores; `nearest` runs this kernel (as resolved for this CPU: never `Auto`).
    Cpu(CpuKernel),
    /// A CUDA GPU.
    Gpu,
    /// The emulated device: the CUDA kernels run on the CPU's cores.
    Emulated,
}

/// Bytes copied host → device and device → host, as counted by the device layer.
///
/// ```
/// use vqx::backend::Transfers;
/// let a = Transfers { h2d_bytes: 100, d2h_bytes: 8 };
/// let b = Transfers { h2d_bytes: 164, d2h_bytes: 12 };
/// assert_eq!(b.since(a), Transfers { h2d_bytes: 64, d2h_bytes: 4 });
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Transfers {
    pub h2d_bytes: u64,
    pub d2h_bytes: u64,
}

impl Transfers {
    /// What was moved between the reading `earlier` and this one.
    pub fn since(self, earlier: Transfers) -> Transfers {
        Transfers {
            h2d_bytes: self.h2d_bytes.saturating_sub(earlier.h2d_bytes),
            d2h_bytes: self.d2h_bytes.saturating_sub(earlier.d2h_bytes),
        }
    }
}

/// Median time per primitive, in seconds.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct PrimitiveTimes {
    pub nearest: f64,
    pub gather: f64,
    pub code_sums: f64,
    pub code_sums_deterministic: f64,
    pub usage: f64,
    /// How the times were taken.
    pub timed_with: &'static str,
}

/// Runs `f` once to warm up, then `reps` times; returns the median wall-clock seconds.
pub fn median_secs(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    median_timing(reps, &mut || Ok(()), &mut f, wall_clock)
}

/// The median of `reps` timings of `run` after one untimed warm-up, `before` run untimed
/// before each; `timed` runs `run` once and returns its seconds by some clock.
pub(crate) fn median_timing(
    reps: usize,
    before: &mut dyn FnMut() -> Result<()>,
    run: &mut dyn FnMut() -> Result<()>,
    mut timed: impl FnMut(&mut dyn FnMut() -> Result<()>) -> Result<f64>,
) -> Result<f64> {
    before()?;
    run()?;
    let mut times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        before()?;
        times.push(timed(run)?);
    }
    Ok(median(&mut times))
}

/// Seconds of one call of `run` by the wall clock.
pub(crate) fn wall_clock(run: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    run()?;
    Ok(t.elapsed().as_secs_f64())
}

/// Median of a non-empty list (sorts it).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// Which backend to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// CUDA when libcuda, a device and the kernels are all present; the CPU otherwise.
    #[default]
    Auto,
    Cpu,
    Cuda,
    /// The CUDA kernels and launch code on the emulated device (kernels/*.cu run on the CPU):
    /// a slow checking device, never chosen by `Auto`.
    CudaEmu,
}

// The names `--device` takes: "auto", "cpu", "cuda" or "cuda-emu".
crate::nearest::names!(Device, "device":
    Auto => ["auto"], Cpu => ["cpu"], Cuda => ["cuda", "gpu"], CudaEmu => ["cuda-emu", "cuda_emu"]);

/// The backend for `device`. `Auto` never fails and never panics: it falls back to the CPU.
/// `Cuda` fails with [`Error::CudaUnavailable`] saying why when CUDA cannot run.
///
/// ```
/// let b = vqx::backend::select(vqx::backend::Device::Cpu).unwrap();
/// assert_eq!(b.name(), "cpu");
/// ```
pub fn select(device: Device) -> Result<Box<dyn Backend>> {
    match device {
        Device::Cpu => Ok(Box::new(CpuBackend::new())),
        Device::Cuda => Ok(Box::new(CudaBackend::new(0)?)),
        Device::CudaEmu => Ok(Box::new(EmuBackend::new()?)),
        Device::Auto => match CudaBackend::new(0) {
            Ok(b) => Ok(Box::new(b)),
            Err(_) => Ok(Box::new(CpuBackend::new())),
        },
    }
}

/// The backend for `device` with `nearest` scoring at `precision`.
///
/// [`Precision::Exact`] is [`select`]. Tf32 and bf16 exist only on CUDA (tensor cores; the
/// emulated device runs the same kernels): with `Device::Cpu`, or `Device::Auto` where CUDA
/// cannot run, they are refused with
/// [`Error::InvalidArgument`] saying why (the CPU kernels compute exact f32 scores already;
/// `nearest::emulate` is a slow test oracle, not a backend).
pub fn select_with_precision(device: Device, precision: Precision) -> Result<Box<dyn Backend>> {
    if precision == Precision::Exact {
        return select(device);
    }
    let refuse = |why: String| {
        Error::InvalidArgument(format!(
            "--precision {precision} needs the CUDA backend (tensor cores); {why}. \
             Use --precision exact on the CPU."
        ))
    };
    match device {
        Device::Cpu => Err(refuse("--device cpu was asked for".into())),
        Device::CudaEmu => Ok(Box::new(EmuBackend::new()?.with_precision(precision))),
        Device::Cuda | Device::Auto => match CudaBackend::new(0) {
            Ok(b) => Ok(Box::new(b.with_precision(precision))),
            Err(e) if device == Device::Auto => Err(refuse(format!("CUDA is unavailable: {e}"))),
            Err(e) => Err(e),
        },
    }
}
