//! Gather: q_n = C[i(n)], the codebook rows the indices name (SPEC §2).

use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};
use rayon::prelude::*;

/// Errors with the first index that does not name one of `codes` codes.
pub fn validate_indices(indices: &[u32], codes: usize) -> Result<()> {
    if let Some(position) = indices.iter().position(|&i| i as usize >= codes) {
        return Err(Error::IndexOutOfRange {
            position,
            index: indices[position] as u64,
            codes,
        });
    }
    Ok(())
}

/// Checks a gather's inputs: a non-empty finite codebook, indices in range.
pub fn validate(codebook: MatRef<'_>, indices: &[u32]) -> Result<()> {
    codebook.check_nonempty("codebook")?;
    validate_indices(indices, codebook.rows())
}

/// CPU twin of the gather kernel. Inputs must already be validated.
pub fn cpu(codebook: MatRef<'_>, indices: &[u32]) -> Matrix {
    let d = codebook.cols();
    let mut out = Matrix::zeros(indices.len(), d);
    out.data_mut()
        .par_chunks_mut(d)
        .zip(indices.par_iter())
        .with_min_len(256)
        .for_each(|(dst, &i)| dst.copy_from_slice(codebook.row(i as usize)));
    out
}
