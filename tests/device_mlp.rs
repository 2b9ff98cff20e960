//! The MLP layers' kernels (kernels/mlp.cu, launched by src/backend/cuda/mlp.rs) against their
//! CPU twins in src/model/, on the emulated device always and on a GPU when there is one
//! (`on_devices!`).
//!
//! Sizes are awkward on purpose: rows ∈ {1, 127, 129, 1000} (around the 128- and 256-thread
//! blocks), widths ∈ {1, 7, 33, 256} (partial warps, a full block), 3 seeds. Claims:
//! - bias rows (+ host GEMM = `Linear::forward`), bias gradient (`Linear::backward`), ReLU
//!   forward and backward, layer norm forward (y, x̂, 1/σ) and backward (dx, dγ, dβ added to a
//!   non-zero gradient), the reconstruction gradient: bit-identical (`to_bits()`) everywhere;
//! - GELU forward and backward: bit-identical on the emulated device (vqx's own tanh, which
//!   kernels/mlp.cu repeats op for op); within 4 ulp on a GPU until a GPU run shows nvcc's
//!   code rounds the same (never run on one yet);
//! - the reconstruction squared error: within 1e-12 relative of the CPU's sequential f64 sum,
//!   equal bit for bit to `step::squared_error` on the same rows, and to itself run to run;
//! - a 2-hidden-layer MLP (layer norm, GELU and ReLU) whose forward and backward run on the
//!   device but for the matrix products (done on the host by `matmul` on downloaded buffers):
//!   output, every parameter gradient and dx bit-identical to `Mlp::forward` / `Mlp::backward`
//!   on the emulated device;
//! - the launchers refuse too-small buffers (`Error::Shape`) and zero-width layer norms.

use rand::Rng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
#[macro_use]
mod common;

use common::devices::{Dev, EMU, assert_bits, real_gpu, rel_close};
use common::{salted_rng, uniform_in};
use vqx::backend::cuda::Gpu;
use vqx::backend::cuda::mlp::{self, MlpScratch};
use vqx::backend::cuda::step::{self, StepScratch};
use vqx::model::matmul::matmul;
use vqx::model::{Activation, LayerNorm, Linear, Mlp};

use vqx::{Error, MatRef, Matrix};

const SEEDS: [u64; 3] = [1, 2, 3];
const ROWS: [usize; 4] = [1, 127, 129, 1000];
const WIDTHS: [usize; 4] = [1, 7, 33, 256];
const ACTS: [Activation; 2] = [Activation::Gelu, Activation::Relu];

/// Every (seed, rows, width) combination.
fn shapes() -> impl Iterator<Item = (u64, usize, usize)> {
    SEEDS.into_iter().flat_map(|s| {
        ROWS.into_iter()
            .flat_map(move |n| WIDTHS.into_iter().map(move |d| (s, n, d)))
    })
}

/// A layer norm of width `d`: γ in [-2, 2), β in [-1, 1).
fn random_layer_norm(d: usize, r: &mut ChaCha8Rng) -> LayerNorm {
    let weight = uniform_in(d, 2.0, r);
    LayerNorm {
        weight,
        bias: uniform_in(d, 1.0, r),
    }
}

/// Distance in ulps between two finite f32 of the same sign (or both zeros).
fn ulps(a: f32, b: f32) -> u32 {
    let key = |v: f32| {
        let b = v.to_bits() as i64;
        if b & 0x8000_0000 != 0 {
            -(b & 0x7fff_ffff)
        } else {
            b
        }
    };
    (key(a) - key(b)).unsigned_abs() as u32
}

/// Within `max_ulps` ulps or `rel` relative of `scale` (a GPU's tanh may round differently);
/// the message names the first index out of tolerance and both values.
fn assert_close(got: &[f32], want: &[f32], max_ulps: u32, rel: f32, scale: f32, context: &str) {
    assert_eq!(got.len(), want.len(), "{context}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = ulps(g, w) <= max_ulps || (g - w).abs() <= rel * scale.max(w.abs());
        assert!(
            ok,
            "{context}: index {i}: device {g:e} ({:#010x}), cpu {w:e} ({:#010x}), {} ulps",
            g.to_bits(),
            w.to_bits(),
            ulps(g, w)
        );
    }
}

