//! The physical floors `vqx bench` sets each primitive against.
//!
//! - GPU: datasheet numbers (f32 SIMT compute, HBM bandwidth).
//! - CPU, compute (`nearest`, which is FMA-bound): the peak f32 FMA rate of the instruction set
//!   the `nearest` kernel runs — AVX-512 for the fused kernel, AVX2+FMA for the portable one
//!   (the `gemm` crate's microkernels on stable Rust) — measured before and after the timings on every rayon thread (the higher kept)
//!   (the kernels' thread count): [`Simd::chains`] independent FMA chains per thread, more than
//!   FMA latency × FMA ports (4 × 2 on current x86 cores, 5 × 2 on Haswell) and no more than
//!   the vector registers hold, so neither a dependency nor a register spill holds the pipes
//!   back; each timing lasts at least [`PROBE_SECS`] so clocks settle; the best of
//!   [`PROBE_TIMINGS`] timings after a calibrating warm-up.
//! - CPU, memory (the other primitives): a parallel memcpy of 256 MiB on the rayon threads,
//!   bytes read + written, best of [`PROBE_TIMINGS`]; and per primitive and shape, the same
//!   copy at the primitive's working-set size when that is faster (a set that fits in cache
//!   beats DRAM): gather against a copy that reads a codebook-sized source cyclically into the
//!   N×D output (a gather with in-order indices), code sums and usage against a memcpy of
//!   their bytes.
//! - The emulated device runs the kernels on the CPU's cores: the CPU's floors, with the widest
//!   FMA the CPU has.

use crate::backend::Hardware;
use crate::nearest::cpu::CpuKernel;
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

/// Shortest time of one FMA-probe timing, seconds: long enough for clocks to settle.
pub const PROBE_SECS: f64 = 0.1;
/// Timings of the FMA probe; the best is kept.
pub const PROBE_TIMINGS: usize = 5;

/// The ceilings the fractions are taken against.
#[derive(Clone, Debug, Serialize)]
pub struct Floors {
    /// f32 compute ceiling for nearest, GFLOP/s.
    pub compute_gflops: f64,
    pub compute_source: String,
    /// Memory bandwidth ceiling for the other primitives, GB/s (read + write bytes).
    pub bandwidth_gbs: f64,
    pub bandwidth_source: String,
    /// Whether a memory-bound primitive's floor is also probed at its working-set size (on
    /// the CPU, where caches can beat the memcpy bandwidth).
    #[serde(skip)]
    pub(crate) probe_working_sets: bool,
}

/// When the probes run, as the report says it.
const WHEN: &str = "measured before and after the timings, the higher kept";

impl Floors {
    /// These floors with each probed ceiling raised to `later`'s where that is higher. Load on
    /// the machine can only lower a probe, never raise it: a probe that ran while something
    /// else had the cores must not make a kernel look faster than the machine.
    pub(crate) fn best_of(mut self, later: Floors) -> Floors {
        self.compute_gflops = self.compute_gflops.max(later.compute_gflops);
        self.bandwidth_gbs = self.bandwidth_gbs.max(later.bandwidth_gbs);
        self
    }

    /// The floor, seconds, of a primitive that moves `bytes` (read + written) reading `src` f32
    /// and writing `dst` f32: the bandwidth floor, or where working sets are probed, the time
    /// of [`copy_secs`] on the same sizes (scaled to the same bytes) when that is shorter.
    pub(crate) fn memory_secs(&self, bytes: f64, src: usize, dst: usize) -> f64 {
        let bandwidth = bytes / (self.bandwidth_gbs * 1e9);
        if !self.probe_working_sets {
            return bandwidth;
        }
        let copied = 8.0 * dst.max(1) as f64;
        bandwidth.min(copy_secs(src, dst) * bytes / copied)
    }
}

/// The floors of `hardware` (`gpu`: the GPU's name, which picks its datasheet).
pub fn floors_for(hardware: Hardware, gpu: Option<&str>, threads: usize) -> Floors {
    let (kernel, what) = match hardware {
        Hardware::Gpu => return gpu_floors(gpu),
        Hardware::Cpu(kernel) => (kernel, "the nearest kernel's instruction set"),
        Hardware::Emulated => (
            CpuKernel::Auto,
            "the widest on this CPU, whose cores run the emulated device",
        ),
    };
    let (compute_gflops, compute_source) =
        compute_floor(Simd::of(kernel), what, threads, PROBE_SECS);
    Floors {
        compute_gflops,
        compute_source,
        bandwidth_gbs: measure_copy_bandwidth(),
        bandwidth_source: format!(
            "parallel memcpy of 256 MiB on {threads} threads, bytes read + written, best of \
             {PROBE_TIMINGS}, {WHEN}; per primitive, a faster copy of the same bytes \
             at the same working-set size (cache) when there is one"
        ),
        probe_working_sets: true,
    }
}

