//! The launchers of the training step on the device: the EMA update, codebook, re-seeding and
//! cumulative usage (kernels/ema_update.cu), the loss and usage statistics (kernels/loss.cu) and
//! the backward pass (kernels/grad.cu), written once over [`Gpu`].
//!
//! Each launcher checks every buffer it is given against the elements the kernel will touch
//! (`Error::Shape` naming the buffer, never a launch on a too-small one). Index values (codes,
//! row ids) are the caller's to validate; the kernels skip out-of-range ones so that a bad id
//! cannot touch memory outside a buffer. Where the file headers claim it, results are
//! bit-identical to the CPU twins (src/ema/update.rs, src/quantizer/), which
//! tests/device_step.rs checks.

use super::device::{Arg, Gpu, LaunchShape};
use super::kernels::{self, tiles};
use super::launch::{check_len, elems, grid_stride, grid_stride_blocks, i64_of};
use crate::ema::EmaState;
use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};
use crate::nearest::Metric;

/// The block-per-row shape over `rows` rows of width `d`: one thread per column (whole warps,
/// at most ROW_MAX_THREADS, wider rows looped), at most 2^16 blocks (grid-stride beyond).
fn per_row(rows: usize, d: usize) -> LaunchShape {
    let threads = (d.div_ceil(32) * 32).clamp(32, tiles::ROW_MAX_THREADS) as u32;
    LaunchShape::linear(rows.clamp(1, 1 << 16) as u32, threads)
}

/// Errors on an empty codebook or zero-width rows (the kernels index rows by `d`).
fn check_dims(k: usize, d: usize) -> Result<()> {
    if k == 0 || d == 0 {
        return Err(Error::Empty {
            what: "codebook".into(),
            detail: format!("{k} codes × {d} dimensions"),
        });
    }
    Ok(())
}

/// The kernels' `int cosine` flag.
fn cosine_flag(metric: Metric) -> i32 {
    i32::from(metric == Metric::Cosine)
}

/// Scratch of the reductions and the placeholder mask: allocate once, reuse every step.
pub struct StepScratch<G: Gpu> {
    /// REDUCE_BLOCKS f64 partials (stage 1 of squared_error and usage_stats).
    partials: G::Buf<f64>,
    /// 2·REDUCE_BLOCKS u64 partials (totals, then used counts) of usage_stats.
    count_partials: G::Buf<u64>,
    /// One u32 passed as the mask pointer when there is no mask (never read then).
    unmasked: G::Buf<u32>,
}

impl<G: Gpu> StepScratch<G> {
    pub fn new(gpu: &G) -> Result<Self> {
        Ok(StepScratch {
            partials: gpu.alloc_zeros("reduction partials", tiles::REDUCE_BLOCKS)?,
            count_partials: gpu.alloc_zeros("count partials", 2 * tiles::REDUCE_BLOCKS)?,
            unmasked: gpu.alloc_zeros("placeholder mask", 1)?,
        })
    }
}

/// The mask argument and its `use_mask` flag: `mask` (checked to hold n flags) or the
/// placeholder with the flag off.
fn mask_arg<'a, G: Gpu>(
    gpu: &G,
    mask: Option<&'a G::Buf<u32>>,
    n: usize,
    unmasked: &'a G::Buf<u32>,
) -> Result<(&'a G::Buf<u32>, i32)> {
    match mask {
        Some(m) => {
            check_len(gpu, m, n, "mask (one flag per row)")?;
            Ok((m, 1))
        }
        None => Ok((unmasked, 0)),
    }
}

/// The EMA state and the codebook it implies, on the device.
pub struct EmaDevice<G: Gpu> {
    /// N_k, K values.
    pub cluster_size: G::Buf<f32>,
    /// m_k, K × D.
    pub embed_avg: G::Buf<f32>,
    /// c_k, K × D.
    pub codebook: G::Buf<f32>,
    /// Σ_k N_k, one value (written by [`ema_codebook`]).
    pub total: G::Buf<f32>,
    pub k: usize,
    pub d: usize,
}

