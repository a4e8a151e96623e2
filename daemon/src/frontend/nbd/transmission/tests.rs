//! Unit tests of `frontend/nbd/transmission.rs`, in a file of their own to keep that one short.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::super::budget::ReplyMemory;
use super::*;
use crate::export::access::AllowList;

const SIZE: u64 = 8 << 20;

struct Served {
    to_server: Box<dyn AsyncWrite + Unpin + Send>,
    from_server: Box<dyn AsyncRead + Unpin + Send>,
    export: Arc<Export>,
    /// The daemon-wide reply budget this connection draws on.
    memory: Arc<ReplyMemory>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    shutdown: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

/// A temp volume of SIZE bytes in a fresh directory (kept alive by
/// the returned guard), exported to anyone.
fn temp_export() -> (Arc<Export>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let geometry = crate::volume::Geometry {
        size: SIZE,
        sector_size: 512,
    };
    let volume = crate::volume::open_temp(
        "t",
        &dir.path().join("volume"),
        geometry,
        &Default::default(),
        &crate::volume::Claimant::local(),
    )
    .unwrap();
    let export = Arc::new(Export::new(
        volume,
        String::new(),
        true,
        AllowList::anyone(),
    ));
    (export, dir)
}

/// Which reader serves the connection: the tokio task (over an
/// in-memory duplex stream) or a ring (over a Unix socket pair).
#[derive(Clone, Copy)]
enum Reader {
    Task,
    Ring,
}

/// One ring, private to these tests.
fn test_rings() -> Arc<crate::io::uring::UringEngine> {
    static RINGS: std::sync::OnceLock<Arc<crate::io::uring::UringEngine>> =
        std::sync::OnceLock::new();
    RINGS
        .get_or_init(|| {
            Arc::new(crate::io::uring::UringEngine::start(1, std::time::Duration::ZERO).unwrap())
        })
        .clone()
}

fn serve_volume(features: Features, reader: Reader) -> Served {
    serve_volume_with(features, reader, route(None))
}

/// [`serve_volume`] with replies routed by `route` (its `direct` socket
/// is ignored: the task reader's stream is in memory, the ring reader
/// sends on its own socket).
fn serve_volume_with(features: Features, reader: Reader, route: ReplyRoute) -> Served {
    let (export, dir) = temp_export();
    let memory = route.memory.clone();
    let (stop, shutdown) = watch::channel(false);
    let served = export.clone();
    let (server, from_server, to_server): (
        _,
        Box<dyn AsyncRead + Unpin + Send>,
        Box<dyn AsyncWrite + Unpin + Send>,
    ) = match reader {
        Reader::Task => {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let (server_r, server_w) = tokio::io::split(server);
            let (from_server, to_server) = tokio::io::split(client);
            let server = tokio::spawn(async move {
                serve(
                    server_r, server_w, route, served, features, shutdown, "test",
                )
                .await
            });
            (server, Box::new(from_server), Box::new(to_server))
        }
        Reader::Ring => {
            let (client, server) = std::os::unix::net::UnixStream::pair().unwrap();
            let client = tokio::net::UnixStream::from_std({
                client.set_nonblocking(true).unwrap();
                client
            })
            .unwrap();
            server.set_nonblocking(true).unwrap();
            let (from_server, to_server) = client.into_split();
            let rings = test_rings();
            let server = tokio::spawn(async move {
                super::super::ring_reader::serve_on_ring(
                    server.into(),
                    rings,
                    served,
                    features,
                    shutdown,
                    "test",
                    route,
                )
                .await
            });
            (server, Box::new(from_server), Box::new(to_server))
        }
    };
    Served {
        to_server,
        from_server,
        export,
        memory,
        server,
        shutdown: stop,
        _dir: dir,
    }
}

const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn route(direct: Option<std::os::fd::RawFd>) -> ReplyRoute {
    ReplyRoute {
        direct,
        timeout: REPLY_TIMEOUT,
        memory: crate::frontend::nbd::budget::ReplyMemory::new(
            crate::frontend::nbd::budget::DEFAULT_REPLY_MEMORY,
        ),
    }
}
const SIMPLE: Features = Features {
    structured: false,
    extended: false,
    base_allocation: false,
};
const EXTENDED: Features = Features {
    structured: true,
    extended: true,
    base_allocation: true,
};

fn request(command: Command, flags: u16, cookie: u64, offset: u64, length: u64) -> Request {
    Request {
        flags,
        command,
        cookie,
        offset,
        length,
    }
}

impl Served {
    async fn send(&mut self, req: Request, payload: &[u8]) {
        let extended = req.flags & CMD_FLAG_PAYLOAD_LEN != 0
            || matches!(req.command, Command::Trim | Command::BlockStatus)
                && req.length > u64::from(u32::MAX);
        self.send_as(req, payload, extended).await;
    }

