// mlp.cu — the element-wise and row-wise parts of the VQ-VAE's MLP layers (src/model/) on the
// device: everything of Mlp::forward / Mlp::backward but the matrix products (a GEMM's job).
// Bit-identical to the CPU code (same operations in the same order, no contraction into fma:
// every f32/f64 product and sum is an explicit __fmul_rn/__fadd_rn/__dmul_rn/__dadd_rn), tanh
// included: vqx_tanh repeats src/model/activation.rs's `tanh` operation for operation (no libm),
// so the activations agree bit for bit on a GPU too. Matrices are row-major f32.
//
// bias_rows_f32 — y[r][j] = bias[j] for the n × o output of a linear layer, before the GEMM
//   accumulates x·Wᵀ into it (Linear::forward). Grid-stride over n·o, block = GRID_STRIDE_THREADS.
//
// activation_forward_f32 — y[e] = f(x[e]) over len values (Activation::apply); act = ACT_GELU
//   (tanh form: t = tanh(S·(x + ((C·x)·x)·x)), (0.5·x)·(1 + t)) or ACT_RELU (x > 0 ? x : +0,
//   as Rust's x.max(0.0): −0 and NaN give +0). Grid-stride over len.
// activation_backward_f32 — dx[e] = dy[e]·f′(x[e]) (Activation::backward; GELU's f′ is
//   0.5·(1 + t) + ((0.5·x)·(1 − t·t))·(S·(1 + ((3·C)·x)·x)), ReLU's x > 0 ? 1 : 0). Grid-stride.
//   dx must not alias x or dy.
//
// column_sums_add_f32 — grad[j] = (float)((double)grad[j] + Σ_r (double)dy[r][j]), the sum from
//   +0.0 over rows in increasing order (Linear::backward's bias gradient; equally LayerNorm's
//   dβ). One thread per column (coalesced across a warp), grid-stride over the o columns.
//
// layer_norm_forward_f32 — per row of the n × d input (LayerNorm::forward): mean = Σ x / d,
//   var = Σ (x − mean)² / d (f64, sequential from −0.0 as Rust's f64 sum), inv = 1/√(var +
//   (double)1e-5f), x̂ = (float)((x − mean)·inv), y = γ·x̂ + β (f32), inv_std[r] = (float)inv.
//   One thread per row (the order of the sums is what makes it bit-identical), grid-stride over
//   rows, block = ROW_THREADS.
// layer_norm_backward_f32 — per row (LayerNorm::backward's dx): g = (double)dy·(double)γ,
//   mean_g = Σ g / d, mean_gh = Σ g·x̂ / d (f64 from +0.0, in order), dx = (float)(inv·((g −
//   mean_g) − x̂·mean_gh)) with inv = (double)inv_std[r]. One thread per row as above. dx must
//   not alias an input.
// layer_norm_param_grad_f32 — dγ[j] = (float)((double)dγ[j] + Σ_r (double)dy·(double)x̂) and
//   dβ[j] = (float)((double)dβ[j] + Σ_r (double)dy), f64 from +0.0 over rows in order, added to
//   the existing gradient as the CPU does. One thread per column, grid-stride over d.
//
// recon_loss_f32 — the VQ-VAE's reconstruction loss (VqVae::forward_backward): per element
//   t = (double)y − (double)x, dy = (float)(scale·t) (bit-identical), and stage 1 of Σ t² in
//   f64: the same fixed grid (REDUCE_BLOCKS × REDUCE_THREADS), per-thread grid-stride order and
//   block tree as loss.cu's sq_err_partial_f64, so partials[b] is exactly what that kernel
//   writes for (y, x); loss.cu's reduce_f64 is stage 2. The CPU sums in another order: within
//   ~(N·D)·2^-53 relative (all terms ≥ 0), checked at 1e-12. dy may not alias y or x.
//
// Limits: n·d < 2^63; the per-row kernels' rows are < 2^63 values wide.

#include "sums.cuh"
#include "tiles.cuh"
#include "grid.cuh"

#define ACT_GELU 0  // act argument of the activation kernels: GELU (tanh form)
#define ACT_RELU 1  // act argument of the activation kernels: ReLU

// Activation's constants: the f32 nearest to each decimal, as the Rust literals.
#define GELU_S 0.7978846f
#define GELU_C 0.044715f

