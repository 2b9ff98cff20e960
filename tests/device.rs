//! Data resident on the device (src/backend/cuda/resident.rs) and the device recheck
//! (kernels/recheck.cu, kernels/rows.cu), against their CPU twins, on every device
//! (`t::emu` always, `t::gpu` where there is one).
//!
//! Tolerances: the per-row kernels are bit-identical to their twins — `row_norms_f32` and
//! `normalize_rows_f32` to `Prepared`'s norms and `nearest::normalize_rows` (f64, sequential),
//! `nearest_exact_f64` to `nearest::exact_row` (the same order of f64 operations),
//! `nearest_rows_f32` to `nearest_f32`'s raw candidates (fmaf in increasing d); the device search
//! returns the CPU's indices on every row, distances within 1e-5 + 1e-5·|cpu| (f32 scores) or
//! 1e-6 relative of the exact distance (tf32/bf16), and moves no byte across the bus.

#[macro_use]
mod common;

use common::devices::{Dev, EMU, real_gpu};
use common::{random_matrix, shifted};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use vqx::backend::cuda::launch::{self, NearestOperands, RowList};
use vqx::backend::cuda::{DeviceAssignment, DeviceCodebook, DeviceMatrix, Gpu};
use vqx::backend::{Backend, CpuBackend};
use vqx::nearest::{self, Metric, Precision, Prepared};
use vqx::{Error, MatRef, Matrix};

/// (N, D, K) straddling the tiles (128 rows and codes, 8 dimensions, 256 recheck threads).
#[rustfmt::skip]
const SHAPES: [(usize, usize, usize); 6] = [
    (1, 1, 1), (127, 9, 255), (129, 17, 257), (300, 64, 1000), (200, 129, 300), (64, 4, 3),
];

/// Every row id 0..n as a device list.
fn all_rows<G: Gpu>(gpu: &G, n: usize) -> (G::Buf<u32>, G::Buf<u32>) {
    let rows: Vec<u32> = (0..n as u32).collect();
    (
        gpu.upload("rows", &rows).unwrap(),
        gpu.upload("count", &[n as u32]).unwrap(),
    )
}

on_devices! {
    /// row_norms_f32 and normalize_rows_f32 against `Prepared` and `nearest::normalize_rows`,
    /// bit for bit; the largest norm against the f64 maximum.
    fn row_kernels_match_their_twins<G>(test, dev) {
        let b = dev.backend(Precision::Exact);
        let gpu = b.gpu();
        for seed in [1u64, 2, 3] {
            for &(k, d) in &[(1usize, 1usize), (127, 7), (129, 33), (1000, 64)] {
                let mut rng = ChaCha8Rng::seed_from_u64(seed * 1000 + k as u64);
                let mut c = random_matrix(k, d, &mut rng);
                c.data_mut()[..d].iter_mut().for_each(|v| *v = 0.0); // a zero code
                let ctx = format!("{test}: K={k} D={d} seed={seed}");
                let cb = DeviceCodebook::upload(gpu, c.as_ref(), Metric::L2).unwrap();
                let got = gpu.download("norms", cb.norms()).unwrap();
                let want = Prepared::new(c.as_ref(), Metric::L2);
                for (i, (g, w)) in got.iter().zip(want.norms()).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "{ctx}: norm {i}: device {g} cpu {w}");
                }
                let cos = DeviceCodebook::upload(gpu, c.as_ref(), Metric::Cosine).unwrap();
                let got = cos.scored().download(gpu, "normalised").unwrap();
                let want = nearest::normalize_rows(c.as_ref());
                for (i, (g, w)) in got.data().iter().zip(want.data()).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "{ctx}: normalised value {i}: device {g} cpu {w}");
                }
                let mut norms = gpu.alloc_zeros::<f32>("norms", k).unwrap();
                let mut max = gpu.alloc_zeros::<u64>("max", 1).unwrap();
                launch::row_norms(gpu, cb.rows().buf(), &mut norms, &mut max, k, d).unwrap();
                let got = f64::from_bits(gpu.download("max", &max).unwrap()[0]);
                let want = (0..k)
                    .map(|r| c.row(r).iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt())
                    .fold(0.0, f64::max);
                assert_eq!(got, want, "{ctx}: largest norm");
            }
        }
    }
}

