//! `vqx stats`: what a codebook file holds, and how its codes are used (SPEC §5).

use super::report::{json, legend, line_mark, plot_error};
use plotters::prelude::*;
use serde::Serialize;
use std::path::PathBuf;
use vqx::atomic::write_atomic;
use vqx::checkpoint::{CodebookFormat, LoadedCodebook, load_codebook};
use vqx::usage::{CountDistribution, perplexity};
use vqx::{Error, Result};

/// ESM3's dead-code threshold on the EMA counts N_k (SPEC §5).
const DEAD_BELOW: f64 = 1e-5;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A codebook file: .npy, vqx checkpoint, vector-quantize-pytorch or ESM3 state dict
    /// (safetensors).
    pub checkpoint: PathBuf,
    /// Also draw the code usage (EMA counts N_k, or cumulative usage) to this SVG file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    path: PathBuf,
    format: CodebookFormat,
    prefix: String,
    keys: Vec<String>,
    codes: usize,
    dim: usize,
    step: Option<u64>,
    initted: Option<bool>,
    /// L2 norms of the code rows.
    row_norms: CountDistribution,
    /// Every row has norm 1 (a cosine-mode codebook).
    unit_norm_rows: bool,
    /// The EMA counts N_k, when the file has them.
    ema: Option<EmaReport>,
    /// Cumulative usage counts (vqx checkpoints).
    usage: Option<UsageReport>,
}

#[derive(Serialize)]
struct EmaReport {
    /// mean, std (population), min, median, max of N_k.
    distribution: CountDistribution,
    sum: f64,
    dead_threshold: f64,
    /// Codes with N_k below the threshold.
    dead: usize,
    /// exp(−Σ p log(p + 1e-10)), p = N / ΣN.
    perplexity: f64,
}

#[derive(Serialize)]
struct UsageReport {
    total: f64,
    used: usize,
    perplexity: f64,
    distribution: CountDistribution,
}

