//! Iterative decoding (ESM3 esm/utils/generation.py, SPEC §6): with S steps, after step s
//! (0-based) int(r((s+1)/S)·M + 0.1) positions stay masked, M being the number masked at the
//! start (the sequence length when generating from scratch, BOS/EOS excluded).
//!
//! The + 0.1 absorbs rounding in r: a count that is an integer in exact arithmetic (r = 1/2 of
//! M = 10) is not truncated to one less when r comes out a hair below. ESM3's defaults are the
//! cosine schedule and 20 steps; which positions to unmask (at random or by lowest entropy) is the
//! model's business, not this module's.

use super::NoiseSchedule;
use crate::{Error, Result};

/// Positions still masked after step `step` (0-based) of `steps`, starting from
/// `initially_masked`: int(r((step+1)/steps)·M + 0.1).
///
/// Errors when `steps` is 0, `step >= steps`, the schedule has no r(t) (betalinear30 is a
/// sampler), or r((s+1)/S) is outside [0, 1].
///
/// ```
/// use vqx::schedule::{masked_after_step, Schedule};
/// // Cosine, 20 steps, 100 positions: after the first step cos(π/40)·100 + 0.1 → 99.
/// assert_eq!(masked_after_step(&Schedule::Cosine, 0, 20, 100)?, 99);
/// assert_eq!(masked_after_step(&Schedule::Cosine, 19, 20, 100)?, 0); // all decoded at the end
/// # Ok::<(), vqx::Error>(())
/// ```
pub fn masked_after_step(
    schedule: &dyn NoiseSchedule,
    step: usize,
    steps: usize,
    initially_masked: usize,
) -> Result<usize> {
    if steps == 0 {
        return Err(Error::InvalidArgument(
            "iterative decoding needs at least 1 step".into(),
        ));
    }
    if step >= steps {
        return Err(Error::InvalidArgument(format!(
            "step {step} is out of range for {steps} steps (steps are 0-based)"
        )));
    }
    let t = (step + 1) as f64 / steps as f64;
    let r = schedule.rate(t).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "noise schedule {} is a sampler with no r(t); iterative decoding needs one of \
             cosine, linear, square_root, square, cubic or a schedule implementing rate()",
            schedule.name()
        ))
    })?;
    if !(0.0..=1.0).contains(&r) {
        return Err(Error::InvalidArgument(format!(
            "noise schedule {} gave r({t}) = {r}, outside [0, 1]",
            schedule.name()
        )));
    }
    // Python's int() truncates toward zero; the value is ≥ 0.1 here, so floor is the same. With
    // r ≤ 1 the result is at most M.
    Ok((r * initially_masked as f64 + 0.1).floor() as usize)
}

/// The number of positions still masked after each of the `steps` steps (length `steps`),
/// non-increasing for a decreasing schedule and ending at 0 for every built-in.
///
/// ```
/// use vqx::schedule::{decoding_plan, Schedule};
/// assert_eq!(decoding_plan(&Schedule::Linear, 4, 10)?, vec![7, 5, 2, 0]);
/// # Ok::<(), vqx::Error>(())
/// ```
pub fn decoding_plan(
    schedule: &dyn NoiseSchedule,
    steps: usize,
    initially_masked: usize,
) -> Result<Vec<usize>> {
    if steps == 0 {
        return Err(Error::InvalidArgument(
            "iterative decoding needs at least 1 step".into(),
        ));
    }
    (0..steps)
        .map(|s| masked_after_step(schedule, s, steps, initially_masked))
        .collect()
}
