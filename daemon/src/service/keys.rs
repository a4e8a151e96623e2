//! The key-check monitor: one thread that runs each cache volume's key check
//! when its `key_check_interval` is due (the checks themselves, with loss,
//! recovery and auto-rotation, are `volume/keys.rs`), and gives volumes
//! still waiting to open their next try (`waiting.rs`). A plain thread, not a
//! task: providers block on the network, and a slow provider must delay
//! only checks, never I/O.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::nbd::Exports;

/// How often the monitor looks at the export list when nothing is due (a
/// reload may add a volume whose first check is due soon).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Runs checks until `stop` is dropped or sends. The volumes are read from
/// `exports` on every round, so a reload's additions get checked and its
/// removals stop being checked.
pub fn spawn_monitor(
    exports: Exports,
    stop: Receiver<()>,
    retry_waiting: impl Fn() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("hostcrypt-keys".into())
        .spawn(move || monitor(exports, stop, retry_waiting))
}

fn monitor(exports: Exports, stop: Receiver<()>, retry_waiting: impl Fn()) {
    // Next check per volume name; a volume first seen is due one interval later.
    let mut due: HashMap<String, Instant> = HashMap::new();
    loop {
        retry_waiting();
        let now = Instant::now();
        let volumes: Vec<_> = exports.iter().filter_map(|e| e.keys.clone()).collect();
        due.retain(|name, _| volumes.iter().any(|v| v.name() == name));
        for volume in &volumes {
            let at = *due
                .entry(volume.name().to_owned())
                .or_insert_with(|| now + volume.policy().check_interval);
            if at <= now {
                // The outcome is logged and audited by the check itself.
                let _ = volume.check(None);
                due.insert(
                    volume.name().to_owned(),
                    Instant::now()
                        + volume
                            .policy()
                            .check_interval
                            .max(Duration::from_millis(100)),
                );
            }
        }
        let next = due.values().min().copied().unwrap_or(now + IDLE_POLL);
        let wait = next
            .saturating_duration_since(Instant::now())
            .min(IDLE_POLL);
        match stop.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}
