//! Data that stays on the device: matrices, a codebook with what the nearest kernels need, and
//! the outputs of a nearest search, all in device memory, so a caller whose tensors live on
//! the GPU runs the primitives without copying them to the host and back (FAISS keeps its
//! vectors and norms on the GPU the same way; candle keeps storage on the device and reads
//! back only on request).
//!
//! The host API of [`super::GpuBackend`] (`nearest(MatRef, ..)` etc.) is a thin layer over
//! these: upload, run on the device, download the answer.
//!
//! ```
//! use vqx::backend::cuda::{DeviceAssignment, DeviceCodebook, DeviceMatrix, EmuBackend};
//! use vqx::{Matrix, Metric};
//! let b = EmuBackend::new()?;
//! let gpu = b.gpu();
//! let codebook = Matrix::new(vec![1.0, 0.0, -1.0, 0.0], 2, 2)?;
//! let cb = DeviceCodebook::upload(gpu, codebook.as_ref(), Metric::L2)?;
//! let x = DeviceMatrix::upload(gpu, "x", Matrix::new(vec![0.9, 0.1, -1.0, 0.2], 2, 2)?.as_ref())?;
//! let mut out = DeviceAssignment::new(gpu, 2)?;
//! b.nearest_device(&x, &cb, &mut out)?; // nothing crosses the bus
//! assert_eq!(out.fetch(gpu)?.indices, vec![0, 1]);
//! # Ok::<(), vqx::Error>(())
//! ```

use super::device::Gpu;
use super::launch::{self, DeviceList, FlagPass, NearestOperands, NearestOut};
use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};
use crate::nearest::{Assignment, MAX_CODES, Metric, Precision};
use std::mem::ManuallyDrop;

/// A rows × cols row-major f32 matrix in device memory: owned, or borrowed from the caller
/// ([`DeviceMatrix::from_raw`]), in which case dropping it leaves the memory alone.
pub struct DeviceMatrix<G: Gpu> {
    buf: ManuallyDrop<G::Buf<f32>>,
    rows: usize,
    cols: usize,
    borrowed: bool,
}

impl<G: Gpu> Drop for DeviceMatrix<G> {
    fn drop(&mut self) {
        // SAFETY: `buf` is taken once, here, and never used again.
        let buf = unsafe { ManuallyDrop::take(&mut self.buf) };
        if self.borrowed {
            G::release_borrowed(buf);
        }
    }
}

impl<G: Gpu> DeviceMatrix<G> {
    /// Copies `m` to the device.
    pub fn upload(gpu: &G, what: &str, m: MatRef<'_>) -> Result<Self> {
        Ok(Self::owned(gpu.upload(what, m.data())?, m.rows(), m.cols()))
    }

    /// A zeroed matrix on the device.
    pub fn zeros(gpu: &G, what: &str, rows: usize, cols: usize) -> Result<Self> {
        let len = rows.checked_mul(cols).ok_or_else(|| {
            Error::InvalidArgument(format!("{what}: {rows} × {cols} overflows usize"))
        })?;
        Ok(Self::owned(gpu.alloc_zeros(what, len)?, rows, cols))
    }

    /// Wraps a device buffer of exactly rows·cols values (e.g. one the caller filled).
    pub fn from_buf(gpu: &G, buf: G::Buf<f32>, rows: usize, cols: usize) -> Result<Self> {
        let len = gpu.len(&buf);
        if Some(len) != rows.checked_mul(cols) {
            return Err(Error::shape(
                "device buffer vs matrix shape",
                format!("{rows} × {cols} values"),
                format!("{len} values"),
            ));
        }
        Ok(Self::owned(buf, rows, cols))
    }

