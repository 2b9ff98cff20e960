//! Training data: built-in synthetic data sets (seeded, so a run needs no download) or a .npy
//! file, split into training and held-out rows, and batches that are a pure function of
//! (seed, step), so a resumed run reads exactly the batches an uninterrupted one would.

use crate::error::{Error, Result};
use crate::matrix::Matrix;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A synthetic data set, named on the command line as `NAME` or `NAME:key=value,…`.
///
/// ```
/// use vqx::train::Synthetic;
/// let s: Synthetic = "gmm:dim=16,components=8".parse()?;
/// assert_eq!(s.dim(), 16);
/// let a = s.generate(7, 100, 1);
/// assert_eq!((a.rows(), a.cols()), (100, 16));
/// assert_eq!(a, s.generate(7, 100, 1)); // seeded
/// assert!("manifold:dim=32,intrinsic=3".parse::<Synthetic>().is_ok());
/// assert!("gmm:colour=red".parse::<Synthetic>().is_err());
/// # Ok::<(), vqx::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Synthetic {
    /// `gmm`: `components` centres drawn N(0, 1) in `dim` dimensions, rows = a uniformly
    /// chosen centre + N(0, std²) noise. Defaults: dim 64, components 64, std 0.1.
    GaussianMixture {
        dim: usize,
        components: usize,
        std: f32,
    },
    /// `manifold`: a smooth `intrinsic`-dimensional surface in `dim` dimensions:
    /// t ~ U[0, 1]^intrinsic, x = A·sin(B·t + c)/√H over H = 32 random features (B ~ N(0, 3²)),
    /// plus N(0, noise²). Defaults: dim 64, intrinsic 2, noise 0.01.
    Manifold {
        dim: usize,
        intrinsic: usize,
        noise: f32,
    },
}

const MANIFOLD_FEATURES: usize = 32;

impl Synthetic {
    pub fn dim(&self) -> usize {
        match *self {
            Synthetic::GaussianMixture { dim, .. } | Synthetic::Manifold { dim, .. } => dim,
        }
    }

    /// `rows` rows of the data set defined by `seed` (its centres or surface), drawn from
    /// random stream `stream` (different streams: independent rows of the same distribution,
    /// e.g. training and held-out data).
    pub fn generate(&self, seed: u64, rows: usize, stream: u64) -> Matrix {
        let mut shape = ChaCha8Rng::seed_from_u64(seed);
        let mut draw = ChaCha8Rng::seed_from_u64(seed);
        draw.set_stream(stream + 1);
        let std_normal = Normal::new(0.0f32, 1.0).expect("positive std");
        let mut out = Vec::with_capacity(rows * self.dim());
        match *self {
            Synthetic::GaussianMixture {
                dim,
                components,
                std,
            } => {
                let centres: Vec<f32> = (0..components * dim)
                    .map(|_| std_normal.sample(&mut shape))
                    .collect();
                let pick = Uniform::new(0, components);
                for _ in 0..rows {
                    let c = pick.sample(&mut draw);
                    out.extend(
                        centres[c * dim..(c + 1) * dim]
                            .iter()
                            .map(|&m| m + std * std_normal.sample(&mut draw)),
                    );
                }
            }
            Synthetic::Manifold {
                dim,
                intrinsic,
                noise,
            } => {
                let h = MANIFOLD_FEATURES;
                let a: Vec<f32> = (0..dim * h)
                    .map(|_| std_normal.sample(&mut shape))
                    .collect();
                let b: Vec<f32> = (0..h * intrinsic)
                    .map(|_| 3.0 * std_normal.sample(&mut shape))
                    .collect();
                let phase = Uniform::new(0.0f32, std::f32::consts::TAU);
                let c: Vec<f32> = (0..h).map(|_| phase.sample(&mut shape)).collect();
                let unit = Uniform::new(0.0f32, 1.0);
                let scale = 1.0 / (h as f32).sqrt();
                let mut t = vec![0.0f32; intrinsic];
                let mut f = vec![0.0f32; h];
                for _ in 0..rows {
                    t.iter_mut().for_each(|v| *v = unit.sample(&mut draw));
                    for (j, fj) in f.iter_mut().enumerate() {
                        let arg: f32 = (0..intrinsic).map(|i| b[j * intrinsic + i] * t[i]).sum();
                        *fj = (arg + c[j]).sin();
                    }
                    for r in 0..dim {
                        let v: f32 = (0..h).map(|j| a[r * h + j] * f[j]).sum();
                        out.push(v * scale + noise * std_normal.sample(&mut draw));
                    }
                }
            }
        }
        Matrix::new(out, rows, self.dim()).expect("rows × dim values")
    }
}

