//! k-means (`vqx::kmeans`, `vqx fit --mode lloyd`): plain Lloyd against a naive f64 Lloyd; the
//! bounded passes against plain Lloyd (same indices every pass, same codebook bit for bit);
//! shards; seeding; the runner-up bounds the pruning starts from; bad input.

mod common;
use common::cli::{expect_error, ok, vqx};
use common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vqx::backend::{Backend, CpuBackend};
use vqx::collective::{Collective, Single, in_process};
use vqx::kmeans::{self, KMeans, KMeansConfig, Seeding, Shard, Stop};
use vqx::nearest::cpu::CpuKernel;
use vqx::{MatRef, Matrix, Metric};

const SEEDS: [u64; 3] = [1, 2, 3];

fn config(k: usize, metric: Metric, passes: usize, bounds: bool, seeding: Seeding) -> KMeansConfig {
    KMeansConfig {
        codes: k,
        metric,
        max_passes: passes,
        tolerance: 0.0,
        bounds,
        // Small groups, so that every test shape has several.
        group_codes: 16,
        seeding,
        seed: 5,
        // The full-data passes alone: what these tests compare.
        sample_per_code: 0,
        resume: None,
    }
}

fn fit_whole(x: MatRef<'_>, cfg: &KMeansConfig) -> KMeans {
    kmeans::fit(&CpuBackend::new(), &Single, Shard::whole(x), cfg, |_, _| {
        Ok(())
    })
    .unwrap()
}

/// Naive Lloyd in f64: argmin of Σ(x − c)² over codes (the first minimum), means rounded once.
/// Written with plain index loops, as the definition reads.
#[allow(clippy::needless_range_loop)]
fn naive_lloyd(x: MatRef<'_>, init: &Matrix, passes: usize) -> (Vec<u32>, Vec<f32>) {
    let (n, d, k) = (x.rows(), x.cols(), init.rows());
    let mut codes = init.data().to_vec();
    let mut idx = vec![0u32; n];
    for _ in 0..passes {
        for i in 0..n {
            let mut best = (f64::INFINITY, 0u32);
            for j in 0..k {
                let s: f64 = (0..d)
                    .map(|t| {
                        let v = x.row(i)[t] as f64 - codes[j * d + t] as f64;
                        v * v
                    })
                    .sum();
                if s < best.0 {
                    best = (s, j as u32);
                }
            }
            idx[i] = best.1;
        }
        let mut sums = vec![0f64; k * d];
        let mut counts = vec![0usize; k];
        for i in 0..n {
            let j = idx[i] as usize;
            counts[j] += 1;
            for t in 0..d {
                sums[j * d + t] += x.row(i)[t] as f64;
            }
        }
        for j in 0..k {
            assert!(
                counts[j] > 0,
                "the reference test data must leave no code empty"
            );
            for t in 0..d {
                codes[j * d + t] = (sums[j * d + t] / counts[j] as f64) as f32;
            }
        }
    }
    (idx, codes)
}

/// Clustered rows and, as init, one row of each cluster (so no code is ever empty).
fn clustered_case(n: usize, d: usize, k: usize, seed: u64) -> (Matrix, Matrix) {
    let centers = normal(k, d, seed, 4.0, 0.0);
    let (x, label) = clustered(&centers, k, d, n, 1.5, seed + 100);
    let init: Vec<f32> = (0..k as u32)
        .flat_map(|c| {
            let r = label
                .iter()
                .position(|&l| l == c)
                .expect("every cluster drawn");
            x[r * d..(r + 1) * d].to_vec()
        })
        .collect();
    (
        Matrix::new(x, n, d).unwrap(),
        Matrix::new(init, k, d).unwrap(),
    )
}

