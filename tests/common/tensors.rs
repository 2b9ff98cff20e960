//! Safetensors files: the vector-quantize-pytorch fixtures (`scripts/make_vqpytorch_fixtures.py`),
//! reading a file's tensors, writing one from raw tensors, and a vqx checkpoint with every part.

use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;
use vqx::Matrix;
use vqx::checkpoint::Checkpoint;

/// A vector-quantize-pytorch state dict (K = 32, D = 16) with an eval batch and its indices.
pub const VQPYTORCH_STATE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/vqpytorch_state.safetensors"
);
/// Three EMA training steps of vector-quantize-pytorch: the state before and after each, the
/// batches, indices, outputs, losses and gradients.
pub const VQPYTORCH_EMA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/vqpytorch_ema.safetensors"
);
/// Five cosine (`use_cosine_sim=True`) EMA training steps of vector-quantize-pytorch, laid out
/// as [`VQPYTORCH_EMA`] (no eval keys).
pub const VQPYTORCH_COSINE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/vqpytorch_cosine.safetensors"
);

/// A safetensors file read whole; its tensors by name, a missing one or another dtype failing
/// the test with the name.
pub struct Tensors {
    bytes: Vec<u8>,
}

impl Tensors {
    pub fn read(path: impl AsRef<Path>) -> Self {
        let path = path.as_ref();
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        SafeTensors::deserialize(&bytes).expect("a safetensors file");
        Tensors { bytes }
    }

    fn view(&self, key: &str, dtype: Dtype) -> (Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(key)
            .unwrap_or_else(|e| panic!("tensor {key}: {e}"));
        assert_eq!(t.dtype(), dtype, "{key}");
        (t.shape().to_vec(), t.data().to_vec())
    }

    pub fn shape(&self, key: &str) -> Vec<usize> {
        self.view(key, Dtype::F32).0
    }

    pub fn f32s(&self, key: &str) -> Vec<f32> {
        let (_, data) = self.view(key, Dtype::F32);
        data.chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    pub fn i64s(&self, key: &str) -> Vec<i64> {
        let (_, data) = self.view(key, Dtype::I64);
        data.chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

/// Raw little-endian bytes of f32 values.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A tensor to write: name, dtype, shape, bytes.
pub type Tensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// An f32 tensor to write.
pub fn t32(name: &str, shape: &[usize], v: &[f32]) -> Tensor {
    (name.into(), Dtype::F32, shape.to_vec(), f32_bytes(v))
}

/// Writes `tensors` and `metadata` (none when empty) as a safetensors file.
pub fn write_st(path: &Path, tensors: &[Tensor], metadata: &[(&str, &str)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let bytes =
        safetensors::serialize(views, if meta.is_empty() { None } else { Some(meta) }).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// The metadata of a vqx checkpoint at step 7.
pub const VQX_META: [(&str, &str); 4] = [
    ("format", "vqx-checkpoint"),
    ("version", "1"),
    ("step", "7"),
    ("config", "{}"),
];

/// sin(0.37·i)·scale for i in 0..n: varied values, the same on every run.
pub fn seq(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37).sin() * scale).collect()
}

/// A 6 × 4 checkpoint with every part: EMA state (with dead codes), usage counts beyond f32's
/// integers, step 12,345 and a nested config.
pub fn sample() -> Checkpoint {
    let (k, d) = (6, 4);
    Checkpoint {
        codebook: Matrix::new(seq(k * d, 1.0), k, d).unwrap(),
        cluster_size: Some(vec![1.0, 0.5, 0.0, 3.25, 1e-7, 2.0]),
        embed_avg: Some(Matrix::new(seq(k * d, 0.5), k, d).unwrap()),
        usage_total: Some(vec![10.0, 0.0, 3.0, 9_007_199_254_740_992.0, 1.0, 2.0]),
        step: 12_345,
        config: serde_json::json!({"decay": 0.99, "eps": 1e-5, "nested": {"metric": "l2", "k": [6, 4]}}),
    }
}

/// Saves [`sample`] at `path` and returns it.
pub fn save_sample(path: &Path) -> Checkpoint {
    let c = sample();
    c.save(path).unwrap();
    c
}
