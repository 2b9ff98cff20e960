//! `vqx plot DIR`: loss and codebook-usage curves of a `vqx train` run, from its metrics file,
//! as an SVG.

use plotters::prelude::*;
use std::io::BufRead;
use std::path::PathBuf;
use vqx::{Error, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run directory `vqx train` wrote (reads DIR/metrics.jsonl).
    pub dir: PathBuf,
    /// SVG to write (default DIR/curves.svg).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

/// The series read from the metrics lines.
#[derive(Default)]
struct Series {
    loss: Vec<(f64, f64)>,
    reconstruction: Vec<(f64, f64)>,
    eval: Vec<(f64, f64)>,
    perplexity: Vec<(f64, f64)>,
    used: Vec<(f64, f64)>,
}

/// A labelled, coloured series.
type Curve<'a> = (&'a str, &'a [(f64, f64)], RGBColor);

fn plot_error(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("drawing the plot failed: {e}"))
}

fn read(path: &std::path::Path) -> Result<Series> {
    let f = std::fs::File::open(path).map_err(|e| Error::Io {
        path: path.into(),
        source: e,
    })?;
    let mut s = Series::default();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::Io {
            path: path.into(),
            source: e,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
            Error::InvalidArgument(format!("{} line {}: not JSON: {e}", path.display(), i + 1))
        })?;
        let Some(step) = v.get("step").and_then(|x| x.as_f64()) else {
            return Err(Error::InvalidArgument(format!(
                "{} line {}: no \"step\" field (not a vqx train metrics file?)",
                path.display(),
                i + 1
            )));
        };
        let push = |key: &str, out: &mut Vec<(f64, f64)>, positive: bool| {
            if let Some(y) = v.get(key).and_then(|x| x.as_f64())
                && y.is_finite()
                && (!positive || y > 0.0)
            {
                out.push((step, y));
            }
        };
        push("loss", &mut s.loss, true);
        push("reconstruction", &mut s.reconstruction, true);
        push("eval_reconstruction", &mut s.eval, true);
        push("perplexity", &mut s.perplexity, false);
        push("used", &mut s.used, false);
    }
    if s.loss.is_empty() {
        return Err(Error::Empty {
            what: format!("metrics {}", path.display()),
            detail: "no step with a loss to plot".into(),
        });
    }
    Ok(s)
}

fn range(series: &[&[(f64, f64)]]) -> (f64, f64) {
    let ys = series.iter().flat_map(|s| s.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    if lo == hi {
        (lo * 0.5, hi * 1.5 + 1e-9)
    } else {
        (lo, hi)
    }
}

fn svg(s: &Series, title: &str) -> Result<String> {
    let last = s.loss.last().map_or(1.0, |p| p.0).max(1.0);
    let first = s.loss.first().map_or(0.0, |p| p.0);
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1000, 760)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let root = root.titled(title, ("sans-serif", 20)).map_err(plot_error)?;
        let (top, bottom) = root.split_vertically(400);

        // Losses on a log axis, drawn as log10 values on a linear axis so every tick gets a
        // label (plotters' log axis labels only the powers of ten).
        let (lo, hi) = range(&[&s.loss, &s.reconstruction, &s.eval]);
        let (lo, hi) = (lo.log10(), hi.log10());
        let pad = 0.04 * (hi - lo).max(0.1);
        let mut chart = ChartBuilder::on(&top)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(first..last, lo - pad..hi + pad)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .max_light_lines(0)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{:.3}", 10f64.powf(*y)))
            .x_desc("step")
            .y_desc("loss (log scale)")
            .draw()
            .map_err(plot_error)?;
        let curves: [Curve; 3] = [
            ("train loss", &s.loss, RGBColor(31, 119, 180)),
            (
                "train reconstruction MSE",
                &s.reconstruction,
                RGBColor(255, 127, 14),
            ),
            (
                "held-out reconstruction MSE",
                &s.eval,
                RGBColor(44, 160, 44),
            ),
        ];
        for (label, data, c) in curves {
            if data.is_empty() {
                continue;
            }
            let width = if label.starts_with("held") { 3 } else { 1 };
            chart
                .draw_series(LineSeries::new(
                    data.iter().map(|&(x, y)| (x, y.log10())),
                    c.stroke_width(width),
                ))
                .map_err(plot_error)?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;

        let (_, hi) = range(&[&s.perplexity, &s.used]);
        let mut chart = ChartBuilder::on(&bottom)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(first..last, 0.0..hi * 1.08)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .max_light_lines(0)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .x_desc("step")
            .y_desc("codes")
            .draw()
            .map_err(plot_error)?;
        let curves: [Curve; 2] = [
            ("batch perplexity", &s.perplexity, RGBColor(148, 103, 189)),
            ("codes used in the batch", &s.used, RGBColor(140, 86, 75)),
        ];
        for (label, data, c) in curves {
            chart
                .draw_series(LineSeries::new(data.iter().copied(), c.stroke_width(1)))
                .map_err(plot_error)?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(out)
}

pub fn run(args: Args) -> Result<()> {
    let metrics = args.dir.join(super::train::METRICS_FILE);
    let s = read(&metrics)?;
    let title = format!("vqx train: {}", args.dir.display());
    let text = svg(&s, &title)?;
    let out = args.output.unwrap_or_else(|| args.dir.join("curves.svg"));
    vqx::atomic::write_atomic(&out, text.as_bytes())?;
    eprintln!(
        "plotted {} steps ({} held-out evaluations) to {}",
        s.loss.len(),
        s.eval.len(),
        out.display()
    );
    Ok(())
}
