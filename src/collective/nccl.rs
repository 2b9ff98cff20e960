//! Collectives over NCCL between GPUs (cargo feature `nccl`, which implies `mpi`): one rank per
//! process and one GPU per rank (local rank r of a machine uses its GPU r, or the one GPU it
//! sees when the launcher gives each rank its own).
//!
//! MPI sets the job up (who is where, NCCL's unique id from rank 0) and carries the few bytes of
//! metadata of each collective (lengths); the payload goes over NCCL. For now the payload is
//! host bytes: each collective uploads them, runs the NCCL all-gather or broadcast on device
//! buffers and downloads the result, so it pays two copies a call; collectives on buffers that
//! already live on the GPU are to come. As with [`super::mpi::Mpi`], the sums are the trait's
//! default methods (gathered, added in rank order on the host), never NCCL's all-reduce.
//!
//! libcuda and libnccl are loaded at run time: this compiles on a machine with neither, and
//! [`Nccl::init`] says which is missing. cudarc looks for `libnccl.so` (and `.so.1`, `.so.9` to
//! `.so.13`), not `libnccl.so.2`, the name NCCL ships: a machine with only the runtime library
//! needs a symlink `libnccl.so -> libnccl.so.2` on its library path.

use super::Collective;
use super::mpi::{Mpi, abort_world};
use crate::backend::cuda::driver::open_context;
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaStream, DriverError};
use cudarc::nccl::{Comm, Id, result::NcclError};
use std::panic::catch_unwind;
use std::sync::{Arc, Mutex, MutexGuard};

/// This process's rank of an NCCL job, on its own GPU.
///
/// ```no_run
/// use vqx::collective::{Collective, mpi::Mpi, nccl::Nccl};
/// // Under `mpirun -np 2` on a machine with 2 GPUs.
/// let nccl = Nccl::init(Mpi::init()?)?;
/// let rows = nccl.all_gather_bytes(&[nccl.rank() as u8; 3])?;
/// assert_eq!(rows, vec![vec![0; 3], vec![1; 3]]);
/// # Ok::<(), vqx::Error>(())
/// ```
pub struct Nccl {
    /// One thread at a time: an NCCL communicator is not thread-safe.
    comm: Mutex<Comm>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    gpu: usize,
    mpi: Mpi,
}

// SAFETY: the communicator is only used under its mutex (NCCL allows a communicator on any
// thread, one call at a time), after binding its CUDA context to the calling thread.
unsafe impl Send for Nccl {}
// SAFETY: as for Send.
unsafe impl Sync for Nccl {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.mpi.rank())
            .field("size", &self.mpi.size())
            .field("gpu", &self.gpu)
            .finish()
    }
}

impl Nccl {
    /// Sets up NCCL over the ranks of `mpi`: each rank opens its GPU (the only one it sees, or
    /// else GPU `local_rank` of its machine), rank 0 makes NCCL's unique id and MPI gives it to
    /// the others.
    ///
    /// Fails alike on every rank with [`Error::CudaUnavailable`] naming the first rank that
    /// cannot take part (no libcuda or libnccl, fewer GPUs than ranks on its machine), so no
    /// rank is left waiting. If NCCL itself then fails to start on a rank, that rank aborts the
    /// job (the others are already inside NCCL's set-up and would wait for it for ever).
    pub fn init(mpi: Mpi) -> Result<Nccl> {
        let (local, local_ranks) = mpi.local_rank();
        let opened = open_gpu(local, local_ranks);
        // Every rank learns whether every rank can go on before any enters NCCL.
        let verdict = match &opened {
            Ok(_) => Vec::new(),
            Err(why) => why.as_bytes().to_vec(),
        };
        let verdicts = mpi.all_gather_bytes(&verdict)?;
        if let Some((r, why)) = verdicts.iter().enumerate().find(|(_, v)| !v.is_empty()) {
            return Err(Error::CudaUnavailable(format!(
                "NCCL on rank {r}: {}",
                String::from_utf8_lossy(why)
            )));
        }
        let ctx = opened.map_err(Error::CudaUnavailable)?;
        // Rank 0's unique id, or why it has none: [1, id…] or [0, message…].
        let mut id = Vec::new();
        if mpi.rank() == 0 {
            id = match Id::new() {
                Ok(id) => std::iter::once(1)
                    .chain(id.internal().iter().map(|&c| c as u8))
                    .collect(),
                Err(e) => [&[0u8][..], nccl_msg(e).as_bytes()].concat(),
            };
        }
        mpi.broadcast_bytes(0, &mut id)?;
        let id = match id.split_first() {
            Some((1, bytes)) if bytes.len() == 128 => {
                Id::uninit(std::array::from_fn(|i| bytes[i] as std::ffi::c_char))
            }
            Some((_, why)) => {
                return Err(Error::CudaUnavailable(format!(
                    "NCCL on rank 0: no unique id: {}",
                    String::from_utf8_lossy(why)
                )));
            }
            None => return Err(Error::internal("NCCL set-up", "rank 0 sent no unique id")),
        };
        let stream = ctx.default_stream();
        // ncclCommInitRank works on the calling thread's current device.
        if let Err(e) = ctx.bind_to_thread() {
            abort_world(
                mpi.rank(),
                &format!("binding CUDA device {}: {e}", ctx.ordinal()),
            );
        }
        let comm =
            Comm::from_rank(stream.clone(), mpi.rank(), mpi.size(), id).unwrap_or_else(|e| {
                abort_world(
                    mpi.rank(),
                    &format!("starting NCCL on GPU {}: {}", ctx.ordinal(), nccl_msg(e)),
                )
            });
        Ok(Nccl {
            comm: Mutex::new(comm),
            gpu: ctx.ordinal(),
            ctx,
            stream,
            mpi,
        })
    }

