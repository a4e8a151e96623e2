//! (a) kill -9 during a write workload with FUA and FLUSH
//! (`tests/py/durable_writer.py`, libnbd). The writer logs what was
//! acknowledged and what became durable; the daemon is killed once the
//! log reaches a random length. After the restart every block the trial
//! touched must hold either its new pattern (required when durable) or
//! exactly what it held before, and every other block what it held before.
//!
//! fio is not the client here: its verify state cannot say which writes a
//! FLUSH covered at the instant of a crash; this writer's log can.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hostcrypt_e2e::*;

use crate::{both_headers_valid, kill_9, random_u64, trials, Figures};

const BLOCKS: usize = 8192; // 32 MiB of 4 KiB blocks

/// What `durable_writer.py` writes into block `index` in `trial`.
pub(crate) fn pattern(trial: u32, index: u32) -> Vec<u8> {
    let mut block = Vec::with_capacity(4096);
    block.extend_from_slice(b"HC");
    block.extend_from_slice(&trial.to_le_bytes());
    block.extend_from_slice(&index.to_le_bytes());
    let fill = ((trial.wrapping_mul(31).wrapping_add(index)) & 0xff) as u8 | 1;
    block.resize(4096, fill);
    block
}

/// Blocks sent, and blocks durable, per the writer's log.
fn read_log(path: &Path) -> (Vec<usize>, Vec<usize>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (mut sent, mut durable, mut acked) = (Vec::new(), Vec::new(), Vec::new());
    for line in text.lines() {
        let mut parts = line.split(' ');
        let kind = parts.next();
        let index = parts.next().and_then(|i| i.parse().ok());
        match (kind, index) {
            (Some("S"), Some(i)) => sent.push(i),
            (Some("W"), Some(i)) => acked.push(i),
            (Some("D"), Some(i)) => durable.push(i),
            (Some("F"), _) => durable.append(&mut acked),
            _ => {} // a torn last line: the writer died mid-line
        }
    }
    (sent, durable)
}

#[test]
fn kill_9_during_writes_with_fua_and_flush() {
    require_tool("nbdcopy");
    let mut fx = Fixture::new();
    fx.volume("w", "cache", "");
    fx.write_config("");
    fx.create("w", "32M", 4096);
    let writer = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/durable_writer.py");
    // What each block holds now: never written (zeros) or (trial, block).
    let mut model: Vec<Option<u32>> = vec![None; BLOCKS];
    let mut figures = Figures::new("writes with FUA and FLUSH");
    for trial in 1..=trials() as u32 {
        let mut d = fx.start();
        let log = fx.path("writer.log");
        let _ = std::fs::remove_file(&log);
        let errors = fx.path("writer.err");
        let mut client = Command::new("python3")
            .arg(&writer)
            .arg(fx.uri("w"))
            .arg(&log)
            .arg(BLOCKS.to_string())
            .arg(trial.to_string())
            .arg(random_u64().to_string())
            .stderr(std::fs::File::create(&errors).expect("the writer's stderr"))
            .spawn()
            .expect("start the writer");
        // The kill lands after a random number of logged operations.
        let lines = 1 + (random_u64() % 3000) as usize;
        let logged = || std::fs::read_to_string(&log).map_or(0, |t| t.lines().count());
        wait_until("the writer's progress", Duration::from_secs(60), || {
            logged() >= lines || client.try_wait().ok().flatten().is_some()
        });
        // The writer runs until it is killed: one that exited did not
        // write what this trial is about to check.
        if let Ok(Some(status)) = client.try_wait() {
            panic!(
                "trial {trial}: the writer exited ({status}) before the kill, after {} of {lines} log lines; its stderr:\n{}",
                logged(),
                std::fs::read_to_string(&errors).unwrap_or_default()
            );
        }
        kill_9(&mut d);
        let _ = client.wait();

        let d = fx.start();
        let image = fx.path("image.bin");
        run_ok(Command::new("nbdcopy").arg(fx.uri("w")).arg(&image));
        // Volumes open after the socket listens: read the log once served.
        figures.saw_open(&d.stderr());
        let image = std::fs::read(&image).expect("read the image");
        let (sent, durable) = read_log(&log);
        let touched: std::collections::HashSet<usize> = sent.iter().copied().collect();
        let durable: std::collections::HashSet<usize> = durable.into_iter().collect();
        for (index, before) in model.iter_mut().enumerate() {
            let got = &image[index * 4096..(index + 1) * 4096];
            let old = match before {
                Some(t) => pattern(*t, index as u32),
                None => vec![0u8; 4096],
            };
            let new = pattern(trial, index as u32);
            let ok_new = touched.contains(&index) && got == &new[..];
            assert!(
                ok_new || (!durable.contains(&index) && got == &old[..]),
                "trial {trial}, block {index}: holds neither {} (durable: {})\nlog tail: {:?}",
                if touched.contains(&index) {
                    "its new pattern nor its old content"
                } else {
                    "its old content"
                },
                durable.contains(&index),
                sent.iter().rev().take(5).collect::<Vec<_>>(),
            );
            if ok_new {
                *before = Some(trial);
            }
        }
        figures.durable_writes_checked += durable.len();
        assert!(both_headers_valid(&fx.path("w.img")));
        assert_eq!(d.stop(), 0);
        figures.trials += 1;
    }
    figures.require("durable writes checked", figures.durable_writes_checked);
    figures.report();
}
