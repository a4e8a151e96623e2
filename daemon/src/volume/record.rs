//! The local anti-rollback record: one small JSON file per cache volume in
//! the daemon's state directory (`[daemon] state_dir`), holding what the
//! backing cannot vouch for itself: the volume's UUID, its DEK generation,
//! the newest header sequence and the key check of that generation's DEKs
//! (and, from the moment a re-encryption starts, its target's).
//!
//! A header's MAC (`auth.rs`) proves it was written by a holder of the
//! DEK; it cannot prove it is the newest such header, nor that the DEK is
//! the volume's at all when anyone may wrap one (an RSA KEK's public part).
//! The record does: at open a header older than recorded (sequence or
//! generation), a generation the record did not see coming, another key
//! check for the same generation, another UUID or an unauthenticated
//! header for a volume the record knows are all refused, before anything
//! is written. It is updated after every header write the daemon makes,
//! atomically (temp file, fsync, rename, fsync of the directory).
//!
//! A volume without a record trusts its header on first sight and gets
//! one; keep the state directory on persistent, local storage.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::header::Header;

/// A record file larger than this is not one (checked before reading it).
const MAX_RECORD: u64 = 64 * 1024;

/// The state directory's records.
#[derive(Debug, Clone)]
pub struct Records {
    dir: PathBuf,
}

/// One volume's record file.
#[derive(Debug, Clone)]
pub struct VolumeRecord {
    pub volume: String,
    pub path: PathBuf,
}

/// What a record holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// The volume's name in the config (for whoever reads the file).
    pub volume: String,
    pub uuid: Uuid,
    pub generation: u32,
    pub sequence: u64,
    /// Hex of the generation's key check.
    pub key_check: String,
    /// The re-encryption target the daemon started, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Pinned>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pinned {
    pub generation: u32,
    pub key_check: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("volume {volume:?}: anti-rollback record {path}: {source}")]
    Io {
        volume: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume:?}: anti-rollback record {path} is unreadable ({reason}); refusing to trust the header without it. If the state directory was damaged, remove the file to trust the header on disk again")]
    Corrupt {
        volume: String,
        path: PathBuf,
        reason: String,
    },
    #[error("volume {volume:?}: refusing the header on disk ({why}); nothing was written. The anti-rollback record is {path}; if the change is yours (a restored or re-created volume), see docs/security.md")]
    Refused {
        volume: String,
        path: PathBuf,
        why: String,
    },
    #[error("volume {volume:?}: the header to record is not authenticated")]
    Unauthenticated { volume: String },
}

impl Records {
    pub fn new(dir: &Path) -> Self {
        Records {
            dir: dir.to_owned(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The record file of `volume`: named by a hash of the name, which may
    /// hold any character.
    pub fn volume(&self, volume: &str) -> VolumeRecord {
        let digest = Sha256::digest(volume.as_bytes());
        VolumeRecord {
            volume: volume.to_owned(),
            path: self
                .dir
                .join(format!("volume-{}.json", hex::encode(&digest[..16]))),
        }
    }
}

impl VolumeRecord {
    fn io(&self, source: std::io::Error) -> RecordError {
        RecordError::Io {
            volume: self.volume.clone(),
            path: self.path.clone(),
            source,
        }
    }

    pub fn load(&self) -> Result<Option<Record>, RecordError> {
        let file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        let corrupt = |reason: String| RecordError::Corrupt {
            volume: self.volume.clone(),
            path: self.path.clone(),
            reason,
        };
        let len = file.metadata().map_err(|e| self.io(e))?.len();
        if len > MAX_RECORD {
            return Err(corrupt(format!("{len} bytes")));
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_RECORD), &mut text)
            .map_err(|e| self.io(e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| corrupt(e.to_string()))
    }

    /// Whether `header` may be used, given the record; `Ok` without a
    /// record (first sight).
    pub fn check(&self, header: &Header) -> Result<(), RecordError> {
        let Some(record) = self.load()? else {
            return Ok(());
        };
        let refuse = |why: String| RecordError::Refused {
            volume: self.volume.clone(),
            path: self.path.clone(),
            why,
        };
        if header.uuid != record.uuid {
            return Err(refuse(format!(
                "the backing holds volume {}, but this volume is {}: another volume's header",
                header.uuid, record.uuid
            )));
        }
        let Some(auth) = &header.auth else {
            return Err(refuse(
                "the header is not authenticated (format version 1 or 2), but this volume's header was upgraded: a downgrade".into(),
            ));
        };
        let check = hex::encode(auth.key_check);
        if header.dek_generation < record.generation {
            return Err(refuse(format!(
                "DEK generation {} is older than the recorded {}: a rollback",
                header.dek_generation, record.generation
            )));
        }
        if header.dek_generation == record.generation && check != record.key_check {
            return Err(refuse(format!(
                "DEK generation {} holds another data key than recorded: a substituted key",
                header.dek_generation
            )));
        }
        if header.dek_generation > record.generation {
            let started = record
                .target
                .as_ref()
                .is_some_and(|t| t.generation == header.dek_generation && t.key_check == check);
            if !started {
                return Err(refuse(format!(
                    "DEK generation {} was never started by this daemon (recorded: {}): a forged key",
                    header.dek_generation, record.generation
                )));
            }
        }
        if header.sequence < record.sequence {
            return Err(refuse(format!(
                "header sequence {} is older than the recorded {}: a rollback",
                header.sequence, record.sequence
            )));
        }
        if let (Some(r), Some(target_check)) = (header.reencrypt, auth.target_key_check) {
            let pinned = record.target.as_ref().is_some_and(|t| {
                t.generation == r.target_generation && t.key_check == hex::encode(target_check)
            });
            if !pinned {
                return Err(refuse(format!(
                    "the re-encryption to DEK generation {} was not started by this daemon",
                    r.target_generation
                )));
            }
        }
        Ok(())
    }

    /// Records `header` (as written): its generation, sequence, key checks.
    pub fn save(&self, header: &Header) -> Result<(), RecordError> {
        let auth = header
            .auth
            .as_ref()
            .ok_or_else(|| RecordError::Unauthenticated {
                volume: self.volume.clone(),
            })?;
        let target = header
            .reencrypt
            .zip(auth.target_key_check)
            .map(|(r, check)| Pinned {
                generation: r.target_generation,
                key_check: hex::encode(check),
            });
        self.write(&Record {
            volume: self.volume.clone(),
            uuid: header.uuid,
            generation: header.dek_generation,
            sequence: header.sequence,
            key_check: hex::encode(auth.key_check),
            target,
        })
    }

    /// Pins a re-encryption's target before the header that starts it is
    /// written: a header at that generation is then the daemon's own.
    pub fn pin_target(
        &self,
        current: &Header,
        generation: u32,
        key_check: [u8; 32],
    ) -> Result<(), RecordError> {
        let auth = current
            .auth
            .as_ref()
            .ok_or_else(|| RecordError::Unauthenticated {
                volume: self.volume.clone(),
            })?;
        self.write(&Record {
            volume: self.volume.clone(),
            uuid: current.uuid,
            generation: current.dek_generation,
            sequence: current.sequence,
            key_check: hex::encode(auth.key_check),
            target: Some(Pinned {
                generation,
                key_check: hex::encode(key_check),
            }),
        })
    }

    /// Forgets the record (a volume re-created with `create --force`).
    pub fn remove(&self) -> Result<(), RecordError> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.io(e)),
            _ => Ok(()),
        }
    }

