//! Element-wise activations and their derivatives.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// √(2/π), of GELU's tanh form.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

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
            Activation::Gelu => {
                let t = (SQRT_2_OVER_PI * (x + GELU_C * x * x * x)).tanh();
                0.5 * x * (1.0 + t)
            }
        }
    }

    /// f′(x).
    pub fn derivative(self, x: f32) -> f32 {
        match self {
            Activation::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Gelu => {
                let u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
                let t = u.tanh();
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x);
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
            }
        }
    }

    /// f applied to every value.
    pub fn forward(self, x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| self.apply(v)).collect()
    }

    /// dL/dx = dL/dy · f′(x), given the input `x`.
    pub fn backward(self, x: &[f32], dy: &[f32]) -> Vec<f32> {
        x.iter()
            .zip(dy)
            .map(|(&v, &g)| g * self.derivative(v))
            .collect()
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
