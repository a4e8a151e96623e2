//! A block device in the host kernel whose write-back fails with EIO on
//! command: nbdkit's memory plugin behind its error filter
//! (`error-pwrite-rate=100%` while a trigger file exists), mounted as a
//! file by `nbdfuse`, and a loop device (`losetup`) over that file. A
//! volume on the loop device is served from the page cache like any
//! block device; while armed, the kernel's write-back of its pages fails
//! and the next `fsync` of the device returns EIO, once (Linux then marks
//! the pages clean and a second `fsync` succeeds over data that never
//! reached the "disk": what `daemon/src/io/write_back.rs` must not be
//! fooled by). [`FlakyDevice::new`] checks that the stack does report the
//! error before handing the device out.
//!
//! nbdkit 1.32's error filter cannot fail flushes; failed writes are what
//! make a sync fail here. A remote backing whose FLUSH fails is the eval
//! plugin `flaky_backend` in `tests/e2e/durability.rs`.
//!
//! Needs root (FUSE mounts and loop devices): callers check `require_root`.
//! Everything is torn down on drop: `losetup -d`, `fusermount3 -u`, nbdkit.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::remote::Backend;
use crate::{require_tool, run_ok, wait_until, Fixture};

pub struct FlakyDevice {
    /// The loop device (its number may change at each power cycle).
    dev: PathBuf,
    trigger: PathBuf,
    mountpoint: PathBuf,
    fuse: Option<Child>,
    fuse_log: PathBuf,
    nbdkit: Backend,
    size: u64,
}

impl FlakyDevice {
    /// A device of `size` bytes (zeros), write-back failing while
    /// [`FlakyDevice::arm`]ed.
    pub fn new(fx: &Fixture, name: &str, size: u64) -> FlakyDevice {
        for tool in ["nbdkit", "nbdfuse", "losetup", "fusermount3"] {
            require_tool(tool);
        }
        let trigger = fx.path(&format!("{name}.fail-writes"));
        let nbdkit = Backend::nbdkit(
            fx,
            name,
            &[
                "--filter=error",
                "memory",
                &size.to_string(),
                "error-pwrite-rate=100%",
                &format!("error-pwrite-file={}", trigger.display()),
            ],
        );
        let mountpoint = fx.path(&format!("{name}.fuse"));
        std::fs::create_dir_all(&mountpoint).expect("FUSE mount point");
        let mut device = FlakyDevice {
            dev: PathBuf::new(),
            trigger,
            mountpoint,
            fuse: None,
            fuse_log: fx.path(&format!("{name}.nbdfuse.log")),
            nbdkit,
            size,
        };
        device.attach();
        assert!(
            device.fsync_fails_while_armed(),
            "the loop/FUSE stack swallowed a write-back error: fsync of {} succeeded while its writes failed",
            device.dev.display()
        );
        device.power_cycle();
        device
    }

    /// The loop device to name as a backing.
    pub fn path(&self) -> &Path {
        &self.dev
    }

    /// From now on every write reaching the "disk" fails with EIO.
    pub fn arm(&self) {
        std::fs::write(&self.trigger, b"").expect("arm the flaky device");
    }

    pub fn disarm(&self) {
        let _ = std::fs::remove_file(&self.trigger);
    }

    /// Disarms, then drops every cache above the "disk" (the loop
    /// device's and the FUSE file's) by detaching and unmounting, and
    /// attaches again: what nbdkit holds is then what reads see, as after
    /// a power cut. Call with nothing holding the device open; the loop
    /// device's path may change (see [`FlakyDevice::path`]).
    pub fn power_cycle(&mut self) {
        self.disarm();
        assert!(
            self.detach(),
            "the flaky device did not detach and unmount within 20 s"
        );
        self.attach();
    }

    /// A buffered write to the device, then fsync while armed: EIO, as a
    /// failing disk reports it. Writes the device's first 4 KiB.
    fn fsync_fails_while_armed(&self) -> bool {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.dev)
            .expect("open the loop device");
        dev.write_all_at(&[0x5a; 4096], 0).expect("write");
        dev.sync_all().expect("fsync while disarmed");
        self.arm();
        dev.write_all_at(&[0xa5; 4096], 0).expect("buffered write");
        let armed = dev.sync_all();
        self.disarm();
        let failed = armed.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EIO);
        dev.write_all_at(&[0; 4096], 0).expect("write");
        dev.sync_all().expect("fsync once disarmed");
        failed
    }

    fn attach(&mut self) {
        let file = self.mountpoint.join("disk");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.fuse_log)
            .expect("nbdfuse log");
        let fuse = Command::new("nbdfuse")
            .arg(&file)
            .arg("--unix")
            .arg(&self.nbdkit.socket)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nbdfuse");
        self.fuse = Some(fuse);
        let size = self.size;
        wait_until("the nbdfuse file", Duration::from_secs(20), || {
            std::fs::metadata(&file).is_ok_and(|m| m.len() == size)
        });
        let out = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&file));
        self.dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }

    /// Detaches the loop device and unmounts the FUSE file; false if
    /// either did not happen within 20 s (no panic: `drop` calls it).
    fn detach(&mut self) -> bool {
        let mut done = true;
        if !self.dev.as_os_str().is_empty() {
            let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
            // Detaching is asynchronous while the device was still open;
            // the FUSE file is busy until the loop device lets it go.
            let dev = std::mem::take(&mut self.dev);
            let name = dev.file_name().map(|n| n.to_string_lossy().into_owned());
            done &= eventually(|| {
                name.as_ref().is_none_or(|n| {
                    std::fs::read_to_string(format!("/sys/block/{n}/size"))
                        .map_or(true, |s| s.trim() == "0")
                })
            });
        }
        if let Some(mut fuse) = self.fuse.take() {
            let mountpoint = self.mountpoint.clone();
            let unmounted = eventually(|| {
                Command::new("fusermount3")
                    .arg("-u")
                    .arg(&mountpoint)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
            if !unmounted {
                let _ = fuse.kill();
            }
            let _ = fuse.wait();
            done &= unmounted;
        }
        done
    }
}

/// Polls `cond` for up to 20 s; whether it came to hold.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while !cond() {
        if start.elapsed() > Duration::from_secs(20) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

impl Drop for FlakyDevice {
    fn drop(&mut self) {
        self.disarm();
        self.detach();
        self.nbdkit.kill();
    }
}
