//! Who is on the other end of an NBD connection: the TCP address, or the
//! Unix peer's credentials (SO_PEERCRED plus the supplementary groups from
//! /proc), and, once TLS is up, the verified client certificate's subject.
//! Access rules (`access.rs`) and connection limits (`limits.rs`) decide on
//! this; what they decide does not live here.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Unix {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
        /// Supplementary groups, read when the connection was accepted.
        groups: Vec<u32>,
    },
    Tcp(SocketAddr),
    /// The kernel's NBD client on a device the daemon attached
    /// (`frontend/attach/`), asked for on the control socket: the
    /// control socket's permissions decided, not the volume's list.
    Kernel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub transport: Transport,
    /// Subject of the client certificate that TLS verified (RFC 4514).
    pub dn: Option<String>,
}

/// What connection limits count a peer as: one IP address, or one uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    Uid(u32),
    Ip(IpAddr),
    Kernel,
}

impl Peer {
    /// The kernel's NBD client on a device the daemon attached.
    pub fn kernel() -> Self {
        Peer {
            transport: Transport::Kernel,
            dn: None,
        }
    }

    pub fn tcp(addr: SocketAddr) -> Self {
        Peer {
            transport: Transport::Tcp(addr),
            dn: None,
        }
    }

    /// Identifies a Unix-socket client by its credentials; `None` when the
    /// kernel will not say (then no uid/gid rule can match it).
    pub fn unix(stream: &tokio::net::UnixStream) -> Self {
        use std::os::unix::io::AsRawFd;
        let transport = match stream.peer_cred() {
            Ok(cred) => Transport::Unix {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
                groups: peer_groups(stream.as_raw_fd()),
            },
            // An impossible uid: matches no rule and counts as one peer.
            Err(_) => Transport::Unix {
                uid: u32::MAX,
                gid: u32::MAX,
                pid: None,
                groups: Vec::new(),
            },
        };
        Peer {
            transport,
            dn: None,
        }
    }

    /// What the per-peer limit counts: a uid, an IPv4 address, or an IPv6
    /// /64 (one host is routinely given a whole /64, so counting full
    /// addresses would let it hold any number of slots).
    pub fn key(&self) -> PeerKey {
        match &self.transport {
            Transport::Unix { uid, .. } => PeerKey::Uid(*uid),
            Transport::Kernel => PeerKey::Kernel,
            Transport::Tcp(addr) => PeerKey::Ip(match addr.ip() {
                IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => {
                        let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                        IpAddr::V6(std::net::Ipv6Addr::from(prefix))
                    }
                },
                v4 => v4,
            }),
        }
    }

    pub fn is_tcp(&self) -> bool {
        matches!(self.transport, Transport::Tcp(_))
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.transport {
            Transport::Unix { uid, gid, pid, .. } => {
                write!(f, "unix uid={uid} gid={gid}")?;
                if let Some(pid) = pid {
                    write!(f, " pid={pid}")?;
                }
            }
            Transport::Tcp(addr) => write!(f, "tcp {addr}")?,
            Transport::Kernel => write!(f, "kernel (attached)")?,
        }
        if let Some(dn) = &self.dn {
            write!(f, " dn={dn:?}")?;
        }
        Ok(())
    }
}

/// The supplementary groups of the process that connected to `socket`,
/// as the kernel recorded them at connect time (`SO_PEERGROUPS`, Linux
/// 4.13). Reading /proc/PID/status after accept instead races PID reuse:
/// the peer may exit and another process take its PID. Empty when the
/// kernel will not say.
pub fn peer_groups(socket: std::os::unix::io::RawFd) -> Vec<u32> {
    // NGROUPS_MAX is 65536; start small, grow once to what the kernel says.
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..2 {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`,
        // which has that many, and stores the size it needs in `len`.
        let rc = unsafe {
            libc::getsockopt(
                socket,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count.min(groups.len()));
            return groups;
        }
        let erange = std::io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE);
        if !erange || count > 65536 || count <= groups.len() {
            return Vec::new();
        }
        groups.resize(count, 0);
    }
    Vec::new()
}

/// Cuts a client-supplied string for a log line or an error message: at
/// most `max` bytes (on a character boundary), saying how long it was.
pub fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(32);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", &text[..end], text.len())
}

/// Refusal and failed-handshake log lines per second, over all
/// connections: a client that retries in a loop must not flood the log.
const REFUSAL_LINES_PER_SECOND: u64 = 20;

/// Whether a refusal may be logged now. When lines were dropped, the first
/// line allowed after them is preceded by one saying how many.
pub fn may_log_refusal() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SECOND: AtomicU64 = AtomicU64::new(0);
    static IN_SECOND: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if SECOND.swap(now, Ordering::Relaxed) != now {
        IN_SECOND.store(0, Ordering::Relaxed);
    }
    if IN_SECOND.fetch_add(1, Ordering::Relaxed) >= REFUSAL_LINES_PER_SECOND {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
    if suppressed > 0 {
        tracing::warn!(
            suppressed,
            "refusals not logged (more than {REFUSAL_LINES_PER_SECOND} a second)"
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorten_keeps_short_text_and_bounds_long_text() {
        assert_eq!(shorten("abc", 10), "abc");
        let long = "é".repeat(40_000);
        let short = shorten(&long, 4096);
        assert!(short.len() <= 4096, "{}", short.len());
        assert!(short.ends_with("(80000 bytes)"));
    }

    #[test]
    fn displays_identity() {
        let mut p = Peer::tcp("10.1.2.3:4000".parse().unwrap());
        p.dn = Some("CN=vm,O=Example".into());
        assert_eq!(p.to_string(), "tcp 10.1.2.3:4000 dn=\"CN=vm,O=Example\"");
        assert_eq!(p.key(), PeerKey::Ip("10.1.2.3".parse().unwrap()));
    }
}
