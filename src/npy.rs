//! Reading and writing `.npy` files: 2-D f32/f16 matrices in, int64 indices, f32 distances and
//! f32 matrices out.
//!
//! - [`NpyMatrixReader`] opens a file, checks it is a 2-D, C-ordered, little-endian float32 or
//!   float16 array that is not truncated, and then hands out successive chunks of rows as f32
//!   [`Matrix`]es, so inputs larger than memory can be streamed.
//! - [`NpyStreamWriter`] writes the header (with the total shape, known up front) and then
//!   appended chunks, into a temporary file in the destination's directory that is renamed onto
//!   the destination only by [`NpyStreamWriter::finish`]: an error or a dropped writer leaves
//!   nothing at the final path (and an existing file there untouched).
//!
//! Headers are parsed and written by the `npyz` crate. The data section is read in bulk (one
//! `read_exact` per chunk, then a conversion from little-endian bytes) rather than through
//! `npyz`'s element-at-a-time iterator, which is several times slower on large inputs; the data
//! section of a C-ordered, little-endian plain dtype is just the values back to back, so no
//! format knowledge beyond what `npyz` reports is involved.
//!
//! ```
//! # fn main() -> vqx::Result<()> {
//! let dir = std::env::temp_dir().join(format!("vqx-npy-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("m.npy");
//! let m = vqx::Matrix::new(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2)?;
//! vqx::npy::write_matrix(&path, m.as_ref())?;
//! let mut r = vqx::npy::NpyMatrixReader::open(&path)?;
//! assert_eq!((r.rows(), r.cols()), (3, 2));
//! let first = r.next_chunk(2)?.unwrap();
//! assert_eq!(first.row(1), &[3.0, 4.0]);
//! assert_eq!(r.next_chunk(2)?.unwrap().row(0), &[5.0, 6.0]);
//! assert!(r.next_chunk(2)?.is_none());
//! assert_eq!(vqx::npy::read_matrix(&path)?, m);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok(()) }
//! ```

use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};
use half::f16;
use npyz::{DType, NpyHeader, Order, TypeChar, WriterBuilder};
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

/// Element type of a matrix file vqx can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum NpyDtype {
    /// `<f4`
    F32,
    /// `<f2`, converted exactly to f32 on read.
    F16,
}

impl NpyDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            NpyDtype::F32 => 4,
            NpyDtype::F16 => 2,
        }
    }
}

impl fmt::Display for NpyDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NpyDtype::F32 => "float32",
            NpyDtype::F16 => "float16",
        })
    }
}

fn npy_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Npy {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// A human name for a numpy dtype, with what to do about it.
fn describe_unsupported(dtype: &DType) -> String {
    let descr = dtype.descr();
    let DType::Plain(ts) = dtype else {
        return format!(
            "has a structured dtype {descr}; vqx reads plain float32 or float16 arrays"
        );
    };
    let bytes = ts.size_field();
    match ts.type_char() {
        TypeChar::Float if bytes == 8 => format!(
            "has dtype float64 ({descr}); vqx reads float32 or float16: convert it first, \
             e.g. np.save(path, x.astype(np.float32))"
        ),
        TypeChar::Float => format!(
            "has dtype float{} ({descr}); vqx reads float32 or float16",
            bytes * 8
        ),
        TypeChar::Int | TypeChar::Uint => format!(
            "has integer dtype {}{} ({descr}); vqx reads vectors of float32 or float16, \
             not integers",
            if ts.type_char() == TypeChar::Int {
                "int"
            } else {
                "uint"
            },
            bytes * 8
        ),
        TypeChar::Bool => format!("has dtype bool ({descr}); vqx reads float32 or float16"),
        TypeChar::RawData if bytes == 2 => format!(
            "has raw 2-byte dtype {descr}, which is how bfloat16 arrays (ml_dtypes) are saved; \
             .npy has no bfloat16 type, so vqx cannot tell it from other raw data: \
             save the array as float32 or float16"
        ),
        _ => format!("has dtype {descr}; vqx reads float32 or float16"),
    }
}

fn shape_str(shape: &[u64]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Streams the rows of a 2-D float32/float16 `.npy` file as f32 matrices.
pub struct NpyMatrixReader {
    path: PathBuf,
    file: BufReader<File>,
    rows: usize,
    cols: usize,
    dtype: NpyDtype,
    next_row: usize,
    /// Byte offset of row 0.
    data_start: u64,
    buf: Vec<u8>,
}

impl fmt::Debug for NpyMatrixReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NpyMatrixReader")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("dtype", &self.dtype)
            .field("next_row", &self.next_row)
            .finish()
    }
}

