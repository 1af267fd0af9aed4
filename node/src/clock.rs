//! The fleet's time. Tag records are ordered by their publisher's wall clock, and a node refuses
//! records (and policies) from further in the future than [`MAX_CLOCK_SKEW`]. A node whose clock
//! is hours ahead would stamp records that win every later write of the fleet; one hours behind
//! would refuse every record of the fleet, and stamp its own so old that they lose to anything.
//! Either way a push it acknowledged would not be the fleet's.
//!
//! So each node asks its peers for their clocks (`SyncRequest::Clock`, at each connection and at
//! each periodic sync) and keeps the offset to each, measured as the peer's answer minus the
//! midpoint of the round trip. The fleet's time is this node's clock plus the median of those
//! offsets and its own (zero): with an even count the middle value nearer zero. One peer with a
//! wrong clock, honest or not, moves no one: a node follows only a majority of what it sees, and
//! in a fleet of two neither knows which clock is right, so both keep their own. Offsets under
//! [`MIN_CORRECTION`] are the noise of the measurement and ignored; a correction is capped at
//! [`MAX_CORRECTION`].
//!
//! The correction is kept in the data directory ([`OFFSET_FILE`]), so that a node restarted with
//! its clock still off checks its records in the fleet's time from the start (re-deriving the
//! current records before it has peers), and `shoal fsck` judges them the same way.
//!
//! [`MAX_CLOCK_SKEW`]: crate::auth::MAX_CLOCK_SKEW

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The file in the data directory holding the last correction, in milliseconds, as text.
pub const OFFSET_FILE: &str = "clock-offset";

/// Offsets smaller than this are not corrected (a round trip's asymmetry, a second's drift).
pub const MIN_CORRECTION: Duration = Duration::from_secs(2);
/// The largest correction a node applies, whatever a majority of its peers say.
pub const MAX_CORRECTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// This node's wall clock in milliseconds since the Unix epoch, uncorrected.
pub fn own_now_ms() -> u64 {
    crate::auth::now_ms()
}

/// The fleet's time as this node knows it (cheap to clone; clones share the correction).
#[derive(Debug, Clone, Default)]
pub struct FleetClock {
    offset_ms: Arc<AtomicI64>,
    /// Where the correction is kept, once [`FleetClock::keep_in`] says.
    file: Arc<Mutex<Option<PathBuf>>>,
}

