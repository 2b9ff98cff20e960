//! The quantizer layer: gradients against central finite differences in f64, one EMA step
//! against a hand-computed f64 reference, dead-code re-seeding, init, cluster recovery, errors.

mod common;
use common::*;
use vqx::backend::Device;
use vqx::quantizer::{
    CodebookLearning, Estimator, Init, QuantizerConfig, VectorQuantizer, rotation_trick_value,
};
use vqx::{Error, MatRef, Matrix, Metric};

fn cfg(k: usize, d: usize) -> QuantizerConfig {
    QuantizerConfig::new(k, d).device(Device::Cpu).seed(3)
}

fn mat(data: Vec<f32>, rows: usize, cols: usize) -> Matrix {
    Matrix::new(data, rows, cols).unwrap()
}

/// Central difference of `f` at `x` along coordinate `i`, in f64.
fn central(f: &dyn Fn(&[f64]) -> f64, x: &[f64], i: usize, h: f64) -> f64 {
    let mut a = x.to_vec();
    let mut b = x.to_vec();
    a[i] += h;
    b[i] -= h;
    (f(&a) - f(&b)) / (2.0 * h)
}

fn check_grad(got: &[f32], want: &[f64], context: &str) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-4 + 1e-4 * w.abs();
        assert!(
            (g as f64 - w).abs() <= tol,
            "{context}: index {i}: backward {g:e}, finite difference {w:e}"
        );
    }
}

/// The surrogate the estimator differentiates: Σ g·z(x) + β·mean over kept rows of (x − q)²,
/// with q and every stop-gradient quantity frozen at the forward pass.
#[allow(clippy::too_many_arguments)]
fn surrogate_loss(
    x: &[f64],
    x0: &[f32],
    q: &[f32],
    g: &[f32],
    kept: &[bool],
    d: usize,
    beta: f64,
    rotation: bool,
) -> f64 {
    let n = kept.len();
    let n_kept = kept.iter().filter(|&&k| k).count() as f64;
    let mut total = 0.0;
    for r in 0..n {
        let xr = &x[r * d..(r + 1) * d];
        let (x0r, qr, gr) = (
            &x0[r * d..(r + 1) * d],
            &q[r * d..(r + 1) * d],
            &g[r * d..(r + 1) * d],
        );
        // z(x): straight-through z = x + const, or the rotation with frozen u, q̂, w, λ.
        let z: Vec<f64> = if rotation {
            let norm = |v: &[f32]| v.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt();
            let (nx, nq) = (norm(x0r), norm(qr));
            let u: Vec<f64> = x0r.iter().map(|&a| a as f64 / nx).collect();
            let qh: Vec<f64> = qr.iter().map(|&a| a as f64 / nq).collect();
            let w: Vec<f64> = u.iter().zip(&qh).map(|(a, b)| a + b).collect();
            let nw = w.iter().map(|v| v * v).sum::<f64>().sqrt();
            let w: Vec<f64> = w.iter().map(|v| v / nw).collect();
            let xw: f64 = xr.iter().zip(&w).map(|(a, b)| a * b).sum();
            let xu: f64 = xr.iter().zip(&u).map(|(a, b)| a * b).sum();
            (0..d)
                .map(|i| nq / nx * (xr[i] - 2.0 * xw * w[i] + 2.0 * xu * qh[i]))
                .collect()
        } else {
            xr.to_vec()
        };
        total += z.iter().zip(gr).map(|(a, &b)| a * b as f64).sum::<f64>();
        if kept[r] {
            let sq: f64 = xr
                .iter()
                .zip(qr)
                .map(|(a, &b)| (a - b as f64).powi(2))
                .sum();
            total += beta * sq / (n_kept * d as f64);
        }
    }
    total
}

