//! The CUDA backend against the CPU backend, kernel by kernel, on random inputs of awkward sizes,
//! written once and run on two devices: every test `t` becomes `t::emu`, on the emulated device
//! (kernels/*.cu compiled for the CPU, always run), and `t::gpu`, on a real GPU (skipped with a
//! visible `skipped: <test>: no CUDA device (<reason>)` line where there is none, a failure
//! under `VQX_REQUIRE_GPU=1`). Both run the same launch code (src/backend/cuda/launch.rs).
//!
//! Sizes straddle the kernels' tiles: nearest_f32 takes 128 rows per block, 128 codes per tile
//! and 8 dimensions per chunk, the tensor-core kernels 128 rows, 128 codes and 16 (tf32) or 32
//! (bf16) dimensions per chunk, so N, K ∈ {1, 127, 129, …} and D ∈ {1, 7, 9, 13, 17, …}; the
//! shared-memory histogram holds up to 12,288 codes. The emulated device is ~1 GFLOP/s, so its
//! largest shapes are smaller than the GPU's. Tolerances:
//! - nearest: indices identical to the CPU's (both go through `nearest::finish`, which makes them
//!   exact); distances |gpu − cpu| ≤ 1e-5 + 1e-5·|cpu| (tf32/bf16: within 1e-6 relative of the
//!   f64 distance, which `finish` recomputes for their winners); the raw candidates of nearest_f32 are
//!   bit-identical to its scalar model (fmaf in increasing d, on both devices: IEEE fma); the
//!   tensor-core kernels' raw candidates are bit-identical to `nearest::emulate` on the emulated
//!   device (its mma twin sums in the same order) and within the accumulation bound on a GPU;
//! - gather: bit-identical;
//! - sums, fast mode (f32 atomics, any order): |gpu − cpu| ≤ 2·n_k·2^-24·Σ|x| + 1e-6 per element,
//!   the bound of a recursive f32 sum in any order (the CPU sum is exact in f64, rounded once);
//! - sums, deterministic mode: bit-identical to the CPU twin (same order, same f64 accumulation)
//!   and across two runs;
//! - counts: exact.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
#[macro_use]
mod common;

use common::cli::{ok, stderr, vqx};
use common::devices::{Dev, EMU, real_gpu};
use common::{random_indices, random_matrix, shifted};
use vqx::backend::cuda::{self, Gpu};
use vqx::backend::{Backend, CpuBackend, Device};
use vqx::ema::SumMode;
use vqx::nearest::{self, Candidates, Metric, Precision, Prepared};
use vqx::{MatRef, Matrix};

const SEEDS: [u64; 3] = [1, 2, 3];

fn close(a: f32, b: f32, abs: f32, rel: f32) -> bool {
    (a - b).abs() <= abs + rel * b.abs()
}

/// N × D rows and one code in 0..K for each, from `seed`.
fn rows_and_codes(n: usize, d: usize, k: usize, seed: u64) -> (Matrix, Vec<u32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = random_matrix(n, d, &mut rng);
    (x, random_indices(n, k, &mut rng))
}

/// nearest_f32's arithmetic on the CPU: per (row, code) `fmaf` in increasing d from 0, the score
/// `fmaf(-2, dot, ||c||²)`, codes in increasing order with a strict `<` (ties → smallest index),
/// the runner-up the second smallest score counting duplicates.
fn simt_model(x: MatRef<'_>, codebook: MatRef<'_>, prepared: &Prepared) -> Candidates {
    let normalized;
    let x = match prepared.metric() {
        Metric::L2 => x,
        Metric::Cosine => {
            normalized = nearest::normalize_rows(x);
            normalized.as_ref()
        }
    };
    let scored = prepared.scored(codebook);
    let mut out = Candidates {
        best: vec![0; x.rows()],
        best_score: vec![0.0; x.rows()],
        second_score: vec![0.0; x.rows()],
        row_norm_sq: None,
        shortlist: None,
    };
    for r in 0..x.rows() {
        let scores: Vec<f32> = (0..scored.rows())
            .map(|k| {
                let dot = x
                    .row(r)
                    .iter()
                    .zip(scored.row(k))
                    .fold(0f32, |acc, (a, b)| a.mul_add(*b, acc));
                (-2f32).mul_add(dot, prepared.norms()[k])
            })
            .collect();
        // The first smallest score wins; the runner-up is the smallest of the others.
        let best = (0..scores.len()).fold(0, |b, k| if scores[k] < scores[b] { k } else { b });
        let second = scores
            .iter()
            .enumerate()
            .filter(|&(k, _)| k != best)
            .fold(f32::INFINITY, |m, (_, &s)| if s < m { s } else { m });
        (out.best[r], out.best_score[r], out.second_score[r]) = (best as u32, scores[best], second);
    }
    out
}

