//! The safetensors layer under both checkpoint kinds (the quantizer checkpoint of
//! [`super::Checkpoint`] and the trainer's, `crate::train::save_trainer`) and under
//! [`super::load_codebook`]:
//!
//! - [`TensorWriter`] collects named tensors and string metadata and writes them atomically
//!   ([`crate::atomic::write_atomic`]), the metadata in sorted order and the tensors laid out as
//!   the safetensors crate lays them out, so two equal states give byte-for-byte equal files;
//! - [`TensorFile`] reads a file back: [`TensorFile::required`] and [`TensorFile::optional`]
//!   check a tensor's shape and dtype, and their errors name the file, the tensor, what was
//!   expected and what was found.

use crate::error::{Error, IoContext, Result};
use crate::matrix::Matrix;
use half::{bf16, f16};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use serde::ser::{Serialize, SerializeMap, Serializer};
use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

/// A vqx file layout: the `format` and `version` metadata that identify it, and how messages
/// name it.
pub(crate) struct Layout {
    pub format: &'static str,
    pub version: &'static str,
    /// "quantizer checkpoint".
    pub name: &'static str,
    /// The command that writes it, "vqx fit".
    pub made_by: &'static str,
}

/// The quantizer checkpoint ([`super::Checkpoint`]).
pub(crate) const QUANTIZER: Layout = Layout {
    format: "vqx-checkpoint",
    version: "1",
    name: "quantizer checkpoint",
    made_by: "vqx fit",
};

/// The trainer's checkpoint (`crate::train::save_trainer`).
pub(crate) const TRAINING: Layout = Layout {
    format: "vqx-train",
    version: "1",
    name: "training checkpoint",
    made_by: "vqx train",
};

/// Every layout vqx writes, so that reading one as the other says what it is.
const LAYOUTS: [&Layout; 2] = [&QUANTIZER, &TRAINING];

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

const NPY_MAGIC: &[u8] = b"\x93NUMPY";
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

pub(crate) fn is_npy(bytes: &[u8]) -> bool {
    bytes.starts_with(NPY_MAGIC)
}

// ---------------------------------------------------------------------------------------------
// Values

/// A value type tensors are read into (f32 or f64) and written from.
pub(crate) trait Number: Copy {
    /// The dtype a tensor of these values is written as.
    const DTYPE: Dtype;
    fn from_f32(v: f32) -> Self;
    /// Rounds to nearest where `Self` is narrower.
    fn from_f64(v: f64) -> Self;
    fn put_le(self, out: &mut Vec<u8>);
}

