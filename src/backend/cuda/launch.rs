//! The launchers: each kernel's grid and block sizes, dynamic shared memory and argument order,
//! written once over [`Gpu`] so that the real GPU and the emulated device run the same code.
//! Sizes come from kernels/tiles.cuh through [`tiles`].

use super::device::{Arg, Gpu, LaunchShape};
use super::kernels::{self, tiles};
use crate::error::{Error, Result};
use crate::matrix::MatRef;
use crate::nearest::{self, Metric, Precision, Prepared};

/// Largest per-block histogram `usage_u32` keeps in shared memory, in codes.
pub const USAGE_SHARED_CODES: usize = tiles::USAGE_SHARED_BYTES / 4;

// What the launchers assume of kernels/tiles.cuh: whole warps, CUDA's block limit, and dynamic
// shared memory within the 48 KiB a launch gets without opting in.
const _: () = {
    let blocks = [
        tiles::NEAREST_THREADS,
        tiles::TC_THREADS,
        tiles::GRID_STRIDE_THREADS,
        tiles::SORTED_MAX_THREADS,
    ];
    let mut i = 0;
    while i < blocks.len() {
        assert!(blocks[i].is_multiple_of(32) && blocks[i] <= 1024);
        i += 1;
    }
    assert!(tiles::USAGE_SHARED_BYTES <= 48 * 1024);
};

/// Converts a count to the `long long` the kernels take.
fn i64_of(v: usize, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::InvalidArgument(format!("{what} = {v} exceeds i64")))
}

/// Blocks for a grid-stride kernel over `total` items: enough to fill the device, no more.
fn grid_stride_blocks(total: usize, per_block: usize, cap: u32) -> u32 {
    let need = total.div_ceil(per_block).max(1);
    need.min(cap.max(1) as usize) as u32
}

/// The operands of the nearest kernels on the device: x (L2-normalised for cosine), the scored
/// codebook and its f32 norms, as `prepared` defines them.
pub struct NearestInputs<G: Gpu> {
    pub x: G::Buf<f32>,
    pub codebook: G::Buf<f32>,
    pub norms: G::Buf<f32>,
    pub n: usize,
    pub k: usize,
    pub d: usize,
}

impl<G: Gpu> NearestInputs<G> {
    /// Uploads `x` and `codebook` (already validated with [`nearest::validate`]) as `prepared`,
    /// made from the same codebook, scores them.
    pub fn upload(
        gpu: &G,
        x: MatRef<'_>,
        codebook: MatRef<'_>,
        prepared: &Prepared,
    ) -> Result<Self> {
        let scored = prepared.scored(codebook);
        let normalized;
        let xs = match prepared.metric() {
            Metric::L2 => x.data(),
            Metric::Cosine => {
                normalized = nearest::normalize_rows(x);
                normalized.data()
            }
        };
        Ok(NearestInputs {
            x: gpu.upload("x", xs)?,
            codebook: gpu.upload("codebook", scored.data())?,
            norms: gpu.upload("code norms", prepared.norms())?,
            n: x.rows(),
            k: scored.rows(),
            d: x.cols(),
        })
    }
}

/// Device outputs of the nearest kernels: per row the best index, its score and the runner-up.
pub struct NearestOut<G: Gpu> {
    pub best: G::Buf<u32>,
    pub best_score: G::Buf<f32>,
    pub second_score: G::Buf<f32>,
}

impl<G: Gpu> NearestOut<G> {
    pub fn new(gpu: &G, n: usize) -> Result<Self> {
        Ok(NearestOut {
            best: gpu.alloc_zeros("best indices", n)?,
            best_score: gpu.alloc_zeros("best scores", n)?,
            second_score: gpu.alloc_zeros("runner-up scores", n)?,
        })
    }
}

