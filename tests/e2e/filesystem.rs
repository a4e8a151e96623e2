//! A real ext4 filesystem on an encrypted volume: nbdfuse exposes the export
//! as a file, losetup turns it into a block device, and it survives a
//! daemon restart.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hostcrypt_e2e::*;

/// nbdfuse + loop device + mount, torn down in reverse on drop.
struct Mounted {
    fuse_dir: PathBuf,
    fuse: Child,
    loop_dev: String,
    mount_dir: PathBuf,
    mounted: bool,
}

impl Mounted {
    fn new(fx: &Fixture, export: &str, mkfs: bool) -> Self {
        let fuse_dir = fx.path("fuse");
        let mount_dir = fx.path("mnt");
        std::fs::create_dir_all(&fuse_dir).unwrap();
        std::fs::create_dir_all(&mount_dir).unwrap();
        let fuse = Command::new("nbdfuse")
            .arg(&fuse_dir)
            .arg(fx.uri(export))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nbdfuse");
        let file = fuse_dir.join("nbd");
        wait_until(
            "nbdfuse to expose the export",
            Duration::from_secs(30),
            || {
                std::fs::metadata(&file)
                    .map(|m| m.len() > 0)
                    .unwrap_or(false)
            },
        );
        let out = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&file));
        let loop_dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mut m = Mounted {
            fuse_dir,
            fuse,
            loop_dev,
            mount_dir,
            mounted: false,
        };
        if mkfs {
            run_ok(
                Command::new("mkfs.ext4")
                    .args(["-q", "-F"])
                    .arg(&m.loop_dev),
            );
        } else {
            // A clean fsck proves every block came back exactly as written.
            run_ok(Command::new("e2fsck").args(["-f", "-n"]).arg(&m.loop_dev));
        }
        run_ok(Command::new("mount").arg(&m.loop_dev).arg(&m.mount_dir));
        m.mounted = true;
        m
    }

    fn dir(&self) -> &Path {
        &self.mount_dir
    }

    fn unmount(mut self) {
        self.teardown(true);
    }

    fn teardown(&mut self, strict: bool) {
        let steps: Vec<Command> = {
            let mut v = Vec::new();
            if self.mounted {
                let mut c = Command::new("umount");
                c.arg(&self.mount_dir);
                v.push(c);
            }
            let mut c = Command::new("losetup");
            c.args(["-d", &self.loop_dev]);
            v.push(c);
            let mut c = Command::new("fusermount3");
            c.arg("-u").arg(&self.fuse_dir);
            v.push(c);
            v
        };
        self.mounted = false;
        for mut step in steps {
            if strict {
                run_ok(&mut step);
            } else {
                let _ = step.output();
            }
        }
        let _ = self.fuse.wait();
        self.loop_dev.clear();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !self.loop_dev.is_empty() {
            self.teardown(false);
        }
        let _ = self.fuse.kill();
    }
}

#[test]
fn ext4_on_nbdfuse_survives_daemon_restart() {
    if !require_root("mounting ext4") {
        return;
    }
    require_tool("nbdfuse");
    let mut fx = Fixture::new();
    fx.volume("fs", "cache", "");
    fx.create("fs", "256M", 4096);

    let daemon = fx.start();
    let m = Mounted::new(&fx, "fs", true);
    let mut payload = vec![0u8; 3 << 20];
    getrandom::fill(&mut payload).unwrap();
    std::fs::write(m.dir().join("random.bin"), &payload).unwrap();
    std::fs::create_dir(m.dir().join("sub")).unwrap();
    for i in 0..50 {
        std::fs::write(
            m.dir().join("sub").join(format!("f{i}.txt")),
            format!("file {i}\n").repeat(i + 1),
        )
        .unwrap();
    }
    m.unmount();
    assert_eq!(daemon.stop(), 0);

    let daemon = fx.start();
    let m = Mounted::new(&fx, "fs", false);
    assert_eq!(std::fs::read(m.dir().join("random.bin")).unwrap(), payload);
    for i in 0..50 {
        let text = std::fs::read_to_string(m.dir().join("sub").join(format!("f{i}.txt"))).unwrap();
        assert_eq!(text, format!("file {i}\n").repeat(i + 1));
    }
    m.unmount();
    assert_eq!(daemon.stop(), 0);
}

/// The kernel's own NBD client (`nbd-client`, `/dev/nbd0`), in a Debian
/// cloud kernel booted under qemu (this host's kernel has no nbd module):
/// mkfs.ext4, files written, the daemon restarted, reconnect, every
/// SHA-256 equal, no plaintext in the backing. The script does it all and
/// keeps its files when it fails.
#[test]
fn kernel_nbd_client_mounts_ext4_across_a_daemon_restart() {
    if !require_root("installing qemu and booting a guest") {
        return;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/kernel-nbd.sh");
    let out = std::process::Command::new(&script)
        .arg("--bin")
        .arg(bin_dir())
        .output()
        .expect("run tests/vm/kernel-nbd.sh");
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("kernel nbd client: PASS"), "{text}");
}
