//! The CUDA backend against the CPU backend, kernel by kernel, on random inputs of awkward sizes.
//!
//! Sizes straddle the kernels' tiles: nearest_f32 takes 128 rows per block, 128 codes per tile
//! and 8 dimensions per chunk, so N, K ∈ {1, 127, 129, …} and D ∈ {1, 7, 9, …}; the shared-memory
//! histogram holds up to 12,288 codes. Tolerances:
//! - nearest: indices identical to the CPU's (both go through `nearest::finish`, which makes them
//!   exact); distances |gpu − cpu| ≤ 1e-5 + 1e-5·|cpu|;
//! - gather: bit-identical;
//! - sums, fast mode (f32 atomics, any order): |gpu − cpu| ≤ 2·n_k·2^-24·Σ|x| + 1e-6 per element,
//!   the bound of a recursive f32 sum in any order (the CPU sum is exact in f64, rounded once);
//! - sums, deterministic mode: bit-identical to the CPU twin (same order, same f64 accumulation)
//!   and across two runs;
//! - counts: exact.
//!
//! Without a CUDA device every test prints `skipped: <test>: no CUDA device (<reason>)` and
//! passes, unless `VQX_REQUIRE_GPU=1`, which turns the skip into a failure.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::Write;
use vqx::backend::cuda::{self, CudaBackend};
use vqx::backend::{Backend, CpuBackend};
use vqx::ema::SumMode;
use vqx::nearest::{self, Metric, Precision, Prepared};
use vqx::{MatRef, Matrix};

const SEEDS: [u64; 3] = [1, 2, 3];

/// The CUDA backend, or `None` after printing a visible skip line.
fn gpu(test: &str) -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) => {
            let require = std::env::var("VQX_REQUIRE_GPU").is_ok_and(|v| v == "1");
            assert!(
                !require,
                "{test}: VQX_REQUIRE_GPU=1 but the CUDA backend is unavailable: {e}"
            );
            // One write of the whole line, so parallel tests do not interleave mid-line.
            let line = format!("skipped: {test}: no CUDA device ({e})\n");
            std::io::stderr().lock().write_all(line.as_bytes()).ok();
            None
        }
    }
}

fn random(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Matrix {
    let data = (0..rows * cols)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    Matrix::new(data, rows, cols).unwrap()
}

fn random_indices(n: usize, codes: usize, rng: &mut ChaCha8Rng) -> Vec<u32> {
    (0..n).map(|_| rng.gen_range(0..codes as u32)).collect()
}

fn close(a: f32, b: f32, abs: f32, rel: f32) -> bool {
    (a - b).abs() <= abs + rel * b.abs()
}

/// (N, D, K) straddling the nearest kernel's 128-row blocks, 128-code tiles and 8-wide chunks.
const NEAREST_SHAPES: [(usize, usize, usize); 10] = [
    (1, 1, 1),
    (1, 7, 129),
    (127, 8, 127),
    (129, 9, 128),
    (255, 3, 1),
    (300, 33, 257),
    (1000, 64, 1000),
    (513, 129, 300),
    (2, 4096, 5),
    (4099, 16, 65_537),
];

fn check_nearest(test: &str, metric: Metric) {
    let Some(gpu) = gpu(test) else { return };
    let cpu = CpuBackend::new();
    for (n, d, k) in NEAREST_SHAPES {
        for seed in SEEDS {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (n * 31 + d * 7 + k) as u64);
            let x = random(n, d, &mut rng);
            let c = random(k, d, &mut rng);
            let want = cpu.nearest(x.as_ref(), c.as_ref(), metric).unwrap();
            let got = gpu.nearest(x.as_ref(), c.as_ref(), metric).unwrap();
            assert_eq!(got.indices.len(), n);
            for r in 0..n {
                assert_eq!(
                    got.indices[r], want.indices[r],
                    "{test}: N={n} D={d} K={k} seed={seed}: row {r}: cuda index {} vs cpu {} \
                     (distances cuda {} cpu {})",
                    got.indices[r], want.indices[r], got.distances[r], want.distances[r]
                );
                assert!(
                    close(got.distances[r], want.distances[r], 1e-5, 1e-5),
                    "{test}: N={n} D={d} K={k} seed={seed}: row {r}: cuda distance {} vs cpu {}",
                    got.distances[r],
                    want.distances[r]
                );
            }
        }
    }
}

