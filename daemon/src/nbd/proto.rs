//! NBD wire constants and the fixed-size messages of the protocol
//! (fixed newstyle handshake, simple and structured replies, the
//! `base:allocation` meta context), as the NBD protocol document defines
//! them. Big-endian throughout.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// Info types for OPT_INFO / OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// The one meta context served: which ranges are holes (read as zeros,
/// take no space in the backing).
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// Its id in SET_META_CONTEXT replies and BLOCK_STATUS chunks.
pub const BASE_ALLOCATION_ID: u32 = 1;
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// What the handshake negotiated for the transmission phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// NBD_OPT_STRUCTURED_REPLY: replies are chunks.
    pub structured: bool,
    /// `base:allocation` selected for the chosen export: BLOCK_STATUS works.
    pub base_allocation: bool,
}

/// The command flags a request of `kind` may carry, given what this server
/// advertises and the connection negotiated: FUA on writes, NO_HOLE and
/// FAST_ZERO on WRITE_ZEROES, DF on READ with structured replies, REQ_ONE
/// on BLOCK_STATUS.
pub fn valid_flags(kind: u16, features: Features) -> u16 {
    match kind {
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_READ if features.structured => CMD_FLAG_DF,
        CMD_BLOCK_STATUS if features.base_allocation => CMD_FLAG_REQ_ONE,
        _ => 0,
    }
}

/// The 20-byte header of a structured reply chunk; `length` counts the
/// chunk's payload.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..].copy_from_slice(&length.to_be_bytes());
    out
}

// Errors in simple replies.
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;
pub const EOVERFLOW: u32 = 75;
pub const ESHUTDOWN: u32 = 108;

/// Largest read or write payload we accept (and advertise as the maximum
/// block size): 32 MiB, the limit the NBD document says clients may assume.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Longest option payload we read; a string is at most 4 KiB, so anything
/// beyond this is hostile or broken and the connection is dropped.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// A transmission-phase request header (28 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub const REQUEST_LEN: usize = 28;

impl Request {
    /// Parses a request header; `None` when the magic is wrong.
    pub fn parse(raw: &[u8; REQUEST_LEN]) -> Option<Self> {
        if be32(&raw[..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be16(&raw[4..]),
            kind: be16(&raw[6..]),
            cookie: be64(&raw[8..]),
            offset: be64(&raw[16..]),
            length: be32(&raw[24..]),
        })
    }

    /// The header on the wire (what the remote-backing client sends).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// Big-endian integers at the start of `b` (callers check the length).
pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The 16-byte header of a simple reply.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// Maps a backing I/O error to the NBD error a client should see.
pub fn errno_for(err: &std::io::Error) -> u32 {
    match (err.kind(), err.raw_os_error()) {
        (std::io::ErrorKind::InvalidInput, _) => EINVAL,
        (_, Some(libc::ENOSPC)) | (_, Some(libc::EDQUOT)) => ENOSPC,
        (_, Some(libc::ENOMEM)) => ENOMEM,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_and_rejects_bad_magic() {
        let mut raw = [0u8; REQUEST_LEN];
        raw[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        raw[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        raw[8..16].copy_from_slice(&7u64.to_be_bytes());
        raw[16..24].copy_from_slice(&4096u64.to_be_bytes());
        raw[24..28].copy_from_slice(&512u32.to_be_bytes());
        let req = Request::parse(&raw).unwrap();
        assert_eq!(req.encode(), raw, "encode is parse's inverse");
        assert_eq!(
            (req.kind, req.cookie, req.offset, req.length),
            (CMD_WRITE, 7, 4096, 512)
        );
        raw[0] ^= 1;
        assert!(Request::parse(&raw).is_none());
    }
}
