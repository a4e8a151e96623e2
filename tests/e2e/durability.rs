//! Acknowledged writes that must not be lost, and the daemon never saying
//! they are safe when they may not be: one owner per backing (a second
//! daemon, `create --force`, erase and restore are refused while a volume
//! is served), reloads that cannot fork a volume, and flush errors that
//! stick. Each test performs the fault the review found.

use std::path::Path;
use std::time::Duration;

use hostcrypt_e2e::remote::Backend;
use hostcrypt_e2e::*;

fn control_line(fx: &Fixture) -> String {
    format!("control = \"{}\"", fx.path("control.sock").display())
}

/// Removing a volume closes the connections still open on it (a write on
/// one fails), and adding it back serves one instance: what an old
/// connection wrote and flushed before the removal is what new connections
/// read, and after a restart too.
#[test]
fn reload_remove_and_readd_never_forks_a_volume() {
    let mut fx = Fixture::new();
    // A config needs one volume: `keep` stays while `v` comes and goes.
    fx.volume("keep", "temp", "size = \"16M\"");
    fx.volume("v", "cache", "");
    let control = control_line(&fx);
    fx.write_config(&control);
    fx.create("v", "16M", 4096);
    let with = fx.path("with.toml");
    std::fs::copy(&fx.config, &with).unwrap();
    fx.remove_volume("v");
    fx.write_config(&control);
    let without = fx.path("without.toml");
    std::fs::copy(&fx.config, &without).unwrap();
    std::fs::copy(&with, &fx.config).unwrap();
    let d = fx.start();
    let script = format!(
        "import json, shutil, subprocess, time\n\
def reload():\n    \
r = subprocess.run([{cli:?}, '--config', {config:?}, 'reload', '--json'], capture_output=True, text=True)\n    \
assert r.returncode == 0, r.stdout + r.stderr\n    \
return json.loads(r.stdout)\n\
def serving():\n    \
out = subprocess.run([{cli:?}, '--config', {config:?}, 'status', '--json'], capture_output=True, text=True, check=True).stdout\n    \
return any(v['name'] == 'v' and not v.get('unavailable') for v in json.loads(out)['volumes'])\n\
old = nbd.NBD()\n\
old.connect_uri(sys.argv[1])\n\
old.pwrite(b'\\x11' * 65536, 0)\n\
old.flush()\n\
shutil.copy({without:?}, {config:?})\n\
assert reload()['removed'] == ['v']\n\
try:\n    \
old.pwrite(b'\\x22' * 65536, 0)\n    \
old.flush()\n    \
raise SystemExit('the removed instance still took a write')\n\
except nbd.Error:\n    \
pass\n\
shutil.copy({with_:?}, {config:?})\n\
reload()\n\
deadline = time.monotonic() + 30\n\
while not serving():\n    \
assert time.monotonic() < deadline, 'v not served again'\n    \
time.sleep(0.05)\n\
new = nbd.NBD()\n\
new.connect_uri(sys.argv[1])\n\
assert new.pread(65536, 0) == b'\\x11' * 65536\n\
new.pwrite(b'\\x33' * 65536, 65536)\n\
new.flush()\n\
print('OK')\n",
        cli = bin("hostcrypt").display().to_string(),
        config = fx.config.display().to_string(),
        without = without.display().to_string(),
        with_ = with.display().to_string(),
    );
    python_nbd(&script, &fx.uri("v"));
    assert_eq!(d.stop(), 0);
    let _d = fx.start();
    qemu_io(
        &fx.uri("v"),
        &["read -P 0x11 0 64k", "read -P 0x33 64k 64k"],
    );
}

/// While a volume is served, `create --force`, `erase` and `header
/// restore` are refused by the backing's owner lock, even with no control
/// socket for the CLI to ask (they used to assume "not served" then), and
/// a second daemon on the same config opens nothing, temp volumes
/// included. The data written before survives all of it.
#[test]
fn a_served_backing_refuses_every_other_writer() {
    let mut fx = Fixture::new();
    fx.volume("v", "cache", "");
    fx.volume("t", "temp", "size = \"16M\"");
    fx.write_config("");
    fx.create("v", "16M", 4096);
    let d = fx.start();
    qemu_io(&fx.uri("v"), &["write -P 0x5a 0 1M", "flush"]);
    qemu_io(&fx.uri("t"), &["write -P 0x6b 0 1M", "flush"]);
    let backing = fx.path("v.img");
    let expect_claimed = |out: std::process::Output, what: &str| {
        let text = output_text(&out);
        assert!(!out.status.success(), "{what} succeeded: {text}");
        assert!(text.contains("claimed by another opener"), "{what}: {text}");
    };
    expect_claimed(
        fx.cli(&["create", "v", "--size", "16M", "--force"]),
        "create --force",
    );
    expect_claimed(fx.cli(&["erase", "v", "--yes"]), "erase");
    let saved = fx.path("v.hdr");
    let out = fx.cli(&["header", "backup", "v", &saved.display().to_string()]);
    assert!(out.status.success(), "{}", output_text(&out));
    expect_claimed(
        fx.cli(&[
            "header",
            "restore",
            &backing.display().to_string(),
            &saved.display().to_string(),
            "--force",
        ]),
        "header restore",
    );

    // A second daemon: every volume refused, and it does not take over the
    // socket; the first one serves on, temp volume included.
    let mut second = fx.spawn();
    let code = second.wait(Duration::from_secs(30));
    assert_ne!(code, 0, "a second daemon started:\n{}", second.stderr());
    let log = second.stderr();
    assert!(
        log.contains("another hostcryptd serves this config"),
        "{log}"
    );
    qemu_io(&fx.uri("v"), &["read -P 0x5a 0 1M"]);
    qemu_io(&fx.uri("t"), &["read -P 0x6b 0 1M"]);
    assert_eq!(d.stop(), 0);
    let _d = fx.start();
    qemu_io(&fx.uri("v"), &["read -P 0x5a 0 1M"]);
}