#[test]
fn lloyd_matches_a_naive_f64_lloyd_every_pass() {
    for seed in SEEDS {
        let (x, init) = clustered_case(700, 7, 20, seed);
        for passes in 1..=4 {
            let (want_idx, want_codes) = naive_lloyd(x.as_ref(), &init, passes);
            for bounds in [false, true] {
                let cfg = config(20, Metric::L2, passes, bounds, Seeding::Given(init.clone()));
                let got = fit_whole(x.as_ref(), &cfg);
                let ctx = format!("seed {seed}, pass {passes}, bounds {bounds}");
                if got.stop == Stop::Converged {
                    continue; // stopped before this pass: compared at the earlier count
                }
                for (i, (g, w)) in got.indices.iter().zip(&want_idx).enumerate() {
                    assert_eq!(g, w, "{ctx}: row {i}: index {g}, reference {w}");
                }
                assert_close(
                    got.codebook.data(),
                    &want_codes.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                    1e-6,
                    1e-6,
                    &ctx,
                );
                // The reported error (computed from the sums) is the mean exact squared
                // distance of the rows to the codes they were assigned in the last pass, before
                // the codes moved: those of pass − 1.
                let before = naive_lloyd(x.as_ref(), &init, passes - 1).1;
                let d = x.cols();
                let want: f64 = (0..x.rows())
                    .map(|i| {
                        let j = want_idx[i] as usize;
                        (0..d)
                            .map(|t| {
                                let v = x.row(i)[t] as f64 - before[j * d + t] as f64;
                                v * v
                            })
                            .sum::<f64>()
                    })
                    .sum::<f64>()
                    / x.rows() as f64;
                let error = got.passes.last().unwrap().error;
                assert!(
                    (error - want).abs() <= 1e-9 * want,
                    "{ctx}: error {error}, reference {want}"
                );
            }
        }
    }
}

/// Data with many exact ties: small integer coordinates, repeated rows, duplicate codes.
fn tie_heavy(n: usize, d: usize, seed: u64) -> Matrix {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    Matrix::new(
        (0..n * d).map(|_| r.gen_range(-3..=3) as f32).collect(),
        n,
        d,
    )
    .unwrap()
}

#[test]
fn bounded_and_plain_lloyd_agree_on_every_pass_bit_for_bit() {
    // (rows, dim, K): K below, at and above the 64-code groups, tie-heavy data included.
    let shapes = [
        (37, 5, 7, false),
        (900, 3, 64, true),
        (2000, 24, 130, false),
        (3000, 16, 300, false),
        (1200, 4, 65, true),
    ];
    let mut skipped_somewhere = false;
    for &(n, d, k, ties) in &shapes {
        for seed in SEEDS {
            let x = if ties {
                tie_heavy(n, d, seed)
            } else {
                let centers = normal(k / 2 + 1, d, seed, 3.0, 0.0);
                Matrix::new(clustered(&centers, k / 2 + 1, d, n, 1.0, seed).0, n, d).unwrap()
            };
            for metric in [Metric::L2, Metric::Cosine] {
                for seeding in [Seeding::default(), Seeding::RandomRows] {
                    for passes in [1, 2, 3, 5, 8] {
                        let plain = fit_whole(
                            x.as_ref(),
                            &config(k, metric, passes, false, seeding.clone()),
                        );
                        let bounded = fit_whole(
                            x.as_ref(),
                            &config(k, metric, passes, true, seeding.clone()),
                        );
                        let ctx = format!(
                            "{n}×{d}, K {k}, seed {seed}, {metric:?}, {seeding:?}, {passes} passes"
                        );
                        assert_eq!(
                            plain.passes.len(),
                            bounded.passes.len(),
                            "{ctx}: pass count"
                        );
                        for (i, (b, p)) in bounded.indices.iter().zip(&plain.indices).enumerate() {
                            assert_eq!(b, p, "{ctx}: row {i}: bounded {b}, plain {p}");
                        }
                        devices::assert_bits(bounded.codebook.data(), plain.codebook.data(), &ctx);
                        assert_eq!(bounded.counts, plain.counts, "{ctx}: counts");
                        for (pb, pp) in bounded.passes.iter().zip(&plain.passes) {
                            assert_eq!(
                                pb.error.to_bits(),
                                pp.error.to_bits(),
                                "{ctx}: pass {} error",
                                pb.pass
                            );
                            assert_eq!(
                                pb.reassigned, pp.reassigned,
                                "{ctx}: pass {} reassigned",
                                pb.pass
                            );
                            skipped_somewhere |= pb.skipped > 0.5;
                        }
                    }
                }
            }
        }
    }
    assert!(
        skipped_somewhere,
        "the bounds never skipped half a pass: the comparison proves nothing"
    );
}

