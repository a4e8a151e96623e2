//! (f) Faults under a writing client, not kills: a backing whose writes
//! fail with EIO for a burst (a loop device over a flaky FUSE file,
//! `harness/flaky.rs`), during writes and during `reencrypt`; a volume
//! removed by `reload` and added back during writes and during
//! `reencrypt`; a remote backend with a volatile write cache that crashes
//! with writes acknowledged but not flushed.
//!
//! The client (`tests/py/fault_writer.py`) writes each 4 KiB block once
//! per trial, FUA on every fourth write and a FLUSH after every eighth,
//! goes on past failures, and logs what was acknowledged, what a FLUSH
//! or FUA made durable, and what failed. Every campaign checks the same
//! two things: no FLUSH or FUA succeeds after one failed on the same
//! connection (the daemon cannot vouch for writes a failed sync may have
//! lost), and after the daemon restarts (the flaky device power-cycled:
//! every cache above its "disk" dropped) every durable write reads back
//! intact, every other block the trial wrote holds its new or its old
//! content, and every block it did not write its old content. Each
//! campaign fails if it checked no durable write, or if its fault never
//! made a FLUSH fail.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use hostcrypt_e2e::flaky::FlakyDevice;
use hostcrypt_e2e::remote::{sparse_image, Backend};
use hostcrypt_e2e::*;

use crate::writes::pattern;
use crate::{kill_9, random_u64, trials, Figures};

const BLOCK: usize = 4096;

fn random_below(n: usize) -> usize {
    (random_u64() % n as u64) as usize
}

fn control_line(fx: &Fixture) -> String {
    format!("control = \"{}\"", fx.path("control.sock").display())
}

/// A running `fault_writer.py` and its log.
struct Writer {
    child: Child,
    log: PathBuf,
    stop: PathBuf,
    /// A FIFO whose existence holds the writer between requests.
    hold: PathBuf,
}

impl Writer {
    fn start(fx: &Fixture, export: &str, blocks: usize, trial: u32) -> Writer {
        let log = fx.path("writer.log");
        let stop = fx.path("writer.stop");
        let hold = fx.path("writer.hold");
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_file(&stop);
        let _ = std::fs::remove_file(&hold);
        let child = Command::new("/usr/bin/python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/fault_writer.py"))
            .arg(fx.uri(export))
            .arg(&log)
            .arg(blocks.to_string())
            .arg(trial.to_string())
            .arg(random_u64().to_string())
            .arg(&stop)
            .arg(&hold)
            .spawn()
            .expect("start the writer");
        Writer {
            child,
            log,
            stop,
            hold,
        }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn lines(&self) -> usize {
        self.text().lines().count()
    }

    fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// Until the log has `n` lines or the writer has stopped by itself.
    fn wait_lines(&mut self, n: usize) {
        wait_until(
            &format!("{n} lines of the writer's log"),
            Duration::from_secs(60),
            || self.lines() >= n || self.exited(),
        );
    }

    /// Until the log has `n` FLUSH or FUA outcomes (either way) after the
    /// test's `marker` line, or the writer has stopped by itself.
    fn wait_syncs_after(&mut self, marker: &str, n: usize) {
        self.wait_syncs_within(marker, n, Duration::from_secs(60));
        let syncs = self.syncs_after(marker);
        assert!(
            syncs >= n || self.exited(),
            "{syncs} FLUSH or FUA outcomes after {marker} in 60 s, not {n}:\n{}",
            tail(&self.text(), usize::MAX)
        );
    }

    /// Like `wait_syncs_after`, but gives up after `limit` (the writer may
    /// be blocked by a re-encryption window that retries its sync while
    /// the device fails: the burst then ends on time).
    fn wait_syncs_within(&mut self, marker: &str, n: usize, limit: Duration) {
        let start = std::time::Instant::now();
        wait_until(
            &format!("{n} FLUSH or FUA outcomes after {marker}"),
            limit + Duration::from_secs(1),
            || self.syncs_after(marker) >= n || self.exited() || start.elapsed() >= limit,
        );
    }

    fn syncs_after(&self, marker: &str) -> usize {
        self.text()
            .lines()
            .skip_while(|l| *l != marker)
            .filter(|l| matches!(l.chars().next(), Some('F' | 'X' | 'D' | 'Y')))
            .count()
    }

