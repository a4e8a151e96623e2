//! (vhost) kill -9 during two-queue writes over vhost-user-blk. A libblkio
//! client (`virtio-blk-vhost-user`, one thread per queue, in this process)
//! keeps 8 writes of 4 KiB to 256 KiB in flight on each queue (those over
//! 64 KiB encrypted straight from the client's memory, the smaller ones copied
//! first: both of the backend's write paths), with a FLUSH
//! after every 64 writes, and records every completion it reaps; the
//! daemon is killed once a random number of writes completed. After the
//! restart a new libblkio client reads the whole volume back.
//!
//! What it guarantees: every write whose completion the client saw reads
//! back exactly (unless a later write to the same sectors was in flight;
//! then each sector holds one of the two). The backend completes a write
//! only after `volume::Op::Write` finished, and every local write path
//! (`volume/submit/`: inline pwrite, the thread pool's pwrite, a ring
//! write) has by then handed the ciphertext to the kernel: in the page
//! cache, which outlives the process. A write not seen to complete leaves
//! each of its 4 KiB sectors either as before or as written, never
//! anything else. Like the other kill -9 campaigns it cannot show that a
//! FLUSH reached the disk (`powerloss.rs` does, over NBD).
//!
//! Writes to one sector never overlap in flight: each queue owns half the
//! volume in 256 KiB slots, and a slot has at most one write in flight, so
//! a sector's writes complete in the order they were sent.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hostcrypt_e2e::*;

use crate::{both_headers_valid, kill_9, random_u64, trials, Figures};

const SIZE: u64 = 32 << 20;
const SECTOR: u64 = 4096;
const SLOT: u64 = 256 << 10;
const QUEUES: usize = 2;
/// Writes in flight per queue.
const DEPTH: usize = 8;
const FLUSH_EVERY: usize = 64;
const FLUSH_ID: usize = usize::MAX;

/// The bytes write `seq` of `trial` puts in `sector`: names all three, so
/// a sector from another write or another place never matches.
fn pattern(trial: u32, seq: u64, sector: u64) -> Vec<u8> {
    let mut block = Vec::with_capacity(SECTOR as usize);
    block.extend_from_slice(b"HV");
    block.extend_from_slice(&trial.to_le_bytes());
    block.extend_from_slice(&seq.to_le_bytes());
    block.extend_from_slice(&sector.to_le_bytes());
    let mut x = (seq ^ (sector << 20) ^ (u64::from(trial) << 48)) | 1;
    while block.len() < SECTOR as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        block.extend_from_slice(&x.to_le_bytes());
    }
    block.truncate(SECTOR as usize);
    block
}

#[derive(Debug, Clone, Copy)]
struct Write {
    seq: u64,
    offset: u64,
    sectors: u64,
}

/// What one queue's writer saw.
#[derive(Debug, Default)]
struct QueueLog {
    /// Writes whose completion was reaped, in completion order.
    completed: Vec<Write>,
    /// Writes sent and not seen to complete when the writer stopped.
    in_flight: Vec<Write>,
    flushes: usize,
    /// Writes completed before a FLUSH that then completed.
    durable: usize,
}

/// A started libblkio client of `socket` with `queues` queues and one
/// mapped region of `region` bytes, or why it could not connect.
fn connect(
    socket: &std::path::Path,
    queues: i32,
    region: usize,
) -> Result<(blkio::Blkio, Vec<blkio::Blkioq>, usize), blkio::Error> {
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", socket.to_str().unwrap())?;
    b.connect()?;
    b.set_i32("num-queues", queues)?;
    let started = b.start()?;
    let mem = b.alloc_mem_region(region)?;
    b.map_mem_region(&mem)?;
    Ok((b, started.queues, mem.addr))
}