impl Number for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn put_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl Number for f64 {
    const DTYPE: Dtype = Dtype::F64;
    fn from_f32(v: f32) -> Self {
        f64::from(v)
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn put_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// The dtypes a read accepts, converted to `T`; the constants below are the ones vqx uses.
pub(crate) struct Accept<T> {
    dtypes: &'static [Dtype],
    /// For messages: "f32", "a float tensor (…)".
    what: &'static str,
    into: PhantomData<fn() -> T>,
}

/// Exactly f32 (the trainer's own tensors).
pub(crate) const F32: Accept<f32> = Accept {
    dtypes: &[Dtype::F32],
    what: "f32",
    into: PhantomData,
};

/// Any float dtype, as f32 (codebooks and EMA statistics, whoever wrote them).
pub(crate) const FLOAT: Accept<f32> = Accept {
    dtypes: &[Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64],
    what: "a float tensor (f32, f16, bf16 or f64)",
    into: PhantomData,
};

/// Any integer or float dtype vqx decodes, as f64 (usage counts).
pub(crate) const COUNT: Accept<f64> = Accept {
    dtypes: &[
        Dtype::U64,
        Dtype::I64,
        Dtype::U32,
        Dtype::I32,
        Dtype::F64,
        Dtype::F32,
        Dtype::F16,
        Dtype::BF16,
    ],
    what: "an integer (u64, i64, u32 or i32) or float (f64, f32, f16 or bf16) tensor",
    into: PhantomData,
};

/// Little-endian `N`-byte values of `data`, each through `f` (safetensors data need not be
/// aligned, so it is decoded byte-wise).
fn each<const N: usize, T>(data: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .map(|c| {
            let mut b = [0; N];
            b.copy_from_slice(c);
            f(b)
        })
        .collect()
}

/// The values of a tensor of `dtype` as `T`; `None` for a dtype vqx does not decode.
fn decode<T: Number>(dtype: Dtype, data: &[u8]) -> Option<Vec<T>> {
    let wide = |v: f64| T::from_f64(v);
    Some(match dtype {
        Dtype::F32 => each(data, |b| T::from_f32(f32::from_le_bytes(b))),
        Dtype::F16 => each(data, |b| T::from_f32(f16::from_le_bytes(b).to_f32())),
        Dtype::BF16 => each(data, |b| T::from_f32(bf16::from_le_bytes(b).to_f32())),
        Dtype::F64 => each(data, |b| wide(f64::from_le_bytes(b))),
        Dtype::U64 => each(data, |b| wide(u64::from_le_bytes(b) as f64)),
        Dtype::I64 => each(data, |b| wide(i64::from_le_bytes(b) as f64)),
        Dtype::U32 => each(data, |b| wide(f64::from(u32::from_le_bytes(b)))),
        Dtype::I32 => each(data, |b| wide(f64::from(i32::from_le_bytes(b)))),
        _ => return None,
    })
}

/// The shapes a tensor may have (the first is the one messages name) and what they must
/// agree with.
pub(crate) struct Shape {
    accepted: Vec<Vec<usize>>,
    but: Option<String>,
    quoted: bool,
}

impl Shape {
    /// Exactly `dims`.
    pub fn of(dims: &[usize]) -> Shape {
        Shape {
            accepted: vec![dims.to_vec()],
            but: None,
            quoted: true,
        }
    }
    /// `dims` is accepted too.
    pub fn or(mut self, dims: &[usize]) -> Shape {
        self.accepted.push(dims.to_vec());
        self
    }
    /// What the shape follows from, for a mismatch: "`…` is 4×2 but {why}; expected …".
    pub fn but(mut self, why: impl Into<String>) -> Shape {
        self.but = Some(why.into());
        self
    }
    /// Names the tensor without backticks in a mismatch (the quantizer checkpoint's own
    /// messages, kept as they were).
    pub fn unquoted(mut self) -> Shape {
        self.quoted = false;
        self
    }
}

impl From<&[usize]> for Shape {
    fn from(dims: &[usize]) -> Shape {
        Shape::of(dims)
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(dims: [usize; N]) -> Shape {
        Shape::of(&dims)
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

/// One tensor of a [`TensorFile`], undecoded.
pub(crate) struct Tensor<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// A safetensors file read into memory and checked once (header, offsets, sizes).
pub(crate) struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
    /// Where the data section starts: after the 8-byte length and the header.
    data_start: usize,
    header: Metadata,
    metadata: HashMap<String, String>,
}

impl TensorFile {
    /// Reads `path`, with a plain message for the files people mistake for safetensors.
    pub fn read(path: &Path) -> Result<TensorFile> {
        let bytes = std::fs::read(path).at(path)?;
        let corrupt = |e: safetensors::SafeTensorError| {
            err(
                path,
                format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            )
        };
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
        let (header_len, header) = SafeTensors::read_metadata(&bytes).map_err(corrupt)?;
        // Checks every tensor's offsets against the data section, so `tensor` below finds
        // the bytes of every name the header lists.
        SafeTensors::deserialize(&bytes).map_err(corrupt)?;
        let metadata = header.metadata().clone().unwrap_or_default();
        Ok(TensorFile {
            path: path.to_path_buf(),
            bytes,
            data_start: 8 + header_len,
            header,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An [`Error::Checkpoint`] on this file.
    pub fn err(&self, msg: impl Into<String>) -> Error {
        err(&self.path, msg)
    }

    /// Tensor names, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut k = self.header.offset_keys();
        k.sort();
        k
    }

    /// Tensor `name`, undecoded.
    pub fn tensor(&self, name: &str) -> Option<Tensor<'_>> {
        let info = self.header.info(name)?;
        let (start, end) = info.data_offsets;
        let data = self
            .bytes
            .get(self.data_start + start..self.data_start + end)?;
        Some(Tensor {
            dtype: info.dtype,
            shape: &info.shape,
            data,
        })
    }

    /// The error for a tensor that must be there and is not.
    pub fn missing(&self, name: &str) -> Error {
        self.err(format!(
            "safetensors file without a `{name}` tensor (tensors: {})",
            key_list(&self.keys())
        ))
    }

    /// The dimensions of tensor `name`, which must have `N` (`what` names them for the
    /// message: "K×D").
    pub fn dims<const N: usize>(&self, name: &str, what: &str) -> Result<[usize; N]> {
        let t = self.tensor(name).ok_or_else(|| self.missing(name))?;
        t.shape.try_into().map_err(|_| {
            self.err(format!(
                "`{name}` is {}; expected {what}",
                shape_str(t.shape)
            ))
        })
    }

    /// The values of tensor `name`, which must be there, have one of the shapes `shape` allows
    /// and a dtype `accept` takes.
    pub fn required<T: Number>(
        &self,
        name: &str,
        accept: &Accept<T>,
        shape: impl Into<Shape>,
    ) -> Result<Vec<T>> {
        self.optional(name, accept, shape)?
            .ok_or_else(|| self.missing(name))
    }

    /// As [`Self::required`], `None` when the file has no tensor `name`.
    pub fn optional<T: Number>(
        &self,
        name: &str,
        accept: &Accept<T>,
        shape: impl Into<Shape>,
    ) -> Result<Option<Vec<T>>> {
        let Some(t) = self.tensor(name) else {
            return Ok(None);
        };
        let shape = shape.into();
        if !shape.accepted.iter().any(|s| s == t.shape) {
            let label = if shape.quoted {
                format!("`{name}`")
            } else {
                name.to_string()
            };
            let but = shape.but.map(|b| format!(" but {b}")).unwrap_or_default();
            let want: Vec<String> = shape.accepted.iter().map(|s| shape_str(s)).collect();
            return Err(self.err(format!(
                "{label} is {}{but}; expected {}",
                shape_str(t.shape),
                want.join(" or ")
            )));
        }
        let values = accept
            .dtypes
            .contains(&t.dtype)
            .then(|| decode(t.dtype, t.data))
            .flatten();
        match values {
            Some(v) => Ok(Some(v)),
            None => Err(self.err(format!(
                "`{name}` has dtype {:?}; expected {}",
                t.dtype, accept.what
            ))),
        }
    }

    /// A float tensor of `shape` as a `rows × cols` matrix, `None` when absent.
    pub fn optional_matrix(
        &self,
        name: &str,
        (rows, cols): (usize, usize),
        shape: impl Into<Shape>,
    ) -> Result<Option<Matrix>> {
        self.optional(name, &FLOAT, shape)?
            .map(|v| Matrix::new(v, rows, cols))
            .transpose()
    }

    /// As [`Self::optional_matrix`], for a tensor that must be there.
    pub fn required_matrix(
        &self,
        name: &str,
        rows_cols: (usize, usize),
        shape: impl Into<Shape>,
    ) -> Result<Matrix> {
        self.optional_matrix(name, rows_cols, shape)?
            .ok_or_else(|| self.missing(name))
    }

    /// Metadata `key`, when present.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// Metadata `key` parsed as `T` (`what` says what it should be: "a non-negative integer").
    pub fn parse_meta<T: std::str::FromStr>(&self, key: &str, what: &str) -> Result<T> {
        let s = self
            .meta(key)
            .ok_or_else(|| self.err(format!("no `{key}` metadata")))?;
        s.trim()
            .parse()
            .map_err(|_| self.err(format!("metadata {key} is {s:?}, not {what}")))
    }

    /// Checks the `format` and `version` metadata against `layout`.
    pub fn check_layout(&self, layout: &Layout) -> Result<()> {
        match self.meta("format") {
            Some(f) if f == layout.format => {}
            Some(f) => {
                return Err(self.err(match LAYOUTS.iter().find(|l| l.format == f) {
                    Some(other) => format!(
                        "is a {} ({}), not a {} ({})",
                        other.name, other.made_by, layout.name, layout.made_by
                    ),
                    None => format!(
                        "metadata format is {f:?}, not {:?}: not a vqx {}",
                        layout.format, layout.name
                    ),
                }));
            }
            None => {
                return Err(self.err(format!(
                    "no `format` metadata: not a vqx {} (tensors: {})",
                    layout.name,
                    key_list(&self.keys())
                )));
            }
        }
        match self.meta("version") {
            Some(v) if v == layout.version => Ok(()),
            Some(v) => Err(self.err(format!(
                "vqx {} version {v:?}; this vqx reads version {:?} (written by {})",
                layout.name,
                layout.version,
                self.meta("writer").unwrap_or("an unknown writer")
            ))),
            None => Err(self.err(format!("vqx {} without `version` metadata", layout.name))),
        }
    }
}

/// Truth of a flag tensor (vector-quantize-pytorch's `initted`: a bool scalar, or a float of
/// shape (1,) in older versions): true when every value is non-zero.
pub(crate) fn flag(t: &Tensor<'_>) -> bool {
    match t.dtype {
        Dtype::BOOL | Dtype::U8 | Dtype::I8 => t.data.iter().all(|&b| b != 0),
        _ => {
            let bytes = t.dtype.bitsize() / 8;
            bytes > 0 && t.data.chunks(bytes).all(|c| c.iter().any(|&b| b != 0))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Named tensors and string metadata, written as one safetensors file.
pub(crate) struct TensorWriter {
    tensors: Vec<Entry>,
    metadata: BTreeMap<String, String>,
}

/// The JSON header: `__metadata__` first, then the tensors in data order.
struct Header<'a> {
    metadata: &'a BTreeMap<String, String>,
    tensors: &'a [(&'a str, TensorInfo)],
}

impl Serialize for Header<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.tensors.len() + 1))?;
        map.serialize_entry("__metadata__", self.metadata)?;
        for (name, info) in self.tensors {
            map.serialize_entry(name, info)?;
        }
        map.end()
    }
}

impl TensorWriter {
    /// A file of `layout`: its `format` and `version` metadata, and `writer` (this vqx).
    pub fn new(layout: &Layout) -> TensorWriter {
        let mut w = TensorWriter {
            tensors: Vec::new(),
            metadata: BTreeMap::new(),
        };
        w.meta("format", layout.format);
        w.meta("version", layout.version);
        w.meta("writer", format!("vqx {}", env!("CARGO_PKG_VERSION")));
        w
    }

