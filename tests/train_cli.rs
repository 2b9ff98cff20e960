//! `vqx train`, `encode`, `decode` and `plot` end to end: a run writes its files, encode and
//! decode round-trip through the model, a CLI resume matches the uninterrupted run, Ctrl-C
//! saves a checkpoint, and bad arguments get clear errors.

mod common;
use common::cli::{expect_error, ok, stderr, vqx};
use std::path::Path;
use std::process::{Command, Output};
use vqx::backend::Device;

const SMALL: &[&str] = &[
    "--synthetic",
    "gmm:dim=8,components=6",
    "--rows",
    "512",
    "--eval-rows",
    "128",
    "--codebook-size",
    "8",
    "--code-dim",
    "3",
    "--hidden",
    "16",
    "--batch-size",
    "32",
    "--warmup",
    "2",
    "--dead-code-threshold",
    "0.2",
    "--device",
    "cpu",
    "--quiet",
];

fn train(dir: &Path, extra: &[&str]) -> String {
    let mut a = vec!["train"];
    a.extend_from_slice(SMALL);
    a.extend_from_slice(extra);
    a.extend_from_slice(&["--output", dir.to_str().unwrap()]);
    ok(&vqx(&a)).1
}

/// `vqx <command> --model model --input input --output output extra…` (encode, decode).
fn run_model(command: &str, model: &str, input: &Path, output: &Path, extra: &[&str]) -> Output {
    let (input, output) = (input.to_str().unwrap(), output.to_str().unwrap());
    let mut args = vec![
        command, "--model", model, "--input", input, "--output", output,
    ];
    args.extend_from_slice(extra);
    vqx(&args)
}

#[test]
fn train_encode_decode_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let err = train(
        &dir,
        &[
            "--steps",
            "30",
            "--checkpoint-every",
            "10",
            "--eval-every",
            "10",
        ],
    );
    assert!(err.contains("held-out reconstruction MSE"), "{err}");
    for f in [
        "checkpoint.safetensors",
        "metrics.jsonl",
        "config.json",
        "summary.json",
    ] {
        assert!(dir.join(f).exists(), "{f}");
    }
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 30);
    assert_eq!(lines[29]["step"], 30);
    assert!(lines[9].get("eval_reconstruction").is_some());
    assert!(lines[29]["perplexity"].as_f64().unwrap() >= 1.0);

    // encode → decode gives the model's reconstruction.
    let x = vqx::train::Synthetic::generate(&"gmm:dim=8,components=6".parse().unwrap(), 0, 50, 7);
    let xp = tmp.path().join("x.npy");
    vqx::npy::write_matrix(&xp, x.as_ref()).unwrap();
    let (ip, yp) = (tmp.path().join("i.npy"), tmp.path().join("y.npy"));
    let d = dir.to_str().unwrap();
    ok(&run_model("encode", d, &xp, &ip, &["--chunk-rows", "16"]));
    ok(&run_model("decode", d, &ip, &yp, &[]));
    let (model, _) =
        vqx::train::load_model(&dir.join("checkpoint.safetensors"), Device::Cpu).unwrap();
    let tokens: Vec<u32> = vqx::npy::read_indices(&ip)
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    assert_eq!(tokens, model.encode(x.as_ref()).unwrap());
    let y = vqx::npy::read_matrix(&yp).unwrap();
    assert_eq!(y, model.reconstruct(x.as_ref()).unwrap());

    // A token outside the codebook is refused with its position.
    vqx::npy::write_indices(&ip, &[0, 1, 8]).unwrap();
    expect_error(
        &run_model("decode", d, &ip, &yp, &[]),
        &["index 8 at position 2"],
    );

    ok(&vqx(&["plot", d]));
    let svg = std::fs::read_to_string(dir.join("curves.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("held-out reconstruction MSE"));
}

#[test]
fn cli_resume_matches_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    train(&a, &["--steps", "24"]);
    let err = train(&b, &["--steps", "24", "--stop-at", "10"]);
    assert!(err.contains("stopped at step 10 of 24"), "{err}");
    let (_, err) = ok(&vqx(&["train", "--resume", b.to_str().unwrap(), "--quiet"]));
    assert!(
        err.contains("resuming") && err.contains("step 10 of 24"),
        "{err}"
    );
    let load = |d: &Path| {
        vqx::train::load_trainer(&d.join("checkpoint.safetensors"), Device::Cpu).unwrap()
    };
    let (ta, tb) = (load(&a), load(&b));
    assert_eq!(tb.step, 24);
    assert_eq!(ta.model.encoder, tb.model.encoder);
    assert_eq!(ta.model.decoder, tb.model.decoder);
    assert_eq!(ta.model.quantizer.codebook(), tb.model.quantizer.codebook());
    assert_eq!(ta.model.quantizer.ema(), tb.model.quantizer.ema());
    assert_eq!(ta.optimizer, tb.optimizer);
    // The metrics file holds each step once, the same losses as the uninterrupted run.
    let losses = |d: &Path| -> Vec<f64> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(losses(&a), losses(&b));
}

#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let mut a = vec!["train"];
    a.extend_from_slice(SMALL);
    a.extend_from_slice(&[
        "--steps",
        "100000000",
        "--checkpoint-every",
        "0",
        "--output",
        dir.to_str().unwrap(),
    ]);
    let child = Command::new(env!("CARGO_BIN_EXE_vqx"))
        .args(&a)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way (metrics lines appear), then send SIGINT.
    let metrics = dir.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::metadata(&metrics).map_or(0, |m| m.len()) == 0 {
        assert!(t0.elapsed().as_secs() < 60, "training never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let k = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(k.success());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted at step") && err.contains("--resume"),
        "{err}"
    );
    let t = vqx::train::load_trainer(&dir.join("checkpoint.safetensors"), Device::Cpu).unwrap();
    assert!(t.step > 0);
    // It resumes from there.
    let steps = (t.step + 3).to_string();
    ok(&vqx(&[
        "train",
        "--resume",
        dir.to_str().unwrap(),
        "--steps",
        &steps,
        "--quiet",
    ]));
    let t2 = vqx::train::load_trainer(&dir.join("checkpoint.safetensors"), Device::Cpu).unwrap();
    assert_eq!(t2.step, t.step + 3);
}

#[test]
fn bad_arguments_are_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("r");
    let d = d.to_str().unwrap();
    let cases: [(&[&str], &str); 7] = [
        (
            &["train", "--output", d],
            "--data X.npy or --synthetic NAME",
        ),
        (
            &["train", "--synthetic", "spiral", "--output", d],
            "unknown synthetic data set",
        ),
        (
            &[
                "train",
                "--synthetic",
                "gmm",
                "--hidden",
                "64,x",
                "--output",
                d,
            ],
            "not a positive width",
        ),
        (
            &[
                "train",
                "--synthetic",
                "gmm",
                "--codebook",
                "adam",
                "--output",
                d,
            ],
            "expected ema or gradient",
        ),
        (&["train", "--resume", d], "checkpoint.safetensors"),
        (&["plot", d], "metrics.jsonl"),
        (
            &[
                "encode", "--model", d, "--input", "x.npy", "--output", "i.npy",
            ],
            "checkpoint.safetensors",
        ),
    ];
    for (args, needle) in cases {
        expect_error(&vqx(args), &[needle]);
    }
}
