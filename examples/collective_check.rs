//! Every collective of an MPI (or NCCL) job, checked on every rank against what one process
//! computes from all ranks' inputs, plus the fault paths and a timing. Run by
//! `tests/collective_mpi.rs`; by hand:
//!
//! ```text
//! cargo build --release --features mpi --example collective_check
//! X=target/release/examples/collective_check
//! mpirun -np 2 $X check          # every collective; prints "rank R: all checks passed"
//! mpirun -np 2 $X check-capped   # the same with rank 0 capping MPI messages at 7 bytes
//! mpirun -np 2 $X abort          # rank 1 aborts with a cause: the job ends non-zero
//! mpirun -np 2 $X panic          # rank 1 panics: the job ends non-zero
//! mpirun -np 2 --bind-to none $X bench   # one 1 MiB f64 all-reduce, median of 100
//! ```
//!
//! A second argument `nccl` (cargo feature `nccl`) runs the same over NCCL, one GPU per rank.
//! A check that fails aborts the job with the mismatch as its cause, so a failure is never a
//! hang and always a non-zero exit.

use std::time::Instant;
use vqx::collective::Collective;
use vqx::collective::mpi::Mpi;
use vqx::{Error, Result};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("check");
    let transport = args.get(1).map(String::as_str).unwrap_or("mpi");
    let c = match connect(mode, transport) {
        Ok(c) => c,
        Err(e) => {
            // Every rank fails alike here (MPI start-up, or NCCL's agreed refusal).
            eprintln!("collective_check: {e}");
            std::process::exit(2);
        }
    };
    let out = match mode {
        "check" | "check-capped" => check(&*c),
        "abort" => fail_on_rank_1(&*c, false),
        "panic" => fail_on_rank_1(&*c, true),
        "bench" => bench(&*c, transport == "mpi"),
        other => Err(Error::InvalidArgument(format!(
            "unknown mode {other:?}: check, check-capped, abort, panic or bench"
        ))),
    };
    if let Err(e) = out {
        c.abort(&e.to_string());
    }
}

fn connect(mode: &str, transport: &str) -> Result<Box<dyn Collective>> {
    let mut mpi = Mpi::init()?;
    if mode == "check-capped" && mpi.rank() == 0 {
        mpi = mpi.with_max_message_bytes(7)?;
    }
    match transport {
        "mpi" => Ok(Box::new(mpi)),
        #[cfg(feature = "nccl")]
        "nccl" => Ok(Box::new(vqx::collective::nccl::Nccl::init(mpi)?)),
        other => Err(Error::InvalidArgument(format!(
            "unknown transport {other:?}: mpi{}",
            if cfg!(feature = "nccl") {
                " or nccl"
            } else {
                " (nccl needs the cargo feature nccl)"
            }
        ))),
    }
}

/// Rank `r`'s partial sums: values of many magnitudes and both signs, an element whose sum
/// depends on the order of the additions (1e16 on rank 0, then 1.0 from each other rank:
/// each 1.0 is lost when added after 1e16, kept when the 1.0s are added first), and -0.0.
fn f64_part(r: usize, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| match i {
            0 if r == 0 => 1e16,
            0 => 1.0,
            1 => -0.0,
            _ => {
                let h = (r as u64 * 7919 + i as u64 * 104_729) % 1_000_003;
                let sign = if h.is_multiple_of(3) { -1.0 } else { 1.0 };
                sign * h as f64 * 10f64.powi((i % 41) as i32 - 20)
            }
        })
        .collect()
}

fn bytes_of(r: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (r * 31 + i * 7) as u8).collect()
}

fn expect(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::internal("collective_check", what()))
    }
}

