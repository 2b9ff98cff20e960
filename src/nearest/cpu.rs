//! CPU twin of the fused nearest kernel.
//!
//! Two implementations of one contract: [`super::avx512`] (hand-written, fused, on CPUs with
//! AVX-512F) and the portable path below, chosen by [`CpuKernel`].
//!
//! Portable path: rows are split into blocks of [`ROW_BLOCK`] handled by rayon threads; each block walks the
//! codebook in tiles of [`CODE_TILE`] codes. One GEMM call (the `gemm` crate: packed,
//! AVX2/AVX-512 microkernels, far faster than anything worth writing here) fills the tile with
//! −2 x·c, and a scan adds ||c||² and keeps the best and runner-up score per row. Memory
//! is O(N + K·D + threads·ROW_BLOCK·CODE_TILE): the N×K matrix never exists.

use super::{Candidates, Prepared, Rows};
use crate::matrix::MatRef;
use rayon::prelude::*;

/// Rows per block (one rayon task).
pub const ROW_BLOCK: usize = 128;
/// Codes per tile: ROW_BLOCK × CODE_TILE scores (256 KiB) stay in L2.
pub const CODE_TILE: usize = 512;

/// Which CPU implementation scores the rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuKernel {
    /// AVX-512 where the CPU has it, portable otherwise.
    #[default]
    Auto,
    /// The fused AVX-512F kernel (falls back to portable on a CPU without AVX-512F).
    Avx512,
    /// GEMM tiles through the `gemm` crate (AVX2/FMA or scalar) and a scan.
    Portable,
}

impl std::fmt::Display for CpuKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CpuKernel::Auto => "auto",
            CpuKernel::Avx512 => "avx512",
            CpuKernel::Portable => "portable",
        })
    }
}

impl std::str::FromStr for CpuKernel {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(CpuKernel::Auto),
            "avx512" | "avx-512" => Ok(CpuKernel::Avx512),
            "portable" => Ok(CpuKernel::Portable),
            _ => Err(crate::Error::InvalidArgument(format!(
                "unknown CPU kernel {s:?}: expected auto, avx512 or portable"
            ))),
        }
    }
}

impl CpuKernel {
    /// The implementation that will actually run on this CPU.
    pub fn resolve(self) -> CpuKernel {
        #[cfg(target_arch = "x86_64")]
        if self != CpuKernel::Portable && super::avx512::available() {
            return CpuKernel::Avx512;
        }
        CpuKernel::Portable
    }
}

/// Best and runner-up scores per row of `x` against `prepared`'s scored codebook, with the
/// best kernel for this CPU.
pub fn candidates(x: MatRef<'_>, codebook: MatRef<'_>, prepared: &Prepared) -> Candidates {
    candidates_with(CpuKernel::Auto, x, codebook, prepared)
}

/// [`candidates`] with an explicit kernel (tests run both).
pub fn candidates_with(
    kernel: CpuKernel,
    x: MatRef<'_>,
    codebook: MatRef<'_>,
    prepared: &Prepared,
) -> Candidates {
    candidates_rows(kernel, Rows::all(x), codebook, prepared)
}

/// [`candidates_with`] for the rows a search names.
pub(crate) fn candidates_rows(
    kernel: CpuKernel,
    x: Rows<'_>,
    codebook: MatRef<'_>,
    prepared: &Prepared,
) -> Candidates {
    match kernel.resolve() {
        #[cfg(target_arch = "x86_64")]
        CpuKernel::Avx512 => super::avx512::candidates(x, codebook, prepared),
        _ => portable(x, codebook, prepared),
    }
}

