//! The quantizer layer with its state on the device (`DeviceQuantizer`) against the CPU layer
//! (`VectorQuantizer` on `--device cpu`), step by step, on every device (`t::emu` always,
//! `t::gpu` where there is one).
//!
//! Tolerances: indices identical on every row (both searches are exact); in deterministic mode
//! the codebook, EMA counts and sums and usage totals bit for bit after every step (the same
//! order of operations, f64 sums rounded once); gradients bit for bit; perplexity within
//! 1e-12 relative (a device `log`); losses within 1e-6 relative (a different f64 summation
//! order, rounded to f32). Bytes across the bus per training step are counted and bounded.

#[macro_use]
mod common;

use common::devices::{Dev, EMU, assert_bits, real_gpu};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use vqx::backend::Device;
use vqx::backend::cuda::{DeviceMatrix, Gpu};
use vqx::nearest::{Metric, Precision};
use vqx::quantizer::{
    CodebookLearning, DeviceQuantizer, Estimator, Init, QuantizerConfig, VectorQuantizer,
};
use vqx::{Error, MatRef, Matrix};

fn clustered(n: usize, d: usize, rng: &mut ChaCha8Rng) -> Matrix {
    let centres: Vec<f32> = (0..8 * d).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
    let mut data = Vec::with_capacity(n * d);
    for _ in 0..n {
        let c = rng.gen_range(0..8usize);
        for i in 0..d {
            data.push(centres[c * d + i] + rng.gen_range(-0.5f32..0.5));
        }
    }
    Matrix::new(data, n, d).unwrap()
}