impl std::str::FromStr for Synthetic {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (name, opts) = s.split_once(':').unwrap_or((s, ""));
        let mut kv = Vec::new();
        for part in opts.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "synthetic option {part:?} is not key=value (in {s:?})"
                ))
            })?;
            kv.push((k.trim().to_string(), v.trim().to_string()));
        }
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T> {
            v.parse().map_err(|_| {
                Error::InvalidArgument(format!(
                    "synthetic option {key}={v:?} is not a valid number"
                ))
            })
        }
        let mut out = match name.trim().to_ascii_lowercase().as_str() {
            "gmm" | "gaussian-mixture" => Synthetic::GaussianMixture {
                dim: 64,
                components: 64,
                std: 0.1,
            },
            "manifold" => Synthetic::Manifold {
                dim: 64,
                intrinsic: 2,
                noise: 0.01,
            },
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown synthetic data set {other:?}: expected gmm or manifold \
                     (e.g. gmm:dim=64,components=64,std=0.1 or manifold:dim=64,intrinsic=2)"
                )));
            }
        };
        for (k, v) in &kv {
            match (&mut out, k.as_str()) {
                (
                    Synthetic::GaussianMixture { dim, .. } | Synthetic::Manifold { dim, .. },
                    "dim",
                ) => *dim = num(k, v)?,
                (Synthetic::GaussianMixture { components, .. }, "components") => {
                    *components = num(k, v)?
                }
                (Synthetic::GaussianMixture { std, .. }, "std") => *std = num(k, v)?,
                (Synthetic::Manifold { intrinsic, .. }, "intrinsic") => *intrinsic = num(k, v)?,
                (Synthetic::Manifold { noise, .. }, "noise") => *noise = num(k, v)?,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown option {k:?} for synthetic data set {name:?} (gmm: dim, \
                         components, std; manifold: dim, intrinsic, noise)"
                    )));
                }
            }
        }
        let ok = match out {
            Synthetic::GaussianMixture {
                dim,
                components,
                std,
            } => dim > 0 && components > 0 && std.is_finite() && std >= 0.0,
            Synthetic::Manifold {
                dim,
                intrinsic,
                noise,
            } => dim > 0 && intrinsic > 0 && noise.is_finite() && noise >= 0.0,
        };
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "synthetic data set {s:?}: sizes must be ≥ 1 and std/noise finite and ≥ 0"
            )));
        }
        Ok(out)
    }
}

/// Where a run's data comes from (stored in its checkpoint, so a resumed run reloads it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataSource {
    /// `rows` training rows and `eval_rows` held-out rows drawn from `spec` with `seed`.
    Synthetic {
        spec: Synthetic,
        rows: usize,
        eval_rows: usize,
        seed: u64,
    },
    /// A .npy file; `eval_rows` rows chosen with `seed` are held out.
    Npy {
        path: std::path::PathBuf,
        eval_rows: usize,
        seed: u64,
    },
}

/// Rows held out of a `--data` file when no count is given: a tenth of the file, at least one
/// row and at most [`MAX_DEFAULT_EVAL_ROWS`] (a fixed count would take a small file whole).
///
/// ```
/// use vqx::train::default_eval_rows;
/// assert_eq!(default_eval_rows(2_000), 200);
/// assert_eq!(default_eval_rows(5), 1);
/// assert_eq!(default_eval_rows(1_000_000), 2_048);
/// ```
pub fn default_eval_rows(rows: usize) -> usize {
    (rows / 10).clamp(1, MAX_DEFAULT_EVAL_ROWS)
}

/// The cap of [`default_eval_rows`]: enough rows for a stable held-out error.
pub const MAX_DEFAULT_EVAL_ROWS: usize = 2048;

impl DataSource {
    /// Why a training split of `train` rows is too small for a batch of `batch` rows, in terms
    /// of the flags that set it.
    fn split_too_small(&self, train: usize, eval: usize, batch: usize) -> String {
        match self {
            DataSource::Synthetic { .. } => format!(
                "{train} training rows (--rows) are fewer than one batch of {batch} \
                 (--batch-size): raise --rows or lower --batch-size"
            ),
            DataSource::Npy { path, .. } => format!(
                "{} has {} rows: holding out {eval} for evaluation (--eval-rows) leaves {train} \
                 for training, fewer than one batch of {batch} (--batch-size): lower --eval-rows \
                 or --batch-size",
                path.display(),
                train + eval
            ),
        }
    }
}

