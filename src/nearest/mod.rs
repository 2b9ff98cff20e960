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
pub mod emulate;

use crate::error::{Error, Result};
use crate::matrix::MatRef;

/// `name()`, `Display` and `FromStr` for a fieldless enum from one table: each variant's name
/// (the first: what `Display` writes and an error lists) and the aliases `FromStr` also accepts,
/// ASCII case ignored. Anything else is an `Error::InvalidArgument` naming `what` and the names:
/// `names!(Metric, "metric": L2 => ["l2", "euclidean"], Cosine => ["cosine", "cos"]);`.
macro_rules! names {
    ($ty:ident, $what:literal:
        $($variant:ident => [$name:literal $(, $alias:literal)*]),+ $(,)?) => {
        impl $ty {
            /// The name `Display` writes and `FromStr` reads.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.name())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = $crate::error::Error;
            fn from_str(s: &str) -> $crate::error::Result<Self> {
                match s.to_ascii_lowercase().as_str() {
                    $($name $(| $alias)* => Ok($ty::$variant),)+
                    _ => Err($crate::error::Error::InvalidArgument(format!(
                        "unknown {} {s:?}: expected {}",
                        $what,
                        $crate::nearest::one_of(&[$($name),+])
                    ))),
                }
            }
        }
    };
}
pub(crate) use names;

/// The names as a list to choose from: "a, b or c".
pub(crate) fn one_of(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

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

names!(Metric, "metric": L2 => ["l2", "euclidean"], Cosine => ["cosine", "cos"]);

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
    validate_rows(Rows::all(x), codebook)
}

/// [`validate`] for the rows a search reads.
pub(crate) fn validate_rows(x: Rows<'_>, codebook: MatRef<'_>) -> Result<()> {
    codebook.check_nonempty("codebook")?;
    x.check_nonempty()?;
    if x.cols() != codebook.cols() {
        return Err(Error::shape(
            "input width vs codebook width",
            format!("{} columns (the codebook's dimension)", codebook.cols()),
            format!("{} columns", x.cols()),
        ));
    }
    if codebook.rows() > MAX_CODES {
        return Err(Error::InvalidArgument(format!(
            "codebook has {} codes; at most {MAX_CODES} are supported",
            codebook.rows()
        )));
    }
    let mc = codebook.max_abs("codebook")? as f64;
    let mx = x.max_abs("input")? as f64;
    // With |v| ≤ M, ||x||, ||c|| ≤ √D·M and |s| ≤ 3·D·M²: every f32 score, dot product and
    // norm of a search stays finite below the limit of `check_max_abs`.
    let what = if mx >= mc { "input" } else { "codebook" };
    check_max_abs(what, mx.max(mc), x.cols())
}

/// The rows a search scores: every row of a matrix, or the rows it names, in that order.
///
/// The exact k-means bounds search a different subset of the rows against each group of codes
/// every pass; naming the rows instead of copying them into a matrix of their own keeps the
/// only copy in a small per-thread buffer that stays in cache (copying every searched row to a
/// fresh matrix took a fifth of a pass).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rows<'a> {
    x: MatRef<'a>,
    pick: Option<&'a [u32]>,
    /// What a [`CheckedRows`] knows of all rows of `x`: their largest |value| and ||x||².
    checked: Option<(f32, &'a [f64])>,
}

impl<'a> Rows<'a> {
    pub(crate) fn all(x: MatRef<'a>) -> Self {
        Rows {
            x,
            pick: None,
            checked: None,
        }
    }

    /// The rows of `x` named by `pick`; an error names the first index out of range.
    pub(crate) fn picked(x: &'a CheckedRows<'a>, pick: &'a [u32]) -> Result<Self> {
        let m = x.x;
        if let Some(&i) = pick.iter().find(|&&i| i as usize >= m.rows()) {
            return Err(Error::InvalidArgument(format!(
                "row {i} picked for a search of a matrix of {} rows",
                m.rows()
            )));
        }
        Ok(Rows {
            x: m,
            pick: Some(pick),
            checked: Some((x.max_abs, &x.norm_sq)),
        })
    }

    /// ||x||² of the `i`-th row searched, when known beforehand.
    pub(crate) fn known_norm_sq(&self, i: usize) -> Option<f64> {
        let (_, norms) = self.checked?;
        Some(norms[self.pick.map_or(i, |p| p[i] as usize)])
    }

    pub(crate) fn len(&self) -> usize {
        self.pick.map_or(self.x.rows(), <[u32]>::len)
    }

    pub(crate) fn cols(&self) -> usize {
        self.x.cols()
    }

    /// The `i`-th row searched.
    pub(crate) fn row(&self, i: usize) -> &'a [f32] {
        match self.pick {
            None => self.x.row(i),
            Some(p) => self.x.row(p[i] as usize),
        }
    }

    /// Searched rows `start..end` as one slice, when they lie contiguous in memory.
    pub(crate) fn dense(&self, start: usize, end: usize) -> Option<&'a [f32]> {
        match self.pick {
            None => Some(self.x.slice_rows(start, end).data()),
            Some(_) => None,
        }
    }

    fn check_nonempty(&self) -> Result<()> {
        match self.pick {
            None => self.x.check_nonempty("input"),
            Some(p) if p.is_empty() || self.cols() == 0 => Err(Error::Empty {
                what: "input".into(),
                detail: format!("{} picked rows × {} columns", p.len(), self.cols()),
            }),
            Some(_) => Ok(()),
        }
    }

    /// [`MatRef::max_abs`] over the searched rows (known already for checked rows).
    fn max_abs(&self, what: &str) -> Result<f32> {
        match self.checked {
            Some((m, _)) => Ok(m),
            None => self.x.max_abs(what),
        }
    }
}

/// Rows checked once for searches (finite, their largest |value| known) with their ||x||² in
/// f64: what repeated searches of subsets of the same rows share, so that no search re-checks
/// the rows or re-reads them for their norms. The exact k-means bounds search a different
/// subset of the rows against each group of codes every pass
/// ([`crate::backend::Backend::nearest_rows_for_bounds`]).
///
/// ```
/// use vqx::nearest::CheckedRows;
/// let x = [3.0f32, 4.0, 0.0, 1.0];
/// let rows = CheckedRows::new(vqx::MatRef::new(&x, 2, 2)?)?;
/// assert_eq!(rows.norm_sq(), &[25.0, 1.0]);
/// assert!(CheckedRows::new(vqx::MatRef::new(&[f32::NAN], 1, 1)?).is_err());
/// # Ok::<(), vqx::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct CheckedRows<'a> {
    x: MatRef<'a>,
    max_abs: f32,
    norm_sq: Vec<f64>,
}

