//! How each peer has behaved: strikes that fade, bans that last.
//!
//! Every part of the network that catches a peer misbehaving (a chunk that fails its hash, a
//! sync that does not progress, a frame over its limit, a chunk stream it never drains or drains
//! too slowly, gossip it should not have sent) reports an [`Offence`] here. Each offence weighs
//! some points; the points of a peer halve every [`HALF_LIFE`], so an honest peer's rare slip
//! fades, while a peer that keeps at it reaches [`BAN_AT`] and is banned. A ban outlives the
//! connection: the event loop closes the peer's connections, refuses new ones and does not dial
//! it until the ban ends. Each ban of the same peer lasts twice as long as the one before
//! ([`FIRST_BAN`] up to [`LONGEST_BAN`]), and the count of bans fades like the points.
//!
//! The state is bounded ([`MAX_PEERS`] entries): when full, the entry that matters least (not
//! banned, fewest points) makes room.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::Notify;

/// Points at which a peer is banned.
pub const BAN_AT: f64 = 100.0;
/// How long it takes a peer's points (and its count of past bans) to halve.
pub const HALF_LIFE: Duration = Duration::from_secs(600);
/// The first ban's length; each further one doubles it.
pub const FIRST_BAN: Duration = Duration::from_secs(600);
/// The longest ban.
pub const LONGEST_BAN: Duration = Duration::from_secs(24 * 3600);
/// Most peers remembered.
pub const MAX_PEERS: usize = 4096;
/// Most newly banned peers waiting for the event loop to cut them off.
const MAX_PENDING_BANS: usize = 1024;

/// A kind of misbehaviour, and what it weighs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Offence {
    /// It sent a chunk that fails its BLAKE3 hash, or a `BlobIndex` that does not match the
    /// signed record: it lies about content. Banned at once.
    BadContent,
    /// It sent a frame larger than the message's limit, or one that does not decode.
    Malformed,
    /// It broke a protocol's rules another way (a sync whose pages do not progress, a request
    /// it may not make).
    Protocol,
    /// It let a chunk stream make no progress at all for a while (it asked for a chunk and does
    /// not read it), holding a slot others need.
    Stalled,
    /// It held more of the node than its share: it took a chunk too slowly to meet the chunk's
    /// send deadline (a peer that reads a trickle to keep its streams). One is a slip an honest
    /// peer on a failing link may make; twenty in a half-life are a ban.
    Greedy,
    /// It relayed a message this node had to throw away (a record no one here trusts, a policy
    /// that does not check out). Honest peers do so rarely: they validate before forwarding.
    Useless,
}

impl Offence {
    /// The points one such offence adds.
    pub fn weight(self) -> f64 {
        match self {
            Offence::BadContent => BAN_AT,
            Offence::Malformed => 25.0,
            Offence::Protocol => 25.0,
            Offence::Stalled => 10.0,
            Offence::Greedy => 5.0,
            Offence::Useless => 1.0,
        }
    }
}

/// What a report did to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Noted; the peer stays.
    Noted,
    /// The peer is banned for this long (from now).
    Banned(Duration),
}

#[derive(Debug, Clone)]
struct Standing {
    points: f64,
    /// Past bans, fading like the points (the next ban lasts `FIRST_BAN * 2^bans`).
    bans: f64,
    /// When `points` and `bans` were last brought up to date.
    at: Instant,
    banned_until: Option<Instant>,
}

impl Standing {
    fn new(now: Instant) -> Standing {
        Standing {
            points: 0.0,
            bans: 0.0,
            at: now,
            banned_until: None,
        }
    }

    /// Lets the points and the count of bans fade up to `now`.
    fn fade(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        let factor = 0.5f64.powf(elapsed / HALF_LIFE.as_secs_f64());
        self.points *= factor;
        self.bans *= factor;
        self.at = now;
    }

    fn banned(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|until| until > now)
    }
}

