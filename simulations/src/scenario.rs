//! Scenario files: what fleet to simulate, read from TOML.
//!
//! A scenario names a topology (nodes, sites, NIC and WAN capacities, latencies), an image size,
//! how nodes find each other, optional churn and an optional shared host CPU, and a sweep of fleet
//! sizes (`nodes = [10, 100, 1000]`): one run per size. Every field is documented on
//! [`Scenario`]; the files in `simulations/scenarios/` are the examples. Unknown fields are
//! errors, so a typo is not silently ignored. Capacities are in Mbit/s (10^6 bits), sizes in
//! bytes, times in the unit their name says.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::engine::{Nanos, nanos_from_secs};

/// How the pullers get the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every node runs the node's swarm download: the `fetch::plan` scheduler, discovery, haves.
    Swarm,
    /// Every node downloads the whole image from the publisher alone, as from a registry today.
    Central,
}

/// Where the publisher (the node holding the image at the start) sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PublisherSite {
    /// In site 0, with the pullers there.
    #[default]
    Shared,
    /// In a site of its own (a datacenter or cloud region) behind its own WAN link.
    Own,
}

/// The publisher's placement and capacity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publisher {
    /// Its site.
    #[serde(default)]
    pub site: PublisherSite,
    /// Its NIC, each way, in Mbit/s (default: the pullers' NIC).
    pub nic_mbit: Option<f64>,
    /// Its own site's WAN link, each way, in Mbit/s, when `site = "own"` (default 1000).
    pub wan_mbit: Option<f64>,
}

/// WAN links between sites.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wan {
    /// Each site's WAN uplink, in Mbit/s.
    pub up_mbit: f64,
    /// Each site's WAN downlink, in Mbit/s.
    pub down_mbit: f64,
    /// One-way latency between two nodes in different sites, in ms.
    pub latency_ms: f64,
}

/// How nodes find each other (see the crate documentation).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    /// A DHT lookup (and a provider announcement) takes this many round trips of the widest
    /// latency in the topology (LAN, or WAN when there are several sites).
    #[serde(default = "default_lookup_rtts")]
    pub lookup_rtts: f64,
    /// Connected peers of each node, drawn at random from the whole fleet.
    #[serde(default = "default_mesh_degree")]
    pub mesh_degree: u32,
    /// Candidates from the node's own site first, then the others: what a node started with
    /// `--site` does (it learns its peers' sites on connect). `false`: nodes without a site,
    /// whose candidates are providers first, then connected peers, whatever their site.
    #[serde(default)]
    pub local_first: bool,
    /// What-if: at most this many candidates instead of the node's `MAX_CANDIDATES` (a test sets
    /// it above the fleet size so that every node sees every other).
    #[serde(default)]
    pub max_candidates: Option<usize>,
    /// What-if: `false` drops the serve reports seeders send (the node always sends them), to
    /// show what they are worth.
    #[serde(default = "default_serve_reports", alias = "upload_reports")]
    pub serve_reports: bool,
}

impl Default for Discovery {
    fn default() -> Self {
        Discovery {
            lookup_rtts: default_lookup_rtts(),
            mesh_degree: default_mesh_degree(),
            local_first: false,
            max_candidates: None,
            serve_reports: true,
        }
    }
}

fn default_serve_reports() -> bool {
    true
}

fn default_lookup_rtts() -> f64 {
    4.0
}

fn default_mesh_degree() -> u32 {
    8
}

/// Nodes that leave during the rollout and come back.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Churn {
    /// Fraction of the pullers that leave once (the publisher never leaves).
    pub fraction: f64,
    /// Each leaves at a uniform random time in `[from, to]` seconds after the rollout starts.
    pub leave_secs: [f64; 2],
    /// And comes back after a uniform random absence in `[from, to]` seconds.
    pub away_secs: [f64; 2],
}

/// One machine's CPU shared by every node (a benchmark running all nodes on one host).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// Cores of the machine.
    pub cores: f64,
    /// CPU-seconds the nodes spend per GB (10^9 bytes) received, sending side included.
    pub cpu_secs_per_gb: f64,
}

impl Host {
    /// The bytes per second the host can move: every flow crosses this shared resource.
    pub fn bytes_per_sec(&self) -> f64 {
        self.cores / self.cpu_secs_per_gb * 1e9
    }
}