fn report(path: PathBuf, l: &LoadedCodebook) -> Result<Report> {
    let norms: Vec<f64> = (0..l.k())
        .map(|i| {
            l.codebook
                .row(i)
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let ema = match &l.cluster_size {
        Some(n) => Some(EmaReport {
            distribution: CountDistribution::from_values(n)?,
            sum: n.iter().map(|&v| f64::from(v)).sum(),
            dead_threshold: DEAD_BELOW,
            dead: n.iter().filter(|&&v| f64::from(v) < DEAD_BELOW).count(),
            perplexity: perplexity(n),
        }),
        None => None,
    };
    let usage = match &l.usage_total {
        Some(u) => Some(UsageReport {
            total: u.iter().sum(),
            used: u.iter().filter(|&&c| c > 0.0).count(),
            perplexity: perplexity(u),
            distribution: CountDistribution::from_values(u)?,
        }),
        None => None,
    };
    Ok(Report {
        path,
        format: l.format,
        prefix: l.prefix.clone(),
        keys: l.keys.clone(),
        codes: l.k(),
        dim: l.d(),
        step: l.step,
        initted: l.initted,
        row_norms: CountDistribution::from_values(&norms)?,
        unit_norm_rows: l.rows_unit_norm(),
        ema,
        usage,
    })
}

fn dist_line(d: &CountDistribution) -> String {
    format!(
        "mean {}  std {} (population)  min {}  median {}  max {}",
        num(d.mean),
        num(d.std),
        num(d.min),
        num(d.median),
        num(d.max)
    )
}

/// Four significant digits, in plain or scientific notation as fits.
fn num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e-3 && v.abs() < 1e6 {
        let digits = (3 - v.abs().log10().floor() as i32).max(0) as usize;
        format!("{v:.digits$}")
    } else {
        format!("{v:.3e}")
    }
}

fn print_text(r: &Report) {
    println!("file:       {}", r.path.display());
    if r.prefix.is_empty() {
        println!("format:     {}", r.format);
    } else {
        println!("format:     {} (prefix `{}`)", r.format, r.prefix);
    }
    if !r.keys.is_empty() {
        println!("keys:       {}", r.keys.join(", "));
    }
    println!("codes K:    {}", r.codes);
    println!("dim D:      {}", r.dim);
    if let Some(s) = r.step {
        println!("step:       {s}");
    }
    if let Some(i) = r.initted {
        println!(
            "initted:    {i}{}",
            if i {
                ""
            } else {
                " (k-means init never ran: the codebook is not trained)"
            }
        );
    }
    println!("row norms:  {}", dist_line(&r.row_norms));
    if r.unit_norm_rows {
        println!("            every row has norm 1: a cosine-mode codebook (use --metric cosine)");
    }
    match &r.ema {
        Some(e) => {
            println!("EMA counts N_k: {}", dist_line(&e.distribution));
            println!("            sum {}", num(e.sum));
            println!(
                "dead:       {} of {} codes with N_k < {:e} ({:.1}%)",
                e.dead,
                r.codes,
                e.dead_threshold,
                100.0 * e.dead as f64 / r.codes as f64
            );
            println!(
                "perplexity: {} of {} (of N_k / ΣN)",
                num(e.perplexity),
                r.codes
            );
        }
        None => println!("EMA counts: none in this file"),
    }
    if let Some(u) = &r.usage {
        println!(
            "usage:      {} assignments, {} of {} codes used, perplexity {}",
            num(u.total),
            u.used,
            r.codes,
            num(u.perplexity)
        );
        println!("            per code: {}", dist_line(&u.distribution));
    }
}

pub fn run(args: Args) -> Result<()> {
    let loaded = load_codebook(&args.checkpoint)?;
    let r = report(args.checkpoint.clone(), &loaded)?;
    if args.json {
        println!("{}", json(&r, "the report")?);
    } else {
        print_text(&r);
    }
    if let Some(svg_path) = &args.svg {
        let (values, what): (Vec<f64>, &str) = match (&loaded.cluster_size, &loaded.usage_total) {
            (Some(n), _) => (n.iter().map(|&v| f64::from(v)).collect(), "EMA count N_k"),
            (None, Some(u)) => (u.clone(), "cumulative usage"),
            (None, None) => {
                return Err(Error::InvalidArgument(format!(
                    "--svg draws code usage, and {} ({}) holds no EMA counts or usage",
                    args.checkpoint.display(),
                    loaded.format
                )));
            }
        };
        let svg = usage_svg(&r, &values, what)?;
        write_atomic(svg_path, svg.as_bytes())?;
        if !args.json {
            println!("plot:       {}", svg_path.display());
        }
    }
    Ok(())
}

/// Left: the sorted-usage curve (codes ranked by their count, the count on a log axis), with
/// the dead threshold and the mean. Right: a histogram of log10 of the counts, codes per bin.
/// Log axes because counts are heavy-tailed (ESM3's: median 48, max 3376, min 0.0005): on a
/// linear axis nearly every code sits in the first bar, and the dead tail, orders of magnitude
/// below, is invisible. Zero counts are drawn at the axis floor (and counted in the caption).
fn usage_svg(r: &Report, values: &[f64], what: &str) -> Result<String> {
    let k = values.len();
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let max = sorted
        .first()
        .copied()
        .unwrap_or(1.0)
        .max(f64::MIN_POSITIVE);
    let min_pos = sorted.iter().rev().copied().find(|&v| v > 0.0);
    let zeros = sorted.iter().filter(|&&v| v <= 0.0).count();
    // Axis floor: a decade below the smallest positive count and the dead threshold.
    let floor_exp = min_pos.unwrap_or(max).min(DEAD_BELOW).log10().floor() - 1.0;
    let floor = 10f64.powf(floor_exp);
    let top = 10f64.powf(max.log10().ceil().max(floor_exp + 1.0));
    let mean = values.iter().sum::<f64>() / k as f64;
    let dead = values.iter().filter(|&&v| v < DEAD_BELOW).count();

    let (width, height) = (1200u32, 520u32);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let title = format!(
            "{} — K = {}, D = {}{} — {what}: perplexity {}, {} dead (< 1e-5){}",
            r.path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            r.codes,
            r.dim,
            r.step.map(|s| format!(", step {s}")).unwrap_or_default(),
            num(perplexity(values)),
            dead,
            if zeros > 0 {
                format!(", {zeros} zero (drawn at the floor)")
            } else {
                String::new()
            }
        );
        let root = root
            .titled(&title, ("sans-serif", 20))
            .map_err(plot_error)?;
        let (left, right) = root.split_horizontally(width * 11 / 20);

        let mut chart = ChartBuilder::on(&left)
            .caption("codes sorted by count", ("sans-serif", 17))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..k as f64, (floor..top).log_scale())
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("rank (most used first)")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_desc(what)
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .draw()
            .map_err(plot_error)?;
        let blue = RGBColor(31, 119, 180);
        let curve: Vec<(f64, f64)> = sorted
            .iter()
            .enumerate()
            .flat_map(|(i, &v)| {
                let y = v.max(floor);
                [(i as f64, y), (i as f64 + 1.0, y)]
            })
            .collect();
        chart
            .draw_series(LineSeries::new(curve, blue.stroke_width(2)))
            .map_err(plot_error)?
            .label(what)
            .legend(line_mark(blue, 2));
        let red = RGBColor(214, 39, 40);
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, DEAD_BELOW), (k as f64, DEAD_BELOW)],
                6,
                4,
                red.stroke_width(1),
            ))
            .map_err(plot_error)?
            .label("dead threshold 1e-5")
            .legend(line_mark(red, 1));
        let grey = RGBColor(110, 110, 110);
        if mean > 0.0 {
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, mean), (k as f64, mean)],
                    3,
                    3,
                    grey.stroke_width(1),
                ))
                .map_err(plot_error)?
                .label(format!("mean {}", num(mean)))
                .legend(line_mark(grey, 1));
        }
        legend(&mut chart, SeriesLabelPosition::LowerLeft, 12)?;

        // Histogram of log10(count): bins of a quarter decade; zeros go in the floor bin.
        let (lo, hi) = (floor.log10(), top.log10());
        let per_decade = 4.0;
        let bins = (((hi - lo) * per_decade).round() as usize).max(1);
        let mut counts = vec![0usize; bins];
        for &v in values {
            let x = v.max(floor).log10();
            let b = (((x - lo) * per_decade).floor() as usize).min(bins - 1);
            counts[b] += 1;
        }
        let ymax = counts.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.08;
        let mut hist = ChartBuilder::on(&right)
            .caption("histogram of log10(count)", ("sans-serif", 17))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(lo..hi, 0f64..ymax)
            .map_err(plot_error)?;
        hist.configure_mesh()
            .x_desc(format!("log10({what})"))
            .y_desc("codes")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(plot_error)?;
        hist.draw_series(
            counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(b, &c)| {
                    let x0 = lo + b as f64 / per_decade;
                    Rectangle::new(
                        [(x0, 0.0), (x0 + 1.0 / per_decade, c as f64)],
                        blue.mix(0.7).filled(),
                    )
                }),
        )
        .map_err(plot_error)?;
        hist.draw_series(DashedLineSeries::new(
            [(DEAD_BELOW.log10(), 0.0), (DEAD_BELOW.log10(), ymax)],
            6,
            4,
            red.stroke_width(1),
        ))
        .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}