/// The conduct of every peer this node has had to judge (cheap to share: an `Arc` of it).
#[derive(Debug, Default)]
pub struct Conduct {
    peers: Mutex<HashMap<PeerId, Standing>>,
    /// Peers banned since the event loop last looked, to cut off.
    pending: Mutex<Vec<PeerId>>,
    /// Woken when `pending` gains a peer.
    wake: Notify,
}

impl Conduct {
    /// Reports that `peer` committed `offence`.
    pub fn report(&self, peer: PeerId, offence: Offence) -> Verdict {
        self.report_at(peer, offence, Instant::now())
    }

    /// [`Conduct::report`] at a given time.
    pub fn report_at(&self, peer: PeerId, offence: Offence, now: Instant) -> Verdict {
        let verdict = {
            let mut peers = self.peers();
            if !peers.contains_key(&peer) && peers.len() >= MAX_PEERS {
                make_room(&mut peers, now);
            }
            let standing = peers.entry(peer).or_insert_with(|| Standing::new(now));
            standing.fade(now);
            if standing.banned(now) {
                // Already banned: a peer that keeps misbehaving through a ban (over a
                // connection that was closing) gains nothing and loses nothing more.
                return Verdict::Noted;
            }
            standing.points += offence.weight();
            if standing.points + 1e-9 < BAN_AT {
                return Verdict::Noted;
            }
            let doublings = standing.bans.round().clamp(0.0, 16.0) as u32;
            let length = FIRST_BAN.saturating_mul(1 << doublings).min(LONGEST_BAN);
            standing.bans += 1.0;
            standing.points = 0.0;
            standing.banned_until = Some(now + length);
            Verdict::Banned(length)
        };
        tracing::info!(%peer, ?offence, ?verdict, "peer banned");
        let mut pending = self.pending();
        if pending.len() < MAX_PENDING_BANS {
            pending.push(peer);
        }
        drop(pending);
        self.wake.notify_one();
        verdict
    }

