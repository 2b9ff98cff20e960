//! The `vqx` binary end to end: quantize on files written here, streaming, every bad input, and
//! the info / bench / --help commands.

mod common;
use common::cli::{expect_error, ok, stderr, stdout, vqx};
use common::{files_in, uniform_matrix as uniform, write_npy};
use half::f16;
use npyz::Order;
use std::path::PathBuf;
use std::process::Output;
use vqx::backend::{Backend, CpuBackend};
use vqx::{Matrix, Metric, npy};

/// `vqx quantize -c codebook -i input -o output extra…`.
fn quantize(codebook: &str, input: &str, output: &str, extra: &[&str]) -> Output {
    let mut args = vec!["quantize", "-c", codebook, "-i", input, "-o", output];
    args.extend_from_slice(extra);
    vqx(&args)
}

struct Case {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Case {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        Case { _dir: dir, root }
    }
    /// A case with x.npy = uniform(n, d, seeds.0) and c.npy = uniform(k, d, seeds.1); returns
    /// it, the two matrices and their paths.
    fn with_inputs(
        n: usize,
        k: usize,
        d: usize,
        seeds: (u64, u64),
    ) -> (Self, [Matrix; 2], [String; 2]) {
        let case = Case::new();
        let (x, c) = (uniform(n, d, seeds.0), uniform(k, d, seeds.1));
        let paths = [case.write("x.npy", &x), case.write("c.npy", &c)];
        (case, [x, c], paths)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    fn s(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
    fn write(&self, name: &str, m: &Matrix) -> String {
        npy::write_matrix(self.path(name), m.as_ref()).unwrap();
        self.s(name)
    }
    fn files(&self) -> Vec<String> {
        files_in(&self.root)
    }
}

/// Runs quantize with all three outputs and checks them against the CPU backend on `x`.
fn check_quantize(case: &Case, x_path: &str, x: &Matrix, c_path: &str, c: &Matrix, metric: Metric) {
    let metric_s = metric.to_string();
    let o = vqx(&[
        "quantize",
        "--codebook",
        c_path,
        "--input",
        x_path,
        "--output",
        &case.s("idx.npy"),
        "--distances",
        &case.s("dist.npy"),
        "--quantized",
        &case.s("q.npy"),
        "--metric",
        &metric_s,
        "--device",
        "cpu",
    ]);
    ok(&o);
    let summary = stderr(&o);
    assert!(
        summary.contains(&format!("quantized {} rows", x.rows())) && summary.contains("perplexity"),
        "{summary}"
    );
    let want = CpuBackend::new()
        .nearest(x.as_ref(), c.as_ref(), metric)
        .unwrap();
    let idx = npy::read_indices(case.path("idx.npy")).unwrap();
    let want_idx: Vec<i64> = want.indices.iter().map(|&i| i as i64).collect();
    assert_eq!(idx, want_idx);
    let dist = npy::read_vector(case.path("dist.npy")).unwrap();
    assert_eq!(dist.len(), x.rows());
    for (n, (&a, &b)) in dist.iter().zip(&want.distances).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "row {n}: {a} vs {b}"
        );
    }
    let q = npy::read_matrix(case.path("q.npy")).unwrap();
    assert_eq!((q.rows(), q.cols()), (x.rows(), x.cols()));
    for n in 0..x.rows() {
        assert_eq!(q.row(n), c.row(want.indices[n] as usize), "row {n}");
    }
}

#[test]
fn quantize_f32_end_to_end() {
    let (case, [x, c], [xp, cp]) = Case::with_inputs(500, 64, 16, (1, 2));
    check_quantize(&case, &xp, &x, &cp, &c, Metric::L2);
    check_quantize(&case, &xp, &x, &cp, &c, Metric::Cosine);
    // Exactly the outputs and inputs: no temporaries left.
    assert_eq!(
        case.files(),
        ["c.npy", "dist.npy", "idx.npy", "q.npy", "x.npy"]
    );
}

#[test]
fn quantize_f16_inputs() {
    let case = Case::new();
    let x32 = uniform(300, 8, 3);
    let c32 = uniform(40, 8, 4);
    let xh: Vec<f16> = x32.data().iter().map(|&v| f16::from_f32(v)).collect();
    let ch: Vec<f16> = c32.data().iter().map(|&v| f16::from_f32(v)).collect();
    write_npy(&case.path("x.npy"), &[300, 8], Order::C, &xh);
    write_npy(&case.path("c.npy"), &[40, 8], Order::C, &ch);
    let x = Matrix::from_f16(&xh, 300, 8).unwrap();
    let c = Matrix::from_f16(&ch, 40, 8).unwrap();
    check_quantize(
        &case,
        &case.s("x.npy"),
        &x,
        &case.s("c.npy"),
        &c,
        Metric::L2,
    );
}