/// `nearest_f32`, `nearest_tf32` or `nearest_bf16` over the n rows of `input` against its k
/// codes, into `out` (n rows).
pub fn nearest<G: Gpu>(
    gpu: &G,
    precision: Precision,
    input: &NearestInputs<G>,
    out: &mut NearestOut<G>,
) -> Result<()> {
    let (n, k, d) = (input.n, input.k, input.d);
    let (kernel, rows_per_block, threads) = match precision {
        Precision::Exact => (
            kernels::NEAREST_F32,
            tiles::NEAREST_BM,
            tiles::NEAREST_THREADS,
        ),
        Precision::Tf32 => (kernels::NEAREST_TF32, tiles::TC_BM, tiles::TC_THREADS),
        Precision::Bf16 => (kernels::NEAREST_BF16, tiles::TC_BM, tiles::TC_THREADS),
    };
    let blocks = u32::try_from(n.div_ceil(rows_per_block))
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| Error::InvalidArgument(format!("{n} rows exceed the CUDA grid")))?;
    let d32 = i32::try_from(d)
        .map_err(|_| Error::InvalidArgument(format!("dimension {d} exceeds i32")))?;
    let (n64, k64) = (i64_of(n, "rows")?, i64_of(k, "codes")?);
    let shape = LaunchShape::linear(blocks, threads as u32);
    let mut args = [
        Arg::F32(&input.x),
        Arg::F32(&input.codebook),
        Arg::F32(&input.norms),
        Arg::U32Mut(&mut out.best),
        Arg::F32Mut(&mut out.best_score),
        Arg::F32Mut(&mut out.second_score),
        Arg::I64(n64),
        Arg::I64(k64),
        Arg::I32(d32),
    ];
    // SAFETY: the arguments follow the signature shared by nearest_f32, nearest_tf32 and
    // nearest_bf16 (3 const f32 pointers, u32/f32/f32 outputs, long long n, long long k, int d).
    // x holds n·d, codebook k·d and norms k floats; each output holds n elements. The kernels
    // read rows < n and codes < k only (16-byte loads only when d % 4 == 0, at offsets that are
    // multiples of 4 floats of 256-byte-aligned allocations) and write outputs[r] for r < n
    // only; the block size and ceil(n / rows per block) blocks are the shapes they are written
    // for (tiles.cuh, static_asserted in the kernels); static shared memory only (≤ 46 KiB).
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}

/// `gather_f32` (or `gather_f32x4` when d % 4 == 0): out (n·d floats) = codebook rows by index.
pub fn gather<G: Gpu>(
    gpu: &G,
    codebook: &G::Buf<f32>,
    indices: &G::Buf<u32>,
    out: &mut G::Buf<f32>,
    n: usize,
    d: usize,
) -> Result<()> {
    let vec4 = d.is_multiple_of(4);
    let (kernel, width) = if vec4 {
        (kernels::GATHER_F32X4, d / 4)
    } else {
        (kernels::GATHER_F32, d)
    };
    let shape = LaunchShape::linear(
        grid_stride_blocks(n * width, tiles::GRID_STRIDE_THREADS, gpu.sm_count() * 32),
        tiles::GRID_STRIDE_THREADS as u32,
    );
    let mut args = [
        Arg::F32(codebook),
        Arg::U32(indices),
        Arg::F32Mut(out),
        Arg::I64(i64_of(n, "rows")?),
        Arg::I64(i64_of(width, "row width")?),
    ];
    // SAFETY: the arguments follow gather_f32(const float*, const u32*, float*, long long n,
    // long long d) and gather_f32x4 (the same over float4, width d/4, chosen only when d % 4 == 0
    // so every row is a whole number of 16-byte-aligned float4). indices holds n values, all
    // < K (gather::validate), codebook K·d floats, out n·d floats; the grid-stride loop stays
    // below n·width.
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}

