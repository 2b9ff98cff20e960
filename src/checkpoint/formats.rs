//! Recognising a codebook file by its content and keys (SPEC §9).

use super::tensors::{self, err, shape_str};
use super::{CLUSTER_SIZE, CODEBOOK, Checkpoint, EMBED_AVG, FORMAT, USAGE_TOTAL};
use crate::error::Result;
use crate::matrix::Matrix;
use std::fmt;
use std::path::Path;

/// Where a codebook came from.
///
/// ```
/// use vqx::checkpoint::CodebookFormat;
/// assert_eq!(CodebookFormat::VqPytorch.to_string(), "vector-quantize-pytorch VectorQuantize state dict");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CodebookFormat {
    /// A K×D `.npy` array.
    Npy,
    /// A vqx checkpoint ([`Checkpoint`]).
    VqxCheckpoint,
    /// A vector-quantize-pytorch `VectorQuantize` state dict saved with safetensors.
    VqPytorch,
    /// An ESM3 `EMACodebook` (or a model holding one) saved with safetensors.
    Esm3,
}

impl fmt::Display for CodebookFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CodebookFormat::Npy => ".npy array",
            CodebookFormat::VqxCheckpoint => "vqx checkpoint",
            CodebookFormat::VqPytorch => "vector-quantize-pytorch VectorQuantize state dict",
            CodebookFormat::Esm3 => "ESM3 EMACodebook state dict",
        })
    }
}

/// A codebook read by [`load_codebook`], with the EMA statistics the file had and where they
/// came from.
///
/// ```
/// # fn main() -> vqx::Result<()> {
/// let dir = std::env::temp_dir().join(format!("vqx-loaded-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("codebook.npy");
/// let m = vqx::Matrix::new(vec![1.0, 0.0, 0.0, 1.0], 2, 2)?;
/// vqx::npy::write_matrix(&path, m.as_ref())?;
/// let loaded = vqx::checkpoint::load_codebook(&path)?;
/// assert_eq!(loaded.format, vqx::checkpoint::CodebookFormat::Npy);
/// assert_eq!(loaded.codebook, m);
/// assert!(loaded.cluster_size.is_none());
/// assert!(loaded.rows_unit_norm());
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedCodebook {
    /// K×D code rows, f32.
    pub codebook: Matrix,
    /// EMA counts N_k, when the file has them (`ema.cluster_size`, `_codebook.cluster_size`,
    /// ESM3's `N`).
    pub cluster_size: Option<Vec<f32>>,
    /// EMA sums m_k, when the file has them (`ema.embed_avg`, `_codebook.embed_avg`, `z_avg`).
    pub embed_avg: Option<Matrix>,
    /// Cumulative usage counts (vqx checkpoints only).
    pub usage_total: Option<Vec<f64>>,
    /// The training step (vqx checkpoints only).
    pub step: Option<u64>,
    /// vector-quantize-pytorch's `initted` flag, when present (false: its k-means init never
    /// ran, and the codebook is all zeros).
    pub initted: Option<bool>,
    pub format: CodebookFormat,
    /// The module prefix found in front of the keys (`vq.`, `encoder.codebook.`; empty when
    /// none).
    pub prefix: String,
    /// The tensor names used, in the file's spelling.
    pub keys: Vec<String>,
}

impl LoadedCodebook {
    /// One line for a log: the format, and the keys used.
    pub fn describe(&self) -> String {
        if self.keys.is_empty() {
            format!("{} ({}×{})", self.format, self.k(), self.d())
        } else {
            format!(
                "{} ({}×{}), keys: {}",
                self.format,
                self.k(),
                self.d(),
                self.keys.join(", ")
            )
        }
    }
    /// K, the number of codes.
    pub fn k(&self) -> usize {
        self.codebook.rows()
    }
    /// D, the code dimension.
    pub fn d(&self) -> usize {
        self.codebook.cols()
    }
    /// Whether every row has L2 norm 1 (to 1e-4): what vector-quantize-pytorch's cosine mode
    /// stores, a hint to quantize with `Metric::Cosine`.
    pub fn rows_unit_norm(&self) -> bool {
        (0..self.k()).all(|i| {
            let n2: f64 = self
                .codebook
                .row(i)
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum();
            (n2.sqrt() - 1.0).abs() < 1e-4
        })
    }
}

