//! `vqx train`'s split of a `--data` file and its output directory: a small file trains on most
//! of its rows (a tenth held out, at most 2,048), a split that leaves less than one batch is
//! refused with the numbers, and a directory that already holds a run is not overwritten
//! without `--overwrite`.

mod common;
use common::cli::{arg, expect_error, ok, vqx};
use std::path::Path;

const FAST: &[&str] = &[
    "--hidden",
    "16",
    "--codebook-size",
    "16",
    "--code-dim",
    "4",
    "--device",
    "cpu",
    "--quiet",
];

/// A `rows`×8 .npy file of uniform values.
fn data_file(dir: &Path, rows: usize) -> String {
    let path = dir.join(format!("x{rows}.npy"));
    let x = common::uniform(rows, 8, 3);
    common::write_npy(&path, &[rows as u64, 8], npyz::Order::C, &x);
    arg(&path)
}

fn train(data: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let out = arg(out);
    let mut args = vec!["train", "--data", data, "-o", &out];
    args.extend_from_slice(FAST);
    args.extend_from_slice(extra);
    if !extra.contains(&"--steps") {
        args.extend_from_slice(&["--steps", "3"]);
    }
    vqx(&args)
}

fn summary(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn a_2000_row_file_trains_on_nine_tenths_of_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_file(tmp.path(), 2000);
    let run = tmp.path().join("run");
    let (_, err) = ok(&train(&data, &run, &[]));
    assert!(
        err.contains("data: 1800 rows for training, 200 held out for evaluation"),
        "{err}"
    );
    let s = summary(&run);
    assert_eq!(s["train_rows"], 1800, "{s}");
    assert_eq!(s["eval_rows"], 200, "{s}");
    // A batch of 256 distinct rows uses more than one code (the old split trained on one row).
    assert!(s["last_used"].as_u64().unwrap() > 1, "{s}");

    // An explicit count is taken as given; the default is capped at 2,048.
    let run = tmp.path().join("run-explicit");
    ok(&train(&data, &run, &["--eval-rows", "500"]));
    assert_eq!(summary(&run)["train_rows"], 1500);
    let big = data_file(tmp.path(), 30_000);
    let run = tmp.path().join("run-big");
    ok(&train(&big, &run, &[]));
    assert_eq!(summary(&run)["eval_rows"], 2048);
}

#[test]
fn a_split_without_a_batch_of_training_rows_is_refused_with_the_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_file(tmp.path(), 2000);
    let out = tmp.path().join("run");
    let o = train(&data, &out, &["--eval-rows", "2000"]);
    expect_error(
        &o,
        &[
            "has 2000 rows",
            "holding out 2000",
            "leaves none for training",
        ],
    );
    let o = train(&data, &out, &["--eval-rows", "1900"]);
    expect_error(
        &o,
        &[
            "holding out 1900",
            "leaves 100 for training",
            "fewer than one batch of 256",
            "--batch-size",
        ],
    );
    assert!(!out.join("checkpoint.safetensors").exists());
    // The same split with a batch that fits trains.
    ok(&train(
        &data,
        &out,
        &["--eval-rows", "1900", "--batch-size", "64"],
    ));
    assert_eq!(summary(&out)["train_rows"], 100);

    let out = arg(&tmp.path().join("synthetic"));
    let o = vqx(&[
        "train",
        "--synthetic",
        "gmm:dim=8",
        "--rows",
        "100",
        "-o",
        &out,
        "--quiet",
    ]);
    expect_error(
        &o,
        &["100 training rows (--rows)", "fewer than one batch of 256"],
    );
}

#[test]
fn an_existing_run_is_not_overwritten_without_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_file(tmp.path(), 600);
    let run = tmp.path().join("run");
    ok(&train(&data, &run, &["--batch-size", "64"]));
    let before = std::fs::read(run.join("checkpoint.safetensors")).unwrap();

    let o = train(&data, &run, &["--batch-size", "64", "--steps", "5"]);
    expect_error(
        &o,
        &["already holds a run", "vqx train --resume", "--overwrite"],
    );
    assert_eq!(
        std::fs::read(run.join("checkpoint.safetensors")).unwrap(),
        before,
        "a refused run must leave the old checkpoint as it was"
    );

    // An --overwrite run that cannot start leaves the old run as it was.
    let o = train(&data, &run, &["--batch-size", "4096", "--overwrite"]);
    expect_error(&o, &["fewer than one batch of 4096"]);
    assert_eq!(
        std::fs::read(run.join("checkpoint.safetensors")).unwrap(),
        before,
        "a refused --overwrite must not delete the old run"
    );

    ok(&train(
        &data,
        &run,
        &["--batch-size", "64", "--steps", "5", "--overwrite"],
    ));
    assert_eq!(summary(&run)["step"], 5);
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(
        lines.lines().count(),
        5,
        "only the new run's steps: {lines}"
    );
}

#[test]
fn the_library_refuses_holding_out_every_row() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_file(tmp.path(), 10);
    let err = vqx::train::Dataset::from_npy(Path::new(&data), 10, 0).unwrap_err();
    assert!(
        err.to_string().contains("leaves none for training"),
        "{err}"
    );
    let d = vqx::train::Dataset::from_npy(Path::new(&data), 9, 0).unwrap();
    assert_eq!((d.train.rows(), d.eval.rows()), (1, 9));
}