#[test]
fn nearest_l2_matches_cpu() {
    check_nearest("nearest_l2_matches_cpu", Metric::L2);
}

#[test]
fn nearest_cosine_matches_cpu() {
    check_nearest("nearest_cosine_matches_cpu", Metric::Cosine);
}

/// The tensor-core kernels (tf32, bf16) with their recheck against the CPU's exact indices, at
/// sizes straddling their 128-row blocks, 128-code tiles and 16/32-dim chunks (D % 4 ≠ 0 takes
/// the scalar loads), on uniform and shifted (offset 30: large norms, small differences) data.
fn check_nearest_low_precision(test: &str, metric: Metric) {
    let Some(gpu) = gpu(test) else { return };
    let cpu = CpuBackend::new();
    for precision in [Precision::Tf32, Precision::Bf16] {
        let gpu = CudaBackend::new(0).unwrap().with_precision(precision);
        assert_eq!(gpu.precision(), precision);
        for (n, d, k) in NEAREST_SHAPES {
            for (seed, shift) in [(1u64, 0.0f32), (2, 30.0)] {
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (n * 31 + d * 7 + k) as u64);
                let mut x = random(n, d, &mut rng);
                let mut c = random(k, d, &mut rng);
                x.data_mut().iter_mut().for_each(|v| *v += shift);
                c.data_mut().iter_mut().for_each(|v| *v += shift);
                let want = cpu.nearest(x.as_ref(), c.as_ref(), metric).unwrap();
                let got = gpu.nearest(x.as_ref(), c.as_ref(), metric).unwrap();
                let ctx =
                    format!("{test}: {precision} N={n} D={d} K={k} seed={seed} shift={shift}");
                assert_eq!(got.indices, want.indices, "{ctx}: indices");
                for r in 0..n {
                    assert!(
                        close(got.distances[r], want.distances[r], 1e-5, 1e-5),
                        "{ctx}: row {r}: cuda distance {} vs cpu {}",
                        got.distances[r],
                        want.distances[r]
                    );
                }
                // The raw candidates: what nearest::emulate predicts, up to the summation order.
                let prepared = Prepared::new(c.as_ref(), metric);
                let raw = gpu
                    .candidates_with_precision(x.as_ref(), c.as_ref(), &prepared, precision)
                    .unwrap();
                let emu =
                    nearest::emulate::candidates(x.as_ref(), c.as_ref(), &prepared, precision);
                // Same operands, different summation order: within twice the accumulation
                // part of the bound (the model without its operand term).
                let acc_only = nearest::RoundingModel {
                    operand_roundoff: 0.0,
                    ..precision.model()
                };
                for r in 0..n {
                    let x_norm = match metric {
                        Metric::L2 => x.row(r).iter().map(|&v| v as f64 * v as f64).sum::<f64>(),
                        Metric::Cosine => 1.0,
                    }
                    .sqrt();
                    let tol = 2.0 * prepared.score_error(x_norm, acc_only) + 1e-30;
                    let diff = (raw.best_score[r] as f64 - emu.best_score[r] as f64).abs();
                    assert!(
                        diff <= tol,
                        "{ctx}: row {r}: kernel best score {} vs emulated {} (tolerance {tol:e})",
                        raw.best_score[r],
                        emu.best_score[r]
                    );
                }
            }
        }
    }
    drop(gpu);
}

#[test]
fn nearest_tf32_bf16_match_cpu_l2() {
    check_nearest_low_precision("nearest_tf32_bf16_match_cpu_l2", Metric::L2);
}

#[test]
fn nearest_tf32_bf16_match_cpu_cosine() {
    check_nearest_low_precision("nearest_tf32_bf16_match_cpu_cosine", Metric::Cosine);
}

