//! Collectives over the system MPI (cargo feature `mpi`): one rank per process, launched by
//! `mpirun`/`mpiexec` or `srun`.
//!
//! Only gathers and broadcasts of bytes go over MPI; the sums of the [`Collective`] trait are
//! its default methods (gather, then add in rank order), never `MPI_Allreduce`, so every rank
//! and every rank count get the bits the module docs promise.
//!
//! **Faults.** [`Collective::abort`] prints `vqx: rank R aborts the MPI job: CAUSE` on stderr
//! and calls `MPI_Abort`: the launcher ends every rank and exits non-zero. The other ranks do
//! not see [`crate::Error::Aborted`] (their processes are ended); the cause is on stderr. In a
//! job of more than one rank, [`Mpi::init`] also makes a panic on any thread abort the job, since
//! a rank that unwinds and exits leaves the others waiting for it for ever. MPI's own errors
//! are fatal (its default error handler), so no MPI call returns a failure to ignore.

use super::Collective;
use crate::error::{Error, Result};
use mpi::Threading;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};
use std::sync::{Mutex, MutexGuard};

/// MPI's element counts are C ints: the largest message one call can carry.
const MAX_MESSAGE_BYTES: usize = i32::MAX as usize;

/// The largest receive buffer kept for the next gather; a larger one is freed after its call.
const KEPT_SCRATCH_BYTES: usize = 64 << 20;

/// This process's rank of an MPI job (`MPI_COMM_WORLD`).
///
/// Without a launcher (`./vqx` instead of `mpirun -np N ./vqx`) MPI starts as a *singleton*: a
/// job of one rank, which behaves as [`super::Single`] does.
///
/// ```
/// use vqx::collective::{Collective, mpi::Mpi};
/// // Under `mpirun -np N`, or alone as a job of one: every rank gets the sums over all ranks.
/// let mpi = Mpi::init()?;
/// let mut sums = [mpi.rank() as f64, 1.0];
/// mpi.all_reduce_sum_f64(&mut sums)?;
/// let n = mpi.size() as f64;
/// assert_eq!(sums, [n * (n - 1.0) / 2.0, n]);
/// # Ok::<(), vqx::Error>(())
/// ```
pub struct Mpi {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    /// Largest message this rank asks for in one MPI call (ranks agree on the smallest).
    max_message_bytes: usize,
    /// One thread at a time in MPI: MPI may grant no more than `Serialized`, under which calls
    /// from this rank's threads must not overlap. It guards the
    /// gathers' receive buffer, kept between calls (up to [`KEPT_SCRATCH_BYTES`]): fresh
    /// memory costs a page fault per 4 KiB, more than the copy itself.
    serial: Mutex<Vec<u8>>,
    /// Dropped last: finalizes MPI.
    _universe: Universe,
}

// SAFETY: `world` is a handle to MPI_COMM_WORLD, valid in every thread of the process; MPI was
// initialised with at least MPI_THREAD_SERIALIZED (checked in `init`), so any thread may call
// MPI as long as calls do not overlap, which `serial` ensures for every collective. `abort`
// skips the lock on purpose (see there).
unsafe impl Send for Mpi {}
// SAFETY: as for Send: every MPI call through `&Mpi` holds `serial`, except `abort`.
unsafe impl Sync for Mpi {}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish()
    }
}

