//! The client's durability bookkeeping: which acknowledged writes a lost
//! connection may have taken with it, which FLUSH covered what, and the
//! loss reported to the owner's hook (see the module doc of `mod.rs`).

use super::*;

impl Shared {
    /// Durability bookkeeping for a request the server reports done:
    /// counts an acknowledged write on its connection, or a FLUSH's
    /// coverage. Returns the loss that fails a FLUSH which was in flight
    /// when it happened.
    pub(super) fn account(&self, state: &mut State, p: &Pending) -> Option<DurabilityLost> {
        // A server without FLUSH has no cache to lose (`io/remote/mod.rs`),
        // and a FUA write is on stable storage when acknowledged.
        let volatile = self.info.has(TFLAG_SEND_FLUSH) && p.flags & CMD_FLAG_FUA == 0;
        if p.writes() && volatile {
            state.acked += 1;
            if let Some((slot, _)) = p.sent_on {
                state.dirty[slot] = state.acked;
            }
        } else if p.command == Command::Flush {
            // Any loss so far, not only one during this FLUSH: a FLUSH
            // sent after a reconnect covers only what the backend still
            // holds, so it must not vouch for writes lost before it.
            if state.losses != p.losses || state.losses > 0 {
                return state.last_loss.clone();
            }
            state.flushed = state.flushed.max(p.covers);
        }
        None
    }

    /// Records a durability loss (under the lock); the caller then calls
    /// `report_loss` without it, before re-sending anything.
    pub(super) fn lose(&self, state: &mut State, loss: DurabilityLost) -> DurabilityLost {
        state.losses += 1;
        state.last_loss = Some(loss.clone());
        state.last_error = Some(loss.to_string());
        loss
    }

    pub(super) fn report_loss(&self, loss: &DurabilityLost) {
        tracing::error!(
            backing = %self.uri_text(),
            "{loss}: every FLUSH and FUA on this volume fails until it is reopened"
        );
        let hook = self
            .on_loss
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(hook) = hook {
            hook(loss);
        }
    }

    /// What losing the live connection of `slot` costs: writes it
    /// acknowledged since the last FLUSH, and writes still in flight on it
    /// (abandoned ones were counted when they timed out). Called under the
    /// lock, before its requests are re-sent.
    pub(super) fn connection_lost(&self, state: &mut State, slot: usize) -> Option<DurabilityLost> {
        let dirty = std::mem::take(&mut state.dirty[slot]);
        // Each may still land after a newer write: fenced (`fence.rs`).
        let cut_off: Vec<(u64, u32)> = state
            .pending
            .values()
            .filter(|p| p.writes() && p.done.is_some() && p.ever_sent)
            .filter(|p| p.sent_on.is_some_and(|(s, _)| s == slot))
            .map(|p| (p.offset, p.length))
            .collect();
        for &(offset, length) in &cut_off {
            state.fence.add(offset, length);
        }
        let in_flight = cut_off.len() as u64;
        let loss = if dirty > state.flushed {
            DurabilityLost::Unflushed {
                writes: state.acked.saturating_sub(state.flushed),
            }
        } else if in_flight > 0 {
            DurabilityLost::InFlight { writes: in_flight }
        } else {
            return None;
        };
        Some(self.lose(state, loss))
    }
}
