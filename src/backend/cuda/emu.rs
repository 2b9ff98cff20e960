//! The emulated device (`cuda-emu`): the unmodified kernels/*.cu compiled for the CPU by build.rs
//! with emu/device.h, and run by emu/runtime.cpp — every CUDA thread a fiber, `__syncthreads`
//! and warp collectives as checked barriers, blocks over a pool of OS threads. Device memory is
//! host memory allocated to the exact size, so a sanitizer build (scripts/sanitize.sh) sees a
//! read past the end.
//!
//! A slow checking device: it executes the real kernels and the real launch code, never chosen
//! by `--device auto`. What it can and cannot tell is in docs/gpu.md.

use super::device::{Arg, Elem, GemmShape, Gpu, LaunchShape, TransferCounter};
use super::kernels::{KERNELS, KernelId};
use crate::backend::{Device, Transfers, median_timing, wall_clock};
use crate::error::{Error, Result};
use crate::matrix::MatRef;
use std::ffi::{CStr, c_char, c_void};

/// The C side's `vqx_emu_kernel` (emu/vqx_emu.h).
#[repr(C)]
struct RawKernel {
    name: *const c_char,
    module: *const c_char,
    arity: usize,
    param_sizes: *const usize,
    invoke: unsafe extern "C" fn(*mut *mut c_void),
    dyn_shared: Option<unsafe extern "C" fn() -> *mut c_void>,
}

