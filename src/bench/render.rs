//! The text table of `vqx bench`.

use super::BenchReport;
use std::fmt::Write as _;

impl BenchReport {
    /// The report as an aligned text table.
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(
            s,
            "vqx {} bench, {} ({} metric, median of {} runs, seed {:#x})",
            self.vqx_version, self.date, self.metric, self.reps, self.seed
        );
        let _ = writeln!(s, "backend: {}", self.backend_description);
        let _ = writeln!(
            s,
            "machine: {} {}, {}, {} rayon threads{}",
            m.os,
            m.arch,
            m.cpu_model.as_deref().unwrap_or("unknown CPU"),
            m.rayon_threads,
            match (&m.gpu, m.compute_capability) {
                (Some(g), Some((a, b))) => format!(", GPU {g} (sm_{a}{b})"),
                (Some(g), None) => format!(", GPU {g}"),
                _ => String::new(),
            }
        );
        let f = &self.floors;
        let _ = writeln!(
            s,
            "floors: nearest {:.0} GFLOP/s ({}); memory {:.1} GB/s ({})",
            f.compute_gflops, f.compute_source, f.bandwidth_gbs, f.bandwidth_source
        );
        for r in &self.results {
            let sh = r.shape;
            let _ = writeln!(s);
            let _ = write!(s, "N={} D={} K={}", sh.n, sh.dim, sh.codes);
            if let Some(cap) = r.flop_cap {
                let _ = write!(
                    s,
                    "  (N scaled down from {} for the {} backend: 2·N·K·D ≤ {cap:.0e} flops)",
                    r.requested.n, self.backend
                );
            }
            let _ = writeln!(s, "  [{}]", r.timed_with);
            let _ = writeln!(
                s,
                "  {:<24} {:>10} {:>12} {:>15} {:>10} {:>9}",
                "primitive", "ms", "vectors/s", "rate", "floor ms", "of floor"
            );
            for p in &r.primitives {
                let rate = match (p.gflops, p.gbs) {
                    (Some(g), _) => format!("{g:.1} GFLOP/s"),
                    (None, Some(b)) => format!("{b:.1} GB/s"),
                    _ => String::new(),
                };
                let _ = writeln!(
                    s,
                    "  {:<24} {:>10.3} {:>12.3e} {:>15} {:>10.3} {:>8.1}%",
                    p.name,
                    p.ms,
                    p.vectors_per_s,
                    rate,
                    p.floor_ms,
                    100.0 * p.floor_fraction
                );
            }
            if let (Some(ms), Some(rc)) = (r.nearest_end_to_end_ms, r.rechecked_rows) {
                let _ = writeln!(
                    s,
                    "  nearest end to end (upload, kernel, download, recheck): {ms:.3} ms, \
                     {rc} of {} rows rechecked ({:.2}%)",
                    sh.n,
                    100.0 * rc as f64 / sh.n.max(1) as f64
                );
            }
            if let Some(t) = &r.transfers {
                let per: Vec<String> = t
                    .iter()
                    .map(|(name, t)| format!("{name} {} in / {} out", t.h2d_bytes, t.d2h_bytes))
                    .collect();
                let _ = writeln!(s, "  bytes per call (host ↔ device): {}", per.join("; "));
            }
        }
        s
    }
}
