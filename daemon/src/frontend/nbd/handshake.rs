//! The fixed-newstyle handshake: option haggling up to the point where a
//! client picks an export (OPT_GO or EXPORT_NAME), asks for TLS (STARTTLS:
//! the caller upgrades the stream and calls [`negotiate`] again), or leaves.
//!
//! The decisions are a state machine without I/O, as rustls's `msgs/`:
//! [`Session::on_header`] and [`Session::on_option`] turn an option into
//! encoded replies and what comes next ([`Step`], [`Then`]); [`negotiate`]
//! is the short async loop that reads options and sends the replies. The
//! fuzz target and the table tests drive the state machine with bytes.
//!
//! Supported: EXPORT_NAME, ABORT, LIST, INFO, GO with NBD_INFO_EXPORT / NAME /
//! DESCRIPTION / BLOCK_SIZE, STARTTLS when the listener offers TLS,
//! STRUCTURED_REPLY, EXTENDED_HEADERS, and LIST/SET_META_CONTEXT for
//! `base:allocation`. Every other option gets NBD_REP_ERR_UNSUP so the
//! client falls back.
//! Who may see and open a volume is decided here too, from the peer's
//! identity and the volume's allow list: refused volumes are absent from
//! LIST and answer GO, INFO and META_CONTEXT exactly as a missing volume
//! does (NBD_REP_ERR_UNKNOWN, "no export named ..."), so a client cannot
//! tell a volume it may not open from one that does not exist; why is in
//! the log, whose refusal lines are rate-limited. A client allowed to see a
//! volume that is not open gets its state, never the error behind it
//! (paths, provider messages): those go to the log. A violation of a MUST in
//! the protocol (bad magic, unknown client flags, an absurd option length)
//! ends this connection only.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::export::peer::{shorten, Peer};
use crate::export::{Export, Exports};
use crate::wire::nbd::*;
use std::sync::Arc;

/// Longest error message sent to a client (the NBD spec's string limit).
const MAX_MESSAGE: usize = 4096;
/// How much of a client-supplied name goes into a log line.
const LOGGED_NAME: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connection I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("client sent bad option magic {0:#018x}")]
    BadMagic(u64),
    #[error("client sent unknown flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("client sent an option of {0} bytes (limit {MAX_OPTION_LEN})")]
    OptionTooLong(u32),
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("client asked for export {0:?} with NBD_OPT_EXPORT_NAME and is not in its allow list")]
    ExportNameRefused(String),
    #[error("client sent NBD_OPT_EXPORT_NAME before STARTTLS on a listener that requires TLS")]
    ExportNameWithoutTls,
    #[error("client sent NBD_OPT_EXPORT_NAME after negotiating extended headers")]
    ExportNameAfterExtendedHeaders,
}

/// Where TLS stands on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPhase {
    /// The listener has no TLS: STARTTLS is answered NBD_REP_ERR_UNSUP.
    Unavailable,
    /// STARTTLS is accepted; with `required`, nothing else is until then.
    Offered { required: bool },
    /// The session runs inside TLS.
    Active,
}

/// What the handshake knows about this connection.
pub struct Session<'a> {
    pub peer: &'a Peer,
    pub exports: &'a Exports,
    pub tls: TlsPhase,
    /// The client asked for no zero padding after EXPORT_NAME.
    pub no_zeroes: bool,
    /// NBD_OPT_STRUCTURED_REPLY was acknowledged.
    pub structured: bool,
    /// NBD_OPT_EXTENDED_HEADERS was acknowledged (implies structured).
    pub extended: bool,
    /// The export SET_META_CONTEXT selected `base:allocation` for.
    pub base_allocation_for: Option<String>,
    /// A TLS-required refusal was sent: a client that then leaves counts
    /// as refused, not as a polite close.
    told_tls_required: bool,
}

impl<'a> Session<'a> {
    pub fn new(peer: &'a Peer, exports: &'a Exports, tls: TlsPhase, no_zeroes: bool) -> Self {
        Session {
            peer,
            exports,
            tls,
            no_zeroes,
            structured: false,
            extended: false,
            base_allocation_for: None,
            told_tls_required: false,
        }
    }

