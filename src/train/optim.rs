//! AdamW (decoupled weight decay, Loshchilov & Hutter), the warm-up + cosine learning-rate
//! schedule VAR and ESM3 train with, and gradient clipping by global norm.

use crate::model::simd::multiversion;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// AdamW's hyper-parameters. Defaults: β = (0.9, 0.95), ε = 1e-8, weight decay 0.05 (VAR's
/// tokenizer and ESM3 train with β₂ = 0.95).
///
/// ```
/// use vqx::train::AdamWConfig;
/// let c = AdamWConfig::default();
/// assert_eq!((c.beta1, c.beta2), (0.9, 0.95));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled decay, applied to the tensors marked for it (the linear layers' weights).
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// The bias corrections (1 − β₁ᵗ, 1 − β₂ᵗ) of step `t` (1-based; clamped to 1..=i32::MAX),
    /// as [`AdamW::step_from`] computes them (the device optimiser passes these very values).
    pub fn bias_corrections(&self, t: u64) -> (f64, f64) {
        let t = t.min(i32::MAX as u64).max(1) as i32;
        (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t))
    }

    /// The factor 1 − lr·λ a decayed tensor is multiplied by before its update.
    pub fn shrink(&self, lr: f64) -> f64 {
        1.0 - lr * self.weight_decay
    }
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.05,
        }
    }
}

/// AdamW's first and second moments, one pair of buffers per parameter tensor.
///
/// ```
/// use vqx::train::{AdamW, AdamWConfig};
/// let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.0, ..Default::default() }, &[2]);
/// let mut p = vec![1.0f32, -1.0];
/// opt.step(&mut [&mut p[..]], &[&[0.5, -0.5][..]], &[false], 0.1, 1);
/// // The first step moves each value by lr·sign(g) (m̂/√v̂ = ±1).
/// assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] + 0.9).abs() < 1e-6);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    /// Zero moments for tensors of the given sizes.
    pub fn new(config: AdamWConfig, sizes: &[usize]) -> Self {
        AdamW {
            config,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One update of every tensor (`t` is 1-based, for the bias corrections): p ← p·(1 −
    /// lr·λ) where `decay[i]`, then p ← p − lr·m̂/(√v̂ + ε). The arithmetic runs in f64 per
    /// value, so an update is deterministic and independent of threads.
    pub fn step(
        &mut self,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
        decay: &[bool],
        lr: f64,
        t: u64,
    ) {
        self.step_from(0, params, grads, decay, lr, t);
    }

    /// [`Self::step`] on tensors `first..` only: the ones before are frozen (left as they
    /// are, their moments at 0).
    pub fn step_from(
        &mut self,
        first: usize,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
        decay: &[bool],
        lr: f64,
        t: u64,
    ) {
        self.step_scaled(first, params, grads, decay, lr, t, 1.0);
    }

    /// [`Self::step_from`] on the gradients scaled by `grad_scale` as [`clip_global_norm`]
    /// scales them (each g becomes (f32)(g·s) in f64 before the update; s = 1 changes
    /// nothing), without writing them back: clipping and the update in one pass over memory.
    ///
    /// ```
    /// use vqx::train::{AdamW, AdamWConfig, clip_global_norm, clip_scale, global_norm};
    /// let cfg = AdamWConfig::default();
    /// let (mut a, mut b) = (vec![1.0f32, 2.0], vec![1.0f32, 2.0]);
    /// let mut g = vec![3.0f32, -4.0];
    /// let s = clip_scale(global_norm(&[&g[..]]), 1.0);
    /// AdamW::new(cfg, &[2]).step_scaled(0, &mut [&mut a[..]], &[&g[..]], &[true], 0.1, 1, s);
    /// clip_global_norm(&mut [&mut g[..]], 1.0);
    /// AdamW::new(cfg, &[2]).step_from(0, &mut [&mut b[..]], &[&g[..]], &[true], 0.1, 1);
    /// assert_eq!(a, b);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn step_scaled(
        &mut self,
        first: usize,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
        decay: &[bool],
        lr: f64,
        t: u64,
        grad_scale: f64,
    ) {
        let c = self.config;
        let (bc1, bc2) = c.bias_corrections(t);
        for (i, p) in params.iter_mut().enumerate().skip(first) {
            let shrink = if decay[i] { c.shrink(lr) } else { 1.0 };
            let k = AdamWStep {
                beta1: c.beta1,
                omb1: 1.0 - c.beta1,
                beta2: c.beta2,
                omb2: 1.0 - c.beta2,
                bc1,
                bc2,
                eps: c.eps,
                lr,
                shrink,
                grad_scale,
            };
            let (m, v, g) = (&mut self.m[i][..], &mut self.v[i][..], grads[i]);
            // Value by value, so blocks on different threads give the sequential result.
            p.par_chunks_mut(PAR_BLOCK)
                .zip(m.par_chunks_mut(PAR_BLOCK))
                .zip(v.par_chunks_mut(PAR_BLOCK))
                .zip(g.par_chunks(PAR_BLOCK))
                .for_each(|(((p, m), v), g)| adamw_block(&k, p, m, v, g));
        }
    }
}

/// Values per block of the element-wise loops handed to rayon: large enough to amortise a task,
/// small enough that the big tensors spread over the threads.
const PAR_BLOCK: usize = 1 << 15;

/// One AdamW update's scalars, computed once per tensor as the device optimiser receives them.
#[derive(Clone, Copy)]
struct AdamWStep {
    beta1: f64,
    omb1: f64,
    beta2: f64,
    omb2: f64,
    bc1: f64,
    bc2: f64,
    eps: f64,
    lr: f64,
    shrink: f64,
    /// The clipping factor (1: none).
    grad_scale: f64,
}

multiversion! {
    /// The update of one block of values, in f64 in the device kernel's order (kernels/optim.cu):
    /// m' = β₁m + (1 − β₁)g, v' = β₂v + ((1 − β₂)g)g, p ← p·s − lr·(m'/bc₁)/(√(v'/bc₂) + ε).
    fn adamw_block(k: &AdamWStep, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
            let gj = (g as f64 * k.grad_scale) as f32 as f64;
            let mj = k.beta1 * *m as f64 + k.omb1 * gj;
            let vj = k.beta2 * *v as f64 + k.omb2 * gj * gj;
            *m = mj as f32;
            *v = vj as f32;
            let update = (mj / k.bc1) / ((vj / k.bc2).sqrt() + k.eps);
            *p = (*p as f64 * k.shrink - k.lr * update) as f32;
        }
    }
}

