//! One owner per remote backing: the owner record a daemon writes into the
//! header of a volume on an NBD export, and the checks that keep a second
//! daemon from serving it at the same time.
//!
//! A local backing is claimed by the kernel (`io/owner.rs`: an OFD lock,
//! `O_EXCL`); an NBD export has no such lock, and two hosts can reach it.
//! So the header carries who serves the volume (`header::Owner`: this
//! daemon's identity, its host name, and a generation bumped at every
//! open), under the header's MAC for a cache volume:
//!
//! - **At open**, before anything is written: a record left by another
//!   daemon that did not release it refuses the open, naming that daemon
//!   and host, unless the volume says `take_over = true`. A record of this
//!   same daemon (a restart, kill -9 included) or a released one is taken
//!   over silently. The new record is written at once; a take-over of a
//!   record that was not released then waits [`TAKE_OVER_GRACE`] so that a
//!   previous owner still running notices and stops before this one serves.
//! - **Every second** (`service/registry.rs`) and before every header write
//!   (`keys/`), the owner reads the header back: another owner or another
//!   generation there means it was taken over, and the volume fails for
//!   good (every request gets EIO, `status` says by whom).
//! - **At stop**, and when a reload removes the volume, a cache volume
//!   writes its record back as released.
//!
//! What this needs from the storage, and what it cannot do, is in
//! `docs/security.md`: a write the export acknowledged and flushed is what
//! every later read of it returns, on every connection; and between a
//! take-over and the previous owner's next check, that owner may still
//! write for about a second (the grace covers a live owner, not one that
//! hangs for longer). The daemon identity is a random UUID kept in the state
//! directory (`daemon-id`), so each daemon needs a state directory of its
//! own; the daemon locks it at start (`daemon/mod.rs`).

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use uuid::Uuid;

use super::data::DataArea;
use super::header::{Header, Owner, HEADER_SIZE, MAX_OWNER_HOST};
use super::store::{HeaderCopies, PRIMARY_AT};
use crate::io::Backing;

/// How often a serving daemon checks its records (`service/registry.rs`).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long a take-over of an unreleased record waits before serving: two
/// checks of the previous owner, and some slack for a slow backend.
pub const TAKE_OVER_GRACE: Duration = Duration::from_millis(2500);

/// The file in the state directory that holds the daemon's identity.
const DAEMON_ID_FILE: &str = "daemon-id";

/// Who is opening: this daemon, and whether the volume may take over a
/// backing another daemon claims.
#[derive(Debug, Clone)]
pub struct Claimant {
    pub daemon: Uuid,
    pub host: String,
    pub take_over: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not hold a daemon identity (a UUID); remove it to have a new one made")]
    Malformed { path: PathBuf },
    #[error("volume {volume:?} ({backing}): served by another hostcryptd (daemon {daemon} on host {host:?}, owner generation {generation}), which has not released it; a remote backing has one owner. Stop that daemon (it releases the backing at stop), or, if it is gone for good, set take_over = true on this volume")]
    OwnedElsewhere {
        volume: String,
        backing: PathBuf,
        daemon: Uuid,
        host: String,
        generation: u64,
    },
}

/// How an open found the backing's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// No record, a released one, or this daemon's own: nobody else serves it.
    Free,
    /// Another daemon's unreleased record, taken over as configured.
    TakenOver(Owner),
}

impl Claimant {
    /// This daemon's identity from `state_dir` (made on first use).
    pub fn load(state_dir: &Path, take_over: bool) -> Result<Self, ClaimError> {
        Ok(Claimant {
            daemon: daemon_id(state_dir)?,
            host: host_name(),
            take_over,
        })
    }

    /// The claimant for a local backing, which the kernel claims
    /// (`io/owner.rs`) and which gets no owner record: nothing of it is used.
    pub fn local() -> Self {
        Claimant {
            daemon: Uuid::nil(),
            host: String::new(),
            take_over: false,
        }
    }

    /// Decides whether this daemon may serve a backing whose header holds
    /// `found`, and returns the record to write before anything else.
    pub fn admit(
        &self,
        volume: &str,
        backing: &Path,
        found: Option<&Owner>,
    ) -> Result<(Owner, Admission), ClaimError> {
        let generation = found.map_or(0, |o| o.generation).wrapping_add(1);
        let admission = match found {
            None => Admission::Free,
            Some(o) if o.released || o.daemon == self.daemon => Admission::Free,
            Some(o) if self.take_over => Admission::TakenOver(o.clone()),
            Some(o) => {
                return Err(ClaimError::OwnedElsewhere {
                    volume: volume.to_owned(),
                    backing: backing.to_owned(),
                    daemon: o.daemon,
                    host: o.host.clone(),
                    generation: o.generation,
                })
            }
        };
        let owner = Owner {
            generation,
            daemon: self.daemon,
            host: self.host.clone(),
            released: false,
        };
        Ok((owner, admission))
    }
}

/// Whether the backing's current header still names `ours` as its owner.
/// A header that cannot be read or decoded right now (a torn write in
/// progress, the backend briefly down) proves nothing: that is `Ok`, and
/// the next check decides.
pub fn still_ours(backing: &Backing, ours: &Owner) -> Result<(), String> {
    let Ok(copies) = HeaderCopies::read(backing) else {
        return Ok(());
    };
    let Some(current) = copies.current() else {
        return Ok(());
    };
    compare(current.owner.as_ref(), ours)
}

/// `Ok` when `found` is `ours` (same daemon and generation).
fn compare(found: Option<&Owner>, ours: &Owner) -> Result<(), String> {
    match found {
        Some(o) if o.daemon == ours.daemon && o.generation == ours.generation => Ok(()),
        Some(o) => Err(format!(
            "the remote backing was taken over by daemon {} on host {:?} (owner generation {}, this instance had {}); I/O on this volume is stopped",
            o.daemon, o.host, o.generation, ours.generation
        )),
        None => Err(
            "the remote backing's header no longer holds this daemon's owner record (another writer rewrote it); I/O on this volume is stopped"
                .to_owned(),
        ),
    }
}

