//! Exact pruning for Lloyd's passes: grouped lower bounds (Ding et al., "Yinyang K-means",
//! ICML 2015), searched a group at a time with the backend's blocked search for bounds
//! (`Backend::nearest_rows_for_bounds`: exact winners; on CPUs with AVX512_BF16 scored in bf16
//! first and rechecked where close, so its lower bounds are looser by the bf16 rounding).
//!
//! The codes are split once into G groups (k-means of the initial codes). Each row keeps, per
//! group, a lower bound on its distance to every code of the group other than its own code.
//! After a pass moves the codes, each group's bounds drop by the largest move in the group
//! (triangle inequality). Next pass, a row's exact distance u to its own moved code is computed;
//! a group whose bound is above u cannot hold a code nearer than the row's own, so only the
//! other groups are searched, all rows needing a group in one blocked call. Candidates from
//! different groups are compared by their exact f64 distances, smaller index first on a tie:
//! the choice plain Lloyd's exact search makes (`super` has the argument).
//!
//! **Bounds against past codebooks.** Each bound is stamped with the pass whose codes it was
//! measured against, and lowered by how far the codes moved *since then* (the last
//! [`MAX_SNAPSHOTS`] codebooks are kept), not by the sum of every pass's largest move: late in a
//! fit the codes that still move are few and often swing back and forth.
//!
//! **Local filter** (the paper's second filter, for the codes that moved most): the codes that
//! moved most since a bound's pass (the top [`MOVER_FRACTION`]) are that bound's *movers*. A
//! group whose bound fails only because of its movers is not searched whole: the row measures
//! each mover its bound cannot rule out (`L − δ_m ≤ u`; an f32 distance turned into a lower
//! bound, then the exact f64 one when it might win), and the other codes' bound drops only by
//! their own largest move. When many movers would need measuring, the group is searched whole.
//!
//! The first pass searches every group of every row (as many distances as one full search), so
//! every group starts with its own nearest distance as its bound.
//!
//! Measured against the plain grouped bounds (117,659 × 256 embeddings, K = 1,024, 30 passes):
//! 56% of all distances skipped instead of 32%, and 14% less time; same codebook bit for bit.

use super::MARGIN;
use crate::backend::Backend;
use crate::error::Result;
use crate::matrix::{MatRef, Matrix};
use crate::nearest::{CheckedRows, Metric, exact_distance, l2_sq_lower_f32, l2_sq_lower_f32_each};
use rayon::prelude::*;
use std::collections::VecDeque;

/// At most this many groups (the bounds take N·G f32).
const MAX_GROUPS: usize = 64;

/// Fraction of the codes, those that moved most since a bound was set, checked one by one by
/// the local filter instead of lowering their whole group's bound. A larger fraction skips
/// more distances, but each mover is measured alone (an f32 distance of its own, several times
/// the cost of one in a blocked search). 0.05 was the fastest of 0.02, 0.05, 0.1 and 0.2 on
/// 20,000 real 256-D embeddings at K = 256, 1,024 and 4,096 (minimum of 3 runs: 0.41, 0.78,
/// 1.33 s against 0.42, 0.88, 1.40 s with 0.2) and on all 117,659 rows at K = 1,024 (7.0
/// against 7.2 s); see docs/fit.md.
const MOVER_FRACTION: f64 = 0.05;

/// A group is searched whole, not mover by mover, once more than 1/MOVER_COST of its codes
/// would be measured: one distance measured alone costs several in a blocked search (8 was
/// the fastest of 1, 2, 4 and 8 at K = 1,024 and 4,096 on 256-D embeddings).
const MOVER_COST: usize = 8;

/// Movers measured per call of the batched f32 distance.
const MOVER_BATCH: usize = 16;

/// Rows read ahead of the one whose bounds are checked.
const ROW_AHEAD: usize = 4;

/// At most this many past codebooks are kept (bounds are stamped with a pass mod 256).
const MAX_SNAPSHOTS: usize = 16;

