//! Fully connected layer y = x·Wᵀ + b, with W stored out×in as PyTorch's `nn.Linear` does.

use super::matmul::matmul;
use super::simd::multiversion;
use crate::matrix::{MatRef, Matrix};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

multiversion! {
    /// sums[j] += Σ_r rows[r][j] in f64, rows in order (vectorised across the columns).
    fn column_sums(rows: &[f32], sums: &mut [f64]) {
        for row in rows.chunks_exact(sums.len()) {
            for (s, &v) in sums.iter_mut().zip(row) {
                *s += v as f64;
            }
        }
    }
}

/// A linear layer (`in → out`).
///
/// ```
/// use vqx::model::Linear;
/// use vqx::{MatRef, Matrix};
/// let mut l = Linear::zeros(2, 1);
/// l.weight = Matrix::new(vec![1.0, -1.0], 1, 2)?;
/// l.bias = vec![0.5];
/// let y = l.forward(MatRef::new(&[3.0, 1.0], 1, 2)?);
/// assert_eq!(y.data(), &[2.5]);
/// # Ok::<(), vqx::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    /// out × in.
    pub weight: Matrix,
    /// out values.
    pub bias: Vec<f32>,
}

impl Linear {
    /// Weights and biases uniform in ±1/√in (PyTorch's default init for `nn.Linear`).
    pub fn new(inputs: usize, outputs: usize, rng: &mut ChaCha8Rng) -> Self {
        let bound = 1.0 / (inputs.max(1) as f32).sqrt();
        let w = (0..inputs * outputs)
            .map(|_| rng.gen_range(-bound..bound))
            .collect();
        let bias = (0..outputs).map(|_| rng.gen_range(-bound..bound)).collect();
        Linear {
            weight: Matrix::new(w, outputs, inputs).expect("out × in values"),
            bias,
        }
    }

    /// All-zero parameters (also the shape of this layer's gradient).
    pub fn zeros(inputs: usize, outputs: usize) -> Self {
        Linear {
            weight: Matrix::zeros(outputs, inputs),
            bias: vec![0.0; outputs],
        }
    }

    pub fn inputs(&self) -> usize {
        self.weight.cols()
    }
    pub fn outputs(&self) -> usize {
        self.weight.rows()
    }

    /// y = x·Wᵀ + b for x of N × in.
    pub fn forward(&self, x: MatRef<'_>) -> Matrix {
        let mut y = Matrix::zeros(x.rows(), self.outputs());
        self.forward_into(x, y.data_mut());
        y
    }

    /// y = x·Wᵀ + b into `y` (N × out, overwritten): the bias rows first, then the product
    /// accumulated onto them (the order the device repeats).
    ///
    /// ```
    /// use vqx::model::Linear;
    /// use vqx::{MatRef, Matrix};
    /// let mut l = Linear::zeros(2, 1);
    /// l.weight = Matrix::new(vec![1.0, -1.0], 1, 2)?;
    /// l.bias = vec![0.5];
    /// let mut y = [7.0f32];
    /// l.forward_into(MatRef::new(&[3.0, 1.0], 1, 2)?, &mut y);
    /// assert_eq!(y, [2.5]);
    /// # Ok::<(), vqx::Error>(())
    /// ```
    ///
    /// Panics when `y` is not N × out (the callers own both shapes).
    pub fn forward_into(&self, x: MatRef<'_>, y: &mut [f32]) {
        let o = self.outputs();
        assert_eq!(y.len(), x.rows() * o, "linear: output is not N × out");
        for row in y.chunks_mut(o) {
            row.copy_from_slice(&self.bias);
        }
        matmul(y, x, false, self.weight.as_ref(), true, true);
    }

    /// Given the layer's input `x` and dL/dy, adds dL/dW = dyᵀ·x and dL/db = Σ_n dy to `grad`
    /// and returns dL/dx = dy·W.
    pub fn backward(&self, x: MatRef<'_>, dy: MatRef<'_>, grad: &mut Linear) -> Matrix {
        let mut dx = Matrix::zeros(x.rows(), self.inputs());
        self.backward_into(x, dy, grad, Some(dx.data_mut()), true);
        dx
    }

    /// [`Self::backward`] into caller-owned buffers: dL/dW and dL/db are added to `grad`
    /// (`accumulate`) or written over it, dL/dx = dy·W goes to `dx` (N × in), skipped when
    /// `dx` is None (the first layer of an encoder: nobody needs the data's gradient).
    ///
    /// Panics when `dx` is not N × in.
    pub fn backward_into(
        &self,
        x: MatRef<'_>,
        dy: MatRef<'_>,
        grad: &mut Linear,
        dx: Option<&mut [f32]>,
        accumulate: bool,
    ) {
        matmul(grad.weight.data_mut(), dy, true, x, false, accumulate);
        // Column sums in f64, in row order: deterministic and accurate for large batches.
        let o = self.outputs();
        let mut sums = vec![0.0f64; o];
        column_sums(dy.data(), &mut sums);
        for (b, s) in grad.bias.iter_mut().zip(sums) {
            *b = if accumulate {
                (*b as f64 + s) as f32
            } else {
                s as f32
            };
        }
        if let Some(dx) = dx {
            assert_eq!(
                dx.len(),
                x.rows() * self.inputs(),
                "linear: dx is not N × in"
            );
            matmul(dx, dy, false, self.weight.as_ref(), false, false);
        }
    }
}
