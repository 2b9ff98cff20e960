//! The device sort and compaction of kernels/sort.cu (launchers: src/backend/cuda/sort.rs)
//! against their CPU twins, written once with `on_devices!`: each test `t` runs as `t::emu` on
//! the emulated device and `t::gpu` on a real GPU (a visible skip line without one).
//!
//! - `sort::group_by_code` equals `ema::group_by_code` element for element (offsets and row
//!   ids), for N ∈ {1, 255, 257, 10,000} (segment lengths of 16 rows round up, segments end
//!   mid-block) and K ∈ {1, 2, 255, 257, 4,096, 65,536} (K > N, and K·S at the scratch cap),
//!   uniform, skewed and single-code indices, 3 seeds, one scratch reused across all calls
//!   (stale counters would show). Output buffers start as garbage and are longer than needed:
//!   every entry must be written and nothing past the end.
//! - `sort::compact` equals the CPU filter, and the count it leaves on the device equals the
//!   CPU's; `flags_below` and `gather_counted` likewise.
//! - `sort::code_sums_deterministic` and the backend's deterministic `code_sums` equal
//!   `ema::cpu` bit for bit, and the latter uploads only x and the indices.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
#[macro_use]
mod common;

use common::devices::{Dev, EMU, real_gpu};
use std::fmt::Debug;
use vqx::Matrix;
use vqx::backend::Backend;
use vqx::backend::cuda::Gpu;
use vqx::backend::cuda::sort::{self, SortScratch};
use vqx::ema::{self, SumMode};
use vqx::nearest::Precision;

const SEEDS: [u64; 3] = [1, 2, 3];
const GARBAGE: u32 = 0xDEAD_BEEF;

/// How the codes of a test batch are drawn.
#[derive(Clone, Copy, Debug)]
enum Codes {
    Uniform,
    /// Heavily skewed towards code 0 (u⁸·K).
    Skewed,
    /// Every row has the same code.
    One,
}

fn indices(n: usize, k: usize, codes: Codes, rng: &mut ChaCha8Rng) -> Vec<u32> {
    let one = rng.gen_range(0..k as u32);
    (0..n)
        .map(|_| match codes {
            Codes::Uniform => rng.gen_range(0..k as u32),
            Codes::Skewed => ((rng.r#gen::<f64>().powi(8) * k as f64) as u32).min(k as u32 - 1),
            Codes::One => one,
        })
        .collect()
}

/// `got` and `want` equal element for element, the failure naming the index and both values.
fn assert_same<T: PartialEq + Debug>(ctx: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{ctx}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g == w, "{ctx}: index {i}: device {g:?} vs cpu {w:?}");
    }
}

/// The tail of `buf` past `len` still holds `fill`: nothing was written out of bounds.
fn assert_untouched<T: PartialEq + Debug>(ctx: &str, buf: &[T], len: usize, fill: T) {
    for (i, v) in buf.iter().enumerate().skip(len) {
        assert!(
            *v == fill,
            "{ctx}: index {i} past the end was written: {v:?} (was {fill:?})"
        );
    }
}

#[test]
fn segments_respect_their_bounds() {
    use vqx::backend::cuda::kernels::tiles;
    for n in [
        0,
        1,
        15,
        16,
        17,
        255,
        257,
        10_000,
        1 << 20,
        u32::MAX as usize,
    ] {
        for k in [1, 2, 257, 65_536, 1 << 24, (1 << 24) + 1, u32::MAX as usize] {
            let (s, len) = sort::segments(n, k);
            let ctx = format!("N={n} K={k}: S={s}, {len} rows per segment");
            assert!(s >= 1 && s <= n.max(1), "{ctx}: S out of [1, max(1, N)]");
            assert!(s * len >= n, "{ctx}: the segments do not cover the rows");
            assert!(s <= tiles::SORT_MAX_SEGMENTS, "{ctx}: too many segments");
            assert!(
                s == 1 || s * k <= tiles::SORT_SCRATCH_MAX,
                "{ctx}: too many counters"
            );
            assert!(
                s == 1 || len >= tiles::SORT_MIN_SEGMENT_ROWS,
                "{ctx}: segments shorter than the minimum"
            );
        }
    }
}

