//! The training step's kernels (kernels/ema_update.cu, loss.cu, grad.cu, launched by
//! src/backend/cuda/step.rs) against their CPU twins, on the emulated device always and on a GPU
//! when there is one (`on_devices!`).
//!
//! Sizes are awkward on purpose: K and N ∈ {1, 255, 257, 4,096} (around the 256-thread blocks
//! and grids), D ∈ {1, 3, 64, 129} (partial warps, rows wider than a 128-thread block), 3 seeds.
//! Claims:
//! - EMA update, codebook (L2 and cosine), re-seeding, the x gradient (straight-through and
//!   rotation trick, with and without mask and commitment term), the codebook gradient:
//!   bit-identical (`to_bits()`) to EmaState, normalize_row, rotate_gradient and
//!   VectorQuantizer::backward, also over 5 chained EMA steps;
//! - cumulative usage, histogram total and used count: exact;
//! - squared error and entropy: within 1e-12 relative of the CPU's f64 sums (other order), and
//!   bit-identical between two runs (fixed-shape reductions).

use rand::Rng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
#[macro_use]
mod common;

use common::devices::{Dev, EMU, assert_bits, real_gpu, rel_close};
use common::{salted_rng, uniform_in};
use vqx::backend::Device;
use vqx::backend::cuda::step::{self, EmaDevice, StepScratch};
use vqx::backend::cuda::{Gpu, launch};
use vqx::ema::{CodeSums, EmaState, SumMode};
use vqx::nearest::{Metric, normalize_row};
use vqx::quantizer::{
    CodebookLearning, Estimator, QuantizerConfig, VectorQuantizer, normalize_backward,
    rotate_gradient,
};
use vqx::usage::UsageSummary;
use vqx::{MatRef, Matrix};

const SEEDS: [u64; 3] = [1, 2, 3];
const KS: [usize; 4] = [1, 255, 257, 4096];
const NS: [usize; 4] = [1, 255, 257, 4096];
const DS: [usize; 4] = [1, 3, 64, 129];

/// A random EMA state: counts with zeros (dead codes) and a spread of magnitudes.
fn random_state(k: usize, d: usize, rng: &mut ChaCha8Rng) -> EmaState {
    let counts = (0..k)
        .map(|_| match rng.gen_range(0..4) {
            0 => 0.0,
            1 => rng.gen_range(0.0..1e-3),
            _ => rng.gen_range(0.0..50.0),
        })
        .collect();
    let sums = Matrix::new(uniform_in(k * d, 20.0, rng), k, d).unwrap();
    EmaState::from_parts(counts, sums).unwrap()
}

/// A random batch: counts with zeros, sums of their size.
fn random_batch(k: usize, d: usize, rng: &mut ChaCha8Rng) -> CodeSums {
    CodeSums {
        sums: uniform_in(k * d, 30.0, rng),
        counts: (0..k)
            .map(|_| {
                if rng.gen_bool(0.3) {
                    0
                } else {
                    rng.gen_range(0..100)
                }
            })
            .collect(),
        mode: SumMode::Deterministic,
    }
}

/// The CPU's codebook after a step: `EmaState::codebook`, normalised for cosine as the
/// quantizer does.
fn cpu_codebook(ema: &EmaState, eps: f32, metric: Metric) -> Matrix {
    let c = ema.codebook(eps);
    match metric {
        Metric::L2 => c,
        Metric::Cosine => vqx::nearest::normalize_rows(c.as_ref()),
    }
}

fn check_state<G: Gpu>(gpu: &G, dev: &EmaDevice<G>, want: &EmaState, context: &str) {
    let cs = gpu.download("counts", &dev.cluster_size).unwrap();
    let ea = gpu.download("sums", &dev.embed_avg).unwrap();
    assert_bits(
        &cs,
        want.cluster_size(),
        &format!("{context}: cluster_size"),
    );
    assert_bits(
        &ea,
        want.embed_avg().data(),
        &format!("{context}: embed_avg"),
    );
}