// src/model/activation.rs's tanh: below |x| = 0.55 the odd Taylor series through x^17, above it
// 1 - 2/(e^{2|x|} + 1) with e^y = 2^n·e^r (n = round(y/ln2) by the 1.5·2^23 trick, r = y - n·ln2
// in two parts, e^r's Taylor polynomial through r^7, 2^n from n's bits). Both branches are
// evaluated, as in the vectorised CPU loop; the constants are the same f32 values.
static __device__ __forceinline__ float vqx_tanh(float x)
{
    if (x != x) return x;
    const float a = fabsf(x);
    const float s = __fmul_rn(a, a);
    float p = 0.0005900274f;
    p = __fadd_rn(__fmul_rn(p, s), -0.0014558344f);
    p = __fadd_rn(__fmul_rn(p, s), 0.003592128f);
    p = __fadd_rn(__fmul_rn(p, s), -0.008863236f);
    p = __fadd_rn(__fmul_rn(p, s), 0.021869488f);
    p = __fadd_rn(__fmul_rn(p, s), -0.053968254f);
    p = __fadd_rn(__fmul_rn(p, s), 0.13333334f);
    p = __fadd_rn(__fmul_rn(p, s), -0.33333334f);
    const float series = __fadd_rn(a, __fmul_rn(a, __fmul_rn(s, p)));
    const float y = fminf(__fadd_rn(a, a), 20.0f);
    const float k = __fadd_rn(__fmul_rn(y, 1.442695f), 12582912.0f);
    const float n = __fsub_rn(k, 12582912.0f);
    const float r = __fsub_rn(__fsub_rn(y, __fmul_rn(n, 0.693359375f)), __fmul_rn(n, -0.00021219444f));
    float e = 0.0001984127f;
    e = __fadd_rn(__fmul_rn(e, r), 0.0013888889f);
    e = __fadd_rn(__fmul_rn(e, r), 0.008333334f);
    e = __fadd_rn(__fmul_rn(e, r), 0.041666668f);
    e = __fadd_rn(__fmul_rn(e, r), 0.16666667f);
    e = __fadd_rn(__fmul_rn(e, r), 0.5f);
    e = __fadd_rn(__fmul_rn(e, r), 1.0f);
    e = __fadd_rn(__fmul_rn(e, r), 1.0f);
    const float two_n = __uint_as_float((__float_as_uint(k) + 127u) << 23);
    const float big = __fsub_rn(1.0f, __fdiv_rn(2.0f, __fadd_rn(__fmul_rn(e, two_n), 1.0f)));
    const float t = a < 0.55f ? series : big;
    return copysignf(t, x);
}

// Activation::apply for GELU.
static __device__ __forceinline__ float gelu(float x)
{
    const float inner = __fadd_rn(x, __fmul_rn(__fmul_rn(__fmul_rn(GELU_C, x), x), x));
    const float t = vqx_tanh(__fmul_rn(GELU_S, inner));
    return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.0f, t));
}

// Activation::derivative for GELU.
static __device__ __forceinline__ float gelu_derivative(float x)
{
    const float inner = __fadd_rn(x, __fmul_rn(__fmul_rn(__fmul_rn(GELU_C, x), x), x));
    const float t = vqx_tanh(__fmul_rn(GELU_S, inner));
    const float c3 = __fmul_rn(3.0f, GELU_C);
    const float du = __fmul_rn(GELU_S, __fadd_rn(1.0f, __fmul_rn(__fmul_rn(c3, x), x)));
    const float a = __fmul_rn(0.5f, __fadd_rn(1.0f, t));
    const float one_minus = __fsub_rn(1.0f, __fmul_rn(t, t));
    const float b = __fmul_rn(__fmul_rn(__fmul_rn(0.5f, x), one_minus), du);
    return __fadd_rn(a, b);
}

extern "C" __global__ void bias_rows_f32(const float* __restrict__ bias,
                                         long long n,
                                         long long o,
                                         float* __restrict__ y)
{
    const long long total = n * o;
    GRID_STRIDE_LOOP(e, total) {
        y[e] = bias[e % o];
    }
}

extern "C" __global__ void activation_forward_f32(const float* __restrict__ x,
                                                  long long len,
                                                  int act,
                                                  float* __restrict__ y)
{
    GRID_STRIDE_LOOP(e, len) {
        const float v = x[e];
        y[e] = act == ACT_RELU ? (v > 0.0f ? v : 0.0f) : gelu(v);
    }
}

extern "C" __global__ void activation_backward_f32(const float* __restrict__ x,
                                                   const float* __restrict__ dy,
                                                   long long len,
                                                   int act,
                                                   float* __restrict__ dx)
{
    GRID_STRIDE_LOOP(e, len) {
        const float v = x[e];
        const float f = act == ACT_RELU ? (v > 0.0f ? 1.0f : 0.0f) : gelu_derivative(v);
        dx[e] = __fmul_rn(dy[e], f);
    }
}

