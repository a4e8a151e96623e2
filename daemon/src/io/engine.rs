//! Which engine runs backing I/O, started once by the daemon from
//! `io_engine = "auto" | "uring" | "threads"` in `[daemon]`:
//! `uring` (per-core rings, `uring.rs`) or `threads` (per-core worker
//! threads with pread/pwrite, `workers.rs`). `auto` tries io_uring and falls
//! back to threads, saying so once in the log, where io_uring is refused
//! (seccomp, `kernel.io_uring_disabled`, old kernels).

use std::sync::Arc;

use serde::Deserialize;

use super::uring::UringEngine;

/// `io_engine` in `[daemon]`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// io_uring, falling back to threads where the kernel or a seccomp
    /// filter refuses it.
    #[default]
    Auto,
    /// io_uring, and fail to start where it is refused.
    Uring,
    /// A thread pool doing blocking I/O.
    Threads,
}

pub enum Engine {
    Uring(Arc<UringEngine>),
    Threads,
}

impl Engine {
    /// The thread pool: what tools and tests that open a volume without a
    /// daemon use.
    pub fn threads() -> Arc<Engine> {
        Arc::new(Engine::Threads)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Engine::Uring(_) => "uring",
            Engine::Threads => "threads",
        }
    }

    /// How long a thread that serves requests polls for more before it
    /// sleeps (`ring_idle_poll`): the rings', which a frontend's own
    /// queue threads follow; zero on the thread pool, which never polls.
    pub fn idle_poll(&self) -> std::time::Duration {
        match self {
            Engine::Uring(rings) => rings.idle_poll(),
            Engine::Threads => std::time::Duration::ZERO,
        }
    }
}

/// Starts the engine `kind` asks for, its rings polling for up to
/// `idle_poll` before they sleep. The daemon starts one and hands it to
/// every volume it opens and every frontend it starts.
pub fn start(kind: EngineKind, idle_poll: std::time::Duration) -> std::io::Result<Arc<Engine>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let engine = match kind {
        EngineKind::Threads => Engine::Threads,
        EngineKind::Uring => Engine::Uring(Arc::new(UringEngine::start(threads, idle_poll)?)),
        EngineKind::Auto => match UringEngine::start(threads, idle_poll) {
            Ok(e) => Engine::Uring(Arc::new(e)),
            Err(e) => {
                tracing::warn!("io_uring is not available ({e}); using the thread-pool engine");
                Engine::Threads
            }
        },
    };
    if let Engine::Uring(rings) = &engine {
        if !rings.receives_sockets() {
            tracing::info!(
                "io_uring here cannot poll sockets (kernel before 5.7); \
                 connections stay on tokio tasks, not on the rings"
            );
        }
    }
    Ok(Arc::new(engine))
}