/// The CPU's f32 compute floor, GFLOP/s, and where it came from: the FMA probe of `simd`
/// (`what`: why this instruction set), or SPEC §8's GEMM rate where there is no probe.
fn compute_floor(simd: Option<Simd>, what: &str, threads: usize, min_secs: f64) -> (f64, String) {
    match simd.and_then(|s| Some((s, fma_peak(s, min_secs)?))) {
        Some((simd, gflops)) => (
            gflops,
            format!(
                "peak f32 {} FMA rate, {what}: {} independent FMA chains per thread on {threads} \
                 threads, best of {PROBE_TIMINGS} timings of ≥ {min_secs} s, {WHEN}",
                simd.name(),
                simd.chains()
            ),
        ),
        None => (
            CPU_F32_GFLOPS_PER_2_THREADS * threads as f64 / 2.0,
            format!(
                "SPEC §8: f32 GEMM ~{CPU_F32_GFLOPS_PER_2_THREADS} GFLOP/s on 2 threads, scaled \
                 to {threads} threads (no FMA probe for this CPU)"
            ),
        ),
    }
}

/// Datasheet floors of the GPU named `name` (an H100 SXM unless the name says H200).
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
        probe_working_sets: false,
    }
}

/// Read + write bandwidth of a parallel memcpy of 256 MiB, GB/s.
fn measure_copy_bandwidth() -> f64 {
    const LEN: usize = 64 << 20; // 64 Mi f32 = 256 MiB
    8.0 * LEN as f64 / copy_secs(LEN, LEN) / 1e9
}

/// Seconds of the fastest of [`PROBE_TIMINGS`] parallel copies (after a warm-up) on the rayon
/// threads that write `dst` f32 from a source of `src` f32 read cyclically: a memcpy when the
/// two are equal, a gather with in-order indices when the source is smaller.
pub(crate) fn copy_secs(src: usize, dst: usize) -> f64 {
    let src = vec![1f32; src.max(1)];
    let mut out = vec![0f32; dst.max(1)];
    let chunk = out
        .len()
        .div_ceil(rayon::current_num_threads().max(1))
        .max(1 << 14);
    let mut copy = || {
        let t = Instant::now();
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, mut d)| {
                let mut at = i * chunk % src.len();
                while !d.is_empty() {
                    let n = d.len().min(src.len() - at);
                    let (head, tail) = d.split_at_mut(n);
                    head.copy_from_slice(&src[at..at + n]);
                    (d, at) = (tail, 0);
                }
            });
        t.elapsed().as_secs_f64()
    };
    copy();
    let best = (0..PROBE_TIMINGS)
        .map(|_| copy())
        .fold(f64::INFINITY, f64::min);
    std::hint::black_box(&out);
    best
}

/// The CPU model named in /proc/cpuinfo (Linux), if any.
pub(crate) fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// A vector instruction set with f32 FMA: what bounds a CPU `nearest` kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Simd {
    /// 512-bit FMA (AVX-512F): the fused nearest kernel.
    Avx512,
    /// 256-bit FMA (AVX2 + FMA): the portable kernel's `gemm` microkernels.
    Avx2,
}

impl Simd {
    /// The instruction set `kernel` does its FMAs with on this CPU; `None` where the CPU has
    /// no FMA (or is not x86-64), and no probe exists.
    pub fn of(kernel: CpuKernel) -> Option<Simd> {
        match kernel.resolve() {
            CpuKernel::Avx512 => Some(Simd::Avx512),
            _ => Some(Simd::Avx2).filter(|s| s.available()),
        }
    }

    /// Whether this CPU can run it.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        match self {
            Simd::Avx512 => is_x86_feature_detected!("avx512f"),
            Simd::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// "AVX-512" or "AVX2".
    pub fn name(self) -> &'static str {
        match self {
            Simd::Avx512 => "AVX-512",
            Simd::Avx2 => "AVX2",
        }
    }

    /// f32 lanes of one vector.
    pub fn lanes(self) -> usize {
        match self {
            Simd::Avx512 => 16,
            Simd::Avx2 => 8,
        }
    }

    /// Independent FMA chains per thread in the probe: at least FMA latency × ports (10), and
    /// with the two constants inside the register file (32 zmm, 16 ymm): a spilled chain
    /// would add a load and a store to each FMA and understate the peak.
    pub fn chains(self) -> usize {
        match self {
            Simd::Avx512 => probe::AVX512_CHAINS,
            Simd::Avx2 => probe::AVX2_CHAINS,
        }
    }
}

/// Peak f32 FMA rate of `simd` on all rayon threads, GFLOP/s: every thread runs
/// [`Simd::chains`] independent FMA chains; rounds are calibrated so one timing lasts at least
/// `min_secs`, and the best of [`PROBE_TIMINGS`] is kept. `None` where the CPU lacks `simd`.
pub fn fma_peak(simd: Simd, min_secs: f64) -> Option<f64> {
    if !simd.available() {
        return None;
    }
    let threads = rayon::current_num_threads();
    let time = |rounds: usize| {
        let t = Instant::now();
        rayon::broadcast(|_| probe::run(simd, rounds));
        t.elapsed().as_secs_f64().max(1e-9)
    };
    // Calibrate (and warm up): grow the rounds until a timing is long enough to scale from.
    let mut rounds = 1usize << 12;
    let mut secs = time(rounds);
    while secs < min_secs / 8.0 {
        rounds *= 8;
        secs = time(rounds);
    }
    let rounds = ((rounds as f64 * min_secs / secs).ceil() as usize).max(rounds);
    let best = (0..PROBE_TIMINGS)
        .map(|_| time(rounds))
        .fold(f64::INFINITY, f64::min);
    let flops = 2.0 * (rounds * simd.chains() * simd.lanes() * threads) as f64;
    Some(flops / best / 1e9)
}