fn grad_check(estimator: Estimator, masked: bool) {
    let (n, d, k) = (7, 5, 4);
    let x = uniform(n, d, 11);
    let codebook = mat(uniform(k, d, 12), k, d);
    let g = uniform(n, d, 13);
    let beta = 0.7;
    let mut vq = VectorQuantizer::with_codebook(
        cfg(k, d).commitment_weight(beta).estimator(estimator),
        codebook,
    )
    .unwrap();
    let kept: Vec<bool> = (0..n).map(|r| !masked || r % 3 != 1).collect();
    let xm = MatRef::new(&x, n, d).unwrap();
    let fwd = vq.forward(xm, masked.then_some(&kept[..]), false).unwrap();
    let grads = vq
        .backward(&fwd, xm, MatRef::new(&g, n, d).unwrap())
        .unwrap();
    let q = fwd.quantized.data().to_vec();
    let rotation = estimator == Estimator::RotationTrick;
    let f = |xv: &[f64]| surrogate_loss(xv, &x, &q, &g, &kept, d, beta as f64, rotation);
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let fd: Vec<f64> = (0..n * d).map(|i| central(&f, &x64, i, 1e-5)).collect();
    check_grad(
        grads.x.data(),
        &fd,
        &format!("dL/dx {estimator:?} masked={masked}"),
    );
    assert!(
        grads.codebook.is_none(),
        "EMA learning: no codebook gradient"
    );
    // The commitment loss is β times the mean over kept rows.
    let n_kept = kept.iter().filter(|&&k| k).count() as f64;
    let mse: f64 = (0..n)
        .filter(|&r| kept[r])
        .map(|r| {
            (0..d)
                .map(|i| (x[r * d + i] as f64 - q[r * d + i] as f64).powi(2))
                .sum::<f64>()
        })
        .sum::<f64>()
        / (n_kept * d as f64);
    assert!(
        (fwd.commitment_loss as f64 - beta as f64 * mse).abs() <= 1e-6 * (1.0 + mse),
        "commitment loss {} vs {}",
        fwd.commitment_loss,
        beta as f64 * mse
    );
}

#[test]
fn straight_through_gradient_matches_finite_differences() {
    grad_check(Estimator::StraightThrough, false);
    grad_check(Estimator::StraightThrough, true);
}

#[test]
fn rotation_trick_gradient_matches_finite_differences() {
    grad_check(Estimator::RotationTrick, false);
    grad_check(Estimator::RotationTrick, true);
}

#[test]
fn rotation_trick_value_is_q() {
    let (x, q) = (uniform(1, 9, 21), uniform(1, 9, 22));
    let z = rotation_trick_value(&x, &q);
    for (i, (&a, &b)) in z.iter().zip(&q).enumerate() {
        assert!(
            (a - b as f64).abs() < 1e-12,
            "index {i}: rotated value {a}, q {b}"
        );
    }
}

#[test]
fn codebook_gradient_matches_finite_differences() {
    let (n, d, k) = (9, 3, 4);
    let x = uniform(n, d, 31);
    let c0 = uniform(k, d, 32);
    let mut vq = VectorQuantizer::with_codebook(
        cfg(k, d)
            .learning(CodebookLearning::Gradient)
            .commitment_weight(0.0),
        mat(c0.clone(), k, d),
    )
    .unwrap();
    let kept: Vec<bool> = (0..n).map(|r| r != 4).collect();
    let xm = MatRef::new(&x, n, d).unwrap();
    let fwd = vq.forward(xm, Some(&kept), true).unwrap();
    let zero = vec![0f32; n * d];
    let grads = vq
        .backward(&fwd, xm, MatRef::new(&zero, n, d).unwrap())
        .unwrap();
    let gc = grads
        .codebook
        .expect("gradient learning returns a codebook gradient");
    // L(C) = mean over kept rows of (x − C[i(n)])², indices frozen.
    let idx = fwd.indices.clone();
    let f = |c: &[f64]| {
        let mut s = 0.0;
        for r in (0..n).filter(|&r| kept[r]) {
            let k = idx[r] as usize;
            s += (0..d)
                .map(|i| (x[r * d + i] as f64 - c[k * d + i]).powi(2))
                .sum::<f64>();
        }
        s / (8.0 * d as f64)
    };
    let c64: Vec<f64> = c0.iter().map(|&v| v as f64).collect();
    let fd: Vec<f64> = (0..k * d).map(|i| central(&f, &c64, i, 1e-5)).collect();
    check_grad(gc.data(), &fd, "dL/dC");
    assert!(
        (fwd.codebook_loss as f64 - f(&c64)).abs() < 1e-6,
        "codebook loss {} vs {}",
        fwd.codebook_loss,
        f(&c64)
    );
    // Gradient learning leaves the codebook to the optimiser.
    assert_eq!(vq.codebook().data(), &c0[..]);
}

