//! Autograd-lite: the backward pass of the quantizer layer (SPEC §2, §3).
//!
//! Output z = x + sg(q − x) (straight-through) or the rotation trick; both equal q in value.
//! Under cosine x̂ = x/‖x‖ takes x's place everywhere, and the gradient goes back through the
//! normalisation (vector-quantize-pytorch's `use_cosine_sim`).
//! Losses: commitment β·mean((x − sg(q))²) (gradient to x only) and, in gradient mode, the
//! codebook loss mean((sg(x) − q)²) (gradient to the codes only). Means run over the kept
//! (unmasked) rows × D.

use super::{CodebookLearning, Estimator, Forward, VectorQuantizer};
use crate::ema::SumMode;
use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};
use crate::nearest::{Metric, inv_norm_f64, normalize_rows};

/// Gradients of L = L_decoder(z) + commitment + codebook loss.
#[derive(Clone, Debug)]
pub struct Gradients {
    /// dL/dx (N × D): the output gradient passed through the estimator, plus
    /// 2β(x − q)/(kept·D) on kept rows.
    pub x: Matrix,
    /// dL/dC (K × D) in gradient mode: Σ_{i(n)=k} 2(q_n − x_n)/(kept·D) over kept rows.
    /// None under EMA, where no gradient reaches the codebook.
    pub codebook: Option<Matrix>,
}

pub(super) fn backward(
    vq: &VectorQuantizer,
    fwd: &Forward,
    x: MatRef<'_>,
    grad_output: MatRef<'_>,
) -> Result<Gradients> {
    let (n, d) = (fwd.quantized.rows(), fwd.quantized.cols());
    for (what, m) in [("input", x), ("output gradient", grad_output)] {
        check_like_forward(what, (m.rows(), m.cols()), (n, d))?;
    }
    grad_output.check_finite("output gradient")?;
    let q = fwd.quantized.as_ref();
    let scale = if fwd.kept_rows() == 0 {
        0.0
    } else {
        2.0 / (fwd.kept_rows() as f64 * d as f64)
    };
    let beta = vq.config.commitment_weight as f64;

    // Under cosine the layer's input is x̂ = x/‖x‖ (vector-quantize-pytorch's `l2norm`): the
    // estimator and the losses see x̂, and the gradient goes back through the normalisation.
    let unit = (vq.config.metric == Metric::Cosine).then(|| normalize_rows(x));
    let xt = unit.as_ref().map_or(x, Matrix::as_ref);
    let mut gx = Matrix::zeros(n, d);
    for (r, out) in gx.data_mut().chunks_mut(d).enumerate() {
        let (xr, qr, gr) = (xt.row(r), q.row(r), grad_output.row(r));
        match vq.config.estimator {
            Estimator::StraightThrough => out.copy_from_slice(gr),
            Estimator::RotationTrick => rotate_gradient(xr, qr, gr, out),
        }
        if fwd.kept(r) && beta != 0.0 {
            for ((o, &a), &b) in out.iter_mut().zip(xr).zip(qr) {
                *o = (*o as f64 + beta * scale * (a as f64 - b as f64)) as f32;
            }
        }
        if unit.is_some() {
            normalize_backward(x.row(r), out);
        }
    }

    let codebook = match vq.config.learning {
        CodebookLearning::Ema { .. } => None,
        CodebookLearning::Gradient => {
            // Scatter-add of 2(q − x)/(kept·D): the EMA scatter-add kernel over the differences.
            let rows: Vec<usize> = (0..n).filter(|&r| fwd.kept(r)).collect();
            let k = vq.config.codebook_size;
            if rows.is_empty() {
                Some(Matrix::zeros(k, d))
            } else {
                let mut diff = Vec::with_capacity(rows.len() * d);
                for &r in &rows {
                    diff.extend(q.row(r).iter().zip(xt.row(r)).map(|(&a, &b)| a - b));
                }
                let diff = Matrix::new(diff, rows.len(), d)?;
                let idx: Vec<u32> = rows.iter().map(|&r| fwd.indices[r]).collect();
                let sums = vq
                    .backend
                    .code_sums(diff.as_ref(), &idx, k, SumMode::Deterministic)?;
                let data = sums
                    .sums
                    .iter()
                    .map(|&s| (s as f64 * scale) as f32)
                    .collect();
                Some(Matrix::new(data, k, d)?)
            }
        }
    };
    Ok(Gradients { x: gx, codebook })
}

