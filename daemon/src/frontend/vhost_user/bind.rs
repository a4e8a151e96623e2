//! Putting one vhost-user socket file in place, in a directory others
//! may be able to write to: the socket's directory is opened once and
//! everything after is done relative to it, never through its path
//! again. The socket is bound in a private staging directory with an
//! unguessable name (mode 0700), given its group and mode there, and
//! moved into place without replacing anything (RENAME_NOREPLACE): it is
//! never reachable with the umask's permissions, a socket that appears
//! at the path meanwhile (a second server) is never replaced, and no
//! chown or chmod can be redirected through a symlink. Before that, a
//! socket file nobody answers on (a crash's) is removed, anything else
//! at the path refused, and staging directories a crashed daemon left
//! are removed.
//!
//! The socket's directory itself must not be a symlink (the last
//! component of its path: earlier ones such as /var/run are followed):
//! what is checked and used is the directory named, and clients reach
//! the socket through that name.
//!
//! bind(2) and connect(2) take paths, not directory fds: both go through
//! `/proc/self/fd/N/NAME`, which the kernel resolves to the directory
//! opened whatever happens to its path, and which stays short (a socket
//! address holds 107 bytes) however long the configured path is. /proc
//! must therefore be mounted; that is checked first.
//!
//! The syscalls without a std wrapper (`*at`, renameat2) are here; the
//! accept loop and connections are `socket.rs`'s.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Staging directories are named this and 16 random hex digits (older
/// daemons used their pid).
const STAGING_PREFIX: &str = ".hostcryptd-bind-";
/// The socket's name inside its staging directory.
const STAGED: &CStr = c"socket";
/// A staging directory left untouched this long belongs to a daemon that
/// died while binding: a bind takes milliseconds, and a younger one may
/// be another daemon's, binding in the same directory now.
const STALE_STAGING: Duration = Duration::from_secs(60);

/// Why a socket could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("names no file")]
    NoFileName,
    #[error("its directory {0} is a symbolic link: name the directory it points to")]
    LinkedDirectory(PathBuf),
    #[error("/proc is not mounted: binding goes through /proc/self/fd")]
    NoProc,
    #[error("exists and is not a socket")]
    NotASocket,
    #[error("in use by a running server")]
    InUse,
    #[error("another socket appeared at the path while binding (a second server?); it was left in place")]
    Appeared,
    #[error("a staging directory was replaced while binding; the directory {0} may be writable by others")]
    StagingReplaced(PathBuf),
    #[error("choosing a staging directory's name: {0}")]
    Random(getrandom::Error),
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Maps an I/O error to the step that failed.
fn at_step(step: &'static str) -> impl FnOnce(io::Error) -> BindError {
    move |source| BindError::Io { step, source }
}

/// Binds a listening, non-blocking socket at `path` with permission bits
/// `mode` and, if given, group `group`; creates its directory if missing.
pub fn listen(path: &Path, mode: u32, group: Option<u32>) -> Result<UnixListener, BindError> {
    let name = path
        .file_name()
        .ok_or(BindError::NoFileName)
        .and_then(|n| c_name(n).map_err(at_step("its file name")))?;
    let dir_path = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir,
        None => Path::new("."),
    };
    std::fs::create_dir_all(dir_path).map_err(at_step("creating its directory"))?;
    let dir = match Dir::open(dir_path) {
        Ok(dir) => dir,
        Err(e) => {
            let linked = std::fs::symlink_metadata(dir_path).is_ok_and(|m| m.is_symlink());
            return Err(if linked {
                BindError::LinkedDirectory(dir_path.to_owned())
            } else {
                BindError::Io {
                    step: "opening its directory",
                    source: e,
                }
            });
        }
    };
    dir.check_proc()?;
    remove_stale_socket(&dir, &name)?;
    remove_stale_staging(&dir, dir_path);
    let (staging_name, staging) = make_staging(&dir, dir_path)?;
    let placed = place(&dir, &staging, &name, mode, group);
    // Gone already when it was moved into place; otherwise the listener
    // is dropped with the error and its file goes too.
    let _ = staging.remove(STAGED, false);
    let _ = dir.remove(&staging_name, true);
    placed
}