on_devices! {
    /// nearest_exact_f64 over every row equals `nearest::exact_row` bit for bit (index and
    /// distance), L2 and cosine, with duplicate codes (ties → the smaller index).
    fn exact_pass_matches_exact_row<G>(test, dev) {
        let b = dev.backend(Precision::Exact);
        let gpu = b.gpu();
        for metric in [Metric::L2, Metric::Cosine] {
            for (seed, &(n, d, k)) in SHAPES.iter().enumerate() {
                let mut rng = ChaCha8Rng::seed_from_u64(seed as u64 + 10);
                let x = random_matrix(n, d, &mut rng);
                let mut c = random_matrix(k, d, &mut rng);
                if k > 2 {
                    let dup = c.row(0).to_vec();
                    c.data_mut()[2 * d..3 * d].copy_from_slice(&dup);
                }
                let ctx = format!("{test}: {metric} N={n} D={d} K={k}");
                let xd = DeviceMatrix::upload(gpu, "x", x.as_ref()).unwrap();
                let cd = DeviceMatrix::upload(gpu, "codebook", c.as_ref()).unwrap();
                let (rows, count) = all_rows(gpu, n);
                let mut idx = gpu.alloc_zeros::<u32>("idx", n).unwrap();
                let mut dist = gpu.alloc_zeros::<f32>("dist", n).unwrap();
                launch::nearest_exact(
                    gpu, xd.buf(), cd.buf(), &rows, &count, &mut idx, &mut dist, (n, k, d), metric,
                )
                .unwrap();
                let (idx, dist) = (gpu.download("idx", &idx).unwrap(), gpu.download("dist", &dist).unwrap());
                for r in 0..n {
                    let (wk, wd) = nearest::exact_row(x.row(r), c.as_ref(), metric);
                    assert_eq!(idx[r], wk, "{ctx}: row {r}: device index {} cpu {wk}", idx[r]);
                    assert_eq!(
                        dist[r].to_bits(),
                        (wd as f32).to_bits(),
                        "{ctx}: row {r}: device distance {} cpu {}",
                        dist[r],
                        wd as f32
                    );
                }
            }
        }
    }
}

on_devices! {
    /// nearest_rows_f32 over every row gives nearest_f32's raw candidates bit for bit.
    fn rescore_pass_matches_nearest_f32<G>(test, dev) {
        let b = dev.backend(Precision::Exact);
        let gpu = b.gpu();
        for (seed, &(n, d, k)) in SHAPES.iter().enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(seed as u64 + 20);
            let (x, c) = (random_matrix(n, d, &mut rng), random_matrix(k, d, &mut rng));
            let ctx = format!("{test}: N={n} D={d} K={k}");
            let prepared = Prepared::new(c.as_ref(), Metric::L2);
            let want = b.candidates(x.as_ref(), c.as_ref(), &prepared).unwrap();
            let xd = DeviceMatrix::upload(gpu, "x", x.as_ref()).unwrap();
            let cb = DeviceCodebook::upload(gpu, c.as_ref(), Metric::L2).unwrap();
            let (rows, count) = all_rows(gpu, n);
            let mut best = gpu.alloc_zeros::<u32>("best", n).unwrap();
            let mut bs = gpu.alloc_zeros::<f32>("best score", n).unwrap();
            let mut ss = gpu.alloc_zeros::<f32>("second score", n).unwrap();
            let op = NearestOperands { x: xd.buf(), codebook: cb.scored().buf(), norms: cb.norms(), n, k, d };
            launch::nearest_rows(gpu, &op, &rows, &count, &mut best, &mut bs, &mut ss).unwrap();
            let best = gpu.download("best", &best).unwrap();
            let bs = gpu.download("best score", &bs).unwrap();
            let ss = gpu.download("second score", &ss).unwrap();
            for r in 0..n {
                assert_eq!(best[r], want.best[r], "{ctx}: row {r}: rescore index {} nearest_f32 {}", best[r], want.best[r]);
                assert_eq!(bs[r].to_bits(), want.best_score[r].to_bits(), "{ctx}: row {r}: rescore best {} nearest_f32 {}", bs[r], want.best_score[r]);
                assert_eq!(ss[r].to_bits(), want.second_score[r].to_bits(), "{ctx}: row {r}: rescore runner-up {} nearest_f32 {}", ss[r], want.second_score[r]);
            }
            // An empty list touches nothing.
            let zero = gpu.upload("count", &[0u32]).unwrap();
            let before = gpu.download("best", &best_buf(gpu, &best)).unwrap();
            let mut b2 = best_buf(gpu, &best);
            launch::nearest_rows(gpu, &op, &rows, &zero, &mut b2, &mut gpu.alloc_zeros("s", n).unwrap(), &mut gpu.alloc_zeros("s", n).unwrap()).unwrap();
            assert_eq!(gpu.download("best", &b2).unwrap(), before, "{ctx}: empty list");
        }
    }
}

