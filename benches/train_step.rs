//! Criterion benchmarks of the CPU training step's parts: GELU forward and backward, the AdamW
//! update with clipping, and one whole forward + backward pass of the VQ-VAE.
//!
//! `cargo bench --bench train_step` (add `-- gelu` to filter). Shapes: batch 256, D = 64, code
//! dim 8, K = 256, hidden 256-256 and 1024-1024 (issue 13's configuration).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vqx::MatRef;
use vqx::backend::Device;
use vqx::bench::random_matrix;
use vqx::model::{Activation, StepWorkspace, VqVae, VqVaeConfig};
use vqx::quantizer::QuantizerConfig;
use vqx::train::{AdamW, AdamWConfig, clip_scale, global_norm};

fn bench(c: &mut Criterion) {
    let x = random_matrix(256, 1024, 1);
    let mut g = c.benchmark_group("activation");
    g.throughput(Throughput::Elements(x.data().len() as u64));
    let mut y = vec![0.0f32; x.data().len()];
    g.bench_function("gelu_forward/256x1024", |b| {
        b.iter(|| Activation::Gelu.forward_into(x.data(), &mut y))
    });
    // dL/dy starts from the same values every time (repeated in-place products would drift
    // into subnormals); the copy is a small part of the time.
    g.bench_function("gelu_backward/256x1024", |b| {
        b.iter(|| {
            y.copy_from_slice(x.data());
            Activation::Gelu.backward_in_place(x.data(), &mut y)
        })
    });
    g.finish();

    // One 1024 × 1024 weight: the largest tensor of the 1024-1024 model.
    let grad = random_matrix(1024, 1024, 2);
    let mut p = random_matrix(1024, 1024, 3);
    let mut opt = AdamW::new(AdamWConfig::default(), &[p.data().len()]);
    let mut g = c.benchmark_group("optimizer");
    g.throughput(Throughput::Elements(p.data().len() as u64));
    g.bench_function("clip_and_adamw/1024x1024", |b| {
        b.iter(|| {
            let s = clip_scale(global_norm(&[grad.data()]), 1.0);
            opt.step_scaled(0, &mut [p.data_mut()], &[grad.data()], &[true], 1e-3, 10, s);
        })
    });
    g.finish();

    let mut g = c.benchmark_group("vqvae_forward_backward");
    g.sample_size(10);
    for hidden in [256usize, 1024] {
        let data = random_matrix(256, 64, 4);
        let mut model = VqVae::new(
            VqVaeConfig::new(64, 8, vec![hidden, hidden]),
            QuantizerConfig::new(256, 8).device(Device::Cpu),
        )
        .unwrap();
        let mut ws = StepWorkspace::new(&model);
        let xm = MatRef::new(data.data(), 256, 64).unwrap();
        // The first pass initialises the codebook.
        model.forward_backward_with(xm, true, &mut ws).unwrap();
        g.bench_function(
            BenchmarkId::new("batch256_D64", format!("{hidden}-{hidden}")),
            |b| b.iter(|| model.forward_backward_with(xm, true, &mut ws).unwrap()),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