impl<G: Gpu> EmaDevice<G> {
    /// Uploads `state` and `codebook` (K × D, the same K and D).
    pub fn upload(gpu: &G, state: &EmaState, codebook: MatRef<'_>) -> Result<Self> {
        let (k, d) = (state.codes(), state.dim());
        check_dims(k, d)?;
        if (codebook.rows(), codebook.cols()) != (k, d) {
            return Err(Error::Shape {
                what: "codebook vs EMA state".into(),
                expected: format!("{k} × {d}"),
                got: format!("{} × {}", codebook.rows(), codebook.cols()),
            });
        }
        Ok(EmaDevice {
            cluster_size: gpu.upload("EMA counts", state.cluster_size())?,
            embed_avg: gpu.upload("EMA sums", state.embed_avg().data())?,
            codebook: gpu.upload("codebook", codebook.data())?,
            total: gpu.alloc_zeros("EMA total count", 1)?,
            k,
            d,
        })
    }

    /// The state and codebook back on the host.
    pub fn download(&self, gpu: &G) -> Result<(EmaState, Matrix)> {
        let counts = gpu.download("EMA counts", &self.cluster_size)?;
        let sums = Matrix::new(gpu.download("EMA sums", &self.embed_avg)?, self.k, self.d)?;
        let codebook = Matrix::new(gpu.download("codebook", &self.codebook)?, self.k, self.d)?;
        Ok((EmaState::from_parts(counts, sums)?, codebook))
    }

    /// Errors unless every buffer holds K (counts, total ≥ 1) or K·D values.
    fn check(&self, gpu: &G) -> Result<usize> {
        check_dims(self.k, self.d)?;
        let kd = elems(self.k, self.d, "EMA state")?;
        check_len(gpu, &self.cluster_size, self.k, "EMA counts")?;
        check_len(gpu, &self.embed_avg, kd, "EMA sums")?;
        check_len(gpu, &self.codebook, kd, "codebook")?;
        check_len(gpu, &self.total, 1, "EMA total count")?;
        Ok(kd)
    }
}

/// `ema_update_f32`: N_k ← N_k + w(n_k − N_k), m_k ← m_k + w(s_k − m_k) with w = 1 − decay as
/// `EmaState::update` computes it; `counts` (K) and `sums` (K × D) are this batch's.
pub fn ema_update<G: Gpu>(
    gpu: &G,
    ema: &mut EmaDevice<G>,
    counts: &G::Buf<u32>,
    sums: &G::Buf<f32>,
    decay: f32,
) -> Result<()> {
    let kd = ema.check(gpu)?;
    check_len(gpu, counts, ema.k, "batch counts")?;
    check_len(gpu, sums, kd, "batch sums")?;
    // As EmaState::update (and torch): the weight is computed in f64, used as f32.
    let w = (1.0 - decay as f64) as f32;
    let kernel = kernels::EMA_UPDATE_F32;
    let shape = grid_stride(gpu, kd);
    let mut args = [
        Arg::F32Mut(&mut ema.cluster_size),
        Arg::F32Mut(&mut ema.embed_avg),
        Arg::U32(counts),
        Arg::F32(sums),
        Arg::F32Val(w),
        Arg::I64(i64_of(ema.k, "codes")?),
        Arg::I64(i64_of(ema.d, "dimension")?),
    ];
    // SAFETY: the arguments follow ema_update_f32(float* cluster_size, float* embed_avg,
    // const u32* counts, const float* sums, float w, long long k, long long d). cluster_size
    // and counts hold ≥ k values, embed_avg and sums ≥ k·d (checked above); the grid-stride loop
    // stays below k·d and touches cluster_size/counts only below k (≤ k·d as d ≥ 1).
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}

