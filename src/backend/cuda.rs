//! The CUDA backend: the kernels of `kernels/*.cu`, compiled to PTX by build.rs and launched
//! through cudarc's driver API (libcuda loaded at run time, so the crate builds and runs without
//! a toolkit or a GPU).
//!
//! Every primitive validates its inputs with the same `validate` function as the CPU backend
//! before anything is uploaded, so both backends fail alike on bad input. The nearest kernel
//! leaves per row (best index, best score, runner-up score) in f32, and
//! [`nearest::finish`] rechecks in f64 the rows whose margin is inside the f32 rounding bound:
//! the indices are those of an exact computation, identical to the CPU backend's.

use super::{Backend, PrimitiveTimes};
use crate::ema::{self, CodeSums, SumMode};
use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};
use crate::nearest::{self, Assignment, Candidates, Metric, Precision, Prepared};
use crate::{gather, usage};
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, DriverError, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use std::panic::catch_unwind;
use std::sync::Arc;

/// Whether kernels were compiled into this build (nvcc was found by build.rs).
pub const KERNELS_COMPILED: bool = cfg!(vqx_kernels);

/// What build.rs said about the kernels: how they were compiled, or why not.
const KERNELS_STATUS: &str = env!("VQX_KERNELS_STATUS");

/// The PTX of each module, by op family: (module, source text).
#[cfg(vqx_kernels)]
const PTX: Option<[(&str, &str); 5]> = Some([
    (
        "nearest",
        include_str!(concat!(env!("OUT_DIR"), "/nearest.ptx")),
    ),
    (
        "nearest_tc",
        include_str!(concat!(env!("OUT_DIR"), "/nearest_tc.ptx")),
    ),
    (
        "gather",
        include_str!(concat!(env!("OUT_DIR"), "/gather.ptx")),
    ),
    ("ema", include_str!(concat!(env!("OUT_DIR"), "/ema.ptx"))),
    (
        "usage",
        include_str!(concat!(env!("OUT_DIR"), "/usage.ptx")),
    ),
]);
#[cfg(not(vqx_kernels))]
const PTX: Option<[(&str, &str); 5]> = None;

/// Rows per block of `nearest_f32` (NEAREST_BM in kernels/nearest.cu).
pub const NEAREST_ROWS_PER_BLOCK: usize = 128;
/// Codes per tile of `nearest_f32` (NEAREST_BN in kernels/nearest.cu).
pub const NEAREST_CODES_PER_TILE: usize = 128;
/// Dimensions per shared-memory chunk of `nearest_f32` (NEAREST_BK in kernels/nearest.cu).
pub const NEAREST_DIM_CHUNK: usize = 8;
/// Threads per block of `nearest_f32`, `nearest_tf32` and `nearest_bf16` (fixed by the
/// kernels' thread mappings).
const NEAREST_THREADS: u32 = 256;
/// Rows per block of the tensor-core kernels `nearest_tf32` / `nearest_bf16` (TC_BM in
/// kernels/nearest_tc.cu).
pub const NEAREST_TC_ROWS_PER_BLOCK: usize = 128;
/// Threads per block of the grid-stride kernels.
const BLOCK: u32 = 256;
/// Largest per-block histogram `usage_u32` keeps in shared memory, in codes (48 KiB of u32).
pub const USAGE_SHARED_CODES: usize = 48 * 1024 / 4;

/// Where CUDA stands on this machine.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CudaStatus {
    /// A device was found and the kernels are compiled in: `--device cuda` will run.
    pub available: bool,
    /// Why not, or what runs.
    pub reason: String,
    pub kernels_compiled: bool,
    pub device_name: Option<String>,
    pub compute_capability: Option<(i32, i32)>,
}

/// Probes libcuda and device 0 without panicking and without loading kernels.
pub fn status() -> CudaStatus {
    let (device_name, compute_capability, device_err) = match open_context(0) {
        Ok(ctx) => (
            ctx.name().ok(),
            ctx.compute_capability().ok(),
            None::<String>,
        ),
        Err(e) => (None, None, Some(e)),
    };
    let (available, reason) = match (&device_err, KERNELS_COMPILED) {
        (Some(e), _) if !KERNELS_COMPILED => (false, format!("{KERNELS_STATUS}; {e}")),
        (Some(e), _) => (false, e.clone()),
        (None, false) => (false, KERNELS_STATUS.to_string()),
        (None, true) => (true, KERNELS_STATUS.to_string()),
    };
    CudaStatus {
        available,
        reason,
        kernels_compiled: KERNELS_COMPILED,
        device_name,
        compute_capability,
    }
}

