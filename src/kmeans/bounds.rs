//! Exact pruning for Lloyd's passes: grouped lower bounds (Ding et al., "Yinyang K-means",
//! ICML 2015), searched a group at a time with the backend's blocked `nearest`.
//!
//! The codes are split once into G groups (k-means of the initial codes). Each row keeps, per
//! group, a lower bound on its distance to every code of the group other than its own code.
//! After a pass moves the codes, each group's bounds drop by the largest move in the group
//! (triangle inequality). Next pass, a row's exact distance u to its own moved code is computed;
//! a group whose bound is above u cannot hold a code nearer than the row's own, so only the
//! other groups are searched, all rows needing a group in one blocked call. Candidates from
//! different groups are compared by their exact f64 distances, smaller index first on a tie:
//! the choice plain Lloyd's exact search makes (`super` has the argument).

use super::MARGIN;
use crate::backend::Backend;
use crate::error::Result;
use crate::matrix::{MatRef, Matrix};
use crate::nearest::{CheckedRows, Metric, exact_distance};
use rayon::prelude::*;

/// At most this many groups (the bounds take N·G f32).
const MAX_GROUPS: usize = 64;

pub(crate) struct Bounds {
    groups: usize,
    /// Group of each code.
    group_of: Vec<u32>,
    /// Codes of each group, in increasing index order.
    members: Vec<Vec<u32>>,
    /// N × G lower bounds (distances, not squared), rounded down to f32.
    lower: Vec<f32>,
    /// Per row, an upper bound on its distance (not squared) to its own code: a row whose
    /// upper bound is below every group's lower bound is settled without reading it.
    upper: Vec<f64>,
}

