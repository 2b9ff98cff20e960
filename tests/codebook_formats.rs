//! `load_codebook` on every format a user may bring (.npy, vqx checkpoints, vector-quantize-pytorch
//! state dicts including the fixtures of `scripts/make_vqpytorch_fixtures.py`, ESM3 VQ-VAEs), its
//! errors on unknown, ambiguous and unsupported files, and `vqx quantize --codebook` reproducing
//! vector-quantize-pytorch's indices from them.

mod common;
use common::assert_mentions;
use common::cli::{arg, ok, vqx};
use common::tensors::{
    Tensor, Tensors, VQPYTORCH_EMA, VQPYTORCH_STATE, VQX_META, f32_bytes, save_sample, seq, t32,
    write_st,
};
use safetensors::tensor::Dtype;
use std::path::Path;
use vqx::Matrix;
use vqx::checkpoint::{CodebookFormat, load_codebook};

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Writes `tensors` as `name` in `d` and returns what `load_codebook` says about it.
fn load_error(d: &Path, name: &str, tensors: &[Tensor]) -> String {
    let p = d.join(name);
    write_st(&p, tensors, &[]);
    load_codebook(&p).unwrap_err().to_string()
}
#[test]
fn load_codebook_npy_by_extension_and_by_header() {
    let d = dir();
    let m = Matrix::new(seq(12, 1.0), 4, 3).unwrap();
    let p = d.path().join("c.npy");
    vqx::npy::write_matrix(&p, m.as_ref()).unwrap();
    let l = load_codebook(&p).unwrap();
    assert_eq!((l.format, &l.codebook), (CodebookFormat::Npy, &m));
    assert!(l.keys.is_empty() && l.cluster_size.is_none() && l.step.is_none());

    let renamed = d.path().join("codebook.bin");
    std::fs::copy(&p, &renamed).unwrap();
    assert_eq!(load_codebook(&renamed).unwrap().codebook, m);
}

#[test]
fn load_codebook_vqx_checkpoint() {
    let d = dir();
    let p = d.path().join("run.ckpt");
    let c = save_sample(&p);
    let l = load_codebook(&p).unwrap();
    assert_eq!(l.format, CodebookFormat::VqxCheckpoint);
    assert_eq!(l.codebook, c.codebook);
    assert_eq!(l.cluster_size, c.cluster_size);
    assert_eq!(l.embed_avg, c.embed_avg);
    assert_eq!(l.usage_total, c.usage_total);
    assert_eq!(l.step, Some(12_345));
    assert_eq!(
        l.keys,
        [
            "codebook",
            "ema.cluster_size",
            "ema.embed_avg",
            "usage.total"
        ]
    );
    // A broken vqx checkpoint is reported as such, not as an unknown format.
    let bad = d.path().join("bad.safetensors");
    write_st(&bad, &[t32("codebook", &[2], &[1.0, 2.0])], &VQX_META);
    assert_mentions(
        &load_codebook(&bad).unwrap_err().to_string(),
        &["expected K×D"],
    );
}

#[test]
fn load_codebook_vqpytorch_fixture() {
    let st = Tensors::read(VQPYTORCH_STATE);
    let embed = st.f32s("_codebook.embed");
    assert_eq!(st.shape("_codebook.embed"), [1, 32, 16]);
    let l = load_codebook(VQPYTORCH_STATE).unwrap();
    assert_eq!(l.format, CodebookFormat::VqPytorch);
    assert_eq!((l.k(), l.d()), (32, 16));
    assert_eq!(l.codebook.data(), &embed[..]);
    assert_eq!(
        l.cluster_size.as_deref(),
        Some(&st.f32s("_codebook.cluster_size")[..])
    );
    assert_eq!(
        l.embed_avg.as_ref().unwrap().data(),
        &st.f32s("_codebook.embed_avg")[..]
    );
    assert_eq!(l.initted, Some(true));
    assert_eq!(l.prefix, "");
    assert_eq!(
        l.keys,
        [
            "_codebook.embed",
            "_codebook.cluster_size",
            "_codebook.embed_avg",
            "_codebook.initted"
        ]
    );
    assert!(l.describe().contains("vector-quantize-pytorch"));
    assert!(!l.rows_unit_norm());
    // The training fixture's last state is the state file's.
    let ema = Tensors::read(VQPYTORCH_EMA);
    assert_eq!(ema.f32s("after.2._codebook.embed"), embed);
}