impl NpyMatrixReader {
    /// Opens `path` and checks its header: 2-D, C order, little-endian float32 or float16, and
    /// at least as many data bytes as the shape needs.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        if file_len == 0 {
            return Err(npy_err(
                path,
                "is an empty file (0 bytes), not a .npy array",
            ));
        }
        let mut file = BufReader::with_capacity(1 << 20, f);
        let header = NpyHeader::from_reader(&mut file).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                npy_err(
                    path,
                    format!("truncated .npy header ({file_len} bytes in the file)"),
                )
            } else if e.kind() == io::ErrorKind::InvalidData {
                npy_err(path, format!("not a valid .npy file: {e}"))
            } else {
                Error::io(path, e)
            }
        })?;
        let data_start = file.stream_position().map_err(|e| Error::io(path, e))?;

        let dtype = match header.dtype() {
            DType::Plain(ts) if ts.type_char() == TypeChar::Float => {
                let dtype = match ts.size_field() {
                    4 => NpyDtype::F32,
                    2 => NpyDtype::F16,
                    _ => return Err(npy_err(path, describe_unsupported(&header.dtype()))),
                };
                if ts.endianness() == npyz::Endianness::Big {
                    return Err(npy_err(
                        path,
                        format!(
                            "is big-endian ({}); vqx reads little-endian files: convert with \
                             x.astype(x.dtype.newbyteorder('<'))",
                            header.dtype().descr()
                        ),
                    ));
                }
                dtype
            }
            other => return Err(npy_err(path, describe_unsupported(&other))),
        };
        let shape = header.shape();
        if shape.len() != 2 {
            return Err(npy_err(
                path,
                format!(
                    "has {} dimension{} (shape {}); expected a 2-D array (rows × dim)",
                    shape.len(),
                    if shape.len() == 1 { "" } else { "s" },
                    shape_str(shape)
                ),
            ));
        }
        if header.order() == Order::Fortran && shape[0] > 1 && shape[1] > 1 {
            return Err(npy_err(
                path,
                format!(
                    "is stored in Fortran (column-major) order, shape {}; vqx reads C-ordered \
                     arrays: save np.ascontiguousarray(x)",
                    shape_str(shape)
                ),
            ));
        }
        let too_big = || {
            npy_err(
                path,
                format!("shape {} is too large for this machine", shape_str(shape)),
            )
        };
        let rows = usize::try_from(shape[0]).map_err(|_| too_big())?;
        let cols = usize::try_from(shape[1]).map_err(|_| too_big())?;
        let need = (rows as u128) * (cols as u128) * dtype.size() as u128;
        let have = file_len.saturating_sub(data_start) as u128;
        if have < need {
            return Err(npy_err(
                path,
                format!(
                    "truncated: shape {} of {dtype} needs {need} bytes of data, the file holds \
                     {have} after its header",
                    shape_str(shape)
                ),
            ));
        }
        Ok(NpyMatrixReader {
            path: path.to_path_buf(),
            file,
            rows,
            cols,
            dtype,
            next_row: 0,
            data_start,
            buf: Vec::new(),
        })
    }

    /// Moves to row `row` (at most [`Self::rows`]): the next chunk starts there, and the rows
    /// before it are never read (a rank of a sharded job reads only its own rows' bytes).
    pub fn seek_row(&mut self, row: usize) -> Result<()> {
        if row > self.rows {
            return Err(Error::InvalidArgument(format!(
                "{}: row {row} is past the file's {} rows",
                self.path.display(),
                self.rows
            )));
        }
        let at = self.data_start + (row as u64) * (self.cols * self.dtype.size()) as u64;
        self.file
            .seek(io::SeekFrom::Start(at))
            .map_err(|e| Error::io(&self.path, e))?;
        self.next_row = row;
        Ok(())
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn dtype(&self) -> NpyDtype {
        self.dtype
    }
    /// Index of the first row the next chunk will hold.
    pub fn position(&self) -> usize {
        self.next_row
    }
    /// Rows not yet read.
    pub fn remaining(&self) -> usize {
        self.rows - self.next_row
    }

    /// The next `max_rows` rows (fewer at the end), or `None` once every row was read.
    pub fn next_chunk(&mut self, max_rows: usize) -> Result<Option<Matrix>> {
        let take = max_rows.max(1).min(self.remaining());
        if take == 0 {
            return Ok(None);
        }
        let values = take * self.cols;
        self.buf.resize(values * self.dtype.size(), 0);
        self.file.read_exact(&mut self.buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                npy_err(
                    &self.path,
                    format!(
                        "truncated: the file ended while reading rows {}..{} (it changed after \
                         it was opened?)",
                        self.next_row,
                        self.next_row + take
                    ),
                )
            } else {
                Error::io(&self.path, e)
            }
        })?;
        let data: Vec<f32> = match self.dtype {
            NpyDtype::F32 => self
                .buf
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            NpyDtype::F16 => self
                .buf
                .chunks_exact(2)
                .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
        };
        self.next_row += take;
        Matrix::new(data, take, self.cols).map(Some)
    }

    /// Every remaining row as one matrix.
    pub fn read_rest(&mut self) -> Result<Matrix> {
        let remaining = self.remaining();
        Ok(self
            .next_chunk(remaining)?
            .unwrap_or_else(|| Matrix::zeros(0, self.cols)))
    }
}

