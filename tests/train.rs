//! Training the VQ-VAE: resuming from a checkpoint is bit-for-bit the uninterrupted run, and
//! the encoder learns through the straight-through estimator (training it beats freezing it).

mod common;
use vqx::backend::Device;
use vqx::quantizer::CodebookLearning;
use vqx::train::{self, DataSource, TrainConfig, Trainer};

fn config(learning: CodebookLearning, steps: u64) -> TrainConfig {
    let mut c = common::gmm_run(2048, 16, vec![32], learning, Device::Cpu);
    c.model.layer_norm = true;
    c.steps = steps;
    c.warmup = 5;
    c
}

fn assert_same(a: &Trainer, b: &Trainer) {
    assert_eq!(a.step, b.step);
    assert_eq!(a.model.encoder, b.model.encoder, "encoder weights");
    assert_eq!(a.model.decoder, b.model.decoder, "decoder weights");
    let (qa, qb) = (&a.model.quantizer, &b.model.quantizer);
    assert_eq!(qa.codebook(), qb.codebook(), "codebook");
    assert_eq!(qa.ema(), qb.ema(), "EMA state");
    assert_eq!(qa.usage_total(), qb.usage_total());
    assert_eq!(qa.step(), qb.step());
    assert_eq!(a.optimizer, b.optimizer, "AdamW moments");
}

fn resume_is_bitwise(learning: CodebookLearning) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(train::CHECKPOINT_FILE);
    let (n, total) = (12, 24);

    let mut straight = Trainer::new(config(learning, total)).unwrap();
    let mut replaced = 0;
    while !straight.finished() {
        replaced += straight.step().unwrap().replaced;
    }

    let mut first = Trainer::new(config(learning, total)).unwrap();
    for _ in 0..n {
        first.step().unwrap();
    }
    train::save_trainer(&mut first, &path).unwrap();
    drop(first);
    let mut resumed = train::load_trainer(&path, Device::Cpu).unwrap();
    assert_eq!(resumed.step, n);
    while !resumed.finished() {
        replaced += resumed.step().unwrap().replaced;
    }
    assert_same(&straight, &resumed);
    if let CodebookLearning::Ema { .. } = learning {
        assert!(replaced > 0, "the run re-seeded dead codes");
    }
}

#[test]
fn resume_gives_the_uninterrupted_run_ema() {
    resume_is_bitwise(CodebookLearning::ema(0.8));
}

#[test]
fn resume_gives_the_uninterrupted_run_gradient_codebook() {
    resume_is_bitwise(CodebookLearning::Gradient);
}

#[test]
fn checkpoint_round_trip_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    let mut t = Trainer::new(config(CodebookLearning::ema(0.9), 3)).unwrap();
    t.step().unwrap();
    train::save_trainer(&mut t, &path).unwrap();
    let (m, mut cfg) = train::load_model(&path, Device::Cpu).unwrap();
    cfg.quantizer.device = Device::Cpu; // the device is chosen at load time, not stored
    assert_eq!(cfg, t.config);
    assert_eq!(m.encoder, t.model.encoder);
    let x = t.data.eval.as_ref();
    assert_eq!(m.encode(x).unwrap(), t.model.encode(x).unwrap());

    // A quantizer checkpoint is not a training checkpoint, and a truncated file is named.
    let q = dir.path().join("q.safetensors");
    t.model.quantizer.to_checkpoint().unwrap().save(&q).unwrap();
    let e = train::load_model(&q, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("quantizer checkpoint"), "{e}");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&q, &bytes[..bytes.len() / 2]).unwrap();
    let e = train::load_model(&q, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("q.safetensors"), "{e}");
}

/// Trains with the encoder learning and with it frozen at its initial weights; everything
/// else equal. Returns held-out reconstruction MSE of both.
fn encoder_experiment(mut c: TrainConfig) -> (f64, f64) {
    let mut out = [0.0; 2];
    for (i, frozen) in [false, true].into_iter().enumerate() {
        c.freeze_encoder = frozen;
        let mut t = Trainer::new(c.clone()).unwrap();
        let enc0 = t.model.encoder.clone();
        while !t.finished() {
            t.step().unwrap();
        }
        assert_eq!(t.model.encoder == enc0, frozen, "frozen = {frozen}");
        out[i] = t.evaluate().unwrap();
        let s = t.model.quantizer.statistics();
        eprintln!(
            "frozen {frozen}: held-out MSE {:.4}, cumulative perplexity {:.1}, dead {:?}",
            out[i], s.cumulative_perplexity, s.dead
        );
    }
    (out[0], out[1])
}

#[test]
fn the_encoder_learns_through_the_straight_through_estimator() {
    let mut c = config(CodebookLearning::ema(0.9), 1000);
    // 16 clusters in 32-D, codes of dimension 2: a random encoder's 2-D image mixes clusters
    // that a trained one separates.
    c.data = DataSource::Synthetic {
        spec: "gmm:dim=32,components=16,std=0.1".parse().unwrap(),
        rows: 2048,
        eval_rows: 512,
        seed: 5,
    };
    c.model.data_dim = 32;
    c.model.code_dim = 2;
    c.quantizer.dim = 2;
    c.quantizer.codebook_size = 32;
    c.quantizer.dead_code_threshold = 0.1;
    let (trained, frozen) = encoder_experiment(c);
    assert!(
        trained * 2.0 < frozen,
        "trained encoder {trained:.4} vs frozen {frozen:.4}"
    );
}