/// The first keys of a file, for messages.
pub(crate) fn key_list(keys: &[String]) -> String {
    const SHOWN: usize = 24;
    if keys.is_empty() {
        return "none".into();
    }
    let mut s = keys
        .iter()
        .take(SHOWN)
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(" … and {} more", keys.len() - SHOWN));
    }
    s
}

const VQ_EMBED: &str = "_codebook.embed";
const VQ_CLUSTER: &str = "_codebook.cluster_size";
const VQ_AVG: &str = "_codebook.embed_avg";
const VQ_INITTED: &str = "_codebook.initted";
const ESM_EMBED: &str = "embeddings";
const ESM_N: &str = "N";
const ESM_AVG: &str = "z_avg";

const NEEDS: &str = "a vqx checkpoint needs metadata format = \"vqx-checkpoint\" and a \
    `codebook` tensor (K×D); a vector-quantize-pytorch VectorQuantize state dict needs \
    `[prefix]_codebook.embed` (1×K×D; `_codebook.cluster_size` and `_codebook.embed_avg` are \
    read when present); an ESM3 EMACodebook needs `[prefix]embeddings` (K×D) and `[prefix]N` \
    (K) (`[prefix]z_avg` (K×D) read when present); a .npy file needs the .npy extension or \
    header";

/// Prefixes `p` (empty, or ending in '.') such that `p + suffix` is a key.
fn prefixes<'a>(keys: &'a [String], suffix: &str) -> Vec<&'a str> {
    keys.iter()
        .filter_map(|k| k.strip_suffix(suffix))
        .filter(|p| p.is_empty() || p.ends_with('.'))
        .collect()
}

