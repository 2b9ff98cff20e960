//! The rows one rank holds, and the few operations that need rows another rank holds.

use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};
use std::ops::Range;

/// The contiguous rows `first..first + rows.rows()` of a data set of `total` rows, as one rank
/// holds them. Shards of one job partition the rows in rank order ([`Shard::range`]).
///
/// ```
/// use vqx::kmeans::Shard;
/// assert_eq!(Shard::range(10, 3, 0), 0..3);
/// assert_eq!(Shard::range(10, 3, 2), 6..10);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Shard<'a> {
    rows: MatRef<'a>,
    first: usize,
    total: usize,
}

impl<'a> Shard<'a> {
    /// Every row: the shard of a one-rank job.
    pub fn whole(rows: MatRef<'a>) -> Self {
        Shard {
            rows,
            first: 0,
            total: rows.rows(),
        }
    }

    /// Rows `first..first + rows.rows()` of `total`.
    pub fn new(rows: MatRef<'a>, first: usize, total: usize) -> Result<Self> {
        if first + rows.rows() > total {
            return Err(Error::InvalidArgument(format!(
                "shard rows {first}..{} lie outside the data set's {total} rows",
                first + rows.rows()
            )));
        }
        Ok(Shard { rows, first, total })
    }

    /// Shard `index` of `parts` of `x`, as [`Shard::range`] cuts it.
    pub fn split(x: MatRef<'a>, parts: usize, index: usize) -> Self {
        let r = Self::range(x.rows(), parts, index);
        Shard {
            rows: x.slice_rows(r.start, r.end),
            first: r.start,
            total: x.rows(),
        }
    }

    /// The rows of shard `index` of `parts` over `total` rows: `index·total/parts` up to the
    /// next one's start, so shard sizes differ by at most one row.
    pub fn range(total: usize, parts: usize, index: usize) -> Range<usize> {
        let at = |i: usize| (i as u128 * total as u128 / parts.max(1) as u128) as usize;
        at(index)..at(index + 1)
    }

    pub fn rows(&self) -> MatRef<'a> {
        self.rows
    }
    /// Global index of this shard's first row.
    pub fn first(&self) -> usize {
        self.first
    }
    /// Rows in the whole data set.
    pub fn total(&self) -> usize {
        self.total
    }
    /// The same rows, replaced by `rows` (e.g. their normalised copy).
    pub(crate) fn with_rows<'b>(&self, rows: MatRef<'b>) -> Shard<'b> {
        Shard {
            rows,
            first: self.first,
            total: self.total,
        }
    }
}

/// The global rows `wanted` (in that order), from whichever ranks hold them: every rank
/// contributes the ones it holds and every rank gets the whole matrix (a collective: every
/// rank calls it with the same `wanted`).
///
/// ```
/// use vqx::collective::{Collective, in_process};
/// use vqx::kmeans::{Shard, fetch_rows};
/// let x = [0.0f32, 1.0, 2.0, 3.0]; // 4 rows of 1 value, 2 ranks of 2
/// let got = in_process::run(2, |c| {
///     let shard = Shard::split(vqx::MatRef::new(&x, 4, 1)?, 2, c.rank());
///     Ok(fetch_rows(c, &shard, &[3, 0])?.into_vec())
/// })?;
/// assert_eq!(got, vec![vec![3.0, 0.0]; 2]);
/// # Ok::<(), vqx::Error>(())
/// ```
pub fn fetch_rows(comm: &dyn Collective, shard: &Shard<'_>, wanted: &[usize]) -> Result<Matrix> {
    let d = shard.rows.cols();
    let mut mine: Vec<u8> = Vec::new();
    for (pos, &g) in wanted.iter().enumerate() {
        if g >= shard.total {
            return Err(Error::internal(
                "rows across ranks",
                format!("row {g} requested of {} rows", shard.total),
            ));
        }
        if let Some(local) = g
            .checked_sub(shard.first)
            .filter(|&l| l < shard.rows.rows())
        {
            mine.extend_from_slice(&(pos as u64).to_le_bytes());
            mine.extend_from_slice(bytemuck::cast_slice(shard.rows.row(local)));
        }
    }
    let mut out = vec![0f32; wanted.len() * d];
    let mut filled = vec![false; wanted.len()];
    let record = 8 + 4 * d;
    for part in comm.all_gather_bytes(&mine)? {
        for rec in part.chunks_exact(record) {
            let pos = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes")) as usize;
            for (o, b) in out[pos * d..(pos + 1) * d]
                .iter_mut()
                .zip(rec[8..].chunks_exact(4))
            {
                *o = f32::from_ne_bytes(b.try_into().expect("4 bytes"));
            }
            filled[pos] = true;
        }
    }
    if let Some(pos) = filled.iter().position(|f| !f) {
        return Err(Error::internal(
            "rows across ranks",
            format!("no rank holds row {}", wanted[pos]),
        ));
    }
    Matrix::new(out, wanted.len(), d)
}

/// Every rank's `local` rows (of `d` values each), stacked in rank order: the same matrix on
/// every rank (a collective).
///
/// ```
/// use vqx::collective::{Collective, in_process};
/// let got = in_process::run(2, |c| {
///     let mine = [c.rank() as f32; 2]; // one row of 2 values per rank
///     Ok(vqx::kmeans::gather_rows(c, &mine, 2)?.into_vec())
/// })?;
/// assert_eq!(got, vec![vec![0.0, 0.0, 1.0, 1.0]; 2]);
/// # Ok::<(), vqx::Error>(())
/// ```
pub fn gather_rows(comm: &dyn Collective, local: &[f32], d: usize) -> Result<Matrix> {
    let mut out: Vec<f32> = Vec::with_capacity(local.len());
    for part in comm.all_gather_bytes(bytemuck::cast_slice(local))? {
        out.extend(
            part.chunks_exact(4)
                .map(|b| f32::from_ne_bytes(b.try_into().expect("4 bytes"))),
        );
    }
    let rows = out.len().checked_div(d).unwrap_or(0);
    Matrix::new(out, rows, d)
}
