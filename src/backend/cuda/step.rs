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

use super::device::{Gpu, LaunchShape};
use super::kernels;
use super::kernels::tiles::{self, REDUCE_BLOCKS};
use super::launch::{
    check_len, elems, grid_stride, launch_args, launcher, reduce_shape, reduce_stage2,
    rows_grid_stride, run,
};
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
            return Err(Error::shape(
                "codebook vs EMA state",
                format!("{k} × {d}"),
                format!("{} × {}", codebook.rows(), codebook.cols()),
            ));
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

launcher! {
    /// `ema_update_f32`: N_k ← N_k + w(n_k − N_k), m_k ← m_k + w(s_k − m_k) with w = 1 − decay as
    /// `EmaState::update` computes it; `counts` (K) and `sums` (K × D) are this batch's.
    pub fn ema_update(gpu, ema: &mut EmaDevice<G>, counts: &G::Buf<u32>, sums: &G::Buf<f32>,
        decay: f32) {
        let kd = ema.check(gpu)?;
        // As EmaState::update (and torch): the weight is computed in f64, used as f32.
        let w = (1.0 - decay as f64) as f32;
        let (k, d) = (ema.k, ema.d);
        let mut args = launch_args![gpu;
            F32Mut(&mut ema.cluster_size), F32Mut(&mut ema.embed_avg),
            U32(counts; k, "batch counts"), F32(sums; kd, "batch sums"), F32Val(w), Len(k, "codes"),
            Len(d, "dimension"),
        ];
        // SAFETY: the arguments follow ema_update_f32(float* cluster_size, float* embed_avg, const
        // u32* counts, const float* sums, float w, long long k, long long d). cluster_size and
        // counts hold ≥ k values, embed_avg and sums ≥ k·d (checked above); the grid-stride loop
        // stays below k·d and touches cluster_size/counts only below k (≤ k·d as d ≥ 1).
        unsafe { run(gpu, kernels::EMA_UPDATE_F32, grid_stride(gpu, kd), &mut args) }
    }
}

launcher! {
    /// `ema_total_f32` then `ema_codebook_f32`: ema.codebook = `EmaState::codebook(eps)`, then
    /// (cosine) each row normalised as `normalize_row` does; ema.total = Σ N_k.
    pub fn ema_codebook(gpu, ema: &mut EmaDevice<G>, eps: f32, metric: Metric) {
        ema.check(gpu)?;
        let (k, d) = (ema.k, ema.d);
        let mut args = launch_args![gpu;
            F32(&ema.cluster_size), Len(k, "codes"), F32Mut(&mut ema.total),
        ];
        // SAFETY: the arguments follow ema_total_f32(const float* cluster_size, long long k,
        // float* total): cluster_size holds ≥ k values, total ≥ 1 (checked); one thread reads
        // cluster_size[0..k) and writes total[0].
        unsafe { run(gpu, kernels::EMA_TOTAL_F32, LaunchShape::linear(1, 1), &mut args)? };

        let mut args = launch_args![gpu;
            F32(&ema.cluster_size), F32(&ema.embed_avg), F32(&ema.total), F32Val(eps),
            Len(k, "codes"), Len(d, "dimension"), I32(cosine_flag(metric)),
            F32Mut(&mut ema.codebook),
        ];
        // SAFETY: the arguments follow ema_codebook_f32(const float* cluster_size, const float*
        // embed_avg, const float* total, float eps, long long k, long long d, int cosine, float*
        // codebook). cluster_size holds ≥ k values, embed_avg and codebook ≥ k·d, total ≥ 1
        // (checked); block b handles codes b, b + grid, … < k and columns < d only; the block is a
        // whole number of warps ≤ ROW_MAX_THREADS and every thread reaches the same barriers.
        unsafe { run(gpu, kernels::EMA_CODEBOOK_F32, per_row(k, d), &mut args) }
    }
}

