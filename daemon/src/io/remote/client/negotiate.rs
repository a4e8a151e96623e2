//! The client side of the fixed newstyle handshake: structured replies
//! when the server offers them, then NBD_OPT_GO asking for the export's
//! block sizes. What a server may send back is bounded before it is
//! read, as on the server side: a reply's length (`MAX_OPTION_REPLY`)
//! before anything is allocated for it, and how many replies one option
//! may get (`MAX_OPTION_REPLIES`). How long the handshake may take is the
//! caller's (`link::Deadlined`). The transmission phase lives in `mod.rs`.

use std::io::{self, Read, Write};

use crate::wire::nbd::*;

/// What NBD_OPT_GO told us about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// Requests must be multiples of this, at offsets aligned to it.
    pub min_block: u32,
    pub preferred_block: u32,
    /// Larger requests are split.
    pub max_block: u32,
    /// Replies to reads arrive as structured chunks.
    pub structured: bool,
}

impl ExportInfo {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// The longest option reply taken: the largest a client asks for is
/// NBD_INFO_NAME or NBD_INFO_DESCRIPTION (strings of up to 4 KiB) or an
/// error's message; four times that is a broken or hostile server.
pub const MAX_OPTION_REPLY: u32 = 16 * 1024;

/// How many replies one option may get: OPT_GO gets one per information
/// type (a handful) and an ACK; a server that keeps sending INFO replies
/// is not converging.
pub const MAX_OPTION_REPLIES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum NegotiateError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the server broke the NBD handshake: {0}")]
    Protocol(String),
    #[error(
        "the server sent an option reply of {len} bytes (at most {MAX_OPTION_REPLY} are taken)"
    )]
    ReplyTooLong { len: u32 },
    #[error("the server sent more than {MAX_OPTION_REPLIES} replies to one option")]
    TooManyReplies,
    #[error("the server refused {what}: {why}")]
    Refused { what: &'static str, why: String },
}

fn protocol(what: impl Into<String>) -> NegotiateError {
    NegotiateError::Protocol(what.into())
}

/// Default block sizes when a server does not send NBD_INFO_BLOCK_SIZE
/// (the NBD document's defaults for a client that asked and got none).
const DEFAULT_MIN: u32 = 1;
const DEFAULT_PREFERRED: u32 = 4096;
const DEFAULT_MAX: u32 = MAX_PAYLOAD;

/// Runs the handshake up to the transmission phase on `stream`.
pub fn negotiate<S: Read + Write>(
    stream: &mut S,
    export: &str,
) -> Result<ExportInfo, NegotiateError> {
    greet(stream)?;
    choose(stream, export)
}

/// NBD_OPT_STARTTLS: after its ACK the TLS handshake starts on the socket.
pub fn starttls<S: Read + Write>(stream: &mut S) -> Result<(), NegotiateError> {
    send_option(stream, OPT_STARTTLS, &[])?;
    match read_option_reply(stream, OPT_STARTTLS)? {
        (REP_ACK, _) => Ok(()),
        (kind, data) => Err(NegotiateError::Refused {
            what: "STARTTLS",
            why: if kind == REP_ERR_UNSUP || kind == REP_ERR_POLICY {
                "the server does not offer TLS (use nbd:// or configure TLS there)".to_string()
            } else {
                refusal(kind, "", &data)
            },
        }),
    }
}

/// Reads the greeting and answers with our flags.
pub fn greet<S: Read + Write>(stream: &mut S) -> Result<(), NegotiateError> {
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting)?;
    if be64(&greeting[..8]) != NBDMAGIC {
        return Err(protocol(
            "no NBDMAGIC in the greeting (is this an NBD server?)",
        ));
    }
    if be64(&greeting[8..16]) != IHAVEOPT {
        return Err(protocol("the server speaks only the oldstyle handshake"));
    }
    let server_flags = be16(&greeting[16..]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol("the server does not speak fixed newstyle"));
    }
    let mut client_flags = CLIENT_FIXED_NEWSTYLE;
    if server_flags & FLAG_NO_ZEROES != 0 {
        client_flags |= CLIENT_NO_ZEROES;
    }
    stream.write_all(&client_flags.to_be_bytes())?;
    Ok(())
}