/// Memory the past codebooks may take (at least two are kept whatever K·D).
const SNAPSHOT_BYTES: usize = 128 << 20;

/// How far the codes moved since one past codebook.
struct Moves {
    /// Per group: the largest move of any of its codes.
    most: Vec<f64>,
    /// Per group: the largest move of its codes that are not movers.
    rest: Vec<f64>,
    /// Per group: its movers (code, move), the largest move first.
    movers: Vec<Vec<(u32, f64)>>,
}

impl Moves {
    fn none(groups: usize) -> Self {
        Moves {
            most: vec![0.0; groups],
            rest: vec![0.0; groups],
            movers: vec![Vec::new(); groups],
        }
    }
}

pub(crate) struct Bounds {
    groups: usize,
    /// Group of each code.
    group_of: Vec<u32>,
    /// Codes of each group, in increasing index order.
    members: Vec<Vec<u32>>,
    /// N × G lower bounds (distances, not squared), rounded down to f32, each against the codes
    /// of the pass in `stamp`.
    lower: Vec<f32>,
    /// N × G: the pass (mod 256) whose codes each lower bound was measured against. A bound is
    /// lowered by how far the codes moved since that pass, not by the sum of every pass's
    /// largest move: late in a fit the codes that still move are few, and often oscillate.
    stamp: Vec<u8>,
    /// Per row, an upper bound on its distance (not squared) to its own code: a row whose
    /// upper bound is below every group's lower bound is settled without reading it.
    upper: Vec<f64>,
    /// The codebooks of the last passes, oldest first; the last is the current one.
    snapshots: VecDeque<Matrix>,
    /// Most snapshots kept.
    depth: usize,
    /// `moves[a]`: the moves since the codebook `a` passes ago (`moves[0]`: none).
    moves: Vec<Moves>,
    /// The current pass, mod 256.
    now: u8,
}

impl Bounds {
    /// Groups of the initial `codes` (a few Lloyd passes over the codes themselves, the same
    /// on every rank) and no bounds yet ([`Bounds::reset`] makes the first pass search every
    /// group of every row, which sets them).
    pub(crate) fn new(
        backend: &dyn Backend,
        codes: MatRef<'_>,
        rows: usize,
        group_codes: usize,
        seed: u64,
    ) -> Result<Self> {
        let k = codes.rows();
        let groups = k.div_ceil(group_codes.max(1)).clamp(1, MAX_GROUPS);
        let group_of = if groups == 1 {
            vec![0; k]
        } else {
            let config = super::KMeansConfig {
                codes: groups,
                metric: Metric::L2,
                max_passes: 5,
                tolerance: 0.0,
                bounds: false,
                group_codes: 0,
                seeding: super::Seeding::RandomRows,
                seed,
                sample_per_code: 0,
                resume: None,
            };
            let single = crate::collective::Single;
            super::fit(
                backend,
                &single,
                super::Shard::whole(codes),
                &config,
                |_, _| Ok(()),
            )?
            .indices
        };
        let mut members = vec![Vec::new(); groups];
        for (j, &g) in group_of.iter().enumerate() {
            members[g as usize].push(j as u32);
        }
        // A group k-means left empty is dropped (its codes all went elsewhere).
        members.retain(|m| !m.is_empty());
        let groups = members.len();
        let mut group_of = vec![0u32; k];
        for (g, m) in members.iter().enumerate() {
            for &j in m {
                group_of[j as usize] = g as u32;
            }
        }
        let snapshot = (k * codes.cols() * 4).max(1);
        Ok(Bounds {
            groups,
            group_of,
            members,
            lower: vec![0.0; rows * groups],
            stamp: vec![0; rows * groups],
            upper: vec![f64::INFINITY; rows],
            snapshots: VecDeque::new(),
            depth: (SNAPSHOT_BYTES / snapshot).clamp(2, MAX_SNAPSHOTS),
            moves: vec![Moves::none(groups)],
            now: 0,
        })
    }

