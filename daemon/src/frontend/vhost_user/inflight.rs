//! What one vhost-user connection has in flight, and the rules that bound
//! it: how many requests run, on each queue and in all (so stopping a
//! queue can wait for its own, and closing for every one), how many
//! bytes of bounce buffers and read results they pin (a budget the queue
//! workers wait on), which descriptor heads of each queue are taken (a
//! head the guest posts again while it is in flight is a broken or
//! hostile driver, refused), and each queue's generation (a completion
//! that outlives its queue, stopped by GET_VRING_BASE or by the end of
//! the connection, writes nothing into guest memory the frontend may
//! have handed to a new ring or a new connection).
//!
//! No I/O and no vhost-user types: `backend.rs` asks for a [`Ticket`]
//! before it submits a request and completes through it.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Bytes of request data one connection may have in flight. The queues'
/// workers wait when it is spent; one request alone always fits (the
/// parser bounds it to `device::MAX_DATA`, half of this).
pub const BUDGET: u64 = 64 << 20;

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("descriptor head {0} was posted again while still in flight")]
    HeadInFlight(u16),
    #[error("descriptor head {0} is outside the queue")]
    HeadOutside(u16),
    #[error("queue {0} does not exist")]
    NoQueue(usize),
    #[error("the connection is closing")]
    Closing,
    #[error("the queue was stopped after the request was taken off it")]
    Retired,
}

/// One connection's requests in flight.
pub struct InFlight {
    state: Mutex<State>,
    changed: Condvar,
    queues: Vec<Mutex<Queue>>,
    /// By queue, with its mutex: told when the last completion writing
    /// into that queue's ring has finished, and when the last chain being
    /// taken off it was admitted or refused.
    writes_done: Vec<Condvar>,
    budget: u64,
}

struct State {
    running: usize,
    /// `running` by queue: GET_VRING_BASE on one queue waits for its own
    /// requests only, not for a busy neighbour's.
    queue_running: Box<[usize]>,
    /// By queue: a stop waits for the chain being taken off it, which is
    /// then admitted without waiting for the budget (other queues' I/O
    /// must not hold up this queue's stop; one request over the budget
    /// per queue at most, as the queue takes no more).
    queue_stopping: Box<[bool]>,
    bytes: u64,
    closing: bool,
}

struct Queue {
    generation: u64,
    heads: Box<[u64]>,
    /// Completions past their generation check, writing into guest
    /// memory and the ring without this lock, and reads of a request's
    /// guest buffers (`QueueGate`): retirement
    /// waits for them.
    writing: usize,
    /// Chains taken off the queue and not yet through their admission
    /// (`Taking`): a stop waits for them, so that a chain the frontend
    /// counts as taken is answered.
    taking: usize,
}

