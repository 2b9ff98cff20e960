//! `vqx info`: what this build and this machine can run.

use serde::Serialize;
use vqx::Result;
use vqx::backend::cuda::{self, CudaStatus};

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
    default_backend: &'static str,
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
        cuda,
    };
    if args.json {
        let text = serde_json::to_string_pretty(&info)
            .map_err(|e| vqx::Error::InvalidArgument(format!("cannot encode JSON: {e}")))?;
        println!("{text}");
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
            "compiled into this build"
        } else {
            "not compiled into this build"
        }
    );
    println!("default:      {} (--device auto)", info.default_backend);
    Ok(())
}
