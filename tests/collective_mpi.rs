//! The MPI (and NCCL) collectives across real processes: `mpirun -np 2` on
//! `examples/collective_check.rs`, which checks every collective on every rank against one
//! process's computation, and the fault paths (a rank that aborts or panics ends the job);
//! `vqx fit` and `vqx train` under `mpirun -np 2` against `--shards 2` in one process.
//!
//! Needs the cargo feature `mpi` and an MPI with `mpirun` (`.ci/install-mpi.sh`):
//! `cargo test --release --features mpi --test collective_mpi`. The example is built by the
//! test itself (same profile and features), since `--test` selects no examples.

/// `vqx info` names the collectives this build has: the features it was built with.
#[test]
fn info_names_the_collectives_compiled_in() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vqx"))
        .arg("info")
        .output()
        .expect("running vqx info");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let mut want = String::from("collectives:  single, in-process");
    for (on, name) in [
        (cfg!(feature = "mpi"), "mpi"),
        (cfg!(feature = "nccl"), "nccl"),
    ] {
        if on {
            want += &format!(", {name}");
        }
    }
    want += " (compiled in";
    assert!(stdout.contains(&want), "no {want:?} in:\n{stdout}");
}

#[cfg(not(feature = "mpi"))]
#[test]
#[ignore = "needs --features mpi and mpirun: see the first lines of this file"]
fn mpi_collectives_need_the_mpi_feature() {
    panic!("built without the `mpi` feature: nothing here can run");
}

#[cfg(feature = "mpi")]
mod common;

#[cfg(feature = "mpi")]
mod mpi {
    use std::process::{Command, Output, Stdio};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    /// The example binary, built once for every test of this file.
    fn example() -> &'static str {
        static PATH: OnceLock<String> = OnceLock::new();
        PATH.get_or_init(|| {
            let features = if cfg!(feature = "nccl") {
                "nccl"
            } else {
                "mpi"
            };
            let mut cargo = Command::new(env!("CARGO"));
            cargo.current_dir(env!("CARGO_MANIFEST_DIR")).args([
                "build",
                "--quiet",
                "--example",
                "collective_check",
                "--features",
                features,
                "--message-format=json",
            ]);
            if !cfg!(debug_assertions) {
                cargo.arg("--release");
            }
            // Cargo runs tests with build.rs's `rustc-env` values set; "none" is its word for
            // an unset VQX_EMU_SANITIZE, which build.rs would refuse (and rebuild over).
            if std::env::var("VQX_EMU_SANITIZE").is_ok_and(|v| v == "none") {
                cargo.env_remove("VQX_EMU_SANITIZE");
            }
            let out = cargo.output().expect("running cargo");
            assert!(
                out.status.success(),
                "building the example failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|m| m["target"]["name"] == "collective_check" && m["executable"].is_string())
                .and_then(|m| m["executable"].as_str().map(String::from))
                .expect("cargo reported no collective_check executable")
        })
    }

    /// `mpirun -np N` on the example with `args`, killed (and failed) after `limit`.
    fn mpirun(ranks: usize, args: &[&str], limit: Duration) -> (Output, Duration) {
        mpirun_on(example(), ranks, args, limit)
    }