    /// Whether `peer` is banned now.
    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.is_banned_at(peer, Instant::now())
    }

    /// [`Conduct::is_banned`] at a given time.
    pub fn is_banned_at(&self, peer: &PeerId, now: Instant) -> bool {
        self.peers().get(peer).is_some_and(|s| s.banned(now))
    }

    /// `peer`'s points now (0 for a peer never reported).
    pub fn points(&self, peer: &PeerId) -> f64 {
        let now = Instant::now();
        self.peers().get_mut(peer).map_or(0.0, |s| {
            s.fade(now);
            s.points
        })
    }

    /// The peers banned since the last call, to cut off.
    pub fn take_banned(&self) -> Vec<PeerId> {
        std::mem::take(&mut *self.pending())
    }

    /// Waits until a peer is banned (or was banned since the last [`Conduct::take_banned`]).
    pub async fn banned_some(&self) {
        if !self.pending().is_empty() {
            return;
        }
        self.wake.notified().await;
    }

    /// Forgets the bans that ended before `now`, returning their peers (to allow again), and
    /// the standings that faded to nothing.
    pub fn expire(&self, now: Instant) -> Vec<PeerId> {
        let mut ended = Vec::new();
        self.peers().retain(|peer, standing| {
            if standing.banned_until.is_some_and(|until| until <= now) {
                standing.banned_until = None;
                ended.push(*peer);
            }
            standing.fade(now);
            standing.banned_until.is_some() || standing.points > 0.5 || standing.bans > 0.05
        });
        ended
    }

    /// The peers banned now, and until when.
    pub fn bans(&self) -> Vec<(PeerId, Instant)> {
        let now = Instant::now();
        self.peers()
            .iter()
            .filter_map(|(peer, s)| s.banned_until.filter(|u| *u > now).map(|u| (*peer, u)))
            .collect()
    }

    /// The map; every update leaves it consistent, so a poisoned lock is still used.
    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Standing>> {
        self.peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<PeerId>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Drops the entry that matters least: not banned, fewest points. When every entry is banned,
/// the one whose ban ends first.
fn make_room(peers: &mut HashMap<PeerId, Standing>, now: Instant) {
    let victim = peers
        .iter_mut()
        .map(|(peer, s)| {
            s.fade(now);
            (*peer, s.banned(now), s.points, s.banned_until)
        })
        .min_by(|a, b| (a.1, a.3).cmp(&(b.1, b.3)).then(a.2.total_cmp(&b.2)))
        .map(|(peer, ..)| peer);
    if let Some(peer) = victim {
        peers.remove(&peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        PeerId::random()
    }

    #[test]
    fn lying_about_content_bans_at_once() {
        let conduct = Conduct::default();
        let (liar, now) = (peer(), Instant::now());
        assert_eq!(
            conduct.report_at(liar, Offence::BadContent, now),
            Verdict::Banned(FIRST_BAN)
        );
        assert!(conduct.is_banned_at(&liar, now));
        assert_eq!(conduct.take_banned(), vec![liar]);
        assert!(conduct.take_banned().is_empty());
    }

    #[test]
    fn rare_slips_fade_and_a_steady_stream_is_banned() {
        let conduct = Conduct::default();
        let (honest, spammer) = (peer(), peer());
        let start = Instant::now();
        // One useless message a minute for a day: the points settle far below the ban.
        for minute in 0..24 * 60 {
            let now = start + Duration::from_secs(60 * minute);
            assert_eq!(
                conduct.report_at(honest, Offence::Useless, now),
                Verdict::Noted
            );
        }
        // A hundred or so in a tenth of a second is a ban (the points fade a little meanwhile).
        let first_ban = (0..110)
            .map(|i| conduct.report_at(spammer, Offence::Useless, start + Duration::from_millis(i)))
            .position(|v| v != Verdict::Noted);
        assert!(matches!(first_ban, Some(99..=101)), "{first_ban:?}");
    }

    #[test]
    fn bans_last_double_for_repeat_offenders_and_end() {
        let conduct = Conduct::default();
        let (p, t0) = (peer(), Instant::now());
        assert_eq!(
            conduct.report_at(p, Offence::BadContent, t0),
            Verdict::Banned(FIRST_BAN)
        );
        // Still banned just before the end, whatever it does meanwhile.
        let before = t0 + FIRST_BAN - Duration::from_secs(1);
        assert_eq!(
            conduct.report_at(p, Offence::BadContent, before),
            Verdict::Noted
        );
        assert!(conduct.is_banned_at(&p, before));
        let after = t0 + FIRST_BAN;
        assert!(!conduct.is_banned_at(&p, after));
        assert_eq!(conduct.expire(after), vec![p]);
        // Again soon after: twice as long.
        assert_eq!(
            conduct.report_at(p, Offence::BadContent, after),
            Verdict::Banned(FIRST_BAN * 2)
        );
        // Never longer than a day.
        let mut now = after;
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            now += LONGEST_BAN;
            if let Verdict::Banned(d) = conduct.report_at(p, Offence::BadContent, now) {
                last = d;
            }
        }
        assert!(last <= LONGEST_BAN);
    }

    #[test]
    fn the_table_is_bounded_and_keeps_the_banned() {
        let conduct = Conduct::default();
        let now = Instant::now();
        let banned = peer();
        conduct.report_at(banned, Offence::BadContent, now);
        for _ in 0..MAX_PEERS + 100 {
            conduct.report_at(peer(), Offence::Useless, now);
        }
        assert!(conduct.peers().len() <= MAX_PEERS);
        assert!(conduct.is_banned_at(&banned, now));
    }

    #[test]
    fn faded_standings_are_forgotten() {
        let conduct = Conduct::default();
        let (p, now) = (peer(), Instant::now());
        conduct.report_at(p, Offence::Stalled, now);
        assert!(conduct.expire(now).is_empty());
        assert_eq!(conduct.peers().len(), 1);
        conduct.expire(now + HALF_LIFE * 10);
        assert!(conduct.peers().is_empty());
    }
}
