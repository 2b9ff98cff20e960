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

/// The forward pass's intermediate values, for [`Mlp::backward`].
#[derive(Clone, Debug)]
pub struct MlpCache {
    /// Input of each linear layer.
    inputs: Vec<Matrix>,
    /// Input of each activation (after the layer norm when there is one).
    pre_activation: Vec<Matrix>,
    /// The layer norms' x̂ and 1/σ.
    norms: Vec<LayerNormCache>,
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
        let last = self.linears.len() - 1;
        let mut cache = MlpCache {
            inputs: Vec::with_capacity(self.linears.len()),
            pre_activation: Vec::with_capacity(last),
            norms: Vec::with_capacity(self.norms.len()),
        };
        let mut a = x.to_owned();
        for (i, l) in self.linears.iter().enumerate() {
            let h = l.forward(a.as_ref());
            cache.inputs.push(a);
            if i == last {
                return (h, cache);
            }
            let h = match self.norms.get(i) {
                Some(n) => {
                    let (y, c) = n.forward(h.as_ref());
                    cache.norms.push(c);
                    y
                }
                None => h,
            };
            a = Matrix::new(self.activation.forward(h.data()), h.rows(), h.cols())
                .expect("same shape");
            cache.pre_activation.push(h);
        }
        unreachable!("an MLP has at least one linear layer")
    }

    /// The output only (no cache kept: what inference needs).
    pub fn infer(&self, x: MatRef<'_>) -> Matrix {
        let last = self.linears.len() - 1;
        let mut a = self.linears[0].forward(x);
        for i in 0..last {
            if let Some(n) = self.norms.get(i) {
                a = n.forward(a.as_ref()).0;
            }
            let act = Matrix::new(self.activation.forward(a.data()), a.rows(), a.cols())
                .expect("same shape");
            a = self.linears[i + 1].forward(act.as_ref());
        }
        a
    }

    /// Adds every parameter's gradient to `grad` (shaped like this MLP, e.g. by
    /// [`Self::zeros_like`]) and returns dL/dx.
    pub fn backward(&self, cache: &MlpCache, dy: MatRef<'_>, grad: &mut Mlp) -> Matrix {
        let last = self.linears.len() - 1;
        let mut g =
            self.linears[last].backward(cache.inputs[last].as_ref(), dy, &mut grad.linears[last]);
        for i in (0..last).rev() {
            let pre = &cache.pre_activation[i];
            let mut d = Matrix::new(
                self.activation.backward(pre.data(), g.data()),
                pre.rows(),
                pre.cols(),
            )
            .expect("same shape");
            if let Some(n) = self.norms.get(i) {
                d = n.backward(&cache.norms[i], d.as_ref(), &mut grad.norms[i]);
            }
            g = self.linears[i].backward(
                cache.inputs[i].as_ref(),
                d.as_ref(),
                &mut grad.linears[i],
            );
        }
        g
    }
}
