//! The low-precision rounding bound, proved on the CPU with no GPU: scores computed from
//! operands rounded to tf32 or bf16 (`nearest::emulate`, rounding exactly as
//! `kernels/nearest_tc.cu` does) and then `nearest::finish` with the matching
//! [`RoundingModel`] must give the exact f64 reference's index on every row that is not a true
//! tie, on random, clustered, shifted (offset 8 and 30) and near-tie data, L2 and cosine.
//! A deliberately too-small bound (`operand_roundoff = 0`) must get some rows wrong, so these
//! tests can fail.
//!
//! `cargo test --release --test precision -- --nocapture` prints the recheck fractions
//! (docs/gpu.md records them).

mod common;
use common::*;
use std::io::Write;
use vqx::nearest::{self, Precision, Prepared, RoundingModel, emulate};
use vqx::{Assignment, MatRef, Metric, reference};

/// emulate → finish with `model`.
fn run(
    x: MatRef<'_>,
    c: MatRef<'_>,
    metric: Metric,
    precision: Precision,
    model: RoundingModel,
) -> Assignment {
    nearest::validate(x, c).unwrap();
    let prepared = Prepared::new(c, metric);
    let cand = emulate::candidates(x, c, &prepared, precision);
    nearest::finish(x, c, &prepared, model, cand)
}

/// Rows whose index differs from the reference's and is not a true tie.
fn wrong_rows(x: MatRef<'_>, c: MatRef<'_>, metric: Metric, got: &Assignment) -> usize {
    let want = reference::nearest(x, c, metric);
    want.iter()
        .zip(&got.indices)
        .enumerate()
        .filter(|&(n, (&(wi, wd), &gi))| {
            gi != wi && {
                let gd = reference::distance(x.row(n), c.row(gi as usize), metric);
                (gd - wd).abs() > 1e-12 * wd.abs().max(1e-300)
            }
        })
        .count()
}

fn say(line: String) {
    std::io::stderr()
        .lock()
        .write_all(format!("{line}\n").as_bytes())
        .ok();
}

struct Case {
    name: String,
    x: Vec<f32>,
    c: Vec<f32>,
    n: usize,
    d: usize,
    k: usize,
}

