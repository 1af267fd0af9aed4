//! Results as rows: a CSV file per scenario, a table on the terminal, and the calibration report.
//!
//! One [`Row`] per run. The CSV columns are the [`Row`] fields in order, with a header line;
//! [`read_csv`] reads them back (for `shoal-sim plot`). Byte ratios are over the image size, so
//! "1.0" means one copy of the image.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, bail};

use crate::fleet::{RunResult, Timeline};
use crate::scenario::{Mode, Scenario};

/// One run, summarised.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Scenario name.
    pub scenario: String,
    /// `swarm` or `central`.
    pub mode: String,
    /// Pullers.
    pub nodes: u32,
    /// Sites of pullers.
    pub sites: u32,
    /// Image size.
    pub image_bytes: u64,
    /// Median completion time of the pullers that completed, seconds.
    pub p50_secs: f64,
    /// 99th percentile.
    pub p99_secs: f64,
    /// Slowest (all done).
    pub max_secs: f64,
    /// The image over the narrowest link a copy must cross, alone.
    pub ideal_secs: f64,
    /// `max_secs / ideal_secs`.
    pub max_over_ideal: f64,
    /// Bytes the publisher sent.
    pub publisher_egress_bytes: f64,
    /// That over the image size.
    pub egress_copies: f64,
    /// Most bytes into one site over its WAN link, over the image size (0 with one site).
    pub wan_in_max_copies: f64,
    /// Mean over sites.
    pub wan_in_mean_copies: f64,
    /// Most bytes out of one site over its WAN link, over the image size.
    pub wan_out_max_copies: f64,
    /// Bytes received and discarded (cancelled or duplicate), over the image size.
    pub wasted_copies: f64,
    /// Pullers that completed.
    pub completed: usize,
    /// Pullers.
    pub total: u32,
    /// Requests answered "busy" (all streams busy, or the chunk on its way already).
    pub refused: u64,
    /// Downloads that stalled and were retried.
    pub stalls: u64,
    /// Wall-clock seconds the simulation took.
    pub wall_secs: f64,
}

/// The CSV header.
pub const HEADER: &str = "scenario,mode,nodes,sites,image_bytes,p50_secs,p99_secs,max_secs,\
ideal_secs,max_over_ideal,publisher_egress_bytes,egress_copies,wan_in_max_copies,\
wan_in_mean_copies,wan_out_max_copies,wasted_copies,completed,total,refused,stalls,wall_secs";

impl Row {
    /// Summarises `result`, a run of `scenario`.
    pub fn new(scenario: &Scenario, result: &RunResult) -> Row {
        let image = scenario.image_bytes as f64;
        let nan = f64::NAN;
        let max = if result.completed() == result.nodes as usize {
            result.quantile(1.0).unwrap_or(nan)
        } else {
            f64::INFINITY
        };
        let ideal = scenario.ideal_secs();
        let wan_in: Vec<f64> = result.wan_bytes.iter().map(|w| w.0 / image).collect();
        let wan_out: Vec<f64> = result.wan_bytes.iter().map(|w| w.1 / image).collect();
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let top = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        Row {
            scenario: scenario.name.clone(),
            mode: match scenario.mode {
                Mode::Swarm => "swarm",
                Mode::Central => "central",
            }
            .into(),
            nodes: result.nodes,
            sites: result.sites,
            image_bytes: result.image_bytes,
            p50_secs: result.quantile(0.5).unwrap_or(nan),
            p99_secs: result.quantile(0.99).unwrap_or(nan),
            max_secs: max,
            ideal_secs: ideal,
            max_over_ideal: max / ideal,
            publisher_egress_bytes: result.publisher_egress(),
            egress_copies: result.publisher_egress() / image,
            wan_in_max_copies: top(&wan_in),
            wan_in_mean_copies: mean(&wan_in),
            wan_out_max_copies: top(&wan_out),
            wasted_copies: result.wasted_bytes / image,
            completed: result.completed(),
            total: result.nodes,
            refused: result.refused,
            stalls: result.stalls,
            wall_secs: result.wall_secs,
        }
    }