/// Raw candidates equal bit for bit, the failure naming the row and both values.
fn assert_same_candidates(ctx: &str, got: &Candidates, want: &Candidates) {
    for r in 0..want.best.len() {
        assert!(
            got.best[r] == want.best[r]
                && got.best_score[r].to_bits() == want.best_score[r].to_bits()
                && got.second_score[r].to_bits() == want.second_score[r].to_bits(),
            "{ctx}: row {r}: kernel (index {}, best {}, runner-up {}) vs model (index {}, best {}, \
             runner-up {})",
            got.best[r],
            got.best_score[r],
            got.second_score[r],
            want.best[r],
            want.best_score[r],
            want.second_score[r]
        );
    }
}

/// (N, D, K) straddling the nearest kernels' 128-row blocks, 128-code tiles and 8/16/32-wide
/// chunks; D = 1, 9, 13, 17 and D % 4 ≠ 0 take the scalar loads of the tensor-core kernels.
#[rustfmt::skip]
const NEAREST_SMALL: [(usize, usize, usize); 12] = [
    (1, 1, 1), (1000, 64, 1000), (513, 129, 300), (1, 7, 129), (127, 8, 127), (129, 9, 128),
    (255, 13, 1), (130, 17, 257), (300, 33, 129), (129, 64, 255), (2, 4096, 5), (257, 1, 300),
];
const NEAREST_LARGE: [(usize, usize, usize); 2] = [(4099, 16, 65_537), (8192, 256, 4096)];

fn check_nearest<G: Gpu>(test: &str, dev: &Dev<G>, metric: Metric) {
    let gpu = dev.backend(Precision::Exact);
    let cpu = CpuBackend::new();
    for (n, d, k) in dev.shapes(&NEAREST_SMALL, &NEAREST_LARGE) {
        for seed in SEEDS {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (n * 31 + d * 7 + k) as u64);
            let x = random_matrix(n, d, &mut rng);
            let c = random_matrix(k, d, &mut rng);
            let ctx = format!("{test}: N={n} D={d} K={k} seed={seed}");
            let want = cpu.nearest(x.as_ref(), c.as_ref(), metric).unwrap();
            let got = gpu.nearest(x.as_ref(), c.as_ref(), metric).unwrap();
            assert_eq!(got.indices.len(), n);
            for r in 0..n {
                assert_eq!(
                    got.indices[r], want.indices[r],
                    "{ctx}: row {r}: cuda index {} vs cpu {} (distances cuda {} cpu {})",
                    got.indices[r], want.indices[r], got.distances[r], want.distances[r]
                );
                assert!(
                    close(got.distances[r], want.distances[r], 1e-5, 1e-5),
                    "{ctx}: row {r}: cuda distance {} vs cpu {}",
                    got.distances[r],
                    want.distances[r]
                );
            }
            if n * k * d <= 20_000_000 {
                let prepared = Prepared::new(c.as_ref(), metric);
                let raw = gpu.candidates(x.as_ref(), c.as_ref(), &prepared).unwrap();
                let model = simt_model(x.as_ref(), c.as_ref(), &prepared);
                assert_same_candidates(&format!("{ctx}: nearest_f32 raw"), &raw, &model);
            }
        }
    }
}