    /// The caller's device memory at `ptr` (rows·cols f32, row-major) as a matrix, without a
    /// copy: e.g. a tensor of PyTorch (`data_ptr()`) or of another cudarc user. Dropping the
    /// matrix does not free it.
    ///
    /// # Safety
    /// `ptr` must be a device allocation of `gpu`'s context (a host pointer on the emulated
    /// device) holding at least rows·cols f32, valid and not accessed by anyone else while
    /// the matrix lives, except through work ordered on `gpu`'s stream.
    pub unsafe fn from_raw(gpu: &G, ptr: u64, rows: usize, cols: usize) -> Result<Self> {
        let len = rows
            .checked_mul(cols)
            .ok_or_else(|| Error::InvalidArgument(format!("{rows} × {cols} overflows usize")))?;
        if ptr == 0 {
            return Err(Error::InvalidArgument("null device pointer".into()));
        }
        Ok(DeviceMatrix {
            // SAFETY: forwarded from this function's contract; Drop releases, never frees.
            buf: ManuallyDrop::new(unsafe { gpu.borrow_raw(ptr, len) }),
            rows,
            cols,
            borrowed: true,
        })
    }

    fn owned(buf: G::Buf<f32>, rows: usize, cols: usize) -> Self {
        DeviceMatrix {
            buf: ManuallyDrop::new(buf),
            rows,
            cols,
            borrowed: false,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The device buffer (rows·cols values, row-major).
    pub fn buf(&self) -> &G::Buf<f32> {
        &self.buf
    }
    /// The device buffer, to be written by the caller's own kernels.
    pub fn buf_mut(&mut self) -> &mut G::Buf<f32> {
        &mut self.buf
    }

    /// Copies the matrix to the host.
    pub fn download(&self, gpu: &G, what: &str) -> Result<Matrix> {
        Matrix::new(gpu.download(what, &self.buf)?, self.rows, self.cols)
    }

    /// Overwrites the matrix with `m` (same shape), reusing the allocation.
    pub fn write(&mut self, gpu: &G, what: &str, m: MatRef<'_>) -> Result<()> {
        if (m.rows(), m.cols()) != (self.rows, self.cols) {
            return Err(Error::shape(
                format!("{what} vs its device matrix"),
                format!("{} × {}", self.rows, self.cols),
                format!("{} × {}", m.rows(), m.cols()),
            ));
        }
        gpu.write(what, &mut self.buf, m.data())
    }

    /// Fails with [`Error::NonFinite`] naming the row and column of the first non-finite value;
    /// otherwise returns the largest |value|. Reads 12 bytes back (and so waits for the device).
    pub fn check_finite(&self, gpu: &G, what: &str) -> Result<f32> {
        let (bad, max) = launch::check_values(gpu, &self.buf, self.rows * self.cols)?;
        match bad {
            None => Ok(max),
            Some(e) => {
                let cols = self.cols.max(1) as u64;
                let value = gpu.read("non-finite value", &self.buf, e as usize, 1)?[0];
                Err(Error::NonFinite {
                    what: what.into(),
                    row: (e / cols) as usize,
                    col: (e % cols) as usize,
                    value,
                })
            }
        }
    }
}

/// Rows in host memory or already on the device (candle's `Storage`, FAISS's host-or-device
/// pointers): the device-level entry points accept either and copy only what is not on the
/// device yet.
///
/// ```
/// use vqx::backend::cuda::{DeviceMatrix, EmuGpu, Storage};
/// use vqx::MatRef;
/// let gpu = EmuGpu::new()?;
/// let host = [1.0f32, 2.0, 3.0, 4.0];
/// let x = MatRef::new(&host, 2, 2)?;
/// let on_device = DeviceMatrix::upload(&gpu, "x", x)?;
/// for rows in [Storage::from(x), Storage::from(&on_device)] {
///     assert_eq!(rows.on_device(&gpu, "x")?.rows(), 2); // uploads the host rows only
/// }
/// # Ok::<(), vqx::Error>(())
/// ```
pub enum Storage<'a, G: Gpu> {
    Host(MatRef<'a>),
    Device(&'a DeviceMatrix<G>),
}

impl<'a, G: Gpu> From<MatRef<'a>> for Storage<'a, G> {
    fn from(m: MatRef<'a>) -> Self {
        Storage::Host(m)
    }
}

impl<'a, G: Gpu> From<&'a DeviceMatrix<G>> for Storage<'a, G> {
    fn from(m: &'a DeviceMatrix<G>) -> Self {
        Storage::Device(m)
    }
}

impl<'a, G: Gpu> Storage<'a, G> {
    pub fn rows(&self) -> usize {
        match self {
            Storage::Host(m) => m.rows(),
            Storage::Device(m) => m.rows(),
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            Storage::Host(m) => m.cols(),
            Storage::Device(m) => m.cols(),
        }
    }
    /// The rows on the device: borrowed when they are there already, uploaded otherwise (host
    /// rows are checked for NaN/Inf on the host first, where it costs no transfer).
    pub fn on_device(self, gpu: &G, what: &str) -> Result<OnDevice<'a, G>> {
        match self {
            Storage::Device(m) => Ok(OnDevice::Borrowed(m)),
            Storage::Host(m) => {
                m.check_finite(what)?;
                Ok(OnDevice::Uploaded(DeviceMatrix::upload(gpu, what, m)?))
            }
        }
    }
}

