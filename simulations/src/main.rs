//! `shoal-sim`: run rollout scenarios, plot them, calibrate against measured runs.
//!
//! ```text
//! shoal-sim run <scenario.toml> [--seed N] [--out DIR] [--nodes N,...]
//! shoal-sim plot <swarm.csv> <central.csv> [-o rollout.svg]
//! shoal-sim calibrate <calibration.toml> [--seed N]
//! shoal-sim all [--dir simulations/scenarios] [--out simulations/results]
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal_simulations::fleet;
use shoal_simulations::plot;
use shoal_simulations::report::{self, Calibration, Row};
use shoal_simulations::scenario::Scenario;

// A large run is bound by memory latency: its state (about 60 KB per node) is read at random,
// one have answer at a time. mimalloc backs its heap with transparent huge pages on Linux, so
// far fewer of those reads miss the TLB as well as the cache.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Fleet rollout simulations driven by the node's own chunk scheduler.
#[derive(Parser)]
#[command(name = "shoal-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs every fleet size of a scenario; writes OUT/NAME.csv and prints a table.
    Run {
        /// The scenario file (TOML).
        scenario: PathBuf,
        /// Overrides the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Output directory.
        #[arg(long, default_value = "simulations/results")]
        out: PathBuf,
        /// Overrides the fleet sizes (comma-separated).
        #[arg(long, value_delimiter = ',')]
        nodes: Option<Vec<u32>>,
    },
    /// Plots completion time against fleet size, swarm against central, as SVG.
    Plot {
        /// CSV of the swarm sweep (datacenter).
        swarm: PathBuf,
        /// CSV of the central sweep.
        central: PathBuf,
        /// The SVG to write.
        #[arg(short, long, default_value = "simulations/results/rollout.svg")]
        output: PathBuf,
    },
    /// Runs a calibration scenario and compares with its measured times.
    Calibrate {
        /// The calibration scenario (with `measured_all_done_secs`).
        scenario: PathBuf,
        /// Overrides the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Runs every scenario, the plot and the calibration.
    All {
        /// Where the scenarios are.
        #[arg(long, default_value = "simulations/scenarios")]
        dir: PathBuf,
        /// Output directory.
        #[arg(long, default_value = "simulations/results")]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run {
            scenario,
            seed,
            out,
            nodes,
        } => {
            let mut s = Scenario::load(&scenario)?;
            if let Some(nodes) = nodes {
                s.nodes = nodes;
            }
            run(&s, seed, &out)?;
        }
        Command::Plot {
            swarm,
            central,
            output,
        } => {
            plot_files(&swarm, &central, &output)?;
        }
        Command::Calibrate { scenario, seed } => {
            calibrate(&Scenario::load(&scenario)?, seed)?;
        }
        Command::All { dir, out } => {
            for name in [
                "datacenter",
                "central",
                "large-image",
                "edge",
                "edge-local-first",
                "churn",
            ] {
                let s = Scenario::load(&dir.join(format!("{name}.toml")))?;
                run(&s, None, &out)?;
            }
            plot_files(
                &out.join("datacenter.csv"),
                &out.join("central.csv"),
                &out.join("rollout.svg"),
            )?;
            calibrate(&Scenario::load(&dir.join("calibration.toml"))?, None)?;
        }
    }
    Ok(())
}

fn run(scenario: &Scenario, seed: Option<u64>, out: &Path) -> anyhow::Result<Vec<Row>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let seed = seed.unwrap_or(scenario.seed);
    let mut rows = Vec::new();
    let mut results = Vec::new();
    println!(
        "== {} (seed {seed}): {}",
        scenario.name, scenario.description
    );
    for &n in &scenario.nodes {
        eprintln!("shoal-sim: {} with {n} pullers...", scenario.name);
        let result = fleet::run(scenario, n, seed);
        eprintln!(
            "shoal-sim: {} events, {} link fills, simulated {:.1} s in {:.1} s; {} cancels ({} timed out), {:.2} copies duplicate, {:.2} copies cut as endgame losers, {} busy ({} declined: chunk on its way already); next_actions {} calls, {} skipped; {} serve reports fed",
            result.events,
            result.fills,
            result.end_secs,
            result.wall_secs,
            result.cancels,
            result.timeouts,
            result.duplicate_bytes / scenario.image_bytes as f64,
            result.loser_bytes / scenario.image_bytes as f64,
            result.refused,
            result.declined,
            result.thinks.0,
            result.thinks.1,
            result.reports
        );
        rows.push(Row::new(scenario, &result));
        results.push(result);
    }
    let path = out.join(format!("{}.csv", scenario.name));
    report::write_csv(&path, &rows)?;
    print!("{}", report::table(&rows));
    print!("{}", report::timeline_table(scenario, &results));
    println!("wrote {}\n", path.display());
    Ok(rows)
}

fn plot_files(swarm: &Path, central: &Path, output: &Path) -> anyhow::Result<()> {
    let swarm = report::read_csv(swarm)?;
    let central = report::read_csv(central)?;
    plot::rollout(&swarm, &central, output)?;
    println!("wrote {}", output.display());
    Ok(())
}

fn calibrate(scenario: &Scenario, seed: Option<u64>) -> anyhow::Result<()> {
    let seed = seed.unwrap_or(scenario.seed);
    let mut lines = Vec::new();
    for &n in &scenario.nodes {
        let Some(&measured) = scenario.measured_all_done_secs.get(&n.to_string()) else {
            anyhow::bail!("no measured_all_done_secs for {n} pullers");
        };
        let result = fleet::run(scenario, n, seed);
        let row = Row::new(scenario, &result);
        lines.push(Calibration {
            nodes: n,
            simulated_secs: row.max_secs,
            measured_secs: measured,
            simulated_egress: row.egress_copies,
            measured_egress: scenario.measured_egress_copies.get(&n.to_string()).copied(),
        });
    }
    println!("== calibration: {}", scenario.name);
    print!("{}", report::calibration_table(&lines));
    Ok(())
}
