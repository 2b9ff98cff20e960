//! AVX-512 fused distance-argmin: the CPU path on machines that have AVX-512F.
//!
//! Why hand-written: no GEMM crate on stable Rust uses AVX-512 (the `gemm` crate gates it
//! behind its nightly feature), and a GEMM followed by a scan writes and re-reads every score.
//! Here the scores of an 8-row × 32-code block live in 16 zmm accumulators for the whole
//! dot product, and the epilogue folds them straight into per-lane running (best, runner-up,
//! index) — the N×K matrix, or even a tile of it, never touches memory.
//!
//! Layout: the codebook is packed once per call into panels of 32 codes, `[panel][d][32]`, so
//! one d step loads two zmm of codes and broadcasts one value per row. Codes past K are padded
//! with zero rows and a norm of +inf, so they never win. Rows are split into blocks of
//! [`ROW_BLOCK`] handled by rayon tasks; each block walks the codebook in tiles of panels that
//! stay in L2, and each 8-row group is streamed over a tile.
//!
//! Accumulation is one FMA per (row, code, d) in increasing d: the f32 rounding bound of
//! [`super::RoundingModel::F32`] holds.

use super::{Candidates, Prepared, RoundingModel, Rows, Shortlist};
use crate::matrix::MatRef;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Rows per micro-kernel call.
const MR: usize = 8;
/// Codes per panel (two zmm of f32).
const NR: usize = 32;
// A lane of the lane states is a lane of a [`Shortlist`]: codes k with k mod 32 = lane.
const _: () = assert!(NR == Shortlist::LANES);
/// Rows per rayon task.
pub const ROW_BLOCK: usize = 128;
/// Bytes of packed codebook per L2 tile.
const TILE_BYTES: usize = 256 * 1024;

/// Whether this CPU can run the AVX-512 path.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// Codebook packed into panels of [`NR`] codes: `[panel][d][NR]`, norms padded with +inf.
struct Packed {
    data: Vec<f32>,
    norms: Vec<f32>,
    panels: usize,
}

fn pack(codebook: MatRef<'_>, norms: &[f32]) -> Packed {
    let (k, d) = (codebook.rows(), codebook.cols());
    let panels = k.div_ceil(NR);
    let mut data = vec![0f32; panels * d * NR];
    data.par_chunks_mut(d * NR)
        .enumerate()
        .for_each(|(p, panel)| {
            for lane in 0..NR.min(k - p * NR) {
                let row = codebook.row(p * NR + lane);
                for (j, &v) in row.iter().enumerate() {
                    panel[j * NR + lane] = v;
                }
            }
        });
    let mut padded = vec![f32::INFINITY; panels * NR];
    padded[..k].copy_from_slice(norms);
    Packed {
        data,
        norms: padded,
        panels,
    }
}

/// Per-row running state: for each of the 32 lanes, the best and runner-up score seen in that
/// lane and the code index of the best.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct LaneState {
    best: [f32; NR],
    second: [f32; NR],
    index: [u32; NR],
}

impl LaneState {
    const START: LaneState = LaneState {
        best: [f32::INFINITY; NR],
        second: [f32::INFINITY; NR],
        index: [0; NR],
    };

    /// Reduces the lanes: (best index, best score, runner-up score). The global runner-up is
    /// either the winner lane's own runner-up or another lane's best.
    fn reduce(&self) -> (u32, f32, f32) {
        let mut w = 0;
        for l in 1..NR {
            let (b, wb) = (self.best[l], self.best[w]);
            if b < wb || (b == wb && self.index[l] < self.index[w]) {
                w = l;
            }
        }
        let mut second = self.second[w];
        for l in 0..NR {
            if l != w && self.best[l] < second {
                second = self.best[l];
            }
        }
        (self.index[w], self.best[w], second)
    }
}

