//! vqx checkpoints (round trip, atomic writes, load errors), `load_codebook` on every accepted
//! format (including the vector-quantize-pytorch fixtures from `scripts/make_vqpytorch_fixtures.py`),
//! `CountDistribution`, and the `vqx quantize --codebook` / `vqx stats` commands on them.

use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use vqx::checkpoint::{Checkpoint, CodebookFormat, load_codebook};
use vqx::usage::{CountDistribution, perplexity};
use vqx::{Error, Matrix};

const STATE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/vqpytorch_state.safetensors"
);
const EMA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/vqpytorch_ema.safetensors"
);

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn seq(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37).sin() * scale).collect()
}

fn sample() -> Checkpoint {
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

/// Raw little-endian bytes of f32 values.
fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A tensor to write: name, dtype, shape, bytes.
type T = (String, Dtype, Vec<usize>, Vec<u8>);

fn t32(name: &str, shape: &[usize], v: &[f32]) -> T {
    (name.into(), Dtype::F32, shape.to_vec(), f32_bytes(v))
}

fn write_st(path: &Path, tensors: &[T], metadata: &[(&str, &str)]) {
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

const VQX_META: [(&str, &str); 4] = [
    ("format", "vqx-checkpoint"),
    ("version", "1"),
    ("step", "7"),
    ("config", "{}"),
];

/// Every tensor of a safetensors file as (dtype, shape, f32 values) — floats only.
fn read_floats(path: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .filter(|(_, v)| v.dtype() == Dtype::F32)
        .map(|(n, v)| {
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n.to_string(), (v.shape().to_vec(), vals))
        })
        .collect()
}

fn read_i64(path: &str, name: &str) -> Vec<i64> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(name).unwrap();
    assert_eq!(v.dtype(), Dtype::I64);
    v.data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn err_text(e: Error) -> String {
    e.to_string()
}

fn assert_mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "message lacks {n:?}: {msg}");
    }
}

