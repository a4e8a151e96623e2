//! Online DEK re-encryption (`hostcrypt reencrypt VOLUME`): the whole data
//! area moves to freshly generated DEKs (one per layer) while the volume
//! keeps serving, like `cryptsetup reencrypt`.
//!
//! Start pins the target generation's key check in the anti-rollback
//! record (`record.rs`), then writes a header that holds both generations'
//! wrapped DEKs, the target's key check and a checkpoint of 0, sealed with
//! the active generation's keys (`auth.rs`): only a holder of the active
//! DEK can start or steer a re-encryption. A worker thread then walks the data area one window at
//! a time: under the window's range lock it rewrites the window's sectors
//! from the old key to the new, through the journal (`journal.rs`), and
//! records the new checkpoint in the header before releasing the window.
//! I/O elsewhere goes on; writes into the window wait for that window
//! only, reads only while its sectors change in place (`data/window.rs`). The
//! next window is read and re-encrypted in memory while the current one
//! commits (`walk`). At the end the header keeps only the new generation.
//!
//! Crash safety: the header's checkpoint only moves after the window is
//! durable in place, and the window is durable in the journal before it is
//! touched in place; opening a volume mid-re-encryption replays a matching
//! journal, so a `kill -9` at any instant loses no acknowledged write and
//! leaves no sector between keys. The worker resumes at daemon start.
//!
//! Controls: a rate limit (MB/s) so it does not starve the workload, pause
//! and resume, and a stop at shutdown (between windows). A lost key pauses
//! the walk until the key is back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::auth::GenerationKeys;
use super::data::PreparedWindow;
use super::header::{Keyslot, Layer, Reencrypt};
use super::journal::{self, JournalKey, HASH_CAPACITY, JOURNAL_AT, JOURNAL_SIZE};
use super::keys::{KeyOpError, VolumeKeys};
use super::reencrypt_status::{
    ReencryptAction, ReencryptState, ReencryptStatus, MAX_RATE_MBPS, MIN_RATE_MBPS,
};
use super::VolumeCipher;
use crate::crypto::Dek;
use crate::kek::audit::Event;

/// A window re-encrypted in memory, with its old sectors' journal hashes.
type Prepared<'a> = PreparedWindow<'a, Vec<[u8; 32]>>;

impl VolumeKeys {
    /// Handles one operator request; every action is safe to repeat.
    pub fn reencrypt(
        self: &Arc<Self>,
        action: ReencryptAction,
        rate_mbps: Option<f64>,
        uid: Option<u32>,
    ) -> Result<ReencryptStatus, KeyOpError> {
        // Checked before anything starts: a rate the pacing cannot turn
        // into a duration (NaN, 1e-20) used to panic the worker.
        if let Some(rate) = rate_mbps {
            if !(rate == 0.0 || (MIN_RATE_MBPS..=MAX_RATE_MBPS).contains(&rate)) {
                return Err(KeyOpError::Refused(format!(
                    "--rate {rate}: give 0 (unlimited) or {MIN_RATE_MBPS} to {MAX_RATE_MBPS} MB/s"
                )));
            }
        }
        match action {
            ReencryptAction::Status => {}
            ReencryptAction::Pause => {
                self.reencryption.lock().paused = true;
                self.reencryption.changed.notify_all();
                self.audit
                    .record(&Event::new(&self.name, "reencrypt", "paused").uid(uid));
            }
            ReencryptAction::Start | ReencryptAction::Resume => {
                if action == ReencryptAction::Start {
                    self.begin(uid)?;
                }
                {
                    let mut state = self.reencryption.lock();
                    state.paused = false;
                    if let Some(rate) = rate_mbps {
                        state.rate = (rate > 0.0).then_some(rate * 1e6);
                    }
                }
                self.reencryption.changed.notify_all();
                self.ensure_worker();
            }
        }
        Ok(self.reencrypt_status())
    }

    /// Resumes a re-encryption found in the header at open.
    pub fn resume_reencrypt(self: &Arc<Self>) {
        if self.lock().header.reencrypt.is_some() {
            tracing::info!(volume = %self.name, "resuming the re-encryption in progress");
            self.ensure_worker();
        }
    }

    /// Stops the worker between windows and waits for it (shutdown).
    pub fn stop_reencrypt(&self) {
        let worker = {
            let mut state = self.reencryption.lock();
            state.stop = true;
            state.worker.take()
        };
        self.reencryption.changed.notify_all();
        if let Some(worker) = worker {
            let _ = worker.join();
        }
    }