/// A 2-D little-endian float32 `.npy` file mapped into memory: its rows are read in place,
/// paged in from the file as they are touched, and the kernel may drop clean pages again under
/// memory pressure. So a job can read an input larger than the memory it may hold
/// (`vqx fit`, whose passes touch the rows in order).
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("x.npy");
/// let x = vqx::Matrix::new((0..6).map(|v| v as f32).collect(), 3, 2)?;
/// vqx::npy::write_matrix(&path, x.as_ref())?;
/// let m = vqx::npy::MappedMatrix::open(&path)?.expect("float32 maps");
/// assert_eq!(m.as_ref().row(2), &[4.0, 5.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct MappedMatrix {
    map: memmap2::Mmap,
    offset: usize,
    rows: usize,
    cols: usize,
}

impl MappedMatrix {
    /// Maps `path` after [`NpyMatrixReader::open`]'s checks; `None` when its values cannot be
    /// read in place (float16, which is converted on read, or a big-endian machine).
    pub fn open(path: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = path.as_ref();
        let r = NpyMatrixReader::open(path)?;
        if r.dtype() != NpyDtype::F32 || cfg!(target_endian = "big") || r.data_start % 4 != 0 {
            return Ok(None);
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only and vqx never writes it while mapped. Another
        // process truncating it meanwhile would fault the reads (SIGBUS), as with any map.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(Some(MappedMatrix {
            map,
            offset: r.data_start as usize,
            rows: r.rows(),
            cols: r.cols(),
        }))
    }

    /// The whole matrix, read in place.
    pub fn as_ref(&self) -> MatRef<'_> {
        let bytes = &self.map[self.offset..self.offset + self.rows * self.cols * 4];
        // The map starts page-aligned and the data at a multiple of 4: f32-aligned.
        let values: &[f32] = bytemuck::cast_slice(bytes);
        MatRef::new(values, self.rows, self.cols).expect("rows × cols values")
    }
}

/// Reads a whole 2-D float32/float16 `.npy` file as an f32 matrix.
pub fn read_matrix(path: impl AsRef<Path>) -> Result<Matrix> {
    NpyMatrixReader::open(path)?.read_rest()
}

