//! Noise schedules (SPEC §6): formulas against closed forms, sample means within 3 standard errors
//! for 10^6 samples, masking rates, padding and BOS/EOS, track dropout, ESM3's decoding counts,
//! and the `vqx schedule` command (CSV, errors, the SVG plot).

use rand::RngCore;
use std::f64::consts::PI;
mod common;
use common::cli::{expect_error, ok, stderr, vqx};
use vqx::Error;
use vqx::schedule::masking::{
    ESM3_STRUCTURE_BOS, ESM3_STRUCTURE_EOS, ESM3_STRUCTURE_MASK, ESM3_STRUCTURE_PAD,
};
use vqx::schedule::{
    FnSchedule, MaskConfig, NoiseSchedule, Schedule, Track, decoding_plan, mask_tokens,
    masked_after_step, sample_rates,
};

// ---------------------------------------------------------------- formulas and names

/// r(t) written out independently of the crate, per SPEC §6's table.
fn closed_form(s: Schedule, t: f64) -> Option<f64> {
    match s {
        Schedule::Cosine => Some((t * PI / 2.0).cos()),
        Schedule::Linear => Some(1.0 - t),
        Schedule::SquareRoot => Some(1.0 - t.sqrt()),
        Schedule::Square => Some(1.0 - t.powi(2)),
        Schedule::Cubic => Some(1.0 - t.powi(3)),
        Schedule::BetaLinear30 => None,
    }
}

#[test]
fn rates_match_their_formulas() {
    for s in Schedule::ALL {
        for t in [0.0, 0.1, 0.25, 1.0 / 3.0, 0.5, 0.75, 0.9, 0.999, 1.0] {
            match (s.rate(t), closed_form(s, t)) {
                (Some(got), Some(want)) => assert!((got - want).abs() < 1e-15, "{s}({t})"),
                (None, None) => {}
                other => panic!("{s}({t}): {other:?}"),
            }
        }
    }
    // A few values by hand.
    let r = |s: Schedule, t: f64| s.rate(t).unwrap();
    assert!((r(Schedule::Cosine, 0.5) - 0.5f64.sqrt()).abs() < 1e-15);
    assert!((r(Schedule::Cosine, 2.0 / 3.0) - 0.5).abs() < 1e-15);
    assert_eq!(r(Schedule::Linear, 0.25), 0.75);
    assert_eq!(r(Schedule::SquareRoot, 0.25), 0.5);
    assert_eq!(r(Schedule::Square, 0.5), 0.75);
    assert_eq!(r(Schedule::Cubic, 0.5), 0.875);
    for s in Schedule::ALL.into_iter().filter(|s| s.rate(0.0).is_some()) {
        assert_eq!(r(s, 0.0), 1.0, "{s}: everything masked at t = 0");
        assert!(r(s, 1.0).abs() < 1e-15, "{s}: nothing masked at t = 1");
    }
}

#[test]
fn densities_are_dt_dr_and_integrate_to_one() {
    // For r = r(t), t uniform: p(r(t)) · |r'(t)| = 1 (r' by central differences).
    for s in Schedule::ALL.into_iter().filter(|s| s.rate(0.0).is_some()) {
        for t in [0.05, 0.2, 0.5, 0.8, 0.95] {
            let h = 1e-6;
            let dr = (s.rate(t + h).unwrap() - s.rate(t - h).unwrap()) / (2.0 * h);
            let p = s.density(s.rate(t).unwrap()).unwrap();
            assert!((p * dr.abs() - 1.0).abs() < 1e-6, "{s} at t = {t}");
        }
    }
    // betalinear30: the mixture pdf has mass 1 and mean 0.3 (midpoint rule, smooth integrand).
    let n = 100_000;
    let (mut mass, mut first) = (0.0, 0.0);
    for i in 0..n {
        let r = (i as f64 + 0.5) / n as f64;
        let p = Schedule::BetaLinear30.density(r).unwrap();
        mass += p / n as f64;
        first += r * p / n as f64;
    }
    assert!((mass - 1.0).abs() < 1e-9, "mass {mass}");
    assert!((first - 0.3).abs() < 1e-9, "mean {first}");
}