launcher! {
    /// `reseed_f32`: for j < m, code `codes[j]` re-seeded at row `rows[j]` of x (n × D; normalised
    /// for cosine) with count `count`: the quantizer's dead-code re-seeding and
    /// `EmaState::reset`. Codes must be distinct and < K, rows < n (pairs out of range are
    /// skipped).
    pub fn reseed(gpu, ema: &mut EmaDevice<G>, x: &G::Buf<f32>, n: usize, codes: &G::Buf<u32>,
        rows: &G::Buf<u32>, m: usize, count: f32, metric: Metric) {
        ema.check(gpu)?;
        let (k, d) = (ema.k, ema.d);
        let mut args = launch_args![gpu;
            F32(x; elems(n, d, "input")?, "input rows"), U32(codes; m, "re-seeded codes"),
            U32(rows; m, "re-seeding rows"), Len(m, "pairs"), Len(n, "rows"), Len(k, "codes"),
            Len(d, "dimension"), F32Val(count), I32(cosine_flag(metric)), F32Mut(&mut ema.codebook),
            F32Mut(&mut ema.cluster_size), F32Mut(&mut ema.embed_avg),
        ];
        // SAFETY: the arguments follow reseed_f32(const float* x, const u32* codes, const u32*
        // rows, long long m, long long n, long long k, long long d, float count, int cosine,
        // float* codebook, float* cluster_size, float* embed_avg). x holds ≥ n·d floats, codes and
        // rows ≥ m values, codebook and embed_avg ≥ k·d, cluster_size ≥ k (checked); the kernel
        // skips pairs with code ≥ k or row ≥ n, so it touches only rows < n of x and codes < k; the
        // block is a whole number of warps and the skip is uniform over a block (barriers match).
        unsafe { run(gpu, kernels::RESEED_F32, per_row(m, d), &mut args) }
    }
}

launcher! {
    /// `usage_accumulate_u64`: total[k] += counts[k] for the k codes.
    pub fn usage_accumulate(gpu, total: &mut G::Buf<u64>, counts: &G::Buf<u32>, k: usize) {
        let mut args = launch_args![gpu;
            U64Mut(total; k, "cumulative usage"), U32(counts; k, "usage counts"), Len(k, "codes"),
        ];
        // SAFETY: the arguments follow usage_accumulate_u64(unsigned long long* total, const u32*
        // counts, long long k); both hold ≥ k values (checked) and the loop stays below k.
        unsafe { run(gpu, kernels::USAGE_ACCUMULATE_U64, grid_stride(gpu, k), &mut args) }
    }
}

/// `reduce_f64` over the REDUCE_BLOCKS stage-1 partials in `scratch`, into out[0].
fn reduce_partials<G: Gpu>(gpu: &G, scratch: &StepScratch<G>, out: &mut G::Buf<f64>) -> Result<()> {
    reduce_stage2(gpu, kernels::REDUCE_F64, &scratch.partials, out)
}

launcher! {
    /// `sq_err_partial_f64` + `reduce_f64`: out[0] = Σ ((double)x − (double)q)² over the n × d
    /// elements, only rows with a non-zero flag when `mask` is given. Deterministic run to run.
    pub fn squared_error(gpu, x: &G::Buf<f32>, q: &G::Buf<f32>, mask: Option<&G::Buf<u32>>,
        n: usize, d: usize, scratch: &mut StepScratch<G>, out: &mut G::Buf<f64>) {
        if d == 0 {
            return Err(Error::InvalidArgument(
                "squared error of 0-wide rows".into(),
            ));
        }
        let nd = elems(n, d, "rows")?;
        check_len(gpu, x, nd, "input rows")?;
        check_len(gpu, q, nd, "quantized rows")?;
        let (mask, use_mask) = mask_arg(gpu, mask, n, &scratch.unmasked)?;
        let mut args = launch_args![gpu;
            F32(x), F32(q), U32(mask), I32(use_mask), Len(n, "rows"), Len(d, "dimension"),
            F64Mut(&mut scratch.partials),
        ];
        // SAFETY: the arguments follow sq_err_partial_f64(const float* x, const float* q, const
        // u32* mask, int use_mask, long long n, long long d, double* partials). x and q hold ≥ n·d
        // floats; mask holds ≥ n flags when use_mask = 1 (checked) and is not read otherwise;
        // partials holds REDUCE_BLOCKS values, one per block of this fixed grid of REDUCE_THREADS
        // (the kernel's shared tree size).
        unsafe { run(gpu, kernels::SQ_ERR_PARTIAL_F64, reduce_shape(REDUCE_BLOCKS), &mut args)? };
        reduce_partials(gpu, scratch, out)
    }
}

