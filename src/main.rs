//! `vqx`: quantize vectors against a codebook, benchmark the primitives, report the backends.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    keep_freed_memory();
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) => {
            // --help and --version print to stdout and succeed; usage errors exit with 1 like
            // every other error.
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Stops glibc's malloc from handing large freed blocks back to the kernel. A Lloyd pass
/// allocates and frees buffers of O(N) rows (search results, bounds, sums); by default glibc
/// unmaps or trims them on free, so every pass page-faults them back in and the kernel zeroes
/// them again: a tenth of `vqx fit`'s time at K = 256 on 117,659 rows (perf, 2026-12-02). With
/// both thresholds high, freed blocks stay in the heap for the next pass. The library leaves
/// the allocator to the program that embeds it.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's <malloc.h>: M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3.
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
        unsafe {
            mallopt(-1, 1 << 30);
            // 32 MiB: the largest mmap threshold glibc accepts on 64-bit targets.
            mallopt(-3, 32 << 20);
        }
    }
}
