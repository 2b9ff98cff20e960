//! The launchers of kernels/sort.cu: the device-side stable counting sort of row ids by code
//! (the twin of [`crate::ema::group_by_code`], equal to it element for element), stable
//! compaction of flags into ids with the count left on the device, and the helpers around
//! them. Written once over [`Gpu`], like [`super::launch`].
//!
//! Every launcher checks the lengths of the buffers it is given (`Gpu::len`) and returns
//! [`Error::Shape`] / [`Error::InvalidArgument`] before launching on a buffer that is too small.

use super::device::{Gpu, LaunchShape};
use super::kernels::{self, tiles};
use super::launch::{self, check_len, launch_args, launcher, run};
use crate::error::{Error, Result};

/// Elements a block of the compaction kernels covers (kernels/sort.cu).
const COMPACT_TILE: usize = tiles::SORT_THREADS * tiles::SORT_ITEMS;

/// Scratch buffers of the device sort and compaction, reused across calls: each grows when a
/// call needs more and is never shrunk.
pub struct SortScratch<G: Gpu> {
    /// Per-(code, segment) counters of the sort.
    hist: Option<G::Buf<u32>>,
    /// Per-tile counts, then first slots, of the compaction.
    tiles: Option<G::Buf<u64>>,
    /// Code offsets and grouped row ids of [`code_sums_deterministic`].
    offsets: Option<G::Buf<u64>>,
    rows: Option<G::Buf<u32>>,
}

impl<G: Gpu> Default for SortScratch<G> {
    fn default() -> Self {
        Self::new()
    }
}

impl<G: Gpu> SortScratch<G> {
    /// Empty: nothing is allocated until a call needs it.
    pub fn new() -> Self {
        SortScratch {
            hist: None,
            tiles: None,
            offsets: None,
            rows: None,
        }
    }
}

/// `slot`'s buffer, reallocated (zeroed) when it holds fewer than `len` elements.
fn grown<'a, G: Gpu, T: super::Elem>(
    gpu: &G,
    slot: &'a mut Option<G::Buf<T>>,
    len: usize,
    what: &str,
) -> Result<&'a mut G::Buf<T>> {
    if slot.as_ref().is_none_or(|b| gpu.len(b) < len) {
        *slot = None; // free the old buffer before allocating the larger one
        *slot = Some(gpu.alloc_zeros(what, len)?);
    }
    Ok(slot.as_mut().expect("allocated above"))
}

/// Blocks for a grid-stride kernel over `total` items: enough to fill the device, no more.
fn grid_stride(gpu: &impl Gpu, total: usize) -> LaunchShape {
    let blocks = launch::grid_stride_blocks(total, tiles::SORT_THREADS, gpu.sm_count() * 32);
    LaunchShape::linear(blocks, tiles::SORT_THREADS as u32)
}

/// Blocks for one thread per item, or an error past CUDA's grid limit.
fn per_item(total: usize, what: &str) -> Result<LaunchShape> {
    let blocks = total.div_ceil(tiles::SORT_THREADS).max(1);
    let blocks = u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| Error::InvalidArgument(format!("{total} {what} exceed the CUDA grid")))?;
    Ok(LaunchShape::linear(blocks, tiles::SORT_THREADS as u32))
}

/// The segments of the sort for n rows and k codes: (S, rows per segment). 1 ≤ S ≤ max(1, n),
/// at least SORT_MIN_SEGMENT_ROWS rows per segment, at most SORT_MAX_SEGMENTS segments, and
/// S·k ≤ SORT_SCRATCH_MAX counters unless k alone exceeds it (then S = 1).
pub fn segments(n: usize, k: usize) -> (usize, usize) {
    // Rounded down, so that every segment but a lone one has at least the minimum of rows.
    let s = (n / tiles::SORT_MIN_SEGMENT_ROWS)
        .min(tiles::SORT_MAX_SEGMENTS)
        .min(tiles::SORT_SCRATCH_MAX / k.max(1))
        .max(1);
    // Rounding the length up can leave trailing segments empty; the kernels allow that.
    (s, n.div_ceil(s).max(1))
}