impl Queue {
    fn slot(&self, head: u16) -> Option<(usize, u64)> {
        let word = usize::from(head) / 64;
        (word < self.heads.len()).then_some((word, 1u64 << (head % 64)))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl InFlight {
    /// For `queues` queues of at most `queue_size` descriptors each.
    pub fn new(queues: usize, queue_size: u16, budget: u64) -> Arc<Self> {
        let words = usize::from(queue_size).div_ceil(64);
        Arc::new(InFlight {
            state: Mutex::new(State {
                running: 0,
                queue_running: vec![0; queues].into_boxed_slice(),
                queue_stopping: vec![false; queues].into_boxed_slice(),
                bytes: 0,
                closing: false,
            }),
            changed: Condvar::new(),
            queues: (0..queues)
                .map(|_| {
                    Mutex::new(Queue {
                        generation: 0,
                        heads: vec![0; words].into_boxed_slice(),
                        writing: 0,
                        taking: 0,
                    })
                })
                .collect(),
            writes_done: (0..queues).map(|_| Condvar::new()).collect(),
            budget,
        })
    }

    /// The generation of `queue` now (a queue's worker has it from
    /// `begin_take`).
    fn generation(&self, queue: usize) -> u64 {
        self.queues.get(queue).map_or(0, |q| lock(q).generation)
    }

    /// Admits the request at `head` of `queue`, taken off it in
    /// `generation`, holding `bytes` of data: waits while the budget is
    /// spent by others, refuses a head already in flight, a request whose
    /// queue was stopped since (before or while it waited), and any
    /// request once the connection is closing.
    pub fn admit(
        self: &Arc<Self>,
        queue: usize,
        head: u16,
        bytes: u64,
        generation: u64,
    ) -> Result<Ticket, Refusal> {
        {
            let q = self.queues.get(queue).ok_or(Refusal::NoQueue(queue))?;
            let mut q = lock(q);
            if q.generation != generation {
                return Err(Refusal::Retired);
            }
            let (word, bit) = q.slot(head).ok_or(Refusal::HeadOutside(head))?;
            if q.heads[word] & bit != 0 {
                return Err(Refusal::HeadInFlight(head));
            }
            q.heads[word] |= bit;
        }
        let mut ticket = Ticket {
            owner: self.clone(),
            queue,
            head,
            generation,
            bytes: 0,
            admitted: false,
            holds_head: Cell::new(true),
        };
        let mut state = lock(&self.state);
        // Another request holds part of the budget: wait for it. Alone, a
        // request is admitted whatever its size.
        state = self
            .changed
            .wait_while(state, |s| {
                let stopping = s
                    .queue_stopping
                    .get(queue)
                    .is_some_and(|stopping| *stopping);
                !s.closing
                    && !stopping
                    && s.bytes > 0
                    && s.bytes.saturating_add(bytes) > self.budget
            })
            .unwrap_or_else(|p| p.into_inner());
        if state.closing {
            drop(state);
            return Err(Refusal::Closing); // dropping `ticket` frees the head
        }
        // A budget wait may have outlasted the queue; checked under the
        // state lock, which `retire_queue` does not take, so the queue
        // may still be retired right after: its completion then writes
        // nothing, as for any request retired in flight.
        if self.generation(queue) != generation {
            drop(state);
            return Err(Refusal::Retired);
        }
        state.running += 1;
        // In range: `queue` was found among the queues above.
        if let Some(n) = state.queue_running.get_mut(queue) {
            *n += 1;
        }
        state.bytes = state.bytes.saturating_add(bytes);
        ticket.admitted = true;
        ticket.bytes = bytes;
        Ok(ticket)
    }

    /// A chain is about to be taken off `queue`: call it under the vring's
    /// lock, before the pop, so that the generation is that of the ring
    /// the chain comes from (GET_VRING_BASE clears the ring's ready flag
    /// under that lock before it retires the queue; RESET_DEVICE, not
    /// offered, does not). Hold the `Taking` until the chain's admission
    /// returned.
    pub fn begin_take(&self, queue: usize) -> Taking<'_> {
        let generation = self.queues.get(queue).map_or(0, |q| {
            let mut q = lock(q);
            q.taking += 1;
            q.generation
        });
        Taking {
            owner: self,
            queue,
            generation,
        }
    }

    /// The first step of stopping `queue` once it is no longer ready (no
    /// chain is taken off it any more): waits up to `limit` for the
    /// chains being taken to be admitted or refused, whether they were;
    /// one waiting for the budget is admitted at once. One admitted is
    /// then counted among the queue's running requests
    /// (`wait_queue_idle`). `retire_queue` ends the stop.
    pub fn wait_queue_taken(&self, queue: usize, limit: Duration) -> bool {
        let (Some(q), Some(done)) = (self.queues.get(queue), self.writes_done.get(queue)) else {
            return true;
        };
        if let Some(stopping) = lock(&self.state).queue_stopping.get_mut(queue) {
            *stopping = true;
        }
        self.changed.notify_all();
        let (q, _) = done
            .wait_timeout_while(lock(q), limit, |q| q.taking > 0)
            .unwrap_or_else(|p| p.into_inner());
        q.taking == 0
    }

    /// The queue was stopped (GET_VRING_BASE) or reset: requests still in
    /// flight on it write nothing when they complete, and its heads are
    /// free for the ring the frontend sets up next. Returns once the
    /// completions already writing into its ring have finished.
    pub fn retire_queue(&self, queue: usize) {
        let (Some(q), Some(done)) = (self.queues.get(queue), self.writes_done.get(queue)) else {
            return;
        };
        let mut q = lock(q);
        q.generation += 1;
        q.heads.fill(0);
        drop(
            done.wait_while(q, |q| q.writing > 0)
                .unwrap_or_else(|p| p.into_inner()),
        );
        if let Some(stopping) = lock(&self.state).queue_stopping.get_mut(queue) {
            *stopping = false;
        }
    }

    /// The connection ended: no request is admitted any more (a worker
    /// waiting for the budget gives up), and none in flight writes into
    /// guest memory.
    pub fn close(&self) {
        lock(&self.state).closing = true;
        self.changed.notify_all();
        for queue in 0..self.queues.len() {
            self.retire_queue(queue);
        }
    }

    /// Waits up to `limit` for every admitted request to finish; whether
    /// they all did.
    pub fn wait_idle(&self, limit: Duration) -> bool {
        let state = lock(&self.state);
        let (state, _) = self
            .changed
            .wait_timeout_while(state, limit, |s| s.running > 0)
            .unwrap_or_else(|p| p.into_inner());
        state.running == 0
    }

    /// Waits up to `limit` for the requests admitted on `queue` to
    /// finish, whatever the other queues have running; whether they all
    /// did (a queue that does not exist has none).
    pub fn wait_queue_idle(&self, queue: usize, limit: Duration) -> bool {
        let busy = |s: &State| s.queue_running.get(queue).is_some_and(|n| *n > 0);
        let state = lock(&self.state);
        let (state, _) = self
            .changed
            .wait_timeout_while(state, limit, |s| busy(s))
            .unwrap_or_else(|p| p.into_inner());
        !busy(&state)
    }

    #[cfg(test)]
    fn admit0(self: &Arc<Self>, queue: usize, head: u16, bytes: u64) -> Result<Ticket, Refusal> {
        self.admit(queue, head, bytes, self.generation(queue))
    }

    #[cfg(test)]
    fn bytes(&self) -> u64 {
        lock(&self.state).bytes
    }
}

/// One admitted request. Completing it through [`Ticket::complete`]
/// writes into guest memory only while its queue is the one it came
/// from; dropping it, on any path, frees its head and its bytes.
pub struct Ticket {
    owner: Arc<InFlight>,
    queue: usize,
    head: u16,
    generation: u64,
    bytes: u64,
    /// Counted in `State::running`, its queue's `State::queue_running`
    /// and `State::bytes`.
    admitted: bool,
    /// Its bit in the queue's heads is still set by it.
    holds_head: Cell<bool>,
}

impl Ticket {
    /// Runs `write` (data, status byte, used ring) if the request's queue
    /// has not been retired since it was admitted; whether `write` ran.
    /// `write` runs without the queue's lock (a read's decryption into
    /// guest memory is part of it, and the other completions of the
    /// queue need not wait for it), counted as writing: a retirement that
    /// comes after the check waits for it, so nothing is written into a
    /// retired ring once `retire_queue` has returned. `write` is handed
    /// the release of the request's head, to call just before the used
    /// entry is written, under the vring's lock: the guest may post the
    /// head again as soon as it sees that entry, and not before (a guest
    /// that does is refused, as while the request ran). If `write` does
    /// not call it, the head is freed after.
    pub fn complete(self, write: impl FnOnce(&dyn Fn())) -> bool {
        let Some(q) = self.owner.queues.get(self.queue) else {
            return false;
        };
        {
            let mut q = lock(q);
            if q.generation != self.generation {
                // The retirement freed every head of the queue.
                self.holds_head.set(false);
                return false;
            }
            q.writing += 1;
        }
        let _writing = Writing {
            owner: &self.owner,
            queue: self.queue,
        };
        write(&|| self.release_head());
        true
    }

