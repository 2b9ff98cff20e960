//! The `vqx` flags clap checks: `--help` lists the allowed values of the enum flags, a wrong
//! value is refused with them, aliases and any case are taken, and a count of 0 is refused
//! naming the flag — all before any file is read.

mod common;
use common::cli::{expect_error, ok, vqx};

fn help(args: &[&str]) -> String {
    ok(&vqx(args)).0
}

/// Fails unless vqx exited with 1 and said `error: ...` with every needle.
fn refused(args: &[&str], needles: &[&str]) {
    expect_error(&vqx(args), needles);
}

#[test]
fn help_lists_the_allowed_values() {
    for sub in ["quantize", "bench", "fit", "train", "encode", "decode"] {
        let out = help(&[sub, "--help"]);
        for device in ["auto", "cpu", "cuda", "cuda-emu"] {
            assert!(out.contains(&format!("- {device}:")), "{sub}: {out}");
        }
    }
    for sub in ["quantize", "bench", "fit", "train"] {
        let out = help(&[sub, "--help"]);
        assert!(
            out.contains("- l2:") && out.contains("- cosine:"),
            "{sub}: {out}"
        );
    }
    for sub in ["quantize", "bench"] {
        let out = help(&[sub, "--help"]);
        for p in ["exact", "tf32", "bf16"] {
            assert!(out.contains(&format!("- {p}:")), "{sub}: {out}");
        }
    }
    let out = help(&["train", "--help"]);
    for v in [
        "- gelu:",
        "- relu:",
        "- ema:",
        "- gradient:",
        "- data:",
        "- kmeans:",
    ] {
        assert!(out.contains(v), "{v}: {out}");
    }
    // The short help lists them on the flag's line.
    let out = help(&["bench", "-h"]);
    assert!(
        out.contains("[possible values: auto, cpu, cuda, cuda-emu]")
            && out.contains("[possible values: l2, cosine]")
            && out.contains("[possible values: auto, avx512, portable]"),
        "{out}"
    );
}

#[test]
fn a_wrong_value_is_refused_with_the_allowed_ones() {
    refused(
        &["bench", "--device", "tpu"],
        &["'tpu'", "--device", "expected auto, cpu, cuda or cuda-emu"],
    );
    refused(
        &["bench", "--metric", "hamming"],
        &["'hamming'", "--metric", "expected l2 or cosine"],
    );
    refused(
        &["bench", "--precision", "fp8"],
        &["'fp8'", "expected exact, tf32 or bf16"],
    );
    refused(
        &["train", "--activation", "tanh"],
        &["'tanh'", "expected gelu or relu"],
    );
}

#[test]
fn aliases_and_any_case_are_taken() {
    // Parsing succeeds; the run then fails on the missing files, not on the flags.
    refused(
        &[
            "quantize",
            "-c",
            "no-such-codebook.npy",
            "-i",
            "x.npy",
            "-o",
            "o.npy",
            "--device",
            "CPU",
            "--metric",
            "Cos",
            "--precision",
            "fp32",
        ],
        &["no-such-codebook.npy"],
    );
    refused(
        &["train", "--codebook", "GRAD", "--init", "KMeans"],
        &["--output DIR"],
    );
}

#[test]
fn a_zero_count_is_refused_naming_the_flag() {
    let cases: [(&str, &[&str]); 7] = [
        (
            "--chunk-rows",
            &[
                "quantize",
                "-c",
                "c.npy",
                "-i",
                "x.npy",
                "-o",
                "o.npy",
                "--chunk-rows",
                "0",
            ],
        ),
        (
            "--chunk-rows",
            &[
                "encode",
                "--model",
                "m",
                "--input",
                "x.npy",
                "-o",
                "i.npy",
                "--chunk-rows",
                "0",
            ],
        ),
        (
            "--steps",
            &[
                "fit",
                "--input",
                "x.npy",
                "--codebook-size",
                "8",
                "-o",
                "c.st",
                "--steps",
                "0",
            ],
        ),
        (
            "--batch-size",
            &[
                "train",
                "--synthetic",
                "gmm",
                "-o",
                "run",
                "--batch-size",
                "0",
            ],
        ),
        (
            "--n",
            &["bench", "--n", "0", "--dim", "4", "--codebook-size", "8"],
        ),
        ("--reps", &["bench", "--reps", "0"]),
        ("--samples", &["schedule", "cosine", "--samples", "0"]),
    ];
    for (flag, args) in cases {
        refused(
            args,
            &[
                &format!("invalid value '0' for '{flag} "),
                "must be at least 1",
            ],
        );
    }
    refused(
        &["bench", "--reps", "many"],
        &["--reps", "not a whole number"],
    );
}
