// grad.cu — the quantizer's backward pass on the device (SPEC §2, §3), bit-identical to
// src/quantizer/grad.rs. Rows are N×D f32 row-major: g the output gradient, x the input, q the
// quantized rows; gx the input gradient.
//
// The commitment term, on kept rows (use_mask == 0, or mask[row] != 0) when coef != 0:
//   gx ← (float)((double)gx + coef·((double)x − (double)q)), coef = β·scale computed by the host
//   in f64 (grad.rs: `beta * scale * (a - b)` associates as (β·scale)·(a − b)).
//
// grad_st_f32 — straight-through: gx = g, then the commitment term. 1-D grid-stride over the
//   N·D elements, block = 256, grid = min(ceil(N·D / 256), 32 × the SM count).
//
// grad_rotation_f32 — the rotation trick's backward (grad.rs rotate_gradient): with
//   u = x/‖x‖, q̂ = q/‖q‖, w = (u + q̂)/‖u + q̂‖, λ = ‖q‖/‖x‖ (all f64, norms and dot products
//   sequential in increasing d from −0.0 as Rust's f64 sum does),
//   gx_i = (float)(λ·((g_i − (2w_i)·(w·g)) + (2u_i)·(q̂·g))), straight-through where the rotation
//   is undefined (‖x‖ = 0, ‖q‖ = 0, or ‖u + q̂‖ not a normal double); then the commitment term.
//   One thread per row (the sums' order is what makes it bit-identical), u, q̂ and w recomputed
//   per element rather than stored (the same operations give the same bits). Grid-stride over
//   rows, block = ROW_THREADS, grid = min(ceil(N / ROW_THREADS), 32 × the SM count).
//
// grad_diff_f32 — the codebook gradient's rows: diff[j] = q[rows[j]] − x[rows[j]] (f32
//   subtraction) for the m kept rows; the launcher then runs ema_sums_sorted_f32 over diff
//   (grad.rs uses the same deterministic scatter-add) and scale_f32. A row id ≥ N is skipped
//   (diff row left as it was), so no launch reads outside x and q. Grid-stride over m·D.
//
// grad_normalize_f32 — the gradient through x̂ = x/‖x‖ (grad.rs normalize_backward), in place
//   on gx: inv = 1/‖x_r‖ (inv_norm_f64, 0 for a zero row), s = Σ_i x_i·gx_i (f64, sequential in
//   increasing i from 0), t = (s·inv)·inv, gx_i = (float)((gx_i − x_i·t)·inv). One thread per
//   row, grid-stride over rows, block = ROW_THREADS, grid = min(ceil(N / ROW_THREADS), 32 × SMs).
//
// scale_f32 — v ← (float)((double)v · scale) in place, scale =
//   2/(kept·D). Grid-stride over len.
//
// Limits: N·D < 2^63, D < 2^31.

#include "sums.cuh"
#include "tiles.cuh"
#include "grid.cuh"


// grad.rs's commitment term on one element.
__device__ __forceinline__ float commit(float o, float a, float b, double coef)
{
    return (float)__dadd_rn((double)o, __dmul_rn(coef, __dsub_rn((double)a, (double)b)));
}

// The parameters of both x-gradient kernels (the launcher passes one argument list to either).
#define GRAD_X_PARAMS                                                                      \
    const float* __restrict__ g, const float* __restrict__ x, const float* __restrict__ q, \
        const unsigned int* __restrict__ mask, int use_mask, double coef, long long n,     \
        long long d, float* __restrict__ gx