/// Rows on the device, borrowed or uploaded for one call ([`Storage::on_device`]).
pub enum OnDevice<'a, G: Gpu> {
    Borrowed(&'a DeviceMatrix<G>),
    Uploaded(DeviceMatrix<G>),
}

impl<G: Gpu> std::ops::Deref for OnDevice<'_, G> {
    type Target = DeviceMatrix<G>;
    fn deref(&self) -> &DeviceMatrix<G> {
        match self {
            OnDevice::Borrowed(m) => m,
            OnDevice::Uploaded(m) => m,
        }
    }
}

/// A codebook resident on the device with what the nearest kernels and the recheck need: its
/// rows, under cosine their normalised copy, ||c_k||² in f32 and the largest ||c_k|| (for the
/// rounding bound), all computed on the device ([`DeviceCodebook::refresh`] after the rows
/// change in place).
pub struct DeviceCodebook<G: Gpu> {
    metric: Metric,
    rows: DeviceMatrix<G>,
    /// Cosine only: the L2-normalised rows the kernels score against.
    normalized: Option<DeviceMatrix<G>>,
    /// ||c_k||² of the scored rows in f32 (1 for every code under cosine, also a zero code).
    norms: G::Buf<f32>,
    /// Bits of max_k ||c_k|| in f64.
    max_norm_bits: G::Buf<u64>,
}

impl<G: Gpu> DeviceCodebook<G> {
    /// Copies `codebook` (non-empty, finite, at most [`MAX_CODES`] rows) to the device and
    /// prepares it for `metric`.
    pub fn upload(gpu: &G, codebook: MatRef<'_>, metric: Metric) -> Result<Self> {
        codebook.check_nonempty("codebook")?;
        codebook.check_finite("codebook")?;
        Self::from_device(
            gpu,
            DeviceMatrix::upload(gpu, "codebook", codebook)?,
            metric,
        )
    }

    /// Prepares a codebook already on the device (its values are not checked: see
    /// [`DeviceMatrix::check_finite`]).
    pub fn from_device(gpu: &G, rows: DeviceMatrix<G>, metric: Metric) -> Result<Self> {
        let (k, d) = (rows.rows(), rows.cols());
        if k == 0 || d == 0 {
            return Err(Error::Empty {
                what: "codebook".into(),
                detail: format!("{k} × {d}"),
            });
        }
        if k > MAX_CODES {
            return Err(Error::InvalidArgument(format!(
                "codebook has {k} codes; at most {MAX_CODES} are supported"
            )));
        }
        let normalized = match metric {
            Metric::L2 => None,
            Metric::Cosine => Some(DeviceMatrix::zeros(gpu, "normalised codebook", k, d)?),
        };
        let (mut norms, mut max_norm_bits) = (
            gpu.alloc_zeros("code norms", k)?,
            gpu.alloc_zeros("largest code norm", 1)?,
        );
        if metric == Metric::Cosine {
            // Exactly 1 per code, as the CPU's `Prepared`: the norms of the normalised rows
            // would round to 1 ± ulp, and a zero code must score as cosine 0. Written once:
            // refreshing the rows does not change them.
            gpu.write("code norms", &mut norms, &vec![1.0f32; k])?;
            gpu.write("largest code norm", &mut max_norm_bits, &[1f64.to_bits()])?;
        }
        let mut cb = DeviceCodebook {
            metric,
            rows,
            normalized,
            norms,
            max_norm_bits,
        };
        cb.refresh(gpu)?;
        Ok(cb)
    }