#[test]
fn names_parse_and_unknown_names_list_the_valid_ones() {
    for (name, want) in [
        ("cosine", Schedule::Cosine),
        ("linear", Schedule::Linear),
        ("square_root", Schedule::SquareRoot),
        ("square_root_schedule", Schedule::SquareRoot), // ESM3's registry name
        ("square", Schedule::Square),
        ("cubic", Schedule::Cubic),
        ("betalinear30", Schedule::BetaLinear30),
        (" Cosine ", Schedule::Cosine),
    ] {
        assert_eq!(name.parse::<Schedule>().unwrap(), want, "{name:?}");
    }
    for s in Schedule::ALL {
        assert_eq!(s.to_string().parse::<Schedule>().unwrap(), s);
    }
    for bad in ["cosinus", "", "sqrt", "betalinear"] {
        let e = bad.parse::<Schedule>().unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        let msg = e.to_string();
        for s in Schedule::ALL {
            assert!(msg.contains(s.as_str()), "{msg}");
        }
        assert!(msg.contains("square_root_schedule"), "{msg}");
    }
}

// ---------------------------------------------------------------- sample means

const N_SAMPLES: usize = 1_000_000;

#[test]
fn sample_means_within_three_standard_errors_of_spec() {
    // SPEC §6's means, written out (not taken from the crate).
    let spec_mean = [
        (Schedule::Cosine, 2.0 / PI),
        (Schedule::Linear, 0.5),
        (Schedule::SquareRoot, 1.0 / 3.0),
        (Schedule::Square, 2.0 / 3.0),
        (Schedule::Cubic, 0.75),
        (Schedule::BetaLinear30, 0.30),
    ];
    for (i, (s, mu)) in spec_mean.into_iter().enumerate() {
        assert!(
            (s.mean().unwrap() - mu).abs() < 1e-15,
            "{s}: closed-form mean"
        );
        // A different seed per schedule, so the six checks are not driven by the same draws.
        let r = sample_rates(&s, N_SAMPLES, 20_240_601 + i as u64).unwrap();
        let n = r.len() as f64;
        let mean = r.iter().sum::<f64>() / n;
        let sample_var = r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let var = s.variance().unwrap();
        // The closed-form variance that the SE rests on agrees with the samples (its own SE
        // is below 0.3% of it here).
        assert!(
            (sample_var / var - 1.0).abs() < 0.01,
            "{s}: variance {sample_var} vs {var}"
        );
        let se = (var / n).sqrt();
        let z = (mean - mu) / se;
        eprintln!("{s:>12}: mean {mean:.6}  expected {mu:.6}  SE {se:.6}  z {z:+.2}");
        assert!(z.abs() < 3.0, "{s}: mean {mean}, expected {mu}, SE {se}");
        assert!(r.iter().all(|x| (0.0..=1.0).contains(x)));
    }
}

#[test]
fn sampling_is_deterministic_for_a_seed() {
    for s in Schedule::ALL {
        let a = sample_rates(&s, 1000, 5).unwrap();
        assert_eq!(a, sample_rates(&s, 1000, 5).unwrap(), "{s}");
        assert_ne!(a, sample_rates(&s, 1000, 6).unwrap(), "{s}");
    }
}

// ---------------------------------------------------------------- masking

/// B sequences of L distinct, ordinary ids (nothing special, nothing protected).
fn plain_tokens(b: usize, l: usize) -> Vec<u32> {
    (0..b * l).map(|i| (i % 4000) as u32).collect()
}

