//! (e) Power loss, which kill -9 cannot show (the page cache outlives a
//! killed process): the volume lives on a recording NBD backend
//! (`tests/py/recording_nbd.py`) that logs every write and FLUSH in order,
//! while a client writes (some with FUA, a FLUSH every ten) and the
//! volume is rekeyed to another KEK and re-encrypted under a new DEK.
//!
//! From the record, the disk is rebuilt as a power cut would leave it
//! just before each FLUSH: everything before the previous FLUSH, every
//! FUA write since, and a random subset of the other 4 KiB sectors
//! written since (a cut can keep any of them, even part of one write).
//! Each such image must open with hostcrypt (valid header; the journal
//! replays a torn re-encryption window) and read back every write the
//! client had acknowledged before that previous FLUSH, and every FUA
//! write it had acknowledged, intact.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use hostcrypt_e2e::*;
use hostcryptd::kek::{KeyProvider, LocalKek};

use crate::{random_u64, trials};

const SIZE: u64 = 16 << 20;
/// Headers, journal and data area fit in this.
const EXPORT: u64 = 18 << 20;
const BLOCK: usize = 4096;

struct Recorder(Child);

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn acked(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("A "))
        .count()
}

#[test]
fn power_cut_before_every_flush_keeps_every_durable_write() {
    let mut fx = Fixture::new();
    let second = fx.add_local_kek("second");
    let record = fx.path("record");
    std::fs::create_dir_all(&record).expect("record dir");
    let log = record.join("log");
    std::fs::File::create(&log).expect("log");
    let socket = fx.path("recorder.sock");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/recording_nbd.py");
    let recorder = Recorder(
        Command::new("/usr/bin/python3")
            .arg(script)
            .arg(&socket)
            .arg(EXPORT.to_string())
            .arg(&record)
            .spawn()
            .expect("start the recording backend"),
    );
    wait_until("the recorder to listen", Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    fx.volume_at("r", "cache", Path::new(&uri), "");
    fx.write_config(&format!(
        "control = \"{}\"",
        fx.path("control.sock").display()
    ));
    fx.create("r", "16M", 4096);
    let d = fx.start();
    append(&log, "R\n");

    let stop = fx.path("stop");
    let client_script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/powerloss_client.py");
    let client = Command::new("/usr/bin/python3")
        .arg(client_script)
        .arg(fx.uri("r"))
        .arg(&log)
        .arg(SIZE.to_string())
        .arg(&stop)
        .arg((random_u64() % 1000).to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the client");
    let wait_writes = |n: usize| {
        wait_until(
            &format!("{n} acknowledged writes"),
            Duration::from_secs(60),
            || acked(&log) >= n,
        )
    };
    wait_writes(200);
    let out = fx.cli(&["rekey", "r", "--kek", "second"]);
    assert!(out.status.success(), "{}", output_text(&out));
    wait_writes(acked(&log) + 200);
    let out = fx.cli(&["reencrypt", "r", "--rate", "4", "--no-wait"]);
    assert!(out.status.success(), "{}", output_text(&out));
    wait_until(
        "the re-encryption to finish",
        Duration::from_secs(120),
        || {
            let out = fx.cli(&["reencrypt", "r", "--status", "--json"]);
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            s["state"] == "done" || s["state"] == "idle"
        },
    );
    wait_writes(acked(&log) + 100);
    std::fs::write(&stop, b"").expect("stop the client");
    let out = client.wait_with_output().expect("client");
    assert!(
        out.status.success(),
        "{}\n{}",
        output_text(&out),
        d.stderr()
    );
    assert_eq!(d.stop(), 0);
    drop(recorder);

    let keks: Vec<Box<dyn KeyProvider>> = [fx.kek.clone(), second]
        .iter()
        .map(|p| Box::new(LocalKek::load(p).expect("load KEK")) as Box<dyn KeyProvider>)
        .collect();
    let figures = check_cuts(&fx, &record, &keks);
    eprintln!(
        "campaign figures: {}",
        serde_json::json!({
            "campaign": "power loss (recording backend)",
            "cut_points": figures.cuts,
            "flushes": figures.flushes,
            "writes_recorded": figures.writes,
            "durable_writes_checked": figures.checked,
            "cuts_mid_reencryption": figures.replays,
            "failures": 0,
        })
    );
    assert!(figures.cuts >= 20, "too few cut points: {}", figures.cuts);
}

fn append(log: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(log)
        .expect("open log");
    f.write_all(line.as_bytes()).expect("append");
}

enum Event {
    Write {
        offset: u64,
        len: usize,
        fua: bool,
        at: usize,
    },
    Flush,
    Ready,
    Acked {
        k: u64,
        offset: u64,
        fua: bool,
    },
    FlushAcked,
}

fn parse(line: &str) -> Option<Event> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(match *f.first()? {
        "W" => Event::Write {
            offset: n(1)?,
            len: n(2)? as usize,
            fua: n(3)? == 1,
            at: n(4)? as usize,
        },
        "F" => Event::Flush,
        "R" => Event::Ready,
        "A" => Event::Acked {
            k: n(1)?,
            offset: n(2)?,
            fua: n(4)? == 1,
        },
        "D" => Event::FlushAcked,
        _ => return None,
    })
}

#[derive(Default)]
struct CutFigures {
    cuts: usize,
    flushes: usize,
    writes: usize,
    checked: usize,
    /// Cut images whose header says a re-encryption was under way.
    replays: usize,
}

/// Replays the record and checks a power cut before every FLUSH (and at
/// the end). Subsets per cut: 1 in quick mode, 3 in full mode.
fn check_cuts(fx: &Fixture, record: &Path, keks: &[Box<dyn KeyProvider>]) -> CutFigures {
    let text = std::fs::read_to_string(record.join("log")).expect("log");
    let blob = std::fs::read(record.join("data")).expect("data");
    let events: Vec<Event> = text.lines().filter_map(parse).collect();
    let subsets = if trials() >= 10 { 3 } else { 1 };
    let mut fig = CutFigures::default();
    let mut durable = vec![0u8; EXPORT as usize];
    let mut ready = false;
    // Writes since the last FLUSH, in order.
    let mut since_flush: Vec<(u64, usize, bool, usize)> = Vec::new();
    // Client writes that must survive: acknowledged before the last
    // recorded FLUSH, or with FUA.
    let mut must_survive: HashMap<u64, u64> = HashMap::new();
    // Acknowledged since the last recorded FLUSH (not yet durable).
    let mut acked_since: Vec<(u64, u64)> = Vec::new();
    let apply = |image: &mut [u8], offset: u64, len: usize, at: usize| {
        image[offset as usize..offset as usize + len].copy_from_slice(&blob[at..at + len]);
    };
    let cut_image = fx.path("cut.img");
    for (i, e) in events.iter().enumerate() {
        match *e {
            Event::Ready => ready = true,
            Event::Write {
                offset,
                len,
                fua,
                at,
            } => {
                fig.writes += 1;
                if ready {
                    since_flush.push((offset, len, fua, at));
                } else {
                    apply(&mut durable, offset, len, at);
                }
            }
            Event::Acked { k, offset, fua } => {
                if fua {
                    must_survive.insert(offset, k);
                } else {
                    acked_since.push((offset, k));
                }
            }
            Event::FlushAcked => {}
            Event::Flush => {
                fig.flushes += 1;
                if ready {
                    for _ in 0..subsets {
                        let image = cut(&durable, &since_flush, &apply);
                        check_one(&cut_image, &image, keks, &must_survive, i, &mut fig);
                    }
                }
                for (offset, len, _, at) in since_flush.drain(..) {
                    apply(&mut durable, offset, len, at);
                }
                must_survive.extend(acked_since.drain(..));
            }
        }
    }
    let image = cut(&durable, &since_flush, &apply);
    check_one(
        &cut_image,
        &image,
        keks,
        &must_survive,
        events.len(),
        &mut fig,
    );
    fig
}

/// `durable`, plus every FUA write since, plus a random subset of the
/// other sectors written since (in order, so a kept later write wins).
fn cut(
    durable: &[u8],
    since: &[(u64, usize, bool, usize)],
    apply: &impl Fn(&mut [u8], u64, usize, usize),
) -> Vec<u8> {
    let mut image = durable.to_vec();
    for &(offset, len, fua, at) in since {
        if fua {
            apply(&mut image, offset, len, at);
            continue;
        }
        let mut sector = 0;
        while sector < len {
            let n = BLOCK.min(len - sector);
            if random_u64() & 1 == 0 {
                apply(&mut image, offset + sector as u64, n, at + sector);
            }
            sector += n;
        }
    }
    image
}

fn check_one(
    path: &Path,
    image: &[u8],
    keks: &[Box<dyn KeyProvider>],
    must_survive: &HashMap<u64, u64>,
    event: usize,
    fig: &mut CutFigures,
) {
    std::fs::write(path, image).expect("write the cut image");
    let had_journal = journal_pending(path);
    // Each cut is another point in time of the volume: checked without an
    // anti-rollback record (a fresh state directory each time).
    let state = path.with_extension("state");
    let _ = std::fs::remove_dir_all(&state);
    let records = hostcryptd::volume::Records::new(&state);
    let open = |kek: &dyn KeyProvider| {
        hostcryptd::volume::open_cache(
            "r",
            path,
            None,
            kek,
            None,
            &Default::default(),
            &records,
            &hostcryptd::volume::Claimant::local(),
        )
    };
    // The image's previous open has let go of it, but a child another test
    // thread forks at that moment holds a copy of the descriptor (and so
    // its lock) until it execs: busy is tried again, briefly.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let opened = loop {
        let mut busy = false;
        let found = keks.iter().find_map(|kek| match open(kek.as_ref()) {
            Ok(v) => Some(v),
            Err(e) => {
                busy |= e.to_string().contains("is claimed by another opener");
                None
            }
        });
        if found.is_some() || !busy || std::time::Instant::now() >= deadline {
            break found;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let Some((volume, _, _)) = opened else {
        let err = hostcryptd::volume::open_cache(
            "r",
            path,
            None,
            keks[0].as_ref(),
            None,
            &Default::default(),
            &records,
            &hostcryptd::volume::Claimant::local(),
        )
        .err()
        .map(|e| e.to_string());
        panic!("cut before event {event}: the volume does not open with either KEK: {err:?}");
    };
    if had_journal {
        fig.replays += 1;
    }
    for (&offset, &k) in must_survive {
        let data = volume
            .data
            .read(offset, BLOCK)
            .unwrap_or_else(|e| panic!("cut before event {event}: read {offset}: {e}"));
        let want: Vec<u8> = k.to_le_bytes().repeat(BLOCK / 8);
        assert!(
            data[..] == want[..],
            "cut before event {event}: block at {offset} (write {k}) is not intact"
        );
        fig.checked += 1;
    }
    fig.cuts += 1;
}

/// Whether the image's header records a re-encryption in progress (its
/// open then replays or resumes from the journal).
fn journal_pending(path: &Path) -> bool {
    let header = inspect_json(path);
    !header["reencrypt"].is_null() && header["reencrypt"] != "none"
}
