//! The benchmark report behind `vqx bench`: times the four primitives of a backend on random
//! data and sets each time against the machine's physical floor (SPEC §8).
//!
//! Per primitive the report gives the median time, vectors per second, and
//! - for `nearest`: GFLOP/s counting 2·N·K·D flops, against the f32 compute ceiling;
//! - for the others: GB/s counting the bytes that must move at least once (gather: N·D·4 read
//!   plus N·D·4 written plus N·4 of indices; code sums: N·D·4 + N·4 + K·D·4; usage: N·4),
//!   against the memory bandwidth (on the CPU, at the primitive's working-set size).
//!
//! CPU ceilings, measured when the report starts ([`floors`] says how): the peak f32 FMA rate
//! of the instruction set the `nearest` kernel runs (AVX-512 or AVX2) on the same threads, and
//! a memcpy bandwidth. CUDA ceilings: the H100 SXM datasheet, 67 TFLOP/s f32 SIMT (33 ms for
//! N=1M, D=256, K=4096) and 3.35 TB/s HBM3 (4.8 TB/s on an H200).
//!
//! ```
//! use vqx::bench::{run, BenchConfig, BenchShape};
//! let backend = vqx::backend::CpuBackend::new();
//! let cfg = BenchConfig {
//!     shapes: vec![BenchShape { n: 256, dim: 8, codes: 16 }],
//!     reps: 1,
//!     ..BenchConfig::default()
//! };
//! let report = run(&backend, &cfg)?;
//! assert_eq!(report.results[0].primitives.len(), 5);
//! assert!(report.render_text().contains("nearest"));
//! # Ok::<(), vqx::Error>(())
//! ```

mod date;
pub mod floors;
mod render;

pub use date::{format_utc, utc_now};
pub use floors::{
    CPU_F32_GFLOPS_PER_2_THREADS, Floors, H100_F32_SIMT_TFLOPS, H100_HBM_TBS, H200_HBM_TBS,
};

use crate::backend::{Backend, Hardware, PrimitiveTimes, Transfers};
use crate::ema::SumMode;
use crate::error::Result;
use crate::matrix::Matrix;
use crate::nearest::Metric;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

/// One benchmark problem: N rows of width D against K codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BenchShape {
    pub n: usize,
    pub dim: usize,
    pub codes: usize,
}

/// The benchmark shapes of SPEC §7, as (N, D, K).
pub const DEFAULT_SHAPES: [BenchShape; 4] = [
    BenchShape {
        n: 1_048_576,
        dim: 256,
        codes: 4096,
    },
    BenchShape {
        n: 262_144,
        dim: 128,
        codes: 4096,
    },
    BenchShape {
        n: 65_536,
        dim: 64,
        codes: 1024,
    },
    BenchShape {
        n: 262_144,
        dim: 8,
        codes: 16_384,
    },
];

/// On the CPU, N is capped so one nearest call is at most this many flops (2·N·K·D), which
/// keeps each shape to a few seconds on a small machine.
pub const CPU_FLOP_CAP: f64 = 2e10;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub shapes: Vec<BenchShape>,
    pub metric: Metric,
    /// Timed runs per primitive, after one warm-up; the median is reported.
    pub reps: usize,
    /// Cap N on the CPU so 2·N·K·D ≤ [`CPU_FLOP_CAP`], and lower on the emulated device (the
    /// report says when it did).
    pub scale_for_cpu: bool,
    /// Seed of the random inputs.
    pub seed: u64,
    /// Time these (input, codebook) instead of random data of `shapes`.
    pub data: Option<(Matrix, Matrix)>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            shapes: DEFAULT_SHAPES.to_vec(),
            metric: Metric::L2,
            reps: 5,
            scale_for_cpu: true,
            seed: 0x5eed_f00d,
            data: None,
        }
    }
}

/// The machine the numbers came from.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub os: &'static str,
    pub arch: &'static str,
    pub cpu_model: Option<String>,
    pub rayon_threads: usize,
    pub gpu: Option<String>,
    pub compute_capability: Option<(i32, i32)>,
}

