//! The kernel NBD client's generic netlink family ("nbd", the interface
//! `nbd-client -N` drives): connect a device to sockets the daemon has
//! already negotiated, give a device whose sockets died fresh ones
//! (reconfigure), and disconnect it.
//!
//! Messages are built and parsed with rust-netlink's crates
//! (`netlink-packet-core`, `netlink-packet-generic`, `netlink-sys`); the
//! attribute numbers are the kernel's `include/uapi/linux/nbd-netlink.h`,
//! which no crate publishes. No I/O beyond the one netlink socket per call.
//!
//! Replies are untrusted like any input: an attribute that does not parse
//! is an error, never a panic.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::{
    DecodeError, Emitable, ErrorContext, NetlinkMessage, NetlinkPayload, Nla, NlasIterator,
    ParseableParametrized, NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

const FAMILY: &str = "nbd";
const VERSION: u8 = 1;

const CMD_CONNECT: u8 = 1;
const CMD_DISCONNECT: u8 = 2;
const CMD_RECONFIGURE: u8 = 3;

const ATTR_INDEX: u16 = 1;
const ATTR_SIZE_BYTES: u16 = 2;
const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const ATTR_TIMEOUT: u16 = 4;
const ATTR_SERVER_FLAGS: u16 = 5;
const ATTR_CLIENT_FLAGS: u16 = 6;
const ATTR_SOCKETS: u16 = 7;
const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const ATTR_BACKEND_IDENTIFIER: u16 = 10;
const SOCK_ITEM: u16 = 1;
const SOCK_FD: u16 = 1;

/// What failed, with the kernel's errno where it gave one.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("the kernel has no NBD client (modprobe nbd): {0}")]
    NoFamily(String),
    #[error("netlink: {0}")]
    Io(#[from] io::Error),
    #[error("the kernel refused {what}: {source}")]
    Refused {
        what: &'static str,
        source: io::Error,
    },
    #[error("a netlink reply did not parse: {0}")]
    Decode(String),
}

impl From<DecodeError> for NetlinkError {
    fn from(e: DecodeError) -> Self {
        NetlinkError::Decode(e.to_string())
    }
}

/// One attribute of the nbd family (only what this daemon sends or reads).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Attr {
    U32(u16, u32),
    U64(u16, u64),
    Str(u16, String),
    /// NBD_ATTR_SOCKETS: each fd as an NBD_SOCK_ITEM holding NBD_SOCK_FD.
    Sockets(Vec<u32>),
    Other(u16, Vec<u8>),
}

impl Nla for Attr {
    fn value_len(&self) -> usize {
        match self {
            Attr::U32(..) => 4,
            Attr::U64(..) => 8,
            Attr::Str(_, s) => s.len() + 1,
            // Per socket: the item header, and inside it the fd attribute.
            Attr::Sockets(fds) => fds.len() * (4 + 8),
            Attr::Other(_, v) => v.len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Attr::U32(k, _) | Attr::U64(k, _) | Attr::Str(k, _) | Attr::Other(k, _) => *k,
            Attr::Sockets(_) => ATTR_SOCKETS | NLA_F_NESTED,
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Attr::U32(_, v) => buffer[..4].copy_from_slice(&v.to_ne_bytes()),
            Attr::U64(_, v) => buffer[..8].copy_from_slice(&v.to_ne_bytes()),
            Attr::Str(_, s) => {
                buffer[..s.len()].copy_from_slice(s.as_bytes());
                buffer[s.len()] = 0;
            }
            Attr::Sockets(fds) => {
                for (i, fd) in fds.iter().enumerate() {
                    let at = i * 12;
                    // NBD_SOCK_ITEM (nested, 12 bytes) holding NBD_SOCK_FD (u32, 8 bytes).
                    buffer[at..at + 2].copy_from_slice(&12u16.to_ne_bytes());
                    buffer[at + 2..at + 4]
                        .copy_from_slice(&(SOCK_ITEM | NLA_F_NESTED).to_ne_bytes());
                    buffer[at + 4..at + 6].copy_from_slice(&8u16.to_ne_bytes());
                    buffer[at + 6..at + 8].copy_from_slice(&SOCK_FD.to_ne_bytes());
                    buffer[at + 8..at + 12].copy_from_slice(&fd.to_ne_bytes());
                }
            }
            Attr::Other(_, v) => buffer[..v.len()].copy_from_slice(v),
        }
    }
}