/// One queue's writer: runs until `stop`, keeping `DEPTH` writes in flight
/// on its half of the volume.
fn writer(
    mut q: blkio::Blkioq,
    n: usize,
    buffers: usize,
    trial: u32,
    seed: u64,
    progress: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> QueueLog {
    let base = n as u64 * (SIZE / QUEUES as u64);
    let slots = SIZE / QUEUES as u64 / SLOT;
    let mut rng = seed | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut log = QueueLog::default();
    let mut free: Vec<usize> = (0..DEPTH).collect();
    let mut in_flight: HashMap<usize, Write> = HashMap::new();
    let mut sent = 0usize;
    // Completed writes when the pending FLUSH was sent.
    let mut flush_mark: Option<usize> = None;
    let mut done = [const { MaybeUninit::<blkio::Completion>::uninit() }; DEPTH + 1];
    let flags = blkio::ReqFlags::empty();
    while !stop.load(Ordering::Relaxed) {
        while let Some(buf) = free.pop() {
            let slot = loop {
                let s = next() % slots;
                if !in_flight.values().any(|w| w.offset == base + s * SLOT) {
                    break s;
                }
            };
            let write = Write {
                seq: (sent * QUEUES + n) as u64,
                offset: base + slot * SLOT,
                sectors: 1 + next() % (SLOT / SECTOR),
            };
            let addr = buffers + buf * SLOT as usize;
            for i in 0..write.sectors {
                let data = pattern(trial, write.seq, write.offset / SECTOR + i);
                // SAFETY: buffer `buf` is SLOT bytes of this queue's part of
                // the mapped region, not in flight (it was free).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        data.as_ptr(),
                        (addr + (i * SECTOR) as usize) as *mut u8,
                        SECTOR as usize,
                    )
                };
            }
            q.write(
                write.offset,
                addr as *const u8,
                (write.sectors * SECTOR) as usize,
                buf,
                flags,
            );
            in_flight.insert(buf, write);
            sent += 1;
            if sent.is_multiple_of(FLUSH_EVERY) && flush_mark.is_none() {
                q.flush(FLUSH_ID, flags);
                flush_mark = Some(log.completed.len());
            }
        }
        // A bounded wait, so the writer sees `stop` once the daemon is gone
        // and nothing will complete any more.
        let mut timeout = Duration::from_millis(100);
        let reaped = match q.do_io(&mut done, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(_) if stop.load(Ordering::Relaxed) => break,
            Err(e) => panic!("queue {n}: do_io: {e:?}"),
        };
        for c in &done[..reaped] {
            // SAFETY: do_io initialised the first `reaped` completions.
            let c = unsafe { c.assume_init_read() };
            // A completion reaped at all was written by the daemon before
            // it died: an error there is the daemon's, not the kill's.
            assert_eq!(c.ret, 0, "queue {n}: a request failed");
            if c.user_data == FLUSH_ID {
                log.flushes += 1;
                log.durable = flush_mark.take().expect("a FLUSH was pending");
                continue;
            }
            let write = in_flight.remove(&c.user_data).expect("a write in flight");
            log.completed.push(write);
            free.push(c.user_data);
            progress.fetch_add(1, Ordering::Relaxed);
        }
    }
    log.in_flight = in_flight.into_values().collect();
    log
}

