//! Nearest code: for each row x_n, the code c_k minimising the distance (SPEC §1).
//!
//! Every backend computes per row the winning *score* and the runner-up's score in f32
//! (L2: s_k = ||c_k||² − 2 x·c_k, the part of the distance that depends on k), then
//! [`finish`] turns them into an [`Assignment`]: rows whose winning margin is inside the f32
//! rounding bound are recomputed exactly in f64, so every backend returns the index an exact
//! computation would, ties going to the smallest k.

#[cfg(target_arch = "x86_64")]
pub mod avx512;
pub mod cpu;

use crate::error::{Error, Result};
use crate::matrix::MatRef;
use std::fmt;
use std::str::FromStr;

/// How distance between a row and a code is measured.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Squared Euclidean distance; reported distances are ||x − c||², clamped at 0.
    #[default]
    L2,
    /// Cosine similarity on L2-normalised rows (VAR `using_znorm`, vector-quantize-pytorch
    /// `use_cosine_sim`); reported distances are 1 − cos(x, c). A zero row has cosine 0 to
    /// every code.
    Cosine,
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Metric::L2 => "l2",
            Metric::Cosine => "cosine",
        })
    }
}

impl FromStr for Metric {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "l2" | "euclidean" => Ok(Metric::L2),
            "cosine" | "cos" => Ok(Metric::Cosine),
            _ => Err(Error::InvalidArgument(format!(
                "unknown metric {s:?}: expected l2 or cosine"
            ))),
        }
    }
}

/// The answer of a nearest-code search.
///
/// ```
/// use vqx::{backend::{Backend, CpuBackend}, MatRef, Metric};
/// let codebook = [0.0f32, 0.0, 10.0, 10.0];
/// let x = [9.0f32, 9.5, 1.0, -1.0];
/// let a = CpuBackend::new()
///     .nearest(MatRef::new(&x, 2, 2)?, MatRef::new(&codebook, 2, 2)?, Metric::L2)?;
/// assert_eq!(a.indices, vec![1, 0]);
/// assert!((a.distances[1] - 2.0).abs() < 1e-6);
/// # Ok::<(), vqx::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Assignment {
    /// Winning code per row.
    pub indices: Vec<u32>,
    /// Winning distance per row (see [`Metric`] for what is reported).
    pub distances: Vec<f32>,
    /// How many rows had a margin inside the rounding bound and were recomputed in f64.
    pub rechecked: usize,
}

/// The largest codebook a 32-bit index can name (indices are u32 on every backend).
pub const MAX_CODES: usize = u32::MAX as usize;

/// Checks the inputs of a nearest-code search: non-empty, same width, finite.
pub fn validate(x: MatRef<'_>, codebook: MatRef<'_>) -> Result<()> {
    codebook.check_nonempty("codebook")?;
    x.check_nonempty("input")?;
    if x.cols() != codebook.cols() {
        return Err(Error::Shape {
            what: "input width vs codebook width".into(),
            expected: format!("{} columns (the codebook's dimension)", codebook.cols()),
            got: format!("{} columns", x.cols()),
        });
    }
    if codebook.rows() > MAX_CODES {
        return Err(Error::InvalidArgument(format!(
            "codebook has {} codes; at most {MAX_CODES} are supported",
            codebook.rows()
        )));
    }
    codebook.check_finite("codebook")?;
    x.check_finite("input")?;
    Ok(())
}

/// The whole search every backend runs: validate, prepare the codebook, let the backend's
/// kernel score the rows (`candidates`), then [`finish`] with the f32 rounding model.
pub fn search(
    x: MatRef<'_>,
    codebook: MatRef<'_>,
    metric: Metric,
    candidates: impl FnOnce(&Prepared) -> Result<Candidates>,
) -> Result<Assignment> {
    validate(x, codebook)?;
    let prepared = Prepared::new(codebook, metric);
    let c = candidates(&prepared)?;
    Ok(finish(x, codebook, &prepared, RoundingModel::F32, c))
}

/// What a backend's fused kernel leaves per row, before [`finish`].
#[derive(Clone, Debug, Default)]
pub struct Candidates {
    /// Index of the smallest score (first on equal scores).
    pub best: Vec<u32>,
    /// Smallest score.
    pub best_score: Vec<f32>,
    /// Second-smallest score (+inf when K = 1).
    pub second_score: Vec<f32>,
}

