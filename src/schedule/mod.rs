//! Noise schedules for masked-token training over VQ tokens (SPEC §6).
//!
//! A schedule turns t ~ U[0, 1) into a mask rate r. ESM3 (after MaskGIT) trains its masked model
//! by drawing r per sequence from such a schedule and masking each token with probability r;
//! at generation time the same r(t) says how many positions stay masked after each step.
//!
//! | name | r(t) | E[r] | Var[r] |
//! |---|---|---|---|
//! | `cosine` | cos(tπ/2) | 2/π | 1/2 − 4/π² |
//! | `linear` | 1 − t | 1/2 | 1/12 |
//! | `square_root` (alias `square_root_schedule`) | 1 − √t | 1/3 | 1/18 |
//! | `square` | 1 − t² | 2/3 | 4/45 |
//! | `cubic` | 1 − t³ | 3/4 | 9/112 |
//! | `betalinear30` | Beta(3, 9) with probability 0.8, else U(0, 1) | 0.3 | 0.8/13 + 0.2/3 − 0.09 |
//!
//! `betalinear30` (the ESM3 paper's sequence-track schedule) is a sampler, not a function of t:
//! [`NoiseSchedule::rate`] returns `None` for it.
//!
//! - [`Schedule`]: the built-ins, parsed from their names ([`Schedule::from_str`]);
//! - [`NoiseSchedule`]: the trait a user implements to add a schedule ([`FnSchedule`] wraps a
//!   plain r(t));
//! - [`masking`]: per-sequence masking of u32 token ids, with padding, protected ids (BOS/EOS)
//!   and track dropout;
//! - [`decoding`]: how many positions stay masked after step s of S (ESM3's rule).
//!
//! ```
//! use vqx::schedule::{NoiseSchedule, Schedule};
//! let cosine: Schedule = "cosine".parse()?;
//! assert!((cosine.rate(1.0 / 3.0).unwrap() - 3f64.sqrt() / 2.0).abs() < 1e-12); // cos(π/6)
//! let r = vqx::schedule::sample_rates(&cosine, 1000, 7)?;
//! assert!(r.iter().all(|&r| (0.0..=1.0).contains(&r)));
//! assert!("cosinus".parse::<Schedule>().unwrap_err().to_string().contains("square_root"));
//! # Ok::<(), vqx::Error>(())
//! ```

pub mod decoding;
pub mod masking;

pub use decoding::{decoding_plan, masked_after_step};
pub use masking::{MaskConfig, Masked, Track, mask_tokens};

use crate::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rand_distr::{Beta, Distribution};
use std::f64::consts::{FRAC_PI_2, PI};
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// A noise schedule: a way of drawing a mask rate r ∈ [0, 1].
///
/// Implement [`sample`](NoiseSchedule::sample) (and [`rate`](NoiseSchedule::rate) when r is a
/// function of t, which iterative decoding needs); the closed-form extras are optional and only
/// used for checks and plots. Every consumer in vqx validates what `sample` and `rate` return, so
/// a schedule giving r outside [0, 1] yields an [`Error::InvalidArgument`], not a panic.
///
/// ```
/// use rand::RngCore;
/// use vqx::schedule::{NoiseSchedule, mask_tokens, MaskConfig};
///
/// /// Always masks 15% (BERT's rate).
/// struct Bert;
/// impl NoiseSchedule for Bert {
///     fn name(&self) -> &str { "bert15" }
///     fn sample(&self, _rng: &mut dyn RngCore) -> f64 { 0.15 }
///     fn rate(&self, _t: f64) -> Option<f64> { Some(0.15) }
///     fn mean(&self) -> Option<f64> { Some(0.15) }
/// }
///
/// let tokens = vec![5u32; 4 * 1000];
/// let m = mask_tokens(&tokens, 1000, &Bert, &MaskConfig::new(99), 1)?;
/// assert_eq!(m.rates, vec![0.15; 4]);
/// # Ok::<(), vqx::Error>(())
/// ```
pub trait NoiseSchedule: Send + Sync {
    /// The name shown in errors, CSV headers and plots.
    fn name(&self) -> &str;

    /// Draws one mask rate r ∈ [0, 1].
    fn sample(&self, rng: &mut dyn RngCore) -> f64;

    /// r(t) for t ∈ [0, 1], when the schedule is a function of t; `None` for a pure sampler.
    fn rate(&self, t: f64) -> Option<f64> {
        let _ = t;
        None
    }

    /// The density of r (as drawn by [`sample`](NoiseSchedule::sample)) at `r`, in closed form
    /// when known. For r = r(t) with t uniform this is |dt/dr| (SPEC §6).
    fn density(&self, r: f64) -> Option<f64> {
        let _ = r;
        None
    }

    /// E[r], when known in closed form.
    fn mean(&self) -> Option<f64> {
        None
    }

