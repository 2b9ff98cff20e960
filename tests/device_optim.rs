//! The optimiser on the device (kernels/optim.cu, launched by src/backend/cuda/optim.rs) against
//! the CPU's (src/train/optim.rs), on the emulated device always and on a GPU when there is one
//! (`on_devices!`).
//!
//! Tensors of awkward sizes (1, 255, 257, 10,000: around the 256-thread blocks) laid end to end
//! in one flat buffer, mixed weight-decay flags, a frozen prefix of whole tensors. Claims:
//! - AdamW: after each of 5 steps with changing lr and random gradients, parameters and both
//!   moments are bit-identical (`to_bits()`) to `AdamW::step_from`; frozen tensors and their
//!   moments are untouched; `from_host`/`to_host` carry the moments both ways unchanged (a
//!   device step from a CPU optimiser's state equals the CPU's next step).
//! - Clipping: the device norm is within 1e-12 relative of `clip_global_norm`'s (other summation
//!   order) and bit-identical between two runs. The clipped gradients are compared bit for bit
//!   against the CPU's scaling applied with the *device's* norm (the same formula, so exact
//!   whatever the norm's last bits), and bit for bit against `clip_global_norm` itself whenever
//!   the two norms are equal (asserted to be the case for at least one of the data sets: small
//!   integers, whose squares sum exactly in any order). No clipping, gradients unchanged, when
//!   the norm is below the limit and when max_norm = 0 (the CPU's "no clipping"); the norm is
//!   still reported.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
#[macro_use]
mod common;

use common::devices::{Dev, EMU, assert_bits, real_gpu, rel_close};
use common::{rng, uniform_in};
use vqx::backend::cuda::Gpu;
use vqx::backend::cuda::optim::{CLIP_SCRATCH_LEN, DeviceAdamW, clip_global_norm};
use vqx::nearest::Precision;
use vqx::train::{self, AdamW, AdamWConfig};

const SIZES: [usize; 6] = [257, 1, 10_000, 255, 1, 257];
const DECAY: [bool; 6] = [true, false, true, false, true, false];

/// Flat values split into tensors of `sizes`.
fn split(flat: &[f32], sizes: &[usize]) -> Vec<Vec<f32>> {
    let mut at = 0;
    sizes
        .iter()
        .map(|&n| {
            at += n;
            flat[at - n..at].to_vec()
        })
        .collect()
}

/// Gradients per tensor with a spread of magnitudes (and exact zeros), flat.
fn random_grads(total: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..total)
        .map(|_| match rng.gen_range(0..8) {
            0 => 0.0,
            1 => rng.gen_range(-1e-6..1e-6),
            2 => rng.gen_range(-100.0..100.0),
            _ => rng.gen_range(-1.0..1.0),
        })
        .collect()
}

/// One CPU step over `params` (tensors) with flat `grads`.
fn cpu_step(
    opt: &mut AdamW,
    params: &mut [Vec<f32>],
    grads: &[f32],
    first: usize,
    lr: f64,
    t: u64,
) {
    let g = split(grads, &SIZES);
    let mut p: Vec<&mut [f32]> = params.iter_mut().map(|v| &mut v[..]).collect();
    let gr: Vec<&[f32]> = g.iter().map(|v| &v[..]).collect();
    opt.step_from(first, &mut p, &gr, &DECAY, lr, t);
}

fn assert_optimiser<G: Gpu>(gpu: &G, dev_opt: &DeviceAdamW<G>, cpu_opt: &AdamW, context: &str) {
    let back = dev_opt.to_host(gpu).unwrap();
    assert_eq!(back.config, cpu_opt.config, "{context}: config");
    for i in 0..SIZES.len() {
        assert_bits(
            &back.m[i],
            &cpu_opt.m[i],
            &format!("{context}: m of tensor {i}"),
        );
        assert_bits(
            &back.v[i],
            &cpu_opt.v[i],
            &format!("{context}: v of tensor {i}"),
        );
    }
}