    async fn send_as(&mut self, req: Request, payload: &[u8], extended: bool) {
        if extended {
            self.to_server
                .write_all(&req.encode_extended())
                .await
                .unwrap();
        } else {
            self.to_server.write_all(&req.encode()).await.unwrap();
        }
        self.to_server.write_all(payload).await.unwrap();
    }

    /// A simple reply: (error, cookie), and `read_len` bytes of data
    /// when the error is 0.
    async fn simple(&mut self, read_len: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.from_server.read_exact(&mut h).await.unwrap();
        assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC);
        let (error, cookie) = (be32(&h[4..]), be64(&h[8..]));
        let mut data = vec![0u8; if error == 0 { read_len } else { 0 }];
        self.from_server.read_exact(&mut data).await.unwrap();
        (error, cookie, data)
    }

    /// An extended reply chunk: (flags, type, cookie, offset, payload).
    async fn extended_chunk(&mut self) -> (u16, u16, u64, u64, Vec<u8>) {
        let mut h = [0u8; 32];
        self.from_server.read_exact(&mut h).await.unwrap();
        assert_eq!(be32(&h), EXTENDED_REPLY_MAGIC);
        let mut payload = vec![0u8; be64(&h[24..]) as usize];
        self.from_server.read_exact(&mut payload).await.unwrap();
        (
            be16(&h[4..]),
            be16(&h[6..]),
            be64(&h[8..]),
            be64(&h[16..]),
            payload,
        )
    }

    async fn at_eof(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.from_server.read(&mut byte).await, Ok(0))
    }

    fn completed_reads(&self) -> u64 {
        self.export
            .metrics
            .commands()
            .next()
            .map_or(0, |c| c.requests)
    }
}

async fn write_then_read_with_simple_replies(reader: Reader) {
    let mut s = serve_volume(SIMPLE, reader);
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    s.send(request(Command::Write, 0, 1, 8192, 4096), &data)
        .await;
    assert_eq!(s.simple(0).await, (0, 1, vec![]));
    s.send(request(Command::Read, 0, 2, 8192, 4096), &[]).await;
    assert_eq!(s.simple(4096).await, (0, 2, data));
}

async fn every_request_is_answered_before_disc_closes(reader: Reader) {
    let mut s = serve_volume(SIMPLE, reader);
    for cookie in 0..32u64 {
        s.send(request(Command::Read, 0, cookie, cookie * 4096, 4096), &[])
            .await;
    }
    s.send(request(Command::Disc, 0, 99, 0, 0), &[]).await;
    let mut cookies = Vec::new();
    for _ in 0..32 {
        let (error, cookie, data) = s.simple(4096).await;
        assert_eq!((error, data.len()), (0, 4096));
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (0..32).collect::<Vec<_>>(), "one reply per cookie");
    assert!(s.at_eof().await, "nothing after the last reply");
    assert!(s.server.await.unwrap().is_ok());
}

async fn bad_magic_ends_the_connection_after_earlier_replies(reader: Reader) {
    let mut s = serve_volume(SIMPLE, reader);
    s.send(request(Command::Flush, 0, 5, 0, 0), &[]).await;
    let mut garbage = request(Command::Read, 0, 6, 0, 512).encode();
    garbage[0] ^= 0xff;
    s.to_server.write_all(&garbage).await.unwrap();
    assert_eq!(s.simple(0).await, (0, 5, vec![]));
    assert!(
        s.at_eof().await,
        "no reply to a request that cannot be framed"
    );
    assert!(s.server.await.unwrap().is_ok());
}

