//! Configuration of a [`super::VectorQuantizer`], built step by step and validated once.

use crate::backend::Device;
use crate::error::{Error, Result, setting};
use crate::nearest::Metric;
use serde::{Deserialize, Serialize};

/// How the codebook learns.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CodebookLearning {
    /// Exponential moving averages of assigned rows (SPEC §4). Defaults: decay 0.99, eps 1e-5
    /// (VQ-VAE paper, ESM3; vector-quantize-pytorch defaults to decay 0.8).
    Ema { decay: f32, eps: f32 },
    /// Gradient of the codebook loss mean((sg(x) − q)²), returned by `backward`; the user's
    /// optimiser applies it.
    Gradient,
}

impl CodebookLearning {
    /// The EMA's ε (Laplace smoothing of the counts) unless told otherwise: the VQ-VAE paper's,
    /// ESM3's and vector-quantize-pytorch's.
    pub const DEFAULT_EPS: f32 = 1e-5;

    /// EMA learning with `decay` and the default ε.
    ///
    /// ```
    /// use vqx::quantizer::CodebookLearning;
    /// assert_eq!(CodebookLearning::ema(0.9), CodebookLearning::Ema { decay: 0.9, eps: 1e-5 });
    /// ```
    pub fn ema(decay: f32) -> Self {
        CodebookLearning::Ema {
            decay,
            eps: Self::DEFAULT_EPS,
        }
    }
}

/// How the codebook is initialised on the first training batch (unless given).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Init {
    /// K random rows of the first batch, tiled with noise of std 0.01/√D when the batch has
    /// fewer than K rows (ESM3, VideoGPT); counts N = 1.
    Data,
    /// Lloyd's k-means on the first batch, seeded from `Data` (vector-quantize-pytorch
    /// `kmeans_init`, 10 iterations there); counts N = cluster sizes.
    KMeans { iters: usize },
    /// The codebook given to [`super::VectorQuantizer::with_codebook`]; counts N = 1.
    Given,
}

/// Which gradient reaches the encoder through the quantizer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    /// dL/dx = dL/dz (VQ-VAE paper, ESM3).
    #[default]
    StraightThrough,
    /// The rotation trick (SPEC §2; vector-quantize-pytorch `rotation_trick`).
    RotationTrick,
}

/// Everything that defines a quantizer.
///
/// ```
/// use vqx::quantizer::{CodebookLearning, QuantizerConfig};
/// let cfg = QuantizerConfig::new(512, 64)
///     .commitment_weight(0.25)
///     .learning(CodebookLearning::ema(0.99))
///     .dead_code_threshold(1e-3)
///     .seed(7);
/// assert!(cfg.validate().is_ok());
/// assert!(QuantizerConfig::new(0, 64).validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantizerConfig {
    /// K.
    pub codebook_size: usize,
    /// D.
    pub dim: usize,
    pub metric: Metric,
    /// β of the commitment loss β·mean((x − sg(q))²); 0 turns it off.
    pub commitment_weight: f32,
    pub learning: CodebookLearning,
    /// Codes whose EMA count N_k falls below this are re-seeded from the batch; 0 = off.
    pub dead_code_threshold: f32,
    /// Count a re-seeded code restarts with: None = the threshold (vector-quantize-pytorch's
    /// `reset_cluster_size` default); Some(1.0) is ESM3's.
    pub reset_count: Option<f32>,
    pub init: Init,
    pub estimator: Estimator,
    /// Sum EMA statistics in a fixed order (bit-identical runs) rather than with atomics.
    pub deterministic: bool,
    /// Seed of init sampling, noise and dead-code sampling.
    pub seed: u64,
    #[serde(skip)]
    pub device: Device,
}

/// Builder setters: `name(value)` returns the configuration with the field `name` set.
macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $t:ty,)*) => {$(
        $(#[$doc])*
        pub fn $name(mut self, value: $t) -> Self {
            self.$name = value;
            self
        }
    )*};
}

impl QuantizerConfig {
    /// K codes of dimension D with the defaults of the VQ-VAE paper and ESM3: L2, β = 0.25,
    /// EMA with decay 0.99 and eps 1e-5, data init, no dead-code threshold, straight-through.
    pub fn new(codebook_size: usize, dim: usize) -> Self {
        QuantizerConfig {
            codebook_size,
            dim,
            metric: Metric::L2,
            commitment_weight: 0.25,
            learning: CodebookLearning::ema(0.99),
            dead_code_threshold: 0.0,
            reset_count: None,
            init: Init::Data,
            estimator: Estimator::StraightThrough,
            deterministic: false,
            seed: 0,
            device: Device::Auto,
        }
    }
    setters! {
        /// The distance codes are chosen by.
        metric: Metric,
        /// β, the weight of the commitment loss.
        commitment_weight: f32,
        /// How the codebook learns: EMA or gradient.
        learning: CodebookLearning,
        /// Codes whose EMA count falls below this are re-seeded (0: never).
        dead_code_threshold: f32,
        /// How the codebook is initialised from the first batch.
        init: Init,
        /// The gradient estimator through the quantizer.
        estimator: Estimator,
        /// Deterministic per-code sums (bit-identical run to run).
        deterministic: bool,
        /// Seed of the initialisation and re-seeding draws.
        seed: u64,
        /// The backend the quantizer runs on.
        device: Device,
    }
    /// The count a re-seeded code restarts with (default: the dead-code threshold).
    pub fn reset_count(mut self, c: f32) -> Self {
        self.reset_count = Some(c);
        self
    }

    /// Count a re-seeded code restarts with.
    pub fn effective_reset_count(&self) -> f32 {
        self.reset_count.unwrap_or(self.dead_code_threshold)
    }

    /// Every setting in range, or an error naming the one that is not.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument(msg));
        if self.codebook_size == 0 || self.codebook_size > crate::nearest::MAX_CODES {
            return bad(format!(
                "codebook size must be in 1..={}, got {}",
                crate::nearest::MAX_CODES,
                self.codebook_size
            ));
        }
        setting::at_least_one("dimension", self.dim as u64)?;
        setting::non_negative("commitment weight", self.commitment_weight)?;
        if let CodebookLearning::Ema { decay, eps } = self.learning {
            if !(0.0..1.0).contains(&decay) {
                return bad(format!("EMA decay must be in [0, 1), got {decay}"));
            }
            setting::positive("EMA eps", eps)?;
        }
        setting::non_negative("dead-code threshold", self.dead_code_threshold)?;
        if let Some(c) = self.reset_count {
            setting::positive("reset count", c)?;
        }
        if self.dead_code_threshold > 0.0 && self.learning == CodebookLearning::Gradient {
            return bad(
                "dead-code replacement works on EMA counts: it needs EMA codebook learning".into(),
            );
        }
        if let Init::KMeans { iters } = self.init
            && iters == 0
        {
            return bad("k-means init needs at least 1 iteration".into());
        }
        Ok(())
    }
}