/// Reads a K×D codebook from any file vqx accepts (SPEC §9), recognised by content and keys:
///
/// - a `.npy` file (by extension or header): 2-D float32/float16, K×D;
/// - a vqx checkpoint (safetensors with metadata `format = "vqx-checkpoint"`), see
///   [`Checkpoint`];
/// - a vector-quantize-pytorch `VectorQuantize` state dict saved with safetensors:
///   `_codebook.embed` (H×K×D), `_codebook.cluster_size` (H×K), `_codebook.embed_avg`
///   (H×K×D), `_codebook.initted`, possibly behind a module prefix (`vq.`, `quantizer.`, …).
///   H must be 1 (separate codebooks per head are not supported yet), and the layer must have
///   no `project_in`/`project_out` (codebook_dim ≠ dim: the codebook then lives in the
///   projected space). In its cosine mode the rows are stored L2-normalised (see
///   [`LoadedCodebook::rows_unit_norm`]);
/// - an ESM3 `EMACodebook`: `embeddings` (K×D), `N` (K), `z_avg` (K×D), possibly behind a
///   prefix such as `encoder.codebook.`.
///
/// f32, f16, bf16 and f64 tensors are accepted and converted to f32. The codebook must be
/// non-empty and finite; the statistics, when present, must have matching shapes. When no
/// format fits, the error names the keys found and the keys each format needs; when two
/// codebooks fit (two prefixes), it names both.
pub fn load_codebook(path: impl AsRef<Path>) -> Result<LoadedCodebook> {
    let path = path.as_ref();
    let ext_npy = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    if ext_npy || starts_like_npy(path)? {
        let codebook = crate::npy::read_matrix(path)?;
        check_codebook(&codebook, path)?;
        return Ok(LoadedCodebook {
            codebook,
            cluster_size: None,
            embed_avg: None,
            usage_total: None,
            step: None,
            initted: None,
            format: CodebookFormat::Npy,
            prefix: String::new(),
            keys: Vec::new(),
        });
    }
    let file = tensors::File::read(path)?;
    let keys = file.keys();

    if file.metadata.get("format").map(String::as_str) == Some(FORMAT) {
        let ckpt = Checkpoint::from_file(&file, path)?;
        let mut used = vec![CODEBOOK.to_string()];
        if ckpt.cluster_size.is_some() {
            used.extend([CLUSTER_SIZE.to_string(), EMBED_AVG.to_string()]);
        }
        if ckpt.usage_total.is_some() {
            used.push(USAGE_TOTAL.to_string());
        }
        return Ok(LoadedCodebook {
            codebook: ckpt.codebook,
            cluster_size: ckpt.cluster_size,
            embed_avg: ckpt.embed_avg,
            usage_total: ckpt.usage_total,
            step: Some(ckpt.step),
            initted: None,
            format: CodebookFormat::VqxCheckpoint,
            prefix: String::new(),
            keys: used,
        });
    }

    let vq = prefixes(&keys, VQ_EMBED);
    let esm: Vec<&str> = prefixes(&keys, ESM_EMBED)
        .into_iter()
        .filter(|p| keys.iter().any(|k| *k == format!("{p}{ESM_N}")))
        .collect();
    let candidates: Vec<String> = vq
        .iter()
        .map(|p| format!("`{p}{VQ_EMBED}` (vector-quantize-pytorch)"))
        .chain(esm.iter().map(|p| format!("`{p}{ESM_EMBED}` (ESM3)")))
        .collect();
    match (vq.as_slice(), esm.as_slice()) {
        ([p], []) => load_vq_pytorch(&file, path, p, &keys),
        ([], [p]) => load_esm3(&file, path, p),
        ([], []) => Err(err(
            path,
            format!(
                "no known codebook format: found tensors {}{}; {NEEDS}",
                key_list(&keys),
                match file.metadata.get("format") {
                    Some(f) => format!(" and metadata format = {f:?}"),
                    None => String::new(),
                }
            ),
        )),
        _ => Err(err(
            path,
            format!(
                "holds {} codebooks ({}); vqx reads a file with one",
                candidates.len(),
                candidates.join(", ")
            ),
        )),
    }
}

/// Whether the file begins with the .npy magic (read without loading the file).
fn starts_like_npy(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut head = Vec::with_capacity(8);
    std::fs::File::open(path)
        .and_then(|f| f.take(8).read_to_end(&mut head))
        .map_err(|e| crate::Error::io(path, e))?;
    Ok(tensors::is_npy(&head))
}

fn check_codebook(codebook: &Matrix, path: &Path) -> Result<()> {
    let what = format!("codebook {}", path.display());
    codebook.as_ref().check_nonempty(&what)?;
    codebook.as_ref().check_finite(&what)
}