impl Bounds {
    /// Groups of the initial `codes` (a few Lloyd passes over the codes themselves, the same
    /// on every rank) and no bounds yet ([`Bounds::start`] sets them after the first pass's search).
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
        Ok(Bounds {
            groups,
            group_of,
            members,
            lower: vec![0.0; rows * groups],
            upper: vec![f64::INFINITY; rows],
        })
    }

    /// Lowers every row's bound of each group by the largest move of the group's codes, and
    /// raises its upper bound by its own code's move (`indices`: the rows' codes).
    pub(crate) fn loosen(&mut self, old: MatRef<'_>, new: MatRef<'_>, indices: &[u32]) {
        let moved: Vec<f64> = (0..old.rows())
            .into_par_iter()
            .map(|j| exact_distance(old.row(j), new.row(j), Metric::L2).sqrt())
            .collect();
        let mut most = vec![0f64; self.groups];
        for (j, &m) in moved.iter().enumerate() {
            let g = self.group_of[j] as usize;
            most[g] = most[g].max(m);
        }
        self.lower
            .par_chunks_mut(self.groups)
            .with_min_len(256)
            .for_each(|row| {
                for (l, &m) in row.iter_mut().zip(&most) {
                    let v = *l as f64;
                    *l = down((v - m) - MARGIN * (v.abs() + m));
                }
            });
        self.upper
            .par_iter_mut()
            .zip(indices.par_iter())
            .with_min_len(1024)
            .for_each(|(u, &j)| *u = (*u + moved[j as usize]) * (1.0 + MARGIN));
    }

    /// Sets every group's bound of each row from a full search's runner-up bounds (`others`,
    /// squared): weaker than per-group bounds, which searched rows then sharpen, but one
    /// blocked call; and each row's upper bound from its exact distance to its code.
    pub(crate) fn start(
        &mut self,
        others: &[f64],
        x: MatRef<'_>,
        codes: MatRef<'_>,
        indices: &[u32],
    ) {
        self.lower
            .par_chunks_mut(self.groups)
            .zip(others.par_iter())
            .for_each(|(row, &s)| row.fill(down(s.sqrt() * (1.0 - MARGIN))));
        self.upper
            .par_iter_mut()
            .enumerate()
            .with_min_len(256)
            .for_each(|(i, u)| {
                let dsq = exact_distance(x.row(i), codes.row(indices[i] as usize), Metric::L2);
                *u = dsq.sqrt() * (1.0 + MARGIN);
            });
    }

    /// Assigns the rows the bounds cannot settle (after [`Bounds::start`]). Returns (distances
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
        // Per row: the groups it must search (a bit mask, at most 64 groups) and, for a row
        // the upper bound does not settle, its exact squared distance to its code (NaN when
        // settled: such a row is not read at all).
        let (masks, mut dist_sq): (Vec<u64>, Vec<f64>) = (0..n)
            .into_par_iter()
            .with_min_len(1024)
            .map(|i| {
                let lower = &self.lower[i * g_n..(i + 1) * g_n];
                let low = lower.iter().fold(f32::INFINITY, |m, &l| m.min(l)) as f64;
                if self.upper[i] < low {
                    return (0, f64::NAN);
                }
                let dsq = exact_distance(x.row(i), codes.row(indices[i] as usize), Metric::L2);
                let u = dsq.sqrt() * (1.0 + MARGIN);
                let mask = lower
                    .iter()
                    .enumerate()
                    .filter(|&(_, &l)| (l as f64) <= u)
                    .fold(0u64, |m, (g, _)| m | (1 << g));
                (mask, dsq)
            })
            .unzip();
        // One distance for each row whose upper bound was tightened.
        let mut searched = dist_sq.iter().filter(|v| !v.is_nan()).count() as u64;
        self.upper
            .par_iter_mut()
            .zip(dist_sq.par_iter())
            .with_min_len(1024)
            .for_each(|(u, &dsq)| {
                if !dsq.is_nan() {
                    *u = dsq.sqrt() * (1.0 + MARGIN);
                }
            });
        let before: Vec<u32> = indices.to_vec();
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
            let (a, lb) = backend.nearest_rows_with_bounds(
                checked,
                &rows,
                group_codes.as_ref(),
                Metric::L2,
            )?;
            searched += (rows.len() * members.len()) as u64;
            // What the group's search means for each row (in parallel: the exact distances),
            // then applied in row order.
            let (dist_now, idx_now): (&[f64], &[u32]) = (&dist_sq, indices);
            let outcomes: Vec<Outcome> = rows
                .par_iter()
                .enumerate()
                .with_min_len(256)
                .map(|(t, &i)| {
                    let i = i as usize;
                    if lb.winner[t] > dist_now[i] * (1.0 + MARGIN) {
                        // No code of the group comes near the best so far.
                        return Outcome::Bound(down(lb.winner[t].sqrt() * (1.0 - MARGIN)));
                    }
                    let b = members[a.indices[t] as usize];
                    let db = exact_distance(x.row(i), codes.row(b as usize), Metric::L2);
                    let others = down(lb.others[t].sqrt() * (1.0 - MARGIN));
                    if (db, b) < (dist_now[i], idx_now[i]) {
                        Outcome::Wins {
                            code: b,
                            dist_sq: db,
                            others,
                        }
                    } else if b == idx_now[i] {
                        Outcome::Bound(others)
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
                        others,
                    } => {
                        // The previous best joins its group's others.
                        let pg = self.group_of[indices[i] as usize] as usize;
                        lower[pg] = lower[pg].min(down(dist_sq[i].sqrt() * (1.0 - MARGIN)));
                        indices[i] = code;
                        dist_sq[i] = db;
                        self.upper[i] = db.sqrt() * (1.0 + MARGIN);
                        lower[g] = others;
                    }
                }
            }
        }
        Ok((searched, super::changed(&before, indices)))
    }
}

/// A searched group's verdict on one row.
enum Outcome {
    /// The row keeps its code; the group's bound becomes this.
    Bound(f32),
    /// The group's winner beats the row's best so far.
    Wins {
        code: u32,
        dist_sq: f64,
        others: f32,
    },
}

/// The largest f32 not above `v` (a bound stays a bound when stored in f32).
fn down(v: f64) -> f32 {
    let f = v as f32;
    if f as f64 > v { f.next_down() } else { f }
}
