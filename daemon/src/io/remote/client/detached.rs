//! A client without a connection, fed a server's replies as bytes: the
//! fuzz target's entry point with its oracle, and the unit tests'
//! harness. Built only for tests and fuzzing.

use super::*;

/// The outcomes of a `detached` client's requests, by cookie: a read's
/// bytes, or the errno (`None` for an error without one).
pub(super) type Outcome = Result<Vec<u8>, Option<i32>>;
pub(super) type Outcomes = Arc<Mutex<BTreeMap<u64, Outcome>>>;

/// A client with no connection and `requests` (command, offset, length)
/// in flight as cookies 0, 1, …, whose read buffers hold `fill` bytes
/// (standing in for a pooled buffer's old contents). For feeding it a
/// server's replies with `link::read_reply` (fuzzing and tests).
pub(super) fn detached(
    structured: bool,
    requests: &[(Command, u64, u32)],
    fill: u8,
) -> (Shared, Outcomes) {
    let shared = Shared {
        uri: NbdUri::parse("nbd+unix:///?socket=/nonexistent")
            .unwrap_or_else(|e| panic!("a fixed URI: {e}")),
        options: RemoteOptions::default(),
        info: ExportInfo {
            size: 1 << 20,
            flags: TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH,
            min_block: 1,
            preferred_block: 4096,
            max_block: 1 << 20,
            structured,
        },
        state: Mutex::new(State {
            up: vec![Some(1)],
            dirty: vec![0],
            ..State::default()
        }),
        changed: Condvar::new(),
        links: vec![Link::default()],
        closing: AtomicBool::new(false),
        counters: Counters::default(),
        on_loss: Mutex::new(None),
    };
    let outcomes = Outcomes::default();
    {
        let mut state = shared.lock();
        for (cookie, &(command, offset, length)) in requests.iter().enumerate() {
            let cookie = cookie as u64;
            let seen = outcomes.clone();
            let done: Done = Box::new(move |r| {
                let r = r.map(|b| b.to_vec()).map_err(|e| e.raw_os_error());
                seen.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(cookie, r);
            });
            let buf = (command == Command::Read).then(|| {
                let mut b = IoBuf::new(length as usize);
                b.fill(fill);
                b
            });
            state.pending.insert(
                cookie,
                Pending {
                    command,
                    flags: 0,
                    offset,
                    length,
                    payload: None,
                    buf,
                    sent_on: Some((0, 1)),
                    since: Instant::now(),
                    done: Some(done),
                    error: None,
                    covered: coverage::Coverage::default(),
                    ever_sent: true,
                    covers: 0,
                    losses: 0,
                },
            );
        }
    }
    (shared, outcomes)
}

/// Fuzzing (`fuzz/fuzz_targets/client.rs`): what a server sends, fed to
/// the client. The first byte's low bit picks the phase: 0 = the
/// handshake (greeting and option replies) for `negotiate`; 1 = replies
/// to four requests in flight (reads of 512 bytes at 0 and 64 KiB at
/// 4096, a write, a flush), read until the stream fails; bit 1 says
/// structured replies were negotiated.
///
/// The oracle: the replies are fed twice, to read buffers holding
/// different old contents. A read that succeeds must return exactly its
/// length, and the same bytes both times: every byte of it came from the
/// server (data, or zeros for a hole), none from the buffer's past.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz(data: &[u8]) {
    struct Peer<'a>(&'a [u8]);
    impl io::Read for Peer<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            io::Read::read(&mut self.0, buf)
        }
    }
    impl io::Write for Peer<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let _ = negotiate::negotiate(&mut Peer(rest), "fuzz");
        return;
    }
    let requests = [
        (Command::Read, 0u64, 512u32),
        (Command::Read, 4096, 65536),
        (Command::Write, 0, 4096),
        (Command::Flush, 0, 0),
    ];
    let run = |fill: u8| {
        let (shared, outcomes) = detached(mode & 2 != 0, &requests, fill);
        let mut stream = rest;
        while link::read_reply(&shared, &mut stream, mode & 2 != 0).is_ok() {}
        let outcomes = std::mem::take(&mut *outcomes.lock().unwrap_or_else(|p| p.into_inner()));
        for (cookie, outcome) in &outcomes {
            let (command, _, length) = requests[*cookie as usize];
            if let (Command::Read, Ok(bytes)) = (command, outcome) {
                assert_eq!(bytes.len(), length as usize, "a read of the wrong length");
            }
        }
        outcomes
    };
    let first = run(0xa5);
    let second = run(0x5a);
    assert_eq!(
        first, second,
        "a read's outcome depends on its buffer's old contents"
    );
}
