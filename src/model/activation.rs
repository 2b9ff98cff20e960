//! Element-wise activations and their derivatives.
//!
//! GELU's tanh is [`tanh`] below, not the C library's: built from +, −, ×, ÷ and one bit
//! cast only, so the loops over slices vectorise (AVX-512 or AVX2 when the CPU has them,
//! chosen at run time) and kernels/mlp.cu repeats the very same f32 operations, which keeps the
//! emulated device bit-identical to the CPU (and a GPU with it). The vector width never
//! changes a result: every lane runs the scalar code's operations, with no fma contraction.

use super::simd::multiversion;
use crate::error::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// √(2/π), of GELU's tanh form.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// Values per rayon task of the slice functions (a GELU costs ~50 flops, so a block is a few
/// microseconds of work).
const PAR_BLOCK: usize = 1 << 14;

/// Below this |x|, tanh's odd Taylor series (through x¹⁷; the first omitted term is < 0.1 ulp
/// here); above, 1 − 2/(e^{2|x|} + 1), where 2/(e^{2|x|} + 1) < 0.5 so the subtraction loses
/// nothing.
const TANH_SERIES_MAX: f32 = 0.55;
/// Coefficients of x³, x⁵, …, x¹⁷ in tanh's series: −1/3, 2/15, −17/315, 62/2835,
/// −1382/155925, 21844/6081075, −929569/638512875, 6404582/10854718875.
const TANH_SERIES: [f32; 8] = [
    -0.333_333_34,
    0.133_333_34,
    -0.053_968_254,
    0.021_869_488,
    -0.008_863_236,
    0.003_592_128,
    -0.001_455_834_4,
    0.000_590_027_4,
];
/// 1/7!, 1/6!, …, 1/2!, 1, 1: e^r's Taylor coefficients from the highest power down.
const EXP_SERIES: [f32; 8] = [
    0.000_198_412_7,
    0.001_388_888_9,
    0.008_333_334,
    0.041_666_668,
    0.166_666_67,
    0.5,
    1.0,
    1.0,
];
/// 2|x| is clamped here: tanh(10) rounds to 1 in f32, and e^20 stays far from overflow.
const TANH_EXP_MAX: f32 = 20.0;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// 1.5·2²³: adding it rounds a value in [0, 2²²) to an integer (ties to even) held in the
/// low bits of the sum.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// ln 2 split: the high part has 9 significant bits, so n·LN2_HI is exact for n < 2¹⁵.
const LN2_HI: f32 = 355.0 / 512.0;
const LN2_LO: f32 = -2.121_944_4e-4;

/// tanh(x) in f32, within 2 ulp of the exact value (checked against f64 over a dense sweep in
/// the tests), odd, ±1 beyond |x| ≈ 9, NaN for NaN. Written so that each arithmetic operation
/// is one IEEE f32 operation, which kernels/mlp.cu's `vqx_tanh` repeats one for one.
///
/// ```
/// use vqx::model::tanh;
/// assert_eq!(tanh(0.0), 0.0);
/// assert_eq!(tanh(-30.0), -1.0);
/// assert!((tanh(0.5) - 0.5f64.tanh() as f32).abs() <= 2.0 * f32::EPSILON);
/// ```
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    // Near 0: a + a·s·(c₃ + s·(c₅ + … + s·c₁₇)), s = a².
    let s = a * a;
    let c = &TANH_SERIES;
    let mut p = c[7];
    for &ci in c[..7].iter().rev() {
        p = p * s + ci;
    }
    let series = a + a * (s * p);
    // Elsewhere: e^y, y = 2a, as 2ⁿ·e^r with n = round(y/ln 2) and |r| ≤ ln2/2, e^r by its
    // Taylor polynomial through r⁷ (remainder < 0.1 ulp), 2ⁿ built from n's bits.
    let y = (a + a).min(TANH_EXP_MAX);
    let k = y * LOG2_E + ROUND_MAGIC;
    let n = k - ROUND_MAGIC;
    let r = (y - n * LN2_HI) - n * LN2_LO;
    let mut e = EXP_SERIES[0];
    for &ci in &EXP_SERIES[1..] {
        e = e * r + ci;
    }
    // n sits in the low bits of k's pattern (k = 1.5·2²³ + n); its exponent field is n + 127.
    let two_n = f32::from_bits(k.to_bits().wrapping_add(127) << 23);
    let big = 1.0 - 2.0 / (e * two_n + 1.0);
    let t = if a < TANH_SERIES_MAX { series } else { big };
    if x.is_nan() { x } else { t.copysign(x) }
}

