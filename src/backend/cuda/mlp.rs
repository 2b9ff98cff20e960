//! The launchers of the MLP layers' element-wise and row-wise parts on the device
//! (kernels/mlp.cu): the linear layer's bias rows and bias gradient, the activations and their
//! derivatives, layer norm forward and backward, and the VQ-VAE's reconstruction loss. The
//! matrix products around them are a GEMM's job: a step on the device chains
//! [`bias_rows`] → GEMM (y += x·Wᵀ) → [`layer_norm_forward`] → [`activation_forward`] → … and
//! back through [`recon_loss`], [`column_sums_add`] (+ GEMMs for dW and dx),
//! [`activation_backward`] and [`layer_norm_backward`], as `Mlp::forward` / `Mlp::backward`
//! do on the host.
//!
//! Each launcher checks every buffer against the elements the kernel will touch (`Error::Shape`
//! naming the buffer, never a launch on a too-small one). Results are bit-identical to the CPU
//! code of src/model/ (tanh included: kernels/mlp.cu's vqx_tanh repeats src/model's `tanh`
//! operation for operation), which tests/device_mlp.rs checks.

use super::device::{Gpu, LaunchShape};
use super::kernels;
use super::kernels::KernelId;
use super::kernels::tiles::{self, REDUCE_BLOCKS};
use super::launch::{
    check_len, elems, grid_stride, launch_args, launcher, reduce_shape, reduce_stage2,
    rows_grid_stride, run,
};
use crate::error::{Error, Result};
use crate::model::Activation;

/// The kernels' `int act` (ACT_GELU / ACT_RELU of kernels/mlp.cu).
fn activation_code(act: Activation) -> i32 {
    match act {
        Activation::Gelu => 0,
        Activation::Relu => 1,
    }
}

/// Errors on zero-width rows (a layer norm over none is undefined).
fn check_width(d: usize, what: &str) -> Result<()> {
    if d == 0 {
        return Err(Error::InvalidArgument(format!("{what} of 0-wide rows")));
    }
    Ok(())
}

/// Scratch of [`recon_loss`]'s reduction: allocate once, reuse every step.
pub struct MlpScratch<G: Gpu> {
    /// REDUCE_BLOCKS f64 partials (stage 1 of the squared error).
    partials: G::Buf<f64>,
}

impl<G: Gpu> MlpScratch<G> {
    pub fn new(gpu: &G) -> Result<Self> {
        Ok(MlpScratch {
            partials: gpu.alloc_zeros("reconstruction partials", tiles::REDUCE_BLOCKS)?,
        })
    }
}

/// A buffer, the elements it must hold and its name in errors.
type Need<'a, B> = (B, usize, &'a str);

launcher! {
    /// The two kernels between an n × o matrix and an o-vector, `(const float* src, long long n,
    /// long long o, float* dst)`: `bias_rows_f32` (vector → every row) and `column_sums_add_f32`
    /// (the columns' sums → vector); `src` and `dst` with the elements each must hold.
    fn rows_and_vector(gpu, kernel: KernelId, shape: LaunchShape, src: Need<'_, &G::Buf<f32>>,
        (n, o): (usize, usize), dst: Need<'_, &mut G::Buf<f32>>) {
        let mut args = launch_args![gpu;
            F32(src.0; src.1, src.2), Len(n, "rows"), Len(o, "columns"),
            F32Mut(dst.0; dst.1, dst.2),
        ];
        // SAFETY: the arguments follow bias_rows_f32 and column_sums_add_f32 (const float* src,
        // long long n, long long o, float* dst); the matrix holds ≥ n·o floats and the vector ≥ o
        // (checked: the callers ask for those counts, n·o < 2^63 by their elems). bias_rows_f32's grid-stride loop writes
        // dst[e] for e < n·o and reads src[e % o] (only when o ≥ 1, as n·o > e ≥ 0);
        // column_sums_add_f32's thread j < o reads src[r·o + j] for r < n and writes dst[j] only.
        unsafe { run(gpu, kernel, shape, &mut args) }
    }
}

launcher! {
    /// `bias_rows_f32`: every row of `y` (n × o) ← `bias` (o values), as `Linear::forward` does
    /// before the GEMM accumulates x·Wᵀ into it.
    pub fn bias_rows(gpu, bias: &G::Buf<f32>, n: usize, o: usize, y: &mut G::Buf<f32>) {
        let total = elems(n, o, "linear output")?;
        let shape = grid_stride(gpu, total);
        let src = (bias, o, "bias");
        let dst = (y, total, "linear output");
        rows_and_vector(gpu, kernels::BIAS_ROWS_F32, shape, src, (n, o), dst)
    }
}