/// How flows share links (see [`crate::links`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SharingMode {
    /// Local water-filling around each change (fast, approximate).
    #[default]
    Local,
    /// Exact max-min after every change (slow; for small fleets and checks).
    Exact,
}

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Its name: the CSV file is `<name>.csv`.
    pub name: String,
    /// One line for humans.
    #[serde(default)]
    pub description: String,
    /// Swarm or central.
    pub mode: Mode,
    /// The seed of every random choice (overridable on the command line).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The image (one blob) in bytes.
    pub image_bytes: u64,
    /// Chunk size in bytes (default: what the node picks for a blob of `image_bytes`,
    /// `shoal_protocol::chunk_size_for`).
    #[serde(default)]
    pub chunk_bytes: u64,
    /// Fleet sizes to run, in pullers (the publisher comes on top).
    pub nodes: Vec<u32>,
    /// Sites the pullers are spread over, round robin (default 1).
    #[serde(default = "default_sites")]
    pub sites: u32,
    /// Every puller's NIC, each way, in Mbit/s.
    pub nic_mbit: f64,
    /// One-way latency between two nodes of one site, in ms.
    #[serde(default = "default_latency_ms")]
    pub latency_ms: f64,
    /// The WAN links, needed when there is more than one site.
    pub wan: Option<Wan>,
    /// The publisher.
    #[serde(default = "default_publisher")]
    pub publisher: Publisher,
    /// Discovery.
    #[serde(default)]
    pub discovery: Discovery,
    /// Pullers start at uniform random times in `[0, start_spread_secs]` (default 0: together).
    #[serde(default)]
    pub start_spread_secs: f64,
    /// Churn, if any.
    pub churn: Option<Churn>,
    /// A shared host CPU, if any.
    pub host: Option<Host>,
    /// In central mode, concurrent flows per puller (the image split in that many equal layers,
    /// like docker's three concurrent layer downloads).
    #[serde(default = "default_central_streams")]
    pub central_streams: u32,
    /// How flows share links.
    #[serde(default)]
    pub sharing: SharingMode,
    /// The simulation stops at this simulated time, complete or not.
    #[serde(default = "default_time_limit_secs")]
    pub time_limit_secs: f64,
    /// Measured completion time (all pullers done) of a real run, by fleet size, for
    /// `shoal-sim calibrate`.
    #[serde(default)]
    pub measured_all_done_secs: BTreeMap<String, f64>,
    /// Measured bytes the origin (publisher) sent in the same real run, in copies of the image,
    /// by fleet size, for `shoal-sim calibrate` (optional).
    #[serde(default)]
    pub measured_egress_copies: BTreeMap<String, f64>,
}

fn default_seed() -> u64 {
    1
}

fn default_sites() -> u32 {
    1
}

fn default_latency_ms() -> f64 {
    0.1
}

fn default_publisher() -> Publisher {
    Publisher {
        site: PublisherSite::Shared,
        nic_mbit: None,
        wan_mbit: None,
    }
}

fn default_central_streams() -> u32 {
    3
}

fn default_time_limit_secs() -> f64 {
    1e6
}