/// A message of the nbd family.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Nbd {
    cmd: u8,
    attrs: Vec<Attr>,
}

impl GenlFamily for Nbd {
    fn family_name() -> &'static str {
        FAMILY
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        VERSION
    }
}

impl Emitable for Nbd {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for Nbd {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let attrs = NlasIterator::new(buf)
            .map(|nla| {
                let nla = nla?;
                Ok(Attr::Other(
                    nla.kind() & !NLA_F_NESTED,
                    nla.value().to_vec(),
                ))
            })
            .collect::<Result<Vec<_>, DecodeError>>()
            .context("nbd reply attributes")?;
        Ok(Nbd {
            cmd: header.cmd,
            attrs,
        })
    }
}

/// What a connect asks of the kernel.
#[derive(Debug, Clone)]
pub struct Connect<'a> {
    pub size: u64,
    pub block_size: u64,
    /// The transmission flags the handshake agreed on.
    pub server_flags: u16,
    /// Seconds a request may take before the kernel gives up on its
    /// connection (0: the kernel's default).
    pub timeout: u64,
    /// Seconds the kernel holds I/O when every connection is dead,
    /// waiting for a reconfigure, before it fails it.
    pub dead_conn_timeout: u64,
    /// Shown in /sys/block/nbdN/backend; a reconfigure must name it again.
    pub backend: &'a str,
}

/// An open netlink socket with the nbd family resolved.
pub struct NbdNetlink {
    socket: Socket,
    family: u16,
    sequence: u32,
}

