//! What the launchers need from a device, implemented twice: by a real GPU through cudarc
//! ([`super::driver::CudaGpu`]) and by the emulated device that runs the same kernels/*.cu on
//! the CPU ([`super::emu::EmuGpu`]). The launch code (grid and block sizes, argument order,
//! allocations, copies) is written once against this trait, so CI executes it on every run.

use super::kernels::KernelId;
use crate::backend::{Device, Transfers};
use crate::error::{Error, Result};
use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use std::sync::atomic::{AtomicU64, Ordering};

/// An element type that lives in device buffers.
pub trait Elem: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static {}
impl Elem for f32 {}
impl Elem for u32 {}
impl Elem for u64 {}
impl Elem for f64 {}

/// Grid, block and dynamic shared memory of one launch, as in `cuLaunchKernel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchShape {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl LaunchShape {
    /// A 1-D launch with no dynamic shared memory.
    pub fn linear(blocks: u32, threads: u32) -> Self {
        LaunchShape {
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
            shared_bytes: 0,
        }
    }
}

/// The shapes of one matrix product `out (m×n) = [out +] op(a)·op(b)` over row-major
/// buffers, as [`crate::model::matmul::matmul`] takes them: `a` is rows × cols as stored, `ta`
/// transposes it (likewise `b`), `accumulate` adds to `out` instead of overwriting it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub a: (usize, usize),
    pub ta: bool,
    pub b: (usize, usize),
    pub tb: bool,
    pub accumulate: bool,
}

impl GemmShape {
    /// `out = a·b`: `a` and `b` as stored (rows, cols), neither transposed, `out` overwritten.
    pub fn new(a: (usize, usize), b: (usize, usize)) -> Self {
        GemmShape {
            a,
            ta: false,
            b,
            tb: false,
            accumulate: false,
        }
    }

    /// This product with `a` transposed.
    pub fn transpose_a(self) -> Self {
        GemmShape { ta: true, ..self }
    }

    /// This product with `b` transposed.
    pub fn transpose_b(self) -> Self {
        GemmShape { tb: true, ..self }
    }

    /// This product added to `out` instead of overwriting it.
    pub fn accumulating(self) -> Self {
        GemmShape {
            accumulate: true,
            ..self
        }
    }

    /// (m, n, k), or an error when op(a) and op(b) do not chain.
    pub fn mnk(&self) -> Result<(usize, usize, usize)> {
        let (m, k) = if self.ta {
            (self.a.1, self.a.0)
        } else {
            self.a
        };
        let (kb, n) = if self.tb {
            (self.b.1, self.b.0)
        } else {
            self.b
        };
        if k != kb {
            return Err(crate::Error::shape(
                "matrix product: inner dimensions",
                format!("op(b) with {k} rows"),
                format!("{kb} rows"),
            ));
        }
        Ok((m, n, k))
    }

    /// (m, n, k) after checking that `a`, `b` and `out` hold their shapes' elements.
    pub fn check<G: Gpu + ?Sized>(
        &self,
        gpu: &G,
        out: &G::Buf<f32>,
        a: &G::Buf<f32>,
        b: &G::Buf<f32>,
    ) -> Result<(usize, usize, usize)> {
        let (m, n, k) = self.mnk()?;
        for (what, len, need) in [
            ("matrix product: a", gpu.len(a), self.a.0 * self.a.1),
            ("matrix product: b", gpu.len(b), self.b.0 * self.b.1),
            ("matrix product: out", gpu.len(out), m * n),
        ] {
            if len != need {
                return Err(crate::Error::shape(
                    what,
                    format!("{need} values"),
                    format!("{len} values"),
                ));
            }
        }
        Ok((m, n, k))
    }
}

/// Whether `start..start + len` lies inside a buffer of `buf_len` elements.
fn fits(start: usize, len: usize, buf_len: usize) -> bool {
    start.checked_add(len).is_some_and(|end| end <= buf_len)
}