/// Best and runner-up scores per row; same contract as [`super::cpu::candidates`].
///
/// Panics if the CPU lacks AVX-512F: callers check [`available`] first.
pub(crate) fn candidates(x: Rows<'_>, codebook: MatRef<'_>, prepared: &Prepared) -> Candidates {
    assert!(available(), "AVX-512F path called on a CPU without it");
    let d = x.cols();
    let packed = pack(prepared.scored(codebook), prepared.norms());
    let panel_len = d * NR;
    let tile_panels = (TILE_BYTES / (panel_len * 4)).max(1);
    super::cpu::for_each_row_block(
        x,
        prepared,
        ROW_BLOCK,
        false,
        || vec![LaneState::START; ROW_BLOCK],
        |states, xs, mut out| {
            let rows = out.best.len();
            debug_assert_eq!(rows, xs.len());
            let states = &mut states[..rows];
            walk(
                states,
                packed.panels,
                tile_panels,
                |r| xs.row(r).as_ptr(),
                |ptrs, p, states| {
                    // SAFETY: available() was checked above; each pointer in `ptrs` addresses
                    // a full row of d values (`xs.row`), the panel slice holds d·NR values
                    // and the norms slice NR, and `states` has at most MR rows.
                    unsafe {
                        block_8x32(
                            ptrs,
                            &packed.data[p * panel_len..(p + 1) * panel_len],
                            &packed.norms[p * NR..(p + 1) * NR],
                            (p * NR) as u32,
                            states,
                            d,
                        )
                    }
                },
            );
            reduce_into(states, &mut out);
        },
    )
}

/// The walk both kernels share: the codebook in L2-sized tiles of panels, each 8-row group of
/// the block streamed over a tile (`block(rows, panel, their states)`).
fn walk<T>(
    states: &mut [LaneState],
    panels: usize,
    tile_panels: usize,
    row: impl Fn(usize) -> *const T,
    mut block: impl FnMut(&[*const T; MR], usize, &mut [LaneState]),
) {
    let rows = states.len();
    states.fill(LaneState::START);
    let mut p0 = 0;
    while p0 < panels {
        let p1 = (p0 + tile_panels).min(panels);
        for g in (0..rows).step_by(MR) {
            let live = MR.min(rows - g);
            // Missing rows of a short last group repeat the group's first row; their results
            // are dropped.
            let ptrs: [*const T; MR] =
                std::array::from_fn(|r| row(g + if r < live { r } else { 0 }));
            for p in p0..p1 {
                block(&ptrs, p, &mut states[g..g + live]);
            }
        }
        p0 = p1;
    }
}

/// Each row's lanes reduced into its (best, best score, runner-up score).
fn reduce_into(states: &[LaneState], out: &mut super::cpu::BlockOut<'_>) {
    for (r, s) in states.iter().enumerate() {
        // SAFETY: the kernels that fill lane states run only where AVX-512F is (`available`).
        let (i, b, sc) = unsafe { reduce_avx512(s) };
        out.best[r] = i;
        out.best_score[r] = b;
        out.second_score[r] = sc;
    }
}

