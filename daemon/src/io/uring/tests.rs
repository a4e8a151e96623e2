//! Unit tests of `io/uring.rs`, in a file of their own to keep that one short.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use super::*;

/// A one-ring engine (alive for the rest of the test run) and a socket
/// pair whose first end is non-blocking, as tokio leaves sockets.
fn one_ring_and_a_socket_pair(
    idle_poll: Duration,
) -> (&'static UringEngine, UnixStream, UnixStream) {
    let engine = Box::leak(Box::new(UringEngine::start(1, idle_poll).unwrap()));
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    (engine, ours, theirs)
}

/// A receive posted before any data arrives waits for it, even on a
/// non-blocking socket (as tokio leaves them), then reports the count;
/// a closed peer reads as 0; jobs a ring thread submits stay on it.
#[test]
fn receives_wait_for_data_and_local_jobs_stay_on_the_ring() {
    let (engine, ours, mut theirs) = one_ring_and_a_socket_pair(Duration::ZERO);
    assert!(
        engine.receives_sockets(),
        "kernel 5.7 or later polls sockets"
    );
    let fd = ours.as_raw_fd();
    let (tx, rx) = mpsc::channel();
    let on_ring = tx.clone();
    engine.submit(move |ring| {
        let thread = std::thread::current().id();
        ring.recv(
            fd,
            IoBuf::new(64),
            8,
            Box::new(move |ring, n, buf| {
                let got = n.map(|n| buf[8..8 + n].to_vec()).map_err(|e| e.to_string());
                on_ring.send(("first", got)).unwrap();
                let local = on_ring.clone();
                // Queued on this thread: it must run here, and only
                // after this continuation returns.
                engine.submit(move |_| {
                    let same = std::thread::current().id() == thread;
                    local.send(("local", Ok(vec![same as u8]))).unwrap();
                });
                ring.recv(
                    fd,
                    buf,
                    0,
                    Box::new(move |_, n, _| {
                        on_ring
                            .send(("eof", n.map(|n| vec![n as u8]).map_err(|e| e.to_string())))
                            .unwrap()
                    }),
                );
            }),
        )
    });
    // Nothing sent yet: the receive must still be waiting.
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    theirs.write_all(b"hello").unwrap();
    let wait = Duration::from_secs(10);
    assert_eq!(
        rx.recv_timeout(wait).unwrap(),
        ("first", Ok(b"hello".to_vec()))
    );
    assert_eq!(rx.recv_timeout(wait).unwrap(), ("local", Ok(vec![1])));
    drop(theirs);
    assert_eq!(rx.recv_timeout(wait).unwrap(), ("eof", Ok(vec![0])));
    drop(tx);
}

/// A ring polling after work sees a receive complete while it polls:
/// its deferred completion work is flagged in the SQ ring and run
/// without sleeping. Were the flag not watched, the completion would
/// wait for the window to end (the ring then sleeps and runs it).
#[test]
fn an_idle_polling_ring_sees_completions_within_its_window() {
    let window = Duration::from_secs(3);
    let (engine, ours, mut theirs) = one_ring_and_a_socket_pair(window);
    let fd = ours.as_raw_fd();
    let (tx, rx) = mpsc::channel();
    let armed = tx.clone();
    engine.submit(move |ring| {
        ring.recv(
            fd,
            IoBuf::new(16),
            0,
            Box::new(move |_, n, _| tx.send(n.map_err(|e| e.to_string())).unwrap()),
        );
        armed.send(Ok(usize::MAX)).unwrap();
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        Ok(usize::MAX)
    );
    let sent = std::time::Instant::now();
    theirs.write_all(b"ping").unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), Ok(4));
    let took = sent.elapsed();
    assert!(
        took < window / 2,
        "the receive completed after {took:?}: the poll did not see it"
    );
    drop(ours);
}
