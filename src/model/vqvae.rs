//! The VQ-VAE: MLP encoder → [`VectorQuantizer`] → MLP decoder, trained on
//! L = mean((decoder(z) − x)²) + β·mean((e − sg(q))²) [+ mean((sg(e) − q)²) with a gradient
//! codebook], where e = encoder(x), q its nearest code and z = e + sg(q − e) (SPEC §2–§3):
//! the decoder's gradient reaches the encoder through the straight-through estimator.

use super::{Activation, Mlp, MlpCache};
use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};
use crate::quantizer::{QuantizerConfig, StepStats, VectorQuantizer};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Shapes of the encoder and decoder.
///
/// ```
/// use vqx::model::VqVaeConfig;
/// let cfg = VqVaeConfig::new(64, 8, vec![128, 128]);
/// assert!(cfg.validate().is_ok());
/// assert!(VqVaeConfig::new(64, 0, vec![]).validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VqVaeConfig {
    /// Width of the data rows.
    pub data_dim: usize,
    /// Width of the encoder's output = the codes' dimension.
    pub code_dim: usize,
    /// Hidden widths of the encoder; the decoder mirrors them (reversed). Empty: one linear
    /// layer each way.
    pub hidden: Vec<usize>,
    pub activation: Activation,
    /// A layer norm before every hidden activation.
    pub layer_norm: bool,
    /// Seed of the weight initialisation.
    pub seed: u64,
}

impl VqVaeConfig {
    /// GELU, no layer norm, seed 0.
    pub fn new(data_dim: usize, code_dim: usize, hidden: Vec<usize>) -> Self {
        VqVaeConfig {
            data_dim,
            code_dim,
            hidden,
            activation: Activation::Gelu,
            layer_norm: false,
            seed: 0,
        }
    }

    /// Every width at least 1.
    pub fn validate(&self) -> Result<()> {
        if self.data_dim == 0 || self.code_dim == 0 || self.hidden.contains(&0) {
            return Err(Error::InvalidArgument(format!(
                "VQ-VAE widths must be at least 1: data {}, code {}, hidden {:?}",
                self.data_dim, self.code_dim, self.hidden
            )));
        }
        Ok(())
    }
}

/// Gradients of every learned tensor.
#[derive(Clone, Debug)]
pub struct VqVaeGrads {
    pub encoder: Mlp,
    pub decoder: Mlp,
    /// dL/dC with a gradient-learned codebook; None under EMA.
    pub codebook: Option<Matrix>,
}

/// The losses and statistics of one forward/backward pass.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// reconstruction + commitment + codebook.
    pub loss: f64,
    /// mean((decoder(q) − x)²).
    pub reconstruction: f64,
    /// β·mean((e − sg(q))²).
    pub commitment: f64,
    /// mean((sg(e) − q)²) with a gradient codebook, else 0.
    pub codebook: f64,
    pub stats: StepStats,
    /// Seconds spent in the quantizer's forward and backward.
    pub quantizer_seconds: f64,
    /// Where the pass's time went.
    pub phases: PhaseSeconds,
    /// Indices assigned to the batch's rows.
    pub indices: Vec<u32>,
}

/// Seconds of one training step by phase (the CPU trainer fills them; `optimizer` is the
/// trainer's: clipping + AdamW).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PhaseSeconds {
    pub encoder_forward: f64,
    /// The quantizer's forward and backward (nearest codes, EMA, dead codes, commitment).
    pub quantizer: f64,
    pub decoder_forward: f64,
    /// The reconstruction loss's gradient and the decoder's backward pass.
    pub decoder_backward: f64,
    pub encoder_backward: f64,
    /// Gradient clipping and the AdamW update.
    pub optimizer: f64,
}