/// Training rows and held-out rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub train: Matrix,
    pub eval: Matrix,
}

impl Dataset {
    /// Refuses a training split smaller than one batch: every step would repeat rows of it, and
    /// the run would look healthy while learning from almost nothing.
    pub fn check_batch(&self, source: &DataSource, batch: usize) -> Result<()> {
        let (train, eval) = (self.train.rows(), self.eval.rows());
        if train < batch {
            return Err(Error::InvalidArgument(
                source.split_too_small(train, eval, batch),
            ));
        }
        Ok(())
    }

    /// Generates or reads the data a [`DataSource`] names.
    pub fn load(source: &DataSource) -> Result<Dataset> {
        match source {
            DataSource::Synthetic {
                spec,
                rows,
                eval_rows,
                seed,
            } => {
                if *rows == 0 {
                    return Err(Error::InvalidArgument(
                        "synthetic data needs at least 1 training row".into(),
                    ));
                }
                Ok(Dataset {
                    train: spec.generate(*seed, *rows, 0),
                    eval: spec.generate(*seed, *eval_rows, 1),
                })
            }
            DataSource::Npy {
                path,
                eval_rows,
                seed,
            } => Self::from_npy(path, *eval_rows, *seed),
        }
    }

    /// Reads `path` and holds out `eval_rows` rows chosen with `seed`. Refuses a split that
    /// leaves no training row (a clamp would silently train on what is left).
    pub fn from_npy(path: &Path, eval_rows: usize, seed: u64) -> Result<Dataset> {
        let x = crate::npy::read_matrix(path)?;
        x.as_ref()
            .check_nonempty(&format!("data {}", path.display()))?;
        x.as_ref()
            .check_finite(&format!("data {}", path.display()))?;
        let n = x.rows();
        if eval_rows >= n {
            return Err(Error::InvalidArgument(format!(
                "{} has {n} rows: holding out {eval_rows} for evaluation (--eval-rows) leaves \
                 none for training",
                path.display()
            )));
        }
        let held = held_out(n, eval_rows, seed);
        let tr: Vec<usize> = (0..n).filter(|&i| !held[i]).collect();
        let ev: Vec<usize> = (0..n).filter(|&i| held[i]).collect();
        Ok(Dataset {
            train: crate::quantizer::gather_rows(x.as_ref(), &tr),
            eval: crate::quantizer::gather_rows(x.as_ref(), &ev),
        })
    }
}

/// Which of a file's `n` rows are held out for evaluation: `eval_rows` of them, chosen with
/// `seed` (the first `eval_rows` of a seeded permutation). A function of (n, eval_rows, seed)
/// only, so a rank that reads part of the file knows which of its rows are held out.
fn held_out(n: usize, eval_rows: usize, seed: u64) -> Vec<bool> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0xe7a1));
    let mut held = vec![false; n];
    for &i in &order[..eval_rows.min(n)] {
        held[i] = true;
    }
    held
}

/// One rank's part of a data set ([`DataSource::load_shard`]): its training and held-out
/// rows, and how many rows the whole data set has of each.
#[derive(Clone, Debug, PartialEq)]
pub struct DataShard {
    /// This rank's rows.
    pub data: Dataset,
    /// Training rows over all ranks.
    pub train_total: usize,
    /// Held-out rows over all ranks.
    pub eval_total: usize,
}