/// `ema_total_f32` then `ema_codebook_f32`: ema.codebook = `EmaState::codebook(eps)`, then
/// (cosine) each row normalised as `normalize_row` does; ema.total = Σ N_k.
pub fn ema_codebook<G: Gpu>(
    gpu: &G,
    ema: &mut EmaDevice<G>,
    eps: f32,
    metric: Metric,
) -> Result<()> {
    ema.check(gpu)?;
    let (k64, d64) = (i64_of(ema.k, "codes")?, i64_of(ema.d, "dimension")?);
    let kernel = kernels::EMA_TOTAL_F32;
    let mut args = [
        Arg::F32(&ema.cluster_size),
        Arg::I64(k64),
        Arg::F32Mut(&mut ema.total),
    ];
    // SAFETY: the arguments follow ema_total_f32(const float* cluster_size, long long k,
    // float* total): cluster_size holds ≥ k values, total ≥ 1 (checked); one thread reads
    // cluster_size[0..k) and writes total[0].
    unsafe { gpu.launch(kernel, kernel.name(), LaunchShape::linear(1, 1), &mut args)? };

    let kernel = kernels::EMA_CODEBOOK_F32;
    let shape = per_row(ema.k, ema.d);
    let mut args = [
        Arg::F32(&ema.cluster_size),
        Arg::F32(&ema.embed_avg),
        Arg::F32(&ema.total),
        Arg::F32Val(eps),
        Arg::I64(k64),
        Arg::I64(d64),
        Arg::I32(cosine_flag(metric)),
        Arg::F32Mut(&mut ema.codebook),
    ];
    // SAFETY: the arguments follow ema_codebook_f32(const float* cluster_size, const float*
    // embed_avg, const float* total, float eps, long long k, long long d, int cosine, float*
    // codebook). cluster_size holds ≥ k values, embed_avg and codebook ≥ k·d, total ≥ 1
    // (checked); block b handles codes b, b + grid, … < k and columns < d only; the block is a
    // whole number of warps ≤ ROW_MAX_THREADS and every thread reaches the same barriers.
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}

/// `reseed_f32`: for j < m, code `codes[j]` re-seeded at row `rows[j]` of x (n × D; normalised
/// for cosine) with count `count`: the quantizer's dead-code re-seeding and
/// `EmaState::reset`. Codes must be distinct and < K, rows < n (pairs out of range are
/// skipped).
#[allow(clippy::too_many_arguments)]
pub fn reseed<G: Gpu>(
    gpu: &G,
    ema: &mut EmaDevice<G>,
    x: &G::Buf<f32>,
    n: usize,
    codes: &G::Buf<u32>,
    rows: &G::Buf<u32>,
    m: usize,
    count: f32,
    metric: Metric,
) -> Result<()> {
    ema.check(gpu)?;
    check_len(gpu, x, elems(n, ema.d, "input")?, "input rows")?;
    check_len(gpu, codes, m, "re-seeded codes")?;
    check_len(gpu, rows, m, "re-seeding rows")?;
    let kernel = kernels::RESEED_F32;
    let shape = per_row(m, ema.d);
    let mut args = [
        Arg::F32(x),
        Arg::U32(codes),
        Arg::U32(rows),
        Arg::I64(i64_of(m, "pairs")?),
        Arg::I64(i64_of(n, "rows")?),
        Arg::I64(i64_of(ema.k, "codes")?),
        Arg::I64(i64_of(ema.d, "dimension")?),
        Arg::F32Val(count),
        Arg::I32(cosine_flag(metric)),
        Arg::F32Mut(&mut ema.codebook),
        Arg::F32Mut(&mut ema.cluster_size),
        Arg::F32Mut(&mut ema.embed_avg),
    ];
    // SAFETY: the arguments follow reseed_f32(const float* x, const u32* codes, const u32*
    // rows, long long m, long long n, long long k, long long d, float count, int cosine,
    // float* codebook, float* cluster_size, float* embed_avg). x holds ≥ n·d floats, codes and
    // rows ≥ m values, codebook and embed_avg ≥ k·d, cluster_size ≥ k (checked); the kernel
    // skips pairs with code ≥ k or row ≥ n, so it touches only rows < n of x and codes < k; the
    // block is a whole number of warps and the skip is uniform over a block (barriers match).
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}