#[test]
fn masked_fraction_matches_mean_rate_and_each_sequence_rate() {
    let (b, l) = (4000, 256);
    let tokens = plain_tokens(b, l);
    for s in [Schedule::Linear, Schedule::Cosine, Schedule::BetaLinear30] {
        let m = mask_tokens(&tokens, l, &s, &MaskConfig::new(ESM3_STRUCTURE_MASK), 11).unwrap();
        assert_eq!(m.ids.len(), tokens.len());
        // Masked ⇔ replaced by MASK; everything else untouched.
        for ((&t, &id), &mk) in tokens.iter().zip(&m.ids).zip(&m.mask) {
            assert_eq!(id, if mk { ESM3_STRUCTURE_MASK } else { t });
        }

        // Overall rate vs E[r]: Var = Var(r)/B + E[r(1 − r)]/(BL).
        let (mu, var) = (s.mean().unwrap(), s.variance().unwrap());
        let e_r1r = mu - (var + mu * mu);
        let se = (var / b as f64 + e_r1r / (b * l) as f64).sqrt();
        let frac = m.masked_count() as f64 / tokens.len() as f64;
        eprintln!("{s:>12}: masked fraction {frac:.5}  E[r] {mu:.5}  SE {se:.5}");
        assert!(
            (frac - mu).abs() < 3.0 * se,
            "{s}: {frac} vs {mu} (SE {se})"
        );

        // Per sequence: the count is Binomial(L, r_i).
        let mut dev = 0.0;
        let mut var_sum = 0.0;
        let mut z2 = 0.0;
        for (i, &r) in m.rates.iter().enumerate() {
            let c = m.mask[i * l..(i + 1) * l].iter().filter(|&&x| x).count() as f64;
            let v = l as f64 * r * (1.0 - r);
            dev += c - l as f64 * r;
            var_sum += v;
            if v > 0.0 {
                z2 += (c - l as f64 * r).powi(2) / v;
            }
        }
        assert!(dev.abs() < 3.0 * var_sum.sqrt(), "{s}: Σ(c − Lr) = {dev}");
        let mean_z2 = z2 / b as f64;
        assert!((mean_z2 - 1.0).abs() < 0.15, "{s}: mean z² {mean_z2}");
        assert!(m.dropped.iter().all(|&d| !d));
    }
}

#[test]
fn padding_and_protected_ids_are_never_masked() {
    // ESM3 structure layout: BOS, tokens, EOS, then PAD to L; ragged lengths.
    let (b, l) = (2000, 64);
    let mut tokens = Vec::with_capacity(b * l);
    for i in 0..b {
        let len = 3 + (i * 7919) % (l - 3); // 1 .. l − 2 real tokens
        tokens.push(ESM3_STRUCTURE_BOS);
        tokens.extend((0..len - 2).map(|j| ((i + j) % 4096) as u32));
        tokens.push(ESM3_STRUCTURE_EOS);
        tokens.resize((i + 1) * l, ESM3_STRUCTURE_PAD);
    }
    let cfg = MaskConfig::esm3_structure().with_track_dropout(0.0);
    let mut eligible = 0usize;
    let (mut expected, mut var) = (0.0, 0.0);
    // cubic masks most tokens: the strongest test that specials survive.
    let m = mask_tokens(&tokens, l, &Schedule::Cubic, &cfg, 3).unwrap();
    for (i, ((&t, &id), &mk)) in tokens.iter().zip(&m.ids).zip(&m.mask).enumerate() {
        if [ESM3_STRUCTURE_BOS, ESM3_STRUCTURE_EOS, ESM3_STRUCTURE_PAD].contains(&t) {
            assert!(!mk && id == t, "special id {t} at {i} was masked");
        } else {
            let r = m.rates[i / l];
            eligible += 1;
            expected += r;
            var += r * (1.0 - r);
        }
    }
    // Rate among eligible positions only: within 3 binomial SEs of Σ r_i.
    let got = m.masked_count() as f64;
    assert!(
        (got - expected).abs() < 3.0 * var.sqrt(),
        "{got} vs {expected} of {eligible}"
    );

    // Full dropout masks every eligible position and nothing else.
    let all = mask_tokens(
        &tokens,
        l,
        &Schedule::Cosine,
        &cfg.clone().with_track_dropout(1.0),
        3,
    )
    .unwrap();
    assert_eq!(all.masked_count(), eligible);
    assert!(all.dropped.iter().all(|&d| d) && all.rates.iter().all(|&r| r == 1.0));

    // Tokens that already are MASK are left alone (they have no target).
    let pre = vec![ESM3_STRUCTURE_MASK; l];
    let m = mask_tokens(&pre, l, &Schedule::Cubic, &cfg, 0).unwrap();
    assert_eq!(m.masked_count(), 0);
}