    /// The GPU this rank uses (its device ordinal on its machine).
    pub fn gpu(&self) -> usize {
        self.gpu
    }

    /// The communicator, with this rank's CUDA context current on the calling thread.
    fn comm(&self) -> Result<MutexGuard<'_, Comm>> {
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        self.ctx
            .bind_to_thread()
            .or_cuda("binding the CUDA context")?;
        Ok(comm)
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }

    fn size(&self) -> usize {
        self.mpi.size()
    }

    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        let lens: Vec<usize> = self
            .mpi
            .all_gather_bytes(&(local.len() as u64).to_le_bytes())?
            .iter()
            .map(|b| u64::from_le_bytes(b[..].try_into().unwrap_or_default()) as usize)
            .collect();
        // NCCL's all-gather takes equal parts: every rank's bytes padded to the longest.
        let width = lens.iter().copied().max().unwrap_or(0);
        if width == 0 {
            return Ok(vec![Vec::new(); lens.len()]);
        }
        let mut padded = local.to_vec();
        padded.resize(width, 0);
        let comm = self.comm()?;
        let send = self
            .stream
            .clone_htod(&padded)
            .or_cuda("NCCL all-gather upload")?;
        let mut recv = self
            .stream
            .alloc_zeros::<u8>(width * lens.len())
            .or_cuda("NCCL all-gather buffer")?;
        comm.all_gather(&send, &mut recv)
            .map_err(|e| nccl_error("all-gather", e))?;
        let all = self
            .stream
            .clone_dtoh(&recv)
            .or_cuda("NCCL all-gather download")?;
        // A copy into pageable memory has landed when it returns; waiting states it.
        self.stream.synchronize().or_cuda("NCCL all-gather")?;
        Ok(all
            .chunks(width)
            .zip(&lens)
            .map(|(part, &n)| part[..n].to_vec())
            .collect())
    }

    fn broadcast_bytes(&self, root: usize, data: &mut Vec<u8>) -> Result<()> {
        let mut len = (data.len() as u64).to_le_bytes().to_vec();
        // Checks `root` alike on every rank, and gives every rank the root's length.
        self.mpi.broadcast_bytes(root, &mut len)?;
        let n = u64::from_le_bytes(len[..].try_into().unwrap_or_default()) as usize;
        if n == 0 {
            data.clear();
            return Ok(());
        }
        let comm = self.comm()?;
        let mut buf = if self.rank() == root {
            self.stream
                .clone_htod(&data[..])
                .or_cuda("NCCL broadcast upload")?
        } else {
            self.stream
                .alloc_zeros::<u8>(n)
                .or_cuda("NCCL broadcast buffer")?
        };
        comm.broadcast_in_place(&mut buf, root as i32)
            .map_err(|e| nccl_error("broadcast", e))?;
        *data = self
            .stream
            .clone_dtoh(&buf)
            .or_cuda("NCCL broadcast download")?;
        self.stream.synchronize().or_cuda("NCCL broadcast")?;
        Ok(())
    }

    /// As [`Mpi`]'s abort: names this rank and `cause` on stderr and ends every rank.
    fn abort(&self, cause: &str) {
        self.mpi.abort(cause)
    }
}

/// Opens this rank's GPU, after checking that libnccl can be loaded, or says why not: the only
/// GPU a rank sees (a launcher that gives each rank its own, e.g. `srun --gpus-per-task=1`), or
/// else GPU `local` of the machine's GPUs, one per local rank.
fn open_gpu(local: usize, local_ranks: usize) -> std::result::Result<Arc<CudaContext>, String> {
    // SAFETY: each probe only tries to dlopen the library by its usual names.
    if !catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false) {
        return Err("libcuda not found (no NVIDIA driver on this machine)".into());
    }
    // SAFETY: as above, for libnccl.
    match catch_unwind(|| unsafe { cudarc::nccl::sys::is_culib_present() }) {
        Ok(true) => {}
        Ok(false) => {
            return Err("libnccl not found (cudarc looks for libnccl.so and \
                        libnccl.so.{13,12,11,10,9,1}; NCCL ships libnccl.so.2: add a libnccl.so \
                        symlink to it)"
                .into());
        }
        Err(_) => return Err("probing libnccl panicked".into()),
    }
    let gpus = match catch_unwind(CudaContext::device_count) {
        Ok(Ok(n)) => n.max(0) as usize,
        Ok(Err(e)) => return Err(format!("counting CUDA devices: {e}")),
        Err(_) => return Err("counting CUDA devices panicked".into()),
    };
    let ordinal = match gpus {
        0 => return Err("no CUDA device visible".into()),
        1 => 0,
        _ if local < gpus => local,
        _ => {
            return Err(format!(
                "local rank {local} of {local_ranks} on this machine, which has {gpus} GPUs \
                 visible: one rank per GPU"
            ));
        }
    };
    open_context(ordinal)
}

fn nccl_msg(e: NcclError) -> String {
    format!("{:?}", e.0)
}

fn nccl_error(op: &str, e: NcclError) -> Error {
    Error::Cuda {
        op: format!("NCCL {op}"),
        msg: nccl_msg(e),
    }
}

/// Maps a driver error to [`Error::Cuda`] naming the operation.
trait OrCuda<T> {
    fn or_cuda(self, op: &str) -> Result<T>;
}

impl<T> OrCuda<T> for std::result::Result<T, DriverError> {
    fn or_cuda(self, op: &str) -> Result<T> {
        self.map_err(|e| Error::Cuda {
            op: op.to_string(),
            msg: e.to_string(),
        })
    }
}