#[test]
fn shards_give_the_same_codebook_on_every_rank_and_run() {
    let (x, _) = clustered_case(1000, 9, 40, 4);
    for metric in [Metric::L2, Metric::Cosine] {
        for (shards, sample_per_code) in [(1usize, 0), (2, 0), (3, 0), (1, 8), (2, 8), (3, 8)] {
            let cfg = KMeansConfig {
                metric,
                sample_per_code,
                ..KMeansConfig::new(40)
            };
            let run = || {
                in_process::run(shards, |rank| {
                    let shard = Shard::split(x.as_ref(), shards, rank.rank());
                    kmeans::fit(&CpuBackend::new(), rank, shard, &cfg, |_, _| Ok(()))
                })
                .unwrap()
            };
            let (a, b) = (run(), run());
            for r in 0..shards {
                let ctx =
                    format!("{metric:?}, {shards} shards, sample {sample_per_code}, rank {r}");
                devices::assert_bits(a[r].codebook.data(), a[0].codebook.data(), &ctx);
                devices::assert_bits(
                    b[r].codebook.data(),
                    a[0].codebook.data(),
                    &format!("{ctx}, second run"),
                );
                assert_eq!(a[r].counts, a[0].counts, "{ctx}: counts");
            }
            let total: u64 = a[0].counts.iter().sum();
            assert_eq!(
                total, 1000,
                "{metric:?}, {shards} shards: every row counted once"
            );
            if shards == 1 {
                let single = fit_whole(x.as_ref(), &cfg);
                devices::assert_bits(
                    single.codebook.data(),
                    a[0].codebook.data(),
                    "1 in-process rank vs Single",
                );
            }
        }
    }
}

#[test]
fn seeding_is_deterministic_and_k_means_parallel_beats_random_rows() {
    // 60 well-separated clusters, K = 60: k-means|| should find nearly every one.
    let (x, _) = clustered_case(6000, 8, 60, 9);
    let first_error = |seeding: Seeding| {
        let f = fit_whole(x.as_ref(), &config(60, Metric::L2, 1, true, seeding));
        (f.passes[0].error, f.codebook)
    };
    let (par, c1) = first_error(Seeding::default());
    let (_, c2) = first_error(Seeding::default());
    devices::assert_bits(c1.data(), c2.data(), "same seed, same k-means|| codes");
    let (random, _) = first_error(Seeding::RandomRows);
    assert!(
        par < 0.5 * random,
        "k-means|| error {par} vs random rows {random}"
    );
}