    /// Var[r], when known in closed form.
    fn variance(&self) -> Option<f64> {
        None
    }
}

/// A schedule given by a function r(t): sampling draws t ~ U[0, 1) and returns r(t).
///
/// ```
/// use vqx::schedule::{FnSchedule, NoiseSchedule};
/// let quartic = FnSchedule::new("quartic", |t| 1.0 - t.powi(4));
/// assert_eq!(quartic.rate(0.5), Some(0.9375));
/// assert_eq!(quartic.name(), "quartic");
/// ```
pub struct FnSchedule<F> {
    name: String,
    r: F,
}

impl<F: Fn(f64) -> f64 + Send + Sync> FnSchedule<F> {
    /// Wraps `r`, which should map [0, 1] into [0, 1].
    pub fn new(name: impl Into<String>, r: F) -> Self {
        FnSchedule {
            name: name.into(),
            r,
        }
    }
}

impl<F> fmt::Debug for FnSchedule<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnSchedule")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<F: Fn(f64) -> f64 + Send + Sync> NoiseSchedule for FnSchedule<F> {
    fn name(&self) -> &str {
        &self.name
    }
    fn sample(&self, rng: &mut dyn RngCore) -> f64 {
        (self.r)(rng.r#gen::<f64>())
    }
    fn rate(&self, t: f64) -> Option<f64> {
        Some((self.r)(t))
    }
}

/// The built-in schedules of SPEC §6.
///
/// ```
/// use vqx::schedule::{NoiseSchedule, Schedule};
/// assert_eq!("square_root_schedule".parse::<Schedule>()?, Schedule::SquareRoot); // ESM3's name
/// assert_eq!(Schedule::Cubic.rate(0.5), Some(0.875));
/// assert_eq!(Schedule::BetaLinear30.rate(0.5), None); // a sampler, not a function of t
/// assert_eq!(Schedule::BetaLinear30.mean(), Some(0.3));
/// # Ok::<(), vqx::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Schedule {
    /// cos(tπ/2), MaskGIT's schedule and ESM3's default for decoding.
    Cosine,
    /// 1 − t.
    Linear,
    /// 1 − √t (ESM3's registry calls it `square_root_schedule`).
    SquareRoot,
    /// 1 − t².
    Square,
    /// 1 − t³.
    Cubic,
    /// Beta(3, 9) with probability 0.8, else U(0, 1): mean 0.3 (ESM3 paper, sequence track).
    BetaLinear30,
}

/// Probability that betalinear30 draws from Beta(3, 9) rather than U(0, 1).
const BETALINEAR_BETA_WEIGHT: f64 = 0.8;
/// Beta(3, 9)'s normalising constant 1/B(3, 9) = 11! / (2! 8!).
const BETA_3_9_NORM: f64 = 495.0;

fn beta_3_9() -> &'static Beta<f64> {
    static BETA: OnceLock<Beta<f64>> = OnceLock::new();
    // Constant, valid parameters: this cannot fail.
    BETA.get_or_init(|| Beta::new(3.0, 9.0).expect("Beta(3, 9) has valid parameters"))
}

impl Schedule {
    /// Every built-in, in the order names are listed in errors and the CLI.
    pub const ALL: [Schedule; 6] = [
        Schedule::Cosine,
        Schedule::Linear,
        Schedule::SquareRoot,
        Schedule::Square,
        Schedule::Cubic,
        Schedule::BetaLinear30,
    ];

    /// The canonical name (`square_root` for [`Schedule::SquareRoot`]).
    pub fn as_str(self) -> &'static str {
        match self {
            Schedule::Cosine => "cosine",
            Schedule::Linear => "linear",
            Schedule::SquareRoot => "square_root",
            Schedule::Square => "square",
            Schedule::Cubic => "cubic",
            Schedule::BetaLinear30 => "betalinear30",
        }
    }

    /// The names [`Schedule::from_str`] accepts, aliases included, for help and error messages.
    pub fn valid_names() -> String {
        let mut names: Vec<&str> = Self::ALL.iter().map(|s| s.as_str()).collect();
        names.push("square_root_schedule (= square_root)");
        names.join(", ")
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // pad, not write_str, so width and alignment ({:>12}) apply.
        f.pad(self.as_str())
    }
}

impl FromStr for Schedule {
    type Err = Error;

    /// Parses a canonical name or ESM3's `square_root_schedule`, ignoring case and surrounding
    /// spaces; anything else is an [`Error::InvalidArgument`] listing the valid names.
    fn from_str(s: &str) -> Result<Self> {
        let name = s.trim().to_ascii_lowercase();
        if name == "square_root_schedule" {
            return Ok(Schedule::SquareRoot);
        }
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == name)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown noise schedule {s:?}; valid names: {}",
                    Self::valid_names()
                ))
            })
    }
}

impl NoiseSchedule for Schedule {
    fn name(&self) -> &str {
        self.as_str()
    }

