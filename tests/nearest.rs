//! CPU nearest vs the naive f64 reference: random and clustered data, awkward sizes around the
//! CPU tiles, several seeds, L2 and cosine, ties, f16 input, and every kind of bad input.

mod common;
use common::*;
use vqx::backend::{Backend, CpuBackend};
use vqx::nearest::cpu::{CODE_TILE, CpuKernel, ROW_BLOCK};
use vqx::{Error, MatRef, Matrix, Metric};

const ABS: f64 = 1e-6;

/// `b`'s nearest codes of `x` under `metric`, checked against the reference.
fn check_exact(b: CpuBackend, x: MatRef<'_>, c: MatRef<'_>, metric: Metric, context: &str) {
    let got = b.nearest(x, c, metric).unwrap();
    assert_exact_nearest(x, c, metric, &got, ABS, context);
}

fn check(b: CpuBackend, n: usize, d: usize, k: usize, seed: u64, metric: Metric) {
    let x = uniform(n, d, seed);
    let c = uniform(k, d, seed + 1000);
    let (xm, cm) = (
        MatRef::new(&x, n, d).unwrap(),
        MatRef::new(&c, k, d).unwrap(),
    );
    let context = format!("N={n} D={d} K={k} seed={seed} {metric}");
    check_exact(b, xm, cm, metric, &context);
}

fn awkward_sizes_match_reference(b: CpuBackend) {
    // Around the portable tiles (ROW_BLOCK × CODE_TILE) and the AVX-512 blocks (8 × 32).
    let ns = [1, 7, 9, ROW_BLOCK - 1, ROW_BLOCK + 1, 3 * ROW_BLOCK + 7];
    let ks = [1, 2, 31, 33, CODE_TILE - 1, CODE_TILE + 1];
    let ds = [1, 3, 17, 64];
    for (i, &n) in ns.iter().enumerate() {
        for (j, &k) in ks.iter().enumerate() {
            let d = ds[(i + j) % ds.len()];
            for seed in 0..2 {
                for metric in [Metric::L2, Metric::Cosine] {
                    check(b, n, d, k, seed * 7 + (i * 4 + j) as u64, metric);
                }
            }
        }
    }
}

fn large_shape_matches_reference(b: CpuBackend) {
    for seed in 0..3 {
        check(
            b,
            2 * ROW_BLOCK + 5,
            128,
            2 * CODE_TILE + 3,
            100 + seed,
            Metric::L2,
        );
    }
    check(b, ROW_BLOCK + 3, 256, 1024, 200, Metric::Cosine);
}

fn large_dimension_and_many_codes(b: CpuBackend) {
    check(b, 9, 4096, 33, 300, Metric::L2);
    check(b, 5, 3, 65_536, 301, Metric::L2);
}

fn clustered_data_finds_its_centres(b: CpuBackend) {
    let (k, d) = (64, 32);
    let centers = normal(k, d, 5, 10.0, 3.0);
    let (x, label) = clustered(&centers, k, d, 1000, 0.1, 6);
    let (xm, cm) = (
        MatRef::new(&x, 1000, d).unwrap(),
        MatRef::new(&centers, k, d).unwrap(),
    );
    for metric in [Metric::L2, Metric::Cosine] {
        check_exact(b, xm, cm, metric, &format!("clustered {metric}"));
    }
    let got = b.nearest(xm, cm, Metric::L2).unwrap();
    for (n, (&g, &w)) in got.indices.iter().zip(&label).enumerate() {
        assert_eq!(g, w, "row {n}: index {g}, true centre {w}");
    }
}

fn large_offset_data_stays_exact(b: CpuBackend) {
    // ||x||² ≫ the gaps between codes: the cancellation the rounding bound must cover.
    let (n, d, k) = (300, 64, 700);
    let x = normal(n, d, 11, 1.0, 100.0);
    let c = normal(k, d, 12, 1.0, 100.0);
    let (xm, cm) = (
        MatRef::new(&x, n, d).unwrap(),
        MatRef::new(&c, k, d).unwrap(),
    );
    check_exact(b, xm, cm, Metric::L2, "offset 100");
}

fn shifted_data_over_many_seeds(b: CpuBackend) {
    // A common offset makes ||x||² dwarf the gaps between codes (the case where FAISS's f32
    // expanded form loses the winner): the recheck must make every row exact.
    for seed in 0..6 {
        let (n, d, k) = (700, 16, 300);
        let shift = [8.0, 30.0, 100.0][seed as usize % 3];
        let x = normal(n, d, 400 + seed, 1.0, shift);
        let c = normal(k, d, 500 + seed, 1.0, shift);
        let (xm, cm) = (
            MatRef::new(&x, n, d).unwrap(),
            MatRef::new(&c, k, d).unwrap(),
        );
        for metric in [Metric::L2, Metric::Cosine] {
            check_exact(
                b,
                xm,
                cm,
                metric,
                &format!("shift {shift} seed {seed} {metric}"),
            );
        }
    }
}