    /// Sets metadata `key`.
    pub fn meta(&mut self, key: &str, value: impl ToString) {
        self.metadata.insert(key.to_string(), value.to_string());
    }

    /// Adds tensor `name` of `shape`; `values` must hold exactly the shape's count.
    pub fn tensor<T: Number>(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        values: &[T],
    ) -> Result<()> {
        let name = name.into();
        if shape.iter().product::<usize>() != values.len() {
            return Err(Error::internal(
                format!("writing tensor `{name}`"),
                format!(
                    "shape {} needs {} values, given {}",
                    shape_str(shape),
                    shape.iter().product::<usize>(),
                    values.len()
                ),
            ));
        }
        if self.tensors.iter().any(|e| e.name == name) {
            return Err(Error::internal(
                format!("writing tensor `{name}`"),
                "a tensor of that name was already added",
            ));
        }
        let mut bytes = Vec::with_capacity(values.len() * T::DTYPE.bitsize() / 8);
        for &v in values {
            v.put_le(&mut bytes);
        }
        self.tensors.push(Entry {
            name,
            dtype: T::DTYPE,
            shape: shape.to_vec(),
            bytes,
        });
        Ok(())
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        // Widest dtype first, then by name: the safetensors crate's order, which keeps every
        // tensor aligned to its element size.
        let mut order: Vec<&Entry> = self.tensors.iter().collect();
        order.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
        let mut offset = 0;
        let infos: Vec<(&str, TensorInfo)> = order
            .iter()
            .map(|e| {
                let start = offset;
                offset += e.bytes.len();
                let info = TensorInfo {
                    dtype: e.dtype,
                    shape: e.shape.clone(),
                    data_offsets: (start, offset),
                };
                (e.name.as_str(), info)
            })
            .collect();
        let header = Header {
            metadata: &self.metadata,
            tensors: &infos,
        };
        let mut json = serde_json::to_vec(&header)
            .map_err(|e| Error::internal("encoding a safetensors header", e))?;
        // Pads with spaces to a multiple of 8 bytes, as the format recommends.
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut out = Vec::with_capacity(8 + json.len() + offset);
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        for e in order {
            out.extend_from_slice(&e.bytes);
        }
        Ok(out)
    }

