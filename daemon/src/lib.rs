//! hostcryptd: encryption at host for Linux block storage.
//!
//! The library behind the `hostcryptd` daemon and the `hostcrypt` CLI:
//! the XTS sector cipher (`crypto`), key-encryption-key providers (`kek`),
//! the on-disk volume format and encrypted data path (`volume`), backing
//! I/O (`io`, with the client for remote backings), what every frontend
//! serves (`export`), the frontends (`frontend`, today the NBD server),
//! wire formats (`wire`), the volumes and keys of a running daemon
//! (`service`), the daemon's start and stop (`daemon`), the control
//! socket (`control`), the configuration (`config`), and the process's own
//! protection of key material (`hardening`). ARCHITECTURE.md is the map.

pub mod config;
pub mod control;
pub mod crypto;
pub mod daemon;
pub mod export;
pub mod frontend;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod hardening;
pub mod io;
pub mod kek;
pub mod report;
pub mod service;
pub mod volume;
pub mod wire;

/// Counts heap allocations in unit tests (key material must not reach the heap).
#[cfg(test)]
mod test_heap;
