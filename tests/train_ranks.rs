//! Data-parallel `vqx train` (issue 12) with in-process ranks: one rank is the one-process
//! run bit for bit, every rank of a job holds the same bits, a job repeats itself bit for bit,
//! two ranks train, a NaN in one rank's shard ends the job naming the rank, a resume with the
//! same rank count continues bit for bit and one with another rank count runs. The same job
//! under `mpirun -np 2` is compared with `--shards 2` in tests/collective_mpi.rs.

mod common;
use common::cli::{arg, expect_error, ok, vqx};
use std::path::Path;
use vqx::backend::Device;
use vqx::collective::{Collective, in_process};
use vqx::ema::EmaState;
use vqx::model::Mlp;
use vqx::nearest::Metric;
use vqx::quantizer::CodebookLearning;
use vqx::train::{AdamW, ShardedTrainer, TrainConfig, Trainer};
use vqx::{Error, Matrix};

fn config(learning: CodebookLearning, steps: u64) -> TrainConfig {
    let mut c = common::gmm_run(2048, 16, vec![32], learning, Device::Cpu);
    c.model.layer_norm = true;
    c.steps = steps;
    c.warmup = 5;
    c
}

/// Everything a trainer's future depends on.
#[derive(Debug, PartialEq)]
struct State {
    step: u64,
    encoder: Mlp,
    decoder: Mlp,
    codebook: Matrix,
    ema: Option<EmaState>,
    usage: Vec<u64>,
    quantizer_step: u64,
    optimizer: AdamW,
}

fn state(t: &Trainer) -> State {
    let q = &t.model.quantizer;
    State {
        step: t.step,
        encoder: t.model.encoder.clone(),
        decoder: t.model.decoder.clone(),
        codebook: q.codebook().clone(),
        ema: q.ema().cloned(),
        usage: q.usage_total().to_vec(),
        quantizer_step: q.step(),
        optimizer: t.optimizer.clone(),
    }
}

/// Runs `config` on `ranks` in-process ranks; every rank's final state and the sum of the
/// codes it re-seeded.
fn run_ranks(ranks: usize, config: &TrainConfig) -> Vec<(State, usize)> {
    in_process::run(ranks, |comm| {
        let mut t = ShardedTrainer::new(comm, config.clone())?;
        let mut replaced = 0;
        while !t.finished() {
            replaced += t.step()?.replaced;
        }
        t.check_in_sync()?;
        Ok((state(t.trainer()), replaced))
    })
    .unwrap()
}

/// One rank of the data-parallel step is the one-process step, to the bit: the same batches,
/// init, EMA update, re-seeds (with rows fetched through the collective) and AdamW step.
fn one_rank_is_one_process(learning: CodebookLearning, metric: Metric) {
    let mut cfg = config(learning, 30);
    cfg.quantizer = cfg.quantizer.clone().metric(metric);
    let mut alone = Trainer::new(cfg.clone()).unwrap();
    let mut replaced = 0;
    while !alone.finished() {
        replaced += alone.step().unwrap().replaced;
    }
    let ranked = run_ranks(1, &cfg);
    assert_eq!(ranked[0].0, state(&alone), "{learning:?} {metric:?}");
    assert_eq!(ranked[0].1, replaced);
    if let CodebookLearning::Ema { .. } = learning {
        assert!(replaced > 0, "the run re-seeded dead codes");
    }
}

#[test]
fn one_rank_is_the_one_process_run_ema() {
    one_rank_is_one_process(CodebookLearning::ema(0.8), Metric::L2);
}

#[test]
fn one_rank_is_the_one_process_run_cosine() {
    one_rank_is_one_process(CodebookLearning::ema(0.8), Metric::Cosine);
}

#[test]
fn one_rank_is_the_one_process_run_gradient_codebook() {
    one_rank_is_one_process(CodebookLearning::Gradient, Metric::L2);
}

