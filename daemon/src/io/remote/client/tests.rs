//! Unit tests of `io/remote/client/mod.rs`, in a file of their own to keep that one short.

use super::*;

fn simple_ok(cookie: u64) -> Vec<u8> {
    let mut out = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out
}

/// Feeds the server's simple OK replies to `cookies`.
fn ok(shared: &Shared, cookies: &[u64]) {
    let bytes: Vec<u8> = cookies.iter().flat_map(|&c| simple_ok(c)).collect();
    let mut r = &bytes[..];
    while !r.is_empty() {
        link::read_reply(shared, &mut r, false).expect("a framed reply");
    }
}

/// Submits a request as `dispatch_new` would (what it covers and the
/// losses so far), already sent on the one connection.
fn submit(shared: &Shared, outcomes: &Outcomes, cookie: u64, command: Command, flags: u16) {
    let seen = outcomes.clone();
    let mut state = shared.lock();
    let (covers, losses) = (state.acked, state.losses);
    state.pending.insert(
        cookie,
        Pending {
            command,
            flags,
            offset: 0,
            length: if command == Command::Flush { 0 } else { 512 },
            payload: None,
            buf: None,
            sent_on: Some((0, 1)),
            since: Instant::now(),
            done: Some(Box::new(move |r| {
                let r = r.map(|b| b.to_vec()).map_err(|e| e.raw_os_error());
                seen.lock().unwrap().insert(cookie, r);
            })),
            error: None,
            covered: coverage::Coverage::default(),
            ever_sent: true,
            covers,
            losses,
        },
    );
}

fn lose_connection(shared: &Shared) -> Option<DurabilityLost> {
    let mut state = shared.lock();
    shared.connection_lost(&mut state, 0)
}

#[test]
fn unflushed_writes_on_a_lost_connection_are_a_loss() {
    let (shared, outcomes) = detached(false, &[], 0);
    submit(&shared, &outcomes, 0, Command::Write, 0);
    ok(&shared, &[0]);
    assert_eq!(
        lose_connection(&shared),
        Some(DurabilityLost::Unflushed { writes: 1 })
    );
    // Counted once: the next connection starts clean.
    assert_eq!(lose_connection(&shared), None);
}

#[test]
fn flushed_and_fua_writes_are_not_a_loss() {
    let (shared, outcomes) = detached(false, &[], 0);
    submit(&shared, &outcomes, 0, Command::Write, 0);
    ok(&shared, &[0]);
    submit(&shared, &outcomes, 1, Command::Flush, 0);
    ok(&shared, &[1]);
    submit(&shared, &outcomes, 2, Command::Write, CMD_FLAG_FUA);
    ok(&shared, &[2]);
    assert_eq!(lose_connection(&shared), None);
    assert_eq!(outcomes.lock().unwrap()[&1], Ok(vec![]));
    // A FLUSH submitted before a write was acknowledged does not cover it.
    submit(&shared, &outcomes, 3, Command::Flush, 0);
    submit(&shared, &outcomes, 4, Command::Write, 0);
    ok(&shared, &[4, 3]);
    assert_eq!(
        lose_connection(&shared),
        Some(DurabilityLost::Unflushed { writes: 1 })
    );
}

#[test]
fn a_flush_in_flight_across_a_loss_fails() {
    let (shared, outcomes) = detached(false, &[], 0);
    submit(&shared, &outcomes, 0, Command::Write, 0);
    ok(&shared, &[0]);
    submit(&shared, &outcomes, 1, Command::Flush, 0);
    assert!(lose_connection(&shared).is_some());
    // Re-sent after the reconnect and answered by a server that lost
    // the write: the FLUSH must not vouch for it.
    ok(&shared, &[1]);
    assert_eq!(outcomes.lock().unwrap()[&1], Err(None));
    // A FLUSH submitted after the loss fails too, in the client
    // itself: the backing's record of the loss (`io/write_back.rs`)
    // may come a moment later, and this FLUSH must not win that race.
    submit(&shared, &outcomes, 2, Command::Flush, 0);
    ok(&shared, &[2]);
    assert_eq!(outcomes.lock().unwrap()[&2], Err(None));
}