/// The buffers of [`VqVae::forward_backward_with`], kept from step to step so that a training
/// loop does not reallocate its activations and gradients every step.
///
/// ```
/// use vqx::model::{StepWorkspace, VqVae, VqVaeConfig};
/// use vqx::quantizer::QuantizerConfig;
/// use vqx::{backend::Device, MatRef};
/// let mut m = VqVae::new(
///     VqVaeConfig::new(4, 2, vec![8]),
///     QuantizerConfig::new(3, 2).device(Device::Cpu),
/// )?;
/// let x: Vec<f32> = (0..6 * 4).map(|i| (i % 5) as f32).collect();
/// let mut ws = StepWorkspace::new(&m);
/// for _ in 0..2 {
///     let out = m.forward_backward_with(MatRef::new(&x, 6, 4)?, true, &mut ws)?;
///     assert!(out.loss > 0.0);
/// }
/// assert!(ws.grads.encoder.linears[0].weight.data().iter().any(|&g| g != 0.0));
/// # Ok::<(), vqx::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct StepWorkspace {
    encoder: MlpCache,
    decoder: MlpCache,
    /// dL/d(decoder output).
    dy: Vec<f32>,
    /// The gradients of the last pass.
    pub grads: VqVaeGrads,
}

impl StepWorkspace {
    /// Whether the gradients are shaped like `model`'s parameters (the buffers resize
    /// themselves; the gradients are the caller's to replace).
    pub fn fits(&self, model: &VqVae) -> bool {
        let same = |a: &Mlp, b: &Mlp| {
            a.norms.len() == b.norms.len()
                && a.linears.len() == b.linears.len()
                && a.linears
                    .iter()
                    .zip(&b.linears)
                    .all(|(x, y)| (x.inputs(), x.outputs()) == (y.inputs(), y.outputs()))
        };
        same(&self.grads.encoder, &model.encoder) && same(&self.grads.decoder, &model.decoder)
    }

    /// The encoder's output of the last pass (N × code_dim; empty before the first): what
    /// the quantizer assigned. A data-parallel step sums it per code across ranks.
    pub fn encoder_output(&self) -> MatRef<'_> {
        self.encoder.output()
    }

    /// Empty buffers, and gradients shaped like `model`'s parameters.
    pub fn new(model: &VqVae) -> Self {
        StepWorkspace {
            encoder: MlpCache::default(),
            decoder: MlpCache::default(),
            dy: Vec::new(),
            grads: VqVaeGrads {
                encoder: model.encoder.zeros_like(),
                decoder: model.decoder.zeros_like(),
                codebook: None,
            },
        }
    }
}

/// A VQ-VAE with hand-written forward and backward passes.
///
/// ```
/// use vqx::model::{VqVae, VqVaeConfig};
/// use vqx::quantizer::QuantizerConfig;
/// use vqx::{backend::Device, MatRef};
/// let mut m = VqVae::new(
///     VqVaeConfig::new(4, 2, vec![8]),
///     QuantizerConfig::new(3, 2).device(Device::Cpu),
/// )?;
/// let x: Vec<f32> = (0..6 * 4).map(|i| (i % 5) as f32).collect();
/// let (out, grads) = m.forward_backward(MatRef::new(&x, 6, 4)?, true)?;
/// assert!(out.loss > 0.0 && grads.codebook.is_none());
/// let tokens = m.encode(MatRef::new(&x, 6, 4)?)?;
/// assert_eq!(m.decode(&tokens)?.cols(), 4);
/// # Ok::<(), vqx::Error>(())
/// ```
#[derive(Debug)]
pub struct VqVae {
    config: VqVaeConfig,
    pub encoder: Mlp,
    pub decoder: Mlp,
    pub quantizer: VectorQuantizer,
}