    /// Takes the codes' moves from `old` (the current codebook) to `new`: each row's upper bound
    /// rises by its own code's move (`indices`: the rows' codes), and the next
    /// [`Bounds::assign`] lowers each lower bound by the moves since the pass it was set in.
    pub(crate) fn loosen(&mut self, old: MatRef<'_>, new: MatRef<'_>, indices: &[u32]) {
        let moved: Vec<f64> = (0..old.rows())
            .into_par_iter()
            .map(|j| exact_distance(old.row(j), new.row(j), Metric::L2).sqrt())
            .collect();
        self.upper
            .par_iter_mut()
            .zip(indices.par_iter())
            .with_min_len(1024)
            .for_each(|(u, &j)| *u = (*u + moved[j as usize]) * (1.0 + MARGIN));
        self.now = self.now.wrapping_add(1);
        self.snapshots.push_back(new.to_owned());
        if self.snapshots.len() > self.depth {
            self.snapshots.pop_front();
        }
        // Moves since each kept codebook, newest first; the last pass's are the ones computed.
        let last = self.snapshots.len() - 1;
        self.moves = (0..=last)
            .map(|age| match age {
                0 => Moves::none(self.groups),
                1 => self.moves_of(&moved),
                _ => {
                    let then = self.snapshots[last - age].as_ref();
                    let since: Vec<f64> = (0..new.rows())
                        .into_par_iter()
                        .map(|j| exact_distance(then.row(j), new.row(j), Metric::L2).sqrt())
                        .collect();
                    self.moves_of(&since)
                }
            })
            .collect();
    }

    /// Each group's largest move, its movers (the top [`MOVER_FRACTION`] of all codes by
    /// move, none that did not move) and the largest move of its other codes.
    fn moves_of(&self, moved: &[f64]) -> Moves {
        let mut sorted = moved.to_vec();
        sorted.sort_by(f64::total_cmp);
        let at = (sorted.len() as f64 * (1.0 - MOVER_FRACTION)) as usize;
        let cut = sorted[at.min(sorted.len() - 1)];
        let mut out = Moves::none(self.groups);
        for (j, &m) in moved.iter().enumerate() {
            let g = self.group_of[j] as usize;
            out.most[g] = out.most[g].max(m);
            if m > cut {
                out.movers[g].push((j as u32, m));
            } else {
                out.rest[g] = out.rest[g].max(m);
            }
        }
        for list in &mut out.movers {
            list.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        }
        out
    }

    /// Forgets every bound, with `codes` the current codebook: the next [`Bounds::assign`]
    /// searches every group of every row, which sets each group's bound to the group's own
    /// nearest distance (the first pass: as many distances as one full search, in G blocked
    /// calls, and bounds far sharper than a full search's runner-up for the groups away from
    /// a row's code: measured at K = 4,096, the first two passes took 0.63 s instead of 0.79).
    pub(crate) fn reset(&mut self, codes: MatRef<'_>) {
        self.snapshots = VecDeque::from([codes.to_owned()]);
        self.moves = vec![Moves::none(self.groups)];
        let now = self.now;
        self.stamp.par_iter_mut().for_each(|s| *s = now);
        self.lower.par_iter_mut().for_each(|l| *l = 0.0);
        self.upper.par_iter_mut().for_each(|u| *u = f64::INFINITY);
    }