/// `fill_u32`: the first `len` values of `buf` set to `value`, on the device.
pub fn fill<G: Gpu>(gpu: &G, buf: &mut G::Buf<u32>, value: u32, len: usize) -> Result<()> {
    let mut args = launch_args![gpu;
        U32Mut(buf; len, "fill_u32 buffer"), U32Val(value), Len(len, "length"),
    ];
    // SAFETY: the arguments follow fill_u32(unsigned* p, unsigned value, long long n); p holds
    // at least n elements (checked above) and the grid-stride loop writes p[i] for i < n only.
    unsafe { run(gpu, kernels::FILL_U32, grid_stride(gpu, len), &mut args) }
}

/// `scan_exclusive_u64`: data[0..n] ← its exclusive prefix sums, data[n] ← the total.
fn scan_exclusive<G: Gpu>(gpu: &G, data: &mut G::Buf<u64>, n: usize) -> Result<()> {
    let mut args = launch_args![gpu;
        U64Mut(data; n + 1, "scan_exclusive_u64 data"), Len(n, "scan length"),
    ];
    let shape = LaunchShape::linear(1, tiles::SORT_THREADS as u32);
    // SAFETY: the arguments follow scan_exclusive_u64(unsigned long long* data, long long n);
    // data holds at least n + 1 values (checked above): the kernel reads and rewrites
    // data[0..n] and writes data[n]. It is written for exactly one block of SORT_THREADS
    // threads (a multiple of 32, asserted above), the shape passed here.
    unsafe { run(gpu, kernels::SCAN_EXCLUSIVE_U64, shape, &mut args) }
}

launcher! {
    /// The stable counting sort of row ids by code on the device, equal to
    /// [`crate::ema::group_by_code`]: `offsets` (at least k + 1 values) gets the code offsets,
    /// `rows` (at least n) the row ids grouped by code, each group in increasing row order.
    ///
    /// `indices` holds n codes, all < k (validated by the caller, e.g. with
    /// [`crate::ema::validate`]; a code ≥ k is skipped by the kernels, never written out of bounds,
    /// and then offsets[k] < n). Nothing crosses the bus.
    pub fn group_by_code(gpu, indices: &G::Buf<u32>, n: usize, k: usize, offsets: &mut G::Buf<u64>,
        rows: &mut G::Buf<u32>, scratch: &mut SortScratch<G>) {
        if k == 0 {
            return Err(Error::InvalidArgument("device sort over 0 codes".into()));
        }
        if n > u32::MAX as usize || k > u32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "device sort of {n} rows over {k} codes: both must be at most {}",
                u32::MAX
            )));
        }
        check_len(gpu, indices, n, "sort indices")?;
        check_len(gpu, offsets, k + 1, "sort offsets")?;
        check_len(gpu, rows, n, "sort rows")?;
        let (s, seg_len) = segments(n, k);
        let counters = s * k;
        let hist = grown(gpu, &mut scratch.hist, counters, "sort counters")?;
        fill(gpu, hist, 0, counters)?;
        if n > 0 {
            let mut args = launch_args![gpu;
                U32(indices), Len(n, "rows"), Len(k, "codes"), Len(seg_len, "segment length"),
                Len(s, "segments"), U32Mut(hist),
            ];
            // SAFETY: the arguments follow sort_histogram_u32(const unsigned* idx, long long n,
            // long long k, long long seg_len, long long s, unsigned* hist). idx holds at least n
            // values (checked above), hist at least s·k counters (grown above). For r < n,
            // r / seg_len < s since s·seg_len ≥ n (segments()), and codes ≥ k are skipped, so
            // every counter touched is < s·k. Grid-stride loop, any grid.
            unsafe { run(gpu, kernels::SORT_HISTOGRAM_U32, grid_stride(gpu, n), &mut args)? };
        }
        {
            let mut args = launch_args![gpu;
                U32Mut(hist), Len(k, "codes"), Len(s, "segments"), U64Mut(offsets),
            ];
            // SAFETY: the arguments follow sort_scan_segments_u32(unsigned* hist, long long k,
            // long long s, unsigned long long* totals). hist holds at least s·k counters, offsets
            // (the totals) at least k + 1 values (checked above); thread `code` < k touches
            // hist[code·s .. (code+1)·s] and totals[code] only. Grid-stride loop, any grid.
            unsafe { run(gpu, kernels::SORT_SCAN_SEGMENTS_U32, grid_stride(gpu, k), &mut args)? };
        }
        scan_exclusive(gpu, offsets, k)?;
        if n > 0 {
            let shape = per_item(s, "segments")?;
            let mut args = launch_args![gpu;
                U32(indices), Len(n, "rows"), Len(k, "codes"), Len(seg_len, "segment length"),
                Len(s, "segments"), U32Mut(hist), U64(offsets), U32Mut(rows),
            ];
            // SAFETY: the arguments follow sort_scatter_u32(const unsigned* idx, long long n, long
            // long k, long long seg_len, long long s, unsigned* hist, const unsigned long long*
            // offsets, unsigned* rows). idx and rows hold at least n values, hist s·k counters,
            // offsets k + 1 values. After the scans, offsets[code] + hist[code·s + seg] plus the
            // rows of that code before it in the segment is < offsets[code + 1] ≤ n, so every write
            // to rows is in bounds; thread `seg` touches only its own counters. ceil(s /
            // SORT_THREADS) blocks: one thread per segment, the extra threads return.
            unsafe { run(gpu, kernels::SORT_SCATTER_U32, shape, &mut args)? };
        }
        Ok(())
    }
}