fn check(c: &dyn Collective) -> Result<()> {
    let (rank, size) = (c.rank(), c.size());
    let say = |what: String| println!("rank {rank}/{size}: {what}");

    // f64: every rank's sums, bit for bit those of one process adding the parts in rank order.
    let n = 1000;
    let mut sums = f64_part(rank, n);
    c.all_reduce_sum_f64(&mut sums)?;
    let mut want = vec![0.0f64; n];
    for r in 0..size {
        for (w, p) in want.iter_mut().zip(f64_part(r, n)) {
            *w += p;
        }
    }
    for (i, (g, w)) in sums.iter().zip(&want).enumerate() {
        expect(g.to_bits() == w.to_bits(), || {
            format!(
                "f64 sum element {i}: {g:e} ({:#x}), one process: {w:e} ({:#x})",
                g.to_bits(),
                w.to_bits()
            )
        })?;
    }
    let checksum = sums
        .iter()
        .fold(0u64, |h, v| h.rotate_left(5) ^ v.to_bits());
    say(format!(
        "f64 all-reduce of {n} elements bit-identical to one process \
         (element 0 = {:e}, bits checksum {checksum:#018x})",
        sums[0]
    ));

    // Integers: exact; an overflow is the same error on every rank.
    let mut u = [rank as u64 * 1_000_000_000_007, u64::MAX / size as u64, 1];
    c.all_reduce_sum_u64(&mut u)?;
    let want_u0 = (0..size as u64).map(|r| r * 1_000_000_000_007).sum::<u64>();
    expect(
        u == [want_u0, (u64::MAX / size as u64) * size as u64, size as u64],
        || format!("u64 sums {u:?}"),
    )?;
    let mut w = [rank as u32 + 1, 7];
    c.all_reduce_sum_u32(&mut w)?;
    let want_w0 = (1..=size as u32).sum::<u32>();
    expect(w == [want_w0, 7 * size as u32], || {
        format!("u32 sums {w:?}")
    })?;
    say(format!("u64 sums {u:?}, u32 sums {w:?}: exact"));
    if size > 1 {
        let err = c
            .all_reduce_sum_u32(&mut [u32::MAX])
            .err()
            .map(|e| e.to_string());
        expect(
            err.as_deref()
                .is_some_and(|e| e.contains("overflows at element 0")),
            || format!("u32 overflow gave {err:?}"),
        )?;
        // Ranks whose buffers differ in length: refused alike on every rank.
        let err = c
            .all_reduce_sum_f64(&mut vec![0.0; 1 + rank])
            .err()
            .map(|e| e.to_string());
        expect(
            err.as_deref()
                .is_some_and(|e| e.contains("expected 8 bytes (rank 0), got 16 bytes on rank 1")),
            || format!("different lengths gave {err:?}"),
        )?;
        say("overflow and different lengths refused on every rank".into());
    }

    // All-gather with different lengths per rank (rank 0 sends nothing), small and large.
    for unit in [3, 300_001] {
        let parts = c.all_gather_bytes(&bytes_of(rank, rank * unit))?;
        expect(parts.len() == size, || format!("{} parts", parts.len()))?;
        for (r, p) in parts.iter().enumerate() {
            expect(*p == bytes_of(r, r * unit), || {
                format!(
                    "all-gather part {r}: {} bytes, not the {} sent",
                    p.len(),
                    r * unit
                )
            })?;
        }
        let lens: Vec<usize> = parts.iter().map(Vec::len).collect();
        say(format!("all-gather of {lens:?} bytes: every part as sent"));
    }

    // Broadcast from the last rank, over other ranks' bytes of another length; then nothing.
    let root = size - 1;
    let sent = bytes_of(root, 1_000_003);
    let mut data = if rank == root {
        sent.clone()
    } else {
        vec![9; 17]
    };
    c.broadcast_bytes(root, &mut data)?;
    expect(data == sent, || {
        format!("broadcast from rank {root}: {} bytes differ", data.len())
    })?;
    let mut empty = if rank == 0 { Vec::new() } else { vec![1, 2, 3] };
    c.broadcast_bytes(0, &mut empty)?;
    expect(empty.is_empty(), || {
        format!("empty broadcast left {empty:?}")
    })?;
    let err = c
        .broadcast_bytes(size, &mut Vec::new())
        .err()
        .map(|e| e.to_string());
    expect(
        err.as_deref()
            .is_some_and(|e| e.contains(&format!("rank {size} in a job of {size}"))),
        || format!("broadcast from rank {size} gave {err:?}"),
    )?;
    say(format!(
        "broadcast of {} bytes from rank {root} and of 0 bytes from rank 0 delivered; \
         rank {size} refused",
        sent.len()
    ));
    say("all checks passed".into());
    Ok(())
}

