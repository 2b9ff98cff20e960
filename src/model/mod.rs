//! A small VQ-VAE with hand-written forward and backward passes (issue 5): linear layers,
//! GELU or ReLU, optional layer norm, MLPs, and the VQ-VAE around a
//! [`crate::quantizer::VectorQuantizer`]. Matrix products go through [`matmul`], the one
//! place a GPU path would plug in.

mod activation;
mod layer_norm;
mod linear;
pub mod matmul;
mod mlp;
pub mod simd;
mod vqvae;

pub use activation::{Activation, tanh};
pub use layer_norm::{LAYER_NORM_EPS, LayerNorm, LayerNormCache};
pub use linear::Linear;
pub use mlp::{Mlp, MlpCache};
pub use vqvae::{PhaseSeconds, StepOutput, StepWorkspace, VqVae, VqVaeConfig, VqVaeGrads};
