//! Per-volume access control: a volume's `allow` list, written with the
//! entry syntax of nbdkit's ip filter so it reads familiar:
//! `uid:107`, `gid:kvm`, `dn:CN=vm-17,O=Example`, `10.0.0.0/8`, `::1`,
//! `anyipv4`, `anyipv6`, `all`.
//!
//! `uid:`/`gid:` match Unix-socket peers (SO_PEERCRED and supplementary
//! groups), addresses match TCP peers, `dn:` matches the subject of a client
//! certificate TLS verified. An absent list admits Unix-socket peers and
//! TCP peers with a verified client certificate, never a bare TCP address
//! (loopback is not a trust boundary); a present one admits a peer
//! matching any entry, so `allow = ["all"]` opens a volume to everyone. Names (`gid:kvm`) are
//! resolved when the list is built, so a reload picks up /etc changes.

use std::net::IpAddr;

use crate::export::peer::{Peer, Transport};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    All,
    AnyIpv4,
    AnyIpv6,
    Uid(u32),
    Gid(u32),
    Dn(String),
    Net { addr: IpAddr, prefix: u8 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("{0:?}: no user of that name in /etc/passwd")]
    UnknownUser(String),
    #[error("{0:?}: no group of that name in /etc/group")]
    UnknownGroup(String),
    #[error("{0:?}: prefix must be 0-32 for IPv4, 0-128 for IPv6")]
    BadPrefix(String),
    #[error("{0:?}: a DN needs at least one TYPE=value part, e.g. dn:CN=vm-17,O=Example")]
    BadDn(String),
    #[error("{0:?} is not an allow entry (uid:N, gid:NAME, dn:DN, an address, ADDR/PREFIX, anyipv4, anyipv6, all)")]
    Unknown(String),
}

impl Rule {
    pub fn parse(entry: &str) -> Result<Rule, RuleError> {
        let entry = entry.trim();
        if let Some(user) = entry.strip_prefix("uid:") {
            return Ok(Rule::Uid(
                resolve_id(user, "/etc/passwd")
                    .ok_or_else(|| RuleError::UnknownUser(user.to_owned()))?,
            ));
        }
        if let Some(group) = entry.strip_prefix("gid:") {
            return Ok(Rule::Gid(
                resolve_id(group, "/etc/group")
                    .ok_or_else(|| RuleError::UnknownGroup(group.to_owned()))?,
            ));
        }
        if let Some(dn) = entry.strip_prefix("dn:") {
            return normalize_dn(dn)
                .map(Rule::Dn)
                .ok_or_else(|| RuleError::BadDn(entry.to_owned()));
        }
        match entry {
            "all" | "any" => return Ok(Rule::All),
            "anyipv4" | "ipv4" => return Ok(Rule::AnyIpv4),
            "anyipv6" | "ipv6" => return Ok(Rule::AnyIpv6),
            _ => {}
        }
        let (addr, prefix) = match entry.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (entry, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| RuleError::Unknown(entry.to_owned()))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| RuleError::BadPrefix(entry.to_owned()))?,
        };
        Ok(Rule::Net { addr, prefix })
    }

    fn matches(&self, peer: &Peer) -> bool {
        match (self, &peer.transport) {
            (Rule::All, _) => true,
            (Rule::Dn(dn), _) => peer.dn.as_deref() == Some(dn.as_str()),
            (Rule::Uid(want), Transport::Unix { uid, .. }) => uid == want,
            (Rule::Gid(want), Transport::Unix { gid, groups, .. }) => {
                gid == want || groups.contains(want)
            }
            (Rule::AnyIpv4, Transport::Tcp(a)) => canonical(a.ip()).is_ipv4(),
            (Rule::AnyIpv6, Transport::Tcp(a)) => canonical(a.ip()).is_ipv6(),
            (Rule::Net { addr, prefix }, Transport::Tcp(a)) => {
                in_prefix(canonical(a.ip()), *addr, *prefix)
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::All => f.write_str("all"),
            Rule::AnyIpv4 => f.write_str("anyipv4"),
            Rule::AnyIpv6 => f.write_str("anyipv6"),
            Rule::Uid(u) => write!(f, "uid:{u}"),
            Rule::Gid(g) => write!(f, "gid:{g}"),
            Rule::Dn(d) => write!(f, "dn:{d}"),
            Rule::Net { addr, prefix } => write!(f, "{addr}/{prefix}"),
        }
    }
}

/// A volume's allow list; `None` admits everyone who can connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Option<Vec<Rule>>);

impl AllowList {
    pub fn anyone() -> Self {
        AllowList(None)
    }

    /// An empty list: admits no one.
    pub fn nobody() -> Self {
        AllowList(Some(Vec::new()))
    }

    pub fn parse<S: AsRef<str>>(entries: Option<&[S]>) -> Result<Self, RuleError> {
        match entries {
            None => Ok(AllowList(None)),
            Some(list) => Ok(AllowList(Some(
                list.iter()
                    .map(|e| Rule::parse(e.as_ref()))
                    .collect::<Result<_, _>>()?,
            ))),
        }
    }

    /// Whether `peer` may open the volume. Without a list, only peers
    /// with an identity the daemon has checked get in: Unix-socket peers
    /// (the socket's permissions are the boundary) and TCP peers whose
    /// client certificate TLS verified. A bare TCP address, loopback
    /// included, is not a trust boundary (every local user can reach
    /// 127.0.0.1): such peers need an entry that names them.
    /// A device the daemon attached itself (the kernel's NBD client) is
    /// let in whatever the list says: the operator asked for it on the
    /// control socket.
    pub fn permits(&self, peer: &Peer) -> bool {
        if peer.transport == Transport::Kernel {
            return true;
        }
        match &self.0 {
            None => matches!(peer.transport, Transport::Unix { .. }) || peer.dn.is_some(),
            Some(rules) => rules.iter().any(|r| r.matches(peer)),
        }
    }

    /// Whether this is the absent list (see `permits`).
    pub fn is_default(&self) -> bool {
        self.0.is_none()
    }

    /// The entries as configured (resolved), for status; `None` = anyone.
    pub fn describe(&self) -> Option<Vec<String>> {
        self.0
            .as_ref()
            .map(|rules| rules.iter().map(|r| r.to_string()).collect())
    }
}

/// An IPv4 peer on a dual-stack socket arrives as `::ffff:a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn in_prefix(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// A numeric id, or a name looked up in a passwd/group-format file
/// (`/etc/passwd`, `/etc/group`).
pub fn resolve_id(text: &str, file: &str) -> Option<u32> {
    if let Ok(id) = text.parse() {
        return Some(id);
    }
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(name, _)| *name == text)
        .and_then(|(_, id)| id.parse().ok())
}

/// A DN in the one form both sides compare: RDNs separated by `,` without
/// surrounding spaces, attribute types upper-cased, values as written
/// (escapes kept). `None` when a part has no `TYPE=`.
pub fn normalize_dn(dn: &str) -> Option<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut escaped = false;
    for c in dn.chars() {
        if escaped {
            current.push(c);
            escaped = false;
        } else if c == '\\' {
            current.push(c);
            escaped = true;
        } else if c == ',' {
            parts.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    parts.push(current);
    let normalized: Option<Vec<String>> = parts
        .iter()
        .map(|p| {
            let (kind, value) = p.split_once('=')?;
            let kind = kind.trim();
            if kind.is_empty() {
                return None;
            }
            Some(format!("{}={}", kind.to_ascii_uppercase(), value.trim()))
        })
        .collect();
    normalized.map(|p| p.join(","))
}

#[cfg(test)]
mod tests;
