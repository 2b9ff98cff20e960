//! The machine's physical floors that `vqx bench` sets each primitive against: datasheet
//! numbers for GPUs; a memcpy and an FMA probe measured at start on the CPU.

use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

/// SPEC §8: an f32 GEMM (4096×4096×256) on 2 threads of this Zen 4 machine, ~180–190 GFLOP/s.
pub const CPU_F32_GFLOPS_PER_2_THREADS: f64 = 185.0;
/// H100 SXM datasheet: f32 on the SIMT cores (no tensor cores), TFLOP/s.
pub const H100_F32_SIMT_TFLOPS: f64 = 67.0;
/// H100 SXM datasheet HBM3 bandwidth, TB/s.
pub const H100_HBM_TBS: f64 = 3.35;
/// H200 datasheet HBM3e bandwidth, TB/s (same compute as the H100).
pub const H200_HBM_TBS: f64 = 4.8;

/// The ceilings the fractions are taken against.
#[derive(Clone, Debug, Serialize)]
pub struct Floors {
    /// f32 compute ceiling for nearest, GFLOP/s.
    pub compute_gflops: f64,
    pub compute_source: String,
    /// Memory bandwidth ceiling for the other primitives, GB/s (read + write bytes).
    pub bandwidth_gbs: f64,
    pub bandwidth_source: String,
}

pub(crate) fn cpu_floors(threads: usize) -> Floors {
    let bw = measure_copy_bandwidth();
    let (compute, compute_source) = match fma_peak::measure() {
        Some((gflops, isa)) => (
            gflops,
            format!(
                "peak f32 {isa} FMA throughput on {threads} threads, measured at start (SPEC §8's \
                 ~{CPU_F32_GFLOPS_PER_2_THREADS} GFLOP/s is an AVX2 GEMM on 2 threads)"
            ),
        ),
        None => (
            CPU_F32_GFLOPS_PER_2_THREADS * threads as f64 / 2.0,
            format!(
                "SPEC §8: f32 GEMM ~{CPU_F32_GFLOPS_PER_2_THREADS} GFLOP/s on 2 threads, scaled \
                 to {threads} threads"
            ),
        ),
    };
    Floors {
        compute_gflops: compute,
        compute_source,
        bandwidth_gbs: bw,
        bandwidth_source: format!(
            "parallel memcpy of 256 MiB on {threads} threads, bytes read + written, measured at \
             start; working sets that fit in cache can beat it"
        ),
    }
}

pub(crate) fn gpu_floors(name: Option<&str>) -> Floors {
    let h200 = name.is_some_and(|n| n.contains("H200"));
    let (bw, which) = if h200 {
        (H200_HBM_TBS, "H200 HBM3e")
    } else {
        (H100_HBM_TBS, "H100 SXM HBM3")
    };
    Floors {
        compute_gflops: H100_F32_SIMT_TFLOPS * 1e3,
        compute_source: format!(
            "H100/H200 datasheet: {H100_F32_SIMT_TFLOPS} TFLOP/s f32 SIMT (no tensor cores)"
        ),
        bandwidth_gbs: bw * 1e3,
        bandwidth_source: format!("{which} datasheet: {bw} TB/s"),
    }
}

/// Read + write bandwidth of a parallel memcpy, GB/s (best of a few runs).
fn measure_copy_bandwidth() -> f64 {
    const LEN: usize = 32 << 20; // 32 Mi u64 = 256 MiB
    let src: Vec<u64> = (0..LEN as u64).into_par_iter().collect();
    let mut dst = vec![0u64; LEN];
    let chunk = (LEN / rayon::current_num_threads().max(1)).max(1 << 16);
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    2.0 * (LEN * 8) as f64 / best / 1e9
}

/// The CPU model named in /proc/cpuinfo (Linux), if any.
pub(crate) fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// The CPU's peak f32 FMA rate: the true compute floor of `nearest`, which is FMA-bound.
mod fma_peak {
    use std::time::Instant;

    /// Rounds of the FMA loop per timing (each round: ACC FMAs of a full vector per thread).
    const ROUNDS: usize = 1 << 22;
    /// Independent accumulators: more than FMA latency × FMA ports, so the pipes never wait.
    const ACC: usize = 24;

    /// (GFLOP/s on all rayon threads, instruction set), best of three; None off x86-64 or
    /// without FMA.
    pub fn measure() -> Option<(f64, &'static str)> {
        #[cfg(target_arch = "x86_64")]
        {
            let (lanes, isa, f): (usize, &'static str, fn(usize) -> f32) =
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    (16, "AVX-512", |r| unsafe { x86::loop_avx512(r) })
                } else if is_x86_feature_detected!("fma") && is_x86_feature_detected!("avx") {
                    // SAFETY: the CPU has AVX and FMA (checked just above).
                    (8, "AVX2", |r| unsafe { x86::loop_avx2(r) })
                } else {
                    return None;
                };
            let threads = rayon::current_num_threads();
            let mut best = 0f64;
            for _ in 0..3 {
                let t = Instant::now();
                let sink: f32 = rayon::broadcast(|_| f(ROUNDS)).into_iter().sum();
                let secs = t.elapsed().as_secs_f64();
                std::hint::black_box(sink);
                let flops = 2.0 * (ROUNDS * ACC * lanes * threads) as f64;
                best = best.max(flops / secs / 1e9);
            }
            Some((best, isa))
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use super::ACC;
        use std::arch::x86_64::*;

        #[target_feature(enable = "avx512f")]
        pub unsafe fn loop_avx512(rounds: usize) -> f32 {
            let a = _mm512_set1_ps(0.999_999);
            let b = _mm512_set1_ps(1e-7);
            let mut acc = [_mm512_set1_ps(1.0); ACC];
            for _ in 0..rounds {
                for v in acc.iter_mut() {
                    *v = _mm512_fmadd_ps(*v, a, b);
                }
            }
            let mut s = _mm512_setzero_ps();
            for v in acc {
                s = _mm512_add_ps(s, v);
            }
            _mm512_reduce_add_ps(s)
        }

        #[target_feature(enable = "avx,fma")]
        pub unsafe fn loop_avx2(rounds: usize) -> f32 {
            let a = _mm256_set1_ps(0.999_999);
            let b = _mm256_set1_ps(1e-7);
            let mut acc = [_mm256_set1_ps(1.0); ACC];
            for _ in 0..rounds {
                for v in acc.iter_mut() {
                    *v = _mm256_fmadd_ps(*v, a, b);
                }
            }
            let mut s = _mm256_setzero_ps();
            for v in acc {
                s = _mm256_add_ps(s, v);
            }
            let mut out = [0f32; 8];
            // SAFETY: `out` has room for the 8 floats stored.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
            out.iter().sum()
        }
    }
}