impl<'a> CheckedRows<'a> {
    /// Checks every value of `x` (an error names the first NaN or infinity) and computes the
    /// rows' squared norms.
    pub fn new(x: MatRef<'a>) -> Result<Self> {
        Self::named(x, "input")
    }

    /// [`CheckedRows::new`], an error naming the rows `what`.
    pub fn named(x: MatRef<'a>, what: &str) -> Result<Self> {
        use rayon::prelude::*;
        let max_abs = x.max_abs(what)?;
        let norm_sq = (0..x.rows())
            .into_par_iter()
            .with_min_len(1024)
            .map(|i| norm_sq_f64(x.row(i)))
            .collect();
        Ok(CheckedRows {
            x,
            max_abs,
            norm_sq,
        })
    }

    pub fn rows(&self) -> MatRef<'a> {
        self.x
    }

    /// The rows' largest |value|, found when they were checked.
    pub fn max_abs(&self) -> f32 {
        self.max_abs
    }

    /// ||x_i||² in f64, one per row.
    pub fn norm_sq(&self) -> &[f64] {
        &self.norm_sq
    }
}

/// Fails when `max_abs`, the largest |value| of `what` (rows of `dim` values), could overflow
/// an f32 score (|v| ≤ M bounds every score by 3·D·M², kept below f32::MAX / 8).
pub(crate) fn check_max_abs(what: &str, max_abs: f64, dim: usize) -> Result<()> {
    let limit = (f32::MAX as f64 / 8.0 / (3.0 * dim as f64)).sqrt();
    if max_abs > limit {
        return Err(Error::InvalidArgument(format!(
            "{what} has a value of magnitude {max_abs:e}: with D = {dim} the f32 distances would \
             overflow (the limit is {limit:e}); scale the data down"
        )));
    }
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
    search_with_precision(x, codebook, metric, Precision::Exact, candidates)
}

/// [`search`] for scores computed at `precision`: the same sequence, with [`finish`] using
/// that precision's rounding model ([`Precision::model`]), so rows whose margin is inside the
/// wider low-precision bound are recomputed exactly.
pub fn search_with_precision(
    x: MatRef<'_>,
    codebook: MatRef<'_>,
    metric: Metric,
    precision: Precision,
    candidates: impl FnOnce(&Prepared) -> Result<Candidates>,
) -> Result<Assignment> {
    Ok(search_rows(
        Rows::all(x),
        codebook,
        metric,
        precision.model(),
        candidates,
        false,
        true,
    )?
    .0)
}

/// [`search_with_precision`], with the [`LowerBounds`] when `bounds` asks for them; `model`
/// is the rounding of the scores `candidates` computes. Without `distances` the winners'
/// distances may be left at 0 ([`finish_rows`]).
pub(crate) fn search_rows(
    x: Rows<'_>,
    codebook: MatRef<'_>,
    metric: Metric,
    model: RoundingModel,
    candidates: impl FnOnce(&Prepared) -> Result<Candidates>,
    bounds: bool,
    distances: bool,
) -> Result<(Assignment, Option<LowerBounds>)> {
    validate_rows(x, codebook)?;
    let prepared = Prepared::new(codebook, metric);
    let c = candidates(&prepared)?;
    Ok(finish_rows(
        x, codebook, &prepared, model, c, bounds, distances,
    ))
}

/// The arithmetic the scores of `nearest` are computed in. Whatever the precision, the indices
/// returned are those of an exact computation on every row that is not a true tie: rows whose
/// margin is inside the precision's rounding bound ([`RoundingModel`]) are recomputed exactly.
///
/// ```
/// use vqx::nearest::Precision;
/// assert_eq!("bf16".parse::<Precision>()?, Precision::Bf16);
/// assert_eq!(Precision::Tf32.to_string(), "tf32");
/// # Ok::<(), vqx::Error>(())
/// ```
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 operands and f32 arithmetic (the SIMT kernel, the CPU kernels).
    #[default]
    Exact,
    /// Operands rounded to tf32 (10 explicit mantissa bits, u = 2^-11), products and sums in
    /// f32 on tensor cores (CUDA only).
    Tf32,
    /// Operands rounded to bf16 (7 explicit mantissa bits, u = 2^-8), products and sums in f32
    /// on tensor cores (CUDA only).
    Bf16,
}

impl Precision {
    /// Every precision, in the order `--precision` lists them.
    pub const ALL: [Precision; 3] = [Precision::Exact, Precision::Tf32, Precision::Bf16];

    /// The rounding model [`finish`] uses for scores computed at this precision.
    pub fn model(self) -> RoundingModel {
        match self {
            Precision::Exact => RoundingModel::F32,
            Precision::Tf32 => RoundingModel::TF32,
            Precision::Bf16 => RoundingModel::BF16,
        }
    }
}

names!(Precision, "precision":
    Exact => ["exact", "f32", "fp32"], Tf32 => ["tf32"], Bf16 => ["bf16", "bfloat16"]);

/// What a backend's fused kernel leaves per row, before [`finish`].
#[derive(Clone, Debug, Default)]
pub struct Candidates {
    /// Index of the smallest score (first on equal scores).
    pub best: Vec<u32>,
    /// Smallest score.
    pub best_score: Vec<f32>,
    /// Second-smallest score (+inf when K = 1).
    pub second_score: Vec<f32>,
    /// ||x||² of each raw row in f64, when the kernel computed it while the row was in cache
    /// (the CPU kernels, under L2); [`finish`] computes it otherwise.
    pub row_norm_sq: Option<Vec<f64>>,
    /// Per row, when the kernel could list them: every code whose computed score is within
    /// twice the rounding bound of the best, so a recheck measures only these instead of the
    /// whole codebook (the CPU bf16 screen; None from the other kernels).
    pub shortlist: Option<Vec<Shortlist>>,
}

