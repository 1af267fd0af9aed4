//! Fleet-scale rollout simulations that run the node's own chunk scheduler.
//!
//! The question this crate answers before anyone tries it on real machines: how long does a
//! rollout of one image to N nodes take, and what crosses each link? It is a deterministic
//! discrete-event simulation (seeded: the same seed gives the same result, bit for bit) of a fleet
//! of Shoal nodes: nodes with upload and download capacity, sites joined by WAN links, the
//! publisher, peer discovery, have updates, chunk requests and transfers that share link capacity
//! fairly. What each node asks of whom is decided by the real `shoal_node::fetch::plan::Plan`,
//! the sans-IO scheduler the node runs, with the node's own configuration and constants; so when
//! the scheduler changes, the simulation follows.
//!
//! - [`engine`]: the event queue and simulated time.
//! - [`links`]: links, flows and fair sharing of capacity (and the approximation it makes).
//! - [`fleet`]: the fleet model and one run of it.
//! - [`scenario`]: scenario files (TOML).
//! - [`report`]: results as a table, CSV, and calibration against measured runs.
//! - [`plot`]: completion time against fleet size, as SVG.
//! - [`rng`]: the seeded random generator.
//!
//! What the model leaves out: CPU (except the optional shared host resource, which models a
//! benchmark whose nodes all run on one machine), disk, TCP slow start and congestion dynamics
//! (flows get their max-min fair share at once), packet loss, QUIC/TCP framing overhead, the DHT's
//! own routing (a lookup is a fixed delay that returns every announced provider), the priority
//! window, bad peers and bans, and memory. `simulations/README.md` has the results and the
//! calibration against the real benchmark.

pub mod engine;
pub mod fleet;
pub mod links;
pub mod plot;
pub mod report;
pub mod rng;
pub mod scenario;