/// One primitive's numbers.
#[derive(Clone, Debug, Serialize)]
pub struct PrimitiveResult {
    pub name: &'static str,
    pub ms: f64,
    pub vectors_per_s: f64,
    /// For nearest: 2·N·K·D / t.
    pub gflops: Option<f64>,
    /// For the others: bytes moved / t.
    pub gbs: Option<f64>,
    /// Achieved rate over the floor's rate (1.0 = at the physical limit).
    pub floor_fraction: f64,
    /// Time the floor allows, ms.
    pub floor_ms: f64,
}

/// One shape's numbers.
#[derive(Clone, Debug, Serialize)]
pub struct ShapeResult {
    /// The shape asked for.
    pub requested: BenchShape,
    /// The shape run (N smaller than asked when scaled for the CPU).
    pub shape: BenchShape,
    pub scaled: bool,
    /// When scaled: the flops per nearest call N was capped to (2·N·K·D ≤ this).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flop_cap: Option<f64>,
    pub timed_with: &'static str,
    pub primitives: Vec<PrimitiveResult>,
    /// CUDA only: median wall-clock ms of the whole `nearest` call (upload, kernel, download,
    /// the host recheck of [`crate::nearest::finish`]) — what decides whether a low-precision
    /// kernel beats the exact one once its rechecks are paid for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nearest_end_to_end_ms: Option<f64>,
    /// CUDA only: rows `nearest` rechecked exactly on this shape's data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rechecked_rows: Option<usize>,
    /// CUDA only: bytes one host-level call of each primitive copies across the bus (what the
    /// kernel times above leave out: they run on resident inputs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfers: Option<Vec<(String, Transfers)>>,
}

/// Everything `vqx bench` prints.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub vqx_version: &'static str,
    /// UTC, ISO 8601.
    pub date: String,
    pub backend: &'static str,
    pub backend_description: String,
    pub machine: Machine,
    pub metric: String,
    pub reps: usize,
    pub seed: u64,
    pub floors: Floors,
    pub results: Vec<ShapeResult>,
}

/// Runs the benchmark of `cfg` on `backend`.
pub fn run(backend: &dyn Backend, cfg: &BenchConfig) -> Result<BenchReport> {
    let hardware = backend.hardware();
    let status = (hardware == Hardware::Gpu).then(crate::backend::cuda::status);
    let machine = Machine {
        os: std::env::consts::OS,
        arch: std::env::consts::ARCH,
        cpu_model: floors::cpu_model(),
        rayon_threads: rayon::current_num_threads(),
        gpu: status.as_ref().and_then(|s| s.device_name.clone()),
        compute_capability: status.as_ref().and_then(|s| s.compute_capability),
    };
    let probe = || floors::floors_for(hardware, machine.gpu.as_deref(), machine.rayon_threads);
    let floors = probe();
    let timed = match &cfg.data {
        Some((x, codebook)) => vec![time_shape(backend, None, None, x, codebook, cfg)?],
        None => {
            let cap = match hardware {
                Hardware::Cpu(_) => Some(CPU_FLOP_CAP),
                Hardware::Emulated => Some(EMU_FLOP_CAP),
                Hardware::Gpu => None,
            }
            .filter(|_| cfg.scale_for_cpu);
            let mut results = Vec::with_capacity(cfg.shapes.len());
            for (i, &requested) in cfg.shapes.iter().enumerate() {
                let shape = cap.map_or(requested, |flops| scale_to(requested, flops));
                let cap = cap.filter(|_| shape != requested);
                let seed = cfg.seed.wrapping_add(i as u64 * 0x9e37_79b9_7f4a_7c15);
                let x = random_matrix(shape.n, shape.dim, seed);
                let codebook = random_matrix(shape.codes, shape.dim, seed ^ 0xc0de_b00c);
                results.push(time_shape(
                    backend,
                    Some(requested),
                    cap,
                    &x,
                    &codebook,
                    cfg,
                )?);
            }
            results
        }
    };
    // The probes again after the timings; every fraction is taken against the higher.
    let floors = floors.best_of(probe());
    let results = timed
        .into_iter()
        .map(|(mut r, times)| {
            r.primitives = primitive_results(r.shape, &times, &floors);
            r
        })
        .collect();
    Ok(BenchReport {
        vqx_version: env!("CARGO_PKG_VERSION"),
        date: utc_now(),
        backend: backend.name(),
        backend_description: backend.describe(),
        machine,
        metric: cfg.metric.to_string(),
        reps: cfg.reps,
        seed: cfg.seed,
        floors,
        results,
    })
}

