//! The discrete-event clock: a queue of timestamped events, popped in time order.
//!
//! Time is an integer number of nanoseconds since the start of the run ([`Nanos`]), so that
//! ordering never depends on floating-point rounding. Events at the same instant come out in the
//! order they were pushed (a sequence number breaks the tie), which makes a run a pure function
//! of its inputs and its seed: no hash-map iteration order, no threads, no wall clock.
//!
//! The queue does not know what an event means; the fleet model ([`crate::fleet`]) owns the
//! event type and decides what each one does.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

/// Simulated time: nanoseconds since the start of the run.
pub type Nanos = u64;

/// One second in [`Nanos`].
pub const SECOND: Nanos = 1_000_000_000;

/// Simulated seconds as [`Nanos`], rounded up so that a positive delay is never zero.
pub fn nanos_from_secs(secs: f64) -> Nanos {
    if secs <= 0.0 || secs.is_nan() {
        0
    } else {
        // Saturates at u64::MAX for absurd inputs (an `as` cast from f64 saturates).
        (secs * SECOND as f64).ceil() as Nanos
    }
}

/// [`Nanos`] as seconds.
pub fn secs_from_nanos(t: Nanos) -> f64 {
    t as f64 / SECOND as f64
}

/// [`Nanos`] as the [`Duration`] the plan takes.
pub fn duration(t: Nanos) -> Duration {
    Duration::from_nanos(t)
}

/// A [`Duration`] as [`Nanos`] (saturating).
pub fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A heap entry: the ordering key and where the event waits. Kept small (24 bytes) because the
/// heap is the hottest memory of a large run; the events themselves wait in a slab.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    at: Nanos,
    /// Insertion order: breaks ties between events at the same instant.
    seq: u64,
    slot: u32,
}

/// Events ordered by time, then by insertion. The clock ([`Queue::now`]) is the time of the last
/// event popped; events can be pushed at or after it, never before.
pub struct Queue<E> {
    heap: BinaryHeap<Reverse<Key>>,
    slab: Vec<Option<E>>,
    free: Vec<u32>,
    now: Nanos,
    seq: u64,
    popped: u64,
}

impl<E> Default for Queue<E> {
    fn default() -> Self {
        Queue {
            heap: BinaryHeap::new(),
            slab: Vec::new(),
            free: Vec::new(),
            now: 0,
            seq: 0,
            popped: 0,
        }
    }
}

impl<E> Queue<E> {
    /// An empty queue at time zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current simulated time.
    pub fn now(&self) -> Nanos {
        self.now
    }

    /// Schedules `event` at `at`; a time in the past is taken as now (the model never travels
    /// back, and a late timer firing at once is what a real timer does too).
    pub fn push(&mut self, at: Nanos, event: E) {
        let at = at.max(self.now);
        self.seq += 1;
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slab[slot as usize] = Some(event);
                slot
            }
            None => {
                self.slab.push(Some(event));
                u32::try_from(self.slab.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.heap.push(Reverse(Key {
            at,
            seq: self.seq,
            slot,
        }));
    }

    /// Moves the clock to `at` (never back) without popping: for happenings kept outside the
    /// queue, like the ends of flows.
    pub fn advance_to(&mut self, at: Nanos) {
        self.now = self.now.max(at);
    }

    /// Schedules `event` `delay` after now.
    pub fn push_after(&mut self, delay: Nanos, event: E) {
        self.push(self.now.saturating_add(delay), event);
    }

    /// The time of the next event, if any.
    pub fn peek_time(&self) -> Option<Nanos> {
        self.heap.peek().map(|Reverse(k)| k.at)
    }

    /// Removes the next event and advances the clock to it.
    pub fn pop(&mut self) -> Option<(Nanos, E)> {
        loop {
            let Reverse(key) = self.heap.pop()?;
            let Some(event) = self.slab.get_mut(key.slot as usize).and_then(Option::take) else {
                continue;
            };
            self.free.push(key.slot);
            self.now = key.at;
            self.popped += 1;
            return Some((key.at, event));
        }
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether no event is waiting.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Events popped so far (a measure of the work a run did).
    pub fn popped(&self) -> u64 {
        self.popped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_out_in_time_order() {
        let mut q = Queue::new();
        for (t, e) in [(30, 'c'), (10, 'a'), (20, 'b'), (40, 'd')] {
            q.push(t, e);
        }
        let out: Vec<(Nanos, char)> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(out, vec![(10, 'a'), (20, 'b'), (30, 'c'), (40, 'd')]);
        assert_eq!(q.now(), 40);
        assert_eq!(q.popped(), 4);
    }

    #[test]
    fn ties_come_out_in_insertion_order() {
        let mut q = Queue::new();
        for i in 0..100u32 {
            q.push(5, i);
        }
        q.push(4, 1000);
        assert_eq!(q.pop(), Some((4, 1000)));
        let out: Vec<u32> = std::iter::from_fn(|| q.pop()).map(|(_, e)| e).collect();
        assert_eq!(out, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn the_clock_never_goes_back() {
        let mut q = Queue::new();
        q.push(100, "later");
        assert_eq!(q.pop(), Some((100, "later")));
        q.push(50, "in the past");
        q.push_after(7, "relative");
        assert_eq!(q.peek_time(), Some(100));
        assert_eq!(q.pop(), Some((100, "in the past")));
        assert_eq!(q.pop(), Some((107, "relative")));
        assert!(q.is_empty());
    }

    #[test]
    fn interleaved_pushes_and_pops_stay_ordered() {
        // Events pushed while others are pending keep the global order and the tie order.
        let mut q = Queue::new();
        q.push(10, 1);
        q.push(10, 2);
        let (_, first) = q.pop().unwrap();
        q.push(10, 3);
        q.push(5, 4); // In the past: runs now, after the ones already due now.
        let rest: Vec<i32> = std::iter::from_fn(|| q.pop()).map(|(_, e)| e).collect();
        assert_eq!((first, rest), (1, vec![2, 3, 4]));
    }

    #[test]
    fn seconds_round_trip_and_round_up() {
        assert_eq!(nanos_from_secs(1.5), 1_500_000_000);
        assert_eq!(nanos_from_secs(1e-10), 1);
        assert_eq!(nanos_from_secs(-3.0), 0);
        assert_eq!(secs_from_nanos(2 * SECOND), 2.0);
        assert_eq!(nanos(duration(12345)), 12345);
    }
}
