//! The NBD frontend: the fixed-newstyle handshake (`handshake.rs`), the
//! transmission phase (`transmission.rs`; on an io_uring ring for
//! plaintext connections, `ring_reader.rs`), replies and their routes
//! (`replies.rs`), listeners (`server.rs`, which also implements the
//! frontend contract), one connection's life from greeting to goodbye
//! (`connection.rs`), connection limits and refusal counters (`gate.rs`)
//! and the byte budget of replies not yet sent (`budget.rs`). Shared with other frontends: exports, access rules, peer
//! identity and metrics (`export/`), TLS credentials (`frontend/tls.rs`).
//! The wire format is `wire/nbd.rs`; the client side, for remote
//! backings, is `io/remote/`.
//!
//! Hand-written rather than built on the `nbd` crate: that crate speaks only
//! the old EXPORT_NAME handshake and serves one request at a time, while we
//! need OPT_GO/OPT_INFO, block-size negotiation, many requests in flight and
//! out-of-order replies. Encryption happens below, in `volume/`.

pub mod budget;
mod connection;
pub mod gate;
pub(crate) mod handshake;
mod replies;
mod ring_reader;
mod server;
pub(crate) mod transmission;

pub use connection::Server;
pub(crate) use replies::ReplyRoute;
pub use server::{run, serve_kernel, Listener, NbdFrontend};
