//! Reading safetensors files: the container checks and the dtype conversions shared by
//! [`super::Checkpoint::load`] and [`super::load_codebook`].

use crate::error::{Error, Result};
use crate::matrix::Matrix;
use half::{bf16, f16};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// A safetensors file read into memory, with its `__metadata__`.
pub(crate) struct File {
    bytes: Vec<u8>,
    pub metadata: HashMap<String, String>,
}

pub(crate) fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// "4096×128", "4096", "a scalar".
pub(crate) fn shape_str(shape: &[usize]) -> String {
    if shape.is_empty() {
        return "a scalar".into();
    }
    shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("×")
}

const NPY_MAGIC: &[u8] = b"\x93NUMPY";
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

pub(crate) fn is_npy(bytes: &[u8]) -> bool {
    bytes.starts_with(NPY_MAGIC)
}

impl File {
    /// Reads and checks the container (header, offsets, sizes), with a plain message for the
    /// files people mistake for safetensors.
    pub fn read(path: &Path) -> Result<File> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(bytes, path)
    }

    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<File> {
        if is_npy(&bytes) {
            return Err(err(path, "is a .npy file, not a safetensors file"));
        }
        if bytes.starts_with(ZIP_MAGIC) {
            return Err(err(
                path,
                "looks like a PyTorch pickle (torch.save, a zip archive), which vqx does not \
                 read; save the state dict with safetensors instead: \
                 `safetensors.torch.save_file(model.state_dict(), \"model.safetensors\")`",
            ));
        }
        if bytes.len() < 8 {
            return Err(err(
                path,
                format!(
                    "not a safetensors file: {} bytes, shorter than the 8-byte header length",
                    bytes.len()
                ),
            ));
        }
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| {
            err(
                path,
                format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            )
        })?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        // Checks every tensor's offsets against the buffer once, so `view` below cannot fail
        // on a name that exists.
        SafeTensors::deserialize(&bytes).map_err(|e| {
            err(
                path,
                format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            )
        })?;
        Ok(File { bytes, metadata })
    }

    fn st(&self) -> SafeTensors<'_> {
        // Validated in `from_bytes`.
        SafeTensors::deserialize(&self.bytes).expect("validated when read")
    }

    /// Tensor names, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.st().names().into_iter().map(String::from).collect();
        k.sort();
        k
    }

    pub fn view(&self, name: &str) -> Option<TensorView<'_>> {
        self.st().tensor(name).ok()
    }
}

fn chunks<const N: usize>(data: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    // safetensors data is little-endian and need not be aligned: decode byte-wise.
    data.chunks_exact(N)
        .map(|c| c.try_into().expect("chunks_exact gives N bytes"))
}

/// The values of a float tensor (f32, f16, bf16 or f64) as f32.
pub(crate) fn floats(path: &Path, name: &str, v: &TensorView<'_>) -> Result<Vec<f32>> {
    let d = v.data();
    Ok(match v.dtype() {
        Dtype::F32 => chunks::<4>(d).map(f32::from_le_bytes).collect(),
        Dtype::F16 => chunks::<2>(d)
            .map(|b| f16::from_le_bytes(b).to_f32())
            .collect(),
        Dtype::BF16 => chunks::<2>(d)
            .map(|b| bf16::from_le_bytes(b).to_f32())
            .collect(),
        // Rounds to nearest; codebooks are f32 everywhere in vqx.
        Dtype::F64 => chunks::<8>(d)
            .map(|b| f64::from_le_bytes(b) as f32)
            .collect(),
        other => {
            return Err(err(
                path,
                format!(
                    "`{name}` has dtype {other:?}; expected a float tensor (f32, f16, bf16 or f64)"
                ),
            ));
        }
    })
}

/// The values of a count tensor (any float or integer dtype) as f64; negative values are an
/// error.
pub(crate) fn counts(path: &Path, name: &str, v: &TensorView<'_>) -> Result<Vec<f64>> {
    let d = v.data();
    let vals: Vec<f64> = match v.dtype() {
        Dtype::U64 => chunks::<8>(d)
            .map(|b| u64::from_le_bytes(b) as f64)
            .collect(),
        Dtype::I64 => chunks::<8>(d)
            .map(|b| i64::from_le_bytes(b) as f64)
            .collect(),
        Dtype::U32 => chunks::<4>(d)
            .map(|b| u32::from_le_bytes(b) as f64)
            .collect(),
        Dtype::I32 => chunks::<4>(d)
            .map(|b| i32::from_le_bytes(b) as f64)
            .collect(),
        Dtype::F64 => chunks::<8>(d).map(f64::from_le_bytes).collect(),
        _ => floats(path, name, v)?.into_iter().map(f64::from).collect(),
    };
    if let Some((i, x)) = vals
        .iter()
        .enumerate()
        .find(|(_, x)| !x.is_finite() || **x < 0.0)
    {
        return Err(err(
            path,
            format!("`{name}` holds {x} at code {i}; counts must be finite and non-negative"),
        ));
    }
    Ok(vals)
}

/// Truth of a flag tensor (vector-quantize-pytorch's `initted`: a bool scalar, or a float of
/// shape (1,) in older versions): true when every value is non-zero.
pub(crate) fn flag(v: &TensorView<'_>) -> bool {
    match v.dtype() {
        Dtype::BOOL | Dtype::U8 | Dtype::I8 => v.data().iter().all(|&b| b != 0),
        _ => {
            let bytes = v.dtype().bitsize() / 8;
            bytes > 0 && v.data().chunks(bytes).all(|c| c.iter().any(|&b| b != 0))
        }
    }
}

/// A float tensor of exactly `rows × cols` values as a matrix (the caller checked the shape).
pub(crate) fn matrix(
    path: &Path,
    name: &str,
    v: &TensorView<'_>,
    rows: usize,
    cols: usize,
) -> Result<Matrix> {
    Matrix::new(floats(path, name, v)?, rows, cols)
}