    /// `mpirun -np N exe args`, killed (and failed) after `limit`.
    fn mpirun_on(exe: &str, ranks: usize, args: &[&str], limit: Duration) -> (Output, Duration) {
        let start = Instant::now();
        let mut child = Command::new("mpirun")
            .args(["--oversubscribe", "--bind-to", "none", "-np"])
            .arg(ranks.to_string())
            .arg(exe)
            .args(args)
            // Tests often run as root in containers; OpenMPI refuses root without these.
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mpirun not found: install MPI (.ci/install-mpi.sh)");
        loop {
            if child.try_wait().expect("waiting for mpirun").is_some() {
                break;
            }
            if start.elapsed() > limit {
                child.kill().ok();
                let out = child.wait_with_output().expect("mpirun output");
                panic!(
                    "mpirun {args:?} still running after {limit:?} (a hang):\n{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("mpirun output");
        (out, start.elapsed())
    }

    fn text(out: &Output) -> (String, String) {
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn every_check_passes(ranks: usize, mode: &str, transport: &str) {
        let (out, _) = mpirun(ranks, &[mode, transport], Duration::from_secs(120));
        let (stdout, stderr) = text(&out);
        assert!(
            out.status.success(),
            "{mode}: {}\n{stdout}\n{stderr}",
            out.status
        );
        for r in 0..ranks {
            assert!(
                stdout.contains(&format!("rank {r}/{ranks}: all checks passed")),
                "{mode}, rank {r}:\n{stdout}\n{stderr}"
            );
        }
        // Every rank holds the same sums, to the bit.
        let sums: Vec<&str> = stdout
            .lines()
            .filter(|l| l.contains("f64 all-reduce"))
            .map(|l| l.split_once(": ").map_or(l, |(_, rest)| rest))
            .collect();
        assert_eq!(sums.len(), ranks, "{stdout}");
        assert!(sums.iter().all(|s| *s == sums[0]), "{stdout}");
    }

    #[test]
    fn every_collective_matches_one_process_on_two_ranks() {
        every_check_passes(2, "check", "mpi");
    }

    #[test]
    fn gathers_in_rounds_under_one_ranks_small_message_cap() {
        every_check_passes(2, "check-capped", "mpi");
    }

    #[test]
    fn three_ranks_add_in_rank_order_where_order_matters() {
        // With 3 ranks, element 0 (1e16 + 1 + 1) differs between orders: checked bit for bit.
        every_check_passes(3, "check", "mpi");
    }

    #[test]
    fn one_rank_without_a_launcher_is_a_job_of_one() {
        let out = Command::new(example())
            .arg("check")
            .output()
            .expect("running the example");
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(
            stdout.contains("rank 0/1: all checks passed"),
            "{stdout}\n{stderr}"
        );
    }

    fn ends_the_job_naming_rank_1(mode: &str, cause: &str) {
        let (out, took) = mpirun(2, &[mode], Duration::from_secs(30));
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{mode}: exit 0\n{stdout}\n{stderr}");
        assert!(
            stderr.contains("vqx: rank 1 aborts the MPI job") && stderr.contains(cause),
            "{mode}: no rank 1 and cause on stderr:\n{stderr}"
        );
        assert!(took < Duration::from_secs(30), "{mode} took {took:?}");
    }

    #[test]
    fn a_rank_that_aborts_ends_every_rank_with_its_cause() {
        ends_the_job_naming_rank_1("abort", "disk full while reading shard 1");
    }

    #[test]
    fn a_rank_that_panics_ends_every_rank_with_the_panic() {
        ends_the_job_naming_rank_1("panic", "shard 1 is corrupt");
    }

    /// The issue-12 contract on a real job: `mpirun -np 2 vqx fit` gives the checkpoint
    /// `vqx fit --shards 2` gives, bit for bit (Lloyd and EMA modes, L2 and cosine); each rank
    /// read only its rows.
    #[test]
    fn mpirun_fit_equals_shards_in_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
        let (n, d) = (3001, 12);
        let x: Vec<f32> = super::common::uniform(n, d, 7)
            .iter()
            .enumerate()
            .map(|(i, v)| v * 2.0 + (i % d / 3) as f32)
            .collect();
        let x = vqx::Matrix::new(x, n, d).unwrap();
        vqx::npy::write_matrix(p("x.npy"), x.as_ref()).unwrap();
        let vqx = env!("CARGO_BIN_EXE_vqx");
        // Lloyd, and the EMA mode with a global batch that splits unevenly and re-seeded codes.
        let ema = ["--mode", "ema", "--steps", "25", "--batch-size", "301"];
        let ema: Vec<&str> = [&ema[..], &["--dead-code-threshold", "2"]].concat();
        for (mode, extra) in [("lloyd", vec![]), ("ema", ema)] {
            for metric in ["l2", "cosine"] {
                let metric_mode = format!("{metric}-{mode}");
                let metric = metric_mode.as_str();
                let common = |out: &str| {
                    let mut a = vec![
                        "fit".to_string(),
                        "--input".into(),
                        p("x.npy"),
                        "--codebook-size".into(),
                        "40".into(),
                        "--metric".into(),
                        metric.split('-').next().unwrap().into(),
                        "--quiet".into(),
                        "-o".into(),
                        p(out),
                    ];
                    a.extend(extra.iter().map(|s| s.to_string()));
                    a
                };
                let args = common(&format!("mpi-{metric}.st"));
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let (out, _) = mpirun_on(vqx, 2, &args, Duration::from_secs(120));
                let (stdout, stderr) = text(&out);
                assert!(out.status.success(), "{metric}: {stdout}\n{stderr}");
                let mut one = common(&format!("one-{metric}.st"));
                one.extend(["--shards".to_string(), "2".to_string()]);
                let o = Command::new(vqx).args(&one).output().unwrap();
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                let a = std::fs::read(p(&format!("mpi-{metric}.st"))).unwrap();
                let b = std::fs::read(p(&format!("one-{metric}.st"))).unwrap();
                assert!(
                    a == b,
                    "{metric}: mpirun -np 2 and --shards 2 checkpoints differ"
                );
            }
        }
    }

    /// A rank killed with SIGKILL (no chance to abort) ends the job: the launcher sees it die and
    /// ends the others; mpirun exits non-zero within 30 s. The last periodic checkpoint is
    /// whole, and `mpirun -np 2 vqx fit --resume` from it gives the uninterrupted fit's
    /// codebook bit for bit (the uninterrupted fit run as `--shards 2`, which equals -np 2).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_rank_killed_with_sigkill_ends_the_fit() {
        let dir = tempfile::tempdir().unwrap();
        let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
        // Long enough to be killed mid-fit: 14 plain passes over 200,000 × 64 uniform rows,
        // K = 2,048 (alone on 2 cores about 0.3 s a pass), killed once the checkpoint of pass 2
        // is there.
        let (n, d) = (200_000, 64);
        let x = super::common::uniform(n, d, 11);
        vqx::npy::write_matrix(p("x.npy"), vqx::Matrix::new(x, n, d).unwrap().as_ref()).unwrap();
        let (xp, op) = (p("x.npy"), p("killed.st"));
        #[rustfmt::skip]
        let args = ["fit", "--input", &xp, "--codebook-size", "2048", "--init", "data",
            "--no-bounds", "--steps", "14", "--checkpoint-every", "1", "--quiet", "-o", &op];
        let start = Instant::now();
        let mut child = Command::new("mpirun")
            .args(["--oversubscribe", "--bind-to", "none", "-np", "2"])
            .arg(env!("CARGO_BIN_EXE_vqx"))
            .args(args)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mpirun not found: install MPI (.ci/install-mpi.sh)");
        // Rank 1: the vqx process writing our output whose environment says so.
        let rank1 = || -> Option<u32> {
            std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                let env = std::fs::read(e.path().join("environ")).ok()?;
                let has =
                    |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
                (has(&cmd, op.as_bytes()) && has(&env, b"OMPI_COMM_WORLD_RANK=1\0")).then_some(pid)
            })
        };
        let pid = loop {
            if let Some(pid) = rank1() {
                break pid;
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "mpirun ended before rank 1 was seen"
            );
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "rank 1 never started"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let it get into the passes, then kill it without warning.
        let pass_of = || {
            vqx::checkpoint::Checkpoint::load(&op)
                .ok()
                .map_or(0, |c| c.step)
        };
        while pass_of() < 2 && child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no checkpoint of pass 2"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            let (stdout, stderr) = text(&out);
            panic!(
                "the fit ended before the kill ({}):\n{stdout}\n{stderr}",
                out.status
            );
        }
        let killed = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success(), "kill -9 {pid}");
        let at = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if at.elapsed() > Duration::from_secs(30) {
                child.kill().ok();
                panic!("the job still runs 30 s after rank 1 was killed");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!status.success(), "mpirun exited 0 after a rank was killed");
        eprintln!(
            "rank 1 killed; the job ended {:.2} s later with {status}",
            at.elapsed().as_secs_f64()
        );
        let at_pass = pass_of();
        assert!((2..14).contains(&at_pass), "killed after pass {at_pass}");
        let mut resumed: Vec<&str> = args.to_vec();
        resumed.push("--resume");
        let (out, _) = mpirun_on(
            env!("CARGO_BIN_EXE_vqx"),
            2,
            &resumed,
            Duration::from_secs(300),
        );
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "resume: {stdout}\n{stderr}");
        let whole = p("whole.st");
        let mut one: Vec<&str> = args.to_vec();
        one.truncate(one.len() - 1);
        one.extend([whole.as_str(), "--shards", "2"]);
        let o = Command::new(env!("CARGO_BIN_EXE_vqx"))
            .args(&one)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (a, b) = (
            vqx::checkpoint::Checkpoint::load(&whole).unwrap(),
            vqx::checkpoint::Checkpoint::load(&op).unwrap(),
        );
        assert!(
            a.codebook.data().iter().map(|v| v.to_bits()).eq(b
                .codebook
                .data()
                .iter()
                .map(|v| v.to_bits())),
            "killed after pass {at_pass} and resumed: not the uninterrupted codebook"
        );
        assert_eq!(a.step, b.step);
    }

    /// A NaN in rank 1's rows ends the job: non-zero, within 30 s, the rank and the rows named,
    /// no checkpoint written.
    #[test]
    fn a_nan_in_one_ranks_shard_ends_the_fit() {
        let dir = tempfile::tempdir().unwrap();
        let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
        let (n, d) = (400, 4);
        let mut x: Vec<f32> = (0..n * d).map(|i| (i % 17) as f32).collect();
        x[350 * d + 2] = f32::NAN;
        let x = vqx::Matrix::new(x, n, d).unwrap();
        vqx::npy::write_matrix(p("x.npy"), x.as_ref()).unwrap();
        let (xp, op) = (p("x.npy"), p("o.st"));
        let args = [
            "fit",
            "--input",
            &xp,
            "--codebook-size",
            "8",
            "--quiet",
            "-o",
            &op,
        ];
        let (out, took) = mpirun_on(env!("CARGO_BIN_EXE_vqx"), 2, &args, Duration::from_secs(30));
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "exit 0 with a NaN: {stderr}");
        assert!(
            stderr.contains("rank 1 aborts the MPI job") && stderr.contains("200..400"),
            "rank 1 and its rows not named:\n{stderr}"
        );
        assert!(took < Duration::from_secs(30), "took {took:?}");
        assert!(
            !dir.path().join("o.st").exists(),
            "a checkpoint was written"
        );
    }

    /// `vqx train` across ranks: `mpirun -np 2` gives the checkpoint `--shards 2` gives, bit
    /// for bit (L2 with dead codes re-seeded across ranks, and cosine), each rank reading only
    /// its rows of the .npy; and an mpirun job stopped half-way and resumed with `mpirun -np 2`
    /// ends there too.
    #[test]
    fn mpirun_train_equals_shards_in_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
        let (n, d) = (3001, 12);
        let x: Vec<f32> = super::common::uniform(n, d, 8)
            .iter()
            .enumerate()
            .map(|(i, v)| v * 0.5 + ((i / d) % 7) as f32 * (1.0 + (i % d) as f32 * 0.1))
            .collect();
        let x = vqx::Matrix::new(x, n, d).unwrap();
        vqx::npy::write_matrix(p("x.npy"), x.as_ref()).unwrap();
        let vqx = env!("CARGO_BIN_EXE_vqx");
        let limit = Duration::from_secs(120);
        for metric in ["l2", "cosine"] {
            let train = |out: &str, extra: &[&str]| {
                #[rustfmt::skip]
                let mut a: Vec<String> = ["train", "--data", &p("x.npy"), "--codebook-size", "32",
                    "--code-dim", "4", "--hidden", "32", "--batch-size", "63", "--steps", "30",
                    "--warmup", "3", "--ema-decay", "0.8", "--dead-code-threshold", "0.5",
                    "--eval-every", "10", "--metric", metric, "--quiet", "-o", &p(out)]
                    .iter().map(|s| s.to_string()).collect();
                a.extend(extra.iter().map(|s| s.to_string()));
                a
            };
            let mpi = |args: Vec<String>| {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let (out, _) = mpirun_on(vqx, 2, &args, limit);
                let (stdout, stderr) = text(&out);
                assert!(
                    out.status.success(),
                    "{metric}: {args:?}\n{stdout}\n{stderr}"
                );
                stderr
            };
            let err = mpi(train(&format!("mpi-{metric}"), &[]));
            assert!(err.contains("in 2 shards"), "{metric}: not 2 ranks:\n{err}");
            let one = Command::new(vqx)
                .args(train(&format!("one-{metric}"), &["--shards", "2"]))
                .output()
                .unwrap();
            assert!(
                one.status.success(),
                "{}",
                String::from_utf8_lossy(&one.stderr)
            );
            let ckpt = |run: &str| std::fs::read(p(&format!("{run}/checkpoint.safetensors")));
            let want = ckpt(&format!("one-{metric}")).unwrap();
            assert!(
                ckpt(&format!("mpi-{metric}")).unwrap() == want,
                "{metric}: mpirun -np 2 and --shards 2 checkpoints differ"
            );
            let metrics = std::fs::read_to_string(p(&format!("mpi-{metric}/metrics.jsonl")));
            let replaced: u64 = metrics
                .unwrap()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["replaced"]
                        .as_u64()
                        .unwrap()
                })
                .sum();
            assert!(replaced > 0, "{metric}: no dead code was re-seeded");
            // Stopped at step 15 and resumed under mpirun: the same checkpoint again.
            let split = format!("split-{metric}");
            mpi(train(&split, &["--stop-at", "15"]));
            let resume = ["train", "--resume", &p(&split), "--quiet"];
            mpi(resume.iter().map(|s| s.to_string()).collect());
            assert!(
                ckpt(&split).unwrap() == want,
                "{metric}: the resumed mpirun job differs from the uninterrupted run"
            );
        }
    }

    /// A NaN in rank 1's rows of the training data ends `mpirun -np 2 vqx train`: non-zero,
    /// within 30 s, the rank and the file's row named, no checkpoint written.
    #[test]
    fn a_nan_in_one_ranks_shard_ends_the_training() {
        let dir = tempfile::tempdir().unwrap();
        let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
        let (n, d) = (400, 4);
        let mut x: Vec<f32> = (0..n * d).map(|i| (i % 17) as f32 * 0.1).collect();
        x[350 * d + 2] = f32::NAN;
        let x = vqx::Matrix::new(x, n, d).unwrap();
        vqx::npy::write_matrix(p("x.npy"), x.as_ref()).unwrap();
        let (xp, op) = (p("x.npy"), p("run"));
        #[rustfmt::skip]
        let args = ["train", "--data", &xp, "--codebook-size", "4", "--code-dim", "2",
            "--hidden", "8", "--batch-size", "16", "--steps", "5", "--quiet", "-o", &op];
        let (out, took) = mpirun_on(env!("CARGO_BIN_EXE_vqx"), 2, &args, Duration::from_secs(30));
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "exit 0 with a NaN: {stderr}");
        assert!(
            stderr.contains("rank 1 aborts the MPI job")
                && stderr.contains("200..400")
                && stderr.contains("at row 350, column 2"),
            "rank 1 and its row not named:\n{stderr}"
        );
        assert!(took < Duration::from_secs(30), "took {took:?}");
        assert!(
            !dir.path().join("run/checkpoint.safetensors").exists(),
            "a checkpoint was written"
        );
    }

    /// As the other GPU tests: a line on stderr, a failure under `VQX_REQUIRE_GPU=1`.
    #[cfg(feature = "nccl")]
    fn skip(why: &str) {
        let require = std::env::var("VQX_REQUIRE_GPU").is_ok_and(|v| v == "1");
        assert!(!require, "VQX_REQUIRE_GPU=1 but NCCL cannot run: {why}");
        eprintln!("skipped: nccl_collectives_where_there_are_gpus: {why}");
    }

    /// Over NCCL where there is a GPU: one rank per GPU, at most 2.
    #[cfg(feature = "nccl")]
    #[test]
    fn nccl_collectives_where_there_are_gpus() {
        let status = vqx::backend::cuda::status();
        if status.device_name.is_none() {
            skip(&format!("no CUDA device ({})", status.reason));
            return;
        }
        // SAFETY: only dlopens the driver library and asks it for the device count.
        let gpus = unsafe { cudarc::driver::sys::is_culib_present() }
            .then(cudarc::driver::CudaContext::device_count)
            .and_then(Result::ok)
            .unwrap_or(1)
            .clamp(1, 2) as usize;
        let (out, _) = mpirun(gpus, &["check", "nccl"], Duration::from_secs(120));
        let (stdout, stderr) = text(&out);
        if stderr.contains("libnccl not found") {
            skip("a GPU but no libnccl");
            return;
        }
        assert!(out.status.success(), "{stdout}\n{stderr}");
        for r in 0..gpus {
            assert!(
                stdout.contains(&format!("rank {r}/{gpus}: all checks passed")),
                "{stdout}\n{stderr}"
            );
        }
    }
}
