//! A cache volume's key lifecycle while it is served (the state here; the
//! check in `check.rs`, rotation and rekey in `rewrap.rs`): periodic key checks,
//! key loss and recovery, rotation to a newer KEK version (by hand or
//! `auto_rotate`), and migration to another KEK (`rekey`). Every step is
//! audited. What the providers do is `kek/`; when checks run is the
//! monitor in `service/keys.rs`.
//!
//! Key loss with `on_key_loss = "stop"` drops the volume's key schedule
//! (zeroized), so every request fails with EIO until a check succeeds again;
//! the DEK is then unwrapped afresh from the header. With `"until-restart"`
//! the in-memory key keeps serving and only the state says the key is lost.
//!
//! An outage is not a revocation: a provider that cannot be reached
//! (`KekError::is_unreachable`) leaves the volume serving from memory for
//! `key_unreachable_grace` (with `on_key_unreachable = "serve"`, the
//! default), then counts as key loss. An answer that denies access or says
//! the key is gone is key loss at once, inside the grace too.
//!
//! Header updates (rotation, rekey) rewrite the keyslot of the active DEK
//! generation through the two-copy protocol (`store.rs`): a crash leaves
//! either the old or the new wrapping, both of which unwrap the same DEK.
//! Every header written here is sealed with the keys derived from the DEKs
//! (`auth.rs`, held in `Current`) and then recorded in the volume's
//! anti-rollback record (`record.rs`).
//!
//! A double-encrypted volume (`kek_inner`) has two layers, each with its own
//! DEK and KEK; checks cover both (losing either is key loss), rotation and
//! rekey act on one layer at a time.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

mod check;
mod rewrap;

use serde::{Deserialize, Serialize};

use super::auth::HeaderKeys;
use super::record::{RecordError, VolumeRecord};
use super::{claim, store, DataArea, Header, Layer};
use crate::kek::audit::{AuditLog, Event};
use crate::kek::{version_newer, KekError, KekRef, KeyProvider, WrappedDek};

/// What a volume does when its KEK becomes unusable.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum OnKeyLoss {
    /// Stop I/O (EIO) and wipe the key from memory until access returns.
    #[default]
    Stop,
    /// Keep serving with the in-memory key until the daemon restarts.
    UntilRestart,
}

/// What a volume does while its KEK's provider cannot be reached.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum OnKeyUnreachable {
    /// Keep serving from memory for `key_unreachable_grace`, then stop as
    /// on key loss.
    #[default]
    Serve,
    /// Treat an unreachable provider as key loss at once.
    Stop,
}

/// The key policy of one volume, from its config.
#[derive(Debug, Clone)]
pub struct KeyPolicy {
    pub on_key_loss: OnKeyLoss,
    pub on_key_unreachable: OnKeyUnreachable,
    pub unreachable_grace: Duration,
    pub auto_rotate: bool,
    pub check_interval: Duration,
}

/// The configured KEK serving one layer of a volume.
#[derive(Clone)]
pub struct LayerKek {
    /// The `[kek.NAME]` table name.
    pub name: String,
    pub provider: Arc<dyn KeyProvider>,
}

