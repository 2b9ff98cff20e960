//! The launchers: each kernel's grid and block sizes, dynamic shared memory and argument order,
//! written once over [`Gpu`] so that the real GPU and the emulated device run the same code.
//! Sizes come from kernels/tiles.cuh through [`tiles`].

use super::device::{Arg, Gpu, LaunchShape};
use super::kernels::{self, KernelId, tiles};
use crate::error::{Error, Result};
use crate::matrix::MatRef;
use crate::nearest::{self, Metric, Precision, Prepared};

/// A launcher: `fn name(gpu, a: A, …) { body }` becomes `fn name<G: Gpu>(gpu: &G, a: A, …) ->
/// Result<()>`, so that every launcher has the same generic device, first parameter and result,
/// written once, and its signature is as short as its kernel's.
macro_rules! launcher {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($gpu:ident $(, $p:tt: $t:ty)* $(,)?)
        $body:block) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<G: $crate::backend::cuda::Gpu>($gpu: &G $(, $p: $t)*)
            -> $crate::error::Result<()> $body
    };
}
pub(crate) use launcher;

/// A kernel's argument list, in its parameter order, with the buffers' length checks written
/// beside the arguments they guard: `F32(x; n * d, "x")` checks that `x` holds at least `n·d`
/// elements ([`check_len`], an `Error::Shape` naming "x") and passes it as [`Arg::F32`];
/// `F32(x)` passes it unchecked (the caller checked it); `Len(n, "rows")` passes a count as the
/// kernels' `long long` ([`i64_of`]) and `Int(d, "dimension")` as an `int`; any other
/// `Kind(value)` is `Arg::Kind(value)`. Every check runs (in the order written) before the list
/// exists, so a launch never starts on a buffer that is too small. Used as
/// `let mut args = launch_args![gpu; …];` then `unsafe { run(gpu, KERNEL, shape, &mut args) }`.
macro_rules! launch_args {
    ($gpu:expr; $($kind:ident($($arg:tt)*)),* $(,)?) => {{
        $($crate::backend::cuda::launch::launch_args!(@check $gpu, $kind $($arg)*);)*
        [$($crate::backend::cuda::launch::launch_args!(@arg $kind $($arg)*)),*]
    }};
    (@check $gpu:expr, $kind:ident $buf:expr; $need:expr, $what:expr) => {
        $crate::backend::cuda::launch::check_len($gpu, $buf, $need, $what)?
    };
    (@check $gpu:expr, $($other:tt)*) => {
        ()
    };
    (@arg Len $v:expr, $what:expr) => {
        $crate::backend::cuda::Arg::I64($crate::backend::cuda::launch::i64_of($v, $what)?)
    };
    (@arg Int $v:expr, $what:expr) => {
        $crate::backend::cuda::Arg::I32($crate::backend::cuda::launch::i32_of($v, $what)?)
    };
    (@arg $kind:ident $buf:expr $(; $need:expr, $what:expr)?) => {
        $crate::backend::cuda::Arg::$kind($buf)
    };
}
pub(crate) use launch_args;