/// The tensor-core kernels (tf32, bf16) with their recheck against the CPU's exact indices, on
/// uniform and shifted (offset 30: large norms, small differences) data; their raw candidates
/// against `nearest::emulate`.
fn check_nearest_low_precision<G: Gpu>(test: &str, dev: &Dev<G>, metric: Metric) {
    let cpu = CpuBackend::new();
    for precision in [Precision::Tf32, Precision::Bf16] {
        let gpu = dev.backend(precision);
        assert_eq!(gpu.precision(), precision);
        for (n, d, k) in dev.shapes(&NEAREST_SMALL, &NEAREST_LARGE) {
            for (seed, shift) in [(1u64, 0.0f32), (2, 30.0)] {
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (n * 31 + d * 7 + k) as u64);
                let x = shifted(random_matrix(n, d, &mut rng), shift);
                let c = shifted(random_matrix(k, d, &mut rng), shift);
                let ctx =
                    format!("{test}: {precision} N={n} D={d} K={k} seed={seed} shift={shift}");
                let want = cpu.nearest(x.as_ref(), c.as_ref(), metric).unwrap();
                let got = gpu.nearest(x.as_ref(), c.as_ref(), metric).unwrap();
                assert_eq!(got.indices, want.indices, "{ctx}: indices");
                // Low-precision winners get their distance recomputed exactly (the CPU's f32
                // expanded form is less accurate on shifted data: compare with f64).
                for r in 0..n {
                    let exact =
                        nearest::exact_distance(x.row(r), c.row(got.indices[r] as usize), metric)
                            as f32;
                    assert!(
                        close(got.distances[r], exact, 1e-7, 1e-6),
                        "{ctx}: row {r}: cuda distance {} vs exact {exact}",
                        got.distances[r],
                    );
                }
                let prepared = Prepared::new(c.as_ref(), metric);
                let raw = gpu
                    .candidates_with_precision(x.as_ref(), c.as_ref(), &prepared, precision)
                    .unwrap();
                let emu =
                    nearest::emulate::candidates(x.as_ref(), c.as_ref(), &prepared, precision);
                if dev.emulated {
                    // The mma twin sums in increasing k in f32, as nearest::emulate does.
                    assert_same_candidates(&format!("{ctx}: raw vs emulate"), &raw, &emu);
                    continue;
                }
                // The tensor cores sum in another order: within twice the accumulation part of
                // the bound (the model without its operand term).
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
}

/// (N, D, K) for the sum kernels: tiny, single code, D not a multiple of 32, many codes.
#[rustfmt::skip]
const SUMS_SMALL: [(usize, usize, usize); 5] = [
    (1, 1, 1), (5, 3, 1), (129, 7, 10), (1000, 33, 127), (3000, 17, 2000),
];
const SUMS_LARGE: [(usize, usize, usize); 2] = [(4097, 257, 64), (20_000, 16, 5000)];

on_devices! {
    fn nearest_l2_matches_cpu<G>(test, dev) {
        check_nearest(test, dev, Metric::L2);
    }

    fn nearest_cosine_matches_cpu<G>(test, dev) {
        check_nearest(test, dev, Metric::Cosine);
    }

    fn nearest_tf32_bf16_match_cpu_l2<G>(test, dev) {
        check_nearest_low_precision(test, dev, Metric::L2);
    }

    fn nearest_tf32_bf16_match_cpu_cosine<G>(test, dev) {
        check_nearest_low_precision(test, dev, Metric::Cosine);
    }

    /// Exact duplicate codes go to the smallest index at every precision, within one thread's
    /// codes (nearest_f32: codes 4t..4t+3 and 64+4t..; tensor cores: 2t, 2t+1 of each 8) and
    /// across threads and tiles; the runner-up of a duplicate equals the best.
    fn nearest_ties_go_to_smallest_index<G>(test, dev) {
        for precision in [Precision::Exact, Precision::Tf32, Precision::Bf16] {
            let gpu = dev.backend(precision);
            for seed in SEEDS {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let (n, d, k) = (300, 24, 700);
                let mut c = random_matrix(k, d, &mut rng).into_vec();
                // Code 4 is copied to codes in the same thread (5, 6, 7, 68, 69; 12, 13 in the
                // same tensor-core lane), other threads (133, 517) and the last tile (699).
                let src: Vec<f32> = c[4 * d..5 * d].to_vec();
                for dup in [5usize, 6, 7, 12, 13, 68, 69, 133, 517, 699] {
                    c[dup * d..(dup + 1) * d].copy_from_slice(&src);
                }
                let c = Matrix::new(c, k, d).unwrap();
                let x = Matrix::new(c.row(7).repeat(n), n, d).unwrap();
                let prepared = Prepared::new(c.as_ref(), Metric::L2);
                let cand = gpu
                    .candidates_with_precision(x.as_ref(), c.as_ref(), &prepared, precision)
                    .unwrap();
                for r in 0..n {
                    assert_eq!(
                        cand.best[r], 4,
                        "{test}: {precision} seed {seed}: row {r}: kernel best {} (score {}), want 4",
                        cand.best[r], cand.best_score[r]
                    );
                    assert_eq!(
                        cand.best_score[r].to_bits(),
                        cand.second_score[r].to_bits(),
                        "{test}: {precision} seed {seed}: row {r}: duplicates must make the \
                         runner-up ({}) equal the best ({})",
                        cand.second_score[r],
                        cand.best_score[r]
                    );
                }
                let got = gpu.nearest(x.as_ref(), c.as_ref(), Metric::L2).unwrap();
                assert!(got.indices.iter().all(|&i| i == 4), "{test}: {precision}: after recheck");
            }
        }
    }

    fn nearest_rejects_non_finite_like_cpu<G>(test, dev) {
        let gpu = dev.backend(Precision::Exact);
        let c = [0.0f32, 1.0, 2.0, 3.0];
        let x = [0.0f32, f32::NAN];
        let err = gpu
            .nearest(MatRef::new(&x, 1, 2).unwrap(), MatRef::new(&c, 2, 2).unwrap(), Metric::L2)
            .unwrap_err();
        assert!(matches!(err, vqx::Error::NonFinite { row: 0, col: 1, .. }), "{test}: got {err}");
    }

    /// Both gather kernels (D % 4 == 0 takes gather_f32x4), bit for bit.
    fn gather_matches_cpu<G>(test, dev) {
        let gpu = dev.backend(Precision::Exact);
        let cpu = CpuBackend::new();
        let small = [(0, 3, 2), (1, 1, 1), (255, 3, 17), (257, 4, 300), (1000, 129, 64), (3000, 16, 100)];
        for (n, d, k) in dev.shapes(&small, &[(10_000, 256, 4096)]) {
            for seed in SEEDS {
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (n + d + k) as u64);
                let c = random_matrix(k, d, &mut rng);
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
        let err = gpu.gather(random_matrix(2, 2, &mut ChaCha8Rng::seed_from_u64(0)).as_ref(), &[0, 2]);
        assert!(
            matches!(err, Err(vqx::Error::IndexOutOfRange { position: 1, .. })),
            "{test}: out-of-range index: {err:?}"
        );
    }

    fn code_sums_fast_matches_cpu<G>(test, dev) {
        let gpu = dev.backend(Precision::Exact);
        let cpu = CpuBackend::new();
        for (n, d, k) in dev.shapes(&SUMS_SMALL, &SUMS_LARGE) {
            for seed in SEEDS {
                let (x, idx) = rows_and_codes(n, d, k, seed ^ (n * 3 + d + k) as u64);
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

    fn code_sums_deterministic_is_bit_identical<G>(test, dev) {
        let gpu = dev.backend(Precision::Exact);
        let cpu = CpuBackend::new();
        // D = 300 > 256 threads: columns beyond the block are looped.
        for (n, d, k) in dev.shapes(&SUMS_SMALL, &SUMS_LARGE).into_iter().chain([(50, 300, 3)]) {
            for seed in SEEDS {
                let (x, idx) = rows_and_codes(n, d, k, seed ^ (n * 5 + d + k) as u64);
                let want = cpu.code_sums(x.as_ref(), &idx, k, SumMode::Deterministic).unwrap();
                let a = gpu.code_sums(x.as_ref(), &idx, k, SumMode::Deterministic).unwrap();
                let b = gpu.code_sums(x.as_ref(), &idx, k, SumMode::Deterministic).unwrap();
                assert_eq!(a.mode, SumMode::Deterministic);
                assert_eq!(a.counts, want.counts, "{test}: N={n} D={d} K={k}: counts");
                for e in 0..k * d {
                    assert!(
                        a.sums[e].to_bits() == b.sums[e].to_bits(),
                        "{test}: N={n} D={d} K={k} seed={seed}: code {} column {}: run 1 {} vs run 2 {}",
                        e / d, e % d, a.sums[e], b.sums[e]
                    );
                    assert!(
                        a.sums[e].to_bits() == want.sums[e].to_bits(),
                        "{test}: N={n} D={d} K={k} seed={seed}: code {} column {}: cuda {} vs cpu {}",
                        e / d, e % d, a.sums[e], want.sums[e]
                    );
                }
            }
        }
    }

    /// Both histogram paths: K ≤ 12,288 in shared memory, larger K with global atomics.
    fn usage_matches_cpu<G>(test, dev) {
        let gpu = dev.backend(Precision::Exact);
        let cpu = CpuBackend::new();
        let limit = cuda::USAGE_SHARED_CODES;
        let small = [(0, 3), (1, 1), (1000, 1), (255, 7), (20_000, 4096), (5_000, limit), (5_000, limit + 1)];
        let large = [(100_000, 4096), (300_000, 70_000)];
        for (n, k) in dev.shapes(&small, &large) {
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

    /// `vqx bench`'s kernel timing runs every kernel on the device with its own indices.
    fn time_primitives_times_every_kernel<G>(test, dev) {
        let gpu = dev.backend(Precision::Exact);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (n, k) = if dev.emulated { (300, 100) } else { (4096, 512) };
        let x = random_matrix(n, 64, &mut rng);
        let c = random_matrix(k, 64, &mut rng);
        for metric in [Metric::L2, Metric::Cosine] {
            let t = gpu.time_primitives(x.as_ref(), c.as_ref(), metric, 2).unwrap();
            let expect = if dev.emulated { "wall clock" } else { "CUDA events" };
            assert!(t.timed_with.contains(expect), "{test}: timed with {}", t.timed_with);
            for (name, v) in [
                ("nearest", t.nearest),
                ("gather", t.gather),
                ("code_sums", t.code_sums),
                ("code_sums_deterministic", t.code_sums_deterministic),
                ("usage", t.usage),
            ] {
                assert!(v.is_finite() && v > 0.0, "{test}: {metric}: {name} took {v} s");
            }
        }
        let want = if dev.emulated { "emulated device" } else { "compute capability" };
        assert!(gpu.describe().contains(want), "{test}: {}", gpu.describe());
    }

    /// The quantizer layer on the device gives the CPU's indices, statistics and EMA state, step
    /// by step (deterministic sums on both; f32 state bit for bit).
    fn quantizer_layer_matches_cpu<G>(test, dev) {
        use vqx::quantizer::{CodebookLearning, QuantizerConfig, VectorQuantizer};
        let (k, d, n) = if dev.emulated { (150, 13, 800) } else { (300, 24, 2000) };
        let batch_rows = n / 4;
        let mut rng = ChaCha8Rng::seed_from_u64(77);
        let x = random_matrix(n, d, &mut rng);
        let config = |device| {
            QuantizerConfig::new(k, d)
                .learning(CodebookLearning::ema(0.9))
                .dead_code_threshold(0.05)
                .deterministic(true)
                .seed(5)
                .device(device)
        };
        let mut on_gpu = VectorQuantizer::new(config(dev.device)).unwrap();
        let mut on_cpu = VectorQuantizer::new(config(Device::Cpu)).unwrap();
        for step in 0..5 {
            let b = (step % 4) * batch_rows;
            let batch = x.as_ref().slice_rows(b, b + batch_rows);
            let g = on_gpu.forward(batch, None, true).unwrap();
            let c = on_cpu.forward(batch, None, true).unwrap();
            assert_eq!(g.indices, c.indices, "{test}: step {step}: indices");
            // All but `rechecked`, which depends on each backend's f32 rounding.
            let (mut gs, cs) = (g.stats.clone(), c.stats.clone());
            gs.rechecked = cs.rechecked;
            assert_eq!(gs, cs, "{test}: step {step}: statistics");
            let (eg, ec) = (on_gpu.ema().unwrap(), on_cpu.ema().unwrap());
            assert_eq!(eg.cluster_size(), ec.cluster_size(), "{test}: step {step}: EMA counts");
            // Deterministic sums accumulate in f64 on both: the same f32 after rounding.
            assert_eq!(eg.embed_avg().data(), ec.embed_avg().data(), "{test}: step {step}: EMA sums");
            assert_eq!(
                on_gpu.codebook().data(),
                on_cpu.codebook().data(),
                "{test}: step {step}: codebook"
            );
        }
    }
}

on_devices! {
    /// The device layer counts every byte each host-level call moves: the host API uploads
    /// its operands and downloads its results on every call; the device-level calls move
    /// nothing (tests/device.rs).
    fn transfers_are_counted<G>(test, dev) {
        let gpu = dev.backend(Precision::Exact);
        let (n, d, k) = (300usize, 13usize, 70usize);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (x, c) = (random_matrix(n, d, &mut rng), random_matrix(k, d, &mut rng));
        let moved = |f: &dyn Fn()| {
            let before = gpu.transfers();
            f();
            gpu.transfers().since(before)
        };
        let t = moved(&|| drop(gpu.nearest(x.as_ref(), c.as_ref(), Metric::L2).unwrap()));
        // x and the codebook in (norms and the recheck stay on the device); index and distance
        // per row and the recheck count out.
        assert_eq!(t.h2d_bytes, (4 * (n * d + k * d)) as u64, "{test}: nearest in");
        assert_eq!(t.d2h_bytes, (8 * n + 4) as u64, "{test}: nearest out");
        let idx = random_indices(n, k, &mut rng);
        let t = moved(&|| drop(gpu.usage(&idx, k).unwrap()));
        assert_eq!((t.h2d_bytes, t.d2h_bytes), ((4 * n) as u64, (4 * k) as u64), "{test}: usage");
        let t = moved(&|| drop(gpu.gather(c.as_ref(), &idx).unwrap()));
        assert_eq!(
            (t.h2d_bytes, t.d2h_bytes),
            ((4 * (k * d + n)) as u64, (4 * n * d) as u64),
            "{test}: gather"
        );
        assert_eq!(CpuBackend::new().transfers(), vqx::backend::Transfers::default());
    }
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
            s.reason.contains("kernels not compiled"),
            "reason: {}",
            s.reason
        );
    }
    match cuda::CudaBackend::new(0) {
        Ok(_) => assert!(s.available, "backend opened but status says: {}", s.reason),
        Err(e) => {
            assert!(!s.available);
            assert!(matches!(e, vqx::Error::CudaUnavailable(_)), "{e}");
        }
    }
}

/// `--device cuda-emu` is a device like the others, never the one `auto` picks.
#[test]
fn cuda_emu_is_selectable_and_never_auto() {
    let emu = vqx::backend::select(Device::CudaEmu).unwrap();
    assert_eq!(emu.name(), "cuda-emu");
    assert_eq!("cuda-emu".parse::<Device>().unwrap(), Device::CudaEmu);
    assert_eq!(Device::CudaEmu.to_string(), "cuda-emu");
    let auto = vqx::backend::select(Device::Auto).unwrap();
    assert_ne!(auto.name(), "cuda-emu");
    let tf32 = vqx::backend::select_with_precision(Device::CudaEmu, Precision::Tf32).unwrap();
    assert!(tf32.describe().contains("tf32"), "{}", tf32.describe());
}

/// `vqx quantize`, `vqx fit --mode ema --deterministic` and `vqx fit` (Lloyd) on `--device
/// cuda-emu` give the same indices, distances and checkpoint tensors as on `--device cpu`: the
/// CLI's path through the CUDA backend (uploads, launches, downloads, recheck) end to end.
#[test]
fn cli_quantize_and_fit_on_cuda_emu_match_cpu() {
    use vqx::checkpoint::Checkpoint;
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let (n, d, k) = (1500, 13, 129);
    let x = random_matrix(n, d, &mut rng);
    let c = random_matrix(k, d, &mut rng);
    vqx::npy::write_matrix(p("x.npy"), x.as_ref()).unwrap();
    vqx::npy::write_matrix(p("c.npy"), c.as_ref()).unwrap();
    for device in ["cpu", "cuda-emu"] {
        for metric in ["l2", "cosine"] {
            ok(&vqx(&[
                "quantize",
                "--codebook",
                &p("c.npy"),
                "--input",
                &p("x.npy"),
                "--output",
                &p(&format!("i-{device}-{metric}.npy")),
                "--distances",
                &p(&format!("d-{device}-{metric}.npy")),
                "--metric",
                metric,
                "--device",
                device,
                "--chunk-rows",
                "700",
            ]));
        }
        ok(&vqx(&[
            "fit",
            "--mode",
            "ema",
            "--input",
            &p("x.npy"),
            "--codebook-size",
            "100",
            "--steps",
            "12",
            "--batch-size",
            "300",
            "--dead-code-threshold",
            "2",
            "--init",
            "data",
            "--seed",
            "4",
            "--deterministic",
            "--quiet",
            "--device",
            device,
            "--output",
            &p(&format!("fit-{device}.safetensors")),
        ]));
        // Lloyd with its bounds: the device's runner-up scores decide which rows are searched
        // again, never the result.
        for metric in ["l2", "cosine"] {
            ok(&vqx(&[
                "fit",
                "--input",
                &p("x.npy"),
                "--codebook-size",
                "129",
                "--steps",
                "6",
                "--metric",
                metric,
                "--quiet",
                "--device",
                device,
                "--output",
                &p(&format!("lloyd-{device}-{metric}.safetensors")),
            ]));
        }
    }
    for metric in ["l2", "cosine"] {
        let a = Checkpoint::load(p(&format!("lloyd-cpu-{metric}.safetensors"))).unwrap();
        let b = Checkpoint::load(p(&format!("lloyd-cuda-emu-{metric}.safetensors"))).unwrap();
        assert!(a == b, "{metric}: lloyd checkpoints cuda-emu vs cpu differ");
    }
    for metric in ["l2", "cosine"] {
        let read = |dev: &str| {
            (
                vqx::npy::read_indices(p(&format!("i-{dev}-{metric}.npy"))).unwrap(),
                vqx::npy::read_vector(p(&format!("d-{dev}-{metric}.npy"))).unwrap(),
            )
        };
        let ((ic, dc), (ie, de)) = (read("cpu"), read("cuda-emu"));
        assert_eq!(ie, ic, "{metric}: indices cuda-emu vs cpu");
        for r in 0..n {
            assert!(
                close(de[r], dc[r], 1e-5, 1e-5),
                "{metric}: row {r}: distance cuda-emu {} vs cpu {}",
                de[r],
                dc[r]
            );
        }
    }
    let a = Checkpoint::load(p("fit-cpu.safetensors")).unwrap();
    let b = Checkpoint::load(p("fit-cuda-emu.safetensors")).unwrap();
    assert_eq!(a.step, b.step);
    assert_eq!(a.codebook.data(), b.codebook.data(), "fit codebook");
    assert_eq!(a.cluster_size, b.cluster_size, "fit EMA counts");
    assert_eq!(a.usage_total, b.usage_total, "fit usage");
    assert!(
        a == b,
        "fit checkpoints differ beyond codebook/counts/usage"
    );
}

/// `vqx train --device cuda-emu` runs the whole step on the emulated device: on both built-in
/// data sets it reaches the CPU run's held-out MSE (within 2%; the same arithmetic, so in
/// practice equal), and metrics.jsonl shows what crossed the bus per step: nothing on the CPU;
/// on the device, after the first step (which seeds the codebook from its batch on the host),
/// the batch's 64 row ids (256 bytes) and a few dozen bytes of checks up, and at most 256 bytes
/// of scalars back.
#[test]
fn train_on_the_device_matches_cpu_and_moves_only_scalars() {
    let dir = tempfile::tempdir().unwrap();
    for data in [
        "gmm:dim=16,components=16,std=0.1",
        "manifold:dim=16,intrinsic=2",
    ] {
        let mut eval = Vec::new();
        for device in ["cpu", "cuda-emu"] {
            let out = dir.path().join(format!("{}-{device}", &data[..3]));
            #[rustfmt::skip]
            let args = [
                "train", "--synthetic", data, "--rows", "2048", "--eval-rows", "512",
                "--steps", "30", "--batch-size", "64", "--codebook-size", "32",
                "--code-dim", "4", "--hidden", "32", "--deterministic", "--seed", "3",
                "--device", device, "--quiet", "--output", out.to_str().unwrap(),
            ];
            let o = vqx(&args);
            assert!(o.status.success(), "{data} {device}: {}", stderr(&o));
            let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
            assert_eq!(metrics.lines().count(), 30, "{data} {device}");
            for line in metrics.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                let (step, h2d, d2h) = (
                    v["step"].as_u64().unwrap(),
                    v["h2d_bytes"].as_u64().unwrap(),
                    v["d2h_bytes"].as_u64().unwrap(),
                );
                if device == "cpu" {
                    assert_eq!((h2d, d2h), (0, 0), "{data}: {line}");
                } else if step > 1 {
                    assert!(
                        (64 * 4..=64 * 4 + 64).contains(&h2d) && d2h <= 256,
                        "{data}: {line}"
                    );
                }
            }
            let summary: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap())
                    .unwrap();
            assert_eq!(summary["step_runs_on"], device, "{data}");
            eval.push(summary["eval_reconstruction"].as_f64().unwrap());
        }
        assert!(
            (eval[1] - eval[0]).abs() <= 0.02 * eval[0],
            "{data}: held-out MSE cuda-emu {} cpu {}",
            eval[1],
            eval[0]
        );
    }
}
