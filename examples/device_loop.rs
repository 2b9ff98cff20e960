//! The quantizer embedded in a user's own training loop, on device buffers.
//!
//! The "encoder output" lives on the device from the start (here a data set uploaded once; in a
//! real program, the output of the user's own kernels or of another cudarc user such as candle,
//! wrapped with `DeviceMatrix::from_buf` or borrowed with `DeviceMatrix::from_raw`). Each step
//! quantizes one batch, reads the losses back only every few steps, and hands dL/dx back on the
//! device. The bytes that crossed the bus are printed at the end.
//!
//! ```text
//! cargo run --release --example device_loop            # a GPU if there is one, else cuda-emu
//! cargo run --release --example device_loop -- cuda-emu
//! ```

use std::sync::Arc;
use vqx::backend::Backend;
use vqx::backend::cuda::{CudaGpu, DeviceMatrix, EmuGpu, Gpu, GpuBackend};
use vqx::quantizer::{CodebookLearning, DeviceQuantizer, QuantizerConfig};
use vqx::{Matrix, Result};

fn main() -> Result<()> {
    let want = std::env::args().nth(1).unwrap_or_else(|| "auto".into());
    match (want.as_str(), CudaGpu::new(0)) {
        ("cuda" | "auto", Ok(gpu)) => train(GpuBackend::on(gpu)),
        ("cuda", Err(e)) => Err(e),
        _ => train(GpuBackend::on(EmuGpu::new()?)),
    }
}

fn train<G: Gpu>(backend: GpuBackend<G>) -> Result<()> {
    let backend = Arc::new(backend);
    let gpu = backend.gpu();
    let (rows, batch, dim, codes) = (4096usize, 256usize, 16usize, 64usize);

    // The user's data, resident on the device: 16 blobs in 16 dimensions.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let centres: Vec<f32> = (0..16 * dim).map(|_| 8.0 * uniform()).collect();
    let data: Vec<f32> = (0..rows)
        .flat_map(|r| (0..dim).map(move |i| (r % 16, i)))
        .map(|(c, i)| centres[c * dim + i] + uniform())
        .collect();
    let batches: Vec<DeviceMatrix<G>> = data
        .chunks(batch * dim)
        .map(|b| DeviceMatrix::upload(gpu, "batch", Matrix::new(b.to_vec(), batch, dim)?.as_ref()))
        .collect::<Result<_>>()?;
    // The decoder's gradient would come from the user's own backward pass; a constant pull
    // toward the origin stands in for it here.
    let grad_out = DeviceMatrix::upload(
        gpu,
        "dL/dq",
        Matrix::new(vec![0.01; batch * dim], batch, dim)?.as_ref(),
    )?;

    let config = QuantizerConfig::new(codes, dim)
        .learning(CodebookLearning::ema(0.9))
        .dead_code_threshold(0.05)
        .deterministic(true)
        .seed(1);
    let mut vq = DeviceQuantizer::new(config, backend.clone())?;
    let mut start = gpu.transfers();
    for step in 0..40 {
        if step == 1 {
            // The first step seeded the codebook from its batch on the host: count from here.
            start = gpu.transfers();
        }
        let x = &batches[step % batches.len()];
        let stats = vq.forward(x, None, true)?;
        vq.backward(x, &grad_out)?; // dL/dx stays on the device: vq.grad_x()
        if step % 10 == 9 {
            let stats = vq.stats(stats)?;
            println!(
                "step {:>2}: commitment loss {:.5}, perplexity {:.1}, {} codes used, {} re-seeded",
                stats.step,
                vq.losses()?.commitment,
                stats.perplexity,
                stats.used,
                stats.replaced
            );
        }
    }
    let moved = gpu.transfers().since(start);
    println!(
        "{}: steps 2-40 of {batch} × {dim} rows moved {} B to the device and {} B back \
         (losses and statistics read every 10th step), against {} B per batch of rows",
        backend.describe(),
        moved.h2d_bytes,
        moved.d2h_bytes,
        batch * dim * 4
    );
    Ok(())
}