/// `n` clustered rows from `seed`, and their first `k` as a codebook.
fn data_and_codebook(n: usize, d: usize, k: usize, seed: u64) -> (Matrix, Matrix) {
    let data = clustered(n, d, &mut ChaCha8Rng::seed_from_u64(seed));
    let codebook = data.as_ref().slice_rows(0, k).to_owned();
    (data, codebook)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// Runs `steps` training steps (optionally masked) on both layers and compares everything
/// after each; returns how many codes were re-seeded in all.
fn compare<G: Gpu>(
    test: &str,
    dev: &Dev<G>,
    config: QuantizerConfig,
    masked: bool,
    steps: usize,
) -> usize {
    let mut replaced = 0;
    let (k, d) = (config.codebook_size, config.dim);
    let n = 150;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x5eed);
    let data = clustered(4 * n, d, &mut rng);
    let mut on_cpu = VectorQuantizer::new(config.clone().device(Device::Cpu)).unwrap();
    let backend = Arc::new(dev.backend(Precision::Exact));
    let gpu = backend.gpu();
    let mut on_dev = DeviceQuantizer::new(config.clone(), backend.clone()).unwrap();
    for step in 0..steps {
        let ctx = format!(
            "{test}: k={k} d={d} {:?} masked={masked} step {step}",
            config.metric
        );
        let b = (step % 4) * n;
        let x = data.as_ref().slice_rows(b, b + n);
        let mask: Vec<bool> = (0..n).map(|r| !masked || (r * 7 + step) % 5 != 0).collect();
        let flags: Vec<u32> = mask.iter().map(|&m| u32::from(m)).collect();
        let c = on_cpu.forward(x, masked.then_some(&mask), true).unwrap();
        let xd = DeviceMatrix::upload(gpu, "x", x).unwrap();
        let md = gpu.upload("mask", &flags).unwrap();
        let s = on_dev.forward(&xd, masked.then_some(&md), true).unwrap();
        let s = on_dev.stats(s).unwrap();
        assert_eq!(
            gpu.download("indices", on_dev.indices().unwrap()).unwrap(),
            c.indices,
            "{ctx}: indices"
        );
        let (mut gs, cs) = (s.clone(), c.stats.clone());
        assert!(
            (gs.perplexity - cs.perplexity).abs() <= 1e-12 * cs.perplexity,
            "{ctx}: perplexity device {} cpu {}",
            gs.perplexity,
            cs.perplexity
        );
        gs.perplexity = cs.perplexity;
        gs.rechecked = cs.rechecked; // each backend's f32 rounding decides what is rechecked
        assert_eq!(gs, cs, "{ctx}: statistics");
        replaced += cs.replaced;
        let l = on_dev.losses().unwrap();
        assert!(
            (l.commitment - c.commitment_loss).abs() <= 1e-6 * c.commitment_loss.abs() + 1e-12,
            "{ctx}: commitment loss device {} cpu {}",
            l.commitment,
            c.commitment_loss
        );
        assert!(
            (l.codebook - c.codebook_loss).abs() <= 1e-6 * c.codebook_loss.abs() + 1e-12,
            "{ctx}: codebook loss device {} cpu {}",
            l.codebook,
            c.codebook_loss
        );
        assert_bits(
            on_dev
                .quantized()
                .unwrap()
                .download(gpu, "q")
                .unwrap()
                .data(),
            c.quantized.data(),
            &format!("{ctx}: quantized"),
        );
        let (codebook, ema, usage) = on_dev.download().unwrap();
        assert_bits(
            codebook.data(),
            on_cpu.codebook().data(),
            &format!("{ctx}: codebook"),
        );
        if let (Some(e), Some(w)) = (ema, on_cpu.ema()) {
            assert_bits(
                e.cluster_size(),
                w.cluster_size(),
                &format!("{ctx}: EMA counts"),
            );
            assert_bits(
                e.embed_avg().data(),
                w.embed_avg().data(),
                &format!("{ctx}: EMA sums"),
            );
        }
        assert_eq!(usage, on_cpu.usage_total(), "{ctx}: usage totals");

        // Backward: straight-through or rotation with the commitment term (and the codebook
        // gradient under gradient learning), bit for bit.
        let go: Vec<f32> = (0..n * d)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let go = Matrix::new(go, n, d).unwrap();
        let want = on_cpu.backward(&c, x, go.as_ref()).unwrap();
        let god = DeviceMatrix::upload(gpu, "grad", go.as_ref()).unwrap();
        on_dev.backward(&xd, &god).unwrap();
        assert_bits(
            on_dev.grad_x().unwrap().download(gpu, "gx").unwrap().data(),
            want.x.data(),
            &format!("{ctx}: dL/dx"),
        );
        match (&want.codebook, on_dev.grad_codebook()) {
            (Some(w), Some(g)) => assert_bits(
                g.download(gpu, "gc").unwrap().data(),
                w.data(),
                &format!("{ctx}: dL/dC"),
            ),
            (None, None) => {}
            (w, g) => panic!(
                "{ctx}: codebook gradient cpu {} device {}",
                w.is_some(),
                g.is_some()
            ),
        }
        if let Some(gc) = &want.codebook {
            // The caller's optimiser step, applied to both.
            let next: Vec<f32> = on_cpu
                .codebook()
                .data()
                .iter()
                .zip(gc.data())
                .map(|(c, g)| c - 0.5 * g)
                .collect();
            let next = Matrix::new(next, k, d).unwrap();
            on_cpu.set_codebook(next.clone()).unwrap();
            on_dev
                .set_codebook(&DeviceMatrix::upload(gpu, "codebook", next.as_ref()).unwrap())
                .unwrap();
        }
    }
    replaced
}

fn ema(k: usize, d: usize, seed: u64) -> QuantizerConfig {
    QuantizerConfig::new(k, d)
        .learning(CodebookLearning::ema(0.8))
        .dead_code_threshold(0.9)
        .commitment_weight(0.25)
        .deterministic(true)
        .seed(seed)
}

on_devices! {
    /// EMA learning, L2 and cosine, with dead codes re-seeded (threshold 0.9 on clustered data
    /// with more codes than clusters), init from the first batch (data and k-means).
    fn ema_steps_match_cpu<G>(test, dev) {
        for (k, d) in [(1usize, 3usize), (40, 7), (257, 16)] {
            for metric in [Metric::L2, Metric::Cosine] {
                let replaced = compare(test, dev, ema(k, d, 3).metric(metric), false, 5);
                // More codes than batch rows' clusters: dead codes are re-seeded, some steps
                // with more dead codes than rows (the shuffled subset).
                assert!(k < 40 || replaced > 0, "{test}: K={k} {metric}: no code was re-seeded");
            }
        }
        compare(test, dev, ema(40, 9, 4).init(Init::KMeans { iters: 3 }), false, 3);
        // Spherical k-means init, then the cosine step.
        let kmeans = ema(40, 9, 4).init(Init::KMeans { iters: 3 });
        compare(test, dev, kmeans.metric(Metric::Cosine), false, 3);
    }
}

