//! `vqx schedule`: print noise schedules as CSV (r(t) on a grid, or seeded samples of r) and plot
//! r(t) with the density of r, analytic against a histogram of samples (SPEC §6's check).

use super::args::count;
use super::report::{legend, line_mark, plot_error};
use plotters::prelude::*;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use vqx::schedule::{NoiseSchedule, Schedule, sample_rates};
use vqx::{Error, Result};

/// Samples behind the plot's histograms when `--samples` is not given.
const DEFAULT_PLOT_SAMPLES: usize = 200_000;
/// Histogram bins over [0, 1].
const BINS: usize = 50;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Schedules: cosine, linear, square_root (or square_root_schedule), square, cubic,
    /// betalinear30; several may be given, separated by spaces or commas.
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
    /// Grid points t = 0, 1/(N−1), …, 1 for the r(t) table.
    #[arg(long, default_value_t = 11, value_name = "N")]
    pub points: usize,
    /// Print M seeded samples of r per schedule instead of the r(t) table (and a summary of
    /// their means against the closed form on stderr).
    #[arg(long, value_name = "M", value_parser = count::<usize>)]
    pub samples: Option<usize>,
    /// Seed for the samples.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Also draw r(t) and the density of r (analytic and a histogram of the samples) to this SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

fn parse_names(names: &[String]) -> Result<Vec<Schedule>> {
    let mut out = Vec::new();
    for name in names.iter().flat_map(|n| n.split(',')) {
        if name.trim().is_empty() {
            continue;
        }
        let s: Schedule = name.parse()?;
        if !out.contains(&s) {
            out.push(s);
        }
    }
    if out.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "no schedule named; valid names: {}",
            Schedule::valid_names()
        )));
    }
    Ok(out)
}