    /// Atomic replace: a crash leaves the old record or the new one.
    fn write(&self, record: &Record) -> Result<(), RecordError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let written = (|| {
            std::fs::create_dir_all(dir)?;
            let tmp = self.path.with_extension("json.tmp");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            let text = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
            file.write_all(&text)?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        written.map_err(|e| self.io(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::header::tests::sample_v3;
    use crate::volume::header::Reencrypt;

    fn refused(r: Result<(), RecordError>, what: &str) {
        match r {
            Err(RecordError::Refused { volume, why, .. }) => {
                assert_eq!(volume, "v");
                assert!(why.contains(what), "{why}");
            }
            other => panic!("expected a refusal ({what}), got {other:?}"),
        }
    }

    #[test]
    fn rollbacks_substitutions_and_downgrades_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let rec = Records::new(&dir.path().join("state")).volume("v");
        let mut h = sample_v3();
        rec.check(&h).unwrap();
        rec.save(&h).unwrap();
        rec.check(&h).unwrap();
        // Newer sequence, same key: fine (the daemon died before recording).
        let mut newer = h.clone();
        newer.sequence += 1;
        rec.check(&newer).unwrap();
        rec.save(&newer).unwrap();
        refused(rec.check(&h), "a rollback");
        let mut other_key = newer.clone();
        other_key.auth.as_mut().unwrap().key_check = [9; 32];
        refused(rec.check(&other_key), "another data key");
        let mut next_gen = newer.clone();
        next_gen.dek_generation += 1;
        refused(rec.check(&next_gen), "never started");
        let mut other_volume = newer.clone();
        other_volume.uuid = Uuid::new_v4();
        refused(rec.check(&other_volume), "another volume");
        let mut legacy = newer.clone();
        legacy.auth = None;
        refused(rec.check(&legacy), "downgrade");
        let mut started = newer.clone();
        started.reencrypt = Some(Reencrypt {
            checkpoint: 0,
            target_generation: 2,
        });
        started.auth.as_mut().unwrap().target_key_check = Some([7; 32]);
        refused(rec.check(&started), "not started by this daemon");
        // Pinned first, as the daemon does: the start and the finish pass.
        rec.pin_target(&newer, 2, [7; 32]).unwrap();
        rec.check(&newer).unwrap();
        rec.check(&started).unwrap();
        h = started.clone();
        h.sequence += 1;
        h.advance_reencrypt(h.size);
        rec.check(&h).unwrap();
        rec.save(&h).unwrap();
        refused(rec.check(&newer), "older than the recorded");
        std::fs::write(&rec.path, b"{").unwrap();
        assert!(matches!(rec.check(&h), Err(RecordError::Corrupt { .. })));
    }
}