impl DataSource {
    /// Shard `index` of `parts` of the data: a .npy file is cut into `parts` contiguous row
    /// ranges ([`crate::kmeans::Shard::range`] over the file's rows) and only this shard's
    /// range is read (its training and held-out rows are those of [`Dataset::load`] that lie
    /// in it); synthetic data is generated whole and its training and held-out rows are each
    /// cut into `parts` contiguous ranges. A NaN or infinity in the shard's rows is an error
    /// naming the rows read.
    ///
    /// ```
    /// use vqx::train::{DataSource, Dataset};
    /// let src = DataSource::Synthetic {
    ///     spec: "gmm:dim=4".parse()?, rows: 10, eval_rows: 4, seed: 1,
    /// };
    /// let whole = Dataset::load(&src)?;
    /// let second = src.load_shard(2, 1)?;
    /// assert_eq!((second.train_total, second.eval_total), (10, 4));
    /// assert_eq!(second.data.train, whole.train.as_ref().slice_rows(5, 10).to_owned());
    /// # Ok::<(), vqx::Error>(())
    /// ```
    pub fn load_shard(&self, parts: usize, index: usize) -> Result<DataShard> {
        use crate::kmeans::Shard;
        if index >= parts {
            return Err(Error::InvalidArgument(format!(
                "shard {index} of {parts}: shards are numbered from 0"
            )));
        }
        match self {
            DataSource::Synthetic {
                rows, eval_rows, ..
            } => {
                let whole = Dataset::load(self)?;
                let tr = Shard::range(*rows, parts, index);
                let ev = Shard::range(*eval_rows, parts, index);
                Ok(DataShard {
                    data: Dataset {
                        train: whole.train.as_ref().slice_rows(tr.start, tr.end).to_owned(),
                        eval: whole.eval.as_ref().slice_rows(ev.start, ev.end).to_owned(),
                    },
                    train_total: *rows,
                    eval_total: *eval_rows,
                })
            }
            DataSource::Npy {
                path,
                eval_rows,
                seed,
            } => {
                let n = crate::npy::NpyMatrixReader::open(path)?.rows();
                if n == 0 {
                    return Err(Error::Empty {
                        what: format!("data {}", path.display()),
                        detail: "no rows".into(),
                    });
                }
                if *eval_rows >= n {
                    return Err(Error::InvalidArgument(format!(
                        "{} has {n} rows: holding out {eval_rows} for evaluation (--eval-rows) \
                         leaves none for training",
                        path.display()
                    )));
                }
                let range = Shard::range(n, parts, index);
                let (x, _) = crate::npy::read_rows(path, range.clone())?;
                // The row named is the file's, not the shard's.
                let what = format!(
                    "{} (its rows {}..{}, this shard's)",
                    path.display(),
                    range.start,
                    range.end
                );
                x.as_ref().check_finite_from(&what, range.start)?;
                let held = held_out(n, *eval_rows, *seed);
                let local = |want: bool| -> Vec<usize> {
                    (0..x.rows())
                        .filter(|&i| held[range.start + i] == want)
                        .collect()
                };
                Ok(DataShard {
                    data: Dataset {
                        train: crate::quantizer::gather_rows(x.as_ref(), &local(false)),
                        eval: crate::quantizer::gather_rows(x.as_ref(), &local(true)),
                    },
                    train_total: n - eval_rows,
                    eval_total: *eval_rows,
                })
            }
        }
    }
}

/// Which training rows make up the batch of each step: epochs of a seeded permutation, the
/// permutation of epoch e a function of (seed, e) only. Position p = step·batch + j of the
/// stream is row perm_e[p mod N] with e = p div N. The current epoch's permutation is cached.
///
/// ```
/// use vqx::train::BatchSampler;
/// let mut a = BatchSampler::new(10, 4, 1);
/// let mut b = BatchSampler::new(10, 4, 1);
/// assert_eq!(a.indices(7), b.indices(7)); // no state: step 7 without steps 0..7
/// let mut seen: Vec<usize> = (0..5).flat_map(|s| a.indices(s)).take(10).collect();
/// seen.sort();
/// assert_eq!(seen, (0..10).collect::<Vec<_>>()); // one epoch covers every row once
/// ```
#[derive(Clone, Debug)]
pub struct BatchSampler {
    rows: usize,
    batch: usize,
    seed: u64,
    cached: Option<(u64, Vec<usize>)>,
}

impl BatchSampler {
    pub fn new(rows: usize, batch: usize, seed: u64) -> Self {
        BatchSampler {
            rows,
            batch,
            seed,
            cached: None,
        }
    }

    fn permutation(&mut self, epoch: u64) -> &[usize] {
        if self.cached.as_ref().map(|c| c.0) != Some(epoch) {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x0ba7_c4e5);
            rng.set_stream(epoch);
            let mut p: Vec<usize> = (0..self.rows).collect();
            p.shuffle(&mut rng);
            self.cached = Some((epoch, p));
        }
        &self.cached.as_ref().expect("just set").1
    }

    /// Row indices of step `step`'s batch.
    pub fn indices(&mut self, step: u64) -> Vec<usize> {
        let n = self.rows as u64;
        (0..self.batch as u64)
            .map(|j| {
                let p = step * self.batch as u64 + j;
                let (e, off) = (p / n, (p % n) as usize);
                self.permutation(e)[off]
            })
            .collect()
    }
}
