//! Recognising a codebook file by its content and keys (SPEC §9).

use super::tensors::{self, FLOAT, Shape, TensorFile, key_list, shape_str};
use super::{CLUSTER_SIZE, CODEBOOK, Checkpoint, EMBED_AVG, FORMAT, USAGE_TOTAL};
use crate::error::{IoContext, Result};
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
    /// `codebook` from a file of `format`, with nothing else read.
    fn new(codebook: Matrix, format: CodebookFormat) -> Self {
        LoadedCodebook {
            codebook,
            cluster_size: None,
            embed_avg: None,
            usage_total: None,
            step: None,
            initted: None,
            format,
            prefix: String::new(),
            keys: Vec::new(),
        }
    }

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
        return Ok(LoadedCodebook::new(codebook, CodebookFormat::Npy));
    }
    let file = TensorFile::read(path)?;
    let keys = file.keys();

    if file.meta("format") == Some(FORMAT) {
        let ckpt = Checkpoint::from_file(&file)?;
        let mut used = vec![CODEBOOK.to_string()];
        if ckpt.cluster_size.is_some() {
            used.extend([CLUSTER_SIZE.to_string(), EMBED_AVG.to_string()]);
        }
        if ckpt.usage_total.is_some() {
            used.push(USAGE_TOTAL.to_string());
        }
        return Ok(LoadedCodebook {
            cluster_size: ckpt.cluster_size,
            embed_avg: ckpt.embed_avg,
            usage_total: ckpt.usage_total,
            step: Some(ckpt.step),
            keys: used,
            ..LoadedCodebook::new(ckpt.codebook, CodebookFormat::VqxCheckpoint)
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
        ([p], []) => load_vq_pytorch(&file, p, &keys),
        ([], [p]) => load_esm3(&file, p),
        ([], []) => Err(file.err(format!(
            "no known codebook format: found tensors {}{}; {NEEDS}",
            key_list(&keys),
            match file.meta("format") {
                Some(f) => format!(" and metadata format = {f:?}"),
                None => String::new(),
            }
        ))),
        _ => Err(file.err(format!(
            "holds {} codebooks ({}); vqx reads a file with one",
            candidates.len(),
            candidates.join(", ")
        ))),
    }
}

/// Whether the file begins with the .npy magic (read without loading the file).
fn starts_like_npy(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut head = Vec::with_capacity(8);
    std::fs::File::open(path)
        .and_then(|f| f.take(8).read_to_end(&mut head))
        .at(path)?;
    Ok(tensors::is_npy(&head))
}

fn check_codebook(codebook: &Matrix, path: &Path) -> Result<()> {
    let what = format!("codebook {}", path.display());
    codebook.as_ref().check_nonempty(&what)?;
    codebook.as_ref().check_finite(&what)
}

fn load_vq_pytorch(file: &TensorFile, prefix: &str, keys: &[String]) -> Result<LoadedCodebook> {
    let proj: Vec<String> = keys
        .iter()
        .filter(|k| {
            k.starts_with(&format!("{prefix}project_in."))
                || k.starts_with(&format!("{prefix}project_out."))
        })
        .cloned()
        .collect();
    if !proj.is_empty() {
        return Err(file.err(format!(
            "vector-quantize-pytorch VectorQuantize with projections ({}): codebook_dim ≠ \
             dim (or heads > 1), so its codebook lives in the projected space and cannot \
             quantize raw inputs; project_in/project_out layers are not supported",
            key_list(&proj)
        )));
    }
    let name = format!("{prefix}{VQ_EMBED}");
    let shape = file
        .tensor(&name)
        .ok_or_else(|| file.missing(&name))?
        .shape
        .to_vec();
    let (h, k, d) = match *shape {
        [h, k, d] => (h, k, d),
        // Not written by any version read so far; accepted as H = 1.
        [k, d] => (1, k, d),
        _ => {
            return Err(file.err(format!("`{name}` is {}; expected H×K×D", shape_str(&shape))));
        }
    };
    if h != 1 {
        return Err(file.err(format!(
            "`{name}` is {}: {h} separate codebooks (one per head, \
             separate_codebook_per_head=True); separate codebooks per head are not \
             supported yet",
            shape_str(&shape)
        )));
    }
    let codebook = file.required_matrix(&name, (k, d), &shape[..])?;
    check_codebook(&codebook, file.path())?;
    let mut used = vec![name];

    let book = format!("the codebook is 1×{k}×{d}");
    let cs_name = format!("{prefix}{VQ_CLUSTER}");
    let cs_shape = Shape::of(&[1, k]).or(&[k]).but(&book);
    let cluster_size = file.optional(&cs_name, &FLOAT, cs_shape)?;
    let avg_name = format!("{prefix}{VQ_AVG}");
    let avg_shape = Shape::of(&[1, k, d]).or(&[k, d]).but(&book);
    let embed_avg = file.optional_matrix(&avg_name, (k, d), avg_shape)?;
    let init_name = format!("{prefix}{VQ_INITTED}");
    let initted = file.tensor(&init_name).map(|t| tensors::flag(&t));
    for (found, key) in [
        (cluster_size.is_some(), cs_name),
        (embed_avg.is_some(), avg_name),
        (initted.is_some(), init_name),
    ] {
        if found {
            used.push(key);
        }
    }
    Ok(LoadedCodebook {
        cluster_size,
        embed_avg,
        initted,
        prefix: prefix.to_string(),
        keys: used,
        ..LoadedCodebook::new(codebook, CodebookFormat::VqPytorch)
    })
}

fn load_esm3(file: &TensorFile, prefix: &str) -> Result<LoadedCodebook> {
    let name = format!("{prefix}{ESM_EMBED}");
    let [k, d] = file.dims(&name, "K×D")?;
    let codebook = file.required_matrix(&name, (k, d), [k, d])?;
    check_codebook(&codebook, file.path())?;
    let book = format!("`{name}` is {k}×{d}");
    let n_name = format!("{prefix}{ESM_N}");
    let n = file.required(&n_name, &FLOAT, Shape::of(&[k]).but(&book))?;
    let avg_name = format!("{prefix}{ESM_AVG}");
    let embed_avg = file.optional_matrix(&avg_name, (k, d), Shape::of(&[k, d]).but(&book))?;
    let mut used = vec![name, n_name];
    if embed_avg.is_some() {
        used.push(avg_name);
    }
    Ok(LoadedCodebook {
        cluster_size: Some(n),
        embed_avg,
        prefix: prefix.to_string(),
        keys: used,
        ..LoadedCodebook::new(codebook, CodebookFormat::Esm3)
    })
}