/// One EMA step on both sides from the same state: update, then codebook; compares the state,
/// the total count and the codebook bit for bit.
#[allow(clippy::too_many_arguments)]
fn ema_step<G: Gpu>(
    gpu: &G,
    dev: &mut EmaDevice<G>,
    cpu: &mut EmaState,
    batch: &CodeSums,
    decay: f32,
    eps: f32,
    metric: Metric,
    context: &str,
) {
    let counts = gpu.upload("batch counts", &batch.counts).unwrap();
    let sums = gpu.upload("batch sums", &batch.sums).unwrap();
    step::ema_update(gpu, dev, &counts, &sums, decay).unwrap();
    cpu.update(batch, decay).unwrap();
    check_state(gpu, dev, cpu, &format!("{context}: after update"));
    step::ema_codebook(gpu, dev, eps, metric).unwrap();
    let total = gpu.download("total", &dev.total).unwrap();
    let want_total: f32 = cpu.cluster_size().iter().sum();
    assert_bits(&total, &[want_total], &format!("{context}: total count"));
    let got = gpu.download("codebook", &dev.codebook).unwrap();
    let want = cpu_codebook(cpu, eps, metric);
    assert_bits(&got, want.data(), &format!("{context}: codebook"));
}

/// Σ_rows Σ_d (x − q)² in f64 as the quantizer's `mean_sq_diff` sums it (rows in order, each
/// row's columns in order) before dividing.
fn cpu_sq_err(x: &[f32], q: &[f32], d: usize, kept: &[bool]) -> f64 {
    x.chunks(d)
        .zip(q.chunks(d))
        .zip(kept)
        .filter(|(_, k)| **k)
        .map(|((xr, qr), _)| {
            xr.iter()
                .zip(qr)
                .map(|(&a, &b)| {
                    let t = a as f64 - b as f64;
                    t * t
                })
                .sum::<f64>()
        })
        .sum()
}

/// The entropy −Σ p·ln(p + 1e-10) as UsageSummary computes it (perplexity = exp of it), 0 for
/// an empty histogram.
fn cpu_entropy(counts: &[u32]) -> f64 {
    let total = counts.iter().map(|&c| u64::from(c)).sum::<u64>() as f64;
    let p = |c: u32| c as f64 / total;
    let terms = counts.iter().map(|&c| -p(c) * (p(c) + 1e-10).ln());
    if total == 0.0 { 0.0 } else { terms.sum() }
}

/// Every (K, D, seed) of the EMA tests.
fn kds() -> impl Iterator<Item = (usize, usize, u64)> {
    KS.into_iter().flat_map(|k| {
        DS.into_iter()
            .flat_map(move |d| SEEDS.map(|seed| (k, d, seed)))
    })
}

fn mask_u32(mask: &[bool]) -> Vec<u32> {
    mask.iter().map(|&m| u32::from(m)).collect()
}

