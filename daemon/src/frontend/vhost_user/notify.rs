//! Interrupts to the guest (writes to each queue's call eventfd), sent
//! from one thread of the connection's own. Completions run on threads
//! that serve every volume (the I/O workers and rings); the call fd is
//! the frontend's, which may fill its counter and clear O_NONBLOCK on the
//! file description it shares, so a write to it could block. Here only
//! this thread can be blocked, and only this connection's interrupts
//! with it. A queue asked for twice before the thread gets to it is
//! signalled once (the guest reads the whole used ring either way).

use std::sync::{Arc, Condvar, Mutex};

use vhost_user_backend::VringT;

use super::guest::Vring;

/// The notifier of one connection.
pub struct Notifier {
    state: Mutex<State>,
    wake: Condvar,
}

struct State {
    /// Queues to signal, by index: at most one entry each.
    pending: Vec<Option<Vring>>,
    stop: bool,
}

impl Notifier {
    /// Starts the thread for `queues` queues.
    pub fn start(queues: usize) -> std::io::Result<Arc<Self>> {
        let notifier = Arc::new(Notifier {
            state: Mutex::new(State {
                pending: (0..queues).map(|_| None).collect(),
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let worker = notifier.clone();
        std::thread::Builder::new()
            .name("vhost-user-irq".into())
            .spawn(move || worker.run())?;
        Ok(notifier)
    }

    /// Asks for an interrupt on `queue`; never blocks on the frontend.
    pub fn signal(&self, queue: usize, vring: &Vring) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = state.pending.get_mut(queue) {
            if slot.is_none() {
                *slot = Some(vring.clone());
                self.wake.notify_one();
            }
        }
    }

    /// Ends the thread once it has sent what is pending.
    pub fn stop(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        self.wake.notify_one();
    }

    fn run(&self) {
        loop {
            let due: Vec<Vring> = {
                let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let mut state = self
                    .wake
                    .wait_while(state, |s| !s.stop && s.pending.iter().all(Option::is_none))
                    .unwrap_or_else(|p| p.into_inner());
                let due: Vec<Vring> = state.pending.iter_mut().filter_map(Option::take).collect();
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
