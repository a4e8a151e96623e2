//! Benchmarks live in `xts.rs` (micro, `cargo bench -p hostcrypt-benches`),
//! `compare` (side-by-side fio runs against qemu-nbd and nbdkit) and
//! `nbdcopy.sh`; this library target only gives the package a home.
