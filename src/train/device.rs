//! `vqx train` with the whole step on a device (`--device cuda` or `cuda-emu`): the training
//! set resident in device memory, the encoder and decoder (matrix products through
//! [`Gpu::gemm`]: cuBLAS on a GPU, the CPU's `matmul` on the emulated device; bias, activation,
//! layer norm and the reconstruction loss as kernels of kernels/mlp.cu), the quantizer
//! ([`DeviceQuantizer`]), gradient clipping and AdamW over one flat parameter buffer
//! (kernels/optim.cu). Per step the host uploads the batch's row ids and reads back a few
//! scalars (losses, statistics, the gradient norm); parameters, optimiser moments and the
//! quantizer's state come back only for checkpoints and evaluation
//! ([`DeviceEngine::sync_to_host`]).
//!
//! The arithmetic is the CPU trainer's, in the same order: on the emulated device (whose
//! products are the CPU's own) a step in deterministic mode gives the CPU step's parameters bit
//! for bit (tests/train_device.rs). On a GPU, cuBLAS sums in another order.

use crate::backend::Transfers;
use crate::backend::cuda::mlp::{self, MlpScratch};
use crate::backend::cuda::optim::{CLIP_SCRATCH_LEN, DeviceAdamW, clip_global_norm};
use crate::backend::cuda::{DeviceMatrix, GemmShape, Gpu, GpuBackend, launch};
use crate::error::{Error, Result};
use crate::matrix::Matrix;
use crate::model::{Activation, Mlp, VqVae};
use crate::quantizer::{DeviceQuantizer, StepStats, VectorQuantizer};
use crate::train::AdamW;
use std::sync::Arc;
use std::time::Instant;

/// What one device step reports (the rest of the metrics is the trainer's).
pub(crate) struct DeviceStepOut {
    pub reconstruction: f64,
    pub commitment: f64,
    pub codebook: f64,
    pub grad_norm: f64,
    pub stats: StepStats,
    pub quantizer_seconds: f64,
}

/// What one step does besides its batch: the optimiser's settings for it.
pub(crate) struct StepPlan {
    /// Learning rate of this step.
    pub lr: f64,
    /// AdamW's step count, this step included.
    pub t: u64,
    /// Global-norm clipping threshold.
    pub clip: f64,
    /// The encoder's parameters stay as they are (and its gradient is left out of the norm).
    pub freeze_encoder: bool,
}

/// The device side of a [`super::Trainer`], whatever the device.
pub(crate) trait DeviceEngine: Send {
    /// One training step on the batch of training rows `rows`.
    fn step(&mut self, rows: &[u32], plan: &StepPlan) -> Result<DeviceStepOut>;
    /// Writes the parameters, the optimiser's moments and the quantizer's state into the host
    /// model and optimiser (for checkpoints and evaluation).
    fn sync_to_host(&self, model: &mut VqVae, optimizer: &mut AdamW) -> Result<()>;
    /// Bytes this engine's device has copied each way.
    fn transfers(&self) -> Transfers;
    /// "cuda" or "cuda-emu".
    fn device_name(&self) -> &'static str;
}

/// One MLP on the device: parameters, their gradients, and the forward pass's buffers for a
/// fixed batch size.
struct DeviceMlp<G: Gpu> {
    activation: Activation,
    layers: Vec<Layer<G>>,
    batch: usize,
}

struct Layer<G: Gpu> {
    inputs: usize,
    outputs: usize,
    weight: G::Buf<f32>,
    bias: G::Buf<f32>,
    grad_weight: G::Buf<f32>,
    grad_bias: G::Buf<f32>,
    /// The layer norm after this linear layer (hidden layers of an MLP with norms).
    norm: Option<Norm<G>>,
    /// x·Wᵀ + b (B × outputs).
    linear_out: DeviceMatrix<G>,
    /// The activation's output (B × outputs; hidden layers only): the next layer's input.
    activated: G::Buf<f32>,
    /// dL/d(input) (B × inputs).
    grad_input: DeviceMatrix<G>,
    /// dL/d(pre-activation) and, with a norm, dL/d(linear output) (B × outputs).
    grad_pre: G::Buf<f32>,
    grad_linear_out: G::Buf<f32>,
}

