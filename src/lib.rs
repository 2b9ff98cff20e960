//! # vqx — vector quantization on CPU and CUDA
//!
//! The four primitives of a VQ layer, each with a CUDA kernel and a CPU twin that computes the
//! same function:
//! - [`nearest`]: fused distance-argmin (L2 or cosine), never materialising the N×K matrix,
//!   exact after an f64 recheck of rows whose margin is inside the f32 rounding bound;
//! - [`gather`]: codebook rows by index;
//! - [`ema`]: per-code sums and counts for the EMA codebook update, with a deterministic mode;
//! - [`usage`]: the exact histogram of indices.
//!
//! ```
//! use vqx::{backend::{select, Device}, MatRef, Metric};
//! let codebook = [0.0f32, 0.0, 1.0, 1.0, -1.0, 2.0];
//! let x = [0.9f32, 1.2, 0.1, -0.1];
//! let backend = select(Device::Auto)?; // CUDA when present, the CPU otherwise
//! let a = backend.nearest(MatRef::new(&x, 2, 2)?, MatRef::new(&codebook, 3, 2)?, Metric::L2)?;
//! assert_eq!(a.indices, vec![1, 0]);
//! # Ok::<(), vqx::Error>(())
//! ```

pub mod atomic;
pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod collective;
pub mod ema;
pub mod error;
pub mod gather;
pub mod kmeans;
pub mod matrix;
pub mod model;
pub mod nearest;
pub mod npy;
pub mod quantizer;
pub mod reference;
pub mod schedule;
pub mod train;
pub mod usage;

pub use error::{Error, Result};
pub use matrix::{MatRef, Matrix};
pub use nearest::{Assignment, Metric};

/// The README's example is compiled and run as a doc test.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