on_devices! {
    /// ema_update_f32 against EmaState::update, every (K, D), three decays.
    fn ema_update_matches_cpu<G>(test, dev, gpu) {
        for (k, d, seed) in kds() {
            let mut r = salted_rng(seed, k * 1000 + d);
            let mut cpu = random_state(k, d, &mut r);
            let codebook = cpu.codebook(1e-5);
            let mut dev_state = EmaDevice::upload(gpu, &cpu, codebook.as_ref()).unwrap();
            for decay in [0.99f32, 0.8, 0.3] {
                let batch = random_batch(k, d, &mut r);
                let counts = gpu.upload("batch counts", &batch.counts).unwrap();
                let sums = gpu.upload("batch sums", &batch.sums).unwrap();
                step::ema_update(gpu, &mut dev_state, &counts, &sums, decay).unwrap();
                cpu.update(&batch, decay).unwrap();
                let context = format!("{test}: K {k} D {d} seed {seed} decay {decay}");
                check_state(gpu, &dev_state, &cpu, &context);
            }
        }
    }

    /// ema_total_f32 + ema_codebook_f32 against EmaState::codebook (+ normalize_rows for
    /// cosine), with zero and near-zero counts, a zero row of sums and several eps.
    fn ema_codebook_matches_cpu<G>(test, dev, gpu) {
        for (k, d, seed) in kds() {
            let mut r = salted_rng(seed, k * 1000 + d + 7);
            let mut sums = uniform_in(k * d, 20.0, &mut r);
            sums[(k / 2) * d..(k / 2 + 1) * d].fill(0.0);
            let counts = random_state(k, 1, &mut r).cluster_size().to_vec();
            let cpu =
                EmaState::from_parts(counts, Matrix::new(sums, k, d).unwrap()).unwrap();
            for metric in [Metric::L2, Metric::Cosine] {
                for eps in [1e-5f32, 0.1] {
                    let stale = Matrix::zeros(k, d);
                    let mut dev_state =
                        EmaDevice::upload(gpu, &cpu, stale.as_ref()).unwrap();
                    step::ema_codebook(gpu, &mut dev_state, eps, metric).unwrap();
                    let context = format!(
                        "{test}: K {k} D {d} seed {seed} {metric} eps {eps}"
                    );
                    let total = gpu.download("total", &dev_state.total).unwrap();
                    let want_total: f32 = cpu.cluster_size().iter().sum();
                    assert_bits(&total, &[want_total], &format!("{context}: total"));
                    let got = gpu.download("codebook", &dev_state.codebook).unwrap();
                    let want = cpu_codebook(&cpu, eps, metric);
                    assert_bits(&got, want.data(), &format!("{context}: codebook"));
                }
            }
        }
    }

    /// Five steps of update + codebook on the device equal five steps of EmaState, bit for bit,
    /// from a data-seeded state, with batch sums from real rows (ema::cpu).
    fn ema_five_steps_match_cpu<G>(test, dev, gpu) {
        for (k, d, n) in [(1, 3, 255), (257, 129, 4096), (4096, 3, 257), (255, 64, 1)] {
            for metric in [Metric::L2, Metric::Cosine] {
                for seed in SEEDS {
                    let mut r = salted_rng(seed, k + d + n);
                    let codebook = Matrix::new(uniform_in(k * d, 1.0, &mut r), k, d).unwrap();
                    let mut cpu = EmaState::seeded(codebook.as_ref());
                    let mut dev_state = EmaDevice::upload(gpu, &cpu, codebook.as_ref()).unwrap();
                    let (decay, eps) = (0.8f32, 1e-5f32);
                    for s in 0..5 {
                        let x = Matrix::new(uniform_in(n * d, 2.0, &mut r), n, d).unwrap();
                        let idx: Vec<u32> = (0..n).map(|_| r.gen_range(0..k as u32)).collect();
                        let batch = vqx::ema::cpu(x.as_ref(), &idx, k, SumMode::Deterministic);
                        let context = format!("{test}: K {k} D {d} N {n} {metric} seed {seed} step {s}");
                        ema_step(gpu, &mut dev_state, &mut cpu, &batch, decay, eps, metric, &context);
                    }
                    let (state, c) = dev_state.download(gpu).unwrap();
                    assert_eq!(state, cpu, "{test}: downloaded state");
                    assert_bits(c.data(), cpu_codebook(&cpu, eps, metric).data(), test);
                }
            }
        }
    }

    /// reseed_f32 against the quantizer's re-seeding (normalize_row for cosine, the codebook
    /// row copied, EmaState::reset), including a zero input row; pairs out of range are skipped.
    fn reseed_matches_cpu<G>(test, dev, gpu) {
        for (k, n) in [(1, 1), (255, 4096), (257, 257), (4096, 255)] {
            for &d in &DS {
                for metric in [Metric::L2, Metric::Cosine] {
                    for seed in SEEDS {
                        let mut r = salted_rng(seed, k * 7 + n * 3 + d);
                        let mut cpu = random_state(k, d, &mut r);
                        let mut codebook = cpu.codebook(1e-5);
                        let mut x = uniform_in(n * d, 3.0, &mut r);
                        x[(n - 1) * d..].fill(0.0);
                        let m = k.min(n).min(300);
                        let mut codes: Vec<u32> = (0..k as u32).collect();
                        codes.shuffle(&mut r);
                        codes.truncate(m);
                        let mut rows: Vec<u32> = (0..n as u32).collect();
                        rows.shuffle(&mut r);
                        rows.truncate(m);
                        if m > 1 {
                            rows[0] = (n - 1) as u32; // the zero row
                        }
                        let count = r.gen_range(0.5f32..3.0);
                        let mut dev_state =
                            EmaDevice::upload(gpu, &cpu, codebook.as_ref()).unwrap();
                        // Out-of-range pairs appended: the kernel must skip them.
                        let (mut dc, mut dr) = (codes.clone(), rows.clone());
                        dc.extend([k as u32, 0]);
                        dr.extend([0, n as u32]);
                        let (dc, dr) = (gpu.upload("codes", &dc).unwrap(), gpu.upload("rows", &dr).unwrap());
                        let xd = gpu.upload("x", &x).unwrap();
                        step::reseed(gpu, &mut dev_state, &xd, n, &dc, &dr, m + 2, count, metric)
                            .unwrap();
                        for (&c, &row) in codes.iter().zip(&rows) {
                            let (c, row) = (c as usize, row as usize);
                            let mut v = x[row * d..(row + 1) * d].to_vec();
                            if metric == Metric::Cosine {
                                normalize_row(&mut v);
                            }
                            codebook.data_mut()[c * d..(c + 1) * d].copy_from_slice(&v);
                            cpu.reset(c, &v, count);
                        }
                        let context = format!("{test}: K {k} N {n} D {d} {metric} seed {seed}");
                        check_state(gpu, &dev_state, &cpu, &context);
                        let got = gpu.download("codebook", &dev_state.codebook).unwrap();
                        assert_bits(&got, codebook.data(), &format!("{context}: codebook"));
                    }
                }
            }
        }
    }

    /// usage_accumulate_u64: exact, with totals beyond u32.
    fn usage_accumulate_is_exact<G>(test, dev, gpu) {
        for &k in &KS {
            for seed in SEEDS {
                let mut r = salted_rng(seed, k);
                let mut want: Vec<u64> = (0..k).map(|_| r.gen_range(0..1u64 << 40)).collect();
                let mut total = gpu.upload("total", &want).unwrap();
                for _ in 0..2 {
                    let counts: Vec<u32> = (0..k).map(|_| r.r#gen::<u32>()).collect();
                    let dc = gpu.upload("counts", &counts).unwrap();
                    step::usage_accumulate(gpu, &mut total, &dc, k).unwrap();
                    want.iter_mut().zip(&counts).for_each(|(t, &c)| *t += c as u64);
                }
                let got = gpu.download("total", &total).unwrap();
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g, w, "{test}: K {k} seed {seed}: index {i}: device {g}, cpu {w}");
                }
            }
        }
    }

    /// The squared error, with and without mask: within 1e-12 of mean_sq_diff's sum and the
    /// same bits on a second run.
    fn squared_error_matches_cpu<G>(test, dev, gpu) {
        let mut scratch = StepScratch::new(gpu).unwrap();
        let mut out = gpu.alloc_zeros::<f64>("sq err", 1).unwrap();
        for &n in &NS {
            for &d in &DS {
                for seed in SEEDS {
                    let mut r = salted_rng(seed, n * 131 + d);
                    let x = uniform_in(n * d, 2.0, &mut r);
                    let q = uniform_in(n * d, 2.0, &mut r);
                    let (xd, qd) = (gpu.upload("x", &x).unwrap(), gpu.upload("q", &q).unwrap());
                    let mask: Vec<bool> = (0..n).map(|_| r.gen_bool(0.6)).collect();
                    let md = gpu.upload("mask", &mask_u32(&mask)).unwrap();
                    for masked in [false, true] {
                        let keep = if masked { mask.clone() } else { vec![true; n] };
                        let m = masked.then_some(&md);
                        step::squared_error(gpu, &xd, &qd, m, n, d, &mut scratch, &mut out).unwrap();
                        let got = gpu.download("sq err", &out).unwrap()[0];
                        let want = cpu_sq_err(&x, &q, d, &keep);
                        let context = format!("{test}: N {n} D {d} seed {seed} masked {masked}");
                        rel_close(got, want, 1e-12, &context);
                        step::squared_error(gpu, &xd, &qd, m, n, d, &mut scratch, &mut out).unwrap();
                        let again = gpu.download("sq err", &out).unwrap()[0];
                        assert_eq!(got.to_bits(), again.to_bits(), "{context}: run to run: {got:e} then {again:e}");
                    }
                }
            }
        }
    }

    /// Total, used count (exact) and entropy (1e-12 relative, perplexity likewise) of random
    /// histograms: sparse, dense, one code, all zero.
    fn usage_stats_match_cpu<G>(test, dev, gpu) {
        let mut scratch = StepScratch::new(gpu).unwrap();
        let mut totals = gpu.alloc_zeros::<u64>("totals", 2).unwrap();
        let mut entropy = gpu.alloc_zeros::<f64>("entropy", 1).unwrap();
        for &k in &KS {
            for seed in SEEDS {
                let mut r = salted_rng(seed, k + 99);
                let cases: Vec<(&str, Vec<u32>)> = vec![
                    ("dense", (0..k).map(|_| r.gen_range(0..1000)).collect()),
                    ("sparse", (0..k).map(|_| if r.gen_bool(0.9) { 0 } else { r.gen_range(1..50) }).collect()),
                    ("one code", (0..k).map(|i| if i == k / 2 { 4096 } else { 0 }).collect()),
                    ("empty", vec![0; k]),
                    ("large", (0..k).map(|_| r.gen_range(0..u32::MAX / 4096)).collect()),
                ];
                for (name, counts) in cases {
                    let dc = gpu.upload("counts", &counts).unwrap();
                    step::usage_stats(gpu, &dc, k, &mut scratch, &mut totals, &mut entropy).unwrap();
                    let t = gpu.download("totals", &totals).unwrap();
                    let e = gpu.download("entropy", &entropy).unwrap()[0];
                    let summary = UsageSummary::from_counts(&counts);
                    let context = format!("{test}: K {k} seed {seed} {name}");
                    let want = [summary.total, summary.used as u64];
                    for (i, what) in ["total", "used"].iter().enumerate() {
                        assert_eq!(
                            t[i], want[i],
                            "{context}: {what}: device {}, cpu {}", t[i], want[i]
                        );
                    }
                    rel_close(e, cpu_entropy(&counts), 1e-12, &format!("{context}: entropy"));
                    rel_close(e.exp(), summary.perplexity, 1e-12, &format!("{context}: perplexity"));
                }
            }
        }
    }

    /// grad_rotation_f32 with coef 0 is rotate_gradient bit for bit, on random rows and on the
    /// rows where the rotation is undefined or degenerate (x = 0, q = 0, q = −x, q = x,
    /// tiny and huge magnitudes).
    fn rotation_rows_match_rotate_gradient<G>(test, dev, gpu) {
        let scratch = StepScratch::new(gpu).unwrap();
        for &n in &NS {
            for &d in &DS {
                for seed in SEEDS {
                    let mut r = salted_rng(seed, n * 17 + d);
                    let mut x = uniform_in(n * d, 2.0, &mut r);
                    let mut q = uniform_in(n * d, 2.0, &mut r);
                    let g = uniform_in(n * d, 1.0, &mut r);
                    for row in 0..n {
                        let (xr, qr) = (row * d..(row + 1) * d, row * d..(row + 1) * d);
                        match row % 9 {
                            1 => x[xr].fill(0.0),
                            2 => q[qr].fill(0.0),
                            3 => (0..d).for_each(|j| q[row * d + j] = -x[row * d + j]),
                            4 => (0..d).for_each(|j| q[row * d + j] = x[row * d + j]),
                            5 => x[xr].iter_mut().for_each(|v| *v *= 1e-30),
                            6 => q[qr].iter_mut().for_each(|v| *v *= 1e30),
                            _ => {}
                        }
                    }
                    let gd = gpu.upload("g", &g).unwrap();
                    let xd = gpu.upload("x", &x).unwrap();
                    let qd = gpu.upload("q", &q).unwrap();
                    let mut gx = gpu.alloc_zeros::<f32>("gx", n * d).unwrap();
                    step::grad_rotation(gpu, &gd, &xd, &qd, None, 0.0, n, d, &scratch, &mut gx).unwrap();
                    let got = gpu.download("gx", &gx).unwrap();
                    let mut want = vec![0f32; n * d];
                    for row in 0..n {
                        let s = row * d..(row + 1) * d;
                        rotate_gradient(&x[s.clone()], &q[s.clone()], &g[s.clone()], &mut want[s]);
                    }
                    assert_bits(&got, &want, &format!("{test}: N {n} D {d} seed {seed}"));
                }
            }
        }
    }

    /// grad_normalize_f32 is normalize_backward (the cosine layer's gradient through x̂) bit for
    /// bit, zero, tiny and huge rows included.
    fn normalize_gradient_matches_cpu<G>(test, dev, gpu) {
        for &n in &NS {
            for &d in &DS {
                let mut r = salted_rng(5, n * 29 + d);
                let mut x = uniform_in(n * d, 2.0, &mut r);
                let g = uniform_in(n * d, 3.0, &mut r);
                for (row, xr) in x.chunks_mut(d).enumerate() {
                    let factor = [1.0, 0.0, 1e-30, 1e30][row % 4];
                    xr.iter_mut().for_each(|v| *v *= factor);
                }
                let xd = gpu.upload("x", &x).unwrap();
                let mut gx = gpu.upload("gx", &g).unwrap();
                step::grad_normalize(gpu, &xd, n, d, &mut gx).unwrap();
                let mut want = g.clone();
                for (xr, wr) in x.chunks(d).zip(want.chunks_mut(d)) {
                    normalize_backward(xr, wr);
                }
                let got = gpu.download("gx", &gx).unwrap();
                assert_bits(&got, &want, &format!("{test}: N {n} D {d}"));
            }
        }
    }

    /// The whole backward pass against VectorQuantizer::backward (gradient learning, CPU):
    /// the x gradient (straight-through and rotation trick, commitment term on the kept rows)
    /// and the codebook gradient (grad_diff_f32 → ema_sums_sorted_f32 → scale_f32), bit for
    /// bit; the forward's commitment loss from the device's squared error within f32 rounding.
    fn backward_matches_cpu<G>(test, dev, gpu) {
        let mut scratch = StepScratch::new(gpu).unwrap();
        let mut sq = gpu.alloc_zeros::<f64>("sq err", 1).unwrap();
        let k = 257;
        for &n in &NS {
            for &d in &DS {
                for seed in SEEDS {
                    let mut r = salted_rng(seed, n * 5 + d);
                    let codebook = Matrix::new(uniform_in(k * d, 1.0, &mut r), k, d).unwrap();
                    let x = Matrix::new(uniform_in(n * d, 1.2, &mut r), n, d).unwrap();
                    let g = Matrix::new(uniform_in(n * d, 1.0, &mut r), n, d).unwrap();
                    let mut mask: Vec<bool> = (0..n).map(|_| r.gen_bool(0.7)).collect();
                    mask[0] = true;
                    for estimator in [Estimator::StraightThrough, Estimator::RotationTrick] {
                        for (masked, beta) in [(false, 0.25f32), (true, 0.25), (true, 0.0)] {
                            let cfg = QuantizerConfig::new(k, d)
                                .device(Device::Cpu)
                                .learning(CodebookLearning::Gradient)
                                .estimator(estimator)
                                .commitment_weight(beta);
                            let vq = VectorQuantizer::with_codebook(cfg, codebook.clone()).unwrap();
                            let mut vq = vq;
                            let m = masked.then_some(mask.as_slice());
                            let fwd = vq.forward(x.as_ref(), m, false).unwrap();
                            let grads = vq.backward(&fwd, x.as_ref(), g.as_ref()).unwrap();
                            let context = format!(
                                "{test}: N {n} D {d} seed {seed} {estimator:?} masked {masked} beta {beta}"
                            );

                            let keep: Vec<bool> = if masked { mask.clone() } else { vec![true; n] };
                            let kept = keep.iter().filter(|&&b| b).count();
                            // grad.rs's scale and coefficient, in its order.
                            let scale = 2.0 / (kept as f64 * d as f64);
                            let coef = beta as f64 * scale;
                            let xd = gpu.upload("x", x.data()).unwrap();
                            let qd = gpu.upload("q", fwd.quantized.data()).unwrap();
                            let gd = gpu.upload("g", g.data()).unwrap();
                            let md = gpu.upload("mask", &mask_u32(&mask)).unwrap();
                            let mdev = masked.then_some(&md);
                            let mut gx = gpu.alloc_zeros::<f32>("gx", n * d).unwrap();
                            match estimator {
                                Estimator::StraightThrough => step::grad_straight_through(
                                    gpu, &gd, &xd, &qd, mdev, coef, n, d, &scratch, &mut gx,
                                ),
                                Estimator::RotationTrick => step::grad_rotation(
                                    gpu, &gd, &xd, &qd, mdev, coef, n, d, &scratch, &mut gx,
                                ),
                            }
                            .unwrap();
                            let got = gpu.download("gx", &gx).unwrap();
                            assert_bits(&got, grads.x.data(), &format!("{context}: dL/dx"));

                            // Codebook gradient over the kept rows.
                            let rows: Vec<u32> = (0..n as u32).filter(|&i| keep[i as usize]).collect();
                            let idx: Vec<u32> = rows.iter().map(|&i| fwd.indices[i as usize]).collect();
                            let (offsets, grouped) = vqx::ema::group_by_code(&idx, k);
                            let offsets: Vec<u64> = offsets.iter().map(|&o| o as u64).collect();
                            let rd = gpu.upload("kept rows", &rows).unwrap();
                            let mut diff = gpu.alloc_zeros::<f32>("diff", rows.len() * d).unwrap();
                            step::grad_diff(gpu, &qd, &xd, n, &rd, rows.len(), d, &mut diff).unwrap();
                            let od = gpu.upload("offsets", &offsets).unwrap();
                            let grd = gpu.upload("grouped", &grouped).unwrap();
                            let mut sums = gpu.alloc_zeros::<f32>("sums", k * d).unwrap();
                            let mut counts = gpu.alloc_zeros::<u32>("counts", k).unwrap();
                            launch::sums_sorted(gpu, &diff, &od, &grd, &mut sums, &mut counts, k, d).unwrap();
                            step::scale(gpu, &mut sums, k * d, scale).unwrap();
                            let got = gpu.download("dL/dC", &sums).unwrap();
                            let want = grads.codebook.as_ref().expect("gradient learning");
                            assert_bits(&got, want.data(), &format!("{context}: dL/dC"));

                            // The commitment loss from the device's squared error.
                            step::squared_error(gpu, &xd, &qd, mdev, n, d, &mut scratch, &mut sq).unwrap();
                            let total = gpu.download("sq err", &sq).unwrap()[0];
                            let loss = (beta as f64 * (total / (kept as f64 * d as f64))) as f32;
                            let want = fwd.commitment_loss;
                            assert!(
                                (loss - want).abs() <= want.abs() * f32::EPSILON,
                                "{context}: commitment loss: device {loss:e}, cpu {want:e}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Launchers refuse buffers shorter than the kernel would touch, before launching.
    fn launchers_reject_short_buffers<G>(test, dev, gpu) {
        let mut scratch = StepScratch::new(gpu).unwrap();
        let (n, d, k) = (10, 4, 5);
        let x = gpu.alloc_zeros::<f32>("x", n * d).unwrap();
        let short = gpu.alloc_zeros::<f32>("short", n * d - 1).unwrap();
        let mut gx = gpu.alloc_zeros::<f32>("gx", n * d).unwrap();
        let short_mask = gpu.alloc_zeros::<u32>("mask", n - 1).unwrap();
        let mut out = gpu.alloc_zeros::<f64>("out", 1).unwrap();
        let is_shape = |e: vqx::Error, what: &str| {
            assert!(matches!(e, vqx::Error::Shape { .. }), "{test}: {what}: got {e}");
        };
        is_shape(
            step::grad_straight_through(gpu, &x, &short, &x, None, 0.0, n, d, &scratch, &mut gx).unwrap_err(),
            "short x",
        );
        is_shape(
            step::grad_rotation(gpu, &x, &x, &x, Some(&short_mask), 0.1, n, d, &scratch, &mut gx).unwrap_err(),
            "short mask",
        );
        is_shape(
            step::squared_error(gpu, &short, &x, None, n, d, &mut scratch, &mut out).unwrap_err(),
            "short sq err input",
        );
        let state = EmaState::seeded(MatRef::new(&[0.5; 20], k, d).unwrap());
        let c = Matrix::zeros(k, d);
        let mut ema = EmaDevice::upload(gpu, &state, c.as_ref()).unwrap();
        let counts = gpu.alloc_zeros::<u32>("counts", k - 1).unwrap();
        let sums = gpu.alloc_zeros::<f32>("sums", k * d).unwrap();
        is_shape(step::ema_update(gpu, &mut ema, &counts, &sums, 0.9).unwrap_err(), "short counts");
        let mut t = gpu.alloc_zeros::<u64>("total", k - 1).unwrap();
        let counts = gpu.alloc_zeros::<u32>("counts", k).unwrap();
        is_shape(step::usage_accumulate(gpu, &mut t, &counts, k).unwrap_err(), "short total");
        let mut v = gpu.alloc_zeros::<f32>("v", 3).unwrap();
        is_shape(step::scale(gpu, &mut v, 4, 2.0).unwrap_err(), "short scale");
    }
}
