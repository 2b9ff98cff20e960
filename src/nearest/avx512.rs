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

use super::{Candidates, Prepared, Rows};
use crate::matrix::MatRef;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Rows per micro-kernel call.
const MR: usize = 8;
/// Codes per panel (two zmm of f32).
const NR: usize = 32;
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
    dim: usize,
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
        dim: d,
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
    let tile_panels = (TILE_BYTES / (d * NR * 4)).max(1);
    super::cpu::for_each_row_block(
        x,
        prepared,
        ROW_BLOCK,
        || vec![LaneState::START; ROW_BLOCK],
        |states, xs, out| {
            let rows = out.best.len();
            debug_assert_eq!(rows, xs.len());
            let states = &mut states[..rows];
            states.fill(LaneState::START);
            let mut p0 = 0;
            while p0 < packed.panels {
                let p1 = (p0 + tile_panels).min(packed.panels);
                for g in (0..rows).step_by(MR) {
                    let live = MR.min(rows - g);
                    // Missing rows of a short last group repeat the group's first row; their
                    // results are dropped.
                    let ptrs: [*const f32; MR] = std::array::from_fn(|r| {
                        let row = g + if r < live { r } else { 0 };
                        xs.row(row).as_ptr()
                    });
                    for p in p0..p1 {
                        // SAFETY: available() was checked above; each pointer in `ptrs`
                        // addresses a full row of d values (`xs.row`), the panel slice holds
                        // d·NR values and the norms slice NR, and `states[g..g + live]`
                        // is in bounds.
                        unsafe {
                            block_8x32(
                                &ptrs,
                                &packed.data[p * d * NR..(p + 1) * d * NR],
                                &packed.norms[p * NR..(p + 1) * NR],
                                (p * NR) as u32,
                                &mut states[g..g + live],
                                packed.dim,
                            );
                        }
                    }
                }
                p0 = p1;
            }
            for (r, s) in states.iter().enumerate() {
                let (i, b, sc) = s.reduce();
                out.best[r] = i;
                out.best_score[r] = b;
                out.second_score[r] = sc;
            }
        },
    )
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