/// Linear warm-up from 0 to the peak, then a half cosine down to `min_ratio`·peak at the
/// last step (VAR, ESM3).
///
/// ```
/// use vqx::train::WarmupCosine;
/// let s = WarmupCosine { peak: 1e-3, warmup: 10, total: 110, min_ratio: 0.1 };
/// assert!((s.lr(0) - 1e-4).abs() < 1e-12);      // step 1 of 10 warm-up steps
/// assert!((s.lr(9) - 1e-3).abs() < 1e-12);      // the peak at the end of warm-up
/// assert!((s.lr(109) - 1e-4).abs() < 1e-12);    // the floor at the last step
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WarmupCosine {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
    pub min_ratio: f64,
}

impl WarmupCosine {
    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self
            .total
            .saturating_sub(self.warmup)
            .saturating_sub(1)
            .max(1);
        let p = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let floor = self.peak * self.min_ratio;
        floor + (self.peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
    }
}

/// Scales every gradient by max_norm/‖g‖ when the global L2 norm ‖g‖ (over all tensors)
/// exceeds `max_norm` (0 or less: no clipping); returns ‖g‖ before clipping.
///
/// ```
/// let (mut a, mut b) = (vec![3.0f32], vec![4.0f32]);
/// let norm = vqx::train::clip_global_norm(&mut [&mut a[..], &mut b[..]], 1.0);
/// assert_eq!(norm, 5.0);
/// assert!((a[0] - 0.6).abs() < 1e-6 && (b[0] - 0.8).abs() < 1e-6);
/// ```
pub fn clip_global_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f64 {
    let norm = global_norm(&grads.iter().map(|g| &**g).collect::<Vec<_>>());
    let s = clip_scale(norm, max_norm);
    if s != 1.0 {
        for g in grads.iter_mut() {
            g.par_chunks_mut(PAR_BLOCK).for_each(|b| scale_block(b, s));
        }
    }
    norm
}

/// The global L2 norm ‖g‖ over all tensors, Σ g² in f64 over fixed blocks of each tensor (the
/// blocks' sums added in order): the same value whatever the thread count. Each square is
/// exact (24-bit significands).
///
/// ```
/// assert_eq!(vqx::train::global_norm(&[&[3.0], &[4.0]]), 5.0);
/// ```
pub fn global_norm(grads: &[&[f32]]) -> f64 {
    let mut total = 0.0f64;
    let mut part: Vec<f64> = Vec::new();
    for g in grads {
        g.par_chunks(PAR_BLOCK)
            .map(sum_of_squares)
            .collect_into_vec(&mut part);
        for p in &part {
            total += p;
        }
    }
    total.sqrt()
}

/// The factor [`clip_global_norm`] scales gradients by: max_norm/(‖g‖ + 1e-12) when
/// `max_norm` > 0 and ‖g‖ exceeds it, else 1.
///
/// ```
/// use vqx::train::clip_scale;
/// assert_eq!(clip_scale(0.5, 1.0), 1.0);
/// assert_eq!(clip_scale(2.0, 0.0), 1.0);
/// assert!((clip_scale(2.0, 1.0) - 0.5).abs() < 1e-12);
/// ```
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-12)
    } else {
        1.0
    }
}

/// Σ v² in f64 with 16 running sums (lane j takes values j, j + 16, …; they are added in lane
/// order at the end), which the compiler keeps in vector registers.
fn sum_of_squares(b: &[f32]) -> f64 {
    let mut out = 0.0;
    sum_of_squares_into(b, &mut out);
    out
}

multiversion! {
    fn sum_of_squares_into(b: &[f32], out: &mut f64) {
        const LANES: usize = 16;
        let mut acc = [0.0f64; LANES];
        let mut chunks = b.chunks_exact(LANES);
        for c in &mut chunks {
            for j in 0..LANES {
                acc[j] += c[j] as f64 * c[j] as f64;
            }
        }
        for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
            *a += v as f64 * v as f64;
        }
        let mut total = 0.0;
        for a in acc {
            total += a;
        }
        *out = total;
    }
}

multiversion! {
    /// g ← (float)(g·s), in f64 as the device kernel scales.
    fn scale_block(b: &mut [f32], s: f64) {
        for v in b.iter_mut() {
            *v = (*v as f64 * s) as f32;
        }
    }
}