/// Bits on the emulated device; on a GPU within 4 ulp / 1e-6 relative when `tanh` is involved
/// (GELU), bits otherwise.
fn assert_act<G: Gpu>(dev: &Dev<G>, tanh: bool, got: &[f32], want: &[f32], context: &str) {
    if dev.emulated || !tanh {
        assert_bits(got, want, context);
    } else {
        assert_close(got, want, 4, 1e-6, 0.0, context);
    }
}

/// n × o values whose column sums depend on the order of the f64 additions: each column holds
/// values spread over 40 binades, then the same values negated in another order (their exact
/// sum is 0, what is left is the rounding of the partial sums), then (odd n) one small value.
fn cancelling_columns(n: usize, o: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let half = n / 2;
    let mut dy = vec![0.0f32; n * o];
    for j in 0..o {
        let v: Vec<f32> = (0..half)
            .map(|_| rng.gen_range(-1.0f32..1.0) * 2f32.powi(rng.gen_range(-20..21)))
            .collect();
        let mut order: Vec<usize> = (0..half).collect();
        order.shuffle(rng);
        for (r, &k) in order.iter().enumerate() {
            dy[r * o + j] = v[r];
            dy[(half + r) * o + j] = -v[k];
        }
        if n % 2 == 1 {
            dy[(n - 1) * o + j] = rng.gen_range(-1.0f32..1.0);
        }
    }
    dy
}

/// The host GEMM of `Linear::forward` on downloaded rows: y += a·Wᵀ.
fn host_linear(y: &mut [f32], a: MatRef<'_>, l: &Linear) {
    matmul(y, a, false, l.weight.as_ref(), true, true);
}