fn portable(x: Rows<'_>, codebook: MatRef<'_>, prepared: &Prepared) -> Candidates {
    let d = x.cols();
    let cb = prepared.scored(codebook);
    let norms = prepared.norms();
    for_each_row_block(
        x,
        prepared,
        ROW_BLOCK,
        false,
        || (vec![0f32; ROW_BLOCK * CODE_TILE], Vec::new()),
        |(tile, xbuf), block, out| {
            let xs = block.contiguous(xbuf);
            let rows = out.best.len();
            out.best_score.fill(f32::INFINITY);
            out.second_score.fill(f32::INFINITY);
            let k_total = cb.rows();
            let mut k0 = 0;
            while k0 < k_total {
                let kt = CODE_TILE.min(k_total - k0);
                let t = &mut tile[..rows * kt];
                // SAFETY: every pointer/stride pair addresses memory inside its slice:
                // dst rows×kt row-major (t has rows*kt), lhs rows×d row-major (xs),
                // rhs d×kt with element (j, c) at cb[(k0 + c)·d + j] (cb has K·d).
                unsafe {
                    gemm::gemm(
                        rows,
                        kt,
                        d,
                        t.as_mut_ptr(),
                        1,
                        kt as isize,
                        false,
                        xs.as_ptr(),
                        1,
                        d as isize,
                        cb.data()[k0 * d..].as_ptr(),
                        d as isize,
                        1,
                        0.0,
                        -2.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for r in 0..rows {
                    scan_row(
                        &t[r * kt..(r + 1) * kt],
                        &norms[k0..k0 + kt],
                        k0 as u32,
                        &mut out.best[r],
                        &mut out.best_score[r],
                        &mut out.second_score[r],
                    );
                }
                k0 += kt;
            }
        },
    )
}

/// One block's share of [`Candidates`]: the outputs of its rows.
pub(crate) struct BlockOut<'a> {
    pub best: &'a mut [u32],
    pub best_score: &'a mut [f32],
    pub second_score: &'a mut [f32],
    /// The rows' shortlists, when the driver was asked for them.
    pub shortlist: Option<&'a mut [super::Shortlist]>,
    /// ||x||² of each row in f64, the value `finish` uses (under L2; zeros under cosine).
    pub norm_sq: &'a [f64],
}

/// One block's rows as a kernel reads them: in place (rows of the input), or from a per-worker
/// copy (normalised under cosine).
pub(crate) struct BlockRows<'a> {
    rows: Rows<'a>,
    r0: usize,
    len: usize,
    copy: Option<&'a [f32]>,
}

impl<'a> BlockRows<'a> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Row `i` of the block.
    pub(crate) fn row(&self, i: usize) -> &'a [f32] {
        let d = self.rows.cols();
        match self.copy {
            Some(c) => &c[i * d..(i + 1) * d],
            None => self.rows.row(self.r0 + i),
        }
    }

    /// The block's rows as one row-major slice: in place when they lie so, else copied into
    /// `buf` (which a worker keeps, so the copy stays in cache).
    pub(crate) fn contiguous<'b>(&self, buf: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        if let Some(c) = self.copy {
            return c;
        }
        if let Some(d) = self.rows.dense(self.r0, self.r0 + self.len) {
            return d;
        }
        buf.clear();
        for i in 0..self.len {
            buf.extend_from_slice(self.row(i));
        }
        buf
    }
}