    /// Recomputes the normalised rows and the norms after the rows changed on the device.
    pub fn refresh(&mut self, gpu: &G) -> Result<()> {
        let (k, d) = (self.rows.rows(), self.rows.cols());
        match &mut self.normalized {
            None => launch::row_norms(
                gpu,
                self.rows.buf(),
                &mut self.norms,
                &mut self.max_norm_bits,
                k,
                d,
            ),
            Some(m) => launch::normalize_rows(gpu, self.rows.buf(), m.buf_mut(), k, d),
        }
    }

    pub fn metric(&self) -> Metric {
        self.metric
    }
    /// Codes (K).
    pub fn codes(&self) -> usize {
        self.rows.rows()
    }
    /// Dimension (D).
    pub fn dim(&self) -> usize {
        self.rows.cols()
    }
    /// The codebook's rows as given (not normalised).
    pub fn rows(&self) -> &DeviceMatrix<G> {
        &self.rows
    }
    /// The rows, to be updated in place; call [`Self::refresh`] afterwards.
    pub fn rows_mut(&mut self) -> &mut DeviceMatrix<G> {
        &mut self.rows
    }
    /// The rows the kernels score against: the rows themselves under L2, normalised under
    /// cosine.
    pub fn scored(&self) -> &DeviceMatrix<G> {
        self.normalized.as_ref().unwrap_or(&self.rows)
    }
    /// ||c_k||² in f32 as the scores use them.
    pub fn norms(&self) -> &G::Buf<f32> {
        &self.norms
    }
    /// Copies the rows to the host.
    pub fn download(&self, gpu: &G) -> Result<Matrix> {
        self.rows.download(gpu, "codebook")
    }
}

/// The outputs of a nearest search on the device, with the scratch the search needs, for a
/// fixed number of rows: reuse it across calls.
pub struct DeviceAssignment<G: Gpu> {
    n: usize,
    /// The winning code per row (`best`: the indices), its score and the runner-up's.
    found: NearestOut<G>,
    distances: G::Buf<f32>,
    /// Rows flagged by the first flag pass, and their count.
    list_a: DeviceList<G>,
    /// Rows flagged again after the f32 rescore of a low-precision search.
    list_b: DeviceList<G>,
    /// Whether the rows recomputed in f64 are counted in `list_b` (low precision) or
    /// `list_a`.
    final_b: bool,
    /// Cosine only: x normalised.
    x_normalized: Option<G::Buf<f32>>,
}

impl<G: Gpu> DeviceAssignment<G> {
    /// Room for the assignment of `n` rows.
    pub fn new(gpu: &G, n: usize) -> Result<Self> {
        Ok(DeviceAssignment {
            n,
            found: NearestOut::new(gpu, n)?,
            distances: gpu.alloc_zeros("distances", n)?,
            list_a: DeviceList::new(gpu, n, "flagged rows")?,
            list_b: DeviceList::new(gpu, n, "flagged rows")?,
            final_b: false,
            x_normalized: None,
        })
    }

    /// Rows this assignment holds.
    pub fn rows(&self) -> usize {
        self.n
    }
    /// The winning code per row (n values on the device).
    pub fn indices(&self) -> &G::Buf<u32> {
        &self.found.best
    }
    /// The winning distance per row (n values on the device).
    pub fn distances(&self) -> &G::Buf<f32> {
        &self.distances
    }
    /// Rows the last search recomputed in f64 (reads 4 bytes back).
    pub fn rechecked(&self, gpu: &G) -> Result<usize> {
        let list = if self.final_b {
            &self.list_b
        } else {
            &self.list_a
        };
        Ok(gpu.download("recheck count", &list.count)?[0] as usize)
    }
    /// Copies indices, distances and the recheck count to the host.
    pub fn fetch(&self, gpu: &G) -> Result<Assignment> {
        Ok(Assignment {
            indices: gpu.download("indices", &self.found.best)?,
            distances: gpu.download("distances", &self.distances)?,
            rechecked: self.rechecked(gpu)?,
        })
    }
}