extern "C" __global__ void grad_st_f32(GRAD_X_PARAMS)
{
    const long long total = n * d;
    GRID_STRIDE_LOOP(e, total) {
        float o = g[e];
        if (coef != 0.0 && (!use_mask || mask[e / d] != 0u)) o = commit(o, x[e], q[e], coef);
        gx[e] = o;
    }
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS)
grad_rotation_f32(GRAD_X_PARAMS)
{
    GRID_STRIDE_LOOP(r, n) {
        const float* xr = x + r * d;
        const float* qr = q + r * d;
        const float* gr = g + r * d;
        float* out = gx + r * d;
        double sx = -0.0, sq = -0.0;
        for (long long i = 0; i < d; ++i) {
            const double a = (double)xr[i], b = (double)qr[i];
            sx = __dadd_rn(sx, __dmul_rn(a, a));
            sq = __dadd_rn(sq, __dmul_rn(b, b));
        }
        const double nx = sqrt(sx), nq = sqrt(sq);
        bool rotate = nx != 0.0 && nq != 0.0;
        double nw = 0.0;
        if (rotate) {
            double sw = -0.0;
            for (long long i = 0; i < d; ++i) {
                const double w = __dadd_rn((double)xr[i] / nx, (double)qr[i] / nq);
                sw = __dadd_rn(sw, __dmul_rn(w, w));
            }
            nw = sqrt(sw);
            // f64::is_normal: neither zero, subnormal, infinite nor NaN (nw ≥ 0 or NaN).
            rotate = nw >= 2.2250738585072014e-308 && nw <= 1.7976931348623157e308;
        }
        if (rotate) {
            double wg = -0.0, qg = -0.0;
            for (long long i = 0; i < d; ++i) {
                const double u = (double)xr[i] / nx, qh = (double)qr[i] / nq;
                const double w = __dadd_rn(u, qh) / nw;
                const double gi = (double)gr[i];
                wg = __dadd_rn(wg, __dmul_rn(w, gi));
                qg = __dadd_rn(qg, __dmul_rn(qh, gi));
            }
            const double lambda = nq / nx;
            for (long long i = 0; i < d; ++i) {
                const double u = (double)xr[i] / nx, qh = (double)qr[i] / nq;
                const double w = __dadd_rn(u, qh) / nw;
                const double t = __dadd_rn(__dsub_rn((double)gr[i], __dmul_rn(__dmul_rn(2.0, w), wg)),
                                           __dmul_rn(__dmul_rn(2.0, u), qg));
                out[i] = (float)__dmul_rn(lambda, t);
            }
        } else {
            for (long long i = 0; i < d; ++i) out[i] = gr[i];
        }
        if (coef != 0.0 && (!use_mask || mask[r] != 0u)) {
            for (long long i = 0; i < d; ++i) out[i] = commit(out[i], xr[i], qr[i], coef);
        }
    }
}

extern "C" __global__ void grad_diff_f32(const float* __restrict__ q,
                                         const float* __restrict__ x,
                                         const unsigned int* __restrict__ rows,
                                         long long m,
                                         long long n,
                                         long long d,
                                         float* __restrict__ diff)
{
    const long long total = m * d;
    GRID_STRIDE_LOOP(e, total) {
        const long long j = e / d;
        const long long r = rows[j];
        if (r >= n) continue;
        const long long src = r * d + (e - j * d);
        diff[e] = __fsub_rn(q[src], x[src]);
    }
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS)
grad_normalize_f32(const float* __restrict__ x, long long n, long long d, float* __restrict__ gx)
{
    GRID_STRIDE_LOOP(r, n) {
        const float* xr = x + r * d;
        float* o = gx + r * d;
        const double inv = inv_norm_f64(xr, d);
        double s = 0.0;
        for (long long i = 0; i < d; ++i) s = __dadd_rn(s, __dmul_rn((double)xr[i], (double)o[i]));
        const double t = __dmul_rn(__dmul_rn(s, inv), inv);
        for (long long i = 0; i < d; ++i)
            o[i] = (float)__dmul_rn(__dsub_rn((double)o[i], __dmul_rn((double)xr[i], t)), inv);
    }
}

extern "C" __global__ void scale_f32(float* __restrict__ v, long long len, double scale)
{
    GRID_STRIDE_LOOP(i, len) {
        v[i] = (float)__dmul_rn((double)v[i], scale);
    }
}