/// Rewrites the fixture's `_codebook.*` tensors under `prefix`, as `dtype`.
fn vq_variant(path: &Path, prefix: &str, dtype: Dtype, extra: &[Tensor]) {
    let st = Tensors::read(VQPYTORCH_STATE);
    let conv = |v: &[f32]| -> Vec<u8> {
        match dtype {
            Dtype::F32 => f32_bytes(v),
            Dtype::F16 => v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            Dtype::BF16 => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            Dtype::F64 => v.iter().flat_map(|x| f64::from(*x).to_le_bytes()).collect(),
            _ => unreachable!(),
        }
    };
    let mut tensors: Vec<Tensor> = [
        "_codebook.embed",
        "_codebook.cluster_size",
        "_codebook.embed_avg",
    ]
    .iter()
    .map(|k| {
        (
            format!("{prefix}{k}"),
            dtype,
            st.shape(k),
            conv(&st.f32s(k)),
        )
    })
    .collect();
    // initted as older versions stored it: a float of shape (1,)
    tensors.push(t32(&format!("{prefix}_codebook.initted"), &[1], &[1.0]));
    tensors.extend_from_slice(extra);
    write_st(path, &tensors, &[]);
}

#[test]
fn load_codebook_vqpytorch_prefixes_and_dtypes() {
    let d = dir();
    let embed = Tensors::read(VQPYTORCH_STATE).f32s("_codebook.embed");
    for (prefix, dtype) in [
        ("vq.", Dtype::F32),
        ("quantizer.", Dtype::F16),
        ("model.encoder.vq.", Dtype::BF16),
        ("", Dtype::F64),
    ] {
        let p = d.path().join("v.safetensors");
        let other = t32("decoder.weight", &[2, 2], &[0.0; 4]);
        vq_variant(&p, prefix, dtype, &[other]);
        let l = load_codebook(&p).unwrap();
        assert_eq!(l.format, CodebookFormat::VqPytorch);
        assert_eq!(l.prefix, prefix);
        assert_eq!(l.keys[0], format!("{prefix}_codebook.embed"));
        assert_eq!(l.initted, Some(true));
        let want: Vec<f32> = embed
            .iter()
            .map(|&x| match dtype {
                Dtype::F16 => half::f16::from_f32(x).to_f32(),
                Dtype::BF16 => half::bf16::from_f32(x).to_f32(),
                _ => x,
            })
            .collect();
        assert_eq!(l.codebook.data(), &want[..], "{prefix} {dtype:?}");
    }
}

#[test]
fn load_codebook_vqpytorch_unsupported_layouts() {
    let d = dir();
    // separate codebooks per head
    let heads = [
        t32("vq._codebook.embed", &[4, 8, 3], &seq(96, 1.0)),
        t32("vq._codebook.cluster_size", &[4, 8], &[1.0; 32]),
    ];
    assert_mentions(
        &load_error(d.path(), "heads.safetensors", &heads),
        &["4×8×3", "4 separate codebooks", "not supported yet"],
    );
    // project_in / project_out
    let p = d.path().join("proj.safetensors");
    let projection = [
        t32("vq.project_in.weight", &[16, 32], &[0.0; 512]),
        t32("vq.project_in.bias", &[16], &[0.0; 16]),
    ];
    vq_variant(&p, "vq.", Dtype::F32, &projection);
    assert_mentions(
        &load_codebook(&p).unwrap_err().to_string(),
        &[
            "`vq.project_in.weight`",
            "codebook_dim ≠ dim",
            "not supported",
        ],
    );
    // cluster_size of the wrong length
    let short_counts = [
        t32("_codebook.embed", &[1, 8, 3], &seq(24, 1.0)),
        t32("_codebook.cluster_size", &[1, 7], &[1.0; 7]),
    ];
    assert_mentions(
        &load_error(d.path(), "cs.safetensors", &short_counts),
        &["`_codebook.cluster_size` is 1×7", "expected 1×8"],
    );
    // not initialised: loads, and says so
    let p = d.path().join("noinit.safetensors");
    let not_initialised = [
        t32("_codebook.embed", &[1, 8, 3], &[0.0; 24]),
        ("_codebook.initted".into(), Dtype::BOOL, vec![], vec![0]),
    ];
    write_st(&p, &not_initialised, &[]);
    assert_eq!(load_codebook(&p).unwrap().initted, Some(false));
}