#[test]
fn streaming_gives_identical_output() {
    let (case, _, [xp, cp]) = Case::with_inputs(1001, 50, 12, (5, 6));
    let run = |tag: &str, chunk: Option<&str>| {
        let out = [
            case.s(&format!("i{tag}.npy")),
            case.s(&format!("d{tag}.npy")),
            case.s(&format!("q{tag}.npy")),
        ];
        let mut args = vec![
            "quantize",
            "-c",
            &cp,
            "-i",
            &xp,
            "-o",
            &out[0],
            "--distances",
            &out[1],
            "--quantized",
            &out[2],
            "--device",
            "cpu",
        ];
        if let Some(ch) = chunk {
            args.extend(["--chunk-rows", ch]);
        }
        ok(&vqx(&args));
        out.map(|p| std::fs::read(p).unwrap())
    };
    let whole = run("a", None);
    let tiny = run("b", Some("7"));
    let one = run("c", Some("1"));
    for (name, other) in [("chunks of 7", &tiny), ("chunks of 1", &one)] {
        assert!(whole[0] == other[0], "indices differ with {name}");
        assert!(whole[2] == other[2], "quantized rows differ with {name}");
        // Distances are f32 results of a blocked GEMM whose rounding depends on how many rows
        // a call gets: equal to f32 accuracy, not necessarily bit for bit.
        let a = npy::read_vector(case.path("da.npy")).unwrap();
        let tag = if name == "chunks of 7" {
            "db.npy"
        } else {
            "dc.npy"
        };
        let b = npy::read_vector(case.path(tag)).unwrap();
        assert_eq!(a.len(), b.len());
        for (n, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= 4e-6 * x.abs().max(1e-6),
                "{name}: row {n}: {x} vs {y}"
            );
        }
    }
}

#[test]
fn dimension_mismatch_names_both_shapes() {
    let case = Case::new();
    let xp = case.write("x.npy", &uniform(10, 16, 1));
    let cp = case.write("c.npy", &uniform(64, 32, 2));
    let o = quantize(&cp, &xp, &case.s("o.npy"), &[]);
    expect_error(&o, &["64 × 32", "10 × 16", "x.npy", "c.npy"]);
    assert!(!case.path("o.npy").exists());
}

/// Quantizes `case`'s x.npy with its c.npy; fails unless vqx refuses with every needle.
fn refused(case: &Case, needles: &[&str]) {
    let o = quantize(&case.s("c.npy"), &case.s("x.npy"), &case.s("o.npy"), &[]);
    expect_error(&o, needles);
}

/// Each test writes one bad file with npyz (shape, values) and the other as `uniform(rows, cols,
/// seed)`, and expects quantize to refuse the bad one with every needle.
macro_rules! refused {
    ($($name:ident: $bad:literal $shape:expr, $data:expr; $good:literal $m:expr => $needles:expr;)*) => {$(
        #[test]
        fn $name() {
            let case = Case::new();
            write_npy(&case.path($bad), &$shape, Order::C, &$data);
            let (rows, cols, seed) = $m;
            case.write($good, &uniform(rows, cols, seed));
            refused(&case, &$needles);
        }
    )*};
}

refused! {
    f64_input_is_refused_with_advice: "x.npy" [2, 2], [1.0f64, 2.0, 3.0, 4.0]; "c.npy" (4, 2, 2)
        => ["x.npy", "float64", "astype"];
    integer_input_is_refused: "x.npy" [2, 2], [1i64, 2, 3, 4]; "c.npy" (4, 2, 2)
        => ["x.npy", "int64"];
    empty_input_is_refused: "x.npy" [0, 4], [0f32; 0]; "c.npy" (8, 4, 2)
        => ["empty", "x.npy", "0 × 4"];
    three_d_input_is_refused: "x.npy" [2, 3, 4], [0f32; 24]; "c.npy" (8, 4, 2)
        => ["x.npy", "3 dimensions", "(2, 3, 4)"];
    one_d_codebook_is_refused: "c.npy" [8], [0f32; 8]; "x.npy" (10, 4, 1)
        => ["c.npy", "1 dimension", "2-D"];
}

