//! Wire formats, as the protocol documents define them: constants and
//! fixed-size messages with their encoders and parsers, and nothing else.
//! No I/O and no imports from the rest of the crate, so the server
//! (`frontend/nbd/`) and the client for remote backings (`io/remote/`) share one
//! definition without depending on each other.

pub mod nbd;
