//! The store's write gate: every write to the data directory passes through it, and closing it
//! is the last word.
//!
//! Writes run on blocking threads (the blocking pool, the journal thread), which cannot be
//! cancelled: a task that is aborted while its write is queued on the pool still sees the write
//! happen. So a clean stop cannot rely on aborting writers. Instead each write holds the gate
//! open (a shared lock) for as long as it touches the disk; [`Gate::close`] takes the lock
//! exclusively, which waits for the writes in flight, and from then on every write is refused
//! with [`StoreError::Closed`]. What the closer does while it holds the gate (the last fsyncs
//! and the index flush) is the last thing written.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::StoreError;

/// The gate (shared by every handle to one store).
#[derive(Debug)]
pub struct Gate {
    open: RwLock<bool>,
}

/// Proof that the gate is open; writes may go ahead while it is held. Blocking threads only.
pub struct Open<'a> {
    _held: RwLockReadGuard<'a, bool>,
}

impl Gate {
    /// An open gate.
    pub fn new() -> Gate {
        Gate {
            open: RwLock::new(true),
        }
    }

    /// Holds the gate open for a write, or refuses it if the store is closed. Blocking: call it
    /// on the thread that writes, and keep the answer until the write is done.
    pub fn enter(&self) -> Result<Open<'_>, StoreError> {
        let open = self
            .open
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *open {
            Ok(Open { _held: open })
        } else {
            Err(StoreError::Closed)
        }
    }

    /// Like [`Gate::enter`], but never waits: `None` if the store is closed or being closed.
    /// For writes that may be skipped (clean-ups in `Drop`), which must not block.
    pub fn try_enter(&self) -> Option<Open<'_>> {
        let open = self.open.try_read().ok()?;
        (*open).then_some(Open { _held: open })
    }

    /// Whether the gate is still open (a write may still be refused a moment later).
    pub fn is_open(&self) -> bool {
        *self
            .open
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for every write in flight, closes the gate for good, and returns the exclusive
    /// hold under which the closer may write its last words. Blocking.
    pub fn close(&self) -> RwLockWriteGuard<'_, bool> {
        let mut open = self
            .open
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *open = false;
        open
    }
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn closing_waits_for_the_write_in_flight_and_refuses_later_ones() {
        let gate = Arc::new(Gate::new());
        let written = Arc::new(AtomicBool::new(false));
        let (entered_tx, entered_rx) = std::sync::mpsc::sync_channel(1);
        let writer = {
            let (gate, written) = (gate.clone(), written.clone());
            std::thread::spawn(move || {
                let _open = gate.enter().unwrap();
                entered_tx.send(()).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(100));
                written.store(true, Ordering::SeqCst);
            })
        };
        entered_rx.recv().unwrap();
        let hold = gate.close();
        // The write that was in flight finished before the gate closed.
        assert!(written.load(Ordering::SeqCst));
        drop(hold);
        assert!(matches!(gate.enter(), Err(StoreError::Closed)));
        assert!(!gate.is_open());
        writer.join().unwrap();
    }
}