    fn sample(&self, rng: &mut dyn RngCore) -> f64 {
        match self {
            Schedule::BetaLinear30 => {
                if rng.r#gen::<f64>() < BETALINEAR_BETA_WEIGHT {
                    beta_3_9().sample(rng)
                } else {
                    rng.r#gen::<f64>()
                }
            }
            // t ~ U[0, 1) as torch.rand draws it in ESM3; `rate` is Some for every other variant.
            _ => self.rate(rng.r#gen::<f64>()).unwrap_or(f64::NAN),
        }
    }

    fn rate(&self, t: f64) -> Option<f64> {
        // Clamped so a t a rounding step outside [0, 1] cannot give NaN (√ of a negative).
        let t = t.clamp(0.0, 1.0);
        Some(match self {
            Schedule::Cosine => (t * FRAC_PI_2).cos(),
            Schedule::Linear => 1.0 - t,
            Schedule::SquareRoot => 1.0 - t.sqrt(),
            Schedule::Square => 1.0 - t * t,
            Schedule::Cubic => 1.0 - t * t * t,
            Schedule::BetaLinear30 => return None,
        })
    }

    /// |dt/dr| for the function schedules (unbounded as r → 1 for cosine, square and cubic),
    /// the mixture's pdf for betalinear30; 0 outside [0, 1].
    fn density(&self, r: f64) -> Option<f64> {
        if !(0.0..=1.0).contains(&r) {
            return Some(0.0);
        }
        let s = 1.0 - r;
        Some(match self {
            // t = (2/π)·acos(r)
            Schedule::Cosine => 2.0 / PI / (1.0 - r * r).sqrt(),
            Schedule::Linear => 1.0,
            // t = (1 − r)²
            Schedule::SquareRoot => 2.0 * s,
            // t = (1 − r)^(1/2)
            Schedule::Square => 0.5 / s.sqrt(),
            // t = (1 − r)^(1/3)
            Schedule::Cubic => 1.0 / (3.0 * s.powf(2.0 / 3.0)),
            Schedule::BetaLinear30 => {
                BETALINEAR_BETA_WEIGHT * BETA_3_9_NORM * r * r * s.powi(8)
                    + (1.0 - BETALINEAR_BETA_WEIGHT)
            }
        })
    }

    fn mean(&self) -> Option<f64> {
        Some(match self {
            Schedule::Cosine => 2.0 / PI,
            Schedule::Linear => 0.5,
            Schedule::SquareRoot => 1.0 / 3.0,
            Schedule::Square => 2.0 / 3.0,
            Schedule::Cubic => 0.75,
            // 0.8 · 3/12 + 0.2 · 1/2
            Schedule::BetaLinear30 => 0.3,
        })
    }

    fn variance(&self) -> Option<f64> {
        // E[r²] − E[r]², with E[r²] integrated in closed form over t ∈ [0, 1].
        Some(match self {
            Schedule::Cosine => 0.5 - 4.0 / (PI * PI),
            Schedule::Linear => 1.0 / 12.0,
            Schedule::SquareRoot => 1.0 / 18.0,
            Schedule::Square => 4.0 / 45.0,
            Schedule::Cubic => 9.0 / 112.0,
            // E[X²] = a(a+1)/((a+b)(a+b+1)) = 1/13 for Beta(3, 9), 1/3 for U(0, 1).
            Schedule::BetaLinear30 => {
                BETALINEAR_BETA_WEIGHT / 13.0 + (1.0 - BETALINEAR_BETA_WEIGHT) / 3.0 - 0.09
            }
        })
    }
}

/// A seeded generator for everything in this module: rand 0.8's StdRng (ChaCha12), so a seed
/// gives the same draws on every platform for a given rand version.
pub fn rng_from_seed(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Draws `n` rates from `schedule` with a generator seeded by `seed`, checking each is in [0, 1].
///
/// ```
/// use vqx::schedule::{sample_rates, Schedule};
/// let a = sample_rates(&Schedule::BetaLinear30, 10, 42)?;
/// assert_eq!(a, sample_rates(&Schedule::BetaLinear30, 10, 42)?); // reproducible
/// # Ok::<(), vqx::Error>(())
/// ```
pub fn sample_rates(schedule: &dyn NoiseSchedule, n: usize, seed: u64) -> Result<Vec<f64>> {
    let mut rng = rng_from_seed(seed);
    (0..n)
        .map(|_| check_rate(schedule, schedule.sample(&mut rng)))
        .collect()
}

/// A user schedule may return anything: r outside [0, 1] (or NaN) is an error, not a panic or
/// a silently clamped rate.
pub(crate) fn check_rate(schedule: &dyn NoiseSchedule, r: f64) -> Result<f64> {
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(Error::InvalidArgument(format!(
            "noise schedule {} gave mask rate {r}, outside [0, 1]",
            schedule.name()
        )))
    }
}
