//! What a codebook's counts say: `CountDistribution` and perplexity, and the `vqx stats` command
//! on a vector-quantize-pytorch state, a vqx checkpoint (with its SVG) and a .npy codebook.

mod common;
use common::assert_mentions;
use common::cli::{arg, expect_error, ok, vqx};
use common::tensors::{Tensors, VQPYTORCH_STATE, save_sample, seq};
use vqx::usage::{CountDistribution, perplexity};
use vqx::{Error, Matrix};

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

#[test]
fn cli_stats_text_json_svg() {
    let d = tempfile::tempdir().unwrap();
    let (out, _) = ok(&vqx(&["stats", VQPYTORCH_STATE]));
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

    let (out, _) = ok(&vqx(&["stats", VQPYTORCH_STATE, "--json"]));
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["codes"], 32);
    assert_eq!(j["dim"], 16);
    assert_eq!(j["format"], "vq-pytorch");
    let n = Tensors::read(VQPYTORCH_STATE).f32s("_codebook.cluster_size");
    let mean = n.iter().map(|&v| f64::from(v)).sum::<f64>() / 32.0;
    let got = j["ema"]["distribution"]["mean"].as_f64().unwrap();
    assert!((got - mean).abs() < 1e-9, "{got} vs {mean}");
    assert_eq!(j["ema"]["dead"], 0);
    let p = j["ema"]["perplexity"].as_f64().unwrap();
    assert!(p > 1.0 && p <= 32.0, "{p}");

    // a vqx checkpoint with dead codes, step, usage; and the SVG
    let ckpt = d.path().join("c.safetensors");
    save_sample(&ckpt);
    let svg = d.path().join("usage.svg");
    let (out, _) = ok(&vqx(&["stats", &arg(&ckpt), "--svg", &arg(&svg)]));
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
    let (out, _) = ok(&vqx(&["stats", &arg(&npy)]));
    assert_mentions(&out, &[".npy array", "EMA counts: none"]);
    let o = vqx(&["stats", &arg(&npy), "--svg", &arg(&d.path().join("n.svg"))]);
    expect_error(&o, &["holds no EMA counts or usage"]);
    assert!(!d.path().join("n.svg").exists());
}

#[test]
fn cli_errors_name_the_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("junk.safetensors");
    std::fs::write(&p, b"0123456789abcdef").unwrap();
    expect_error(&vqx(&["stats", &arg(&p)]), &["junk.safetensors"]);
}
