//! One owner per local backing: whoever opens a backing to write it (the
//! daemon serving it, `hostcrypt create`, `header restore`, `erase`) holds
//! an exclusive claim on it for as long as the descriptor lives, and a
//! second writer is refused before it reads or writes a byte.
//!
//! - A regular file gets an open-file-description lock (`F_OFD_SETLK`,
//!   write lock over the whole file). It belongs to the descriptor, not the
//!   process, so a second open inside the same daemon (a reload re-adding a
//!   volume whose old instance still has connections) is refused too, and
//!   it goes away with the descriptor, kill -9 included.
//! - A block device is opened with `O_EXCL`, the kernel's own claim: it also
//!   refuses while the device is mounted or claimed by dm, md or mkfs.
//!
//! Readers that only look (`hostcrypt inspect`, `header backup`, the
//! daemon's peek at a header to find its KEK) open without a claim and
//! without write access (`FileBacking::open_read_only`). Remote backings are
//! not claimed here. What lives elsewhere: the descriptors themselves
//! (`file.rs`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Opens `path` read-write with an exclusive claim (see the module doc),
/// creating a regular file first when `create` and it does not exist.
pub fn open_claimed(path: &Path, create: bool) -> io::Result<File> {
    // O_EXCL always: a block device is claimed by the open itself, and
    // Linux ignores O_EXCL without O_CREAT on other files, so a path
    // swapped for a device between a stat and the open is still claimed.
    let open = |extra: libc::c_int| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_EXCL | extra)
            .open(path)
    };
    let file = match open(0) {
        Err(e) if create && e.kind() == io::ErrorKind::NotFound => match open(libc::O_CREAT) {
            // Another creator won the race: open what it made.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => open(0),
            other => other,
        },
        other => other,
    }
    .map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => busy(path),
        _ => e,
    })?;
    if !file.metadata()?.file_type().is_block_device() {
        lock_whole_file(&file).map_err(|e| match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => busy(path),
            _ => e,
        })?;
    }
    Ok(file)
}

/// The error a second writer gets: it names the path and what to do.
fn busy(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::ResourceBusy,
        format!(
            "{} is claimed by another opener (a hostcryptd serving it, a hostcrypt command changing it, or, for a block device, a mount or device mapper); stop that one first",
            path.display()
        ),
    )
}

/// Takes a write lock over the whole file without waiting.
fn lock_whole_file(file: &File) -> io::Result<()> {
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // l_start = 0 and l_len = 0: the whole file, however it grows; l_pid
    // must be 0 for OFD locks.
    // SAFETY: fcntl on a descriptor `file` owns, with a pointer to a live
    // local flock that the call only reads.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.img");
        let first = open_claimed(&path, true).unwrap();
        // Same process, second descriptor: refused (a re-added volume
        // inside one daemon must wait for its old instance).
        let second = open_claimed(&path, false).unwrap_err();
        assert_eq!(second.kind(), io::ErrorKind::ResourceBusy);
        assert!(second.to_string().contains("b.img"), "{second}");
        // A reader that only looks is not a writer.
        File::open(&path).unwrap();
        drop(first);
        open_claimed(&path, false).unwrap();
    }
}