struct Norm<G: Gpu> {
    gamma: G::Buf<f32>,
    beta: G::Buf<f32>,
    grad_gamma: G::Buf<f32>,
    grad_beta: G::Buf<f32>,
    /// y = γ·x̂ + β, x̂ and 1/σ of the forward pass.
    out: G::Buf<f32>,
    normalized: G::Buf<f32>,
    inv_std: G::Buf<f32>,
}

/// The activation's input: the layer norm's output, or the linear output without a norm.
fn pre_activation<'a, G: Gpu>(
    norm: &'a Option<Norm<G>>,
    linear_out: &'a DeviceMatrix<G>,
) -> &'a G::Buf<f32> {
    match norm {
        Some(n) => &n.out,
        None => linear_out.buf(),
    }
}

impl<G: Gpu> DeviceMlp<G> {
    fn upload(g: &G, mlp: &Mlp, batch: usize) -> Result<Self> {
        let last = mlp.linears.len() - 1;
        let layers = mlp
            .linears
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let (inp, out) = (l.inputs(), l.outputs());
                let norm = match mlp.norms.get(i) {
                    Some(n) if i < last => Some(Norm {
                        gamma: g.upload("layer norm γ", &n.weight)?,
                        beta: g.upload("layer norm β", &n.bias)?,
                        grad_gamma: g.alloc_zeros("dL/dγ", out)?,
                        grad_beta: g.alloc_zeros("dL/dβ", out)?,
                        out: g.alloc_zeros("layer norm output", batch * out)?,
                        normalized: g.alloc_zeros("layer norm x̂", batch * out)?,
                        inv_std: g.alloc_zeros("layer norm 1/σ", batch)?,
                    }),
                    _ => None,
                };
                Ok(Layer {
                    inputs: inp,
                    outputs: out,
                    weight: g.upload("weight", l.weight.data())?,
                    bias: g.upload("bias", &l.bias)?,
                    grad_weight: g.alloc_zeros("dL/dW", inp * out)?,
                    grad_bias: g.alloc_zeros("dL/db", out)?,
                    norm,
                    linear_out: DeviceMatrix::zeros(g, "linear output", batch, out)?,
                    activated: g
                        .alloc_zeros("activation", if i < last { batch * out } else { 0 })?,
                    grad_input: DeviceMatrix::zeros(g, "dL/dx", batch, inp)?,
                    grad_pre: g.alloc_zeros("dL/d(pre-activation)", batch * out)?,
                    grad_linear_out: g.alloc_zeros("dL/d(linear output)", batch * out)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DeviceMlp {
            activation: mlp.activation,
            layers,
            batch,
        })
    }

    /// The parameter tensors in [`Mlp::tensors`]'s order (linears' weight and bias, then the
    /// norms' γ and β).
    fn tensors(&self) -> Vec<&G::Buf<f32>> {
        let mut out: Vec<&G::Buf<f32>> = Vec::new();
        for l in &self.layers {
            out.push(&l.weight);
            out.push(&l.bias);
        }
        for n in self.layers.iter().filter_map(|l| l.norm.as_ref()) {
            out.push(&n.gamma);
            out.push(&n.beta);
        }
        out
    }
    fn tensors_mut(&mut self) -> Vec<&mut G::Buf<f32>> {
        self.buffers_mut(false)
    }
    /// The gradients, in the same order as [`Self::tensors`].
    fn grads_mut(&mut self) -> Vec<&mut G::Buf<f32>> {
        self.buffers_mut(true)
    }
    /// The parameters, or with `grads` their gradients, in [`Mlp::tensors`]'s order.
    fn buffers_mut(&mut self, grads: bool) -> Vec<&mut G::Buf<f32>> {
        let mut out: Vec<&mut G::Buf<f32>> = Vec::new();
        let mut norms = Vec::new();
        for l in &mut self.layers {
            let (w, b) = if grads {
                (&mut l.grad_weight, &mut l.grad_bias)
            } else {
                (&mut l.weight, &mut l.bias)
            };
            out.push(w);
            out.push(b);
            if let Some(n) = &mut l.norm {
                norms.push(if grads {
                    (&mut n.grad_gamma, &mut n.grad_beta)
                } else {
                    (&mut n.gamma, &mut n.beta)
                });
            }
        }
        for (g, b) in norms {
            out.push(g);
            out.push(b);
        }
        out
    }

    /// The forward pass of `x` (B × inputs); the output is the last layer's linear output.
    fn forward(&mut self, g: &G, x: &G::Buf<f32>) -> Result<()> {
        let (b, last, act) = (self.batch, self.layers.len() - 1, self.activation);
        for i in 0..=last {
            let (done, rest) = self.layers.split_at_mut(i);
            let input = match done.last() {
                Some(prev) => &prev.activated,
                None => x,
            };
            let l = &mut rest[0];
            mlp::bias_rows(g, &l.bias, b, l.outputs, l.linear_out.buf_mut())?;
            // As Linear::forward: y += x·Wᵀ.
            let shape = GemmShape::new((b, l.inputs), (l.outputs, l.inputs))
                .transpose_b()
                .accumulating();
            g.gemm(shape, l.linear_out.buf_mut(), input, &l.weight)?;
            if i == last {
                break;
            }
            if let Some(n) = &mut l.norm {
                mlp::layer_norm_forward(
                    g,
                    l.linear_out.buf(),
                    &n.gamma,
                    &n.beta,
                    b,
                    l.outputs,
                    &mut n.out,
                    &mut n.normalized,
                    &mut n.inv_std,
                )?;
            }
            let pre = pre_activation(&l.norm, &l.linear_out);
            mlp::activation_forward(g, act, pre, b * l.outputs, &mut l.activated)?;
        }
        Ok(())
    }

    /// The output of the last forward pass (B × outputs).
    fn output(&self) -> &DeviceMatrix<G> {
        &self.layers.last().expect("an MLP has a layer").linear_out
    }

    /// Adds every parameter's gradient (zeroed first) given dL/d(output) `dy`, for the input
    /// `x` of the last forward pass; dL/dx is left in the first layer's `grad_input`.
    fn backward(&mut self, g: &G, x: &G::Buf<f32>, dy: &G::Buf<f32>) -> Result<()> {
        for t in self.grads_mut() {
            g.zero("gradient", t)?;
        }
        let (b, act) = (self.batch, self.activation);
        for i in (0..self.layers.len()).rev() {
            let (before, rest) = self.layers.split_at_mut(i);
            let (l, after) = rest.split_first_mut().expect("layer i exists");
            let input = match before.last() {
                Some(prev) => &prev.activated,
                None => x,
            };
            // dL/d(linear output): dy for the last layer, else through the activation and norm.
            let d_out: &G::Buf<f32> = match after.first() {
                None => dy,
                Some(next) => {
                    let pre = pre_activation(&l.norm, &l.linear_out);
                    mlp::activation_backward(
                        g,
                        act,
                        pre,
                        next.grad_input.buf(),
                        b * l.outputs,
                        &mut l.grad_pre,
                    )?;
                    match &mut l.norm {
                        None => &l.grad_pre,
                        Some(n) => {
                            mlp::layer_norm_backward(
                                g,
                                &l.grad_pre,
                                &n.normalized,
                                &n.inv_std,
                                &n.gamma,
                                b,
                                l.outputs,
                                &mut l.grad_linear_out,
                                &mut n.grad_gamma,
                                &mut n.grad_beta,
                            )?;
                            &l.grad_linear_out
                        }
                    }
                }
            };
            // As Linear::backward: dW += dyᵀ·x, db += Σ dy, dx = dy·W.
            let dw = GemmShape::new((b, l.outputs), (b, l.inputs))
                .transpose_a()
                .accumulating();
            g.gemm(dw, &mut l.grad_weight, d_out, input)?;
            mlp::column_sums_add(g, d_out, b, l.outputs, &mut l.grad_bias)?;
            let dx = GemmShape::new((b, l.outputs), (l.outputs, l.inputs));
            g.gemm(dx, l.grad_input.buf_mut(), d_out, &l.weight)?;
        }
        Ok(())
    }

    /// dL/dx of the last backward pass (B × inputs).
    fn grad_input(&self) -> &DeviceMatrix<G> {
        &self.layers[0].grad_input
    }
}

/// The device trainer (see the module documentation).
pub(crate) struct DeviceTrainer<G: Gpu> {
    backend: Arc<GpuBackend<G>>,
    /// The training rows, resident.
    data: DeviceMatrix<G>,
    batch: usize,
    rows: G::Buf<u32>,
    x: DeviceMatrix<G>,
    encoder: DeviceMlp<G>,
    decoder: DeviceMlp<G>,
    quantizer: DeviceQuantizer<G>,
    learn_codebook: bool,
    /// Every trained tensor end to end (encoder, decoder, codebook), in `parameter_names`'s
    /// order, and their gradients.
    params: G::Buf<f32>,
    grads: G::Buf<f32>,
    /// (offset, length) of each tensor in `params`.
    layout: Vec<(usize, usize)>,
    /// Tensors of the encoder (the frozen prefix when the encoder is frozen).
    encoder_tensors: usize,
    optimizer: DeviceAdamW<G>,
    /// dL/dy of the reconstruction and Σ (y − x)².
    dy: G::Buf<f32>,
    sq: G::Buf<f64>,
    mlp_scratch: MlpScratch<G>,
    clip_scratch: G::Buf<f64>,
    norm: G::Buf<f64>,
    /// The codebook after the optimiser's step (gradient learning).
    codebook: DeviceMatrix<G>,
}

impl<G: Gpu> DeviceTrainer<G> {
    /// Copies between the layers and their slots (`layout[i]` = (offset, len)) of the flat
    /// buffers the optimiser runs over; returns how many slots the layers use.
    fn copy_flat(&mut self, way: Flat) -> Result<usize> {
        let g = self.backend.gpu();
        let (enc, dec) = match way {
            Flat::Into => (self.encoder.grads_mut(), self.decoder.grads_mut()),
            Flat::From => (self.encoder.tensors_mut(), self.decoder.tensors_mut()),
        };
        let layers: Vec<_> = enc.into_iter().chain(dec).collect();
        let used = layers.len();
        for (tensor, &(at, len)) in layers.into_iter().zip(&self.layout) {
            match way {
                Flat::Into => g.copy_range("gradient", tensor, 0, &mut self.grads, at, len)?,
                Flat::From => g.copy_range("parameter", &self.params, at, tensor, 0, len)?,
            }
        }
        Ok(used)
    }

