//! A real GPU through cudarc's driver API: probing (never panics), module loading, buffers,
//! launches on the default stream of the primary context, and event timing. libcuda is loaded
//! at run time, so the crate builds and runs without a toolkit or a GPU.

use super::device::{Arg, Elem, GemmShape, Gpu, LaunchShape, TransferCounter};
use super::kernels::{self, KernelId};
use crate::backend::{Device, Transfers, median_timing};
use crate::error::{Error, Result};
use cudarc::driver::sys::{self, CUdevice_attribute, CUevent_flags};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use std::panic::catch_unwind;
use std::sync::Arc;

/// Whether PTX for a real GPU was compiled into this build (nvcc was found by build.rs).
pub const KERNELS_COMPILED: bool = kernels::PTX.is_some();

/// What build.rs said about the PTX: how it was compiled, or why not.
pub(crate) const KERNELS_STATUS: &str = env!("VQX_KERNELS_STATUS");

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
        (Some(e), false) => (false, format!("{KERNELS_STATUS}; {e}")),
        (Some(e), true) => (false, e.clone()),
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
pub(crate) fn open_context(ordinal: usize) -> std::result::Result<Arc<CudaContext>, String> {
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

/// Maps a driver error to [`Error::Cuda`] naming the operation.
trait OrCuda<T> {
    fn op(self, op: &str) -> Result<T>;
}
impl<T> OrCuda<T> for std::result::Result<T, DriverError> {
    fn op(self, op: &str) -> Result<T> {
        self.map_err(|e| Error::Cuda {
            op: op.to_string(),
            msg: e.to_string(),
        })
    }
}

/// One CUDA device: the default stream of its primary context and every kernel, loaded once.
pub struct CudaGpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: Vec<CudaFunction>,
    name: String,
    compute_capability: (i32, i32),
    sm_count: u32,
    transfers: TransferCounter,
    blas: std::sync::OnceLock<cudarc::cublas::CudaBlas>,
}

impl CudaGpu {
    /// Opens device `ordinal` and loads every module of [`kernels::MODULES`].
    ///
    /// Fails with [`Error::CudaUnavailable`] (never panics) when the PTX was not compiled into
    /// this build, libcuda is missing or the device cannot be opened.
    pub fn new(ordinal: usize) -> Result<Self> {
        let Some(ptx) = kernels::PTX else {
            return Err(Error::CudaUnavailable(KERNELS_STATUS.to_string()));
        };
        let ctx = open_context(ordinal).map_err(Error::CudaUnavailable)?;
        Self::build(&ptx, ctx.default_stream())
    }

    /// The device of `stream`, every launch and copy on that stream: a caller that owns its
    /// stream (another cudarc user such as candle, same cudarc) gets vqx's kernels ordered
    /// after its own work without synchronising.
    pub fn on_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let Some(ptx) = kernels::PTX else {
            return Err(Error::CudaUnavailable(KERNELS_STATUS.to_string()));
        };
        Self::build(&ptx, stream)
    }

    /// The device of a raw `CUstream` owned by the caller (e.g. PyTorch's current stream),
    /// on device `ordinal`'s primary context; the stream is borrowed, never destroyed.
    ///
    /// # Safety
    /// `stream` must be a valid stream of device `ordinal`'s primary context (or null for
    /// its legacy default stream) and outlive the returned device.
    pub unsafe fn on_raw_stream(ordinal: usize, stream: sys::CUstream) -> Result<Self> {
        let ctx = open_context(ordinal).map_err(Error::CudaUnavailable)?;
        // SAFETY: forwarded from this function's contract.
        let stream = unsafe { ctx.wrap_borrowed_stream(stream) };
        Self::on_stream(stream)
    }

    /// cuBLAS on this device's stream, created on first use: libcublas is loaded only by
    /// programs that multiply matrices on the device (`vqx train`), never by the primitives.
    fn blas(&self) -> Result<&cudarc::cublas::CudaBlas> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        let stream = self.stream.clone();
        let made = catch_unwind(move || cudarc::cublas::CudaBlas::new(stream))
            .map_err(|_| {
                Error::CudaUnavailable("loading libcublas panicked (is cuBLAS installed?)".into())
            })?
            .map_err(|e| Error::CudaUnavailable(format!("creating a cuBLAS handle: {e}")))?;
        Ok(self.blas.get_or_init(|| made))
    }

    /// The stream every launch and copy goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn build(ptx: &[&str], stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context().clone();
        let mut modules = Vec::with_capacity(ptx.len());
        for (name, src) in kernels::MODULES.iter().zip(ptx) {
            modules.push(
                ctx.load_module(cudarc::nvrtc::Ptx::from_src(*src))
                    .op(&format!("loading PTX module {name}"))?,
            );
        }
        let functions = KernelId::all()
            .map(|k| {
                modules[kernels::KERNELS[k.0].1]
                    .load_function(k.name())
                    .op(&format!("loading kernel {}", k.name()))
            })
            .collect::<Result<Vec<_>>>()?;
        let name = ctx.name().op("querying the device name")?;
        let compute_capability = ctx
            .compute_capability()
            .op("querying the compute capability")?;
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .op("querying the SM count")?
            .max(1) as u32;
        Ok(CudaGpu {
            ctx,
            stream,
            functions,
            name,
            compute_capability,
            sm_count,
            transfers: TransferCounter::default(),
            blas: std::sync::OnceLock::new(),
        })
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }
}