fn best_buf<G: Gpu>(gpu: &G, v: &[u32]) -> G::Buf<u32> {
    gpu.upload("best", v).unwrap()
}

on_devices! {
    /// The whole device search (scoring, flag pass, rescore, f64 pass) gives the CPU's indices
    /// at every precision and metric, on uniform and shifted data (shift 30: most margins are
    /// inside the bound), moving nothing across the bus; the output is reused across calls.
    fn device_search_matches_cpu<G>(test, dev) {
        let cpu = CpuBackend::new();
        for precision in Precision::ALL {
            let b = dev.backend(precision);
            let gpu = b.gpu();
            for metric in [Metric::L2, Metric::Cosine] {
                for &(n, d, k) in &SHAPES {
                    let mut out = DeviceAssignment::new(gpu, n).unwrap();
                    for (seed, shift) in [(1u64, 0.0f32), (2, 30.0)] {
                        let mut rng = ChaCha8Rng::seed_from_u64(seed * 7 + (n * d * k) as u64);
                        let x = shifted(random_matrix(n, d, &mut rng), shift);
                        let c = shifted(random_matrix(k, d, &mut rng), shift);
                        let ctx = format!("{test}: {precision} {metric} N={n} D={d} K={k} shift={shift}");
                        let xd = DeviceMatrix::upload(gpu, "x", x.as_ref()).unwrap();
                        let cb = DeviceCodebook::upload(gpu, c.as_ref(), metric).unwrap();
                        let before = gpu.transfers();
                        b.nearest_device(&xd, &cb, &mut out).unwrap();
                        let moved = gpu.transfers().since(before);
                        assert_eq!((moved.h2d_bytes, moved.d2h_bytes), (0, 0), "{ctx}: bytes moved");
                        let got = out.fetch(gpu).unwrap();
                        let want = cpu.nearest(x.as_ref(), c.as_ref(), metric).unwrap();
                        for r in 0..n {
                            assert_eq!(
                                got.indices[r], want.indices[r],
                                "{ctx}: row {r}: device index {} cpu {} (distances {} {})",
                                got.indices[r], want.indices[r], got.distances[r], want.distances[r]
                            );
                            let exact = nearest::exact_distance(x.row(r), c.row(want.indices[r] as usize), metric) as f32;
                            let ok = if precision == Precision::Exact {
                                (got.distances[r] - want.distances[r]).abs() <= 1e-5 + 1e-5 * want.distances[r].abs()
                            } else {
                                (got.distances[r] - exact).abs() <= 1e-7 + 1e-6 * exact.abs()
                            };
                            assert!(ok, "{ctx}: row {r}: device distance {} cpu {} exact {exact}", got.distances[r], want.distances[r]);
                        }
                        assert!(got.rechecked <= n, "{ctx}: rechecked {}", got.rechecked);
                    }
                }
            }
        }
    }
}