/// The gradient through x̂ = x/‖x‖ for one row, in place: g ← (g − x̂(x̂·g))/‖x‖, computed in
/// f64 as (g_i − x_i·((x·g)·inv·inv))·inv with inv = 1/‖x‖ and x·g summed in increasing i from
/// 0, rounded once. A zero row gets a zero gradient (its x̂ is 0 whatever x does nearby).
///
/// Public so that the device kernel (kernels/grad.cu `grad_normalize_f32`) can be checked
/// against it bit for bit. `x` and `g` must have the same length.
pub fn normalize_backward(x: &[f32], g: &mut [f32]) {
    let inv = inv_norm_f64(x);
    let mut s = 0.0f64;
    for (&a, &b) in x.iter().zip(g.iter()) {
        s += a as f64 * b as f64;
    }
    let t = s * inv * inv;
    for (o, &a) in g.iter_mut().zip(x) {
        *o = ((*o as f64 - a as f64 * t) * inv) as f32;
    }
}

/// Fails unless `what`, of shape `got`, has the forward pass's shape (n × D).
pub(super) fn check_like_forward(
    what: &str,
    got: (usize, usize),
    (n, d): (usize, usize),
) -> Result<()> {
    if got != (n, d) {
        return Err(Error::shape(
            format!("{what} vs the forward pass"),
            format!("{n} × {d}"),
            format!("{} × {}", got.0, got.1),
        ));
    }
    Ok(())
}

/// The rotation trick's backward for one row: with u = x/‖x‖, q̂ = q/‖q‖,
/// w = (u + q̂)/‖u + q̂‖ and λ = ‖q‖/‖x‖, dL/dx = λ(g − 2w(w·g) + 2u(q̂·g)), the transpose of
/// the Jacobian λ(I − 2wwᵀ + 2q̂uᵀ). Where the rotation is undefined (x = 0, q = 0, or q
/// pointing exactly opposite x) the row falls back to straight-through.
///
/// Public so that the device kernel (kernels/grad.cu `grad_rotation_f32`) can be checked
/// against it bit for bit. `x`, `q`, `g` and `out` must have the same length.
pub fn rotate_gradient(x: &[f32], q: &[f32], g: &[f32], out: &mut [f32]) {
    let Some(r) = Rotation::new(x, q) else {
        out.copy_from_slice(g);
        return;
    };
    let dot = |a: &[f64]| a.iter().zip(g).map(|(&v, &b)| v * b as f64).sum::<f64>();
    let (wg, qg) = (dot(&r.w), dot(&r.qh));
    for (i, o) in out.iter_mut().enumerate() {
        *o = (r.lambda * (g[i] as f64 - 2.0 * r.w[i] * wg + 2.0 * r.u[i] * qg)) as f32;
    }
}

/// The rotation taking x's direction to q's, in f64: u = x/‖x‖, q̂ = q/‖q‖,
/// w = (u + q̂)/‖u + q̂‖, λ = ‖q‖/‖x‖. None where it is undefined (x = 0, q = 0, or q pointing
/// exactly opposite x).
struct Rotation {
    u: Vec<f64>,
    qh: Vec<f64>,
    w: Vec<f64>,
    lambda: f64,
}

impl Rotation {
    fn new(x: &[f32], q: &[f32]) -> Option<Self> {
        let norm = |v: &[f32]| v.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt();
        let (nx, nq) = (norm(x), norm(q));
        if nx == 0.0 || nq == 0.0 {
            return None;
        }
        let u: Vec<f64> = x.iter().map(|&a| a as f64 / nx).collect();
        let qh: Vec<f64> = q.iter().map(|&a| a as f64 / nq).collect();
        let w: Vec<f64> = u.iter().zip(&qh).map(|(a, b)| a + b).collect();
        let nw = w.iter().map(|v| v * v).sum::<f64>().sqrt();
        if !nw.is_normal() {
            return None;
        }
        let w = w.iter().map(|v| v / nw).collect();
        Some(Rotation {
            u,
            qh,
            w,
            lambda: nq / nx,
        })
    }
}

/// The rotation trick's forward value for one row: λ[x − 2(x·w)w + 2(x·u)q̂], equal to q up to
/// rounding (q itself where the rotation is undefined). Exposed so tests can check value and
/// gradient against each other.
pub fn rotation_trick_value(x: &[f32], q: &[f32]) -> Vec<f64> {
    let Some(r) = Rotation::new(x, q) else {
        return q.iter().map(|&v| v as f64).collect();
    };
    let dot = |a: &[f64]| a.iter().zip(x).map(|(&v, &b)| v * b as f64).sum::<f64>();
    let (xw, xu) = (dot(&r.w), dot(&r.u));
    (0..x.len())
        .map(|i| r.lambda * (x[i] as f64 - 2.0 * xw * r.w[i] + 2.0 * xu * r.qh[i]))
        .collect()
}