    /// Assigns the rows the bounds cannot settle (every group of every row after
    /// [`Bounds::reset`]). Returns (distances
    /// computed, rows whose code changed).
    pub(crate) fn assign(
        &mut self,
        backend: &dyn Backend,
        checked: &CheckedRows<'_>,
        codes: MatRef<'_>,
        indices: &mut [u32],
    ) -> Result<(u64, usize)> {
        let x = checked.rows();
        let (n, d, g_n) = (x.rows(), x.cols(), self.groups);
        if n == 0 {
            return Ok((0, 0));
        }
        let before: Vec<u32> = indices.to_vec();
        let (moves, group_of, members, now) =
            (&self.moves, &self.group_of, &self.members, self.now);
        // A bound as old as the oldest kept codebook is brought to the current one, since that
        // codebook is dropped at the next pass.
        let oldest = self.depth - 1;
        // Per row: the groups it must search whole (a bit mask, at most 64 groups); the movers
        // of the other groups its bounds cannot rule out, measured (which may change its
        // code); and, for a row the upper bound does not settle, bounds on its squared
        // distance to its code, from an f32 computation, made exact only when a comparison
        // needs it ([`Near`]; a settled row is not read at all).
        let (masks, (mut dist, local)): (Vec<u64>, (Vec<Near>, Vec<u64>)) = self
            .lower
            .par_chunks_mut(g_n)
            .zip(self.stamp.par_chunks_mut(g_n))
            .zip(self.upper.par_iter_mut())
            .zip(indices.par_iter_mut())
            .enumerate()
            .with_min_len(512)
            .map(|(i, (((lower, stamp), upper), own))| {
                // The rows the bounds leave open are scattered, so the hardware prefetchers
                // miss the start of each: ask for a row a few ahead.
                if i + ROW_AHEAD < n {
                    super::prefetch(x.row(i + ROW_AHEAD));
                }
                let age = |s: u8| now.wrapping_sub(s) as usize;
                let mut low = f64::INFINITY;
                for g in 0..g_n {
                    low = low.min(loosened(lower[g], moves[age(stamp[g])].most[g]) as f64);
                }
                if *upper < low {
                    for g in 0..g_n {
                        if age(stamp[g]) >= oldest {
                            refresh(&mut lower[g], &mut stamp[g], moves, g, now);
                        }
                    }
                    return (0, (Near::SETTLED, 0));
                }
                let mut best = Near::of(x.row(i), codes.row(*own as usize));
                let u = best.hi.sqrt() * (1.0 + MARGIN);
                let mut mask = 0u64;
                let mut measured = 0u64;
                // The code the row had before a mover beat it, with its squared distance.
                let mut beaten: Option<(u32, f64)> = None;
                for g in 0..g_n {
                    let (l, a) = (lower[g], age(stamp[g]));
                    let mv = &moves[a];
                    let whole = loosened(l, mv.most[g]);
                    if (whole as f64) > u {
                        if a >= oldest {
                            (lower[g], stamp[g]) = (whole, now);
                        }
                        continue;
                    }
                    let rest = loosened(l, mv.rest[g]);
                    if (rest as f64) <= u {
                        stamp[g] = now;
                        // A code that is not a mover may be nearer: search the group.
                        lower[g] = whole;
                        mask |= 1 << g;
                        continue;
                    }
                    // Only movers can be nearer: measure those the bound cannot rule out
                    // (the largest moves first, so they are a prefix of the list). The stored
                    // bound stays as it was, against its own pass's codes, so the codes that
                    // do not move keep it sharp; only a bound about to outlive its codebook
                    // becomes the one these measurements give.
                    // The movers to measure; when they are many, one blocked search of the
                    // group costs less.
                    let list = &mv.movers[g];
                    let open = list.partition_point(|&(_, m)| (loosened(l, m) as f64) <= u);
                    if open * MOVER_COST > members[g].len() {
                        stamp[g] = now;
                        lower[g] = whole;
                        mask |= 1 << g;
                        continue;
                    }
                    let mut bound = match list.get(open) {
                        Some(&(_, m)) => rest.min(loosened(l, m)),
                        None => rest,
                    };
                    // Their f32 bounds a batch at a time (the row's own code among them
                    // costs one distance and is passed over below).
                    for batch in list[..open].chunks(MOVER_BATCH) {
                        let mut lows = [0f64; MOVER_BATCH];
                        let mut t = 0;
                        let batch_codes = batch.iter().map(|&(j, _)| j);
                        l2_sq_lower_f32_each(x.row(i), codes, batch_codes, |v| {
                            lows[t] = v;
                            t += 1;
                        });
                        for (&(j, _), &low) in batch.iter().zip(&lows) {
                            if j == *own {
                                continue;
                            }
                            measured += 1;
                            let (xi, cj) = (x.row(i), codes.row(j as usize));
                            let mut dj = low;
                            if dj <= best.hi * (1.0 + MARGIN) {
                                dj = exact_distance(xi, cj, Metric::L2);
                                let b = best.exact(xi, codes.row(*own as usize));
                                if (dj, j) < (b, *own) {
                                    beaten.get_or_insert((*own, b));
                                    *own = j;
                                    best = Near::exactly(dj);
                                }
                            }
                            bound = bound.min(down(dj.max(0.0).sqrt() * (1.0 - MARGIN)));
                        }
                    }
                    // The measured bound replaces the stored one when it alone would keep
                    // the group shut (so the same movers are not measured again next pass), or
                    // when the stored one is about to outlive its codebook.
                    if bound as f64 > u || a >= oldest {
                        (lower[g], stamp[g]) = (bound, now);
                    }
                }
                if let Some((b, db)) = beaten {
                    // The code the row left joins its group's others (a bound also covering
                    // the new code, which only weakens it).
                    let pg = group_of[b as usize] as usize;
                    refresh(&mut lower[pg], &mut stamp[pg], moves, pg, now);
                    lower[pg] = lower[pg].min(down(db.sqrt() * (1.0 - MARGIN)));
                }
                *upper = best.hi.sqrt() * (1.0 + MARGIN);
                (mask, (best, measured + 1))
            })
            .unzip();
        let mut searched: u64 = local.iter().sum();
        for g in 0..g_n {
            let rows: Vec<u32> = (0..n as u32)
                .into_par_iter()
                .with_min_len(4096)
                .filter(|&i| masks[i as usize] >> g & 1 == 1)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let members = &self.members[g];
            let mut group_codes = Vec::with_capacity(members.len() * d);
            for &j in members {
                group_codes.extend_from_slice(codes.row(j as usize));
            }
            let group_codes = Matrix::new(group_codes, members.len(), d)?;
            let (winners, lb) = backend.nearest_rows_for_bounds(
                checked,
                &rows,
                group_codes.as_ref(),
                Metric::L2,
            )?;
            searched += (rows.len() * members.len()) as u64;
            // What the group's search means for each row (in parallel: the exact distances),
            // then applied in row order.
            let (dist_now, idx_now): (&[Near], &[u32]) = (&dist, indices);
            let outcomes: Vec<Outcome> = rows
                .par_iter()
                .enumerate()
                .with_min_len(256)
                .map(|(t, &i)| {
                    let i = i as usize;
                    let near = dist_now[i];
                    if lb.winner[t] > near.hi * (1.0 + MARGIN) {
                        // No code of the group comes near the best so far.
                        return Outcome::Bound(down(lb.winner[t].sqrt() * (1.0 - MARGIN)));
                    }
                    let b = members[winners[t] as usize];
                    let others = down(lb.others[t].sqrt() * (1.0 - MARGIN));
                    if b == idx_now[i] {
                        // The row's own code wins its group: nothing to measure.
                        return Outcome::Bound(others);
                    }
                    // The winner's f32 distance first: mostly it cannot beat the row's best.
                    let (xi, cb) = (x.row(i), codes.row(b as usize));
                    let low = l2_sq_lower_f32(xi, cb);
                    if low > near.hi * (1.0 + MARGIN) {
                        return Outcome::Bound(down(low.max(0.0).sqrt() * (1.0 - MARGIN)));
                    }
                    let db = exact_distance(xi, cb, Metric::L2);
                    let mut near = near;
                    let now_sq = near.exact(xi, codes.row(idx_now[i] as usize));
                    if (db, b) < (now_sq, idx_now[i]) {
                        Outcome::Wins {
                            code: b,
                            dist_sq: db,
                            before_sq: now_sq,
                            others,
                        }
                    } else {
                        Outcome::Bound(down(db.sqrt() * (1.0 - MARGIN)))
                    }
                })
                .collect();
            for (&i, o) in rows.iter().zip(outcomes) {
                let i = i as usize;
                let lower = &mut self.lower[i * g_n..(i + 1) * g_n];
                match o {
                    Outcome::Bound(v) => lower[g] = v,
                    Outcome::Wins {
                        code,
                        dist_sq: db,
                        before_sq,
                        others,
                    } => {
                        // The previous best joins its group's others.
                        let pg = self.group_of[indices[i] as usize] as usize;
                        let stamp = &mut self.stamp[i * g_n..(i + 1) * g_n];
                        refresh(&mut lower[pg], &mut stamp[pg], &self.moves, pg, self.now);
                        lower[pg] = lower[pg].min(down(before_sq.sqrt() * (1.0 - MARGIN)));
                        indices[i] = code;
                        dist[i] = Near::exactly(db);
                        self.upper[i] = db.sqrt() * (1.0 + MARGIN);
                        lower[g] = others;
                    }
                }
            }
        }
        Ok((searched, super::changed(&before, indices)))
    }
}

