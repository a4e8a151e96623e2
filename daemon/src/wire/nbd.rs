//! NBD wire constants and the fixed-size messages of the protocol
//! (fixed newstyle handshake, compact and extended request headers, simple,
//! structured and extended replies, the `base:allocation` meta context), as
//! the NBD protocol document and its EXTENDED_HEADERS extension define
//! them, and the typed [`Command`] every layer matches on. Big-endian
//! throughout.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

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
pub const OPT_EXTENDED_HEADERS: u32 = 11;

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
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

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
/// Extended headers only: `length` is the payload's length, not the
/// range's (every WRITE should set it).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// A transmission-phase command, typed once where the header is parsed
/// (as Firecracker's `RequestType`), so no other layer matches raw numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// Anything else: answered EINVAL.
    Unknown(u16),
}

impl Command {
    pub fn from_wire(kind: u16) -> Command {
        match kind {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Unknown(other) => other,
        }
    }

    /// The name in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Disc => "disc",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::Cache => "cache",
            Command::WriteZeroes => "write_zeroes",
            Command::BlockStatus => "block_status",
            Command::Unknown(_) => "other",
        }
    }
}

// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
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
    /// NBD_OPT_STRUCTURED_REPLY (or EXTENDED_HEADERS): replies are chunks.
    pub structured: bool,
    /// NBD_OPT_EXTENDED_HEADERS: 32-byte requests with 64-bit lengths,
    /// 32-byte reply chunks, 64-bit block status descriptors.
    pub extended: bool,
    /// `base:allocation` selected for the chosen export: BLOCK_STATUS works.
    pub base_allocation: bool,
}

/// The command flags a request may carry, given what this server
/// advertises and the connection negotiated: FUA on writes, NO_HOLE and
/// FAST_ZERO on WRITE_ZEROES, DF on READ with structured replies, REQ_ONE
/// on BLOCK_STATUS, PAYLOAD_LEN on WRITE with extended headers.
pub fn valid_flags(command: Command, features: Features) -> u16 {
    match command {
        Command::Write if features.extended => CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN,
        Command::Write | Command::Trim => CMD_FLAG_FUA,
        Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        Command::Read if features.structured => CMD_FLAG_DF,
        Command::BlockStatus if features.base_allocation => CMD_FLAG_REQ_ONE,
        _ => 0,
    }
}

/// Longest reply chunk header: an extended one (32 bytes).
pub const MAX_CHUNK_HEADER: usize = 32;