/// The codes of one row that can be its nearest ([`Candidates::shortlist`]): a few codes by
/// index, and whole lanes (lane l: every code k with k mod [`Shortlist::LANES`] = l, the codes
/// one SIMD lane of a kernel scored, when it cannot tell which of them are close). Nothing
/// listed (the default) means every code.
///
/// ```
/// use vqx::nearest::Shortlist;
/// let mut s = Shortlist::default();
/// assert!(!s.is_listed());
/// s.push(70);
/// s.push_lane(3); // codes 3, 35, 67, 99 of 100
/// assert_eq!(s.codes(100), [70, 3, 35, 67, 99]);
/// for c in [1, 2, 4, 5, 6] {
///     s.push(c); // six codes by index: the list is full
/// }
/// s.push(7); // so code 7 brings its whole lane (7, 39, 71)
/// assert_eq!(s.codes(100), [70, 1, 2, 4, 5, 6, 3, 35, 67, 99, 7, 39, 71]);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shortlist {
    codes: [u32; Shortlist::CAPACITY],
    len: u8,
    lanes: u32,
}

impl Shortlist {
    /// Most codes listed by index (the entry is 32 bytes).
    pub const CAPACITY: usize = 6;
    /// Lanes of the lane mask.
    pub const LANES: usize = 32;

    /// Lists `code` (or, when the list is full, its whole lane).
    pub fn push(&mut self, code: u32) {
        if (self.len as usize) < Self::CAPACITY {
            self.codes[self.len as usize] = code;
            self.len += 1;
        } else {
            self.push_lane(code as usize % Self::LANES);
        }
    }

    /// Lists every code of lane `lane`.
    pub fn push_lane(&mut self, lane: usize) {
        self.lanes |= 1 << lane;
    }

    /// Whether anything is listed (if not, every code can win).
    pub fn is_listed(&self) -> bool {
        self.len > 0 || self.lanes != 0
    }

    /// The listed codes among `k` codes, each once: by index (outside the listed lanes), then
    /// the lanes' in lane order.
    pub fn codes(&self, k: usize) -> Vec<u32> {
        let lanes = self.lanes;
        let by_index = self.codes[..self.len as usize]
            .iter()
            .copied()
            .filter(|&c| lanes >> (c as usize % Self::LANES) & 1 == 0);
        let in_lanes = (0..Self::LANES)
            .filter(|l| lanes >> l & 1 == 1)
            .flat_map(|l| (l..k).step_by(Self::LANES))
            .map(|c| c as u32);
        by_index.chain(in_lanes).collect()
    }
}

/// The rounding model behind the recheck bound.
///
/// **f32 scores.** A score s̃_k = fl(n_k − 2·fl(x·c_k)) computed in f32 is off from the exact
/// s_k = ||c_k||² − 2 x·c_k by at most
/// - γ_D·2||x||·||c_k|| for the dot product (Higham's bound, γ_D = D·u/(1 − D·u), any summation
///   order, with or without FMA, u the unit roundoff; Cauchy–Schwarz for Σ|x_i c_i|),
/// - u·||c_k||² for rounding the f64 norm to f32, u·|s̃_k| for the final subtraction,
/// - under cosine, 2u per normalised operand (each is rounded once from f64),
///
/// all of which fit in γ·(||c_max||² + 2||x||·||c_max||) with γ = (D + 8)·u/(1 − (D + 8)·u).
///
/// **Low-precision operands** (tf32, bf16: [`Precision`]). The kernel rounds each operand once,
/// x̃_i = x_i(1 + δ_i), c̃_i = c_i(1 + ε_i) with |δ_i|, |ε_i| ≤ u_op (`operand_roundoff`: 2^-11
/// for tf32, 2^-8 for bf16; both round-to-nearest, ties away or to even, whose error is at most
/// half an ulp either way). Then x̃_i c̃_i − x_i c_i = x_i c_i((1 + δ_i)(1 + ε_i) − 1), and
/// |(1 + δ)(1 + ε) − 1| ≤ 2u_op + u_op², so
///
///   |Σ x̃_i c̃_i − Σ x_i c_i| ≤ (2u_op + u_op²)·Σ|x_i c_i| ≤ (2u_op + u_op²)·||x||·||c_k||,
///
/// independent of D. The f32 accumulation of the rounded products adds γ_D·Σ|x̃_i c̃_i| ≤
/// γ_D·(1 + u_op)²·||x||·||c_k||. The products of two tf32 or two bf16 values are exact in f32
/// (11 + 11 and 8 + 8 significant bits ≤ 24), so the accumulation is the only f32 rounding of
/// the dot product. Tensor cores do not round like IEEE f32 adds: the published measurements
/// (Fasi, Higham, Mikaitis, Pranesh, "Numerical behavior of NVIDIA tensor cores", PeerJ CS
/// 2021) show truncation (round toward zero: relative error < 2·2^-24) and operands aligned to
/// the largest exponent of each block sum without guard bits, which at most doubles the error
/// per accumulated term again. The tensor-core models therefore take u = 2^-22 (four times
/// f32's unit roundoff) for every accumulation and epilogue rounding, so the same γ formula
/// covers them. Altogether
///
///   |s̃_k − s_k| ≤ γ·||c_max||² + 2||x||·||c_max||·(γ(1 + u_op)² + 2u_op + u_op²) + η,
///
/// with η = 2·2^-124·(√D·(||x|| + ||c_max||) + D) for operands or products that underflow
/// (flushed to zero, or rounded as subnormals): each contributes an absolute error below 2^-126
/// per operand or product. (η is about 10^-37: it matters only for all-but-zero data.)
///
/// **The recheck.** The winner can only be wrong when the runner-up's score is within twice that
/// bound of the winner's, so those rows, and only those, are recomputed by [`exact_row`] in f64
/// (products of f32 values are exact in f64: stricter than the f32 recomputation SPEC §1 asks
/// for).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundingModel {
    /// Unit roundoff of the arithmetic that accumulated the scores (2^-24 for f32).
    pub unit_roundoff: f64,
    /// Extra terms of error per score beyond D (normalisation, the norm term).
    pub extra_terms: f64,
    /// Unit roundoff of the one rounding each operand gets before the products (0 for f32
    /// operands, 2^-11 for tf32, 2^-8 for bf16).
    pub operand_roundoff: f64,
}

