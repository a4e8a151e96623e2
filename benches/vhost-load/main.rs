//! `vhost-load`: a load generator for vhost-user-blk devices, on libblkio's
//! `virtio-blk-vhost-user` driver (the `blkio` crate): what fio is to the
//! NBD runs of `benches/compare`, for `benches/compare --vhost`. fio's own
//! libblkio engine needs the C libblkio, which the distributions this runs
//! on do not package; the crate is the same driver in pure Rust.
//!
//! One thread per queue, each keeping `iodepth` requests in flight on its
//! own part of the device (queue N on `[N*size, (N+1)*size)`, as fio's
//! `offset_increment` does for the NBD jobs), reaping completions with
//! `do_io`. Requests that complete in the first second (`--ramp`) are not
//! counted, as fio's `ramp_time=1`. Prints one JSON object.
//!
//!   vhost-load --socket PATH --job rand-read --queues 2 --runtime 5 --size 512M
//!
//! Jobs: seq-read/seq-write (1 MiB, QD16), rand-read/rand-write (4 KiB,
//! QD32), lat-read/lat-write (4 KiB, QD1), and fill (the whole of every
//! queue's part written once, 1 MiB at QD16, untimed: before read jobs, so
//! no server reads holes).

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Drive a vhost-user-blk socket with libblkio and print JSON figures")]
struct Args {
    /// The vhost-user-blk socket.
    #[arg(long)]
    socket: String,
    /// seq-read, seq-write, rand-read, rand-write, lat-read, lat-write or fill.
    #[arg(long)]
    job: String,
    /// Queues, one thread each.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Seconds counted (after the ramp).
    #[arg(long, default_value_t = 5.0)]
    runtime: f64,
    /// Seconds run before counting starts.
    #[arg(long, default_value_t = 1.0)]
    ramp: f64,
    /// Bytes each queue works on (suffix K, M or G); default: the device
    /// divided among the queues.
    #[arg(long)]
    size: Option<String>,
    /// Overrides the job's block size (bytes, suffix K or M).
    #[arg(long)]
    bs: Option<String>,
    /// Overrides the job's queue depth (per queue).
    #[arg(long)]
    iodepth: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pattern {
    Sequential,
    Random,
}

#[derive(Clone, Copy, Debug)]
struct Job {
    write: bool,
    pattern: Pattern,
    bs: usize,
    iodepth: usize,
    /// Writes every block of the queue's part once, then stops.
    fill: bool,
}

impl Job {
    fn named(name: &str) -> Result<Job> {
        use Pattern::*;
        let (write, pattern, bs, iodepth, fill) = match name {
            "seq-read" => (false, Sequential, 1 << 20, 16, false),
            "seq-write" => (true, Sequential, 1 << 20, 16, false),
            "rand-read" => (false, Random, 4096, 32, false),
            "rand-write" => (true, Random, 4096, 32, false),
            "lat-read" => (false, Random, 4096, 1, false),
            "lat-write" => (true, Random, 4096, 1, false),
            "fill" => (true, Sequential, 1 << 20, 16, true),
            _ => bail!("unknown job {name:?}: seq-read, seq-write, rand-read, rand-write, lat-read, lat-write or fill"),
        };
        Ok(Job {
            write,
            pattern,
            bs,
            iodepth,
            fill,
        })
    }
}

fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, shift) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 10),
        Some('M') => (&s[..s.len() - 1], 20),
        Some('G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num.parse().with_context(|| format!("size {s:?}"))?;
    Ok(n << shift)
}

/// What one queue counted.
#[derive(Default)]
struct Counted {
    ops: u64,
    bytes: u64,
    /// Completion latencies of the counted requests, in nanoseconds.
    latencies: Vec<u64>,
}

struct Queue {
    index: usize,
    base: u64,
    size: u64,
    buffers: usize,
}

