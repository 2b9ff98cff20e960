//! Every pairwise squared distance of the k-means|| candidates, as one C × C table.
//!
//! Why a table: the weighted k-means++ that reduces the ~1.5·K candidates to K codes measures
//! each new centre against every candidate. One centre at a time, that streams all C × D
//! candidate values from memory K times (at K = 4,096 and D = 256 about 6 MB per step, a
//! quarter of `vqx fit`'s CPU time on 20,000 rows by perf). The table costs C² dot products in a
//! register-tiled kernel instead, and each step then reads one row of C values.
//!
//! The same bits on every CPU: each dot product is one chain of f32 fused multiply-adds over
//! the D coordinates in order (`acc = fma(a_t, b_t, acc)`), on AVX-512, AVX2 and in plain code
//! (`f32::mul_add`). The candidates are first centred on their mean (distances do not change)
//! so that ‖a‖² + ‖b‖² − 2·a·b loses less to cancellation.

use crate::matrix::MatRef;
use rayon::prelude::*;

/// Candidates per column panel (one AVX-512 register; two AVX2 ones).
const PANEL: usize = 16;
/// Rows per AVX-512 tile (8 accumulators); AVX2 tiles take 4 rows (8 accumulators too).
const TILE: usize = 8;

/// The C × C squared distances of a point set (row-major; the diagonal is 0).
pub(crate) struct PairDistances {
    c: usize,
    d2: Vec<f32>,
}

impl PairDistances {
    /// The largest table built (bytes); larger candidate sets measure each centre as it comes.
    pub(crate) const MAX_BYTES: usize = 512 << 20;

    /// Whether to build the table of `c` points: it stays within [`Self::MAX_BYTES`], and this
    /// CPU has a vector kernel for it. The plain kernel is the reference the others are tested
    /// against, too slow to replace the streaming k-means++ (one `f32::mul_add` per product;
    /// on x86 without FMA in the build, a call).
    pub(crate) fn worth_building(c: usize) -> bool {
        Kernel::best() != Kernel::Scalar
            && c.checked_mul(c)
                .and_then(|cc| cc.checked_mul(4))
                .is_some_and(|b| b <= Self::MAX_BYTES)
    }

    /// The table of the rows of `points`.
    pub(crate) fn new(points: MatRef<'_>) -> Self {
        Self::with_kernel(points, Kernel::best())
    }

    fn with_kernel(points: MatRef<'_>, kernel: Kernel) -> Self {
        let (c, d) = (points.rows(), points.cols());
        // Centre on the mean (f64, in row order), then round once to f32.
        let mut mean = vec![0f64; d];
        for i in 0..c {
            for (m, &v) in mean.iter_mut().zip(points.row(i)) {
                *m += v as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= c as f64);
        let y: Vec<f32> = (0..c)
            .flat_map(|i| {
                let mean = &mean;
                points
                    .row(i)
                    .iter()
                    .zip(mean)
                    .map(move |(&v, &m)| (v as f64 - m) as f32)
            })
            .collect();
        // Column panels: panel p holds points p·16 .. p·16 + 16 as D rows of 16 (zero-padded).
        let panels = c.div_ceil(PANEL);
        let mut packed = vec![0f32; panels * d * PANEL];
        for j in 0..c {
            let (p, lane) = (j / PANEL, j % PANEL);
            for t in 0..d {
                packed[(p * d + t) * PANEL + lane] = y[j * d + t];
            }
        }
        // ‖y_i‖² by the same chain of fused multiply-adds as every dot product.
        let norm: Vec<f32> = y
            .par_chunks(d.max(1))
            .map(|r| r.iter().fold(0f32, |acc, &v| v.mul_add(v, acc)))
            .collect();
        // The table is symmetric, and so are its bits (a·b and b·a are the same FMA chain):
        // each 8-row tile computes only the panels from its own diagonal on, and the rest of
        // each row is copied from the rows above it afterwards.
        let mut d2 = vec![0f32; c * c];
        let rows_per_task = TILE * 4;
        d2.par_chunks_mut(rows_per_task * c.max(1))
            .enumerate()
            .for_each(|(task, out)| {
                let r0 = task * rows_per_task;
                let rows = out.len() / c;
                for r in (0..rows).step_by(TILE) {
                    let (i0, n) = (r0 + r, TILE.min(rows - r));
                    let a: Vec<&[f32]> = (i0..i0 + n).map(|i| &y[i * d..(i + 1) * d]).collect();
                    let out = &mut out[r * c..(r + n) * c];
                    kernel.distances(&a, i0, &packed, d, c, &norm, out);
                }
            });
        mirror(&mut d2, c);
        PairDistances { c, d2 }
    }

    /// The squared distances of point `i` to every point.
    pub(crate) fn row(&self, i: usize) -> &[f32] {
        &self.d2[i * self.c..(i + 1) * self.c]
    }
}

/// Which instruction set computes the dot products (all give the same bits).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Scalar,
}