impl VqVae {
    /// Fresh weights (seeded by `config.seed`) and a quantizer initialised on the first
    /// training batch.
    pub fn new(config: VqVaeConfig, quantizer: QuantizerConfig) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let rev: Vec<usize> = config.hidden.iter().rev().copied().collect();
        let encoder = Mlp::new(
            config.data_dim,
            &config.hidden,
            config.code_dim,
            config.activation,
            config.layer_norm,
            &mut rng,
        );
        let decoder = Mlp::new(
            config.code_dim,
            &rev,
            config.data_dim,
            config.activation,
            config.layer_norm,
            &mut rng,
        );
        let quantizer = VectorQuantizer::new(quantizer)?;
        Self::from_parts(config, encoder, decoder, quantizer)
    }

    /// Assembles a model, checking that the parts fit the configuration.
    pub fn from_parts(
        config: VqVaeConfig,
        encoder: Mlp,
        decoder: Mlp,
        quantizer: VectorQuantizer,
    ) -> Result<Self> {
        config.validate()?;
        let rev: Vec<usize> = config.hidden.iter().rev().copied().collect();
        let checks = [
            (
                "encoder",
                (encoder.input_dim(), encoder.hidden(), encoder.output_dim()),
                (config.data_dim, config.hidden.clone(), config.code_dim),
            ),
            (
                "decoder",
                (decoder.input_dim(), decoder.hidden(), decoder.output_dim()),
                (config.code_dim, rev, config.data_dim),
            ),
        ];
        for (what, got, want) in checks {
            if got != want {
                return Err(Error::shape(
                    format!("{what} vs the VQ-VAE configuration"),
                    format!("{} → {:?} → {}", want.0, want.1, want.2),
                    format!("{} → {:?} → {}", got.0, got.1, got.2),
                ));
            }
        }
        if quantizer.config().dim != config.code_dim {
            return Err(Error::shape(
                "quantizer dimension vs code dimension",
                config.code_dim.to_string(),
                quantizer.config().dim.to_string(),
            ));
        }
        Ok(VqVae {
            config,
            encoder,
            decoder,
            quantizer,
        })
    }

    pub fn config(&self) -> &VqVaeConfig {
        &self.config
    }

    fn check_input(&self, x: MatRef<'_>) -> Result<()> {
        if x.cols() != self.config.data_dim {
            return Err(Error::shape(
                "data width vs the model's data dimension",
                format!("{} columns", self.config.data_dim),
                format!("{} columns", x.cols()),
            ));
        }
        x.check_nonempty("data batch")?;
        x.check_finite("data batch")
    }

    /// One pass over a batch: encoder, quantizer (`train`: init on the first batch, EMA
    /// update, dead-code re-seeding), decoder, the losses, and every gradient. The gradients
    /// are of the loss at the codebook the rows were assigned with.
    pub fn forward_backward(
        &mut self,
        x: MatRef<'_>,
        train: bool,
    ) -> Result<(StepOutput, VqVaeGrads)> {
        let mut ws = StepWorkspace::new(self);
        let out = self.forward_backward_with(x, train, &mut ws)?;
        Ok((out, ws.grads))
    }

    /// [`Self::forward_backward`] in a workspace kept by the caller: the gradients are
    /// written into `ws.grads`, and the intermediate values reuse its buffers.
    pub fn forward_backward_with(
        &mut self,
        x: MatRef<'_>,
        train: bool,
        ws: &mut StepWorkspace,
    ) -> Result<StepOutput> {
        self.check_input(x)?;
        let mut phases = PhaseSeconds::default();
        let t = Instant::now();
        let e = self.encoder.forward_with(x, &mut ws.encoder);
        phases.encoder_forward = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let fwd = self.quantizer.forward(e, None, train)?;
        phases.quantizer = t.elapsed().as_secs_f64();

        // z_st equals q in value: the decoder reads the quantized rows.
        let t = Instant::now();
        let y = self
            .decoder
            .forward_with(fwd.quantized.as_ref(), &mut ws.decoder);
        phases.decoder_forward = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let (n, d) = (x.rows(), x.cols());
        let scale = 2.0 / (n as f64 * d as f64);
        let mut sq = 0.0f64;
        ws.dy.clear();
        ws.dy.extend(y.data().iter().zip(x.data()).map(|(&a, &b)| {
            let t = a as f64 - b as f64;
            sq += t * t;
            (scale * t) as f32
        }));
        let reconstruction = sq / (n as f64 * d as f64);
        let dz = self
            .decoder
            .backward_with(
                &mut ws.decoder,
                MatRef::new(&ws.dy, n, d)?,
                &mut ws.grads.decoder,
                true,
            )
            .expect("input gradient asked for");
        phases.decoder_backward = t.elapsed().as_secs_f64();

        let t = Instant::now();
        // Straight-through: dL/de = dL/dz plus the commitment term's gradient. (The encoder's
        // output is still in its cache: `e` borrowed it.)
        let e = ws.encoder.output();
        let g = self.quantizer.backward(&fwd, e, dz)?;
        phases.quantizer += t.elapsed().as_secs_f64();

        let t = Instant::now();
        self.encoder
            .backward_with(&mut ws.encoder, g.x.as_ref(), &mut ws.grads.encoder, false);
        ws.grads.codebook = g.codebook;
        phases.encoder_backward = t.elapsed().as_secs_f64();
        let (commitment, codebook) = (fwd.commitment_loss as f64, fwd.codebook_loss as f64);
        Ok(StepOutput {
            loss: reconstruction + commitment + codebook,
            reconstruction,
            commitment,
            codebook,
            stats: fwd.stats,
            quantizer_seconds: phases.quantizer,
            phases,
            indices: fwd.indices,
        })
    }

    /// The encoder's output (N × code_dim).
    pub fn embed(&self, x: MatRef<'_>) -> Result<Matrix> {
        self.check_input(x)?;
        let e = self.encoder.infer(x);
        e.as_ref().check_finite("encoder output")?;
        Ok(e)
    }

    /// Token (code index) of every row.
    pub fn encode(&self, x: MatRef<'_>) -> Result<Vec<u32>> {
        let e = self.embed(x)?;
        let a = self.quantizer.backend().nearest(
            e.as_ref(),
            self.quantizer.codebook().as_ref(),
            self.quantizer.config().metric,
        )?;
        Ok(a.indices)
    }

    /// The decoder's output for tokens (errors on an index outside the codebook).
    pub fn decode(&self, tokens: &[u32]) -> Result<Matrix> {
        if tokens.is_empty() {
            return Err(Error::Empty {
                what: "tokens".into(),
                detail: "no indices to decode".into(),
            });
        }
        let q = self
            .quantizer
            .backend()
            .gather(self.quantizer.codebook().as_ref(), tokens)?;
        Ok(self.decoder.infer(q.as_ref()))
    }

    /// decode(encode(x)).
    pub fn reconstruct(&self, x: MatRef<'_>) -> Result<Matrix> {
        self.decode(&self.encode(x)?)
    }

    /// mean((reconstruct(x) − x)²), evaluated in chunks of 4096 rows.
    pub fn reconstruction_mse(&self, x: MatRef<'_>) -> Result<f64> {
        x.check_nonempty("evaluation data")?;
        Ok(self.reconstruction_sq_sum(x)? / (x.rows() as f64 * x.cols() as f64))
    }

    /// Σ (reconstruct(x) − x)² in f64, in chunks of 4096 rows; 0 for no rows (a rank's share
    /// of a held-out set may be empty; the ranks add these sums).
    pub fn reconstruction_sq_sum(&self, x: MatRef<'_>) -> Result<f64> {
        let mut sq = 0.0f64;
        let mut start = 0;
        while start < x.rows() {
            let end = (start + 4096).min(x.rows());
            let part = x.slice_rows(start, end);
            let y = self.reconstruct(part)?;
            sq += y
                .data()
                .iter()
                .zip(part.data())
                .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                .sum::<f64>();
            start = end;
        }
        Ok(sq)
    }
}