#[test]
fn masking_is_deterministic_and_independent_of_threads() {
    let (b, l) = (3000, 50);
    let tokens = plain_tokens(b, l);
    let cfg = MaskConfig::new(9999).with_track_dropout(0.3);
    let run = |threads: usize, seed: u64| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| mask_tokens(&tokens, l, &Schedule::Cosine, &cfg, seed).unwrap())
    };
    let a = run(1, 42);
    assert_eq!(a, run(4, 42));
    assert_eq!(a, run(3, 42));
    let c = run(4, 43);
    assert_ne!(a.mask, c.mask);
    assert_ne!(a.rates, c.rates);
}

#[test]
fn track_dropout_rate_and_esm3_table() {
    let table = [
        (Track::Sequence, Schedule::BetaLinear30, 0.0),
        (Track::Structure, Schedule::Cosine, 0.25),
        (Track::Coordinates, Schedule::Cubic, 0.5),
        (Track::Annotations, Schedule::SquareRoot, 0.9),
    ];
    for (track, schedule, p) in table {
        assert_eq!(track.esm3_schedule(), schedule, "{track:?}");
        assert_eq!(track.esm3_dropout(), p, "{track:?}");
    }

    let (b, l) = (20_000, 16);
    let tokens = plain_tokens(b, l);
    for (track, _, p) in table {
        let cfg = MaskConfig::new(9999).with_track_dropout(track.esm3_dropout());
        let m = mask_tokens(&tokens, l, &track.esm3_schedule(), &cfg, 8).unwrap();
        let dropped = m.dropped.iter().filter(|&&d| d).count() as f64 / b as f64;
        let se = (p * (1.0 - p) / b as f64).sqrt().max(1e-12);
        eprintln!("{track:?}: dropped fraction {dropped:.4} (p = {p}, SE {se:.4})");
        assert!(
            (dropped - p).abs() <= 3.0 * se,
            "{track:?}: {dropped} vs {p}"
        );
        for i in (0..b).filter(|&i| m.dropped[i]) {
            assert!(m.mask[i * l..(i + 1) * l].iter().all(|&x| x));
            assert_eq!(m.rates[i], 1.0);
        }
    }
}

/// A user schedule that returns whatever it is told: used for the edge rates and bad rates.
struct Constant(f64);
impl NoiseSchedule for Constant {
    fn name(&self) -> &str {
        "constant"
    }
    fn sample(&self, _rng: &mut dyn RngCore) -> f64 {
        self.0
    }
    fn rate(&self, _t: f64) -> Option<f64> {
        Some(self.0)
    }
}

