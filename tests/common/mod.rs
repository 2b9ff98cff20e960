//! Helpers shared by the integration tests: seeded data, comparisons whose failure messages
//! name the index and both values, files in a directory, and (submodules) the `vqx` binary,
//! safetensors files and the CUDA devices. Each tests/*.rs is its own crate and uses a part of
//! this module: what one crate leaves unused is not dead code.
#![allow(dead_code)]

pub mod cli;
pub mod devices;
pub mod tensors;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use vqx::backend::Device;
use vqx::model::VqVaeConfig;
use vqx::quantizer::{CodebookLearning, QuantizerConfig};
use vqx::train::{DataSource, TrainConfig};
use vqx::{MatRef, Matrix, Metric, reference};

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A generator per (seed, salt): the device tests draw each shape's data from its own.
pub fn salted_rng(seed: u64, salt: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9) ^ salt as u64)
}

/// Uniform values in [-1, 1).
pub fn uniform(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut r = rng(seed);
    (0..rows * cols)
        .map(|_| r.r#gen::<f32>() * 2.0 - 1.0)
        .collect()
}

/// [`uniform`] as a rows × cols matrix.
pub fn uniform_matrix(rows: usize, cols: usize, seed: u64) -> Matrix {
    Matrix::new(uniform(rows, cols, seed), rows, cols).unwrap()
}

/// `len` values uniform in [-scale, scale), drawn from `rng`.
pub fn uniform_in(len: usize, scale: f32, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..len).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// A rows × cols matrix of [`uniform_in`] values in [-1, 1).
pub fn random_matrix(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Matrix {
    Matrix::new(uniform_in(rows * cols, 1.0, rng), rows, cols).unwrap()
}

/// `m` with `shift` added to every value: large norms, small differences.
pub fn shifted(mut m: Matrix, shift: f32) -> Matrix {
    m.data_mut().iter_mut().for_each(|v| *v += shift);
    m
}

/// `n` code indices uniform in 0..codes.
pub fn random_indices(n: usize, codes: usize, rng: &mut ChaCha8Rng) -> Vec<u32> {
    (0..n).map(|_| rng.gen_range(0..codes as u32)).collect()
}

/// Approximately standard normal values (sum of uniforms), scaled and shifted.
pub fn normal(rows: usize, cols: usize, seed: u64, scale: f32, shift: f32) -> Vec<f32> {
    let mut r = rng(seed);
    (0..rows * cols)
        .map(|_| {
            let s: f32 = (0..4).map(|_| r.r#gen::<f32>()).sum::<f32>() - 2.0;
            s * 1.732 * scale + shift
        })
        .collect()
}

/// Rows drawn around `centers` (K × D) with small noise; returns (rows, the centre of each row).
pub fn clustered(
    centers: &[f32],
    k: usize,
    d: usize,
    n: usize,
    noise: f32,
    seed: u64,
) -> (Vec<f32>, Vec<u32>) {
    let mut r = rng(seed);
    let mut x = Vec::with_capacity(n * d);
    let mut label = Vec::with_capacity(n);
    for _ in 0..n {
        let c = r.gen_range(0..k);
        label.push(c as u32);
        for j in 0..d {
            x.push(centers[c * d + j] + noise * (r.r#gen::<f32>() * 2.0 - 1.0));
        }
    }
    (x, label)
}

/// Checks `got` against the naive f64 reference: every row's index must be the reference's,
/// except on a true tie (the reference distances of the two codes are equal to 1e-12
/// relative), where either is accepted. Distances must be within the documented bound of the
/// expanded form, 4·(D + 8)·u·(||x||² + ||c||² + |d|) for L2 (u = 2⁻²⁴), plus `abs`.
pub fn assert_exact_nearest(
    x: MatRef<'_>,
    codebook: MatRef<'_>,
    metric: Metric,
    got: &vqx::Assignment,
    abs: f64,
    context: &str,
) {
    let want = reference::nearest(x, codebook, metric);
    let u = 1.0 / 16_777_216.0;
    let gamma = 4.0 * (x.cols() as f64 + 8.0) * u;
    assert_eq!(got.indices.len(), want.len(), "{context}: number of rows");
    assert_eq!(
        got.distances.len(),
        want.len(),
        "{context}: number of distances"
    );
    for (n, (&(wi, wd), (&gi, &gd))) in want
        .iter()
        .zip(got.indices.iter().zip(&got.distances))
        .enumerate()
    {
        if gi != wi {
            let gd64 = reference::distance(x.row(n), codebook.row(gi as usize), metric);
            let tie = (gd64 - wd).abs() <= 1e-12 * wd.abs().max(1e-300);
            assert!(
                tie,
                "{context}: row {n}: index {gi} (f64 distance {gd64:e}) but the reference says {wi} (f64 distance {wd:e})"
            );
        }
        let sq = |v: &[f32]| v.iter().map(|&a| a as f64 * a as f64).sum::<f64>();
        let scale = match metric {
            Metric::L2 => sq(x.row(n)) + sq(codebook.row(wi as usize)) + wd.abs(),
            Metric::Cosine => 2.0,
        };
        let tol = abs + gamma * scale;
        assert!(
            (gd as f64 - wd).abs() <= tol,
            "{context}: row {n}: distance {gd:e}, reference {wd:e} (tolerance {tol:e})"
        );
    }
}

/// Element-wise closeness with a message naming the first offending index and both values.
pub fn assert_close(got: &[f32], want: &[f64], rel: f64, abs: f64, context: &str) {
    assert_eq!(got.len(), want.len(), "{context}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= abs + rel * w.abs(),
            "{context}: index {i}: got {g:e}, want {w:e} (rel {rel:e}, abs {abs:e})"
        );
    }
}

/// Writes `data` as a .npy file with T's default dtype, the given shape and order, through npyz
/// (not vqx's writer): files as numpy makes them.
pub fn write_npy<T: npyz::AutoSerialize>(
    path: &Path,
    shape: &[u64],
    order: npyz::Order,
    data: &[T],
) {
    use npyz::WriterBuilder;
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .order(order)
        .writer(std::io::BufWriter::new(
            std::fs::File::create(path).unwrap(),
        ))
        .begin_nd()
        .unwrap();
    for v in data {
        w.push(v).unwrap();
    }
    w.finish().unwrap();
}

/// A small VQ-VAE run on a 16-D Gaussian mixture (24 components, std 0.1; `rows` rows and a
/// quarter as many held out): `codes` codes of dimension 4, the encoder's `hidden` widths,
/// batches of 64, lr 3e-3, seeds 5 (data), 9 (quantizer) and 2 (batch order). With EMA
/// learning, codes die and are re-seeded during the run (threshold 0.5): the quantizer's random
/// draws matter.
pub fn gmm_run(
    rows: usize,
    codes: usize,
    hidden: Vec<usize>,
    learning: CodebookLearning,
    device: Device,
) -> TrainConfig {
    let data = DataSource::Synthetic {
        spec: "gmm:dim=16,components=24,std=0.1".parse().unwrap(),
        rows,
        eval_rows: rows / 4,
        seed: 5,
    };
    let mut q = QuantizerConfig::new(codes, 4)
        .learning(learning)
        .device(device)
        .seed(9);
    if let CodebookLearning::Ema { .. } = learning {
        q = q.dead_code_threshold(0.5);
    }
    let mut c = TrainConfig::new(VqVaeConfig::new(16, 4, hidden), q, data);
    c.batch_size = 64;
    c.lr = 3e-3;
    c.seed = 2;
    c
}

/// Fails unless `msg` contains every needle, naming the first missing one.
pub fn assert_mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "message lacks {n:?}: {msg}");
    }
}

/// The names of the entries of `dir`, sorted.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
