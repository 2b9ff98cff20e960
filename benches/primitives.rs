//! Criterion benchmarks of the four primitives on every backend this machine has.
//!
//! `cargo bench --bench primitives` (add `-- nearest` to filter). Shapes are SPEC §7's, with N
//! scaled down on the CPU as `vqx bench` does (`vqx::bench::scale_for_cpu`); CUDA runs them at
//! full size.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vqx::Metric;
use vqx::backend::{Backend, CpuBackend, CudaBackend, Hardware};
use vqx::bench::{DEFAULT_SHAPES, random_matrix, scale_for_cpu};
use vqx::ema::SumMode;

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
        let cpu = matches!(backend.hardware(), Hardware::Cpu(_));
        for full in DEFAULT_SHAPES {
            let s = if cpu { scale_for_cpu(full) } else { full };
            let (n, d, k) = (s.n, s.dim, s.codes);
            let x = random_matrix(n, d, 1);
            let cb = random_matrix(k, d, 2);
            let (xm, cm) = (x.as_ref(), cb.as_ref());
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