extern "C" __global__ void column_sums_add_f32(const float* __restrict__ dy,
                                               long long n,
                                               long long o,
                                               float* __restrict__ grad)
{
    GRID_STRIDE_LOOP(j, o) {
        double s = 0.0;
        for (long long r = 0; r < n; ++r) s = __dadd_rn(s, (double)dy[r * o + j]);
        grad[j] = (float)__dadd_rn((double)grad[j], s);
    }
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS)
layer_norm_forward_f32(const float* __restrict__ x,
                       const float* __restrict__ gamma,
                       const float* __restrict__ beta,
                       long long n,
                       long long d,
                       float* __restrict__ y,
                       float* __restrict__ normalized,
                       float* __restrict__ inv_std)
{
    const double dd = (double)d;
    GRID_STRIDE_LOOP(r, n) {
        const float* xr = x + r * d;
        double sum = -0.0;
        for (long long i = 0; i < d; ++i) sum = __dadd_rn(sum, (double)xr[i]);
        const double mean = __ddiv_rn(sum, dd);
        double sq = -0.0;
        for (long long i = 0; i < d; ++i) {
            const double t = __dsub_rn((double)xr[i], mean);
            sq = __dadd_rn(sq, __dmul_rn(t, t));
        }
        const double var = __ddiv_rn(sq, dd);
        const double inv = __ddiv_rn(1.0, __dsqrt_rn(__dadd_rn(var, (double)1e-5f)));
        float* yr = y + r * d;
        float* hr = normalized + r * d;
        for (long long i = 0; i < d; ++i) {
            const float h = (float)__dmul_rn(__dsub_rn((double)xr[i], mean), inv);
            hr[i] = h;
            yr[i] = __fadd_rn(__fmul_rn(gamma[i], h), beta[i]);
        }
        inv_std[r] = (float)inv;
    }
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS)
layer_norm_backward_f32(const float* __restrict__ dy,
                        const float* __restrict__ normalized,
                        const float* __restrict__ inv_std,
                        const float* __restrict__ gamma,
                        long long n,
                        long long d,
                        float* __restrict__ dx)
{
    const double dd = (double)d;
    GRID_STRIDE_LOOP(r, n) {
        const float* dyr = dy + r * d;
        const float* hr = normalized + r * d;
        double mean_g = 0.0, mean_gh = 0.0;
        for (long long i = 0; i < d; ++i) {
            const double g = __dmul_rn((double)dyr[i], (double)gamma[i]);
            mean_g = __dadd_rn(mean_g, g);
            mean_gh = __dadd_rn(mean_gh, __dmul_rn(g, (double)hr[i]));
        }
        mean_g = __ddiv_rn(mean_g, dd);
        mean_gh = __ddiv_rn(mean_gh, dd);
        const double inv = (double)inv_std[r];
        float* out = dx + r * d;
        // g is recomputed rather than stored (the same product gives the same bits).
        for (long long i = 0; i < d; ++i) {
            const double h = (double)hr[i];
            const double g = __dmul_rn((double)dyr[i], (double)gamma[i]);
            out[i] = (float)__dmul_rn(inv, __dsub_rn(__dsub_rn(g, mean_g), __dmul_rn(h, mean_gh)));
        }
    }
}

extern "C" __global__ void layer_norm_param_grad_f32(const float* __restrict__ dy,
                                                     const float* __restrict__ normalized,
                                                     long long n,
                                                     long long d,
                                                     float* __restrict__ grad_gamma,
                                                     float* __restrict__ grad_beta)
{
    GRID_STRIDE_LOOP(j, d) {
        double gw = 0.0, gb = 0.0;
        for (long long r = 0; r < n; ++r) {
            const double g = (double)dy[r * d + j];
            gw = __dadd_rn(gw, __dmul_rn(g, (double)normalized[r * d + j]));
            gb = __dadd_rn(gb, g);
        }
        grad_gamma[j] = (float)__dadd_rn((double)grad_gamma[j], gw);
        grad_beta[j] = (float)__dadd_rn((double)grad_beta[j], gb);
    }
}

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
recon_loss_f32(const float* __restrict__ y,
               const float* __restrict__ x,
               double scale,
               long long total,
               float* __restrict__ dy,
               double* __restrict__ partials)
{
    __shared__ double sh[REDUCE_THREADS];
    double acc = 0.0;
    GRID_STRIDE_LOOP(e, total) {
        const double t = __dsub_rn((double)y[e], (double)x[e]);
        acc = __dadd_rn(acc, __dmul_rn(t, t));
        dy[e] = (float)__dmul_rn(scale, t);
    }
    block_partial_f64(acc, sh, partials);
}