impl NbdNetlink {
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_GENERIC)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let mut link = NbdNetlink {
            socket,
            family: 0,
            sequence: 0,
        };
        link.family = link.resolve()?;
        Ok(link)
    }

    fn resolve(&mut self) -> Result<u16, NetlinkError> {
        let mut message = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(FAMILY.to_owned())],
        });
        message.finalize();
        let replies = self.exchange(message, "the nbd family")?;
        for reply in replies {
            let reply: GenlMessage<GenlCtrl> = reply;
            if let Some(id) = reply.payload.nlas.iter().find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            }) {
                return Ok(id);
            }
        }
        Err(NetlinkError::NoFamily("no family id in the reply".into()))
    }

    /// Sends `message` with an ACK requested; the replies before the ACK.
    fn exchange<F>(
        &mut self,
        message: GenlMessage<F>,
        what: &'static str,
    ) -> Result<Vec<GenlMessage<F>>, NetlinkError>
    where
        F: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + std::fmt::Debug,
    {
        self.sequence = self.sequence.wrapping_add(1);
        let mut request = NetlinkMessage::from(message);
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        request.header.sequence_number = self.sequence;
        request.finalize();
        let mut out = vec![0u8; request.buffer_len()];
        request.serialize(&mut out);
        self.socket.send(&out, 0)?;
        let mut replies = Vec::new();
        loop {
            let (buf, _) = self.socket.recv_from_full()?;
            let mut at = 0;
            while at < buf.len() {
                let reply = NetlinkMessage::<GenlMessage<F>>::deserialize(&buf[at..])?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(NetlinkError::Decode("a zero-length message".into()));
                }
                at = at.saturating_add(len.next_multiple_of(4));
                if reply.header.sequence_number != self.sequence {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(replies),
                            Some(code) => {
                                let source = io::Error::from_raw_os_error(-code.get());
                                if what == "the nbd family" {
                                    Err(NetlinkError::NoFamily(source.to_string()))
                                } else {
                                    Err(NetlinkError::Refused { what, source })
                                }
                            }
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(replies),
                    _ => {}
                }
            }
        }
    }

    fn nbd(
        &mut self,
        cmd: u8,
        attrs: Vec<Attr>,
        what: &'static str,
    ) -> Result<Vec<Nbd>, NetlinkError> {
        let mut message = GenlMessage::from_payload(Nbd { cmd, attrs });
        message.set_resolved_family_id(self.family);
        message.finalize();
        Ok(self
            .exchange(message, what)?
            .into_iter()
            .map(|m| m.payload)
            .collect())
    }

    /// NBD_CMD_CONNECT: the device at `index` (or the kernel's choice) on
    /// `sockets`, which must already be in the transmission phase. The
    /// kernel takes its own references; the caller may close its copies.
    /// Returns the device's index.
    pub fn connect(
        &mut self,
        index: Option<u32>,
        sockets: &[BorrowedFd<'_>],
        request: &Connect<'_>,
    ) -> Result<u32, NetlinkError> {
        let mut attrs = vec![
            Attr::U64(ATTR_SIZE_BYTES, request.size),
            Attr::U64(ATTR_BLOCK_SIZE_BYTES, request.block_size),
            Attr::U64(ATTR_SERVER_FLAGS, u64::from(request.server_flags)),
            Attr::U64(ATTR_CLIENT_FLAGS, 0),
            Attr::U64(ATTR_DEAD_CONN_TIMEOUT, request.dead_conn_timeout),
            Attr::Str(ATTR_BACKEND_IDENTIFIER, request.backend.to_owned()),
            Attr::Sockets(fds(sockets)),
        ];
        if request.timeout > 0 {
            attrs.push(Attr::U64(ATTR_TIMEOUT, request.timeout));
        }
        if let Some(index) = index {
            attrs.push(Attr::U32(ATTR_INDEX, index));
        }
        let replies = self.nbd(CMD_CONNECT, attrs, "NBD_CMD_CONNECT")?;
        replies
            .iter()
            .flat_map(|r| &r.attrs)
            .find_map(|a| match a {
                Attr::Other(ATTR_INDEX, v) => u32_of(v),
                _ => None,
            })
            .ok_or_else(|| NetlinkError::Decode("NBD_CMD_CONNECT's reply has no index".into()))
    }

    /// NBD_CMD_RECONFIGURE: fresh sockets in place of dead ones (the kernel
    /// takes as many as it has dead connections). `backend` must be what
    /// the device was connected with: a device of someone else is refused.
    pub fn reconfigure(
        &mut self,
        index: u32,
        sockets: &[BorrowedFd<'_>],
        backend: &str,
        dead_conn_timeout: u64,
    ) -> Result<(), NetlinkError> {
        let attrs = vec![
            Attr::U32(ATTR_INDEX, index),
            Attr::Str(ATTR_BACKEND_IDENTIFIER, backend.to_owned()),
            Attr::U64(ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout),
            Attr::Sockets(fds(sockets)),
        ];
        self.nbd(CMD_RECONFIGURE, attrs, "NBD_CMD_RECONFIGURE")
            .map(drop)
    }

    /// NBD_CMD_DISCONNECT: the device is disconnected (its server told so).
    pub fn disconnect(&mut self, index: u32) -> Result<(), NetlinkError> {
        self.nbd(
            CMD_DISCONNECT,
            vec![Attr::U32(ATTR_INDEX, index)],
            "NBD_CMD_DISCONNECT",
        )
        .map(drop)
    }
}

fn fds(sockets: &[BorrowedFd<'_>]) -> Vec<u32> {
    sockets.iter().map(|s| s.as_raw_fd() as u32).collect()
}

fn u32_of(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NlaBuffer;

    #[test]
    fn sockets_nest_one_item_per_fd() {
        let attr = Attr::Sockets(vec![7, 9]);
        let mut buf = vec![0u8; attr.buffer_len()];
        attr.emit(&mut buf);
        let outer = NlaBuffer::new_checked(&buf[..]).unwrap();
        assert_eq!(outer.kind() & !NLA_F_NESTED, ATTR_SOCKETS);
        let fds: Vec<u32> = NlasIterator::new(outer.value())
            .map(|item| {
                let item = item.unwrap();
                assert_eq!(item.kind() & !NLA_F_NESTED, SOCK_ITEM);
                let fd = NlasIterator::new(item.value()).next().unwrap().unwrap();
                assert_eq!(fd.kind(), SOCK_FD);
                u32_of(fd.value()).unwrap()
            })
            .collect();
        assert_eq!(fds, vec![7, 9]);
    }

    #[test]
    fn strings_are_nul_terminated_and_replies_parse_without_panics() {
        let attr = Attr::Str(ATTR_BACKEND_IDENTIFIER, "hostcrypt:x".into());
        let mut buf = vec![0u8; attr.buffer_len()];
        attr.emit(&mut buf);
        let nla = NlaBuffer::new_checked(&buf[..]).unwrap();
        assert_eq!(nla.value(), b"hostcrypt:x\0");
        // Garbage after a valid header: an error, not a panic.
        let header = GenlHeader { cmd: 5, version: 1 };
        for junk in [&[0xffu8, 0xff, 0, 0][..], &[4, 0, 1, 0, 9, 9][..], &[][..]] {
            let _ = Nbd::parse_with_param(junk, header);
        }
    }
}
