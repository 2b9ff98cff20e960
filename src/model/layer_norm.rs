//! Layer normalisation over each row: y = γ·(x − μ)/√(σ² + ε) + β.

use crate::matrix::{MatRef, Matrix};

/// ε of PyTorch's `nn.LayerNorm`.
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// A layer norm over rows of `dim` values, with a learned scale γ and shift β.
///
/// ```
/// use vqx::{model::LayerNorm, MatRef};
/// let ln = LayerNorm::new(2);
/// let (y, _) = ln.forward(MatRef::new(&[1.0, 3.0], 1, 2)?);
/// assert!((y.data()[0] + 1.0).abs() < 1e-4 && (y.data()[1] - 1.0).abs() < 1e-4);
/// # Ok::<(), vqx::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNorm {
    /// γ, initialised to 1.
    pub weight: Vec<f32>,
    /// β, initialised to 0.
    pub bias: Vec<f32>,
}

/// What the backward pass needs from the forward: x̂ and 1/σ per row.
#[derive(Clone, Debug)]
pub struct LayerNormCache {
    normalized: Matrix,
    inv_std: Vec<f32>,
}

impl LayerNormCache {
    /// x̂ = (x − μ)/σ, rows × dim.
    pub fn normalized(&self) -> MatRef<'_> {
        self.normalized.as_ref()
    }
    /// 1/σ per row.
    pub fn inv_std(&self) -> &[f32] {
        &self.inv_std
    }
}

impl LayerNorm {
    /// γ = 1, β = 0.
    pub fn new(dim: usize) -> Self {
        LayerNorm {
            weight: vec![1.0; dim],
            bias: vec![0.0; dim],
        }
    }
    /// γ = β = 0 (the shape of this layer's gradient).
    pub fn zeros(dim: usize) -> Self {
        LayerNorm {
            weight: vec![0.0; dim],
            bias: vec![0.0; dim],
        }
    }
    pub fn dim(&self) -> usize {
        self.weight.len()
    }

    /// y and the cache for [`Self::backward`]. Means and variances are summed in f64.
    pub fn forward(&self, x: MatRef<'_>) -> (Matrix, LayerNormCache) {
        let d = x.cols();
        let mut normalized = Matrix::zeros(x.rows(), d);
        let mut y = Matrix::zeros(x.rows(), d);
        let mut inv_std = Vec::with_capacity(x.rows());
        for (r, (nr, yr)) in normalized
            .data_mut()
            .chunks_mut(d)
            .zip(y.data_mut().chunks_mut(d))
            .enumerate()
        {
            let xr = x.row(r);
            let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = xr
                .iter()
                .map(|&v| (v as f64 - mean) * (v as f64 - mean))
                .sum::<f64>()
                / d as f64;
            let inv = 1.0 / (var + LAYER_NORM_EPS as f64).sqrt();
            for i in 0..d {
                let h = ((xr[i] as f64 - mean) * inv) as f32;
                nr[i] = h;
                yr[i] = self.weight[i] * h + self.bias[i];
            }
            inv_std.push(inv as f32);
        }
        (
            y,
            LayerNormCache {
                normalized,
                inv_std,
            },
        )
    }

    /// Adds dL/dγ = Σ dy·x̂ and dL/dβ = Σ dy to `grad`; returns
    /// dL/dx = (1/σ)(g − mean(g) − x̂·mean(g·x̂)) with g = dy·γ.
    pub fn backward(&self, cache: &LayerNormCache, dy: MatRef<'_>, grad: &mut LayerNorm) -> Matrix {
        let d = dy.cols();
        let mut dx = Matrix::zeros(dy.rows(), d);
        let mut gw = vec![0.0f64; d];
        let mut gb = vec![0.0f64; d];
        let mut g = vec![0.0f64; d];
        for (r, out) in dx.data_mut().chunks_mut(d).enumerate() {
            let (dyr, hr) = (dy.row(r), cache.normalized.row(r));
            let (mut mean_g, mut mean_gh) = (0.0f64, 0.0f64);
            for i in 0..d {
                gw[i] += dyr[i] as f64 * hr[i] as f64;
                gb[i] += dyr[i] as f64;
                g[i] = dyr[i] as f64 * self.weight[i] as f64;
                mean_g += g[i];
                mean_gh += g[i] * hr[i] as f64;
            }
            mean_g /= d as f64;
            mean_gh /= d as f64;
            let inv = cache.inv_std[r] as f64;
            for i in 0..d {
                out[i] = (inv * (g[i] - mean_g - hr[i] as f64 * mean_gh)) as f32;
            }
        }
        for (w, s) in grad.weight.iter_mut().zip(gw) {
            *w = (*w as f64 + s) as f32;
        }
        for (b, s) in grad.bias.iter_mut().zip(gb) {
            *b = (*b as f64 + s) as f32;
        }
        dx
    }
}
