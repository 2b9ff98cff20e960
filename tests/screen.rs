//! The bf16 screen of k-means' bounded searches (`CpuBackend` on CPUs with AVX512_BF16):
//! the same indices as the f32 search and as the naive f64 reference, on random data, on codes
//! crowded within the bf16 bound of each other (shortlists, whole lanes) and on exact ties;
//! lower bounds that hold against every code's f64 distance. On a CPU without AVX512_BF16 the
//! tests say so and check the f32 path alone.

mod common;
use common::*;
use rand::Rng;
use vqx::backend::{Backend, CpuBackend};
use vqx::nearest::cpu::CpuKernel;
use vqx::nearest::{CheckedRows, avx512};
use vqx::{MatRef, Metric, reference};

fn screened() -> CpuBackend {
    CpuBackend::with_kernel(CpuKernel::Avx512).with_bf16_screen(true)
}

fn plain() -> CpuBackend {
    CpuBackend::with_kernel(CpuKernel::Avx512).with_bf16_screen(false)
}

fn note_if_unscreened(test: &str) {
    if !avx512::bf16_available() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "note: {test}: no AVX512_BF16 here, both searches run in f32"
        );
    }
}

/// Searches `rows` of `x` for k-means' bounds with and without the screen, and with the full
/// search (which has distances too); all must give the reference's indices (the first of equal
/// f64 distances), and every lower bound must hold.
fn check(x: MatRef<'_>, c: MatRef<'_>, rows: &[u32], context: &str) {
    let checked = CheckedRows::new(x).unwrap();
    let want = reference::nearest(x, c, Metric::L2);
    let all = reference::distances(x, c, Metric::L2);
    let norm_sq = |v: &[f32]| v.iter().map(|&a| a as f64 * a as f64).sum::<f64>();
    let c_max_sq = (0..c.rows()).map(|k| norm_sq(c.row(k))).fold(0.0, f64::max);
    let (full, full_lb) = plain()
        .nearest_rows_with_bounds(&checked, rows, c, Metric::L2)
        .unwrap();
    for (t, &i) in rows.iter().enumerate() {
        // The f32 search's distance is ||x||² + its score: off by the scores' rounding.
        let (gd, wd) = (full.distances[t] as f64, want[i as usize].1);
        let tol = 1e-5 * (wd + norm_sq(x.row(i as usize)) + c_max_sq) + 1e-30;
        assert!(
            (gd - wd).abs() <= tol,
            "{context} full: row {i}: distance {gd:e} but the reference says {wd:e}"
        );
    }
    let searches = [
        (
            "screened",
            screened().nearest_rows_for_bounds(&checked, rows, c, Metric::L2),
        ),
        (
            "f32",
            plain().nearest_rows_for_bounds(&checked, rows, c, Metric::L2),
        ),
        ("full", Ok((full.indices, full_lb))),
    ];
    for (name, result) in searches {
        let (indices, lb) = result.unwrap();
        assert_eq!(indices.len(), rows.len(), "{context} {name}: rows");
        for (t, &i) in rows.iter().enumerate() {
            let i = i as usize;
            let (wi, wd) = want[i];
            let gi = indices[t];
            // The reference keeps the first of equal f64 distances, as the search must.
            assert_eq!(
                gi, wi,
                "{context} {name}: row {i}: index {gi} (f64 {:e}) but the reference says {wi} (f64 {wd:e})",
                all[i][gi as usize]
            );
            assert!(
                lb.winner[t] <= wd,
                "{context} {name}: row {i}: winner bound {:e} above its distance {wd:e}",
                lb.winner[t]
            );
            for (k, &dk) in all[i].iter().enumerate() {
                if k as u32 != gi {
                    assert!(
                        lb.others[t] <= dk,
                        "{context} {name}: row {i}: others bound {:e} above code {k}'s distance {dk:e}",
                        lb.others[t]
                    );
                }
            }
        }
    }
}