#[test]
fn one_ema_step_matches_f64_reference() {
    let (n, d, k) = (50, 6, 8);
    let (decay, eps) = (0.9f32, 1e-5f32);
    let x = normal(n, d, 41, 1.0, 0.0);
    let c0 = normal(k, d, 42, 1.0, 0.0);
    let mut vq = VectorQuantizer::with_codebook(
        cfg(k, d).learning(CodebookLearning::Ema { decay, eps }),
        mat(c0.clone(), k, d),
    )
    .unwrap();
    let fwd = vq
        .forward(MatRef::new(&x, n, d).unwrap(), None, true)
        .unwrap();
    // Hand-computed in f64 from the indices of the step.
    let (g, e) = (decay as f64, eps as f64);
    let mut cnt = vec![0f64; k];
    let mut sum = vec![0f64; k * d];
    for (r, &i) in fwd.indices.iter().enumerate() {
        cnt[i as usize] += 1.0;
        for j in 0..d {
            sum[i as usize * d + j] += x[r * d + j] as f64;
        }
    }
    let big_n: Vec<f64> = cnt.iter().map(|&c| g * 1.0 + (1.0 - g) * c).collect();
    let m: Vec<f64> = (0..k * d)
        .map(|i| g * c0[i] as f64 + (1.0 - g) * sum[i])
        .collect();
    let total: f64 = big_n.iter().sum();
    let smoothed: Vec<f64> = big_n
        .iter()
        .map(|&v| (v + e) / (total + k as f64 * e) * total)
        .collect();
    let want_c: Vec<f64> = (0..k * d).map(|i| m[i] / smoothed[i / d]).collect();
    let ema = vq.ema().unwrap();
    // f32 state, one rounding per operation: a few ulps.
    assert_close(ema.cluster_size(), &big_n, 1e-6, 1e-7, "EMA counts N_k");
    assert_close(ema.embed_avg().data(), &m, 1e-6, 1e-7, "EMA sums m_k");
    assert_close(vq.codebook().data(), &want_c, 2e-6, 1e-7, "codebook c_k");
    // The step quantized with the codebook from before the update.
    for (r, &i) in fwd.indices.iter().enumerate() {
        assert_eq!(
            fwd.quantized.row(r),
            &c0[i as usize * d..(i as usize + 1) * d],
            "row {r}"
        );
    }
}

/// K well-separated centres and rows around them.
fn clusters(k: usize, d: usize, n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let centers = normal(k, d, seed, 10.0, 0.0);
    let (x, _) = clustered(&centers, k, d, n, 0.2, seed + 1);
    (centers, x)
}

fn nearest_center_distance(codebook: &Matrix, centers: &[f32], d: usize) -> Vec<f64> {
    let k = centers.len() / d;
    (0..k)
        .map(|c| {
            (0..codebook.rows())
                .map(|j| {
                    vqx::reference::distance(
                        &centers[c * d..(c + 1) * d],
                        codebook.row(j),
                        Metric::L2,
                    )
                })
                .fold(f64::INFINITY, f64::min)
        })
        .collect()
}