impl Mpi {
    /// Initialises MPI (once per process) and joins `MPI_COMM_WORLD`. Without a launcher this
    /// is a job of one rank (MPI's singleton start), not an error.
    ///
    /// Fails when MPI was already initialised in this process (by an earlier `Mpi`, even one
    /// since dropped: MPI cannot start twice), or when the MPI library cannot serve calls
    /// from more than one thread (`MPI_THREAD_SERIALIZED`). With more than one rank it
    /// installs a panic hook that aborts the job after the usual panic message. Drop the
    /// `Mpi` on the thread that created it: dropping finalizes MPI.
    pub fn init() -> Result<Mpi> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| {
                Error::InvalidArgument(
                    "MPI is already initialised in this process: call Mpi::init once and keep \
                     the Mpi it returns"
                        .into(),
                )
            })?;
        if threading < Threading::Serialized {
            return Err(Error::internal(
                "initialising MPI",
                format!(
                    "this MPI library gives only {threading:?} threading; vqx needs at least \
                     Serialized (an MPI built with thread support)"
                ),
            ));
        }
        let world = SimpleCommunicator::world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if size > 1 {
            abort_on_panic(rank);
        }
        Ok(Mpi {
            world,
            rank,
            size,
            max_message_bytes: MAX_MESSAGE_BYTES,
            serial: Mutex::new(Vec::new()),
            _universe: universe,
        })
    }

    /// Caps the bytes of one MPI call (default and most: 2³¹ − 1, MPI's count limit). Larger
    /// gathers and broadcasts go in rounds; a smaller cap bounds the temporary receive buffer.
    /// Ranks may differ: an all-gather uses the smallest cap of all ranks, a broadcast the
    /// root's.
    ///
    /// ```
    /// use vqx::collective::{Collective, mpi::Mpi};
    /// let mpi = Mpi::init()?.with_max_message_bytes(4)?;
    /// let parts = mpi.all_gather_bytes(b"ten bytes!")?; // in rounds of at most 4 bytes
    /// assert_eq!(parts[mpi.rank()], b"ten bytes!");
    /// # Ok::<(), vqx::Error>(())
    /// ```
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Result<Mpi> {
        if bytes == 0 {
            return Err(Error::InvalidArgument(
                "the MPI message cap must be at least 1 byte, got 0".into(),
            ));
        }
        self.max_message_bytes = bytes.min(MAX_MESSAGE_BYTES);
        Ok(self)
    }

    /// The ranks on this machine: (this rank's index among them, how many there are). One
    /// GPU per local rank is the usual layout. A collective: every rank calls it.
    pub fn local_rank(&self) -> (usize, usize) {
        let _serial = self.lock();
        let node = self.world.split_shared(self.rank as i32);
        (node.rank() as usize, node.size() as usize)
    }

    // A rank that panicked while holding the lock has aborted the job (more than one rank) or
    // is the whole job; the buffer it guards holds nothing between calls.
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.serial.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut recv = self.lock();
        // Every rank learns every length (and cap) first, so all ranks plan the same rounds.
        let mine = [local.len() as u64, self.max_message_bytes as u64];
        let mut meta = vec![0u64; 2 * self.size];
        self.world.all_gather_into(&mine[..], &mut meta[..]);
        let lens: Vec<usize> = meta.chunks(2).map(|m| m[0] as usize).collect();
        let cap = meta.chunks(2).map(|m| m[1] as usize).min().unwrap_or(1);
        let plan = RoundPlan::new(&lens, cap);
        let mut parts: Vec<Vec<u8>> = lens.iter().map(|&n| Vec::with_capacity(n)).collect();
        if recv.len() < plan.largest_round() {
            recv.resize(plan.largest_round(), 0);
        }
        for round in 0..plan.rounds {
            let counts = plan.counts(round);
            let displs: Vec<i32> = counts
                .iter()
                .scan(0i32, |at, &c| {
                    let d = *at;
                    *at += c;
                    Some(d)
                })
                .collect();
            let total = counts.iter().map(|&c| c as usize).sum::<usize>();
            let from = (round * plan.share).min(local.len());
            let send = &local[from..from + counts[self.rank] as usize];
            let mut into = PartitionMut::new(&mut recv[..total], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(send, &mut into);
            for ((part, &c), &d) in parts.iter_mut().zip(&counts).zip(&displs) {
                part.extend_from_slice(&recv[d as usize..(d + c) as usize]);
            }
        }
        if recv.len() > KEPT_SCRATCH_BYTES {
            *recv = Vec::new();
        }
        Ok(parts)
    }

    fn broadcast_bytes(&self, root: usize, data: &mut Vec<u8>) -> Result<()> {
        if root >= self.size {
            return Err(Error::InvalidArgument(format!(
                "broadcast from rank {root} in a job of {} ranks",
                self.size
            )));
        }
        let _serial = self.lock();
        let from = self.world.process_at_rank(root as i32);
        // The root's length and cap first: the others size their buffers and count the same
        // rounds.
        let mut meta = [data.len() as u64, self.max_message_bytes as u64];
        from.broadcast_into(&mut meta[..]);
        if self.rank != root {
            data.clear();
            data.resize(meta[0] as usize, 0);
        }
        for chunk in data.chunks_mut(meta[1] as usize) {
            from.broadcast_into(chunk);
        }
        Ok(())
    }

    /// Prints `vqx: rank R aborts the MPI job: CAUSE` on stderr and calls `MPI_Abort`: every
    /// rank ends and the launcher exits non-zero. Does not return.
    fn abort(&self, cause: &str) {
        // Without the lock: another thread of this rank may be inside a collective that waits
        // for a rank that will never come, and the abort is what ends that wait.
        abort_world(self.rank, cause)
    }
}

