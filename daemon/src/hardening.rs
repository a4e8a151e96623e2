//! Process-wide protection of key material, applied first thing in both
//! binaries: no core dump may hold a KEK, a DEK or a key schedule. A
//! process that is not dumpable (`PR_SET_DUMPABLE 0`) gets no core file
//! whatever `ulimit -c` or `core_pattern` say, and its memory cannot be
//! read through ptrace or /proc by non-root users; `RLIMIT_CORE 0` is the
//! second lock, inherited by anything it runs. The unit sets
//! `LimitCORE=0` as well. What lives elsewhere: locking and zeroizing the
//! keys themselves (`crypto/dek.rs`).

use std::io;

/// Makes the process non-dumpable and its core size limit zero.
pub fn keep_keys_out_of_core_dumps() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_DUMPABLE takes plain integers and touches
    // no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one rlimit from a live local.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