/// Options after the greeting (and after TLS, if any): structured
/// replies, then NBD_OPT_GO for `export`.
pub fn choose<S: Read + Write>(stream: &mut S, export: &str) -> Result<ExportInfo, NegotiateError> {
    choose_replies(stream, export, true)
}

/// As `choose`, asking for structured replies only when `structured`:
/// the kernel's NBD client, which gets the socket afterwards, reads
/// simple replies only.
pub fn choose_replies<S: Read + Write>(
    stream: &mut S,
    export: &str,
    structured: bool,
) -> Result<ExportInfo, NegotiateError> {
    let structured = structured && {
        send_option(stream, OPT_STRUCTURED_REPLY, &[])?;
        let (kind, _) = read_option_reply(stream, OPT_STRUCTURED_REPLY)?;
        kind == REP_ACK
    };

    let mut go = Vec::with_capacity(8 + export.len());
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(stream, OPT_GO, &go)?;
    let mut export_info = None;
    let mut sizes = (DEFAULT_MIN, DEFAULT_PREFERRED, DEFAULT_MAX);
    let mut replies = 0;
    loop {
        replies += 1;
        if replies > MAX_OPTION_REPLIES {
            return Err(NegotiateError::TooManyReplies);
        }
        let (kind, data) = read_option_reply(stream, OPT_GO)?;
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 2 => {
                let info = be16(&data[..2]);
                match (info, data.len()) {
                    (INFO_EXPORT, 12) => {
                        export_info = Some((be64(&data[2..10]), be16(&data[10..12])));
                    }
                    (INFO_BLOCK_SIZE, 14) => {
                        sizes = (be32(&data[2..6]), be32(&data[6..10]), be32(&data[10..14]));
                    }
                    (INFO_EXPORT | INFO_BLOCK_SIZE, n) => {
                        return Err(protocol(format!("NBD_REP_INFO {info} of {n} bytes")));
                    }
                    _ => {} // Information we did not ask for is allowed.
                }
            }
            REP_INFO => return Err(protocol("an empty NBD_REP_INFO")),
            other if other & (1 << 31) != 0 => {
                return Err(NegotiateError::Refused {
                    what: "the export",
                    why: refusal(other, export, &data),
                })
            }
            _ => {} // Unknown non-error replies are to be ignored.
        }
    }
    let (size, flags) =
        export_info.ok_or_else(|| protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT"))?;
    let (min, preferred, max) = sizes;
    // The NBD document: min a power of two up to 64 KiB, preferred a power
    // of two >= min, max a multiple of min (or 0xffffffff).
    if !min.is_power_of_two() || min > 64 * 1024 || max < min {
        return Err(protocol(format!(
            "impossible block sizes {min}/{preferred}/{max}"
        )));
    }
    Ok(ExportInfo {
        size,
        flags,
        min_block: min,
        preferred_block: preferred.max(min),
        // Payloads above 32 MiB are not something a client may assume.
        max_block: (max.min(MAX_PAYLOAD) / min) * min,
        structured,
    })
}

fn refusal(kind: u32, export: &str, data: &[u8]) -> String {
    let message = String::from_utf8_lossy(data);
    let what = match kind {
        REP_ERR_UNKNOWN => format!("no export named {export:?}"),
        REP_ERR_TLS_REQD => "the server requires TLS (use nbds://)".to_string(),
        REP_ERR_POLICY => "forbidden by the server's policy".to_string(),
        REP_ERR_SHUTDOWN => "the server is shutting down".to_string(),
        other => format!("error {:#x}", other),
    };
    if message.is_empty() {
        what
    } else {
        format!("{what} ({message})")
    }
}

fn send_option(stream: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    stream.write_all(&out)?;
    stream.flush()
}

fn read_option_reply(
    stream: &mut impl Read,
    option: u32,
) -> Result<(u32, Vec<u8>), NegotiateError> {
    let mut head = [0u8; 20];
    stream.read_exact(&mut head)?;
    if be64(&head[..8]) != OPTION_REPLY_MAGIC {
        return Err(protocol("bad option reply magic"));
    }
    if be32(&head[8..12]) != option {
        return Err(protocol("an option reply for another option"));
    }
    let kind = be32(&head[12..16]);
    let len = be32(&head[16..20]);
    if len > MAX_OPTION_REPLY {
        return Err(NegotiateError::ReplyTooLong { len });
    }
    let mut data = vec![0u8; len as usize];
    stream.read_exact(&mut data)?;
    Ok((kind, data))
}