    /// What lets the request's data be read from guest memory later, on
    /// whichever thread runs it, only while its queue is current.
    pub fn gate(&self) -> QueueGate {
        QueueGate {
            owner: self.owner.clone(),
            queue: self.queue,
            generation: self.generation,
        }
    }

    /// Frees the request's head, once, unless its queue was retired
    /// since (which freed every head, and may have a new ring's).
    fn release_head(&self) {
        if !self.holds_head.replace(false) {
            return;
        }
        if let Some(q) = self.owner.queues.get(self.queue) {
            let mut q = lock(q);
            if q.generation == self.generation {
                if let Some((word, bit)) = q.slot(self.head) {
                    q.heads[word] &= !bit;
                }
            }
        }
    }
}

/// Reads of a request's guest buffers after it was submitted (a write
/// encrypted straight from guest memory): only while the request's
/// queue has not been retired, and counted as writing meanwhile, so a
/// retirement waits for a read under way. Once the frontend has stopped
/// the queue or the connection ended, the guest's memory may hold
/// something else entirely, and none of it may reach the backing.
pub struct QueueGate {
    owner: Arc<InFlight>,
    queue: usize,
    generation: u64,
}

impl QueueGate {
    /// Runs `read` if the queue is still the request's; whether it ran.
    pub fn read(&self, read: impl FnOnce()) -> bool {
        self.owner.while_current(self.queue, self.generation, read)
    }
}

impl InFlight {
    /// Runs `f` if `queue` is still at `generation`, counted as writing
    /// (a retirement waits for it); whether it ran.
    fn while_current(&self, queue: usize, generation: u64, f: impl FnOnce()) -> bool {
        let Some(q) = self.queues.get(queue) else {
            return false;
        };
        {
            let mut q = lock(q);
            if q.generation != generation {
                return false;
            }
            q.writing += 1;
        }
        let _counted = Writing { owner: self, queue };
        f();
        true
    }
}

impl InFlight {
    /// One less of what `counter` counts on `queue` (a write, or a chain
    /// being taken); the last one tells those waiting on `writes_done`.
    fn uncount(&self, queue: usize, counter: impl FnOnce(&mut Queue) -> &mut usize) {
        if let (Some(q), Some(done)) = (self.queues.get(queue), self.writes_done.get(queue)) {
            let mut q = lock(q);
            let count = counter(&mut q);
            *count -= 1;
            if *count == 0 {
                done.notify_all();
            }
        }
    }
}

/// A chain being taken off a queue, from before its pop until its
/// admission returned (`InFlight::begin_take`): uncounted when dropped.
pub struct Taking<'a> {
    owner: &'a InFlight,
    queue: usize,
    generation: u64,
}