launcher! {
    /// `usage_count_partial_u64`, `usage_entropy_partial_f64` + `reduce_f64` over the histogram
    /// `counts` (k codes): totals[0] = Σ counts, totals[1] = #{counts > 0}, entropy[0] =
    /// −Σ p·ln(p + 1e-10) (perplexity = exp of it). Deterministic run to run.
    pub fn usage_stats(gpu, counts: &G::Buf<u32>, k: usize, scratch: &mut StepScratch<G>,
        totals: &mut G::Buf<u64>, entropy: &mut G::Buf<f64>) {
        check_len(gpu, counts, k, "usage counts")?;
        check_len(gpu, totals, 2, "usage totals (total, used)")?;
        let shape = reduce_shape(tiles::REDUCE_BLOCKS);
        let mut args = launch_args![gpu;
            U32(counts), Len(k, "codes"), U64Mut(&mut scratch.count_partials),
        ];
        // SAFETY: the arguments follow usage_count_partial_u64(const u32* counts, long long k,
        // unsigned long long* partials): counts holds ≥ k values (checked), partials
        // 2·REDUCE_BLOCKS (StepScratch::new), written at b and REDUCE_BLOCKS + b by block b of this
        // fixed grid of REDUCE_THREADS.
        unsafe { run(gpu, kernels::USAGE_COUNT_PARTIAL_U64, shape, &mut args)? };
        let mut args = launch_args![gpu;
            U32(counts), Len(k, "codes"), U64(&scratch.count_partials), U64Mut(totals),
            F64Mut(&mut scratch.partials),
        ];
        // SAFETY: the arguments follow usage_entropy_partial_f64(const u32* counts, long long k,
        // const unsigned long long* count_partials, unsigned long long* totals, double* partials):
        // counts ≥ k values, count_partials 2·REDUCE_BLOCKS (read whole), totals ≥ 2 (checked;
        // block 0 writes [0] and [1]), partials REDUCE_BLOCKS (one per block of this fixed grid).
        unsafe { run(gpu, kernels::USAGE_ENTROPY_PARTIAL_F64, shape, &mut args)? };
        reduce_partials(gpu, scratch, entropy)
    }
}

launcher! {
    /// The checks, arguments and shape of the two x-gradient kernels: `grad_rotation_f32` (one
    /// thread per row) when `rotation`, else `grad_st_f32` (grid-stride over the elements).
    fn grad_x(gpu, rotation: bool, g: &G::Buf<f32>, x: &G::Buf<f32>, q: &G::Buf<f32>,
        mask: Option<&G::Buf<u32>>, coef: f64, n: usize, d: usize, scratch: &StepScratch<G>,
        gx: &mut G::Buf<f32>) {
        if d == 0 {
            return Err(Error::InvalidArgument("gradient of 0-wide rows".into()));
        }
        let nd = elems(n, d, "rows")?;
        check_len(gpu, g, nd, "output gradient")?;
        check_len(gpu, x, nd, "input rows")?;
        check_len(gpu, q, nd, "quantized rows")?;
        check_len(gpu, gx, nd, "input gradient")?;
        let (mask, use_mask) = mask_arg(gpu, mask, n, &scratch.unmasked)?;
        let mut args = launch_args![gpu;
            F32(g), F32(x), F32(q), U32(mask), I32(use_mask), F64Val(coef), Len(n, "rows"),
            Len(d, "dimension"), F32Mut(gx),
        ];
        let (kernel, shape) = if rotation {
            (kernels::GRAD_ROTATION_F32, rows_grid_stride(gpu, n))
        } else {
            (kernels::GRAD_ST_F32, grid_stride(gpu, n.saturating_mul(d)))
        };
        // SAFETY: the arguments follow the signature shared by grad_st_f32 and grad_rotation_f32
        // (const float* g, const float* x, const float* q, const u32* mask, int use_mask, double
        // coef, long long n, long long d, float* gx). g, x, q and gx hold ≥ n·d floats; mask ≥ n
        // flags when use_mask = 1 (checked) and is not read otherwise. grad_st_f32's grid-stride
        // loop stays below n·d; grad_rotation_f32 (ROW_THREADS per block, its launch bounds)
        // handles rows < n, columns < d.
        unsafe { run(gpu, kernel, shape, &mut args) }
    }
}