/// Every row, then a random subset in random order (the picked rows of a group search).
fn check_both_orders(x: MatRef<'_>, c: MatRef<'_>, seed: u64, context: &str) {
    let n = x.rows() as u32;
    check(x, c, &(0..n).collect::<Vec<_>>(), context);
    let mut r = rng(seed ^ 0x5eed);
    let picked: Vec<u32> = (0..n / 2 + 1).map(|_| r.gen_range(0..n)).collect();
    check(x, c, &picked, &format!("{context} (picked)"));
}

#[test]
fn screened_search_equals_the_exact_one_at_awkward_sizes() {
    note_if_unscreened("screened_search_equals_the_exact_one_at_awkward_sizes");
    // Around the 8 × 32 blocks and the 128-row tasks; odd and even D (bf16 pairs).
    let ns = [1usize, 7, 9, 127, 129, 300];
    let ks = [1usize, 31, 32, 33, 256, 300];
    let ds = [1usize, 3, 16, 255, 256];
    for (i, &n) in ns.iter().enumerate() {
        for (j, &k) in ks.iter().enumerate() {
            let d = ds[(i + j) % ds.len()];
            for seed in 0..3u64 {
                let s = seed * 100 + (i * 10 + j) as u64;
                let x = uniform(n, d, s);
                let c = uniform(k, d, s + 1);
                let (xm, cm) = (
                    MatRef::new(&x, n, d).unwrap(),
                    MatRef::new(&c, k, d).unwrap(),
                );
                check_both_orders(xm, cm, s, &format!("N={n} K={k} D={d} seed={s}"));
            }
        }
    }
}

/// Codes in tight clusters (copies within 1e-3 of a centre, far inside the bf16 bound): rows
/// near a centre see several codes in its bound, in one lane or many, so shortlists by index,
/// whole lanes and full lists all run; some codes are exact duplicates (ties).
#[test]
fn crowded_codes_and_ties_are_resolved_exactly() {
    note_if_unscreened("crowded_codes_and_ties_are_resolved_exactly");
    for seed in 0..4u64 {
        let mut r = rng(seed);
        let (d, centres) = (64usize, 12usize);
        for per in [2usize, 5, 40] {
            let base = uniform(centres, d, seed + 7);
            let k = centres * per;
            let mut c = Vec::with_capacity(k * d);
            for j in 0..k {
                let centre = &base[(j % centres) * d..(j % centres + 1) * d];
                // Every third code of a cluster repeats the previous one exactly.
                if j >= centres && j % 3 == 0 {
                    let prev = c[(j - centres) * d..(j - centres + 1) * d].to_vec();
                    c.extend(prev);
                } else {
                    c.extend(centre.iter().map(|&v| v + r.gen_range(-1e-3f32..1e-3)));
                }
            }
            let n = 200;
            let mut x = Vec::with_capacity(n * d);
            for i in 0..n {
                let centre = &base[(i % centres) * d..(i % centres + 1) * d];
                x.extend(centre.iter().map(|&v| v + r.gen_range(-0.05f32..0.05)));
            }
            let (xm, cm) = (
                MatRef::new(&x, n, d).unwrap(),
                MatRef::new(&c, k, d).unwrap(),
            );
            check_both_orders(
                xm,
                cm,
                seed,
                &format!("seed={seed} K={k} ({per} per centre)"),
            );
        }
    }
}

/// Offset data (every value near 100): the bound scales with the norms, so nearly every row
/// is rechecked.
#[test]
fn offset_data_is_rechecked_exactly() {
    note_if_unscreened("offset_data_is_rechecked_exactly");
    for seed in 0..3u64 {
        let (n, k, d) = (150usize, 70usize, 48usize);
        let x: Vec<f32> = uniform(n, d, seed).iter().map(|v| v + 100.0).collect();
        let c: Vec<f32> = uniform(k, d, seed + 9).iter().map(|v| v + 100.0).collect();
        let (xm, cm) = (
            MatRef::new(&x, n, d).unwrap(),
            MatRef::new(&c, k, d).unwrap(),
        );
        check_both_orders(xm, cm, seed, &format!("offset seed={seed}"));
    }
}