launcher! {
    /// `activation_forward_f32`: y[e] = `act.apply(x[e])` for e < len.
    pub fn activation_forward(gpu, act: Activation, x: &G::Buf<f32>, len: usize,
        y: &mut G::Buf<f32>) {
        let mut args = launch_args![gpu;
            F32(x; len, "pre-activation"), Len(len, "values"), I32(activation_code(act)),
            F32Mut(y; len, "activation output"),
        ];
        // SAFETY: the arguments follow activation_forward_f32(const float* x, long long len, int
        // act, float* y). x and y hold ≥ len floats (checked) and are distinct buffers (one shared,
        // one exclusive borrow); the grid-stride loop touches indices < len only.
        unsafe { run(gpu, kernels::ACTIVATION_FORWARD_F32, grid_stride(gpu, len), &mut args) }
    }
}

launcher! {
    /// `activation_backward_f32`: dx[e] = dy[e] · `act.derivative(x[e])` for e < len
    /// (`Activation::backward`), given the activation's input `x`.
    pub fn activation_backward(gpu, act: Activation, x: &G::Buf<f32>, dy: &G::Buf<f32>, len: usize,
        dx: &mut G::Buf<f32>) {
        let mut args = launch_args![gpu;
            F32(x; len, "pre-activation"), F32(dy; len, "activation output gradient"),
            Len(len, "values"), I32(activation_code(act)),
            F32Mut(dx; len, "activation input gradient"),
        ];
        // SAFETY: the arguments follow activation_backward_f32(const float* x, const float* dy,
        // long long len, int act, float* dx). x, dy and dx hold ≥ len floats (checked); dx is an
        // exclusive borrow, so it aliases neither input (the kernel's __restrict__); the
        // grid-stride loop touches indices < len only.
        unsafe { run(gpu, kernels::ACTIVATION_BACKWARD_F32, grid_stride(gpu, len), &mut args) }
    }
}

launcher! {
    /// `column_sums_add_f32`: grad[j] = (grad[j] as f64 + Σ_r dy[r][j] as f64) as f32 for the o
    /// columns of dy (n × o), rows summed in order from 0: `Linear::backward`'s bias gradient
    /// (equally `LayerNorm::backward`'s dβ).
    pub fn column_sums_add(gpu, dy: &G::Buf<f32>, n: usize, o: usize, grad: &mut G::Buf<f32>) {
        let src = (dy, elems(n, o, "output gradient")?, "output gradient");
        let (kernel, shape) = (kernels::COLUMN_SUMS_ADD_F32, grid_stride(gpu, o));
        rows_and_vector(gpu, kernel, shape, src, (n, o), (grad, o, "bias gradient"))
    }
}

launcher! {
    /// `layer_norm_forward_f32` over the n rows of x (n × d) with γ = `gamma`, β = `beta` (d
    /// values each): y (n × d), x̂ = `normalized` (n × d) and `inv_std` (n), bit-identical to
    /// `LayerNorm::forward` and its cache.
    pub fn layer_norm_forward(gpu, x: &G::Buf<f32>, gamma: &G::Buf<f32>, beta: &G::Buf<f32>,
        n: usize, d: usize, y: &mut G::Buf<f32>, normalized: &mut G::Buf<f32>,
        inv_std: &mut G::Buf<f32>) {
        check_width(d, "layer norm")?;
        let total = elems(n, d, "layer norm input")?;
        let mut args = launch_args![gpu;
            F32(x; total, "layer norm input"), F32(gamma; d, "layer norm weight"),
            F32(beta; d, "layer norm bias"), Len(n, "rows"), Len(d, "dimension"),
            F32Mut(y; total, "layer norm output"),
            F32Mut(normalized; total, "layer norm normalized rows"),
            F32Mut(inv_std; n, "layer norm inverse deviations"),
        ];
        // SAFETY: the arguments follow layer_norm_forward_f32(const float* x, const float* gamma,
        // const float* beta, long long n, long long d, float* y, float* normalized, float*
        // inv_std). x, y and normalized hold ≥ n·d floats, gamma and beta ≥ d, inv_std ≥ n
        // (checked); the three outputs are distinct exclusive borrows. Thread r < n touches row r
        // (indices r·d .. r·d + d) and inv_std[r] only; the block is ROW_THREADS, the kernel's
        // launch bound.
        unsafe { run(gpu, kernels::LAYER_NORM_FORWARD_F32, rows_grid_stride(gpu, n), &mut args) }
    }
}

