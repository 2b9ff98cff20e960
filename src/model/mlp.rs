//! Multi-layer perceptron: [Linear → (LayerNorm) → activation] per hidden layer, then a final
//! Linear.

use super::{Activation, LayerNorm, LayerNormCache, Linear};
use crate::matrix::{MatRef, Matrix};
use rand_chacha::ChaCha8Rng;

/// An MLP `input → hidden[0] → … → output`.
///
/// ```
/// use rand::SeedableRng;
/// use vqx::model::{Activation, Mlp};
/// use vqx::MatRef;
/// let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
/// let mlp = Mlp::new(3, &[8, 8], 2, Activation::Gelu, true, &mut rng);
/// let y = mlp.infer(MatRef::new(&[0.1, 0.2, 0.3], 1, 3)?);
/// assert_eq!((y.rows(), y.cols()), (1, 2));
/// assert_eq!(mlp.tensors().len(), 3 * 2 + 2 * 2); // 3 linears, 2 layer norms
/// # Ok::<(), vqx::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Mlp {
    /// hidden.len() + 1 layers.
    pub linears: Vec<Linear>,
    /// One per hidden layer, or none.
    pub norms: Vec<LayerNorm>,
    pub activation: Activation,
}

/// The forward pass's intermediate values, for [`Mlp::backward`], and the backward pass's
/// buffers. Kept from step to step ([`Mlp::forward_with`]) it is reused, not reallocated, while
/// the batch size stays the same.
#[derive(Clone, Debug)]
pub struct MlpCache {
    /// Input of each linear layer (the first: a copy of the MLP's input).
    inputs: Vec<Matrix>,
    /// Input of each activation (after the layer norm when there is one).
    pre_activation: Vec<Matrix>,
    /// The layer norms' x̂ and 1/σ.
    norms: Vec<LayerNormCache>,
    /// The last layer's output.
    output: Matrix,
    /// Backward's buffers: dL/d(input of linear i).
    input_grads: Vec<Matrix>,
}

impl Default for MlpCache {
    /// Empty: the first forward pass sizes every buffer.
    fn default() -> Self {
        MlpCache {
            inputs: Vec::new(),
            pre_activation: Vec::new(),
            norms: Vec::new(),
            output: Matrix::zeros(0, 0),
            input_grads: Vec::new(),
        }
    }
}

impl MlpCache {
    /// The output of the last forward pass (empty before the first).
    pub fn output(&self) -> MatRef<'_> {
        self.output.as_ref()
    }
}

/// `m` shaped rows × cols: kept when it already is, else replaced by zeros.
fn shaped(m: &mut Matrix, rows: usize, cols: usize) -> &mut Matrix {
    if (m.rows(), m.cols()) != (rows, cols) {
        *m = Matrix::zeros(rows, cols);
    }
    m
}

/// Element `i` of `v` (grown as needed) shaped rows × cols.
fn slot(v: &mut Vec<Matrix>, i: usize, rows: usize, cols: usize) -> &mut Matrix {
    while v.len() <= i {
        v.push(Matrix::zeros(0, 0));
    }
    shaped(&mut v[i], rows, cols)
}

impl Mlp {
    /// Freshly initialised layers (see [`Linear::new`]; layer norms start at γ = 1, β = 0).
    pub fn new(
        input: usize,
        hidden: &[usize],
        output: usize,
        activation: Activation,
        layer_norm: bool,
        rng: &mut ChaCha8Rng,
    ) -> Self {
        let mut dims = vec![input];
        dims.extend_from_slice(hidden);
        dims.push(output);
        Mlp {
            linears: dims
                .windows(2)
                .map(|w| Linear::new(w[0], w[1], rng))
                .collect(),
            norms: if layer_norm {
                hidden.iter().map(|&h| LayerNorm::new(h)).collect()
            } else {
                Vec::new()
            },
            activation,
        }
    }

    /// The same shapes, every parameter 0: the container of this MLP's gradient.
    pub fn zeros_like(&self) -> Mlp {
        Mlp {
            linears: self
                .linears
                .iter()
                .map(|l| Linear::zeros(l.inputs(), l.outputs()))
                .collect(),
            norms: self
                .norms
                .iter()
                .map(|n| LayerNorm::zeros(n.dim()))
                .collect(),
            activation: self.activation,
        }
    }

    pub fn input_dim(&self) -> usize {
        self.linears[0].inputs()
    }
    pub fn output_dim(&self) -> usize {
        self.linears[self.linears.len() - 1].outputs()
    }
    /// Widths of the hidden layers.
    pub fn hidden(&self) -> Vec<usize> {
        self.linears[..self.linears.len() - 1]
            .iter()
            .map(Linear::outputs)
            .collect()
    }

