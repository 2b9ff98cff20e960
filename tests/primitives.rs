//! CPU twins of gather, EMA scatter-add and usage counting vs the naive f64 reference, on
//! awkward sizes and several seeds, and their typed errors on bad input.

mod common;
use common::*;
use vqx::backend::{Backend, CpuBackend};
use vqx::ema::SumMode;
use vqx::{Error, MatRef, reference};

/// `n` indices in 0..k from `seed`.
fn indices(n: usize, k: usize, seed: u64) -> Vec<u32> {
    random_indices(n, k, &mut rng(seed))
}

/// (N, D, K): one row, one code, sizes around the CPU's blocks, many codes.
#[rustfmt::skip]
const SIZES: [(usize, usize, usize); 6] = [
    (1, 1, 1), (1, 7, 3), (127, 5, 129), (1025, 33, 255), (4099, 64, 1), (20_000, 16, 4096),
];

/// Every (size index, N, D, K, seed) the tests run.
fn cases() -> impl Iterator<Item = (u64, usize, usize, usize, u64)> {
    SIZES
        .iter()
        .enumerate()
        .flat_map(|(s, &(n, d, k))| (0..3u64).map(move |seed| (s as u64, n, d, k, seed)))
}

#[test]
fn gather_matches_reference() {
    let b = CpuBackend::new();
    for (s, n, d, k, seed) in cases() {
        let c = uniform(k, d, seed + 10 * s);
        let idx = indices(n, k, seed + 99);
        let got = b.gather(MatRef::new(&c, k, d).unwrap(), &idx).unwrap();
        assert_eq!((got.rows(), got.cols()), (n, d));
        let want: Vec<f64> = reference::gather(MatRef::new(&c, k, d).unwrap(), &idx).concat();
        assert_close(
            got.data(),
            &want,
            0.0,
            0.0,
            &format!("gather N={n} D={d} K={k} seed={seed}"),
        );
    }
}

#[test]
fn code_sums_match_reference() {
    let b = CpuBackend::new();
    for (s, n, d, k, seed) in cases() {
        let idx = indices(n, k, seed + 7);
        let x = uniform(n, d, seed + 20 * s);
        let xm = MatRef::new(&x, n, d).unwrap();
        let (want_sums, want_counts) = reference::code_sums(xm, &idx, k);
        for mode in [SumMode::Fast, SumMode::Deterministic] {
            let got = b.code_sums(xm, &idx, k, mode).unwrap();
            let ctx = format!("code_sums {mode} N={n} D={d} K={k} seed={seed}");
            assert_eq!(got.mode, mode);
            for (i, (&g, &w)) in got.counts.iter().zip(&want_counts).enumerate() {
                assert_eq!(g as u64, w, "{ctx}: count of code {i}: got {g}, want {w}");
            }
            // Summed in f64 and rounded once: within one f32 rounding of the exact sum.
            assert_close(&got.sums, &want_sums.concat(), 6e-8, 1e-30, &ctx);
        }
    }
}

#[test]
fn code_sums_are_deterministic_across_thread_counts() {
    let (n, d, k) = (30_000, 8, 100);
    let x = normal(n, d, 3, 1.0, 0.0);
    let idx = indices(n, k, 4);
    let xm = MatRef::new(&x, n, d).unwrap();
    let a = CpuBackend::new()
        .code_sums(xm, &idx, k, SumMode::Deterministic)
        .unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let b = pool.install(|| {
        CpuBackend::new()
            .code_sums(xm, &idx, k, SumMode::Deterministic)
            .unwrap()
    });
    assert_eq!(a, b);
}

#[test]
fn usage_matches_reference() {
    let b = CpuBackend::new();
    for (_, n, _, k, seed) in cases() {
        let idx = indices(n, k, seed);
        let got = b.usage(&idx, k).unwrap();
        let want = reference::usage(&idx, k);
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g as u64, w,
                "usage N={n} K={k} seed={seed}: code {i}: got {g}, want {w}"
            );
        }
    }
    // A histogram over more rows than one parallel chunk.
    let idx = indices(300_000, 3, 5);
    let got = b.usage(&idx, 3).unwrap();
    assert_eq!(got.iter().map(|&c| c as usize).sum::<usize>(), 300_000);
    assert_eq!(
        got.iter().map(|&c| c as u64).collect::<Vec<_>>(),
        reference::usage(&idx, 3)
    );
}

#[test]
fn bad_input_is_a_typed_error() {
    let b = CpuBackend::new();
    let c = uniform(4, 3, 1);
    let cm = MatRef::new(&c, 4, 3).unwrap();
    let x = uniform(2, 3, 2);
    let xm = MatRef::new(&x, 2, 3).unwrap();

    let err = b.gather(cm, &[0, 4]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::IndexOutOfRange {
                position: 1,
                index: 4,
                codes: 4
            }
        ),
        "{err}"
    );
    assert!(matches!(
        b.gather(MatRef::new(&[], 0, 3).unwrap(), &[0]),
        Err(Error::Empty { .. })
    ));

    assert!(matches!(
        b.code_sums(xm, &[0], 4, SumMode::Fast),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        b.code_sums(xm, &[0, 9], 4, SumMode::Fast),
        Err(Error::IndexOutOfRange { position: 1, .. })
    ));
    let mut bad = x.clone();
    bad[5] = f32::NEG_INFINITY;
    assert!(matches!(
        b.code_sums(
            MatRef::new(&bad, 2, 3).unwrap(),
            &[0, 1],
            4,
            SumMode::Deterministic
        ),
        Err(Error::NonFinite { row: 1, col: 2, .. })
    ));
    assert!(matches!(
        b.code_sums(MatRef::new(&[], 0, 3).unwrap(), &[], 4, SumMode::Fast),
        Err(Error::Empty { .. })
    ));

    assert!(matches!(
        b.usage(&[0, 1, 5], 5),
        Err(Error::IndexOutOfRange { position: 2, .. })
    ));
    assert!(matches!(b.usage(&[], 0), Err(Error::Empty { .. })));
    assert_eq!(b.usage(&[], 3).unwrap(), vec![0, 0, 0]);
}
