//! Placeholder until the CUDA backend lands: reports itself unavailable.
use super::Backend;
use crate::ema::{CodeSums, SumMode};
use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};
use crate::nearest::{Assignment, Metric};

/// Whether kernels were compiled into this build.
pub const KERNELS_COMPILED: bool = false;

#[derive(Clone, Debug, serde::Serialize)]
pub struct CudaStatus {
    pub available: bool,
    pub reason: String,
    pub kernels_compiled: bool,
    pub device_name: Option<String>,
    pub compute_capability: Option<(i32, i32)>,
}

pub fn status() -> CudaStatus {
    CudaStatus {
        available: false,
        reason: "not built yet".into(),
        kernels_compiled: false,
        device_name: None,
        compute_capability: None,
    }
}

pub struct CudaBackend;
impl CudaBackend {
    pub fn new(_ordinal: usize) -> Result<Self> {
        Err(Error::CudaUnavailable("not built yet".into()))
    }
}
impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn describe(&self) -> String {
        "cuda".into()
    }
    fn nearest(&self, _: MatRef<'_>, _: MatRef<'_>, _: Metric) -> Result<Assignment> {
        unreachable!()
    }
    fn gather(&self, _: MatRef<'_>, _: &[u32]) -> Result<Matrix> {
        unreachable!()
    }
    fn code_sums(&self, _: MatRef<'_>, _: &[u32], _: usize, _: SumMode) -> Result<CodeSums> {
        unreachable!()
    }
    fn usage(&self, _: &[u32], _: usize) -> Result<Vec<u32>> {
        unreachable!()
    }
}