#[test]
fn missing_files_are_named() {
    let case = Case::new();
    let cp = case.write("c.npy", &uniform(4, 2, 2));
    let o = quantize(&cp, &case.s("nope.npy"), &case.s("o.npy"), &[]);
    expect_error(&o, &["nope.npy"]);
    let xp = case.write("x.npy", &uniform(4, 2, 2));
    let o = quantize(&case.s("noc.npy"), &xp, &case.s("o.npy"), &[]);
    expect_error(&o, &["noc.npy"]);
}

#[test]
fn nan_in_input_names_the_row_and_writes_nothing() {
    let case = Case::new();
    let mut x = uniform(100, 4, 1);
    x.data_mut()[83 * 4 + 2] = f32::NAN;
    let xp = case.write("x.npy", &x);
    let cp = case.write("c.npy", &uniform(8, 4, 2));
    // With small chunks the bad row is found after earlier chunks were written.
    let o = quantize(
        &cp,
        &xp,
        &case.s("o.npy"),
        &["--distances", &case.s("d.npy"), "--chunk-rows", "10"],
    );
    expect_error(&o, &["NaN", "row 83", "column 2", "x.npy"]);
    assert_eq!(case.files(), ["c.npy", "x.npy"], "no partial outputs");
}

#[test]
fn nan_in_codebook_is_refused() {
    let case = Case::new();
    let mut c = uniform(8, 4, 2);
    c.data_mut()[5 * 4] = f32::INFINITY;
    let cp = case.write("c.npy", &c);
    let xp = case.write("x.npy", &uniform(10, 4, 1));
    let o = quantize(&cp, &xp, &case.s("o.npy"), &[]);
    expect_error(&o, &["codebook", "row 5", "inf"]);
}

#[test]
fn codebook_that_is_neither_npy_nor_safetensors_is_a_clear_error() {
    let case = Case::new();
    std::fs::write(case.path("c.safetensors"), b"{}").unwrap();
    let xp = case.write("x.npy", &uniform(10, 4, 1));
    let o = quantize(&case.s("c.safetensors"), &xp, &case.s("o.npy"), &[]);
    expect_error(&o, &["c.safetensors", "not a safetensors file"]);
}

#[test]
fn output_may_not_overwrite_input() {
    let (case, _, [xp, cp]) = Case::with_inputs(10, 8, 4, (1, 2));
    let o = quantize(&cp, &xp, &xp, &[]);
    expect_error(&o, &["--output", "--input"]);
    let o = quantize(
        &cp,
        &xp,
        &case.s("o.npy"),
        &["--distances", &case.s("o.npy")],
    );
    expect_error(&o, &["same file"]);
}

#[test]
fn bad_flag_values_exit_1() {
    let o = quantize("c.npy", "x.npy", "o.npy", &["--metric", "hamming"]);
    expect_error(&o, &["hamming"]);
    let o = vqx(&["bench", "--device", "tpu"]);
    expect_error(&o, &["tpu"]);
    let o = vqx(&["frobnicate"]);
    expect_error(&o, &["frobnicate"]);
}

#[test]
fn cuda_when_unavailable_says_why() {
    let status = vqx::backend::cuda::status();
    if status.available {
        return; // Covered by the GPU tests.
    }
    let (case, _, [xp, cp]) = Case::with_inputs(10, 8, 4, (1, 2));
    let o = quantize(&cp, &xp, &case.s("o.npy"), &["--device", "cuda"]);
    expect_error(&o, &["CUDA"]);
    assert!(!case.path("o.npy").exists());
    let o = vqx(&[
        "bench",
        "--n",
        "10",
        "--dim",
        "4",
        "--codebook-size",
        "8",
        "--device",
        "cuda",
    ]);
    expect_error(&o, &["CUDA"]);
}

#[test]
fn info_reports_backends() {
    let o = vqx(&["info"]);
    ok(&o);
    let out = stdout(&o);
    assert!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");
    assert!(
        out.contains("cpu backend") && out.contains("cuda backend"),
        "{out}"
    );
    assert!(
        out.contains("rayon threads") && out.contains("kernels"),
        "{out}"
    );
    let o = vqx(&["info", "--json"]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["cuda"]["available"].is_boolean(), "{v}");
    assert!(v["cpu"]["rayon_threads"].as_u64().unwrap() >= 1, "{v}");
}