#[test]
fn load_codebook_esm3_with_prefix() {
    let d = dir();
    let p = d.path().join("vqvae.safetensors");
    let (k, dd) = (8, 5);
    let n: Vec<f32> = (0..k).map(|i| i as f32 * 0.5).collect();
    write_st(
        &p,
        &[
            t32("encoder.codebook.embeddings", &[k, dd], &seq(k * dd, 1.0)),
            t32("encoder.codebook.N", &[k], &n),
            t32("encoder.codebook.z_avg", &[k, dd], &seq(k * dd, 0.25)),
            t32("encoder.embed.weight", &[3, 2], &[0.0; 6]),
            t32("decoder.embeddings", &[3, 2], &[0.0; 6]), // an `embeddings` without `N`
        ],
        &[],
    );
    let l = load_codebook(&p).unwrap();
    assert_eq!(l.format, CodebookFormat::Esm3);
    assert_eq!(l.prefix, "encoder.codebook.");
    assert_eq!(l.codebook.data(), &seq(k * dd, 1.0)[..]);
    assert_eq!(l.cluster_size.as_deref(), Some(&n[..]));
    assert_eq!(l.embed_avg.unwrap().data(), &seq(k * dd, 0.25)[..]);
    assert_eq!(
        l.keys,
        [
            "encoder.codebook.embeddings",
            "encoder.codebook.N",
            "encoder.codebook.z_avg"
        ]
    );

    let long_counts = [
        t32("embeddings", &[k, dd], &seq(k * dd, 1.0)),
        t32("N", &[k + 1], &[1.0; 9]),
    ];
    assert_mentions(
        &load_error(d.path(), "esm_bad.safetensors", &long_counts),
        &["`N` is 9 but `embeddings` is 8×5"],
    );
}

#[test]
fn load_codebook_unknown_and_ambiguous_files() {
    let d = dir();
    let unknown = [
        t32("encoder.layer.0.weight", &[2, 2], &[0.0; 4]),
        t32("codes", &[4, 2], &[0.0; 8]),
    ];
    assert_mentions(
        &load_error(d.path(), "weights.safetensors", &unknown),
        &[
            "weights.safetensors",
            "no known codebook format",
            "`codes`",
            "`encoder.layer.0.weight`",
            "_codebook.embed",
            "embeddings",
            "vqx-checkpoint",
        ],
    );

    let two = [
        t32("a._codebook.embed", &[1, 4, 2], &[0.0; 8]),
        t32("b._codebook.embed", &[1, 4, 2], &[0.0; 8]),
    ];
    assert_mentions(
        &load_error(d.path(), "two.safetensors", &two),
        &["2 codebooks", "`a._codebook.embed`", "`b._codebook.embed`"],
    );
}

#[test]
fn cli_quantize_with_the_vqpytorch_state_reproduces_its_indices() {
    let d = dir();
    let x = Tensors::read(VQPYTORCH_STATE).f32s("eval.x");
    let xp = d.path().join("x.npy");
    vqx::npy::write_matrix(&xp, Matrix::new(x, 40, 16).unwrap().as_ref()).unwrap();
    let op = d.path().join("i.npy");
    let o = vqx(&[
        "quantize",
        "--codebook",
        VQPYTORCH_STATE,
        "--input",
        &arg(&xp),
        "--output",
        &arg(&op),
        "--device",
        "cpu",
    ]);
    let (_, err) = ok(&o);
    assert!(
        err.contains("vector-quantize-pytorch") && err.contains("_codebook.embed"),
        "stderr names the format and keys: {err}"
    );
    let got = vqx::npy::read_indices(&op).unwrap();
    assert_eq!(got, Tensors::read(VQPYTORCH_STATE).i64s("eval.indices"));
}

#[test]
fn cli_quantize_reproduces_every_training_steps_indices() {
    // The indices vq-pytorch returned at step i come from the codebook before step i.
    let d = dir();
    let ema = Tensors::read(VQPYTORCH_EMA);
    for i in 0..3 {
        let before = if i == 0 {
            "before.".to_string()
        } else {
            format!("after.{}.", i - 1)
        };
        let cb = Matrix::new(ema.f32s(&format!("{before}_codebook.embed")), 32, 16).unwrap();
        let x = Matrix::new(ema.f32s(&format!("batch.{i}")), 64, 16).unwrap();
        let (cp, xp, op) = (
            d.path().join("c.npy"),
            d.path().join("x.npy"),
            d.path().join("o.npy"),
        );
        vqx::npy::write_matrix(&cp, cb.as_ref()).unwrap();
        vqx::npy::write_matrix(&xp, x.as_ref()).unwrap();
        ok(&vqx(&[
            "quantize",
            "-c",
            &arg(&cp),
            "-i",
            &arg(&xp),
            "-o",
            &arg(&op),
            "--device",
            "cpu",
        ]));
        assert_eq!(
            vqx::npy::read_indices(&op).unwrap(),
            ema.i64s(&format!("indices.{i}")),
            "step {i}"
        );
    }
}