async fn refused_write_payload_is_consumed_and_the_stream_stays_framed(reader: Reader) {
    let mut s = serve_volume(SIMPLE, reader);
    // Past the end: ENOSPC, and its 4 KiB payload must not be read as
    // the next header.
    s.send(request(Command::Write, 0, 1, SIZE, 4096), &[0xAA; 4096])
        .await;
    s.send(request(Command::Write, 1 << 9, 2, 0, 512), &[0xBB; 512])
        .await;
    s.send(request(Command::Read, 0, 3, 0, 512), &[]).await;
    assert_eq!(s.simple(0).await, (ENOSPC, 1, vec![]));
    assert_eq!(s.simple(0).await, (EINVAL, 2, vec![]), "unknown flag");
    assert_eq!(s.simple(512).await, (0, 3, vec![0; 512]));
}

async fn byte_budget_bounds_what_one_connection_pins(reader: Reader) {
    let mut s = serve_volume(SIMPLE, reader);
    const READ: u64 = 4 << 20;
    let in_budget = u64::from(CONNECTION_UNITS) * UNIT / READ;
    let sent = in_budget + 8;
    for cookie in 0..sent {
        s.send(request(Command::Read, 0, cookie, 0, READ), &[])
            .await;
    }
    // Replies are not read: once the budget is spent the reader must
    // stop taking requests.
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.completed_reads() < in_budget {
        assert!(Instant::now() < deadline, "the budget's reads never ran");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let watch_until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < watch_until {
        assert_eq!(s.completed_reads(), in_budget, "a read ran past the budget");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..sent {
        let (error, _, data) = s.simple(READ as usize).await;
        assert_eq!((error, data.len() as u64), (0, READ));
    }
    assert_eq!(s.completed_reads(), sent);
}

async fn extended_headers_carry_payload_lengths_and_64_bit_ranges(reader: Reader) {
    let mut s = serve_volume(EXTENDED, reader);
    let data = vec![0x5Au8; 8192];
    let write = request(Command::Write, CMD_FLAG_PAYLOAD_LEN, 1, 1 << 20, 8192);
    s.send(write, &data).await;
    let (flags, kind, cookie, offset, payload) = s.extended_chunk().await;
    assert_eq!(
        (flags, kind, cookie, offset, payload.len()),
        (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, 1 << 20, 0)
    );

    s.send_as(request(Command::Read, 0, 2, 1 << 20, 8192), &[], true)
        .await;
    let (_, kind, cookie, offset, payload) = s.extended_chunk().await;
    assert_eq!((kind, cookie, offset), (REPLY_TYPE_OFFSET_DATA, 2, 1 << 20));
    assert_eq!(be64(&payload), 1 << 20, "the data's offset");
    assert_eq!(&payload[8..], &data[..]);

    // Block status over the whole volume: 64-bit descriptors, hole /
    // data / hole.
    s.send_as(request(Command::BlockStatus, 0, 3, 0, SIZE), &[], true)
        .await;
    let (_, kind, cookie, _, payload) = s.extended_chunk().await;
    assert_eq!((kind, cookie), (REPLY_TYPE_BLOCK_STATUS_EXT, 3));
    assert_eq!(be32(&payload), BASE_ALLOCATION_ID);
    let count = be32(&payload[4..]) as usize;
    assert_eq!(payload.len(), 8 + 16 * count);
    let extents: Vec<(u64, u64)> = payload[8..]
        .chunks(16)
        .map(|d| (be64(d), be64(&d[8..])))
        .collect();
    assert_eq!(extents.iter().map(|e| e.0).sum::<u64>(), SIZE);
    let data_extent = extents.iter().find(|e| e.1 == 0).expect("a data extent");
    assert!(data_extent.0 >= 8192);

    // A 64-bit trim length past the end: an error chunk, not a
    // truncated 32-bit range.
    s.send(request(Command::Trim, 0, 4, 0, 1 << 40), &[]).await;
    let (_, kind, cookie, _, payload) = s.extended_chunk().await;
    assert_eq!(
        (kind, cookie, be32(&payload)),
        (REPLY_TYPE_ERROR, 4, EINVAL)
    );

    // A payload on a command that takes none is consumed, then refused.
    let flush = request(Command::Flush, CMD_FLAG_PAYLOAD_LEN, 5, 0, 16);
    s.send(flush, &[0xEE; 16]).await;
    let (_, kind, cookie, _, payload) = s.extended_chunk().await;
    assert_eq!(
        (kind, cookie, be32(&payload)),
        (REPLY_TYPE_ERROR, 5, EINVAL)
    );

    // A write without PAYLOAD_LEN (as QEMU 10 sends them) is still a
    // write of its length.
    s.send_as(request(Command::Write, 0, 6, 0, 512), &[7; 512], true)
        .await;
    assert_eq!(s.extended_chunk().await.1, REPLY_TYPE_NONE);
    s.send_as(request(Command::Read, 0, 7, 0, 512), &[], true)
        .await;
    assert_eq!(&s.extended_chunk().await.4[8..], &[7; 512][..]);

    // A payload over the maximum cannot be consumed: the end.
    let huge = request(Command::Flush, CMD_FLAG_PAYLOAD_LEN, 8, 0, 1 << 40);
    s.send(huge, &[]).await;
    assert!(s.at_eof().await);
    assert!(s.server.await.unwrap().is_ok());
}

async fn a_write_larger_than_the_read_buffer_arrives_whole(reader: Reader) {
    let mut s = serve_volume(SIMPLE, reader);
    let len = 3 * READ_BUFFER + 4096;
    let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    s.send(request(Command::Write, 0, 1, 4096, len as u64), &data)
        .await;
    assert_eq!(s.simple(0).await, (0, 1, vec![]));
    s.send(request(Command::Read, 0, 2, 4096, len as u64), &[])
        .await;
    assert!(s.simple(len).await == (0, 2, data), "read back differs");
}

async fn shutdown_ends_a_connection_waiting_for_requests(reader: Reader) {
    let mut s = serve_volume(SIMPLE, reader);
    s.send(request(Command::Flush, 0, 1, 0, 0), &[]).await;
    assert_eq!(s.simple(0).await, (0, 1, vec![]));
    // The server is now waiting for the next header.
    s.shutdown.send(true).unwrap();
    let served = tokio::time::timeout(Duration::from_secs(20), &mut s.server).await;
    assert!(
        matches!(served, Ok(Ok(Ok(())))),
        "the connection did not end"
    );
    assert!(s.at_eof().await);
}

/// A client that sends requests and never reads their replies is
/// disconnected once a reply could not be written for `reply_timeout`,
/// whichever reader serves it. The task reader's stream here is in
/// memory, with no socket the writer could shut down: as over TLS, only
/// the reader watching the broken sink ends the connection.
async fn a_client_that_never_reads_is_closed_after_the_reply_timeout(reader: Reader) {
    let timeout = Duration::from_millis(300);
    let mut s = serve_volume_with(
        SIMPLE,
        reader,
        ReplyRoute {
            timeout,
            ..route(None)
        },
    );
    // Replies far larger than the stream's buffers, then silence: the
    // reader waits for the next header while the writer stalls.
    for cookie in 0..8 {
        s.send(request(Command::Read, 0, cookie, 0, 1 << 20), &[])
            .await;
    }
    let served = tokio::time::timeout(Duration::from_secs(20), &mut s.server).await;
    assert!(
        matches!(served, Ok(Ok(Ok(())))),
        "the connection outlived the reply timeout: {served:?}"
    );
    // Every reply it still owed was dropped with its budget.
    assert_eq!(s.memory.pending_bytes(), 0);
}

/// BLOCK_STATUS replies (up to 16 KiB of descriptors each) hold the
/// daemon-wide reply budget until they are written, like reads.
async fn block_status_replies_hold_the_reply_budget(reader: Reader) {
    let mut s = serve_volume(EXTENDED, reader);
    // Data in every other 8 KiB: more extents than one reply carries.
    let mut block = IoBuf::new(4096);
    block.fill(0x5A);
    for at in (0..SIZE).step_by(8192) {
        s.export.volume.data.write(at, &mut block).unwrap();
    }
    const SENT: u64 = 128;
    for cookie in 0..SENT {
        s.send_as(request(Command::BlockStatus, 0, cookie, 0, SIZE), &[], true)
            .await;
    }
    // Unread replies beyond what the stream and the writer's buffer take
    // (a few hundred KiB) wait with their units reserved: at least 16 KiB
    // each, and many more than 16 of them.
    let expected = 16 * (16 << 10);
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.memory.pending_bytes() < expected {
        assert!(
            Instant::now() < deadline,
            "unread BLOCK_STATUS replies hold {} bytes of the reply budget",
            s.memory.pending_bytes()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..SENT {
        let (_, kind, _, _, payload) = s.extended_chunk().await;
        assert_eq!(kind, REPLY_TYPE_BLOCK_STATUS_EXT);
        assert_eq!(be32(&payload[4..]) as usize, MAX_EXTENTS);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.memory.pending_bytes() != 0 {
        assert!(
            Instant::now() < deadline,
            "written replies kept their budget"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Each transmission test, once per reader.
macro_rules! on_both_readers {
    ($($name:ident),* $(,)?) => {
        mod on_task {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Reader::Task).await
            })*
        }
        mod on_ring {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Reader::Ring).await
            })*
        }
    };
}

on_both_readers!(
    a_write_larger_than_the_read_buffer_arrives_whole,
    shutdown_ends_a_connection_waiting_for_requests,
    write_then_read_with_simple_replies,
    every_request_is_answered_before_disc_closes,
    bad_magic_ends_the_connection_after_earlier_replies,
    refused_write_payload_is_consumed_and_the_stream_stays_framed,
    byte_budget_bounds_what_one_connection_pins,
    extended_headers_carry_payload_lengths_and_64_bit_ranges,
    a_client_that_never_reads_is_closed_after_the_reply_timeout,
    block_status_replies_hold_the_reply_budget,
);

/// Replies sent directly by the completing threads, over a real
/// socket, mixed with replies too large for the socket buffer (which
/// the writer task must finish first): every reply arrives whole,
/// with its own data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_replies_on_a_socket_never_interleave() {
    use std::os::fd::AsRawFd;
    let (export, _dir) = temp_export();
    // Every 4 KiB block of the volume holds its own index.
    let pattern: Vec<u8> = (0..SIZE / 4096)
        .flat_map(|block| std::iter::repeat_n(block as u8, 4096))
        .collect();
    let mut data = IoBuf::new(pattern.len());
    data.copy_from_slice(&pattern);
    export.volume.data.write(0, &mut data).unwrap();

    let (client, server) = tokio::net::UnixStream::pair().unwrap();
    let fd = server.as_raw_fd();
    let (server_r, server_w) = server.into_split();
    let (keep, shutdown) = watch::channel(false);
    let served = export.clone();
    let server = tokio::spawn(async move {
        let _keep = keep;
        serve(
            server_r,
            server_w,
            route(Some(fd)),
            served,
            SIMPLE,
            shutdown,
            "test",
        )
        .await
    });
    let (mut from_server, mut to_server) = client.into_split();
    // Small and large reads; the large ones overflow the socket buffer.
    // A reply's cookie tells which request (and so which data) it is.
    let shape = |cookie: u64| {
        let len = if cookie.is_multiple_of(25) {
            2 << 20
        } else {
            4096
        };
        ((cookie * 7 % 1000) * 4096 % (SIZE - len), len)
    };
    const COUNT: u64 = 200;
    let sender = tokio::spawn(async move {
        for cookie in 0..COUNT {
            let (offset, len) = shape(cookie);
            let req = request(Command::Read, 0, cookie, offset, len);
            to_server.write_all(&req.encode()).await.unwrap();
        }
        let disc = request(Command::Disc, 0, 0, 0, 0);
        to_server.write_all(&disc.encode()).await.unwrap();
    });
    let mut replies = 0;
    loop {
        let mut h = [0u8; 16];
        if from_server.read_exact(&mut h).await.is_err() {
            break;
        }
        assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC, "a reply header out of place");
        let cookie = be64(&h[8..]);
        let (offset, len) = shape(cookie);
        let mut body = vec![0u8; len as usize];
        from_server.read_exact(&mut body).await.unwrap();
        assert!(
            body == pattern[offset as usize..(offset + len) as usize],
            "reply {cookie} carries another request's data"
        );
        replies += 1;
    }
    sender.await.unwrap();
    assert_eq!(replies, COUNT);
    assert!(server.await.unwrap().is_ok());
}