/// The two x-gradient launchers: one signature, [`grad_x`] with the kernel's flag.
macro_rules! grad_x_launchers {
    ($($(#[$doc:meta])* $name:ident => $rotation:expr;)*) => {$(
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name<G: Gpu>(
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
            grad_x(gpu, $rotation, g, x, q, mask, coef, n, d, scratch, gx)
        }
    )*};
}

grad_x_launchers! {
    /// `grad_st_f32`: the straight-through gradient gx = g plus, on kept rows (all without
    /// `mask`), the commitment term coef·(x − q) with coef = β·2/(kept·D) as grad.rs computes it
    /// (0: none).
    grad_straight_through => false;
    /// `grad_rotation_f32`: the rotation trick's gradient (grad.rs `rotate_gradient`) plus the
    /// commitment term as [`grad_straight_through`].
    grad_rotation => true;
}

launcher! {
    /// `grad_diff_f32`: diff (m × d) = q − x on the rows `rows[0..m)` of the n × d inputs (the
    /// kept rows, in order): the rows grad.rs scatter-adds into the codebook gradient. Row ids
    /// must be < n (larger ones are skipped).
    pub fn grad_diff(gpu, q: &G::Buf<f32>, x: &G::Buf<f32>, n: usize, rows: &G::Buf<u32>, m: usize,
        d: usize, diff: &mut G::Buf<f32>) {
        let nd = elems(n, d, "rows")?;
        let md = elems(m, d, "kept rows")?;
        let mut args = launch_args![gpu;
            F32(q; nd, "quantized rows"), F32(x; nd, "input rows"), U32(rows; m, "kept row ids"),
            Len(m, "kept rows"), Len(n, "rows"), Len(d, "dimension"),
            F32Mut(diff; md, "differences"),
        ];
        // SAFETY: the arguments follow grad_diff_f32(const float* q, const float* x, const u32*
        // rows, long long m, long long n, long long d, float* diff). q and x hold ≥ n·d floats,
        // rows ≥ m ids, diff ≥ m·d floats (checked); ids ≥ n are skipped, so reads stay below n·d,
        // and the grid-stride loop writes below m·d.
        unsafe { run(gpu, kernels::GRAD_DIFF_F32, grid_stride(gpu, md), &mut args) }
    }
}

launcher! {
    /// `grad_normalize_f32`: gx (n × d) ← the gradient through x̂ = x/‖x‖ of each row, in place
    /// (grad.rs `normalize_backward`, bit for bit): the quantizer's backward under cosine.
    pub fn grad_normalize(gpu, x: &G::Buf<f32>, n: usize, d: usize, gx: &mut G::Buf<f32>) {
        let nd = elems(n, d, "rows")?;
        let mut args = launch_args![gpu;
            F32(x; nd, "input rows"), Len(n, "rows"), Len(d, "dimension"),
            F32Mut(gx; nd, "input gradient"),
        ];
        // SAFETY: the arguments follow grad_normalize_f32(const float* x, long long n, long long
        // d, float* gx); x and gx hold ≥ n·d floats (checked) and are distinct buffers (one shared
        // and one exclusive borrow); thread r touches row r < n only (ROW_THREADS per block, its
        // launch bounds).
        unsafe { run(gpu, kernels::GRAD_NORMALIZE_F32, rows_grid_stride(gpu, n), &mut args) }
    }
}

/// `scale_f32`: v[i] ← (v[i] as f64 · factor) as f32 for i < len (grad.rs's scaling of the
/// codebook gradient's sums by 2/(kept·D)).
pub fn scale<G: Gpu>(gpu: &G, v: &mut G::Buf<f32>, len: usize, factor: f64) -> Result<()> {
    let mut args = launch_args![gpu;
        F32Mut(v; len, "scaled values"), Len(len, "values"), F64Val(factor),
    ];
    // SAFETY: the arguments follow scale_f32(float* v, long long len, double scale):
    // v holds ≥ len floats (checked) and the grid-stride loop stays below len.
    unsafe { run(gpu, kernels::SCALE_F32, grid_stride(gpu, len), &mut args) }
}
