//! The NBD server: wire constants (`proto.rs`), the export set
//! (`exports.rs`), the fixed-newstyle handshake (`handshake.rs`), the
//! transmission phase (`transmission.rs`), listeners (`server.rs`) and
//! per-export request metrics (`metrics.rs`).
//!
//! Hand-written rather than built on the `nbd` crate: that crate speaks only
//! the old EXPORT_NAME handshake and serves one request at a time, while we
//! need OPT_GO/OPT_INFO, block-size negotiation, many requests in flight and
//! out-of-order replies. Encryption happens below, in `volume/`.

mod exports;
mod handshake;
pub mod metrics;
pub mod proto;
mod server;
mod transmission;

pub use exports::{Export, Exports};
pub use server::{run, Listener};