#[test]
fn fits_well_separated_clusters() {
    let (k, d) = (16, 8);
    let (centers, x) = clusters(k, d, 4096, 51);
    for init in [Init::Data, Init::KMeans { iters: 10 }] {
        let mut vq = VectorQuantizer::new(
            cfg(k, d)
                .init(init)
                .dead_code_threshold(1.0)
                .learning(CodebookLearning::ema(0.8)),
        )
        .unwrap();
        let mut last = None;
        for step in 0..60 {
            let b = (step % 8) * 512;
            let batch = MatRef::new(&x[b * d..(b + 512) * d], 512, d).unwrap();
            last = Some(vq.forward(batch, None, true).unwrap().stats);
        }
        let s = last.unwrap();
        assert_eq!(s.dead, 0, "{init:?}: no dead codes at the end ({s:?})");
        let total = vq.statistics();
        assert_eq!(
            (total.step, total.cumulative_used, total.dead),
            (60, k, Some(0)),
            "{total:?}"
        );
        // The EMA counts sum to the batch size once the start (N = 1) has decayed away.
        let counts = total.ema_counts.unwrap();
        assert!((counts.mean * k as f64 - 512.0).abs() < 1.0, "{counts:?}");
        assert!(
            s.perplexity > 0.8 * k as f64,
            "{init:?}: perplexity {} near K = {k}",
            s.perplexity
        );
        if init == Init::Data {
            // A random sample may put two codes in one cluster (a local optimum k-means++
            // avoids): only usage is asserted for it.
            continue;
        }
        for (c, dist) in nearest_center_distance(vq.codebook(), &centers, d)
            .iter()
            .enumerate()
        {
            // Noise ±0.2 per coordinate: a recovered centre is within ~0.01 in squared distance.
            assert!(
                *dist < 0.05,
                "{init:?}: centre {c} is {dist} from the nearest code"
            );
        }
    }
}

#[test]
fn bad_init_is_revived_by_dead_code_reseeding() {
    let (k, d) = (16, 8);
    let (centers, x) = clusters(k, d, 4096, 61);
    // Every code at one far point: one code wins everything, the rest decay.
    let far = mat(vec![100.0; k * d], k, d);
    let run = |threshold: f32| {
        let mut vq = VectorQuantizer::with_codebook(
            cfg(k, d)
                .dead_code_threshold(threshold)
                .learning(CodebookLearning::ema(0.8)),
            far.clone(),
        )
        .unwrap();
        let mut replaced = 0;
        let mut last = None;
        for step in 0..80 {
            let b = (step % 8) * 512;
            let s = vq
                .forward(
                    MatRef::new(&x[b * d..(b + 512) * d], 512, d).unwrap(),
                    None,
                    true,
                )
                .unwrap()
                .stats;
            replaced += s.replaced;
            last = Some(s);
        }
        (vq, replaced, last.unwrap())
    };
    let (vq_off, replaced_off, _) = run(0.0);
    assert_eq!(replaced_off, 0);
    // Without re-seeding, the unused codes only drift (Laplace smoothing pulls them to 0).
    let recovered_off = nearest_center_distance(vq_off.codebook(), &centers, d)
        .iter()
        .filter(|&&v| v < 0.05)
        .count();
    let (vq, replaced, on) = run(1.0);
    assert!(
        replaced >= k - 1,
        "dead codes were re-seeded ({replaced} replacements)"
    );
    assert!(on.used == k && on.dead == 0, "revived: {on:?}");
    let recovered = nearest_center_distance(vq.codebook(), &centers, d)
        .iter()
        .filter(|&&v| v < 0.05)
        .count();
    // Random re-seeding can put two codes in one cluster, so not every centre need be found.
    assert!(recovered >= k / 2, "{recovered} of {k} centres recovered");
    assert!(
        recovered_off < recovered,
        "re-seeding recovers more centres ({recovered}) than drift alone ({recovered_off})"
    );
}

