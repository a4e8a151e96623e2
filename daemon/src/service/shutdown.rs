//! The daemon's one shutdown mechanism, as mini-redis's `shutdown.rs`: a
//! [`Shutdown`] that `hostcryptd` triggers once, and a [`StopSignal`] every
//! task and thread holds — async tasks wait on its watch channel, threads
//! (key checks, metrics) on its condition variable. What stops in which
//! order (NBD drain, re-encryptions, control socket, metrics, key checks)
//! stays in `daemon/mod.rs` (`Daemon::drain`), where it reads top to bottom.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// Held by the daemon's main task; `trigger` asks everything to stop.
pub struct Shutdown {
    watch: watch::Sender<bool>,
    flag: Arc<(Mutex<bool>, Condvar)>,
}

/// Held by whatever must stop: a task or a thread.
#[derive(Clone)]
pub struct StopSignal {
    watch: watch::Receiver<bool>,
    flag: Arc<(Mutex<bool>, Condvar)>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (watch, _) = watch::channel(false);
        Shutdown {
            watch,
            flag: Arc::new((Mutex::new(false), Condvar::new())),
        }
    }

    pub fn signal(&self) -> StopSignal {
        StopSignal {
            watch: self.watch.subscribe(),
            flag: self.flag.clone(),
        }
    }

    /// Asks every holder of a [`StopSignal`] to stop (idempotent).
    pub fn trigger(&self) {
        let _ = self.watch.send(true);
        let (stopped, wake) = &*self.flag;
        *stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        wake.notify_all();
    }
}

impl StopSignal {
    /// For async tasks: a receiver whose value turns true at shutdown.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.watch.clone()
    }

    pub fn is_stopped(&self) -> bool {
        *self.flag.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// For threads: waits up to `timeout`; true once shutdown was asked.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let (stopped, wake) = &*self.flag;
        let guard = stopped.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = wake
            .wait_timeout_while(guard, timeout, |stopped| !*stopped)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_and_tasks_see_one_trigger() {
        let shutdown = Shutdown::new();
        let signal = shutdown.signal();
        assert!(!signal.wait_timeout(Duration::from_millis(10)));
        let waiter = {
            let signal = signal.clone();
            std::thread::spawn(move || signal.wait_timeout(Duration::from_secs(30)))
        };
        let watch = signal.watch();
        shutdown.trigger();
        assert!(waiter.join().unwrap());
        assert!(signal.is_stopped());
        assert!(*watch.borrow());
    }
}
