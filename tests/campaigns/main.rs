//! kill -9 campaigns: the daemon (or the CLI) killed at random instants
//! during each operation that changes a volume, then restarted and
//! checked: the volume opens, every acknowledged-and-durable write is
//! intact, both header copies are valid (one repaired at open if needed).
//!
//! Quick mode (the test suite): 5 trials per campaign. Full mode, by hand:
//! `HOSTCRYPT_CAMPAIGN_TRIALS=100 cargo test -p hostcrypt-e2e --test
//! campaigns -- --nocapture --test-threads=1`. Each campaign prints one
//! line of figures and, with `HOSTCRYPT_CAMPAIGN_REPORT=FILE`, appends it
//! as JSON; RELIABILITY.md records a full run.
//!
//! What a kill -9 cannot show is whether FLUSH reached the disk (the page
//! cache outlives the process); `powerloss.rs` shows that with a recording
//! NBD backend and images rebuilt as a power cut would leave them.
//!
//! `upgrade.rs` kills the daemon at start-up, while it upgrades a version
//! 1 or 2 header in place to the authenticated version 3.
//!
//! `faults.rs` holds the campaigns whose fault is not a kill: EIO bursts on
//! a block device (during writes, during `reencrypt`), a volume removed
//! and re-added by `reload`, a remote backend that crashes with writes
//! not yet flushed. Same modes, same figures.
//!
//! `vhost.rs` kills the daemon during two-queue writes over vhost-user-blk
//! (a libblkio client) and reads every completed write back.

mod faults;
mod keys;
mod powerloss;
mod reencrypt;
mod restore;
mod upgrade;
mod vhost;
mod writes;

use std::path::Path;
use std::time::Duration;

use hostcrypt_e2e::*;

/// Trials per campaign.
pub fn trials() -> usize {
    std::env::var("HOSTCRYPT_CAMPAIGN_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("getrandom");
    u64::from_le_bytes(b)
}

/// SIGKILL now, and reap.
pub fn kill_9(d: &mut Daemon) {
    let _ = d.child.kill();
    let _ = d.child.wait();
}

/// Both header copies decode (after a daemon start repaired any).
pub fn both_headers_valid(backing: &Path) -> bool {
    let header = inspect_json(backing);
    ["primary", "backup"].iter().all(|copy| {
        header["header_copies"][copy]
            .as_str()
            .is_some_and(|s| s.starts_with("valid"))
    })
}

/// What one campaign saw.
#[derive(Debug, Default)]
pub struct Figures {
    pub campaign: &'static str,
    pub trials: usize,
    /// The operation finished before the kill landed.
    pub completed: usize,
    /// Re-encryption journal replays at the next open.
    pub replays: usize,
    /// Header copies repaired at the next open.
    pub repairs: usize,
    /// Writes acknowledged as durable and checked after the restart.
    pub durable_writes_checked: usize,
    /// Further counts a campaign reports (`count`).
    pub extra: Vec<(&'static str, usize)>,
}

impl Figures {
    pub fn new(campaign: &'static str) -> Self {
        Figures {
            campaign,
            ..Default::default()
        }
    }

    /// Counts what a restarted daemon's log says it did at open.
    pub fn saw_open(&mut self, log: &str) {
        if log.contains("replaying it from the journal") {
            self.replays += 1;
        }
        if log.contains("repairing from the valid copy") {
            self.repairs += 1;
        }
    }

    /// Adds one to a further count, reported with the rest.
    pub fn count(&mut self, what: &'static str) {
        self.count_n(what, 1);
    }

    /// Adds `n` to a further count.
    pub fn count_n(&mut self, what: &'static str, n: usize) {
        match self.extra.iter_mut().find(|(name, _)| *name == what) {
            Some((_, c)) => *c += n,
            None => self.extra.push((what, n)),
        }
    }

    /// A further count (0 if never counted).
    pub fn counted(&self, what: &str) -> usize {
        self.extra
            .iter()
            .find(|(name, _)| *name == what)
            .map_or(0, |(_, n)| *n)
    }

    /// Fails the campaign when `got`, the amount of some work it checked
    /// (`what`), is zero: a campaign that checked nothing has not passed,
    /// whatever its trials asserted (a writer that died at start leaves
    /// an empty log, and an empty log holds no wrong block).
    pub fn require(&self, what: &str, got: usize) {
        assert!(
            got > 0,
            "campaign {:?}: {what} is 0 over {} trials: it checked nothing, so it has not passed",
            self.campaign,
            self.trials
        );
    }

    /// Prints the figures (failures are panics: reaching here means none).
    /// At least one trial must have run.
    pub fn report(&self) {
        self.require("trials run", self.trials);
        let mut line = serde_json::json!({
            "campaign": self.campaign,
            "trials": self.trials,
            "failures": 0,
            "completed_before_kill": self.completed,
            "journal_replays": self.replays,
            "header_repairs": self.repairs,
            "durable_writes_checked": self.durable_writes_checked,
        });
        for (name, n) in &self.extra {
            line[*name] = (*n).into();
        }
        eprintln!("campaign figures: {line}");
        if let Some(path) = std::env::var_os("HOSTCRYPT_CAMPAIGN_REPORT") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{line}");
            }
        }
    }
}