launcher! {
    /// Stable compaction on the device: `out` (at least n) gets the ids i < n with flags[i] ≠ 0 in
    /// increasing order, `count[0]` their number. The host learns nothing; nothing crosses the bus.
    pub fn compact(gpu, flags: &G::Buf<u32>, n: usize, out: &mut G::Buf<u32>,
        count: &mut G::Buf<u32>, scratch: &mut SortScratch<G>) {
        if n > u32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "compaction of {n} flags: ids and the count are u32, at most {}",
                u32::MAX
            )));
        }
        check_len(gpu, flags, n, "compaction flags")?;
        check_len(gpu, out, n, "compaction output")?;
        check_len(gpu, count, 1, "compaction count")?;
        if n == 0 {
            return fill(gpu, count, 0, 1);
        }
        let tile_count = n.div_ceil(COMPACT_TILE);
        let shape = per_item(tile_count * tiles::SORT_THREADS, "compaction threads")?;
        let tiles_d = grown(gpu, &mut scratch.tiles, tile_count + 1, "compaction tiles")?;
        {
            let mut args = launch_args![gpu; U32(flags), Len(n, "flags"), U64Mut(tiles_d)];
            // SAFETY: the arguments follow compact_count_u32(const unsigned* flags, long long n,
            // unsigned long long* tile_counts). flags holds at least n values (checked above) and
            // the kernel reads indices < n only; grid = tile_count = ceil(n / (SORT_THREADS ·
            // SORT_ITEMS)) blocks of SORT_THREADS, block b writes tile_counts[b], within the
            // tile_count + 1 values grown above.
            unsafe { run(gpu, kernels::COMPACT_COUNT_U32, shape, &mut args)? };
        }
        scan_exclusive(gpu, tiles_d, tile_count)?;
        let mut args = launch_args![gpu;
            U32(flags), Len(n, "flags"), U64(tiles_d), U32Mut(out), U32Mut(count),
        ];
        // SAFETY: the arguments follow compact_scatter_u32(const unsigned* flags, long long n,
        // const unsigned long long* tile_offsets, unsigned* out, unsigned* count). flags and out
        // hold at least n values, count at least one; tile_offsets holds tile_count + 1 values and
        // the grid is exactly tile_count blocks (the kernel reads tile_offsets[gridDim.x]). Slots
        // written are < the number of set flags ≤ n.
        unsafe { run(gpu, kernels::COMPACT_SCATTER_U32, shape, &mut args) }
    }
}