impl RoundingModel {
    /// (γ, the dot-product factor) of the bound at dimension `dim`: a score's error is at most
    /// γ·||c_max||² + 2·||x||·||c_max||·factor + η (see above). The device recheck
    /// (kernels/recheck.cu) takes both from here.
    pub fn factors(&self, dim: usize) -> (f64, f64) {
        let nu = (dim as f64 + self.extra_terms) * self.unit_roundoff;
        let gamma = nu / (1.0 - nu).max(f64::MIN_POSITIVE);
        let uo = self.operand_roundoff;
        (gamma, gamma * (1.0 + uo) * (1.0 + uo) + 2.0 * uo + uo * uo)
    }

    /// Scores computed in plain f32 arithmetic (any order, with or without FMA).
    pub const F32: RoundingModel = RoundingModel {
        unit_roundoff: 1.0 / 16_777_216.0,
        extra_terms: 8.0,
        operand_roundoff: 0.0,
    };
    /// Operands rounded to tf32 (u = 2^-11), accumulated on tensor cores (u = 2^-22, see above).
    pub const TF32: RoundingModel = RoundingModel {
        unit_roundoff: 1.0 / 4_194_304.0,
        extra_terms: 8.0,
        operand_roundoff: 1.0 / 2048.0,
    };
    /// Operands rounded to bf16 (u = 2^-8), accumulated on tensor cores (u = 2^-22).
    pub const BF16: RoundingModel = RoundingModel {
        unit_roundoff: 1.0 / 4_194_304.0,
        extra_terms: 8.0,
        operand_roundoff: 1.0 / 256.0,
    };
    /// Operands rounded to bf16 (u = 2^-8), products exact and sums in IEEE f32 rounded to
    /// nearest (the CPU's `vdpbf16ps`: at most one rounding per product added, in any grouping;
    /// its flushing of subnormal operands and sums to zero is within η above).
    pub const BF16_F32_SUMS: RoundingModel = RoundingModel {
        unit_roundoff: 1.0 / 16_777_216.0,
        extra_terms: 8.0,
        operand_roundoff: 1.0 / 256.0,
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

    /// Largest error of any one score of a row whose norm is `x_norm` (the bound derived at
    /// [`RoundingModel`]).
    pub fn score_error(&self, x_norm: f64, model: RoundingModel) -> f64 {
        let d = self.dim as f64;
        let (gamma, dot) = model.factors(self.dim);
        let cm = self.max_code_norm;
        // Underflow: below 2^-126 per operand or product, scaled by Cauchy–Schwarz.
        let eta = 2.0 * 2f64.powi(-124) * (d.sqrt() * (x_norm + cm) + d);
        gamma * cm * cm + 2.0 * x_norm * cm * dot + eta
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
    finish_rows(
        Rows::all(x),
        codebook,
        prepared,
        model,
        candidates,
        false,
        true,
    )
    .0
}

/// Lower bounds a search leaves per row, for pruning later searches (the exact k-means bounds,
/// [`crate::kmeans`]). Distances are squared; under cosine the "squared distance" is
/// 2·(1 − cos), which for a non-zero row is ||x̂ − ĉ||².
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LowerBounds {
    /// ≤ the row's squared distance to its winning code.
    pub winner: Vec<f64>,
    /// ≤ the row's squared distance to every other code.
    pub others: Vec<f64>,
}

/// [`search_with_bounds`] for the rows of `x` that `rows` names, in that order (row t of the
/// result is row `rows[t]` of `x`); `model` is the rounding of the scores `candidates`
/// computes. Without `distances` (what k-means' bounds need) the winners' distances may be
/// left at 0 ([`finish_rows`]).
pub(crate) fn search_picked_with_bounds(
    x: &CheckedRows<'_>,
    rows: &[u32],
    codebook: MatRef<'_>,
    metric: Metric,
    model: RoundingModel,
    candidates: impl FnOnce(Rows<'_>, &Prepared) -> Result<Candidates>,
    distances: bool,
) -> Result<(Assignment, LowerBounds)> {
    let picked = Rows::picked(x, rows)?;
    let (a, bounds) = search_rows(
        picked,
        codebook,
        metric,
        model,
        |p| candidates(picked, p),
        true,
        distances,
    )?;
    Ok((a, bounds.expect("bounds asked for")))
}

/// [`search`] at `precision`, also returning the [`LowerBounds`] its scores imply.
pub fn search_with_bounds(
    x: MatRef<'_>,
    codebook: MatRef<'_>,
    metric: Metric,
    precision: Precision,
    candidates: impl FnOnce(&Prepared) -> Result<Candidates>,
) -> Result<(Assignment, LowerBounds)> {
    let (a, bounds) = search_rows(
        Rows::all(x),
        codebook,
        metric,
        precision.model(),
        candidates,
        true,
        true,
    )?;
    Ok((a, bounds.expect("bounds asked for")))
}

/// [`finish`], and with `bounds` the [`LowerBounds`]: every score is within `score_error` of
/// its exact value, the winner's exact score is at least the smallest computed score, and every
/// code but the computed best scored at least the runner-up (when the recheck moved the winner
/// off the computed best, that best is among the others).
///
/// Without `distances` the winners' distances are left at 0 where they would cost a
/// computation of their own (the low-precision models' winners; k-means' bounds do not read
/// them).
pub(crate) fn finish_rows(
    x: Rows<'_>,
    codebook: MatRef<'_>,
    prepared: &Prepared,
    model: RoundingModel,
    candidates: Candidates,
    bounds: bool,
    distances_wanted: bool,
) -> (Assignment, Option<LowerBounds>) {
    use rayon::prelude::*;
    let Candidates {
        best,
        best_score,
        second_score,
        row_norm_sq,
        shortlist,
    } = candidates;
    let n = x.len();
    // The computed best is kept only for the bounds (the recheck may overwrite `indices`).
    let computed_best = bounds.then(|| best.clone());
    let mut indices = best;
    let mut distances = vec![0f32; n];
    // Under L2 each row's norm is needed (computed once for both passes below when the kernel
    // did not leave it); under cosine the rows are unit vectors.
    let norms: Option<Vec<f64>> = match prepared.metric {
        Metric::L2 => Some(row_norm_sq.unwrap_or_else(|| {
            (0..n)
                .into_par_iter()
                .with_min_len(1024)
                .map(|r| norm_sq_f64(x.row(r)))
                .collect()
        })),
        Metric::Cosine => None,
    };
    let rechecked: usize = indices
        .par_iter_mut()
        .zip(distances.par_iter_mut())
        .enumerate()
        .with_min_len(1024)
        .map(|(row, (index, dist))| {
            let xr = x.row(row);
            let x_norm_sq = norms.as_ref().map_or(1.0, |v| v[row]);
            let x_norm = x_norm_sq.sqrt();
            let err = prepared.score_error(x_norm, model);
            let (b, s) = (best_score[row] as f64, second_score[row] as f64);
            // A NaN margin (a non-finite score) also takes the exact path.
            let margin = s - b;
            if margin.is_nan() || margin <= 2.0 * err {
                let (k, d) = match shortlist.as_ref().map(|s| &s[row]) {
                    Some(s) if s.is_listed() => {
                        let listed = s.codes(codebook.rows());
                        exact_among(xr, codebook, listed.into_iter(), prepared.metric)
                    }
                    _ => exact_row(xr, codebook, prepared.metric),
                };
                *index = k;
                *dist = d as f32;
                1
            } else if model.operand_roundoff > 0.0 {
                // Low-precision scores locate the winner but carry the operands' rounding
                // (relative 2^-8 for bf16): the reported distance, when wanted, is recomputed
                // exactly for the winning code alone (O(D) per row).
                if distances_wanted {
                    *dist =
                        exact_distance(xr, codebook.row(*index as usize), prepared.metric) as f32;
                }
                0
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
    let bounds = computed_best.map(|best| {
        let lower = |v: f64| if v.is_nan() { 0.0 } else { v.max(0.0) };
        let (winner, others) = (0..n)
            .into_par_iter()
            .with_min_len(1024)
            .map(|row| {
                // Under cosine s = 1 − 2 x̂·ĉ, so 2·(1 − cos) = s + 1.
                let x_sq = norms.as_ref().map_or(1.0, |v| v[row]);
                let x_norm = x_sq.sqrt();
                let err = prepared.score_error(x_norm, model);
                let other = if indices[row] == best[row] {
                    second_score[row]
                } else {
                    best_score[row]
                };
                (
                    lower(x_sq + best_score[row] as f64 - err),
                    lower(x_sq + other as f64 - err),
                )
            })
            .unzip();
        LowerBounds { winner, others }
    });
    let a = Assignment {
        indices,
        distances,
        rechecked,
    };
    (a, bounds)
}

/// Exact nearest code of one row: distances in f64, the first minimum wins.
///
/// Products of two f32 values are exact in f64, so the only rounding is in the sums (relative
/// 1e-16·D): far below any gap an f32 input can express.
pub fn exact_row(x: &[f32], codebook: MatRef<'_>, metric: Metric) -> (u32, f64) {
    exact_among(x, codebook, 0..codebook.rows() as u32, metric)
}

/// [`exact_row`] over the codes `codes` names, in increasing order (a [`Shortlist`] that
/// holds every code that can win gives [`exact_row`]'s answer, bit for bit).
fn exact_among(
    x: &[f32],
    codebook: MatRef<'_>,
    codes: impl ExactSizeIterator<Item = u32>,
    metric: Metric,
) -> (u32, f64) {
    if metric == Metric::L2 {
        if codes.len() <= Shortlist::CAPACITY {
            let mut buf = [(0u32, 0f64); Shortlist::CAPACITY];
            let lows = &mut buf[..codes.len()];
            for (slot, k) in lows.iter_mut().zip(codes) {
                slot.0 = k;
            }
            return exact_l2_among(x, codebook, lows);
        }
        let mut lows: Vec<(u32, f64)> = codes.map(|k| (k, 0.0)).collect();
        return exact_l2_among(x, codebook, &mut lows);
    }
    let mut best = (0u32, f64::INFINITY);
    let x_inv = x_inverse_norm(x, metric);
    for k in codes {
        let d = distance_with(x, x_inv, codebook.row(k as usize), metric);
        if d < best.1 {
            best = (k, d);
        }
    }
    (best.0, best.1.max(0.0))
}

/// [`exact_among`] under L2 for the codes in `lows` (their second fields are scratch). Each
/// code is first measured in f32 ([`l2_sq_lower_f32`], a lower bound on the f64 distance),
/// and only those whose bound does not exceed the f64 distance of the lowest are measured in
/// f64: the same winner, at a fraction of the cost when rows are rechecked by the thousand
/// (k-means' bf16 screen).
fn exact_l2_among(x: &[f32], codebook: MatRef<'_>, lows: &mut [(u32, f64)]) -> (u32, f64) {
    if lows.is_empty() {
        return (0, 0.0);
    }
    let (mut first, mut first_low) = (0, f64::INFINITY);
    let slots = std::cell::Cell::from_mut(lows).as_slice_of_cells();
    let mut t = 0;
    l2_sq_lower_f32_each(x, codebook, slots.iter().map(|s| s.get().0), |l| {
        // An f32 sum that overflowed bounds nothing: such a code is always measured.
        let l = if l.is_finite() { l } else { 0.0 };
        slots[t].set((slots[t].get().0, l));
        if l < first_low {
            (first, first_low) = (t, l);
        }
        t += 1;
    });
    let k0 = lows[first].0;
    let mut best = (l2_sq_f64(x, codebook.row(k0 as usize)), k0);
    // A hair of room over the bound's own.
    let open = best.0 * (1.0 + 1e-12);
    for &(k, l) in lows.iter() {
        if k == k0 || l > open {
            continue;
        }
        let d = l2_sq_f64(x, codebook.row(k as usize));
        if (d, k) < best {
            best = (d, k);
        }
    }
    (best.1, best.0.max(0.0))
}

/// The distance [`exact_row`] computes between `x` and one code, clamped at 0.
pub fn exact_distance(x: &[f32], c: &[f32], metric: Metric) -> f64 {
    distance_with(x, x_inverse_norm(x, metric), c, metric).max(0.0)
}

/// What [`distance_with`] needs of the row: its inverse norm under cosine (L2 uses none, and
/// computing it would double the cost of an L2 distance).
#[inline]
fn x_inverse_norm(x: &[f32], metric: Metric) -> f64 {
    match metric {
        Metric::L2 => 1.0,
        Metric::Cosine => inv_norm_f64(x),
    }
}

#[inline]
fn distance_with(x: &[f32], x_inv: f64, c: &[f32], metric: Metric) -> f64 {
    match metric {
        Metric::L2 => l2_sq_f64(x, c),
        Metric::Cosine => 1.0 - dot_f64(x, c) * x_inv * inv_norm_f64(c),
    }
}

crate::model::simd::multiversion! {
    /// Σ (x_i − c_i)² in f64 ([`sum_lanes`]'s order).
    fn l2_sq_f64(x: &[f32], c: &[f32]) -> f64 {
        sum_lanes(x, c, |a, b| {
            let t = a - b;
            t * t
        })
    }
}

/// A lower bound on Σ (x_i − c_i)² (exact, in f64) from an f32 computation of it: half the
/// cost of [`exact_distance`] (16 f32 lanes, no conversions), for filtering candidates most of
/// which are then ruled out. Every term is ≥ 0, so the f32 sum's error is relative: each
/// difference and square rounds once (3 units of rounding), each lane adds D/16 terms, the 16
/// lanes are added in 15 steps: at most (D + 20)·2^-24 of the sum in all, less what
/// underflow loses (2^-149 per term and step), both taken off with room to spare.
pub fn l2_sq_lower_f32(x: &[f32], c: &[f32]) -> f64 {
    lower_of_f32(l2_sq_f32(x, c), x.len())
}

/// [`l2_sq_lower_f32`]'s bound from the f32 sum `s` of `d` terms.
#[inline(always)]
fn lower_of_f32(s: f32, d: usize) -> f64 {
    let d = d as f64;
    s as f64 / (1.0 + (d + 20.0) * f32::EPSILON as f64) - (2.0 * d + 32.0) * 1.5e-45
}

/// [`l2_sq_lower_f32`] of `x` against each code of `codebook` that `codes` names, handed to
/// `put` in that order: the same bits as one call per code, at a fraction of the cost where
/// the codes are in cache (the kernel is chosen and the row's padded last block made once,
/// and no call stands between two codes, so their sums overlap).
pub(crate) fn l2_sq_lower_f32_each(
    x: &[f32],
    codebook: MatRef<'_>,
    codes: impl IntoIterator<Item = u32>,
    put: impl FnMut(f64),
) {
    assert_eq!(x.len(), codebook.cols());
    let n = x.len() / 16 * 16;
    let mut xt = [0f32; 16];
    xt[..x.len() - n].copy_from_slice(&x[n..]);
    let codes = codes.into_iter();
    #[cfg(target_arch = "x86_64")]
    {
        if crate::model::simd::has_avx512() {
            // SAFETY: the CPU has AVX-512 F.
            return unsafe { l2_sq_lower_each_avx512(x, &xt, codebook, codes, put) };
        }
        if crate::model::simd::has_avx2() {
            // SAFETY: the CPU has AVX2.
            return unsafe { l2_sq_lower_each_avx2(x, &xt, codebook, codes, put) };
        }
    }
    each_code(x, &xt, codebook, codes, put, l2_sq_f32_scalar);
}

/// The loop of [`l2_sq_lower_f32_each`] with the kernel `sum` (whole blocks, padded blocks).
#[inline(always)]
fn each_code(
    x: &[f32],
    xt: &[f32; 16],
    codebook: MatRef<'_>,
    codes: impl Iterator<Item = u32>,
    mut put: impl FnMut(f64),
    sum: impl Fn(&[f32], &[f32], &[f32; 16], &[f32; 16]) -> f32,
) {
    let (d, n) = (x.len(), x.len() / 16 * 16);
    let mut ct = [0f32; 16];
    for j in codes {
        let c = codebook.row(j as usize);
        ct[..d - n].copy_from_slice(&c[n..]);
        put(lower_of_f32(sum(&x[..n], &c[..n], xt, &ct), d));
    }
}

/// [`each_code`] with the AVX-512 kernel inlined.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn l2_sq_lower_each_avx512(
    x: &[f32],
    xt: &[f32; 16],
    codebook: MatRef<'_>,
    codes: impl Iterator<Item = u32>,
    put: impl FnMut(f64),
) {
    // SAFETY: the caller checked AVX-512 F; whole blocks and padded blocks as the kernel needs.
    each_code(x, xt, codebook, codes, put, |a, b, at, bt| unsafe {
        l2_sq_f32_avx512(a, b, at, bt)
    });
}

/// [`each_code`] with the AVX2 kernel inlined.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn l2_sq_lower_each_avx2(
    x: &[f32],
    xt: &[f32; 16],
    codebook: MatRef<'_>,
    codes: impl Iterator<Item = u32>,
    put: impl FnMut(f64),
) {
    // SAFETY: the caller checked AVX2; whole blocks and padded blocks as the kernel needs.
    each_code(x, xt, codebook, codes, put, |a, b, at, bt| unsafe {
        l2_sq_f32_avx2(a, b, at, bt)
    });
}

/// Σ (x_i − c_i)² in f32 in a fixed order, the same (and the same bits) on AVX-512, AVX2 and
/// the baseline: block `b` of 16 elements goes to accumulator `b mod 4` (four independent
/// chains, so the adds do not wait on each other), a last partial block (zero-padded) to the
/// accumulator its index gives; then lane-wise (a0 + a1) + (a2 + a3), then the 16 lanes as a
/// tree (lane l + lane l + 8, then + 4, + 2, + 1). Written with intrinsics: the compiler does
/// not keep array accumulators in registers.
pub(crate) fn l2_sq_f32(x: &[f32], c: &[f32]) -> f32 {
    assert_eq!(x.len(), c.len());
    let n = x.len() / 16 * 16;
    // The last partial block, zero-padded (a zero difference adds exactly nothing).
    let (mut xt, mut ct) = ([0f32; 16], [0f32; 16]);
    xt[..x.len() - n].copy_from_slice(&x[n..]);
    ct[..x.len() - n].copy_from_slice(&c[n..]);
    #[cfg(target_arch = "x86_64")]
    {
        if crate::model::simd::has_avx512() {
            // SAFETY: the CPU has AVX-512 F; n ≤ the length of both slices.
            return unsafe { l2_sq_f32_avx512(&x[..n], &c[..n], &xt, &ct) };
        }
        if crate::model::simd::has_avx2() {
            // SAFETY: the CPU has AVX2; as above.
            return unsafe { l2_sq_f32_avx2(&x[..n], &c[..n], &xt, &ct) };
        }
    }
    l2_sq_f32_scalar(&x[..n], &c[..n], &xt, &ct)
}

/// [`l2_sq_f32`] in plain code over whole blocks `x`, `c` and the padded last block `xt`, `ct`.
fn l2_sq_f32_scalar(x: &[f32], c: &[f32], xt: &[f32; 16], ct: &[f32; 16]) -> f32 {
    let mut acc = [[0f32; 16]; 4];
    let blocks = x.chunks_exact(16).zip(c.chunks_exact(16));
    for (b, (xb, cb)) in blocks.chain([(&xt[..], &ct[..])]).enumerate() {
        for k in 0..16 {
            let t = xb[k] - cb[k];
            acc[b % 4][k] += t * t;
        }
    }
    let mut s: [f32; 16] =
        std::array::from_fn(|l| (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]));
    for w in [8, 4, 2, 1] {
        for l in 0..w {
            s[l] += s[l + w];
        }
    }
    s[0]
}

/// 8 lanes to one in [`l2_sq_f32`]'s tree order (l + l + 4, then + 2, then + 1).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn reduce8(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let v4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
    _mm_cvtss_f32(_mm_add_ss(v2, _mm_shuffle_ps(v2, v2, 1)))
}

/// [`l2_sq_f32`] on AVX-512 over whole blocks `x`, `c` and the padded last block `xt`, `ct`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn l2_sq_f32_avx512(x: &[f32], c: &[f32], xt: &[f32; 16], ct: &[f32; 16]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len();
    let z = _mm512_setzero_ps();
    let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
    // SAFETY (every call): blocks start at multiples of 16 below n, and x, c hold n ≥ 16·(b+1).
    let sq = |p: *const f32, q: *const f32| unsafe {
        let d = _mm512_sub_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(q));
        _mm512_mul_ps(d, d)
    };
    let (xp, cp) = (x.as_ptr(), c.as_ptr());
    let n4 = n / 64 * 64;
    for i in (0..n4).step_by(64) {
        // SAFETY: i + 64 ≤ n4 ≤ n.
        unsafe {
            a0 = _mm512_add_ps(a0, sq(xp.add(i), cp.add(i)));
            a1 = _mm512_add_ps(a1, sq(xp.add(i + 16), cp.add(i + 16)));
            a2 = _mm512_add_ps(a2, sq(xp.add(i + 32), cp.add(i + 32)));
            a3 = _mm512_add_ps(a3, sq(xp.add(i + 48), cp.add(i + 48)));
        }
    }
    // The last whole blocks (at most three), then the padded one, to accumulators in turn;
    // written out, since an accumulator picked by a runtime index lives on the stack.
    let rest = (n - n4) / 16;
    // SAFETY: block r < rest starts at n4 + 16r, and n4 + 16·rest = n.
    unsafe {
        if rest > 0 {
            a0 = _mm512_add_ps(a0, sq(xp.add(n4), cp.add(n4)));
        }
        if rest > 1 {
            a1 = _mm512_add_ps(a1, sq(xp.add(n4 + 16), cp.add(n4 + 16)));
        }
        if rest > 2 {
            a2 = _mm512_add_ps(a2, sq(xp.add(n4 + 32), cp.add(n4 + 32)));
        }
    }
    let t = sq(xt.as_ptr(), ct.as_ptr());
    match rest {
        0 => a0 = _mm512_add_ps(a0, t),
        1 => a1 = _mm512_add_ps(a1, t),
        2 => a2 = _mm512_add_ps(a2, t),
        _ => a3 = _mm512_add_ps(a3, t),
    }
    let s = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1));
    reduce8(_mm256_add_ps(_mm512_castps512_ps256(s), hi))
}

