//! What the commands show and log, written once: the progress bar, the JSON-lines metrics log,
//! JSON text, and the pieces every SVG plot shares (its error, its legend box, a line's mark).

use indicatif::{ProgressBar, ProgressStyle};
use plotters::chart::{ChartContext, SeriesLabelPosition};
use plotters::coord::CoordTranslate;
use plotters::prelude::*;
use serde::Serialize;
use std::fs::File;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use vqx::error::IoContext;
use vqx::{Error, Result};

/// A bar over `len` steps with the message on its right; hidden with `--quiet`.
pub fn progress_bar(len: u64, quiet: bool) -> ProgressBar {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(len)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    bar
}

/// A JSON-lines metrics file, one object per step. Written as the run goes (not atomically), so
/// it can be watched and holds the steps done when a run is killed.
pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsLog {
    /// A new, empty log at `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).at(path)?;
        Ok(Self::on(path, file))
    }

    /// The log at `path` cut to the lines of steps ≤ `step` (a run may have logged steps after
    /// its last checkpoint), then opened for appending; a missing file starts empty.
    pub fn resume(path: &Path, step: u64) -> Result<Self> {
        let mut kept = String::new();
        if path.exists() {
            for line in read_lines(path)? {
                let (_, line) = line?;
                let s = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
                if s.is_some_and(|s| s <= step) {
                    kept.push_str(&line);
                    kept.push('\n');
                }
            }
        }
        vqx::atomic::write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .at(path)?;
        Ok(Self::on(path, file))
    }

    fn on(path: &Path, file: File) -> Self {
        Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        }
    }

    /// Appends `line` as one line of JSON.
    pub fn write(&mut self, line: &serde_json::Value) -> Result<()> {
        writeln!(self.out, "{line}").at(&self.path)
    }

    /// Everything written so far is in the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().at(&self.path)
    }
}

/// The lines of a text file, numbered from 1, each read error on `path`.
pub fn read_lines(path: &Path) -> Result<impl Iterator<Item = Result<(usize, String)>> + '_> {
    let f = File::open(path).at(path)?;
    Ok(std::io::BufReader::new(f)
        .lines()
        .enumerate()
        .map(move |(i, line)| Ok((i + 1, line.at(path)?))))
}

/// `value` as pretty JSON; `what` names it in the (internal) error.
pub fn json(value: &impl Serialize, what: &str) -> Result<String> {
    serde_json::to_string_pretty(value)
        .map_err(|e| Error::internal(format!("encoding {what} as JSON"), e))
}

/// A failure of plotters: not the input's fault.
pub fn plot_error(e: impl std::fmt::Display) -> Error {
    Error::internal("drawing the plot", e)
}

/// Draws the legend box every plot uses at `position`, its labels `font_px` high (plotters'
/// default is 12).
pub fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
    font_px: u32,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", font_px))
        .draw()
        .map_err(plot_error)
}

/// The legend mark of a line series: a short stroke of `colour`, `width` pixels wide.
pub fn line_mark<C: Color>(
    colour: C,
    width: u32,
) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    let style = colour.stroke_width(width);
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style)
}
