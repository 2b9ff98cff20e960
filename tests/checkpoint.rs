//! vqx checkpoints: round trip, the file layout, atomic writes, validation, and the errors of
//! loading a broken, truncated or foreign file.

mod common;
use common::assert_mentions;
use common::tensors::{Tensor, VQX_META, sample, save_sample, seq, t32, write_st};
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;
use std::path::Path;
use vqx::checkpoint::{Checkpoint, load_codebook};
use vqx::{Error, Matrix};

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// What a message must mention.
type Needles = &'static [&'static str];
/// A change that makes a checkpoint invalid.
type Spoil = fn(&mut Checkpoint);
/// A safetensors file's metadata.
type Metadata<'a> = &'a [(&'a str, &'a str)];

/// Saves [`sample`] at `path` and returns the file's bytes.
fn saved_bytes(path: &Path) -> Vec<u8> {
    save_sample(path);
    std::fs::read(path).unwrap()
}

fn no_temp_files(dir: &Path) {
    let leftovers: Vec<_> = common::files_in(dir)
        .into_iter()
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
    let ckpt = save_sample(&p);
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
    let bytes = saved_bytes(&p);
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
    assert_mentions(&e.to_string(), &["ckpt.safetensors"]);
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
    let good = save_sample(&p);
    let before = std::fs::read(&p).unwrap();

    let mut bad = sample();
    bad.embed_avg = Some(Matrix::zeros(6, 3));
    let e = bad.save(&p).unwrap_err();
    assert_mentions(&e.to_string(), &["ema.embed_avg", "6×4", "6×3"]);
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
    let good = save_sample(&p);
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
    // Each case spoils one part of the sample.
    let cases: [(Spoil, Needles); 5] = [
        (
            |c| c.cluster_size = Some(vec![1.0; 5]),
            &["ema.cluster_size", "6 values", "5 values"],
        ),
        (|c| c.embed_avg = None, &["go together"]),
        (
            |c| c.codebook.data_mut()[5] = f32::NAN,
            &["codebook", "row 1", "column 1"],
        ),
        (
            |c| c.cluster_size.as_mut().unwrap()[2] = -1.0,
            &["code 2", "non-negative"],
        ),
        (|c| c.usage_total = Some(vec![1.0]), &["usage.total"]),
    ];
    for (spoil, needles) in cases {
        let mut c = sample();
        spoil(&mut c);
        assert_mentions(&c.validate().unwrap_err().to_string(), needles);
    }

    let c = Checkpoint::new(Matrix::zeros(0, 4));
    assert!(matches!(c.validate().unwrap_err(), Error::Empty { .. }));
}

// ---------------------------------------------------------------------------------------------
// Load errors

/// Writes `tensors` with `meta` and fails unless `Checkpoint::load` refuses the file with an
/// `Error::Checkpoint` that names it and mentions every needle.
fn load_err(tensors: &[Tensor], meta: Metadata, needles: &[&str]) {
    let d = dir();
    let p = d.path().join("bad.safetensors");
    write_st(&p, tensors, meta);
    let e = Checkpoint::load(&p).unwrap_err();
    assert!(matches!(e, Error::Checkpoint { .. }), "{e:?}");
    let msg = e.to_string();
    assert_mentions(&msg, &["bad.safetensors"]);
    assert_mentions(&msg, needles);
}

#[test]
fn load_says_which_shape_is_wrong() {
    let cb = t32("codebook", &[4, 3], &seq(12, 1.0));
    let cases: [(Vec<Tensor>, &str); 5] = [
        (
            vec![
                cb.clone(),
                t32("ema.cluster_size", &[4], &[1.0; 4]),
                t32("ema.embed_avg", &[4, 2], &seq(8, 1.0)),
            ],
            "ema.embed_avg is 4×2 but codebook is 4×3",
        ),
        (
            vec![
                cb.clone(),
                t32("ema.cluster_size", &[5], &[1.0; 5]),
                t32("ema.embed_avg", &[4, 3], &seq(12, 1.0)),
            ],
            "ema.cluster_size is 5 but the codebook has 4 codes",
        ),
        (
            vec![cb.clone(), t32("ema.cluster_size", &[4], &[1.0; 4])],
            "has ema.cluster_size but not ema.embed_avg",
        ),
        (
            vec![t32("codebook", &[12], &seq(12, 1.0))],
            "`codebook` is 12; expected K×D",
        ),
        (
            vec![cb.clone(), t32("usage.total", &[3], &[1.0; 3])],
            "usage.total is 3 but the codebook has 4 codes",
        ),
    ];
    for (tensors, needle) in cases {
        load_err(&tensors, &VQX_META, &[needle]);
    }
}

#[test]
fn load_says_what_is_missing_or_unreadable() {
    let weights = t32("weights", &[4, 3], &seq(12, 1.0));
    load_err(
        &[weights],
        &VQX_META,
        &["without a `codebook` tensor", "`weights`"],
    );

    let cb = [t32("codebook", &[4, 3], &seq(12, 1.0))];
    let meta = |version, step| {
        [
            ("format", "vqx-checkpoint"),
            ("version", version),
            ("step", step),
        ]
    };
    let bad_config = [
        ("format", "vqx-checkpoint"),
        ("version", "1"),
        ("step", "1"),
        ("config", "{oops"),
    ];
    let cases: [(Metadata, Needles); 4] = [
        (&[], &["no `format` metadata", "`codebook`"]),
        (&meta("2", "1"), &["version \"2\"", "reads version \"1\""]),
        (&meta("1", "-3"), &["step is \"-3\""]),
        (&bad_config, &["config is not valid JSON"]),
    ];
    for (meta, needles) in cases {
        load_err(&cb, meta, needles);
    }

    let ints: Vec<u8> = (0..12i32).flat_map(|v| v.to_le_bytes()).collect();
    load_err(
        &[("codebook".into(), Dtype::I32, vec![4, 3], ints)],
        &VQX_META,
        &["`codebook` has dtype I32", "f32, f16, bf16 or f64"],
    );

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
    let bytes = saved_bytes(&good);
    for cut in [3, 8, 20, bytes.len() / 2, bytes.len() - 1] {
        let p = d.path().join(format!("cut{cut}.safetensors"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        for msg in [
            Checkpoint::load(&p).unwrap_err().to_string(),
            load_codebook(&p).unwrap_err().to_string(),
        ] {
            assert_mentions(&msg, &[&format!("cut{cut}.safetensors"), "not a"]);
            assert!(msg.contains("safetensors file"), "{msg}");
        }
    }

    let text = d.path().join("notes.safetensors");
    std::fs::write(&text, "these are not the tensors you are looking for").unwrap();
    assert_mentions(
        &Checkpoint::load(&text).unwrap_err().to_string(),
        &["not a valid safetensors file"],
    );

    let zip = d.path().join("model.pt");
    std::fs::write(&zip, b"PK\x03\x04 and the rest of a torch.save archive").unwrap();
    assert_mentions(
        &load_codebook(&zip).unwrap_err().to_string(),
        &["PyTorch pickle", "safetensors.torch.save_file"],
    );

    let npy = d.path().join("c.npy");
    vqx::npy::write_matrix(&npy, Matrix::zeros(2, 2).as_ref()).unwrap();
    assert_mentions(
        &Checkpoint::load(&npy).unwrap_err().to_string(),
        &["is a .npy file"],
    );

    let missing = d.path().join("missing.safetensors");
    assert!(matches!(
        load_codebook(&missing).unwrap_err(),
        Error::Io { .. }
    ));
}