/// The correction kept in the data directory `dir`: zero without one, or when it is not a
/// number within [`MAX_CORRECTION`].
pub fn stored_offset_ms(dir: &Path) -> i64 {
    let max = i64::try_from(MAX_CORRECTION.as_millis()).unwrap_or(i64::MAX);
    std::fs::read_to_string(dir.join(OFFSET_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .filter(|ms| ms.unsigned_abs() <= max.unsigned_abs())
        .unwrap_or(0)
}

impl FleetClock {
    /// A clock with no correction yet.
    pub fn new() -> FleetClock {
        FleetClock::default()
    }

    /// The fleet's time: this node's clock plus the correction, in milliseconds.
    pub fn now_ms(&self) -> u64 {
        let own = i64::try_from(own_now_ms()).unwrap_or(i64::MAX);
        u64::try_from(own.saturating_add(self.offset_ms())).unwrap_or(0)
    }

    /// The correction applied to this node's clock, in milliseconds.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// Sets the correction; returns whether it changed. A changed one is written to the data
    /// directory when the clock keeps it there (a failure to write is logged: the correction
    /// still applies to this run).
    pub fn set_offset_ms(&self, offset_ms: i64) -> bool {
        let changed = self.offset_ms.swap(offset_ms, Ordering::Relaxed) != offset_ms;
        if changed {
            let file = self
                .file
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(path) = file.as_ref()
                && let Err(e) = write_offset(path, offset_ms)
            {
                tracing::warn!(error = &e as &dyn std::error::Error, path = %path.display(), "keeping the clock correction");
            }
        }
        changed
    }

    /// The correction kept in the data directory `dir`, read once (for a command working on a
    /// stopped node's directory, which has no peers to ask).
    pub fn stored(dir: &Path) -> FleetClock {
        let clock = FleetClock::new();
        clock
            .offset_ms
            .store(stored_offset_ms(dir), Ordering::Relaxed);
        clock
    }

    /// Starts from the correction kept in the data directory `dir`, and keeps each new one
    /// there.
    pub fn keep_in(&self, dir: &Path) {
        self.offset_ms
            .store(stored_offset_ms(dir), Ordering::Relaxed);
        *self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(dir.join(OFFSET_FILE));
    }
}

/// Replaces the file at `path` with `offset_ms`, whole or not at all.
fn write_offset(path: &Path, offset_ms: i64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{offset_ms}\n"))?;
    std::fs::rename(&tmp, path)
}

/// The offset of a peer's clock from this node's: `theirs` (its answer) minus the midpoint of a
/// round trip that started at `sent_ms` on this node's clock and took `rtt`.
pub fn peer_offset_ms(theirs: u64, sent_ms: u64, rtt: Duration) -> i64 {
    let half = i64::try_from(rtt.as_millis() / 2).unwrap_or(i64::MAX);
    let theirs = i64::try_from(theirs).unwrap_or(i64::MAX);
    let mid = i64::try_from(sent_ms)
        .unwrap_or(i64::MAX)
        .saturating_add(half);
    theirs.saturating_sub(mid)
}

/// The correction to this node's clock from the offsets of its peers' clocks (see the module
/// doc): the median of them and zero, the middle value nearer zero for an even count; zero under
/// [`MIN_CORRECTION`], at most [`MAX_CORRECTION`] either way.
pub fn correction_ms(peer_offsets: impl IntoIterator<Item = i64>) -> i64 {
    let mut all: Vec<i64> = peer_offsets.into_iter().collect();
    all.push(0);
    all.sort_unstable();
    let n = all.len();
    let median = if n % 2 == 1 {
        all[n / 2]
    } else {
        let (a, b) = (all[n / 2 - 1], all[n / 2]);
        if a.unsigned_abs() <= b.unsigned_abs() {
            a
        } else {
            b
        }
    };
    let min = i64::try_from(MIN_CORRECTION.as_millis()).unwrap_or(i64::MAX);
    let max = i64::try_from(MAX_CORRECTION.as_millis()).unwrap_or(i64::MAX);
    if median.unsigned_abs() < min.unsigned_abs() {
        0
    } else {
        median.clamp(-max, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    #[test]
    fn a_node_follows_the_majority_of_what_it_sees() {
        // Four nodes: two keep time, one is 3 h ahead, one 3 h behind.
        assert_eq!(correction_ms([0, 3 * H, -3 * H]), 0, "an honest node");
        assert_eq!(
            correction_ms([-3 * H, -3 * H, -6 * H]),
            -3 * H,
            "the node ahead"
        );
        assert_eq!(
            correction_ms([3 * H, 3 * H, 6 * H]),
            3 * H,
            "the node behind"
        );
        // Three nodes, one ahead.
        assert_eq!(correction_ms([0, 3 * H]), 0);
        assert_eq!(correction_ms([-3 * H, -3 * H]), -3 * H);
    }

    #[test]
    fn one_wrong_clock_moves_no_one() {
        // Two nodes: neither knows which clock is right.
        assert_eq!(correction_ms([3 * H]), 0);
        assert_eq!(correction_ms([-3 * H]), 0);
        // A liar among honest peers.
        assert_eq!(correction_ms([0, 0, 1_000 * H]), 0);
        assert_eq!(correction_ms([]), 0);
    }

    #[test]
    fn noise_is_ignored_and_corrections_are_capped() {
        assert_eq!(correction_ms([1_500, 1_900]), 0);
        assert_eq!(correction_ms([2_500, 2_600]), 2_500);
        let max = MAX_CORRECTION.as_millis() as i64;
        assert_eq!(correction_ms([i64::MAX, i64::MAX]), max);
        assert_eq!(correction_ms([i64::MIN, i64::MIN]), -max);
    }

    #[test]
    fn a_peer_offset_is_taken_at_the_midpoint_of_the_round_trip() {
        assert_eq!(
            peer_offset_ms(10_050, 10_000, Duration::from_millis(100)),
            0
        );
        assert_eq!(
            peer_offset_ms(5_000, 10_000, Duration::from_millis(0)),
            -5_000
        );
        assert_eq!(peer_offset_ms(u64::MAX, 0, Duration::ZERO), i64::MAX);
    }

    #[test]
    fn the_correction_is_kept_in_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let clock = FleetClock::new();
        clock.keep_in(dir.path());
        assert_eq!(clock.offset_ms(), 0);
        clock.set_offset_ms(3 * H);
        assert_eq!(stored_offset_ms(dir.path()), 3 * H);
        let again = FleetClock::new();
        again.keep_in(dir.path());
        assert_eq!(again.offset_ms(), 3 * H, "a restart starts corrected");
        // A damaged or absurd file is no correction.
        for text in [
            "garbage",
            "99999999999999999999",
            &format!("{}", 1_000 * 24 * H),
        ] {
            std::fs::write(dir.path().join(OFFSET_FILE), text).unwrap();
            assert_eq!(stored_offset_ms(dir.path()), 0, "{text}");
        }
    }

    #[test]
    fn the_fleet_clock_adds_the_correction() {
        let clock = FleetClock::new();
        let before = own_now_ms();
        assert!(clock.set_offset_ms(3 * H));
        assert!(!clock.set_offset_ms(3 * H));
        let now = clock.now_ms();
        assert!(now >= before + 3 * H as u64 && now < own_now_ms() + 3 * H as u64 + 1_000);
        assert!(
            clock.clone().set_offset_ms(0),
            "clones share the correction"
        );
        assert_eq!(clock.offset_ms(), 0);
    }
}
