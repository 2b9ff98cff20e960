//! `vqx fit` end to end: a run learns the clusters, is deterministic with a given init and no
//! shuffle, writes a checkpoint vqx can load, and refuses bad arguments.

mod common;
use common::cli::{ok, stderr, vqx};
use common::*;
use vqx::checkpoint::Checkpoint;
use vqx::{Matrix, npy};

#[test]
fn fit_learns_clusters_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let (k, d) = (8, 6);
    let centers = normal(k, d, 1, 8.0, 0.0);
    let (x, label) = clustered(&centers, k, d, 3000, 0.1, 2);
    // Init: the first row seen of each cluster, as a user might pick by hand.
    let init: Vec<f32> = (0..k as u32)
        .flat_map(|c| {
            let r = label.iter().position(|&l| l == c).unwrap();
            x[r * d..(r + 1) * d].to_vec()
        })
        .collect();
    npy::write_matrix(p("x.npy"), Matrix::new(x, 3000, d).unwrap().as_ref()).unwrap();
    npy::write_matrix(p("init.npy"), Matrix::new(init, k, d).unwrap().as_ref()).unwrap();
    let run = |out: &str, metrics: &str| {
        let o = vqx(&[
            "fit",
            "--mode",
            "ema",
            "--input",
            &p("x.npy"),
            "--codebook-size",
            "8",
            "--steps",
            "150",
            "--batch-size",
            "256",
            "--decay",
            "0.8",
            "--dead-code-threshold",
            "0.5",
            "--init",
            &p("init.npy"),
            "--no-shuffle",
            "--quiet",
            "--metrics",
            &p(metrics),
            "--output",
            &p(out),
        ]);
        ok(&o);
    };
    run("a.safetensors", "a.jsonl");
    run("b.safetensors", "b.jsonl");
    // Same values bit for bit (the file's metadata map may be written in any order).
    let (a, b) = (
        Checkpoint::load(p("a.safetensors")).unwrap(),
        Checkpoint::load(p("b.safetensors")).unwrap(),
    );
    assert!(
        a == b,
        "two runs with --init FILE --no-shuffle must give identical checkpoints"
    );

    let lines = std::fs::read_to_string(p("a.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 150);
    let last: serde_json::Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 150);
    assert_eq!(last["dead"], 0, "{last}");
    assert!(
        last["perplexity"].as_f64().unwrap() > 0.8 * k as f64,
        "{last}"
    );

    let ckpt = Checkpoint::load(p("a.safetensors")).unwrap();
    assert_eq!(ckpt.step, 150);
    assert_eq!((ckpt.codebook.rows(), ckpt.codebook.cols()), (k, d));
    assert_eq!(ckpt.cluster_size.as_ref().map(Vec::len), Some(k));
    assert_eq!(ckpt.config["codebook_size"], 8);
    let counts = ckpt.usage_total.unwrap();
    assert_eq!(
        counts.iter().sum::<f64>(),
        150.0 * 256.0,
        "every row of every step counted once"
    );
}

#[test]
fn fit_refuses_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    npy::write_matrix(
        p("x.npy"),
        Matrix::new(uniform(50, 4, 1), 50, 4).unwrap().as_ref(),
    )
    .unwrap();
    npy::write_matrix(
        p("c5.npy"),
        Matrix::new(uniform(8, 5, 1), 8, 5).unwrap().as_ref(),
    )
    .unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--codebook-size", "0"], "codebook size"),
        (&["--codebook-size", "8", "--decay", "1.5"], "decay"),
        (&["--codebook-size", "8", "--batch-size", "0"], "batch-size"),
        (
            &["--codebook-size", "8", "--init", "nowhere.npy"],
            "nowhere.npy",
        ),
        (&["--codebook-size", "8", "--init", "C5"], "5"),
    ];
    let (xp, op) = (p("x.npy"), p("o.safetensors"));
    for (extra, needle) in cases {
        let mut args = vec![
            "fit", "--mode", "ema", "--input", &xp, "--quiet", "--output", &op,
        ];
        let c5 = p("c5.npy");
        args.extend(
            extra
                .iter()
                .map(|a| if *a == "C5" { c5.as_str() } else { a }),
        );
        let o = vqx(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: error should mention {needle:?}: {err}"
        );
        assert!(
            !dir.path().join("o.safetensors").exists(),
            "{args:?}: no checkpoint on failure"
        );
    }
}