/// Times every primitive on `x` against `codebook` (`requested`: the shape asked for, when it
/// is not theirs; `flop_cap`: the cap that scaled N down from it, if one did); the fractions of
/// the floors come later, from the times returned beside the result.
fn time_shape(
    backend: &dyn Backend,
    requested: Option<BenchShape>,
    flop_cap: Option<f64>,
    x: &Matrix,
    codebook: &Matrix,
    cfg: &BenchConfig,
) -> Result<(ShapeResult, PrimitiveTimes)> {
    let shape = BenchShape {
        n: x.rows(),
        dim: x.cols(),
        codes: codebook.rows(),
    };
    let times = backend.time_primitives(x.as_ref(), codebook.as_ref(), cfg.metric, cfg.reps)?;
    let (e2e, rechecked) = end_to_end(backend, x, codebook, cfg)?;
    let result = ShapeResult {
        requested: requested.unwrap_or(shape),
        shape,
        scaled: flop_cap.is_some(),
        flop_cap,
        timed_with: times.timed_with,
        // Filled by `run` once the floors are final.
        primitives: Vec::new(),
        nearest_end_to_end_ms: e2e,
        rechecked_rows: rechecked,
        transfers: transfers_per_call(backend, x, codebook, cfg)?,
    };
    Ok((result, times))
}

/// On CUDA: the whole `nearest` call timed with a wall clock (median of `cfg.reps` after a
/// warm-up) and the rows it rechecked; `None` elsewhere (the CPU's `nearest` time already is
/// the whole call).
fn end_to_end(
    backend: &dyn Backend,
    x: &Matrix,
    codebook: &Matrix,
    cfg: &BenchConfig,
) -> Result<(Option<f64>, Option<usize>)> {
    if matches!(backend.hardware(), Hardware::Cpu(_)) {
        return Ok((None, None));
    }
    let a = backend.nearest(x.as_ref(), codebook.as_ref(), cfg.metric)?;
    let t = crate::backend::median_secs(cfg.reps, || {
        backend
            .nearest(x.as_ref(), codebook.as_ref(), cfg.metric)
            .map(drop)
    })?;
    Ok((Some(t * 1e3), Some(a.rechecked)))
}

/// On a device: the bytes one host-level call of each primitive moves each way, read from the
/// device layer's counters around one call; `None` on the CPU.
fn transfers_per_call(
    backend: &dyn Backend,
    x: &Matrix,
    codebook: &Matrix,
    cfg: &BenchConfig,
) -> Result<Option<Vec<(String, Transfers)>>> {
    if matches!(backend.hardware(), Hardware::Cpu(_)) {
        return Ok(None);
    }
    let k = codebook.rows();
    let mut out = Vec::new();
    let mut measure = |name: &str, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        let before = backend.transfers();
        f()?;
        out.push((name.to_string(), backend.transfers().since(before)));
        Ok(())
    };
    let mut idx = Vec::new();
    measure("nearest", &mut || {
        idx = backend
            .nearest(x.as_ref(), codebook.as_ref(), cfg.metric)?
            .indices;
        Ok(())
    })?;
    measure("gather", &mut || {
        backend.gather(codebook.as_ref(), &idx).map(drop)
    })?;
    measure("code_sums", &mut || {
        backend
            .code_sums(x.as_ref(), &idx, k, SumMode::Fast)
            .map(drop)
    })?;
    measure("code_sums_deterministic", &mut || {
        backend
            .code_sums(x.as_ref(), &idx, k, SumMode::Deterministic)
            .map(drop)
    })?;
    measure("usage", &mut || backend.usage(&idx, k).map(drop))?;
    Ok(Some(out))
}

/// `shape` with N capped so one nearest call is at most [`CPU_FLOP_CAP`] flops (at least 1 row).
pub fn scale_for_cpu(shape: BenchShape) -> BenchShape {
    scale_to(shape, CPU_FLOP_CAP)
}

/// The emulated device runs the CUDA kernels at ~1 GFLOP/s: its shapes are capped at this many
/// flops per nearest call (a few seconds) so that `vqx bench --device cuda-emu` finishes.
const EMU_FLOP_CAP: f64 = 4e9;

/// `shape` with N capped so one nearest call is at most `flops` (at least 1 row).
fn scale_to(shape: BenchShape, flops: f64) -> BenchShape {
    let per_row = 2.0 * shape.codes as f64 * shape.dim as f64;
    let cap = ((flops / per_row).floor() as usize).max(1);
    BenchShape {
        n: shape.n.min(cap),
        ..shape
    }
}