launcher! {
    /// `layer_norm_param_grad_f32` then `layer_norm_backward_f32`, as `LayerNorm::backward`:
    /// adds dγ = Σ_r dy·x̂ and dβ = Σ_r dy (f64, rows in order) to `grad_gamma` and `grad_beta`
    /// (d values each), and writes dx (n × d) from dy (n × d), the forward's `normalized` (n × d)
    /// and `inv_std` (n), and γ = `gamma`.
    pub fn layer_norm_backward(gpu, dy: &G::Buf<f32>, normalized: &G::Buf<f32>,
        inv_std: &G::Buf<f32>, gamma: &G::Buf<f32>, n: usize, d: usize, dx: &mut G::Buf<f32>,
        grad_gamma: &mut G::Buf<f32>, grad_beta: &mut G::Buf<f32>) {
        check_width(d, "layer norm backward")?;
        let total = elems(n, d, "layer norm output gradient")?;
        check_len(gpu, dy, total, "layer norm output gradient")?;
        check_len(gpu, normalized, total, "layer norm normalized rows")?;
        check_len(gpu, inv_std, n, "layer norm inverse deviations")?;
        check_len(gpu, gamma, d, "layer norm weight")?;
        check_len(gpu, dx, total, "layer norm input gradient")?;
        let mut args = launch_args![gpu;
            F32(dy), F32(normalized), Len(n, "rows"), Len(d, "dimension"),
            F32Mut(grad_gamma; d, "layer norm weight gradient"),
            F32Mut(grad_beta; d, "layer norm bias gradient"),
        ];
        // SAFETY: the arguments follow layer_norm_param_grad_f32(const float* dy, const float*
        // normalized, long long n, long long d, float* grad_gamma, float* grad_beta). dy and
        // normalized hold ≥ n·d floats, grad_gamma and grad_beta ≥ d (checked, distinct exclusive
        // borrows); thread j < d reads column j of rows < n and writes index j only.
        unsafe { run(gpu, kernels::LAYER_NORM_PARAM_GRAD_F32, grid_stride(gpu, d), &mut args)? };

        let mut args = launch_args![gpu;
            F32(dy), F32(normalized), F32(inv_std), F32(gamma), Len(n, "rows"), Len(d, "dimension"),
            F32Mut(dx),
        ];
        // SAFETY: the arguments follow layer_norm_backward_f32(const float* dy, const float*
        // normalized, const float* inv_std, const float* gamma, long long n, long long d, float*
        // dx). dy, normalized and dx hold ≥ n·d floats, inv_std ≥ n, gamma ≥ d (checked); dx is an
        // exclusive borrow (aliases no input). Thread r < n touches row r and inv_std[r] only; the
        // block is ROW_THREADS, the kernel's launch bound.
        unsafe { run(gpu, kernels::LAYER_NORM_BACKWARD_F32, rows_grid_stride(gpu, n), &mut args) }
    }
}

launcher! {
    /// `recon_loss_f32` + loss.cu's `reduce_f64`: the VQ-VAE's reconstruction loss on y and x
    /// (n × d each): dy = (scale·(y − x)) as f32 with scale = 2/(n·d) (bit-identical to
    /// `VqVae::forward_backward`), and `sq[0]` = Σ (y − x)² in f64 (deterministic, within 1e-12
    /// relative of the CPU's sequential sum; the loss is sq / (n·d)).
    pub fn recon_loss(gpu, y: &G::Buf<f32>, x: &G::Buf<f32>, n: usize, d: usize,
        dy: &mut G::Buf<f32>, scratch: &mut MlpScratch<G>, sq: &mut G::Buf<f64>) {
        let total = elems(n, d, "reconstruction")?;
        check_len(gpu, sq, 1, "squared error")?;
        // As VqVae::forward_backward: scale = 2 / (n·d) in f64.
        let scale = 2.0 / (n as f64 * d as f64);
        let mut args = launch_args![gpu;
            F32(y; total, "reconstruction"), F32(x; total, "reconstruction target"), F64Val(scale),
            Len(total, "elements"), F32Mut(dy; total, "reconstruction gradient"),
            F64Mut(&mut scratch.partials; REDUCE_BLOCKS, "partials"),
        ];
        // SAFETY: the arguments follow recon_loss_f32(const float* y, const float* x, double
        // scale, long long total, float* dy, double* partials). y, x and dy hold ≥ total = n·d
        // floats (checked; dy an exclusive borrow, aliasing neither input); partials holds
        // REDUCE_BLOCKS doubles, one per block of this fixed grid of REDUCE_THREADS threads (the
        // kernel's shared tree size); the grid-stride loop touches indices < total only.
        unsafe { run(gpu, kernels::RECON_LOSS_F32, reduce_shape(REDUCE_BLOCKS), &mut args)? };
        reduce_stage2(gpu, kernels::REDUCE_F64, &scratch.partials, sq)
    }
}