/// Mbit/s to bytes/s.
pub fn bytes_per_sec(mbit: f64) -> f64 {
    mbit * 1e6 / 8.0
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Scenario::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses and checks a scenario.
    pub fn parse(text: &str) -> anyhow::Result<Scenario> {
        let mut scenario: Scenario = toml::from_str(text)?;
        if scenario.chunk_bytes == 0 {
            scenario.chunk_bytes = shoal_protocol::chunk_size_for(scenario.image_bytes).into();
        }
        scenario.check()?;
        Ok(scenario)
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("name must be letters, digits, - or _");
        }
        if self.image_bytes == 0 || self.chunk_bytes == 0 {
            bail!("image_bytes and chunk_bytes must be positive");
        }
        if self.image_bytes.div_ceil(self.chunk_bytes) > u64::from(u16::MAX) {
            bail!("at most {} chunks", u16::MAX);
        }
        if self.nodes.is_empty() || self.nodes.contains(&0) {
            bail!("nodes must list fleet sizes of at least one puller");
        }
        if self.sites == 0 {
            bail!("sites must be at least 1");
        }
        let needs_wan = self.sites > 1 || self.publisher.site == PublisherSite::Own;
        if needs_wan && self.wan.is_none() {
            bail!("several sites (or a publisher in its own site) need a [wan] section");
        }
        let positive = [
            ("nic_mbit", self.nic_mbit),
            ("latency_ms", self.latency_ms + 1.0),
            ("time_limit_secs", self.time_limit_secs),
        ];
        for (what, v) in positive {
            if !(v > 0.0 && v.is_finite()) {
                bail!("{what} must be positive");
            }
        }
        if let Some(wan) = &self.wan {
            if !(wan.up_mbit > 0.0 && wan.down_mbit > 0.0 && wan.latency_ms >= 0.0) {
                bail!("wan capacities must be positive");
            }
        }
        if let Some(churn) = &self.churn {
            if !(0.0..=1.0).contains(&churn.fraction)
                || churn.leave_secs[0] > churn.leave_secs[1]
                || churn.away_secs[0] > churn.away_secs[1]
                || churn.leave_secs[0] < 0.0
                || churn.away_secs[0] < 0.0
            {
                bail!("churn: fraction in [0, 1], ranges [from, to] with from <= to, from >= 0");
            }
        }
        if let Some(host) = &self.host {
            if !(host.cores > 0.0 && host.cpu_secs_per_gb > 0.0) {
                bail!("host: cores and cpu_secs_per_gb must be positive");
            }
        }
        if self.central_streams == 0 {
            bail!("central_streams must be at least 1");
        }
        Ok(())
    }

    /// The number of chunks of the image.
    pub fn chunk_count(&self) -> u32 {
        u32::try_from(self.image_bytes.div_ceil(self.chunk_bytes)).unwrap_or(u32::MAX)
    }

    /// One-way latency between two nodes in the same site (`same`) or not.
    pub fn latency(&self, same: bool) -> Nanos {
        let ms = match (&self.wan, same) {
            (Some(wan), false) => wan.latency_ms,
            _ => self.latency_ms,
        };
        nanos_from_secs(ms / 1e3)
    }

    /// Whether any flow can cross a WAN link.
    pub fn has_wan(&self) -> bool {
        self.sites > 1 || self.publisher.site == PublisherSite::Own
    }

    /// How long a DHT lookup takes.
    pub fn lookup_delay(&self) -> Nanos {
        let widest = self.latency(!self.has_wan());
        nanos_from_secs(self.discovery.lookup_rtts * 2.0 * widest as f64 / 1e9)
    }

    /// The ideal completion time of one puller: the image over the narrowest link its copy must
    /// cross from the publisher (its NIC, and its site's WAN downlink when the publisher is in
    /// another site), as if it were alone.
    pub fn ideal_secs(&self) -> f64 {
        let mut rate = bytes_per_sec(self.nic_mbit);
        if self.has_wan() {
            if let Some(wan) = &self.wan {
                rate = rate.min(bytes_per_sec(wan.down_mbit));
            }
        }
        self.image_bytes as f64 / rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        name = "t"
        mode = "swarm"
        image_bytes = 10000000
        nodes = [5]
        nic_mbit = 100
    "#;

    #[test]
    fn a_minimal_scenario_gets_the_defaults() {
        let s = Scenario::parse(MINIMAL).unwrap();
        // What the node picks for a 10 MB blob: 256 KiB.
        assert_eq!(s.chunk_bytes, 256 << 10);
        assert_eq!(s.chunk_count(), 39);
        assert_eq!(s.sites, 1);
        assert_eq!(s.discovery.mesh_degree, 8);
        assert_eq!(s.latency(true), 100_000);
        assert_eq!(s.lookup_delay(), 800_000);
        assert!((s.ideal_secs() - 0.8).abs() < 1e-9);
    }

    #[test]
    fn mistakes_are_errors() {
        let typo = MINIMAL.replace("nic_mbit", "nick_mbit");
        assert!(Scenario::parse(&typo).is_err());
        let sites = format!("{MINIMAL}\nsites = 3\n");
        let err = Scenario::parse(&sites).unwrap_err().to_string();
        assert!(err.contains("[wan]"), "{err}");
        let empty = MINIMAL.replace("[5]", "[]");
        assert!(Scenario::parse(&empty).is_err());
    }

    #[test]
    fn the_host_resource_follows_cores_and_cpu_cost() {
        let host = Host {
            cores: 2.0,
            cpu_secs_per_gb: 25.0,
        };
        assert!((host.bytes_per_sec() - 80e6).abs() < 1e-3);
    }
}
