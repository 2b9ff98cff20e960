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

// What every launcher (this file, sort.rs, step.rs, mlp.rs, optim.rs) assumes of
// kernels/tiles.cuh: whole warps within CUDA's block limit, dynamic shared memory within the
// 48 KiB a launch gets without opting in, and power-of-two reduction blocks (their trees halve
// them) on a grid CUDA accepts.
const _: () = {
    let blocks = [
        tiles::NEAREST_THREADS,
        tiles::TC_THREADS,
        tiles::GRID_STRIDE_THREADS,
        tiles::SORTED_MAX_THREADS,
        tiles::RECHECK_THREADS,
        tiles::ROW_THREADS,
        tiles::ROW_MAX_THREADS,
        tiles::REDUCE_THREADS,
        tiles::SORT_THREADS,
    ];
    let mut i = 0;
    while i < blocks.len() {
        assert!(blocks[i].is_multiple_of(32) && blocks[i] <= 1024);
        i += 1;
    }
    assert!(tiles::USAGE_SHARED_BYTES <= 48 * 1024);
    assert!(tiles::RECHECK_THREADS.is_power_of_two() && tiles::REDUCE_THREADS.is_power_of_two());
    assert!(tiles::REDUCE_BLOCKS >= 1 && tiles::REDUCE_BLOCKS <= 65_535);
    assert!(tiles::SORT_MIN_SEGMENT_ROWS >= 1 && tiles::SORT_MAX_SEGMENTS >= 1);
};

/// `a · b` elements, or an error naming `what` when that overflows the kernels' `long long`.
pub(crate) fn elems(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b)
        .filter(|&v| i64::try_from(v).is_ok())
        .ok_or_else(|| Error::InvalidArgument(format!("{what}: {a} × {b} elements exceed i64")))
}

/// The 1-D grid-stride shape of the element-wise kernels over `total` items.
pub(crate) fn grid_stride<G: Gpu>(gpu: &G, total: usize) -> LaunchShape {
    LaunchShape::linear(
        grid_stride_blocks(total, tiles::GRID_STRIDE_THREADS, gpu.sm_count() * 32),
        tiles::GRID_STRIDE_THREADS as u32,
    )
}

/// Converts a count to the `long long` the kernels take.
pub(crate) fn i64_of(v: usize, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::InvalidArgument(format!("{what} = {v} exceeds i64")))
}

/// Blocks for a grid-stride kernel over `total` items: enough to fill the device, no more.
pub(crate) fn grid_stride_blocks(total: usize, per_block: usize, cap: u32) -> u32 {
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
    let operands = NearestOperands {
        x: &input.x,
        codebook: &input.codebook,
        norms: &input.norms,
        n: input.n,
        k: input.k,
        d: input.d,
    };
    nearest_into(
        gpu,
        precision,
        &operands,
        &mut out.best,
        &mut out.best_score,
        &mut out.second_score,
    )
}

/// The operands of a nearest kernel, wherever they live: x (n·d, normalised for cosine), the
/// scored codebook (k·d) and its f32 norms (k).
pub struct NearestOperands<'a, G: Gpu> {
    pub x: &'a G::Buf<f32>,
    pub codebook: &'a G::Buf<f32>,
    pub norms: &'a G::Buf<f32>,
    pub n: usize,
    pub k: usize,
    pub d: usize,
}

/// Checks that `buf` holds at least `need` elements before a kernel indexes it.
pub(crate) fn check_len<G: Gpu, T: super::device::Elem>(
    gpu: &G,
    buf: &G::Buf<T>,
    need: usize,
    what: &str,
) -> Result<()> {
    let len = gpu.len(buf);
    if len < need {
        return Err(Error::Shape {
            what: what.into(),
            expected: format!("at least {need} elements"),
            got: format!("{len} elements"),
        });
    }
    Ok(())
}