/// The f32 rounding model behind the recheck bound.
///
/// A score s̃_k = fl(n_k − 2·fl(x·c_k)) computed in f32 is off from the exact
/// s_k = ||c_k||² − 2 x·c_k by at most
/// - γ_D·2||x||·||c_k|| for the dot product (Higham's bound, γ_D = D·u/(1 − D·u), any summation
///   order, with or without FMA, u the unit roundoff; Cauchy–Schwarz for Σ|x_i c_i|),
/// - u·||c_k||² for rounding the f64 norm to f32, u·|s̃_k| for the final subtraction,
/// - under cosine, 2u per normalised operand (each is rounded once from f64),
///
/// all of which fit in γ·(||c_max||² + 2||x||·||c_max||) with γ = (D + 8)·u/(1 − (D + 8)·u). The winner
/// can only be wrong when the runner-up's score is within twice that of the winner's, so those
/// rows, and only those, are recomputed.
#[derive(Clone, Copy, Debug)]
pub struct RoundingModel {
    /// Unit roundoff of the arithmetic that produced the scores (2^-24 for f32).
    pub unit_roundoff: f64,
    /// Extra terms of error per score beyond D (normalisation, the norm term).
    pub extra_terms: f64,
}

impl RoundingModel {
    /// Scores computed in plain f32 arithmetic (any order, with or without FMA).
    pub const F32: RoundingModel = RoundingModel {
        unit_roundoff: 1.0 / 16_777_216.0,
        extra_terms: 8.0,
    };
}

/// What every backend needs from the codebook before it scores rows: the rows it scores
/// against (normalised for cosine), ||c_k||² in f32, and the constants of the recheck bound.
#[derive(Clone, Debug)]
pub struct Prepared {
    metric: Metric,
    dim: usize,
    /// max_k ||c_k|| of the scored rows (1 for cosine).
    max_code_norm: f64,
    /// L2-normalised codebook, for cosine only.
    normalized: Option<crate::Matrix>,
    norms: Vec<f32>,
}

impl Prepared {
    pub fn new(codebook: MatRef<'_>, metric: Metric) -> Self {
        match metric {
            Metric::L2 => {
                let norms = code_norms(codebook);
                let max_code_norm = (0..codebook.rows())
                    .map(|k| norm_sq_f64(codebook.row(k)).sqrt())
                    .fold(0.0, f64::max);
                Prepared {
                    metric,
                    dim: codebook.cols(),
                    max_code_norm,
                    normalized: None,
                    norms,
                }
            }
            Metric::Cosine => Prepared {
                metric,
                dim: codebook.cols(),
                max_code_norm: 1.0,
                normalized: Some(normalize_rows(codebook)),
                // Exactly 1, also for a zero code: then s = 1 − 2 x̂·ĉ for every code, and a
                // zero code scores as cosine 0.
                norms: vec![1.0; codebook.rows()],
            },
        }
    }
    pub fn metric(&self) -> Metric {
        self.metric
    }
    /// The rows to score against: `codebook` itself for L2, its normalised copy for cosine.
    pub fn scored<'a>(&'a self, codebook: MatRef<'a>) -> MatRef<'a> {
        match &self.normalized {
            Some(m) => m.as_ref(),
            None => codebook,
        }
    }
    /// ||c_k||² in f32 as the score uses it (1 for every code under cosine).
    pub fn norms(&self) -> &[f32] {
        &self.norms
    }

    /// Largest error of any one score of a row whose norm is `x_norm`.
    fn score_error(&self, x_norm: f64, model: RoundingModel) -> f64 {
        let nu = (self.dim as f64 + model.extra_terms) * model.unit_roundoff;
        let gamma = nu / (1.0 - nu).max(f64::MIN_POSITIVE);
        gamma * (self.max_code_norm * self.max_code_norm + 2.0 * x_norm * self.max_code_norm)
    }
}