    /// Copies the model, the optimiser's state and the training rows to the device.
    pub fn new(
        backend: GpuBackend<G>,
        model: &VqVae,
        optimizer: &AdamW,
        train: &Matrix,
        batch: usize,
        decay: &[bool],
    ) -> Result<Self> {
        let backend = Arc::new(backend);
        let g = backend.gpu();
        // A 1×1 product first: a GPU without a loadable cuBLAS fails here, with its reason,
        // rather than at the first step.
        let probe = GemmShape::new((1, 1), (1, 1));
        let one = g.upload("matrix product probe", &[1.0f32])?;
        let mut out = g.alloc_zeros("matrix product probe", 1)?;
        g.gemm(probe, &mut out, &one, &one)?;
        let (d, code_dim) = (train.cols(), model.config().code_dim);
        let encoder = DeviceMlp::upload(g, &model.encoder, batch)?;
        let decoder = DeviceMlp::upload(g, &model.decoder, batch)?;
        let quantizer = DeviceQuantizer::from_host(&model.quantizer, backend.clone())?;
        let learn_codebook =
            model.quantizer.config().learning == crate::quantizer::CodebookLearning::Gradient;
        let mut host: Vec<&[f32]> = model.encoder.tensors().into_iter().map(|t| t.2).collect();
        let encoder_tensors = host.len();
        host.extend(model.decoder.tensors().into_iter().map(|t| t.2));
        if learn_codebook {
            host.push(model.quantizer.codebook().data());
        }
        let mut layout = Vec::with_capacity(host.len());
        let mut flat = Vec::new();
        for t in &host {
            layout.push((flat.len(), t.len()));
            flat.extend_from_slice(t);
        }
        let k = model.quantizer.config().codebook_size;
        let device_optimizer = DeviceAdamW::from_host(g, optimizer, decay)?;
        let sizes: Vec<usize> = device_optimizer
            .offsets()
            .windows(2)
            .map(|w| w[1] - w[0])
            .collect();
        if sizes != layout.iter().map(|l| l.1).collect::<Vec<_>>() {
            return Err(Error::InvalidArgument(
                "optimiser state does not match the model's tensors".into(),
            ));
        }
        Ok(DeviceTrainer {
            data: DeviceMatrix::upload(g, "training rows", train.as_ref())?,
            batch,
            rows: g.alloc_zeros("batch rows", batch)?,
            x: DeviceMatrix::zeros(g, "batch", batch, d)?,
            encoder,
            decoder,
            quantizer,
            learn_codebook,
            params: g.upload("parameters", &flat)?,
            grads: g.alloc_zeros("gradients", flat.len())?,
            layout,
            encoder_tensors,
            optimizer: device_optimizer,
            dy: g.alloc_zeros("dL/dy", batch * d)?,
            sq: g.alloc_zeros("reconstruction error", 1)?,
            mlp_scratch: MlpScratch::new(g)?,
            clip_scratch: g.alloc_zeros("norm partials", CLIP_SCRATCH_LEN)?,
            norm: g.alloc_zeros("gradient norm", 1)?,
            codebook: DeviceMatrix::zeros(g, "codebook", k, code_dim)?,
            backend,
        })
    }
}

/// Which way [`DeviceTrainer::copy_flat`] copies.
#[derive(Clone, Copy)]
enum Flat {
    /// The layers' gradients into their slots of the flat gradient buffer.
    Into,
    /// The flat parameter buffer's slots back into the layers' parameters.
    From,
}

impl<G: Gpu> DeviceEngine for DeviceTrainer<G> {
    fn step(&mut self, rows: &[u32], plan: &StepPlan) -> Result<DeviceStepOut> {
        let &StepPlan {
            lr,
            t,
            clip,
            freeze_encoder,
        } = plan;
        // A handle of its own: `self` is borrowed mutably below while `g` is in use.
        let backend = Arc::clone(&self.backend);
        let g = backend.gpu();
        let (b, d) = (self.batch, self.x.cols());
        if rows.len() != b {
            return Err(Error::shape(
                "batch rows vs the device trainer's batch",
                format!("{b} rows"),
                format!("{} rows", rows.len()),
            ));
        }
        // The one upload per step: which training rows form this batch.
        g.write("batch rows", &mut self.rows, rows)?;
        launch::gather(g, self.data.buf(), &self.rows, self.x.buf_mut(), b, d)?;

        self.encoder.forward(g, self.x.buf())?;
        let t0 = Instant::now();
        let stats = self.quantizer.forward(self.encoder.output(), None, true)?;
        let mut quantizer_seconds = t0.elapsed().as_secs_f64();

        // z_st equals q in value: the decoder reads the quantized rows.
        self.decoder.forward(g, self.quantizer.quantized()?.buf())?;
        mlp::recon_loss(
            g,
            self.decoder.output().buf(),
            self.x.buf(),
            b,
            d,
            &mut self.dy,
            &mut self.mlp_scratch,
            &mut self.sq,
        )?;
        self.decoder
            .backward(g, self.quantizer.quantized()?.buf(), &self.dy)?;
        let t1 = Instant::now();
        self.quantizer
            .backward(self.encoder.output(), self.decoder.grad_input())?;
        quantizer_seconds += t1.elapsed().as_secs_f64();
        self.encoder
            .backward(g, self.x.buf(), self.quantizer.grad_x()?.buf())?;

        // Gradients end to end in the optimiser's order, then clipping and AdamW on the
        // device; the updated parameters go back to the layers.
        let i = self.copy_flat(Flat::Into)?;
        if self.learn_codebook {
            // The optimiser steps the quantizer's current codebook (initialised by the first
            // batch, as on the CPU, which clones it every step).
            let (at, len) = self.layout[i];
            let current = self.quantizer.codebook().rows().buf();
            g.copy_range("codebook", current, 0, &mut self.params, at, len)?;
            let gc = self.quantizer.grad_codebook().ok_or_else(|| {
                Error::InvalidArgument("gradient learning without a codebook gradient".into())
            })?;
            let (at, len) = self.layout[i];
            g.copy_range("codebook gradient", gc.buf(), 0, &mut self.grads, at, len)?;
        }
        let first_tensor = if freeze_encoder {
            self.encoder_tensors
        } else {
            0
        };
        let first_elem = self
            .layout
            .get(first_tensor)
            .map_or(g.len(&self.grads), |l| l.0);
        let total = g.len(&self.grads);
        clip_global_norm(
            g,
            &mut self.grads,
            first_elem,
            total,
            clip,
            &mut self.clip_scratch,
            &mut self.norm,
        )?;
        self.optimizer
            .step(g, &mut self.params, &self.grads, first_tensor, lr, t)?;
        let i = self.copy_flat(Flat::From)?;
        if self.learn_codebook {
            let (at, len) = self.layout[i];
            g.copy_range(
                "codebook",
                &self.params,
                at,
                self.codebook.buf_mut(),
                0,
                len,
            )?;
            self.quantizer.set_codebook(&self.codebook)?;
        }

        // The scalars: a few dozen bytes.
        let stats = self.quantizer.stats(stats)?;
        let losses = self.quantizer.losses()?;
        let sq = g.download("reconstruction error", &self.sq)?[0];
        Ok(DeviceStepOut {
            reconstruction: sq / (b as f64 * d as f64),
            commitment: losses.commitment as f64,
            codebook: losses.codebook as f64,
            grad_norm: g.download("gradient norm", &self.norm)?[0],
            stats,
            quantizer_seconds,
        })
    }

    fn sync_to_host(&self, model: &mut VqVae, optimizer: &mut AdamW) -> Result<()> {
        let g = self.backend.gpu();
        for (dev, host) in [
            (&self.encoder, &mut model.encoder),
            (&self.decoder, &mut model.decoder),
        ] {
            for (src, dst) in dev.tensors().into_iter().zip(host.tensors_mut()) {
                dst.copy_from_slice(&g.download("parameter", src)?);
            }
        }
        let (codebook, ema, usage) = self.quantizer.download()?;
        let config = model.quantizer.config().clone();
        model.quantizer =
            VectorQuantizer::from_state(config, codebook, ema, self.quantizer.step(), Some(usage))?;
        *optimizer = self.optimizer.to_host(g)?;
        Ok(())
    }

    fn transfers(&self) -> Transfers {
        self.backend.gpu().transfers()
    }

    fn device_name(&self) -> &'static str {
        self.backend.gpu().device().name()
    }
}