/// Binds in `staging`, sets group and mode there, moves the socket to
/// `name` in `dir`.
fn place(
    dir: &Dir,
    staging: &Dir,
    name: &CStr,
    mode: u32,
    group: Option<u32>,
) -> Result<UnixListener, BindError> {
    let listener = UnixListener::bind(staging.proc_path(STAGED)).map_err(at_step("binding"))?;
    if let Some(gid) = group {
        staging
            .chown(STAGED, gid)
            .map_err(at_step("setting its group"))?;
    }
    staging
        .chmod(STAGED, mode)
        .map_err(at_step("setting its mode"))?;
    listener
        .set_nonblocking(true)
        .map_err(at_step("making it non-blocking"))?;
    move_no_replace(staging, STAGED, dir, name).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => BindError::Appeared,
        _ => BindError::Io {
            step: "moving it into place",
            source: e,
        },
    })?;
    Ok(listener)
}

/// Removes a socket file at `name` that nobody answers on (a crashed
/// daemon's); refuses anything else, and a socket someone answers on.
fn remove_stale_socket(dir: &Dir, name: &CStr) -> Result<(), BindError> {
    let Some(found) = dir.stat(name).map_err(at_step("looking at the path"))? else {
        return Ok(());
    };
    if found.mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(BindError::NotASocket);
    }
    // Stale only when refused: another failure (no permission, a full
    // backlog) says nothing about whether a server is behind it.
    match UnixStream::connect(dir.proc_path(name)) {
        Ok(_) => return Err(BindError::InUse),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(BindError::Io {
                step: "asking whether a server answers on the socket there",
                source: e,
            })
        }
    }
    // Only the file tested: one that took its place since is left to
    // the move, which refuses to replace it.
    match dir.stat(name) {
        Ok(Some(now)) if now.same_file(&found) => match dir.remove(name, false) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(BindError::Io {
                step: "removing the stale socket",
                source: e,
            }),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// Removes the staging directories a daemon that died while binding left
/// in `dir`: only ours (the daemon's uid), old enough that no daemon is
/// binding in them now, and holding nothing but sockets. Best effort: a
/// failure leaves the directory, and one holding anything else is
/// reported and left for the operator.
fn remove_stale_staging(dir: &Dir, dir_path: &Path) {
    let Ok(names) = dir.names() else {
        return;
    };
    let uid = euid();
    for name in names {
        if !name.to_bytes().starts_with(STAGING_PREFIX.as_bytes()) {
            continue;
        }
        let Ok(Some(meta)) = dir.stat(&name) else {
            continue;
        };
        if meta.mode & libc::S_IFMT != libc::S_IFDIR
            || meta.uid != uid
            || meta.age() < STALE_STAGING
        {
            continue;
        }
        let Ok(staging) = dir.open_at(&name) else {
            continue;
        };
        // The one just looked at, not one swapped in since.
        if !staging.own_stat().is_ok_and(|now| now.same_file(&meta)) {
            continue;
        }
        let Ok(inside) = staging.names() else {
            continue;
        };
        let sockets = inside.iter().all(|n| {
            staging
                .stat(n)
                .is_ok_and(|m| m.is_some_and(|m| m.mode & libc::S_IFMT == libc::S_IFSOCK))
        });
        let shown = dir_path.join(OsStr::from_bytes(name.to_bytes()));
        if !sockets {
            tracing::warn!(
                "{} holds more than sockets: left in place, remove it by hand",
                shown.display()
            );
            continue;
        }
        for n in &inside {
            let _ = staging.remove(n, false);
        }
        if dir.remove(&name, true).is_ok() {
            tracing::info!(
                "removed {}, left by a daemon that stopped while binding",
                shown.display()
            );
        }
    }
}

/// Creates and opens a staging directory in `dir`, mode 0700, with a
/// name no one can guess and take first.
fn make_staging(dir: &Dir, dir_path: &Path) -> Result<(CString, Dir), BindError> {
    let mut random = [0u8; 8];
    getrandom::fill(&mut random).map_err(BindError::Random)?;
    let name = format!("{STAGING_PREFIX}{}", hex::encode(random));
    let name = c_name(OsStr::new(&name)).map_err(at_step("naming a staging directory"))?;
    // The umask can only take bits away from 0700.
    dir.mkdir(&name, 0o700)
        .map_err(at_step("creating a staging directory"))?;
    let staging = match dir.open_at(&name) {
        Ok(staging) => staging,
        Err(e) => {
            let _ = dir.remove(&name, true);
            return Err(BindError::Io {
                step: "opening the staging directory",
                source: e,
            });
        }
    };
    // The one just made (someone who may write `dir` could have swapped
    // in their own), checked before anything is done in it: only a
    // directory of ours keeps out everyone else.
    if !staging.own_stat().is_ok_and(|m| m.uid == euid()) {
        return Err(BindError::StagingReplaced(dir_path.to_owned()));
    }
    // Exactly 0700, whatever the umask took away.
    if let Err(e) = staging
        .file
        .set_permissions(std::fs::Permissions::from_mode(0o700))
    {
        let _ = dir.remove(&name, true);
        return Err(BindError::Io {
            step: "making the staging directory private",
            source: e,
        });
    }
    Ok((name, staging))
}

/// What this module needs of a stat.
struct Stat {
    dev: u64,
    ino: u64,
    mode: u32,
    uid: u32,
    mtime: i64,
}

impl Stat {
    fn same_file(&self, other: &Stat) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }

    /// Time since it last changed (zero if in the future).
    fn age(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Duration::from_secs(now.saturating_sub(u64::try_from(self.mtime).unwrap_or(0)))
    }
}

