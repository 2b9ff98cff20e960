//! Criterion benchmarks of the four primitives on every backend this machine has.
//!
//! `cargo bench --bench primitives` (add `-- nearest` to filter). Shapes are SPEC §7's, with N
//! scaled down on the CPU so a sample takes well under a second; CUDA runs them at full size.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vqx::backend::{Backend, CpuBackend, CudaBackend};
use vqx::ema::SumMode;
use vqx::{MatRef, Metric};

// The tests' seeded data, written once.
#[path = "../tests/common/mod.rs"]
mod common;
use common::uniform;

/// (N, D, K) from SPEC §7, with N for the CPU.
const SHAPES: [(usize, usize, usize, usize); 4] = [
    (1_048_576, 256, 4096, 8192),
    (262_144, 128, 4096, 16_384),
    (65_536, 64, 1024, 65_536),
    (262_144, 8, 16_384, 65_536),
];

fn backends() -> Vec<Box<dyn Backend>> {
    let mut v: Vec<Box<dyn Backend>> = vec![Box::new(CpuBackend::new())];
    match CudaBackend::new(0) {
        Ok(b) => v.push(Box::new(b)),
        Err(e) => eprintln!("skipped: CUDA benchmarks: {e}"),
    }
    v
}

fn bench(c: &mut Criterion) {
    for backend in backends() {
        let cpu = backend.name() == "cpu";
        for &(n_full, d, k, n_cpu) in &SHAPES {
            let n = if cpu { n_cpu } else { n_full };
            let x = uniform(n, d, 1);
            let cb = uniform(k, d, 2);
            let xm = MatRef::new(&x, n, d).unwrap();
            let cm = MatRef::new(&cb, k, d).unwrap();
            let shape = format!("{}/N{n}_D{d}_K{k}", backend.name());
            let idx = backend.nearest(xm, cm, Metric::L2).unwrap().indices;

            let mut g = c.benchmark_group("nearest");
            g.sample_size(10);
            g.throughput(Throughput::Elements(n as u64));
            for metric in [Metric::L2, Metric::Cosine] {
                g.bench_function(BenchmarkId::new(metric.to_string(), &shape), |b| {
                    b.iter(|| backend.nearest(xm, cm, metric).unwrap())
                });
            }
            g.finish();

            let mut g = c.benchmark_group("gather");
            g.sample_size(20);
            g.throughput(Throughput::Bytes((n * d * 4) as u64));
            g.bench_function(&shape, |b| b.iter(|| backend.gather(cm, &idx).unwrap()));
            g.finish();

            let mut g = c.benchmark_group("code_sums");
            g.sample_size(20);
            g.throughput(Throughput::Bytes((n * d * 4) as u64));
            for mode in [SumMode::Fast, SumMode::Deterministic] {
                g.bench_function(BenchmarkId::new(mode.to_string(), &shape), |b| {
                    b.iter(|| backend.code_sums(xm, &idx, k, mode).unwrap())
                });
            }
            g.finish();

            let mut g = c.benchmark_group("usage");
            g.sample_size(20);
            g.throughput(Throughput::Elements(n as u64));
            g.bench_function(&shape, |b| b.iter(|| backend.usage(&idx, k).unwrap()));
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