    /// Holds the writer between two requests (nothing in flight: it logs
    /// before sending and after the reply) at a moment when its last
    /// outcome is one that `at` accepts; [`Writer::release`] lets it go on.
    fn hold_when(&mut self, what: &str, at: impl Fn(&str) -> bool) {
        let fifo =
            std::ffi::CString::new(self.hold.as_os_str().as_encoded_bytes()).expect("FIFO path");
        wait_until(what, Duration::from_secs(60), || {
            // SAFETY: mkfifo(3) with a NUL-terminated path we own.
            let made = unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) };
            assert_eq!(made, 0, "mkfifo: {}", std::io::Error::last_os_error());
            let mut exited = false;
            wait_until("the writer to hold", Duration::from_secs(30), || {
                exited = self.exited();
                exited || self.text().ends_with("\nH\n")
            });
            let text = self.text();
            // The exit status tells a signal from a finished order or a stop.
            let status = self.child.try_wait().ok().flatten();
            assert!(
                !exited,
                "the writer exited ({status:?}) before it held:\n{}",
                tail(&text, usize::MAX)
            );
            let lines: Vec<&str> = text.lines().collect();
            let before = lines[..lines.len() - 1]
                .iter()
                .rev()
                .find(|l| !matches!(**l, "H" | "R" | "K"))
                .copied()
                .unwrap_or_default();
            if at(before) {
                return true;
            }
            self.release();
            false
        });
    }

    /// Lets a held writer go on.
    fn release(&self) {
        let fifo = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.hold)
            .expect("open the hold FIFO");
        std::fs::remove_file(&self.hold).expect("remove the hold FIFO");
        drop(fifo);
    }

    /// Appends the test's own marker line (the writer appends too).
    fn mark(&self, marker: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .expect("open the writer's log");
        f.write_all(format!("{marker}\n").as_bytes())
            .expect("mark the log");
    }

    /// Asks the writer to stop, waits for it, and parses its log.
    fn finish(mut self, trial: u32) -> Log {
        std::fs::write(&self.stop, b"").expect("stop the writer");
        wait_until("the writer to exit", Duration::from_secs(60), || {
            self.exited()
        });
        let status = self.child.wait().expect("writer");
        assert!(status.success(), "trial {trial}: the writer failed");
        Log::parse(&self.text(), trial)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a trial's writer log says.
#[derive(Debug, Default)]
struct Log {
    text: String,
    /// Blocks whose write was sent (they may or may not have landed).
    sent: HashSet<usize>,
    /// Blocks acknowledged with FUA, or before a successful FLUSH.
    durable: HashSet<usize>,
    /// FLUSHes and FUA writes that failed.
    failed_syncs: usize,
}

impl Log {
    /// Parses a log, failing the test if a FLUSH or FUA succeeded after
    /// one had failed on the connection.
    fn parse(text: &str, trial: u32) -> Log {
        let mut log = Log {
            text: text.to_owned(),
            ..Log::default()
        };
        let mut acked = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let mut parts = line.split(' ');
            let kind = parts.next().unwrap_or_default();
            let index = parts.next().and_then(|i| i.parse::<usize>().ok());
            if matches!(kind, "F" | "D") && log.failed_syncs > 0 {
                panic!(
                    "trial {trial}, log line {}: a {} succeeded after a FLUSH or FUA had failed on this connection\n{}",
                    n + 1,
                    if kind == "F" { "FLUSH" } else { "FUA write" },
                    tail(text, n + 1)
                );
            }
            match (kind, index) {
                ("S", Some(i)) => {
                    log.sent.insert(i);
                }
                ("W", Some(i)) => acked.push(i),
                ("D", Some(i)) => {
                    log.durable.insert(i);
                }
                ("F", _) => log.durable.extend(acked.drain(..)),
                ("X", _) | ("Y", _) => log.failed_syncs += 1,
                _ => {}
            }
        }
        log
    }

    /// The writer's events after the test's `marker` line.
    fn after(&self, marker: &str) -> Vec<&str> {
        self.text
            .lines()
            .skip_while(|l| *l != marker)
            .skip(1)
            .collect()
    }
}

