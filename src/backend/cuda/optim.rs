//! The optimiser of `vqx train` on the device (kernels/optim.cu): AdamW over one flat parameter
//! buffer, the tensors of [`AdamW`] laid end to end, and clipping by global norm.
//!
//! - [`DeviceAdamW::step`] is bit-identical to [`AdamW::step_from`] on the same tensors: the
//!   per-step scalars (bias corrections, 1 − lr·λ) are computed on the host by the very
//!   functions the CPU uses, the per-value arithmetic runs in f64 in the CPU's order.
//! - [`clip_global_norm`] leaves ‖g‖ in a device scalar (a fixed-shape two-stage f64 reduction:
//!   deterministic run to run, within ~n·2^-53 relative of the CPU's element-order sum) and
//!   scales the gradients as [`crate::train::clip_global_norm`] does, reading the norm on the
//!   device: nothing crosses the bus unless the caller reads the 8-byte norm.
//!
//! tests/device_optim.rs checks both against the CPU.

use super::device::Gpu;
use super::kernels::{self, tiles};
use super::launch::{
    check_len, grid_stride, launch_args, launcher, reduce_shape, reduce_stage2, run,
};
use crate::error::{Error, Result};
use crate::train::{AdamW, AdamWConfig};

/// f64 values the `scratch` of [`clip_global_norm`] must hold (one partial sum per block).
pub const CLIP_SCRATCH_LEN: usize = tiles::REDUCE_BLOCKS;

/// AdamW's moments on the device, flat (tensor `i` at `offsets[i]..offsets[i + 1]`), with a
/// per-value weight-decay flag.
pub struct DeviceAdamW<G: Gpu> {
    config: AdamWConfig,
    m: G::Buf<f32>,
    v: G::Buf<f32>,
    /// 1 where the value's tensor is decayed, else 0.
    decay: G::Buf<u32>,
    /// tensors + 1 offsets; the last is the total P.
    offsets: Vec<usize>,
}

/// The start of every tensor and the total, or an error when the total overflows.
fn offsets_of(sizes: &[usize]) -> Result<Vec<usize>> {
    let mut offsets = Vec::with_capacity(sizes.len() + 1);
    let mut at = 0usize;
    offsets.push(at);
    for &n in sizes {
        at = at
            .checked_add(n)
            .filter(|&v| i64::try_from(v).is_ok())
            .ok_or_else(|| Error::InvalidArgument("optimiser: parameters exceed i64".into()))?;
        offsets.push(at);
    }
    Ok(offsets)
}

impl<G: Gpu> DeviceAdamW<G> {
    /// Zero moments for tensors of the given sizes (as [`AdamW::new`]), `decay[i]` marking the
    /// tensors weight decay applies to (the flags [`AdamW::step`] is given).
    pub fn new(gpu: &G, config: AdamWConfig, sizes: &[usize], decay: &[bool]) -> Result<Self> {
        let zeros: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
        Self::with_moments(gpu, config, &zeros, &zeros, decay)
    }

    /// The CPU optimiser's moments on the device (e.g. from a checkpoint).
    pub fn from_host(gpu: &G, host: &AdamW, decay: &[bool]) -> Result<Self> {
        Self::with_moments(gpu, host.config, &host.m, &host.v, decay)
    }

    fn with_moments(
        gpu: &G,
        config: AdamWConfig,
        m: &[Vec<f32>],
        v: &[Vec<f32>],
        decay: &[bool],
    ) -> Result<Self> {
        if m.len() != decay.len() || v.len() != decay.len() {
            return Err(Error::shape(
                "optimiser decay flags vs tensors",
                format!("{} flags (m) and {} (v)", m.len(), v.len()),
                format!("{} flags", decay.len()),
            ));
        }
        for (i, (mi, vi)) in m.iter().zip(v).enumerate() {
            if mi.len() != vi.len() {
                return Err(Error::shape(
                    format!("optimiser tensor {i}: second moment vs first"),
                    format!("{} values", mi.len()),
                    format!("{} values", vi.len()),
                ));
            }
        }
        let sizes: Vec<usize> = m.iter().map(Vec::len).collect();
        let offsets = offsets_of(&sizes)?;
        let total = offsets[sizes.len()];
        // Never a zero-length allocation: one unused value when there are no parameters.
        let flat = |parts: &[Vec<f32>]| {
            let mut out = Vec::with_capacity(total.max(1));
            parts.iter().for_each(|p| out.extend_from_slice(p));
            out.resize(total.max(1), 0.0);
            out
        };
        let mut flags = Vec::with_capacity(total.max(1));
        for (&n, &d) in sizes.iter().zip(decay) {
            flags.extend(std::iter::repeat_n(u32::from(d), n));
        }
        flags.resize(total.max(1), 0);
        Ok(DeviceAdamW {
            config,
            m: gpu.upload("AdamW first moments", &flat(m))?,
            v: gpu.upload("AdamW second moments", &flat(v))?,
            decay: gpu.upload("AdamW decay flags", &flags)?,
            offsets,
        })
    }

    /// The moments back on the host, one buffer per tensor (e.g. for a checkpoint).
    pub fn to_host(&self, gpu: &G) -> Result<AdamW> {
        let total = self.len();
        let m = gpu.read("AdamW first moments", &self.m, 0, total)?;
        let v = gpu.read("AdamW second moments", &self.v, 0, total)?;
        let split = |flat: &[f32]| {
            self.offsets
                .windows(2)
                .map(|w| flat[w[0]..w[1]].to_vec())
                .collect::<Vec<_>>()
        };
        Ok(AdamW {
            config: self.config,
            m: split(&m),
            v: split(&v),
        })
    }