/// The nearest kernel for `precision` over `op`, writing per row the best index, its score and
/// the runner-up score (each output at least n elements).
pub fn nearest_into<G: Gpu>(
    gpu: &G,
    precision: Precision,
    op: &NearestOperands<'_, G>,
    best: &mut G::Buf<u32>,
    best_score: &mut G::Buf<f32>,
    second_score: &mut G::Buf<f32>,
) -> Result<()> {
    let (n, k, d) = (op.n, op.k, op.d);
    check_len(gpu, op.x, n * d, "x")?;
    check_len(gpu, op.codebook, k * d, "codebook")?;
    check_len(gpu, op.norms, k, "code norms")?;
    check_len(gpu, best, n, "best indices")?;
    check_len(gpu, best_score, n, "best scores")?;
    check_len(gpu, second_score, n, "runner-up scores")?;
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
    let d32 = i32_of(d, "dimension")?;
    let (n64, k64) = (i64_of(n, "rows")?, i64_of(k, "codes")?);
    let shape = LaunchShape::linear(blocks, threads as u32);
    let mut args = [
        Arg::F32(op.x),
        Arg::F32(op.codebook),
        Arg::F32(op.norms),
        Arg::U32Mut(best),
        Arg::F32Mut(best_score),
        Arg::F32Mut(second_score),
        Arg::I64(n64),
        Arg::I64(k64),
        Arg::I32(d32),
    ];
    // SAFETY: the arguments follow the signature shared by nearest_f32, nearest_tf32 and
    // nearest_bf16 (3 const f32 pointers, u32/f32/f32 outputs, long long n, long long k, int d).
    // x holds n·d, codebook k·d and norms k floats; each output holds n elements (all checked
    // above). The kernels read rows < n and codes < k only (16-byte loads only when d % 4 == 0,
    // at offsets that are multiples of 4 floats of 256-byte-aligned allocations) and write
    // outputs[r] for r < n only; the block size and ceil(n / rows per block) blocks are the
    // shapes they are written for (tiles.cuh, static_asserted in the kernels); static shared
    // memory only (≤ 46 KiB).
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}

/// Converts a dimension to the `int` the kernels take.
fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{what} = {v} exceeds i32")))
}

/// Blocks for a one-thread-per-row kernel over `rows` rows.
fn row_blocks(rows: usize) -> u32 {
    rows.div_ceil(tiles::ROW_THREADS)
        .clamp(1, i32::MAX as usize) as u32
}

/// `row_norms_f32`: norms[r] = ||m_r||² (f64 rounded to f32) for the `rows` rows of m (rows·d),
/// and the bits of the largest ||m_r|| in f64 into `max_bits` (zeroed here first).
pub fn row_norms<G: Gpu>(
    gpu: &G,
    m: &G::Buf<f32>,
    norms: &mut G::Buf<f32>,
    max_bits: &mut G::Buf<u64>,
    rows: usize,
    d: usize,
) -> Result<()> {
    check_len(gpu, m, rows * d, "matrix")?;
    check_len(gpu, norms, rows, "row norms")?;
    check_len(gpu, max_bits, 1, "largest norm")?;
    gpu.zero("largest norm", max_bits)?;
    let kernel = kernels::ROW_NORMS_F32;
    let shape = LaunchShape::linear(row_blocks(rows), tiles::ROW_THREADS as u32);
    let mut args = [
        Arg::F32(m),
        Arg::F32Mut(norms),
        Arg::U64Mut(max_bits),
        Arg::I64(i64_of(rows, "rows")?),
        Arg::I32(i32_of(d, "dimension")?),
    ];
    // SAFETY: the arguments follow row_norms_f32(const float* m, float* norms, u64* max_bits,
    // long long rows, int d); m holds rows·d floats, norms rows floats, max_bits one value
    // (checked above); thread r < rows touches row r and norms[r] only.
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}

/// `normalize_rows_f32`: dst = src with every row scaled to unit L2 norm (f64, rounded once).
pub fn normalize_rows<G: Gpu>(
    gpu: &G,
    src: &G::Buf<f32>,
    dst: &mut G::Buf<f32>,
    rows: usize,
    d: usize,
) -> Result<()> {
    check_len(gpu, src, rows * d, "rows to normalise")?;
    check_len(gpu, dst, rows * d, "normalised rows")?;
    let kernel = kernels::NORMALIZE_ROWS_F32;
    let shape = LaunchShape::linear(row_blocks(rows), tiles::ROW_THREADS as u32);
    let mut args = [
        Arg::F32(src),
        Arg::F32Mut(dst),
        Arg::I64(i64_of(rows, "rows")?),
        Arg::I32(i32_of(d, "dimension")?),
    ];
    // SAFETY: the arguments follow normalize_rows_f32(const float* src, float* dst, long long
    // rows, int d); both hold rows·d floats (checked above) and are distinct buffers (one
    // shared and one exclusive borrow); thread r touches row r only.
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}