/// Rank 1 aborts (or panics) while the other ranks wait for it in a collective.
fn fail_on_rank_1(c: &dyn Collective, panic: bool) -> Result<()> {
    if c.size() < 2 {
        return Err(Error::InvalidArgument(
            "abort and panic need 2 ranks or more".into(),
        ));
    }
    if c.rank() == 1 {
        if panic {
            panic!("shard 1 is corrupt");
        }
        c.abort("disk full while reading shard 1");
        return Err(Error::internal(
            "abort",
            "returned instead of ending the job",
        ));
    }
    c.all_gather_bytes(b"waiting for rank 1")?;
    Err(Error::internal(
        "the collective",
        "finished without rank 1 instead of ending with the job",
    ))
}

/// One all-reduce of 1 MiB of f64 (131072 elements), 100 times: median of the slowest rank's
/// time per call; with MPI, `MPI_Allreduce` of the same buffer for comparison (its sums are
/// not the deterministic ones vqx uses).
fn bench(c: &dyn Collective, native: bool) -> Result<()> {
    let n = (1 << 20) / 8;
    let part = f64_part(c.rank(), n);
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<Vec<f64>> {
        let mut times = Vec::new();
        for i in 0..105 {
            c.all_gather_bytes(&[])?; // start together
            let t = Instant::now();
            f()?;
            if i >= 5 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        slowest_rank_median(c, &times)
    };
    let vqx = time(&mut || {
        let mut buf = part.clone();
        c.all_reduce_sum_f64(&mut buf)
    })?;
    report(
        c,
        "vqx all_reduce_sum_f64 (gather, add in rank order)",
        &vqx,
    );
    if native {
        use mpi::collective::SystemOperation;
        use mpi::traits::CommunicatorCollectives;
        let world = mpi::topology::SimpleCommunicator::world();
        let native = time(&mut || {
            let mut buf = vec![0.0f64; n];
            world.all_reduce_into(&part[..], &mut buf[..], SystemOperation::sum());
            Ok(())
        })?;
        report(
            c,
            "MPI_Allreduce sum (for comparison; not deterministic)",
            &native,
        );
    }
    Ok(())
}

/// Per call, the slowest rank's time; then the median, min and max over calls.
fn slowest_rank_median(c: &dyn Collective, times: &[f64]) -> Result<Vec<f64>> {
    let all = c.all_gather_bytes(bytemuck::cast_slice(times))?;
    let mut slowest: Vec<f64> = (0..times.len())
        .map(|i| {
            all.iter()
                .map(|p| bytemuck::pod_read_unaligned::<f64>(&p[8 * i..8 * i + 8]))
                .fold(0.0, f64::max)
        })
        .collect();
    slowest.sort_by(f64::total_cmp);
    Ok(slowest)
}

fn report(c: &dyn Collective, what: &str, sorted: &[f64]) {
    if c.rank() == 0 {
        let us = |s: f64| s * 1e6;
        println!(
            "{what}: 1 MiB f64, {} ranks, {} calls: median {:.0} µs (min {:.0}, max {:.0})",
            c.size(),
            sorted.len(),
            us(sorted[sorted.len() / 2]),
            us(sorted[0]),
            us(sorted[sorted.len() - 1])
        );
    }
}