on_devices! {
    fn adamw_matches_cpu<G>(test, dev) {
        let backend = dev.backend(Precision::Exact);
        let gpu = backend.gpu();
        let total: usize = SIZES.iter().sum();
        let config = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        for (seed, first) in [(1u64, 0usize), (2, 2), (3, 1), (4, SIZES.len())] {
            let mut r = rng(seed);
            let init = uniform_in(total, 2.0, &mut r);
            let mut cpu_params = split(&init, &SIZES);
            let mut cpu_opt = AdamW::new(config, &SIZES);
            let mut dev_opt = DeviceAdamW::new(gpu, config, &SIZES, &DECAY).unwrap();
            let mut params = gpu.upload("params", &init).unwrap();
            for t in 1..=5u64 {
                let lr = 1e-3 * (1.0 + t as f64 / 3.0);
                let grads = random_grads(total, &mut r);
                let g_d = gpu.upload("grads", &grads).unwrap();
                cpu_step(&mut cpu_opt, &mut cpu_params, &grads, first, lr, t);
                dev_opt.step(gpu, &mut params, &g_d, first, lr, t).unwrap();
                let context = format!("{test}: seed {seed}, first tensor {first}, step {t}");
                let got = gpu.download("params", &params).unwrap();
                assert_bits(&got, &cpu_params.concat(), &format!("{context}: params"));
                assert_optimiser(gpu, &dev_opt, &cpu_opt, &context);
            }
            // Frozen tensors kept their values, their moments 0; the others moved.
            let got = split(&gpu.download("params", &params).unwrap(), &SIZES);
            let before = split(&init, &SIZES);
            for i in 0..SIZES.len() {
                let moved = got[i] != before[i];
                assert_eq!(moved, i >= first, "{test}: seed {seed}: tensor {i} moved: {moved}");
                assert_eq!(
                    cpu_opt.m[i].iter().any(|&v| v != 0.0),
                    i >= first,
                    "{test}: seed {seed}: tensor {i} moments"
                );
            }
        }
    }

    fn adamw_from_host_round_trip<G>(test, dev) {
        let backend = dev.backend(Precision::Exact);
        let gpu = backend.gpu();
        let total: usize = SIZES.iter().sum();
        let config = AdamWConfig::default();
        let mut r = rng(7);
        let init = uniform_in(total, 1.0, &mut r);
        // Three CPU steps, then the state to the device and back, then one step on each.
        let mut cpu_params = split(&init, &SIZES);
        let mut cpu_opt = AdamW::new(config, &SIZES);
        for t in 1..=3 {
            cpu_step(&mut cpu_opt, &mut cpu_params, &random_grads(total, &mut r), 0, 3e-3, t);
        }
        let mut dev_opt = DeviceAdamW::from_host(gpu, &cpu_opt, &DECAY).unwrap();
        assert_eq!(dev_opt.len(), total);
        assert_optimiser(gpu, &dev_opt, &cpu_opt, &format!("{test}: after from_host"));
        let mut params = gpu.upload("params", &cpu_params.concat()).unwrap();
        let grads = random_grads(total, &mut r);
        let g_d = gpu.upload("grads", &grads).unwrap();
        cpu_step(&mut cpu_opt, &mut cpu_params, &grads, 0, 2e-3, 4);
        dev_opt.step(gpu, &mut params, &g_d, 0, 2e-3, 4).unwrap();
        let got = gpu.download("params", &params).unwrap();
        assert_bits(&got, &cpu_params.concat(), &format!("{test}: step 4: params"));
        assert_optimiser(gpu, &dev_opt, &cpu_opt, &format!("{test}: step 4"));

        // Bad inputs fail without launching.
        assert!(DeviceAdamW::new(gpu, config, &SIZES, &DECAY[..2]).is_err());
        let short = gpu.upload("short", &vec![0.0f32; total - 1]).unwrap();
        assert!(dev_opt.step(gpu, &mut params, &short, 0, 1e-3, 5).is_err());
        assert!(dev_opt.step(gpu, &mut params, &g_d, SIZES.len() + 1, 1e-3, 5).is_err());
    }

    fn clip_matches_cpu<G>(test, dev) {
        let backend = dev.backend(Precision::Exact);
        let gpu = backend.gpu();
        let total: usize = SIZES.iter().sum();
        let mut scratch = gpu.alloc_zeros::<f64>("scratch", CLIP_SCRATCH_LEN).unwrap();
        let mut norm_d = gpu.alloc_zeros::<f64>("norm", 1).unwrap();
        let mut exact_cases = 0;
        // (data set, frozen tensors, max_norm as a fraction of the norm; 0 = max_norm 0).
        for (seed, first_tensor, frac) in [
            (1u64, 0usize, 0.5),
            (2, 2, 0.01),
            (3, 1, 2.0),
            (4, 0, 0.0),
            (5, 0, 0.3),
            (6, 3, 0.7),
        ] {
            let mut r = rng(seed);
            // Seeds 5 and 6: small integers, whose squares sum exactly in any order.
            let grads: Vec<f32> = if seed >= 5 {
                (0..total).map(|_| r.gen_range(-8i32..=8) as f32).collect()
            } else {
                random_grads(total, &mut r)
            };
            let first: usize = SIZES[..first_tensor].iter().sum();
            let context = format!("{test}: seed {seed}, first element {first}, max_norm {frac}·‖g‖");
            let cpu_norm_unclipped = {
                let mut g = grads[first..].to_vec();
                train::clip_global_norm(&mut [&mut g[..]], 0.0)
            };
            let max_norm = frac * cpu_norm_unclipped;
            // The CPU: the tensors after the frozen prefix.
            let mut cpu_tensors = split(&grads, &SIZES);
            let cpu_norm = {
                let mut g: Vec<&mut [f32]> =
                    cpu_tensors[first_tensor..].iter_mut().map(|v| &mut v[..]).collect();
                train::clip_global_norm(&mut g, max_norm)
            };
            let cpu_grads = cpu_tensors.concat();

            let mut g_d = gpu.upload("grads", &grads).unwrap();
            clip_global_norm(gpu, &mut g_d, first, total, max_norm, &mut scratch, &mut norm_d)
                .unwrap();
            let dev_norm = gpu.download("norm", &norm_d).unwrap()[0];
            let got = gpu.download("grads", &g_d).unwrap();
            rel_close(dev_norm, cpu_norm, 1e-12, &format!("{context}: norm"));

            // Run to run: the same norm to the bit.
            let mut again = gpu.upload("grads", &grads).unwrap();
            clip_global_norm(gpu, &mut again, first, total, max_norm, &mut scratch, &mut norm_d)
                .unwrap();
            let norm2 = gpu.download("norm", &norm_d).unwrap()[0];
            assert_eq!(norm2.to_bits(), dev_norm.to_bits(), "{context}: norm run to run");
            assert_bits(&gpu.download("grads", &again).unwrap(), &got, &format!("{context}: rerun"));

            // The CPU's scaling with the device's norm: exact whatever the norm's last bits.
            let mut want = grads.clone();
            if max_norm > 0.0 && dev_norm > max_norm {
                let s = max_norm / (dev_norm + 1e-12);
                want[first..].iter_mut().for_each(|v| *v = (*v as f64 * s) as f32);
            }
            assert_bits(&got, &want, &format!("{context}: clipped with the device norm"));
            // Frozen prefix untouched.
            assert_bits(&got[..first], &grads[..first], &format!("{context}: frozen prefix"));
            let clipped = max_norm > 0.0 && cpu_norm > max_norm;
            assert_eq!(clipped, frac > 0.0 && frac < 1.0, "{context}: clipping expected");
            if !clipped {
                assert_bits(&got, &grads, &format!("{context}: no clipping"));
            }
            if dev_norm.to_bits() == cpu_norm.to_bits() {
                exact_cases += 1;
                assert_bits(&got, &cpu_grads, &format!("{context}: clip_global_norm"));
            } else {
                assert!(seed < 5, "{context}: integer data but norms differ");
            }
        }
        assert!(exact_cases >= 2, "{test}: only {exact_cases} data sets with equal norms");

        // Bad inputs.
        let mut g_d = gpu.upload("grads", &[1.0f32; 4]).unwrap();
        assert!(clip_global_norm(gpu, &mut g_d, 0, 5, 1.0, &mut scratch, &mut norm_d).is_err());
        assert!(clip_global_norm(gpu, &mut g_d, 3, 2, 1.0, &mut scratch, &mut norm_d).is_err());
        let mut small = gpu.alloc_zeros::<f64>("scratch", CLIP_SCRATCH_LEN - 1).unwrap();
        assert!(clip_global_norm(gpu, &mut g_d, 0, 4, 1.0, &mut small, &mut norm_d).is_err());
        // An empty range: norm 0, nothing scaled.
        clip_global_norm(gpu, &mut g_d, 4, 4, 1.0, &mut scratch, &mut norm_d).unwrap();
        assert_eq!(gpu.download("norm", &norm_d).unwrap()[0], 0.0, "{test}: empty range");
    }
}
