//! `vqx info`: what this build and this machine can run.

use serde::Serialize;
use vqx::Result;
use vqx::backend::cuda::{self, CudaStatus, EmuGpu};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Info {
    version: &'static str,
    cpu: CpuInfo,
    cuda: CudaStatus,
    cuda_emu: EmuInfo,
    default_backend: &'static str,
    /// The collectives of data-parallel jobs compiled into this build.
    collectives: Vec<&'static str>,
}

/// The emulated device: always compiled in, never chosen by `--device auto`.
#[derive(Serialize)]
struct EmuInfo {
    available: bool,
    runtime: String,
    sanitizers: &'static str,
}

#[derive(Serialize)]
struct CpuInfo {
    available: bool,
    rayon_threads: usize,
}

pub fn run(args: Args) -> Result<()> {
    let cuda = cuda::status();
    let info = Info {
        version: env!("CARGO_PKG_VERSION"),
        cpu: CpuInfo {
            available: true,
            rayon_threads: rayon::current_num_threads(),
        },
        default_backend: if cuda.available { "cuda" } else { "cpu" },
        collectives: vqx::collective::compiled(),
        cuda,
        cuda_emu: EmuInfo {
            available: EmuGpu::new().is_ok(),
            runtime: EmuGpu::runtime(),
            sanitizers: cuda::emu::SANITIZE,
        },
    };
    if args.json {
        println!("{}", super::report::json(&info, "the report")?);
        return Ok(());
    }
    let c = &info.cuda;
    println!("vqx {}", info.version);
    println!(
        "cpu backend:  available ({} rayon threads)",
        info.cpu.rayon_threads
    );
    if c.available {
        println!("cuda backend: available");
    } else {
        println!("cuda backend: unavailable: {}", c.reason);
    }
    let e = &info.cuda_emu;
    println!(
        "cuda-emu:     {} (--device cuda-emu: the CUDA kernels on an emulated device on the CPU; \
         slow, for checking, never chosen by auto; {}; sanitizers: {})",
        if e.available {
            "available"
        } else {
            "unavailable"
        },
        e.runtime,
        e.sanitizers
    );
    if let Some(name) = &c.device_name {
        match c.compute_capability {
            Some((major, minor)) => {
                println!("gpu:          {name} (compute capability {major}.{minor})")
            }
            None => println!("gpu:          {name}"),
        }
    } else {
        println!("gpu:          none found");
    }
    println!(
        "kernels:      {}",
        if c.kernels_compiled {
            "compiled into this build (PTX for a real GPU; cuda-emu runs the same .cu files)"
        } else {
            "not compiled into this build (no PTX for a real GPU; cuda-emu runs the .cu files)"
        }
    );
    println!("default:      {} (--device auto)", info.default_backend);
    println!(
        "collectives:  {} (compiled in; mpi and nccl are the cargo features of those names)",
        info.collectives.join(", ")
    );
    Ok(())
}