    /// What transmission with `export` gets of what was negotiated.
    fn features(&self, export: &Export) -> Features {
        let structured = self.structured || self.extended;
        Features {
            structured,
            extended: self.extended,
            base_allocation: structured
                && self.base_allocation_for.as_deref() == Some(export.name()),
        }
    }
}

/// How the handshake ended.
pub enum Negotiated {
    /// The client chose this export; transmission follows with what was
    /// negotiated.
    Transmission(Arc<Export>, Features),
    /// STARTTLS was acknowledged: run the TLS handshake, then continue
    /// option haggling inside it.
    StartTls,
    /// The client aborted or disconnected politely.
    Closed,
    /// The client asked for an option TLS must cover first and was told so
    /// (counted by the caller).
    Refused,
}

/// What comes after the replies of one step.
pub enum Then {
    /// Read the next option.
    Continue,
    /// Send the replies, then end the handshake.
    End(Negotiated),
    /// Send the replies if the client still listens (ABORT: its ACK is a
    /// courtesy), then end the handshake.
    Leave(Negotiated),
    /// Send the replies if the client still listens, then drop the
    /// connection: the client broke a MUST of the protocol.
    Fail(HandshakeError),
}

/// The handshake's answer to one input: option replies, already encoded,
/// and what to do next. Built without I/O, so tests and the fuzz target
/// drive it with bytes alone.
pub struct Step {
    pub replies: Vec<u8>,
    pub then: Then,
}

impl Step {
    fn new(then: Then) -> Self {
        Step {
            replies: Vec::new(),
            then,
        }
    }

    fn continuing() -> Self {
        Step::new(Then::Continue)
    }

    fn reply(&mut self, option: u32, kind: u32, body: &[u8]) {
        self.replies
            .extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        self.replies.extend_from_slice(&option.to_be_bytes());
        self.replies.extend_from_slice(&kind.to_be_bytes());
        self.replies
            .extend_from_slice(&(body.len() as u32).to_be_bytes());
        self.replies.extend_from_slice(body);
    }

    /// An error reply carrying a human-readable message, as the spec allows.
    fn error(&mut self, option: u32, kind: u32, message: &str) {
        let mut end = message.len().min(MAX_MESSAGE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.reply(option, kind, &message.as_bytes()[..end]);
    }
}

/// The server greeting: magic, IHAVEOPT and the handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut hello = [0u8; 18];
    hello[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    hello
}

/// The client's flags: whether it asked for no zero padding, or an error
/// for flags we do not know.
pub fn client_flags(flags: u32) -> Result<bool, HandshakeError> {
    if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(HandshakeError::UnknownClientFlags(flags));
    }
    Ok(flags & CLIENT_NO_ZEROES != 0)
}