#[test]
fn writes_in_flight_on_a_lost_connection_are_a_loss() {
    let (shared, outcomes) = detached(false, &[], 0);
    submit(&shared, &outcomes, 0, Command::Write, CMD_FLAG_FUA);
    assert_eq!(
        lose_connection(&shared),
        Some(DurabilityLost::InFlight { writes: 1 })
    );
    // Reads in flight are not.
    let (shared, outcomes) = detached(false, &[(Command::Read, 0, 512)], 0);
    drop(outcomes);
    assert_eq!(lose_connection(&shared), None);
}

/// A new write through `dispatch_new` (as `NbdClient::submit` makes one);
/// its outcome lands in `outcomes` under `key`.
fn write_new(shared: &Shared, outcomes: &Outcomes, key: u64, offset: u64, length: u32) {
    let seen = outcomes.clone();
    shared.dispatch_new(Pending {
        command: Command::Write,
        flags: 0,
        offset,
        length,
        payload: Some(Arc::new(IoBuf::new(length as usize))),
        buf: None,
        sent_on: None,
        since: Instant::now(),
        done: Some(Box::new(move |r| {
            let r = r.map(|b| b.to_vec()).map_err(|e| e.raw_os_error());
            seen.lock().unwrap().insert(key, r);
        })),
        error: None,
        covered: coverage::Coverage::default(),
        ever_sent: false,
        covers: 0,
        losses: 0,
    });
}

#[test]
fn a_write_cut_off_by_a_lost_connection_fences_its_range() {
    let (shared, outcomes) = detached(false, &[], 0);
    // Cookie 0: a 512-byte write at 0, in flight when the connection dies.
    submit(&shared, &outcomes, 0, Command::Write, 0);
    assert!(lose_connection(&shared).is_some());
    // New requests get cookies of their own.
    shared.lock().next_cookie = 1000;
    // A newer write over it fails before it is sent; one beside it goes out.
    write_new(&shared, &outcomes, 100, 256, 4096);
    write_new(&shared, &outcomes, 101, 512, 4096);
    let seen = outcomes.lock().unwrap();
    assert_eq!(seen.get(&100), Some(&Err(None)), "{seen:?}");
    assert_eq!(seen.get(&101), None, "not refused: {seen:?}");
    drop(seen);
    assert_eq!(
        shared.lock().pending.len(),
        2,
        "the cut-off write and the neighbour"
    );
}

#[test]
fn a_read_of_a_fenced_range_is_not_refused() {
    let (shared, outcomes) = detached(false, &[], 0);
    submit(&shared, &outcomes, 0, Command::Write, 0);
    assert!(lose_connection(&shared).is_some());
    // New requests get cookies of their own.
    shared.lock().next_cookie = 1000;
    shared.dispatch_new(Pending {
        command: Command::Read,
        flags: 0,
        offset: 0,
        length: 512,
        payload: None,
        buf: None,
        sent_on: None,
        since: Instant::now(),
        done: Some(Box::new(|_| {})),
        error: None,
        covered: coverage::Coverage::default(),
        ever_sent: false,
        covers: 0,
        losses: 0,
    });
    assert_eq!(shared.lock().pending.len(), 2);
    drop(outcomes);
}

