//! A volume's key check: can every layer's provider still unwrap its
//! DEK? Loss and recovery, the unreachable grace, `auto_rotate`, and the
//! check shared by volumes under one KEK version. The state it changes
//! and the rest of the lifecycle are `mod.rs`; rotation and rekey
//! `rewrap.rs`.

use super::*;

impl VolumeKeys {
    /// One key check: can every layer's provider still unwrap its DEK?
    /// Handles loss, recovery and `auto_rotate`. Returns the check's own
    /// outcome.
    ///
    /// The provider calls run without the volume's state lock, so a
    /// provider that hangs never delays `status`, a reload or the other
    /// volumes; checks of one volume still run one at a time.
    pub fn check(&self, uid: Option<u32>) -> Result<(), KekError> {
        let _one_at_a_time = self.checking.lock().unwrap_or_else(|p| p.into_inner());
        let (slots, checkpoint) = {
            let cur = self.lock();
            (
                cur.slots(),
                cur.header.reencrypt.map_or(0, |r| r.checkpoint),
            )
        };
        if slots.is_empty() {
            return Ok(());
        }
        let outcome = self.check_slots(&slots, checkpoint);
        let mut cur = self.lock();
        cur.last_check = Some(SystemTime::now());
        let counter = if outcome.is_ok() {
            &self.checks_ok
        } else {
            &self.checks_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match &outcome {
            Ok(()) => {
                cur.last_error = None;
                if let Some(since) = cur.unreachable_since.take() {
                    let down = SystemTime::now().duration_since(since).unwrap_or_default();
                    tracing::warn!(volume = %self.name, "key provider answers again after {down:?}");
                    self.audit.record(
                        &Event::new(&self.name, "key-reachable", "ok")
                            .key(&slots[0].wrapped.kek)
                            .detail(format!("provider answers again after {} s", down.as_secs())),
                    );
                }
                for slot in &slots {
                    self.audit.record(
                        &Event::new(&self.name, "check", "ok")
                            .key(&slot.wrapped.kek)
                            .uid(uid),
                    );
                }
                if self.lost.swap(false, Ordering::SeqCst) {
                    tracing::warn!(volume = %self.name, "key access restored; serving again");
                    self.audit.record(
                        &Event::new(&self.name, "recovery", "ok")
                            .key(&slots[0].wrapped.kek)
                            .detail("key access restored; I/O resumed"),
                    );
                }
            }
            Err((failed, e)) => {
                let failed = &slots[*failed].wrapped.kek;
                cur.last_error = Some(e.to_string());
                self.audit.record(
                    &Event::new(&self.name, "check", "error")
                        .key(failed)
                        .error(e)
                        .detail(e.class())
                        .uid(uid),
                );
                if e.is_unreachable()
                    && self.policy.on_key_unreachable == OnKeyUnreachable::Serve
                    && !self.is_lost()
                {
                    let now = SystemTime::now();
                    let since = match cur.unreachable_since {
                        Some(since) => since,
                        None => {
                            let grace = humantime::format_duration(self.policy.unreachable_grace);
                            tracing::warn!(volume = %self.name, "key provider unreachable: {e}; serving from memory for up to {grace}");
                            self.audit.record(
                                &Event::new(&self.name, "key-unreachable", "serving")
                                    .key(failed)
                                    .error(e)
                                    .detail(format!("serving from memory for up to {grace}")),
                            );
                            cur.unreachable_since = Some(now);
                            now
                        }
                    };
                    let down = now.duration_since(since).unwrap_or_default();
                    if down < self.policy.unreachable_grace {
                        return outcome.map_err(|(_, e)| e);
                    }
                }
                if !self.lost.swap(true, Ordering::SeqCst) {
                    let action = match self.policy.on_key_loss {
                        OnKeyLoss::Stop => {
                            self.data.unload_key();
                            "I/O stopped and the key wiped from memory"
                        }
                        OnKeyLoss::UntilRestart => "serving with the in-memory key until restart",
                    };
                    tracing::error!(volume = %self.name, "key lost: {e}; {action}");
                    self.audit.record(
                        &Event::new(&self.name, "key-loss", "lost")
                            .key(failed)
                            .error(e)
                            .detail(action),
                    );
                }
            }
        }
        if outcome.is_ok() {
            drop(cur);
            self.refresh_warnings();
            cur = self.lock();
        }
        // Not while re-encrypting: the new DEKs are wrapped under the
        // newest version anyway, and the header belongs to the re-encryption.
        if outcome.is_ok() && self.policy.auto_rotate && cur.header.reencrypt.is_none() {
            // A failed automatic rotation is audited and retried next check.
            for slot in slots.iter().filter(|s| !s.target) {
                let _ = self.rewrap_locked(&mut cur, slot.layer, None, "auto-rotate", uid);
            }
        }
        outcome.map_err(|(_, e)| e)
    }

    /// Checks each needed DEK; reloads the keys if they were wiped. On
    /// failure, the index of the slot that failed.
    fn check_slots(&self, slots: &[Slot], checkpoint: u64) -> Result<(), (usize, KekError)> {
        if self.data.key_loaded() {
            for (i, slot) in slots.iter().enumerate() {
                slot.kek.provider.check(&slot.wrapped).map_err(|e| (i, e))?;
            }
            return Ok(());
        }
        let mut deks = Vec::with_capacity(slots.len());
        for (i, slot) in slots.iter().enumerate() {
            let dek = slot
                .kek
                .provider
                .unwrap(&slot.wrapped)
                .map_err(|e| (i, e))?;
            deks.push((slot.target, slot.layer, dek));
        }
        let find = |target: bool, layer: Layer| {
            deks.iter()
                .find(|(t, l, _)| *t == target && *l == layer)
                .map(|(_, _, d)| d)
        };
        let generation =
            |target: bool| find(target, Layer::Outer).map(|o| (o, find(target, Layer::Inner)));
        if let Some(current) = generation(false) {
            self.data
                .load_keys(current, generation(true).map(|t| (t, checkpoint)));
        }
        Ok(())
    }
}
