//! N ranks as threads of one process, meeting at a shared rendezvous: the multi-rank paths of a
//! data-parallel job, tested by a plain `cargo test` with no MPI installed.
//!
//! Each collective is one round: every rank deposits its bytes, the last to arrive publishes
//! all of them, in rank order, and wakes the others. A round cannot complete without every rank,
//! so a published result stays in place until every rank of that round has read it.

use super::Collective;
use crate::error::{Error, Result};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Runs `job` on `ranks` threads, each with its own rank of one in-process job, and returns
/// their results in rank order. A rank that returns an error or panics aborts the job: the other
/// ranks' collectives fail, and the error returned names the first rank that failed and why.
pub fn run<T, F>(ranks: usize, job: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(&Rank) -> Result<T> + Sync,
{
    if ranks == 0 {
        return Err(Error::InvalidArgument(
            "an in-process job needs at least 1 rank".into(),
        ));
    }
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            slots: vec![None; ranks],
            arrived: 0,
            round: 0,
            published: Arc::new(Vec::new()),
            aborted: None,
            finished: vec![false; ranks],
        }),
        woken: Condvar::new(),
    });
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..ranks)
            .map(|rank| {
                let me = Rank {
                    rank,
                    size: ranks,
                    shared: shared.clone(),
                };
                let job = &job;
                s.spawn(move || {
                    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&me)))
                        .unwrap_or_else(|p| Err(Error::internal("a rank", panic_message(&p))));
                    match &out {
                        Err(e) => me.abort(&e.to_string()),
                        Ok(_) => me.finish(),
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("panics are caught inside the rank"))
            .collect()
    });
    // The cause, not the other ranks' "aborted by rank r" echoes of it.
    if let Some((rank, cause)) = shared.lock().aborted.clone() {
        return Err(Error::Aborted { rank, cause });
    }
    results.into_iter().collect()
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    match (p.downcast_ref::<&str>(), p.downcast_ref::<String>()) {
        (Some(s), _) => format!("panicked: {s}"),
        (_, Some(s)) => format!("panicked: {s}"),
        _ => "panicked".into(),
    }
}

struct Shared {
    state: Mutex<State>,
    woken: Condvar,
}

impl Shared {
    // A rank that panicked while holding the lock left the state consistent (every update is
    // one assignment), so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct State {
    /// This round's deposits, by rank.
    slots: Vec<Option<Vec<u8>>>,
    arrived: usize,
    /// Rounds completed.
    round: u64,
    /// The last completed round's deposits, in rank order.
    published: Arc<Vec<Vec<u8>>>,
    /// The first rank to fail, and why.
    aborted: Option<(usize, String)>,
    /// Ranks whose job has returned: a collective waiting for one of them would never end.
    finished: Vec<bool>,
}

/// One rank of an in-process job (see [`run`]).
pub struct Rank {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl Rank {
    fn check(&self, state: &State) -> Result<()> {
        if let Some((rank, cause)) = &state.aborted {
            return Err(Error::Aborted {
                rank: *rank,
                cause: cause.clone(),
            });
        }
        if let Some(r) = state.finished.iter().position(|&f| f) {
            return Err(Error::InvalidArgument(format!(
                "rank {} waits in a collective that rank {r} never joined (its job returned): \
                 every rank must call the same collectives",
                self.rank
            )));
        }
        Ok(())
    }