#[test]
fn runner_up_bounds_are_lower_bounds_and_the_assignment_is_nearest() {
    for kernel in [CpuKernel::Auto, CpuKernel::Portable] {
        let backend = CpuBackend::with_kernel(kernel);
        for seed in SEEDS {
            let mut r = rng(seed);
            for (n, d, k) in [(1, 3, 1), (31, 7, 33), (257, 17, 95)] {
                let x = random_matrix(n, d, &mut r);
                let mut c = random_matrix(k, d, &mut r);
                if k > 2 {
                    let dup = c.row(1).to_vec();
                    c.data_mut()[2 * d..3 * d].copy_from_slice(&dup); // a duplicate code
                }
                for metric in [Metric::L2, Metric::Cosine] {
                    let plain = backend.nearest(x.as_ref(), c.as_ref(), metric).unwrap();
                    let (a, lb) = backend
                        .nearest_with_bounds(x.as_ref(), c.as_ref(), metric)
                        .unwrap();
                    assert_eq!(a.indices, plain.indices, "{kernel:?} {metric:?}: indices");
                    let sq = |i: usize, j: usize| {
                        let e = vqx::nearest::exact_distance(x.row(i), c.row(j), metric);
                        if metric == Metric::Cosine { 2.0 * e } else { e }
                    };
                    for i in 0..n {
                        let won = sq(i, a.indices[i] as usize);
                        let second = (0..k)
                            .filter(|&j| j as u32 != a.indices[i])
                            .map(|j| sq(i, j))
                            .fold(f64::INFINITY, f64::min);
                        let ctx = format!("{kernel:?} {metric:?} {n}×{d} K {k}: row {i}");
                        assert!(
                            lb.winner[i] <= won * (1.0 + 1e-12),
                            "{ctx}: winner bound {} above its distance {won}",
                            lb.winner[i]
                        );
                        assert!(
                            lb.others[i] <= second * (1.0 + 1e-12),
                            "{ctx}: bound {} above the runner-up {second}",
                            lb.others[i]
                        );
                        // Bounds that prove nothing would pass the above: they must be tight
                        // where the row is clear of rounding (a relative 1e-3 here).
                        if second.is_finite() && won > 1e-3 {
                            assert!(
                                lb.others[i] >= second * 0.999 - 1e-3,
                                "{ctx}: loose bound {} for {second}",
                                lb.others[i]
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn bad_input_is_refused_on_every_rank() {
    let (x, _) = clustered_case(300, 4, 10, 2);
    let mut with_nan = x.clone();
    with_nan.data_mut()[250 * 4 + 1] = f32::NAN;
    let err = in_process::run(2, |rank| {
        let shard = Shard::split(with_nan.as_ref(), 2, rank.rank());
        kmeans::fit(
            &CpuBackend::new(),
            rank,
            shard,
            &KMeansConfig::new(10),
            |_, _| Ok(()),
        )
    })
    .unwrap_err()
    .to_string();
    assert_mentions(&err, &["150..300", "NaN"]);
    let e = kmeans::fit(
        &CpuBackend::new(),
        &Single,
        Shard::whole(x.as_ref().slice_rows(0, 5)),
        &KMeansConfig::new(10),
        |_, _| Ok(()),
    )
    .unwrap_err()
    .to_string();
    assert_mentions(&e, &["10 codes", "5"]);
    let wrong = Seeding::Given(Matrix::zeros(10, 3));
    let e = kmeans::fit(
        &CpuBackend::new(),
        &Single,
        Shard::whole(x.as_ref()),
        &config(10, Metric::L2, 3, true, wrong),
        |_, _| Ok(()),
    )
    .unwrap_err()
    .to_string();
    assert_mentions(&e, &["10 × 4", "10 × 3"]);
}

#[test]
fn cli_fit_lloyd_reports_passes_stops_and_shards_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let (x, _) = clustered_case(3000, 6, 24, 7);
    vqx::npy::write_matrix(p("x.npy"), x.as_ref()).unwrap();
    let fit = |out: &str, extra: &[&str]| {
        let (xp, op, mp) = (
            p("x.npy"),
            p(&format!("{out}.safetensors")),
            p(&format!("{out}.jsonl")),
        );
        let mut args = vec![
            "fit",
            "--input",
            &xp,
            "--codebook-size",
            "24",
            "--output",
            &op,
            "--metrics",
            &mp,
        ];
        args.extend_from_slice(extra);
        let (_, err) = ok(&vqx(&args));
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&mp)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (vqx::checkpoint::Checkpoint::load(&op).unwrap(), lines, err)
    };
    let (a, lines, err) = fit("a", &[]);
    assert!(err.contains("pass   1") && err.contains("skipped"), "{err}");
    assert!(lines.len() >= 2, "{err}");
    let last = lines.last().unwrap();
    assert_eq!(last["pass"], lines.len());
    assert!(last["skipped"].as_f64().unwrap() > 0.0, "{last}");
    assert_eq!(a.usage_total.as_ref().unwrap().iter().sum::<f64>(), 3000.0);
    let (plain, _, _) = fit("plain", &["--no-bounds", "--quiet"]);
    assert_eq!(
        plain.codebook.data(),
        a.codebook.data(),
        "--no-bounds changes nothing but time"
    );
    let (s1, _, _) = fit("s1", &["--shards", "3", "--quiet"]);
    let (s2, _, _) = fit("s2", &["--shards", "3", "--quiet"]);
    assert!(s1 == s2, "two --shards 3 runs differ");
    let (three, l3, _) = fit("three", &["--steps", "3", "--init", "data", "--quiet"]);
    assert_eq!(l3.len(), 3, "--steps 3 runs 3 passes unless converged");
    assert_eq!(three.step, 3);
    // Refused: a flag of the other mode, and more codes than rows.
    let refused = |extra: &[&str], needles: &[&str]| {
        let (xp, op) = (p("x.npy"), p("x.st"));
        let mut args = vec!["fit", "--input", &xp, "-o", &op];
        args.extend_from_slice(extra);
        expect_error(&vqx(&args), needles)
    };
    refused(
        &["--codebook-size", "24", "--batch-size", "64"],
        &["--batch-size", "--mode ema"],
    );
    refused(
        &["--mode", "ema", "--codebook-size", "24", "--no-bounds"],
        &["--no-bounds", "--mode lloyd"],
    );
    let e = refused(&["--codebook-size", "5000"], &["5000 codes", "3000"]);
    assert!(
        !dir.path().join("x.st").exists(),
        "no checkpoint on failure: {e}"
    );
}

/// A rank whose statistics differ (here: a collective that adds a little to rank 1's sums)
/// computes other codes; the periodic codebook check ends the job naming it, on every rank.
#[test]
fn ranks_whose_codebooks_differ_are_stopped() {
    use vqx::collective::Collective;
    struct Skewed<'a>(&'a in_process::Rank);
    impl Collective for Skewed<'_> {
        fn rank(&self) -> usize {
            self.0.rank()
        }
        fn size(&self) -> usize {
            self.0.size()
        }
        fn all_gather_bytes(&self, local: &[u8]) -> vqx::Result<Vec<Vec<u8>>> {
            self.0.all_gather_bytes(local)
        }
        fn broadcast_bytes(&self, root: usize, data: &mut Vec<u8>) -> vqx::Result<()> {
            self.0.broadcast_bytes(root, data)
        }
        fn abort(&self, cause: &str) {
            self.0.abort(cause)
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> vqx::Result<()> {
            self.0.all_reduce_sum_f64(buf)?;
            if self.rank() == 1 && buf.len() > 1 {
                buf[0] += 1e-3;
            }
            Ok(())
        }
    }
    let (x, _) = clustered_case(600, 5, 12, 3);
    let cfg = KMeansConfig {
        tolerance: 0.0,
        max_passes: 8,
        ..KMeansConfig::new(12)
    };
    let err = in_process::run(2, |rank| {
        let shard = Shard::split(x.as_ref(), 2, rank.rank());
        kmeans::fit(
            &CpuBackend::new(),
            &Skewed(rank),
            shard,
            &cfg,
            |_, _| Ok(()),
        )
    })
    .unwrap_err()
    .to_string();
    assert_mentions(&err, &["rank 1", "differs from rank 0"]);
}

/// The bounds search picked rows in place (`nearest_rows_with_bounds`): the same assignment
/// and bounds, bit for bit, as a search of the same rows copied into a matrix, on both CPU
/// kernels, rows in any order and repeated; bad picks and bad picked rows are typed errors.
/// The search the bounds make (`nearest_rows_for_bounds`, with the CPU's bf16 screen where it
/// runs) gives the same indices (tests/screen.rs checks its bounds).
#[test]
fn picked_rows_search_equals_the_copied_rows_search() {
    for kernel in [CpuKernel::Auto, CpuKernel::Portable] {
        let backend = CpuBackend::with_kernel(kernel);
        for seed in SEEDS {
            let mut r = rng(seed);
            for (n, d, k) in [(1, 3, 1), (300, 17, 95), (700, 64, 40)] {
                let x = random_matrix(n, d, &mut r);
                let c = random_matrix(k, d, &mut r);
                // Every third row backwards, then row 0 twice: crosses row blocks (128) unevenly.
                let mut pick: Vec<u32> = (0..n as u32).rev().step_by(3).collect();
                pick.extend([0, 0]);
                let mut copied = Vec::new();
                for &i in &pick {
                    copied.extend_from_slice(x.row(i as usize));
                }
                let copied = Matrix::new(copied, pick.len(), d).unwrap();
                for metric in [Metric::L2, Metric::Cosine] {
                    let ctx = format!("{kernel:?} {metric:?} {n}×{d} K {k} seed {seed}");
                    let checked = vqx::nearest::CheckedRows::new(x.as_ref()).unwrap();
                    let (a, lb) = backend
                        .nearest_rows_with_bounds(&checked, &pick, c.as_ref(), metric)
                        .unwrap();
                    let (b, lb2) = backend
                        .nearest_with_bounds(copied.as_ref(), c.as_ref(), metric)
                        .unwrap();
                    assert_eq!(a.indices, b.indices, "{ctx}: indices");
                    devices::assert_bits(&a.distances, &b.distances, &format!("{ctx}: distances"));
                    assert_eq!(lb.winner, lb2.winner, "{ctx}: winner bounds");
                    assert_eq!(lb.others, lb2.others, "{ctx}: runner-up bounds");
                    let (s, _) = backend
                        .nearest_rows_for_bounds(&checked, &pick, c.as_ref(), metric)
                        .unwrap();
                    assert_eq!(s, b.indices, "{ctx}: indices of the search for bounds");
                }
            }
        }
        let x = random_matrix(10, 4, &mut rng(9));
        let c = random_matrix(3, 4, &mut rng(10));
        let checked = vqx::nearest::CheckedRows::new(x.as_ref()).unwrap();
        let err = backend
            .nearest_rows_with_bounds(&checked, &[2, 10], c.as_ref(), Metric::L2)
            .unwrap_err()
            .to_string();
        assert_mentions(&err, &["row 10", "10 rows"]);
        let err = backend
            .nearest_rows_with_bounds(&checked, &[], c.as_ref(), Metric::L2)
            .unwrap_err()
            .to_string();
        assert_mentions(&err, &["input", "0 picked rows"]);
        // Rows are checked once, when the CheckedRows is made: a NaN is named there.
        let mut bad = x.clone();
        bad.data_mut()[7 * 4 + 2] = f32::NAN;
        match vqx::nearest::CheckedRows::new(bad.as_ref()) {
            Err(vqx::Error::NonFinite { row, col, .. }) => assert_eq!((row, col), (7, 2)),
            other => panic!("want NonFinite at row 7, got {other:?}"),
        }
        let mut badc = c.clone();
        badc.data_mut()[5] = f32::INFINITY;
        let err = backend
            .nearest_rows_with_bounds(&checked, &[1], badc.as_ref(), Metric::L2)
            .unwrap_err()
            .to_string();
        assert_mentions(&err, &["codebook"]);
    }
}

/// The sample stage: it runs when the data hold at least twice the sample (and not below),
/// its passes are reported apart from the full passes, every rank gets the same codebook (the
/// shards test covers ranks), the bounded and plain full passes still agree bit for bit after
/// it, and the full passes only improve on the sample's codebook.
#[test]
fn sample_stage_runs_when_asked_and_keeps_the_result_exact() {
    let (x, _) = clustered_case(4000, 8, 20, 7);
    for metric in [Metric::L2, Metric::Cosine] {
        let cfg = |sample_per_code, bounds| KMeansConfig {
            metric,
            sample_per_code,
            bounds,
            tolerance: 1e-6,
            group_codes: 8,
            ..KMeansConfig::new(20)
        };
        let with = fit_whole(x.as_ref(), &cfg(50, true));
        let plain = fit_whole(x.as_ref(), &cfg(50, false));
        let without = fit_whole(x.as_ref(), &cfg(0, true));
        let ctx = format!("{metric:?}");
        assert!(!with.sample_passes.is_empty(), "{ctx}: no sample stage");
        assert!(
            without.sample_passes.is_empty(),
            "{ctx}: a sample stage when told none"
        );
        let rows = with.sample_passes[0].rows;
        // 50·20 = 1,000 rows expected; the draw is per row, so about that.
        assert!((800..1200).contains(&rows), "{ctx}: sample of {rows} rows");
        assert!(
            with.sample_passes
                .iter()
                .all(|p| p.sample && p.rows == rows)
        );
        assert!(with.passes.iter().all(|p| !p.sample && p.rows == 4000));
        devices::assert_bits(
            with.codebook.data(),
            plain.codebook.data(),
            &format!("{ctx}: bounded vs plain after the sample stage"),
        );
        assert_eq!(with.indices, plain.indices, "{ctx}: indices");
        // Lloyd never raises the error: the last full pass is at most the first, which scores
        // the sample's codebook on all rows.
        let (first, last) = (with.passes[0].error, with.passes.last().unwrap().error);
        assert!(
            last <= first * (1.0 + 1e-12),
            "{ctx}: error {last} after the full passes, {first} from the sample's codebook"
        );
        // 2,000 rows per code·K would need 40,000 rows: no sample stage on 4,000.
        assert!(
            fit_whole(x.as_ref(), &cfg(2000, true))
                .sample_passes
                .is_empty()
        );
    }
}

/// `vqx fit --resume`: a fit stopped after some passes (a pass limit, or SIGKILL after a
/// periodic checkpoint) and resumed gives the uninterrupted fit's checkpoint bit for bit, with
/// bounds, L2 and cosine, on one and on two ranks; a resume that cannot continue the same fit
/// is refused with the reason.
#[test]
fn cli_fit_resume_continues_with_the_uninterrupted_bits() {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let (x, _) = clustered_case(3000, 6, 24, 11);
    vqx::npy::write_matrix(p("x.npy"), x.as_ref()).unwrap();
    let xp = p("x.npy");
    let run = |out: &str, extra: &[&str]| {
        let op = p(out);
        let mut args = vec!["fit", "--input", &xp, "--codebook-size", "24", "--quiet"];
        args.extend_from_slice(&["-o", &op]);
        args.extend_from_slice(extra);
        vqx(&args)
    };
    let load = |out: &str| vqx::checkpoint::Checkpoint::load(p(out)).unwrap();
    for metric in ["l2", "cosine"] {
        for shards in ["1", "2"] {
            let ctx = format!("{metric}, {shards} shards");
            let common = ["--metric", metric, "--shards", shards, "--init", "data"];
            fn with<'a>(common: &[&'a str], more: &[&'a str]) -> Vec<&'a str> {
                [common, more].concat()
            }
            let with = |more: &[&'static str]| with(&common, more);
            ok(&run("whole.st", &with(&["--steps", "9"])));
            ok(&run("part.st", &with(&["--steps", "4"])));
            ok(&run("part.st", &with(&["--steps", "9", "--resume"])));
            let (a, b) = (load("whole.st"), load("part.st"));
            devices::assert_bits(a.codebook.data(), b.codebook.data(), &ctx);
            assert_eq!(a.step, b.step, "{ctx}: passes");
            assert_eq!(a.usage_total, b.usage_total, "{ctx}: counts");
            // By the tolerance: 4 passes, then on to the stop; the same stop and codes.
            ok(&run("tol.st", &with(&[])));
            ok(&run("tol-part.st", &with(&["--max-passes", "4"])));
            ok(&run("tol-part.st", &with(&["--resume"])));
            let (a, b) = (load("tol.st"), load("tol-part.st"));
            devices::assert_bits(a.codebook.data(), b.codebook.data(), &ctx);
            assert_eq!(a.config["fit"], b.config["fit"], "{ctx}: fit record");
        }
    }
    // Refusals: another seed, a finished fit, not a fit checkpoint.
    ok(&run("r.st", &["--steps", "3"]));
    expect_error(
        &run("r.st", &["--steps", "6", "--resume", "--seed", "9"]),
        &["--resume", "--seed", "resume with the same"],
    );
    ok(&run("done.st", &[]));
    expect_error(
        &run("done.st", &["--resume"]),
        &["finished", "nothing to resume"],
    );
    std::fs::write(p("junk.st"), b"not a checkpoint").unwrap();
    expect_error(&run("junk.st", &["--resume"]), &["junk.st"]);
}

/// A fit killed (SIGKILL) between its periodic checkpoints leaves the last checkpoint whole,
/// and resuming from it gives the uninterrupted fit's codebook bit for bit.
#[cfg(unix)]
#[test]
fn a_killed_fit_resumes_to_the_uninterrupted_codebook() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    // Plain passes over 60,000 × 32 rows, K = 512: ~0.1 s a pass on 2 cores, 30 passes.
    let (n, d) = (60_000, 32);
    let x = uniform(n, d, 5);
    vqx::npy::write_matrix(p("x.npy"), Matrix::new(x, n, d).unwrap().as_ref()).unwrap();
    let xp = p("x.npy");
    let args = |out: &str| -> Vec<String> {
        #[rustfmt::skip]
        let a = ["fit", "--input", &xp, "--codebook-size", "512", "--init", "data",
            "--no-bounds", "--steps", "30", "--checkpoint-every", "1", "--quiet", "-o", out];
        a.iter().map(|s| s.to_string()).collect()
    };
    let killed = p("killed.st");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vqx"))
        .args(args(&killed))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    // Kill it once the second checkpoint is there (the first may be of pass 1 only).
    let pass_of = |path: &str| {
        vqx::checkpoint::Checkpoint::load(path)
            .ok()
            .map(|c| c.step)
            .unwrap_or(0)
    };
    while pass_of(&killed) < 2 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the fit ended before the kill"
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no checkpoint after 60 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed, yet exit 0");
    let at = pass_of(&killed);
    assert!((2..30).contains(&at), "killed after pass {at}");
    let resumed = {
        let mut a = args(&killed);
        a.push("--resume".into());
        a
    };
    let a: Vec<&str> = resumed.iter().map(String::as_str).collect();
    ok(&vqx(&a));
    let whole = p("whole.st");
    let a = args(&whole);
    ok(&vqx(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    let (w, k) = (
        vqx::checkpoint::Checkpoint::load(&whole).unwrap(),
        vqx::checkpoint::Checkpoint::load(&killed).unwrap(),
    );
    devices::assert_bits(
        w.codebook.data(),
        k.codebook.data(),
        &format!("killed after pass {at} and resumed vs uninterrupted"),
    );
    assert_eq!(w.step, k.step);
}

/// `vqx fit --mode ema --shards S`: the global batch split over S in-process ranks; two runs
/// give the same bytes, the fit learns as the one-process fit does, and a batch smaller than
/// the rank count and a NaN in a rank's rows are refused with the reason.
#[test]
fn cli_fit_ema_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let (x, _) = clustered_case(3000, 6, 24, 13);
    vqx::npy::write_matrix(p("x.npy"), x.as_ref()).unwrap();
    let xp = p("x.npy");
    let run = |out: &str, extra: &[&str]| {
        let op = p(out);
        let mut args = vec![
            "fit",
            "--mode",
            "ema",
            "--input",
            &xp,
            "--codebook-size",
            "24",
        ];
        args.extend_from_slice(&["--steps", "60", "--batch-size", "257", "--quiet", "-o", &op]);
        args.extend_from_slice(extra);
        vqx(&args)
    };
    // Mean squared distance of the rows to the checkpoint's nearest codes.
    let error = |out: &str| {
        let c = vqx::checkpoint::Checkpoint::load(p(out)).unwrap().codebook;
        let a = CpuBackend::new()
            .nearest(x.as_ref(), c.as_ref(), Metric::L2)
            .unwrap();
        a.distances.iter().map(|&v| v as f64).sum::<f64>() / x.rows() as f64
    };
    for metric in ["l2", "cosine"] {
        let m = ["--metric", metric, "--dead-code-threshold", "1"];
        ok(&run("one.st", &m));
        ok(&run("a.st", &[&m[..], &["--shards", "2"]].concat()));
        ok(&run("b.st", &[&m[..], &["--shards", "2"]].concat()));
        ok(&run("c.st", &[&m[..], &["--shards", "3"]].concat()));
        let (a, b) = (
            std::fs::read(p("a.st")).unwrap(),
            std::fs::read(p("b.st")).unwrap(),
        );
        assert!(a == b, "{metric}: two --shards 2 runs differ");
        let ckpt = vqx::checkpoint::Checkpoint::load(p("c.st")).unwrap();
        assert_eq!(ckpt.step, 60, "{metric}: steps");
        let (one, two, three) = (error("one.st"), error("a.st"), error("c.st"));
        assert!(
            two <= one * 1.25 && three <= one * 1.25,
            "{metric}: error {two} (2 shards), {three} (3 shards), {one} (one process)"
        );
    }
    let op = p("x.st");
    #[rustfmt::skip]
    let args = ["fit", "--mode", "ema", "--input", &xp, "--codebook-size", "24", "--steps", "5",
        "--batch-size", "2", "--shards", "3", "--quiet", "-o", &op];
    expect_error(&vqx(&args), &["--batch-size 2", "3 ranks"]);
    let mut bad = x.clone();
    bad.data_mut()[2900 * 6 + 1] = f32::NAN;
    vqx::npy::write_matrix(p("bad.npy"), bad.as_ref()).unwrap();
    let bp = p("bad.npy");
    let op = p("bad.st");
    #[rustfmt::skip]
    let args = ["fit", "--mode", "ema", "--input", &bp, "--codebook-size", "24", "--steps", "60",
        "--batch-size", "1000", "--shards", "2", "--quiet", "-o", &op];
    expect_error(&vqx(&args), &["input"]);
    assert!(
        !dir.path().join("bad.st").exists(),
        "a checkpoint was written"
    );
}