/// Bounds on a row's squared distance to its code: from an f32 computation (a relative
/// error of (D + 20)·2^-24 either way), or exact (lo = hi) once a comparison needed it.
#[derive(Clone, Copy)]
struct Near {
    lo: f64,
    hi: f64,
}

impl Near {
    /// A settled row's (never read).
    const SETTLED: Near = Near {
        lo: f64::NAN,
        hi: f64::NAN,
    };

    fn of(x: &[f32], c: &[f32]) -> Near {
        let lo = l2_sq_lower_f32(x, c).max(0.0);
        // The same relative error the other way, and underflow's absolute error.
        let rel = (x.len() as f64 + 20.0) * f32::EPSILON as f64;
        let hi = lo * (1.0 + 3.0 * rel) + (2.0 * x.len() as f64 + 32.0) * 3e-45;
        Near { lo, hi }
    }

    fn exactly(d: f64) -> Near {
        Near { lo: d, hi: d }
    }

    /// The exact squared distance (computed now unless known).
    fn exact(&mut self, x: &[f32], c: &[f32]) -> f64 {
        if self.lo != self.hi {
            *self = Near::exactly(exact_distance(x, c, Metric::L2));
        }
        self.lo
    }
}

/// A searched group's verdict on one row.
enum Outcome {
    /// The row keeps its code; the group's bound becomes this.
    Bound(f32),
    /// The group's winner beats the row's best so far (`before_sq`, exact).
    Wins {
        code: u32,
        dist_sq: f64,
        before_sq: f64,
        others: f32,
    },
}

/// Brings group `g`'s bound `lower`, stamped `stamp`, to the current codes (pass `now`).
fn refresh(lower: &mut f32, stamp: &mut u8, moves: &[Moves], g: usize, now: u8) {
    let age = now.wrapping_sub(*stamp) as usize;
    *lower = loosened(*lower, moves[age].most[g]);
    *stamp = now;
}

/// Bound `l` (a distance, not squared) lowered by a move `m`, with the margin for rounding.
fn loosened(l: f32, m: f64) -> f32 {
    if m == 0.0 {
        return l;
    }
    let v = l as f64;
    down((v - m) - MARGIN * (v.abs() + m))
}

/// The largest f32 not above `v` (a bound stays a bound when stored in f32).
fn down(v: f64) -> f32 {
    let f = v as f32;
    if f as f64 > v { f.next_down() } else { f }
}