#[test]
fn reseeding_touches_only_dead_codes() {
    let (k, d, n) = (12, 4, 40);
    let x = normal(n, d, 71, 1.0, 0.0);
    // Codes 0..6 near the data, 6..12 far away: those get no rows and their counts decay.
    let mut c = normal(k, d, 72, 1.0, 0.0);
    for v in &mut c[6 * d..] {
        *v += 50.0;
    }
    let make = |threshold: f32| {
        VectorQuantizer::with_codebook(
            cfg(k, d)
                .dead_code_threshold(threshold)
                .learning(CodebookLearning::ema(0.5)),
            mat(c.clone(), k, d),
        )
        .unwrap()
    };
    let (mut on, mut off) = (make(0.6), make(0.0));
    let xm = MatRef::new(&x, n, d).unwrap();
    let s_on = on.forward(xm, None, true).unwrap().stats;
    off.forward(xm, None, true).unwrap();
    let counts_off = off.ema().unwrap().cluster_size().to_vec();
    let dead: Vec<usize> = (0..k).filter(|&j| counts_off[j] < 0.6).collect();
    assert!(
        (6..12).all(|j| dead.contains(&j)),
        "the far codes are among the dead ones: counts {counts_off:?}"
    );
    assert_eq!((s_on.dead, s_on.replaced), (dead.len(), dead.len()));
    for (j, &count_off) in counts_off.iter().enumerate() {
        let (a, b) = (on.codebook().row(j), off.codebook().row(j));
        if dead.contains(&j) {
            let is_batch_row = (0..n).any(|r| x[r * d..(r + 1) * d] == *a);
            assert!(
                is_batch_row,
                "dead code {j} re-seeded from a batch row, got {a:?}"
            );
            assert_eq!(
                on.ema().unwrap().cluster_size()[j],
                0.6,
                "reset count = threshold"
            );
        } else {
            assert_eq!(a, b, "live code {j} must be bit-identical");
            assert_eq!(on.ema().unwrap().cluster_size()[j], count_off);
        }
    }
    // Distinct rows: no two re-seeded codes are equal.
    for (i, &a) in dead.iter().enumerate() {
        for &b in &dead[i + 1..] {
            assert_ne!(
                on.codebook().row(a),
                on.codebook().row(b),
                "codes {a} and {b}"
            );
        }
    }
}

#[test]
fn more_dead_codes_than_rows_are_reseeded_over_several_steps() {
    let (k, d) = (20, 3);
    let c = mat(vec![100.0; k * d], k, d);
    let mut vq = VectorQuantizer::with_codebook(
        cfg(k, d)
            .dead_code_threshold(0.5)
            .learning(CodebookLearning::ema(0.1)),
        c,
    )
    .unwrap();
    let mut total = 0;
    for step in 0..6 {
        let x = normal(4, d, 80 + step, 1.0, 0.0);
        let s = vq
            .forward(MatRef::new(&x, 4, d).unwrap(), None, true)
            .unwrap()
            .stats;
        assert!(s.replaced <= 4, "at most one code per batch row: {s:?}");
        total += s.replaced;
    }
    assert!(total >= k - 4, "re-seeded over later steps: {total}");
}

#[test]
fn data_init_tiles_a_small_batch_with_noise() {
    let (k, d) = (10, 4);
    let x = uniform(3, d, 91);
    let mut vq = VectorQuantizer::new(cfg(k, d)).unwrap();
    let s = vq
        .forward(MatRef::new(&x, 3, d).unwrap(), None, true)
        .unwrap()
        .stats;
    assert!(s.initialized);
    let cb = vq.codebook();
    for a in 0..k {
        let near = (0..3)
            .map(|r| vqx::reference::distance(&x[r * d..(r + 1) * d], cb.row(a), Metric::L2))
            .fold(f64::INFINITY, f64::min);
        // Noise std 0.01/√D per coordinate: squared distance ~1e-4.
        assert!(
            near < 0.01,
            "code {a} is a noisy copy of a batch row ({near})"
        );
        for b in a + 1..k {
            assert_ne!(cb.row(a), cb.row(b), "codes {a} and {b} start identical");
        }
    }
}

#[test]
fn runs_are_deterministic_for_a_seed() {
    let (k, d) = (8, 4);
    let (_, x) = clusters(k, d, 1024, 101);
    let run = || {
        let mut vq =
            VectorQuantizer::new(cfg(k, d).deterministic(true).dead_code_threshold(0.5)).unwrap();
        for s in 0..10 {
            let b = (s % 4) * 256;
            vq.forward(
                MatRef::new(&x[b * d..(b + 256) * d], 256, d).unwrap(),
                None,
                true,
            )
            .unwrap();
        }
        (vq.codebook().clone(), vq.ema().unwrap().clone())
    };
    assert_eq!(run(), run());
}

