//! Block-device backings, on loop devices: sized by BLKGETSIZE64, TRIM by
//! BLKDISCARD (not EIO), zeroing by BLKZEROOUT, O_DIRECT at the device's
//! block size, and `create` refusing a device that holds a filesystem or is
//! mounted.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use hostcrypt_e2e::*;

/// A loop device over a sparse file; detached (and unmounted) on drop.
struct Loop {
    dev: String,
    file: PathBuf,
    mounted: Option<PathBuf>,
}

impl Loop {
    fn new(fx: &Fixture, size: u64) -> Loop {
        require_tool("losetup");
        let file = fx.path("loop.img");
        std::fs::File::create(&file).unwrap().set_len(size).unwrap();
        let out = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&file));
        Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            file,
            mounted: None,
        }
    }

    fn path(&self) -> &Path {
        Path::new(&self.dev)
    }

    /// Bytes the loop's backing file has allocated.
    fn allocated(&self) -> u64 {
        std::fs::metadata(&self.file).unwrap().blocks() * 512
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(dir) = self.mounted.take() {
            let _ = Command::new("umount").arg(&dir).status();
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn create(fx: &Fixture, force: bool) -> std::process::Output {
    let mut args = vec!["create", "b", "--size", "64M"];
    if force {
        args.push("--force");
    }
    fx.cli(&args)
}

#[test]
fn loop_device_backing_serves_trims_and_zeroes_with_o_direct() {
    require_tool("mkfs.ext4");
    let mut fx = Fixture::new();
    let mut dev = Loop::new(&fx, (64 << 20) + (1 << 20));
    fx.volume_at(
        "b",
        "cache",
        dev.path(),
        "allow_discards = true\ndirect = true",
    );

    // A device holding ext4 is refused, and named as such.
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(dev.path()));
    let out = create(&fx, false);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("ext2/3/4 filesystem") && text.contains("--force"),
        "{text}"
    );
    // Mounted: refused even with --force.
    let mnt = fx.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run_ok(Command::new("mount").arg(dev.path()).arg(&mnt));
    dev.mounted = Some(mnt.clone());
    let out = create(&fx, true);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("is mounted at") && text.contains(&*mnt.to_string_lossy()),
        "{text}"
    );
    run_ok(Command::new("umount").arg(&mnt));
    dev.mounted = None;
    // Larger than the device: refused with both sizes.
    let out = fx.cli(&["create", "b", "--size", "128M", "--force"]);
    assert!(
        output_text(&out).contains("block device holds"),
        "{}",
        output_text(&out)
    );
    let out = create(&fx, true);
    assert!(out.status.success(), "{}", output_text(&out));

    let d = fx.start();
    assert!(d.stderr().contains("direct=true"), "{}", d.stderr());
    let out = run_ok(Command::new("fio").args(fio_verify_args(&fx.uri("b"), "16M", "32M")));
    assert_eq!(fio_jobs(&out).len(), 2);

    // TRIM goes to the device (the loop punches holes in its file) instead
    // of failing; WRITE_ZEROES with discards reads back as zeros.
    let script = r#"
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\xab" * (8 << 20), 40 << 20)
h.flush()
print("WRITTEN", flush=True)
sys.stdin.readline()
h.trim(4 << 20, 40 << 20)
h.zero(2 << 20, 44 << 20)
assert h.pread(2 << 20, 44 << 20) == b"\0" * (2 << 20)
assert h.pread(2 << 20, 46 << 20) == b"\xab" * (2 << 20)
h.flush()
print("OK")
"#;
    let prelude = "import sys, nbd\n";
    let mut child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!("{prelude}{script}"))
        .arg(fx.uri("b"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "WRITTEN");
    let before = dev.allocated();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.success() && rest.contains("OK"),
        "{rest}\n{}",
        d.stderr()
    );
    let after = dev.allocated();
    assert!(
        after + (4 << 20) <= before,
        "trim freed too little: {before} -> {after}"
    );
    assert!(!d.stderr().contains("request failed"), "{}", d.stderr());
    assert_eq!(d.stop(), 0);
}

/// A block device cannot say where its holes are, so block status finds
/// the never-written sectors from their all-zero ciphertext: `nbdinfo
/// --map` shows them as zero (not holes), and written data as data.
#[test]
fn block_status_on_a_device_reports_never_written_sectors_as_zero() {
    require_tool("nbdinfo");
    let mut fx = Fixture::new();
    let dev = Loop::new(&fx, (64 << 20) + (1 << 20));
    fx.volume_at("b", "cache", dev.path(), "direct = true");
    let out = create(&fx, false);
    assert!(out.status.success(), "{}", output_text(&out));
    let _d = fx.start();
    qemu_io(
        &fx.uri("b"),
        &["write -P 0x7e 8M 1M", "write -P 0x7e 40M 4k"],
    );
    let out = run_ok(Command::new("nbdinfo").args(["--map", &fx.uri("b")]));
    let map: Vec<(u64, u64, u32)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                f.get(2)?.parse().ok()?,
            ))
        })
        .collect();
    assert_eq!(
        map,
        [
            (0, 8 << 20, 2),
            (8 << 20, 1 << 20, 0),
            (9 << 20, 31 << 20, 2),
            (40 << 20, 4096, 0),
            ((40 << 20) + 4096, (24 << 20) - 4096, 2),
        ],
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
