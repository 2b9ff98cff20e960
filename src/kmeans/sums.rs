//! Per-code sums of a shard's rows, kept exactly and updated by the rows that changed code.
//!
//! Every value is held as an integer multiple of one power of two, 2^lsb, chosen from the
//! shard's largest magnitude so that any sum of its rows fits an i128 (2^lsb is 2^-85 of the
//! largest value or less for up to 2^40 rows; each value is rounded to the nearest multiple
//! of 2^lsb, far below the f64 rounding the sums then get). Integer sums do not depend on the order the rows are added in, so a
//! pass only adds the rows that moved into a code and takes away those that moved out, and
//! still has, bit for bit, the sums a full pass over the rows gives (the first pass's, a
//! resumed fit's, the plain and the bounded fit's). Late in a fit few rows move, and the pass
//! then costs O(moved · D) instead of O(N · D).
//!
//! The sums leave as f64 (each integer rounded once, then scaled by 2^lsb exactly), which is
//! what the ranks add up and what the means and the error are computed from.

use crate::matrix::MatRef;
use rayon::prelude::*;

/// Columns per parallel task of an update (each task adds its stripe of every moved row).
const STRIPE: usize = 32;

pub(crate) struct ExactSums {
    d: usize,
    /// The sums are multiples of 2^lsb.
    lsb: i32,
    k: usize,
    /// K × D sums in units of 2^lsb, stripe-major: the columns in stripes of [`STRIPE`], each
    /// stripe K × (its width) row-major, so an update's tasks own contiguous memory.
    sums: Vec<i128>,
}

impl ExactSums {
    /// All-zero sums for `k` codes, scaled for the rows of `x` (any assignment of them),
    /// whose largest |value| is `max_abs`.
    pub(crate) fn new(x: MatRef<'_>, max_abs: f32, k: usize) -> Self {
        let n = x.rows().max(1) as f64;
        let max = max_abs as f64;
        // 2^e > max, so a sum of n rows stays below n·2^e ≤ 2^(e + log2 n) < 2^126.
        let e = if max > 0.0 {
            max.log2().floor() as i32 + 1
        } else {
            0
        };
        let headroom = n.log2().ceil() as i32 + 1;
        ExactSums {
            d: x.cols(),
            lsb: e + headroom - 126,
            k,
            sums: vec![0; k * x.cols()],
        }
    }

    /// Brings the sums from the assignment `before` (None: no rows yet) to `after`, for the
    /// rows of `x`.
    pub(crate) fn update(&mut self, x: MatRef<'_>, before: Option<&[u32]>, after: &[u32]) {
        let moved: Vec<(u32, u32, u32)> = match before {
            None => (0..after.len() as u32)
                .map(|i| (i, u32::MAX, after[i as usize]))
                .collect(),
            Some(b) => (0..after.len() as u32)
                .filter(|&i| b[i as usize] != after[i as usize])
                .map(|i| (i, b[i as usize], after[i as usize]))
                .collect(),
        };
        if moved.is_empty() {
            return;
        }
        let (d, k, lsb) = (self.d, self.k, self.lsb);
        // Each task owns a run of consecutive stripes and reads that run of every moved row:
        // one task per stripe read each row 32 columns at a time, 1 KB apart at D = 256, and
        // waited on memory (a fit's first pass adds every row: 0.12 s at 117,659 × 256).
        let stripes = d.div_ceil(STRIPE).max(1);
        let per = stripes.div_ceil(rayon::current_num_threads()).max(1);
        self.sums
            .par_chunks_mut((k * STRIPE * per).max(1))
            .enumerate()
            .for_each(|(p, run)| {
                let s0 = p * per;
                let c_end = ((s0 + per) * STRIPE).min(d);
                for (m, &(i, from, to)) in moved.iter().enumerate() {
                    if let Some(&(ahead, _, _)) = moved.get(m + PREFETCH_AHEAD) {
                        super::prefetch(&x.row(ahead as usize)[s0 * STRIPE..c_end]);
                    }
                    let whole = x.row(i as usize);
                    // A stripe's sums are K × its width; only the last stripe is narrower.
                    for (c0, part) in (s0 * STRIPE..c_end)
                        .step_by(STRIPE)
                        .zip(run.chunks_mut(k * STRIPE))
                    {
                        let row = &whole[c0..(c0 + STRIPE).min(d)];
                        let w = row.len();
                        let t = to as usize * w;
                        if from == u32::MAX {
                            for (a, &v) in part[t..t + w].iter_mut().zip(row) {
                                *a += fixed(v, lsb);
                            }
                        } else {
                            // Each value converted once, taken from one code and added to the
                            // other.
                            let f = from as usize * w;
                            for (c, &v) in row.iter().enumerate() {
                                let q = fixed(v, lsb);
                                part[f + c] -= q;
                                part[t + c] += q;
                            }
                        }
                    }
                }
            });
    }

