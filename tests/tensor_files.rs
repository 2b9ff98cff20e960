//! The safetensors layer under both checkpoint kinds (`vqx fit`'s quantizer checkpoint and
//! `vqx train`'s): equal states give byte-for-byte equal files; files laid out by the
//! safetensors crate itself, metadata in any order (as vqx wrote them before), load exactly
//! the same; and a training checkpoint's errors name the file and the tensor.

use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;
use vqx::Error;
use vqx::backend::Device;
use vqx::checkpoint::Checkpoint;
use vqx::model::VqVaeConfig;
use vqx::quantizer::{CodebookLearning, QuantizerConfig};
use vqx::train::{self, DataSource, TrainConfig, Trainer};

fn train_config() -> TrainConfig {
    let data = DataSource::Synthetic {
        spec: "gmm:dim=8,components=6,std=0.1".parse().unwrap(),
        rows: 256,
        eval_rows: 64,
        seed: 3,
    };
    let q = QuantizerConfig::new(8, 4)
        .learning(CodebookLearning::ema(0.9))
        .device(Device::Cpu)
        .seed(4);
    let mut c = TrainConfig::new(VqVaeConfig::new(8, 4, vec![16]), q, data);
    c.model.layer_norm = true;
    c.steps = 10;
    c.batch_size = 32;
    c
}

/// A new dtype and shape for some tensors of a file (their data cut or zero-padded to fit).
type Change<'a> = dyn Fn(&str) -> Option<(Dtype, Vec<usize>)> + 'a;

/// What the safetensors crate writes for the tensors and metadata of `src` (its metadata
/// map in its own order): the previous writer's layout.
fn rewrite(src: &Path, dst: &Path, change: &Change<'_>) {
    let bytes = std::fs::read(src).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta: HashMap<String, String> = header.metadata().clone().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, v) in st.tensors() {
        let (dtype, shape) = change(&name).unwrap_or((v.dtype(), v.shape().to_vec()));
        let mut data = v.data().to_vec();
        data.resize(shape.iter().product::<usize>() * dtype.bitsize() / 8, 0);
        owned.push((name, dtype, shape, data));
    }
    let views: Vec<(&str, TensorView<'_>)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(dst, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

fn unchanged(_: &str) -> Option<(Dtype, Vec<usize>)> {
    None
}

#[test]
fn a_quantizer_checkpoint_saved_twice_is_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
        dir.path().join("c.safetensors"),
    );
    // a trained quantizer's state: codebook, EMA statistics, usage, step and configuration
    let mut t = Trainer::new(train_config()).unwrap();
    for _ in 0..3 {
        t.step().unwrap();
    }
    let ckpt = t.model.quantizer.to_checkpoint().unwrap();
    assert!(ckpt.cluster_size.is_some() && ckpt.usage_total.is_some() && ckpt.step == 3);
    ckpt.save(&a).unwrap();
    ckpt.save(&b).unwrap();
    let bytes = std::fs::read(&a).unwrap();
    assert_eq!(bytes, std::fs::read(&b).unwrap());
    assert_eq!(bytes, ckpt.to_bytes().unwrap());
    // loading and saving again changes nothing either
    Checkpoint::load(&a).unwrap().save(&c).unwrap();
    assert_eq!(bytes, std::fs::read(&c).unwrap());

    // the crate's own layout, metadata in its order, loads the same
    rewrite(&a, &c, &unchanged);
    assert_eq!(Checkpoint::load(&c).unwrap(), ckpt);
    assert_eq!(Checkpoint::load(&c).unwrap().to_bytes().unwrap(), bytes);
}

#[test]
fn a_training_checkpoint_saved_twice_is_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(format!("{n}.safetensors"));
    // before the first step (the quantizer not initialised yet) and after three
    for steps in [0, 3] {
        let mut t = Trainer::new(train_config()).unwrap();
        for _ in 0..steps {
            t.step().unwrap();
        }
        train::save_trainer(&mut t, &path("a")).unwrap();
        train::save_trainer(&mut t, &path("b")).unwrap();
        let bytes = std::fs::read(path("a")).unwrap();
        assert_eq!(
            bytes,
            std::fs::read(path("b")).unwrap(),
            "after {steps} steps"
        );

        let mut back = train::load_trainer(&path("a"), Device::Cpu).unwrap();
        train::save_trainer(&mut back, &path("c")).unwrap();
        assert_eq!(
            bytes,
            std::fs::read(path("c")).unwrap(),
            "after {steps} steps"
        );

        rewrite(&path("a"), &path("old"), &unchanged);
        let mut old = train::load_trainer(&path("old"), Device::Cpu).unwrap();
        assert_eq!(old.model.encoder, t.model.encoder);
        assert_eq!(old.optimizer, t.optimizer);
        train::save_trainer(&mut old, &path("d")).unwrap();
        assert_eq!(
            bytes,
            std::fs::read(path("d")).unwrap(),
            "after {steps} steps"
        );
    }
}

#[test]
fn training_checkpoint_errors_name_the_file_the_tensor_and_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    let bad = dir.path().join("bad.safetensors");
    let mut t = Trainer::new(train_config()).unwrap();
    t.step().unwrap();
    train::save_trainer(&mut t, &good).unwrap();
    let load_err = |change: &Change<'_>| {
        rewrite(&good, &bad, change);
        let e = train::load_model(&bad, Device::Cpu).unwrap_err();
        assert!(matches!(e, Error::Checkpoint { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("bad.safetensors"), "{msg}");
        msg
    };
    let w0 = "encoder.linears.0.weight";

    let msg = load_err(&|n| (n == w0).then(|| (Dtype::F32, vec![8, 16])));
    assert!(
        msg.contains(&format!("`{w0}` is 8×16; expected 16×8")),
        "{msg}"
    );

    let adam = format!("adam.v.{w0}");
    let msg = load_err(&|n| (n == adam).then(|| (Dtype::F64, vec![128])));
    assert!(
        msg.contains(&format!("`{adam}` has dtype F64; expected f32")),
        "{msg}"
    );

    let msg = load_err(&|n| (n == "quantizer.codebook").then(|| (Dtype::F32, vec![4, 4])));
    assert!(
        msg.contains("`quantizer.codebook` is 4×4 but the configuration") && msg.contains("8×4"),
        "{msg}"
    );

    // a tensor gone: renamed out of the way
    rewrite(&good, &bad, &unchanged);
    let bytes = std::fs::read(&bad).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
    // the same length, so every offset stays right
    let header = header.replacen("\"quantizer.usage.total\"", "\"quantizer.usage.tally\"", 1);
    let mut edited = bytes[..8].to_vec();
    edited.extend_from_slice(header.as_bytes());
    edited.extend_from_slice(&bytes[8 + header_len..]);
    std::fs::write(&bad, edited).unwrap();
    let msg = train::load_model(&bad, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("bad.safetensors")
            && msg.contains("without a `quantizer.usage.total` tensor")
            && msg.contains("(tensors: `adam.m."),
        "{msg}"
    );

    // not a file at all
    let e = train::load_model(&dir.path().join("none.safetensors"), Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("none.safetensors"), "{e}");
}