fn near_ties_are_resolved_exactly(b: CpuBackend) {
    // Codes that differ in the last bits of one coordinate: f32 scores cannot tell them apart,
    // the f64 recheck must.
    let d = 8;
    let base = uniform(1, d, 21);
    let mut c = Vec::new();
    for i in 0..CODE_TILE + 5 {
        let mut row = base.clone();
        row[i % d] += (i as f32) * 1e-6;
        c.extend_from_slice(&row);
    }
    let k = c.len() / d;
    let x = uniform(ROW_BLOCK + 1, d, 22)
        .iter()
        .map(|v| v * 1e-3)
        .zip(base.iter().cycle())
        .map(|(a, b)| a + b)
        .collect::<Vec<_>>();
    let n = x.len() / d;
    let (xm, cm) = (
        MatRef::new(&x, n, d).unwrap(),
        MatRef::new(&c, k, d).unwrap(),
    );
    let got = b.nearest(xm, cm, Metric::L2).unwrap();
    assert!(
        got.rechecked > 0,
        "near-equal codes must trigger the recheck"
    );
    assert_exact_nearest(xm, cm, Metric::L2, &got, 0.0, "near ties");
}

fn exact_ties_go_to_the_smallest_index(b: CpuBackend) {
    let d = 5;
    let row = uniform(1, d, 31);
    // The same code at positions 3, 700 and 1500; other codes far away.
    let k = 1600;
    let mut c = uniform(k, d, 32)
        .iter()
        .map(|v| v + 50.0)
        .collect::<Vec<_>>();
    for &pos in &[3usize, 700, 1500] {
        c[pos * d..(pos + 1) * d].copy_from_slice(&row);
    }
    let x: Vec<f32> = (0..ROW_BLOCK + 2)
        .flat_map(|_| row.iter().map(|v| v + 0.01))
        .collect();
    let n = x.len() / d;
    let (xm, cm) = (
        MatRef::new(&x, n, d).unwrap(),
        MatRef::new(&c, k, d).unwrap(),
    );
    for metric in [Metric::L2, Metric::Cosine] {
        let got = b.nearest(xm, cm, metric).unwrap();
        for (i, &g) in got.indices.iter().enumerate() {
            assert_eq!(
                g, 3,
                "{metric}: row {i}: index {g}, want 3 (first of three equal codes)"
            );
        }
    }
}

