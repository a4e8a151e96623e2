//! The NBD server: wire constants (`proto.rs`), the export set
//! (`exports.rs`), the fixed-newstyle handshake (`handshake.rs`), the
//! transmission phase (`transmission.rs`; on an io_uring ring for
//! plaintext connections, `ring_reader.rs`), listeners (`server.rs`), one
//! connection's life from greeting to goodbye (`connection.rs`), TLS
//! credentials (`tls.rs`), who the peer is (`peer.rs`), per-volume allow
//! lists (`access.rs`), connection limits and refusal counters (`gate.rs`),
//! the byte budgets of replies not yet sent (`budget.rs`) and per-export
//! request metrics (`metrics.rs`); and the client side,
//! for remote backings (`client/`).
//!
//! Hand-written rather than built on the `nbd` crate: that crate speaks only
//! the old EXPORT_NAME handshake and serves one request at a time, while we
//! need OPT_GO/OPT_INFO, block-size negotiation, many requests in flight and
//! out-of-order replies. Encryption happens below, in `volume/`.

pub mod access;
pub mod budget;
pub mod client;
mod connection;
mod exports;
pub mod gate;
pub(crate) mod handshake;
pub mod metrics;
pub mod peer;
pub mod proto;
mod replies;
mod ring_reader;
mod server;
pub mod tls;
pub(crate) mod transmission;

pub use exports::{Export, Exports, Unavailable};
pub(crate) use replies::ReplyRoute;
pub use server::{run, Listener};