/// [`LaneState::reduce`] in two zmm per field: the same answer (the smallest (score, index),
/// then the smallest other score) where no score is NaN, which the callers' bounds on the
/// inputs rule out; with a NaN it defers to the scalar one.
#[target_feature(enable = "avx512f")]
unsafe fn reduce_avx512(st: &LaneState) -> (u32, f32, f32) {
    // SAFETY: each field is an array of 32 lanes: two loads of 16 at offsets 0 and 16.
    let (b0, b1, i0, i1) = unsafe {
        (
            _mm512_loadu_ps(st.best.as_ptr()),
            _mm512_loadu_ps(st.best.as_ptr().add(16)),
            _mm512_loadu_si512(st.index.as_ptr() as *const _),
            _mm512_loadu_si512(st.index.as_ptr().add(16) as *const _),
        )
    };
    let nan =
        _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(b0, b0) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(b1, b1);
    if nan != 0 || st.second.iter().any(|v| v.is_nan()) {
        return st.reduce();
    }
    let m = _mm512_reduce_min_ps(_mm512_min_ps(b0, b1));
    let mv = _mm512_set1_ps(m);
    let (e0, e1) = (
        _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(b0, mv),
        _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(b1, mv),
    );
    // Among the lanes holding the smallest score, the smallest code index.
    let big = _mm512_set1_epi32(-1);
    let w = _mm512_reduce_min_epu32(_mm512_min_epu32(
        _mm512_mask_mov_epi32(big, e0, i0),
        _mm512_mask_mov_epi32(big, e1, i1),
    )) as u32;
    let wv = _mm512_set1_epi32(w as i32);
    let (w0, w1) = (
        e0 & _mm512_cmpeq_epi32_mask(i0, wv),
        e1 & _mm512_cmpeq_epi32_mask(i1, wv),
    );
    let lane = if w0 != 0 {
        w0.trailing_zeros()
    } else {
        16 + w1.trailing_zeros()
    } as usize;
    // The runner-up: the winner lane's own, or another lane's best.
    let inf = _mm512_set1_ps(f32::INFINITY);
    let others = _mm512_reduce_min_ps(_mm512_min_ps(
        _mm512_mask_mov_ps(b0, w0, inf),
        _mm512_mask_mov_ps(b1, w1, inf),
    ));
    // The winner's own score (not `m`: a min may pick either sign of a zero).
    (w, st.best[lane], st.second[lane].min(others))
}

/// Whether this CPU can run the bf16 screen ([`screen_bf16`]).
pub fn bf16_available() -> bool {
    available() && is_x86_feature_detected!("avx512bf16")
}

/// `v` rounded to bf16 (to nearest, ties to even), as its 16 bits. A finite value past bf16's
/// range becomes ±inf, whose scores then send the row to the exact recheck.
#[inline(always)]
fn to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Codebook packed for [`block_8x32_bf16`]: `[panel][d/2][NR][2]` bf16, each code's
/// coordinates 2t and 2t + 1 side by side (the pair `vdpbf16ps` multiplies in one lane); an
/// odd d is padded with a zero coordinate.
struct PackedBf16 {
    data: Vec<u16>,
    norms: Vec<f32>,
    panels: usize,
}

fn pack_bf16(codebook: MatRef<'_>, norms: &[f32]) -> PackedBf16 {
    let (k, d) = (codebook.rows(), codebook.cols());
    let (panels, pairs) = (k.div_ceil(NR), d.div_ceil(2));
    let mut data = vec![0u16; panels * pairs * NR * 2];
    data.par_chunks_mut(pairs * NR * 2)
        .enumerate()
        .for_each(|(p, panel)| {
            for lane in 0..NR.min(k - p * NR) {
                for (t, &v) in codebook.row(p * NR + lane).iter().enumerate() {
                    panel[(t / 2 * NR + lane) * 2 + t % 2] = to_bf16(v);
                }
            }
        });
    let mut padded = vec![f32::INFINITY; panels * NR];
    padded[..k].copy_from_slice(norms);
    PackedBf16 {
        data,
        norms: padded,
        panels,
    }
}