/// Launches `kernel` with `args` over `shape`, named by the kernel in errors.
///
/// # Safety
/// As [`Gpu::launch`]: `args` match the kernel's parameters in order and type, every buffer
/// covers what the kernel touches for them and this shape, and the shape is one it is written
/// for. Each call site says why in its `// SAFETY:` comment.
pub(crate) unsafe fn run<G: Gpu>(
    gpu: &G,
    kernel: KernelId,
    shape: LaunchShape,
    args: &mut [Arg<'_, G>],
) -> Result<()> {
    // SAFETY: forwarded from this function's contract.
    unsafe { gpu.launch(kernel, shape, args) }
}

/// One thread per row over `rows` rows, ROW_THREADS per block, grid-stride beyond 32 blocks
/// per SM.
pub(crate) fn rows_grid_stride<G: Gpu>(gpu: &G, rows: usize) -> LaunchShape {
    let blocks = grid_stride_blocks(rows, tiles::ROW_THREADS, gpu.sm_count() * 32);
    LaunchShape::linear(blocks, tiles::ROW_THREADS as u32)
}

/// `blocks` blocks of REDUCE_THREADS: stage 1 of the f64 reductions (REDUCE_BLOCKS blocks, one
/// partial each) or their stage 2 (one block).
pub(crate) fn reduce_shape(blocks: usize) -> LaunchShape {
    LaunchShape::linear(blocks as u32, tiles::REDUCE_THREADS as u32)
}

launcher! {
    /// Stage 2 of an f64 reduction: `kernel` (`reduce_f64` or `global_norm_f64`, both
    /// `(const double* partials, long long m, double* out)`) folds the REDUCE_BLOCKS stage-1
    /// `partials` into out[0].
    pub(crate) fn reduce_stage2(gpu, kernel: KernelId, partials: &G::Buf<f64>,
        out: &mut G::Buf<f64>) {
        let m = tiles::REDUCE_BLOCKS;
        let mut args = launch_args![gpu;
            F64(partials; m, "reduction partials"), Len(m, "partials"),
            F64Mut(out; 1, "reduction result"),
        ];
        // SAFETY: the arguments follow reduce_f64 and global_norm_f64 (const double* partials, long
        // long m, double* out): partials holds ≥ m = REDUCE_BLOCKS values and out ≥ 1 (checked);
        // one block of REDUCE_THREADS (a power of two, the size of its shared tree) reads
        // partials[0..m) and writes out[0].
        unsafe { run(gpu, kernel, reduce_shape(1), &mut args) }
    }
}

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
    grid_stride_capped(gpu, total, 32)
}

/// [`grid_stride`] with at most `per_sm` blocks per SM.
pub(crate) fn grid_stride_capped<G: Gpu>(gpu: &G, total: usize, per_sm: u32) -> LaunchShape {
    let blocks = grid_stride_blocks(total, tiles::GRID_STRIDE_THREADS, gpu.sm_count() * per_sm);
    LaunchShape::linear(blocks, tiles::GRID_STRIDE_THREADS as u32)
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

impl<G: Gpu> NearestInputs<G> {
    /// The operands as the kernels take them.
    pub fn operands(&self) -> NearestOperands<'_, G> {
        NearestOperands {
            x: &self.x,
            codebook: &self.codebook,
            norms: &self.norms,
            n: self.n,
            k: self.k,
            d: self.d,
        }
    }
}

launcher! {
    /// `nearest_f32`, `nearest_tf32` or `nearest_bf16` over the n rows of `input` against its k
    /// codes, into `out` (n rows).
    pub fn nearest(gpu, precision: Precision, input: &NearestInputs<G>, out: &mut NearestOut<G>) {
        nearest_into(gpu, precision, &input.operands(), out)
    }
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
        return Err(Error::shape(
            what,
            format!("at least {need} elements"),
            format!("{len} elements"),
        ));
    }
    Ok(())
}

launcher! {
    /// The nearest kernel for `precision` over `op`, writing per row the best index, its score and
    /// the runner-up score into `out` (each output at least n elements).
    pub fn nearest_into(gpu, precision: Precision, op: &NearestOperands<'_, G>,
        out: &mut NearestOut<G>) {
        let (n, k, d) = (op.n, op.k, op.d);
        let NearestOut { best, best_score, second_score } = out;
        let mut args = launch_args![gpu;
            F32(op.x; n * d, "x"), F32(op.codebook; k * d, "codebook"),
            F32(op.norms; k, "code norms"), U32Mut(best; n, "best indices"),
            F32Mut(best_score; n, "best scores"), F32Mut(second_score; n, "runner-up scores"),
            Len(n, "rows"), Len(k, "codes"), Int(d, "dimension"),
        ];
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
        let shape = LaunchShape::linear(blocks, threads as u32);
        // SAFETY: the arguments follow the signature shared by nearest_f32, nearest_tf32 and
        // nearest_bf16 (3 const f32 pointers, u32/f32/f32 outputs, long long n, long long k, int
        // d). x holds n·d, codebook k·d and norms k floats; each output holds n elements (all
        // checked above). The kernels read rows < n and codes < k only (16-byte loads only when d %
        // 4 == 0, at offsets that are multiples of 4 floats of 256-byte-aligned allocations) and
        // write outputs[r] for r < n only; the block size and ceil(n / rows per block) blocks are
        // the shapes they are written for (tiles.cuh, static_asserted in the kernels); static
        // shared memory only (≤ 46 KiB).
        unsafe { run(gpu, kernel, shape, &mut args) }
    }
}

