//! Interrupts to the guest (writes to each queue's call eventfd), sent
//! from one thread of the connection's own. Completions run on threads
//! that serve every volume (the I/O workers and rings); the call fd is
//! the frontend's, which may fill its counter and clear O_NONBLOCK on the
//! file description it shares, so a write to it could block. Here only
//! this thread can be blocked, and only this connection's interrupts
//! with it. A queue asked for twice before the thread gets to it is
//! signalled once (the guest reads the whole used ring either way).
//!
//! The thread looks for more work for `idle_poll` (the rings' window)
//! before it sleeps: waking it is otherwise a wake-up in every QD1
//! request's path. Writing the interrupt on the completing thread would
//! save the hand-off too, but a frontend that clears O_NONBLOCK and
//! fills its counter could then block that thread for good.
//!
//! When the connection ends, `stop` does not leave a blocked thread
//! behind: it sends the thread a signal whose handler does nothing and
//! is installed without SA_RESTART, so a blocked write returns EINTR
//! (the write is ours, not `write_all`'s, which would retry it), and
//! sends it again until the thread has ended (one sent just before the
//! write began would be missed). Reading the counter down first instead
//! could be beaten by a frontend that keeps refilling it, and eventfd
//! writes take no RWF_NOWAIT on the kernels we support.

use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost_user_backend::VringT;

use super::guest::Vring;

/// The notifier of one connection.
pub struct Notifier {
    state: Mutex<State>,
    wake: Condvar,
    /// Something is pending or the thread is to stop: what its idle
    /// poll looks at without the lock.
    due: AtomicBool,
    /// The thread, until `stop` has seen it end.
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Told when the thread ends.
    ended: Condvar,
}

struct State {
    /// Queues to signal, by index: at most one entry each.
    pending: Vec<Option<Vring>>,
    stop: bool,
}

impl Notifier {
    /// Starts the thread for `queues` queues, polling for `idle_poll`
    /// after each round of interrupts.
    pub fn start(queues: usize, idle_poll: Duration) -> std::io::Result<Arc<Self>> {
        let notifier = Arc::new(Notifier {
            state: Mutex::new(State {
                pending: (0..queues).map(|_| None).collect(),
                stop: false,
            }),
            wake: Condvar::new(),
            due: AtomicBool::new(false),
            thread: Mutex::new(None),
            ended: Condvar::new(),
        });
        install_interrupt_handler()?;
        let worker = notifier.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-user-irq".into())
            .spawn(move || {
                unblock_interrupt_signal();
                worker.run(idle_poll);
                // Under the lock `stop` waits with: it cannot miss this.
                let _state = worker.state.lock().unwrap_or_else(|p| p.into_inner());
                worker.ended.notify_all();
            })?;
        *notifier.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
        Ok(notifier)
    }

    /// Asks for an interrupt on `queue`; never blocks on the frontend.
    pub fn signal(&self, queue: usize, vring: &Vring) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = state.pending.get_mut(queue) {
            if slot.is_none() {
                *slot = Some(vring.clone());
                self.due.store(true, Ordering::Release);
                self.wake.notify_one();
            }
        }
    }

    /// Ends the thread once it has sent what is pending, and returns when
    /// it has ended: a write the frontend blocks is interrupted (see the
    /// module doc). Later calls return at once.
    pub fn stop(&self) {
        let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.stop = true;
        self.due.store(true, Ordering::Release);
        self.wake.notify_one();
        if thread.thread().id() == std::thread::current().id() {
            return;
        }
        let deadline = Instant::now() + STOP_LIMIT;
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                // Nothing should get here; if something does, one thread
                // left behind beats a connection that never ends.
                tracing::warn!("a vhost-user notifier thread did not end; left running");
                return;
            }
            // SAFETY: the thread is not joined yet (we hold its handle),
            // so its pthread_t is valid even if it has just ended; the
            // handler for this signal does nothing.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), interrupt_signal()) };
            state = self
                .ended
                .wait_timeout(state, RESEND_INTERRUPT)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(state);
        let _ = thread.join();
    }

    fn run(&self, idle_poll: Duration) {
        loop {
            crate::io::idle::poll_for(idle_poll, || {
                if self.due.load(Ordering::Acquire) {
                    ControlFlow::Break(true)
                } else {
                    ControlFlow::Continue(())
                }
            });
            let due: Vec<Vring> = {
                let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let mut state = self
                    .wake
                    .wait_while(state, |s| !s.stop && s.pending.iter().all(Option::is_none))
                    .unwrap_or_else(|p| p.into_inner());
                let due: Vec<Vring> = state.pending.iter_mut().filter_map(Option::take).collect();
                self.due.store(state.stop, Ordering::Release);
                if due.is_empty() && state.stop {
                    return;
                }
                due
            };
            for vring in due {
                // The call fd duplicated under the vring's lock, written
                // without it: a blocked write holds no lock others need.
                let call = vring
                    .get_ref()
                    .get_call()
                    .as_ref()
                    .and_then(|c| c.try_clone().ok());
                if let Some(call) = call {
                    if self.interrupt(call.as_raw_fd()).is_break() {
                        return;
                    }
                }
            }
        }
    }

    /// Adds one to the call fd's counter. A write that fails is given up
    /// (the frontend's fd is broken or full and non-blocking: the guest
    /// reads the used ring at its next interrupt or poll); one interrupted
    /// by `stop`'s signal ends the thread (`Break`).
    fn interrupt(&self, call: RawFd) -> ControlFlow<()> {
        let one = 1u64.to_ne_bytes();
        loop {
            // SAFETY: writes 8 bytes from a live array to a descriptor
            // the caller keeps open.
            if unsafe { libc::write(call, one.as_ptr().cast(), one.len()) } >= 0 {
                return ControlFlow::Continue(());
            }
            let interrupted = std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR);
            if !interrupted {
                return ControlFlow::Continue(());
            }
            // Only `stop` signals, after it set `stop`.
            if self.state.lock().unwrap_or_else(|p| p.into_inner()).stop {
                return ControlFlow::Break(());
            }
        }
    }
}