on_devices! {
    /// A mask drops padding rows from every statistic, the EMA update and the gradients.
    fn masked_steps_match_cpu<G>(test, dev) {
        assert!(compare(test, dev, ema(40, 7, 5), true, 4) > 0, "{test}: nothing re-seeded");
        compare(test, dev, ema(40, 7, 6).metric(Metric::Cosine).estimator(Estimator::RotationTrick), true, 3);
    }
}

on_devices! {
    /// Gradient learning: the codebook loss and dL/dC on the device, the caller's optimiser step
    /// installed with `set_codebook`; rotation-trick backward.
    fn gradient_learning_matches_cpu<G>(test, dev) {
        let cfg = |seed| {
            QuantizerConfig::new(30, 6)
                .learning(CodebookLearning::Gradient)
                .commitment_weight(0.25)
                .deterministic(true)
                .seed(seed)
        };
        compare(test, dev, cfg(7), false, 3);
        compare(test, dev, cfg(8).estimator(Estimator::RotationTrick), true, 3);
        // Cosine: the losses and both gradients against x̂, dL/dx back through the normalisation.
        compare(test, dev, cfg(9).metric(Metric::Cosine), true, 3);
    }
}

on_devices! {
    /// What crosses the bus per training step once the codebook exists: a few scalars each way
    /// (the input check, the dead-code count), never O(N·D) data; losses and statistics only
    /// when asked. Fast (atomic) sums, no mask, no dead codes.
    fn a_training_step_moves_only_scalars<G>(test, dev) {
        let (k, d, n) = (64usize, 32usize, 512usize);
        let (data, codebook) = data_and_codebook(n, d, k, 21);
        let cfg = QuantizerConfig::new(k, d).dead_code_threshold(1e-9).seed(1);
        let backend = Arc::new(dev.backend(Precision::Exact));
        let gpu = backend.gpu();
        let mut vq = DeviceQuantizer::with_codebook(cfg, codebook, backend.clone()).unwrap();
        let x = DeviceMatrix::upload(gpu, "x", data.as_ref()).unwrap();
        for step in 0..3 {
            let before = gpu.transfers();
            let s = vq.forward(&x, None, true).unwrap();
            let moved = gpu.transfers().since(before);
            assert_eq!(s.dead, 0, "{test}: step {step}: a dead code would add its re-seeding pairs");
            // The input check (8 bytes in, 12 out) and the dead-code count (4 out).
            assert_eq!(
                (moved.h2d_bytes, moved.d2h_bytes),
                (8, 16),
                "{test}: step {step}: bytes moved for a {n} × {d} batch"
            );
            let before = gpu.transfers();
            vq.stats(s).unwrap();
            vq.losses().unwrap();
            let asked = gpu.transfers().since(before);
            // Usage totals and entropy (24), the recheck count (4), the squared error (8).
            assert_eq!((asked.h2d_bytes, asked.d2h_bytes), (0, 36), "{test}: step {step}: statistics");
        }
        let o = DeviceMatrix::upload(gpu, "grad", data.as_ref()).unwrap();
        let before = gpu.transfers();
        vq.backward(&x, &o).unwrap();
        let moved = gpu.transfers().since(before);
        assert_eq!((moved.h2d_bytes, moved.d2h_bytes), (8, 12), "{test}: backward (the gradient's check)");
    }
}