/// The raw kernel output (before the f64 recheck) against the CPU twin's: where the CPU's margin
/// is wide the winner must agree, and exact duplicate codes must go to the smallest index, also
/// across threads of a block (codes 5 and 5 + 64 + 128·t land on different threads and tiles).
#[test]
fn nearest_candidates_ties_go_to_smallest_index() {
    let test = "nearest_candidates_ties_go_to_smallest_index";
    let Some(gpu) = gpu(test) else { return };
    for seed in SEEDS {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (n, d, k) = (300, 24, 700);
        let mut c = random(k, d, &mut rng).into_vec();
        // Code 5 is copied to codes 69, 133, 517 and 699; every row is one of those codes.
        for dup in [69usize, 133, 517, 699] {
            let src: Vec<f32> = c[5 * d..6 * d].to_vec();
            c[dup * d..(dup + 1) * d].copy_from_slice(&src);
        }
        let c = Matrix::new(c, k, d).unwrap();
        let x = Matrix::new(c.row(5).repeat(n), n, d).unwrap();
        let prepared = Prepared::new(c.as_ref(), Metric::L2);
        let cand = gpu.candidates(x.as_ref(), c.as_ref(), &prepared).unwrap();
        for r in 0..n {
            assert_eq!(
                cand.best[r], 5,
                "{test}: seed {seed}: row {r}: cuda best {} (score {}), want 5",
                cand.best[r], cand.best_score[r]
            );
            assert_eq!(
                cand.best_score[r], cand.second_score[r],
                "{test}: seed {seed}: row {r}: duplicates must make the runner-up equal the best"
            );
        }

        // Random rows: the winner agrees with the CPU twin wherever the CPU's margin is wide.
        let x = random(n, d, &mut rng);
        let cpu = nearest::cpu::candidates(x.as_ref(), c.as_ref(), &prepared);
        let cand = gpu.candidates(x.as_ref(), c.as_ref(), &prepared).unwrap();
        for r in 0..n {
            assert!(
                close(cand.best_score[r], cpu.best_score[r], 1e-4, 1e-5),
                "{test}: row {r}: best score cuda {} vs cpu {}",
                cand.best_score[r],
                cpu.best_score[r]
            );
            assert!(
                close(cand.second_score[r], cpu.second_score[r], 1e-4, 1e-5),
                "{test}: row {r}: runner-up score cuda {} vs cpu {}",
                cand.second_score[r],
                cpu.second_score[r]
            );
            if cpu.second_score[r] - cpu.best_score[r] > 1e-3 {
                assert_eq!(
                    cand.best[r], cpu.best[r],
                    "{test}: row {r}: cuda best {} vs cpu {}",
                    cand.best[r], cpu.best[r]
                );
            }
        }
    }
}

#[test]
fn nearest_rejects_non_finite_like_cpu() {
    let test = "nearest_rejects_non_finite_like_cpu";
    let Some(gpu) = gpu(test) else { return };
    let c = [0.0f32, 1.0, 2.0, 3.0];
    let x = [0.0f32, f32::NAN];
    let err = gpu
        .nearest(
            MatRef::new(&x, 1, 2).unwrap(),
            MatRef::new(&c, 2, 2).unwrap(),
            Metric::L2,
        )
        .unwrap_err();
    assert!(
        matches!(err, vqx::Error::NonFinite { row: 0, col: 1, .. }),
        "{test}: got {err}"
    );
}

#[test]
fn gather_matches_cpu() {
    let test = "gather_matches_cpu";
    let Some(gpu) = gpu(test) else { return };
    let cpu = CpuBackend::new();
    // D % 4 == 0 takes gather_f32x4, the others gather_f32.
    for (n, d, k) in [
        (0, 3, 2),
        (1, 1, 1),
        (255, 3, 17),
        (257, 4, 300),
        (1000, 129, 64),
        (10_000, 256, 4096),
    ] {
        for seed in SEEDS {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (n + d + k) as u64);
            let c = random(k, d, &mut rng);
            let idx = random_indices(n, k, &mut rng);
            let want = cpu.gather(c.as_ref(), &idx).unwrap();
            let got = gpu.gather(c.as_ref(), &idx).unwrap();
            assert_eq!((got.rows(), got.cols()), (n, d));
            for (e, (a, b)) in got.data().iter().zip(want.data()).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits(),
                    "{test}: N={n} D={d} K={k} seed={seed}: element {e} (row {}, col {}): \
                     cuda {a} vs cpu {b}",
                    e / d,
                    e % d
                );
            }
        }
    }
    let err = gpu.gather(
        random(2, 2, &mut ChaCha8Rng::seed_from_u64(0)).as_ref(),
        &[0, 2],
    );
    assert!(
        matches!(err, Err(vqx::Error::IndexOutOfRange { position: 1, .. })),
        "{test}: out-of-range index: {err:?}"
    );
}