    /// Marks this rank's job as returned, waking any rank left waiting for it.
    fn finish(&self) {
        self.shared.lock().finished[self.rank] = true;
        self.shared.woken.notify_all();
    }
}

impl Collective for Rank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }

    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut state = self.shared.lock();
        self.check(&state)?;
        state.slots[self.rank] = Some(local.to_vec());
        state.arrived += 1;
        let round = state.round;
        if state.arrived == self.size {
            let parts = state.slots.iter_mut().map(|s| s.take().unwrap_or_default());
            state.published = Arc::new(parts.collect());
            state.arrived = 0;
            state.round += 1;
            self.shared.woken.notify_all();
        } else {
            while state.round == round && self.check(&state).is_ok() {
                state = self
                    .shared
                    .woken
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if state.round == round {
                self.check(&state)?;
            }
        }
        Ok(state.published.as_ref().clone())
    }

    fn broadcast_bytes(&self, root: usize, data: &mut Vec<u8>) -> Result<()> {
        if root >= self.size {
            return Err(Error::InvalidArgument(format!(
                "broadcast from rank {root} in a job of {} ranks",
                self.size
            )));
        }
        let mine = if self.rank == root { &data[..] } else { &[] };
        let mut parts = self.all_gather_bytes(mine)?;
        *data = std::mem::take(&mut parts[root]);
        Ok(())
    }

    fn abort(&self, cause: &str) {
        let mut state = self.shared.lock();
        state
            .aborted
            .get_or_insert_with(|| (self.rank, cause.to_string()));
        self.shared.woken.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f64_sums_are_added_in_rank_order_on_every_rank() {
        // Values whose sum depends on the order of the additions.
        let vals = [1e16, 1.0, -1e16, 1.0];
        let got = run(4, |c| {
            let mut v = [vals[c.rank()], c.rank() as f64];
            c.all_reduce_sum_f64(&mut v)?;
            Ok(v)
        })
        .unwrap();
        let want: f64 = ((0.0 + 1e16) + 1.0 + -1e16) + 1.0;
        for (r, v) in got.iter().enumerate() {
            assert_eq!(
                v[0].to_bits(),
                want.to_bits(),
                "rank {r}: {} vs {want}",
                v[0]
            );
            assert_eq!(v[1], 6.0, "rank {r}");
        }
    }

    #[test]
    fn integer_sums_are_exact_and_overflow_is_an_error_on_every_rank() {
        let got = run(3, |c| {
            let mut a = [u64::MAX / 4, c.rank() as u64];
            let mut b = [7u32, 1];
            c.all_reduce_sum_u64(&mut a)?;
            c.all_reduce_sum_u32(&mut b)?;
            Ok((a, b))
        })
        .unwrap();
        assert_eq!(got, vec![([3 * (u64::MAX / 4), 3], [21, 3]); 3]);
        let errs = run(2, |c| {
            let mut a = [u32::MAX];
            Ok(c.all_reduce_sum_u32(&mut a).map_err(|e| e.to_string()))
        })
        .unwrap();
        for e in errs {
            assert!(e.unwrap_err().contains("overflows at element 0"));
        }
        // Element 1 overflows at rank 1's term, element 0 only at rank 2's: element 0 is named.
        let errs = run(3, |c| {
            let mut a = [[u64::MAX - 1, u64::MAX], [1, 1], [1, 0]][c.rank()];
            Ok(c.all_reduce_sum_u64(&mut a).map_err(|e| e.to_string()))
        })
        .unwrap();
        for e in errs {
            assert!(e.unwrap_err().contains("overflows at element 0"));
        }
    }

    #[test]
    fn broadcast_delivers_the_roots_bytes_to_every_rank() {
        let got = run(3, |c| {
            let mut data = if c.rank() == 2 {
                b"rows from rank 2".to_vec()
            } else {
                vec![9; 40]
            };
            c.broadcast_bytes(2, &mut data)?;
            Ok(data)
        })
        .unwrap();
        assert_eq!(got, vec![b"rows from rank 2".to_vec(); 3]);
        let err = run(2, |c| c.broadcast_bytes(2, &mut Vec::new())).unwrap_err();
        assert!(err.to_string().contains("rank 2 in a job of 2"), "{err}");
    }

    #[test]
    fn a_failing_rank_ends_the_job_naming_it_and_its_cause() {
        // Rank 1 finds a NaN in its shard; ranks 0 and 2 are already waiting in a collective.
        let err = run(3, |c| {
            if c.rank() == 1 {
                return Err(Error::NonFinite {
                    what: "shard 1".into(),
                    row: 4,
                    col: 0,
                    value: f32::NAN,
                });
            }
            let mut v = [1.0];
            c.all_reduce_sum_f64(&mut v)?;
            c.all_reduce_sum_f64(&mut v)?;
            Ok(v[0])
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("rank 1") && msg.contains("non-finite value NaN in shard 1"),
            "{msg}"
        );

        let err = run(2, |c| {
            if c.rank() == 0 {
                panic!("disk full");
            }
            c.all_gather_bytes(b"x").map(drop)
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("rank 0") && msg.contains("panicked: disk full"),
            "{msg}"
        );
    }

    #[test]
    fn a_rank_that_skips_a_collective_ends_the_job_instead_of_hanging() {
        let err = run(3, |c| {
            if c.rank() != 2 {
                c.all_gather_bytes(b"x")?;
            }
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("rank 2 never joined"), "{err}");
    }

    #[test]
    fn ranks_in_different_collectives_are_refused() {
        let errs = run(2, |c| {
            let mut v = vec![0.0f64; 1 + c.rank()];
            Ok(c.all_reduce_sum_f64(&mut v).map_err(|e| e.to_string()))
        })
        .unwrap();
        for e in errs {
            let e = e.unwrap_err();
            assert!(
                e.contains("expected 8 bytes (rank 0), got 16 bytes on rank 1"),
                "{e}"
            );
        }
    }
}
