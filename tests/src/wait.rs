//! Polled waits and seeded randomness.
//!
//! Tests never sleep for a fixed time hoping something happened: they poll a predicate until
//! it holds or a timeout passes. Every random choice comes from one seeded generator whose seed
//! is printed, so a failure can be replayed with `SHOAL_TEST_SEED=<seed>`.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// How long [`wait_until`] sleeps between two polls.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Polls `predicate` until it returns true; fails after `timeout` with `what` in the message.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut predicate: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if predicate() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// A generator seeded from `SHOAL_TEST_SEED` or at random; prints the seed to stderr.
pub fn seeded_rng(test_name: &str) -> (StdRng, u64) {
    let seed = std::env::var("SHOAL_TEST_SEED")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("{test_name}: seed {seed} (replay with SHOAL_TEST_SEED={seed})");
    (StdRng::seed_from_u64(seed), seed)
}
