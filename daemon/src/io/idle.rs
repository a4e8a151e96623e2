//! Idle polling: how a thread that serves requests looks for more work
//! for a short window before it sleeps (a ring's `poll_for_work`, a
//! vhost-user queue's worker and its notifier thread). What counts as
//! work is the caller's; the loop's pacing is here, once.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// Calls `look` until it breaks, returning its value, or until `window`
/// has passed (`false`; a zero window looks not at all). The clock and a
/// yield (to a client sharing this core) come every few dozen turns:
/// each costs more than a turn.
pub fn poll_for(window: Duration, mut look: impl FnMut() -> ControlFlow<bool>) -> bool {
    if window.is_zero() {
        return false;
    }
    let deadline = Instant::now() + window;
    let mut turns = 0u32;
    loop {
        if let ControlFlow::Break(found) = look() {
            return found;
        }
        turns = turns.wrapping_add(1);
        if turns.is_multiple_of(64) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::yield_now();
        }
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_on_what_it_looks_for_or_at_the_window() {
        assert!(!poll_for(Duration::ZERO, || ControlFlow::Break(true)));
        let mut turns = 0;
        assert!(poll_for(Duration::from_secs(10), || {
            turns += 1;
            if turns == 1000 {
                ControlFlow::Break(true)
            } else {
                ControlFlow::Continue(())
            }
        }));
        assert!(!poll_for(Duration::from_secs(10), || ControlFlow::Break(
            false
        )));
        // Nothing found: back after the window, not before.
        let start = Instant::now();
        assert!(!poll_for(Duration::from_millis(2), || {
            ControlFlow::Continue(())
        }));
        assert!(start.elapsed() >= Duration::from_millis(2));
    }
}