#[test]
fn kill_9_during_two_queue_vhost_user_writes() {
    let mut fx = Fixture::new();
    let socket = fx.path("v.vhost");
    let backing = fx.volume(
        "v",
        "cache",
        &format!(
            "vhost_user = \"{}\"\nvhost_user_queues = {QUEUES}",
            socket.display()
        ),
    );
    fx.create("v", "32M", SECTOR as u32);
    let sectors = (SIZE / SECTOR) as usize;
    // What each sector holds: never written (zeros) or (trial, seq).
    let mut model: Vec<Option<(u32, u64)>> = vec![None; sectors];
    let mut figures = Figures::new("vhost-user two-queue writes");
    for trial in 1..=trials() as u32 {
        let mut d = fx.start();
        let region = QUEUES * DEPTH * SLOT as usize;
        let mut client = None;
        wait_until(
            "the vhost-user socket serves",
            Duration::from_secs(30),
            || {
                client = connect(&socket, QUEUES as i32, region).ok();
                client.is_some()
            },
        );
        let (blkio, queues, addr) = client.unwrap();
        let progress = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(n, q)| {
                let (progress, stop, seed) = (progress.clone(), stop.clone(), random_u64());
                let buffers = addr + n * DEPTH * SLOT as usize;
                std::thread::spawn(move || writer(q, n, buffers, trial, seed, progress, stop))
            })
            .collect();
        // The kill lands once a random number of writes completed.
        let target = 1 + (random_u64() % 4000) as usize;
        wait_until("the writers' progress", Duration::from_secs(120), || {
            progress.load(Ordering::Relaxed) >= target || writers.iter().any(|w| w.is_finished())
        });
        assert!(
            writers.iter().all(|w| !w.is_finished()),
            "trial {trial}: a writer stopped before the kill:\n{}",
            d.stderr()
        );
        kill_9(&mut d);
        stop.store(true, Ordering::Relaxed);
        let logs: Vec<QueueLog> = writers
            .into_iter()
            .map(|w| w.join().expect("a writer failed"))
            .collect();
        drop(blkio);

        // What each sector may hold: its last completed write (or what it
        // held before the trial), or the write in flight over it.
        let mut last: Vec<Option<(u32, u64)>> = model.clone();
        let mut maybe: Vec<Option<(u32, u64)>> = vec![None; sectors];
        for log in &logs {
            for w in &log.completed {
                for s in 0..w.sectors {
                    last[(w.offset / SECTOR + s) as usize] = Some((trial, w.seq));
                }
            }
            for w in &log.in_flight {
                for s in 0..w.sectors {
                    maybe[(w.offset / SECTOR + s) as usize] = Some((trial, w.seq));
                }
            }
        }

        let d = fx.start();
        figures.saw_open(&d.stderr());
        let mut client = None;
        wait_until(
            "the restarted socket serves",
            Duration::from_secs(30),
            || {
                client = connect(&socket, 1, 1 << 20).ok();
                client.is_some()
            },
        );
        let (blkio, mut queues, buf) = client.unwrap();
        let q = &mut queues[0];
        let mut done = [const { MaybeUninit::<blkio::Completion>::uninit() }; 1];
        let expect = |held: Option<(u32, u64)>, sector: u64| match held {
            Some((t, seq)) => pattern(t, seq, sector),
            None => vec![0u8; SECTOR as usize],
        };
        for chunk in 0..SIZE / (1 << 20) {
            q.read(
                chunk << 20,
                buf as *mut u8,
                1 << 20,
                0,
                blkio::ReqFlags::empty(),
            );
            let mut timeout = Duration::from_secs(30);
            let n = q
                .do_io(&mut done, 1, Some(&mut timeout), None)
                .expect("read back");
            assert_eq!(n, 1, "read back at {}: timed out", chunk << 20);
            // SAFETY: do_io wrote one completion.
            assert_eq!(unsafe { done[0].assume_init_read() }.ret, 0, "read back");
            // SAFETY: the read of 1 MiB into the mapped region completed.
            let got = unsafe { std::slice::from_raw_parts(buf as *const u8, 1 << 20) };
            for (i, got) in got.chunks(SECTOR as usize).enumerate() {
                let sector = (chunk << 20) / SECTOR + i as u64;
                let s = sector as usize;
                if got == &expect(last[s], sector)[..] {
                    model[s] = last[s];
                } else if maybe[s].is_some() && got == &expect(maybe[s], sector)[..] {
                    model[s] = maybe[s];
                } else {
                    panic!(
                        "trial {trial}, sector {sector}: holds neither its last completed write {:?} nor the write in flight {:?} (it starts {:02x?})",
                        last[s],
                        maybe[s],
                        &got[..24]
                    );
                }
            }
        }
        drop(queues);
        drop(blkio);
        for log in &logs {
            figures.count_n("completed_writes_checked", log.completed.len());
            figures.count_n("writes_in_flight_at_kill", log.in_flight.len());
            figures.count_n("flushes_completed", log.flushes);
            figures.durable_writes_checked += log.durable;
        }
        assert!(both_headers_valid(&backing));
        assert_eq!(d.stop(), 0);
        figures.trials += 1;
    }
    figures.require(
        "completed writes checked",
        figures.counted("completed_writes_checked"),
    );
    figures.require("flushes completed", figures.counted("flushes_completed"));
    figures.report();
}
