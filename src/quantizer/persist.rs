//! A quantizer to and from a vqx checkpoint: codebook, EMA counts and sums, cumulative usage,
//! step, and the configuration as JSON metadata.

use super::{QuantizerConfig, VectorQuantizer};
use crate::backend::Device;
use crate::checkpoint::Checkpoint;
use crate::ema::EmaState;
use crate::error::{Error, Result};

impl VectorQuantizer {
    /// Everything needed to resume: see [`VectorQuantizer::from_checkpoint`].
    ///
    /// ```
    /// use vqx::quantizer::{QuantizerConfig, VectorQuantizer};
    /// let cfg = QuantizerConfig::new(3, 2).device(vqx::backend::Device::Cpu);
    /// let vq = VectorQuantizer::with_codebook(cfg, vqx::Matrix::zeros(3, 2))?;
    /// let back = VectorQuantizer::from_checkpoint(&vq.to_checkpoint()?, vqx::backend::Device::Cpu)?;
    /// assert_eq!(back.codebook(), vq.codebook());
    /// # Ok::<(), vqx::Error>(())
    /// ```
    pub fn to_checkpoint(&self) -> Result<Checkpoint> {
        let config = serde_json::to_value(&self.config)
            .map_err(|e| Error::InvalidArgument(format!("cannot encode the configuration: {e}")))?;
        Ok(Checkpoint {
            codebook: self.codebook.clone(),
            cluster_size: self.ema.as_ref().map(|e| e.cluster_size().to_vec()),
            embed_avg: self.ema.as_ref().map(|e| e.embed_avg().to_owned()),
            usage_total: Some(self.usage_total.iter().map(|&c| c as f64).collect()),
            step: self.step,
            config,
        })
    }

    /// Resumes from a checkpoint written by [`VectorQuantizer::to_checkpoint`], on `device`.
    pub fn from_checkpoint(ckpt: &Checkpoint, device: Device) -> Result<Self> {
        let config: QuantizerConfig = serde_json::from_value(ckpt.config.clone()).map_err(|e| {
            Error::InvalidArgument(format!(
                "checkpoint config is not a vqx quantizer configuration: {e}"
            ))
        })?;
        let config = config.device(device);
        let ema = match (&ckpt.cluster_size, &ckpt.embed_avg) {
            (Some(n), Some(m)) => Some(EmaState::from_parts(n.clone(), m.clone())?),
            _ => None,
        };
        let usage = ckpt
            .usage_total
            .as_ref()
            .map(|u| u.iter().map(|&c| c.max(0.0) as u64).collect());
        Self::from_state(config, ckpt.codebook.clone(), ema, ckpt.step, usage)
    }
}
