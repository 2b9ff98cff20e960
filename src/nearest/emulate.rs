//! A CPU emulation of the tensor-core scoring of `kernels/nearest_tc.cu`: the test oracle for
//! the low-precision rounding bound ([`super::RoundingModel::TF32`], [`super::RoundingModel::BF16`]).
//!
//! The operands are rounded exactly as the kernel rounds them (tf32: `cvt.rna.tf32.f32`, round
//! to nearest, ties away from zero, keeping 10 explicit mantissa bits; bf16:
//! `cvt.rn.bf16x2.f32`, round to nearest, ties to even, keeping 7), the products of the rounded
//! operands are formed in f32 (exact: 11 + 11 and 8 + 8 significant bits fit in 24) and summed
//! in f32 in increasing-d order, and the score is `fma(-2, dot, ||c||²)` with the f32 norm, as
//! the kernel's epilogue does. The tensor cores sum in another order and round differently
//! (see [`super::RoundingModel`]); any order is inside the model, so [`super::finish`] applied to
//! these candidates must give the exact indices on every row that is not a true tie: that is
//! what `tests/precision.rs` checks, with no GPU.
//!
//! ```
//! use vqx::nearest::emulate::{round_bf16, round_tf32};
//! assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0); // a tie: to even
//! assert_eq!(round_tf32(1.0 + 1.0 / 2048.0), 1.0 + 1.0 / 1024.0); // a tie: away from zero
//! ```

use super::{Candidates, Metric, Precision, Prepared, normalize_rows};
use crate::matrix::MatRef;
use rayon::prelude::*;

/// `cvt.rna.tf32.f32`: round to nearest, ties away from zero, to 10 explicit mantissa bits
/// (returned as the f32 whose low 13 bits are zero). NaN and ±inf pass through.
pub fn round_tf32(v: f32) -> f32 {
    if !v.is_finite() {
        return v;
    }
    // Adding half an ulp of tf32 to the magnitude bits and truncating rounds ties away from
    // zero; a carry into the exponent is the correct next binade (or +inf past f32::MAX).
    f32::from_bits((v.to_bits().wrapping_add(0x1000)) & 0xffff_e000)
}

/// `cvt.rn.bf16.f32`: round to nearest, ties to even, to 7 explicit mantissa bits (returned as
/// the f32 whose low 16 bits are zero). NaN and ±inf pass through.
pub fn round_bf16(v: f32) -> f32 {
    if !v.is_finite() {
        return v;
    }
    let b = v.to_bits();
    let lsb = (b >> 16) & 1;
    f32::from_bits((b.wrapping_add(0x7fff + lsb)) & 0xffff_0000)
}

/// The operand rounding of `precision` (the identity for [`Precision::Exact`]).
pub fn round_operand(precision: Precision, v: f32) -> f32 {
    match precision {
        Precision::Exact => v,
        Precision::Tf32 => round_tf32(v),
        Precision::Bf16 => round_bf16(v),
    }
}

/// Per-row candidates as the tensor-core kernel at `precision` computes them, emulated on the
/// CPU (slow: a scalar loop, for tests). `x` is the raw input; `prepared` comes from `codebook`.
/// Inputs must already be validated with [`super::validate`].
pub fn candidates(
    x: MatRef<'_>,
    codebook: MatRef<'_>,
    prepared: &Prepared,
    precision: Precision,
) -> Candidates {
    let d = x.cols();
    let normalized;
    let x = match prepared.metric() {
        Metric::L2 => x,
        Metric::Cosine => {
            normalized = normalize_rows(x);
            normalized.as_ref()
        }
    };
    let scored = prepared.scored(codebook);
    let round = |m: MatRef<'_>| -> Vec<f32> {
        m.data()
            .iter()
            .map(|&v| round_operand(precision, v))
            .collect()
    };
    let (xr, cr) = (round(x), round(scored));
    let norms = prepared.norms();
    let k = scored.rows();
    let per_row: Vec<(u32, f32, f32)> = (0..x.rows())
        .into_par_iter()
        .map(|n| {
            let xrow = &xr[n * d..(n + 1) * d];
            let (mut bi, mut bs, mut ss) = (0u32, f32::INFINITY, f32::INFINITY);
            for kc in 0..k {
                let crow = &cr[kc * d..(kc + 1) * d];
                let mut dot = 0f32;
                for (a, b) in xrow.iter().zip(crow) {
                    dot += a * b;
                }
                let s = (-2.0f32).mul_add(dot, norms[kc]);
                if s < bs {
                    ss = bs;
                    bs = s;
                    bi = kc as u32;
                } else if s < ss {
                    ss = s;
                }
            }
            (bi, bs, ss)
        })
        .collect();
    Candidates {
        best: per_row.iter().map(|r| r.0).collect(),
        best_score: per_row.iter().map(|r| r.1).collect(),
        second_score: per_row.iter().map(|r| r.2).collect(),
        row_norm_sq: None,
        shortlist: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf32_rounds_ties_away_and_keeps_ten_bits() {
        let ulp = 1.0f32 / 1024.0;
        assert_eq!(round_tf32(1.0 + ulp / 2.0), 1.0 + ulp);
        assert_eq!(round_tf32(-(1.0 + ulp / 2.0)), -(1.0 + ulp));
        assert_eq!(round_tf32(1.0 + ulp / 2.0 - f32::EPSILON), 1.0);
        assert_eq!(round_tf32(1.0 + 1.5 * ulp), 1.0 + 2.0 * ulp);
        assert_eq!(round_tf32(f32::MAX), f32::INFINITY);
        assert_eq!(round_tf32(0.0), 0.0);
        for v in [0.1f32, -3.7, 1e-30, 6.0e20] {
            let r = round_tf32(v);
            assert_eq!(r.to_bits() & 0x1fff, 0);
            assert!(((r - v) / v).abs() <= 1.0 / 2048.0);
        }
    }

    #[test]
    fn bf16_rounds_ties_to_even_and_keeps_seven_bits() {
        let ulp = 1.0f32 / 128.0;
        assert_eq!(round_bf16(1.0 + ulp / 2.0), 1.0);
        assert_eq!(round_bf16(1.0 + 1.5 * ulp), 1.0 + 2.0 * ulp);
        assert_eq!(round_bf16(-(1.0 + 1.5 * ulp)), -(1.0 + 2.0 * ulp));
        assert_eq!(round_bf16(1.0 + ulp / 2.0 + f32::EPSILON), 1.0 + ulp);
        for v in [0.1f32, -3.7, 1e-30, 6.0e20] {
            let r = round_bf16(v);
            assert_eq!(r.to_bits() & 0xffff, 0);
            assert!(((r - v) / v).abs() <= 1.0 / 256.0);
        }
    }
}