/// The header of a structured reply chunk (20 bytes) or, with extended
/// headers, of an extended one (32 bytes, echoing the request's offset);
/// `length` counts the chunk's payload. Returns the buffer and its length.
pub fn chunk_header(
    extended: bool,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u32,
) -> ([u8; MAX_CHUNK_HEADER], usize) {
    let mut out = [0u8; MAX_CHUNK_HEADER];
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    if extended {
        out[..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        out[16..24].copy_from_slice(&offset.to_be_bytes());
        out[24..32].copy_from_slice(&u64::from(length).to_be_bytes());
        (out, 32)
    } else {
        out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out[16..20].copy_from_slice(&length.to_be_bytes());
        (out, 20)
    }
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

/// A transmission-phase request header: compact (28 bytes on the wire,
/// 32-bit length) or extended (32 bytes, 64-bit length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    /// The payload's length for a WRITE (and, with extended headers, for
    /// any request with PAYLOAD_LEN), otherwise the range's.
    pub length: u64,
}

pub const REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;

impl Request {
    /// The header's length on the wire: compact or extended.
    pub fn header_len(extended: bool) -> usize {
        if extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        }
    }

    /// Parses a request header of `header_len(extended)` bytes; `None`
    /// when the magic is wrong. The two forms differ only in the magic and
    /// the width of the length.
    pub fn parse(raw: &[u8], extended: bool) -> Option<Self> {
        let (magic, length) = if extended {
            (EXTENDED_REQUEST_MAGIC, be64(&raw[24..]))
        } else {
            (REQUEST_MAGIC, u64::from(be32(&raw[24..])))
        };
        (be32(raw) == magic).then(|| Request {
            flags: be16(&raw[4..]),
            command: Command::from_wire(be16(&raw[6..])),
            cookie: be64(&raw[8..]),
            offset: be64(&raw[16..]),
            length,
        })
    }

    /// The compact header on the wire (what the remote-backing client
    /// sends; it never asks for more than its server's 32-bit maximum).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        debug_assert!(self.length <= u64::from(u32::MAX));
        let mut out = [0u8; REQUEST_LEN];
        self.encode_common(&mut out, REQUEST_MAGIC);
        out[24..].copy_from_slice(&(self.length as u32).to_be_bytes());
        out
    }

    /// The extended header on the wire.
    pub fn encode_extended(&self) -> [u8; EXTENDED_REQUEST_LEN] {
        let mut out = [0u8; EXTENDED_REQUEST_LEN];
        self.encode_common(&mut out, EXTENDED_REQUEST_MAGIC);
        out[24..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// The 24 bytes both forms share: magic, flags, type, cookie, offset.
    fn encode_common(&self, out: &mut [u8], magic: u32) {
        out[..4].copy_from_slice(&magic.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
    }

    /// How many payload bytes follow this header on the wire. A WRITE's
    /// length is its payload's with extended headers too, flagged or not:
    /// the extension says to flag it, but QEMU 10's client does not, and
    /// QEMU's own server reads the payload either way.
    pub fn payload_len(&self, features: Features) -> u64 {
        let carries = self.command == Command::Write
            || features.extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0;
        if carries {
            self.length
        } else {
            0
        }
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
        let req = Request::parse(&raw, false).unwrap();
        assert_eq!(req.encode(), raw, "encode is parse's inverse");
        assert_eq!(
            (req.command, req.cookie, req.offset, req.length),
            (Command::Write, 7, 4096, 512)
        );
        raw[0] ^= 1;
        assert!(Request::parse(&raw, false).is_none());
    }

    #[test]
    fn extended_request_carries_a_64_bit_length() {
        let req = Request {
            flags: CMD_FLAG_FUA,
            command: Command::Trim,
            cookie: 9,
            offset: 1 << 40,
            length: 5 << 32,
        };
        let raw = req.encode_extended();
        assert_eq!(Request::parse(&raw, true), Some(req));
        assert!(Request::parse(&raw, false).is_none(), "magics differ");
        let ext = Features {
            structured: true,
            extended: true,
            base_allocation: false,
        };
        assert_eq!(req.payload_len(ext), 0, "trim's length is an effect length");
        let write = Request {
            command: Command::Write,
            flags: CMD_FLAG_PAYLOAD_LEN,
            length: 4096,
            ..req
        };
        assert_eq!(write.payload_len(ext), 4096);
        assert_eq!(write.payload_len(Features::default()), 4096);
    }

    #[test]
    fn commands_round_trip_through_the_wire() {
        for kind in 0..=8u16 {
            assert_eq!(Command::from_wire(kind).to_wire(), kind);
        }
        assert_eq!(Command::from_wire(99), Command::Unknown(99));
    }

    #[test]
    fn chunk_headers_compact_and_extended() {
        let (h, n) = chunk_header(false, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 3, 77, 0);
        assert_eq!(
            (n, be32(&h), be64(&h[8..]), be32(&h[16..])),
            (20, STRUCTURED_REPLY_MAGIC, 3, 0)
        );
        let (h, n) = chunk_header(true, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 3, 77, 520);
        assert_eq!(n, 32);
        assert_eq!(
            (be32(&h), be16(&h[6..]), be64(&h[16..]), be64(&h[24..])),
            (EXTENDED_REPLY_MAGIC, REPLY_TYPE_OFFSET_DATA, 77, 520)
        );
    }
}