    /// The row as a CSV line (no newline).
    pub fn csv(&self) -> String {
        format!(
            "{},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.0},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{},{},{:.2}",
            self.scenario,
            self.mode,
            self.nodes,
            self.sites,
            self.image_bytes,
            self.p50_secs,
            self.p99_secs,
            self.max_secs,
            self.ideal_secs,
            self.max_over_ideal,
            self.publisher_egress_bytes,
            self.egress_copies,
            self.wan_in_max_copies,
            self.wan_in_mean_copies,
            self.wan_out_max_copies,
            self.wasted_copies,
            self.completed,
            self.total,
            self.refused,
            self.stalls,
            self.wall_secs,
        )
    }

    fn parse(line: &str) -> anyhow::Result<Row> {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != HEADER.split(',').count() {
            bail!("expected {} fields", HEADER.split(',').count());
        }
        let num = |i: usize| -> anyhow::Result<f64> {
            f[i].trim()
                .parse::<f64>()
                .with_context(|| format!("field {i}: {:?}", f[i]))
        };
        let int = |i: usize| -> anyhow::Result<u64> {
            f[i].trim()
                .parse::<u64>()
                .with_context(|| format!("field {i}: {:?}", f[i]))
        };
        Ok(Row {
            scenario: f[0].into(),
            mode: f[1].into(),
            nodes: u32::try_from(int(2)?)?,
            sites: u32::try_from(int(3)?)?,
            image_bytes: int(4)?,
            p50_secs: num(5)?,
            p99_secs: num(6)?,
            max_secs: num(7)?,
            ideal_secs: num(8)?,
            max_over_ideal: num(9)?,
            publisher_egress_bytes: num(10)?,
            egress_copies: num(11)?,
            wan_in_max_copies: num(12)?,
            wan_in_mean_copies: num(13)?,
            wan_out_max_copies: num(14)?,
            wasted_copies: num(15)?,
            completed: usize::try_from(int(16)?)?,
            total: u32::try_from(int(17)?)?,
            refused: int(18)?,
            stalls: int(19)?,
            wall_secs: num(20)?,
        })
    }
}

/// Writes `rows` as CSV to `path`.
pub fn write_csv(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let mut out = String::from(HEADER);
    out.push('\n');
    for row in rows {
        out.push_str(&row.csv());
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// Reads a CSV written by [`write_csv`].
pub fn read_csv(path: &Path) -> anyhow::Result<Vec<Row>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        bail!("{}: not a shoal-sim CSV (header differs)", path.display());
    }
    lines
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| Row::parse(l).with_context(|| format!("{} line {}", path.display(), i + 2)))
        .collect()
}

/// A readable table of `rows`.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<11} {:<7} {:>6} {:>5} {:>9} {:>9} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>11} {:>8}",
        "scenario",
        "mode",
        "nodes",
        "sites",
        "p50 s",
        "p99 s",
        "max s",
        "ideal s",
        "max/id",
        "egress",
        "wanin^",
        "wanin~",
        "wasted",
        "done",
        "wall s"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<11} {:<7} {:>6} {:>5} {:>9.2} {:>9.2} {:>9.2} {:>8.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>11} {:>8.1}",
            r.scenario,
            r.mode,
            r.nodes,
            r.sites,
            r.p50_secs,
            r.p99_secs,
            r.max_secs,
            r.ideal_secs,
            r.max_over_ideal,
            r.egress_copies,
            r.wan_in_max_copies,
            r.wan_in_mean_copies,
            r.wasted_copies,
            format!("{}/{}", r.completed, r.total),
            r.wall_secs
        );
    }
    out.push_str(
        "egress, wanin^ (most into one site), wanin~ (mean per site), wasted: copies of the image\n",
    );
    out
}