#[test]
fn cosine_ema_keeps_the_codebook_normalised() {
    let (k, d) = (6, 5);
    let (_, x) = clusters(k, d, 600, 111);
    let mut vq = VectorQuantizer::new(cfg(k, d).metric(Metric::Cosine)).unwrap();
    for _ in 0..3 {
        vq.forward(MatRef::new(&x, 600, d).unwrap(), None, true)
            .unwrap();
    }
    for j in 0..k {
        let norm: f64 = vq
            .codebook()
            .row(j)
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "code {j} has norm {norm}");
    }
}

#[test]
fn eval_changes_nothing() {
    let (k, d) = (5, 3);
    let c = mat(uniform(k, d, 121), k, d);
    let mut vq = VectorQuantizer::with_codebook(cfg(k, d), c.clone()).unwrap();
    let x = uniform(20, d, 122);
    let out = vq
        .forward(MatRef::new(&x, 20, d).unwrap(), None, false)
        .unwrap();
    assert_eq!(vq.codebook(), &c);
    assert_eq!(vq.step(), 0);
    assert_eq!(out.stats.step, 0);
}

#[test]
fn bad_input_and_config_are_typed_errors() {
    let (k, d) = (4, 3);
    let mut vq = VectorQuantizer::with_codebook(cfg(k, d), mat(uniform(k, d, 1), k, d)).unwrap();
    let x = uniform(2, 4, 2);
    assert!(matches!(
        vq.forward(MatRef::new(&x, 2, 4).unwrap(), None, true),
        Err(Error::Shape { .. })
    ));
    let x = uniform(2, 3, 2);
    let xm = MatRef::new(&x, 2, 3).unwrap();
    assert!(matches!(
        vq.forward(xm, Some(&[true]), true),
        Err(Error::Shape { .. })
    ));
    let mut nan = x.clone();
    nan[4] = f32::NAN;
    assert!(matches!(
        vq.forward(MatRef::new(&nan, 2, 3).unwrap(), None, true),
        Err(Error::NonFinite { row: 1, col: 1, .. })
    ));
    assert!(matches!(
        vq.forward(MatRef::new(&[], 0, 3).unwrap(), None, true),
        Err(Error::Empty { .. })
    ));
    let fwd = vq.forward(xm, None, false).unwrap();
    assert!(matches!(
        vq.backward(&fwd, xm, MatRef::new(&[0.0; 3], 1, 3).unwrap()),
        Err(Error::Shape { .. })
    ));

    let mut fresh = VectorQuantizer::new(cfg(k, d)).unwrap();
    let err = fresh.forward(xm, Some(&[false, false]), true).unwrap_err();
    assert!(err.to_string().contains("masked"), "{err}");

    for bad in [
        cfg(0, 3),
        cfg(4, 0),
        cfg(4, 3).commitment_weight(-1.0),
        cfg(4, 3).learning(CodebookLearning::ema(1.0)),
        cfg(4, 3).learning(CodebookLearning::Ema {
            decay: 0.9,
            eps: 0.0,
        }),
        cfg(4, 3).dead_code_threshold(f32::NAN),
        cfg(4, 3)
            .learning(CodebookLearning::Gradient)
            .dead_code_threshold(1.0),
        cfg(4, 3).init(Init::KMeans { iters: 0 }),
    ] {
        assert!(
            matches!(
                VectorQuantizer::new(bad.clone()),
                Err(Error::InvalidArgument(_))
            ),
            "{bad:?} must be refused"
        );
    }
    let err = VectorQuantizer::with_codebook(cfg(4, 3), mat(uniform(5, 3, 1), 5, 3)).unwrap_err();
    assert!(
        err.to_string().contains("4 × 3") && err.to_string().contains("5 × 3"),
        "{err}"
    );
}