fn primitive_results(s: BenchShape, t: &PrimitiveTimes, floors: &Floors) -> Vec<PrimitiveResult> {
    let (n, d, k) = (s.n as f64, s.dim as f64, s.codes as f64);
    let flops = 2.0 * n * k * d;
    let gather_bytes = 2.0 * n * d * 4.0 + n * 4.0;
    let sums_bytes = n * d * 4.0 + n * 4.0 + k * d * 4.0;
    let usage_bytes = n * 4.0;
    // A memcpy of `bytes`: half read, half written, in f32.
    let halves = |bytes: f64| (bytes / 8.0) as usize;
    let sums_floor = floors.memory_secs(sums_bytes, halves(sums_bytes), halves(sums_bytes));
    let result =
        |name, secs: f64, floor_s: f64, rate: (Option<f64>, Option<f64>)| PrimitiveResult {
            name,
            ms: secs * 1e3,
            vectors_per_s: n / secs,
            gflops: rate.0,
            gbs: rate.1,
            floor_fraction: floor_s / secs,
            floor_ms: floor_s * 1e3,
        };
    let memory = |name, secs: f64, bytes: f64, floor_s| {
        result(name, secs, floor_s, (None, Some(bytes / secs / 1e9)))
    };
    vec![
        result(
            "nearest",
            t.nearest,
            flops / (floors.compute_gflops * 1e9),
            (Some(flops / t.nearest / 1e9), None),
        ),
        memory(
            "gather",
            t.gather,
            gather_bytes,
            floors.memory_secs(gather_bytes, s.codes * s.dim, s.n * s.dim),
        ),
        memory("code_sums", t.code_sums, sums_bytes, sums_floor),
        memory(
            "code_sums_deterministic",
            t.code_sums_deterministic,
            sums_bytes,
            sums_floor,
        ),
        memory(
            "usage",
            t.usage,
            usage_bytes,
            floors.memory_secs(usage_bytes, halves(usage_bytes), halves(usage_bytes)),
        ),
    ]
}

/// Uniform values in [-1, 1), reproducible from `seed` whatever the thread count.
///
/// The crate's one RNG (ChaCha8, as the quantizer and the models use): the matrix is the first
/// rows·cols draws of the stream seeded by `seed`, filled in parallel by seeking each chunk to
/// its word position.
pub fn random_matrix(rows: usize, cols: usize, seed: u64) -> Matrix {
    const CHUNK: usize = 1 << 14;
    let mut data = vec![0f32; rows * cols];
    data.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            // One 32-bit word per f32 draw.
            rng.set_word_pos((i * CHUNK) as u128);
            for v in chunk {
                *v = rng.r#gen::<f32>() * 2.0 - 1.0;
            }
        });
    Matrix::new(data, rows, cols).expect("length is rows * cols")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_scaling_caps_flops() {
        for s in DEFAULT_SHAPES {
            let t = scale_for_cpu(s);
            assert_eq!((t.dim, t.codes), (s.dim, s.codes));
            assert!(t.n <= s.n && t.n >= 1);
            assert!(2.0 * (t.n * t.dim * t.codes) as f64 <= CPU_FLOP_CAP);
        }
        assert_eq!(scale_for_cpu(DEFAULT_SHAPES[0]).n, 9536);
        // (65536, 64, 1024) is under the cap: unchanged.
        assert_eq!(scale_for_cpu(DEFAULT_SHAPES[2]), DEFAULT_SHAPES[2]);
    }

    #[test]
    fn random_is_reproducible_and_in_range() {
        let a = random_matrix(100, 7, 3);
        assert_eq!(a, random_matrix(100, 7, 3));
        assert!(a.data().iter().all(|v| (-1.0..1.0).contains(v)));
        assert_ne!(a, random_matrix(100, 7, 4));
    }

    #[test]
    fn random_is_one_chacha_stream_across_chunks() {
        let a = random_matrix(3, 20_000, 9); // 60,000 draws: several parallel chunks
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let b: Vec<f32> = (0..60_000)
            .map(|_| rng.r#gen::<f32>() * 2.0 - 1.0)
            .collect();
        assert_eq!(a.data(), &b[..]);
    }
}