/// Converts a dimension to the `int` the kernels take.
pub(crate) fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{what} = {v} exceeds i32")))
}

/// The shape of a one-thread-per-row kernel over `rows` rows.
fn row_shape(rows: usize) -> LaunchShape {
    let blocks = rows
        .div_ceil(tiles::ROW_THREADS)
        .clamp(1, i32::MAX as usize);
    LaunchShape::linear(blocks as u32, tiles::ROW_THREADS as u32)
}

launcher! {
    /// `row_norms_f32`: norms[r] = ||m_r||² (f64 rounded to f32) for the `rows` rows of m (rows·d),
    /// and the bits of the largest ||m_r|| in f64 into `max_bits` (zeroed here first).
    pub fn row_norms(gpu, m: &G::Buf<f32>, norms: &mut G::Buf<f32>, max_bits: &mut G::Buf<u64>,
        rows: usize, d: usize) {
        check_len(gpu, max_bits, 1, "largest norm")?;
        gpu.zero("largest norm", max_bits)?;
        let mut args = launch_args![gpu;
            F32(m; rows * d, "matrix"), F32Mut(norms; rows, "row norms"), U64Mut(max_bits),
            Len(rows, "rows"), Int(d, "dimension"),
        ];
        // SAFETY: the arguments follow row_norms_f32(const float* m, float* norms, u64* max_bits,
        // long long rows, int d); m holds rows·d floats, norms rows floats, max_bits one value
        // (checked above); thread r < rows touches row r and norms[r] only.
        unsafe { run(gpu, kernels::ROW_NORMS_F32, row_shape(rows), &mut args) }
    }
}

launcher! {
    /// `normalize_rows_f32`: dst = src with every row scaled to unit L2 norm (f64, rounded once).
    pub fn normalize_rows(gpu, src: &G::Buf<f32>, dst: &mut G::Buf<f32>, rows: usize, d: usize) {
        let mut args = launch_args![gpu;
            F32(src; rows * d, "rows to normalise"), F32Mut(dst; rows * d, "normalised rows"),
            Len(rows, "rows"), Int(d, "dimension"),
        ];
        // SAFETY: the arguments follow normalize_rows_f32(const float* src, float* dst, long long
        // rows, int d); both hold rows·d floats (checked above) and are distinct buffers (one
        // shared and one exclusive borrow); thread r touches row r only.
        unsafe { run(gpu, kernels::NORMALIZE_ROWS_F32, row_shape(rows), &mut args) }
    }
}