fn no_temp_files(dir: &Path) {
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".vqx-tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

// ---------------------------------------------------------------------------------------------
// Round trip and the file layout

#[test]
fn round_trip_full_and_minimal() {
    let d = dir();
    let p = d.path().join("full.safetensors");
    let ckpt = sample();
    ckpt.save(&p).unwrap();
    assert_eq!(Checkpoint::load(&p).unwrap(), ckpt);

    let minimal = Checkpoint::new(Matrix::new(seq(8, 2.0), 4, 2).unwrap());
    let q = d.path().join("min.safetensors");
    minimal.save(&q).unwrap();
    let back = Checkpoint::load(&q).unwrap();
    assert_eq!(back, minimal);
    assert!(back.cluster_size.is_none() && back.embed_avg.is_none() && back.usage_total.is_none());
    assert_eq!(back.config, serde_json::Value::Null);

    // overwrite in place
    ckpt.save(&q).unwrap();
    assert_eq!(Checkpoint::load(&q).unwrap(), ckpt);
    no_temp_files(d.path());
}

#[test]
fn file_layout_is_the_documented_one() {
    let d = dir();
    let p = d.path().join("c.safetensors");
    sample().save(&p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let md = meta.metadata().clone().unwrap();
    assert_eq!(md["format"], "vqx-checkpoint");
    assert_eq!(md["version"], "1");
    assert_eq!(md["step"], "12345");
    let config: serde_json::Value = serde_json::from_str(&md["config"]).unwrap();
    assert_eq!(config["nested"]["k"][1], 4);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let shape_dtype = |n: &str| {
        let v = st.tensor(n).unwrap();
        (v.shape().to_vec(), v.dtype())
    };
    assert_eq!(shape_dtype("codebook"), (vec![6, 4], Dtype::F32));
    assert_eq!(shape_dtype("ema.cluster_size"), (vec![6], Dtype::F32));
    assert_eq!(shape_dtype("ema.embed_avg"), (vec![6, 4], Dtype::F32));
    assert_eq!(shape_dtype("usage.total"), (vec![6], Dtype::F64));
}

#[test]
fn usage_total_accepts_integer_dtypes() {
    let d = dir();
    let p = d.path().join("u.safetensors");
    let counts: Vec<u8> = [5u64, 0, 1 << 40]
        .iter()
        .flat_map(|c| c.to_le_bytes())
        .collect();
    write_st(
        &p,
        &[
            t32("codebook", &[3, 2], &seq(6, 1.0)),
            ("usage.total".into(), Dtype::U64, vec![3], counts),
        ],
        &VQX_META,
    );
    let c = Checkpoint::load(&p).unwrap();
    assert_eq!(c.usage_total, Some(vec![5.0, 0.0, (1u64 << 40) as f64]));
    assert_eq!(c.step, 7);
}

// ---------------------------------------------------------------------------------------------
// Atomic writes

#[test]
fn save_onto_a_directory_fails_and_leaves_nothing() {
    let d = dir();
    let target = d.path().join("ckpt.safetensors");
    std::fs::create_dir(&target).unwrap();
    let e = sample().save(&target).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert_mentions(&err_text(e), &["ckpt.safetensors"]);
    assert!(target.is_dir(), "the directory in the way is untouched");
    no_temp_files(d.path());
}

#[test]
fn save_into_a_missing_directory_fails() {
    let d = dir();
    let target = d.path().join("no/such/dir/c.safetensors");
    assert!(matches!(
        sample().save(&target).unwrap_err(),
        Error::Io { .. }
    ));
    assert!(!target.exists());
}

#[test]
fn invalid_checkpoint_writes_nothing_and_keeps_the_old_file() {
    let d = dir();
    let p = d.path().join("c.safetensors");
    let good = sample();
    good.save(&p).unwrap();
    let before = std::fs::read(&p).unwrap();

    let mut bad = sample();
    bad.embed_avg = Some(Matrix::zeros(6, 3));
    let e = bad.save(&p).unwrap_err();
    assert_mentions(&err_text(e), &["ema.embed_avg", "6×4", "6×3"]);
    assert_eq!(std::fs::read(&p).unwrap(), before);
    assert_eq!(Checkpoint::load(&p).unwrap(), good);
    no_temp_files(d.path());

    let fresh = d.path().join("fresh.safetensors");
    assert!(bad.save(&fresh).is_err());
    assert!(!fresh.exists());
}

#[cfg(unix)]
#[test]
fn read_only_directory_keeps_the_old_file() {
    use std::os::unix::fs::PermissionsExt;
    let d = dir();
    let sub = d.path().join("ro");
    std::fs::create_dir(&sub).unwrap();
    let p = sub.join("c.safetensors");
    let good = sample();
    good.save(&p).unwrap();
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o555)).unwrap();
    // root ignores directory permissions: then there is nothing to test here.
    let probe = sub.join("probe");
    if std::fs::write(&probe, b"x").is_ok() {
        let _ = std::fs::remove_file(&probe);
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).unwrap();
        eprintln!("skipped: read_only_directory_keeps_the_old_file: running as root");
        return;
    }
    let mut other = sample();
    other.step = 99;
    let e = other.save(&p);
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(matches!(e, Err(Error::Io { .. })));
    assert_eq!(Checkpoint::load(&p).unwrap(), good);
    no_temp_files(&sub);
}

#[test]
fn save_validates() {
    let mut c = sample();
    c.cluster_size = Some(vec![1.0; 5]);
    assert_mentions(
        &err_text(c.validate().unwrap_err()),
        &["ema.cluster_size", "6 values", "5 values"],
    );

    let mut c = sample();
    c.embed_avg = None;
    assert_mentions(&err_text(c.validate().unwrap_err()), &["go together"]);

    let mut c = sample();
    c.codebook.data_mut()[5] = f32::NAN;
    assert_mentions(
        &err_text(c.validate().unwrap_err()),
        &["codebook", "row 1", "column 1"],
    );

    let mut c = sample();
    c.cluster_size.as_mut().unwrap()[2] = -1.0;
    assert_mentions(
        &err_text(c.validate().unwrap_err()),
        &["code 2", "non-negative"],
    );

    let mut c = sample();
    c.usage_total = Some(vec![1.0]);
    assert_mentions(&err_text(c.validate().unwrap_err()), &["usage.total"]);

    let c = Checkpoint::new(Matrix::zeros(0, 4));
    assert!(matches!(c.validate().unwrap_err(), Error::Empty { .. }));
}