/// Turns per-row candidates into the final assignment; rechecks close rows in f64.
///
/// `x` and `codebook` are the raw (unnormalised) inputs; for cosine the candidates' scores are
/// those of the normalised rows, s = 1 − 2 x̂·ĉ (that is, ||x̂ − ĉ||² − 1).
pub fn finish(
    x: MatRef<'_>,
    codebook: MatRef<'_>,
    prepared: &Prepared,
    model: RoundingModel,
    candidates: Candidates,
) -> Assignment {
    use rayon::prelude::*;
    let Candidates {
        best,
        best_score,
        second_score,
    } = candidates;
    let n = x.rows();
    let mut indices = best;
    let mut distances = vec![0f32; n];
    let rechecked: usize = indices
        .par_iter_mut()
        .zip(distances.par_iter_mut())
        .enumerate()
        .with_min_len(1024)
        .map(|(row, (index, dist))| {
            let xr = x.row(row);
            let x_norm_sq = norm_sq_f64(xr);
            let x_norm = match prepared.metric {
                Metric::L2 => x_norm_sq.sqrt(),
                Metric::Cosine => 1.0,
            };
            let err = prepared.score_error(x_norm, model);
            let (b, s) = (best_score[row] as f64, second_score[row] as f64);
            if s - b <= 2.0 * err {
                let (k, d) = exact_row(xr, codebook, prepared.metric);
                *index = k;
                *dist = d as f32;
                1
            } else {
                *dist = match prepared.metric {
                    Metric::L2 => (x_norm_sq + b).max(0.0) as f32,
                    // ||x̂ − ĉ||²/2 = 1 − cos, with s = ||x̂ − ĉ||² − 1 for a non-zero x.
                    Metric::Cosine => (((b + 1.0) * 0.5).max(0.0)) as f32,
                };
                0
            }
        })
        .sum();
    Assignment {
        indices,
        distances,
        rechecked,
    }
}

/// Exact nearest code of one row: distances in f64, the first minimum wins.
///
/// Products of two f32 values are exact in f64, so the only rounding is in the sums (relative
/// 1e-16·D): far below any gap an f32 input can express.
pub fn exact_row(x: &[f32], codebook: MatRef<'_>, metric: Metric) -> (u32, f64) {
    let mut best = (0u32, f64::INFINITY);
    let x_inv = inv_norm_f64(x);
    for k in 0..codebook.rows() {
        let c = codebook.row(k);
        let d = match metric {
            Metric::L2 => sum_lanes(x, c, |a, b| {
                let t = a - b;
                t * t
            }),
            Metric::Cosine => 1.0 - sum_lanes(x, c, |a, b| a * b) * x_inv * inv_norm_f64(c),
        };
        if d < best.1 {
            best = (k as u32, d);
        }
    }
    (best.0, best.1.max(0.0))
}

/// Σ_i f(x_i, c_i) in f64 with 8 independent accumulators (a fixed order, so the result is
/// deterministic, and one the compiler vectorises).
#[inline]
fn sum_lanes(x: &[f32], c: &[f32], f: impl Fn(f64, f64) -> f64) -> f64 {
    const L: usize = 8;
    let mut acc = [0f64; L];
    let (xc, cc) = (x.chunks_exact(L), c.chunks_exact(L));
    let (xr, cr) = (xc.remainder(), cc.remainder());
    for (a, b) in xc.zip(cc) {
        for i in 0..L {
            acc[i] += f(a[i] as f64, b[i] as f64);
        }
    }
    let tail: f64 = xr
        .iter()
        .zip(cr)
        .map(|(&a, &b)| f(a as f64, b as f64))
        .sum();
    acc.iter().sum::<f64>() + tail
}

pub(crate) fn norm_sq_f64(v: &[f32]) -> f64 {
    v.iter().map(|&a| a as f64 * a as f64).sum()
}

/// 1/||v||, or 0 for a zero vector (which then has cosine 0 to everything).
pub(crate) fn inv_norm_f64(v: &[f32]) -> f64 {
    let n = norm_sq_f64(v).sqrt();
    if n > 0.0 { 1.0 / n } else { 0.0 }
}

/// Rows scaled to unit L2 norm (zero rows stay zero), computed in f64 and rounded once.
pub fn normalize_rows(m: MatRef<'_>) -> crate::Matrix {
    let mut out = m.to_owned();
    let cols = m.cols();
    if cols > 0 {
        for row in out.data_mut().chunks_mut(cols) {
            let inv = inv_norm_f64(row);
            for v in row {
                *v = (*v as f64 * inv) as f32;
            }
        }
    }
    out
}

/// ||c_k||² per code, computed in f64 and rounded once to f32 (kept out of any
/// low-precision operand, SPEC §1).
fn code_norms(codebook: MatRef<'_>) -> Vec<f32> {
    (0..codebook.rows())
        .map(|k| norm_sq_f64(codebook.row(k)) as f32)
        .collect()
}