on_devices! {
    fn group_by_code_matches_cpu<G>(test, dev) {
        let backend = dev.backend(Precision::Exact);
        let g = backend.gpu();
        let mut scratch = SortScratch::<G>::new();
        for n in [1usize, 255, 257, 10_000] {
            for k in [1usize, 2, 255, 257, 4_096, 65_536] {
                for codes in [Codes::Uniform, Codes::Skewed, Codes::One] {
                    for seed in SEEDS {
                        let ctx = format!("{test}: N={n} K={k} {codes:?} seed={seed}");
                        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (n * 7919 + k) as u64);
                        let idx = indices(n, k, codes, &mut rng);
                        let (want_offsets, want_rows) = ema::group_by_code(&idx, k);
                        let want_offsets: Vec<u64> =
                            want_offsets.into_iter().map(|o| o as u64).collect();
                        let i_d = g.upload("indices", &idx).unwrap();
                        let mut o_d = g.upload("offsets", &vec![u64::MAX; k + 3]).unwrap();
                        let mut r_d = g.upload("rows", &vec![GARBAGE; n + 2]).unwrap();
                        sort::group_by_code(g, &i_d, n, k, &mut o_d, &mut r_d, &mut scratch)
                            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                        let offsets = g.download("offsets", &o_d).unwrap();
                        let rows = g.download("rows", &r_d).unwrap();
                        assert_same(&format!("{ctx}: offsets"), &offsets[..=k], &want_offsets);
                        assert_untouched(&format!("{ctx}: offsets"), &offsets, k + 1, u64::MAX);
                        assert_same(&format!("{ctx}: rows"), &rows[..n], &want_rows);
                        assert_untouched(&format!("{ctx}: rows"), &rows, n, GARBAGE);
                    }
                }
            }
        }
    }

    /// Buffers too small, no codes, and no rows: errors before any launch, or all-zero offsets.
    fn group_by_code_checks_its_arguments<G>(test, dev) {
        let backend = dev.backend(Precision::Exact);
        let g = backend.gpu();
        let mut scratch = SortScratch::<G>::new();
        let idx = g.upload("indices", &[0u32, 2, 1]).unwrap();
        let mut offsets = g.alloc_zeros::<u64>("offsets", 3).unwrap();
        let mut rows = g.alloc_zeros::<u32>("rows", 3).unwrap();
        let err = sort::group_by_code(g, &idx, 3, 3, &mut offsets, &mut rows, &mut scratch);
        assert!(matches!(err, Err(vqx::Error::Shape { .. })), "{test}: short offsets: {err:?}");
        let mut offsets = g.alloc_zeros::<u64>("offsets", 4).unwrap();
        let err = sort::group_by_code(g, &idx, 4, 3, &mut offsets, &mut rows, &mut scratch);
        assert!(matches!(err, Err(vqx::Error::Shape { .. })), "{test}: short indices: {err:?}");
        let err = sort::group_by_code(g, &idx, 3, 0, &mut offsets, &mut rows, &mut scratch);
        assert!(matches!(err, Err(vqx::Error::InvalidArgument(_))), "{test}: K = 0: {err:?}");
        // N = 0: every offset is written, and is 0.
        let mut offsets = g.upload("offsets", &[7u64; 6]).unwrap();
        sort::group_by_code(g, &idx, 0, 5, &mut offsets, &mut rows, &mut scratch).unwrap();
        assert_same(&format!("{test}: N = 0"), &g.download("o", &offsets).unwrap(), &[0; 6]);
    }

    fn compact_matches_cpu<G>(test, dev) {
        let backend = dev.backend(Precision::Exact);
        let g = backend.gpu();
        let mut scratch = SortScratch::<G>::new();
        // 2,048 = one compaction tile (256 threads × 8).
        for n in [1usize, 255, 257, 2_048, 2_049, 100_000] {
            for (name, density) in [("all zero", 0.0), ("sparse", 0.01), ("half", 0.5), ("all one", 1.0)] {
                for seed in SEEDS {
                    let ctx = format!("{test}: n={n} {name} seed={seed}");
                    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ n as u64);
                    // Any non-zero value is a set flag.
                    let flags: Vec<u32> = (0..n)
                        .map(|_| if rng.gen_bool(density) { rng.gen_range(1..=u32::MAX) } else { 0 })
                        .collect();
                    let want: Vec<u32> = (0..n as u32).filter(|&i| flags[i as usize] != 0).collect();
                    let f_d = g.upload("flags", &flags).unwrap();
                    let mut out = g.upload("out", &vec![GARBAGE; n + 1]).unwrap();
                    let mut count = g.upload("count", &[GARBAGE, GARBAGE]).unwrap();
                    sort::compact(g, &f_d, n, &mut out, &mut count, &mut scratch)
                        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                    let count = g.download("count", &count).unwrap();
                    let out = g.download("out", &out).unwrap();
                    assert_same(&format!("{ctx}: count"), &count, &[want.len() as u32, GARBAGE]);
                    assert_same(&format!("{ctx}: ids"), &out[..want.len()], &want);
                    assert_untouched(&format!("{ctx}: ids"), &out, want.len(), GARBAGE);
                }
            }
        }
        // n = 0 leaves a count of 0; too small an output is refused.
        let f_d = g.upload("flags", &[1u32, 0, 1]).unwrap();
        let mut out = g.alloc_zeros::<u32>("out", 2).unwrap();
        let mut count = g.upload("count", &[9u32]).unwrap();
        sort::compact(g, &f_d, 0, &mut out, &mut count, &mut scratch).unwrap();
        assert_eq!(g.download("count", &count).unwrap(), [0], "{test}: n = 0");
        let err = sort::compact(g, &f_d, 3, &mut out, &mut count, &mut scratch);
        assert!(matches!(err, Err(vqx::Error::Shape { .. })), "{test}: short output: {err:?}");
    }

    /// Dead-code detection on the device: flags_below → compact → gather_counted, the count
    /// never leaving the device until the test reads it.
    fn flags_below_compact_gather_match_cpu<G>(test, dev) {
        let backend = dev.backend(Precision::Exact);
        let g = backend.gpu();
        let mut scratch = SortScratch::<G>::new();
        for n in [1usize, 255, 257, 10_000] {
            for seed in SEEDS {
                let ctx = format!("{test}: n={n} seed={seed}");
                let mut rng = ChaCha8Rng::seed_from_u64(seed + n as u64);
                let threshold = 0.25f32;
                let mut v: Vec<f32> = (0..n).map(|_| rng.gen_range(0.0f32..1.0)).collect();
                // NaN is never below; the threshold itself is not below it.
                v[n / 2] = f32::NAN;
                v[n / 3] = threshold;
                let want_flags: Vec<u32> = v.iter().map(|&x| u32::from(x < threshold)).collect();
                let want_ids: Vec<u32> = (0..n as u32).filter(|&i| v[i as usize] < threshold).collect();
                let src: Vec<u32> = (0..n).map(|_| rng.r#gen()).collect();
                let want_gathered: Vec<u32> = want_ids.iter().map(|&i| src[i as usize]).collect();

                let v_d = g.upload("values", &v).unwrap();
                let mut flags = g.upload("flags", &vec![GARBAGE; n]).unwrap();
                sort::flags_below(g, &v_d, threshold, n, &mut flags).unwrap();
                assert_same(&format!("{ctx}: flags"), &g.download("f", &flags).unwrap(), &want_flags);
                let mut ids = g.alloc_zeros::<u32>("ids", n).unwrap();
                let mut count = g.alloc_zeros::<u32>("count", 1).unwrap();
                sort::compact(g, &flags, n, &mut ids, &mut count, &mut scratch).unwrap();
                let src_d = g.upload("src", &src).unwrap();
                let mut out = g.upload("out", &vec![GARBAGE; n]).unwrap();
                sort::gather_counted(g, &src_d, &ids, &count, &mut out).unwrap();
                let out = g.download("out", &out).unwrap();
                assert_same(&format!("{ctx}: gathered"), &out[..want_ids.len()], &want_gathered);
                assert_untouched(&format!("{ctx}: gathered"), &out, want_ids.len(), GARBAGE);
            }
        }
        // The count is capped by the output's length; an index past the source gives u32::MAX.
        let src = g.upload("src", &[10u32, 11, 12]).unwrap();
        let idx = g.upload("idx", &[2u32, 7, 0, 1]).unwrap();
        let count = g.upload("count", &[4u32]).unwrap();
        let mut out = g.upload("out", &[GARBAGE; 3]).unwrap();
        sort::gather_counted(g, &src, &idx, &count, &mut out).unwrap();
        assert_same(&format!("{test}: capped"), &g.download("o", &out).unwrap(), &[12, u32::MAX, 10]);
    }

    /// The sort + ema_sums_sorted_f32 on the device equal the CPU twin bit for bit, directly
    /// through the launcher (one scratch for all shapes) and through the backend, whose
    /// deterministic code_sums uploads only x and the indices.
    fn code_sums_deterministic_matches_cpu<G>(test, dev) {
        let backend = dev.backend(Precision::Exact);
        let g = backend.gpu();
        let mut scratch = SortScratch::<G>::new();
        let shapes = [(1usize, 1usize, 1usize), (257, 13, 255), (1_000, 300, 3), (2_000, 7, 4_096), (300, 5, 8_192)];
        for (n, d, k) in shapes {
            for codes in [Codes::Uniform, Codes::Skewed, Codes::One] {
                for seed in SEEDS {
                    let ctx = format!("{test}: N={n} D={d} K={k} {codes:?} seed={seed}");
                    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (n * 31 + d * 7 + k) as u64);
                    let data: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                    let x = Matrix::new(data, n, d).unwrap();
                    let idx = indices(n, k, codes, &mut rng);
                    let want = ema::cpu(x.as_ref(), &idx, k, SumMode::Deterministic);
                    let want_bits: Vec<u32> = want.sums.iter().map(|v| v.to_bits()).collect();

                    let x_d = g.upload("x", x.data()).unwrap();
                    let i_d = g.upload("indices", &idx).unwrap();
                    let mut sums = g.alloc_zeros::<f32>("sums", k * d).unwrap();
                    let mut counts = g.alloc_zeros::<u32>("counts", k).unwrap();
                    sort::code_sums_deterministic(g, &x_d, &i_d, n, d, k, &mut sums, &mut counts, &mut scratch)
                        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                    let bits: Vec<u32> =
                        g.download("sums", &sums).unwrap().iter().map(|v| v.to_bits()).collect();
                    assert_same(&format!("{ctx}: launcher sums (f32 bits)"), &bits, &want_bits);
                    assert_same(&format!("{ctx}: launcher counts"), &g.download("c", &counts).unwrap(), &want.counts);

                    let before = backend.transfers();
                    let got = backend.code_sums(x.as_ref(), &idx, k, SumMode::Deterministic).unwrap();
                    let moved = backend.transfers().since(before);
                    let bits: Vec<u32> = got.sums.iter().map(|v| v.to_bits()).collect();
                    assert_same(&format!("{ctx}: backend sums (f32 bits)"), &bits, &want_bits);
                    assert_same(&format!("{ctx}: backend counts"), &got.counts, &want.counts);
                    // In: x and the indices only (no offsets, no row ids); out: sums and counts.
                    assert_eq!(moved.h2d_bytes, (4 * (n * d + n)) as u64, "{ctx}: bytes in");
                    assert_eq!(moved.d2h_bytes, (4 * (k * d + k)) as u64, "{ctx}: bytes out");
                }
            }
        }
        // Buffers too small for the shape are refused before anything runs.
        let x_d = g.upload("x", &[1.0f32; 6]).unwrap();
        let i_d = g.upload("indices", &[0u32, 1, 1]).unwrap();
        let mut sums = g.alloc_zeros::<f32>("sums", 3).unwrap();
        let mut counts = g.alloc_zeros::<u32>("counts", 2).unwrap();
        let err = sort::code_sums_deterministic(g, &x_d, &i_d, 3, 2, 2, &mut sums, &mut counts, &mut scratch);
        assert!(matches!(err, Err(vqx::Error::Shape { .. })), "{test}: short sums: {err:?}");
    }
}