    pub fn config(&self) -> AdamWConfig {
        self.config
    }

    /// The tensors' offsets in the flat buffers, tensors + 1 values (the last is [`Self::len`]).
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Parameters P over all tensors.
    pub fn len(&self) -> usize {
        *self.offsets.last().expect("offsets start at 0")
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The flat first moments (at least [`Self::len`] values).
    pub fn m(&self) -> &G::Buf<f32> {
        &self.m
    }

    /// The flat second moments (at least [`Self::len`] values).
    pub fn v(&self) -> &G::Buf<f32> {
        &self.v
    }

    /// One update of tensors `first_tensor..` of the flat `params` with `grads` (both at least
    /// P values, laid out as [`Self::offsets`]); the tensors before are frozen (untouched, their
    /// moments too). Bit-identical to [`AdamW::step_from`]`(first_tensor, …, lr, t)`.
    pub fn step(
        &mut self,
        gpu: &G,
        params: &mut G::Buf<f32>,
        grads: &G::Buf<f32>,
        first_tensor: usize,
        lr: f64,
        t: u64,
    ) -> Result<()> {
        let tensors = self.offsets.len() - 1;
        if first_tensor > tensors {
            return Err(Error::InvalidArgument(format!(
                "optimiser: first tensor {first_tensor} of {tensors}"
            )));
        }
        let (first, total) = (self.offsets[first_tensor], self.len());
        let c = self.config;
        let (bc1, bc2) = c.bias_corrections(t);
        let mut args = launch_args![gpu;
            F32Mut(params; total, "parameters"), F32(grads; total, "gradients"),
            F32Mut(&mut self.m; total, "AdamW first moments"),
            F32Mut(&mut self.v; total, "AdamW second moments"),
            U32(&self.decay; total, "AdamW decay flags"), Len(first, "first parameter"),
            Len(total, "parameters"), F64Val(c.beta1), F64Val(1.0 - c.beta1), F64Val(c.beta2),
            F64Val(1.0 - c.beta2), F64Val(bc1), F64Val(bc2), F64Val(c.eps), F64Val(lr),
            F64Val(c.shrink(lr)),
        ];
        if first == total {
            return Ok(());
        }
        // SAFETY: the arguments follow adamw_f32(float* params, const float* grads, float* m,
        // float* v, const u32* decay, long long first, long long n, double beta1, double omb1,
        // double beta2, double omb2, double bc1, double bc2, double eps, double lr,
        // double shrink). params, grads, m, v and decay hold ≥ n = total values (checked
        // above); the grid-stride loop touches only [first, n) with first < n.
        unsafe {
            run(
                gpu,
                kernels::ADAMW_F32,
                grid_stride(gpu, total - first),
                &mut args,
            )
        }
    }
}

launcher! {
    /// ‖g‖ = sqrt(Σ g[e]², e in first_elem..len) into `norm_out[0]` (f64), then, when
    /// `max_norm > 0` and ‖g‖ > max_norm, every g[e] of that range ← (f32)(g[e]·s) with
    /// s = max_norm/(‖g‖ + 1e-12), as [`crate::train::clip_global_norm`] clips; the scale is taken
    /// from the norm on the device. `len` is the end of the range (P, not a count); `scratch` holds
    /// at least [`CLIP_SCRATCH_LEN`] f64 partials.
    pub fn clip_global_norm(gpu, grads: &mut G::Buf<f32>, first_elem: usize, len: usize,
        max_norm: f64, scratch: &mut G::Buf<f64>, norm_out: &mut G::Buf<f64>) {
        if first_elem > len {
            return Err(Error::InvalidArgument(format!(
                "clip_global_norm: first element {first_elem} beyond the end {len}"
            )));
        }
        check_len(gpu, norm_out, 1, "global norm")?;
        let m = CLIP_SCRATCH_LEN;
        let mut args = launch_args![gpu;
            F32(&*grads; len, "gradients"), Len(first_elem, "first element"), Len(len, "gradients"),
            F64Mut(scratch; m, "norm partials"),
        ];
        // SAFETY: sq_sum_partial_f64(const float* g, long long first, long long n,
        // double* partials): g holds ≥ n values and is read only in [first, n); the fixed grid of
        // REDUCE_BLOCKS × REDUCE_THREADS (the kernel's shape) writes partials[0..REDUCE_BLOCKS),
        // which scratch holds (checked above).
        unsafe { run(gpu, kernels::SQ_SUM_PARTIAL_F64, reduce_shape(m), &mut args)? };
        reduce_stage2(gpu, kernels::GLOBAL_NORM_F64, scratch, norm_out)?;

        // NaN or ≤ 0: no clipping (the kernel checks again, with the norm).
        if max_norm.is_nan() || max_norm <= 0.0 || first_elem == len {
            return Ok(());
        }
        let shape = grid_stride(gpu, len - first_elem);
        let mut args = launch_args![gpu;
            F32Mut(grads), Len(first_elem, "first element"), Len(len, "gradients"), F64(&*norm_out),
            F64Val(max_norm),
        ];
        // SAFETY: clip_by_norm_f32(float* g, long long first, long long n, const double* norm,
        // double max_norm): g holds ≥ n values, the grid-stride loop touches only [first, n);
        // norm_out holds ≥ 1 value.
        unsafe { run(gpu, kernels::CLIP_BY_NORM_F32, shape, &mut args) }
    }
}
