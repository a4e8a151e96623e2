//! The key-check monitor: a scheduler thread that decides when each cache
//! volume's check is due (its `key_check_interval`, plus up to 10 % jitter
//! so a fleet of hosts does not hit a key server in lock-step), and one
//! worker thread per KEK that runs the checks of the volumes on that KEK.
//! A provider that hangs holds up only its own worker: other KEKs' checks,
//! `hostcrypt status` and reloads go on (checks take no lock across
//! provider calls, see `volume/keys.rs`). A second thread gives volumes
//! still waiting to open their next try (`waiting.rs`), so a hanging open
//! does not hold up checks either.
//!
//! Plain threads, not tasks: providers block on the network, and a slow
//! provider must delay only checks, never I/O.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::nbd::Exports;
use crate::volume::VolumeKeys;

/// How often the scheduler looks at the export list when nothing is due (a
/// reload may add a volume whose first check is due soon).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// The monitor's threads; dropping the stop sender ends them.
pub struct Monitor {
    scheduler: std::thread::JoinHandle<()>,
    waiting: std::thread::JoinHandle<()>,
}

impl Monitor {
    /// Waits for the scheduler and the waiting-volume thread. Workers busy
    /// in a provider call are not waited for: the process exit ends them.
    pub fn join(self) {
        let _ = self.scheduler.join();
        let _ = self.waiting.join();
    }
}

/// Starts the monitor. Volumes are read from `exports` every round, so a
/// reload's additions get checked and its removals stop being checked.
pub fn spawn_monitor(
    exports: Exports,
    stop: Receiver<()>,
    retry_waiting: impl Fn() + Send + 'static,
) -> std::io::Result<Monitor> {
    let (stop_waiting_tx, stop_waiting) = mpsc::channel::<()>();
    let waiting = std::thread::Builder::new()
        .name("hostcrypt-waiting".into())
        .spawn(move || loop {
            retry_waiting();
            match stop_waiting.recv_timeout(IDLE_POLL) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        })?;
    let scheduler = std::thread::Builder::new()
        .name("hostcrypt-keys".into())
        .spawn(move || {
            schedule(exports, stop);
            drop(stop_waiting_tx);
        })?;
    Ok(Monitor { scheduler, waiting })
}

/// One KEK's worker: runs the checks queued for it, one at a time.
struct Worker {
    queue: Sender<Arc<VolumeKeys>>,
    /// Volumes queued or being checked, so a hung worker's queue does not
    /// grow by one entry per interval.
    busy: Arc<Mutex<HashSet<String>>>,
}

impl Worker {
    fn spawn(kek: &str) -> std::io::Result<Worker> {
        let (queue, jobs) = mpsc::channel::<Arc<VolumeKeys>>();
        let busy: Arc<Mutex<HashSet<String>>> = Default::default();
        let done = busy.clone();
        std::thread::Builder::new()
            .name(format!("hostcrypt-kek-{kek}"))
            .spawn(move || {
                while let Ok(volume) = jobs.recv() {
                    // The outcome is logged and audited by the check itself.
                    let _ = volume.check(None);
                    lock(&done).remove(volume.name());
                }
            })?;
        Ok(Worker { queue, busy })
    }

    /// Queues a check unless one for this volume is already queued or running.
    fn submit(&self, volume: &Arc<VolumeKeys>) -> bool {
        if !lock(&self.busy).insert(volume.name().to_owned()) {
            return false;
        }
        self.queue.send(volume.clone()).is_ok()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn schedule(exports: Exports, stop: Receiver<()>) {
    // Next check per volume name; a volume first seen is due one interval later.
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut workers: HashMap<String, Worker> = HashMap::new();
    loop {
        let now = Instant::now();
        let volumes: Vec<_> = exports.iter().filter_map(|e| e.keys.clone()).collect();
        due.retain(|name, _| volumes.iter().any(|v| v.name() == name));
        for volume in &volumes {
            let interval = volume.policy().check_interval;
            let at = *due
                .entry(volume.name().to_owned())
                .or_insert_with(|| now + jittered(interval));
            if at > now {
                continue;
            }
            let kek = volume.kek_name();
            if !workers.contains_key(&kek) {
                match Worker::spawn(&kek) {
                    Ok(w) => {
                        workers.insert(kek.clone(), w);
                    }
                    Err(e) => {
                        tracing::error!(kek, "cannot start a key-check thread: {e}");
                        continue;
                    }
                }
            }
            if let Some(worker) = workers.get(&kek) {
                if !worker.submit(volume) {
                    tracing::debug!(
                        volume = volume.name(),
                        kek,
                        "previous key check still running"
                    );
                }
            }
            due.insert(
                volume.name().to_owned(),
                Instant::now() + jittered(interval.max(Duration::from_millis(100))),
            );
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

/// `interval` plus up to 10 % of it, at random.
fn jittered(interval: Duration) -> Duration {
    let mut byte = [0u8; 2];
    let spread = match getrandom::fill(&mut byte) {
        Ok(()) => f64::from(u16::from_le_bytes(byte)) / f64::from(u16::MAX),
        Err(_) => 0.5,
    };
    interval + interval.mul_f64(0.1 * spread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(10) && d <= Duration::from_secs(11),
                "{d:?}"
            );
        }
    }
}