fn load_vq_pytorch(
    file: &tensors::File,
    path: &Path,
    prefix: &str,
    keys: &[String],
) -> Result<LoadedCodebook> {
    let proj: Vec<String> = keys
        .iter()
        .filter(|k| {
            k.starts_with(&format!("{prefix}project_in."))
                || k.starts_with(&format!("{prefix}project_out."))
        })
        .cloned()
        .collect();
    if !proj.is_empty() {
        return Err(err(
            path,
            format!(
                "vector-quantize-pytorch VectorQuantize with projections ({}): codebook_dim ≠ \
                 dim (or heads > 1), so its codebook lives in the projected space and cannot \
                 quantize raw inputs; project_in/project_out layers are not supported",
                key_list(&proj)
            ),
        ));
    }
    let name = format!("{prefix}{VQ_EMBED}");
    let v = file.view(&name).expect("found among the keys");
    let (h, k, d) = match *v.shape() {
        [h, k, d] => (h, k, d),
        // Not written by any version read so far; accepted as H = 1.
        [k, d] => (1, k, d),
        _ => {
            return Err(err(
                path,
                format!("`{name}` is {}; expected H×K×D", shape_str(v.shape())),
            ));
        }
    };
    if h != 1 {
        return Err(err(
            path,
            format!(
                "`{name}` is {}: {h} separate codebooks (one per head, \
                 separate_codebook_per_head=True); separate codebooks per head are not \
                 supported yet",
                shape_str(v.shape())
            ),
        ));
    }
    let codebook = tensors::matrix(path, &name, &v, k, d)?;
    check_codebook(&codebook, path)?;
    let mut used = vec![name];

    let cs_name = format!("{prefix}{VQ_CLUSTER}");
    let cluster_size = match file.view(&cs_name) {
        None => None,
        Some(v) => {
            if v.shape() != [1, k] && v.shape() != [k] {
                return Err(err(
                    path,
                    format!(
                        "`{cs_name}` is {} but the codebook is 1×{k}×{d}; expected 1×{k}",
                        shape_str(v.shape())
                    ),
                ));
            }
            let n = tensors::floats(path, &cs_name, &v)?;
            used.push(cs_name);
            Some(n)
        }
    };
    let avg_name = format!("{prefix}{VQ_AVG}");
    let embed_avg = match file.view(&avg_name) {
        None => None,
        Some(v) => {
            if v.shape() != [1, k, d] && v.shape() != [k, d] {
                return Err(err(
                    path,
                    format!(
                        "`{avg_name}` is {} but the codebook is 1×{k}×{d}",
                        shape_str(v.shape())
                    ),
                ));
            }
            let m = tensors::matrix(path, &avg_name, &v, k, d)?;
            used.push(avg_name);
            Some(m)
        }
    };
    let init_name = format!("{prefix}{VQ_INITTED}");
    let initted = file.view(&init_name).map(|v| tensors::flag(&v));
    if initted.is_some() {
        used.push(init_name);
    }
    Ok(LoadedCodebook {
        codebook,
        cluster_size,
        embed_avg,
        usage_total: None,
        step: None,
        initted,
        format: CodebookFormat::VqPytorch,
        prefix: prefix.to_string(),
        keys: used,
    })
}

fn load_esm3(file: &tensors::File, path: &Path, prefix: &str) -> Result<LoadedCodebook> {
    let name = format!("{prefix}{ESM_EMBED}");
    let v = file.view(&name).expect("found among the keys");
    let &[k, d] = v.shape() else {
        return Err(err(
            path,
            format!("`{name}` is {}; expected K×D", shape_str(v.shape())),
        ));
    };
    let codebook = tensors::matrix(path, &name, &v, k, d)?;
    check_codebook(&codebook, path)?;
    let n_name = format!("{prefix}{ESM_N}");
    let v = file.view(&n_name).expect("found among the keys");
    if v.shape() != [k] {
        return Err(err(
            path,
            format!(
                "`{n_name}` is {} but `{name}` is {k}×{d}; expected {k}",
                shape_str(v.shape())
            ),
        ));
    }
    let n = tensors::floats(path, &n_name, &v)?;
    let mut used = vec![name.clone(), n_name];
    let avg_name = format!("{prefix}{ESM_AVG}");
    let embed_avg = match file.view(&avg_name) {
        None => None,
        Some(v) => {
            if v.shape() != [k, d] {
                return Err(err(
                    path,
                    format!(
                        "`{avg_name}` is {} but `{name}` is {k}×{d}",
                        shape_str(v.shape())
                    ),
                ));
            }
            let m = tensors::matrix(path, &avg_name, &v, k, d)?;
            used.push(avg_name);
            Some(m)
        }
    };
    Ok(LoadedCodebook {
        codebook,
        cluster_size: Some(n),
        embed_avg,
        usage_total: None,
        step: None,
        initted: None,
        format: CodebookFormat::Esm3,
        prefix: prefix.to_string(),
        keys: used,
    })
}
