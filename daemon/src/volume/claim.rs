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
//! - **Inside this daemon** one instance at a time holds a backing: a
//!   process-wide table of the header UUIDs in use ([`Hold`]), freed when
//!   the last reference to the instance goes (a reload's re-add waits for
//!   the removed instance's lingering connections, whatever the URI's
//!   spelling).
//! - **At open**, before anything is written: a record left by another
//!   daemon (or by this daemon's identity on another host: a copied state
//!   directory) that was not released refuses the open, unless the volume
//!   says `take_over = true`. This daemon's own record (a restart, kill -9
//!   included) or a released one is taken over silently. The new record is
//!   written, then read back after [`SETTLE`] (two daemons opening at once:
//!   the later writer wins, the other refuses), or after
//!   [`TAKE_OVER_GRACE`] when it took over an unreleased record.
//! - **While serving**, a thread of the volume's own reads the record back
//!   every [`CHECK_INTERVAL`]. Writes go out only under a lease
//!   (`io/remote/client/lease.rs`) of [`LEASE`] from the last read, counted
//!   from when it was issued, that showed the record still ours: a daemon
//!   whose link is down, or whose reads hang, stops sending writes by
//!   itself. Another owner or generation there revokes the lease and fails
//!   the volume for good (every request gets EIO, `status` says by whom).
//!   Every header write first reads the record back, and does not write
//!   unless it is confirmed ours.
//! - **At stop**, and when a reload removes the volume, the record is
//!   written back as released (`VolumeKeys::release_claim`,
//!   [`Claim::release_temp`]).
//!
//! What this needs from the storage, and what it cannot do, is in
//! `docs/security.md`: a write the export acknowledged and flushed is what
//! every later read of it returns, on every connection; a write the old
//! owner had already sent may still sit in the server's queue after its
//! lease ended, so a take-over is safe only once the old host is stopped or
//! cut off from the storage. The daemon identity is a random UUID kept in
//! the state directory (`daemon-id`), read once per state directory; each
//! daemon needs a state directory of its own, which it locks at start
//! (`daemon/mod.rs`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::auth::HeaderKeys;
use super::data::DataArea;
use super::header::{Header, Owner, HEADER_SIZE, MAX_OWNER_HOST};
use super::store::{self, HeaderCopies, BACKUP_AT, PRIMARY_AT};
use crate::io::remote::RemoteHandle;
use crate::io::Backing;

/// How often a serving daemon reads its record back.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long after a read that confirmed the record (counted from when the
/// read was issued) writes may still go out.
pub const LEASE: Duration = Duration::from_secs(5);

/// How long a take-over of an unreleased record waits before serving: a
/// previous owner still running has then either read the new record and
/// stopped, or seen its lease run out.
pub const TAKE_OVER_GRACE: Duration = Duration::from_secs(7);