    pub fn reencrypt_status(&self) -> ReencryptStatus {
        let (header_state, generation) = {
            let cur = self.lock();
            (cur.header.reencrypt, cur.header.dek_generation)
        };
        let state = self.reencryption.lock();
        let size = self.data.size();
        let rate_mbps = match state.started {
            Some(t) => {
                let took = state.ended.unwrap_or_else(Instant::now) - t;
                if took > Duration::ZERO {
                    state.moved as f64 / took.as_secs_f64() / 1e6
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        let phase = match header_state {
            None if state.phase == ReencryptState::Done => ReencryptState::Done,
            None => ReencryptState::Idle,
            Some(_) if state.error.is_some() => ReencryptState::Failed,
            Some(_) if state.paused => ReencryptState::Paused,
            Some(_) if !self.data.key_loaded() => ReencryptState::WaitingForKey,
            Some(_) => ReencryptState::Running,
        };
        ReencryptStatus {
            volume: self.name.clone(),
            state: phase,
            checkpoint: header_state.map_or(
                if phase == ReencryptState::Done {
                    size
                } else {
                    0
                },
                |r| r.checkpoint,
            ),
            size,
            target_generation: header_state.map(|r| r.target_generation),
            generation,
            rate_limit_mbps: state.rate.map(|r| r / 1e6),
            rate_mbps,
            error: state.error.clone(),
        }
    }

    /// Writes the header that starts a re-encryption (unless one is in
    /// progress) and loads the new keys.
    fn begin(&self, uid: Option<u32>) -> Result<(), KeyOpError> {
        let mut cur = self.lock();
        if cur.header.reencrypt.is_some() {
            return Ok(());
        }
        if self.is_lost() || !self.data.key_loaded() {
            return Err(KeyOpError::KeyLost);
        }
        if cur.header.data_offset < JOURNAL_AT + JOURNAL_SIZE {
            return Err(KeyOpError::Refused(
                "this volume's header area leaves no room for the re-encryption journal".into(),
            ));
        }
        journal::prepare(self.data.backing()).map_err(|e| {
            KeyOpError::Refused(format!(
                "cannot allocate the re-encryption journal in {}: {e}; free some space and retry",
                self.path.display()
            ))
        })?;
        let target = cur.header.dek_generation + 1;
        let mut new_slots = Vec::new();
        let mut deks: Vec<(Layer, Dek)> = Vec::new();
        for layer in [Layer::Outer, Layer::Inner] {
            let Some(kek) = cur.kek(layer) else { continue };
            let dek = Dek::generate()
                .map_err(|e| KeyOpError::Refused(format!("random generator failed: {e}")))?;
            let wrapped = kek.provider.wrap(&dek)?;
            new_slots.push(Keyslot {
                generation: target,
                layer,
                wrapped,
            });
            deks.push((layer, dek));
        }
        let outer = deks
            .iter()
            .find(|(l, _)| *l == Layer::Outer)
            .map(|(_, d)| d)
            .ok_or(KeyOpError::NoKeyslot(Layer::Outer))?;
        let inner = deks
            .iter()
            .find(|(l, _)| *l == Layer::Inner)
            .map(|(_, d)| d);
        let mut header = cur.header.clone();
        let active = header.dek_generation;
        header.keyslots.retain(|k| k.generation == active);
        header.keyslots.extend(new_slots);
        header.reencrypt = Some(Reencrypt {
            checkpoint: 0,
            target_generation: target,
        });
        let target_keys = GenerationKeys::derive(header.uuid, target, outer, inner);
        // Pinned before the header exists: a header at the target
        // generation is then known to be this daemon's.
        self.record
            .pin_target(&cur.header, target, target_keys.key_check)?;
        cur.auth.target = Some(target_keys);
        if let Err(e) = self.write_header(&mut cur, header) {
            cur.auth.target = None;
            return Err(e);
        }
        self.data
            .begin_reencrypt(
                VolumeCipher::new(
                    outer,
                    inner,
                    self.data.inner_cipher(),
                    self.data.sector_size() as usize,
                ),
                0,
            )
            .map_err(|e| KeyOpError::Refused(e.to_string()))?;
        {
            let mut state = self.reencryption.lock();
            state.error = None;
            state.phase = ReencryptState::Running;
        }
        tracing::info!(volume = %self.name, generation = target, "re-encryption started");
        self.audit.record(
            &Event::new(&self.name, "reencrypt", "started")
                .detail(format!("to DEK generation {target}"))
                .uid(uid),
        );
        Ok(())
    }

    fn ensure_worker(self: &Arc<Self>) {
        // Lock order everywhere: the header (`current`) before the controls.
        if self.lock().header.reencrypt.is_none() {
            return;
        }
        let mut state = self.reencryption.lock();
        if state.worker.as_ref().is_some_and(|w| !w.is_finished()) {
            return;
        }
        state.stop = false;
        state.error = None;
        state.started = Some(Instant::now());
        state.ended = None;
        state.moved = 0;
        let keys = self.clone();
        match std::thread::Builder::new()
            .name(format!("reencrypt-{}", self.name))
            .spawn(move || {
                // A worker that dies reports "failed", never "running" for
                // ever; the header's checkpoint and journal stay valid.
                let walked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| keys.walk()));
                if walked.is_err() {
                    tracing::error!(volume = %keys.name, "the re-encryption worker died; the re-encryption stops as failed and resumes at the next start");
                    keys.reencryption.lock().error =
                        Some("the re-encryption worker died (see the daemon log)".into());
                }
            })
        {
            Ok(worker) => state.worker = Some(worker),
            Err(e) => state.error = Some(format!("cannot start the worker thread: {e}")),
        }
    }

    /// The worker: one window after another until done, stopped or failed.
    /// The window adapts (cryptsetup's LUKS2 hotzone does the same): it
    /// grows while a window takes under `FAST`, shrinks when one takes over
    /// `SLOW`, between `MIN_WINDOW` and what the journal holds (capped at
    /// `MAX_WINDOW`, which bounds both memory and how long client I/O into
    /// the window waits).
    ///
    /// Two windows are in flight: while one is synced and committed on this
    /// thread, a helper reads and re-encrypts the next one in memory (under
    /// its own range lock, nothing written). Its journal record and its
    /// in-place write still wait for the commit before it, so the crash
    /// argument is the one-window one: only the committed checkpoint and
    /// one journalled window are ever on disk.
    fn walk(&self) {
        const MIN_WINDOW: u64 = 256 * 1024;
        const MAX_WINDOW: u64 = 16 << 20;
        const FAST: Duration = Duration::from_millis(100);
        const SLOW: Duration = Duration::from_millis(400);
        let sector = self.data.sector_size();
        let largest = MAX_WINDOW.min(HASH_CAPACITY as u64 * sector);
        let mut window = (1u64 << 20).min(largest);
        let hash_sectors = |old: &[u8]| -> Vec<[u8; 32]> {
            old.chunks_exact(sector as usize)
                .map(journal::sector_hash)
                .collect()
        };
        let stop = || self.reencryption.lock().stop;
        let mut ahead = None;
        loop {
            {
                let mut state = self.reencryption.lock();
                while state.paused && !state.stop {
                    // Nothing of a window read ahead is on disk: release it
                    // so clients do not wait on a paused walk.
                    ahead = None;
                    state = self
                        .reencryption
                        .changed
                        .wait(state)
                        .unwrap_or_else(|p| p.into_inner());
                }
                if state.stop {
                    return;
                }
            }
            if !self.data.key_loaded() {
                // Key lost: the check that restores it reloads both generations.
                ahead = None;
                self.reencryption.wait(Duration::from_secs(1));
                continue;
            }
            let (checkpoint, key, mac_key) = {
                let cur = self.lock();
                let Some(r) = cur.header.reencrypt else {
                    return;
                };
                (
                    r.checkpoint,
                    JournalKey {
                        uuid: cur.header.uuid,
                        checkpoint: r.checkpoint,
                        target_generation: r.target_generation,
                    },
                    cur.auth.current.journal_key(),
                )
            };
            let started = Instant::now();
            let size = self.data.size();
            // A window read ahead for another checkpoint is dropped (and
            // unlocked) before its range is locked again.
            let prepared = match ahead.take().filter(|w: &Prepared| w.start() == checkpoint) {
                Some(w) => Ok(w),
                None => self.data.prepare_window(
                    checkpoint,
                    window.min(size - checkpoint),
                    hash_sectors,
                ),
            };
            let result = prepared.and_then(|mut w| {
                self.data.write_window(
                    &mut w,
                    |hashes| {
                        journal::write_hashes(
                            self.data.backing(),
                            key,
                            &mac_key,
                            sector as u32,
                            hashes,
                        )
                    },
                    || journal::clear(self.data.backing()),
                    &stop,
                )?;
                crash_window_for_tests();
                let len = w.end() - w.start();
                let next = w.end();
                let (committed, next_window) = std::thread::scope(|scope| {
                    // Paced walks read nothing ahead: the pause between
                    // windows would hold the next one locked for nothing.
                    let paced = self.reencryption.lock().rate.is_some();
                    let helper = (next < size && !paced && !stop()).then(|| {
                        scope.spawn(move || {
                            self.data
                                .prepare_window(next, window.min(size - next), hash_sectors)
                        })
                    });
                    let committed = self.data.commit_window(w, |end| self.commit(end), &stop);
                    // A helper that failed (key lost, read error) is retried
                    // as a fresh window by the next round, which reports it.
                    let next_window = helper.and_then(|h| h.join().ok()).and_then(Result::ok);
                    (committed, next_window)
                });
                ahead = next_window;
                committed.map(|()| len)
            });
            let len = match result {
                Ok(len) => len,
                Err(_) if !self.data.key_loaded() => {
                    // The key was lost mid-window: nothing was committed;
                    // wait for it like any other key loss.
                    continue;
                }
                Err(e) => {
                    tracing::error!(volume = %self.name, "re-encryption stopped at byte {checkpoint}: {e}; `hostcrypt reencrypt --resume` retries");
                    self.audit.record(
                        &Event::new(&self.name, "reencrypt", "error")
                            .error(&e)
                            .detail(format!("at byte {checkpoint}")),
                    );
                    self.reencryption.lock().error = Some(e.to_string());
                    return;
                }
            };
            let took = started.elapsed();
            if took < FAST {
                window = (window * 2).min(largest);
            } else if took > SLOW {
                window = (window / 2).max(MIN_WINDOW);
            }
            let rate = {
                let mut state = self.reencryption.lock();
                state.moved += len;
                state.rate
            };
            if let Some(rate) = rate {
                let due = Duration::from_secs_f64(len as f64 / rate);
                let elapsed = started.elapsed();
                if due > elapsed {
                    // Pacing, interruptible by pause/stop.
                    self.reencryption.wait(due - elapsed);
                }
            }
        }
    }

    /// Records a finished window in the header (under the window lock);
    /// at the end, makes the new generation the only one.
    fn commit(&self, next: u64) -> std::io::Result<()> {
        let mut cur = self.lock();
        let mut header = cur.header.clone();
        let Some(r) = header.reencrypt else {
            return Err(std::io::Error::other("no re-encryption in progress"));
        };
        let done = header.advance_reencrypt(next);
        // A durable primary copy is the commit (see `VolumeKeys::write_header`).
        self.write_header_io(&mut cur, &mut header)?;
        self.data.advance_checkpoint(next);
        if done {
            // Fails only while the key is lost; the recovery then loads the
            // new generation from the header, which already says so.
            if let Err(e) = self.data.finish_reencrypt() {
                tracing::warn!(volume = %self.name, "re-encryption finished while the key is unavailable: {e}");
            }
            {
                let mut state = self.reencryption.lock();
                state.phase = ReencryptState::Done;
                state.ended = Some(Instant::now());
            }
            tracing::info!(volume = %self.name, generation = r.target_generation, "re-encryption finished");
            self.audit.record(
                &Event::new(&self.name, "reencrypt", "done")
                    .detail(format!("now DEK generation {}", r.target_generation)),
            );
        }
        Ok(())
    }
}

/// Debug builds only: `HOSTCRYPT_TEST_WINDOW_DELAY_MS` holds every window
/// that long between its in-place write and its sync, so the kill -9 test
/// can land kills inside windows (and must then see journal replays)
/// instead of hoping to hit a few milliseconds. Fault injection, not
/// synchronization; release builds never read the variable.
fn crash_window_for_tests() {
    #[cfg(debug_assertions)]
    {
        static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
        let delay = DELAY.get_or_init(|| {
            std::env::var("HOSTCRYPT_TEST_WINDOW_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis)
        });
        if let Some(delay) = delay {
            std::thread::sleep(*delay);
        }
    }
}