/// (N, D, K) for the sum kernels: tiny, single code, D not a multiple of 32, many codes.
const SUM_SHAPES: [(usize, usize, usize); 6] = [
    (1, 1, 1),
    (5, 3, 1),
    (129, 7, 10),
    (1000, 33, 127),
    (4097, 257, 64),
    (20_000, 16, 5000),
];

#[test]
fn code_sums_fast_matches_cpu() {
    let test = "code_sums_fast_matches_cpu";
    let Some(gpu) = gpu(test) else { return };
    let cpu = CpuBackend::new();
    for (n, d, k) in SUM_SHAPES {
        for seed in SEEDS {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (n * 3 + d + k) as u64);
            let x = random(n, d, &mut rng);
            let idx = random_indices(n, k, &mut rng);
            let want = cpu.code_sums(x.as_ref(), &idx, k, SumMode::Fast).unwrap();
            let got = gpu.code_sums(x.as_ref(), &idx, k, SumMode::Fast).unwrap();
            assert_eq!(got.mode, SumMode::Fast);
            for code in 0..k {
                assert_eq!(
                    got.counts[code], want.counts[code],
                    "{test}: N={n} D={d} K={k} seed={seed}: count of code {code}: cuda {} vs cpu {}",
                    got.counts[code], want.counts[code]
                );
            }
            // Σ|x| per (code, column): the scale of the f32 summation error bound.
            let mut abs_sum = vec![0f64; k * d];
            for (r, &code) in idx.iter().enumerate() {
                for (j, &v) in x.row(r).iter().enumerate() {
                    abs_sum[code as usize * d + j] += v.abs() as f64;
                }
            }
            for (e, &abs) in abs_sum.iter().enumerate() {
                let count = want.counts[e / d] as f64;
                let tol = 2.0 * count * f64::from(f32::EPSILON) * 0.5 * abs + 1e-6;
                let (a, b) = (got.sums[e] as f64, want.sums[e] as f64);
                assert!(
                    (a - b).abs() <= tol,
                    "{test}: N={n} D={d} K={k} seed={seed}: sum of code {} column {}: \
                     cuda {a} vs cpu {b} (tolerance {tol:e})",
                    e / d,
                    e % d
                );
            }
        }
    }
}

#[test]
fn code_sums_deterministic_is_bit_identical() {
    let test = "code_sums_deterministic_is_bit_identical";
    let Some(gpu) = gpu(test) else { return };
    let cpu = CpuBackend::new();
    for (n, d, k) in SUM_SHAPES {
        for seed in SEEDS {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (n * 5 + d + k) as u64);
            let x = random(n, d, &mut rng);
            let idx = random_indices(n, k, &mut rng);
            let want = cpu
                .code_sums(x.as_ref(), &idx, k, SumMode::Deterministic)
                .unwrap();
            let a = gpu
                .code_sums(x.as_ref(), &idx, k, SumMode::Deterministic)
                .unwrap();
            let b = gpu
                .code_sums(x.as_ref(), &idx, k, SumMode::Deterministic)
                .unwrap();
            assert_eq!(a.mode, SumMode::Deterministic);
            assert_eq!(a.counts, want.counts, "{test}: N={n} D={d} K={k}: counts");
            for e in 0..k * d {
                assert!(
                    a.sums[e].to_bits() == b.sums[e].to_bits(),
                    "{test}: N={n} D={d} K={k} seed={seed}: code {} column {}: run 1 {} vs run 2 {}",
                    e / d,
                    e % d,
                    a.sums[e],
                    b.sums[e]
                );
                assert!(
                    a.sums[e].to_bits() == want.sums[e].to_bits(),
                    "{test}: N={n} D={d} K={k} seed={seed}: code {} column {}: cuda {} vs cpu {}",
                    e / d,
                    e % d,
                    a.sums[e],
                    want.sums[e]
                );
            }
        }
    }
}

