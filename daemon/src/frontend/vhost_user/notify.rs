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

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vhost_user_backend::VringT;

use super::guest::Vring;

/// The notifier of one connection.
pub struct Notifier {
    state: Mutex<State>,
    wake: Condvar,
    /// Something is pending or the thread is to stop: what its idle
    /// poll looks at without the lock.
    due: AtomicBool,
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
        });
        let worker = notifier.clone();
        std::thread::Builder::new()
            .name("vhost-user-irq".into())
            .spawn(move || worker.run(idle_poll))?;
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

    /// Ends the thread once it has sent what is pending.
    pub fn stop(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        self.due.store(true, Ordering::Release);
        self.wake.notify_one();
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
                    let _ = call.notify();
                }
            }
        }
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
}
