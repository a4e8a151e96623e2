//! End-to-end tests: real NBD clients and a vhost-user-blk driver (nbdcopy, qemu-io, fio, nbdfuse with
//! a real ext4 filesystem, libnbd's Python bindings) against a real
//! `hostcryptd`, plus the break-glass oracle (OpenSSL decrypts the data
//! area given the DEK) and fault cases. One test binary, one module per area.

mod attach;
mod azure;
mod bad_input;
mod blockdev;
mod breakglass;
mod clients;
mod double;
mod durability;
mod faults;
mod filesystem;
mod headers;
mod in_process;
mod operate;
mod pkcs11;
mod prometheus;
mod protocol;
mod reencrypt;
mod remote;
mod security;
mod sparse;
mod systemd;
mod temp;
mod tls;
mod vault;
mod vhost_user;
