//! The worker threads that run backing I/O and encryption: one per core, so
//! requests queue instead of multiplying threads.
//!
//! tokio's `spawn_blocking` grows a thread per concurrent request (up to
//! 512); at queue depth 32 on two cores that meant dozens of threads
//! context-switching for every 4 KiB request. A fixed rayon pool keeps one
//! thread per core busy, and a large request can split its crypto across
//! the same threads.

use std::sync::OnceLock;

static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();

fn pool() -> &'static rayon::ThreadPool {
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("hostcrypt-io-{i}"))
            .build()
            // Building a pool fails only when the OS refuses to create
            // threads at start-up; nothing can be served then.
            .expect("cannot start I/O worker threads")
    })
}

/// Runs `job` on an I/O worker thread.
pub fn spawn(job: impl FnOnce() + Send + 'static) {
    pool().spawn(job);
}