unsafe extern "C" {
    fn vqx_emu_kernels(count: *mut usize) -> *const RawKernel;
    fn vqx_emu_launch(
        kernel: *const RawKernel,
        grid: *const u32,
        block: *const u32,
        dyn_shared_bytes: usize,
        params: *mut *mut c_void,
        n_params: usize,
        param_sizes: *const usize,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn vqx_emu_describe() -> *const c_char;
}

/// SM count the emulated device reports: small, so that grid-stride loops really stride.
pub const EMU_SM_COUNT: u32 = 2;

/// A buffer of the emulated device: host memory of exactly `len` elements.
pub struct EmuBuf<T> {
    data: Box<[T]>,
}

impl<T> EmuBuf<T> {
    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The emulated device.
pub struct EmuGpu {
    /// The C runtime's kernel entry for each [`KernelId`].
    kernels: Vec<*const RawKernel>,
    sm_count: u32,
    transfers: TransferCounter,
}

// SAFETY: the raw pointers point into the emulator's static kernel table, which is immutable
// and lives for the whole process; vqx_emu_launch serialises launches internally.
unsafe impl Send for EmuGpu {}
// SAFETY: as for Send: only immutable static data is shared.
unsafe impl Sync for EmuGpu {}

impl EmuGpu {
    /// The emulated device with every kernel of [`super::kernels::KERNELS`] resolved.
    pub fn new() -> Result<Self> {
        let table = Self::table();
        let kernels = KERNELS
            .iter()
            .map(|(name, _)| {
                table
                    .iter()
                    // SAFETY: every entry's name is a static NUL-terminated string.
                    .find(|k| unsafe { CStr::from_ptr(k.name) }.to_bytes() == name.as_bytes())
                    .map(|k| k as *const RawKernel)
                    .ok_or_else(|| {
                        Error::CudaUnavailable(format!(
                            "the emulated device has no kernel {name} (build.rs out of date?)"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(EmuGpu {
            kernels,
            sm_count: EMU_SM_COUNT,
            transfers: TransferCounter::default(),
        })
    }

    /// Every kernel the emulator was built with.
    fn table() -> &'static [RawKernel] {
        let mut count = 0usize;
        // SAFETY: vqx_emu_kernels writes the table length and returns a pointer to a static
        // array of that many entries (build.rs's registry.cpp), alive for the whole process.
        unsafe {
            let p = vqx_emu_kernels(&mut count);
            std::slice::from_raw_parts(p, count)
        }
    }

    /// This device reporting `sm_count` SMs (grid-stride grids are sized from it).
    pub fn with_sm_count(mut self, sm_count: u32) -> Self {
        self.sm_count = sm_count.max(1);
        self
    }

    /// How the emulator was built and runs (threads, context switch, sanitizers).
    pub fn runtime() -> String {
        // SAFETY: returns a static NUL-terminated string.
        unsafe { CStr::from_ptr(vqx_emu_describe()) }
            .to_string_lossy()
            .into_owned()
    }

    /// Launches a kernel of the emulator's registry by name, including the emulator's own test
    /// kernels of emu/faults.cu (for tests of the emulator itself).
    ///
    /// # Safety
    /// As [`Gpu::launch`]: `args` must match the kernel and cover what it touches.
    #[doc(hidden)]
    pub unsafe fn launch_by_name(
        &self,
        name: &str,
        shape: LaunchShape,
        args: &mut [Arg<'_, Self>],
    ) -> Result<()> {
        let kernel = Self::table()
            .iter()
            // SAFETY: every entry's name is a static NUL-terminated string.
            .find(|k| unsafe { CStr::from_ptr(k.name) }.to_bytes() == name.as_bytes())
            .ok_or_else(|| Error::InvalidArgument(format!("no emulated kernel {name}")))?;
        // SAFETY: forwarded from this method's contract.
        unsafe { launch_raw(kernel, name, shape, args) }
    }

    /// The parameter sizes the C side recorded for `kernel` (its arity and `sizeof` each).
    pub fn param_sizes(&self, kernel: KernelId) -> Vec<usize> {
        // SAFETY: the entry is static; param_sizes holds `arity` values.
        unsafe {
            let k = &*self.kernels[kernel.0];
            std::slice::from_raw_parts(k.param_sizes, k.arity).to_vec()
        }
    }
}

/// Which sanitizers the emulator was built with (`VQX_EMU_SANITIZE`), "none" normally.
pub const SANITIZE: &str = env!("VQX_EMU_SANITIZE");

impl Gpu for EmuGpu {
    type Buf<T: Elem> = EmuBuf<T>;

    fn device(&self) -> Device {
        Device::CudaEmu
    }

    fn describe(&self) -> String {
        format!(
            "emulated device (kernels/*.cu on the CPU: a slow checking device), {} SMs reported, {}",
            self.sm_count,
            Self::runtime()
        )
    }

    fn sm_count(&self) -> u32 {
        self.sm_count
    }

    fn alloc_zeros<T: Elem>(&self, _what: &str, len: usize) -> Result<EmuBuf<T>> {
        Ok(EmuBuf {
            data: vec![T::default(); len].into_boxed_slice(),
        })
    }

    fn upload<T: Elem>(&self, _what: &str, src: &[T]) -> Result<EmuBuf<T>> {
        self.transfers.host_to_device::<T>(src.len());
        Ok(EmuBuf {
            data: src.to_vec().into_boxed_slice(),
        })
    }

    fn download<T: Elem>(&self, _what: &str, buf: &EmuBuf<T>) -> Result<Vec<T>> {
        self.transfers.device_to_host::<T>(buf.len());
        Ok(buf.data.to_vec())
    }

    fn zero<T: Elem>(&self, _what: &str, buf: &mut EmuBuf<T>) -> Result<()> {
        buf.data.fill(T::default());
        Ok(())
    }

    fn write_checked<T: Elem>(&self, _what: &str, dst: &mut EmuBuf<T>, src: &[T]) -> Result<()> {
        self.transfers.host_to_device::<T>(src.len());
        dst.data[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn copy_range_checked<T: Elem>(
        &self,
        _what: &str,
        src: &EmuBuf<T>,
        src_at: usize,
        dst: &mut EmuBuf<T>,
        dst_at: usize,
        len: usize,
    ) -> Result<()> {
        dst.data[dst_at..dst_at + len].copy_from_slice(&src.data[src_at..src_at + len]);
        Ok(())
    }

    fn read_checked<T: Elem>(
        &self,
        _what: &str,
        buf: &EmuBuf<T>,
        start: usize,
        len: usize,
    ) -> Result<Vec<T>> {
        self.transfers.device_to_host::<T>(len);
        Ok(buf.data[start..start + len].to_vec())
    }

    unsafe fn borrow_raw<T: Elem>(&self, ptr: u64, len: usize) -> EmuBuf<T> {
        // The emulated device's memory is host memory: the address is a host pointer.
        // SAFETY: the caller guarantees `len` valid, unaliased values at `ptr` until the
        // buffer is released, and release_borrowed forgets the box instead of freeing it.
        let data = unsafe {
            Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                ptr as usize as *mut T,
                len,
            ))
        };
        EmuBuf { data }
    }

    fn release_borrowed<T: Elem>(buf: EmuBuf<T>) {
        std::mem::forget(buf.data);
    }

    fn len<T: Elem>(&self, buf: &EmuBuf<T>) -> usize {
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
        // SAFETY: self.kernels holds pointers into the static table; the rest is forwarded
        // from this method's contract.
        unsafe { launch_raw(&*self.kernels[kernel.0], kernel.name(), shape, args) }
    }

    fn gemm(
        &self,
        shape: GemmShape,
        out: &mut EmuBuf<f32>,
        a: &EmuBuf<f32>,
        b: &EmuBuf<f32>,
    ) -> Result<()> {
        shape.check(self, out, a, b)?;
        let a = MatRef::new(&a.data, shape.a.0, shape.a.1)?;
        let b = MatRef::new(&b.data, shape.b.0, shape.b.1)?;
        crate::model::matmul::matmul(&mut out.data, a, shape.ta, b, shape.tb, shape.accumulate);
        Ok(())
    }

    fn time(
        &self,
        _op: &str,
        reps: usize,
        before: &mut dyn FnMut() -> Result<()>,
        launch: &mut dyn FnMut() -> Result<()>,
    ) -> Result<f64> {
        median_timing(reps, before, launch, wall_clock)
    }

    fn timed_with(&self) -> &'static str {
        "wall clock around the emulated kernels (not GPU time)"
    }
}

/// A read-only buffer argument: its data pointer, the size of a pointer parameter, by pointer.
fn shared<T>(b: &EmuBuf<T>) -> (*mut c_void, usize, bool) {
    (b.data.as_ptr() as *mut c_void, size_of::<*const T>(), true)
}

/// A written buffer argument, as [`shared`].
fn exclusive<T>(b: &mut EmuBuf<T>) -> (*mut c_void, usize, bool) {
    (
        b.data.as_mut_ptr() as *mut c_void,
        size_of::<*mut T>(),
        true,
    )
}

/// A scalar argument: a pointer to its value and its size.
fn scalar<T>(v: &mut T) -> (*mut c_void, usize, bool) {
    (v as *mut T as *mut c_void, size_of::<T>(), false)
}

/// Runs `kernel` on the emulator with `args` and waits for it.
///
/// # Safety
/// As [`Gpu::launch`].
unsafe fn launch_raw(
    kernel: &RawKernel,
    op: &str,
    shape: LaunchShape,
    args: &mut [Arg<'_, EmuGpu>],
) -> Result<()> {
    // Pointer arguments are passed as pointers to a pointer variable, scalars as pointers
    // to their value: the driver API's `void** kernelParams`.
    let mut values: Vec<*mut c_void> = Vec::with_capacity(args.len());
    let mut sizes = Vec::with_capacity(args.len());
    let mut by_pointer = Vec::with_capacity(args.len());
    for a in args.iter_mut() {
        let (p, size, buffer) = match a {
            Arg::F32(b) => shared(b),
            Arg::F32Mut(b) => exclusive(b),
            Arg::U32(b) => shared(b),
            Arg::U32Mut(b) => exclusive(b),
            Arg::U64(b) => shared(b),
            Arg::U64Mut(b) => exclusive(b),
            Arg::F64(b) => shared(b),
            Arg::F64Mut(b) => exclusive(b),
            Arg::I64(v) => scalar(v),
            Arg::I32(v) => scalar(v),
            Arg::U32Val(v) => scalar(v),
            Arg::F32Val(v) => scalar(v),
            Arg::F64Val(v) => scalar(v),
        };
        values.push(p);
        sizes.push(size);
        by_pointer.push(buffer);
    }
    // A buffer's parameter points at its pointer variable in `values`, a scalar's at the value.
    let mut params: Vec<*mut c_void> = values
        .iter_mut()
        .zip(&by_pointer)
        .map(|(p, &buffer)| {
            if buffer {
                p as *mut *mut c_void as *mut c_void
            } else {
                *p
            }
        })
        .collect();
    let grid = [shape.grid.0, shape.grid.1, shape.grid.2];
    let block = [shape.block.0, shape.block.1, shape.block.2];
    let mut err = vec![0 as c_char; 2048];
    // SAFETY: params[i] points at a live value of sizes[i] bytes for the whole call (the
    // buffers and scalars borrowed by `args`, the pointer variables in `values`); the runtime
    // checks the count and sizes against the kernel before running it, and the caller
    // guarantees (this method's contract) that the buffers cover what the kernel touches.
    let rc = unsafe {
        vqx_emu_launch(
            kernel,
            grid.as_ptr(),
            block.as_ptr(),
            shape.shared_bytes as usize,
            params.as_mut_ptr(),
            params.len(),
            sizes.as_ptr(),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 {
        // SAFETY: the runtime wrote a NUL-terminated message into `err`.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        return Err(Error::Cuda {
            op: format!("{op} on the emulated device"),
            msg,
        });
    }
    Ok(())
}
