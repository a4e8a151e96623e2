//! hostcryptd: encryption at host for Linux block storage.
//!
//! The library behind the `hostcryptd` daemon and the `hostcrypt` CLI:
//! the XTS sector cipher (`crypto`), key-encryption-key providers (`kek`),
//! the on-disk volume format and encrypted data path (`volume`), backing
//! I/O (`io`), the NBD server (`nbd`), the control socket (`control`) and
//! the configuration (`config`), and the process's own protection of key
//! material (`hardening`).

pub mod config;
pub mod control;
pub mod crypto;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod hardening;
pub mod io;
pub mod kek;
pub mod nbd;
pub mod report;
pub mod service;
pub mod volume;
pub mod wire;