/// Opens the primary context of device `ordinal`, or says why not. Never panics: cudarc's
/// `CudaContext::new` panics when libcuda is absent, so libcuda is probed first and the call
/// is also wrapped in `catch_unwind`.
fn open_context(ordinal: usize) -> std::result::Result<Arc<CudaContext>, String> {
    let probe = catch_unwind(|| {
        // SAFETY: only tries to dlopen libcuda by its usual names and drops the handle; no
        // symbol of it is called.
        unsafe { cudarc::driver::sys::is_culib_present() }
    });
    match probe {
        Ok(true) => {}
        Ok(false) => return Err("libcuda not found (no NVIDIA driver on this machine)".into()),
        Err(_) => return Err("probing libcuda panicked".into()),
    }
    match catch_unwind(|| CudaContext::new(ordinal)) {
        Ok(Ok(ctx)) => Ok(ctx),
        Ok(Err(e)) => Err(format!("no usable CUDA device {ordinal}: {e}")),
        Err(_) => Err(format!(
            "opening CUDA device {ordinal} panicked (libcuda too old or incomplete?)"
        )),
    }
}

fn cuda_err(op: &str, e: DriverError) -> Error {
    Error::Cuda {
        op: op.to_string(),
        msg: e.to_string(),
    }
}

/// Maps a driver error to [`Error::Cuda`] naming the operation.
trait OrCuda<T> {
    fn op(self, op: &str) -> Result<T>;
}
impl<T> OrCuda<T> for std::result::Result<T, DriverError> {
    fn op(self, op: &str) -> Result<T> {
        self.map_err(|e| cuda_err(op, e))
    }
}

/// The kernels, loaded once per backend.
struct Kernels {
    nearest_f32: CudaFunction,
    nearest_tf32: CudaFunction,
    nearest_bf16: CudaFunction,
    gather_f32: CudaFunction,
    gather_f32x4: CudaFunction,
    ema_sums_atomic_f32: CudaFunction,
    ema_sums_sorted_f32: CudaFunction,
    usage_u32: CudaFunction,
}

impl Kernels {
    fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        let Some(modules) = PTX else {
            return Err(Error::CudaUnavailable(KERNELS_STATUS.to_string()));
        };
        let mut loaded = Vec::with_capacity(modules.len());
        for (name, src) in modules {
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(src))
                .op(&format!("loading PTX module {name}"))?;
            loaded.push((name, m));
        }
        let func = |module: &str, f: &str| -> Result<CudaFunction> {
            let (_, m) = loaded
                .iter()
                .find(|(n, _)| *n == module)
                .expect("every module in PTX is loaded above");
            m.load_function(f).op(&format!("loading kernel {f}"))
        };
        Ok(Kernels {
            nearest_f32: func("nearest", "nearest_f32")?,
            nearest_tf32: func("nearest_tc", "nearest_tf32")?,
            nearest_bf16: func("nearest_tc", "nearest_bf16")?,
            gather_f32: func("gather", "gather_f32")?,
            gather_f32x4: func("gather", "gather_f32x4")?,
            ema_sums_atomic_f32: func("ema", "ema_sums_atomic_f32")?,
            ema_sums_sorted_f32: func("ema", "ema_sums_sorted_f32")?,
            usage_u32: func("usage", "usage_u32")?,
        })
    }
}

/// Runs the four primitives on one CUDA device (the default stream of its primary context).
///
/// `nearest` scores at the backend's [`Precision`] (exact f32 unless [`Self::with_precision`]
/// says otherwise); whatever the precision, rows whose margin is inside its rounding bound are
/// recomputed exactly, so the indices are the same.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    precision: Precision,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    name: String,
    compute_capability: (i32, i32),
    sm_count: u32,
}

/// Converts a count to the i64 the kernels take.
fn i64_of(v: usize, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::InvalidArgument(format!("{what} = {v} exceeds i64")))
}

/// Blocks for a grid-stride kernel over `total` items: enough to fill the device, no more.
fn grid_stride_blocks(total: usize, per_block: u32, cap: u32) -> u32 {
    let need = total.div_ceil(per_block as usize).max(1);
    need.min(cap.max(1) as usize) as u32
}

