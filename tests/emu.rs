//! The emulated device itself: its warp collectives compute what CUDA's do, and the kernel bugs
//! it exists to catch (emu/faults.cu) end the launch with an error naming the kernel, block,
//! thread and source line — never a hang. A launch whose arguments do not match the kernel's
//! parameters, or whose shape CUDA would refuse, is refused before anything runs.

use vqx::backend::cuda::{Arg, EmuGpu, Gpu, LaunchShape, kernels};

/// Launches an emu/faults.cu kernel over `blocks` × `threads`; Ok(out) or the error text.
fn run_fault(name: &str, blocks: u32, threads: u32) -> Result<Vec<u32>, String> {
    let gpu = EmuGpu::new().unwrap();
    let mut out = gpu
        .alloc_zeros::<u32>("out", (blocks * threads) as usize)
        .unwrap();
    // SAFETY: every kernel of emu/faults.cu takes one int* holding ≥ blocks · threads values
    // and writes out[blockIdx.x · blockDim.x + threadIdx.x] at most.
    let r = unsafe {
        gpu.launch_by_name(
            name,
            LaunchShape::linear(blocks, threads),
            &mut [Arg::U32Mut(&mut out)],
        )
    };
    match r {
        Ok(()) => Ok(gpu.download("out", &out).unwrap()),
        Err(e) => Err(e.to_string()),
    }
}

fn expect_error(name: &str, threads: u32, wants: &[&str]) {
    let err = run_fault(name, 1, threads).expect_err(name);
    for want in wants {
        assert!(
            err.contains(want),
            "{name}: error {err:?} does not say {want:?}"
        );
    }
}

#[test]
fn warp_collectives_compute_what_cuda_does() {
    // Two warps: warp sums 528 and 1552 (lanes 1..=32 and 33..=64), block sum 2080.
    let out = run_fault("emu_ok_collectives", 1, 64).unwrap();
    for (t, &v) in out.iter().enumerate() {
        assert_eq!(
            v as i32, 2080,
            "thread {t}: {v} (negative: its shuffle/ballot check failed)"
        );
    }
    // Many blocks over the pool: each block's shared memory is its own.
    let out = run_fault("emu_ok_collectives", 37, 96).unwrap();
    let want: i32 = (1..=96).sum();
    assert!(out.iter().all(|&v| v as i32 == want), "{:?}", &out[..8]);
}

#[test]
fn threads_at_different_barriers_are_an_error() {
    expect_error(
        "emu_fault_divergent_barrier",
        64,
        &[
            "emu_fault_divergent_barrier",
            "block (0,0,0)",
            "different barriers",
            "faults.cu:",
        ],
    );
}

#[test]
fn a_thread_exiting_before_a_barrier_is_an_error() {
    expect_error(
        "emu_fault_early_exit",
        64,
        &["thread (3,0,0)", "__syncthreads", "exited"],
    );
}

#[test]
fn a_lane_missing_from_a_shuffle_is_an_error() {
    expect_error(
        "emu_fault_shuffle_missing_lane",
        32,
        &["thread (7,0,0)", "exited while lanes", "__shfl_xor_sync"],
    );
}

#[test]
fn a_lane_outside_the_mask_is_an_error() {
    expect_error(
        "emu_fault_lane_outside_mask",
        32,
        &["mask 0x0000ffff", "leaves it out"],
    );
}

#[test]
fn a_shuffle_waiting_on_a_barrier_is_an_error_not_a_hang() {
    expect_error(
        "emu_fault_shuffle_vs_barrier",
        32,
        &["__syncthreads", "__shfl_xor_sync"],
    );
}

#[test]
fn lanes_in_different_shuffles_are_an_error() {
    expect_error(
        "emu_fault_divergent_shuffle",
        32,
        &["while lanes", "__shfl_xor_sync"],
    );
}

#[test]
fn a_launch_must_match_the_kernel_parameters() {
    let gpu = EmuGpu::new().unwrap();
    let mut out = gpu.alloc_zeros::<u32>("out", 32).unwrap();
    let shape = LaunchShape::linear(1, 32);
    // An int where the kernel takes a long long.
    // SAFETY: refused before the kernel runs (argument 1 is 4 bytes, the parameter 8).
    let err = unsafe {
        gpu.launch_by_name(
            "emu_fault_takes_i64",
            shape,
            &mut [Arg::U32Mut(&mut out), Arg::I32(32)],
        )
    }
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("argument 1 is 4 bytes") && err.contains("8 bytes"),
        "{err}"
    );
    // SAFETY: refused before the kernel runs (one argument missing).
    let err =
        unsafe { gpu.launch_by_name("emu_fault_takes_i64", shape, &mut [Arg::U32Mut(&mut out)]) }
            .unwrap_err()
            .to_string();
    assert!(err.contains("1 arguments, the kernel takes 2"), "{err}");
    // The right arguments run.
    // SAFETY: out holds 32 ints, the kernel writes out[t] for t < 32.
    unsafe {
        gpu.launch_by_name(
            "emu_fault_takes_i64",
            shape,
            &mut [Arg::U32Mut(&mut out), Arg::I64(32)],
        )
    }
    .unwrap();
    assert_eq!(gpu.download("out", &out).unwrap(), vec![1; 32]);
}

#[test]
fn every_product_kernel_records_its_parameters() {
    let gpu = EmuGpu::new().unwrap();
    // nearest_f32(const float*, const float*, const float*, u32*, float*, float*, i64, i64, int)
    assert_eq!(
        gpu.param_sizes(kernels::NEAREST_F32),
        vec![8, 8, 8, 8, 8, 8, 8, 8, 4]
    );
    // usage_u32(const u32*, u32*, i64 n, unsigned k, int privatised)
    assert_eq!(gpu.param_sizes(kernels::USAGE_U32), vec![8, 8, 8, 4, 4]);
    for k in kernels::KernelId::all() {
        assert!(!gpu.param_sizes(k).is_empty(), "{}", k.name());
    }
}

#[test]
fn shapes_cuda_refuses_are_refused() {
    let gpu = EmuGpu::new().unwrap();
    let mut out = gpu.alloc_zeros::<u32>("out", 2048).unwrap();
    for (shape, want) in [
        (LaunchShape::linear(1, 2048), "exceeds CUDA's limits"),
        (LaunchShape::linear(0, 32), "zero dimension"),
        (
            LaunchShape {
                shared_bytes: 64 * 1024,
                ..LaunchShape::linear(1, 32)
            },
            "dynamic shared memory",
        ),
    ] {
        // SAFETY: refused before the kernel runs.
        let err = unsafe {
            gpu.launch_by_name("emu_ok_collectives", shape, &mut [Arg::U32Mut(&mut out)])
        }
        .unwrap_err()
        .to_string();
        assert!(err.contains(want), "{shape:?}: {err}");
    }
}

/// Run in a child process by `an_endless_loop_aborts_with_a_message_not_a_hang`.
#[test]
#[ignore = "aborts its process: run by an_endless_loop_aborts_with_a_message_not_a_hang"]
fn endless_loop_child() {
    run_fault("emu_fault_endless_loop", 1, 32).ok();
    unreachable!("the watchdog aborts the process before the launch returns");
}

#[test]
fn an_endless_loop_aborts_with_a_message_not_a_hang() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "endless_loop_child", "--ignored", "--nocapture"])
        .env("VQX_EMU_STALL_S", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the child must not succeed: {stderr}"
    );
    assert!(
        stderr.contains("emu_fault_endless_loop made no progress")
            && stderr.contains("endless loop"),
        "{stderr}"
    );
}