/// How long `stop` waits for the thread to end before it interrupts it
/// again.
const RESEND_INTERRUPT: Duration = Duration::from_millis(1);

/// How long `stop` keeps interrupting the thread before it leaves it.
const STOP_LIMIT: Duration = Duration::from_secs(2);

/// The signal that interrupts a notifier thread's blocked write: a
/// real-time one, which nothing else in the daemon uses.
fn interrupt_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

extern "C" fn ignore_interrupt(_signal: libc::c_int) {}

/// Installs the do-nothing handler, once per process, without
/// SA_RESTART: the point of the signal is the EINTR.
fn install_interrupt_handler() -> std::io::Result<()> {
    static FAILED: OnceLock<Option<i32>> = OnceLock::new();
    let failed = *FAILED.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"
        // value; the handler is an extern "C" fn that touches nothing,
        // which is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore_interrupt as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(interrupt_signal(), &action, std::ptr::null_mut()) != 0 {
                return std::io::Error::last_os_error().raw_os_error();
            }
        }
        None
    });
    match failed {
        Some(errno) => Err(std::io::Error::from_raw_os_error(errno)),
        None => Ok(()),
    }
}

/// Lets the signal through on the calling thread, whatever mask it
/// inherited from the thread that spawned it.
fn unblock_interrupt_signal() {
    // SAFETY: builds a signal set on the stack and changes only this
    // thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, interrupt_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd};

    use vm_memory::{GuestAddress, GuestMemoryAtomic};

    use super::*;
    use crate::frontend::vhost_user::guest::GuestMemory;

    /// Whether `call` is written within `deadline`; takes what was.
    fn interrupted(call: &std::fs::File, deadline: Duration) -> bool {
        let mut poll = libc::pollfd {
            fd: call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(deadline.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one pollfd over a descriptor `call` keeps open.
        if unsafe { libc::poll(&mut poll, 1, ms) } != 1 {
            return false;
        }
        let mut counter = [0u8; 8];
        // SAFETY: reads 8 bytes into a live array from our descriptor.
        unsafe { libc::read(call.as_raw_fd(), counter.as_mut_ptr().cast(), 8) == 8 }
    }

    #[test]
    fn every_signal_reaches_the_call_fd_whether_the_thread_polls_or_sleeps() {
        for idle_poll in [Duration::ZERO, Duration::from_millis(1)] {
            let memory = GuestMemoryAtomic::new(
                GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap(),
            );
            let vring = Vring::new(memory, 8).unwrap();
            // SAFETY: eventfd takes integers and returns a new descriptor or -1.
            let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            assert!(raw >= 0);
            // SAFETY: a fresh descriptor we own.
            let call = unsafe { std::fs::File::from_raw_fd(raw) };
            vring.set_call(Some(call.try_clone().unwrap()));
            let notifier = Notifier::start(1, idle_poll).unwrap();
            for round in 0..3 {
                notifier.signal(0, &vring);
                assert!(
                    interrupted(&call, Duration::from_secs(10)),
                    "round {round} with a {idle_poll:?} poll: no interrupt"
                );
            }
            // Nothing more is written for nothing asked.
            assert!(!interrupted(&call, Duration::ZERO));
            notifier.stop();
        }
    }

    /// Whether a thread named `vhost-user-irq` in this process is in
    /// write(2).
    fn a_notifier_is_in_write() -> bool {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return false;
        };
        tasks.flatten().any(|task| {
            let read = |name| std::fs::read_to_string(task.path().join(name)).unwrap_or_default();
            read("comm").trim() == "vhost-user-irq"
                && read("syscall").split(' ').next() == Some(&libc::SYS_write.to_string())
        })
    }

    #[test]
    fn stop_ends_a_thread_blocked_on_a_full_blocking_call_fd() {
        let memory =
            GuestMemoryAtomic::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap());
        let vring = Vring::new(memory, 8).unwrap();
        // Blocking, with its counter as full as an eventfd's gets: as a
        // hostile frontend leaves it.
        // SAFETY: eventfd takes integers and returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor we own.
        let call = unsafe { std::fs::File::from_raw_fd(raw) };
        let full = 0xffff_ffff_ffff_fffe_u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live array to our descriptor.
        assert_eq!(unsafe { libc::write(raw, full.as_ptr().cast(), 8) }, 8);
        vring.set_call(Some(call.try_clone().unwrap()));
        let notifier = Notifier::start(1, Duration::ZERO).unwrap();
        notifier.signal(0, &vring);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !a_notifier_is_in_write() {
            assert!(
                Instant::now() < deadline,
                "the notifier never blocked in its write"
            );
            std::thread::yield_now();
        }
        let (done, stopped) = std::sync::mpsc::channel();
        let stopping = notifier.clone();
        std::thread::spawn(move || {
            stopping.stop();
            let _ = done.send(());
        });
        stopped
            .recv_timeout(Duration::from_secs(10))
            .expect("stop did not return");
        // Ended, not left behind blocked (what `stop` does after its limit).
        assert!(
            !a_notifier_is_in_write(),
            "the thread is still in its write"
        );
        // A second stop has nothing left to do.
        notifier.stop();
        drop(call);
    }
}
