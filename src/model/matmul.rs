//! The one place model layers multiply matrices. Today: the CPU through the `gemm` crate
//! (packed AVX2/AVX-512 microkernels). A cuBLAS path would be added here, behind the same
//! function, without touching the layers.

use crate::matrix::MatRef;

/// Products at least this large (m·n·k multiply-adds) use rayon threads; smaller ones stay on
/// the calling thread, where spawning costs more than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// `out (m×n, row-major) = [out +] op(a) · op(b)`, where `op(a)` is `a` or its transpose
/// (`ta`), likewise for `b`. With `accumulate` the product is added to `out`, otherwise `out`
/// is overwritten.
///
/// The result does not depend on the thread count: `gemm` splits the output into blocks and
/// never the inner (k) dimension, so each sum runs in the same order on one or many threads.
///
/// ```
/// use vqx::MatRef;
/// use vqx::model::matmul::matmul;
/// let a = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // 2×3
/// let b = [1.0f32, 0.0, 1.0, 0.0, 1.0, 1.0]; // 2×3, used transposed: 3×2
/// let mut out = [0.0f32; 4];
/// matmul(&mut out, MatRef::new(&a, 2, 3)?, false, MatRef::new(&b, 2, 3)?, true, false);
/// assert_eq!(out, [4.0, 5.0, 10.0, 11.0]);
/// # Ok::<(), vqx::Error>(())
/// ```
///
/// Panics when the shapes do not chain or `out` is not m×n: callers (the layers) own both
/// shapes, so a mismatch is a bug in vqx, never bad user input.
pub fn matmul(out: &mut [f32], a: MatRef<'_>, ta: bool, b: MatRef<'_>, tb: bool, accumulate: bool) {
    let (m, k) = if ta {
        (a.cols(), a.rows())
    } else {
        (a.rows(), a.cols())
    };
    let (kb, n) = if tb {
        (b.cols(), b.rows())
    } else {
        (b.rows(), b.cols())
    };
    assert_eq!(k, kb, "matmul: inner dimensions differ");
    assert_eq!(out.len(), m * n, "matmul: output is not m×n");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    // Strides (column, row) of op(a) and op(b) over row-major storage: element (i, j) of a
    // stored r×c matrix sits at i·c + j; its transpose swaps the two strides.
    let (a_cs, a_rs) = if ta {
        (a.cols() as isize, 1)
    } else {
        (1, a.cols() as isize)
    };
    let (b_cs, b_rs) = if tb {
        (b.cols() as isize, 1)
    } else {
        (1, b.cols() as isize)
    };
    let parallelism = if m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN_WORK {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `out` holds m·n values (checked above) addressed with strides (1, n); op(a) is
    // m×k over `a`'s rows·cols = m·k values with the strides computed for its layout, op(b)
    // k×n likewise; the three buffers do not overlap (`out` is a unique borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data().as_ptr(),
            a_cs,
            a_rs,
            b.data().as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|t| a[i * k + t] * b[t * n + j]).sum();
            }
        }
        out
    }

    fn transpose(a: &[f32], r: usize, c: usize) -> Vec<f32> {
        (0..c * r).map(|t| a[(t % r) * c + t / r]).collect()
    }

    #[test]
    fn every_transpose_combination_matches_the_naive_product() {
        let (m, k, n) = (7, 5, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.5).collect();
        let want = naive(&a, m, k, &b, n);
        let at = transpose(&a, m, k);
        let bt = transpose(&b, k, n);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let am = if ta {
                MatRef::new(&at, k, m).unwrap()
            } else {
                MatRef::new(&a, m, k).unwrap()
            };
            let bm = if tb {
                MatRef::new(&bt, n, k).unwrap()
            } else {
                MatRef::new(&b, k, n).unwrap()
            };
            let mut out = vec![1.0f32; m * n];
            matmul(&mut out, am, ta, bm, tb, false);
            assert_eq!(out, want, "ta {ta} tb {tb}");
            matmul(&mut out, am, ta, bm, tb, true);
            let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
            assert_eq!(out, twice, "accumulate, ta {ta} tb {tb}");
        }
    }
}