/// The syscalls that change a disk: a kill before any one of them is a
/// distinct crash state.
pub const DISK_SYSCALLS: [&str; 2] = ["pwrite64", "fdatasync"];

/// A kill point: SIGKILL on entering the `n`-th call (from 1) of `syscall`,
/// counted by strace per traced process.
#[derive(Debug, Clone, Copy)]
pub struct KillPoint {
    pub syscall: &'static str,
    pub n: usize,
}

impl KillPoint {
    /// Uniform over every disk syscall an uninterrupted run made.
    pub fn random(counts: &[(&'static str, usize)]) -> KillPoint {
        let total: usize = counts.iter().map(|(_, c)| c).sum();
        assert!(total > 0, "the operation made no disk syscalls: {counts:?}");
        let mut pick = (random_u64() % total as u64) as usize;
        for &(syscall, count) in counts {
            if pick < count {
                return KillPoint {
                    syscall,
                    n: pick + 1,
                };
            }
            pick -= count;
        }
        unreachable!("pick < total")
    }

    fn strace_args(self) -> Vec<String> {
        vec![
            "-e".into(),
            format!("inject={}:signal=KILL:when={}", self.syscall, self.n),
        ]
    }
}

/// strace attached to a process (all threads), recording its disk
/// syscalls in `log`, optionally killing it at a `KillPoint`.
pub struct Tracer {
    child: std::process::Child,
}

impl Tracer {
    pub fn attach(pid: u32, kill_at: Option<KillPoint>, log: &Path) -> Tracer {
        Tracer::attach_tracing(pid, &DISK_SYSCALLS, kill_at, log)
    }

    /// `attach`, recording `syscalls` (the kill point's among them).
    pub fn attach_tracing(
        pid: u32,
        syscalls: &[&str],
        kill_at: Option<KillPoint>,
        log: &Path,
    ) -> Tracer {
        require_tool("strace");
        let mut cmd = std::process::Command::new("strace");
        cmd.args(["-f", "-qq", "-e"])
            .arg(format!("trace={}", syscalls.join(",")))
            .arg("-o")
            .arg(log)
            .args(["-p", &pid.to_string()]);
        if let Some(k) = kill_at {
            cmd.args(k.strace_args());
        }
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start strace");
        // Attached once every thread names a tracer.
        wait_until("strace attached", Duration::from_secs(30), || {
            std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
                tasks.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("status")).is_ok_and(|s| {
                        s.lines()
                            .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
                    })
                })
            })
        });
        Tracer { child }
    }

    /// Detaches (strace lets its tracees go on SIGINT).
    pub fn detach(mut self) {
        // SAFETY: kill(2) on our own child's pid with a valid signal.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let _ = self.child.wait();
    }
}

/// Disk syscalls per kind in an strace log.
pub fn disk_syscalls(log: &Path) -> Vec<(&'static str, usize)> {
    syscall_counts(log, &DISK_SYSCALLS)
}

/// Calls per syscall of `syscalls` in an strace log.
pub fn syscall_counts(log: &Path, syscalls: &[&'static str]) -> Vec<(&'static str, usize)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    syscalls
        .iter()
        .map(|&s| {
            let call = format!("{s}(");
            (s, text.lines().filter(|l| l.contains(&call)).count())
        })
        .collect()
}
