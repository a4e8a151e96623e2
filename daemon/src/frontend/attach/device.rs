//! An attached block device as the rest of the system sees it: its
//! stable name (`/dev/hostcrypt/VOLUME`, a symlink the daemon keeps, so
//! the name works with or without udev), whether something uses it (a
//! mount of it or of one of its partitions, or a holder such as dm-crypt
//! or LVM on top), and flushing it before it goes away.
//!
//! Not here: how the device is connected (`kernel_nbd.rs`).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// `DIR/VOLUME` → `device`, replacing an older link of that name (never
/// anything that is not a symlink).
pub fn link(dir: &Path, volume: &str, device: &Path) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(volume);
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        if !meta.file_type().is_symlink() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a symlink", path.display()),
            ));
        }
    }
    let staging = dir.join(format!(".{volume}.{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    std::os::unix::fs::symlink(device, &staging)?;
    std::fs::rename(&staging, &path)?;
    Ok(path)
}

/// Removes `DIR/VOLUME` if it is a symlink.
pub fn unlink(dir: &Path, volume: &str) {
    let path = dir.join(volume);
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
        let _ = std::fs::remove_file(path);
    }
}

/// What uses the device at `device` (`/dev/nbdN`), whose sysfs directory
/// is `sys` (`/sys/block/nbdN`): mount points of it or its partitions,
/// and holders (device-mapper, md). Empty when nothing does.
pub fn users(device: &Path, sys: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(meta) = std::fs::metadata(device) else {
        return found;
    };
    let mut numbers = vec![(major(meta.rdev()), minor(meta.rdev()))];
    // Partitions: /sys/block/nbdN/nbdNpM/dev holds "MAJOR:MINOR".
    if let Ok(entries) = std::fs::read_dir(sys) {
        for entry in entries.flatten() {
            if let Ok(text) = std::fs::read_to_string(entry.path().join("dev")) {
                if let Some((a, b)) = text.trim().split_once(':') {
                    if let (Ok(a), Ok(b)) = (a.parse(), b.parse()) {
                        numbers.push((a, b));
                    }
                }
            }
        }
    }
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
        for line in mounts.lines() {
            // id parent MAJOR:MINOR root mountpoint ...
            let fields: Vec<&str> = line.split(' ').collect();
            let (Some(dev), Some(point)) = (fields.get(2), fields.get(4)) else {
                continue;
            };
            if let Some((a, b)) = dev.split_once(':') {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    if numbers.contains(&(a, b)) {
                        found.push(format!("mounted on {point}"));
                    }
                }
            }
        }
    }
    if let Ok(holders) = std::fs::read_dir(sys.join("holders")) {
        for holder in holders.flatten() {
            found.push(format!("held by {}", holder.file_name().to_string_lossy()));
        }
    }
    found
}

/// Opens the device exclusively (O_EXCL on a block device): EBUSY while
/// anything has it mounted, as swap, under dm/md/LVM or claims a
/// partition, in any mount namespace. Held through flush and disconnect,
/// so nothing claims it in between.
pub fn claim(device: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_EXCL)
        .open(device)
}

/// Writes back what the kernel caches for the device and flushes it to
/// the daemon (fsync on the block device issues a FLUSH).
pub fn flush(device: &Path) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(device)?
        .sync_all()
}

/// Whether `name` may name a volume's device: `[A-Za-z0-9_.-]`, not
/// starting with a dot, at most 64 bytes (a path component of its own).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn major(dev: u64) -> u32 {
    libc::major(dev)
}

fn minor(dev: u64) -> u32 {
    libc::minor(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_replace_links_but_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let names = dir.path().join("hostcrypt");
        let path = link(&names, "cache0", Path::new("/dev/nbd3")).unwrap();
        assert_eq!(std::fs::read_link(&path).unwrap(), Path::new("/dev/nbd3"));
        link(&names, "cache0", Path::new("/dev/nbd5")).unwrap();
        assert_eq!(std::fs::read_link(&path).unwrap(), Path::new("/dev/nbd5"));
        unlink(&names, "cache0");
        assert!(std::fs::symlink_metadata(&path).is_err());
        std::fs::write(names.join("file"), b"x").unwrap();
        assert!(link(&names, "file", Path::new("/dev/nbd1")).is_err());
        unlink(&names, "file");
        assert!(names.join("file").exists());
    }

    #[test]
    fn names_are_one_plain_path_component() {
        for good in ["cache0", "a.b-c_d", "V"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", ".hidden", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_device_nobody_uses_has_no_users() {
        let dir = tempfile::tempdir().unwrap();
        assert!(users(Path::new("/dev/null"), dir.path()).is_empty());
    }
}