#[test]
fn edge_rates_user_schedules_and_bad_input() {
    let tokens = plain_tokens(10, 100);
    let cfg = MaskConfig::new(9999);
    assert_eq!(
        mask_tokens(&tokens, 100, &Constant(0.0), &cfg, 1)
            .unwrap()
            .masked_count(),
        0
    );
    assert_eq!(
        mask_tokens(&tokens, 100, &Constant(1.0), &cfg, 1)
            .unwrap()
            .masked_count(),
        1000
    );
    let quartic = FnSchedule::new("quartic", |t: f64| 1.0 - t.powi(4));
    let r = sample_rates(&quartic, 200_000, 2).unwrap();
    let mean = r.iter().sum::<f64>() / r.len() as f64;
    assert!(
        (mean - 0.8).abs() < 3.0 * (0.0711111f64 / 2e5).sqrt(),
        "{mean}"
    ); // Var = 16/225

    let invalid = |e: Error| assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    for bad in [1.5, -0.1, f64::NAN] {
        invalid(mask_tokens(&tokens, 100, &Constant(bad), &cfg, 1).unwrap_err());
        invalid(sample_rates(&Constant(bad), 3, 1).unwrap_err());
        invalid(masked_after_step(&Constant(bad), 0, 4, 10).unwrap_err());
    }
    invalid(mask_tokens(&tokens, 0, &Schedule::Cosine, &cfg, 1).unwrap_err());
    assert!(matches!(
        mask_tokens(&tokens, 7, &Schedule::Cosine, &cfg, 1),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        mask_tokens(&[], 7, &Schedule::Cosine, &cfg, 1),
        Err(Error::Empty { .. })
    ));
    for p in [1.5, -0.5, f64::NAN] {
        invalid(
            mask_tokens(
                &tokens,
                100,
                &Schedule::Cosine,
                &cfg.clone().with_track_dropout(p),
                1,
            )
            .unwrap_err(),
        );
    }
    invalid(
        mask_tokens(
            &tokens,
            100,
            &Schedule::Cosine,
            &MaskConfig::new(3).with_pad(3),
            1,
        )
        .unwrap_err(),
    );
}

// ---------------------------------------------------------------- iterative decoding

#[test]
fn decoding_counts_for_esm3_cosine_20_steps() {
    // int(cos((s+1)/20 · π/2) · M + 0.1), worked out by hand (e.g. M = 100, s = 9:
    // cos(π/4)·100 + 0.1 = 70.81 → 70; s = 18: cos(0.95·π/2)·100 + 0.1 = 7.95 → 7).
    let m100 = [
        99, 98, 97, 95, 92, 89, 85, 81, 76, 70, 65, 58, 52, 45, 38, 31, 23, 15, 7, 0,
    ];
    assert_eq!(decoding_plan(&Schedule::Cosine, 20, 100).unwrap(), m100);
    let m256 = [
        255, 252, 249, 243, 236, 228, 218, 207, 194, 181, 166, 150, 133, 116, 98, 79, 59, 40, 20, 0,
    ];
    assert_eq!(decoding_plan(&Schedule::Cosine, 20, 256).unwrap(), m256);
    // M = 10: the + 0.1 keeps all 10 masked after step 0 (9.97 + 0.1 → 10).
    let m10 = [10, 9, 9, 9, 9, 9, 8, 8, 7, 7, 6, 5, 5, 4, 3, 3, 2, 1, 0, 0];
    assert_eq!(decoding_plan(&Schedule::Cosine, 20, 10).unwrap(), m10);
    for (s, &want) in m100.iter().enumerate() {
        assert_eq!(
            masked_after_step(&Schedule::Cosine, s, 20, 100).unwrap(),
            want
        );
    }
    // Linear, M = S = 10: 1 − 0.3 = 0.6999… in f64; the + 0.1 still gives 7 (one per step).
    assert_eq!(
        decoding_plan(&Schedule::Linear, 10, 10).unwrap(),
        [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    );
    assert_eq!(decoding_plan(&Schedule::Cubic, 1, 50).unwrap(), [0]);
    assert_eq!(decoding_plan(&Schedule::Cosine, 20, 0).unwrap(), [0; 20]);
    // Errors, not panics.
    let invalid = |e: Error| assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    invalid(decoding_plan(&Schedule::Cosine, 0, 10).unwrap_err());
    invalid(masked_after_step(&Schedule::Cosine, 20, 20, 10).unwrap_err());
    let e = decoding_plan(&Schedule::BetaLinear30, 20, 10).unwrap_err();
    assert!(e.to_string().contains("betalinear30"), "{e}");
}

// ---------------------------------------------------------------- the CLI

#[test]
fn cli_prints_rates_as_csv() {
    let out = ok(&vqx(&[
        "schedule",
        "cosine",
        "square_root_schedule,cubic",
        "--points",
        "5",
    ]))
    .0;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "t,cosine,square_root,cubic");
    assert_eq!(lines.len(), 6);
    for (i, line) in lines[1..].iter().enumerate() {
        let v: Vec<f64> = line.split(',').map(|x| x.parse().unwrap()).collect();
        let t = i as f64 / 4.0;
        assert_eq!(v[0], t);
        for (k, s) in [Schedule::Cosine, Schedule::SquareRoot, Schedule::Cubic]
            .into_iter()
            .enumerate()
        {
            assert!(
                (v[k + 1] - closed_form(s, t).unwrap()).abs() < 1e-15,
                "{line}"
            );
        }
    }

    // betalinear30 has no r(t): an empty column and a note, not a failure.
    let o = vqx(&["schedule", "linear", "betalinear30", "--points", "3"]);
    let out = ok(&o).0;
    assert_eq!(out, "t,linear,betalinear30\n0,1,\n0.5,0.5,\n1,0,\n");
    assert!(stderr(&o).contains("betalinear30 is a sampler"));
}