#[test]
fn usage_matches_cpu() {
    let test = "usage_matches_cpu";
    let Some(gpu) = gpu(test) else { return };
    let cpu = CpuBackend::new();
    let limit = cuda::USAGE_SHARED_CODES;
    // K ≤ limit: shared-memory histogram; K > limit: global atomics.
    for (n, k) in [
        (0, 3),
        (1, 1),
        (1000, 1),
        (255, 7),
        (100_000, 4096),
        (50_000, limit),
        (50_000, limit + 1),
        (300_000, 70_000),
    ] {
        for seed in SEEDS {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (n + k) as u64);
            let idx = random_indices(n, k, &mut rng);
            let want = cpu.usage(&idx, k).unwrap();
            let got = gpu.usage(&idx, k).unwrap();
            assert_eq!(got.len(), k);
            for code in 0..k {
                assert_eq!(
                    got[code], want[code],
                    "{test}: N={n} K={k} seed={seed}: count of code {code}: cuda {} vs cpu {}",
                    got[code], want[code]
                );
            }
        }
    }
}

#[test]
fn time_primitives_uses_events() {
    let test = "time_primitives_uses_events";
    let Some(gpu) = gpu(test) else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let x = random(4096, 64, &mut rng);
    let c = random(512, 64, &mut rng);
    for metric in [Metric::L2, Metric::Cosine] {
        let t = gpu
            .time_primitives(x.as_ref(), c.as_ref(), metric, 3)
            .unwrap();
        assert_eq!(t.timed_with, "CUDA events around the kernels");
        for (name, v) in [
            ("nearest", t.nearest),
            ("gather", t.gather),
            ("code_sums", t.code_sums),
            ("code_sums_deterministic", t.code_sums_deterministic),
            ("usage", t.usage),
        ] {
            assert!(
                v.is_finite() && v > 0.0,
                "{test}: {metric}: {name} took {v} s"
            );
        }
    }
    assert!(gpu.describe().contains("compute capability"));
}

/// Runs everywhere: status() never panics and explains itself.
#[test]
fn status_explains_itself() {
    let s = cuda::status();
    assert_eq!(s.kernels_compiled, cuda::KERNELS_COMPILED);
    assert!(!s.reason.is_empty());
    if !cuda::KERNELS_COMPILED {
        assert!(!s.available);
        assert!(
            s.reason
                .contains("kernels not compiled: nvcc not found (set NVCC or CUDA_HOME)")
                || s.reason.contains("kernels not compiled"),
            "reason: {}",
            s.reason
        );
    }
    match CudaBackend::new(0) {
        Ok(_) => assert!(s.available, "backend opened but status says: {}", s.reason),
        Err(e) => {
            assert!(!s.available);
            assert!(matches!(e, vqx::Error::CudaUnavailable(_)), "{e}");
        }
    }
}

/// The quantizer layer on CUDA gives the CPU's indices, statistics and EMA state, step by
/// step (deterministic sums on both; f32 state within a few ulps).
#[test]
fn quantizer_layer_matches_cpu() {
    use vqx::backend::Device;
    use vqx::quantizer::{CodebookLearning, QuantizerConfig, VectorQuantizer};
    if gpu("quantizer_layer_matches_cpu").is_none() {
        return;
    }
    let (k, d, n) = (300, 24, 2000);
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    let x = random(n, d, &mut rng);
    let config = |device| {
        QuantizerConfig::new(k, d)
            .learning(CodebookLearning::Ema {
                decay: 0.9,
                eps: 1e-5,
            })
            .dead_code_threshold(0.05)
            .deterministic(true)
            .seed(5)
            .device(device)
    };
    let mut on_gpu = VectorQuantizer::new(config(Device::Cuda)).unwrap();
    let mut on_cpu = VectorQuantizer::new(config(Device::Cpu)).unwrap();
    for step in 0..5 {
        let b = (step % 4) * 500;
        let batch = x.as_ref().slice_rows(b, b + 500);
        let g = on_gpu.forward(batch, None, true).unwrap();
        let c = on_cpu.forward(batch, None, true).unwrap();
        assert_eq!(g.indices, c.indices, "step {step}: indices");
        // All but `rechecked`, which depends on each backend's f32 rounding.
        let (mut gs, cs) = (g.stats.clone(), c.stats.clone());
        gs.rechecked = cs.rechecked;
        assert_eq!(gs, cs, "step {step}: statistics");
        let (eg, ec) = (on_gpu.ema().unwrap(), on_cpu.ema().unwrap());
        assert_eq!(
            eg.cluster_size(),
            ec.cluster_size(),
            "step {step}: EMA counts"
        );
        // Deterministic sums accumulate in f64 on both: the same f32 after rounding.
        assert_eq!(
            eg.embed_avg().data(),
            ec.embed_avg().data(),
            "step {step}: EMA sums"
        );
    }
}