/// Where the pullers' time went in each run of a scenario: for every step of a download
/// ([`Timeline::STEPS`]), the median and the slowest puller's time, in multiples of one download
/// alone (`ideal`), and when the publisher had sent every chunk once and when it sent its last
/// byte. Start-up is the first three steps; the end game is the last two.
pub fn timeline_table(scenario: &Scenario, results: &[RunResult]) -> String {
    let ideal = scenario.ideal_secs();
    let mut out = String::new();
    let _ = write!(out, "{:<11} {:>6}", "timeline", "nodes");
    for step in Timeline::STEPS {
        let _ = write!(out, " {:>13}", step);
    }
    let _ = writeln!(out, " {:>8} {:>8}", "all out", "last out");
    for r in results {
        let _ = write!(out, "{:<11} {:>6}", scenario.name, r.nodes);
        let timelines: Vec<[f64; 6]> = r.timelines.iter().flatten().map(|t| t.steps()).collect();
        for step in 0..Timeline::STEPS.len() {
            let mut times: Vec<f64> = timelines.iter().map(|t| t[step]).collect();
            times.sort_by(f64::total_cmp);
            let cell = match (times.get(times.len().saturating_sub(1) / 2), times.last()) {
                (Some(p50), Some(max)) => format!("{:.3}/{:.3}", p50 / ideal, max / ideal),
                _ => "-".to_owned(),
            };
            let _ = write!(out, " {:>13}", cell);
        }
        let all_out = r
            .all_out_secs
            .map_or_else(|| "-".to_owned(), |t| format!("{:.3}", t / ideal));
        let _ = writeln!(
            out,
            " {:>8} {:>8.3}",
            all_out,
            r.publisher_last_secs / ideal
        );
    }
    out.push_str(
        "each step: median/slowest puller, in one-download times after it started; all out: every chunk left the publisher once; last out: its last byte\n",
    );
    out
}

/// One line of the calibration report.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// Pullers.
    pub nodes: u32,
    /// Simulated all-done time.
    pub simulated_secs: f64,
    /// Measured all-done time.
    pub measured_secs: f64,
    /// Simulated publisher egress, in copies of the image.
    pub simulated_egress: f64,
    /// Measured origin egress, in copies of the image, if known.
    pub measured_egress: Option<f64>,
}

impl Calibration {
    /// `(simulated - measured) / measured`, in percent.
    pub fn error_percent(&self) -> f64 {
        (self.simulated_secs - self.measured_secs) / self.measured_secs * 100.0
    }

    /// The same for the origin's egress, if it was measured.
    pub fn egress_error_percent(&self) -> Option<f64> {
        self.measured_egress
            .map(|m| (self.simulated_egress - m) / m * 100.0)
    }
}

/// The calibration table.
pub fn calibration_table(lines: &[Calibration]) -> String {
    let mut out = String::from(
        "| pullers | all-done simulated (s) | measured (s) | difference | origin egress simulated (copies) | measured | difference |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|\n");
    for c in lines {
        let (measured, diff) = match (c.measured_egress, c.egress_error_percent()) {
            (Some(m), Some(d)) => (format!("{m:.2}"), format!("{d:+.1}%")),
            _ => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.1} | {:+.1}% | {:.2} | {} | {} |",
            c.nodes,
            c.simulated_secs,
            c.measured_secs,
            c.error_percent(),
            c.simulated_egress,
            measured,
            diff
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Row {
        Row {
            scenario: "datacenter".into(),
            mode: "swarm".into(),
            nodes: 10,
            sites: 1,
            image_bytes: 1 << 30,
            p50_secs: 1.25,
            p99_secs: 1.5,
            max_secs: 1.5,
            ideal_secs: 0.859,
            max_over_ideal: 1.746,
            publisher_egress_bytes: 2e9,
            egress_copies: 1.863,
            wan_in_max_copies: 0.0,
            wan_in_mean_copies: 0.0,
            wan_out_max_copies: 0.0,
            wasted_copies: 0.125,
            completed: 10,
            total: 10,
            refused: 3,
            stalls: 0,
            wall_secs: 0.25,
        }
    }

    #[test]
    fn csv_round_trips() {
        let dir = std::env::temp_dir().join(format!("shoal-sim-csv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.csv");
        write_csv(&path, &[row(), row()]).unwrap();
        let back = read_csv(&path).unwrap();
        assert_eq!(back, vec![row(), row()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn calibration_error_is_relative_to_the_measurement() {
        let c = Calibration {
            nodes: 8,
            simulated_secs: 99.0,
            measured_secs: 90.0,
            simulated_egress: 1.5,
            measured_egress: Some(2.0),
        };
        assert!((c.error_percent() - 10.0).abs() < 1e-9);
        assert!((c.egress_error_percent().unwrap() + 25.0).abs() < 1e-9);
        let table = calibration_table(std::slice::from_ref(&c));
        assert!(table.contains("+10.0%") && table.contains("-25.0%"));
        let unmeasured = Calibration {
            measured_egress: None,
            ..c
        };
        assert!(calibration_table(&[unmeasured]).contains("| 1.50 | - | - |"));
    }
}