impl CudaBackend {
    /// Opens device `ordinal` and loads every kernel module once.
    ///
    /// Fails with [`Error::CudaUnavailable`] (never panics) when the kernels were not compiled
    /// into this build, libcuda is missing or the device cannot be opened.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !KERNELS_COMPILED {
            return Err(Error::CudaUnavailable(KERNELS_STATUS.to_string()));
        }
        let ctx = open_context(ordinal).map_err(Error::CudaUnavailable)?;
        let stream = ctx.default_stream();
        let kernels = Kernels::load(&ctx)?;
        let name = ctx.name().op("querying the device name")?;
        let compute_capability = ctx
            .compute_capability()
            .op("querying the compute capability")?;
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .op("querying the SM count")?
            .max(1) as u32;
        Ok(CudaBackend {
            ctx,
            precision: Precision::Exact,
            stream,
            kernels,
            name,
            compute_capability,
            sm_count,
        })
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

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    fn upload<T: DeviceRepr>(&self, what: &str, v: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(v)
            .op(&format!("uploading {what} ({} elements)", v.len()))
    }

    fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        what: &str,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len)
            .op(&format!("allocating {what} ({len} elements)"))
    }

    fn download<T: DeviceRepr>(&self, what: &str, v: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(v)
            .op(&format!("downloading {what} ({} elements)", v.len()))
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
        let n = x.rows();
        let scored = prepared.scored(codebook);
        let normalized;
        let xs = match prepared.metric() {
            Metric::L2 => x.data(),
            Metric::Cosine => {
                normalized = nearest::normalize_rows(x);
                normalized.data()
            }
        };
        let x_d = self.upload("x", xs)?;
        let c_d = self.upload("codebook", scored.data())?;
        let norms_d = self.upload("code norms", prepared.norms())?;
        let mut out = NearestOut::new(self, n)?;
        self.launch_nearest(
            precision,
            &x_d,
            &c_d,
            &norms_d,
            &mut out,
            n,
            scored.rows(),
            x.cols(),
        )?;
        Ok(Candidates {
            best: self.download("best indices", &out.best)?,
            best_score: self.download("best scores", &out.best_score)?,
            second_score: self.download("runner-up scores", &out.second_score)?,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_nearest(
        &self,
        precision: Precision,
        x: &CudaSlice<f32>,
        codebook: &CudaSlice<f32>,
        norms: &CudaSlice<f32>,
        out: &mut NearestOut,
        n: usize,
        k: usize,
        d: usize,
    ) -> Result<()> {
        let (f, op, rows_per_block) = match precision {
            Precision::Exact => (
                &self.kernels.nearest_f32,
                "nearest_f32",
                NEAREST_ROWS_PER_BLOCK,
            ),
            Precision::Tf32 => (
                &self.kernels.nearest_tf32,
                "nearest_tf32",
                NEAREST_TC_ROWS_PER_BLOCK,
            ),
            Precision::Bf16 => (
                &self.kernels.nearest_bf16,
                "nearest_bf16",
                NEAREST_TC_ROWS_PER_BLOCK,
            ),
        };
        let blocks = n.div_ceil(rows_per_block);
        let blocks = u32::try_from(blocks)
            .ok()
            .filter(|&b| b <= i32::MAX as u32)
            .ok_or_else(|| Error::InvalidArgument(format!("{n} rows exceed the CUDA grid")))?;
        let d32 = i32::try_from(d)
            .map_err(|_| Error::InvalidArgument(format!("dimension {d} exceeds i32")))?;
        let (n64, k64) = (i64_of(n, "rows")?, i64_of(k, "codes")?);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (NEAREST_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(x)
            .arg(codebook)
            .arg(norms)
            .arg(&mut out.best)
            .arg(&mut out.best_score)
            .arg(&mut out.second_score)
            .arg(&n64)
            .arg(&k64)
            .arg(&d32);
        // SAFETY: the argument list matches the signature shared by nearest_f32, nearest_tf32
        // and nearest_bf16 (3 const f32 pointers, u32/f32/f32 outputs, i64 n, i64 k, i32 d).
        // x holds n·d, codebook k·d and norms k floats; each output holds n elements. The
        // kernels read rows < n and codes < k only (16-byte loads only when d % 4 == 0, on
        // cudarc's 256-byte-aligned allocations, at offsets that are multiples of 4 floats) and
        // write outputs[r] for r < n only; block = 256 threads and grid = ceil(n / 128) blocks
        // are the shapes they are written for; all use static shared memory only (≤ 46 KiB).
        unsafe { b.launch(cfg) }.op(op)?;
        Ok(())
    }

    fn launch_gather(
        &self,
        codebook: &CudaSlice<f32>,
        indices: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        let vec4 = d.is_multiple_of(4);
        let (f, width, op) = if vec4 {
            (&self.kernels.gather_f32x4, d / 4, "gather_f32x4")
        } else {
            (&self.kernels.gather_f32, d, "gather_f32")
        };
        let total = n * width;
        let cfg = LaunchConfig {
            grid_dim: (grid_stride_blocks(total, BLOCK, self.sm_count * 32), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n64, w64) = (i64_of(n, "rows")?, i64_of(width, "row width")?);
        let mut b = self.stream.launch_builder(f);
        b.arg(codebook).arg(indices).arg(out).arg(&n64).arg(&w64);
        // SAFETY: arguments match gather_f32(const float*, const u32*, float*, i64 n, i64 d) and
        // gather_f32x4 (the same over float4, width d/4, chosen only when d % 4 == 0 so every
        // row is a whole number of 16-byte-aligned float4: cudarc allocations are 256-byte
        // aligned). indices holds n values, all < K (checked by gather::validate), codebook holds
        // K·d floats, out holds n·d floats; the grid-stride loop stays below n·width.
        unsafe { b.launch(cfg) }.op(op)?;
        Ok(())
    }

    fn launch_sums_atomic(
        &self,
        x: &CudaSlice<f32>,
        indices: &CudaSlice<u32>,
        sums: &mut CudaSlice<f32>,
        counts: &mut CudaSlice<u32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        const OP: &str = "ema_sums_atomic_f32";
        let cfg = LaunchConfig {
            grid_dim: (grid_stride_blocks(n * d, BLOCK, self.sm_count * 32), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n64, d64) = (i64_of(n, "rows")?, i64_of(d, "dimension")?);
        let mut b = self
            .stream
            .launch_builder(&self.kernels.ema_sums_atomic_f32);
        b.arg(x)
            .arg(indices)
            .arg(sums)
            .arg(counts)
            .arg(&n64)
            .arg(&d64);
        // SAFETY: arguments match ema_sums_atomic_f32(const float* x, const u32* idx,
        // float* sums, u32* counts, i64 n, i64 d). x holds n·d floats, idx n values all < K
        // (ema::validate), sums K·d floats and counts K values, zeroed by the caller; the
        // grid-stride loop stays below n·d.
        unsafe { b.launch(cfg) }.op(OP)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_sums_sorted(
        &self,
        x: &CudaSlice<f32>,
        offsets: &CudaSlice<u64>,
        rows: &CudaSlice<u32>,
        sums: &mut CudaSlice<f32>,
        counts: &mut CudaSlice<u32>,
        k: usize,
        d: usize,
    ) -> Result<()> {
        const OP: &str = "ema_sums_sorted_f32";
        let threads = (d.div_ceil(32) * 32).clamp(32, 256) as u32;
        let cfg = LaunchConfig {
            grid_dim: (k.min(1 << 24) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (k64, d64) = (i64_of(k, "codes")?, i64_of(d, "dimension")?);
        let mut b = self
            .stream
            .launch_builder(&self.kernels.ema_sums_sorted_f32);
        b.arg(x)
            .arg(offsets)
            .arg(rows)
            .arg(sums)
            .arg(counts)
            .arg(&k64)
            .arg(&d64);
        // SAFETY: arguments match ema_sums_sorted_f32(const float* x, const u64* offsets,
        // const u32* rows, float* sums, u32* counts, i64 k, i64 d). offsets holds k + 1
        // non-decreasing values ending at n = rows.len() (ema::group_by_code), every row id is
        // < n and x holds n·d floats; sums holds k·d floats and counts k values. Block b writes
        // only codes b, b + grid, … < k.
        unsafe { b.launch(cfg) }.op(OP)?;
        Ok(())
    }

    fn launch_usage(
        &self,
        indices: &CudaSlice<u32>,
        counts: &mut CudaSlice<u32>,
        n: usize,
        k: usize,
    ) -> Result<()> {
        const OP: &str = "usage_u32";
        let privatised = k <= USAGE_SHARED_CODES;
        let cfg = LaunchConfig {
            grid_dim: (grid_stride_blocks(n, BLOCK, self.sm_count * 4), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: if privatised { (k * 4) as u32 } else { 0 },
        };
        let n64 = i64_of(n, "indices")?;
        let k32 = u32::try_from(k)
            .map_err(|_| Error::InvalidArgument(format!("{k} codes exceed u32")))?;
        let flag = i32::from(privatised);
        let mut b = self.stream.launch_builder(&self.kernels.usage_u32);
        b.arg(indices).arg(counts).arg(&n64).arg(&k32).arg(&flag);
        // SAFETY: arguments match usage_u32(const u32* idx, u32* counts, i64 n, u32 k,
        // i32 privatised). idx holds n values all < k (usage::validate), counts holds k zeroed
        // values; when privatised the dynamic shared memory is 4·k ≤ 48 KiB bytes, exactly the
        // k bins the kernel indexes.
        unsafe { b.launch(cfg) }.op(OP)?;
        Ok(())
    }

    /// Median milliseconds of `launch`, timed with CUDA events after one warm-up; `before`
    /// runs outside the timed region (e.g. zeroing an accumulator).
    fn time_events(
        &self,
        op: &str,
        reps: usize,
        mut before: impl FnMut() -> Result<()>,
        mut launch: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        before()?;
        launch()?;
        let mut times = Vec::with_capacity(reps.max(1));
        for _ in 0..reps.max(1) {
            before()?;
            let start = self
                .ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .op(op)?;
            let end = self
                .ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .op(op)?;
            start.record(&self.stream).op(op)?;
            launch()?;
            end.record(&self.stream).op(op)?;
            let ms = start.elapsed_ms(&end).op(op)?;
            times.push(ms as f64 * 1e-3);
        }
        Ok(super::median(&mut times))
    }
}

/// Device outputs of the nearest kernel.
struct NearestOut {
    best: CudaSlice<u32>,
    best_score: CudaSlice<f32>,
    second_score: CudaSlice<f32>,
}

impl NearestOut {
    fn new(b: &CudaBackend, n: usize) -> Result<Self> {
        Ok(NearestOut {
            best: b.zeros("best indices", n)?,
            best_score: b.zeros("best scores", n)?,
            second_score: b.zeros("runner-up scores", n)?,
        })
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn describe(&self) -> String {
        let (major, minor) = self.compute_capability;
        format!(
            "cuda: {}, compute capability {major}.{minor}, {} SMs; nearest at precision {} \
             ({}; PTX compute_80, JIT-loaded)",
            self.name,
            self.sm_count,
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
        nearest::search_with_precision(x, codebook, metric, self.precision, |prepared| {
            self.candidates_with_precision(x, codebook, prepared, self.precision)
        })
    }

    fn gather(&self, codebook: MatRef<'_>, indices: &[u32]) -> Result<Matrix> {
        gather::validate(codebook, indices)?;
        let (n, d) = (indices.len(), codebook.cols());
        if n == 0 {
            return Ok(Matrix::zeros(0, d));
        }
        let c_d = self.upload("codebook", codebook.data())?;
        let i_d = self.upload("indices", indices)?;
        let mut out = self.zeros::<f32>("gathered rows", n * d)?;
        self.launch_gather(&c_d, &i_d, &mut out, n, d)?;
        Matrix::new(self.download("gathered rows", &out)?, n, d)
    }

    fn code_sums(
        &self,
        x: MatRef<'_>,
        indices: &[u32],
        codes: usize,
        mode: SumMode,
    ) -> Result<CodeSums> {
        ema::validate(x, indices, codes)?;
        let (n, d) = (x.rows(), x.cols());
        let x_d = self.upload("x", x.data())?;
        let mut sums = self.zeros::<f32>("sums", codes * d)?;
        let mut counts = self.zeros::<u32>("counts", codes)?;
        match mode {
            SumMode::Fast => {
                let i_d = self.upload("indices", indices)?;
                self.launch_sums_atomic(&x_d, &i_d, &mut sums, &mut counts, n, d)?;
            }
            SumMode::Deterministic => {
                let (offsets, rows) = ema::group_by_code(indices, codes);
                let offsets: Vec<u64> = offsets.into_iter().map(|o| o as u64).collect();
                let o_d = self.upload("code offsets", &offsets)?;
                let r_d = self.upload("row ids", &rows)?;
                self.launch_sums_sorted(&x_d, &o_d, &r_d, &mut sums, &mut counts, codes, d)?;
            }
        }
        Ok(CodeSums {
            sums: self.download("sums", &sums)?,
            counts: self.download("counts", &counts)?,
            mode,
        })
    }

    fn usage(&self, indices: &[u32], codes: usize) -> Result<Vec<u32>> {
        usage::validate(indices, codes)?;
        if indices.is_empty() {
            return Ok(vec![0; codes]);
        }
        let i_d = self.upload("indices", indices)?;
        let mut counts = self.zeros::<u32>("counts", codes)?;
        self.launch_usage(&i_d, &mut counts, indices.len(), codes)?;
        self.download("counts", &counts)
    }

    /// Times each kernel alone with CUDA events, inputs resident on the device: the nearest
    /// kernel (without the host recheck), gather, both sum kernels (the deterministic one with
    /// its offsets and row ids already uploaded: the host counting sort is not timed) and the
    /// histogram. The indices fed to the last four are the nearest kernel's own output.
    fn time_primitives(
        &self,
        x: MatRef<'_>,
        codebook: MatRef<'_>,
        metric: Metric,
        reps: usize,
    ) -> Result<PrimitiveTimes> {
        nearest::validate(x, codebook)?;
        let (n, d, k) = (x.rows(), x.cols(), codebook.rows());
        let prepared = Prepared::new(codebook, metric);
        let scored = prepared.scored(codebook);
        let normalized;
        let xs = match metric {
            Metric::L2 => x.data(),
            Metric::Cosine => {
                normalized = nearest::normalize_rows(x);
                normalized.data()
            }
        };
        let x_d = self.upload("x", xs)?;
        let c_d = self.upload("codebook", scored.data())?;
        let norms_d = self.upload("code norms", prepared.norms())?;
        let mut out = NearestOut::new(self, n)?;

        let t_nearest = self.time_events(
            &format!("timing nearest ({})", self.precision),
            reps,
            || Ok(()),
            || self.launch_nearest(self.precision, &x_d, &c_d, &norms_d, &mut out, n, k, d),
        )?;

        let idx_d = &out.best;
        let mut gathered = self.zeros::<f32>("gathered rows", n * d)?;
        let t_gather = self.time_events(
            "timing gather",
            reps,
            || Ok(()),
            || self.launch_gather(&c_d, idx_d, &mut gathered, n, d),
        )?;
        drop(gathered);

        let mut sums = self.zeros::<f32>("sums", k * d)?;
        let mut counts = self.zeros::<u32>("counts", k)?;
        let t_sums = {
            let (s, c) = (&mut sums, &mut counts);
            // Zeroing runs outside the timed region; two closures cannot both borrow the
            // accumulators mutably at once, so they share them through a RefCell.
            let cell = std::cell::RefCell::new((s, c));
            self.time_events(
                "timing ema_sums_atomic_f32",
                reps,
                || {
                    let mut g = cell.borrow_mut();
                    let (s, c) = &mut *g;
                    self.stream.memset_zeros(*s).op("zeroing sums")?;
                    self.stream.memset_zeros(*c).op("zeroing counts")
                },
                || {
                    let mut g = cell.borrow_mut();
                    let (s, c) = &mut *g;
                    self.launch_sums_atomic(&x_d, idx_d, s, c, n, d)
                },
            )?
        };

        let indices = self.download("indices", idx_d)?;
        let (offsets, rows) = ema::group_by_code(&indices, k);
        let offsets: Vec<u64> = offsets.into_iter().map(|o| o as u64).collect();
        let o_d = self.upload("code offsets", &offsets)?;
        let r_d = self.upload("row ids", &rows)?;
        let t_sorted = self.time_events(
            "timing ema_sums_sorted_f32",
            reps,
            || Ok(()),
            || self.launch_sums_sorted(&x_d, &o_d, &r_d, &mut sums, &mut counts, k, d),
        )?;

        let t_usage = {
            let cell = std::cell::RefCell::new(&mut counts);
            self.time_events(
                "timing usage_u32",
                reps,
                || {
                    let mut c = cell.borrow_mut();
                    self.stream.memset_zeros(*c).op("zeroing counts")
                },
                || {
                    let mut c = cell.borrow_mut();
                    self.launch_usage(idx_d, *c, n, k)
                },
            )?
        };

        Ok(PrimitiveTimes {
            nearest: t_nearest,
            gather: t_gather,
            code_sums: t_sums,
            code_sums_deterministic: t_sorted,
            usage: t_usage,
            timed_with: "CUDA events around the kernels",
        })
    }
}
