//! The watchdog thread: fails requests older than the timeout and closes
//! the connection they sat on, so a hung server cannot hold clients.

use super::*;

/// Fails requests older than the timeout, and closes the connection such
/// a request was sent on (a server that stopped answering is treated as
/// gone: the reader reconnects).
pub(super) fn watchdog(s: &Shared) {
    let tick =
        (s.options.timeout / 10).clamp(Duration::from_millis(20), Duration::from_millis(500));
    let mut state = s.lock();
    while !s.closing() {
        state = s
            .changed
            .wait_timeout(state, tick)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut stuck = Vec::new();
        let mut late_write = None;
        let mut stale = Vec::new();
        state.pending.retain(|_, p| {
            if p.done.is_none() || now.duration_since(p.since) < s.options.timeout {
                return true;
            }
            expired.extend(p.done.take());
            if p.writes() && p.ever_sent {
                stale.push((p.offset, p.length));
                late_write.get_or_insert(DurabilityLost::TimedOut {
                    offset: p.offset,
                    length: p.length,
                });
            }
            match p.sent_on {
                // Kept (abandoned) so its reply, if one comes, is parsed and dropped.
                Some((slot, _)) => {
                    stuck.push(slot);
                    true
                }
                None => false,
            }
        });
        if expired.is_empty() {
            continue;
        }
        for (offset, length) in stale {
            state.fence.add(offset, length);
        }
        let loss = late_write.map(|l| s.lose(&mut state, l));
        drop(state);
        // Recorded and the connection broken before the client hears of
        // the timeout: a write it sends next must not be answered, nor a
        // FLUSH succeed, as if the stale one could not still land.
        if let Some(loss) = &loss {
            s.report_loss(loss);
        }
        stuck.sort_unstable();
        stuck.dedup();
        for &slot in &stuck {
            s.links[slot].disconnect();
        }
        s.counters
            .timeouts
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        tracing::warn!(
            backing = %s.uri_text(),
            requests = expired.len(),
            "remote backing did not answer within {}; failing those requests with EIO",
            humantime::format_duration(s.options.timeout)
        );
        for done in expired {
            done(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the remote backing did not answer in time",
            )));
        }
        state = s.lock();
    }
}