/// `check_values_f32` over the first `len` values of `v`: (flat index of the first non-finite
/// value, largest finite |value|). Downloads 12 bytes.
pub fn check_values<G: Gpu>(gpu: &G, v: &G::Buf<f32>, len: usize) -> Result<(Option<u64>, f32)> {
    check_len(gpu, v, len, "values")?;
    let mut first_bad = gpu.upload("first non-finite index", &[u64::MAX])?;
    let mut max_abs = gpu.alloc_zeros::<u32>("largest magnitude", 1)?;
    let shape = grid_stride_capped(gpu, len, 8);
    let mut args = launch_args![gpu;
        F32(v), Len(len, "values"), U64Mut(&mut first_bad), U32Mut(&mut max_abs),
    ];
    // SAFETY: the arguments follow check_values_f32(const float* v, long long len, u64*
    // first_bad, u32* max_abs_bits); v holds at least len floats (checked above), the two
    // outputs one value each; the grid-stride loop stays below len.
    unsafe { run(gpu, kernels::CHECK_VALUES_F32, shape, &mut args) }?;
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
    /// The nearest kernel's candidates per row.
    pub found: &'a NearestOut<G>,
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

/// Room for a [`RowList`] of up to `n` ids, owned: the ids a kernel (a flag pass,
/// [`super::sort::compact`]) writes and their count.
pub struct DeviceList<G: Gpu> {
    pub rows: G::Buf<u32>,
    pub count: G::Buf<u32>,
}

impl<G: Gpu> DeviceList<G> {
    /// Zeroed room for `n` ids (`what` names them in errors) and their count.
    pub fn new(gpu: &G, n: usize, what: &str) -> Result<Self> {
        Ok(DeviceList {
            rows: gpu.alloc_zeros(what, n)?,
            count: gpu.alloc_zeros(&format!("count of {what}"), 1)?,
        })
    }

    /// The list as the kernels read it.
    pub fn as_list(&self) -> RowList<'_, G> {
        RowList {
            rows: &self.rows,
            count: &self.count,
        }
    }
}

launcher! {
    /// `recheck_flag_f32`: examines all n rows (`list` None) or the `*count` rows of a device list;
    /// appends rows whose margin is inside the bound to `list_out` (counted in `count_out`, zeroed
    /// here first) and writes the distance of every other examined row.
    pub fn recheck_flag(gpu, op: &FlagPass<'_, G>, list: Option<RowList<'_, G>>,
        dist: &mut G::Buf<f32>, list_out: &mut G::Buf<u32>, count_out: &mut G::Buf<u32>) {
        let (n, k, d) = (op.n, op.k, op.d);
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
            None => (&op.found.best, &op.found.best),
        };
        let mut args = launch_args![gpu;
            F32(op.x; n * d, "x"), F32(op.codebook; k * d, "codebook"),
            U64(op.max_norm_bits; 1, "largest code norm"), U32(list_in), U32(count_in),
            U32(&op.found.best; n, "best indices"), F32(&op.found.best_score; n, "best scores"),
            F32(&op.found.second_score; n, "runner-up scores"), F32Mut(dist; n, "distances"),
            U32Mut(list_out; n, "flagged rows"), U32Mut(count_out), Len(n, "rows"),
            Int(d, "dimension"), I32(i32::from(op.metric == Metric::Cosine)),
            I32(i32::from(list.is_some())), I32(i32::from(op.exact_distance)), F64Val(gamma),
            F64Val(dot_factor),
        ];
        // SAFETY: the arguments follow recheck_flag_f32 (kernels/recheck.cu) in order and type.
        // x holds n·d and codebook k·d floats; best, the scores, dist and list_out n elements;
        // max_norm_bits, count_out (and count_in with a list) one value (all checked above). With a
        // list, *count_in ≤ n entries of list_in are row ids < n (written by a previous flag pass);
        // every index in best is < k (written by a nearest kernel over k codes). Thread j touches
        // row list_in[j] (or j) and one slot of list_out claimed by atomicAdd, < n.
        unsafe { run(gpu, kernels::RECHECK_FLAG_F32, row_shape(n), &mut args) }
    }
}

/// The shape of a one-listed-row-per-block kernel: enough blocks to fill the device, at most
/// one per possible row (the list's length is known only on the device).
fn listed_rows_shape<G: Gpu>(gpu: &G, n: usize) -> LaunchShape {
    let blocks = grid_stride_blocks(n, 1, gpu.sm_count() * 8);
    LaunchShape::linear(blocks, tiles::RECHECK_THREADS as u32)
}

