//! Completion time against fleet size, swarm against central, as an SVG picture.
//!
//! Both axes are logarithmic: fleet sizes span 10 to 10,000 and a central registry's completion
//! time grows with the fleet while a swarm's stays near the ideal, so only log scales show both
//! curves. Lines: swarm median and slowest, central median and slowest, the ideal (the image
//! over one NIC, alone) and the swarm's target (twice the ideal).

use std::path::Path;

use anyhow::{Context, bail};
use plotters::prelude::*;

use crate::report::Row;

/// Draws the rollout plot from the swarm and central sweeps into `path` (SVG).
pub fn rollout(swarm: &[Row], central: &[Row], path: &Path) -> anyhow::Result<()> {
    let all: Vec<&Row> = swarm.iter().chain(central).collect();
    if all.is_empty() {
        bail!("nothing to plot");
    }
    let finite = |v: f64| v.is_finite() && v > 0.0;
    let xs: Vec<f64> = all.iter().map(|r| f64::from(r.nodes)).collect();
    let ys: Vec<f64> = all
        .iter()
        .flat_map(|r| [r.p50_secs, r.max_secs, r.ideal_secs, 2.0 * r.ideal_secs])
        .filter(|&v| finite(v))
        .collect();
    let (x_lo, x_hi) = bounds(&xs);
    let (y_lo, y_hi) = bounds(&ys);
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    let draw = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Rollout of one image: completion time vs fleet size",
            ("sans-serif", 22),
        )
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (x_lo * 0.8..x_hi * 1.25).log_scale(),
            (y_lo * 0.6..y_hi * 1.6).log_scale(),
        )
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .x_desc("pullers (log)")
        .y_desc("seconds (log)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| seconds(*y))
        .draw()
        .map_err(|e| draw(&e))?;
    let series = |rows: &[Row], f: fn(&Row) -> f64| -> Vec<(f64, f64)> {
        rows.iter()
            .map(|r| (f64::from(r.nodes), f(r)))
            .filter(|&(_, y)| finite(y))
            .collect()
    };
    // (label, points, colour, dashed)
    type Line = (&'static str, Vec<(f64, f64)>, RGBColor, bool);
    let lines: [Line; 6] = [
        ("swarm, median", series(swarm, |r| r.p50_secs), BLUE, false),
        ("swarm, slowest", series(swarm, |r| r.max_secs), BLUE, true),
        (
            "central, median",
            series(central, |r| r.p50_secs),
            RED,
            false,
        ),
        (
            "central, slowest",
            series(central, |r| r.max_secs),
            RED,
            true,
        ),
        (
            "ideal (image over one NIC)",
            series(swarm, |r| r.ideal_secs),
            BLACK,
            false,
        ),
        (
            "target for the swarm: 2 x ideal",
            series(swarm, |r| 2.0 * r.ideal_secs),
            BLACK,
            true,
        ),
    ];
    for (label, points, color, dashed) in lines {
        let style = if dashed {
            color.mix(0.55).stroke_width(2)
        } else {
            color.stroke_width(2)
        };
        chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(|e| draw(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&p| Circle::new(p, 4, color.mix(if dashed { 0.55 } else { 1.0 }))),
            )
            .map_err(|e| draw(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw(&e))?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))
}

/// A tick label: as many decimals as a log axis needs.
fn seconds(y: f64) -> String {
    if y >= 10.0 {
        format!("{y:.0}")
    } else if y >= 1.0 {
        format!("{y:.1}")
    } else {
        format!("{y:.2}")
    }
}

fn bounds(values: &[f64]) -> (f64, f64) {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(0.0, f64::max);
    if lo.is_finite() && hi > 0.0 {
        (lo, hi.max(lo * 1.01))
    } else {
        (1.0, 10.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(mode: &str, nodes: u32, p50: f64, max: f64) -> Row {
        Row {
            scenario: mode.into(),
            mode: mode.into(),
            nodes,
            sites: 1,
            image_bytes: 1 << 30,
            p50_secs: p50,
            p99_secs: max,
            max_secs: max,
            ideal_secs: 0.86,
            max_over_ideal: max / 0.86,
            publisher_egress_bytes: 0.0,
            egress_copies: 0.0,
            wan_in_max_copies: 0.0,
            wan_in_mean_copies: 0.0,
            wan_out_max_copies: 0.0,
            wasted_copies: 0.0,
            completed: nodes as usize,
            total: nodes,
            refused: 0,
            stalls: 0,
            wall_secs: 0.0,
        }
    }

    #[test]
    fn the_plot_is_an_svg_with_both_curves() {
        let dir = std::env::temp_dir().join(format!("shoal-sim-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rollout.svg");
        let swarm = [row("swarm", 10, 1.0, 1.2), row("swarm", 1000, 1.3, 1.6)];
        let central = [
            row("central", 10, 8.0, 8.6),
            row("central", 1000, 800.0, 860.0),
        ];
        rollout(&swarm, &central, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("swarm, median") && svg.contains("central, slowest"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