#[test]
fn bench_json_is_valid() {
    let o = vqx(&[
        "bench",
        "--n",
        "1000",
        "--dim",
        "16",
        "--codebook-size",
        "64",
        "--json",
        "--reps",
        "2",
        "--device",
        "cpu",
    ]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["backend"], "cpu");
    assert!(v["date"].as_str().unwrap().ends_with('Z'));
    let r = &v["results"][0];
    assert_eq!(r["shape"]["n"], 1000);
    assert_eq!(r["shape"]["dim"], 16);
    assert_eq!(r["shape"]["codes"], 64);
    assert_eq!(r["scaled"], false);
    let prims = r["primitives"].as_array().unwrap();
    let names: Vec<&str> = prims.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "nearest",
            "gather",
            "code_sums",
            "code_sums_deterministic",
            "usage"
        ]
    );
    for p in prims {
        assert!(p["ms"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["floor_fraction"].as_f64().unwrap() > 0.0, "{p}");
    }
    assert!(prims[0]["gflops"].as_f64().unwrap() > 0.0);
    assert!(prims[1]["gbs"].as_f64().unwrap() > 0.0);
    assert!(v["floors"]["bandwidth_gbs"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_text_to_file() {
    let case = Case::new();
    let out = case.s("report.txt");
    let o = vqx(&[
        "bench",
        "--n",
        "500",
        "--dim",
        "8",
        "--codebook-size",
        "32",
        "--reps",
        "1",
        "--device",
        "cpu",
        "--output",
        &out,
    ]);
    ok(&o);
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.contains("N=500 D=8 K=32") && text.contains("of floor"),
        "{text}"
    );
    // Sizes come together or not at all.
    let o = vqx(&["bench", "--n", "500"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn help_for_every_subcommand() {
    for sub in [
        &["--help"][..],
        &["info", "--help"],
        &["quantize", "--help"],
        &["bench", "--help"],
        &["help", "quantize"],
    ] {
        let (out, _) = ok(&vqx(sub));
        assert!(out.contains("Usage:"), "{sub:?}: {out}");
    }
    let quantize_flags = [
        "--codebook",
        "--input",
        "--output",
        "--distances",
        "--quantized",
        "--metric",
        "--device",
        "--chunk-rows",
    ];
    let bench_flags = [
        "--n",
        "--dim",
        "--codebook-size",
        "--reps",
        "--json",
        "--output",
    ];
    for (command, flags) in [("quantize", &quantize_flags[..]), ("bench", &bench_flags)] {
        let out = stdout(&vqx(&[command, "--help"]));
        for flag in flags {
            assert!(out.contains(flag), "{command}: {flag}: {out}");
        }
    }
    let o = vqx(&["--version"]);
    ok(&o);
    assert!(stdout(&o).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn bench_on_given_files() {
    let case = Case::new();
    let x = case.write("x.npy", &uniform(300, 6, 1));
    let c = case.write("c.npy", &uniform(40, 6, 2));
    let o = vqx(&[
        "bench",
        "--input",
        &x,
        "--codebook",
        &c,
        "--reps",
        "1",
        "--device",
        "cpu",
        "--json",
    ]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let shape = &v["results"][0]["shape"];
    assert_eq!(
        (
            shape["n"].as_u64(),
            shape["dim"].as_u64(),
            shape["codes"].as_u64()
        ),
        (Some(300), Some(6), Some(40))
    );
    assert_eq!(
        v["results"].as_array().unwrap().len(),
        1,
        "only the given data is timed"
    );
    let c7 = case.write("c7.npy", &uniform(40, 7, 3));
    let o = vqx(&["bench", "--input", &x, "--codebook", &c7, "--device", "cpu"]);
    expect_error(&o, &["6 columns", "7 columns"]);
}

#[test]
fn low_precision_on_the_cpu_is_refused_with_advice() {
    let (case, _, [xp, cp]) = Case::with_inputs(10, 8, 4, (1, 2));
    for p in ["tf32", "bf16"] {
        let o = quantize(
            &cp,
            &xp,
            &case.s("o.npy"),
            &["--device", "cpu", "--precision", p],
        );
        expect_error(&o, &[p, "CUDA", "--precision exact"]);
        let o = vqx(&["bench", "--device", "cpu", "--precision", p]);
        expect_error(&o, &[p, "CUDA", "--precision exact"]);
    }
    let o = vqx(&["bench", "--precision", "fp8"]);
    expect_error(&o, &["fp8"]);
}