fn zero_rows_under_cosine(b: CpuBackend) {
    let (d, k) = (4, 3);
    let c = vec![0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
    let x = vec![0.0; d * 2];
    let got = b
        .nearest(
            MatRef::new(&x, 2, d).unwrap(),
            MatRef::new(&c, k, d).unwrap(),
            Metric::Cosine,
        )
        .unwrap();
    assert_eq!(
        got.indices,
        vec![0, 0],
        "a zero row has cosine 0 to all: the first code wins"
    );
    assert_eq!(got.distances, vec![1.0, 1.0]);
}

fn f16_input_equals_its_f32_conversion(b: CpuBackend) {
    let (n, d, k) = (ROW_BLOCK + 9, 24, 100);
    let xh: Vec<half::f16> = uniform(n, d, 41)
        .iter()
        .map(|&v| half::f16::from_f32(v))
        .collect();
    let xf: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
    let c = uniform(k, d, 42);
    let cm = MatRef::new(&c, k, d).unwrap();
    let from_half = Matrix::from_f16(&xh, n, d).unwrap();
    let a = b.nearest(from_half.as_ref(), cm, Metric::L2).unwrap();
    let xm = MatRef::new(&xf, n, d).unwrap();
    assert_exact_nearest(xm, cm, Metric::L2, &a, ABS, "f16 input");
    let bf: Vec<half::bf16> = xf.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let from_bf = Matrix::from_bf16(&bf, n, d).unwrap();
    let b = b.nearest(from_bf.as_ref(), cm, Metric::L2).unwrap();
    assert_exact_nearest(from_bf.as_ref(), cm, Metric::L2, &b, ABS, "bf16 input");
}

fn result_does_not_depend_on_thread_count(b: CpuBackend) {
    let (n, d, k) = (5 * ROW_BLOCK + 3, 32, 777);
    let x = uniform(n, d, 51);
    let c = uniform(k, d, 52);
    let (xm, cm) = (
        MatRef::new(&x, n, d).unwrap(),
        MatRef::new(&c, k, d).unwrap(),
    );
    let many = b.nearest(xm, cm, Metric::L2).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let one = pool.install(|| b.nearest(xm, cm, Metric::L2).unwrap());
    assert_eq!(many, one);
}

fn bad_input_is_a_typed_error(b: CpuBackend) {
    let c = uniform(4, 3, 1);
    let cm = MatRef::new(&c, 4, 3).unwrap();
    let x = uniform(2, 3, 2);
    let xm = MatRef::new(&x, 2, 3).unwrap();

    let empty = MatRef::new(&[], 0, 3).unwrap();
    assert!(matches!(
        b.nearest(empty, cm, Metric::L2),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        b.nearest(xm, empty, Metric::L2),
        Err(Error::Empty { .. })
    ));

    let x4 = uniform(2, 4, 3);
    let err = b
        .nearest(MatRef::new(&x4, 2, 4).unwrap(), cm, Metric::L2)
        .unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    assert!(
        err.to_string().contains("3 columns") && err.to_string().contains("4 columns"),
        "{err}"
    );

    let mut bad = x.clone();
    bad[4] = f32::NAN;
    let err = b
        .nearest(MatRef::new(&bad, 2, 3).unwrap(), cm, Metric::L2)
        .unwrap_err();
    match err {
        Error::NonFinite { row, col, .. } => assert_eq!((row, col), (1, 1)),
        e => panic!("want NonFinite, got {e}"),
    }
    let mut badc = c.clone();
    badc[11] = f32::INFINITY;
    let err = b
        .nearest(xm, MatRef::new(&badc, 4, 3).unwrap(), Metric::L2)
        .unwrap_err();
    assert!(
        err.to_string().contains("codebook") && err.to_string().contains("row 3"),
        "{err}"
    );

    assert!(matches!(MatRef::new(&x, 3, 3), Err(Error::Shape { .. })));

    // Finite but so large that f32 scores would overflow: an error, not a silent index.
    let mut huge = x.clone();
    huge[2] = 3e18;
    let err = b
        .nearest(MatRef::new(&huge, 2, 3).unwrap(), cm, Metric::L2)
        .unwrap_err();
    assert!(err.to_string().contains("overflow"), "{err}");
    // Large but safe values still work exactly.
    let big: Vec<f32> = x.iter().map(|v| v * 1e17).collect();
    let bigc: Vec<f32> = c.iter().map(|v| v * 1e17).collect();
    let (bx, bc) = (
        MatRef::new(&big, 2, 3).unwrap(),
        MatRef::new(&bigc, 4, 3).unwrap(),
    );
    let got = b.nearest(bx, bc, Metric::L2).unwrap();
    let want: Vec<u32> = vqx::reference::nearest(bx, bc, Metric::L2)
        .iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(got.indices, want);
}

/// Every test above, once per CPU kernel. On a CPU without AVX-512F the `avx512` copies run the
/// portable kernel (and say so).
macro_rules! for_each_kernel {
    ($($name:ident),* $(,)?) => {
        mod avx512 {
            use super::*;
            $(#[test]
            fn $name() {
                if CpuKernel::Avx512.resolve() != CpuKernel::Avx512 {
                    use std::io::Write;
                    let _ = writeln!(std::io::stderr(), "note: {}: no AVX-512F here, the portable kernel runs", stringify!($name));
                }
                super::$name(CpuBackend::with_kernel(CpuKernel::Avx512))
            })*
        }
        mod portable {
            use super::*;
            $(#[test]
            fn $name() {
                super::$name(CpuBackend::with_kernel(CpuKernel::Portable))
            })*
        }
    };
}

for_each_kernel!(
    shifted_data_over_many_seeds,
    awkward_sizes_match_reference,
    large_shape_matches_reference,
    large_dimension_and_many_codes,
    clustered_data_finds_its_centres,
    large_offset_data_stays_exact,
    near_ties_are_resolved_exactly,
    exact_ties_go_to_the_smallest_index,
    zero_rows_under_cosine,
    f16_input_equals_its_f32_conversion,
    result_does_not_depend_on_thread_count,
    bad_input_is_a_typed_error
);

/// `l2_sq_lower_f32` (the f32 filter of k-means's local bounds) never exceeds the exact squared
/// distance, and stays within its stated relative error of it: awkward lengths, several
/// seeds, magnitudes from 1e-20 to 1e15, and equal vectors.
#[test]
fn f32_distance_lower_bound_is_a_bound() {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use vqx::nearest::{exact_distance, l2_sq_lower_f32};
    for seed in 0..4u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for len in [1usize, 15, 16, 17, 63, 64, 65, 255, 256, 257, 1000] {
            for scale in [1e-20f32, 1e-3, 1.0, 1e4, 1e15] {
                let x: Vec<f32> = (0..len).map(|_| rng.gen_range(-1.0..1.0) * scale).collect();
                let mut c: Vec<f32> = (0..len).map(|_| rng.gen_range(-1.0..1.0) * scale).collect();
                if seed == 3 {
                    c.copy_from_slice(&x);
                }
                let exact = exact_distance(&x, &c, Metric::L2);
                let low = l2_sq_lower_f32(&x, &c);
                assert!(
                    low <= exact,
                    "seed {seed} len {len} scale {scale}: bound {low} above exact {exact}"
                );
                let slack = (len as f64 + 20.0) * 2.0 * f32::EPSILON as f64 * exact + 1e-40;
                assert!(
                    exact - low <= slack,
                    "seed {seed} len {len} scale {scale}: bound {low} too far below exact {exact}"
                );
            }
        }
    }
}
