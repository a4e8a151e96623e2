//! The fixed-newstyle handshake: option haggling up to the point where a
//! client picks an export (OPT_GO or EXPORT_NAME), asks for TLS (STARTTLS:
//! the caller upgrades the stream and calls [`negotiate`] again), or leaves.
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
pub enum Outcome {
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

/// Sends the server greeting and reads the client flags.
pub async fn greet<S>(stream: &mut S) -> Result<bool, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&hello).await?;
    stream.flush().await?;

    let client_flags = stream.read_u32().await?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(HandshakeError::UnknownClientFlags(client_flags));
    }
    Ok(client_flags & CLIENT_NO_ZEROES != 0)
}

/// Option haggling, until the client picks an export, asks for TLS or leaves.
pub async fn negotiate<S>(
    stream: &mut S,
    session: &mut Session<'_>,
) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut told_tls_required = false;
    loop {
        let magic = match stream.read_u64().await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(if told_tls_required {
                    Outcome::Refused
                } else {
                    Outcome::Closed
                })
            }
            Err(e) => return Err(e.into()),
        };
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadMagic(magic));
        }
        let option = stream.read_u32().await?;
        let len = stream.read_u32().await?;
        if len > MAX_OPTION_LEN {
            // Said before hanging up, so the client learns why.
            let _ = error(stream, option, REP_ERR_TOO_BIG, "option too long").await;
            return Err(HandshakeError::OptionTooLong(len));
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data).await?;

        let tls_required = session.tls == TlsPhase::Offered { required: true };
        if tls_required && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                return Err(HandshakeError::ExportNameWithoutTls);
            }
            error(
                stream,
                option,
                REP_ERR_TLS_REQD,
                "this server requires TLS: use STARTTLS (nbds:// URIs, qemu tls-creds)",
            )
            .await?;
            told_tls_required = true;
            continue;
        }

        match option {
            // The client promised not to: the transmission it expects
            // cannot be told from the one EXPORT_NAME implies.
            OPT_EXPORT_NAME if session.extended => {
                return Err(HandshakeError::ExportNameAfterExtendedHeaders);
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = session.exports.find(&name) else {
                    return Err(HandshakeError::UnknownExport(shorten(&name, LOGGED_NAME)));
                };
                if !permitted(session.peer, &export) {
                    return Err(HandshakeError::ExportNameRefused(shorten(
                        &name,
                        LOGGED_NAME,
                    )));
                }
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&export.size().to_be_bytes());
                reply.extend_from_slice(&transmission_flags(&export).to_be_bytes());
                if !session.no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&reply).await?;
                stream.flush().await?;
                let features = session.features(&export);
                return Ok(Outcome::Transmission(export, features));
            }
            OPT_ABORT => {
                // The client may already be gone; its ACK is a courtesy.
                let _ = reply(stream, option, REP_ACK, &[]).await;
                return Ok(if told_tls_required {
                    Outcome::Refused
                } else {
                    Outcome::Closed
                });
            }
            OPT_LIST => {
                if !data.is_empty() {
                    error(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    )
                    .await?;
                    continue;
                }
                let served = session
                    .exports
                    .iter()
                    .filter(|e| e.allow.load().permits(session.peer))
                    .map(|e| e.name().to_owned());
                let waiting = session.exports.unavailable();
                let waiting = waiting
                    .iter()
                    .filter(|u| u.allow.permits(session.peer))
                    .map(|u| u.name.clone());
                for name in served.chain(waiting).collect::<Vec<_>>() {
                    let name = name.as_bytes();
                    let mut body = Vec::with_capacity(4 + name.len());
                    body.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    body.extend_from_slice(name);
                    reply(stream, option, REP_SERVER, &body).await?;
                }
                reply(stream, option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = parse_info_request(&data) else {
                    error(stream, option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO").await?;
                    continue;
                };
                let Some(export) = session.exports.find(&name) else {
                    let msg = match session.exports.find_unavailable(&name) {
                        Some(u) if u.allow.permits(session.peer) => format!(
                            "volume {:?} is not available yet ({}); the daemon's log says why",
                            u.name, u.state
                        ),
                        _ => no_such_export(&name),
                    };
                    error(stream, option, REP_ERR_UNKNOWN, &msg).await?;
                    continue;
                };
                if !permitted(session.peer, &export) {
                    error(stream, option, REP_ERR_UNKNOWN, &no_such_export(&name)).await?;
                    continue;
                }
                send_info(stream, option, &export, &requests).await?;
                reply(stream, option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    let features = session.features(&export);
                    return Ok(Outcome::Transmission(export, features));
                }
            }
            OPT_STARTTLS => match session.tls {
                TlsPhase::Unavailable => {
                    error(
                        stream,
                        option,
                        REP_ERR_UNSUP,
                        "TLS is not configured on this listener",
                    )
                    .await?;
                }
                TlsPhase::Active => {
                    error(stream, option, REP_ERR_INVALID, "TLS is already active").await?;
                }
                TlsPhase::Offered { .. } if !data.is_empty() => {
                    error(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STARTTLS takes no data",
                    )
                    .await?;
                }
                TlsPhase::Offered { .. } => {
                    reply(stream, option, REP_ACK, &[]).await?;
                    return Ok(Outcome::StartTls);
                }
            },
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    error(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                    continue;
                }
                if session.extended {
                    // Extended headers take precedence; no downgrade.
                    error(
                        stream,
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated",
                    )
                    .await?;
                    continue;
                }
                session.structured = true;
                reply(stream, option, REP_ACK, &[]).await?;
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    error(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_EXTENDED_HEADERS takes no data",
                    )
                    .await?;
                    continue;
                }
                session.extended = true;
                reply(stream, option, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(stream, option, &data, session).await?;
            }
            _ => {
                error(stream, option, REP_ERR_UNSUP, "option not supported").await?;
            }
        }
    }
}