/// Rows `rows` of a 2-D float32/float16 `.npy` file (only their bytes are read), and the
/// file's total row count.
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("x.npy");
/// let x = vqx::Matrix::new((0..12).map(|v| v as f32).collect(), 4, 3)?;
/// vqx::npy::write_matrix(&path, x.as_ref())?;
/// let (part, total) = vqx::npy::read_rows(&path, 1..3)?;
/// assert_eq!((part.data(), total), (&x.data()[3..9], 4));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn read_rows(path: impl AsRef<Path>, rows: std::ops::Range<usize>) -> Result<(Matrix, usize)> {
    let mut r = NpyMatrixReader::open(path)?;
    let total = r.rows();
    if rows.start > rows.end || rows.end > total {
        return Err(Error::InvalidArgument(format!(
            "{}: rows {}..{} are not within the file's {total} rows",
            r.path().display(),
            rows.start,
            rows.end
        )));
    }
    r.seek_row(rows.start)?;
    let part = match r.next_chunk(rows.end - rows.start)? {
        Some(m) if rows.end > rows.start => m,
        _ => Matrix::zeros(0, r.cols()),
    };
    Ok((part, total))
}

/// Reads a 1-D int64 `.npy` file (as written by [`write_indices`]).
pub fn read_indices(path: impl AsRef<Path>) -> Result<Vec<i64>> {
    read_1d(path.as_ref(), "int64")
}

/// Reads a 1-D float32 `.npy` file (as written by [`write_distances`]).
pub fn read_vector(path: impl AsRef<Path>) -> Result<Vec<f32>> {
    read_1d(path.as_ref(), "float32")
}

fn read_1d<T: npyz::Deserialize>(path: &Path, want: &str) -> Result<Vec<T>> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let npy = npyz::NpyFile::new(BufReader::new(f))
        .map_err(|e| npy_err(path, format!("not a valid .npy file: {e}")))?;
    if npy.shape().len() != 1 {
        return Err(npy_err(
            path,
            format!("has shape {}; expected a 1-D array", shape_str(npy.shape())),
        ));
    }
    let descr = npy.dtype().descr();
    let reader = npy
        .data::<T>()
        .map_err(|_| npy_err(path, format!("has dtype {descr}; expected {want}")))?;
    reader
        .collect::<io::Result<Vec<T>>>()
        .map_err(|e| npy_err(path, format!("cannot read data: {e}")))
}

/// The error for a writer used after [`NpyStreamWriter::finish`] took its file.
fn finished() -> Error {
    Error::InvalidArgument("writer already finished".into())
}

/// An `.npy` file written in appended chunks, published atomically by [`Self::finish`].
///
/// The total shape is written in the header up front; `finish` checks that exactly that many
/// values were appended, then renames the temporary file onto the destination. Dropping the
/// writer without `finish` (or any error) removes the temporary file.
pub struct NpyStreamWriter<T: npyz::AutoSerialize> {
    inner: Option<npyz::NpyWriter<T, BufWriter<File>>>,
    tmp: PathBuf,
    path: PathBuf,
    expected: u64,
    written: u64,
    _marker: PhantomData<T>,
}

impl<T: npyz::AutoSerialize> fmt::Debug for NpyStreamWriter<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NpyStreamWriter")
            .field("path", &self.path)
            .field("expected", &self.expected)
            .field("written", &self.written)
            .finish()
    }
}

