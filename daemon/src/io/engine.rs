//! Which engine runs backing I/O, chosen once at start-up from
//! `io_engine = "auto" | "uring" | "threads"` in `[server]`:
//! `uring` (per-core rings, `uring.rs`) or `threads` (per-core worker
//! threads with pread/pwrite, `workers.rs`). `auto` tries io_uring and falls
//! back to threads, saying so once in the log, where io_uring is refused
//! (seccomp, `kernel.io_uring_disabled`, old kernels).

use std::sync::{Arc, OnceLock};

use serde::Deserialize;

use super::uring::UringEngine;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    #[default]
    Auto,
    Uring,
    Threads,
}

pub enum Engine {
    Uring(UringEngine),
    Threads,
}

impl Engine {
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Uring(_) => "uring",
            Engine::Threads => "threads",
        }
    }
}

static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();

/// Starts the engine `kind` asks for, its rings polling for up to
/// `idle_poll` before they sleep; later calls return the first choice.
pub fn init(kind: EngineKind, idle_poll: std::time::Duration) -> std::io::Result<Arc<Engine>> {
    if let Some(engine) = ENGINE.get() {
        return Ok(engine.clone());
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let engine = match kind {
        EngineKind::Threads => Engine::Threads,
        EngineKind::Uring => Engine::Uring(UringEngine::start(threads, idle_poll)?),
        EngineKind::Auto => match UringEngine::start(threads, idle_poll) {
            Ok(e) => Engine::Uring(e),
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
    Ok(ENGINE.get_or_init(|| Arc::new(engine)).clone())
}

/// The running engine (the thread pool if `init` was never called, as in
/// unit tests).
pub fn current() -> &'static Engine {
    ENGINE.get_or_init(|| Arc::new(Engine::Threads))
}