/// Candidates with shortlists from operands rounded to bf16 (products exact, sums in f32:
/// `vdpbf16ps`, twice the multiply-adds per instruction of the f32 kernel), to be finished
/// with [`RoundingModel::BF16_F32_SUMS`]: that finish gives the exact search's indices.
///
/// The bf16 bound is some 250 times the f32 one, so more rows fall inside it (on 256-D
/// embeddings, 6% of a full search at K = 1,024, and more among the rows a k-means bound
/// leaves open). For each such row the 32 lanes name every code the recheck could need (its
/// [`Shortlist`]): a lane whose best is within twice the bound of the row's best names that
/// code, and a lane whose runner-up is within it too names all its codes. Only a NaN score
/// leaves a row unlisted, and the recheck then measures every code.
///
/// L2 only. Panics if the CPU lacks AVX512_BF16: callers check [`bf16_available`] first.
pub(crate) fn screen_bf16(x: Rows<'_>, codebook: MatRef<'_>, prepared: &Prepared) -> Candidates {
    assert!(
        bf16_available(),
        "AVX512_BF16 path called on a CPU without it"
    );
    assert!(
        prepared.metric() == super::Metric::L2,
        "the bf16 screen scores L2 only"
    );
    let d = x.cols();
    let pairs = d.div_ceil(2);
    let packed = pack_bf16(prepared.scored(codebook), prepared.norms());
    let panel_len = pairs * NR * 2;
    let tile_panels = (TILE_BYTES / (panel_len * 2)).max(1);
    super::cpu::for_each_row_block(
        x,
        prepared,
        ROW_BLOCK,
        true,
        || (vec![LaneState::START; ROW_BLOCK], Vec::<u32>::new()),
        |(states, xb), xs, mut out| {
            let rows = out.best.len();
            debug_assert_eq!(rows, xs.len());
            // The block's rows in bf16, two coordinates per u32 (the broadcast unit).
            xb.clear();
            xb.resize(rows * pairs, 0);
            for r in 0..rows {
                // SAFETY: bf16_available() was checked above.
                unsafe { row_to_bf16(xs.row(r), &mut xb[r * pairs..(r + 1) * pairs]) };
            }
            let xb = &xb[..];
            let states = &mut states[..rows];
            walk(
                states,
                packed.panels,
                tile_panels,
                |r| xb[r * pairs..].as_ptr(),
                |ptrs, p, states| {
                    // SAFETY: bf16_available() was checked above; each pointer addresses a
                    // row of `pairs` u32 in `xb`, the panel slice holds pairs·NR·2 values and
                    // the norms slice NR, and `states` has at most MR rows.
                    unsafe {
                        block_8x32_bf16(
                            ptrs,
                            &packed.data[p * panel_len..(p + 1) * panel_len],
                            &packed.norms[p * NR..(p + 1) * NR],
                            (p * NR) as u32,
                            states,
                            pairs,
                        )
                    }
                },
            );
            reduce_into(states, &mut out);
            let lists = out.shortlist.as_deref_mut().expect("asked for shortlists");
            for (r, st) in states.iter().enumerate() {
                // A row whose runner-up is outside the limit is not rechecked: no list.
                let limit = list_limit(prepared, out.norm_sq[r], out.best_score[r]);
                let second = out.second_score[r] as f64;
                if second <= limit || second.is_nan() {
                    lists[r] = shortlist(st, limit);
                }
            }
        },
    )
}

/// The highest score a code may have and still win a row whose ||x||² is `norm_sq` and whose
/// best score is `best`: finish's own recheck bound (same norm, same model), with a hair of
/// room so the list covers every code it rechecks.
fn list_limit(prepared: &Prepared, norm_sq: f64, best: f32) -> f64 {
    let err = prepared.score_error(norm_sq.sqrt(), RoundingModel::BF16_F32_SUMS);
    best as f64 + 2.0 * err * (1.0 + 1e-9)
}

/// Every code whose score may be at most `limit`: the lane's best when only it is, the whole
/// lane when its runner-up is too; nothing listed (every code) when a score is NaN.
fn shortlist(st: &LaneState, limit: f64) -> Shortlist {
    let mut list = Shortlist::default();
    if limit.is_nan() {
        return list;
    }
    for l in 0..NR {
        let (b, s) = (st.best[l] as f64, st.second[l] as f64);
        if b.is_nan() || s.is_nan() {
            return Shortlist::default();
        }
        if s <= limit {
            list.push_lane(l);
        } else if b <= limit {
            list.push(st.index[l]);
        }
    }
    list
}