impl Taking<'_> {
    /// The queue's generation when the chain was taken, for `admit`.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl Drop for Taking<'_> {
    fn drop(&mut self) {
        self.owner.uncount(self.queue, |q| &mut q.taking);
    }
}

/// A completion writing into its queue's ring, or a read of a request's
/// guest buffers: uncounted when dropped, a panic included.
struct Writing<'a> {
    owner: &'a InFlight,
    queue: usize,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.owner.uncount(self.queue, |q| &mut q.writing);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Refused, completed without releasing it, or dropped on a path
        // that never completed it.
        self.release_head();
        if !self.admitted {
            return;
        }
        let mut state = lock(&self.owner.state);
        state.running -= 1;
        if let Some(n) = state.queue_running.get_mut(self.queue) {
            *n -= 1;
        }
        state.bytes -= self.bytes;
        drop(state);
        self.owner.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_in_flight_is_refused_until_it_completes() {
        let inflight = InFlight::new(2, 256, BUDGET);
        let first = inflight.admit0(0, 7, 4096).unwrap();
        assert_eq!(
            inflight.admit0(0, 7, 4096).err(),
            Some(Refusal::HeadInFlight(7))
        );
        // The same head on another queue is another request.
        let other = inflight.admit0(1, 7, 4096).unwrap();
        assert_eq!(
            inflight.admit0(0, 256, 0).err(),
            Some(Refusal::HeadOutside(256))
        );
        assert_eq!(inflight.admit0(2, 0, 0).err(), Some(Refusal::NoQueue(2)));
        assert!(first.complete(|_| {}));
        let again = inflight.admit0(0, 7, 4096).unwrap();
        drop((again, other));
        assert!(inflight.wait_idle(Duration::ZERO));
        assert_eq!(inflight.bytes(), 0);
    }

    #[test]
    fn a_refused_or_dropped_ticket_frees_its_head() {
        let inflight = InFlight::new(1, 256, BUDGET);
        drop(inflight.admit0(0, 3, 512).unwrap());
        let ticket = inflight.admit0(0, 3, 512).unwrap();
        // The refusal of a duplicate leaves the original's head taken.
        assert!(inflight.admit0(0, 3, 512).is_err());
        assert!(inflight.admit0(0, 3, 512).is_err());
        drop(ticket);
        assert!(inflight.admit0(0, 3, 512).is_ok());
    }

    #[test]
    fn a_spent_budget_makes_the_next_request_wait() {
        let inflight = InFlight::new(1, 256, 1 << 20);
        let big = inflight.admit0(0, 0, 1 << 20).unwrap();
        let waiter = {
            let inflight = inflight.clone();
            std::thread::spawn(move || inflight.admit0(0, 1, 4096).map(drop))
        };
        // The waiter cannot be admitted while `big` holds the budget.
        assert!(!inflight.wait_idle(Duration::from_millis(50)));
        assert_eq!(inflight.bytes(), 1 << 20);
        assert!(big.complete(|_| {}));
        assert_eq!(waiter.join().unwrap(), Ok(()));
        assert_eq!(inflight.bytes(), 0);
        // Alone, a request larger than the budget still runs.
        let huge = inflight.admit0(0, 2, 4 << 20).unwrap();
        drop(huge);
    }

    #[test]
    fn closing_wakes_a_waiting_worker_and_refuses() {
        let inflight = InFlight::new(1, 256, 1 << 20);
        let big = inflight.admit0(0, 0, 1 << 20).unwrap();
        let waiter = {
            let inflight = inflight.clone();
            std::thread::spawn(move || inflight.admit0(0, 1, 4096).map(drop))
        };
        inflight.close();
        assert_eq!(waiter.join().unwrap(), Err(Refusal::Closing));
        // A request admitted before the close completes without writing.
        assert!(!big.complete(|_| panic!("wrote after the close")));
        assert!(inflight.wait_idle(Duration::ZERO));
    }

    #[test]
    fn a_chain_taken_before_its_queue_was_stopped_is_not_admitted() {
        let inflight = InFlight::new(1, 256, BUDGET);
        let taken = inflight.begin_take(0);
        inflight.retire_queue(0);
        assert_eq!(
            inflight.admit(0, 1, 512, taken.generation()).err(),
            Some(Refusal::Retired)
        );
        drop(taken);
        // ...and its head is not left taken.
        assert!(inflight.admit0(0, 1, 512).is_ok());
    }

    /// A stop waits for a chain taken off its queue (not another
    /// queue's) until the chain's admission; admitted in the generation
    /// it was taken in, the chain is then waited for as running, not
    /// retired unanswered.
    #[test]
    fn a_stop_waits_for_a_chain_being_taken_until_it_is_admitted() {
        let inflight = InFlight::new(2, 256, BUDGET);
        let other = inflight.begin_take(1);
        assert!(inflight.wait_queue_taken(0, Duration::ZERO));
        let taking = inflight.begin_take(0);
        assert!(!inflight.wait_queue_taken(0, Duration::from_millis(20)));
        let stopper = {
            let inflight = inflight.clone();
            std::thread::spawn(move || inflight.wait_queue_taken(0, Duration::from_secs(30)))
        };
        let ticket = inflight.admit(0, 3, 4096, taking.generation()).unwrap();
        drop(taking);
        assert!(within(Duration::from_secs(30), move || stopper
            .join()
            .unwrap()));
        assert!(!inflight.wait_queue_idle(0, Duration::ZERO));
        drop(ticket);
        assert!(inflight.wait_queue_idle(0, Duration::ZERO));
        assert!(!inflight.wait_queue_taken(1, Duration::ZERO));
        drop(other);
        assert!(inflight.wait_queue_taken(1, Duration::ZERO));
    }

    /// A chain waiting for the budget that another queue's requests hold
    /// is admitted once its own queue's stop begins: the stop does not
    /// wait on the other queue's I/O.
    #[test]
    fn a_stop_admits_its_queues_chain_waiting_for_the_budget() {
        let inflight = InFlight::new(2, 256, BUDGET);
        let hog = inflight.admit0(1, 0, BUDGET).unwrap();
        let waiter = {
            let inflight = inflight.clone();
            std::thread::spawn(move || {
                let taking = inflight.begin_take(0);
                inflight.admit(0, 5, 4096, taking.generation()).is_ok()
            })
        };
        let stopping = inflight.clone();
        assert!(within(Duration::from_secs(30), move || {
            stopping.wait_queue_taken(0, Duration::from_secs(20))
        }));
        assert!(within(Duration::from_secs(30), move || waiter
            .join()
            .unwrap()));
        drop(hog);
    }

    #[test]
    fn stopping_a_queue_waits_for_its_own_requests_only() {
        let inflight = InFlight::new(2, 256, BUDGET);
        let other = inflight.admit0(1, 0, 4096).unwrap();
        // A request on queue 1 does not hold up queue 0's stop...
        assert!(inflight.wait_queue_idle(0, Duration::ZERO));
        assert!(!inflight.wait_queue_idle(1, Duration::ZERO));
        // ...but one on queue 0 does, until it completes.
        let own = inflight.admit0(0, 0, 4096).unwrap();
        assert!(!inflight.wait_queue_idle(0, Duration::from_millis(20)));
        let stop = {
            let inflight = inflight.clone();
            std::thread::spawn(move || inflight.wait_queue_idle(0, Duration::from_secs(30)))
        };
        // Most likely waiting by now: the completion must wake it.
        std::thread::sleep(Duration::from_millis(20));
        assert!(own.complete(|_| {}));
        assert!(stop.join().unwrap());
        // A dropped ticket counts as finished too; the connection's wait
        // still sees queue 1's request.
        assert!(!inflight.wait_idle(Duration::ZERO));
        drop(other);
        assert!(inflight.wait_queue_idle(1, Duration::ZERO));
        assert!(inflight.wait_idle(Duration::ZERO));
        assert!(inflight.wait_queue_idle(7, Duration::ZERO));
    }

    #[test]
    fn a_retired_queue_s_late_completion_writes_nothing() {
        let inflight = InFlight::new(2, 256, BUDGET);
        let late = inflight.admit0(0, 5, 4096).unwrap();
        let kept = inflight.admit0(1, 5, 4096).unwrap();
        inflight.retire_queue(0);
        // The new ring may reuse the head at once.
        let fresh = inflight.admit0(0, 5, 4096).unwrap();
        assert!(!late.complete(|_| panic!("a late completion wrote")));
        // ...and the late one did not free the fresh one's head.
        assert_eq!(
            inflight.admit0(0, 5, 0).err(),
            Some(Refusal::HeadInFlight(5))
        );
        let mut wrote = false;
        assert!(fresh.complete(|_| wrote = true));
        assert!(wrote);
        assert!(kept.complete(|_| {}));
        assert!(inflight.wait_idle(Duration::ZERO));
    }

    /// Runs `f` on a thread of its own: a regression that blocks fails
    /// the test after `limit` instead of hanging it.
    fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        });
        match result.recv_timeout(limit) {
            Ok(Ok(value)) => value,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => panic!("still blocked after {limit:?}"),
        }
    }

    #[test]
    fn completions_of_one_queue_write_at_once_and_retiring_waits_for_them() {
        let inflight = InFlight::new(1, 256, BUDGET);
        let first = inflight.admit0(0, 1, 4096).unwrap();
        let second = inflight.admit0(0, 2, 4096).unwrap();
        let (entered, inside) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let writer = std::thread::spawn(move || {
            first.complete(|_| {
                entered.send(()).unwrap();
                released.recv().unwrap();
            })
        });
        inside.recv_timeout(Duration::from_secs(30)).unwrap();
        // The first is still writing: the second completes meanwhile.
        assert!(within(Duration::from_secs(30), move || {
            let mut wrote = false;
            second.complete(|_| wrote = true) && wrote
        }));
        // A stop now must wait for the first's writes to end.
        let writes_ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (retired, retiring) = std::sync::mpsc::channel();
        let stopper = {
            let inflight = inflight.clone();
            let writes_ended = writes_ended.clone();
            std::thread::spawn(move || {
                inflight.retire_queue(0);
                let _ = retired.send(writes_ended.load(std::sync::atomic::Ordering::SeqCst));
            })
        };
        // Most likely waiting by now; if not, the flag below still tells.
        assert!(retiring.recv_timeout(Duration::from_millis(100)).is_err());
        writes_ended.store(true, std::sync::atomic::Ordering::SeqCst);
        release.send(()).unwrap();
        assert!(writer.join().unwrap());
        assert!(
            retiring.recv_timeout(Duration::from_secs(30)).unwrap(),
            "retire_queue returned while a completion was writing"
        );
        stopper.join().unwrap();
        // A write that panics is no longer counted either.
        let third = inflight.admit0(0, 3, 4096).unwrap();
        let panicked = std::thread::spawn(move || third.complete(|_| panic!("a failed write")));
        assert!(panicked.join().is_err());
        let retiring = inflight.clone();
        within(Duration::from_secs(30), move || retiring.retire_queue(0));
        assert!(inflight.wait_idle(Duration::ZERO));
    }

    /// A request's guest buffers are read only while its queue is
    /// current, and a retirement waits for a read under way.
    #[test]
    fn a_gate_reads_only_while_the_queue_is_current_and_retiring_waits() {
        let inflight = InFlight::new(1, 256, BUDGET);
        let ticket = inflight.admit0(0, 4, 4096).unwrap();
        let gate = ticket.gate();
        let mut read = false;
        assert!(gate.read(|| read = true));
        assert!(read);
        let (entered, inside) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            gate.read(|| {
                entered.send(()).unwrap();
                released.recv().unwrap();
            })
        });
        inside.recv_timeout(Duration::from_secs(30)).unwrap();
        let read_ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (retired, retiring) = std::sync::mpsc::channel();
        let stopper = {
            let inflight = inflight.clone();
            let read_ended = read_ended.clone();
            std::thread::spawn(move || {
                inflight.retire_queue(0);
                let _ = retired.send(read_ended.load(std::sync::atomic::Ordering::SeqCst));
            })
        };
        assert!(retiring.recv_timeout(Duration::from_millis(100)).is_err());
        read_ended.store(true, std::sync::atomic::Ordering::SeqCst);
        release.send(()).unwrap();
        assert!(reader.join().unwrap());
        assert!(
            retiring.recv_timeout(Duration::from_secs(30)).unwrap(),
            "retire_queue returned while a read was under way"
        );
        stopper.join().unwrap();
        // Retired: the guest's memory is not read any more.
        assert!(!ticket
            .gate()
            .read(|| panic!("read after the queue was retired")));
        drop(ticket);
        assert!(inflight.wait_idle(Duration::ZERO));
    }

    #[test]
    fn a_head_stays_taken_until_its_completion_releases_it() {
        let inflight = InFlight::new(1, 256, BUDGET);
        let ticket = inflight.admit0(0, 9, 4096).unwrap();
        let guest = inflight.clone();
        assert!(within(Duration::from_secs(30), move || {
            ticket.complete(|release| {
                // Its data and status are being written: the guest
                // posting the head again now is refused.
                assert_eq!(guest.admit0(0, 9, 0).err(), Some(Refusal::HeadInFlight(9)));
                release();
                // The used entry comes next: from here the guest may.
                drop(guest.admit0(0, 9, 0).unwrap());
                release();
            })
        }));
        assert!(inflight.wait_idle(Duration::ZERO));
    }
}
