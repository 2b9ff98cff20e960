//! The VQ-VAE's training-step gradients against central finite differences.
//!
//! With the quantizer's stop-gradients frozen (the indices, the codes q and the
//! straight-through offset c = q − e₀ held at their values at the base point), one step's loss
//! is a smooth function of every parameter:
//!   L(θ) = mean((dec(e(θ) + c) − x)²) + β·mean((e(θ) − q)²) [+ mean((e₀ − C[i])²)],
//! the last term only with a gradient-learned codebook (then C varies). The test evaluates it
//! with an independent f64 forward written here and compares central differences (h = 1e-6
//! on f64 copies of the parameters) with the model's analytic f32 gradients: agreement within
//! 1e-6 + 1e-4·|g| (f32 rounding of the analytic side, not the finite differences, dominates).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vqx::backend::Device;
use vqx::model::{Activation, LAYER_NORM_EPS, Mlp, VqVae, VqVaeConfig};
use vqx::quantizer::{CodebookLearning, QuantizerConfig, VectorQuantizer};
use vqx::{MatRef, Matrix};

/// An MLP's parameters in f64, in `Mlp::tensors` order.
#[derive(Clone)]
struct RefMlp {
    tensors: Vec<Vec<f64>>,
    shapes: Vec<Vec<usize>>,
    linears: usize,
    layer_norm: bool,
    activation: Activation,
}

impl RefMlp {
    fn of(m: &Mlp) -> Self {
        let t = m.tensors();
        RefMlp {
            tensors: t
                .iter()
                .map(|(_, _, v)| v.iter().map(|&a| a as f64).collect())
                .collect(),
            shapes: t.iter().map(|(_, s, _)| s.clone()).collect(),
            linears: m.linears.len(),
            layer_norm: !m.norms.is_empty(),
            activation: m.activation,
        }
    }

    fn act(&self, x: f64) -> f64 {
        match self.activation {
            Activation::Relu => x.max(0.0),
            Activation::Gelu => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
        }
    }

    /// One row through the MLP.
    fn forward(&self, x: &[f64]) -> Vec<f64> {
        let mut a = x.to_vec();
        for i in 0..self.linears {
            let (w, b) = (&self.tensors[2 * i], &self.tensors[2 * i + 1]);
            let (out, inp) = (self.shapes[2 * i][0], self.shapes[2 * i][1]);
            let mut h: Vec<f64> = (0..out)
                .map(|o| b[o] + (0..inp).map(|j| w[o * inp + j] * a[j]).sum::<f64>())
                .collect();
            if i + 1 == self.linears {
                return h;
            }
            if self.layer_norm {
                let base = 2 * self.linears + 2 * i;
                let (g, beta) = (&self.tensors[base], &self.tensors[base + 1]);
                let mean = h.iter().sum::<f64>() / out as f64;
                let var = h.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / out as f64;
                let inv = 1.0 / (var + LAYER_NORM_EPS as f64).sqrt();
                for k in 0..out {
                    h[k] = g[k] * (h[k] - mean) * inv + beta[k];
                }
            }
            a = h.iter().map(|&v| self.act(v)).collect();
        }
        unreachable!()
    }
}

struct Frozen {
    x: Vec<Vec<f64>>,
    idx: Vec<usize>,
    /// c = q − e₀ per row.
    offset: Vec<Vec<f64>>,
    /// e₀ per row (the codebook loss's sg(e)).
    e0: Vec<Vec<f64>>,
    beta: f64,
    gradient_codebook: bool,
}

/// The surrogate loss in f64.
fn surrogate(f: &Frozen, enc: &RefMlp, dec: &RefMlp, codebook: &[Vec<f64>]) -> f64 {
    let n = f.x.len();
    let (mut rec, mut com, mut cb) = (0.0, 0.0, 0.0);
    let (dd, cd) = (f.x[0].len(), codebook[0].len());
    for r in 0..n {
        let e = enc.forward(&f.x[r]);
        let z: Vec<f64> = e.iter().zip(&f.offset[r]).map(|(a, b)| a + b).collect();
        let y = dec.forward(&z);
        rec += y
            .iter()
            .zip(&f.x[r])
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>();
        let q = &codebook[f.idx[r]];
        // The commitment term's q is under sg: the codes at the base point (held in offset + e₀).
        let q0: Vec<f64> = f.offset[r]
            .iter()
            .zip(&f.e0[r])
            .map(|(a, b)| a + b)
            .collect();
        com += e.iter().zip(&q0).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
        cb += f.e0[r]
            .iter()
            .zip(q)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>();
    }
    let mut loss = rec / (n * dd) as f64 + f.beta * com / (n * cd) as f64;
    if f.gradient_codebook {
        loss += cb / (n * cd) as f64;
    }
    loss
}

fn close(analytic: f32, numeric: f64) -> bool {
    (analytic as f64 - numeric).abs() <= 1e-6 + 1e-4 * numeric.abs()
}