/// An open directory; names are relative to it.
struct Dir {
    file: File,
}

/// Opens directories only, and never through a symlink in the last
/// component.
const DIR_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;

fn c_name(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

impl Dir {
    fn open(path: &Path) -> io::Result<Dir> {
        Self::open_in(libc::AT_FDCWD, &c_name(path.as_os_str())?)
    }

    fn open_at(&self, name: &CStr) -> io::Result<Dir> {
        Self::open_in(self.fd(), name)
    }

    fn open_in(at: libc::c_int, name: &CStr) -> io::Result<Dir> {
        // SAFETY: `name` is NUL-terminated and outlives the call; `at` is
        // AT_FDCWD or an fd this process holds open.
        let fd = check(unsafe { libc::openat(at, name.as_ptr(), DIR_FLAGS) })?;
        // SAFETY: `fd` was just returned by openat and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Dir {
            file: File::from(fd),
        })
    }

    fn fd(&self) -> libc::c_int {
        self.file.as_raw_fd()
    }

    /// A path to `name` in this directory, for the calls that take no
    /// directory fd: the kernel resolves it through the fd.
    fn proc_path(&self, name: &CStr) -> PathBuf {
        let mut path = PathBuf::from(format!("/proc/self/fd/{}", self.fd()));
        path.push(OsStr::from_bytes(name.to_bytes()));
        path
    }

    /// /proc/self/fd leads to this very directory.
    fn check_proc(&self) -> Result<(), BindError> {
        let own = self
            .own_stat()
            .map_err(at_step("looking at its directory"))?;
        match std::fs::metadata(format!("/proc/self/fd/{}", self.fd())) {
            Ok(m) if (m.dev(), m.ino()) == (own.dev, own.ino) => Ok(()),
            _ => Err(BindError::NoProc),
        }
    }

    /// `name`'s stat, not following a symlink; `None` if there is none.
    fn stat(&self, name: &CStr) -> io::Result<Option<Stat>> {
        match self.stat_flags(name, libc::AT_SYMLINK_NOFOLLOW) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            other => other.map(Some),
        }
    }

    /// The directory's own stat.
    fn own_stat(&self) -> io::Result<Stat> {
        self.stat_flags(c"", libc::AT_EMPTY_PATH)
    }

    fn stat_flags(&self, name: &CStr, flags: libc::c_int) -> io::Result<Stat> {
        let mut st = MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `name` is NUL-terminated and `st` is writable for one
        // stat; fstatat fills it completely when it returns 0.
        check(unsafe { libc::fstatat(self.fd(), name.as_ptr(), st.as_mut_ptr(), flags) })?;
        // SAFETY: fstatat returned 0.
        let st = unsafe { st.assume_init() };
        Ok(Stat {
            dev: st.st_dev,
            ino: st.st_ino,
            mode: st.st_mode,
            uid: st.st_uid,
            mtime: st.st_mtime,
        })
    }

    fn mkdir(&self, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated and outlives the call.
        check(unsafe { libc::mkdirat(self.fd(), name.as_ptr(), mode) }).map(drop)
    }

    /// Removes `name`: an empty directory with `directory`, else a file.
    fn remove(&self, name: &CStr, directory: bool) -> io::Result<()> {
        let flags = if directory { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: `name` is NUL-terminated and outlives the call.
        check(unsafe { libc::unlinkat(self.fd(), name.as_ptr(), flags) }).map(drop)
    }

    fn chown(&self, name: &CStr, gid: u32) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated and outlives the call; -1
        // (as uid_t) leaves the owner unchanged.
        check(unsafe {
            libc::fchownat(
                self.fd(),
                name.as_ptr(),
                libc::uid_t::MAX,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop)
    }

    fn chmod(&self, name: &CStr, mode: u32) -> io::Result<()> {
        let chmod = |flags| {
            // SAFETY: `name` is NUL-terminated and outlives the call.
            check(unsafe { libc::fchmodat(self.fd(), name.as_ptr(), mode, flags) }).map(drop)
        };
        match chmod(libc::AT_SYMLINK_NOFOLLOW) {
            // A C library or kernel without the flag (glibc before 2.32)
            // refuses it, as it refuses a symlink: follow only what is
            // not one (in a private staging directory, what we bound).
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => match self.stat(name)? {
                Some(s) if s.mode & libc::S_IFMT != libc::S_IFLNK => chmod(0),
                _ => Err(e),
            },
            other => other,
        }
    }

    /// The names in the directory (without `.` and `..`).
    fn names(&self) -> io::Result<Vec<CString>> {
        let path = PathBuf::from(format!("/proc/self/fd/{}", self.fd()));
        std::fs::read_dir(path)?
            .map(|entry| entry.and_then(|e| c_name(&e.file_name())))
            .collect()
    }
}

/// Moves `from` in `source` to `to` in `target`, failing with
/// `AlreadyExists` rather than replacing anything at `to`.
fn move_no_replace(source: &Dir, from: &CStr, target: &Dir, to: &CStr) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated and outlive the call; both
    // fds are open directories.
    let renamed = check(unsafe {
        libc::renameat2(
            source.fd(),
            from.as_ptr(),
            target.fd(),
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    });
    match renamed {
        // A filesystem (or kernel) without RENAME_NOREPLACE: a hard link
        // never replaces either; then the staged name goes.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
            // SAFETY: as above; flags 0: `from` itself is linked.
            check(unsafe {
                libc::linkat(source.fd(), from.as_ptr(), target.fd(), to.as_ptr(), 0)
            })?;
            source.remove(from, false)
        }
        other => other.map(drop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    /// Names in `dir` that look like staging directories.
    fn staging_left(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(STAGING_PREFIX))
            .collect()
    }

    /// A socket file nobody answers on, as a crash leaves it.
    fn stale_socket(path: &Path) {
        drop(UnixListener::bind(path).unwrap());
        assert!(path.exists());
    }

    #[test]
    fn the_socket_gets_the_mode_asked_for_and_no_staging_is_left() {
        let tmp = tempfile::tempdir().unwrap();
        for (name, mode) in [("a.sock", 0o600), ("b.sock", 0o660), ("c.sock", 0o666)] {
            let path = tmp.path().join("sub").join(name);
            let listener = listen(&path, mode, None).unwrap();
            assert_eq!(mode_of(&path), mode);
            assert!(listener.local_addr().is_ok());
            UnixStream::connect(&path).expect("it answers at its path");
        }
        assert!(staging_left(&tmp.path().join("sub")).is_empty());
    }

    #[test]
    fn the_group_asked_for_is_set() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("g.sock");
        // Root may give any group; others one of their own.
        let gid = if euid() == 0 {
            4242
        } else {
            // SAFETY: getegid has no preconditions.
            unsafe { libc::getegid() }
        };
        let _listener = listen(&path, 0o660, Some(gid)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().gid(), gid);
    }

    #[test]
    fn a_live_socket_is_refused_and_left() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("live.sock");
        let _live = UnixListener::bind(&path).unwrap();
        assert!(matches!(listen(&path, 0o600, None), Err(BindError::InUse)));
        UnixStream::connect(&path).expect("the live one still answers");
        assert!(staging_left(tmp.path()).is_empty());
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("stale.sock");
        stale_socket(&path);
        let _listener = listen(&path, 0o640, None).unwrap();
        UnixStream::connect(&path).expect("the new one answers");
        assert_eq!(mode_of(&path), 0o640);
    }

    #[test]
    fn anything_but_a_socket_is_refused_and_left() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, b"keep").unwrap();
        assert!(matches!(
            listen(&file, 0o600, None),
            Err(BindError::NotASocket)
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        // A symlink to a socket is not a socket either.
        let target = tmp.path().join("target.sock");
        stale_socket(&target);
        let link = tmp.path().join("link.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            listen(&link, 0o600, None),
            Err(BindError::NotASocket)
        ));
        assert!(link.is_symlink() && target.exists());
    }

    #[test]
    fn a_directory_that_is_a_symlink_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let linked = tmp.path().join("linked");
        std::os::unix::fs::symlink(&real, &linked).unwrap();
        assert!(matches!(
            listen(&linked.join("s.sock"), 0o600, None),
            Err(BindError::LinkedDirectory(p)) if p == linked
        ));
        assert_eq!(std::fs::read_dir(&real).unwrap().count(), 0);
        // A symlink earlier in the path is followed.
        std::fs::create_dir(real.join("sub")).unwrap();
        assert!(listen(&linked.join("sub").join("s.sock"), 0o600, None).is_ok());
        assert!(real.join("sub").join("s.sock").exists());
    }

    #[test]
    fn a_socket_in_place_is_never_replaced_by_the_move() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        std::fs::write(tmp.path().join("from"), b"new").unwrap();
        std::fs::write(tmp.path().join("to"), b"old").unwrap();
        let e = move_no_replace(&dir, c"from", &dir, c"to").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(tmp.path().join("to")).unwrap(), b"old");
        std::fs::remove_file(tmp.path().join("to")).unwrap();
        move_no_replace(&dir, c"from", &dir, c"to").unwrap();
        assert_eq!(std::fs::read(tmp.path().join("to")).unwrap(), b"new");
    }

    /// Makes `dir` look untouched for longer than `STALE_STAGING`.
    fn age(dir: &Path) {
        let old = SystemTime::now() - STALE_STAGING * 2;
        File::open(dir).unwrap().set_modified(old).unwrap();
    }

    #[test]
    fn stale_staging_directories_of_sockets_only_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let crashed = tmp.path().join(".hostcryptd-bind-1234");
        std::fs::create_dir(&crashed).unwrap();
        stale_socket(&crashed.join("socket"));
        age(&crashed);
        let empty = tmp.path().join(".hostcryptd-bind-0123456789abcdef");
        std::fs::create_dir(&empty).unwrap();
        age(&empty);
        // Not only sockets: left for the operator.
        let odd = tmp.path().join(".hostcryptd-bind-5678");
        std::fs::create_dir(&odd).unwrap();
        std::fs::write(odd.join("note"), b"").unwrap();
        age(&odd);
        // Young: perhaps another daemon binding now.
        let busy = tmp.path().join(".hostcryptd-bind-9999");
        std::fs::create_dir(&busy).unwrap();
        stale_socket(&busy.join("socket"));
        // Not a staging directory's name.
        let other = tmp.path().join("hostcryptd-bind-1");
        std::fs::create_dir(&other).unwrap();
        age(&other);

        let _listener = listen(&tmp.path().join("v.sock"), 0o600, None).unwrap();
        assert!(!crashed.exists() && !empty.exists());
        assert!(odd.join("note").exists());
        assert!(busy.join("socket").exists());
        assert!(other.exists());
    }
}