fn run_queue(
    mut q: blkio::Blkioq,
    at: Queue,
    job: Job,
    start_counting: Instant,
    end: Instant,
) -> Result<Counted> {
    let blocks = at.size / job.bs as u64;
    ensure!(blocks > 0, "the region is smaller than one block");
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ ((at.index as u64 + 1) << 32) ^ seed();
    let mut next_random = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut cursor = 0u64;
    let mut sent_at = vec![Instant::now(); job.iodepth];
    let mut free: Vec<usize> = (0..job.iodepth).collect();
    let mut in_flight = 0usize;
    let mut counted = Counted::default();
    let mut done: Vec<MaybeUninit<blkio::Completion>> =
        (0..job.iodepth).map(|_| MaybeUninit::uninit()).collect();
    let flags = blkio::ReqFlags::empty();
    let mut filled = 0u64;
    loop {
        let now = Instant::now();
        let stopping = if job.fill {
            filled >= blocks
        } else {
            now >= end
        };
        if !stopping {
            while let Some(slot) = free.pop() {
                if job.fill && filled >= blocks {
                    free.push(slot);
                    break;
                }
                let block = match job.pattern {
                    Pattern::Sequential => {
                        let b = cursor;
                        cursor = (cursor + 1) % blocks;
                        b
                    }
                    Pattern::Random => next_random() % blocks,
                };
                filled += 1;
                let offset = at.base + block * job.bs as u64;
                let buf = at.buffers + slot * job.bs;
                if job.write {
                    q.write(offset, buf as *const u8, job.bs, slot, flags);
                } else {
                    q.read(offset, buf as *mut u8, job.bs, slot, flags);
                }
                sent_at[slot] = Instant::now();
                in_flight += 1;
            }
        } else if in_flight == 0 {
            return Ok(counted);
        }
        let mut timeout = Duration::from_secs(30);
        let n = q
            .do_io(&mut done, 1, Some(&mut timeout), None)
            .map_err(|e| anyhow::anyhow!("queue {}: do_io: {e:?}", at.index))?;
        ensure!(n > 0, "queue {}: no completion within 30 s", at.index);
        let now = Instant::now();
        for c in &done[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            ensure!(
                c.ret == 0,
                "queue {}: a request failed ({})",
                at.index,
                c.ret
            );
            in_flight -= 1;
            free.push(c.user_data);
            // Counted: completed after the ramp and before the end.
            if now >= start_counting && now <= end {
                counted.ops += 1;
                counted.bytes += job.bs as u64;
                counted
                    .latencies
                    .push(now.duration_since(sent_at[c.user_data]).as_nanos() as u64);
            }
        }
    }
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// This process's user + system CPU seconds so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass; zeroed is a valid rusage.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut job = Job::named(&args.job)?;
    if let Some(bs) = &args.bs {
        job.bs = parse_size(bs)? as usize;
    }
    if let Some(depth) = args.iodepth {
        job.iodepth = depth;
    }
    ensure!(
        args.queues > 0 && job.iodepth > 0,
        "queues and iodepth must be positive"
    );

    let mut b = blkio::Blkio::new("virtio-blk-vhost-user")
        .map_err(|e| anyhow::anyhow!("libblkio driver: {e:?}"))?;
    let blk = |what: &str, r: blkio::Result<()>| {
        r.map_err(|e| anyhow::anyhow!("{what} on {}: {e:?}", args.socket))
    };
    blk("set path", b.set_str("path", &args.socket))?;
    blk("connect", b.connect())?;
    let capacity = b
        .get_u64("capacity")
        .map_err(|e| anyhow::anyhow!("capacity: {e:?}"))?;
    let size = match &args.size {
        Some(s) => parse_size(s)?,
        None => capacity / args.queues as u64,
    };
    ensure!(
        size * args.queues as u64 <= capacity,
        "{} queues of {size} bytes do not fit the device's {capacity}",
        args.queues
    );
    blk("num-queues", b.set_i32("num-queues", args.queues as i32))?;
    let started = b
        .start()
        .map_err(|e| anyhow::anyhow!("start on {}: {e:?}", args.socket))?;
    let per_queue = job.iodepth * job.bs;
    let region = b
        .alloc_mem_region(per_queue * args.queues)
        .map_err(|e| anyhow::anyhow!("memory region: {e:?}"))?;
    blk("map the memory region", b.map_mem_region(&region))?;
    // Writes carry random bytes: hostcryptd stores nothing special for
    // zeros on write, but nothing else should get a chance to.
    // SAFETY: the region is ours, mapped, and `per_queue * queues` long.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, per_queue * args.queues) };
    let mut x = seed() | 1;
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&x.to_le_bytes()[..n]);
    }

    let t0 = Instant::now();
    let start_counting = t0 + Duration::from_secs_f64(args.ramp);
    let end = start_counting + Duration::from_secs_f64(args.runtime);
    let cpu0 = cpu_seconds();
    let threads: Vec<_> = started
        .queues
        .into_iter()
        .enumerate()
        .map(|(index, q)| {
            let at = Queue {
                index,
                base: index as u64 * size,
                size,
                buffers: region.addr + index * per_queue,
            };
            std::thread::spawn(move || run_queue(q, at, job, start_counting, end))
        })
        .collect();
    let mut total = Counted::default();
    for t in threads {
        let c = t.join().expect("a queue thread panicked")?;
        total.ops += c.ops;
        total.bytes += c.bytes;
        total.latencies.extend(c.latencies);
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    total.latencies.sort_unstable();
    // A fill counts everything it wrote, over the whole wall time.
    let seconds = if job.fill { wall } else { args.runtime };
    let bytes = if job.fill {
        size * args.queues as u64
    } else {
        total.bytes
    };
    let out = serde_json::json!({
        "job": args.job,
        "queues": args.queues,
        "bs": job.bs,
        "iodepth": job.iodepth,
        "size_per_queue": size,
        "runtime_s": seconds,
        "ops": total.ops,
        "bytes": bytes,
        "iops": total.ops as f64 / seconds,
        "mb_s": bytes as f64 / seconds / 1e6,
        "p50_us": percentile(&total.latencies, 0.50),
        "p99_us": percentile(&total.latencies, 0.99),
        "client_cpu_s": cpu,
    });
    println!("{out}");
    Ok(())
}