impl Kernel {
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::model::simd::has_avx512() {
                return Kernel::Avx512;
            }
            if crate::model::simd::has_avx2() {
                return Kernel::Avx2;
            }
        }
        Kernel::Scalar
    }

    /// `out[q·c + j]` = the squared distance of point i0 + q (row `a[q]`) to point j, for the
    /// ≤ 8 rows `a` against the panels from the one holding i0 on (earlier columns are left for
    /// [`mirror`]): (‖a‖² + ‖b‖²) − 2·a·b in f32, at least 0, and 0 on the diagonal.
    #[allow(clippy::too_many_arguments)]
    fn distances(
        self,
        a: &[&[f32]],
        i0: usize,
        packed: &[f32],
        d: usize,
        c: usize,
        norm: &[f32],
        out: &mut [f32],
    ) {
        for (p, panel) in packed.chunks_exact(d * PANEL).enumerate().skip(i0 / PANEL) {
            let mut tile = [[0f32; PANEL]; TILE];
            match self {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has AVX-512 F (Kernel::best); `panel` holds d·16 values and
                // every row of `a` d values, the bounds the kernel reads.
                Kernel::Avx512 => unsafe { tile_avx512(a, panel, d, &mut tile) },
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 => {
                    for (h, a4) in a.chunks(4).enumerate() {
                        let t4: &mut [[f32; PANEL]] = &mut tile[h * 4..h * 4 + a4.len()];
                        // SAFETY: the CPU has AVX2 and FMA (Kernel::best); bounds as above.
                        unsafe { tile_avx2(a4, panel, d, t4) };
                    }
                }
                Kernel::Scalar => tile_scalar(a, panel, d, &mut tile),
            }
            let (j0, w) = (p * PANEL, PANEL.min(c - p * PANEL));
            for (q, t) in tile.iter().take(a.len()).enumerate() {
                let i = i0 + q;
                let row = &mut out[q * c + j0..q * c + j0 + w];
                for (l, (o, &g)) in row.iter_mut().zip(t).enumerate() {
                    let j = j0 + l;
                    *o = if i == j {
                        0.0
                    } else {
                        ((norm[i] + norm[j]) - 2.0 * g).max(0.0)
                    };
                }
            }
        }
    }
}

/// Fills each row's columns before its diagonal panel (which [`Kernel::distances`] left) from
/// the rows above, in blocks of 16 rows × 64 columns so both sides are read a cache line at a
/// time.
fn mirror(d2: &mut [f32], c: usize) {
    /// The table, shared by the tasks of one pass.
    struct Table(*mut f32);
    // SAFETY: the tasks below write disjoint cells (each its own rows, columns left of their
    // diagonal panel) and read only cells right of their rows' diagonal panels, which no task
    // writes.
    unsafe impl Sync for Table {}
    let table = Table(d2.as_mut_ptr());
    let table = &table;
    (0..c.div_ceil(PANEL)).into_par_iter().for_each(|b| {
        let i0 = b * PANEL;
        let rows = PANEL.min(c - i0);
        for j0 in (0..i0).step_by(64) {
            let j1 = (j0 + 64).min(i0);
            for j in j0..j1 {
                for q in 0..rows {
                    let i = i0 + q;
                    // SAFETY: i, j < c. Cell (j, i) lies right of row j's diagonal panel
                    // (i ≥ i0 > j), computed by the kernel and written by no task here; cell
                    // (i, j) lies left of row i's diagonal panel (j < i0) and only this task
                    // (rows i0..i0 + 16) writes it.
                    unsafe { *table.0.add(i * c + j) = *table.0.add(j * c + i) };
                }
            }
        }
    });
}

/// The tile in plain code: one FMA chain per pair, t = 0..d.
fn tile_scalar(a: &[&[f32]], panel: &[f32], d: usize, tile: &mut [[f32; PANEL]; TILE]) {
    for (q, row) in a.iter().enumerate() {
        for lane in 0..PANEL {
            let mut acc = 0f32;
            for t in 0..d {
                acc = row[t].mul_add(panel[t * PANEL + lane], acc);
            }
            tile[q][lane] = acc;
        }
    }
}

/// The tile on AVX-512: a register of 16 accumulators per row, the panel's row t broadcast
/// against each row's coordinate t.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512(a: &[&[f32]], panel: &[f32], d: usize, tile: &mut [[f32; PANEL]; TILE]) {
    use std::arch::x86_64::*;
    let n = a.len();
    let mut acc = [_mm512_setzero_ps(); TILE];
    let zero = [0f32; 1];
    // Missing rows read a zero (their results are not used).
    let ptr: [*const f32; TILE] =
        std::array::from_fn(|q| if q < n { a[q].as_ptr() } else { zero.as_ptr() });
    let step: [usize; TILE] = std::array::from_fn(|q| usize::from(q < n));
    for t in 0..d {
        // SAFETY: t < d, and the panel holds d rows of 16; rows of `a` hold d values (a
        // missing row reads index 0 of `zero` every time, its step being 0).
        unsafe {
            let b = _mm512_loadu_ps(panel.as_ptr().add(t * PANEL));
            for q in 0..TILE {
                let x = _mm512_set1_ps(*ptr[q].add(t * step[q]));
                acc[q] = _mm512_fmadd_ps(x, b, acc[q]);
            }
        }
    }
    for q in 0..TILE {
        // SAFETY: tile[q] holds 16 f32.
        unsafe { _mm512_storeu_ps(tile[q].as_mut_ptr(), acc[q]) };
    }
}