/// Crafted handshakes: what a server claims is bounded before anything is
/// allocated or waited for.
#[cfg(test)]
mod tests {
    use super::*;

    /// A server's bytes: `script` first, then `forever` repeated (up to
    /// `limit` bytes in all, then EOF); what the client writes is
    /// dropped. Counts what the client read.
    struct Server {
        script: Vec<u8>,
        forever: Vec<u8>,
        at: usize,
        limit: usize,
    }

    impl Server {
        fn new(script: Vec<u8>, forever: Vec<u8>, limit: usize) -> Self {
            Server {
                script,
                forever,
                at: 0,
                limit,
            }
        }
    }

    impl Read for Server {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let mut n = 0;
            while n < buf.len() && self.at < self.limit {
                let byte = match self.script.get(self.at) {
                    Some(&b) => b,
                    None if self.forever.is_empty() => break,
                    None => {
                        let i = (self.at - self.script.len()) % self.forever.len();
                        self.forever[i]
                    }
                };
                buf[n] = byte;
                n += 1;
                self.at += 1;
            }
            Ok(n)
        }
    }

    impl Write for Server {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn greeting() -> Vec<u8> {
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        g
    }

    fn reply_head(option: u32, kind: u32, len: u32) -> Vec<u8> {
        let mut r = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&option.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r
    }

    fn reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
        let mut r = reply_head(option, kind, data.len() as u32);
        r.extend_from_slice(data);
        r
    }

    /// The greeting and an ACK for structured replies.
    fn up_to_go() -> Vec<u8> {
        let mut s = greeting();
        s.extend(reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        s
    }

    #[test]
    fn a_well_formed_go_negotiates() {
        let mut s = up_to_go();
        let mut export = INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&(1u64 << 20).to_be_bytes());
        export.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH).to_be_bytes());
        s.extend(reply(OPT_GO, REP_INFO, &export));
        s.extend(reply(OPT_GO, REP_ACK, &[]));
        let n = s.len();
        let info = negotiate(&mut Server::new(s, vec![], n), "").unwrap();
        assert_eq!(info.size, 1 << 20);
        assert!(info.structured);
    }

    #[test]
    fn an_oversized_option_reply_is_refused_from_its_header() {
        for (option, len) in [
            (OPT_STRUCTURED_REPLY, u32::MAX),
            (OPT_STRUCTURED_REPLY, MAX_OPTION_REPLY + 1),
            (OPT_GO, 64 * 1024),
        ] {
            let mut s = greeting();
            if option == OPT_GO {
                s.extend(reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
            }
            s.extend(reply_head(option, REP_INFO, len));
            // The claimed payload never comes: the refusal must not wait
            // for it (or allocate it).
            let n = s.len();
            let mut server = Server::new(s, vec![], n);
            match negotiate(&mut server, "") {
                Err(NegotiateError::ReplyTooLong { len: l }) => assert_eq!(l, len),
                other => panic!("{len} bytes: {other:?}"),
            }
        }
    }

    #[test]
    fn endless_option_replies_are_refused() {
        // An unknown INFO type, which a client must ignore, sent without
        // end: refused after a bounded number, long before the stream
        // (or the patience of a caller without a deadline) runs out.
        let mut unknown = 0x7fffu16.to_be_bytes().to_vec();
        unknown.extend_from_slice(&[0; 100]);
        let forever = reply(OPT_GO, REP_INFO, &unknown);
        let mut server = Server::new(up_to_go(), forever.clone(), 1 << 30);
        match negotiate(&mut server, "") {
            Err(NegotiateError::TooManyReplies) => {}
            other => panic!("{other:?}"),
        }
        let read = server.at - up_to_go().len();
        assert!(
            read <= forever.len() * MAX_OPTION_REPLIES,
            "{read} bytes read"
        );
        // Unknown non-error reply kinds are capped the same way.
        let forever = reply(OPT_GO, 99, &[]);
        let mut server = Server::new(up_to_go(), forever, 1 << 30);
        assert!(matches!(
            negotiate(&mut server, ""),
            Err(NegotiateError::TooManyReplies)
        ));
    }
}