/// The flag pass over the rows of `x` against `codebook`'s rows with the candidates `found`,
/// scored at `precision`.
fn flag_pass<'a, G: Gpu>(
    x: &'a DeviceMatrix<G>,
    codebook: &'a DeviceCodebook<G>,
    found: &'a NearestOut<G>,
    precision: Precision,
    exact_distance: bool,
) -> FlagPass<'a, G> {
    FlagPass {
        x: x.buf(),
        codebook: codebook.rows().buf(),
        max_norm_bits: &codebook.max_norm_bits,
        found,
        n: x.rows(),
        k: codebook.codes(),
        d: x.cols(),
        metric: codebook.metric(),
        precision,
        exact_distance,
    }
}

/// The nearest code of every row of `x` on the device, scored at `precision` and rechecked on
/// the device: rows whose margin is inside the precision's rounding bound are rescored with
/// the exact f32 kernel's arithmetic (tf32/bf16 only) and, if still inside the f32 bound,
/// recomputed in f64, ties to the smallest index. The indices are those of an exact
/// computation (the same as the CPU backend's); nothing is copied to or from the host.
///
/// Values are not checked here (device data is validated where it enters:
/// [`DeviceMatrix::check_finite`]); shapes are.
pub fn nearest<G: Gpu>(
    gpu: &G,
    precision: Precision,
    x: &DeviceMatrix<G>,
    codebook: &DeviceCodebook<G>,
    out: &mut DeviceAssignment<G>,
) -> Result<()> {
    let (n, d, k) = (x.rows(), x.cols(), codebook.codes());
    if d != codebook.dim() {
        return Err(Error::shape(
            "input width vs codebook width",
            format!("{} columns (the codebook's dimension)", codebook.dim()),
            format!("{d} columns"),
        ));
    }
    if n == 0 {
        return Err(Error::Empty {
            what: "input".into(),
            detail: "no rows".into(),
        });
    }
    if out.rows() != n {
        return Err(Error::shape(
            "device assignment vs input rows",
            format!("room for {n} rows"),
            format!("room for {} rows", out.rows()),
        ));
    }
    let metric = codebook.metric();
    let xs = match metric {
        Metric::L2 => x.buf(),
        Metric::Cosine => {
            if out.x_normalized.is_none() {
                out.x_normalized = Some(gpu.alloc_zeros("normalised x", n * d)?);
            }
            let xn = out.x_normalized.as_mut().expect("allocated above");
            launch::normalize_rows(gpu, x.buf(), xn, n, d)?;
            out.x_normalized.as_ref().expect("allocated above")
        }
    };
    let operands = NearestOperands {
        x: xs,
        codebook: codebook.scored().buf(),
        norms: codebook.norms(),
        n,
        k,
        d,
    };
    launch::nearest_into(gpu, precision, &operands, &mut out.found)?;
    let low_precision = precision != Precision::Exact;
    let pass = flag_pass(x, codebook, &out.found, precision, low_precision);
    let a = &mut out.list_a;
    launch::recheck_flag(
        gpu,
        &pass,
        None,
        &mut out.distances,
        &mut a.rows,
        &mut a.count,
    )?;
    out.final_b = low_precision;
    if low_precision {
        // The flagged rows' low-precision scores are replaced by exact-f32 ones, which have
        // the (much) tighter f32 bound: most leave the list before the f64 pass.
        let (a, f) = (&out.list_a, &mut out.found);
        let (best, best_score, second_score) =
            (&mut f.best, &mut f.best_score, &mut f.second_score);
        launch::nearest_rows(
            gpu,
            &operands,
            &a.rows,
            &a.count,
            best,
            best_score,
            second_score,
        )?;
        let pass = flag_pass(x, codebook, &out.found, Precision::Exact, true);
        let b = &mut out.list_b;
        let (a, dist) = (Some(out.list_a.as_list()), &mut out.distances);
        launch::recheck_flag(gpu, &pass, a, dist, &mut b.rows, &mut b.count)?;
    }
    let list = if out.final_b {
        &out.list_b
    } else {
        &out.list_a
    };
    launch::nearest_exact(
        gpu,
        x.buf(),
        codebook.rows().buf(),
        &list.rows,
        &list.count,
        &mut out.found.best,
        &mut out.distances,
        (n, k, d),
        metric,
    )
}