impl Session<'_> {
    /// How the handshake ends when the client closes the connection where
    /// an option should start.
    pub fn on_eof(&self) -> Negotiated {
        if self.told_tls_required {
            Negotiated::Refused
        } else {
            Negotiated::Closed
        }
    }

    /// An option's header, before its data is read: `Some` ends the
    /// handshake (bad magic; a length over the limit, said to the client
    /// first so it learns why), `None` reads `len` bytes of data next.
    pub fn on_header(&self, magic: u64, option: u32, len: u32) -> Option<Step> {
        if magic != IHAVEOPT {
            return Some(Step::new(Then::Fail(HandshakeError::BadMagic(magic))));
        }
        if len > MAX_OPTION_LEN {
            let mut step = Step::new(Then::Fail(HandshakeError::OptionTooLong(len)));
            step.error(option, REP_ERR_TOO_BIG, "option too long");
            return Some(step);
        }
        None
    }

    /// One option with its data: the replies, and what comes next.
    pub fn on_option(&mut self, option: u32, data: &[u8]) -> Step {
        let tls_required = self.tls == TlsPhase::Offered { required: true };
        if tls_required && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                return Step::new(Then::Fail(HandshakeError::ExportNameWithoutTls));
            }
            let mut step = Step::continuing();
            step.error(
                option,
                REP_ERR_TLS_REQD,
                "this server requires TLS: use STARTTLS (nbds:// URIs, qemu tls-creds)",
            );
            self.told_tls_required = true;
            return step;
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(data),
            OPT_ABORT => {
                let mut step = Step::new(Then::Leave(self.on_eof()));
                step.reply(option, REP_ACK, &[]);
                step
            }
            OPT_LIST => self.list(data),
            OPT_INFO | OPT_GO => self.info_or_go(option, data),
            OPT_STARTTLS => self.starttls(data),
            OPT_STRUCTURED_REPLY => {
                let mut step = Step::continuing();
                if !data.is_empty() {
                    step.error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else if self.extended {
                    // Extended headers take precedence; no downgrade.
                    step.error(
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated",
                    );
                } else {
                    self.structured = true;
                    step.reply(option, REP_ACK, &[]);
                }
                step
            }
            OPT_EXTENDED_HEADERS => {
                let mut step = Step::continuing();
                if !data.is_empty() {
                    step.error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_EXTENDED_HEADERS takes no data",
                    );
                } else {
                    self.extended = true;
                    step.reply(option, REP_ACK, &[]);
                }
                step
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data),
            _ => {
                let mut step = Step::continuing();
                step.error(option, REP_ERR_UNSUP, "option not supported");
                step
            }
        }
    }

    fn export_name(&mut self, data: &[u8]) -> Step {
        // The client promised not to: the transmission it expects cannot
        // be told from the one EXPORT_NAME implies.
        if self.extended {
            return Step::new(Then::Fail(HandshakeError::ExportNameAfterExtendedHeaders));
        }
        let name = String::from_utf8_lossy(data).into_owned();
        let Some(export) = self.exports.find(&name) else {
            let name = shorten(&name, LOGGED_NAME);
            return Step::new(Then::Fail(HandshakeError::UnknownExport(name)));
        };
        if !permitted(self.peer, &export) {
            let name = shorten(&name, LOGGED_NAME);
            return Step::new(Then::Fail(HandshakeError::ExportNameRefused(name)));
        }
        let features = self.features(&export);
        let mut step = Step::continuing();
        step.replies.extend_from_slice(&export.size().to_be_bytes());
        step.replies
            .extend_from_slice(&transmission_flags(&export).to_be_bytes());
        if !self.no_zeroes {
            step.replies.extend_from_slice(&[0u8; 124]);
        }
        step.then = Then::End(Negotiated::Transmission(export, features));
        step
    }

    fn list(&self, data: &[u8]) -> Step {
        let mut step = Step::continuing();
        if !data.is_empty() {
            step.error(OPT_LIST, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
            return step;
        }
        let served = self
            .exports
            .iter()
            .filter(|e| e.allow.load().permits(self.peer))
            .map(|e| e.name().to_owned());
        let waiting = self.exports.unavailable();
        let waiting = waiting
            .iter()
            .filter(|u| u.allow.permits(self.peer))
            .map(|u| u.name.clone());
        for name in served.chain(waiting).collect::<Vec<_>>() {
            let name = name.as_bytes();
            let mut body = Vec::with_capacity(4 + name.len());
            body.extend_from_slice(&(name.len() as u32).to_be_bytes());
            body.extend_from_slice(name);
            step.reply(OPT_LIST, REP_SERVER, &body);
        }
        step.reply(OPT_LIST, REP_ACK, &[]);
        step
    }

    fn info_or_go(&self, option: u32, data: &[u8]) -> Step {
        let mut step = Step::continuing();
        let Some((name, requests)) = parse_info_request(data) else {
            step.error(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO");
            return step;
        };
        let Some(export) = self.exports.find(&name) else {
            let msg = match self.exports.find_unavailable(&name) {
                Some(u) if u.allow.permits(self.peer) => format!(
                    "volume {:?} is not available yet ({}); the daemon's log says why",
                    u.name, u.state
                ),
                _ => no_such_export(&name),
            };
            step.error(option, REP_ERR_UNKNOWN, &msg);
            return step;
        };
        if !permitted(self.peer, &export) {
            step.error(option, REP_ERR_UNKNOWN, &no_such_export(&name));
            return step;
        }
        info(&mut step, option, &export, &requests);
        step.reply(option, REP_ACK, &[]);
        if option == OPT_GO {
            let features = self.features(&export);
            step.then = Then::End(Negotiated::Transmission(export, features));
        }
        step
    }

    fn starttls(&self, data: &[u8]) -> Step {
        let option = OPT_STARTTLS;
        let mut step = Step::continuing();
        match self.tls {
            TlsPhase::Unavailable => step.error(
                option,
                REP_ERR_UNSUP,
                "TLS is not configured on this listener",
            ),
            TlsPhase::Active => step.error(option, REP_ERR_INVALID, "TLS is already active"),
            TlsPhase::Offered { .. } if !data.is_empty() => {
                step.error(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            }
            TlsPhase::Offered { .. } => {
                step.reply(option, REP_ACK, &[]);
                step.then = Then::End(Negotiated::StartTls);
            }
        }
        step
    }

    /// LIST_META_CONTEXT and SET_META_CONTEXT. The one context is
    /// `base:allocation`; LIST with no queries, or the query `base:`, lists
    /// it. SET needs structured replies and replaces any earlier selection.
    fn meta_context(&mut self, option: u32, data: &[u8]) -> Step {
        let mut step = Step::continuing();
        let set = option == OPT_SET_META_CONTEXT;
        if set && !(self.structured || self.extended) {
            step.error(
                option,
                REP_ERR_INVALID,
                "NBD_OPT_SET_META_CONTEXT needs structured replies or extended headers first",
            );
            return step;
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            step.error(option, REP_ERR_INVALID, "malformed meta context request");
            return step;
        };
        let Some(export) = self.exports.find(&name) else {
            step.error(option, REP_ERR_UNKNOWN, &no_such_export(&name));
            return step;
        };
        if !permitted(self.peer, &export) {
            step.error(option, REP_ERR_UNKNOWN, &no_such_export(&name));
            return step;
        }
        let wanted = if set {
            queries.iter().any(|q| q == META_BASE_ALLOCATION)
        } else {
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| q == META_BASE_ALLOCATION || q == "base:")
        };
        if set {
            self.base_allocation_for = wanted.then(|| export.name().to_owned());
        }
        if wanted {
            // LIST replies carry id 0, as the protocol asks.
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut body = id.to_be_bytes().to_vec();
            body.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            step.reply(option, REP_META_CONTEXT, &body);
        }
        step.reply(option, REP_ACK, &[]);
        step
    }
}

/// Sends the server greeting and reads the client flags.
pub async fn greet<S>(stream: &mut S) -> Result<bool, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&greeting()).await?;
    stream.flush().await?;
    client_flags(stream.read_u32().await?)
}