on_devices! {
    /// Shifted data (offset 100) puts most margins inside the f32 bound: the f64 pass must
    /// run, and it must be what makes the indices right.
    fn device_recheck_does_the_work<G>(test, dev) {
        let b = dev.backend(Precision::Exact);
        let gpu = b.gpu();
        let (n, d, k) = (256usize, 32usize, 300usize);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let x = shifted(random_matrix(n, d, &mut rng), 100.0);
        let c = shifted(random_matrix(k, d, &mut rng), 100.0);
        let xd = DeviceMatrix::upload(gpu, "x", x.as_ref()).unwrap();
        let cb = DeviceCodebook::upload(gpu, c.as_ref(), Metric::L2).unwrap();
        let mut out = DeviceAssignment::new(gpu, n).unwrap();
        b.nearest_device(&xd, &cb, &mut out).unwrap();
        let got = out.fetch(gpu).unwrap();
        assert!(got.rechecked > n / 10, "{test}: only {} of {n} rows rechecked", got.rechecked);
        let raw = b.candidates(x.as_ref(), c.as_ref(), &Prepared::new(c.as_ref(), Metric::L2)).unwrap();
        let mut fixed = 0;
        for r in 0..n {
            let (want, _) = nearest::exact_row(x.row(r), c.as_ref(), Metric::L2);
            assert_eq!(got.indices[r], want, "{test}: row {r}: device {} exact {want}", got.indices[r]);
            fixed += usize::from(raw.best[r] != want);
        }
        assert!(fixed > 0, "{test}: the f32 scores were right on every row: the data does not exercise the recheck");
    }
}

on_devices! {
    /// Bad device inputs are errors naming what is wrong, never launches on short buffers.
    fn device_inputs_are_validated<G>(test, dev) {
        let b = dev.backend(Precision::Exact);
        let gpu = b.gpu();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (x, c) = (random_matrix(10, 4, &mut rng), random_matrix(5, 3, &mut rng));
        let xd = DeviceMatrix::upload(gpu, "x", x.as_ref()).unwrap();
        let cb = DeviceCodebook::upload(gpu, c.as_ref(), Metric::L2).unwrap();
        let mut out = DeviceAssignment::new(gpu, 10).unwrap();
        let e = b.nearest_device(&xd, &cb, &mut out).unwrap_err();
        assert!(matches!(e, Error::Shape { .. }), "{test}: width mismatch: {e}");
        let c4 = random_matrix(5, 4, &mut rng);
        let cb4 = DeviceCodebook::upload(gpu, c4.as_ref(), Metric::L2).unwrap();
        let mut short = DeviceAssignment::new(gpu, 9).unwrap();
        let e = b.nearest_device(&xd, &cb4, &mut short).unwrap_err();
        assert!(e.to_string().contains("room for 10 rows"), "{test}: short output: {e}");
        let buf = gpu.alloc_zeros::<f32>("buf", 7).unwrap();
        let e = DeviceMatrix::from_buf(gpu, buf, 2, 4).err().expect("7 values are not 2 × 4");
        assert!(matches!(e, Error::Shape { .. }), "{test}: from_buf: {e}");
        let empty = Matrix::zeros(0, 4);
        assert!(DeviceCodebook::upload(gpu, empty.as_ref(), Metric::L2).is_err(), "{test}: empty codebook");
        let mut bad = x.clone();
        bad.data_mut()[2 * 4 + 3] = f32::NEG_INFINITY;
        let bd = DeviceMatrix::upload(gpu, "x", bad.as_ref()).unwrap();
        match bd.check_finite(gpu, "input") {
            Err(Error::NonFinite { row, col, value, .. }) => {
                assert_eq!((row, col), (2, 3), "{test}: position");
                assert_eq!(value, f32::NEG_INFINITY, "{test}: value");
            }
            other => panic!("{test}: expected a non-finite error, got {other:?}"),
        }
        let max = xd.check_finite(gpu, "input").unwrap();
        let want = x.data().iter().fold(0f32, |a, &v| a.max(v.abs()));
        assert_eq!(max, want, "{test}: largest magnitude");
        let ok = MatRef::new(&[0.0f32; 4], 1, 4).unwrap();
        let mut m = DeviceMatrix::zeros(gpu, "m", 2, 4).unwrap();
        assert!(m.write(gpu, "m", ok).is_err(), "{test}: write of the wrong shape");
        let list = gpu.alloc_zeros::<u32>("list", 3).unwrap();
        let count = gpu.alloc_zeros::<u32>("count", 1).unwrap();
        let (mut i, mut dd) = (gpu.alloc_zeros::<u32>("i", 10).unwrap(), gpu.alloc_zeros::<f32>("d", 10).unwrap());
        let e = launch::nearest_exact(gpu, xd.buf(), cb4.rows().buf(), &list, &count, &mut i, &mut dd, (10, 5, 4), Metric::L2).unwrap_err();
        assert!(e.to_string().contains("listed rows"), "{test}: short list: {e}");
        let _ = RowList::<G> { rows: &list, count: &count };
    }
}