// ---------------------------------------------------------------------------------------------
// Load errors

fn load_err(tensors: &[T], meta: &[(&str, &str)]) -> String {
    let d = dir();
    let p = d.path().join("bad.safetensors");
    write_st(&p, tensors, meta);
    let e = Checkpoint::load(&p).unwrap_err();
    assert!(matches!(e, Error::Checkpoint { .. }), "{e:?}");
    let msg = err_text(e);
    assert_mentions(&msg, &["bad.safetensors"]);
    msg
}

#[test]
fn load_says_which_shape_is_wrong() {
    let cb = t32("codebook", &[4, 3], &seq(12, 1.0));
    let msg = load_err(
        &[
            cb.clone(),
            t32("ema.cluster_size", &[4], &[1.0; 4]),
            t32("ema.embed_avg", &[4, 2], &seq(8, 1.0)),
        ],
        &VQX_META,
    );
    assert_mentions(&msg, &["ema.embed_avg is 4×2 but codebook is 4×3"]);

    let msg = load_err(
        &[
            cb.clone(),
            t32("ema.cluster_size", &[5], &[1.0; 5]),
            t32("ema.embed_avg", &[4, 3], &seq(12, 1.0)),
        ],
        &VQX_META,
    );
    assert_mentions(
        &msg,
        &["ema.cluster_size is 5 but the codebook has 4 codes"],
    );

    let msg = load_err(
        &[cb.clone(), t32("ema.cluster_size", &[4], &[1.0; 4])],
        &VQX_META,
    );
    assert_mentions(&msg, &["has ema.cluster_size but not ema.embed_avg"]);

    let msg = load_err(&[t32("codebook", &[12], &seq(12, 1.0))], &VQX_META);
    assert_mentions(&msg, &["`codebook` is 12; expected K×D"]);

    let msg = load_err(
        &[cb.clone(), t32("usage.total", &[3], &[1.0; 3])],
        &VQX_META,
    );
    assert_mentions(&msg, &["usage.total is 3 but the codebook has 4 codes"]);
}

#[test]
fn load_says_what_is_missing_or_unreadable() {
    let msg = load_err(&[t32("weights", &[4, 3], &seq(12, 1.0))], &VQX_META);
    assert_mentions(&msg, &["without a `codebook` tensor", "`weights`"]);

    let cb = t32("codebook", &[4, 3], &seq(12, 1.0));
    let msg = load_err(std::slice::from_ref(&cb), &[]);
    assert_mentions(&msg, &["no `format` metadata", "`codebook`"]);

    let msg = load_err(
        std::slice::from_ref(&cb),
        &[
            ("format", "vqx-checkpoint"),
            ("version", "2"),
            ("step", "1"),
        ],
    );
    assert_mentions(&msg, &["version \"2\"", "reads version \"1\""]);

    let msg = load_err(
        std::slice::from_ref(&cb),
        &[
            ("format", "vqx-checkpoint"),
            ("version", "1"),
            ("step", "-3"),
        ],
    );
    assert_mentions(&msg, &["step is \"-3\""]);

    let msg = load_err(
        std::slice::from_ref(&cb),
        &[
            ("format", "vqx-checkpoint"),
            ("version", "1"),
            ("step", "1"),
            ("config", "{oops"),
        ],
    );
    assert_mentions(&msg, &["config is not valid JSON"]);

    let ints: Vec<u8> = (0..12i32).flat_map(|v| v.to_le_bytes()).collect();
    let msg = load_err(
        &[("codebook".into(), Dtype::I32, vec![4, 3], ints)],
        &VQX_META,
    );
    assert_mentions(&msg, &["`codebook` has dtype I32", "f32, f16, bf16 or f64"]);

    let mut nan = seq(12, 1.0);
    nan[7] = f32::INFINITY;
    let d = dir();
    let p = d.path().join("nan.safetensors");
    write_st(&p, &[t32("codebook", &[4, 3], &nan)], &VQX_META);
    let e = Checkpoint::load(&p).unwrap_err();
    assert!(matches!(e, Error::NonFinite { row: 2, col: 1, .. }), "{e}");
}