/// One row rounded to bf16 (`vcvtneps2bf16`: to nearest, ties to even), two coordinates per
/// u32, the odd one in the high half; an odd length ends with a zero.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn row_to_bf16(row: &[f32], out: &mut [u32]) {
    debug_assert_eq!(out.len(), row.len().div_ceil(2));
    let whole = row.len() / 16 * 16;
    let op = out.as_mut_ptr() as *mut u16;
    for i in (0..whole).step_by(16) {
        // SAFETY: i + 16 ≤ whole ≤ row.len(); `out` holds ⌈len/2⌉ u32, that is ≥ len u16.
        unsafe {
            let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(row.as_ptr().add(i)));
            _mm256_storeu_si256(
                op.add(i) as *mut __m256i,
                std::mem::transmute::<__m256bh, __m256i>(h),
            );
        }
    }
    for (i, &v) in row.iter().enumerate().skip(whole) {
        // SAFETY: i < row.len() ≤ 2·out.len() u16.
        unsafe { *op.add(i) = to_bf16(v) };
    }
    if row.len() % 2 == 1 {
        // SAFETY: the last u32's high half, inside `out`.
        unsafe { *op.add(row.len()) = 0 };
    }
}

/// [`block_8x32`] on bf16 operands: per step, one coordinate pair of 8 rows against 32 codes.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block_8x32_bf16(
    x: &[*const u32; MR],
    panel: &[u16],
    norms: &[f32],
    base: u32,
    states: &mut [LaneState],
    pairs: usize,
) {
    debug_assert!(panel.len() == pairs * NR * 2 && norms.len() == NR && states.len() <= MR);
    let mut acc = [_mm512_setzero_ps(); 2 * MR];
    let pp = panel.as_ptr();
    for j in 0..pairs {
        // SAFETY: j < pairs, so the 64 u16 at j·NR·2 lie in the panel, and x[r] + j is inside
        // row r's pairs. The casts reinterpret 64 bytes as 32 bf16 (same size, any bits).
        unsafe {
            let c0: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(pp.add(j * NR * 2) as *const _));
            let c1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(pp.add(j * NR * 2 + 32) as *const _));
            for r in 0..MR {
                let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(*x[r].add(j) as i32));
                acc[2 * r] = _mm512_dpbf16_ps(acc[2 * r], xv, c0);
                acc[2 * r + 1] = _mm512_dpbf16_ps(acc[2 * r + 1], xv, c1);
            }
        }
    }
    // SAFETY: as the caller's (norms holds NR values).
    unsafe { fold(&acc, norms, base, states) };
}

/// Scores 8 rows against one 32-code panel over all d, then folds the scores
/// s = ||c||² − 2 x·c into the rows' lane states.
#[target_feature(enable = "avx512f")]
unsafe fn block_8x32(
    x: &[*const f32; MR],
    panel: &[f32],
    norms: &[f32],
    base: u32,
    states: &mut [LaneState],
    d: usize,
) {
    debug_assert!(panel.len() == d * NR && norms.len() == NR && states.len() <= MR);
    let mut acc = [_mm512_setzero_ps(); 2 * MR];
    let pp = panel.as_ptr();
    for j in 0..d {
        // SAFETY: j < d, so j·NR + 31 < panel.len() and x[r] + j is inside row r.
        unsafe {
            let c0 = _mm512_loadu_ps(pp.add(j * NR));
            let c1 = _mm512_loadu_ps(pp.add(j * NR + 16));
            for r in 0..MR {
                let xv = _mm512_set1_ps(*x[r].add(j));
                acc[2 * r] = _mm512_fmadd_ps(xv, c0, acc[2 * r]);
                acc[2 * r + 1] = _mm512_fmadd_ps(xv, c1, acc[2 * r + 1]);
            }
        }
    }
    // SAFETY: as the caller's (norms holds NR values).
    unsafe { fold(&acc, norms, base, states) };
}