/// A FLUSH that failed is not followed by one that succeeds: the writes it
/// covered may be gone (Linux marks failed write-back pages clean; a
/// remote cache may have dropped them). Every FLUSH and FUA fails until
/// the volume is reopened; status and metrics say why.
#[test]
fn a_failed_flush_sticks_until_the_volume_is_reopened() {
    let mut fx = Fixture::new();
    let trigger = fx.path("fail-flushes");
    let backend = flaky_backend(&fx, &trigger, "flush");
    fx.volume_at("r", "cache", Path::new(&backend.uri()), "");
    fx.write_config(&control_line(&fx));
    fx.create("r", "64M", 4096);
    let d = fx.start();
    let uri = fx.uri("r");
    qemu_io(&uri, &["write -P 0x5a 0 1M", "flush"]);
    let flush_fails = |arm: bool| {
        let script = format!(
            "import os\n\
h = nbd.NBD()\n\
h.connect_uri(sys.argv[1])\n\
h.pwrite(b'\\x66' * 65536, 0)\n\
if {arm}:\n    open({trigger:?}, 'w').close()\n\
else:\n    os.path.exists({trigger:?}) and os.remove({trigger:?})\n\
for what, call in [('flush', lambda: h.flush()), ('fua', lambda: h.pwrite(b'\\x67' * 4096, 0, nbd.CMD_FLAG_FUA))]:\n    \
try:\n        call()\n        raise SystemExit(what + ' succeeded')\n    \
except nbd.Error as e:\n        assert errno_of(e) == errno.EIO, (what, e)\n\
print('OK')\n",
            arm = if arm { "True" } else { "False" },
            trigger = trigger.display().to_string(),
        );
        python_nbd(&script, &uri);
    };
    // Armed: the backend's FLUSH fails. Disarmed: it would succeed, but
    // the daemon cannot know what the failed one lost.
    flush_fails(true);
    flush_fails(false);
    let status = fx.status();
    let v = status["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "r")
        .unwrap()
        .clone();
    assert!(
        v["write_back_error"].as_str().is_some(),
        "status does not say why: {v}"
    );
    assert!(d.stderr().contains("a sync of the backing failed"));
    // Reopened: flushes work again.
    assert_eq!(d.stop(), 0);
    let _d = fx.start();
    qemu_io(
        &uri,
        &["write -P 0x77 0 64k", "flush", "read -P 0x77 0 64k"],
    );
}

/// A temp volume pointed at a remote export that holds a cache volume is
/// refused before anything is written (the check used `path.exists()`,
/// false for an NBD URI, and the export was re-headed and zeroed).
#[test]
fn a_temp_volume_never_wipes_a_remote_cache_volume() {
    let mut fx = Fixture::new();
    let backend = Backend::nbdkit(&fx, "be", &["memory", "80M"]);
    let uri = backend.uri();
    fx.volume_at("c", "cache", Path::new(&uri), "");
    fx.write_config(&control_line(&fx));
    fx.create("c", "64M", 4096);
    let before = inspect_json(Path::new(&uri));
    fx.remove_volume("c");
    fx.volume_at("t", "temp", Path::new(&uri), "size = \"64M\"");
    fx.write_config(&control_line(&fx));
    let d = fx.start_with_unavailable("t");
    let log = d.stderr();
    assert!(
        log.contains("holds a cache volume, but the config says temp"),
        "{log}"
    );
    drop(d);
    let after = inspect_json(Path::new(&uri));
    assert_eq!(after["role"], "cache");
    assert_eq!(before["uuid"], after["uuid"]);
    assert_eq!(
        before["header_copies"], after["header_copies"],
        "the header was rewritten"
    );
}

/// A backing truncated or deleted under the daemon is noticed within
/// seconds: status says why, I/O fails instead of reading holes as data
/// (or writing into an unlinked file), and `check-key` no longer calls the
/// volume healthy.
#[test]
fn a_backing_truncated_or_deleted_while_served_fails_the_volume() {
    let mut fx = Fixture::new();
    fx.volume("cut", "cache", "");
    fx.volume("gone", "cache", "");
    fx.write_config(&control_line(&fx));
    fx.create("cut", "16M", 4096);
    fx.create("gone", "16M", 4096);
    let d = fx.start();
    for v in ["cut", "gone"] {
        qemu_io(&fx.uri(v), &["write -P 0x5a 0 64k", "flush"]);
    }
    std::fs::File::options()
        .write(true)
        .open(fx.path("cut.img"))
        .unwrap()
        .set_len(4096)
        .unwrap();
    std::fs::remove_file(fx.path("gone.img")).unwrap();
    let failed = |name: &str| {
        fx.status()["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v["failed"].as_str().map(str::to_owned))
    };
    for (name, why) in [("cut", "shrank"), ("gone", "deleted")] {
        wait_until(&format!("{name} failed"), Duration::from_secs(20), || {
            failed(name).is_some()
        });
        let reason = failed(name).unwrap();
        assert!(reason.contains(why), "{reason}");
        read_fails_with_eio(&fx.uri(name));
        let out = fx.cli(&["check-key", name]);
        assert!(!out.status.success(), "{}", output_text(&out));
        assert!(output_text(&out).contains(why), "{}", output_text(&out));
    }
    drop(d);
}

/// An NBD backend over a sparse file whose `fails` ("flush", or "backup"
/// for writes of the backup header copy at 256 KiB) fail with EIO while
/// `trigger` exists. nbdkit's error filter cannot fail flushes (1.32), so
/// it is nbdkit's eval plugin with dd.
fn flaky_backend(fx: &Fixture, trigger: &Path, fails: &str) -> Backend {
    let image = fx.path("be.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(80 << 20)
        .unwrap();
    let (image, trigger) = (image.display().to_string(), trigger.display().to_string());
    let fail = format!("if [ -e {trigger} ]; then echo 'EIO injected' >&2; exit 1; fi");
    let write = format!("dd of={image} seek=$4 conv=notrunc oflag=seek_bytes status=none");
    let (pwrite, flush) = match fails {
        "flush" => (write, fail),
        "backup" => (
            format!("[ $4 -eq 262144 ] && {{ {fail}; }}; {write}"),
            "true".into(),
        ),
        other => panic!("flaky_backend: {other}?"),
    };
    Backend::nbdkit(
        fx,
        "be",
        &[
            "eval",
            "get_size=echo 83886080",
            "can_write=exit 0",
            "can_flush=exit 0",
            &format!(
                "pread=dd if={image} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none"
            ),
            &format!("pwrite={pwrite}"),
            &format!("flush={flush}"),
        ],
    )
}

/// A rekey whose backup header copy cannot be written has still taken
/// effect once the primary copy is durable (every open reads the primary):
/// it is reported and audited as done, `status` shows the new KEK, and
/// the stale backup copy is repaired at the next open. It used to exit 1
/// with the old KEK in `status`, and come back on the new KEK after a
/// restart.
#[test]
fn a_rekey_whose_backup_copy_fails_is_reported_as_done() {
    let mut fx = Fixture::new();
    fx.add_local_kek("second");
    let trigger = fx.path("fail-backup-copy");
    let backend = flaky_backend(&fx, &trigger, "backup");
    let uri = backend.uri();
    fx.volume_at("r", "cache", Path::new(&uri), "");
    fx.write_config(&fx.control_and_audit());
    fx.create("r", "64M", 4096);
    let d = fx.start();
    qemu_io(&fx.uri("r"), &["write -P 0x5a 0 1M", "flush"]);
    std::fs::write(&trigger, b"").unwrap();
    let out = fx.cli(&["rekey", "r", "--kek", "second"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let kek_name = |fx: &Fixture| {
        fx.status()["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "r")
            .unwrap()["key"]["kek_name"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(kek_name(&fx), "second");
    let audit = std::fs::read_to_string(fx.audit_log()).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"rekey\"") && l.contains("\"ok\"")),
        "{audit}"
    );
    assert!(d.stderr().contains("the backup copy could not be written"));
    std::fs::remove_file(&trigger).unwrap();
    assert_eq!(d.stop(), 0);
    let _d = fx.start();
    assert_eq!(kek_name(&fx), "second");
    qemu_io(&fx.uri("r"), &["read -P 0x5a 0 1M"]);
    let copies = inspect_json(Path::new(&uri))["header_copies"].clone();
    assert_eq!(
        copies["primary"], copies["backup"],
        "the backup copy was not repaired: {copies}"
    );
}