    /// Writes the file to `path` atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::atomic::write_atomic(path, &self.to_bytes()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn scratch(name: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("vqx-tensors-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.safetensors"));
        (dir, path)
    }

    /// A small file: `m` 2×3 f32, `u` 3 f64, and `step` metadata.
    fn sample() -> TensorWriter {
        let mut w = TensorWriter::new(&QUANTIZER);
        w.tensor("m", &[2, 3], &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])
            .unwrap();
        w.tensor("u", &[3], &[7.0f64, 0.0, 2.5]).unwrap();
        w.meta("step", 12);
        w
    }

    #[test]
    fn the_layout_is_the_safetensors_crates() {
        let mut w = sample();
        // One metadata key: the crate's HashMap has a single order then.
        w.metadata.clear();
        w.meta("step", 12);
        let m: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let u: Vec<u8> = [7.0f64, 0.0, 2.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let views = vec![
            ("m", TensorView::new(Dtype::F32, vec![2, 3], &m).unwrap()),
            ("u", TensorView::new(Dtype::F64, vec![3], &u).unwrap()),
        ];
        let meta = HashMap::from([("step".to_string(), "12".to_string())]);
        let theirs = safetensors::serialize(views, Some(meta)).unwrap();
        assert_eq!(w.to_bytes().unwrap(), theirs);
    }

    #[test]
    fn equal_contents_give_equal_bytes_in_any_order() {
        let a = sample().to_bytes().unwrap();
        let mut w = TensorWriter::new(&QUANTIZER);
        w.meta("step", 12);
        w.tensor("u", &[3], &[7.0f64, 0.0, 2.5]).unwrap();
        w.tensor("m", &[2, 3], &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])
            .unwrap();
        assert_eq!(w.to_bytes().unwrap(), a);
        assert_eq!(sample().to_bytes().unwrap(), a);
    }

    #[test]
    fn the_writer_refuses_a_wrong_count_or_a_repeated_name() {
        let mut w = sample();
        let e = w.tensor("x", &[2, 2], &[1.0f32; 3]).unwrap_err();
        assert!(matches!(e, Error::Internal { .. }), "{e}");
        assert!(
            e.to_string().contains("`x`") && e.to_string().contains("2×2"),
            "{e}"
        );
        let e = w.tensor("m", &[1], &[1.0f32]).unwrap_err();
        assert!(e.to_string().contains("already added"), "{e}");
    }

    #[test]
    fn reads_back_what_was_written() {
        let (dir, path) = scratch("round");
        sample().write(&path).unwrap();
        let f = TensorFile::read(&path).unwrap();
        assert_eq!(f.keys(), ["m", "u"]);
        assert_eq!(f.meta("format"), Some("vqx-checkpoint"));
        assert_eq!(f.parse_meta::<u64>("step", "an integer").unwrap(), 12);
        f.check_layout(&QUANTIZER).unwrap();
        assert_eq!(
            f.required("m", &F32, [2, 3]).unwrap(),
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
        assert_eq!(f.required("u", &COUNT, [3]).unwrap(), [7.0, 0.0, 2.5]);
        // f64 read as f32 rounds; f32 read as counts widens.
        assert_eq!(f.required("u", &FLOAT, [3]).unwrap(), [7.0, 0.0, 2.5]);
        assert_eq!(f.required("m", &COUNT, [2, 3]).unwrap()[5], 6.0);
        assert_eq!(f.optional("absent", &F32, [1]).unwrap(), None);
        assert_eq!(f.dims::<2>("m", "R×C").unwrap(), [2, 3]);
        let m = f.required_matrix("m", (3, 2), Shape::of(&[6]).or(&[2, 3]));
        assert_eq!(m.unwrap().row(2), &[5.0, 6.0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn message(e: Error) -> String {
        assert!(matches!(e, Error::Checkpoint { .. }), "{e:?}");
        e.to_string()
    }

    fn assert_has(msg: &str, needles: &[&str]) {
        for n in needles {
            assert!(msg.contains(n), "{n:?} not in: {msg}");
        }
    }

    #[test]
    fn reader_errors_name_the_file_the_tensor_and_both_sides() {
        let (dir, path) = scratch("errors");
        sample().write(&path).unwrap();
        let f = TensorFile::read(&path).unwrap();
        let file = "errors.safetensors";

        // a missing tensor: its name, and what the file has
        let msg = message(f.required("codebook", &FLOAT, [2, 3]).unwrap_err());
        assert_has(&msg, &[file, "without a `codebook` tensor", "`m`, `u`"]);

        // a wrong shape: the tensor, what it is, what it should be
        let msg = message(f.required("m", &F32, [3, 2]).unwrap_err());
        assert_has(&msg, &[file, "`m` is 2×3; expected 3×2"]);
        let msg = message(
            f.optional(
                "u",
                &COUNT,
                Shape::of(&[1, 4]).or(&[4]).but("there are 4 codes"),
            )
            .unwrap_err(),
        );
        assert_has(&msg, &["`u` is 3 but there are 4 codes; expected 1×4 or 4"]);
        let shape = Shape::of(&[4]).but("the codebook has 4 codes").unquoted();
        let msg = message(f.optional("u", &COUNT, shape).unwrap_err());
        assert_has(&msg, &["u is 3 but the codebook has 4 codes"]);
        let msg = message(f.dims::<2>("u", "K×D").unwrap_err());
        assert_has(&msg, &[file, "`u` is 3; expected K×D"]);

        // a wrong dtype: the tensor, its dtype, the accepted ones
        let msg = message(f.required("u", &F32, [3]).unwrap_err());
        assert_has(&msg, &[file, "`u` has dtype F64; expected f32"]);

        // metadata
        let msg = message(f.parse_meta::<u64>("epoch", "an integer").unwrap_err());
        assert_has(&msg, &[file, "no `epoch` metadata"]);
        let msg = message(f.parse_meta::<bool>("step", "true or false").unwrap_err());
        assert_has(&msg, &["metadata step is \"12\", not true or false"]);
        let msg = message(f.check_layout(&TRAINING).unwrap_err());
        assert_has(
            &msg,
            &[file, "is a quantizer checkpoint (vqx fit), not a training"],
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unreadable_files_are_named() {
        let (dir, path) = scratch("unreadable");
        let e = TensorFile::read(&dir.join("missing.safetensors"))
            .err()
            .unwrap();
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert!(e.to_string().contains("missing.safetensors"), "{e}");

        let bytes = sample().to_bytes().unwrap();
        for cut in [0, 5, 8, 40, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let msg = message(TensorFile::read(&path).err().unwrap());
            assert_has(
                &msg,
                &["unreadable.safetensors", "not a", "safetensors file"],
            );
        }
        std::fs::write(&path, b"\x93NUMPY\x01\x00").unwrap();
        assert_has(
            &message(TensorFile::read(&path).err().unwrap()),
            &["is a .npy file"],
        );
        std::fs::write(&path, b"PK\x03\x04 a torch.save archive").unwrap();
        assert_has(
            &message(TensorFile::read(&path).err().unwrap()),
            &["PyTorch pickle"],
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
