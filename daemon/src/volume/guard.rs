//! What keeps `create` and a temp volume from writing over a disk that is
//! in use: a mounted filesystem, a known signature (blkid's names), any
//! data that is not a volume of ours, a remote backing a daemon serves
//! (its owner record, `claim.rs`). Reading only; the callers decide
//! (`mod.rs`, `backup.rs`).

use std::path::Path;

use super::{io_err, HeaderCopies, VolumeError, DATA_OFFSET};
use crate::io::Backing;

pub(super) fn refuse_if_mounted(path: &Path) -> Result<(), VolumeError> {
    match mount_point(path).map_err(io_err(path))? {
        Some(at) => Err(VolumeError::Mounted {
            path: path.to_owned(),
            at,
        }),
        None => Ok(()),
    }
}

pub(super) fn refuse_if_in_use(path: &Path, backing: &Backing) -> Result<(), VolumeError> {
    let copies = HeaderCopies::read(backing).map_err(io_err(path))?;
    if let Some(h) = copies.current() {
        return Err(VolumeError::AlreadyFormatted {
            path: path.to_owned(),
            uuid: h.uuid,
        });
    }
    if let Some(what) = in_use(&copies, backing).map_err(io_err(path))? {
        return Err(VolumeError::NotEmpty {
            path: path.to_owned(),
            what,
        });
    }
    Ok(())
}

/// Refuses a remote backing whose header names an owner that has not
/// released it: a daemon may serve it right now, on this host or another,
/// and no kernel lock says so. A local backing is claimed by the kernel.
pub(super) fn refuse_if_served_remotely(path: &Path, backing: &Backing) -> Result<(), VolumeError> {
    if backing.remote().is_none() {
        return Ok(());
    }
    let copies = HeaderCopies::read(backing).map_err(io_err(path))?;
    match copies.current().and_then(|h| h.owner.as_ref()) {
        Some(o) if !o.released => Err(VolumeError::ServedRemotely {
            path: path.to_owned(),
            daemon: o.daemon,
            host: o.host.clone(),
            generation: o.generation,
        }),
        _ => Ok(()),
    }
}

/// What a backing without a hostcrypt header holds, if anything: a known
/// signature (filesystem, partition table, LUKS, swap) by name, else any
/// non-zero byte in its first MiB, or (for a regular file) any allocated
/// data beyond it. Allocated zeros count as data: erring toward "in use"
/// is what protects an operator's disk.
pub(super) fn in_use(copies: &HeaderCopies, backing: &Backing) -> std::io::Result<Option<String>> {
    let probe = backing.size()?.min(DATA_OFFSET);
    let mut buf = vec![0u8; probe as usize];
    backing.read_at(&mut buf, 0)?;
    if let Some(name) = signature(&buf) {
        return Ok(Some(format!("it carries {name} signature")));
    }
    if !copies.is_foreign() {
        return Ok(Some("it holds a damaged hostcrypt header".into()));
    }
    if buf.iter().any(|&b| b != 0) {
        return Ok(Some("its first MiB holds data".into()));
    }
    if !backing.is_fixed_size() && backing.next_data(probe)?.is_some() {
        return Ok(Some("it holds data".into()));
    }
    Ok(None)
}

/// The signature at the start of a device, as blkid would name it.
pub(super) fn signature(head: &[u8]) -> Option<&'static str> {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(0, b"LUKS\xba\xbe") {
        Some("a LUKS")
    } else if at(0x438, &[0x53, 0xef]) {
        Some("an ext2/3/4 filesystem")
    } else if at(0, b"XFSB") {
        Some("an XFS filesystem")
    } else if at(0x10040, b"_BHRfS_M") {
        Some("a btrfs filesystem")
    } else if at(4086, b"SWAPSPACE2") {
        Some("a swap")
    } else if at(512, b"EFI PART") {
        Some("a GPT partition table")
    } else if at(510, &[0x55, 0xaa]) {
        Some("an MBR partition table or boot sector")
    } else {
        None
    }
}

/// Where a block device is mounted (from /proc/self/mountinfo), if it is;
/// `None` for anything else, including a path that does not exist yet.
pub(super) fn mount_point(path: &Path) -> std::io::Result<Option<String>> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(None);
    };
    if !meta.file_type().is_block_device() {
        return Ok(None);
    }
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let wanted = format!("{major}:{minor}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(2) == Some(&wanted.as_str())).then(|| fields.get(4).unwrap_or(&"?").to_string())
    }))
}