/// The bytes a device has copied each way; every [`Gpu::upload`] and [`Gpu::download`] counts.
#[derive(Debug, Default)]
pub struct TransferCounter {
    h2d: AtomicU64,
    d2h: AtomicU64,
}

impl TransferCounter {
    pub fn host_to_device<T>(&self, elements: usize) {
        self.h2d
            .fetch_add((elements * size_of::<T>()) as u64, Ordering::Relaxed);
    }
    pub fn device_to_host<T>(&self, elements: usize) {
        self.d2h
            .fetch_add((elements * size_of::<T>()) as u64, Ordering::Relaxed);
    }
    pub fn get(&self) -> Transfers {
        Transfers {
            h2d_bytes: self.h2d.load(Ordering::Relaxed),
            d2h_bytes: self.d2h.load(Ordering::Relaxed),
        }
    }
}

/// One kernel argument: a device buffer (read-only or written) or a scalar, in the kernel's
/// parameter order. The emulated device checks each one's size against the kernel's parameter.
pub enum Arg<'a, G: Gpu + ?Sized> {
    F32(&'a G::Buf<f32>),
    F32Mut(&'a mut G::Buf<f32>),
    U32(&'a G::Buf<u32>),
    U32Mut(&'a mut G::Buf<u32>),
    U64(&'a G::Buf<u64>),
    U64Mut(&'a mut G::Buf<u64>),
    F64(&'a G::Buf<f64>),
    F64Mut(&'a mut G::Buf<f64>),
    /// `long long`
    I64(i64),
    /// `int`
    I32(i32),
    /// `unsigned int`
    U32Val(u32),
    /// `float`
    F32Val(f32),
    /// `double`
    F64Val(f64),
}

/// A device that owns buffers and launches the kernels of [`super::kernels`].
pub trait Gpu: Send + Sync + 'static {
    /// A buffer of `T` in this device's memory.
    type Buf<T: Elem>: Send + Sync;

    /// [`Device::Cuda`] or [`Device::CudaEmu`].
    fn device(&self) -> Device;
    /// One line on what runs.
    fn describe(&self) -> String;
    /// Streaming multiprocessors the grid-stride launchers size their grids for.
    fn sm_count(&self) -> u32;

    fn alloc_zeros<T: Elem>(&self, what: &str, len: usize) -> Result<Self::Buf<T>>;
    fn upload<T: Elem>(&self, what: &str, src: &[T]) -> Result<Self::Buf<T>>;
    fn download<T: Elem>(&self, what: &str, buf: &Self::Buf<T>) -> Result<Vec<T>>;
    fn zero<T: Elem>(&self, what: &str, buf: &mut Self::Buf<T>) -> Result<()>;
    /// Copies `src` into the start of `dst` (which must hold at least `src.len()` elements),
    /// reusing the allocation; counted as host → device bytes.
    fn write<T: Elem>(&self, what: &str, dst: &mut Self::Buf<T>, src: &[T]) -> Result<()> {
        let len = self.len(dst);
        if src.len() > len {
            return Err(Error::InvalidArgument(format!(
                "writing {what}: {} elements into a buffer of {len}",
                src.len()
            )));
        }
        self.write_checked(what, dst, src)
    }
    /// Copies all of `src` into the start of `dst` on the device (no bytes cross the bus).
    fn copy<T: Elem>(&self, what: &str, src: &Self::Buf<T>, dst: &mut Self::Buf<T>) -> Result<()> {
        let len = self.len(src);
        self.copy_range(what, src, 0, dst, 0, len)
    }
    /// Copies `len` elements of `src` from `src_at` into `dst` at `dst_at`, on the device.
    fn copy_range<T: Elem>(
        &self,
        what: &str,
        src: &Self::Buf<T>,
        src_at: usize,
        dst: &mut Self::Buf<T>,
        dst_at: usize,
        len: usize,
    ) -> Result<()> {
        let (src_len, dst_len) = (self.len(src), self.len(dst));
        if !fits(src_at, len, src_len) || !fits(dst_at, len, dst_len) {
            return Err(Error::InvalidArgument(format!(
                "copying {what}: {len} elements from {src_at} of {src_len} to {dst_at} of {dst_len}"
            )));
        }
        self.copy_range_checked(what, src, src_at, dst, dst_at, len)
    }
    /// Copies elements `start..start + len` of `buf` to the host.
    fn read<T: Elem>(
        &self,
        what: &str,
        buf: &Self::Buf<T>,
        start: usize,
        len: usize,
    ) -> Result<Vec<T>> {
        if !fits(start, len, self.len(buf)) {
            return Err(Error::InvalidArgument(format!(
                "reading {what}: elements {start}..+{len} of a buffer of {}",
                self.len(buf)
            )));
        }
        self.read_checked(what, buf, start, len)
    }
    /// [`Gpu::write`] once `src.len() ≤ len(dst)` is known.
    fn write_checked<T: Elem>(&self, what: &str, dst: &mut Self::Buf<T>, src: &[T]) -> Result<()>;
    /// [`Gpu::copy_range`] once both ranges are known to lie inside their buffers.
    fn copy_range_checked<T: Elem>(
        &self,
        what: &str,
        src: &Self::Buf<T>,
        src_at: usize,
        dst: &mut Self::Buf<T>,
        dst_at: usize,
        len: usize,
    ) -> Result<()>;
    /// [`Gpu::read`] once the range is known to lie inside the buffer.
    fn read_checked<T: Elem>(
        &self,
        what: &str,
        buf: &Self::Buf<T>,
        start: usize,
        len: usize,
    ) -> Result<Vec<T>>;
    /// Wraps `len` elements of `T` at device address `ptr` (memory the caller owns, e.g. a
    /// tensor of another library on the same device) as a buffer; give it back with
    /// [`Gpu::release_borrowed`], never drop it (that would free the caller's memory).
    ///
    /// # Safety
    /// `ptr` must be a device allocation of this device's context holding at least `len`
    /// values of `T`, valid and not accessed by anyone else until released.
    unsafe fn borrow_raw<T: Elem>(&self, ptr: u64, len: usize) -> Self::Buf<T>;
    /// Lets go of a buffer made by [`Gpu::borrow_raw`] without freeing its memory.
    fn release_borrowed<T: Elem>(buf: Self::Buf<T>);
    /// Elements of `buf`.
    fn len<T: Elem>(&self, buf: &Self::Buf<T>) -> usize;
    /// Bytes copied by [`Gpu::upload`] and [`Gpu::download`] so far.
    fn transfers(&self) -> Transfers;

    /// Launches `kernel` with `args` (asynchronously on a real GPU, in order on the device's
    /// stream); errors name the kernel.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in order and type, every buffer must hold at
    /// least the elements the kernel will touch for these arguments and this shape, and the
    /// shape must be one the kernel is written for.
    unsafe fn launch(
        &self,
        kernel: KernelId,
        shape: LaunchShape,
        args: &mut [Arg<'_, Self>],
    ) -> Result<()>;

    /// `out = [out +] op(a)·op(b)` in f32 on the device (cuBLAS on a GPU; on the emulated
    /// device the CPU's [`crate::model::matmul::matmul`], so its products equal the CPU
    /// model's bit for bit). Shapes are checked ([`GemmShape::check`]).
    fn gemm(
        &self,
        shape: GemmShape,
        out: &mut Self::Buf<f32>,
        a: &Self::Buf<f32>,
        b: &Self::Buf<f32>,
    ) -> Result<()>;

    /// Median seconds of `launch` over `reps` runs after one warm-up, `before` untimed before
    /// each: CUDA events on a GPU, the wall clock on the emulated device.
    fn time(
        &self,
        op: &str,
        reps: usize,
        before: &mut dyn FnMut() -> Result<()>,
        launch: &mut dyn FnMut() -> Result<()>,
    ) -> Result<f64>;

    /// How [`Gpu::time`] measures.
    fn timed_with(&self) -> &'static str;
}