fn check(activation: Activation, layer_norm: bool, hidden: Vec<usize>, learning: CodebookLearning) {
    let (d, code_dim, k, n) = (3, 2, 5, 6);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let x: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.5f32..1.5)).collect();
    let mut cfg = VqVaeConfig::new(d, code_dim, hidden);
    cfg.activation = activation;
    cfg.layer_norm = layer_norm;
    cfg.seed = 3;
    let beta = 0.25f32;
    let qcfg = QuantizerConfig::new(k, code_dim)
        .commitment_weight(beta)
        .learning(learning)
        .device(Device::Cpu);
    let fresh = VqVae::new(cfg.clone(), qcfg.clone()).unwrap();
    // The codebook: encoder outputs of the first rows, nudged, so every code is near the data.
    let e = fresh.encoder.infer(MatRef::new(&x, n, d).unwrap());
    let cb: Vec<f32> = (0..k * code_dim)
        .map(|i| e.data()[i % (n * code_dim)] + 0.05 * ((i * 7 % 5) as f32 - 2.0))
        .collect();
    let codebook = Matrix::new(cb, k, code_dim).unwrap();
    let vq = VectorQuantizer::with_codebook(qcfg.clone(), codebook.clone()).unwrap();
    let mut model = VqVae::from_parts(
        cfg.clone(),
        fresh.encoder.clone(),
        fresh.decoder.clone(),
        vq,
    )
    .unwrap();
    let xm = MatRef::new(&x, n, d).unwrap();
    let (out, grads) = model.forward_backward(xm, false).unwrap();

    // The training-side pass (EMA update after the assignment) gives the same gradients.
    let vq2 = VectorQuantizer::with_codebook(qcfg, codebook.clone()).unwrap();
    let mut model2 =
        VqVae::from_parts(cfg, fresh.encoder.clone(), fresh.decoder.clone(), vq2).unwrap();
    let (out2, grads2) = model2.forward_backward(xm, true).unwrap();
    assert_eq!(out.indices, out2.indices);
    assert_eq!(grads.encoder, grads2.encoder);
    assert_eq!(grads.decoder, grads2.decoder);

    let enc = RefMlp::of(&model.encoder);
    let dec = RefMlp::of(&model.decoder);
    let cb64: Vec<Vec<f64>> = (0..k)
        .map(|j| codebook.row(j).iter().map(|&v| v as f64).collect())
        .collect();
    let xs: Vec<Vec<f64>> = (0..n)
        .map(|r| xm.row(r).iter().map(|&v| v as f64).collect())
        .collect();
    let idx: Vec<usize> = out.indices.iter().map(|&i| i as usize).collect();
    let e0: Vec<Vec<f64>> = xs.iter().map(|r| enc.forward(r)).collect();
    let offset: Vec<Vec<f64>> = (0..n)
        .map(|r| {
            cb64[idx[r]]
                .iter()
                .zip(&e0[r])
                .map(|(q, e)| q - e)
                .collect()
        })
        .collect();
    let frozen = Frozen {
        x: xs,
        idx,
        offset,
        e0,
        beta: beta as f64,
        gradient_codebook: learning == CodebookLearning::Gradient,
    };
    // The f64 forward is the model's function: same loss to f32 precision.
    let base = surrogate(&frozen, &enc, &dec, &cb64);
    assert!(
        (base - out.loss).abs() <= 1e-6 * base.max(1.0),
        "f64 reference loss {base} vs model {}",
        out.loss
    );

    let h = 1e-6;
    let mut checked = 0;
    let mut worst = 0.0f64;
    for (which, analytic) in [(0, &grads.encoder), (1, &grads.decoder)] {
        let names = analytic.tensors();
        for (t, (name, _, g)) in names.iter().enumerate() {
            for i in 0..g.len() {
                let fd = {
                    let (mut ep, mut dp) = (enc.clone(), dec.clone());
                    let (mut em, mut dm) = (enc.clone(), dec.clone());
                    if which == 0 {
                        ep.tensors[t][i] += h;
                        em.tensors[t][i] -= h;
                    } else {
                        dp.tensors[t][i] += h;
                        dm.tensors[t][i] -= h;
                    }
                    (surrogate(&frozen, &ep, &dp, &cb64) - surrogate(&frozen, &em, &dm, &cb64))
                        / (2.0 * h)
                };
                let part = if which == 0 { "encoder" } else { "decoder" };
                assert!(
                    close(g[i], fd),
                    "{part}.{name}[{i}]: analytic {} vs finite difference {fd}",
                    g[i]
                );
                worst = worst.max((g[i] as f64 - fd).abs());
                checked += 1;
            }
        }
    }
    match (&grads.codebook, learning) {
        (Some(gc), CodebookLearning::Gradient) => {
            for j in 0..k {
                for c in 0..code_dim {
                    let (mut p, mut m) = (cb64.clone(), cb64.clone());
                    p[j][c] += h;
                    m[j][c] -= h;
                    let fd = (surrogate(&frozen, &enc, &dec, &p)
                        - surrogate(&frozen, &enc, &dec, &m))
                        / (2.0 * h);
                    let a = gc.row(j)[c];
                    assert!(close(a, fd), "codebook[{j}][{c}]: analytic {a} vs {fd}");
                    checked += 1;
                }
            }
        }
        (None, CodebookLearning::Ema { .. }) => {}
        (g, l) => panic!("codebook gradient {g:?} under {l:?}"),
    }
    assert!(checked > 50, "checked {checked} values");
    eprintln!("{activation} ln {layer_norm}: {checked} gradients, worst |Δ| {worst:.2e}");
}

#[test]
fn gelu_layer_norm_ema_codebook() {
    check(
        Activation::Gelu,
        true,
        vec![4, 4],
        CodebookLearning::ema(0.99),
    );
}

#[test]
fn relu_gradient_codebook() {
    check(Activation::Relu, false, vec![4], CodebookLearning::Gradient);
}

#[test]
fn gelu_gradient_codebook_with_layer_norm() {
    check(Activation::Gelu, true, vec![4], CodebookLearning::Gradient);
}