/// `ema_sums_atomic_f32`: per-code sums (k·d, zeroed by the caller) and counts (k, zeroed) of
/// the n rows of x by their indices.
pub fn sums_atomic<G: Gpu>(
    gpu: &G,
    x: &G::Buf<f32>,
    indices: &G::Buf<u32>,
    sums: &mut G::Buf<f32>,
    counts: &mut G::Buf<u32>,
    n: usize,
    d: usize,
) -> Result<()> {
    let kernel = kernels::EMA_SUMS_ATOMIC_F32;
    let shape = LaunchShape::linear(
        grid_stride_blocks(n * d, tiles::GRID_STRIDE_THREADS, gpu.sm_count() * 32),
        tiles::GRID_STRIDE_THREADS as u32,
    );
    let mut args = [
        Arg::F32(x),
        Arg::U32(indices),
        Arg::F32Mut(sums),
        Arg::U32Mut(counts),
        Arg::I64(i64_of(n, "rows")?),
        Arg::I64(i64_of(d, "dimension")?),
    ];
    // SAFETY: the arguments follow ema_sums_atomic_f32(const float* x, const u32* idx,
    // float* sums, u32* counts, long long n, long long d). x holds n·d floats, idx n values all
    // < K (ema::validate), sums K·d floats and counts K values; the grid-stride loop stays
    // below n·d.
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}

/// `ema_sums_sorted_f32`: the deterministic sums from a stable counting sort (offsets: k + 1
/// values, rows: n row ids grouped by code), [`super::sort::group_by_code`] on the device.
#[allow(clippy::too_many_arguments)]
pub fn sums_sorted<G: Gpu>(
    gpu: &G,
    x: &G::Buf<f32>,
    offsets: &G::Buf<u64>,
    rows: &G::Buf<u32>,
    sums: &mut G::Buf<f32>,
    counts: &mut G::Buf<u32>,
    k: usize,
    d: usize,
) -> Result<()> {
    let kernel = kernels::EMA_SUMS_SORTED_F32;
    let threads = (d.div_ceil(32) * 32).clamp(32, tiles::SORTED_MAX_THREADS) as u32;
    let shape = LaunchShape::linear(k.clamp(1, 1 << 24) as u32, threads);
    let mut args = [
        Arg::F32(x),
        Arg::U64(offsets),
        Arg::U32(rows),
        Arg::F32Mut(sums),
        Arg::U32Mut(counts),
        Arg::I64(i64_of(k, "codes")?),
        Arg::I64(i64_of(d, "dimension")?),
    ];
    // SAFETY: the arguments follow ema_sums_sorted_f32(const float* x, const u64* offsets,
    // const u32* rows, float* sums, u32* counts, long long k, long long d). offsets holds k + 1
    // non-decreasing values ending at n ≤ rows.len() (ema::group_by_code or its device twin
    // sort::group_by_code), every row id is < n
    // and x holds n·d floats; sums holds k·d floats and counts k values. Block b writes only
    // codes b, b + grid, … < k.
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}

/// `usage_u32`: the histogram of n indices into k zeroed counts.
pub fn usage<G: Gpu>(
    gpu: &G,
    indices: &G::Buf<u32>,
    counts: &mut G::Buf<u32>,
    n: usize,
    k: usize,
) -> Result<()> {
    let kernel = kernels::USAGE_U32;
    let privatised = k <= USAGE_SHARED_CODES;
    let shape = LaunchShape {
        shared_bytes: if privatised { (k * 4) as u32 } else { 0 },
        ..LaunchShape::linear(
            grid_stride_blocks(n, tiles::GRID_STRIDE_THREADS, gpu.sm_count() * 4),
            tiles::GRID_STRIDE_THREADS as u32,
        )
    };
    let k32 =
        u32::try_from(k).map_err(|_| Error::InvalidArgument(format!("{k} codes exceed u32")))?;
    let mut args = [
        Arg::U32(indices),
        Arg::U32Mut(counts),
        Arg::I64(i64_of(n, "indices")?),
        Arg::U32Val(k32),
        Arg::I32(i32::from(privatised)),
    ];
    // SAFETY: the arguments follow usage_u32(const u32* idx, u32* counts, long long n,
    // unsigned k, int privatised). idx holds n values all < k (usage::validate), counts k
    // zeroed values; when privatised the dynamic shared memory is 4·k ≤ USAGE_SHARED_BYTES,
    // exactly the k bins the kernel indexes.
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}