/// Option haggling, until the client picks an export, asks for TLS or
/// leaves: reads each option and sends what [`Session::on_option`] answers.
pub async fn negotiate<S>(
    stream: &mut S,
    session: &mut Session<'_>,
) -> Result<Negotiated, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let magic = match stream.read_u64().await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(session.on_eof()),
            Err(e) => return Err(e.into()),
        };
        let option = stream.read_u32().await?;
        let len = stream.read_u32().await?;
        let step = match session.on_header(magic, option, len) {
            Some(step) => step,
            None => {
                // Bounded by on_header (MAX_OPTION_LEN) before allocating.
                let mut data = vec![0u8; len as usize];
                stream.read_exact(&mut data).await?;
                session.on_option(option, &data)
            }
        };
        let sent = send(stream, &step.replies).await;
        match step.then {
            Then::Continue => sent?,
            Then::End(negotiated) => {
                sent?;
                return Ok(negotiated);
            }
            Then::Leave(negotiated) => return Ok(negotiated),
            Then::Fail(error) => return Err(error),
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// NBD_INFO_EXPORT always, then the information the client asked for.
fn info(step: &mut Step, option: u32, export: &Export, requests: &[u16]) {
    let mut body = Vec::with_capacity(12);
    body.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    body.extend_from_slice(&export.size().to_be_bytes());
    body.extend_from_slice(&transmission_flags(export).to_be_bytes());
    step.reply(option, REP_INFO, &body);
    for &request in requests {
        let mut body = request.to_be_bytes().to_vec();
        match request {
            INFO_NAME => body.extend_from_slice(export.name().as_bytes()),
            INFO_DESCRIPTION => body.extend_from_slice(export.description.as_bytes()),
            INFO_BLOCK_SIZE => {
                let (min, preferred, max) = block_sizes(export);
                for v in [min, preferred, max] {
                    body.extend_from_slice(&v.to_be_bytes());
                }
            }
            _ => continue,
        }
        step.reply(option, REP_INFO, &body);
    }
}

/// Parses `u32 name length, name, u32 count, count × (u32 length, query)`.
fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let be32 = |at: usize| -> Option<usize> {
        Some(u32::from_be_bytes(data.get(at..at.checked_add(4)?)?.try_into().ok()?) as usize)
    };
    let name_len = be32(0)?;
    let name_end = 4usize.checked_add(name_len)?;
    let name = std::str::from_utf8(data.get(4..name_end)?).ok()?.to_owned();
    let count = be32(name_end)?;
    let mut at = name_end + 4;
    // Each query takes at least 4 bytes: a count beyond that is a lie.
    if count > data.len().saturating_sub(at) / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = be32(at)?;
        let end = (at + 4).checked_add(len)?;
        queries.push(std::str::from_utf8(data.get(at + 4..end)?).ok()?.to_owned());
        at = end;
    }
    (at == data.len()).then_some((name, queries))
}

