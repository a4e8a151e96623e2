//! Unit tests of `frontend/nbd/handshake.rs`, in a file of their own to keep that one short.

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

/// Feeds `options` to a fresh session; returns each reply's (option,
/// type) and how the last step ended.
fn run_table(tls: TlsPhase, options: &[(u32, &[u8])]) -> (Vec<(u32, u32)>, &'static str) {
    let exports = Exports::new(Vec::new());
    let peer = Peer::tcp(std::net::SocketAddr::from(([127, 0, 0, 1], 1)));
    let mut session = Session::new(&peer, &exports, tls, true);
    let mut seen = Vec::new();
    for &(option, data) in options {
        let step = session.on_option(option, data);
        seen.extend(replies(&step.replies));
        let end = match step.then {
            Then::Continue => continue,
            Then::End(Negotiated::StartTls) => "starttls",
            Then::End(_) => "end",
            Then::Leave(Negotiated::Refused) => "refused",
            Then::Leave(_) => "closed",
            Then::Fail(_) => "fail",
        };
        return (seen, end);
    }
    (seen, "continue")
}

/// The TLS phase, the options sent, the replies expected, how it ends.
type Row<'a> = (TlsPhase, &'a [(u32, &'a [u8])], &'a [(u32, u32)], &'a str);

#[test]
fn options_answer_as_the_table_says() {
    let no_tls = TlsPhase::Unavailable;
    let required = TlsPhase::Offered { required: true };
    let offered = TlsPhase::Offered { required: false };
    let name_v = [0, 0, 0, 1, b'v', 0, 0];
    #[rustfmt::skip]
    let table: &[Row] = &[
        // Unknown options are unsupported; the client falls back.
        (no_tls, &[(99, b"")], &[(99, REP_ERR_UNSUP)], "continue"),
        // LIST with data is invalid; without, an empty list is an ACK.
        (no_tls, &[(OPT_LIST, b"x")], &[(OPT_LIST, REP_ERR_INVALID)], "continue"),
        (no_tls, &[(OPT_LIST, b"")], &[(OPT_LIST, REP_ACK)], "continue"),
        // GO for a missing export: UNKNOWN, and the session goes on.
        (no_tls, &[(OPT_GO, &name_v)], &[(OPT_GO, REP_ERR_UNKNOWN)], "continue"),
        (no_tls, &[(OPT_GO, b"\0")], &[(OPT_GO, REP_ERR_INVALID)], "continue"),
        // STARTTLS where there is none, with data, and accepted.
        (no_tls, &[(OPT_STARTTLS, b"")], &[(OPT_STARTTLS, REP_ERR_UNSUP)], "continue"),
        (offered, &[(OPT_STARTTLS, b"x")], &[(OPT_STARTTLS, REP_ERR_INVALID)], "continue"),
        (offered, &[(OPT_STARTTLS, b"")], &[(OPT_STARTTLS, REP_ACK)], "starttls"),
        // TLS required: everything but STARTTLS and ABORT is refused;
        // EXPORT_NAME cannot be answered and ends the connection; a
        // client told so that aborts counts as refused.
        (required, &[(OPT_LIST, b"")], &[(OPT_LIST, REP_ERR_TLS_REQD)], "continue"),
        (required, &[(OPT_EXPORT_NAME, b"v")], &[], "fail"),
        (required, &[(OPT_GO, &name_v), (OPT_ABORT, b"")],
         &[(OPT_GO, REP_ERR_TLS_REQD), (OPT_ABORT, REP_ACK)], "refused"),
        (no_tls, &[(OPT_ABORT, b"")], &[(OPT_ABORT, REP_ACK)], "closed"),
        // SET_META_CONTEXT needs structured replies first.
        (no_tls, &[(OPT_SET_META_CONTEXT, b"")], &[(OPT_SET_META_CONTEXT, REP_ERR_INVALID)], "continue"),
        (no_tls, &[(OPT_STRUCTURED_REPLY, b""), (OPT_LIST_META_CONTEXT, b"\0")],
         &[(OPT_STRUCTURED_REPLY, REP_ACK), (OPT_LIST_META_CONTEXT, REP_ERR_INVALID)], "continue"),
        // Unknown export by EXPORT_NAME: no reply exists for it.
        (no_tls, &[(OPT_EXPORT_NAME, b"v")], &[], "fail"),
    ];
    for (i, (tls, options, expected, end)) in table.iter().enumerate() {
        let (seen, ended) = run_table(*tls, options);
        assert_eq!((&seen[..], ended), (*expected, *end), "row {i}");
    }
}

#[test]
fn a_bad_header_ends_the_handshake_and_says_why_when_it_can() {
    let exports = Exports::new(Vec::new());
    let peer = Peer::tcp(std::net::SocketAddr::from(([127, 0, 0, 1], 1)));
    let session = Session::new(&peer, &exports, TlsPhase::Unavailable, true);
    assert!(session.on_header(IHAVEOPT, OPT_LIST, 0).is_none());
    let bad_magic = session.on_header(1, OPT_LIST, 0).unwrap();
    assert!(bad_magic.replies.is_empty());
    assert!(matches!(
        bad_magic.then,
        Then::Fail(HandshakeError::BadMagic(1))
    ));
    let too_long = session
        .on_header(IHAVEOPT, OPT_LIST, MAX_OPTION_LEN + 1)
        .unwrap();
    assert_eq!(replies(&too_long.replies), [(OPT_LIST, REP_ERR_TOO_BIG)]);
    assert!(matches!(
        too_long.then,
        Then::Fail(HandshakeError::OptionTooLong(_))
    ));
    assert_eq!(client_flags(CLIENT_FIXED_NEWSTYLE).ok(), Some(false));
    assert!(client_flags(1 << 7).is_err());
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