/// The FMA loops, one per instruction set.
mod probe {
    use super::Simd;

    pub const AVX512_CHAINS: usize = 24;
    pub const AVX2_CHAINS: usize = 12;

    /// `rounds` rounds of one FMA on each chain of `simd`.
    pub fn run(simd: Simd, rounds: usize) {
        assert!(simd.available(), "{simd:?} probe on a CPU without it");
        #[cfg(target_arch = "x86_64")]
        match simd {
            // SAFETY: the CPU has AVX-512F (asserted above).
            Simd::Avx512 => unsafe { x86::avx512(rounds) },
            // SAFETY: the CPU has AVX2 and FMA (asserted above).
            Simd::Avx2 => unsafe { x86::avx2(rounds) },
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = rounds;
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        /// One `#[target_feature]` loop: `$chains` accumulators, each `acc = acc·a + b` per
        /// round; the values are kept (`black_box`) so the loop cannot be dropped.
        macro_rules! fma_chains {
            ($name:ident, $feature:literal, $set1:ident, $fmadd:ident, $chains:expr) => {
                #[target_feature(enable = $feature)]
                pub fn $name(rounds: usize) {
                    let a = $set1(0.999_999);
                    let b = $set1(1e-7);
                    let mut acc = [$set1(1.0); $chains];
                    for _ in 0..rounds {
                        for v in acc.iter_mut() {
                            *v = $fmadd(*v, a, b);
                        }
                    }
                    std::hint::black_box(acc);
                }
            };
        }

        fma_chains!(
            avx512,
            "avx512f",
            _mm512_set1_ps,
            _mm512_fmadd_ps,
            super::AVX512_CHAINS
        );
        fma_chains!(
            avx2,
            "avx2,fma",
            _mm256_set1_ps,
            _mm256_fmadd_ps,
            super::AVX2_CHAINS
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_gives_a_positive_finite_rate() {
        for simd in [Simd::Avx512, Simd::Avx2] {
            match fma_peak(simd, 1e-3) {
                Some(r) => assert!(r.is_finite() && r > 0.0, "{simd:?}: {r}"),
                None => assert!(!simd.available(), "{simd:?}"),
            }
        }
    }

    #[test]
    fn the_floor_is_the_kernels_instruction_set() {
        // The portable kernel never runs AVX-512 (the `gemm` crate's AVX-512 needs nightly).
        assert_ne!(Simd::of(CpuKernel::Portable), Some(Simd::Avx512));
        for kernel in [CpuKernel::Auto, CpuKernel::Avx512, CpuKernel::Portable] {
            let simd = Simd::of(kernel);
            match kernel.resolve() {
                CpuKernel::Avx512 => assert_eq!(simd, Some(Simd::Avx512)),
                _ => assert_eq!(simd, Some(Simd::Avx2).filter(|s| s.available())),
            }
            let (gflops, source) = compute_floor(simd, "test", 1, 1e-3);
            assert!(gflops.is_finite() && gflops > 0.0, "{source}");
            match simd {
                Some(s) => assert!(source.contains(&format!("{} FMA", s.name())), "{source}"),
                None => assert!(source.contains("SPEC §8"), "{source}"),
            }
        }
    }

    #[test]
    fn best_of_keeps_the_higher_of_each_probe() {
        let floors = |compute, bandwidth| Floors {
            compute_gflops: compute,
            compute_source: String::new(),
            bandwidth_gbs: bandwidth,
            bandwidth_source: String::new(),
            probe_working_sets: true,
        };
        let best = floors(183.0, 35.0).best_of(floors(306.0, 33.0));
        assert_eq!((best.compute_gflops, best.bandwidth_gbs), (306.0, 35.0));
    }

    #[test]
    fn copy_probe_covers_every_size() {
        for (src, dst) in [(0, 0), (1, 100_000), (3, 5), (100_000, 7), (70_000, 70_000)] {
            let t = copy_secs(src, dst);
            assert!(t.is_finite() && t >= 0.0, "{src} → {dst}: {t}");
        }
    }

    #[test]
    fn chains_cover_latency_and_fit_the_registers() {
        for simd in [Simd::Avx512, Simd::Avx2] {
            let registers = match simd {
                Simd::Avx512 => 32,
                Simd::Avx2 => 16,
            };
            assert!(simd.chains() >= 10 && simd.chains() + 2 <= registers);
        }
    }
}