    /// Every parameter tensor as (name, shape, values), in a fixed order:
    /// `linears.{i}.weight`, `linears.{i}.bias`, then `norms.{i}.weight`, `norms.{i}.bias`.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        let mut out = Vec::new();
        for (i, l) in self.linears.iter().enumerate() {
            out.push((
                format!("linears.{i}.weight"),
                vec![l.outputs(), l.inputs()],
                l.weight.data(),
            ));
            out.push((
                format!("linears.{i}.bias"),
                vec![l.outputs()],
                l.bias.as_slice(),
            ));
        }
        for (i, n) in self.norms.iter().enumerate() {
            out.push((
                format!("norms.{i}.weight"),
                vec![n.dim()],
                n.weight.as_slice(),
            ));
            out.push((format!("norms.{i}.bias"), vec![n.dim()], n.bias.as_slice()));
        }
        out
    }

    /// The same tensors as [`Self::tensors`], in the same order, mutable.
    pub fn tensors_mut(&mut self) -> Vec<&mut [f32]> {
        let mut out: Vec<&mut [f32]> = Vec::new();
        for l in &mut self.linears {
            out.push(l.weight.data_mut());
            out.push(&mut l.bias);
        }
        for n in &mut self.norms {
            out.push(&mut n.weight);
            out.push(&mut n.bias);
        }
        out
    }

    /// The output and the cache for [`Self::backward`].
    pub fn forward(&self, x: MatRef<'_>) -> (Matrix, MlpCache) {
        let mut cache = MlpCache::default();
        self.forward_with(x, &mut cache);
        let out = std::mem::replace(&mut cache.output, Matrix::zeros(0, 0));
        (out, cache)
    }

    /// The forward pass into `cache`'s buffers (reused when the shapes match, so a training
    /// loop allocates nothing per step); returns the output, which lives in the cache.
    ///
    /// ```
    /// use rand::SeedableRng;
    /// use vqx::model::{Activation, Mlp, MlpCache};
    /// use vqx::MatRef;
    /// let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    /// let mlp = Mlp::new(3, &[8], 2, Activation::Gelu, false, &mut rng);
    /// let x = MatRef::new(&[0.1, 0.2, 0.3], 1, 3)?;
    /// let mut cache = MlpCache::default();
    /// let y = mlp.forward_with(x, &mut cache).to_owned();
    /// assert_eq!(y, mlp.infer(x));
    /// # Ok::<(), vqx::Error>(())
    /// ```
    pub fn forward_with<'c>(&self, x: MatRef<'_>, cache: &'c mut MlpCache) -> MatRef<'c> {
        let last = self.linears.len() - 1;
        let n = x.rows();
        slot(&mut cache.inputs, 0, n, x.cols())
            .data_mut()
            .copy_from_slice(x.data());
        for (i, l) in self.linears.iter().enumerate() {
            if i == last {
                let out = shaped(&mut cache.output, n, l.outputs());
                l.forward_into(cache.inputs[i].as_ref(), out.data_mut());
                break;
            }
            let h = slot(&mut cache.pre_activation, i, n, l.outputs());
            l.forward_into(cache.inputs[i].as_ref(), h.data_mut());
            if let Some(norm) = self.norms.get(i) {
                let (y, c) = norm.forward(cache.pre_activation[i].as_ref());
                cache.pre_activation[i] = y;
                cache.norms.truncate(i);
                cache.norms.push(c);
            }
            let a = slot(&mut cache.inputs, i + 1, n, l.outputs());
            self.activation
                .forward_into(cache.pre_activation[i].data(), a.data_mut());
        }
        cache.output.as_ref()
    }

    /// The output only (no cache kept: what inference needs).
    pub fn infer(&self, x: MatRef<'_>) -> Matrix {
        let last = self.linears.len() - 1;
        let mut a = self.linears[0].forward(x);
        for i in 0..last {
            if let Some(n) = self.norms.get(i) {
                a = n.forward(a.as_ref()).0;
            }
            let mut act = Matrix::zeros(a.rows(), a.cols());
            self.activation.forward_into(a.data(), act.data_mut());
            a = self.linears[i + 1].forward(act.as_ref());
        }
        a
    }

    /// Adds every parameter's gradient to `grad` (shaped like this MLP, e.g. by
    /// [`Self::zeros_like`]) and returns dL/dx. Works on a copy of the cache's buffers; a
    /// training loop uses [`Self::backward_with`].
    pub fn backward(&self, cache: &MlpCache, dy: MatRef<'_>, grad: &mut Mlp) -> Matrix {
        let mut cache = cache.clone();
        self.backward_impl(&mut cache, dy, grad, true, true)
            .expect("input gradient asked for")
            .to_owned()
    }

    /// [`Self::backward`] in `cache`'s buffers: the parameters' gradients are written over
    /// `grad` (not added); dL/dx (living in the cache) is computed only when `input_grad` is
    /// set (an encoder's data needs none, which saves its first layer's largest product).
    pub fn backward_with<'c>(
        &self,
        cache: &'c mut MlpCache,
        dy: MatRef<'_>,
        grad: &mut Mlp,
        input_grad: bool,
    ) -> Option<MatRef<'c>> {
        self.backward_impl(cache, dy, grad, input_grad, false)
    }

    fn backward_impl<'c>(
        &self,
        cache: &'c mut MlpCache,
        dy: MatRef<'_>,
        grad: &mut Mlp,
        input_grad: bool,
        accumulate: bool,
    ) -> Option<MatRef<'c>> {
        let last = self.linears.len() - 1;
        let n = dy.rows();
        for (i, l) in self.linears.iter().enumerate() {
            slot(&mut cache.input_grads, i, n, l.inputs());
        }
        if !accumulate {
            // LayerNorm::backward adds to its gradient.
            for g in &mut grad.norms {
                g.weight.fill(0.0);
                g.bias.fill(0.0);
            }
        }
        for i in (0..=last).rev() {
            // lower[i]: dL/d(input of linear i); upper[0]: that of linear i + 1, by now dL/dy
            // of linear i.
            let (lower, upper) = cache.input_grads.split_at_mut(i + 1);
            let dy_i = if i == last { dy } else { upper[0].as_ref() };
            let dx = (i > 0 || input_grad).then(|| lower[i].data_mut());
            self.linears[i].backward_into(
                cache.inputs[i].as_ref(),
                dy_i,
                &mut grad.linears[i],
                dx,
                accumulate,
            );
            if i == 0 {
                break;
            }
            // dL/d(activation output) → dL/d(activation input), in place.
            let h = i - 1;
            self.activation
                .backward_in_place(cache.pre_activation[h].data(), lower[i].data_mut());
            if let Some(norm) = self.norms.get(h) {
                lower[i] = norm.backward(&cache.norms[h], lower[i].as_ref(), &mut grad.norms[h]);
            }
        }
        input_grad.then(|| cache.input_grads[0].as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn batch(rng: &mut ChaCha8Rng, n: usize, d: usize) -> Matrix {
        Matrix::new((0..n * d).map(|_| rng.gen_range(-2.0..2.0)).collect(), n, d).unwrap()
    }

    #[test]
    fn reused_buffers_give_the_fresh_pass_bit_for_bit() {
        for (layer_norm, act) in [(false, Activation::Gelu), (true, Activation::Relu)] {
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let mlp = Mlp::new(5, &[16, 12], 3, act, layer_norm, &mut rng);
            let mut cache = MlpCache::default();
            // A dirty gradient: backward_with overwrites it.
            let mut grad = mlp.zeros_like();
            for t in grad.tensors_mut() {
                t.fill(9.0);
            }
            for step in 0..3 {
                let x = batch(&mut rng, 11, 5);
                let dy = batch(&mut rng, 11, 3);
                let (want_y, fresh) = mlp.forward(x.as_ref());
                let got_y = mlp.forward_with(x.as_ref(), &mut cache).to_owned();
                assert_eq!(got_y, want_y, "step {step}: output");
                let mut want_grad = mlp.zeros_like();
                let want_dx = mlp.backward(&fresh, dy.as_ref(), &mut want_grad);
                let got_dx = mlp
                    .backward_with(&mut cache, dy.as_ref(), &mut grad, true)
                    .unwrap()
                    .to_owned();
                assert_eq!(got_dx, want_dx, "step {step}: dx");
                assert_eq!(grad, want_grad, "step {step}: parameter gradients");
                // Without the input's gradient: the same parameter gradients.
                mlp.forward_with(x.as_ref(), &mut cache);
                assert!(
                    mlp.backward_with(&mut cache, dy.as_ref(), &mut grad, false)
                        .is_none()
                );
                assert_eq!(grad, want_grad, "step {step}: no dx");
            }
        }
    }

    #[test]
    fn backward_adds_to_the_gradient() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mlp = Mlp::new(4, &[6], 2, Activation::Gelu, true, &mut rng);
        let (x, dy) = (batch(&mut rng, 5, 4), batch(&mut rng, 5, 2));
        let (_, cache) = mlp.forward(x.as_ref());
        let mut once = mlp.zeros_like();
        mlp.backward(&cache, dy.as_ref(), &mut once);
        let mut twice = mlp.zeros_like();
        mlp.backward(&cache, dy.as_ref(), &mut twice);
        mlp.backward(&cache, dy.as_ref(), &mut twice);
        for (a, b) in once.tensors().iter().zip(twice.tensors()) {
            for (&u, &v) in a.2.iter().zip(b.2) {
                assert!((2.0 * u - v).abs() <= 1e-5 * v.abs().max(1e-3), "{}", a.0);
            }
        }
    }
}