/// The log's lines up to `upto`, last ten, for a failure message.
fn tail(text: &str, upto: usize) -> String {
    let lines: Vec<&str> = text.lines().take(upto).collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Checks a trial's image against the model of what each block held
/// before it (and updates the model): a durable block holds its new
/// pattern; another block the trial sent holds its new pattern or exactly
/// its old content; any other block its old content.
fn check_image(model: &mut [Option<u32>], image: &[u8], trial: u32, log: &Log) {
    assert_eq!(image.len(), model.len() * BLOCK, "image size");
    for (index, before) in model.iter_mut().enumerate() {
        let got = &image[index * BLOCK..(index + 1) * BLOCK];
        let old = match before {
            Some(t) => pattern(*t, index as u32),
            None => vec![0u8; BLOCK],
        };
        let new = pattern(trial, index as u32);
        let ok_new = log.sent.contains(&index) && got == &new[..];
        assert!(
            ok_new || (!log.durable.contains(&index) && got == &old[..]),
            "trial {trial}, block {index}: holds neither {} (durable: {})",
            if log.sent.contains(&index) {
                "its new pattern nor its old content"
            } else {
                "its old content"
            },
            log.durable.contains(&index),
        );
        if ok_new {
            *before = Some(trial);
        }
    }
}

/// The whole export, through a new connection.
fn read_volume(fx: &Fixture, name: &str) -> Vec<u8> {
    let image = fx.path("image.bin");
    let _ = std::fs::remove_file(&image);
    run_ok(Command::new("nbdcopy").arg(fx.uri(name)).arg(&image));
    std::fs::read(&image).expect("read the image")
}

fn reencrypt_status(fx: &Fixture, name: &str) -> serde_json::Value {
    let out = fx.cli(&["reencrypt", name, "--status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn reencrypt_finished(s: &serde_json::Value) -> bool {
    s["state"] == "done" || s["state"] == "idle"
}

/// Starts `reencrypt --rate RATE`; returns the DEK generation it targets.
fn start_reencrypt(fx: &Fixture, name: &str, rate: &str) -> u64 {
    let before = reencrypt_status(fx, name)["generation"]
        .as_u64()
        .expect("DEK generation in the status");
    let out = fx.cli(&["reencrypt", name, "--rate", rate, "--no-wait"]);
    assert!(out.status.success(), "{}", output_text(&out));
    before + 1
}

/// Waits for a re-encryption (resumed at open, or under way) to finish,
/// and checks the volume is then under the DEK generation `target`.
fn wait_reencrypted(fx: &Fixture, name: &str, target: u64, d: &Daemon) {
    let mut last = serde_json::Value::Null;
    wait_until(
        &format!("the re-encryption of {name} to finish"),
        Duration::from_secs(120),
        || {
            last = reencrypt_status(fx, name);
            assert!(
                last["state"] != "failed",
                "the re-encryption of {name} failed: {last}\n{}",
                d.stderr()
            );
            reencrypt_finished(&last)
        },
    );
    assert_eq!(
        last["generation"].as_u64(),
        Some(target),
        "not under the new DEK: {last}"
    );
}

/// Names the flaky device's current loop device as volume `f`'s backing.
fn serve_device(fx: &mut Fixture, dev: &FlakyDevice) {
    fx.remove_volume("f");
    fx.volume_at("f", "cache", dev.path(), "");
    fx.write_config(&control_line(fx));
}

/// (a, b) EIO bursts on a block device while the writer runs, and (b)
/// while `reencrypt` runs too.
fn eio_bursts(campaign: &'static str, mib: usize, during_reencrypt: bool) {
    if !require_root("a loop device over a FUSE file (the flaky device)") {
        return;
    }
    require_tool("nbdcopy");
    let blocks = (mib << 20) / BLOCK;
    let mut fx = Fixture::new();
    // Headers and journal fit in the extra 8 MiB.
    let mut dev = FlakyDevice::new(&fx, "flaky", ((mib + 8) << 20) as u64);
    serve_device(&mut fx, &dev);
    fx.create("f", &format!("{mib}M"), 4096);
    let mut model: Vec<Option<u32>> = vec![None; blocks];
    let mut figures = Figures::new(campaign);
    // The trial whose data the next start checks: its log and, after a
    // re-encryption, the DEK generation it must be under.
    let mut pending: Option<(u32, Log, Option<u64>)> = None;
    for trial in 1..=trials() as u32 + 1 {
        // Every other re-encryption trial holds each window 200 ms between
        // its in-place write and its sync (a debug-build fault hook; held
        // windows stay 1 MiB), so the client's FLUSHes, not the window's
        // own sync, may be what fails on the window's lost pages.
        let held = during_reencrypt && trial % 2 == 0;
        fx.env.clear();
        if held {
            fx.env
                .push(("HOSTCRYPT_TEST_WINDOW_DELAY_MS".into(), "200".into()));
        }
        let mut d = fx.start();
        if let Some((t, log, target)) = pending.take() {
            if let Some(target) = target {
                wait_reencrypted(&fx, "f", target, &d);
            }
            let image = read_volume(&fx, "f");
            figures.saw_open(&d.stderr());
            check_image(&mut model, &image, t, &log);
            figures.durable_writes_checked += log.durable.len();
            figures.trials += 1;
        }
        if trial as usize > trials() {
            assert_eq!(d.stop(), 0);
            break;
        }
        let mut w = Writer::start(&fx, "f", blocks, trial);
        w.wait_lines(50 + random_below(if during_reencrypt { 300 } else { 1500 }));
        let mut target = None;
        if during_reencrypt {
            target = Some(start_reencrypt(&fx, "f", if held { "0" } else { "16" }));
            let checkpoint = random_below((mib << 20) * 3 / 4) as u64;
            let mut done = false;
            wait_until("a random checkpoint", Duration::from_secs(60), || {
                let s = reencrypt_status(&fx, "f");
                done = reencrypt_finished(&s);
                done || s["checkpoint"].as_u64().unwrap_or(0) >= checkpoint
            });
            if done {
                figures.completed += 1;
            }
        }
        // The burst: a random number of FLUSH or FUA outcomes (a few
        // milliseconds each; the writer is too fast to count lines), at
        // most a second.
        dev.arm();
        w.mark("A");
        w.wait_syncs_within("A", 1 + random_below(16), Duration::from_secs(1));
        dev.disarm();
        w.mark("Z");
        // FLUSHes after the burst, which must fail still.
        w.wait_syncs_after("Z", 4);
        let log = w.finish(trial);
        kill_9(&mut d);
        if log.failed_syncs > 0 {
            figures.count("trials_with_failed_flushes");
        }
        dev.power_cycle();
        serve_device(&mut fx, &dev);
        pending = Some((trial, log, target));
    }
    assert!(
        figures.counted("trials_with_failed_flushes") > 0,
        "no burst made a FLUSH or FUA fail in {} trials: the fixture injects nothing",
        figures.trials
    );
    assert!(
        figures.durable_writes_checked > 0,
        "no durable write checked"
    );
    figures.report();
}

#[test]
fn eio_bursts_during_writes_with_fua_and_flush() {
    eio_bursts("EIO bursts during writes", 16, false);
}

#[test]
fn eio_bursts_during_reencrypt() {
    eio_bursts("EIO bursts during reencrypt", 16, true);
}

/// (c) The volume removed from the config and reloaded while the writer
/// runs (every other trial while `reencrypt` runs too), then added back:
/// the old connection's next request fails, and what it wrote and flushed
/// before is what a new connection reads, and what a restarted daemon
/// reads.
#[test]
fn reload_remove_and_readd_during_writes_and_reencrypt() {
    require_tool("nbdcopy");
    const MIB: usize = 16;
    let blocks = (MIB << 20) / BLOCK;
    let mut fx = Fixture::new();
    fx.volume("keep", "temp", "size = \"16M\"");
    fx.volume("v", "cache", "");
    let control = control_line(&fx);
    fx.write_config(&control);
    fx.create("v", &format!("{MIB}M"), 4096);
    let with = fx.path("with.toml");
    std::fs::copy(&fx.config, &with).expect("config");
    fx.remove_volume("v");
    fx.write_config(&control);
    let without = fx.path("without.toml");
    std::fs::copy(&fx.config, &without).expect("config");
    std::fs::copy(&with, &fx.config).expect("config");

    let reload = |fx: &Fixture| -> serde_json::Value {
        let out = fx.cli(&["reload", "--json"]);
        assert!(out.status.success(), "{}", output_text(&out));
        serde_json::from_slice(&out.stdout).expect("reload JSON")
    };
    let serving = |fx: &Fixture| {
        fx.status()["volumes"].as_array().is_some_and(|vs| {
            vs.iter()
                .any(|v| v["name"] == "v" && v.get("unavailable").is_none_or(|u| u.is_null()))
        })
    };
    let mut model: Vec<Option<u32>> = vec![None; blocks];
    let mut figures = Figures::new("reload remove and re-add");
    // What the re-added volume read, which a restart must read again.
    let mut readded: Option<Vec<u8>> = None;
    for trial in 1..=trials() as u32 + 1 {
        let d = fx.start();
        if let Some(before) = readded.take() {
            assert!(
                read_volume(&fx, "v") == before,
                "trial {}: the restarted daemon reads other data than the re-added volume did",
                trial - 1
            );
        }
        if trial as usize > trials() {
            assert_eq!(d.stop(), 0);
            break;
        }
        let mut w = Writer::start(&fx, "v", blocks, trial);
        w.wait_lines(50 + random_below(1000));
        let mut target = None;
        if trial % 2 == 0 {
            target = Some(start_reencrypt(&fx, "v", "8"));
            wait_until(
                "the re-encryption to start",
                Duration::from_secs(30),
                || {
                    let s = reencrypt_status(&fx, "v");
                    s["checkpoint"].as_u64().unwrap_or(0) > 0 || reencrypt_finished(&s)
                },
            );
            if reencrypt_finished(&reencrypt_status(&fx, "v")) {
                figures.completed += 1;
            }
        }
        w.hold_when("the writer between requests", |_| true);
        std::fs::copy(&without, &fx.config).expect("config");
        let removed = reload(&fx);
        assert_eq!(removed["removed"], serde_json::json!(["v"]), "{removed}");
        w.mark("R");
        w.release();
        wait_until(
            "the old connection to fail",
            Duration::from_secs(30),
            || w.exited(),
        );
        let log = w.finish(trial);
        let after = log.after("R");
        assert!(
            after.last() == Some(&"C")
                && !after
                    .iter()
                    .any(|l| matches!(l.chars().next(), Some('W' | 'D' | 'F'))),
            "trial {trial}: the removed volume's connection went on: {after:?}"
        );
        std::fs::copy(&with, &fx.config).expect("config");
        reload(&fx);
        wait_until("v served again", Duration::from_secs(30), || serving(&fx));
        if let Some(target) = target {
            wait_reencrypted(&fx, "v", target, &d);
        }
        let image = read_volume(&fx, "v");
        check_image(&mut model, &image, trial, &log);
        figures.durable_writes_checked += log.durable.len();
        figures.trials += 1;
        readded = Some(image);
        assert_eq!(d.stop(), 0);
    }
    assert!(
        figures.durable_writes_checked > 0,
        "no durable write checked"
    );
    figures.report();
}

/// (d) A remote backend with a volatile write cache (nbdkit's cache
/// filter, `cache=writeback`, over a file) killed and restarted while
/// the writer has writes acknowledged but not flushed (it is held between
/// requests, its last event an acknowledged write): the daemon reconnects,
/// and every FLUSH and FUA after that fails; every write a FLUSH or FUA
/// covered before the crash reads back after a restart.
#[test]
fn backend_crash_with_unflushed_writes() {
    require_tool("nbdcopy");
    const MIB: usize = 16;
    let blocks = (MIB << 20) / BLOCK;
    let mut fx = Fixture::new();
    let image = sparse_image(&fx, "backend.img", MIB as u64 + 16);
    let mut backend = Backend::nbdkit_writeback_cache(&fx, "be", &image);
    fx.volume_at(
        "r",
        "cache",
        Path::new(&backend.uri()),
        "backing_timeout = \"10s\"",
    );
    fx.write_config(&control_line(&fx));
    fx.create("r", &format!("{MIB}M"), 4096);
    let backing = |fx: &Fixture| {
        fx.status()["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "r"))
            .map(|v| v["backing"].clone())
            .expect("volume r in status")
    };
    let mut model: Vec<Option<u32>> = vec![None; blocks];
    let mut figures = Figures::new("remote backend crash with unflushed writes");
    let mut pending: Option<(u32, Log)> = None;
    for trial in 1..=trials() as u32 + 1 {
        let mut d = fx.start();
        if let Some((t, log)) = pending.take() {
            let image = read_volume(&fx, "r");
            check_image(&mut model, &image, t, &log);
            figures.durable_writes_checked += log.durable.len();
            figures.trials += 1;
        }
        if trial as usize > trials() {
            assert_eq!(d.stop(), 0);
            break;
        }
        let mut w = Writer::start(&fx, "r", blocks, trial);
        w.wait_lines(50 + random_below(1500));
        w.hold_when("the writer after an unflushed write", |l| {
            l.starts_with("W ")
        });
        let reconnects = backing(&fx)["reconnects"].as_u64().unwrap_or(0);
        backend.kill();
        backend.restart();
        w.mark("K");
        wait_until("the backing to reconnect", Duration::from_secs(30), || {
            let b = backing(&fx);
            b["state"] == "up" && b["reconnects"].as_u64().unwrap_or(0) > reconnects
        });
        w.release();
        w.wait_syncs_after("K", 3);
        let log = w.finish(trial);
        let after = log.after("K");
        assert!(
            !after.iter().any(|l| *l == "F" || l.starts_with("D ")),
            "trial {trial}: a FLUSH or FUA succeeded after the backend lost unflushed writes: {after:?}"
        );
        assert!(
            after.iter().any(|l| matches!(*l, "X") || l.starts_with("Y ")),
            "trial {trial}: no FLUSH or FUA failed after the backend lost unflushed writes: {after:?}\n{}",
            d.stderr()
        );
        kill_9(&mut d);
        pending = Some((trial, log));
    }
    assert!(
        figures.durable_writes_checked > 0,
        "no durable write checked"
    );
    figures.report();
}
