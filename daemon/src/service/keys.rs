//! The key-check monitor: a scheduler thread that decides when the volumes
//! of each KEK and `key_check_interval` are due (the interval plus up to
//! 10 % jitter, so a fleet of hosts does not hit a key server in
//! lock-step), and a worker thread per such group that checks them as one
//! batch: volumes whose keys are wrapped by the same KEK version share one
//! provider call (`VolumeKeys::record_shared_check`).
//! A provider that hangs holds up only its own worker: other KEKs' checks,
//! `hostcrypt status` and reloads go on (checks take no lock across
//! provider calls, see `volume/keys.rs`). A second thread gives volumes
//! still waiting to open their next try (`waiting.rs`), so a hanging open
//! does not hold up checks either.
//!
//! Plain threads, not tasks: providers block on the network, and a slow
//! provider must delay only checks, never I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::shutdown::StopSignal;
use crate::service::registry::Registry;
use crate::volume::VolumeKeys;

/// How often the scheduler looks at the export list when nothing is due (a
/// reload may add a volume whose first check is due soon).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// The monitor's threads; they end at shutdown.
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

/// Starts the monitor. Volumes are read from the registry every round, so a
/// reload's additions get checked and its removals stop being checked.
pub fn spawn_monitor(
    registry: Registry,
    stop: StopSignal,
    retry_waiting: impl Fn() + Send + 'static,
) -> std::io::Result<Monitor> {
    let stop_waiting = stop.clone();
    let waiting = std::thread::Builder::new()
        .name("hostcrypt-waiting".into())
        .spawn(move || loop {
            retry_waiting();
            if stop_waiting.wait_timeout(IDLE_POLL) {
                return;
            }
        })?;
    let scheduler = std::thread::Builder::new()
        .name("hostcrypt-keys".into())
        .spawn(move || schedule(registry, stop))?;
    Ok(Monitor { scheduler, waiting })
}

/// One group's worker: checks the batches queued for it, one at a time.
struct Worker {
    queue: Sender<Vec<Arc<VolumeKeys>>>,
    /// Set while a batch is queued or running, so a hung worker's queue
    /// does not grow by one batch per interval.
    busy: Arc<AtomicBool>,
}

impl Worker {
    fn spawn(kek: &str) -> std::io::Result<Worker> {
        let (queue, jobs) = mpsc::channel::<Vec<Arc<VolumeKeys>>>();
        let busy = Arc::new(AtomicBool::new(false));
        let done = busy.clone();
        std::thread::Builder::new()
            .name(format!("hostcrypt-kek-{kek}"))
            .spawn(move || {
                while let Ok(batch) = jobs.recv() {
                    check_batch(&batch);
                    done.store(false, Ordering::SeqCst);
                }
            })?;
        Ok(Worker { queue, busy })
    }

    /// Queues a batch unless the previous one is still queued or running.
    fn submit(&self, batch: Vec<Arc<VolumeKeys>>) -> bool {
        if self.busy.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.queue.send(batch).is_ok()
    }
}

/// Checks one KEK's volumes: the first volume on each KEK version asks the
/// provider, the others on that version record its success. Outcomes are
/// logged and audited by the checks themselves.
fn check_batch(batch: &[Arc<VolumeKeys>]) {
    let mut proven: Vec<(crate::kek::KekRef, &Arc<VolumeKeys>)> = Vec::new();
    for volume in batch {
        let key = volume.shared_check_key();
        if let Some(by) = key
            .as_ref()
            .and_then(|k| proven.iter().find(|(p, _)| p == k).map(|(_, v)| *v))
        {
            volume.record_shared_check(by);
            continue;
        }
        if volume.check(None).is_ok() {
            if let Some(key) = key {
                proven.push((key, volume));
            }
        }
    }
}

fn schedule(registry: Registry, stop: StopSignal) {
    // Volumes are grouped by KEK and check interval: a group shares one
    // provider call per KEK version, and no volume is checked more often
    // than its own interval asks. Next check per group; a group first seen
    // is due one interval later.
    type Group = (String, Duration);
    let mut due: HashMap<Group, Instant> = HashMap::new();
    let mut workers: HashMap<Group, Worker> = HashMap::new();
    loop {
        let now = Instant::now();
        let mut groups: HashMap<Group, Vec<Arc<VolumeKeys>>> = HashMap::new();
        // Removed instances still alive too: they still serve.
        for volume in registry.live().into_iter().filter_map(|e| e.keys) {
            let interval = volume
                .policy()
                .check_interval
                .max(Duration::from_millis(100));
            groups
                .entry((volume.kek_name(), interval))
                .or_default()
                .push(volume);
        }
        due.retain(|group, _| groups.contains_key(group));
        for (group, volumes) in groups {
            let interval = group.1;
            let at = *due
                .entry(group.clone())
                .or_insert_with(|| now + jittered(interval));
            if at > now {
                continue;
            }
            if !workers.contains_key(&group) {
                match Worker::spawn(&group.0) {
                    Ok(w) => {
                        workers.insert(group.clone(), w);
                    }
                    Err(e) => {
                        tracing::error!(kek = group.0, "cannot start a key-check thread: {e}");
                        continue;
                    }
                }
            }
            if let Some(worker) = workers.get(&group) {
                if !worker.submit(volumes) {
                    tracing::debug!(kek = group.0, "previous key checks still running");
                }
            }
            due.insert(group, Instant::now() + jittered(interval));
        }
        let next = due.values().min().copied().unwrap_or(now + IDLE_POLL);
        let wait = next
            .saturating_duration_since(Instant::now())
            .min(IDLE_POLL);
        if stop.wait_timeout(wait) {
            return;
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