/// LIST_META_CONTEXT and SET_META_CONTEXT. The one context is
/// `base:allocation`; LIST with no queries, or the query `base:`, lists
/// it. SET needs structured replies and replaces any earlier selection.
async fn meta_context<S>(
    stream: &mut S,
    option: u32,
    data: &[u8],
    session: &mut Session<'_>,
) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let set = option == OPT_SET_META_CONTEXT;
    if set && !(session.structured || session.extended) {
        return error(
            stream,
            option,
            REP_ERR_INVALID,
            "NBD_OPT_SET_META_CONTEXT needs structured replies or extended headers first",
        )
        .await;
    }
    let Some((name, queries)) = parse_meta_request(data) else {
        return error(
            stream,
            option,
            REP_ERR_INVALID,
            "malformed meta context request",
        )
        .await;
    };
    let Some(export) = session.exports.find(&name) else {
        return error(stream, option, REP_ERR_UNKNOWN, &no_such_export(&name)).await;
    };
    if !permitted(session.peer, &export) {
        return error(stream, option, REP_ERR_UNKNOWN, &no_such_export(&name)).await;
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
        session.base_allocation_for = wanted.then(|| export.name().to_owned());
    }
    if wanted {
        // LIST replies carry id 0, as the protocol asks.
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
        reply(stream, option, REP_META_CONTEXT, &body).await?;
    }
    reply(stream, option, REP_ACK, &[]).await
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

async fn send_info<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    export: &Export,
    requests: &[u16],
) -> std::io::Result<()> {
    let mut body = Vec::with_capacity(12);
    body.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    body.extend_from_slice(&export.size().to_be_bytes());
    body.extend_from_slice(&transmission_flags(&export).to_be_bytes());
    reply(stream, option, REP_INFO, &body).await?;
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
        reply(stream, option, REP_INFO, &body).await?;
    }
    Ok(())
}

async fn reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    kind: u32,
    body: &[u8],
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(20 + body.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    stream.write_all(&out).await?;
    stream.flush().await
}

/// An error reply carrying a human-readable message, as the spec allows.
async fn error<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    kind: u32,
    message: &str,
) -> std::io::Result<()> {
    let mut end = message.len().min(MAX_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    reply(stream, option, kind, &message.as_bytes()[..end]).await
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
mod tests {
    use super::*;

    fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn meta_context_requests_parse_and_malformed_ones_are_refused() {
        let ok = meta_request("v", &["base:allocation", "qemu:dirty-bitmap:x"]);
        assert_eq!(
            parse_meta_request(&ok),
            Some((
                "v".to_string(),
                vec![
                    "base:allocation".to_string(),
                    "qemu:dirty-bitmap:x".to_string()
                ]
            ))
        );
        assert_eq!(
            parse_meta_request(&meta_request("", &[])),
            Some((String::new(), vec![]))
        );
        // Truncated, trailing bytes, a count larger than the data.
        assert_eq!(parse_meta_request(&ok[..ok.len() - 1]), None);
        let mut trailing = ok.clone();
        trailing.push(0);
        assert_eq!(parse_meta_request(&trailing), None);
        let mut lying = meta_request("v", &[]);
        lying[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_request(&lying), None);
    }

    #[test]
    fn info_request_parsing_is_bounds_checked() {
        let mut ok = Vec::new();
        ok.extend_from_slice(&3u32.to_be_bytes());
        ok.extend_from_slice(b"abc");
        ok.extend_from_slice(&1u16.to_be_bytes());
        ok.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&ok),
            Some(("abc".into(), vec![INFO_BLOCK_SIZE]))
        );
        assert_eq!(parse_info_request(&ok[..ok.len() - 1]), None);
        let mut huge = ok.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_info_request(&huge), None);
    }

    fn option(option: u32, data: &[u8]) -> Vec<u8> {
        let mut out = IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    /// Option replies: (option, reply type) each.
    fn replies(mut out: &[u8]) -> Vec<(u32, u32)> {
        let mut seen = Vec::new();
        while out.len() >= 20 {
            assert_eq!(be64(out), OPTION_REPLY_MAGIC);
            let len = be32(&out[16..]) as usize;
            seen.push((be32(&out[8..]), be32(&out[12..])));
            out = &out[20 + len..];
        }
        seen
    }

    #[tokio::test]
    async fn extended_headers_are_acknowledged_once_and_exclude_the_old_ways() {
        let exports = Exports::new(Vec::new());
        let peer = Peer::tcp(std::net::SocketAddr::from(([127, 0, 0, 1], 1)));
        let mut input = option(OPT_EXTENDED_HEADERS, b"x");
        input.extend(option(OPT_EXTENDED_HEADERS, &[]));
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(option(OPT_EXPORT_NAME, b"v"));
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(&input).await.unwrap();
        let mut session = Session::new(&peer, &exports, TlsPhase::Unavailable, true);
        let outcome = negotiate(&mut server, &mut session).await;
        assert!(matches!(
            outcome,
            Err(HandshakeError::ExportNameAfterExtendedHeaders)
        ));
        drop(server);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        assert_eq!(
            replies(&out),
            [
                (OPT_EXTENDED_HEADERS, REP_ERR_INVALID),
                (OPT_EXTENDED_HEADERS, REP_ACK),
                (OPT_STRUCTURED_REPLY, REP_ERR_EXT_HEADER_REQD),
            ]
        );
        assert!(session.extended);
    }
}