/// `check_values_f32` over the first `len` values of `v`: (flat index of the first non-finite
/// value, largest finite |value|). Downloads 12 bytes.
pub fn check_values<G: Gpu>(gpu: &G, v: &G::Buf<f32>, len: usize) -> Result<(Option<u64>, f32)> {
    check_len(gpu, v, len, "values")?;
    let mut first_bad = gpu.upload("first non-finite index", &[u64::MAX])?;
    let mut max_abs = gpu.alloc_zeros::<u32>("largest magnitude", 1)?;
    let kernel = kernels::CHECK_VALUES_F32;
    let shape = LaunchShape::linear(
        grid_stride_blocks(len, tiles::GRID_STRIDE_THREADS, gpu.sm_count() * 8),
        tiles::GRID_STRIDE_THREADS as u32,
    );
    let mut args = [
        Arg::F32(v),
        Arg::I64(i64_of(len, "values")?),
        Arg::U64Mut(&mut first_bad),
        Arg::U32Mut(&mut max_abs),
    ];
    // SAFETY: the arguments follow check_values_f32(const float* v, long long len, u64*
    // first_bad, u32* max_abs_bits); v holds at least len floats (checked above), the two
    // outputs one value each; the grid-stride loop stays below len.
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }?;
    let bad = gpu.download("first non-finite index", &first_bad)?[0];
    let max = f32::from_bits(gpu.download("largest magnitude", &max_abs)?[0]);
    Ok(((bad != u64::MAX).then_some(bad), max))
}

/// The operands of the recheck's flag pass.
pub struct FlagPass<'a, G: Gpu> {
    /// Raw rows (n·d), not normalised.
    pub x: &'a G::Buf<f32>,
    /// Raw codebook (k·d).
    pub codebook: &'a G::Buf<f32>,
    /// Bits of the largest code norm in f64 (from [`row_norms`]; ignored under cosine).
    pub max_norm_bits: &'a G::Buf<u64>,
    pub best: &'a G::Buf<u32>,
    pub best_score: &'a G::Buf<f32>,
    pub second_score: &'a G::Buf<f32>,
    pub n: usize,
    pub k: usize,
    pub d: usize,
    pub metric: Metric,
    /// The arithmetic the scores were computed in (it sets the bound).
    pub precision: Precision,
    /// Whether rows that pass get the exact f64 distance to their winner rather than the one
    /// implied by the f32 score (needed after low-precision scoring, whose rows carry the
    /// operands' rounding, and on shifted data the expanded form loses digits).
    pub exact_distance: bool,
}

/// A list of row ids on the device and its length, also on the device (written by a kernel:
/// the host does not know it).
pub struct RowList<'a, G: Gpu> {
    pub rows: &'a G::Buf<u32>,
    pub count: &'a G::Buf<u32>,
}

/// `recheck_flag_f32`: examines all n rows (`list` None) or the `*count` rows of a device list;
/// appends rows whose margin is inside the bound to `list_out` (counted in `count_out`, zeroed
/// here first) and writes the distance of every other examined row.
pub fn recheck_flag<G: Gpu>(
    gpu: &G,
    op: &FlagPass<'_, G>,
    list: Option<RowList<'_, G>>,
    dist: &mut G::Buf<f32>,
    list_out: &mut G::Buf<u32>,
    count_out: &mut G::Buf<u32>,
) -> Result<()> {
    let (n, k, d) = (op.n, op.k, op.d);
    check_len(gpu, op.x, n * d, "x")?;
    check_len(gpu, op.codebook, k * d, "codebook")?;
    check_len(gpu, op.max_norm_bits, 1, "largest code norm")?;
    for (b, what) in [
        (op.best_score, "best scores"),
        (op.second_score, "runner-up scores"),
    ] {
        check_len(gpu, b, n, what)?;
    }
    check_len(gpu, op.best, n, "best indices")?;
    check_len(gpu, dist, n, "distances")?;
    check_len(gpu, list_out, n, "flagged rows")?;
    check_len(gpu, count_out, 1, "flagged count")?;
    gpu.zero("flagged count", count_out)?;
    let (gamma, dot_factor) = op.precision.model().factors(d);
    // Without a list the kernel never reads list_in/count_in: any buffer stands in.
    let (list_in, count_in) = match &list {
        Some(RowList { rows: l, count: c }) => {
            check_len(gpu, l, n, "rows to examine")?;
            check_len(gpu, c, 1, "count of rows to examine")?;
            (*l, *c)
        }
        None => (op.best, op.best),
    };
    let kernel = kernels::RECHECK_FLAG_F32;
    let shape = LaunchShape::linear(row_blocks(n), tiles::ROW_THREADS as u32);
    let mut args = [
        Arg::F32(op.x),
        Arg::F32(op.codebook),
        Arg::U64(op.max_norm_bits),
        Arg::U32(list_in),
        Arg::U32(count_in),
        Arg::U32(op.best),
        Arg::F32(op.best_score),
        Arg::F32(op.second_score),
        Arg::F32Mut(dist),
        Arg::U32Mut(list_out),
        Arg::U32Mut(count_out),
        Arg::I64(i64_of(n, "rows")?),
        Arg::I32(i32_of(d, "dimension")?),
        Arg::I32(i32::from(op.metric == Metric::Cosine)),
        Arg::I32(i32::from(list.is_some())),
        Arg::I32(i32::from(op.exact_distance)),
        Arg::F64Val(gamma),
        Arg::F64Val(dot_factor),
    ];
    // SAFETY: the arguments follow recheck_flag_f32 (kernels/recheck.cu) in order and type.
    // x holds n·d and codebook k·d floats; best, the scores, dist and list_out n elements;
    // max_norm_bits, count_out (and count_in with a list) one value (all checked above). With a
    // list, *count_in ≤ n entries of list_in are row ids < n (written by a previous flag pass);
    // every index in best is < k (written by a nearest kernel over k codes). Thread j touches
    // row list_in[j] (or j) and one slot of list_out claimed by atomicAdd, < n.
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}