#[test]
fn truncated_and_foreign_files_are_clear_errors() {
    let d = dir();
    let good = d.path().join("good.safetensors");
    sample().save(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    for cut in [3, 8, 20, bytes.len() / 2, bytes.len() - 1] {
        let p = d.path().join(format!("cut{cut}.safetensors"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        for msg in [
            err_text(Checkpoint::load(&p).unwrap_err()),
            err_text(load_codebook(&p).unwrap_err()),
        ] {
            assert_mentions(&msg, &[&format!("cut{cut}.safetensors"), "not a"]);
            assert!(msg.contains("safetensors file"), "{msg}");
        }
    }

    let text = d.path().join("notes.safetensors");
    std::fs::write(&text, "these are not the tensors you are looking for").unwrap();
    assert_mentions(
        &err_text(Checkpoint::load(&text).unwrap_err()),
        &["not a valid safetensors file"],
    );

    let zip = d.path().join("model.pt");
    std::fs::write(&zip, b"PK\x03\x04 and the rest of a torch.save archive").unwrap();
    assert_mentions(
        &err_text(load_codebook(&zip).unwrap_err()),
        &["PyTorch pickle", "safetensors.torch.save_file"],
    );

    let npy = d.path().join("c.npy");
    vqx::npy::write_matrix(&npy, Matrix::zeros(2, 2).as_ref()).unwrap();
    assert_mentions(
        &err_text(Checkpoint::load(&npy).unwrap_err()),
        &["is a .npy file"],
    );

    let missing = d.path().join("missing.safetensors");
    assert!(matches!(
        load_codebook(&missing).unwrap_err(),
        Error::Io { .. }
    ));
}

// ---------------------------------------------------------------------------------------------
// load_codebook on every format

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
    let c = sample();
    c.save(&p).unwrap();
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
        &err_text(load_codebook(&bad).unwrap_err()),
        &["expected K×D"],
    );
}

#[test]
fn load_codebook_vqpytorch_fixture() {
    let st = read_floats(STATE);
    let (shape, embed) = &st["_codebook.embed"];
    assert_eq!(shape, &[1, 32, 16]);
    let l = load_codebook(STATE).unwrap();
    assert_eq!(l.format, CodebookFormat::VqPytorch);
    assert_eq!((l.k(), l.d()), (32, 16));
    assert_eq!(l.codebook.data(), &embed[..]);
    assert_eq!(
        l.cluster_size.as_deref(),
        Some(&st["_codebook.cluster_size"].1[..])
    );
    assert_eq!(
        l.embed_avg.as_ref().unwrap().data(),
        &st["_codebook.embed_avg"].1[..]
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
    let ema = read_floats(EMA);
    assert_eq!(ema["after.2._codebook.embed"].1, *embed);
}

/// Rewrites the fixture's `_codebook.*` tensors under `prefix`, as `dtype`.
fn vq_variant(path: &Path, prefix: &str, dtype: Dtype, extra: &[T]) {
    let st = read_floats(STATE);
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
    let mut tensors: Vec<T> = [
        "_codebook.embed",
        "_codebook.cluster_size",
        "_codebook.embed_avg",
    ]
    .iter()
    .map(|k| {
        let (shape, v) = &st[*k];
        (format!("{prefix}{k}"), dtype, shape.clone(), conv(v))
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
    let embed = read_floats(STATE)["_codebook.embed"].1.clone();
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
    let p = d.path().join("heads.safetensors");
    write_st(
        &p,
        &[
            t32("vq._codebook.embed", &[4, 8, 3], &seq(96, 1.0)),
            t32("vq._codebook.cluster_size", &[4, 8], &[1.0; 32]),
        ],
        &[],
    );
    assert_mentions(
        &err_text(load_codebook(&p).unwrap_err()),
        &["4×8×3", "4 separate codebooks", "not supported yet"],
    );
    // project_in / project_out
    let p = d.path().join("proj.safetensors");
    vq_variant(
        &p,
        "vq.",
        Dtype::F32,
        &[
            t32("vq.project_in.weight", &[16, 32], &[0.0; 512]),
            t32("vq.project_in.bias", &[16], &[0.0; 16]),
        ],
    );
    assert_mentions(
        &err_text(load_codebook(&p).unwrap_err()),
        &[
            "`vq.project_in.weight`",
            "codebook_dim ≠ dim",
            "not supported",
        ],
    );
    // cluster_size of the wrong length
    let p = d.path().join("cs.safetensors");
    write_st(
        &p,
        &[
            t32("_codebook.embed", &[1, 8, 3], &seq(24, 1.0)),
            t32("_codebook.cluster_size", &[1, 7], &[1.0; 7]),
        ],
        &[],
    );
    assert_mentions(
        &err_text(load_codebook(&p).unwrap_err()),
        &["`_codebook.cluster_size` is 1×7", "expected 1×8"],
    );
    // not initialised: loads, and says so
    let p = d.path().join("noinit.safetensors");
    write_st(
        &p,
        &[
            t32("_codebook.embed", &[1, 8, 3], &[0.0; 24]),
            ("_codebook.initted".into(), Dtype::BOOL, vec![], vec![0]),
        ],
        &[],
    );
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

    let p = d.path().join("esm_bad.safetensors");
    write_st(
        &p,
        &[
            t32("embeddings", &[k, dd], &seq(k * dd, 1.0)),
            t32("N", &[k + 1], &[1.0; 9]),
        ],
        &[],
    );
    assert_mentions(
        &err_text(load_codebook(&p).unwrap_err()),
        &["`N` is 9 but `embeddings` is 8×5"],
    );
}

#[test]
fn load_codebook_unknown_and_ambiguous_files() {
    let d = dir();
    let p = d.path().join("weights.safetensors");
    write_st(
        &p,
        &[
            t32("encoder.layer.0.weight", &[2, 2], &[0.0; 4]),
            t32("codes", &[4, 2], &[0.0; 8]),
        ],
        &[],
    );
    let msg = err_text(load_codebook(&p).unwrap_err());
    assert_mentions(
        &msg,
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

    let p = d.path().join("two.safetensors");
    write_st(
        &p,
        &[
            t32("a._codebook.embed", &[1, 4, 2], &[0.0; 8]),
            t32("b._codebook.embed", &[1, 4, 2], &[0.0; 8]),
        ],
        &[],
    );
    assert_mentions(
        &err_text(load_codebook(&p).unwrap_err()),
        &["2 codebooks", "`a._codebook.embed`", "`b._codebook.embed`"],
    );
}

// ---------------------------------------------------------------------------------------------
// CountDistribution

#[test]
fn count_distribution() {
    let d = CountDistribution::from_values(&[3.0f64, 1.0, 2.0]).unwrap();
    assert_eq!((d.mean, d.min, d.median, d.max), (2.0, 1.0, 2.0, 3.0));
    assert!(
        (d.std - (2.0f64 / 3.0).sqrt()).abs() < 1e-15,
        "population std"
    );
    let d = CountDistribution::from_values(&[0.0005f32, 48.0, 48.5, 3376.0]).unwrap();
    assert_eq!(d.median, 48.25);
    assert_eq!(d.min, f64::from(0.0005f32));
    assert!(CountDistribution::from_values::<f32>(&[]).is_err());
    assert!(matches!(
        CountDistribution::from_values(&[1.0f32, f32::NAN]).unwrap_err(),
        Error::NonFinite { row: 1, .. }
    ));
    assert!((perplexity(&[1.0f32; 8]) - 8.0).abs() < 1e-6);
    assert_eq!(perplexity(&[0.0f64; 3]), 1.0);
}

// ---------------------------------------------------------------------------------------------
// The CLI

fn vqx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vqx"))
        .args(args)
        .output()
        .expect("run vqx")
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn ok(o: &Output) -> (String, String) {
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(
        o.status.success(),
        "exit {:?}; stderr: {err}",
        o.status.code()
    );
    (out, err)
}

#[test]
fn cli_quantize_with_the_vqpytorch_state_reproduces_its_indices() {
    let d = dir();
    let x = read_floats(STATE)["eval.x"].1.clone();
    let xp = d.path().join("x.npy");
    vqx::npy::write_matrix(&xp, Matrix::new(x, 40, 16).unwrap().as_ref()).unwrap();
    let op: PathBuf = d.path().join("i.npy");
    let o = vqx(&[
        "quantize",
        "--codebook",
        STATE,
        "--input",
        &s(&xp),
        "--output",
        &s(&op),
        "--device",
        "cpu",
    ]);
    let (_, err) = ok(&o);
    assert!(
        err.contains("vector-quantize-pytorch") && err.contains("_codebook.embed"),
        "stderr names the format and keys: {err}"
    );
    let got = vqx::npy::read_indices(&op).unwrap();
    assert_eq!(got, read_i64(STATE, "eval.indices"));
}

#[test]
fn cli_quantize_reproduces_every_training_steps_indices() {
    // The indices vq-pytorch returned at step i come from the codebook before step i.
    let d = dir();
    let ema = read_floats(EMA);
    for i in 0..3 {
        let before = if i == 0 {
            "before.".to_string()
        } else {
            format!("after.{}.", i - 1)
        };
        let cb = Matrix::new(ema[&format!("{before}_codebook.embed")].1.clone(), 32, 16).unwrap();
        let x = Matrix::new(ema[&format!("batch.{i}")].1.clone(), 64, 16).unwrap();
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
            &s(&cp),
            "-i",
            &s(&xp),
            "-o",
            &s(&op),
            "--device",
            "cpu",
        ]));
        assert_eq!(
            vqx::npy::read_indices(&op).unwrap(),
            read_i64(EMA, &format!("indices.{i}")),
            "step {i}"
        );
    }
}

#[test]
fn cli_stats_text_json_svg() {
    let d = dir();
    let (out, _) = ok(&vqx(&["stats", STATE]));
    assert_mentions(
        &out,
        &[
            "vector-quantize-pytorch",
            "codes K:    32",
            "dim D:      16",
            "EMA counts N_k: mean",
            "(population)",
            "dead:       0 of 32",
            "perplexity:",
        ],
    );

    let (out, _) = ok(&vqx(&["stats", STATE, "--json"]));
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["codes"], 32);
    assert_eq!(j["dim"], 16);
    assert_eq!(j["format"], "vq-pytorch");
    let n = &read_floats(STATE)["_codebook.cluster_size"].1;
    let mean = n.iter().map(|&v| f64::from(v)).sum::<f64>() / 32.0;
    let got = j["ema"]["distribution"]["mean"].as_f64().unwrap();
    assert!((got - mean).abs() < 1e-9, "{got} vs {mean}");
    assert_eq!(j["ema"]["dead"], 0);
    let p = j["ema"]["perplexity"].as_f64().unwrap();
    assert!(p > 1.0 && p <= 32.0, "{p}");

    // a vqx checkpoint with dead codes, step, usage; and the SVG
    let ckpt = d.path().join("c.safetensors");
    sample().save(&ckpt).unwrap();
    let svg = d.path().join("usage.svg");
    let (out, _) = ok(&vqx(&["stats", &s(&ckpt), "--svg", &s(&svg)]));
    assert_mentions(
        &out,
        &[
            "vqx checkpoint",
            "step:       12345",
            "dead:       2 of 6",
            "usage:",
        ],
    );
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    assert_mentions(&text, &["codes sorted by count", "dead threshold"]);

    // a .npy has nothing to plot
    let npy = d.path().join("c.npy");
    vqx::npy::write_matrix(&npy, Matrix::new(seq(8, 1.0), 4, 2).unwrap().as_ref()).unwrap();
    let (out, _) = ok(&vqx(&["stats", &s(&npy)]));
    assert_mentions(&out, &[".npy array", "EMA counts: none"]);
    let o = vqx(&["stats", &s(&npy), "--svg", &s(&d.path().join("n.svg"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("holds no EMA counts or usage"));
    assert!(!d.path().join("n.svg").exists());
}

#[test]
fn cli_errors_name_the_file() {
    let d = dir();
    let p = d.path().join("junk.safetensors");
    std::fs::write(&p, b"0123456789abcdef").unwrap();
    let o = vqx(&["stats", &s(&p)]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("junk.safetensors"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