/// [`l2_sq_f32`] on AVX2, each 16-lane accumulator as two registers (lanes 0..8, 8..16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn l2_sq_f32_avx2(x: &[f32], c: &[f32], xt: &[f32; 16], ct: &[f32; 16]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len();
    let z = _mm256_setzero_ps();
    // SAFETY (every call): as in the AVX-512 version, 8 lanes at a time.
    let sq = |p: *const f32, q: *const f32| unsafe {
        let d = _mm256_sub_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(q));
        _mm256_mul_ps(d, d)
    };
    let add = |(l, h): (__m256, __m256), p: *const f32, q: *const f32| unsafe {
        // SAFETY: p and q hold 16 f32 (the caller's block).
        (
            _mm256_add_ps(l, sq(p, q)),
            _mm256_add_ps(h, sq(p.add(8), q.add(8))),
        )
    };
    let (xp, cp) = (x.as_ptr(), c.as_ptr());
    let n4 = n / 64 * 64;
    let (mut r0, mut r1, mut r2, mut r3) = ((z, z), (z, z), (z, z), (z, z));
    for i in (0..n4).step_by(64) {
        // SAFETY: i + 64 ≤ n4 ≤ n.
        unsafe {
            r0 = add(r0, xp.add(i), cp.add(i));
            r1 = add(r1, xp.add(i + 16), cp.add(i + 16));
            r2 = add(r2, xp.add(i + 32), cp.add(i + 32));
            r3 = add(r3, xp.add(i + 48), cp.add(i + 48));
        }
    }
    // As in the AVX-512 version: the last whole blocks, then the padded one, written out.
    let rest = (n - n4) / 16;
    // SAFETY: block r < rest starts at n4 + 16r, and n4 + 16·rest = n.
    unsafe {
        if rest > 0 {
            r0 = add(r0, xp.add(n4), cp.add(n4));
        }
        if rest > 1 {
            r1 = add(r1, xp.add(n4 + 16), cp.add(n4 + 16));
        }
        if rest > 2 {
            r2 = add(r2, xp.add(n4 + 32), cp.add(n4 + 32));
        }
    }
    let (xq, cq) = (xt.as_ptr(), ct.as_ptr());
    match rest {
        0 => r0 = add(r0, xq, cq),
        1 => r1 = add(r1, xq, cq),
        2 => r2 = add(r2, xq, cq),
        _ => r3 = add(r3, xq, cq),
    }
    let lo = _mm256_add_ps(_mm256_add_ps(r0.0, r1.0), _mm256_add_ps(r2.0, r3.0));
    let hi = _mm256_add_ps(_mm256_add_ps(r0.1, r1.1), _mm256_add_ps(r2.1, r3.1));
    reduce8(_mm256_add_ps(lo, hi))
}

