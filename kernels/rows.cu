// rows.cu — per-row f64 norms of row-major f32 matrices, the device twins of vqx::nearest's
// `norm_sq_f64`, `normalize_rows` and the codebook preparation of `Prepared::new` (SPEC §1), and a
// scan that validates device-resident values.
//
// What it computes
//   row_norms_f32       norms[r] = (float) Σ_i m[r,i]² (f64, sequential in i, as the CPU twin), and
//                       *max_bits = max over rows of the bits of sqrt(that f64 sum): the largest
//                       row norm, whose f64 bit pattern orders like the value because it is ≥ 0.
//                       The caller zeroes *max_bits first.
//   normalize_rows_f32  dst[r,i] = (float)((double)src[r,i] · inv), inv = 1/||src_r|| in f64 (0 for a
//                       zero row): bit-identical to vqx::nearest::normalize_rows.
//   check_values_f32    *first_bad = the smallest flat index of a non-finite value (unchanged when
//                       none; the caller sets it to ~0), *max_abs_bits = the largest |v| of the
//                       finite values as f32 bits (the caller zeroes it).
//
// Launch shape (kernels/tiles.cuh; the launchers are in src/backend/cuda/launch.rs)
//   row_norms_f32, normalize_rows_f32: one thread per row, block = ROW_THREADS, grid-stride over
//   rows. A thread reads its row sequentially: the CPU's summation order, at the cost of
//   uncoalesced loads (these kernels touch a codebook, or each row of x once).
//   check_values_f32: grid-stride over the elements, block = GRID_STRIDE_THREADS.
//
// Limits: rows < 2^63, d < 2^31.

#include "sums.cuh"
#include "tiles.cuh"
#include "grid.cuh"

extern "C" __global__ void row_norms_f32(const float* __restrict__ m,
                                         float* __restrict__ norms,
                                         unsigned long long* __restrict__ max_bits,
                                         long long rows,
                                         int d)
{
    GRID_STRIDE_LOOP(r, rows) {
        const double s = sum_sq_f64(m + r * d, d);
        norms[r] = (float)s;
        atomicMax(max_bits, (unsigned long long)__double_as_longlong(sqrt(s)));
    }
}

extern "C" __global__ void normalize_rows_f32(const float* __restrict__ src,
                                              float* __restrict__ dst,
                                              long long rows,
                                              int d)
{
    GRID_STRIDE_LOOP(r, rows) {
        const float* v = src + r * d;
        const double inv = inv_norm_f64(v, d);
        float* o = dst + r * d;
        for (int i = 0; i < d; ++i) o[i] = (float)__dmul_rn((double)v[i], inv);
    }
}

extern "C" __global__ void check_values_f32(const float* __restrict__ v,
                                            long long len,
                                            unsigned long long* __restrict__ first_bad,
                                            unsigned int* __restrict__ max_abs_bits)
{
    unsigned int local_max = 0u;
    GRID_STRIDE_LOOP(e, len) {
        const unsigned int bits = __float_as_uint(v[e]) & 0x7fffffffu;
        if (bits >= 0x7f800000u) {
            atomicMin(first_bad, (unsigned long long)e);
        } else if (bits > local_max) {
            local_max = bits;
        }
    }
    // |v| of finite floats orders like its bits.
    if (local_max != 0u) atomicMax(max_abs_bits, local_max);
}
