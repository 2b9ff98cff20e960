//! Collectives for data-parallel jobs: the few operations a VQ fit or training step needs across
//! ranks (processes or threads that each hold a shard of the data), behind one small trait.
//!
//! - [`Single`]: one rank, no dependency; every collective is the identity.
//! - [`in_process::run`]: N ranks as threads of this process, so every multi-rank code path runs
//!   in a plain `cargo test`.
//! - [`mpi::Mpi`] (cargo feature `mpi`): one rank per process over the system MPI, launched by
//!   `mpirun` or `srun`.
//! - [`nccl::Nccl`] (cargo feature `nccl`, which implies `mpi`): the bytes travel between GPUs
//!   over NCCL, one GPU per rank of a machine; set up over MPI.
//!
//! [`compiled`] says which of these a build has.
//!
//! **Determinism.** The f64 all-reduce does not use a transport's own summation (MPI's and
//! NCCL's orders change with the algorithm and the message size, so the last bits of a sum
//! differ between runs and rank counts): every rank gathers all ranks' partial sums and adds
//! them in rank order, so every rank gets the same bits, and S ranks give the bits a single
//! process gets when it adds S shards' partial sums in shard order. Integer sums are exact in
//! any order; an overflow is an error, never a wrapped count.
//!
//! **Faults.** A rank that fails calls [`Collective::abort`]: every other rank's current or next
//! collective returns [`Error::Aborted`] naming the failed rank and its cause, instead of
//! waiting forever for it.
//!
//! ```
//! use vqx::collective::{Collective, in_process};
//! // Three ranks, each with a partial sum; every rank gets the same total.
//! let totals = in_process::run(3, |c| {
//!     let mut v = [c.rank() as f64 + 0.5, 1.0];
//!     c.all_reduce_sum_f64(&mut v)?;
//!     Ok(v)
//! })?;
//! assert_eq!(totals, vec![[4.5, 3.0]; 3]);
//! # Ok::<(), vqx::Error>(())
//! ```

pub mod in_process;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

use crate::error::{Error, Result};

/// The collectives compiled into this build, by name: always `single` and `in-process`, then
/// `mpi` and `nccl` when built with those cargo features.
///
/// ```
/// let names = vqx::collective::compiled();
/// assert_eq!(names[..2], ["single", "in-process"]);
/// assert_eq!(names.contains(&"mpi"), cfg!(feature = "mpi"));
/// ```
pub fn compiled() -> Vec<&'static str> {
    let mut names = vec!["single", "in-process"];
    if cfg!(feature = "mpi") {
        names.push("mpi");
    }
    if cfg!(feature = "nccl") {
        names.push("nccl");
    }
    names
}

/// The operations a data-parallel job needs across its ranks. Every rank must call the same
/// collectives in the same order (as with MPI); a rank that cannot must [`Collective::abort`].
pub trait Collective: Send + Sync {
    /// This rank, in `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Every rank's `local` bytes, in rank order: the same vector on every rank.
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// `data` as `root` holds it, delivered to every rank (the other ranks' `data` is replaced).
    fn broadcast_bytes(&self, root: usize, data: &mut Vec<u8>) -> Result<()>;
    /// Ends the job: every rank's current or next collective fails with [`Error::Aborted`]
    /// naming this rank and `cause`.
    fn abort(&self, cause: &str);

    /// Element-wise sum over ranks, added in rank order on every rank (see the module docs).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        sum_over_ranks(self, buf, "f64", 0.0, |a, b| Some(a + b))
    }

    /// Element-wise exact sum over ranks; an overflow is an error on every rank.
    fn all_reduce_sum_u64(&self, buf: &mut [u64]) -> Result<()> {
        sum_over_ranks(self, buf, "u64", 0, u64::checked_add)
    }

    /// Element-wise exact sum over ranks; an overflow is an error on every rank.
    fn all_reduce_sum_u32(&self, buf: &mut [u32]) -> Result<()> {
        sum_over_ranks(self, buf, "u32", 0, u32::checked_add)
    }
}

/// `buf` summed element-wise over ranks: every rank's values gathered, then folded from `zero`
/// with `add` in rank order (`None` from `add` is an overflow), the same on every rank.
fn sum_over_ranks<C: Collective + ?Sized, T: bytemuck::Pod>(
    c: &C,
    buf: &mut [T],
    ty: &str,
    zero: T,
    add: impl Fn(T, T) -> Option<T>,
) -> Result<()> {
    let parts = c.all_gather_bytes(bytemuck::cast_slice(buf))?;
    // Ranks whose buffers differ in length are not in the same collective: refused alike on
    // every rank, since every rank sees the same parts.
    if let Some((r, p)) = parts
        .iter()
        .enumerate()
        .find(|(_, p)| p.len() != parts[0].len())
    {
        return Err(Error::shape(
            format!("{ty} all-reduce across ranks"),
            format!("{} bytes (rank 0)", parts[0].len()),
            format!("{} bytes on rank {r}", p.len()),
        ));
    }
    // Rank by rank over the whole buffer (each element still gets ((zero + p0) + p1) + …, the
    // rank order): a streaming loop, not a walk across every rank's vector per element.
    let width = std::mem::size_of::<T>();
    buf.fill(zero);
    let mut overflow: Option<usize> = None;
    for p in &parts {
        // Unaligned reads: gathered byte vectors carry no alignment guarantee.
        for (i, (v, b)) in buf.iter_mut().zip(p.chunks_exact(width)).enumerate() {
            match add(*v, bytemuck::pod_read_unaligned(b)) {
                Some(sum) => *v = sum,
                // The first element (by index) whose sum fails, whichever rank's term fails it.
                None => overflow = Some(overflow.map_or(i, |o| o.min(i))),
            }
        }
    }
    if let Some(i) = overflow {
        return Err(Error::InvalidArgument(format!(
            "{ty} all-reduce overflows at element {i}: the sum over ranks does not fit"
        )));
    }
    Ok(())
}

/// One rank: the job as it runs without a launcher. Every collective returns its input.
///
/// ```
/// use vqx::collective::{Collective, Single};
/// let mut v = [1.5f64, 2.0];
/// Single.all_reduce_sum_f64(&mut v)?;
/// assert_eq!((Single.rank(), Single.size(), v), (0, 1, [1.5, 2.0]));
/// # Ok::<(), vqx::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![local.to_vec()])
    }
    fn broadcast_bytes(&self, root: usize, _data: &mut Vec<u8>) -> Result<()> {
        if root != 0 {
            return Err(Error::InvalidArgument(format!(
                "broadcast from rank {root} in a job of 1 rank"
            )));
        }
        Ok(())
    }
    // Nothing else waits on a single rank: its caller reports the cause itself.
    fn abort(&self, _cause: &str) {}
}