/// Near-tie data: each row lies on the bisector of two codes, nudged by ±`eps` relative.
fn near_tie(n: usize, d: usize, k: usize, eps: f32, seed: u64) -> Case {
    let c = uniform(k, d, seed);
    let mut r = rng(seed + 1);
    let mut x = Vec::with_capacity(n * d);
    use rand::Rng;
    for _ in 0..n {
        let a = r.gen_range(0..k);
        let b = (a + 1 + r.gen_range(0..k - 1)) % k;
        let t = 0.5 + eps * (r.r#gen::<f32>() * 2.0 - 1.0);
        for j in 0..d {
            let noise = 1e-3 * (r.r#gen::<f32>() * 2.0 - 1.0);
            x.push(c[a * d + j] * t + c[b * d + j] * (1.0 - t) + noise);
        }
    }
    Case {
        name: format!("near-tie eps={eps:e}"),
        x,
        c,
        n,
        d,
        k,
    }
}

fn cases(n: usize, d: usize, k: usize, seed: u64) -> Vec<Case> {
    let mut v = vec![
        Case {
            name: "uniform".into(),
            x: uniform(n, d, seed),
            c: uniform(k, d, seed + 1),
            n,
            d,
            k,
        },
        {
            let c = uniform(k, d, seed + 2);
            let (x, _) = clustered(&c, k, d, n, 0.05, seed + 3);
            Case {
                name: "clustered".into(),
                x,
                c,
                n,
                d,
                k,
            }
        },
    ];
    for shift in [8.0f32, 30.0] {
        v.push(Case {
            name: format!("shifted {shift}"),
            x: normal(n, d, seed + 4, 1.0, shift),
            c: normal(k, d, seed + 5, 1.0, shift),
            n,
            d,
            k,
        });
    }
    v.push(near_tie(n, d, k, 1e-3, seed + 6));
    v.push(near_tie(n, d, k, 1e-6, seed + 7));
    v
}

#[test]
fn low_precision_with_recheck_is_exact() {
    for (n, d, k) in [(300, 7, 33), (513, 64, 257), (257, 256, 130)] {
        for case in cases(n, d, k, (n + d + k) as u64) {
            let x = MatRef::new(&case.x, case.n, case.d).unwrap();
            let c = MatRef::new(&case.c, case.k, case.d).unwrap();
            for metric in [Metric::L2, Metric::Cosine] {
                for p in [Precision::Tf32, Precision::Bf16] {
                    let got = run(x, c, metric, p, p.model());
                    let ctx = format!("{} N={n} D={d} K={k} {metric} {p}", case.name);
                    assert_eq!(wrong_rows(x, c, metric, &got), 0, "{ctx}");
                    // The distances too: those of an exact computation to f32 accuracy.
                    assert_exact_nearest(x, c, metric, &got, 1e-6, &ctx);
                    say(format!(
                        "{ctx}: rechecked {}/{} ({:.1}%)",
                        got.rechecked,
                        case.n,
                        100.0 * got.rechecked as f64 / case.n as f64
                    ));
                }
            }
        }
    }
}

#[test]
fn a_bound_without_operand_rounding_gets_rows_wrong() {
    // The same scores, but finish told they were computed from f32 operands: the recheck
    // misses rows that the rounding of the operands flipped.
    let case = near_tie(2000, 64, 64, 1e-3, 41);
    let x = MatRef::new(&case.x, case.n, case.d).unwrap();
    let c = MatRef::new(&case.c, case.k, case.d).unwrap();
    for p in [Precision::Tf32, Precision::Bf16] {
        let too_small = RoundingModel {
            operand_roundoff: 0.0,
            ..p.model()
        };
        let bad = run(x, c, Metric::L2, p, too_small);
        let wrong = wrong_rows(x, c, Metric::L2, &bad);
        say(format!(
            "{p} with operand_roundoff = 0: {wrong} of {} rows wrong",
            case.n
        ));
        assert!(wrong > 0, "{p}: the too-small bound got every row right");
        let good = run(x, c, Metric::L2, p, p.model());
        assert_eq!(wrong_rows(x, c, Metric::L2, &good), 0, "{p}");
    }
    // Shifted data (large norms, small differences), both precisions.
    let (n, d, k) = (2000, 32, 256);
    let xs = normal(n, d, 7, 1.0, 30.0);
    let cs = normal(k, d, 8, 1.0, 30.0);
    let x = MatRef::new(&xs, n, d).unwrap();
    let c = MatRef::new(&cs, k, d).unwrap();
    for p in [Precision::Tf32, Precision::Bf16] {
        let too_small = RoundingModel {
            operand_roundoff: 0.0,
            ..p.model()
        };
        let wrong = wrong_rows(x, c, Metric::L2, &run(x, c, Metric::L2, p, too_small));
        say(format!(
            "{p}, shifted 30, operand_roundoff = 0: {wrong} of {n} rows wrong"
        ));
        assert!(
            wrong > 0,
            "{p}, shifted 30: the too-small bound got every row right"
        );
        let good = run(x, c, Metric::L2, p, p.model());
        assert_eq!(wrong_rows(x, c, Metric::L2, &good), 0, "{p} shifted 30");
    }
}

#[test]
fn exact_precision_emulation_is_the_f32_path() {
    // Precision::Exact through the emulation uses RoundingModel::F32, like every backend.
    let (n, d, k) = (200, 16, 50);
    let xs = uniform(n, d, 3);
    let cs = uniform(k, d, 4);
    let x = MatRef::new(&xs, n, d).unwrap();
    let c = MatRef::new(&cs, k, d).unwrap();
    let got = run(x, c, Metric::L2, Precision::Exact, Precision::Exact.model());
    assert_eq!(wrong_rows(x, c, Metric::L2, &got), 0);
    assert_eq!(Precision::Exact.model(), RoundingModel::F32);
}

/// Recheck fractions on SPEC §7's shapes with N scaled down (uniform random data in [-1, 1),
/// the kind `vqx bench` times, and a Gaussian-mixture-like clustered set), every precision.
#[test]
fn recheck_fractions_on_spec_shapes() {
    let n = 512;
    say("shape (N, D, K) | data | exact | tf32 | bf16 (rows rechecked)".into());
    for (d, k) in [(256, 4096), (128, 4096), (64, 1024), (8, 16384)] {
        let c_uniform = uniform(k, d, 11);
        let (x_cl, _) = clustered(&c_uniform, k, d, n, 0.1, 12);
        let x_un = uniform(n, d, 13);
        for (name, xs) in [("uniform", &x_un), ("clustered", &x_cl)] {
            let x = MatRef::new(xs, n, d).unwrap();
            let c = MatRef::new(&c_uniform, k, d).unwrap();
            let fr: Vec<String> = Precision::ALL
                .iter()
                .map(|&p| {
                    let got = run(x, c, Metric::L2, p, p.model());
                    assert_eq!(wrong_rows(x, c, Metric::L2, &got), 0, "{name} {d} {k} {p}");
                    format!("{:.1}%", 100.0 * got.rechecked as f64 / n as f64)
                })
                .collect();
            say(format!("({n}, {d}, {k}) | {name} | {}", fr.join(" | ")));
        }
    }
}