/// A caller's own memory used in place (`DeviceMatrix::from_raw`): on the emulated device a host
/// pointer. The search reads it without a copy and dropping the matrix leaves it to its owner.
#[test]
fn borrowed_memory_is_used_in_place_emu() {
    let b = EMU.backend(Precision::Exact);
    let gpu = b.gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (n, d, k) = (100usize, 8usize, 20usize);
    let (x, c) = (random_matrix(n, d, &mut rng), random_matrix(k, d, &mut rng));
    let mut caller = x.data().to_vec();
    let cb = DeviceCodebook::upload(gpu, c.as_ref(), Metric::L2).unwrap();
    let mut out = DeviceAssignment::new(gpu, n).unwrap();
    let before = gpu.transfers();
    {
        // SAFETY: `caller` holds n·d floats and is not touched while `xd` lives.
        let xd = unsafe { DeviceMatrix::from_raw(gpu, caller.as_mut_ptr() as u64, n, d) }.unwrap();
        b.nearest_device(&xd, &cb, &mut out).unwrap();
    }
    assert_eq!(
        gpu.transfers().since(before).h2d_bytes,
        0,
        "borrowed rows were copied"
    );
    assert_eq!(caller, x.data(), "the caller's memory changed");
    caller.push(1.0); // still the caller's allocation: growing it must work
    let want = CpuBackend::new()
        .nearest(x.as_ref(), c.as_ref(), Metric::L2)
        .unwrap();
    assert_eq!(out.fetch(gpu).unwrap().indices, want.indices);
    // SAFETY: a null pointer is refused before anything is wrapped.
    assert!(unsafe { DeviceMatrix::from_raw(gpu, 0, 1, 1) }.is_err());
}

/// On a real GPU: vqx launched on the caller's own stream, reading the caller's allocation
/// through its raw device pointer.
#[test]
fn caller_stream_and_memory_gpu() {
    use cudarc::driver::DevicePtr;
    use vqx::backend::cuda::{CudaGpu, GpuBackend};
    let test = "caller_stream_and_memory_gpu";
    if real_gpu(test).is_none() {
        return;
    }
    let ctx = cudarc::driver::CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let b = GpuBackend::on(CudaGpu::on_stream(stream.clone()).unwrap());
    let gpu = b.gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (n, d, k) = (1000usize, 32usize, 64usize);
    let (x, c) = (random_matrix(n, d, &mut rng), random_matrix(k, d, &mut rng));
    let caller = stream.clone_htod(x.data()).unwrap();
    let (ptr, _sync) = caller.device_ptr(&stream);
    let cb = DeviceCodebook::upload(gpu, c.as_ref(), Metric::L2).unwrap();
    let mut out = DeviceAssignment::new(gpu, n).unwrap();
    {
        // SAFETY: `caller` holds n·d floats on this context and outlives `xd`.
        let xd = unsafe { DeviceMatrix::from_raw(gpu, ptr, n, d) }.unwrap();
        b.nearest_device(&xd, &cb, &mut out).unwrap();
    }
    let want = CpuBackend::new()
        .nearest(x.as_ref(), c.as_ref(), Metric::L2)
        .unwrap();
    assert_eq!(out.fetch(gpu).unwrap().indices, want.indices, "{test}");
    assert_eq!(
        stream.clone_dtoh(&caller).unwrap(),
        x.data(),
        "{test}: caller's memory"
    );
}