pub fn run(args: Args) -> Result<()> {
    let schedules = parse_names(&args.names)?;
    if args.points < 2 {
        return Err(Error::InvalidArgument(format!(
            "--points {} is too few: the grid needs t = 0 and t = 1",
            args.points
        )));
    }

    let samples = match args
        .samples
        .or(args.plot.as_ref().map(|_| DEFAULT_PLOT_SAMPLES))
    {
        Some(m) => Some(
            schedules
                .iter()
                .map(|s| sample_rates(s, m, args.seed))
                .collect::<Result<Vec<_>>>()?,
        ),
        None => None,
    };

    let mut csv = String::new();
    match (&args.samples, &samples) {
        (Some(m), Some(draws)) => {
            write_samples_csv(&mut csv, &schedules, *m, draws);
            for (s, d) in schedules.iter().zip(draws) {
                eprintln!("{}", mean_summary(s, d));
            }
        }
        _ => {
            write_rate_csv(&mut csv, &schedules, args.points);
            for s in schedules.iter().filter(|s| s.rate(0.0).is_none()) {
                eprintln!(
                    "note: {s} is a sampler with no r(t): its column is empty; \
                     use --samples M to draw it"
                );
            }
        }
    }
    let mut out = std::io::stdout().lock();
    // A closed pipe (`| head`) is not worth an error message.
    let _ = out.write_all(csv.as_bytes()).and_then(|_| out.flush());

    if let (Some(path), Some(draws)) = (&args.plot, &samples) {
        let svg = plot_svg(&schedules, draws, args.seed)?;
        vqx::atomic::write_atomic(path, svg.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn write_rate_csv(csv: &mut String, schedules: &[Schedule], points: usize) {
    csv.push('t');
    for s in schedules {
        let _ = write!(csv, ",{s}");
    }
    csv.push('\n');
    for i in 0..points {
        let t = i as f64 / (points - 1) as f64;
        let _ = write!(csv, "{t}");
        for s in schedules {
            csv.push(',');
            if let Some(r) = s.rate(t) {
                let _ = write!(csv, "{r}");
            }
        }
        csv.push('\n');
    }
}

fn write_samples_csv(csv: &mut String, schedules: &[Schedule], m: usize, draws: &[Vec<f64>]) {
    csv.push_str("sample");
    for s in schedules {
        let _ = write!(csv, ",{s}");
    }
    csv.push('\n');
    for i in 0..m {
        let _ = write!(csv, "{i}");
        for d in draws {
            let _ = write!(csv, ",{}", d[i]);
        }
        csv.push('\n');
    }
}

/// "cosine: mean of 1000000 samples 0.63648, closed form 0.63662, SE 0.00031, z −0.45".
fn mean_summary(s: &Schedule, d: &[f64]) -> String {
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n;
    match (s.mean(), s.variance()) {
        (Some(mu), Some(var)) => {
            let se = (var / n).sqrt();
            format!(
                "{s}: mean of {} samples {mean:.5}, closed form {mu:.5}, SE {se:.5}, z {:.2}",
                d.len(),
                (mean - mu) / se
            )
        }
        _ => format!("{s}: mean of {} samples {mean:.5}", d.len()),
    }
}

/// Colour per schedule, fixed by its place in `Schedule::ALL` so a schedule keeps its colour
/// whichever others are plotted with it.
fn colour(s: Schedule) -> RGBColor {
    const COLOURS: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    let i = Schedule::ALL.iter().position(|&k| k == s).unwrap_or(0);
    COLOURS[i % COLOURS.len()]
}

/// Top: r(t) for the schedules that have one. Below, one panel per schedule: the histogram of
/// its samples (as a density) under the closed-form density of r.
fn plot_svg(schedules: &[Schedule], draws: &[Vec<f64>], seed: u64) -> Result<String> {
    let cols = schedules.len().min(3);
    let rows = schedules.len().div_ceil(cols);
    let (width, top_h, panel_h) = (1200u32, 420u32, 320u32);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, top_h + rows as u32 * panel_h))
            .into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let (top, bottom) = root.split_vertically(top_h);

        let caption = if schedules.iter().any(|s| s.rate(0.0).is_none()) {
            "mask rate r(t), t ~ U[0, 1] (betalinear30 is a sampler: density panel only)"
        } else {
            "mask rate r(t), t ~ U[0, 1]"
        };
        let mut chart = ChartBuilder::on(&top)
            .caption(caption, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1f64, 0f64..1.02f64)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .max_light_lines(0)
            .x_desc("t")
            .y_desc("r(t)")
            .draw()
            .map_err(plot_error)?;
        let mut any_curve = false;
        for &s in schedules {
            if s.rate(0.0).is_none() {
                continue; // a sampler: shown in its density panel only
            }
            any_curve = true;
            let c = colour(s);
            let curve = (0..=400).filter_map(move |i| {
                let t = i as f64 / 400.0;
                s.rate(t).map(|r| (t, r))
            });
            chart
                .draw_series(LineSeries::new(curve, c.stroke_width(2)))
                .map_err(plot_error)?
                .label(s.as_str())
                .legend(line_mark(c, 2));
        }
        if any_curve {
            legend(&mut chart, SeriesLabelPosition::UpperRight, 12)?;
        }

        let panels = bottom.split_evenly((rows, cols));
        for ((&s, d), panel) in schedules.iter().zip(draws).zip(panels.iter()) {
            density_panel(panel, s, d, seed)?;
        }
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

fn density_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    s: Schedule,
    d: &[f64],
    seed: u64,
) -> Result<()> {
    let width = 1.0 / BINS as f64;
    let mut counts = [0usize; BINS];
    for &r in d {
        // r = 1 (cosine at t = 0) belongs to the last bin, not one past it.
        counts[((r / width) as usize).min(BINS - 1)] += 1;
    }
    let heights: Vec<f64> = counts
        .iter()
        .map(|&c| c as f64 / (d.len() as f64 * width))
        .collect();
    // Headroom above the tallest bar keeps the legend off the bars.
    let y_max = heights.iter().cloned().fold(1.0, f64::max) * 1.35;

    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "{s}: density of r (mean {:.3})",
                s.mean().unwrap_or(f64::NAN)
            ),
            ("sans-serif", 17),
        )
        .margin(10)
        .x_label_area_size(32)
        .y_label_area_size(45)
        .build_cartesian_2d(0f64..1f64, 0f64..y_max)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .max_light_lines(0)
        .x_desc("r")
        .y_desc("density")
        .x_labels(6)
        .y_labels(6)
        .draw()
        .map_err(plot_error)?;
    let c = colour(s);
    chart
        .draw_series(heights.iter().enumerate().map(|(i, &h)| {
            let x0 = i as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width, h)], c.mix(0.35).filled())
        }))
        .map_err(plot_error)?
        .label(format!("{} samples, seed {seed}", d.len()))
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], c.mix(0.35).filled()));
    // The density is unbounded as r → 1 for cosine, square and cubic: the curve stops where it
    // leaves the panel rather than being drawn off it.
    let curve: Vec<(f64, f64)> = (0..=500)
        .map(|i| i as f64 / 500.0)
        .filter_map(|r| s.density(r).map(|p| (r, p)))
        .take_while(|&(_, p)| p.is_finite() && p <= y_max)
        .collect();
    chart
        .draw_series(LineSeries::new(curve, BLACK.stroke_width(2)))
        .map_err(plot_error)?
        .label("closed-form density")
        .legend(line_mark(BLACK, 2));
    legend(&mut chart, SeriesLabelPosition::UpperMiddle, 13)
}
