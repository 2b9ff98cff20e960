//! Kernel times for `vqx bench`: every kernel alone, inputs resident on the device, timed by the
//! device's clock (CUDA events on a GPU, the wall clock on the emulated device).

use super::device::Gpu;
use super::launch::{self, NearestInputs, NearestOut};
use crate::backend::PrimitiveTimes;
use crate::error::Result;
use crate::matrix::MatRef;
use crate::nearest::{self, Metric, Precision, Prepared};
use crate::usage;
use std::cell::RefCell;

/// The nearest kernel at `precision` (without the recheck), gather, both code-sum modes (the
/// deterministic one with its device counting sort: kernels/sort.cu, then ema_sums_sorted_f32)
/// and the histogram. The indices fed to the last four are the nearest kernel's own.
pub fn time_primitives<G: Gpu>(
    g: &G,
    precision: Precision,
    x: MatRef<'_>,
    codebook: MatRef<'_>,
    metric: Metric,
    reps: usize,
) -> Result<PrimitiveTimes> {
    nearest::validate(x, codebook)?;
    let (n, d, k) = (x.rows(), x.cols(), codebook.rows());
    let input = NearestInputs::upload(g, x, codebook, &Prepared::new(codebook, metric))?;
    let mut out = NearestOut::new(g, n)?;
    let none = &mut || Ok(());

    let t_nearest = g.time(
        &format!("timing nearest ({precision})"),
        reps,
        none,
        &mut || launch::nearest(g, precision, &input, &mut out),
    )?;

    let idx_d = &out.best;
    // The kernels below index the codebook and the sums with these: a broken nearest kernel's
    // out-of-range index must be an error here, not an out-of-bounds access there.
    let indices = g.download("indices", idx_d)?;
    usage::validate(&indices, k)?;
    let mut gathered = g.alloc_zeros::<f32>("gathered rows", n * d)?;
    let t_gather = g.time("timing gather", reps, none, &mut || {
        launch::gather(g, &input.codebook, idx_d, &mut gathered, n, d)
    })?;
    drop(gathered);

    // Zeroing runs outside the timed region; the two closures share the accumulators.
    let acc = RefCell::new((
        g.alloc_zeros::<f32>("sums", k * d)?,
        g.alloc_zeros::<u32>("counts", k)?,
    ));
    let t_sums = g.time(
        "timing ema_sums_atomic_f32",
        reps,
        &mut || {
            let (s, c) = &mut *acc.borrow_mut();
            g.zero("sums", s)?;
            g.zero("counts", c)
        },
        &mut || {
            let (s, c) = &mut *acc.borrow_mut();
            launch::sums_atomic(g, &input.x, idx_d, s, c, n, d)
        },
    )?;

    let mut scratch = super::sort::SortScratch::new();
    let t_sorted = g.time("timing sort + ema_sums_sorted_f32", reps, none, &mut || {
        let (s, c) = &mut *acc.borrow_mut();
        super::sort::code_sums_deterministic(g, &input.x, idx_d, n, d, k, s, c, &mut scratch)
    })?;

    let t_usage = g.time(
        "timing usage_u32",
        reps,
        &mut || g.zero("counts", &mut acc.borrow_mut().1),
        &mut || launch::usage(g, idx_d, &mut acc.borrow_mut().1, n, k),
    )?;

    Ok(PrimitiveTimes {
        nearest: t_nearest,
        gather: t_gather,
        code_sums: t_sums,
        code_sums_deterministic: t_sorted,
        usage: t_usage,
        timed_with: g.timed_with(),
    })
}