/// A point-in-time view of a volume's key, for status output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyStatus {
    /// `serving`, `key-unreachable-serving` (provider down, within the
    /// grace), `key-lost` (I/O stopped) or `key-lost-serving` (until restart).
    pub state: String,
    /// Key-safety warnings from the providers (deletion allowed, purgeable,
    /// exportable, expiring, ...), each prefixed with its KEK's name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Since when (seconds since the epoch) the provider has not answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable_since: Option<u64>,
    pub kek_name: String,
    pub kek: KekRef,
    /// The inner layer's KEK of a double-encrypted volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner: Option<InnerStatus>,
    pub on_key_loss: OnKeyLoss,
    pub auto_rotate: bool,
    pub check_interval_ms: u64,
    /// Seconds since the epoch of the last check, if any.
    pub last_check: Option<u64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InnerStatus {
    pub kek_name: String,
    pub kek: KekRef,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyOpError {
    #[error(transparent)]
    Kek(#[from] KekError),
    #[error("{path}: writing the header failed: {source}")]
    Header {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the header has no {0} keyslot for the active DEK generation")]
    NoKeyslot(Layer),
    #[error("the volume is not double-encrypted: it has no inner layer")]
    NoInnerLayer,
    #[error("KEK {0:?} already wraps the volume's other layer; double encryption needs two different KEKs")]
    SameKekBothLayers(String),
    #[error("a re-encryption is in progress; rotate or rekey after it finishes (hostcrypt reencrypt VOLUME --status)")]
    Reencrypting,
    #[error("the volume's key is lost; restore access to the KEK first")]
    KeyLost,
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Record(#[from] RecordError),
}

pub(super) struct Current {
    pub(super) header: Header,
    /// What the header is sealed with (derived from its DEKs).
    pub(super) auth: HeaderKeys,
    outer: LayerKek,
    inner: Option<LayerKek>,
    last_check: Option<SystemTime>,
    last_error: Option<String>,
    /// When the provider stopped answering (cleared by a good check).
    unreachable_since: Option<SystemTime>,
    /// The providers' key-safety warnings, as last read.
    warnings: Vec<String>,
}

impl Current {
    pub(super) fn kek(&self, layer: Layer) -> Option<&LayerKek> {
        match layer {
            Layer::Outer => Some(&self.outer),
            Layer::Inner => self.inner.as_ref(),
        }
    }

    /// Every wrapped DEK the volume needs now, with the KEK that holds it:
    /// each layer of the active generation, and while re-encrypting each
    /// layer of the target generation too.
    fn slots(&self) -> Vec<Slot> {
        let target = self.header.reencrypt.map(|r| r.target_generation);
        let generations = std::iter::once(self.header.dek_generation).chain(target);
        let mut slots = Vec::new();
        for generation in generations {
            for layer in [Layer::Outer, Layer::Inner] {
                let (Some(kek), Some(slot)) = (
                    self.kek(layer),
                    self.header
                        .keyslots
                        .iter()
                        .find(|k| k.generation == generation && k.layer == layer),
                ) else {
                    continue;
                };
                slots.push(Slot {
                    target: Some(generation) == target,
                    layer,
                    kek: kek.clone(),
                    wrapped: slot.wrapped.clone(),
                });
            }
        }
        slots
    }
}

/// The part of `grace` not used up between `since` (when the provider
/// stopped answering) and `now`; a clock that went back counts as no time.
fn grace_left(since: SystemTime, now: SystemTime, grace: Duration) -> Duration {
    grace.saturating_sub(now.duration_since(since).unwrap_or_default())
}

/// One wrapped DEK the volume needs.
struct Slot {
    /// Whether it belongs to the re-encryption's target generation.
    target: bool,
    layer: Layer,
    kek: LayerKek,
    wrapped: WrappedDek,
}

/// The key side of one served cache volume.
pub struct VolumeKeys {
    pub(super) name: String,
    pub(super) path: PathBuf,
    pub(super) data: Arc<DataArea>,
    policy: KeyPolicy,
    pub(super) audit: AuditLog,
    lost: AtomicBool,
    checks_ok: AtomicU64,
    checks_failed: AtomicU64,
    /// Serialises rotations, rekeys, re-encryption header updates and the
    /// bookkeeping of checks; held briefly by `status`.
    current: Mutex<Current>,
    /// Serialises key checks (held across their provider calls).
    checking: Mutex<()>,
    /// The online re-encryption's controls (`reencrypt.rs`).
    pub(super) reencryption: super::reencrypt_status::Controls,
    /// The anti-rollback record, updated after every header write.
    pub(super) record: VolumeRecord,
    /// Set when the record could not follow the last header write: the
    /// next header change first brings the record up to date, or is
    /// refused, so the record lags by at most one header.
    record_behind: AtomicBool,
}

impl std::fmt::Debug for VolumeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeKeys")
            .field("name", &self.name)
            .field("lost", &self.lost)
            .finish_non_exhaustive()
    }
}

impl VolumeKeys {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        path: &Path,
        volume: &super::Volume,
        header: super::Header,
        auth: HeaderKeys,
        record: VolumeRecord,
        outer: LayerKek,
        inner: Option<LayerKek>,
        policy: KeyPolicy,
        audit: AuditLog,
    ) -> Self {
        VolumeKeys {
            name: volume.name.clone(),
            path: path.to_owned(),
            data: volume.data.clone(),
            policy,
            audit,
            lost: AtomicBool::new(false),
            checks_ok: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            reencryption: Default::default(),
            record,
            record_behind: AtomicBool::new(false),
            checking: Mutex::new(()),
            current: Mutex::new(Current {
                header,
                auth,
                outer,
                inner,
                last_check: None,
                last_error: None,
                unreachable_since: None,
                warnings: Vec::new(),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `[kek.NAME]` of the outer layer now (changes with `rekey`).
    pub fn kek_name(&self) -> String {
        self.lock().outer.name.clone()
    }

    pub fn policy(&self) -> &KeyPolicy {
        &self.policy
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Key checks so far: (succeeded, failed).
    pub fn check_counts(&self) -> (u64, u64) {
        (
            self.checks_ok.load(Ordering::Relaxed),
            self.checks_failed.load(Ordering::Relaxed),
        )
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> KeyStatus {
        let cur = self.lock();
        let state = match (self.is_lost(), self.data.key_loaded()) {
            (false, _) if cur.unreachable_since.is_some() => "key-unreachable-serving",
            (false, _) => "serving",
            (true, true) => "key-lost-serving",
            (true, false) => "key-lost",
        };
        let kek_of = |layer| {
            cur.header.active_slot(layer).map_or_else(
                || KekRef {
                    provider: String::new(),
                    key_id: String::new(),
                    key_version: String::new(),
                },
                |s| s.wrapped.kek.clone(),
            )
        };
        KeyStatus {
            state: state.into(),
            kek_name: cur.outer.name.clone(),
            kek: kek_of(Layer::Outer),
            inner: cur.inner.as_ref().map(|k| InnerStatus {
                kek_name: k.name.clone(),
                kek: kek_of(Layer::Inner),
            }),
            on_key_loss: self.policy.on_key_loss,
            auto_rotate: self.policy.auto_rotate,
            check_interval_ms: self.policy.check_interval.as_millis() as u64,
            last_check: cur
                .last_check
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            last_error: cur.last_error.clone(),
            warnings: cur.warnings.clone(),
            unreachable_since: cur
                .unreachable_since
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
        }
    }

    /// Reads the key-safety warnings of the volume's KEKs (without the
    /// state lock: providers may be slow) and logs the ones that are new.
    /// A provider that cannot be asked keeps its previous warnings.
    pub fn refresh_warnings(&self) -> Vec<String> {
        let keks: Vec<LayerKek> = {
            let cur = self.lock();
            std::iter::once(cur.outer.clone())
                .chain(cur.inner.clone())
                .collect()
        };
        let mut warnings = Vec::new();
        for kek in &keks {
            match kek.provider.safety_warnings() {
                Ok(found) => {
                    warnings.extend(found.into_iter().map(|w| format!("KEK {}: {w}", kek.name)))
                }
                Err(e) => {
                    let prefix = format!("KEK {}: ", kek.name);
                    warnings.extend(
                        self.lock()
                            .warnings
                            .iter()
                            .filter(|w| w.starts_with(&prefix))
                            .cloned(),
                    );
                    tracing::debug!(volume = %self.name, kek = %kek.name, "key-safety settings not read: {e}");
                }
            }
        }
        let mut cur = self.lock();
        for w in warnings.iter().filter(|w| !cur.warnings.contains(w)) {
            tracing::warn!(volume = %self.name, "key safety: {w}");
        }
        cur.warnings = warnings.clone();
        warnings
    }

    /// The one KEK version a check of this volume would prove, when another
    /// volume's check of that same version can stand for it: one layer, no
    /// re-encryption, key loaded and not lost, no auto-rotation (which
    /// rewraps per volume). `None`: it needs a check of its own.
    pub fn shared_check_key(&self) -> Option<KekRef> {
        if self.policy.auto_rotate || self.is_lost() || !self.data.key_loaded() {
            return None;
        }
        let cur = self.lock();
        if cur.inner.is_some() || cur.header.reencrypt.is_some() {
            return None;
        }
        cur.header
            .active_slot(Layer::Outer)
            .map(|s| s.wrapped.kek.clone())
    }

    /// Records a successful check that `by`, a volume on the same KEK
    /// version, just ran: one provider call per KEK version and interval,
    /// however many volumes share it.
    pub fn record_shared_check(&self, by: &VolumeKeys) {
        let _one_at_a_time = self.checking.lock().unwrap_or_else(|p| p.into_inner());
        let (warnings, kek) = {
            let other = by.lock();
            (
                other.warnings.clone(),
                other
                    .header
                    .active_slot(Layer::Outer)
                    .map(|s| s.wrapped.kek.clone()),
            )
        };
        let mut cur = self.lock();
        cur.last_check = Some(SystemTime::now());
        cur.last_error = None;
        cur.warnings = warnings;
        self.checks_ok.fetch_add(1, Ordering::Relaxed);
        let mut event = Event::new(&self.name, "check", "ok")
            .detail(format!("shared with volume {} (same KEK version)", by.name));
        if let Some(kek) = &kek {
            event = event.key(kek);
        }
        self.audit.record(&event);
        if cur.unreachable_since.take().is_some() {
            tracing::warn!(volume = %self.name, "key provider answers again");
            self.audit.record(
                &Event::new(&self.name, "key-reachable", "ok").detail("provider answers again"),
            );
        }
    }

    /// How many key-safety warnings the volume's KEKs have now.
    pub fn warning_count(&self) -> usize {
        self.lock().warnings.len()
    }

    /// Whether the provider is unreachable and the volume serves on grace
    /// (as `status` says `key-unreachable-serving`: once the grace has run
    /// out the key is lost, and this is false).
    pub fn is_unreachable(&self) -> bool {
        !self.is_lost() && self.lock().unreachable_since.is_some()
    }

    /// What is left of `key_unreachable_grace` while the volume serves on
    /// it (`None` otherwise); zero once it has run out, until the next
    /// check stops the volume.
    pub fn grace_remaining(&self) -> Option<Duration> {
        if self.is_lost() {
            return None;
        }
        let since = self.lock().unreachable_since?;
        Some(grace_left(
            since,
            SystemTime::now(),
            self.policy.unreachable_grace,
        ))
    }

    /// Writes `header` sealed through the two-copy protocol, makes it
    /// current and records it. Once the primary copy is durable the change
    /// has taken effect (every later open reads it), so it is reported as
    /// done, never as failed: a backup copy that could not be written is
    /// logged, and repaired at the next header write or open, which rewrite
    /// a stale copy.
    pub(in crate::volume) fn write_header(
        &self,
        cur: &mut Current,
        mut header: Header,
    ) -> Result<(), KeyOpError> {
        self.write_header_io(cur, &mut header)
            .map_err(|source| KeyOpError::Header {
                path: self.path.clone(),
                source,
            })
    }

    /// `write_header` for the re-encryption worker, which reports I/O errors.
    pub(in crate::volume) fn write_header_io(
        &self,
        cur: &mut Current,
        header: &mut Header,
    ) -> std::io::Result<()> {
        // A record that lags more than one header would let a writer of
        // the backing roll back to any header in between.
        if self.record_behind.load(Ordering::SeqCst) {
            self.record
                .save(&cur.header)
                .map_err(|e| std::io::Error::other(format!("the anti-rollback record is behind the header and cannot be updated, so no header change is made: {e}")))?;
            self.record_behind.store(false, Ordering::SeqCst);
        }
        // Another daemon may have taken a remote backing over since the
        // last check: its header must not be overwritten with ours.
        // Unconfirmed (the header unreadable right now) writes nothing
        // either: the change is refused and can be tried again.
        if let Some(ours) = &cur.header.owner {
            match claim::still_ours(self.data.backing(), cur.header.uuid, ours) {
                claim::Found::Ours => {}
                claim::Found::Lost(reason) => {
                    self.data.fail(reason.clone());
                    return Err(std::io::Error::other(reason));
                }
                claim::Found::Unknown(reason) => {
                    return Err(std::io::Error::other(format!(
                        "the remote backing's owner record could not be confirmed ({reason}), so no header change is made"
                    )))
                }
            }
        }
        match store::write_header_copies(self.data.backing(), header, &cur.auth) {
            Ok(()) => {}
            Err(e) if e.primary_durable => tracing::warn!(
                volume = %self.name,
                "header change is durable in the primary copy, but the backup copy could not be written ({}); it is repaired at the next header write or open",
                e.source
            ),
            Err(e) => return Err(e.source),
        }
        cur.auth.advance(header);
        cur.header = header.clone();
        // The header is durable; a record that lags behind it is still
        // accepted at open (newer sequence, same or pinned key), so a
        // failed update is logged rather than failing the operation.
        if let Err(e) = self.record.save(header) {
            self.record_behind.store(true, Ordering::SeqCst);
            tracing::error!(volume = %self.name, "{e}; the next header change waits until the record can be written");
        }
        Ok(())
    }

    /// Writes the remote backing's owner record back as released (at stop,
    /// or when a reload removed the volume), so another daemon may open it
    /// without `take_over`. Nothing to do on a local backing, or when the
    /// record is no longer ours.
    pub fn release_claim(&self) -> std::io::Result<()> {
        let mut cur = self.lock();
        let mut header = cur.header.clone();
        match header.owner.as_mut() {
            Some(owner) if !owner.released => owner.released = true,
            _ => return Ok(()),
        }
        self.write_header_io(&mut cur, &mut header)?;
        tracing::info!(volume = %self.name, "released the remote backing's owner record");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::grace_left;
    use std::time::{Duration, SystemTime};

    #[test]
    fn grace_left_counts_down_to_zero_and_ignores_a_clock_that_went_back() {
        let since = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let grace = Duration::from_secs(600);
        assert_eq!(grace_left(since, since, grace), grace);
        let later = since + Duration::from_secs(450);
        assert_eq!(grace_left(since, later, grace), Duration::from_secs(150));
        let after = since + Duration::from_secs(601);
        assert_eq!(grace_left(since, after, grace), Duration::ZERO);
        let before = since - Duration::from_secs(5);
        assert_eq!(grace_left(since, before, grace), grace);
    }
}