/// How long a new record settles before it is read back: two daemons that
/// found the backing free at the same moment both wrote by then.
pub const SETTLE: Duration = CHECK_INTERVAL;

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
    #[error("volume {volume:?} ({backing}): served by another hostcryptd (daemon {daemon} on host {host:?}, owner generation {generation}), which has not released it; a remote backing has one owner. Stop that daemon (it releases the backing at stop), or, if it is gone for good and cut off from the storage, set take_over = true on this volume")]
    OwnedElsewhere {
        volume: String,
        backing: PathBuf,
        daemon: Uuid,
        host: String,
        generation: u64,
    },
    #[error("volume {volume:?} ({backing}): its owner record names this daemon's identity on another host ({host:?}): the state directory (daemon-id) was copied, or this host was renamed. Give each host a state directory of its own; after a rename, or if the other host is gone for good, set take_over = true on this volume once")]
    CopiedIdentity {
        volume: String,
        backing: PathBuf,
        host: String,
    },
    #[error("volume {volume:?} ({backing}): volume {other:?} of this daemon still holds the same backing (header {uuid}); it opens once that instance is gone")]
    HeldHere {
        volume: String,
        backing: PathBuf,
        other: String,
        uuid: Uuid,
    },
    #[error("volume {volume:?} ({backing}): {reason}")]
    Lost {
        volume: String,
        backing: PathBuf,
        reason: String,
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
    /// This daemon's identity from `state_dir` (made on first use, read
    /// once per state directory and process).
    pub fn load(state_dir: &Path, take_over: bool) -> Result<Self, ClaimError> {
        static IDS: Mutex<BTreeMap<PathBuf, Uuid>> = Mutex::new(BTreeMap::new());
        let mut ids = IDS.lock().unwrap_or_else(|p| p.into_inner());
        let daemon = match ids.get(state_dir) {
            Some(id) => *id,
            None => {
                let id = daemon_id(state_dir)?;
                ids.insert(state_dir.to_owned(), id);
                id
            }
        };
        Ok(Claimant {
            daemon,
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
            Some(o) if o.released => Admission::Free,
            Some(o) if o.daemon == self.daemon && o.host == self.host => Admission::Free,
            Some(o) if self.take_over => Admission::TakenOver(o.clone()),
            Some(o) if o.daemon == self.daemon => {
                return Err(ClaimError::CopiedIdentity {
                    volume: volume.to_owned(),
                    backing: backing.to_owned(),
                    host: o.host.clone(),
                })
            }
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

/// A backing in use by one instance of this daemon, by the UUID of the
/// header it found there and of the one it writes (they differ for a temp
/// volume); freed when dropped.
#[derive(Debug)]
pub struct Hold {
    uuids: Vec<Uuid>,
}

static HELD: Mutex<BTreeMap<Uuid, String>> = Mutex::new(BTreeMap::new());

impl Hold {
    /// Holds `uuids` for `volume`, or names the instance that holds one.
    pub fn take(volume: &str, backing: &Path, uuids: &[Uuid]) -> Result<Hold, ClaimError> {
        let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((uuid, other)) = uuids
            .iter()
            .find_map(|u| held.get(u).map(|other| (*u, other.clone())))
        {
            return Err(ClaimError::HeldHere {
                volume: volume.to_owned(),
                backing: backing.to_owned(),
                other,
                uuid,
            });
        }
        let mut mine = uuids.to_vec();
        mine.sort_unstable();
        mine.dedup();
        for u in &mine {
            held.insert(*u, volume.to_owned());
        }
        Ok(Hold { uuids: mine })
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
        for u in &self.uuids {
            held.remove(u);
        }
    }
}

/// What a read of the record back showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Ours,
    /// Another owner or generation, or no record: ours no more.
    Lost(String),
    /// Unreadable or undecodable right now: proves nothing either way.
    Unknown(String),
}

/// Reads the backing's current header (both copies) and compares it with
/// ours: the volume `uuid` and the record `ours`.
pub fn still_ours(backing: &Backing, uuid: Uuid, ours: &Owner) -> Found {
    let copies = match HeaderCopies::read(backing) {
        Ok(c) => c,
        Err(e) => return Found::Unknown(format!("the header could not be read: {e}")),
    };
    match copies.current() {
        Some(current) => compare(current, uuid, ours),
        None => Found::Unknown("neither header copy is valid right now".into()),
    }
}

/// `Ours` when `found` is our volume (`uuid`: two temp volumes opened on
/// one blank export write the same record but not the same UUID) and its
/// record is `ours` (same daemon, host and generation).
fn compare(found: &Header, uuid: Uuid, ours: &Owner) -> Found {
    if found.uuid != uuid {
        return Found::Lost(format!(
            "the remote backing now holds another volume (header {}, this instance wrote {uuid}); I/O on this volume is stopped",
            found.uuid
        ));
    }
    match found.owner.as_ref() {
        Some(o) if o.daemon == ours.daemon && o.host == ours.host && o.generation == ours.generation => {
            Found::Ours
        }
        Some(o) => Found::Lost(format!(
            "the remote backing was taken over by daemon {} on host {:?} (owner generation {}, this instance had {}); I/O on this volume is stopped",
            o.daemon, o.host, o.generation, ours.generation
        )),
        None => Found::Lost(
            "the remote backing's header no longer holds this daemon's owner record (another writer rewrote it); I/O on this volume is stopped"
                .to_owned(),
        ),
    }
}

/// Reads the header again right before the record is written: one that
/// changed since `read` (another daemon opened the volume meanwhile)
/// refuses the open, which is tried again later.
pub fn unchanged_since(
    volume: &str,
    path: &Path,
    backing: &Backing,
    read: &Header,
) -> Result<(), ClaimError> {
    let lost = |reason: String| ClaimError::Lost {
        volume: volume.to_owned(),
        backing: path.to_owned(),
        reason,
    };
    let copies = HeaderCopies::read(backing).map_err(|e| {
        lost(format!(
            "the header could not be read again before the owner record was written ({e}); trying again"
        ))
    })?;
    match copies.current() {
        Some(now) if now == read => Ok(()),
        _ => Err(lost(
            "the header changed while the volume opened (another daemon may have opened it); trying again".into(),
        )),
    }
}

/// After the record is written: waits for it to settle (or, after a
/// take-over, for the previous owner to stop), then reads it back.
/// Returns when the read that confirmed it was issued.
/// The header must still be the one written (`written`: its sequence),
/// not only carry our record: a previous owner that went on writing its
/// header meanwhile (a re-encryption checkpoint) means it is alive.
pub fn settle(
    volume: &str,
    path: &Path,
    backing: &Backing,
    written: &Header,
    admission: &Admission,
) -> Result<Instant, ClaimError> {
    let uuid = written.uuid;
    let Some(ours) = written.owner.as_ref() else {
        return Ok(Instant::now());
    };
    let wait = match admission {
        Admission::Free => SETTLE,
        Admission::TakenOver(previous) => {
            // Loud: a take-over is an operator's decision worth a line.
            tracing::warn!(
                volume,
                daemon = %previous.daemon,
                host = ?previous.host,
                generation = previous.generation,
                "take_over = true: taking the remote backing over from a daemon that did not release it; waiting {} for it to stop before serving",
                humantime::format_duration(TAKE_OVER_GRACE)
            );
            TAKE_OVER_GRACE
        }
    };
    std::thread::sleep(wait);
    let issued = Instant::now();
    let found = match HeaderCopies::read(backing) {
        Err(e) => Found::Unknown(format!("the header could not be read: {e}")),
        Ok(copies) => match copies.current() {
            None => Found::Unknown("neither header copy is valid right now".into()),
            Some(now) if now.sequence != written.sequence => Found::Lost(format!(
                "the header moved on after the record was written (sequence {} now, {} written)",
                now.sequence, written.sequence
            )),
            Some(now) => compare(now, uuid, ours),
        },
    };
    match found {
        Found::Ours => Ok(issued),
        Found::Lost(reason) | Found::Unknown(reason) => Err(ClaimError::Lost {
            volume: volume.to_owned(),
            backing: path.to_owned(),
            reason: format!("the owner record just written could not be confirmed ({reason}); another daemon may have opened it at the same moment"),
        }),
    }
}

/// A served instance's record: the in-process hold, the write lease, and
/// the thread that keeps checking it.
#[derive(Debug)]
pub struct Claim {
    pub owner: Owner,
    /// The volume's header UUID.
    uuid: Uuid,
    volume: String,
    remote: RemoteHandle,
    data: OnceLock<Weak<DataArea>>,
    lost: OnceLock<String>,
    /// A temp volume's header and keys, to write the record back as
    /// released (a cache volume's go through `VolumeKeys`).
    temp: Mutex<Option<(Header, HeaderKeys)>>,
    /// Since when the export has answered with a header that does not
    /// decode (erased, or overwritten by a writer that is not a daemon).
    undecodable_since: Mutex<Option<Instant>>,
    _hold: Hold,
}

impl Claim {
    /// Starts holding writes to the lease, renewed from `confirmed` (when
    /// the read that confirmed the record was issued), and the checking
    /// thread, which ends with the last reference to the claim.
    pub fn start(
        volume: &str,
        (uuid, owner): (Uuid, Owner),
        backing: &Backing,
        hold: Hold,
        confirmed: Instant,
    ) -> std::io::Result<Arc<Self>> {
        let remote = backing
            .remote()
            .ok_or_else(|| std::io::Error::other("an owner record on a local backing"))?
            .handle();
        remote.require_write_lease();
        remote.renew_write_lease(confirmed + LEASE);
        let claim = Arc::new(Claim {
            owner,
            uuid,
            volume: volume.to_owned(),
            remote,
            data: OnceLock::new(),
            lost: OnceLock::new(),
            temp: Mutex::new(None),
            undecodable_since: Mutex::new(None),
            _hold: hold,
        });
        let weak = Arc::downgrade(&claim);
        std::thread::Builder::new()
            .name("owner-check".into())
            .spawn(move || watch(weak))?;
        Ok(claim)
    }

    /// The data area to fail when the record is lost (at once, if it was
    /// lost while the volume opened).
    pub fn attach(&self, data: &Arc<DataArea>) {
        let _ = self.data.set(Arc::downgrade(data));
        if let Some(reason) = self.lost.get() {
            data.fail(reason.clone());
        }
    }

    /// Keeps a temp volume's header and keys for `release_temp`.
    pub fn keep_temp(&self, header: Header, keys: HeaderKeys) {
        *self.temp.lock().unwrap_or_else(|p| p.into_inner()) = Some((header, keys));
    }

    /// Writes a temp volume's record back as released (at stop, or when a
    /// reload removed it), unless it is no longer ours.
    pub fn release_temp(&self, backing: &Backing) -> std::io::Result<()> {
        let mut temp = self.temp.lock().unwrap_or_else(|p| p.into_inner());
        let Some((header, keys)) = temp.as_mut() else {
            return Ok(());
        };
        match still_ours(backing, self.uuid, &self.owner) {
            Found::Ours => {}
            Found::Lost(reason) | Found::Unknown(reason) => {
                return Err(std::io::Error::other(reason))
            }
        }
        let mut released = header.clone();
        if let Some(o) = released.owner.as_mut() {
            o.released = true;
        }
        store::write_header(backing, &mut released, keys)?;
        *temp = None;
        tracing::info!(volume = %self.volume, "released the remote backing's owner record");
        Ok(())
    }

    /// Ends writing for good (after the record was released).
    pub fn end_writes(&self, reason: &str) {
        self.remote.revoke_writes(reason.to_owned());
    }

    /// One read of the record: renews the lease, or ends writing for good.
    /// `false` once the record is lost.
    fn check(&self) -> bool {
        let issued = Instant::now();
        let mut undecodable = self
            .undecodable_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // The primary copy, or the backup when the primary does not decode
        // (torn by a write in progress, or damaged).
        let read = |at| {
            self.remote
                .read_at(at, HEADER_SIZE)
                .map(|buf| Header::decode(&buf[..]))
        };
        let decoded = match read(PRIMARY_AT) {
            Ok(Err(_)) => read(BACKUP_AT),
            other => other,
        };
        let found = match decoded {
            Ok(decoded) => match decoded {
                Ok(h) => {
                    *undecodable = None;
                    compare(&h, self.uuid, &self.owner)
                }
                // Torn by a header write in progress, briefly; for longer
                // than a lease, the header is gone (erased, overwritten):
                // the volume is not ours to serve any more.
                Err(e) => match *undecodable.get_or_insert(issued) {
                    since if since.elapsed() > LEASE => Found::Lost(format!(
                        "the remote backing's header has not decoded for over {} ({e}): it was erased or overwritten; I/O on this volume is stopped",
                        humantime::format_duration(LEASE)
                    )),
                    _ => Found::Unknown(e.to_string()),
                },
            },
            Err(e) => Found::Unknown(e.to_string()),
        };
        drop(undecodable);
        match found {
            Found::Ours => {
                self.remote.renew_write_lease(issued + LEASE);
                true
            }
            Found::Unknown(_) => true,
            Found::Lost(reason) => {
                let _ = self.lost.set(reason.clone());
                self.remote.revoke_writes(reason.clone());
                if let Some(data) = self.data.get().and_then(Weak::upgrade) {
                    data.fail(reason);
                } else {
                    tracing::error!(volume = %self.volume, "{reason}");
                }
                false
            }
        }
    }
}

/// The checking thread: one read per interval while the claim lives.
fn watch(claim: Weak<Claim>) {
    loop {
        std::thread::sleep(CHECK_INTERVAL);
        let Some(claim) = claim.upgrade() else { return };
        if !claim.check() {
            return;
        }
    }
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
            (
                Some(Owner {
                    host: me.host.clone(),
                    ..owner(me.daemon, 3, false)
                }),
                4,
            ),
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
    fn this_daemons_identity_on_another_host_is_a_copied_state_dir() {
        let me = claimant(false);
        let copy = owner(me.daemon, 3, false);
        let err = me
            .admit("v", Path::new("nbd://h/e"), Some(&copy))
            .unwrap_err();
        assert!(matches!(err, ClaimError::CopiedIdentity { .. }), "{err}");
        let (_, admission) = claimant(true)
            .admit("v", Path::new("nbd://h/e"), Some(&copy))
            .unwrap();
        assert_eq!(admission, Admission::TakenOver(copy));
    }

    #[test]
    fn one_instance_holds_a_backing_until_it_is_dropped() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let first = Hold::take("old", Path::new("nbd://h/e"), &[a]).unwrap();
        // A re-add under another name, or a temp volume's new header.
        let err = Hold::take("new", Path::new("nbd://h/E"), &[a, b]).unwrap_err();
        assert!(err.to_string().contains("\"old\""), "{err}");
        assert!(Hold::take("other", Path::new("x"), &[b]).is_ok());
        drop(first);
        assert!(Hold::take("new", Path::new("nbd://h/E"), &[a, b]).is_ok());
    }

    #[test]
    fn a_record_is_ours_only_with_our_volume_daemon_host_and_generation() {
        let uuid = Uuid::new_v4();
        let header = |uuid: Uuid, owner: Option<Owner>| Header {
            sequence: 1,
            uuid,
            size: 1 << 20,
            sector_size: 4096,
            role: super::super::Role::Temp,
            data_offset: 1 << 20,
            dek_generation: 1,
            reencrypt: None,
            keyslots: Vec::new(),
            inner_cipher: super::super::InnerCipher::AesXts,
            auth: None,
            owner,
        };
        let me = owner(Uuid::new_v4(), 4, false);
        assert_eq!(
            compare(&header(uuid, Some(me.clone())), uuid, &me),
            Found::Ours
        );
        let released = Owner {
            released: true,
            ..me.clone()
        };
        assert_eq!(
            compare(&header(uuid, Some(released)), uuid, &me),
            Found::Ours
        );
        for other in [
            Owner {
                generation: 5,
                ..me.clone()
            },
            Owner {
                host: "elsewhere".into(),
                ..me.clone()
            },
            owner(Uuid::new_v4(), 4, false),
        ] {
            let found = compare(&header(uuid, Some(other)), uuid, &me);
            assert!(matches!(found, Found::Lost(_)), "{found:?}");
        }
        assert!(matches!(
            compare(&header(uuid, None), uuid, &me),
            Found::Lost(_)
        ));
        // The same record on another volume: a second temp volume laid out
        // over ours on a blank export.
        let found = compare(&header(Uuid::new_v4(), Some(me.clone())), uuid, &me);
        assert!(matches!(found, Found::Lost(_)), "{found:?}");
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
        assert_eq!(daemon_id(&state).unwrap(), a.daemon);
        std::fs::write(state.join(DAEMON_ID_FILE), "not a uuid").unwrap();
        assert!(matches!(
            daemon_id(&state),
            Err(ClaimError::Malformed { .. })
        ));
        // Read once: a running daemon keeps the identity it started with.
        assert_eq!(Claimant::load(&state, false).unwrap().daemon, a.daemon);
    }
}