/// What a client hears of a volume that is missing or that it may not open.
fn no_such_export(name: &str) -> String {
    format!("no export named {:?}", shorten(name, LOGGED_NAME))
}

/// Whether `peer` may open `export`; a refusal is logged with the peer's
/// identity (rate-limited) and counted.
fn permitted(peer: &Peer, export: &Export) -> bool {
    if export.allow.load().permits(peer) {
        return true;
    }
    export.metrics.refuse();
    if !crate::export::peer::may_log_refusal() {
        return false;
    }
    if export.allow.load().is_default() {
        tracing::warn!(
            peer = %peer,
            export = export.name(),
            "refused: a TCP peer without a verified client certificate, and the volume has no allow list; add allow = [\"ADDRESS/PREFIX\"] (or \"all\") to its [[volume]], or verify client certificates"
        );
    } else {
        tracing::warn!(
            peer = %peer,
            export = export.name(),
            "refused: the peer is not in this volume's allow list"
        );
    }
    false
}

/// Parses `u32 name length, name, u16 count, count × u16 info type`.
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name_end = 4usize.checked_add(name_len)?;
    let name = std::str::from_utf8(data.get(4..name_end)?).ok()?.to_owned();
    let count = u16::from_be_bytes(data.get(name_end..name_end + 2)?.try_into().ok()?) as usize;
    let list = data.get(name_end + 2..)?;
    if list.len() != count * 2 {
        return None;
    }
    let requests = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, requests))
}

/// Transmission flags: flush and FUA always (writes go to a page cache),
/// multi-conn because every connection shares one backing file, so a
/// flush on any connection persists writes completed on all of them.
/// TRIM only when the volume allows discards.
fn transmission_flags(export: &Export) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE
        | TFLAG_SEND_FAST_ZERO;
    if export.allow_discards {
        flags |= TFLAG_SEND_TRIM;
    }
    flags
}

/// Minimum, preferred and maximum block size. Any byte alignment works
/// (partial sectors are read-modify-written), but whole encryption
/// sectors avoid that cost, so the sector size is preferred.
fn block_sizes(export: &Export) -> (u32, u32, u32) {
    (1, export.volume.data.sector_size() as u32, MAX_PAYLOAD)
}

#[cfg(test)]
mod tests;