/// Ends the whole job, naming this rank and why.
pub(super) fn abort_world(rank: usize, cause: &str) -> ! {
    // One write of the whole line: ranks that abort together do not interleave mid-line.
    let line = format!("vqx: rank {rank} aborts the MPI job: {cause}\n");
    std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes()).ok();
    mpi::traits::Communicator::abort(&SimpleCommunicator::world(), 1)
}

/// After the usual panic message, a panic (on any thread, caught later or not) aborts the job.
fn abort_on_panic(rank: usize) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        abort_world(rank, &format!("panicked{at}: {msg}"));
    }));
}

/// How a gather of `lens[r]` bytes from each rank r is split into MPI calls of at most `cap`
/// bytes in all: each rank sends up to `share` bytes a round.
struct RoundPlan<'a> {
    lens: &'a [usize],
    share: usize,
    rounds: usize,
}

impl<'a> RoundPlan<'a> {
    fn new(lens: &'a [usize], cap: usize) -> Self {
        let share = (cap / lens.len().max(1)).max(1);
        let rounds = lens.iter().map(|n| n.div_ceil(share)).max().unwrap_or(0);
        RoundPlan {
            lens,
            share,
            rounds,
        }
    }

    /// What each rank sends in `round`.
    fn counts(&self, round: usize) -> Vec<i32> {
        let from = round * self.share;
        // `share` ≤ cap ≤ i32::MAX, so each count fits.
        self.lens
            .iter()
            .map(|&n| n.saturating_sub(from).min(self.share) as i32)
            .collect()
    }

    /// Bytes of the largest round: the first, since every rank's count only shrinks.
    fn largest_round(&self) -> usize {
        match self.rounds {
            0 => 0,
            _ => self.counts(0).iter().map(|&c| c as usize).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RoundPlan;

    #[test]
    fn rounds_carry_every_byte_once_within_the_cap() {
        for (lens, cap) in [
            (vec![0, 0], 8),
            (vec![5, 0, 17], 6),
            (vec![3], 1),
            (vec![10, 10], 3),
            (vec![1, 2, 3, 4, 5], 2),
        ] {
            let plan = RoundPlan::new(&lens, cap);
            let mut sent = vec![0usize; lens.len()];
            for round in 0..plan.rounds {
                let counts = plan.counts(round);
                let total: usize = counts.iter().map(|&c| c as usize).sum();
                assert!(total <= cap.max(lens.len()), "{lens:?} cap {cap}");
                assert!(total <= plan.largest_round(), "{lens:?} cap {cap}");
                for (s, c) in sent.iter_mut().zip(counts) {
                    *s += c as usize;
                }
            }
            assert_eq!(sent, lens, "cap {cap}");
        }
    }
}