#[test]
fn the_hook_hears_of_a_loss_even_one_before_it_was_installed() {
    let (shared, outcomes) = detached(false, &[], 0);
    submit(&shared, &outcomes, 0, Command::Write, 0);
    ok(&shared, &[0]);
    let loss = lose_connection(&shared).expect("a loss");
    shared.report_loss(&loss);
    let client = NbdClient {
        shared: Arc::new(shared),
    };
    let heard = Arc::new(Mutex::new(Vec::new()));
    let h = heard.clone();
    client.on_durability_lost(Arc::new(move |l| h.lock().unwrap().push(l.clone())));
    assert_eq!(*heard.lock().unwrap(), vec![loss]);
    assert!(client
        .status()
        .last_error
        .unwrap()
        .contains("not yet flushed"));
}

/// A server that accepts and then sends a valid greeting and option
/// replies one byte every `pace`, for as long as the client listens.
fn trickling_server(path: &std::path::Path, pace: Duration) {
    let listener = std::os::unix::net::UnixListener::bind(path).expect("bind");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                use std::io::Write;
                let mut bytes = NBDMAGIC.to_be_bytes().to_vec();
                bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
                bytes.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
                for _ in 0..1000 {
                    bytes.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
                    bytes.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
                    bytes.extend_from_slice(&REP_ACK.to_be_bytes());
                    bytes.extend_from_slice(&0u32.to_be_bytes());
                }
                for b in bytes {
                    // The server's own pace, not a test's synchronisation.
                    std::thread::sleep(pace);
                    if conn.write_all(&[b]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

#[test]
fn a_trickling_handshake_fails_within_the_deadline() {
    let dir = std::env::temp_dir().join(format!("hostcrypt-trickle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket = dir.join("nbd.sock");
    trickling_server(&socket, Duration::from_millis(50));
    let timeout = Duration::from_secs(1);
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let options = RemoteOptions {
        connections: 4,
        timeout,
        tls_certificates: None,
    };
    let started = Instant::now();
    // In a thread, so a regression fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(NbdClient::connect(&uri, options).map(drop));
    });
    let outcome = rx
        .recv_timeout(timeout * 5)
        .expect("connect returned within five times its deadline");
    let elapsed = started.elapsed();
    match outcome {
        Err(ClientError::HandshakeTimedOut { after, .. }) => assert_eq!(after, timeout),
        other => panic!("{other:?}"),
    }
    assert!(elapsed < timeout * 2, "took {elapsed:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn writes_wait_for_the_lease_and_fail_once_it_is_revoked() {
    let (shared, outcomes) = detached(false, &[], 0);
    shared.lock().next_cookie = 1000;
    shared.lock().lease = lease::WriteLease::Until(Instant::now());
    // Held: in the table, on no connection, never sent.
    write_new(&shared, &outcomes, 100, 0, 4096);
    let held = |shared: &Shared| {
        shared
            .lock()
            .pending
            .values()
            .filter(|p| p.sent_on.is_none() && !p.ever_sent)
            .count()
    };
    assert_eq!(held(&shared), 1);
    // A read is never held.
    submit(&shared, &outcomes, 1, Command::Read, 0);
    assert_eq!(held(&shared), 1);
    // Renewed: the held write goes out.
    shared.renew_lease(Instant::now() + Duration::from_secs(60));
    assert_eq!(held(&shared), 0);
    assert!(shared.lock().pending.values().all(|p| p.ever_sent));
    // Run out again, then revoked: a held write fails, a new one too.
    shared.lock().lease = lease::WriteLease::Until(Instant::now());
    write_new(&shared, &outcomes, 101, 8192, 4096);
    assert_eq!(held(&shared), 1);
    shared.revoke_lease("taken over".into());
    write_new(&shared, &outcomes, 102, 16384, 4096);
    // A renewal cannot undo a revocation.
    shared.renew_lease(Instant::now() + Duration::from_secs(60));
    write_new(&shared, &outcomes, 103, 16384, 4096);
    let seen = outcomes.lock().unwrap();
    for key in [101, 102, 103] {
        assert_eq!(seen.get(&key), Some(&Err(None)), "{key}: {seen:?}");
    }
    assert_eq!(seen.get(&100), None, "sent, still in flight: {seen:?}");
}