launcher! {
    /// `flags_below_f32`: flags[i] = 1 if v[i] < threshold else 0, for i < n (NaN: 0).
    pub fn flags_below(gpu, v: &G::Buf<f32>, threshold: f32, n: usize, flags: &mut G::Buf<u32>) {
        let mut args = launch_args![gpu;
            F32(v; n, "flags_below values"), F32Val(threshold), Len(n, "values"),
            U32Mut(flags; n, "flags_below flags"),
        ];
        // SAFETY: the arguments follow flags_below_f32(const float* v, float threshold, long long
        // n, unsigned* flags); v and flags hold at least n elements (checked above) and the
        // grid-stride loop touches i < n only.
        unsafe { run(gpu, kernels::FLAGS_BELOW_F32, grid_stride(gpu, n), &mut args) }
    }
}

launcher! {
    /// `gather_counted_u32`: out[j] = src[idx[j]] for j < count[0], where the count lives on the
    /// device (e.g. from [`compact`]) and is capped at the capacity of `idx` and `out`. An index
    /// ≥ the length of `src` gives 0xFFFFFFFF.
    pub fn gather_counted(gpu, src: &G::Buf<u32>, idx: &G::Buf<u32>, count: &G::Buf<u32>,
        out: &mut G::Buf<u32>) {
        check_len(gpu, count, 1, "gather_counted count")?;
        let cap = gpu.len(idx).min(gpu.len(out));
        let mut args = launch_args![gpu;
            U32(src), Len(gpu.len(src), "source length"), U32(idx), U32(count),
            Len(cap, "capacity"), U32Mut(out),
        ];
        // SAFETY: the arguments follow gather_counted_u32(const unsigned* src, long long n_src,
        // const unsigned* idx, const unsigned* count, long long cap, unsigned* out). n_src is the
        // length of src and reads of src are guarded by it; count holds at least one value; the
        // loop stops at min(count[0], cap) with cap ≤ the lengths of idx and out. The grid is sized
        // for the worst case (cap), grid-stride.
        unsafe { run(gpu, kernels::GATHER_COUNTED_U32, grid_stride(gpu, cap), &mut args) }
    }
}

launcher! {
    /// The deterministic per-code sums on the device: [`group_by_code`] into the scratch's offsets
    /// and rows, then `ema_sums_sorted_f32` ([`launch::sums_sorted`]). `x` holds n·d floats,
    /// `indices` n codes < k (validated by the caller), `sums` k·d floats and `counts` k values;
    /// equal bit for bit to [`crate::ema::cpu`].
    pub fn code_sums_deterministic(gpu, x: &G::Buf<f32>, indices: &G::Buf<u32>, n: usize, d: usize,
        k: usize, sums: &mut G::Buf<f32>, counts: &mut G::Buf<u32>, scratch: &mut SortScratch<G>) {
        let elems = launch::elems;
        check_len(gpu, x, elems(n, d, "x")?, "code_sums x")?;
        check_len(gpu, sums, elems(k, d, "sums")?, "code_sums sums")?;
        check_len(gpu, counts, k, "code_sums counts")?;
        // Take the buffers out of the scratch so that it can be borrowed by the sort as well.
        let mut offsets = scratch.offsets.take();
        let mut rows = scratch.rows.take();
        let result = (|| {
            let o = grown(gpu, &mut offsets, k + 1, "code offsets")?;
            let r = grown(gpu, &mut rows, n.max(1), "row ids")?;
            group_by_code(gpu, indices, n, k, o, r, scratch)?;
            launch::sums_sorted(gpu, x, o, r, sums, counts, k, d)
        })();
        scratch.offsets = offsets;
        scratch.rows = rows;
        result
    }
}