/// The tile on AVX2 for ≤ 4 rows: two 8-lane accumulators per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(a: &[&[f32]], panel: &[f32], d: usize, tile: &mut [[f32; PANEL]]) {
    use std::arch::x86_64::*;
    const R: usize = 4;
    let n = a.len();
    let mut lo = [_mm256_setzero_ps(); R];
    let mut hi = [_mm256_setzero_ps(); R];
    let zero = [0f32; 1];
    let ptr: [*const f32; R] =
        std::array::from_fn(|q| if q < n { a[q].as_ptr() } else { zero.as_ptr() });
    let step: [usize; R] = std::array::from_fn(|q| usize::from(q < n));
    for t in 0..d {
        // SAFETY: as in tile_avx512, 8 lanes at a time.
        unsafe {
            let b0 = _mm256_loadu_ps(panel.as_ptr().add(t * PANEL));
            let b1 = _mm256_loadu_ps(panel.as_ptr().add(t * PANEL + 8));
            for q in 0..R {
                let x = _mm256_set1_ps(*ptr[q].add(t * step[q]));
                lo[q] = _mm256_fmadd_ps(x, b0, lo[q]);
                hi[q] = _mm256_fmadd_ps(x, b1, hi[q]);
            }
        }
    }
    for q in 0..n {
        // SAFETY: tile[q] holds 16 f32.
        unsafe {
            _mm256_storeu_ps(tile[q].as_mut_ptr(), lo[q]);
            _mm256_storeu_ps(tile[q].as_mut_ptr().add(8), hi[q]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn points(c: usize, d: usize, seed: u64, offset: f32) -> Vec<f32> {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        (0..c * d)
            .map(|_| offset + r.gen_range(-1.0f32..1.0))
            .collect()
    }

    #[test]
    fn every_kernel_gives_the_same_bits() {
        let mut kernels = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::model::simd::has_avx2() {
                kernels.push(Kernel::Avx2);
            }
            if crate::model::simd::has_avx512() {
                kernels.push(Kernel::Avx512);
            }
        }
        for (c, d) in [
            (1, 1),
            (7, 3),
            (8, 16),
            (9, 17),
            (15, 64),
            (16, 5),
            (17, 33),
            (41, 257),
        ] {
            for seed in 0..3 {
                let x = points(c, d, seed, 0.0);
                let m = MatRef::new(&x, c, d).unwrap();
                let want = PairDistances::with_kernel(m, Kernel::Scalar);
                for &k in &kernels {
                    let got = PairDistances::with_kernel(m, k);
                    for (i, (a, b)) in got.d2.iter().zip(&want.d2).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{k:?}, c {c}, d {d}, seed {seed}: pair ({}, {}): {a} vs plain {b}",
                            i / c,
                            i % c
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn table_matches_f64_distances() {
        // An offset far from 0: the centring keeps the cancellation small.
        for (c, d, offset) in [
            (1, 4, 0.0f32),
            (23, 7, 0.0),
            (40, 256, 0.0),
            (37, 64, 100.0),
        ] {
            for seed in 0..3 {
                let x = points(c, d, seed + 10, offset);
                let table = PairDistances::new(MatRef::new(&x, c, d).unwrap());
                for i in 0..c {
                    for j in 0..c {
                        let want: f64 = (0..d)
                            .map(|t| (x[i * d + t] as f64 - x[j * d + t] as f64).powi(2))
                            .sum();
                        let got = table.row(i)[j] as f64;
                        assert_eq!(
                            table.row(i)[j].to_bits(),
                            table.row(j)[i].to_bits(),
                            "c {c}, d {d}: pair ({i}, {j}) differs from ({j}, {i})"
                        );
                        // f32 rounding of norms of the centred points (each about d/3).
                        let tol = 1e-5 * (d as f64) + 1e-6 * want;
                        assert!(
                            (got - want).abs() <= tol,
                            "c {c}, d {d}, offset {offset}, seed {seed}: pair ({i}, {j}): \
                             table {got}, f64 {want}, tolerance {tol}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn budget() {
        let vector = Kernel::best() != Kernel::Scalar;
        assert_eq!(PairDistances::worth_building(11_585), vector);
        assert!(!PairDistances::worth_building(11_586));
        assert!(!PairDistances::worth_building(usize::MAX));
    }
}