on_devices! {
    /// bias_rows then the host GEMM equal Linear::forward.
    fn bias_rows_then_gemm_is_linear_forward<G>(test, dev, gpu) {
        for (seed, n, o) in shapes() {
            let mut r = salted_rng(seed, n * 1000 + o);
            let inputs = [1, 7, 33][(seed as usize) % 3];
            let l = Linear::new(inputs, o, &mut r);
            let x = Matrix::new(uniform_in(n * inputs, 2.0, &mut r), n, inputs).unwrap();
            let want = l.forward(x.as_ref());
            let bias = gpu.upload("bias", &l.bias).unwrap();
            let mut y = gpu.alloc_zeros::<f32>("y", n * o).unwrap();
            mlp::bias_rows(gpu, &bias, n, o, &mut y).unwrap();
            let rows = gpu.download("y", &y).unwrap();
            let ctx = format!("{test}: seed {seed}, n {n}, o {o}");
            let expected_rows: Vec<f32> = (0..n * o).map(|e| l.bias[e % o]).collect();
            assert_bits(&rows, &expected_rows, &format!("{ctx}: bias rows"));
            let mut got = rows;
            host_linear(&mut got, x.as_ref(), &l);
            assert_bits(&got, want.data(), &format!("{ctx}: linear output"));
        }
    }

    /// activation_forward_f32 and activation_backward_f32 equal Activation::forward/backward.
    fn activations_match_cpu<G>(test, dev, gpu) {
        // Values where the branches and roundings are delicate: zeros of both signs, tiny and
        // subnormal values, tanh's saturation, x³ large.
        let special = [
            0.0f32, -0.0, 1e-30, -1e-30, 1e-40, -1e-40, 1e-4, -1e-4, 0.5, -0.5, 3.0, -3.0, 9.0,
            -9.0, 20.0, -20.0, 100.0, -100.0,
        ];
        for act in ACTS {
            for (seed, n, d) in shapes() {
                let mut r = salted_rng(seed, n * 1000 + d + 7);
                let len = n * d;
                let mut x = uniform_in(len, 4.0, &mut r);
                for (v, s) in x.iter_mut().zip(special) {
                    *v = s;
                }
                let dy = uniform_in(len, 1.5, &mut r);
                let want_y = act.forward(&x);
                let want_dx = act.backward(&x, &dy);
                let xb = gpu.upload("x", &x).unwrap();
                let dyb = gpu.upload("dy", &dy).unwrap();
                let mut yb = gpu.alloc_zeros::<f32>("y", len).unwrap();
                let mut dxb = gpu.alloc_zeros::<f32>("dx", len).unwrap();
                mlp::activation_forward(gpu, act, &xb, len, &mut yb).unwrap();
                mlp::activation_backward(gpu, act, &xb, &dyb, len, &mut dxb).unwrap();
                let ctx = format!("{test}: {act}, seed {seed}, {n} × {d}");
                let tanh = act == Activation::Gelu;
                let got_y = gpu.download("y", &yb).unwrap();
                assert_act(dev, tanh, &got_y, &want_y, &format!("{ctx}: forward"));
                let got_dx = gpu.download("dx", &dxb).unwrap();
                assert_act(dev, tanh, &got_dx, &want_dx, &format!("{ctx}: backward"));
            }
        }
    }

    /// column_sums_add_f32 equals Linear::backward's bias gradient, added to a non-zero one.
    fn column_sums_add_is_linear_bias_grad<G>(test, dev, gpu) {
        for (seed, n, o) in shapes() {
            let mut r = salted_rng(seed, n * 1000 + o + 13);
            let inputs = 3;
            let l = Linear::new(inputs, o, &mut r);
            let x = Matrix::new(uniform_in(n * inputs, 1.0, &mut r), n, inputs).unwrap();
            let dy = cancelling_columns(n, o, &mut r);
            let mut grad = Linear::zeros(inputs, o);
            grad.bias = uniform_in(o, 0.3, &mut r);
            let start = grad.bias.clone();
            l.backward(x.as_ref(), MatRef::new(&dy, n, o).unwrap(), &mut grad);
            let dyb = gpu.upload("dy", &dy).unwrap();
            let mut gb = gpu.upload("bias grad", &start).unwrap();
            mlp::column_sums_add(gpu, &dyb, n, o, &mut gb).unwrap();
            let got = gpu.download("bias grad", &gb).unwrap();
            assert_bits(&got, &grad.bias, &format!("{test}: seed {seed}, n {n}, o {o}"));
        }
    }

    /// layer_norm_forward_f32 equals LayerNorm::forward: y, x̂ and 1/σ.
    fn layer_norm_forward_matches_cpu<G>(test, dev, gpu) {
        for (seed, n, d) in shapes() {
            let mut r = salted_rng(seed, n * 1000 + d + 21);
            let ln = random_layer_norm(d, &mut r);
            // Rows off-centre and of varied spread (a constant row when d = 1).
            let shift = r.gen_range(-5.0f32..5.0);
            let x: Vec<f32> = (0..n * d).map(|_| shift + r.gen_range(-3.0f32..3.0)).collect();
            let (want_y, cache) = ln.forward(MatRef::new(&x, n, d).unwrap());
            let xb = gpu.upload("x", &x).unwrap();
            let gamma = gpu.upload("gamma", &ln.weight).unwrap();
            let beta = gpu.upload("beta", &ln.bias).unwrap();
            let mut y = gpu.alloc_zeros::<f32>("y", n * d).unwrap();
            let mut h = gpu.alloc_zeros::<f32>("x̂", n * d).unwrap();
            let mut inv = gpu.alloc_zeros::<f32>("1/σ", n).unwrap();
            mlp::layer_norm_forward(gpu, &xb, &gamma, &beta, n, d, &mut y, &mut h, &mut inv)
                .unwrap();
            let ctx = format!("{test}: seed {seed}, {n} × {d}");
            let got = gpu.download("y", &y).unwrap();
            assert_bits(&got, want_y.data(), &format!("{ctx}: y"));
            let got = gpu.download("x̂", &h).unwrap();
            assert_bits(&got, cache.normalized().data(), &format!("{ctx}: x̂"));
            let got = gpu.download("1/σ", &inv).unwrap();
            assert_bits(&got, cache.inv_std(), &format!("{ctx}: 1/σ"));
        }
    }

    /// layer_norm_backward (dγ/dβ accumulation, then dx) equals LayerNorm::backward.
    fn layer_norm_backward_matches_cpu<G>(test, dev, gpu) {
        for (seed, n, d) in shapes() {
            let mut r = salted_rng(seed, n * 1000 + d + 37);
            let ln = random_layer_norm(d, &mut r);
            let x = uniform_in(n * d, 3.0, &mut r);
            let (_, cache) = ln.forward(MatRef::new(&x, n, d).unwrap());
            // dβ's column sums depend on the order of the additions.
            let dy = cancelling_columns(n, d, &mut r);
            let mut grad = LayerNorm {
                weight: uniform_in(d, 0.5, &mut r),
                bias: uniform_in(d, 0.5, &mut r),
            };
            let start = grad.clone();
            let want_dx = ln.backward(&cache, MatRef::new(&dy, n, d).unwrap(), &mut grad);

            let dyb = gpu.upload("dy", &dy).unwrap();
            let h = gpu.upload("x̂", cache.normalized().data()).unwrap();
            let inv = gpu.upload("1/σ", cache.inv_std()).unwrap();
            let gamma = gpu.upload("gamma", &ln.weight).unwrap();
            let mut dx = gpu.alloc_zeros::<f32>("dx", n * d).unwrap();
            let mut gw = gpu.upload("dγ", &start.weight).unwrap();
            let mut gb = gpu.upload("dβ", &start.bias).unwrap();
            mlp::layer_norm_backward(
                gpu, &dyb, &h, &inv, &gamma, n, d, &mut dx, &mut gw, &mut gb,
            )
            .unwrap();
            let ctx = format!("{test}: seed {seed}, {n} × {d}");
            let got = gpu.download("dx", &dx).unwrap();
            assert_bits(&got, want_dx.data(), &format!("{ctx}: dx"));
            let got = gpu.download("dγ", &gw).unwrap();
            assert_bits(&got, &grad.weight, &format!("{ctx}: dγ"));
            let got = gpu.download("dβ", &gb).unwrap();
            assert_bits(&got, &grad.bias, &format!("{ctx}: dβ"));
        }
    }

    /// recon_loss: dy bit-identical to VqVae::forward_backward's, Σ(y − x)² within 1e-12 of
    /// the CPU's sum, equal to step::squared_error's and to itself on a second run.
    fn recon_loss_matches_cpu<G>(test, dev, gpu) {
        let mut scratch = MlpScratch::new(gpu).unwrap();
        let mut step_scratch = StepScratch::new(gpu).unwrap();
        for (seed, n, d) in shapes() {
            let mut r = salted_rng(seed, n * 1000 + d + 53);
            let y = uniform_in(n * d, 2.0, &mut r);
            let x = uniform_in(n * d, 2.0, &mut r);
            // The CPU twin, as VqVae::forward_backward writes it.
            let scale = 2.0 / (n as f64 * d as f64);
            let mut want_sq = 0.0f64;
            let want_dy: Vec<f32> = y
                .iter()
                .zip(&x)
                .map(|(&a, &b)| {
                    let t = a as f64 - b as f64;
                    want_sq += t * t;
                    (scale * t) as f32
                })
                .collect();
            let yb = gpu.upload("y", &y).unwrap();
            let xb = gpu.upload("x", &x).unwrap();
            let mut dy = gpu.alloc_zeros::<f32>("dy", n * d).unwrap();
            let mut sq = gpu.alloc_zeros::<f64>("sq", 1).unwrap();
            mlp::recon_loss(gpu, &yb, &xb, n, d, &mut dy, &mut scratch, &mut sq).unwrap();
            let ctx = format!("{test}: seed {seed}, {n} × {d}");
            let got = gpu.download("dy", &dy).unwrap();
            assert_bits(&got, &want_dy, &format!("{ctx}: dy"));
            let got_sq = gpu.download("sq", &sq).unwrap()[0];
            rel_close(got_sq, want_sq, 1e-12, &format!("{ctx}: squared error"));

            mlp::recon_loss(gpu, &yb, &xb, n, d, &mut dy, &mut scratch, &mut sq).unwrap();
            let again = gpu.download("sq", &sq).unwrap()[0];
            assert_eq!(again.to_bits(), got_sq.to_bits(), "{ctx}: run to run: {again:e} vs {got_sq:e}");
            let mut sq2 = gpu.alloc_zeros::<f64>("sq", 1).unwrap();
            step::squared_error(gpu, &xb, &yb, None, n, d, &mut step_scratch, &mut sq2).unwrap();
            let other = gpu.download("sq", &sq2).unwrap()[0];
            assert_eq!(
                other.to_bits(),
                got_sq.to_bits(),
                "{ctx}: step::squared_error {other:e} vs recon_loss {got_sq:e}"
            );
        }
    }

    /// A 2-hidden-layer MLP's forward and backward with the element-wise and row-wise parts on
    /// the device and the matrix products on the host equal Mlp::forward / Mlp::backward.
    fn chained_mlp_matches_cpu<G>(test, dev, gpu) {
        for act in ACTS {
            for seed in SEEDS {
                let (n, input, hidden, output) = (129, 7, [33, 256], 5);
                let mut r = salted_rng(seed, 99);
                let mut model = Mlp::new(input, &hidden, output, act, true, &mut r);
                for ln in &mut model.norms {
                    ln.weight = ln.weight.iter().map(|_| r.gen_range(0.5f32..1.5)).collect();
                    ln.bias = uniform_in(ln.bias.len(), 0.3, &mut r);
                }
                let x = Matrix::new(uniform_in(n * input, 1.5, &mut r), n, input).unwrap();
                let target = uniform_in(n * output, 1.0, &mut r);
                let ctx = format!("{test}: {act}, seed {seed}");
                chained(gpu, dev, &model, &x, &target, &ctx);
            }
        }
    }

    /// The launchers refuse too-small buffers and zero-width layer norms without launching.
    fn launchers_check_shapes<G>(test, dev, gpu) {
        let small = gpu.alloc_zeros::<f32>("small", 5).unwrap();
        let big = gpu.alloc_zeros::<f32>("big", 12).unwrap();
        let mut out_small = gpu.alloc_zeros::<f32>("out small", 5).unwrap();
        let mut out_big = gpu.alloc_zeros::<f32>("out big", 12).unwrap();
        let mut out_big2 = gpu.alloc_zeros::<f32>("out big 2", 12).unwrap();
        let mut out_big3 = gpu.alloc_zeros::<f32>("out big 3", 12).unwrap();
        let is_shape = |r: vqx::Result<()>, what: &str| {
            assert!(matches!(r, Err(Error::Shape { .. })), "{test}: {what}: {r:?}");
        };
        is_shape(mlp::bias_rows(gpu, &big, 3, 4, &mut out_small), "bias_rows output");
        is_shape(mlp::bias_rows(gpu, &small, 2, 6, &mut out_big), "bias_rows bias");
        is_shape(
            mlp::activation_forward(gpu, Activation::Gelu, &small, 12, &mut out_big),
            "activation input",
        );
        is_shape(
            mlp::activation_backward(gpu, Activation::Relu, &big, &big, 12, &mut out_small),
            "activation dx",
        );
        is_shape(mlp::column_sums_add(gpu, &small, 3, 4, &mut out_big), "column sums dy");
        is_shape(
            mlp::layer_norm_forward(gpu, &big, &big, &big, 6, 2, &mut out_big, &mut out_big2, &mut out_small),
            "layer norm inv_std (6 rows)",
        );
        let r = mlp::layer_norm_forward(gpu, &big, &big, &big, 3, 0, &mut out_big, &mut out_big2, &mut out_big3);
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{test}: zero width: {r:?}");
        is_shape(
            mlp::layer_norm_backward(
                gpu, &big, &small, &big, &big, 3, 4, &mut out_big, &mut out_big2, &mut out_big3,
            ),
            "layer norm backward x̂",
        );
        let mut scratch = MlpScratch::new(gpu).unwrap();
        let mut sq = gpu.alloc_zeros::<f64>("sq", 1).unwrap();
        is_shape(
            mlp::recon_loss(gpu, &big, &small, 3, 4, &mut out_big, &mut scratch, &mut sq),
            "recon target",
        );
        // Nothing was written.
        for (name, b) in [("out small", &out_small), ("out big", &out_big)] {
            assert!(gpu.download(name, b).unwrap().iter().all(|&v| v == 0.0), "{test}: {name}");
        }
    }
}