/// `usage_accumulate_u64`: total[k] += counts[k] for the k codes.
pub fn usage_accumulate<G: Gpu>(
    gpu: &G,
    total: &mut G::Buf<u64>,
    counts: &G::Buf<u32>,
    k: usize,
) -> Result<()> {
    check_len(gpu, total, k, "cumulative usage")?;
    check_len(gpu, counts, k, "usage counts")?;
    let kernel = kernels::USAGE_ACCUMULATE_U64;
    let shape = grid_stride(gpu, k);
    let mut args = [
        Arg::U64Mut(total),
        Arg::U32(counts),
        Arg::I64(i64_of(k, "codes")?),
    ];
    // SAFETY: the arguments follow usage_accumulate_u64(unsigned long long* total, const u32*
    // counts, long long k); both hold ≥ k values (checked) and the loop stays below k.
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}

/// `reduce_f64` over the REDUCE_BLOCKS stage-1 partials in `scratch`, into out[0].
fn reduce_partials<G: Gpu>(gpu: &G, scratch: &StepScratch<G>, out: &mut G::Buf<f64>) -> Result<()> {
    check_len(gpu, out, 1, "reduction result")?;
    let kernel = kernels::REDUCE_F64;
    let shape = LaunchShape::linear(1, tiles::REDUCE_THREADS as u32);
    let mut args = [
        Arg::F64(&scratch.partials),
        Arg::I64(tiles::REDUCE_BLOCKS as i64),
        Arg::F64Mut(out),
    ];
    // SAFETY: the arguments follow reduce_f64(const double* partials, long long m, double*
    // out): partials holds REDUCE_BLOCKS values (StepScratch::new), out ≥ 1 (checked); one block
    // of REDUCE_THREADS (a power of two, the size of its shared tree) reads partials[0..m).
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}

/// `sq_err_partial_f64` + `reduce_f64`: out[0] = Σ ((double)x − (double)q)² over the n × d
/// elements, only rows with a non-zero flag when `mask` is given. Deterministic run to run.
#[allow(clippy::too_many_arguments)]
pub fn squared_error<G: Gpu>(
    gpu: &G,
    x: &G::Buf<f32>,
    q: &G::Buf<f32>,
    mask: Option<&G::Buf<u32>>,
    n: usize,
    d: usize,
    scratch: &mut StepScratch<G>,
    out: &mut G::Buf<f64>,
) -> Result<()> {
    if d == 0 {
        return Err(Error::InvalidArgument(
            "squared error of 0-wide rows".into(),
        ));
    }
    let nd = elems(n, d, "rows")?;
    check_len(gpu, x, nd, "input rows")?;
    check_len(gpu, q, nd, "quantized rows")?;
    let (mask, use_mask) = mask_arg(gpu, mask, n, &scratch.unmasked)?;
    let kernel = kernels::SQ_ERR_PARTIAL_F64;
    let shape = LaunchShape::linear(tiles::REDUCE_BLOCKS as u32, tiles::REDUCE_THREADS as u32);
    let mut args = [
        Arg::F32(x),
        Arg::F32(q),
        Arg::U32(mask),
        Arg::I32(use_mask),
        Arg::I64(i64_of(n, "rows")?),
        Arg::I64(i64_of(d, "dimension")?),
        Arg::F64Mut(&mut scratch.partials),
    ];
    // SAFETY: the arguments follow sq_err_partial_f64(const float* x, const float* q, const
    // u32* mask, int use_mask, long long n, long long d, double* partials). x and q hold ≥ n·d
    // floats; mask holds ≥ n flags when use_mask = 1 (checked) and is not read otherwise;
    // partials holds REDUCE_BLOCKS values, one per block of this fixed grid of REDUCE_THREADS
    // (the kernel's shared tree size).
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args)? };
    reduce_partials(gpu, scratch, out)
}