/// Folds the dot products `acc` (two zmm per row) of ≤ 8 rows with one 32-code panel into the
/// rows' lane states as scores s = ||c||² − 2 x·c.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fold(acc: &[__m512; 2 * MR], norms: &[f32], base: u32, states: &mut [LaneState]) {
    debug_assert!(norms.len() == NR && states.len() <= MR);
    let minus_two = _mm512_set1_ps(-2.0);
    let lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for h in 0..2 {
        // SAFETY: norms holds NR = 32 values; h·16 + 15 < 32.
        let nv = unsafe { _mm512_loadu_ps(norms.as_ptr().add(h * 16)) };
        let idx = _mm512_add_epi32(lanes, _mm512_set1_epi32((base + 16 * h as u32) as i32));
        for (r, st) in states.iter_mut().enumerate() {
            let s = _mm512_fmadd_ps(acc[2 * r + h], minus_two, nv);
            // SAFETY: each field is an array of 32 lanes; h·16 + 15 < 32.
            unsafe {
                let bp = st.best.as_mut_ptr().add(h * 16);
                let sp = st.second.as_mut_ptr().add(h * 16);
                let ip = st.index.as_mut_ptr().add(h * 16) as *mut i32;
                let b = _mm512_loadu_ps(bp);
                let sc = _mm512_loadu_ps(sp);
                let ix = _mm512_loadu_si512(ip as *const _);
                // Strict <: within a lane codes come in increasing order, so the first of
                // equal scores stays the best.
                let lt = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(s, b);
                _mm512_storeu_ps(sp, _mm512_mask_mov_ps(_mm512_min_ps(sc, s), lt, b));
                _mm512_storeu_ps(bp, _mm512_mask_mov_ps(b, lt, s));
                _mm512_storeu_si512(ip as *mut _, _mm512_mask_mov_epi32(ix, lt, idx));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nearest::{Metric, exact_distance, exact_row, finish_rows};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// [`screen_bf16`] without AVX512_BF16: the same lane states (code k in lane k mod 32),
    /// from operands rounded to bf16 and products summed in f32 one at a time (an order the
    /// rounding model covers), so the shortlists and their recheck run on every CPU.
    fn screen_scalar(x: MatRef<'_>, codebook: MatRef<'_>, prepared: &Prepared) -> Candidates {
        let bf = |v: f32| f32::from_bits((to_bf16(v) as u32) << 16);
        let (n, d, k) = (x.rows(), x.cols(), codebook.rows());
        let cb: Vec<f32> = codebook.data().iter().map(|&v| bf(v)).collect();
        let mut out = Candidates {
            best: vec![0; n],
            best_score: vec![0.0; n],
            second_score: vec![0.0; n],
            row_norm_sq: None,
            shortlist: Some(vec![Shortlist::default(); n]),
        };
        for r in 0..n {
            let xr: Vec<f32> = x.row(r).iter().map(|&v| bf(v)).collect();
            let mut st = LaneState::START;
            for j in 0..k {
                let dot = (0..d).fold(0f32, |acc, t| acc + xr[t] * cb[j * d + t]);
                let s = (-2f32).mul_add(dot, prepared.norms()[j]);
                let l = j % NR;
                if s < st.best[l] {
                    (st.second[l], st.best[l], st.index[l]) = (st.best[l], s, j as u32);
                } else {
                    st.second[l] = st.second[l].min(s);
                }
            }
            let (i, b, sc) = st.reduce();
            (out.best[r], out.best_score[r], out.second_score[r]) = (i, b, sc);
            let limit = list_limit(prepared, crate::nearest::norm_sq_f64(x.row(r)), b);
            out.shortlist.as_mut().unwrap()[r] = shortlist(&st, limit);
        }
        out
    }

    /// The vector lane reduction gives the scalar one's answer, bit for bit: random states,
    /// ties across lanes (the smaller code wins), unused lanes (+inf, index 0), zeros of
    /// both signs, and a NaN (deferred to the scalar one).
    #[test]
    fn vector_reduce_equals_the_scalar_one() {
        if !available() {
            return;
        }
        let mut r = ChaCha8Rng::seed_from_u64(11);
        for case in 0..2000 {
            let mut st = LaneState::START;
            let used = 1 + case % NR;
            for l in 0..used {
                // Few distinct values, so ties across lanes are common.
                let b =
                    [0.0f32, -0.0, 1.0, 2.5, -3.0][r.gen_range(0..5)] + r.gen_range(0..3) as f32;
                st.best[l] = b;
                st.second[l] = b + r.gen_range(0..4) as f32;
                st.index[l] = (r.gen_range(0..50) * NR + l) as u32;
            }
            if case % 97 == 0 {
                st.second[r.gen_range(0..used)] = f32::NAN;
            }
            let want = st.reduce();
            // SAFETY: available() was checked above.
            let got = unsafe { reduce_avx512(&st) };
            assert_eq!(
                (got.0, got.1.to_bits(), got.2.to_bits()),
                (want.0, want.1.to_bits(), want.2.to_bits()),
                "case {case}: {got:?} against {want:?}"
            );
        }
    }

    /// Codes crowded around a few centres (copies within 1e-3, some exact duplicates) and
    /// rows near the centres: many rows fall inside the bf16 bound, with shortlists by index
    /// and whole lanes.
    fn crowded(seed: u64, k: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let centres = 5;
        let base: Vec<f32> = (0..centres * d).map(|_| r.gen_range(-1.0..1.0)).collect();
        let mut c = Vec::with_capacity(k * d);
        for j in 0..k {
            let at = (j % centres) * d;
            if j >= centres && j % 4 == 0 {
                let prev = c[(j - centres) * d..(j - centres + 1) * d].to_vec();
                c.extend(prev);
            } else {
                c.extend(
                    base[at..at + d]
                        .iter()
                        .map(|&v| v + r.gen_range(-1e-3f32..1e-3)),
                );
            }
        }
        let x = (0..150 * d)
            .map(|i| base[(i / d % centres) * d + i % d] + r.gen_range(-0.05f32..0.05))
            .collect();
        (x, c)
    }

    /// The shortlist recheck gives `exact_row`'s winner on every row, its bounds hold against
    /// every code, and the test reaches both kinds of list (else it would prove nothing).
    #[test]
    fn shortlists_recheck_to_the_exact_winner() {
        let (mut by_index, mut by_lane) = (0, 0);
        for seed in 0..4u64 {
            for (k, d) in [(40usize, 16usize), (100, 33), (300, 8)] {
                let (x, c) = crowded(seed, k, d);
                let (x, c) = (
                    MatRef::new(&x, x.len() / d, d).unwrap(),
                    MatRef::new(&c, k, d).unwrap(),
                );
                let prepared = Prepared::new(c, Metric::L2);
                let cands = screen_scalar(x, c, &prepared);
                let lists = cands.shortlist.clone().unwrap();
                for (r, s) in lists.iter().enumerate() {
                    let margin = (cands.second_score[r] - cands.best_score[r]) as f64;
                    let x_norm = crate::nearest::norm_sq_f64(x.row(r)).sqrt();
                    if margin <= 2.0 * prepared.score_error(x_norm, RoundingModel::BF16_F32_SUMS) {
                        by_index += usize::from(s.len > 0);
                        by_lane += usize::from(s.lanes != 0);
                    }
                }
                let model = RoundingModel::BF16_F32_SUMS;
                let (a, lb) = finish_rows(
                    super::super::Rows::all(x),
                    c,
                    &prepared,
                    model,
                    cands,
                    true,
                    true,
                );
                let lb = lb.unwrap();
                for r in 0..x.rows() {
                    let (want, wd) = exact_row(x.row(r), c, Metric::L2);
                    let ctx = format!("seed {seed} K {k} D {d} row {r}");
                    assert_eq!(a.indices[r], want, "{ctx}: index (exact distance {wd:e})");
                    assert!(
                        lb.winner[r] <= wd,
                        "{ctx}: winner bound {} > {wd}",
                        lb.winner[r]
                    );
                    for j in 0..k {
                        let dj = exact_distance(x.row(r), c.row(j), Metric::L2);
                        if j as u32 != want {
                            assert!(
                                lb.others[r] <= dj,
                                "{ctx}: others bound {} > code {j}'s {dj}",
                                lb.others[r]
                            );
                        }
                    }
                }
            }
        }
        assert!(
            by_index > 0 && by_lane > 0,
            "lists by index {by_index}, by lane {by_lane}"
        );
    }
}