#[test]
fn cli_samples_are_seeded_csv() {
    let args = [
        "schedule",
        "betalinear30",
        "linear",
        "--samples",
        "20000",
        "--seed",
        "9",
    ];
    let o = vqx(&args);
    let out = ok(&o).0;
    assert_eq!(out, ok(&vqx(&args)).0, "same seed, same output");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "sample,betalinear30,linear");
    assert_eq!(lines.len(), 20_001);
    // The column is exactly what the library draws for that seed.
    let lib = sample_rates(&Schedule::BetaLinear30, 20_000, 9).unwrap();
    for (line, want) in lines[1..].iter().zip(&lib) {
        let got: f64 = line.split(',').nth(1).unwrap().parse().unwrap();
        assert_eq!(got, *want);
    }
    let err = stderr(&o);
    assert!(err.contains("betalinear30: mean of 20000 samples"), "{err}");
}

#[test]
fn cli_unknown_name_and_bad_options_fail_with_the_valid_names() {
    let o = vqx(&["schedule", "cosine", "cosinus"]);
    let err = expect_error(&o, &["square_root_schedule"]);
    for s in Schedule::ALL {
        assert!(err.contains(s.as_str()), "{err}");
    }
    assert!(o.stdout.is_empty());

    for args in [
        &["schedule", "cosine", "--points", "1"][..],
        &["schedule", "cosine", "--samples", "0"][..],
        &["schedule", ","][..],
    ] {
        expect_error(&vqx(args), &[]);
    }
}

#[test]
fn cli_plot_writes_an_svg_with_curves_and_densities() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("schedules.svg");
    let o = vqx(&[
        "schedule",
        "cosine,cubic,betalinear30",
        "--samples",
        "20000",
        "--plot",
        path.to_str().unwrap(),
    ]);
    ok(&o);
    let text = std::fs::read_to_string(&path).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("the plot is well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");

    // Curves: plotters draws a line series as one <polyline>; ours have hundreds of points
    // (axis ticks and legend swatches have 2). Two r(t) curves (betalinear30 has none) and three
    // closed-form densities.
    let long_lines = root
        .descendants()
        .filter(|n| n.has_tag_name("polyline") || n.has_tag_name("path"))
        .filter(|n| {
            let pts = n.attribute("points").or(n.attribute("d")).unwrap_or("");
            pts.split_whitespace().count() > 50
        })
        .count();
    assert!(long_lines >= 5, "{long_lines} long curves");
    // Histogram bars: 50 bins per schedule.
    let rects = root
        .descendants()
        .filter(|n| n.has_tag_name("rect"))
        .count();
    assert!(rects >= 3 * 50, "{rects} rects");
    let texts: String = root
        .descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect();
    for needle in [
        "mask rate r(t)",
        "cosine: density of r",
        "cubic: density of r",
        "betalinear30: density of r",
        "20000 samples",
    ] {
        assert!(texts.contains(needle), "plot lacks {needle:?}");
    }
    // No temporary file left beside it.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