/// Uploads `v`, or the device error.
fn up<G: Gpu>(gpu: &G, what: &str, v: &[f32]) -> G::Buf<f32> {
    gpu.upload(what, v).unwrap()
}

/// One forward + reconstruction loss + backward of `model` on `x` against `target`, device
/// pieces and host GEMMs, compared with the CPU's Mlp::forward / Mlp::backward.
fn chained<G: Gpu>(gpu: &G, dev: &Dev<G>, model: &Mlp, x: &Matrix, target: &[f32], ctx: &str) {
    let n = x.rows();
    let last = model.linears.len() - 1;
    let act = model.activation;
    // --- the CPU twin
    let (want_y, cache) = model.forward(x.as_ref());
    let d_out = model.output_dim();
    let scale = 2.0 / (n as f64 * d_out as f64);
    let want_dy: Vec<f32> = want_y
        .data()
        .iter()
        .zip(target)
        .map(|(&a, &b)| (scale * (a as f64 - b as f64)) as f32)
        .collect();
    let mut want_grad = model.zeros_like();
    let want_dx = model.backward(
        &cache,
        MatRef::new(&want_dy, n, d_out).unwrap(),
        &mut want_grad,
    );

    // --- device pieces, host GEMMs
    // Per hidden layer: the linear layer's input (host copy, for the GEMMs), the
    // pre-activation (device), the layer norm's x̂ and 1/σ (device).
    let mut inputs: Vec<Matrix> = Vec::new();
    let mut pre: Vec<G::Buf<f32>> = Vec::new();
    let mut normed: Vec<(G::Buf<f32>, G::Buf<f32>)> = Vec::new();
    let mut a = x.clone();
    let mut y_dev = None;
    for (i, l) in model.linears.iter().enumerate() {
        let o = l.outputs();
        let bias = up(gpu, "bias", &l.bias);
        let mut h = gpu.alloc_zeros::<f32>("h", n * o).unwrap();
        mlp::bias_rows(gpu, &bias, n, o, &mut h).unwrap();
        let mut hh = gpu.download("h", &h).unwrap();
        host_linear(&mut hh, a.as_ref(), l);
        inputs.push(a.clone());
        if i == last {
            y_dev = Some(hh);
            break;
        }
        let h = up(gpu, "h", &hh);
        let ln = &model.norms[i];
        let gamma = up(gpu, "gamma", &ln.weight);
        let beta = up(gpu, "beta", &ln.bias);
        let mut z = gpu.alloc_zeros::<f32>("z", n * o).unwrap();
        let mut xh = gpu.alloc_zeros::<f32>("x̂", n * o).unwrap();
        let mut inv = gpu.alloc_zeros::<f32>("1/σ", n).unwrap();
        mlp::layer_norm_forward(gpu, &h, &gamma, &beta, n, o, &mut z, &mut xh, &mut inv).unwrap();
        let mut act_out = gpu.alloc_zeros::<f32>("activation", n * o).unwrap();
        mlp::activation_forward(gpu, act, &z, n * o, &mut act_out).unwrap();
        a = Matrix::new(gpu.download("activation", &act_out).unwrap(), n, o).unwrap();
        pre.push(z);
        normed.push((xh, inv));
    }
    let y = y_dev.unwrap();
    let tanh = act == Activation::Gelu;
    let check = |got: &[f32], want: &[f32], what: &str| {
        if dev.emulated {
            assert_bits(got, want, &format!("{ctx}: {what}"));
        } else {
            // On a GPU, tanh's possible few-ulp differences propagate through the layers.
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let rel = if tanh { 1e-4 } else { 1e-6 };
            assert_close(got, want, 4, rel, scale, &format!("{ctx}: {what}"));
        }
    };
    check(&y, want_y.data(), "output");

    // Reconstruction gradient on the device.
    let mut scratch = MlpScratch::new(gpu).unwrap();
    let yb = up(gpu, "y", &y);
    let tb = up(gpu, "target", target);
    let mut g = gpu.alloc_zeros::<f32>("dy", n * d_out).unwrap();
    let mut sq = gpu.alloc_zeros::<f64>("sq", 1).unwrap();
    mlp::recon_loss(gpu, &yb, &tb, n, d_out, &mut g, &mut scratch, &mut sq).unwrap();
    check(
        &gpu.download("dy", &g).unwrap(),
        &want_dy,
        "reconstruction gradient",
    );

    let mut grad = model.zeros_like();
    let mut width = d_out;
    for i in (0..=last).rev() {
        let l = &model.linears[i];
        // Linear backward: bias gradient on the device, dW and dx by host GEMMs.
        let mut gb = up(gpu, "bias grad", &grad.linears[i].bias);
        mlp::column_sums_add(gpu, &g, n, width, &mut gb).unwrap();
        grad.linears[i].bias = gpu.download("bias grad", &gb).unwrap();
        let gh = gpu.download("g", &g).unwrap();
        let gm = MatRef::new(&gh, n, width).unwrap();
        matmul(
            grad.linears[i].weight.data_mut(),
            gm,
            true,
            inputs[i].as_ref(),
            false,
            true,
        );
        let mut dx = Matrix::zeros(n, l.inputs());
        matmul(dx.data_mut(), gm, false, l.weight.as_ref(), false, false);
        width = l.inputs();
        if i == 0 {
            check(dx.data(), want_dx.data(), "dx");
            break;
        }
        // Activation then layer norm backward of hidden layer i − 1, on the device.
        let h = i - 1;
        let dxb = up(gpu, "dx", dx.data());
        let mut da = gpu.alloc_zeros::<f32>("d activation", n * width).unwrap();
        mlp::activation_backward(gpu, act, &pre[h], &dxb, n * width, &mut da).unwrap();
        let ln = &model.norms[h];
        let gamma = up(gpu, "gamma", &ln.weight);
        let mut gw = up(gpu, "dγ", &grad.norms[h].weight);
        let mut gbeta = up(gpu, "dβ", &grad.norms[h].bias);
        let mut dn = gpu.alloc_zeros::<f32>("d norm", n * width).unwrap();
        let (xh, inv) = &normed[h];
        mlp::layer_norm_backward(
            gpu, &da, xh, inv, &gamma, n, width, &mut dn, &mut gw, &mut gbeta,
        )
        .unwrap();
        grad.norms[h].weight = gpu.download("dγ", &gw).unwrap();
        grad.norms[h].bias = gpu.download("dβ", &gbeta).unwrap();
        g = dn;
    }
    for ((name, _, got), (_, _, want)) in grad.tensors().into_iter().zip(want_grad.tensors()) {
        check(got, want, &format!("gradient {name}"));
    }
}