/// Blocks of a one-listed-row-per-block kernel: enough to fill the device, at most one per
/// possible row (the list's length is known only on the device).
fn listed_row_blocks<G: Gpu>(gpu: &G, n: usize) -> u32 {
    grid_stride_blocks(n, 1, gpu.sm_count() * 8)
}

/// `nearest_rows_f32`: nearest_f32's candidates for the `*count` rows of `list`, written at
/// those rows' positions of the outputs.
pub fn nearest_rows<G: Gpu>(
    gpu: &G,
    op: &NearestOperands<'_, G>,
    list: &G::Buf<u32>,
    count: &G::Buf<u32>,
    best: &mut G::Buf<u32>,
    best_score: &mut G::Buf<f32>,
    second_score: &mut G::Buf<f32>,
) -> Result<()> {
    let (n, k, d) = (op.n, op.k, op.d);
    check_len(gpu, op.x, n * d, "x")?;
    check_len(gpu, op.codebook, k * d, "codebook")?;
    check_len(gpu, op.norms, k, "code norms")?;
    check_len(gpu, list, n, "listed rows")?;
    check_len(gpu, count, 1, "listed count")?;
    check_len(gpu, best, n, "best indices")?;
    check_len(gpu, best_score, n, "best scores")?;
    check_len(gpu, second_score, n, "runner-up scores")?;
    let kernel = kernels::NEAREST_ROWS_F32;
    let shape = LaunchShape::linear(listed_row_blocks(gpu, n), tiles::RECHECK_THREADS as u32);
    let mut args = [
        Arg::F32(op.x),
        Arg::F32(op.codebook),
        Arg::F32(op.norms),
        Arg::U32(list),
        Arg::U32(count),
        Arg::U32Mut(best),
        Arg::F32Mut(best_score),
        Arg::F32Mut(second_score),
        Arg::I64(i64_of(k, "codes")?),
        Arg::I32(i32_of(d, "dimension")?),
    ];
    // SAFETY: the arguments follow nearest_rows_f32 (kernels/recheck.cu) in order and type. x
    // holds n·d, codebook k·d and norms k floats; list n entries of which the first *count ≤ n
    // are row ids < n (a flag pass wrote them); each output holds n elements (checked above).
    // Block j writes row list[j]'s outputs only; RECHECK_THREADS is the block it is written for.
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}

/// `nearest_exact_f64`: the exact index and distance of the `*count` rows of `list`.
#[allow(clippy::too_many_arguments)]
pub fn nearest_exact<G: Gpu>(
    gpu: &G,
    x: &G::Buf<f32>,
    codebook: &G::Buf<f32>,
    list: &G::Buf<u32>,
    count: &G::Buf<u32>,
    indices: &mut G::Buf<u32>,
    distances: &mut G::Buf<f32>,
    (n, k, d): (usize, usize, usize),
    metric: Metric,
) -> Result<()> {
    check_len(gpu, x, n * d, "x")?;
    check_len(gpu, codebook, k * d, "codebook")?;
    check_len(gpu, list, n, "listed rows")?;
    check_len(gpu, count, 1, "listed count")?;
    check_len(gpu, indices, n, "indices")?;
    check_len(gpu, distances, n, "distances")?;
    let kernel = kernels::NEAREST_EXACT_F64;
    let shape = LaunchShape::linear(listed_row_blocks(gpu, n), tiles::RECHECK_THREADS as u32);
    let mut args = [
        Arg::F32(x),
        Arg::F32(codebook),
        Arg::U32(list),
        Arg::U32(count),
        Arg::U32Mut(indices),
        Arg::F32Mut(distances),
        Arg::I64(i64_of(k, "codes")?),
        Arg::I32(i32_of(d, "dimension")?),
        Arg::I32(i32::from(metric == Metric::Cosine)),
    ];
    // SAFETY: the arguments follow nearest_exact_f64 (kernels/recheck.cu) in order and type. x
    // holds n·d and codebook k·d floats; list n entries of which the first *count ≤ n are row
    // ids < n; indices and distances n elements (checked above). Block j writes row list[j]'s
    // outputs only; RECHECK_THREADS is the block it is written for.
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