/// `usage_count_partial_u64`, `usage_entropy_partial_f64` + `reduce_f64` over the histogram
/// `counts` (k codes): totals[0] = Σ counts, totals[1] = #{counts > 0}, entropy[0] =
/// −Σ p·ln(p + 1e-10) (perplexity = exp of it). Deterministic run to run.
pub fn usage_stats<G: Gpu>(
    gpu: &G,
    counts: &G::Buf<u32>,
    k: usize,
    scratch: &mut StepScratch<G>,
    totals: &mut G::Buf<u64>,
    entropy: &mut G::Buf<f64>,
) -> Result<()> {
    check_len(gpu, counts, k, "usage counts")?;
    check_len(gpu, totals, 2, "usage totals (total, used)")?;
    let k64 = i64_of(k, "codes")?;
    let shape = LaunchShape::linear(tiles::REDUCE_BLOCKS as u32, tiles::REDUCE_THREADS as u32);
    let kernel = kernels::USAGE_COUNT_PARTIAL_U64;
    let mut args = [
        Arg::U32(counts),
        Arg::I64(k64),
        Arg::U64Mut(&mut scratch.count_partials),
    ];
    // SAFETY: the arguments follow usage_count_partial_u64(const u32* counts, long long k,
    // unsigned long long* partials): counts holds ≥ k values (checked), partials
    // 2·REDUCE_BLOCKS (StepScratch::new), written at b and REDUCE_BLOCKS + b by block b of this
    // fixed grid of REDUCE_THREADS.
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args)? };
    let kernel = kernels::USAGE_ENTROPY_PARTIAL_F64;
    let mut args = [
        Arg::U32(counts),
        Arg::I64(k64),
        Arg::U64(&scratch.count_partials),
        Arg::U64Mut(totals),
        Arg::F64Mut(&mut scratch.partials),
    ];
    // SAFETY: the arguments follow usage_entropy_partial_f64(const u32* counts, long long k,
    // const unsigned long long* count_partials, unsigned long long* totals, double* partials):
    // counts ≥ k values, count_partials 2·REDUCE_BLOCKS (read whole), totals ≥ 2 (checked;
    // block 0 writes [0] and [1]), partials REDUCE_BLOCKS (one per block of this fixed grid).
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args)? };
    reduce_partials(gpu, scratch, entropy)
}

/// The checks and arguments shared by the two x-gradient kernels.
#[allow(clippy::too_many_arguments)]
fn launch_grad_x<G: Gpu>(
    gpu: &G,
    kernel: super::kernels::KernelId,
    shape: LaunchShape,
    g: &G::Buf<f32>,
    x: &G::Buf<f32>,
    q: &G::Buf<f32>,
    mask: Option<&G::Buf<u32>>,
    coef: f64,
    n: usize,
    d: usize,
    scratch: &StepScratch<G>,
    gx: &mut G::Buf<f32>,
) -> Result<()> {
    if d == 0 {
        return Err(Error::InvalidArgument("gradient of 0-wide rows".into()));
    }
    let nd = elems(n, d, "rows")?;
    check_len(gpu, g, nd, "output gradient")?;
    check_len(gpu, x, nd, "input rows")?;
    check_len(gpu, q, nd, "quantized rows")?;
    check_len(gpu, gx, nd, "input gradient")?;
    let (mask, use_mask) = mask_arg(gpu, mask, n, &scratch.unmasked)?;
    let mut args = [
        Arg::F32(g),
        Arg::F32(x),
        Arg::F32(q),
        Arg::U32(mask),
        Arg::I32(use_mask),
        Arg::F64Val(coef),
        Arg::I64(i64_of(n, "rows")?),
        Arg::I64(i64_of(d, "dimension")?),
        Arg::F32Mut(gx),
    ];
    // SAFETY: the arguments follow the signature shared by grad_st_f32 and grad_rotation_f32
    // (const float* g, const float* x, const float* q, const u32* mask, int use_mask, double
    // coef, long long n, long long d, float* gx). g, x, q and gx hold ≥ n·d floats; mask
    // ≥ n flags when use_mask = 1 (checked) and is not read otherwise. grad_st_f32's grid-stride
    // loop stays below n·d; grad_rotation_f32 (ROW_THREADS per block, its launch bounds) handles
    // rows < n, columns < d.
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}

