//! (b) kill -9 during `rotate-kek` on OpenBao, and (c) during `rekey`
//! local → OpenBao (and back, so every trial has a move to make). One
//! uninterrupted run under strace first counts the daemon's disk syscalls
//! (pwrite64, fdatasync) for the operation; each trial then kills the
//! daemon on entering one of them, picked uniformly (strace's syscall
//! injection), so every crash state between two disk writes is reached.
//! After the restart the volume opens with whichever wrapped key the
//! header holds, and its data reads back.

use std::time::Duration;

use hostcrypt_e2e::bao::Bao;
use hostcrypt_e2e::*;

use crate::{both_headers_valid, disk_syscalls, kill_9, trials, Figures, KillPoint, Tracer};

struct KeysFixture {
    fx: Fixture,
    bao: Bao,
}

/// A cache volume `v` on KEK `volume_kek` (`main`: local, `bao`: OpenBao
/// transit), 64 KiB of a known pattern written.
fn setup(volume_kek: &str) -> KeysFixture {
    let mut fx = Fixture::new();
    let bao = Bao::start(fx.dir.path());
    bao.create_key("hostcrypt", "aes256-gcm96");
    let token_file = fx.path("bao.token");
    bao.key_token("hostcrypt", &token_file);
    fx.kek_tables.push(format!(
        "[kek.bao]\nprovider = \"vault\"\naddress = \"{}\"\nkey = \"hostcrypt\"\ntoken_file = \"{}\"\nattempts = 2\ntimeout_secs = 5\ninsecure_http = true\n",
        bao.addr,
        token_file.display()
    ));
    fx.default_kek = volume_kek.into();
    fx.volume("v", "cache", "");
    fx.write_config(&fx.control_and_audit());
    fx.create("v", "16M", 4096);
    let d = fx.start();
    qemu_io(&fx.uri("v"), &["write -P 0x5e 0 64k", "flush"]);
    assert_eq!(d.stop(), 0);
    KeysFixture { fx, bao }
}

/// The disk syscalls the daemon makes for `args`, uninterrupted.
fn measure(kf: &KeysFixture, args: &[&str]) -> Vec<(&'static str, usize)> {
    let d = kf.fx.start();
    let log = kf.fx.path("strace.log");
    let tracer = Tracer::attach(d.child.id(), None, &log);
    let out = kf.fx.cli(args);
    tracer.detach();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(d.stop(), 0);
    disk_syscalls(&log)
}

/// Runs `args` with the CLI while the daemon dies at a random disk
/// syscall of the operation (uniform over what `measure` counted).
fn kill_during(
    kf: &KeysFixture,
    args: &[&str],
    counts: &[(&'static str, usize)],
    figures: &mut Figures,
) {
    let mut d = kf.fx.start();
    let kill_at = KillPoint::random(counts);
    let tracer = Tracer::attach(d.child.id(), Some(kill_at), &kf.fx.path("strace.log"));
    let out = kf.fx.cli(args);
    let died =
        d.child.try_wait().ok().flatten().is_some() || wait_exit(&mut d, Duration::from_secs(5));
    tracer.detach();
    if !died {
        // The operation finished before reaching the kill point.
        assert!(out.status.success(), "{}", output_text(&out));
        figures.completed += 1;
        kill_9(&mut d);
    }
    let d = kf.fx.start();
    qemu_io(&kf.fx.uri("v"), &["read -P 0x5e 0 64k"]);
    // Volumes open after the socket listens: read the log once served.
    figures.saw_open(&d.stderr());
    let status = kf.fx.status();
    assert!(
        status["volumes"][0]["unavailable"].is_null(),
        "after kill -9 at {kill_at:?} during {args:?}: {status}\n{}",
        d.stderr()
    );
    assert!(both_headers_valid(&kf.fx.path("v.img")));
    assert_eq!(d.stop(), 0);
    figures.trials += 1;
}

/// Whether the daemon exits within `deadline` (it was killed and the
/// CLI's error came back first).
fn wait_exit(d: &mut Daemon, deadline: Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < deadline {
        if d.child.try_wait().ok().flatten().is_some() {
            return true;
        }
        std::thread::yield_now();
    }
    false
}

#[test]
fn kill_9_during_rotate_kek_on_openbao() {
    let kf = setup("bao");
    let mut figures = Figures::new("rotate-kek on OpenBao");
    kf.bao.rotate_key("hostcrypt");
    let counts = measure(&kf, &["rotate-kek", "v"]);
    for _ in 0..trials() {
        kf.bao.rotate_key("hostcrypt");
        kill_during(&kf, &["rotate-kek", "v"], &counts, &mut figures);
    }
    figures.require(
        "kills that landed before the operation finished",
        figures.trials - figures.completed,
    );
    figures.report();
}

#[test]
fn kill_9_during_rekey_local_to_openbao() {
    let kf = setup("main");
    let mut figures = Figures::new("rekey local <-> OpenBao");
    let counts = measure(&kf, &["rekey", "v", "--kek", "bao"]);
    for _ in 0..trials() {
        // Move to whichever KEK the header does not use now.
        let provider = inspect_json(&kf.fx.path("v.img"))["keyslots"][0]["provider"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let to = if provider == "vault" { "main" } else { "bao" };
        kill_during(&kf, &["rekey", "v", "--kek", to], &counts, &mut figures);
    }
    figures.require(
        "kills that landed before the operation finished",
        figures.trials - figures.completed,
    );
    figures.report();
}
