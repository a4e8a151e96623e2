//! Benchmarks live in `xts.rs` (micro, `cargo bench -p hostcrypt-benches`),
//! `compare` (side-by-side fio runs against qemu-nbd and nbdkit; with
//! `--vhost`, `vhost-load/` runs, a libblkio load generator for
//! vhost-user-blk sockets) and `nbdcopy.sh`; this library target only
//! gives the package a home.