/// Two ranks (and three, with a batch that does not split evenly) end with the same bits on
/// every rank, and a second job gives the same bits again. Dead codes are re-seeded with rows
/// from both ranks' parts.
#[test]
fn every_rank_holds_the_same_bits_and_runs_repeat() {
    for (ranks, batch) in [(2, 64), (3, 50)] {
        let mut cfg = config(CodebookLearning::ema(0.8), 40);
        cfg.batch_size = batch;
        let a = run_ranks(ranks, &cfg);
        for (r, s) in a.iter().enumerate() {
            assert_eq!(s.0, a[0].0, "{ranks} ranks: rank {r} differs from rank 0");
        }
        assert!(a[0].1 > 0, "{ranks} ranks: the run re-seeded dead codes");
        let b = run_ranks(ranks, &cfg);
        assert_eq!(a[0].0, b[0].0, "{ranks} ranks: a second job differs");
        // Not the one-process run: each rank samples from its own shard.
        let mut alone = Trainer::new(cfg.clone()).unwrap();
        while !alone.finished() {
            alone.step().unwrap();
        }
        assert_ne!(a[0].0.encoder, alone.model.encoder);
    }
}

/// The gradient-learned codebook and cosine codebooks stay in step across ranks too.
#[test]
fn gradient_codebook_and_cosine_stay_in_step() {
    let mut grad = config(CodebookLearning::Gradient, 20);
    grad.freeze_encoder = true;
    let mut cosine = config(CodebookLearning::ema(0.9), 20);
    cosine.quantizer = cosine.quantizer.clone().metric(Metric::Cosine);
    for cfg in [grad, cosine] {
        let a = run_ranks(2, &cfg);
        assert_eq!(a[0].0, a[1].0);
    }
}

/// Two ranks train: the held-out error falls well below the untrained model's.
#[test]
fn two_ranks_train() {
    let mut cfg = config(CodebookLearning::ema(0.9), 150);
    cfg.warmup = 10;
    let errors = in_process::run(2, |comm| {
        let mut t = ShardedTrainer::new(comm, cfg.clone())?;
        let before = t.evaluate()?;
        let mut losses = Vec::new();
        while !t.finished() {
            losses.push(t.step()?.loss);
        }
        Ok((before, t.evaluate()?, losses))
    })
    .unwrap();
    let (before, after, losses) = &errors[0];
    assert_eq!(errors[0], errors[1], "ranks report the same metrics");
    assert!(
        *after < 0.5 * before,
        "held-out MSE {before} → {after}: no learning"
    );
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    assert!(
        mean(&losses[140..]) < 0.5 * mean(&losses[..10]),
        "{losses:?}"
    );
}

/// A rank whose state differs from rank 0's (here: started with another seed, as a job
/// launched with mismatched flags would be) fails the check on every rank, naming it.
#[test]
fn a_diverged_rank_is_named() {
    let cfg = config(CodebookLearning::ema(0.8), 5);
    let err = in_process::run(3, |comm| {
        let mut cfg = cfg.clone();
        if comm.rank() == 2 {
            cfg.model.seed += 1;
        }
        let mut t = ShardedTrainer::new(comm, cfg)?;
        t.step()?;
        t.check_in_sync()
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Aborted { .. })
            && msg.contains("at step 1 rank 2's parameters")
            && msg.contains("diverged"),
        "{msg}"
    );
}

/// Settings a job cannot run with are refused before any step, on every rank.
#[test]
fn refusals() {
    let mut cfg = config(CodebookLearning::ema(0.8), 5);
    cfg.batch_size = 2;
    let err = in_process::run(3, |comm| ShardedTrainer::new(comm, cfg.clone()).map(drop));
    let msg = err.unwrap_err().to_string();
    assert!(msg.contains("every rank needs at least one row"), "{msg}");
    let mut cfg = config(CodebookLearning::ema(0.8), 5);
    cfg.quantizer.device = Device::CudaEmu;
    let err = in_process::run(2, |comm| ShardedTrainer::new(comm, cfg.clone()).map(drop));
    let msg = err.unwrap_err().to_string();
    assert!(msg.contains("runs its step on the CPU"), "{msg}");
}

const SMALL: &[&str] = &[
    "train",
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
    "--eval-every",
    "5",
    "--quiet",
];

fn train(dir: &Path, extra: &[&str]) -> String {
    let d = arg(dir);
    let mut a = SMALL.to_vec();
    a.extend_from_slice(extra);
    a.extend_from_slice(&["--output", &d]);
    ok(&vqx(&a)).1
}

fn resume(dir: &Path, extra: &[&str]) -> String {
    let d = arg(dir);
    let mut a = vec!["train", "--resume", &d, "--quiet"];
    a.extend_from_slice(extra);
    ok(&vqx(&a)).1
}

