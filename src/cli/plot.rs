//! `vqx plot DIR`: loss and codebook-usage curves of a `vqx train` run, from its metrics file,
//! as an SVG.

use super::report::{legend, line_mark, plot_error, read_lines};
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::ops::Range;
use std::path::{Path, PathBuf};
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

/// A labelled series: its colour and line width.
type Curve<'a> = (&'a str, &'a [(f64, f64)], RGBColor, u32);

/// A chart of a step-indexed panel.
type StepChart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn read(path: &Path) -> Result<Series> {
    let mut s = Series::default();
    for line in read_lines(path)? {
        let (n, line) = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
            Error::InvalidArgument(format!("{} line {n}: not JSON: {e}", path.display()))
        })?;
        let Some(step) = v.get("step").and_then(|x| x.as_f64()) else {
            return Err(Error::InvalidArgument(format!(
                "{} line {n}: no \"step\" field (not a vqx train metrics file?)",
                path.display(),
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

/// A panel over the steps `x` with values `y`, its y axis described and labelled by `y_label`.
fn step_chart<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    x: Range<f64>,
    y: Range<f64>,
    y_desc: &str,
    y_label: &dyn Fn(&f64) -> String,
) -> Result<StepChart<'a, DB>> {
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .max_light_lines(0)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(y_label)
        .x_desc("step")
        .y_desc(y_desc)
        .draw()
        .map_err(plot_error)?;
    Ok(chart)
}

/// The non-empty `curves`, their values through `f`, and their legend.
fn draw_curves<'a, DB: DrawingBackend + 'a>(
    chart: &mut StepChart<'a, DB>,
    curves: &[Curve],
    f: impl Fn(f64) -> f64,
) -> Result<()> {
    for &(label, data, c, width) in curves.iter().filter(|c| !c.1.is_empty()) {
        chart
            .draw_series(LineSeries::new(
                data.iter().map(|&(x, y)| (x, f(y))),
                c.stroke_width(width),
            ))
            .map_err(plot_error)?
            .label(label)
            .legend(line_mark(c, 2));
    }
    legend(chart, SeriesLabelPosition::UpperRight, 12)
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
        let mut chart = step_chart(
            &top,
            first..last,
            lo - pad..hi + pad,
            "loss (log scale)",
            &|y| format!("{:.3}", 10f64.powf(*y)),
        )?;
        let curves: [Curve; 3] = [
            ("train loss", &s.loss, RGBColor(31, 119, 180), 1),
            (
                "train reconstruction MSE",
                &s.reconstruction,
                RGBColor(255, 127, 14),
                1,
            ),
            (
                "held-out reconstruction MSE",
                &s.eval,
                RGBColor(44, 160, 44),
                3,
            ),
        ];
        draw_curves(&mut chart, &curves, f64::log10)?;

        let (_, hi) = range(&[&s.perplexity, &s.used]);
        let mut chart = step_chart(&bottom, first..last, 0.0..hi * 1.08, "codes", &|y| {
            format!("{y:.0}")
        })?;
        let curves: [Curve; 2] = [
            (
                "batch perplexity",
                &s.perplexity,
                RGBColor(148, 103, 189),
                1,
            ),
            ("codes used in the batch", &s.used, RGBColor(140, 86, 75), 1),
        ];
        draw_curves(&mut chart, &curves, |y| y)?;
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
