//! The control plane: a Unix socket on which `hostcrypt` asks the running
//! daemon for status and key operations. Message types (shared with the CLI)
//! are `protocol.rs`, the daemon side `server.rs`, the CLI side `client.rs`.
//! The Prometheus endpoint is `metrics.rs`.

pub mod client;
pub mod metrics;
pub mod protocol;
pub mod server;

pub use protocol::{ControlRequest, ControlResponse};