/// A served instance's record, and whether a check of it is in flight
/// (one at a time, so a hung backend does not pile them up).
#[derive(Debug)]
pub struct Claim {
    pub owner: Owner,
    checking: AtomicBool,
}

impl Claim {
    pub fn new(owner: Owner) -> Arc<Self> {
        Arc::new(Claim {
            owner,
            checking: AtomicBool::new(false),
        })
    }

    /// Reads the backing's primary header copy without blocking the
    /// caller (the key monitor's thread), and fails the volume if it names
    /// another owner or generation. A copy that does not decode (torn by a
    /// write in progress) proves nothing.
    pub fn check(self: &Arc<Self>, data: &Arc<DataArea>) {
        let Some(remote) = data.backing().remote() else {
            return;
        };
        let min = (remote.status().min_block as usize).max(1);
        let Some(len) = HEADER_SIZE.div_ceil(min).checked_mul(min) else {
            return;
        };
        if !remote.reads_directly(PRIMARY_AT, len as u64)
            || self.checking.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let (claim, data_area) = (self.clone(), data.clone());
        remote.submit_read(
            PRIMARY_AT,
            len,
            Box::new(move |read| {
                claim.checking.store(false, Ordering::Release);
                let Ok(buf) = read else { return };
                let Ok(found) = Header::decode(&buf[..]) else {
                    return;
                };
                if let Err(reason) = compare(found.owner.as_ref(), &claim.owner) {
                    data_area.fail(reason);
                }
            }),
        );
    }
}

/// After taking over `previous`'s unreleased record: waits until a
/// previous owner that still runs has seen the new record and stopped
/// (`TAKE_OVER_GRACE`), so the two never write at once. Loud: a take-over
/// is an operator's decision worth a line in the log.
pub fn wait_out(volume: &str, previous: &Owner) {
    tracing::warn!(
        volume,
        daemon = %previous.daemon,
        host = %previous.host,
        generation = previous.generation,
        "take_over = true: taking the remote backing over from a daemon that did not release it; waiting {} for it to notice before serving",
        humantime::format_duration(TAKE_OVER_GRACE)
    );
    std::thread::sleep(TAKE_OVER_GRACE);
}

/// Reads the daemon's identity, or makes one (0600, created exclusively,
/// synced) when the state directory has none yet.
fn daemon_id(state_dir: &Path) -> Result<Uuid, ClaimError> {
    let path = state_dir.join(DAEMON_ID_FILE);
    let io = |source| ClaimError::Io {
        path: path.clone(),
        source,
    };
    let read = |path: &Path| -> Result<Uuid, ClaimError> {
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(64).read_to_string(&mut text))
            .map_err(io)?;
        Uuid::parse_str(text.trim()).map_err(|_| ClaimError::Malformed {
            path: path.to_owned(),
        })
    };
    if path.exists() {
        return read(&path);
    }
    std::fs::create_dir_all(state_dir).map_err(io)?;
    let id = Uuid::new_v4();
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path);
    match created {
        Ok(mut f) => {
            f.write_all(format!("{id}\n").as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(io)?;
            Ok(id)
        }
        // Another opener made it meanwhile: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(&path),
        Err(e) => Err(io(e)),
    }
}

/// The host's name, cut to what a record keeps.
fn host_name() -> String {
    let mut name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    if name.is_empty() {
        name = "unknown".to_owned();
    }
    while name.len() > MAX_OWNER_HOST {
        name.pop();
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimant(take_over: bool) -> Claimant {
        Claimant {
            daemon: Uuid::new_v4(),
            host: "here".into(),
            take_over,
        }
    }

    fn owner(daemon: Uuid, generation: u64, released: bool) -> Owner {
        Owner {
            generation,
            daemon,
            host: "there".into(),
            released,
        }
    }

    #[test]
    fn another_daemons_unreleased_record_refuses_unless_taking_over() {
        let other = owner(Uuid::new_v4(), 7, false);
        let err = claimant(false)
            .admit("cache0", Path::new("nbd://h/e"), Some(&other))
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("cache0") && text.contains("there") && text.contains("take_over"),
            "{text}"
        );
        let (new, admission) = claimant(true)
            .admit("cache0", Path::new("nbd://h/e"), Some(&other))
            .unwrap();
        assert_eq!(admission, Admission::TakenOver(other));
        assert_eq!(new.generation, 8);
        assert!(!new.released);
    }

    #[test]
    fn own_released_or_missing_records_are_free_and_bump_the_generation() {
        let me = claimant(false);
        for (found, generation) in [
            (None, 1),
            (Some(owner(me.daemon, 3, false)), 4),
            (Some(owner(Uuid::new_v4(), 9, true)), 10),
            (Some(owner(Uuid::new_v4(), u64::MAX, true)), 0),
        ] {
            let (new, admission) = me
                .admit("v", Path::new("nbd://h/e"), found.as_ref())
                .unwrap();
            assert_eq!(admission, Admission::Free);
            assert_eq!((new.daemon, new.generation), (me.daemon, generation));
        }
    }

    #[test]
    fn the_daemon_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let a = Claimant::load(&state, false).unwrap();
        let b = Claimant::load(&state, false).unwrap();
        assert_eq!(a.daemon, b.daemon);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.join(DAEMON_ID_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(state.join(DAEMON_ID_FILE), "not a uuid").unwrap();
        assert!(matches!(
            Claimant::load(&state, false),
            Err(ClaimError::Malformed { .. })
        ));
    }
}
