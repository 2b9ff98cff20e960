//! Row-major f32 matrices: the one layout every primitive takes.

use crate::error::{Error, Result};
use half::{bf16, f16};

/// A borrowed row-major `rows × cols` matrix of f32.
///
/// ```
/// use vqx::MatRef;
/// let data = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
/// let m = MatRef::new(&data, 2, 3).unwrap();
/// assert_eq!(m.row(1), &[4.0, 5.0, 6.0]);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
}

impl<'a> MatRef<'a> {
    /// Wraps `data` as `rows × cols`; its length must be exactly `rows * cols`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        let want = rows
            .checked_mul(cols)
            .ok_or_else(|| Error::InvalidArgument(format!("{rows} × {cols} overflows usize")))?;
        if data.len() != want {
            return Err(Error::shape(
                "matrix data",
                format!("{rows} × {cols} = {want} values"),
                format!("{} values", data.len()),
            ));
        }
        Ok(MatRef { data, rows, cols })
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// All values, row after row.
    pub fn data(&self) -> &'a [f32] {
        self.data
    }
    /// Row `i` (panics if `i >= rows`, like slice indexing).
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
    /// Rows `start..end` as a matrix of their own.
    pub fn slice_rows(&self, start: usize, end: usize) -> MatRef<'a> {
        MatRef {
            data: &self.data[start * self.cols..end * self.cols],
            rows: end - start,
            cols: self.cols,
        }
    }
    /// Errors with the first row and column holding a NaN or infinity.
    pub fn check_finite(&self, what: &str) -> Result<()> {
        self.max_abs(what).map(drop)
    }

    /// [`MatRef::check_finite`] for rows `first_row..` of a larger matrix (a chunk or shard of
    /// a file): the error names the row in the larger matrix.
    pub fn check_finite_from(&self, what: &str, first_row: usize) -> Result<()> {
        self.check_finite(what).map_err(|e| match e {
            Error::NonFinite {
                what,
                row,
                col,
                value,
            } => Error::NonFinite {
                what,
                row: row + first_row,
                col,
                value,
            },
            e => e,
        })
    }

    /// The largest |value| (0 for no values), or the error of [`MatRef::check_finite`].
    ///
    /// One pass over the bits: for finite f32 values the order of `bits & 0x7fff_ffff` as
    /// integers is the order of |v|, and NaN and ±inf are the patterns at or above
    /// `0x7f80_0000`. The integer max vectorises where a float max with NaN semantics does not,
    /// which matters for every search checking its whole input.
    pub fn max_abs(&self, what: &str) -> Result<f32> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        let top = max_abs_bits;
        let most = if self.data.len() > CHUNK {
            self.data.par_chunks(CHUNK).map(top).max().unwrap_or(0)
        } else {
            top(self.data)
        };
        if most >= 0x7f80_0000 {
            let pos = self
                .data
                .iter()
                .position(|v| !v.is_finite())
                .expect("a non-finite value");
            let cols = self.cols.max(1);
            return Err(Error::NonFinite {
                what: what.into(),
                row: pos / cols,
                col: pos % cols,
                value: self.data[pos],
            });
        }
        Ok(f32::from_bits(most))
    }
    /// Errors when there are no rows or no columns.
    pub fn check_nonempty(&self, what: &str) -> Result<()> {
        if self.rows == 0 || self.cols == 0 {
            return Err(Error::Empty {
                what: what.into(),
                detail: format!("shape {} × {}", self.rows, self.cols),
            });
        }
        Ok(())
    }
    pub fn to_owned(&self) -> Matrix {
        Matrix {
            data: self.data.to_vec(),
            rows: self.rows,
            cols: self.cols,
        }
    }
}

/// An owned row-major `rows × cols` matrix of f32.
///
/// ```
/// use vqx::Matrix;
/// let m = Matrix::from_f16(&[half::f16::from_f32(0.5); 4], 2, 2).unwrap();
/// assert_eq!(m.as_ref().row(0), &[0.5, 0.5]);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
}

impl Matrix {
    /// Takes `data` as `rows × cols`; its length must be exactly `rows * cols`.
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        MatRef::new(&data, rows, cols)?;
        Ok(Matrix { data, rows, cols })
    }
    /// A `rows × cols` matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Matrix {
            data: vec![0.0; rows * cols],
            rows,
            cols,
        }
    }
    /// Converts half-precision values (exactly: every f16 is an f32).
    pub fn from_f16(data: &[f16], rows: usize, cols: usize) -> Result<Self> {
        Self::new(data.iter().map(|v| v.to_f32()).collect(), rows, cols)
    }
    /// Converts bfloat16 values (exactly: every bf16 is an f32).
    pub fn from_bf16(data: &[bf16], rows: usize, cols: usize) -> Result<Self> {
        Self::new(data.iter().map(|v| v.to_f32()).collect(), rows, cols)
    }
    pub fn as_ref(&self) -> MatRef<'_> {
        MatRef {
            data: &self.data,
            rows: self.rows,
            cols: self.cols,
        }
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

crate::model::simd::multiversion! {
    /// max over `v` of `bits & 0x7fff_ffff` (|v|'s order for finite values; NaN and ±inf at or
    /// above `0x7f80_0000`).
    pub(crate) fn max_abs_bits(v: &[f32]) -> u32 {
        let mut m = 0u32;
        for x in v {
            m = m.max(x.to_bits() & 0x7fff_ffff);
        }
        m
    }
}