    /// The sums in f64 (K × D): each rounded once to f64, then scaled by 2^lsb (exact).
    pub(crate) fn to_f64(&self) -> Vec<f64> {
        let (d, k, scale) = (self.d, self.k, pow2(self.lsb));
        let mut out = vec![0f64; k * d];
        out.par_chunks_mut(d.max(1))
            .enumerate()
            .with_min_len(16)
            .for_each(|(j, row)| {
                // Stripe s (columns s·STRIPE.., width w) holds code j's values at k·s·STRIPE + j·w.
                for (s, cols) in row.chunks_mut(STRIPE).enumerate() {
                    let w = cols.len();
                    let at = k * s * STRIPE + j * w;
                    for (o, &v) in cols.iter_mut().zip(&self.sums[at..at + w]) {
                        *o = (v as f64) * scale;
                    }
                }
            });
        out
    }
}

/// Moved rows read ahead of the one being added: the moved rows of a late pass are sparse,
/// so the hardware prefetchers do not see them coming.
const PREFETCH_AHEAD: usize = 8;

/// `v` in units of 2^lsb, rounded to the nearest (ties away from zero).
#[inline(always)]
fn fixed(v: f32, lsb: i32) -> i128 {
    let bits = v.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32;
    let frac = (bits & 0x7f_ffff) as i128;
    // v = mant · 2^(e2): normal numbers carry the implicit bit; subnormals have exponent −149.
    let (mant, e2) = if exp == 0 {
        (frac, -149)
    } else {
        (frac | 0x80_0000, exp - 150)
    };
    let shift = e2 - lsb;
    let mag = if shift >= 0 {
        mant << shift
    } else if shift > -64 {
        (mant + (1 << (-shift - 1))) >> -shift
    } else {
        0
    };
    if bits >> 31 == 1 { -mag } else { mag }
}

/// 2^e as an f64 (e within the normal range, which any lsb of f32 data is: −149 − 126 < e).
fn pow2(e: i32) -> f64 {
    if e >= -1022 {
        f64::from_bits(((e + 1023) as u64) << 52)
    } else {
        f64::from_bits(1u64 << (e + 1074))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_point_is_exact_for_representable_values() {
        for (v, lsb, want) in [
            (1.0f32, 0, 1i128),
            (1.0, -3, 8),
            (-2.5, -1, -5),
            (0.75, 0, 1),  // 0.75 rounds to 1
            (0.25, 0, 0),  // 0.25 rounds to 0
            (-0.5, 0, -1), // ties away from zero
            (f32::from_bits(1), -149, 1),
            (0.0, -10, 0),
        ] {
            assert_eq!(fixed(v, lsb), want, "{v} at 2^{lsb}");
        }
        assert_eq!(pow2(-3), 0.125);
        assert_eq!(pow2(-1074), f64::from_bits(1));
    }

    /// Updating by the moved rows gives the bits of a fresh full sum, and the sums equal the
    /// naive f64 ones to within the f64 rounding of the latter.
    #[test]
    fn updates_equal_a_fresh_sum() {
        // Widths of one partial stripe, of several stripes per task and of an odd last one,
        // on pools whose size sets how many stripes a task owns (the same bits on each).
        for d in [7, 37, 200] {
            let mut first: Option<Vec<i128>> = None;
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let sums = pool.install(|| updates_equal_a_fresh_sum_at(d));
                let want = first.get_or_insert_with(|| sums.clone());
                assert!(*want == sums, "D = {d}: {threads} threads changed the sums");
            }
        }
    }

    fn updates_equal_a_fresh_sum_at(d: usize) -> Vec<i128> {
        let (n, k) = (300, 5);
        let mut state = 12345u64;
        let mut rnd = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as f64 / (1u64 << 31) as f64
        };
        let data: Vec<f32> = (0..n * d)
            .map(|_| ((rnd() - 0.5) * 10f64.powi((rnd() * 8.0) as i32 - 4)) as f32)
            .collect();
        let x = MatRef::new(&data, n, d).unwrap();
        let a: Vec<u32> = (0..n).map(|_| (rnd() * k as f64) as u32).collect();
        let mut b = a.clone();
        for i in (0..n).step_by(7) {
            b[i] = (b[i] + 1) % k as u32;
        }
        let mut inc = ExactSums::new(x, x.max_abs("x").unwrap(), k);
        inc.update(x, None, &a);
        inc.update(x, Some(&a), &b);
        let mut fresh = ExactSums::new(x, x.max_abs("x").unwrap(), k);
        fresh.update(x, None, &b);
        assert_eq!(inc.sums, fresh.sums);
        let got = inc.to_f64();
        for j in 0..k {
            for c in 0..d {
                let naive: f64 = (0..n)
                    .filter(|&i| b[i] as usize == j)
                    .map(|i| data[i * d + c] as f64)
                    .sum();
                let g = got[j * d + c];
                assert!(
                    (g - naive).abs() <= 1e-12 * naive.abs().max(1e-3),
                    "code {j} column {c}: {g} vs {naive}"
                );
            }
        }
        inc.sums
    }
}