launcher! {
    /// `nearest_rows_f32`: nearest_f32's candidates for the `*count` rows of `list`, written at
    /// those rows' positions of the outputs.
    pub fn nearest_rows(gpu, op: &NearestOperands<'_, G>, list: &G::Buf<u32>, count: &G::Buf<u32>,
        best: &mut G::Buf<u32>, best_score: &mut G::Buf<f32>, second_score: &mut G::Buf<f32>) {
        let (n, k, d) = (op.n, op.k, op.d);
        let mut args = launch_args![gpu;
            F32(op.x; n * d, "x"), F32(op.codebook; k * d, "codebook"),
            F32(op.norms; k, "code norms"), U32(list; n, "listed rows"),
            U32(count; 1, "listed count"), U32Mut(best; n, "best indices"),
            F32Mut(best_score; n, "best scores"), F32Mut(second_score; n, "runner-up scores"),
            Len(k, "codes"), Int(d, "dimension"),
        ];
        // SAFETY: the arguments follow nearest_rows_f32 (kernels/recheck.cu) in order and type. x
        // holds n·d, codebook k·d and norms k floats; list n entries of which the first *count ≤ n
        // are row ids < n (a flag pass wrote them); each output holds n elements (checked above).
        // Block j writes row list[j]'s outputs only; RECHECK_THREADS is the block it is written
        // for.
        unsafe { run(gpu, kernels::NEAREST_ROWS_F32, listed_rows_shape(gpu, n), &mut args) }
    }
}

launcher! {
    /// `nearest_exact_f64`: the exact index and distance of the `*count` rows of `list`.
    pub fn nearest_exact(gpu, x: &G::Buf<f32>, codebook: &G::Buf<f32>, list: &G::Buf<u32>,
        count: &G::Buf<u32>, indices: &mut G::Buf<u32>, distances: &mut G::Buf<f32>,
        (n, k, d): (usize, usize, usize), metric: Metric) {
        let mut args = launch_args![gpu;
            F32(x; n * d, "x"), F32(codebook; k * d, "codebook"), U32(list; n, "listed rows"),
            U32(count; 1, "listed count"), U32Mut(indices; n, "indices"),
            F32Mut(distances; n, "distances"), Len(k, "codes"), Int(d, "dimension"),
            I32(i32::from(metric == Metric::Cosine)),
        ];
        // SAFETY: the arguments follow nearest_exact_f64 (kernels/recheck.cu) in order and type. x
        // holds n·d and codebook k·d floats; list n entries of which the first *count ≤ n are row
        // ids < n; indices and distances n elements (checked above). Block j writes row list[j]'s
        // outputs only; RECHECK_THREADS is the block it is written for.
        unsafe { run(gpu, kernels::NEAREST_EXACT_F64, listed_rows_shape(gpu, n), &mut args) }
    }
}

launcher! {
    /// `gather_f32` (or `gather_f32x4` when d % 4 == 0): out (n·d floats) = codebook rows by index.
    pub fn gather(gpu, codebook: &G::Buf<f32>, indices: &G::Buf<u32>, out: &mut G::Buf<f32>,
        n: usize, d: usize) {
        let vec4 = d.is_multiple_of(4);
        let (kernel, width) = if vec4 {
            (kernels::GATHER_F32X4, d / 4)
        } else {
            (kernels::GATHER_F32, d)
        };
        let mut args = launch_args![gpu;
            F32(codebook), U32(indices), F32Mut(out), Len(n, "rows"), Len(width, "row width"),
        ];
        // SAFETY: the arguments follow gather_f32(const float*, const u32*, float*, long long n,
        // long long d) and gather_f32x4 (the same over float4, width d/4, chosen only when d % 4 ==
        // 0 so every row is a whole number of 16-byte-aligned float4). indices holds n values, all
        // < K (gather::validate), codebook K·d floats, out n·d floats; the grid-stride loop stays
        // below n·width.
        unsafe { run(gpu, kernel, grid_stride(gpu, n * width), &mut args) }
    }
}