/// GELU (tanh form): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), in kernels/mlp.cu's order.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let t = tanh(SQRT_2_OVER_PI * (x + GELU_C * x * x * x));
    0.5 * x * (1.0 + t)
}

/// GELU′(x) = 0.5·(1 + t) + 0.5·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²).
#[inline(always)]
fn gelu_derivative(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
    let t = tanh(u);
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x);
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
}

#[inline(always)]
fn relu_derivative(x: f32) -> f32 {
    if x > 0.0 { 1.0 } else { 0.0 }
}

multiversion! {
    /// y = GELU(x), value by value.
    fn gelu_slice(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = gelu(v);
        }
    }
}

multiversion! {
    /// g ← g·GELU′(x).
    fn gelu_backward_slice(x: &[f32], g: &mut [f32]) {
        for (d, &v) in g.iter_mut().zip(x) {
            *d *= gelu_derivative(v);
        }
    }
}

multiversion! {
    /// y = max(x, 0).
    fn relu_slice(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = v.max(0.0);
        }
    }
}

multiversion! {
    /// g ← g·ReLU′(x).
    fn relu_backward_slice(x: &[f32], g: &mut [f32]) {
        for (d, &v) in g.iter_mut().zip(x) {
            *d *= relu_derivative(v);
        }
    }
}

/// The non-linearity between hidden layers.
///
/// ```
/// use vqx::model::Activation;
/// assert_eq!(Activation::Relu.apply(-1.0), 0.0);
/// assert!((Activation::Gelu.apply(1.0) - 0.8412).abs() < 1e-3);
/// assert_eq!("gelu".parse::<Activation>()?, Activation::Gelu);
/// # Ok::<(), vqx::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// GELU in its tanh form, 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) (GPT-2, ESM3's
    /// `nn.GELU(approximate="tanh")` setting; std has no erf for the exact form).
    #[default]
    Gelu,
    /// max(x, 0).
    Relu,
}