crate::model::simd::multiversion! {
    /// Σ x_i·c_i in f64 ([`sum_lanes`]'s order).
    fn dot_f64(x: &[f32], c: &[f32]) -> f64 {
        sum_lanes(x, c, |a, b| a * b)
    }
}

/// Σ_i f(x_i, c_i) in f64 with 8 independent accumulators (a fixed order, so the result is
/// deterministic, and one the compiler vectorises).
#[inline(always)]
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
    dot_f64(v, v)
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
        out.data_mut().chunks_mut(cols).for_each(normalize_row);
    }
    out
}

/// Scales `row` to unit L2 norm in place (computed in f64, rounded once; a zero row stays zero).
pub fn normalize_row(row: &mut [f32]) {
    let inv = inv_norm_f64(row);
    row.iter_mut().for_each(|v| *v = (*v as f64 * inv) as f32);
}

/// ||c_k||² per code, computed in f64 and rounded once to f32 (kept out of any
/// low-precision operand, SPEC §1).
fn code_norms(codebook: MatRef<'_>) -> Vec<f32> {
    (0..codebook.rows())
        .map(|k| norm_sq_f64(codebook.row(k)) as f32)
        .collect()
}

#[cfg(test)]
mod l2_f32_tests {
    use super::*;

    /// Every path the CPU has gives the plain code's bits, at lengths around each block size.
    #[test]
    fn every_path_gives_the_same_bits() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        for len in [
            1usize, 15, 16, 17, 31, 48, 63, 64, 65, 100, 127, 128, 129, 256, 1000,
        ] {
            let x: Vec<f32> = (0..len).map(|_| next() * 3.0).collect();
            let c: Vec<f32> = (0..len).map(|_| next()).collect();
            let n = len / 16 * 16;
            let (mut xt, mut ct) = ([0f32; 16], [0f32; 16]);
            xt[..len - n].copy_from_slice(&x[n..]);
            ct[..len - n].copy_from_slice(&c[n..]);
            let plain = l2_sq_f32_scalar(&x[..n], &c[..n], &xt, &ct);
            let same = |path: &str, v: f32| {
                assert_eq!(
                    v.to_bits(),
                    plain.to_bits(),
                    "{path}, length {len}: {v} vs {plain}"
                )
            };
            #[cfg(target_arch = "x86_64")]
            {
                if crate::model::simd::has_avx512() {
                    // SAFETY: the CPU has AVX-512 F; n ≤ len.
                    same("AVX-512", unsafe {
                        l2_sq_f32_avx512(&x[..n], &c[..n], &xt, &ct)
                    });
                }
                if crate::model::simd::has_avx2() {
                    // SAFETY: the CPU has AVX2; n ≤ len.
                    same("AVX2", unsafe {
                        l2_sq_f32_avx2(&x[..n], &c[..n], &xt, &ct)
                    });
                }
            }
            same("the dispatched path", l2_sq_f32(&x, &c));
        }
    }

    type Put<'a> = &'a mut dyn FnMut(f64);

    /// The batched bounds are each code's own [`l2_sq_lower_f32`], bit for bit, on every path,
    /// for codes named in any order (repeats included).
    #[test]
    fn the_batch_gives_each_codes_own_bits() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let k = 9;
        let order = [3u32, 0, 8, 3, 5, 1, 7, 2, 6, 4];
        for len in [1usize, 15, 16, 17, 48, 63, 64, 65, 100, 256, 1000] {
            let x: Vec<f32> = (0..len).map(|_| next() * 3.0).collect();
            let data: Vec<f32> = (0..k * len).map(|_| next()).collect();
            let codebook = MatRef::new(&data, k, len).unwrap();
            let want: Vec<u64> = order
                .iter()
                .map(|&j| l2_sq_lower_f32(&x, codebook.row(j as usize)).to_bits())
                .collect();
            let n = len / 16 * 16;
            let mut xt = [0f32; 16];
            xt[..len - n].copy_from_slice(&x[n..]);
            let check = |path: &str, got: Vec<f64>| {
                assert_eq!(got.len(), order.len(), "{path}, length {len}");
                for (t, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        *w,
                        "{path}, length {len}, code {}: {g} vs {}",
                        order[t],
                        f64::from_bits(*w)
                    );
                }
            };
            let run = |f: &dyn Fn(Put<'_>)| {
                let mut got = Vec::new();
                f(&mut |v| got.push(v));
                got
            };
            check(
                "the dispatched path",
                run(&|put| l2_sq_lower_f32_each(&x, codebook, order, put)),
            );
            check(
                "the plain code",
                run(&|put| each_code(&x, &xt, codebook, order.into_iter(), put, l2_sq_f32_scalar)),
            );
            #[cfg(target_arch = "x86_64")]
            {
                if crate::model::simd::has_avx512() {
                    // SAFETY: the CPU has AVX-512 F.
                    check(
                        "AVX-512",
                        run(&|put| unsafe {
                            l2_sq_lower_each_avx512(&x, &xt, codebook, order.into_iter(), put)
                        }),
                    );
                }
                if crate::model::simd::has_avx2() {
                    // SAFETY: the CPU has AVX2.
                    check(
                        "AVX2",
                        run(&|put| unsafe {
                            l2_sq_lower_each_avx2(&x, &xt, codebook, order.into_iter(), put)
                        }),
                    );
                }
            }
        }
    }
}