/// The driver both CPU kernels share: splits the rows of `x` into blocks of `row_block`, one
/// rayon task each, hands `score` the block's rows ([`BlockRows`]: in place, or L2-normalised
/// copies under cosine), a scratch value made by `init` once per worker, and the block's
/// slices of the output.
///
/// With `shortlists`, the output has a [`Candidates::shortlist`] for `score` to fill.
pub(crate) fn for_each_row_block<S>(
    x: Rows<'_>,
    prepared: &Prepared,
    row_block: usize,
    shortlists: bool,
    init: impl Fn() -> S + Sync + Send,
    score: impl Fn(&mut S, &BlockRows<'_>, BlockOut<'_>) + Sync + Send,
) -> Candidates {
    let n = x.len();
    let cosine = prepared.metric() == super::Metric::Cosine;
    let mut out = Candidates {
        best: vec![0; n],
        best_score: vec![0.0; n],
        second_score: vec![0.0; n],
        row_norm_sq: None,
        shortlist: None,
    };
    let mut lists = vec![super::Shortlist::default(); if shortlists { n } else { 0 }];
    // Under L2, finish needs each row's norm: known beforehand for checked rows, else computed
    // here as the block comes into cache.
    let mut norms = vec![0f64; n];
    let list_parts: Vec<Option<&mut [super::Shortlist]>> = if shortlists {
        lists.chunks_mut(row_block).map(Some).collect()
    } else {
        (0..n.div_ceil(row_block)).map(|_| None).collect()
    };
    out.best
        .par_chunks_mut(row_block)
        .zip(out.best_score.par_chunks_mut(row_block))
        .zip(out.second_score.par_chunks_mut(row_block))
        .zip(norms.par_chunks_mut(row_block))
        .zip(list_parts.into_par_iter())
        .enumerate()
        .for_each_init(
            || (init(), Vec::<f32>::new()),
            |(scratch, xbuf),
             (block, ((((best, best_score), second_score), block_norms), shortlist))| {
                let r0 = block * row_block;
                let len = best.len();
                let copy = if cosine {
                    xbuf.clear();
                    for r in r0..r0 + len {
                        xbuf.extend_from_slice(x.row(r));
                    }
                    xbuf.chunks_mut(x.cols().max(1))
                        .for_each(super::normalize_row);
                    Some(&xbuf[..])
                } else {
                    None
                };
                let rows = BlockRows {
                    rows: x,
                    r0,
                    len,
                    copy,
                };
                if !cosine {
                    for (i, o) in block_norms.iter_mut().enumerate() {
                        *o = x
                            .known_norm_sq(r0 + i)
                            .unwrap_or_else(|| super::norm_sq_f64(rows.row(i)));
                    }
                }
                let out = BlockOut {
                    best,
                    best_score,
                    second_score,
                    shortlist,
                    norm_sq: block_norms,
                };
                score(scratch, &rows, out);
            },
        );
    if !cosine {
        out.row_norm_sq = Some(norms);
    }
    if shortlists {
        out.shortlist = Some(lists);
    }
    out
}

/// Folds one tile row into the running (best index, best score, runner-up score).
/// Strict `<` keeps the first of equal scores, so ties go to the smallest index.
///
/// Most of a row's scores lose to the runner-up already held, so blocks of [`SCAN_BLOCK`]
/// are first reduced to their minimum with lane-wise selects (which vectorise), and only a
/// block whose minimum beats the runner-up is walked one score at a time.
#[inline]
fn scan_row(
    dots: &[f32],
    norms: &[f32],
    base: u32,
    best: &mut u32,
    best_s: &mut f32,
    second_s: &mut f32,
) {
    let (mut b, mut bs, mut ss) = (*best, *best_s, *second_s);
    let mut start = 0;
    for (block, nb) in dots.chunks(SCAN_BLOCK).zip(norms.chunks(SCAN_BLOCK)) {
        if block_min(block, nb) < ss {
            for (j, (&m2dot, &norm)) in block.iter().zip(nb).enumerate() {
                let v = norm + m2dot;
                if v < ss {
                    if v < bs {
                        ss = bs;
                        bs = v;
                        b = base + (start + j) as u32;
                    } else {
                        ss = v;
                    }
                }
            }
        }
        start += block.len();
    }
    *best = b;
    *best_s = bs;
    *second_s = ss;
}

const SCAN_BLOCK: usize = 64;
const LANES: usize = 16;

/// min_j (norms[j] + dots[j]) over one block.
#[inline]
fn block_min(dots: &[f32], norms: &[f32]) -> f32 {
    let mut m = [f32::INFINITY; LANES];
    let mut chunks = dots.chunks_exact(LANES).zip(norms.chunks_exact(LANES));
    for (c, n) in &mut chunks {
        for i in 0..LANES {
            let v = n[i] + c[i];
            m[i] = if v < m[i] { v } else { m[i] };
        }
    }
    let tail = dots.len() - dots.len() % LANES;
    for (&c, &n) in dots[tail..].iter().zip(&norms[tail..]) {
        let v = n + c;
        m[0] = if v < m[0] { v } else { m[0] };
    }
    m.iter()
        .fold(f32::INFINITY, |a, &v| if v < a { v } else { a })
}