fn file(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

/// `--shards 2`, stopped half-way and resumed with `--shards 2`, writes the checkpoint (and the
/// metrics but their timings) of the run that was never stopped, byte for byte.
#[test]
fn resume_with_the_same_rank_count_is_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    let (straight, split) = (tmp.path().join("straight"), tmp.path().join("split"));
    train(&straight, &["--steps", "24", "--shards", "2"]);
    let err = train(
        &split,
        &["--steps", "24", "--shards", "2", "--stop-at", "12"],
    );
    assert!(err.contains("stopped at step 12 of 24"), "{err}");
    // --eval-every is not stored in the run: given again.
    let err = resume(&split, &["--shards", "2", "--eval-every", "5"]);
    assert!(!err.contains("note:"), "{err}");
    assert!(
        file(&straight, "checkpoint.safetensors") == file(&split, "checkpoint.safetensors"),
        "the resumed run's checkpoint differs from the uninterrupted run's"
    );
    let untimed = |dir: &Path| -> Vec<serde_json::Value> {
        String::from_utf8(file(dir, "metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                let o = v.as_object_mut().unwrap();
                o.retain(|k, _| !k.ends_with("seconds") && k != "phases" && k != "elapsed_s");
                v
            })
            .collect()
    };
    let m = untimed(&straight);
    assert_eq!(m.len(), 24);
    assert_eq!(m, untimed(&split));
}

/// A run continues with another rank count (1 or 3 after 2): it says the result is not the run
/// continued with 2, and trains to the end.
#[test]
fn resume_with_another_rank_count_runs_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    for (shards, name) in [("1", "one"), ("3", "three")] {
        let dir = tmp.path().join(name);
        train(&dir, &["--steps", "20", "--shards", "2", "--stop-at", "10"]);
        let err = resume(&dir, &["--shards", shards]);
        assert!(
            err.contains(&format!(
                "note: the run was trained with 2 ranks and continues with {shards}"
            )),
            "{err}"
        );
        let summary: serde_json::Value =
            serde_json::from_slice(&file(&dir, "summary.json")).unwrap();
        assert_eq!(summary["step"], 20, "{summary}");
        assert_eq!(summary["ranks"].to_string(), shards, "{summary}");
        let lines = String::from_utf8(file(&dir, "metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 20);
    }
}

/// A NaN in the rows of rank 1's shard of a .npy ends the job: the rank, the file's row and no
/// checkpoint.
#[test]
fn a_nan_in_one_ranks_shard_names_the_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let (n, d) = (400, 4);
    let mut x: Vec<f32> = (0..n * d).map(|i| (i % 17) as f32 * 0.1).collect();
    x[350 * d + 2] = f32::NAN;
    let x = Matrix::new(x, n, d).unwrap();
    let data = tmp.path().join("x.npy");
    vqx::npy::write_matrix(&data, x.as_ref()).unwrap();
    let out = tmp.path().join("run");
    let (data, out_arg) = (arg(&data), arg(&out));
    #[rustfmt::skip]
    let args = ["train", "--data", &data, "--codebook-size", "4", "--code-dim", "2",
        "--hidden", "8", "--batch-size", "16", "--steps", "3", "--shards", "2", "--quiet",
        "--output", &out_arg];
    expect_error(
        &vqx(&args),
        &["rank 1 failed", "NaN", "at row 350, column 2", "200..400"],
    );
    assert!(!out.join("checkpoint.safetensors").exists());
}

/// Ctrl-C during `--shards 2`: both ranks stop after the same step, rank 0 writes the
/// checkpoint, the exit status is 130, and `--resume --shards 2` continues from there.
#[cfg(unix)]
#[test]
fn ctrl_c_stops_every_rank_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let d = arg(&dir);
    let mut a = SMALL.to_vec();
    a.extend_from_slice(&["--steps", "1000000", "--shards", "2", "--output", &d]);
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vqx"))
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
    let k = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(k.success());
    let out = child.wait_with_output().unwrap();
    let err = common::cli::stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted at step"), "{err}");
    let path = dir.join("checkpoint.safetensors");
    let t = vqx::train::load_trainer(&path, Device::Cpu).unwrap();
    assert!(t.step > 0);
    assert_eq!(t.config.ranks, 2);
    let steps = (t.step + 3).to_string();
    resume(&dir, &["--shards", "2", "--steps", &steps]);
    let t2 = vqx::train::load_trainer(&path, Device::Cpu).unwrap();
    assert_eq!(t2.step, t.step + 3);
}
