//! Compiles `kernels/*.cu` to PTX with nvcc and embeds it (src/backend/cuda.rs includes the
//! files from OUT_DIR behind `cfg(vqx_kernels)`).
//!
//! nvcc is looked up in this order: env `NVCC` (the path of the binary), `CUDA_HOME/bin/nvcc`,
//! `CUDA_PATH/bin/nvcc`, then `nvcc` on `PATH`. Without nvcc the build still succeeds, prints a
//! warning, and the crate reports "kernels not compiled"; with `VQX_REQUIRE_NVCC=1` a missing nvcc
//! or a failed compile is a build error instead.
//!
//! PTX is generated for `compute_80`, so one build loads (JIT) on A100- and H100-class GPUs.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One PTX module per op family; cuda.rs expects exactly these names.
const KERNELS: [&str; 5] = ["nearest", "nearest_tc", "gather", "ema", "usage"];
/// The virtual architecture the PTX targets.
const ARCH: &str = "compute_80";

fn main() {
    println!("cargo:rustc-check-cfg=cfg(vqx_kernels)");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for k in KERNELS {
        println!("cargo:rerun-if-changed=kernels/{k}.cu");
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "VQX_REQUIRE_NVCC"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let require = env::var("VQX_REQUIRE_NVCC").is_ok_and(|v| !v.is_empty() && v != "0");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    let Some(nvcc) = find_nvcc() else {
        let msg = "nvcc not found (set NVCC or CUDA_HOME): CUDA kernels not compiled, \
                   the CUDA backend will report itself unavailable";
        if require {
            panic!("VQX_REQUIRE_NVCC is set but {msg}");
        }
        println!("cargo:warning={msg}");
        println!(
            "cargo:rustc-env=VQX_KERNELS_STATUS=kernels not compiled: nvcc not found (set NVCC or CUDA_HOME)"
        );
        return;
    };

    let mut failures = Vec::new();
    for k in KERNELS {
        let src = Path::new("kernels").join(format!("{k}.cu"));
        let dst = out_dir.join(format!("{k}.ptx"));
        let result = Command::new(&nvcc)
            .arg(format!("-arch={ARCH}"))
            .args(["-ptx", "-O3", "-std=c++17", "-lineinfo", "-o"])
            .arg(&dst)
            .arg(&src)
            .output();
        match result {
            Ok(out) if out.status.success() => {}
            Ok(out) => failures.push(format!(
                "{} -arch={ARCH} -ptx {} failed ({}):\n{}{}",
                nvcc.display(),
                src.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )),
            Err(e) => failures.push(format!("could not run {}: {e}", nvcc.display())),
        }
    }

    if failures.is_empty() {
        println!("cargo:rustc-cfg=vqx_kernels");
        println!(
            "cargo:rustc-env=VQX_KERNELS_STATUS=kernels compiled to {ARCH} PTX by {}",
            nvcc.display()
        );
    } else if require {
        panic!(
            "VQX_REQUIRE_NVCC is set and kernel compilation failed:\n{}",
            failures.join("\n")
        );
    } else {
        for f in &failures {
            for line in f.lines() {
                println!("cargo:warning={line}");
            }
        }
        println!("cargo:warning=CUDA kernels not compiled: the CUDA backend will be unavailable");
        println!(
            "cargo:rustc-env=VQX_KERNELS_STATUS=kernels not compiled: nvcc {} failed (see the build warnings)",
            nvcc.display()
        );
    }
}

/// NVCC, then CUDA_HOME/bin/nvcc, CUDA_PATH/bin/nvcc, then the PATH.
fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        // An explicit NVCC that does not exist is reported, not silently replaced.
        if p.is_file() {
            return Some(p);
        }
        println!("cargo:warning=NVCC={} is not a file", p.display());
        return None;
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var).filter(|p| !p.is_empty()) {
            let p = Path::new(&home).join("bin").join(exe("nvcc"));
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(exe("nvcc")))
        .find(|p| p.is_file())
}

fn exe(name: &str) -> String {
    format!("{name}{}", env::consts::EXE_SUFFIX)
}