/// `grad_st_f32`: the straight-through gradient gx = g plus, on kept rows (all without `mask`),
/// the commitment term coef·(x − q) with coef = β·2/(kept·D) as grad.rs computes it (0: none).
#[allow(clippy::too_many_arguments)]
pub fn grad_straight_through<G: Gpu>(
    gpu: &G,
    g: &G::Buf<f32>,
    x: &G::Buf<f32>,
    q: &G::Buf<f32>,
    mask: Option<&G::Buf<u32>>,
    coef: f64,
    n: usize,
    d: usize,
    scratch: &StepScratch<G>,
    gx: &mut G::Buf<f32>,
) -> Result<()> {
    let shape = grid_stride(gpu, n.saturating_mul(d));
    launch_grad_x(
        gpu,
        kernels::GRAD_ST_F32,
        shape,
        g,
        x,
        q,
        mask,
        coef,
        n,
        d,
        scratch,
        gx,
    )
}

/// `grad_rotation_f32`: the rotation trick's gradient (grad.rs `rotate_gradient`) plus the
/// commitment term as [`grad_straight_through`].
#[allow(clippy::too_many_arguments)]
pub fn grad_rotation<G: Gpu>(
    gpu: &G,
    g: &G::Buf<f32>,
    x: &G::Buf<f32>,
    q: &G::Buf<f32>,
    mask: Option<&G::Buf<u32>>,
    coef: f64,
    n: usize,
    d: usize,
    scratch: &StepScratch<G>,
    gx: &mut G::Buf<f32>,
) -> Result<()> {
    let shape = LaunchShape::linear(
        grid_stride_blocks(n, tiles::ROW_THREADS, gpu.sm_count() * 32),
        tiles::ROW_THREADS as u32,
    );
    launch_grad_x(
        gpu,
        kernels::GRAD_ROTATION_F32,
        shape,
        g,
        x,
        q,
        mask,
        coef,
        n,
        d,
        scratch,
        gx,
    )
}

/// `grad_diff_f32`: diff (m × d) = q − x on the rows `rows[0..m)` of the n × d inputs (the
/// kept rows, in order): the rows grad.rs scatter-adds into the codebook gradient. Row ids
/// must be < n (larger ones are skipped).
#[allow(clippy::too_many_arguments)]
pub fn grad_diff<G: Gpu>(
    gpu: &G,
    q: &G::Buf<f32>,
    x: &G::Buf<f32>,
    n: usize,
    rows: &G::Buf<u32>,
    m: usize,
    d: usize,
    diff: &mut G::Buf<f32>,
) -> Result<()> {
    let nd = elems(n, d, "rows")?;
    let md = elems(m, d, "kept rows")?;
    check_len(gpu, q, nd, "quantized rows")?;
    check_len(gpu, x, nd, "input rows")?;
    check_len(gpu, rows, m, "kept row ids")?;
    check_len(gpu, diff, md, "differences")?;
    let kernel = kernels::GRAD_DIFF_F32;
    let shape = grid_stride(gpu, md);
    let mut args = [
        Arg::F32(q),
        Arg::F32(x),
        Arg::U32(rows),
        Arg::I64(i64_of(m, "kept rows")?),
        Arg::I64(i64_of(n, "rows")?),
        Arg::I64(i64_of(d, "dimension")?),
        Arg::F32Mut(diff),
    ];
    // SAFETY: the arguments follow grad_diff_f32(const float* q, const float* x, const u32*
    // rows, long long m, long long n, long long d, float* diff). q and x hold ≥ n·d floats,
    // rows ≥ m ids, diff ≥ m·d floats (checked); ids ≥ n are skipped, so reads stay below n·d,
    // and the grid-stride loop writes below m·d.
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}

/// `scale_f32`: v[i] ← (v[i] as f64 · factor) as f32 for i < len (grad.rs's scaling of the
/// codebook gradient's sums by 2/(kept·D)).
pub fn scale<G: Gpu>(gpu: &G, v: &mut G::Buf<f32>, len: usize, factor: f64) -> Result<()> {
    check_len(gpu, v, len, "scaled values")?;
    let kernel = kernels::SCALE_F32;
    let shape = grid_stride(gpu, len);
    let mut args = [
        Arg::F32Mut(v),
        Arg::I64(i64_of(len, "values")?),
        Arg::F64Val(factor),
    ];
    // SAFETY: the arguments follow scale_f32(float* v, long long len, double scale):
    // v holds ≥ len floats (checked) and the grid-stride loop stays below len.
    unsafe { gpu.launch(kernel, kernel.name(), shape, &mut args) }
}
