//! The devices a CUDA test runs on, written once: every test `t` written with [`on_devices!`]
//! becomes `t::emu`, on the emulated device (always run), and `t::gpu`, on a real GPU (a visible
//! `skipped: <test>: no CUDA device (<reason>)` line where there is none, a failure under
//! `VQX_REQUIRE_GPU=1`).
#![allow(dead_code)]

use std::io::Write;
use vqx::backend::Device;
use vqx::backend::cuda::{CudaGpu, EmuGpu, Gpu, GpuBackend};
use vqx::nearest::Precision;

/// A device the tests run on: how to open a backend on it, and which sizes it can afford.
pub struct Dev<G: Gpu> {
    pub open: fn() -> vqx::Result<GpuBackend<G>>,
    pub device: Device,
    pub emulated: bool,
}

impl<G: Gpu> Dev<G> {
    pub fn backend(&self, precision: Precision) -> GpuBackend<G> {
        (self.open)().unwrap().with_precision(precision)
    }
    /// `small` on the emulated device, `small` and `large` on a GPU.
    pub fn shapes<T: Copy>(&self, small: &[T], large: &[T]) -> Vec<T> {
        let mut v = small.to_vec();
        if !self.emulated {
            v.extend_from_slice(large);
        }
        v
    }
}

pub const EMU: Dev<EmuGpu> = Dev {
    open: || Ok(GpuBackend::on(EmuGpu::new()?)),
    device: Device::CudaEmu,
    emulated: true,
};

/// The real-GPU device, or `None` after printing a visible skip line.
pub fn real_gpu(test: &str) -> Option<Dev<CudaGpu>> {
    match CudaGpu::new(0) {
        Ok(_) => Some(Dev {
            open: || Ok(GpuBackend::on(CudaGpu::new(0)?)),
            device: Device::Cuda,
            emulated: false,
        }),
        Err(e) => {
            let require = std::env::var("VQX_REQUIRE_GPU").is_ok_and(|v| v == "1");
            assert!(
                !require,
                "{test}: VQX_REQUIRE_GPU=1 but the CUDA backend is unavailable: {e}"
            );
            // One write of the whole line, so parallel tests do not interleave mid-line.
            let line = format!("skipped: {test}: no CUDA device ({e})\n");
            std::io::stderr().lock().write_all(line.as_bytes()).ok();
            None
        }
    }
}

/// Each `fn name<G>(test, dev) { body }` becomes the tests `name::emu` and `name::gpu`.
/// `fn name<G>(test, dev, gpu) { body }` also opens an exact backend on the device and binds
/// its `&G` to `gpu` (what most kernel tests start with).
#[macro_export]
macro_rules! on_devices {
    () => {};
    ($(#[doc = $doc:literal])* fn $name:ident<$g:ident>($test:ident, $dev:ident, $gpu:ident)
        $body:block $($rest:tt)*) => {
        $crate::on_devices! {
            $(#[doc = $doc])*
            fn $name<$g>($test, $dev) {
                let backend = $dev.backend(vqx::nearest::Precision::Exact);
                let $gpu = backend.gpu();
                $body
            }
        }
        $crate::on_devices! { $($rest)* }
    };
    ($(#[doc = $doc:literal])* fn $name:ident<$g:ident>($test:ident, $dev:ident) $body:block
        $($rest:tt)*) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[doc = $doc])*
            fn run<$g: Gpu>($test: &str, $dev: &Dev<$g>) $body
            #[test]
            fn emu() {
                run(concat!(stringify!($name), "::emu"), &EMU);
            }
            #[test]
            fn gpu() {
                let test = concat!(stringify!($name), "::gpu");
                if let Some(dev) = real_gpu(test) {
                    run(test, &dev);
                }
            }
        }
        $crate::on_devices! { $($rest)* }
    };
}

/// `got` and `want` equal bit for bit; the message names the first differing index and both.
pub fn assert_bits(got: &[f32], want: &[f32], context: &str) {
    assert_eq!(got.len(), want.len(), "{context}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{context}: index {i}: device {g:e} ({:#010x}), cpu {w:e} ({:#010x})",
            g.to_bits(),
            w.to_bits()
        );
    }
}

/// `got` within `rel` (relative) of `want`.
pub fn rel_close(got: f64, want: f64, rel: f64, context: &str) {
    assert!(
        (got - want).abs() <= rel * want.abs(),
        "{context}: device {got:e}, cpu {want:e} (relative tolerance {rel:e})"
    );
}