impl<T: npyz::AutoSerialize> NpyStreamWriter<T> {
    /// Starts a C-ordered array of `shape` with `T`'s default dtype (`<i8` for i64, `<f4` for
    /// f32) at `path`.
    pub fn create(path: impl AsRef<Path>, shape: &[u64]) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let tmp = crate::atomic::temp_path(&path)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(&path, e))?;
        let expected = shape.iter().product();
        let mut w = NpyStreamWriter {
            inner: None,
            tmp,
            path,
            expected,
            written: 0,
            _marker: PhantomData,
        };
        let inner = npyz::WriteOptions::new()
            .default_dtype()
            .shape(shape)
            .writer(BufWriter::with_capacity(1 << 20, file))
            .begin_nd()
            .map_err(|e| Error::io(&w.path, e))?;
        w.inner = Some(inner);
        Ok(w)
    }
    /// The destination path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Values appended so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends values (whole rows, in order).
    pub fn append(&mut self, values: &[T]) -> Result<()> {
        self.append_iter(values.len(), values.iter())
    }

    /// A wrong number of values, said against the destination.
    fn count_err(&self, msg: fmt::Arguments<'_>) -> Error {
        Error::InvalidArgument(format!("{}: {msg}", self.path.display()))
    }

    fn append_iter<'a>(&mut self, count: usize, values: impl Iterator<Item = &'a T>) -> Result<()>
    where
        T: 'a,
    {
        if self.written + count as u64 > self.expected {
            return Err(self.count_err(format_args!(
                "appending {count} values would exceed the {} the header announced ({} \
                 already written)",
                self.expected, self.written
            )));
        }
        let inner = self.inner.as_mut().ok_or_else(finished)?;
        for v in values {
            inner.push(v).map_err(|e| Error::io(&self.path, e))?;
        }
        self.written += count as u64;
        Ok(())
    }

    /// Checks every value was written, flushes, syncs and renames onto the destination.
    pub fn finish(mut self) -> Result<()> {
        if self.written != self.expected {
            return Err(self.count_err(format_args!(
                "{} values written, the header announced {}",
                self.written, self.expected
            )));
        }
        let inner = self.inner.take().ok_or_else(finished)?;
        inner.finish().map_err(|e| Error::io(&self.path, e))?;
        // The npyz writer owns (and has now closed) the file; `publish` reopens it to push it
        // to disk before the rename makes it visible.
        crate::atomic::publish(&self.tmp, &self.path)?;
        // Nothing left to clean up.
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl NpyStreamWriter<i64> {
    /// A 1-D int64 index file of `len` entries.
    pub fn indices(path: impl AsRef<Path>, len: usize) -> Result<Self> {
        Self::create(path, &[len as u64])
    }
    /// Appends u32 indices, widened to int64.
    pub fn append_u32(&mut self, indices: &[u32]) -> Result<()> {
        let wide: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
        self.append(&wide)
    }
}

impl NpyStreamWriter<f32> {
    /// A 1-D float32 file of `len` entries.
    pub fn vector(path: impl AsRef<Path>, len: usize) -> Result<Self> {
        Self::create(path, &[len as u64])
    }
    /// A 2-D float32 `rows × cols` file.
    pub fn matrix(path: impl AsRef<Path>, rows: usize, cols: usize) -> Result<Self> {
        Self::create(path, &[rows as u64, cols as u64])
    }
    /// Appends the rows of `m` (its width must be the file's; not checked beyond the total).
    pub fn append_rows(&mut self, m: MatRef<'_>) -> Result<()> {
        self.append(m.data())
    }
}

impl<T: npyz::AutoSerialize> Drop for NpyStreamWriter<T> {
    fn drop(&mut self) {
        // Not finished (or finishing failed): discard the partial file.
        drop(self.inner.take());
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `values`, an array of `shape`, to `path` atomically.
fn write_whole<T: npyz::AutoSerialize>(path: &Path, shape: &[u64], values: &[T]) -> Result<()> {
    let mut w = NpyStreamWriter::create(path, shape)?;
    w.append(values)?;
    w.finish()
}

/// Writes a 2-D float32 `.npy` file atomically.
pub fn write_matrix(path: impl AsRef<Path>, m: MatRef<'_>) -> Result<()> {
    let shape = [m.rows() as u64, m.cols() as u64];
    write_whole(path.as_ref(), &shape, m.data())
}

/// Writes 1-D int64 indices atomically.
pub fn write_indices(path: impl AsRef<Path>, indices: &[u32]) -> Result<()> {
    let wide: Vec<i64> = indices.iter().map(|&i| i64::from(i)).collect();
    write_whole(path.as_ref(), &[wide.len() as u64], &wide)
}

/// Writes 1-D float32 distances atomically.
pub fn write_distances(path: impl AsRef<Path>, distances: &[f32]) -> Result<()> {
    write_whole(path.as_ref(), &[distances.len() as u64], distances)
}