launcher! {
    /// `ema_sums_atomic_f32`: per-code sums (k·d, zeroed by the caller) and counts (k, zeroed) of
    /// the n rows of x by their indices.
    pub fn sums_atomic(gpu, x: &G::Buf<f32>, indices: &G::Buf<u32>, sums: &mut G::Buf<f32>,
        counts: &mut G::Buf<u32>, n: usize, d: usize) {
        let mut args = launch_args![gpu;
            F32(x), U32(indices), F32Mut(sums), U32Mut(counts), Len(n, "rows"), Len(d, "dimension"),
        ];
        // SAFETY: the arguments follow ema_sums_atomic_f32(const float* x, const u32* idx,
        // float* sums, u32* counts, long long n, long long d). x holds n·d floats, idx n values all
        // < K (ema::validate), sums K·d floats and counts K values; the grid-stride loop stays
        // below n·d.
        unsafe { run(gpu, kernels::EMA_SUMS_ATOMIC_F32, grid_stride(gpu, n * d), &mut args) }
    }
}

launcher! {
    /// `ema_sums_sorted_f32`: the deterministic sums from a stable counting sort (offsets: k + 1
    /// values, rows: n row ids grouped by code), [`super::sort::group_by_code`] on the device.
    pub fn sums_sorted(gpu, x: &G::Buf<f32>, offsets: &G::Buf<u64>, rows: &G::Buf<u32>,
        sums: &mut G::Buf<f32>, counts: &mut G::Buf<u32>, k: usize, d: usize) {
        let threads = (d.div_ceil(32) * 32).clamp(32, tiles::SORTED_MAX_THREADS) as u32;
        let shape = LaunchShape::linear(k.clamp(1, 1 << 24) as u32, threads);
        let mut args = launch_args![gpu;
            F32(x), U64(offsets), U32(rows), F32Mut(sums), U32Mut(counts), Len(k, "codes"),
            Len(d, "dimension"),
        ];
        // SAFETY: the arguments follow ema_sums_sorted_f32(const float* x, const u64* offsets,
        // const u32* rows, float* sums, u32* counts, long long k, long long d). offsets holds k + 1
        // non-decreasing values ending at n ≤ rows.len() (ema::group_by_code or its device twin
        // sort::group_by_code), every row id is < n
        // and x holds n·d floats; sums holds k·d floats and counts k values. Block b writes only
        // codes b, b + grid, … < k.
        unsafe { run(gpu, kernels::EMA_SUMS_SORTED_F32, shape, &mut args) }
    }
}

launcher! {
    /// `usage_u32`: the histogram of n indices into k zeroed counts.
    pub fn usage(gpu, indices: &G::Buf<u32>, counts: &mut G::Buf<u32>, n: usize, k: usize) {
        let privatised = k <= USAGE_SHARED_CODES;
        let shape = LaunchShape {
            shared_bytes: if privatised { (k * 4) as u32 } else { 0 },
            ..grid_stride_capped(gpu, n, 4)
        };
        let k32 =
            u32::try_from(k).map_err(|_| Error::InvalidArgument(format!("{k} codes exceed u32")))?;
        let mut args = launch_args![gpu;
            U32(indices), U32Mut(counts), Len(n, "indices"), U32Val(k32),
            I32(i32::from(privatised)),
        ];
        // SAFETY: the arguments follow usage_u32(const u32* idx, u32* counts, long long n,
        // unsigned k, int privatised). idx holds n values all < k (usage::validate), counts k
        // zeroed values; when privatised the dynamic shared memory is 4·k ≤ USAGE_SHARED_BYTES,
        // exactly the k bins the kernel indexes.
        unsafe { run(gpu, kernels::USAGE_U32, shape, &mut args) }
    }
}