impl Gpu for CudaGpu {
    type Buf<T: Elem> = CudaSlice<T>;

    fn device(&self) -> Device {
        Device::Cuda
    }

    fn describe(&self) -> String {
        let (major, minor) = self.compute_capability;
        format!(
            "{}, compute capability {major}.{minor}, {} SMs; PTX {}, JIT-loaded",
            self.name,
            self.sm_count,
            super::kernels::PTX_ARCH
        )
    }

    fn sm_count(&self) -> u32 {
        self.sm_count
    }

    fn alloc_zeros<T: Elem>(&self, what: &str, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len)
            .op(&format!("allocating {what} ({len} elements)"))
    }

    fn upload<T: Elem>(&self, what: &str, src: &[T]) -> Result<CudaSlice<T>> {
        self.transfers.host_to_device::<T>(src.len());
        self.stream
            .clone_htod(src)
            .op(&format!("uploading {what} ({} elements)", src.len()))
    }

    fn download<T: Elem>(&self, what: &str, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        self.transfers.device_to_host::<T>(buf.len());
        self.stream
            .clone_dtoh(buf)
            .op(&format!("downloading {what} ({} elements)", buf.len()))
    }

    fn zero<T: Elem>(&self, what: &str, buf: &mut CudaSlice<T>) -> Result<()> {
        self.stream.memset_zeros(buf).op(&format!("zeroing {what}"))
    }

    fn write_checked<T: Elem>(&self, what: &str, dst: &mut CudaSlice<T>, src: &[T]) -> Result<()> {
        self.transfers.host_to_device::<T>(src.len());
        self.stream
            .memcpy_htod(src, &mut dst.slice_mut(..src.len()))
            .op(&format!("writing {what} ({} elements)", src.len()))
    }

    fn copy_range_checked<T: Elem>(
        &self,
        what: &str,
        src: &CudaSlice<T>,
        src_at: usize,
        dst: &mut CudaSlice<T>,
        dst_at: usize,
        len: usize,
    ) -> Result<()> {
        self.stream
            .memcpy_dtod(
                &src.slice(src_at..src_at + len),
                &mut dst.slice_mut(dst_at..dst_at + len),
            )
            .op(&format!("copying {what} on the device ({len} elements)"))
    }

    fn read_checked<T: Elem>(
        &self,
        what: &str,
        buf: &CudaSlice<T>,
        start: usize,
        len: usize,
    ) -> Result<Vec<T>> {
        self.transfers.device_to_host::<T>(len);
        self.stream
            .clone_dtoh(&buf.slice(start..start + len))
            .op(&format!("reading {what} ({len} elements)"))
    }

    unsafe fn borrow_raw<T: Elem>(&self, ptr: u64, len: usize) -> CudaSlice<T> {
        // SAFETY: forwarded from this method's contract; release_borrowed leaks the slice so
        // cudarc never frees the caller's allocation.
        unsafe { self.stream.upgrade_device_ptr(ptr, len) }
    }

    fn release_borrowed<T: Elem>(buf: CudaSlice<T>) {
        buf.leak();
    }

    fn len<T: Elem>(&self, buf: &CudaSlice<T>) -> usize {
        buf.len()
    }

    fn transfers(&self) -> Transfers {
        self.transfers.get()
    }

    unsafe fn launch(
        &self,
        kernel: KernelId,
        shape: LaunchShape,
        args: &mut [Arg<'_, Self>],
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: shape.grid,
            block_dim: shape.block,
            shared_mem_bytes: shape.shared_bytes,
        };
        let mut b = self.stream.launch_builder(&self.functions[kernel.0]);
        for a in args.iter_mut() {
            match a {
                Arg::F32(s) => b.arg(*s),
                Arg::F32Mut(s) => b.arg(&mut **s),
                Arg::U32(s) => b.arg(*s),
                Arg::U32Mut(s) => b.arg(&mut **s),
                Arg::U64(s) => b.arg(*s),
                Arg::U64Mut(s) => b.arg(&mut **s),
                Arg::F64(s) => b.arg(*s),
                Arg::F64Mut(s) => b.arg(&mut **s),
                Arg::F32Val(v) => b.arg(&*v),
                Arg::F64Val(v) => b.arg(&*v),
                Arg::I64(v) => b.arg(&*v),
                Arg::I32(v) => b.arg(&*v),
                Arg::U32Val(v) => b.arg(&*v),
            };
        }
        // SAFETY: the caller guarantees (this method's contract) that `args` match the
        // kernel's parameters and that every buffer covers what the kernel touches for them.
        unsafe { b.launch(cfg) }.op(kernel.name())?;
        Ok(())
    }

    fn gemm(
        &self,
        shape: GemmShape,
        out: &mut CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
    ) -> Result<()> {
        use cudarc::cublas::{Gemm, GemmConfig, sys::cublasOperation_t as Op};
        let (m, n, k) = shape.check(self, out, a, b)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let int = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| {
                Error::InvalidArgument(format!("matrix product: {what} = {v} exceeds cuBLAS's int"))
            })
        };
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        // cuBLAS is column-major, where a row-major r×c buffer reads as its c×r transpose:
        // C (m×n, row-major) = op(A)·op(B) is Cᵀ = op(B)ᵀ·op(A)ᵀ (n×m, column-major), i.e.
        // cuBLAS's gemm with the operands swapped and each one's own transpose flag.
        let cfg = GemmConfig {
            transa: op(shape.tb),
            transb: op(shape.ta),
            m: int(n, "n")?,
            n: int(m, "m")?,
            k: int(k.max(1), "k")?,
            alpha: 1.0f32,
            lda: int(shape.b.1.max(1), "ldb")?,
            ldb: int(shape.a.1.max(1), "lda")?,
            beta: if shape.accumulate { 1.0 } else { 0.0 },
            ldc: int(n, "ldc")?,
        };
        let blas = self.blas()?;
        if k == 0 {
            if !shape.accumulate {
                self.stream
                    .memset_zeros(out)
                    .op("zeroing a matrix product")?;
            }
            return Ok(());
        }
        // SAFETY: the shapes were checked against the buffers' lengths above (a: m·k or k·m,
        // b: k·n or n·k, out: m·n values), and the leading dimensions are the stored rows'
        // widths, so cuBLAS reads and writes inside the three buffers only.
        unsafe { blas.gemm(cfg, b, a, out) }.map_err(|e| Error::Cuda {
            op: "cublasSgemm".into(),
            msg: e.to_string(),
        })
    }

    fn time(
        &self,
        op: &str,
        reps: usize,
        before: &mut dyn FnMut() -> Result<()>,
        launch: &mut dyn FnMut() -> Result<()>,
    ) -> Result<f64> {
        median_timing(reps, before, launch, |launch| {
            let event = || {
                self.ctx
                    .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .op(op)
            };
            let (start, end) = (event()?, event()?);
            start.record(&self.stream).op(op)?;
            launch()?;
            end.record(&self.stream).op(op)?;
            Ok(start.elapsed_ms(&end).op(op)? as f64 * 1e-3)
        })
    }

    fn timed_with(&self) -> &'static str {
        "CUDA events around the kernels"
    }
}