on_devices! {
    /// Bad input is an error that says what is wrong, and leaves the layer usable.
    fn bad_device_input_is_an_error<G>(test, dev) {
        let (k, d) = (4usize, 3usize);
        let codebook = Matrix::new((0..k * d).map(|v| v as f32).collect(), k, d).unwrap();
        let backend = Arc::new(dev.backend(Precision::Exact));
        let gpu = backend.gpu();
        let mut vq = DeviceQuantizer::with_codebook(QuantizerConfig::new(k, d), codebook, backend.clone()).unwrap();
        let go = DeviceMatrix::upload(gpu, "g", MatRef::new(&[0.0; 6], 2, 3).unwrap()).unwrap();
        let e = vq.backward(&go, &go).unwrap_err();
        assert!(e.to_string().contains("before any forward"), "{test}: {e}");
        assert!(vq.indices().is_err() && vq.quantized().is_err(), "{test}: outputs before a forward pass");
        let mut v = vec![0.5f32; 6];
        v[4] = f32::NAN;
        let bad = DeviceMatrix::upload(gpu, "x", MatRef::new(&v, 2, 3).unwrap()).unwrap();
        match vq.forward(&bad, None, true) {
            Err(Error::NonFinite { row, col, .. }) => assert_eq!((row, col), (1, 1), "{test}"),
            other => panic!("{test}: NaN input gave {other:?}"),
        }
        let wide = DeviceMatrix::upload(gpu, "x", MatRef::new(&[0.5; 8], 2, 4).unwrap()).unwrap();
        assert!(matches!(vq.forward(&wide, None, true), Err(Error::Shape { .. })), "{test}: width");
        let short_mask = gpu.upload("mask", &[1u32]).unwrap();
        let ok = DeviceMatrix::upload(gpu, "x", MatRef::new(&[0.5; 6], 2, 3).unwrap()).unwrap();
        assert!(vq.forward(&ok, Some(&short_mask), true).is_err(), "{test}: short mask");
        assert_eq!(vq.step(), 0, "{test}: failed steps must not count");
        vq.forward(&ok, None, true).unwrap();
        assert_eq!(vq.step(), 1, "{test}");
        let all_masked = gpu.upload("mask", &[0u32, 0]).unwrap();
        let mut fresh = DeviceQuantizer::new(QuantizerConfig::new(k, d), backend.clone()).unwrap();
        let e = fresh.forward(&ok, Some(&all_masked), true).unwrap_err();
        assert!(matches!(e, Error::Empty { .. }), "{test}: all rows masked at init: {e}");
    }
}

/// The device layer resumes a host layer's state (`from_host`) and continues identically.
#[test]
fn from_host_continues_the_cpu_run() {
    let cfg = ema(32, 5, 9);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let data = clustered(400, 5, &mut rng);
    let mut cpu = VectorQuantizer::new(cfg.clone().device(Device::Cpu)).unwrap();
    cpu.forward(data.as_ref().slice_rows(0, 200), None, true)
        .unwrap();
    let backend = Arc::new(EMU.backend(Precision::Exact));
    let gpu = backend.gpu();
    let mut dev = DeviceQuantizer::from_host(&cpu, backend.clone()).unwrap();
    let x = data.as_ref().slice_rows(200, 400);
    let c = cpu.forward(x, None, true).unwrap();
    dev.forward(&DeviceMatrix::upload(gpu, "x", x).unwrap(), None, true)
        .unwrap();
    assert_eq!(
        gpu.download("indices", dev.indices().unwrap()).unwrap(),
        c.indices
    );
    let (codebook, _, usage) = dev.download().unwrap();
    assert_eq!(bits(codebook.data()), bits(cpu.codebook().data()));
    assert_eq!(usage, cpu.usage_total());
    assert_eq!(dev.step(), cpu.step());
}

on_devices! {
    /// Host rows are accepted where device rows are (`Storage`): uploaded once, the same step.
    fn host_rows_are_uploaded_once<G>(test, dev) {
        let (k, d, n) = (16usize, 8usize, 100usize);
        let (data, codebook) = data_and_codebook(n, d, k, 41);
        let cfg = QuantizerConfig::new(k, d).deterministic(true).seed(2);
        let backend = Arc::new(dev.backend(Precision::Exact));
        let gpu = backend.gpu();
        let mut a = DeviceQuantizer::with_codebook(cfg.clone(), codebook.clone(), backend.clone()).unwrap();
        let mut b = DeviceQuantizer::with_codebook(cfg, codebook, backend.clone()).unwrap();
        let xd = DeviceMatrix::upload(gpu, "x", data.as_ref()).unwrap();
        a.forward(&xd, None, true).unwrap();
        let before = gpu.transfers();
        b.forward(data.as_ref(), None, true).unwrap();
        let moved = gpu.transfers().since(before);
        assert_eq!(moved.h2d_bytes, (4 * n * d + 8) as u64, "{test}: x once, plus the check");
        let (ia, ib) = (gpu.download("a", a.indices().unwrap()).unwrap(), gpu.download("b", b.indices().unwrap()).unwrap());
        assert_eq!(ia, ib, "{test}: indices");
        assert_bits(
            b.download().unwrap().0.data(),
            a.download().unwrap().0.data(),
            &format!("{test}: codebook"),
        );
        let mut out = vqx::backend::cuda::DeviceAssignment::new(gpu, n).unwrap();
        backend.nearest_device(data.as_ref(), b.codebook(), &mut out).unwrap();
        assert_eq!(gpu.download("idx", out.indices()).unwrap().len(), n, "{test}");
    }
}