impl Activation {
    /// f(x).
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Relu => x.max(0.0),
            Activation::Gelu => gelu(x),
        }
    }

    /// f′(x).
    pub fn derivative(self, x: f32) -> f32 {
        match self {
            Activation::Relu => relu_derivative(x),
            Activation::Gelu => gelu_derivative(x),
        }
    }

    /// f applied to every value.
    pub fn forward(self, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0; x.len()];
        self.forward_into(x, &mut y);
        y
    }

    /// y = f(x) value by value, into a buffer of the same length (vectorised).
    ///
    /// ```
    /// use vqx::model::Activation;
    /// let mut y = [0.0f32; 2];
    /// Activation::Relu.forward_into(&[-1.0, 2.0], &mut y);
    /// assert_eq!(y, [0.0, 2.0]);
    /// ```
    ///
    /// Panics when the lengths differ (the callers own both buffers).
    pub fn forward_into(self, x: &[f32], y: &mut [f32]) {
        assert_eq!(
            x.len(),
            y.len(),
            "activation: input and output lengths differ"
        );
        let f = match self {
            Activation::Relu => relu_slice,
            Activation::Gelu => gelu_slice,
        };
        // Value by value: blocks on different threads give the sequential result.
        y.par_chunks_mut(PAR_BLOCK)
            .zip(x.par_chunks(PAR_BLOCK))
            .for_each(|(y, x)| f(x, y));
    }

    /// dL/dx = dL/dy · f′(x), given the input `x`.
    pub fn backward(self, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let mut g = dy.to_vec();
        self.backward_in_place(x, &mut g);
        g
    }

    /// g ← g · f′(x) value by value: turns dL/dy into dL/dx in place (vectorised).
    ///
    /// ```
    /// use vqx::model::Activation;
    /// let mut g = [3.0f32, 3.0];
    /// Activation::Relu.backward_in_place(&[-1.0, 2.0], &mut g);
    /// assert_eq!(g, [0.0, 3.0]);
    /// ```
    ///
    /// Panics when the lengths differ (the callers own both buffers).
    pub fn backward_in_place(self, x: &[f32], g: &mut [f32]) {
        assert_eq!(
            x.len(),
            g.len(),
            "activation: input and gradient lengths differ"
        );
        let f = match self {
            Activation::Relu => relu_backward_slice,
            Activation::Gelu => gelu_backward_slice,
        };
        g.par_chunks_mut(PAR_BLOCK)
            .zip(x.par_chunks(PAR_BLOCK))
            .for_each(|(g, x)| f(x, g));
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu",
            Activation::Relu => "relu",
        }
    }
}

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Activation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "gelu" => Ok(Activation::Gelu),
            "relu" => Ok(Activation::Relu),
            _ => Err(Error::InvalidArgument(format!(
                "unknown activation {s:?}: expected gelu or relu"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite f32 of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn tanh_is_within_two_ulp_of_f64_over_a_dense_sweep() {
        // Every 61st f32 pattern from 0 to 10 (≈ 18 M values), both signs, and the branch
        // boundary's neighbours.
        let top = 10.0f32.to_bits();
        let mut worst = (0, 0.0f32);
        let mut check = |x: f32| {
            let want = (x as f64).tanh() as f32;
            let got = tanh(x);
            let d = ulps(got, want);
            if d > worst.0 {
                worst = (d, x);
            }
            assert_eq!(tanh(-x).to_bits(), (-got).to_bits(), "odd at {x}");
        };
        for bits in (0..=top).step_by(61) {
            check(f32::from_bits(bits));
        }
        let b = TANH_SERIES_MAX.to_bits();
        for bits in b - 64..b + 64 {
            check(f32::from_bits(bits));
        }
        assert!(worst.0 <= 2, "worst {} ulp at {}", worst.0, worst.1);
    }

    #[test]
    fn tanh_special_values() {
        assert_eq!(tanh(0.0).to_bits(), 0.0f32.to_bits());
        assert_eq!(tanh(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(tanh(1e-30), 1e-30);
        assert_eq!(tanh(9.5), 1.0);
        assert_eq!(tanh(f32::INFINITY), 1.0);
        assert_eq!(tanh(f32::NEG_INFINITY), -1.0);
        assert!(tanh(f32::NAN).is_nan());
    }

    #[test]
    fn slices_match_the_scalar_functions_bit_for_bit() {
        // The vectorised loops (whatever width the CPU picks) against one value at a time.
        let x: Vec<f32> = (0..4099).map(|i| (i as f32 - 2049.0) * 0.0071).collect();
        for act in [Activation::Gelu, Activation::Relu] {
            let y = act.forward(&x);
            let g = act.backward(&x, &vec![0.75; x.len()]);
            for (i, &v) in x.iter().enumerate() {
                assert_eq!(y[i].to_bits(), act.apply(v).to_bits(), "{act} f({v})");
                let want = 0.75 * act.derivative(v);
                assert_eq!(g[i].to_bits(), want.to_bits(), "{act} f'({v})");
            }
        }
    }

    #[test]
    fn gelu_derivative_matches_a_central_difference() {
        for i in -40..=40 {
            let x = i as f64 * 0.1;
            let f = |x: f64| {
                0.5 * x * (1.0 + (0.797_884_560_802_865_4 * (x + 0.044_715 * x * x * x)).tanh())
            };
            let h = 1e-5;
            let want = (f(x + h) - f(x - h)) / (2.0 * h);
            let got = Activation::Gelu.derivative(x as f32) as f64;
            assert!((got - want).abs() < 1e-5, "x {x}: {got} vs {want}");
        }
    }
}