on_devices! {
    /// `Gpu::gemm` in every transpose combination, overwriting and accumulating, against the
    /// CPU's `matmul` (the emulated device runs that very function: bit for bit; cuBLAS on a GPU
    /// sums in another order: 1e-5 relative of the sum of |terms|). Shapes that do not chain
    /// are errors.
    fn gemm_matches_matmul<G>(test, dev) {
        use vqx::backend::cuda::GemmShape;
        use vqx::model::matmul::matmul;
        let b = dev.backend(Precision::Exact);
        let gpu = b.gpu();
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        for &(m, n, k) in &[(1usize, 1usize, 1usize), (7, 5, 3), (129, 33, 65), (256, 64, 256)] {
            for (ta, tb, acc) in [(false, false, false), (false, true, true), (true, false, true), (true, true, false)] {
                let ctx = format!("{test}: m={m} n={n} k={k} ta={ta} tb={tb} accumulate={acc}");
                let a = random_matrix(if ta { k } else { m }, if ta { m } else { k }, &mut rng);
                let bm = random_matrix(if tb { n } else { k }, if tb { k } else { n }, &mut rng);
                let c0 = random_matrix(m, n, &mut rng);
                let mut want = c0.data().to_vec();
                matmul(&mut want, a.as_ref(), ta, bm.as_ref(), tb, acc);
                let shape = GemmShape { a: (a.rows(), a.cols()), ta, b: (bm.rows(), bm.cols()), tb, accumulate: acc };
                let (ad, bd) = (gpu.upload("a", a.data()).unwrap(), gpu.upload("b", bm.data()).unwrap());
                let mut cd = gpu.upload("c", c0.data()).unwrap();
                gpu.gemm(shape, &mut cd, &ad, &bd).unwrap();
                let got = gpu.download("c", &cd).unwrap();
                for i in 0..m * n {
                    let ok = if dev.emulated {
                        got[i].to_bits() == want[i].to_bits()
                    } else {
                        (got[i] - want[i]).abs() <= 1e-5 * (k as f32 + 1.0)
                    };
                    assert!(ok, "{ctx}: element {i}: device {} cpu {}", got[i], want[i]);
                }
            }
        }
        let (a, c) = (gpu.upload("a", &[0.0f32; 6]).unwrap(), gpu.upload("b", &[0.0f32; 6]).unwrap());
        let mut out = gpu.alloc_zeros::<f32>("c", 4).unwrap();
        let bad = GemmShape { a: (2, 3), ta: false, b: (2, 3), tb: false, accumulate: false };
        assert!(matches!(gpu.gemm(bad, &mut out, &a, &c), Err(Error::Shape { .. })), "{test}: inner dimensions");
    }
}

on_devices! {
    /// Copies into, within and out of device buffers check their ranges on every device (the
    /// trait checks once; each device only copies), and copy what they say.
    fn buffer_copies_check_their_ranges<G>(test, dev) {
        let b = dev.backend(Precision::Exact);
        let gpu = b.gpu();
        let mut buf = gpu.upload("buf", &[1.0f32, 2.0, 3.0, 4.0]).unwrap();
        let mut other = gpu.alloc_zeros::<f32>("other", 3).unwrap();
        let e = gpu.write("w", &mut other, &[0.0; 4]).unwrap_err();
        assert!(e.to_string().contains("writing w: 4 elements into a buffer of 3"), "{test}: {e}");
        let e = gpu.copy_range("c", &buf, 2, &mut other, 0, 3).unwrap_err();
        assert!(e.to_string().contains("copying c: 3 elements from 2 of 4 to 0 of 3"), "{test}: {e}");
        assert!(gpu.copy_range("c", &buf, 0, &mut other, 1, 3).is_err(), "{test}: past dst");
        assert!(gpu.copy_range("c", &buf, usize::MAX, &mut other, 0, 2).is_err(), "{test}: overflow");
        let e = gpu.read("r", &buf, 3, 2).unwrap_err();
        assert!(e.to_string().contains("reading r: elements 3..+2 of a buffer of 4"), "{test}: {e}");
        gpu.copy_range("c", &buf, 1, &mut other, 0, 3).unwrap();
        assert_eq!(gpu.download("other", &other).unwrap(), vec![2.0, 3.0, 4.0], "{test}");
        gpu.write("w", &mut buf, &[9.0, 8.0]).unwrap();
        assert_eq!(gpu.read("r", &buf, 1, 3).unwrap(), vec![8.0, 3.0, 4.0], "{test}");
    }
}
