//! The vhost-user-blk export against a real hostcryptd, with two clients:
//! libblkio's `virtio-blk-vhost-user` driver (the `blkio` crate, a real
//! vhost-user-blk frontend) and a driver built on the `vhost` crate's
//! frontend (`harness/vhost.rs`) that can also send what no real driver
//! would. Both write, read, flush, discard and zero on two queues at once
//! against an in-memory model, and the data area on disk then decrypts
//! with OpenSSL exactly as for NBD; hostile descriptor chains get error
//! statuses from a daemon that lives on; a buffer the guest rewrites
//! during a write stores only values it held; a peer outside the volume's
//! `allow` list is refused. Across a restart (INFLIGHT_SHMFD) what the
//! inflight region names is answered; a hostile region, a region changed
//! under running queues or kick fds made to block end at most the
//! connection that sent them.

use std::time::Duration;

use hostcrypt_e2e::vhost::*;
use hostcrypt_e2e::*;
use hostcryptd::kek::{KeyProvider, LocalKek};
use hostcryptd::volume;

use crate::breakglass::openssl_decrypt_sector;

const SIZE: u64 = 16 << 20;

/// A 16 MiB cache volume with 4096-byte sectors and discards, served on
/// a two-queue vhost-user socket; `extra` goes into its `[[volume]]`.
fn setup(extra: &str) -> (Fixture, Daemon, std::path::PathBuf, std::path::PathBuf) {
    let mut fx = Fixture::new();
    let socket = fx.path("v.vhost");
    let backing = fx.volume(
        "v",
        "cache",
        &format!(
            "allow_discards = true\nvhost_user = \"{}\"\nvhost_user_queues = 2\n{extra}",
            socket.display()
        ),
    );
    fx.write_config(&fx.control_and_audit());
    fx.create("v", "16M", 4096);
    let d = fx.start();
    (fx, d, socket, backing)
}

/// Deterministic bytes for write `n`.
fn pattern(n: u64, len: usize) -> Vec<u8> {
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn two_queues_serve_reads_writes_flush_discard_and_write_zeroes() {
    let (fx, daemon, socket, backing) = setup("");
    let mut c = BlkClient::connect(&socket, 2, 8 << 20).expect("vhost-user-blk set-up");
    // The device as the guest sees it: 4096-byte blocks, two queues.
    assert_eq!(c.geometry(), (SIZE, 4096));
    assert_eq!(u16::from_le_bytes([c.config[34], c.config[35]]), 2);
    for bit in [9, 13, 14, 29, 32] {
        assert_ne!(c.features & (1 << bit), 0, "feature bit {bit} missing");
    }
    assert_eq!(c.features & (1 << 5), 0, "RO offered on a writable volume");

    let mut model = vec![0u8; SIZE as usize];
    // Writes on both queues at once: two chains in flight, then both waited.
    let buf0 = BUFFERS + 4096;
    let buf1 = BUFFERS + (2 << 20);
    // Queue 0 writes the first half, queue 1 the second: concurrent
    // writes never overlap, so the model is exact.
    let half = SIZE / 2;
    for round in 0..32u64 {
        let len = 4096 * (1 + (round % 16) as usize);
        let off0 = (round * 37 % 3000) * 4096 % (half - len as u64);
        let off1 = half + (round * 101 % 3500) * 512 % (half - len as u64);
        let (d0, d1) = (pattern(round * 2, len), pattern(round * 2 + 1, len));
        c.write(buf0, &d0);
        c.write(buf1, &d1);
        let h0 = c.submit(
            0,
            0,
            T_OUT,
            off0 / 512,
            &[(buf0, len as u32)],
            (BUFFERS, BUFFERS + 64),
        );
        let h1 = c.submit(
            1,
            0,
            T_OUT,
            off1 / 512,
            &[(buf1, len as u32)],
            (BUFFERS + 256, BUFFERS + 128),
        );
        assert_eq!(c.wait_used(0, Duration::from_secs(30)).unwrap().0, h0);
        assert_eq!(c.wait_used(1, Duration::from_secs(30)).unwrap().0, h1);
        assert_eq!(c.read(BUFFERS + 64, 1)[0], S_OK);
        assert_eq!(c.read(BUFFERS + 128, 1)[0], S_OK);
        model[off0 as usize..off0 as usize + len].copy_from_slice(&d0);
        model[off1 as usize..off1 as usize + len].copy_from_slice(&d1);
    }
    // Reads, split over two buffers, on alternating queues.
    for (i, off) in [0u64, 4096, 1 << 20, 5 << 20, SIZE - 65536]
        .into_iter()
        .enumerate()
    {
        let q = i % 2;
        let (a, b) = (BUFFERS + (4 << 20), BUFFERS + (6 << 20));
        let (status, used) = c
            .request(q, T_IN, off / 512, &[(a, 32768), (b, 32768)])
            .unwrap();
        assert_eq!((status, used), (S_OK, 65537));
        let mut got = c.read(a, 32768);
        got.extend(c.read(b, 32768));
        assert!(
            got == model[off as usize..off as usize + 65536],
            "read at {off}"
        );
    }
    assert_eq!(c.request(0, T_FLUSH, 0, &[]).unwrap().0, S_OK);
    // Write-zeroes (with and without unmap) and discard: 64 KiB each.
    let seg = BUFFERS + 512;
    for (kind, sector, flags) in [
        (T_WRITE_ZEROES, 2048, 1),
        (T_WRITE_ZEROES, 4096, 0),
        (T_DISCARD, 8192, 0),
    ] {
        c.segment(seg, sector, 128, flags);
        assert_eq!(c.request(1, kind, 0, &[(seg, 16)]).unwrap().0, S_OK);
        let at = sector as usize * 512;
        model[at..at + 65536].fill(0);
        let (status, _) = c
            .request(0, T_IN, sector, &[(BUFFERS + (4 << 20), 65536)])
            .unwrap();
        assert_eq!(status, S_OK);
        assert_eq!(c.read(BUFFERS + (4 << 20), 65536), vec![0u8; 65536]);
    }
    // GET_ID: the volume's name.
    let (status, used) = c.request(0, T_GET_ID, 0, &[(BUFFERS + 1024, 20)]).unwrap();
    assert_eq!((status, used), (S_OK, 21));
    assert_eq!(&c.read(BUFFERS + 1024, 2), b"v\0");
    assert_eq!(c.request(1, T_FLUSH, 0, &[]).unwrap().0, S_OK);
    // `status` lists the client while it is connected, and not after.
    let clients = |fx: &Fixture| fx.status()["volumes"][0]["clients"].clone();
    let listed = clients(&fx);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["frontend"], "vhost-user", "{listed}");
    assert_eq!(listed[0]["queues"], 2, "{listed}");
    assert!(
        listed[0]["peer"]
            .as_str()
            .is_some_and(|p| p.contains("uid=")),
        "{listed}"
    );
    drop(c);
    wait_until(
        "the client gone from status",
        Duration::from_secs(10),
        || clients(&fx).as_array().is_some_and(Vec::is_empty),
    );
    assert_eq!(daemon.stop(), 0);

    assert_decrypts_to(&fx, &backing, &model);
}

/// The data area of the stopped volume at `backing` decrypts with OpenSSL
/// (aes-256-xts, tweak = the 4096-byte sector's number) to `model`; holes
/// read as zeros; no sector with data is stored as plaintext.
fn assert_decrypts_to(fx: &Fixture, backing: &std::path::Path, model: &[u8]) {
    let copies = volume::read_headers(backing).unwrap();
    let header = volume::current_header(backing, &copies).unwrap();
    let kek = LocalKek::load(&fx.kek).unwrap();
    let dek = kek
        .unwrap(&header.active_keyslot().unwrap().wrapped)
        .unwrap();
    let raw = std::fs::read(backing).unwrap();
    let area = &raw[header.data_offset as usize..];
    assert_eq!(area.len(), model.len());
    for (i, (ct, pt)) in area.chunks(4096).zip(model.chunks(4096)).enumerate() {
        let plain = if ct.iter().all(|&b| b == 0) {
            vec![0u8; 4096]
        } else {
            openssl_decrypt_sector(dek.expose(), ct, i as u64)
        };
        assert!(plain == pt, "sector {i} differs from the model");
        if pt.iter().any(|&b| b != 0) {
            assert_ne!(ct, pt, "sector {i} is plaintext on disk");
        }
    }
}

#[test]
fn hostile_chains_get_error_statuses_and_the_daemon_lives() {
    let (_fx, daemon, socket, _) = setup("");
    let mut c = BlkClient::connect(&socket, 1, 4 << 20).expect("vhost-user-blk set-up");
    let (header, status, data) = (BUFFERS, BUFFERS + 64, BUFFERS + 4096);
    let memory = c.memory_len();
    let expect = |c: &mut BlkClient, chain: &[Desc], want: Option<u8>, what: &str| {
        c.write(status, &[0xff]);
        c.submit_raw(0, 0, chain);
        let (id, _) = c
            .wait_used(0, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{what}: {e:?}\n{}", daemon.stderr()));
        assert_eq!(id, 0, "{what}");
        if let Some(want) = want {
            assert_eq!(c.read(status, 1)[0], want, "{what}");
        }
    };
    let h = |c: &BlkClient, kind: u32, sector: u64| {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&kind.to_le_bytes());
        b[8..16].copy_from_slice(&sector.to_le_bytes());
        c.write(header, &b);
    };
    let d = |addr, len, flags, next| Desc {
        addr,
        len,
        flags,
        next,
    };
    h(&c, T_IN, 0);
    // A data buffer outside guest memory, and one that wraps 2^64.
    for addr in [memory - 100, 1 << 40, u64::MAX - 10] {
        let chain = [
            d(header, 16, F_NEXT, 1),
            d(addr, 512, F_WRITE | F_NEXT, 2),
            d(status, 1, F_WRITE, 0),
        ];
        expect(
            &mut c,
            &chain,
            Some(S_IOERR),
            &format!("buffer at {addr:#x}"),
        );
    }
    // A read-only buffer where the device must write.
    let chain = [
        d(header, 16, F_NEXT, 1),
        d(data, 512, F_NEXT, 2),
        d(status, 1, F_WRITE, 0),
    ];
    expect(
        &mut c,
        &chain,
        Some(S_IOERR),
        "read into a read-only buffer",
    );
    // A length that is not a multiple of 512.
    let chain = [
        d(header, 16, F_NEXT, 1),
        d(data, 700, F_WRITE | F_NEXT, 2),
        d(status, 1, F_WRITE, 0),
    ];
    expect(&mut c, &chain, Some(S_IOERR), "700-byte read");
    // A header split across two descriptors.
    let chain = [
        d(header, 8, F_NEXT, 1),
        d(header + 8, 8, F_NEXT, 2),
        d(status, 1, F_WRITE, 0),
    ];
    expect(&mut c, &chain, Some(S_IOERR), "split header");
    // Past the end of the volume, and a sector number that overflows.
    for sector in [SIZE / 512, u64::MAX / 2] {
        h(&c, T_IN, sector);
        let chain = [
            d(header, 16, F_NEXT, 1),
            d(data, 4096, F_WRITE | F_NEXT, 2),
            d(status, 1, F_WRITE, 0),
        ];
        expect(&mut c, &chain, Some(S_IOERR), &format!("sector {sector}"));
    }
    // An unknown request type.
    h(&c, 0x77, 0);
    let chain = [d(header, 16, F_NEXT, 1), d(status, 1, F_WRITE, 0)];
    expect(&mut c, &chain, Some(S_UNSUPP), "unknown type");
    // A descriptor loop, and a next index past the table: no status byte
    // can be trusted, the chain comes back unwritten.
    h(&c, T_IN, 0);
    let chain = [d(header, 16, F_NEXT, 1), d(data, 512, F_WRITE | F_NEXT, 1)];
    expect(&mut c, &chain, None, "descriptor loop");
    let chain = [
        d(header, 16, F_NEXT, 1),
        d(data, 512, F_WRITE | F_NEXT, 999),
    ];
    expect(&mut c, &chain, None, "next index past the table");
    // A huge read (over the largest request) is refused, not allocated.
    let chain = [
        d(header, 16, F_NEXT, 1),
        d(0, 0xffff_fe00, F_WRITE | F_NEXT, 2),
        d(status, 1, F_WRITE, 0),
    ];
    expect(&mut c, &chain, Some(S_IOERR), "4 GiB read");
    // A write-zeroes and a discard of 2^32-1 sectors, over the
    // configuration space's limits: refused at once, no worker tied up.
    for kind in [T_WRITE_ZEROES, T_DISCARD] {
        h(&c, kind, 0);
        c.segment(data, 0, u32::MAX, 0);
        let chain = [
            d(header, 16, F_NEXT, 1),
            d(data, 16, F_NEXT, 2),
            d(status, 1, F_WRITE, 0),
        ];
        expect(&mut c, &chain, Some(S_IOERR), "2^32-1 sectors");
    }
    // The status is the last byte of the last descriptor (virtio 1.x),
    // here one that also takes the data.
    h(&c, T_IN, 0);
    let chain = [d(header, 16, F_NEXT, 1), d(data, 513, F_WRITE, 0)];
    c.write(data + 512, &[0xff]);
    c.submit_raw(0, 0, &chain);
    let (_, used) = c.wait_used(0, Duration::from_secs(30)).unwrap();
    assert_eq!((c.read(data + 512, 1)[0], used), (S_OK, 513));

    // The device still works, and so does the daemon.
    c.write(data, &[0x5a; 4096]);
    let (st, _) = c.request(0, T_OUT, 8, &[(data, 4096)]).unwrap();
    assert_eq!(st, S_OK);
    let (st, _) = c.request(0, T_IN, 8, &[(data + 4096, 4096)]).unwrap();
    assert_eq!(st, S_OK);
    assert_eq!(c.read(data + 4096, 4096), vec![0x5a; 4096]);
    drop(c);
    // A new client after the old one left is served.
    let mut again = BlkClient::connect(&socket, 1, 4 << 20).expect("a second client");
    assert_eq!(again.request(0, T_FLUSH, 0, &[]).unwrap().0, S_OK);
    assert_eq!(daemon.stop(), 0);
}

#[test]
fn a_hostile_frontend_neither_crashes_nor_floods_the_daemon() {
    let (_fx, daemon, socket, _) = setup("");
    // Memory whose file ends before the region does: mapping it and
    // touching the rings past the end would raise SIGBUS in the daemon.
    // Refused at SET_MEM_TABLE (the connection ends), so either the
    // set-up fails or the first request does.
    // Here: 4 MiB offered over a 2 MiB file, and a read into the third.
    let short = BlkClient::connect_over(&socket, 1, 4 << 20, 2 << 20);
    if let Ok(mut c) = short {
        assert!(
            c.request(0, T_IN, 0, &[(3 << 20, 4096)]).is_err(),
            "a region longer than its file was served"
        );
    }

    // One head posted 64 times at once: every repeat is a request still
    // in flight. The queue is stopped instead of running them all (each
    // would pin its own 1 MiB bounce buffer, without bound).
    let mut c = BlkClient::connect(&socket, 1, 8 << 20).expect("vhost-user-blk set-up");
    let (header, status, data) = (BUFFERS, BUFFERS + 64, BUFFERS + 4096);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&T_OUT.to_le_bytes());
    c.write(header, &h);
    let chain = [
        Desc {
            addr: header,
            len: 16,
            flags: F_NEXT,
            next: 1,
        },
        Desc {
            addr: data,
            len: 1 << 20,
            flags: F_NEXT,
            next: 2,
        },
        Desc {
            addr: status,
            len: 1,
            flags: F_WRITE,
            next: 0,
        },
    ];
    c.submit_repeated(0, 0, &chain, QUEUE_SIZE);
    let stopped = "vhost-user queue stopped: descriptor head 0 was posted again";
    wait_until("the queue stop in the log", Duration::from_secs(30), || {
        daemon.stderr().contains(stopped)
    });
    drop(c);
    // The daemon (not killed by SIGBUS) and the device live on for the
    // next client.
    let mut again =
        BlkClient::connect(&socket, 1, 4 << 20).expect("a client after the hostile one");
    again.write(data, &[0x77; 4096]);
    assert_eq!(again.request(0, T_OUT, 0, &[(data, 4096)]).unwrap().0, S_OK);
    assert_eq!(
        again.request(0, T_IN, 0, &[(data + 8192, 4096)]).unwrap().0,
        S_OK
    );
    assert_eq!(again.read(data + 8192, 4096), vec![0x77; 4096]);
    assert_eq!(daemon.stop(), 0);
}

/// A guest that keeps rewriting a write's buffer while the device works on
/// it (the write encrypts from guest memory): what is stored is, byte for
/// byte, one of the values the guest had there, never ciphertext of bytes
/// read twice or encrypted where the guest could change them. For the
/// three ways a write's plaintext is taken: a small write gathered at
/// once, a large one encrypted straight from one buffer, and a large one
/// whose buffers cut sectors (a cut sector gathered first).
#[test]
fn a_buffer_the_guest_rewrites_during_a_write_stores_only_its_values() {
    let (fx, daemon, socket, backing) = setup("");
    let mut c = BlkClient::connect(&socket, 1, 4 << 20).expect("vhost-user-blk set-up");
    let (data, len) = (BUFFERS + 4096, 256 << 10);
    let values = [0xa5u8, 0x5a];
    // (what, first 512-byte sector, the data buffers)
    type Case = (&'static str, u64, Vec<(u64, u32)>);
    let cases: [Case; 3] = [
        ("a 4 KiB write", 0, vec![(data, 4096)]),
        ("a 256 KiB write in one buffer", 2048, vec![(data, len)]),
        (
            "a 256 KiB write in buffers that cut sectors",
            4096,
            vec![(data, 1000), (data + 1000, 7192), (data + 8192, len - 8192)],
        ),
    ];
    for (what, sector, buffers) in &cases {
        let scribbler = c.scribble(data, len as usize, values).unwrap();
        for _ in 0..200 {
            let (status, _) = c.request(0, T_OUT, *sector, buffers).unwrap();
            assert_eq!(status, S_OK, "{what}");
        }
        assert!(scribbler.stop() > 1, "{what}: the buffer was not rewritten");
    }
    for (what, sector, buffers) in &cases {
        let written: u32 = buffers.iter().map(|b| b.1).sum();
        let (status, _) = c.request(0, T_IN, *sector, &[(data, written)]).unwrap();
        assert_eq!(status, S_OK, "{what}");
        let back = c.read(data, written as usize);
        let stray = back.iter().position(|b| !values.contains(b));
        assert_eq!(stray, None, "{what}: a byte the guest never wrote");
    }
    // The whole device as the daemon serves it is what the disk holds.
    let mut model = Vec::with_capacity(SIZE as usize);
    for at in (0..SIZE).step_by(len as usize) {
        let (status, _) = c.request(0, T_IN, at / 512, &[(data, len)]).unwrap();
        assert_eq!(status, S_OK);
        model.extend(c.read(data, len as usize));
    }
    drop(c);
    assert_eq!(daemon.stop(), 0);
    assert_decrypts_to(&fx, &backing, &model);
}

#[test]
fn a_peer_outside_the_allow_list_is_refused() {
    // uid 4242 is nobody here: this test's own uid is not on the list.
    let (_fx, daemon, socket, _) = setup("allow = [\"uid:4242\"]");
    let refused = BlkClient::connect(&socket, 1, 1 << 20);
    assert!(refused.is_err(), "a peer outside the allow list was served");
    wait_until("the refusal logged", Duration::from_secs(10), || {
        daemon.stderr().contains("not in the volume's allow list")
    });
    assert_eq!(daemon.stop(), 0);
}

#[test]
fn a_read_only_device_refuses_writes_and_check_lists_the_socket() {
    let (fx, daemon, socket, _) = setup("vhost_user_read_only = true\nvhost_user_mode = \"0600\"");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut c = BlkClient::connect(&socket, 1, 4 << 20).expect("set-up");
    assert_ne!(c.features & (1 << 5), 0, "RO not offered");
    c.write(BUFFERS + 4096, &[1; 4096]);
    assert_eq!(
        c.request(0, T_OUT, 0, &[(BUFFERS + 4096, 4096)]).unwrap().0,
        S_IOERR
    );
    assert_eq!(
        c.request(0, T_IN, 0, &[(BUFFERS + 4096, 4096)]).unwrap().0,
        S_OK
    );
    drop(c);
    assert_eq!(daemon.stop(), 0);
    let out = fx.check();
    let text = output_text(&out);
    assert!(
        text.contains("vhost-user v:") && text.contains("mode 0600") && text.contains("read-only"),
        "{text}"
    );
}

/// libblkio, one thread per queue, each on its own half of the volume:
/// writes of 4 KiB to 256 KiB, read back, then write-zeroes, discards and
/// flushes; the data area then decrypts to the model.
#[test]
fn libblkio_drives_two_queues_at_once() {
    let (fx, daemon, socket, backing) = setup("");
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user").expect("blkio driver");
    b.set_str("path", socket.to_str().unwrap()).unwrap();
    b.connect().expect("blkio connect");
    assert_eq!(b.get_u64("capacity").unwrap(), SIZE);
    assert_eq!(b.get_i32("request-alignment").unwrap(), 4096);
    b.set_i32("num-queues", 2).unwrap();
    let started = b.start().expect("blkio start");
    let region_len = 2 << 20;
    let region = b.alloc_mem_region(region_len).unwrap();
    b.map_mem_region(&region).unwrap();
    let half = SIZE / 2;
    let workers: Vec<_> = started
        .queues
        .into_iter()
        .enumerate()
        .map(|(n, mut q)| {
            // Each thread owns one half of the region.
            let buf = region.addr + n * (region_len / 2);
            std::thread::spawn(move || {
                let base = n as u64 * half;
                let mut model = vec![0u8; half as usize];
                let mut done = [const { std::mem::MaybeUninit::<blkio::Completion>::uninit() }; 1];
                let mut wait = |q: &mut blkio::Blkioq, what: &str| {
                    let mut timeout = Duration::from_secs(30);
                    let n = q
                        .do_io(&mut done, 1, Some(&mut timeout), None)
                        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
                    assert_eq!(n, 1, "{what}: timed out");
                    // SAFETY: do_io wrote one completion.
                    let c = unsafe { done[0].assume_init_read() };
                    assert_eq!(c.ret, 0, "{what} failed");
                };
                let flags = blkio::ReqFlags::empty();
                for round in 0..64u64 {
                    let len = 4096 * (1 + (round * 7 % 64) as usize);
                    let off = (round * 4099 % 2000) * 4096 % (half - len as u64);
                    let data = pattern(round * 2 + n as u64, len);
                    // SAFETY: `buf` is this thread's half of a mapped region
                    // of `region_len` bytes; `len` is at most 256 KiB.
                    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf as *mut u8, len) };
                    q.write(base + off, buf as *const u8, len, 0, flags);
                    wait(&mut q, "write");
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                    if round % 8 == 7 {
                        q.read(base + off, buf as *mut u8, len, 0, flags);
                        wait(&mut q, "read");
                        let mut back = vec![0u8; len];
                        // SAFETY: as above; the read completed.
                        unsafe {
                            std::ptr::copy_nonoverlapping(buf as *const u8, back.as_mut_ptr(), len)
                        };
                        assert!(back == data, "read back at {off}");
                    }
                }
                q.write_zeroes(base + (1 << 20), 65536, 0, flags);
                wait(&mut q, "write-zeroes");
                model[1 << 20..(1 << 20) + 65536].fill(0);
                q.discard(base + (2 << 20), 65536, 0, flags);
                wait(&mut q, "discard");
                model[2 << 20..(2 << 20) + 65536].fill(0);
                q.flush(0, flags);
                wait(&mut q, "flush");
                model
            })
        })
        .collect();
    let mut model = Vec::new();
    for w in workers {
        model.extend(
            w.join()
                .unwrap_or_else(|_| panic!("a blkio queue thread failed\n{}", daemon.stderr())),
        );
    }
    drop(b);
    assert_eq!(daemon.stop(), 0);
    assert_decrypts_to(&fx, &backing, &model);
}

/// A Linux guest (the Debian cloud kernel tests/vm/lib.sh fetches) under
/// qemu on a two-queue vhost-user-blk disk: the geometry it sees, O_DIRECT
/// I/O, a discard, ext4 with files verified after a remount, and no
/// plaintext in the backing. The script does it all and keeps its files
/// when it fails.
#[test]
fn a_linux_guest_under_qemu_uses_the_disk() {
    if !require_root("installing qemu and booting a guest") {
        return;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/vhost-user.sh");
    let out = std::process::Command::new(&script)
        .arg("--bin")
        .arg(bin_dir())
        .output()
        .expect("run tests/vm/vhost-user.sh");
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("vhost-user VM: PASS"), "{text}");
}

/// A volume waiting for its key: its vhost-user socket is bound but
/// refuses clients (the log says why), and serves them once a reload
/// brings the right KEK and the volume opens, with the data written
/// before. (Key loss while serving fails requests through the same data
/// area as NBD; the local provider keeps its key in memory, so the
/// revocation tests use Vault, PKCS#11 and Azure.)
#[test]
fn a_volume_waiting_for_its_key_refuses_clients_until_it_is_served() {
    let mut fx = Fixture::new();
    let socket = fx.path("v.vhost");
    fx.volume(
        "v",
        "cache",
        &format!(
            "vhost_user = \"{}\"\nvhost_user_queues = 1",
            socket.display()
        ),
    );
    fx.write_config(&fx.control_and_audit());
    fx.create("v", "16M", 4096);
    let daemon = fx.start();
    let mut c = BlkClient::connect(&socket, 1, 4 << 20).expect("set-up");
    let buf = BUFFERS + 4096;
    c.write(buf, &[0x6b; 4096]);
    assert_eq!(c.request(0, T_OUT, 8, &[(buf, 4096)]).unwrap().0, S_OK);
    assert_eq!(c.request(0, T_FLUSH, 0, &[]).unwrap().0, S_OK);
    drop(c);
    assert_eq!(daemon.stop(), 0);

    // Start with another key in [kek.main]: the volume waits.
    let right = fx.kek.clone();
    fx.kek = fx.path("other.key");
    run_ok(
        std::process::Command::new(bin("hostcrypt"))
            .args(["kek", "init-local"])
            .arg(&fx.kek),
    );
    fx.write_config(&fx.control_and_audit());
    let daemon = fx.start_with_unavailable("v");
    assert!(
        socket.exists(),
        "the socket is bound while the volume waits"
    );
    assert!(BlkClient::connect(&socket, 1, 4 << 20).is_err());
    wait_until("the refusal logged", Duration::from_secs(10), || {
        daemon
            .stderr()
            .contains("vhost-user client refused: the volume is")
    });

    // The right KEK again, by reload: the volume opens, the socket serves.
    fx.kek = right;
    fx.write_config(&fx.control_and_audit());
    let out = fx.cli(&["reload"]);
    assert!(out.status.success(), "{}", output_text(&out));
    fx.wait_key_state("v", "serving");
    let mut c = BlkClient::connect(&socket, 1, 4 << 20).expect("served once the key is back");
    c.write(buf, &[0; 4096]);
    assert_eq!(c.request(0, T_IN, 8, &[(buf, 4096)]).unwrap().0, S_OK);
    assert_eq!(c.read(buf, 4096), vec![0x6b; 4096]);
    drop(c);
    assert_eq!(daemon.stop(), 0);
}

/// A reload changes vhost-user sockets without a restart. Removing the
/// volume ends its client's session (the export's retirement) and its
/// socket goes; a socket added to a volume that is served answers at once;
/// a changed socket (another queue count) is bound again, its old client's
/// session ended; and nothing is reported as needing a restart.
#[test]
fn a_reload_adds_removes_and_changes_vhost_user_sockets() {
    use ::vhost::VhostBackend;
    let mut fx = Fixture::new();
    let v_socket = fx.path("v.vhost");
    let w_socket = fx.path("w.vhost");
    fx.volume(
        "v",
        "cache",
        &format!("vhost_user = \"{}\"", v_socket.display()),
    );
    fx.volume("w", "cache", "");
    fx.write_config(&fx.control_and_audit());
    fx.create("v", "16M", 4096);
    fx.create("w", "16M", 4096);
    let daemon = fx.start();
    let mut c = BlkClient::connect(&v_socket, 1, 4 << 20).expect("set-up");
    assert_eq!(c.request(0, T_FLUSH, 0, &[]).unwrap().0, S_OK);
    assert!(!w_socket.exists());

    // v goes; w gets a socket.
    fx.remove_volume("v");
    fx.remove_volume("w");
    fx.volume(
        "w",
        "cache",
        &format!("vhost_user = \"{}\"", w_socket.display()),
    );
    fx.write_config(&fx.control_and_audit());
    let out = fx.cli(&["reload"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("vhost"), "reported as not applied: {text}");
    wait_until("the client disconnected", Duration::from_secs(20), || {
        daemon.stderr().contains("vhost-user client disconnected")
    });
    assert!(
        c.frontend().get_features().is_err(),
        "the session is still open"
    );
    drop(c);
    wait_until("v's socket removed", Duration::from_secs(10), || {
        !v_socket.exists()
    });
    assert!(BlkClient::connect(&v_socket, 1, 4 << 20).is_err());
    let mut w = BlkClient::connect(&w_socket, 1, 4 << 20).expect("the added socket");
    assert_eq!(w.request(0, T_FLUSH, 0, &[]).unwrap().0, S_OK);

    // w's socket changes: one queue (the default is one per core, at
    // least two in CI); bound again, the old session ends.
    fx.remove_volume("w");
    fx.volume(
        "w",
        "cache",
        &format!(
            "vhost_user = \"{}\"\nvhost_user_queues = 1",
            w_socket.display()
        ),
    );
    fx.write_config(&fx.control_and_audit());
    let out = fx.cli(&["reload"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("vhost"), "reported as not applied: {text}");
    wait_until("w's old session ended", Duration::from_secs(20), || {
        w.frontend().get_features().is_err()
    });
    drop(w);
    let mut w2 = BlkClient::connect(&w_socket, 1, 4 << 20).expect("the changed socket");
    assert_eq!(w2.request(0, T_FLUSH, 0, &[]).unwrap().0, S_OK);
    assert!(
        daemon.stderr().contains("queues=1"),
        "the new socket's spec is not in use"
    );
    drop(w2);
    assert_eq!(daemon.stop(), 0);
    assert!(!w_socket.exists(), "the socket outlived the daemon");
}

/// What qemu does across a daemon restart (INFLIGHT_SHMFD, a reconnecting
/// chardev), with the state a killed daemon leaves written by the test:
/// on queue 0, A completed; H and J were taken off the ring, J completed
/// (out of order) and H did not; K was posted after the daemon died. The
/// next daemon must answer H from the inflight log, then K from the
/// ring, and must not run J again: counting from the used index alone
/// would take J for the next request and never answer H.
#[test]
fn a_restarted_daemon_answers_what_its_predecessor_left_pending() {
    let (fx, mut daemon, socket, _) = setup("");
    let mut c = BlkClient::connect_inflight(&socket, 2, 4 << 20).expect("set-up, INFLIGHT_SHMFD");
    let buf = |n: u64| BUFFERS + 4096 * n;
    let place = |n: u64| (BUFFERS + 256 + 64 * n, BUFFERS + 2048 + 64 * n);
    c.write(buf(1), &pattern(1, 4096));
    assert_eq!(c.request(0, T_OUT, 0, &[(buf(1), 4096)]).unwrap().0, S_OK);

    daemon.child.kill().expect("kill -9");
    daemon.child.wait().expect("reap");
    for n in 2..=4 {
        c.write(buf(n), &pattern(n, 4096));
    }
    let h = c.post(0, 8, T_OUT, 8, &[(buf(2), 4096)], place(2));
    let j = c.post(0, 16, T_OUT, 16, &[(buf(3), 4096)], place(3));
    c.log_pending(0, h, 10);
    c.log_pending(0, j, 11);
    c.complete_as_device(0, j);
    assert_eq!(c.wait_used(0, Duration::from_secs(1)).unwrap().0, j);
    let k = c.post(0, 24, T_OUT, 24, &[(buf(4), 4096)], place(4));

    // The next daemon; the client reconnects and does not kick.
    let daemon = fx.start();
    c.reconnect(&socket).expect("reconnect");
    for (want, what) in [(h, "H, from the inflight log"), (k, "K, from the ring")] {
        let (id, _) = c
            .wait_used(0, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", daemon.stderr()));
        assert_eq!(id, want, "{what}");
        let status = place(if want == h { 2 } else { 4 }).1;
        assert_eq!(c.read(status, 1)[0], S_OK, "{what}");
    }
    // `request` takes the next used entry: a duplicate would come first.
    for (sector, want) in [
        (8, pattern(2, 4096)),
        (24, pattern(4, 4096)),
        (16, vec![0; 4096]),
    ] {
        let (status, _) = c.request(0, T_IN, sector, &[(buf(5), 4096)]).unwrap();
        assert_eq!(status, S_OK);
        assert_eq!(c.read(buf(5), 4096), want, "sector {sector}");
    }
    assert!(daemon.stderr().contains("resubmitting 1 requests"));
    drop(c);
    assert_eq!(daemon.stop(), 0);
}

/// A daemon that put a request on the used ring and died (or was cut
/// off) before its interrupt got out leaves a guest that waits for it
/// and posts nothing new; the request is in no inflight log. The next
/// daemon interrupts every queue once when it starts it.
#[test]
fn a_restarted_daemon_interrupts_for_completions_its_predecessor_did_not_announce() {
    let (fx, mut daemon, socket, _) = setup("");
    let mut c = BlkClient::connect_inflight(&socket, 2, 4 << 20).expect("set-up, INFLIGHT_SHMFD");
    let buf = BUFFERS + 4096;
    let place = (BUFFERS + 256, BUFFERS + 2048);
    c.write(buf, &pattern(1, 4096));
    assert_eq!(c.request(0, T_OUT, 0, &[(buf, 4096)]).unwrap().0, S_OK);
    daemon.child.kill().expect("kill -9");
    daemon.child.wait().expect("reap");
    // Completed, as the dead daemon would have, with no interrupt.
    let h = c.post(1, 0, T_OUT, 8, &[(buf, 4096)], place);
    c.log_pending(1, h, 1);
    c.complete_as_device(1, h);

    let daemon = fx.start();
    c.reconnect(&socket).expect("reconnect");
    for q in 0..2 {
        assert!(
            c.take_interrupt(q, Duration::from_secs(30)),
            "queue {q} was not interrupted after the restart\n{}",
            daemon.stderr()
        );
    }
    assert_eq!(c.wait_used(1, Duration::from_secs(1)).unwrap().0, h);
    assert!(!daemon.stderr().contains("resubmitting"));
    drop(c);
    assert_eq!(daemon.stop(), 0);
}

/// The VMM hands the inflight region back on every reconnect, so it is
/// untrusted input: the daemon's region is sealed against resizing, and
/// a region that could shrink under the daemon's mapping (SIGBUS), one
/// smaller than its queues need, or one for more queues than the device
/// has, ends that connection and nothing else.
#[test]
fn an_inflight_region_the_frontend_could_shrink_is_refused() {
    use ::vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserInflight};
    use ::vhost::vhost_user::VhostUserFrontend;
    use std::os::fd::{AsRawFd, FromRawFd};
    let (_fx, daemon, socket, _) = setup("");
    let mut c = BlkClient::connect_inflight(&socket, 1, 4 << 20).expect("set-up, INFLIGHT_SHMFD");
    let (file, info) = c
        .inflight
        .as_ref()
        .map(|(f, i)| (f.try_clone().unwrap(), *i))
        .unwrap();
    // SAFETY: fcntl on an fd this test owns.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    assert!(
        seals & libc::F_SEAL_SHRINK != 0 && seals & libc::F_SEAL_GROW != 0,
        "{seals:#x}"
    );
    assert!(file.set_len(0).is_err(), "the region could be shrunk");
    // SAFETY: memfd_create with a valid C string; the fd is checked.
    let fd = unsafe { libc::memfd_create(c"plain".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd this test owns.
    let plain = unsafe { std::fs::File::from_raw_fd(fd) };
    plain.set_len(1 << 20).unwrap();
    // Asking for the reply (REPLY_ACK) turns the refusal into this call's error.
    c.frontend().set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert!(
        c.frontend()
            .set_inflight_fd(&info, plain.as_raw_fd())
            .is_err(),
        "unsealed region"
    );
    drop(c);
    let small = VhostUserInflight::new(64, 0, info.num_queues, info.queue_size);
    let mut c = BlkClient::connect_inflight(&socket, 1, 4 << 20).expect("set-up");
    c.frontend().set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert!(
        c.frontend()
            .set_inflight_fd(&small, file.as_raw_fd())
            .is_err(),
        "small region"
    );
    drop(c);
    let many = VhostUserInflight::new(0, 0, 65, info.queue_size);
    let mut c = BlkClient::connect_inflight(&socket, 1, 4 << 20).expect("set-up");
    assert!(c.frontend().get_inflight_fd(&many).is_err(), "65 queues");
    drop(c);
    // The daemon lives, and serves the next client.
    let mut c = BlkClient::connect_inflight(&socket, 1, 4 << 20).expect("a client after");
    c.write(BUFFERS + 4096, &[0x5a; 4096]);
    assert_eq!(
        c.request(0, T_OUT, 0, &[(BUFFERS + 4096, 4096)]).unwrap().0,
        S_OK
    );
    drop(c);
    assert_eq!(daemon.stop(), 0);
}

/// The inflight region belongs to the queues it was started with: a
/// SET_INFLIGHT_FD (or GET_INFLIGHT_FD) while a queue runs is refused,
/// and the daemon serves the next client.
#[test]
fn the_inflight_region_cannot_change_under_a_running_queue() {
    use ::vhost::vhost_user::message::VhostUserHeaderFlag;
    use ::vhost::vhost_user::VhostUserFrontend;
    use std::os::fd::AsRawFd;
    let (_fx, daemon, socket, _) = setup("");
    let mut c = BlkClient::connect_inflight(&socket, 1, 4 << 20).expect("set-up, INFLIGHT_SHMFD");
    assert_eq!(c.request(0, T_FLUSH, 0, &[]).unwrap().0, S_OK);
    let (file, info) = c
        .inflight
        .as_ref()
        .map(|(f, i)| (f.try_clone().unwrap(), *i))
        .unwrap();
    // Asking for the reply (REPLY_ACK) turns the refusal into this call's error.
    c.frontend().set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert!(
        c.frontend()
            .set_inflight_fd(&info, file.as_raw_fd())
            .is_err(),
        "SET_INFLIGHT_FD with queue 0 running"
    );
    drop(c);
    let mut c = BlkClient::connect_inflight(&socket, 1, 4 << 20).expect("a client after");
    assert_eq!(c.request(0, T_FLUSH, 0, &[]).unwrap().0, S_OK);
    drop(c);
    assert_eq!(daemon.stop(), 0);
}

/// A frontend can clear O_NONBLOCK on the kick fd it shares and fill its
/// counter, so that a write to it blocks forever. The daemon never writes
/// a kick fd: a queue that starts with requests to resubmit wakes its
/// worker through an eventfd of its own. Here the reconnecting client's
/// kick fds are hostile while the queue starts: the request the log
/// names is answered, and the next client is served.
#[test]
fn a_kick_fd_made_blocking_and_full_does_not_wedge_the_daemon() {
    let (_fx, daemon, socket, _) = setup("");
    let mut c = BlkClient::connect_inflight(&socket, 1, 4 << 20).expect("set-up, INFLIGHT_SHMFD");
    let buf = |n: u64| BUFFERS + 4096 * n;
    c.write(buf(1), &pattern(1, 4096));
    assert_eq!(c.request(0, T_OUT, 0, &[(buf(1), 4096)]).unwrap().0, S_OK);
    // H posted, not kicked, and recorded as taken: pending for the next
    // session, as if this one had ended with H running.
    c.write(buf(2), &pattern(2, 4096));
    let h = c.post(
        0,
        8,
        T_OUT,
        8,
        &[(buf(2), 4096)],
        (BUFFERS + 256, BUFFERS + 2048),
    );
    c.log_pending(0, h, 10);
    c.hostile_kicks = true;
    c.reconnect(&socket).expect("reconnect");
    let (id, _) = c
        .wait_used(0, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("H: {e}\n{}", daemon.stderr()));
    assert_eq!(id, h);
    assert_eq!(c.read(BUFFERS + 2048, 1)[0], S_OK);
    drop(c);
    let mut c = BlkClient::connect(&socket, 1, 4 << 20)
        .unwrap_or_else(|e| panic!("a client after: {e}\n{}", daemon.stderr()));
    let (status, _) = c.request(0, T_IN, 8, &[(buf(3), 4096)]).unwrap();
    assert_eq!(status, S_OK);
    assert_eq!(c.read(buf(3), 4096), pattern(2, 4096));
    drop(c);
    assert_eq!(daemon.stop(), 0);
}

/// A frontend that clears O_NONBLOCK on its kick fds and takes their
/// counts in blocking reads of its own, racing the daemon for each: a
/// queue worker that read a kick in blocking mode after losing that race
/// would sleep in read(2) until the next count, holding its vring's lock
/// (which completions on threads shared by every volume take); left
/// there when the frontend goes, its connection never ends and the
/// volume takes no other client. Twelve such sessions, each thousands of
/// kicks long, with another volume served meanwhile; after each, a new
/// client of the volume is served.
#[test]
fn kick_fds_whose_counts_the_frontend_takes_first_block_no_thread() {
    let mut fx = Fixture::new();
    let socket = fx.path("v.vhost");
    let other = fx.path("w.vhost");
    for (name, path) in [("v", &socket), ("w", &other)] {
        fx.volume(
            name,
            "cache",
            &format!("vhost_user = \"{}\"\nvhost_user_queues = 2", path.display()),
        );
    }
    fx.write_config(&fx.control_and_audit());
    fx.create("v", "16M", 4096);
    fx.create("w", "16M", 4096);
    let daemon = fx.start();
    let data = BUFFERS + 4096;
    let mut w = BlkClient::connect(&other, 1, 4 << 20).expect("the other volume's client");
    for session in 0..12u64 {
        let mut c = BlkClient::connect(&socket, 2, 4 << 20).expect("vhost-user-blk set-up");
        c.write(data, &pattern(session, 4096));
        let (status, _) = c
            .request(0, T_OUT, session * 8, &[(data, 4096)])
            .unwrap_or_else(|e| panic!("session {session}: {e}\n{}", daemon.stderr()));
        assert_eq!(status, S_OK);
        c.steal_kicks().expect("kick stealers");
        // Thousands of kicks, and on until the frontend has taken some of
        // their counts: the race was run.
        let mut kicks = 0usize;
        wait_until(
            "a kick count the frontend took",
            Duration::from_secs(30),
            || {
                for _ in 0..5000 {
                    c.kick(kicks % 2);
                    kicks += 1;
                }
                c.stolen_kicks() > 0
            },
        );
        assert_eq!(w.request(0, T_IN, 0, &[(data, 4096)]).unwrap().0, S_OK);
        drop(c);
        // The hostile session has ended: the volume takes a client again.
        let mut c = BlkClient::connect(&socket, 2, 4 << 20).unwrap_or_else(|e| {
            panic!(
                "a client after hostile session {session}: {e}\n{}",
                daemon.stderr()
            )
        });
        let (status, _) = c
            .request(1, T_IN, session * 8, &[(data, 4096)])
            .unwrap_or_else(|e| panic!("after session {session}: {e}\n{}", daemon.stderr()));
        assert_eq!(status, S_OK);
        assert_eq!(c.read(data, 4096), pattern(session, 4096));
    }
    drop(w);
    assert_eq!(daemon.stop(), 0);
}

/// Two ways a frontend could keep a queue's worker awake for nothing.
/// A kick fd replaced on a running queue: the frontend still holds the
/// old one, and a count written to it must not wake the worker on every
/// wait. A semaphore eventfd as a kick: filled once, each read would take
/// one count and leave it readable. The first is stopped from being
/// watched, the second refused; the daemon serves a new client after.
#[test]
fn a_replaced_or_semaphore_kick_does_not_keep_a_queue_worker_busy() {
    let (_fx, daemon, socket, _) = setup("");
    let pid = daemon.child.id();
    let data = BUFFERS + 4096;
    let mut c = BlkClient::connect(&socket, 2, 4 << 20).expect("vhost-user-blk set-up");
    assert_eq!(c.request(0, T_IN, 0, &[(data, 4096)]).unwrap().0, S_OK);
    let old = c.replace_kick(0, false);
    old.write(1).expect("a count on the old kick");
    // Served through the new kick.
    let (status, _) = c
        .request(0, T_IN, 8, &[(data, 4096)])
        .unwrap_or_else(|e| panic!("a read after the new kick: {e}\n{}", daemon.stderr()));
    assert_eq!(status, S_OK);
    let used = cpu_seconds_in_the_next_second(pid);
    assert!(
        used < 0.5,
        "the daemon used {used:.2} s of CPU in 1 s after a count on a replaced kick\n{}",
        daemon.stderr()
    );
    let replaced = c.replace_kick(1, true);
    c.kick_with(1, 0xffff_ffff_ffff_fffe);
    let used = cpu_seconds_in_the_next_second(pid);
    assert!(
        used < 0.5,
        "the daemon used {used:.2} s of CPU in 1 s after a filled semaphore kick\n{}",
        daemon.stderr()
    );
    drop((c, old, replaced));
    let mut c = BlkClient::connect(&socket, 2, 4 << 20)
        .unwrap_or_else(|e| panic!("a client after: {e}\n{}", daemon.stderr()));
    assert_eq!(c.request(1, T_IN, 0, &[(data, 4096)]).unwrap().0, S_OK);
    drop(c);
    assert_eq!(daemon.stop(), 0);
}

/// The threads of process `pid` named `name`, each with the number of
/// the system call it is in (None when it runs).
fn threads_named(pid: u32, name: &str) -> Vec<Option<i64>> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim() == name)
        })
        .map(|task| {
            std::fs::read_to_string(task.path().join("syscall"))
                .ok()
                .and_then(|s| s.split(' ').next()?.parse().ok())
        })
        .collect()
}

/// A frontend that makes a call fd blocking and fills its counter blocks
/// the interrupt write of its connection's notifier thread. Once that
/// frontend has gone, the thread must have gone too: one thread leaked
/// per such connection otherwise, for as long as the daemon runs. Three
/// connections in turn, and the daemon still serves after them.
#[test]
fn a_call_fd_made_blocking_and_full_leaks_no_thread() {
    let (_fx, daemon, socket, _) = setup("");
    let pid = daemon.child.id();
    // The daemon is not dumpable: only root reads its threads' syscalls.
    if std::fs::read_to_string(format!("/proc/{pid}/syscall")).is_err() {
        skip("reading the daemon's /proc/PID/task/*/syscall needs root");
        return;
    }
    let data = BUFFERS + 4096;
    for round in 0..3 {
        let mut c = BlkClient::connect(&socket, 2, 4 << 20).expect("vhost-user-blk set-up");
        c.block_call(0);
        let (status, _) = c
            .request(0, T_IN, 0, &[(data, 4096)])
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", daemon.stderr()));
        assert_eq!(status, S_OK);
        // The completion's interrupt is the write that blocks.
        wait_until(
            "a notifier thread blocked in write",
            Duration::from_secs(30),
            || threads_named(pid, "vhost-user-irq").contains(&Some(libc::SYS_write)),
        );
        drop(c);
        wait_until(
            "no notifier thread left after the frontend went",
            Duration::from_secs(30),
            || threads_named(pid, "vhost-user-irq").is_empty(),
        );
    }
    let mut c = BlkClient::connect(&socket, 2, 4 << 20)
        .unwrap_or_else(|e| panic!("a client after: {e}\n{}", daemon.stderr()));
    let (status, _) = c.request(1, T_IN, 0, &[(data, 4096)]).unwrap();
    assert_eq!(status, S_OK);
    drop(c);
    assert_eq!(daemon.stop(), 0);
}

/// CPU seconds the process `pid` has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    // Fields after the command name, which ends at the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // SAFETY: sysconf takes an integer.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / ticks
}

/// CPU seconds the process `pid` uses in the next second: a window to
/// measure over, not a wait for an event.
fn cpu_seconds_in_the_next_second(pid: u32) -> f64 {
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(1));
    cpu_seconds(pid) - before
}

/// A guest that sets a queue's available index far past the ring: pops
/// find nothing while the index says more, which must not keep the
/// queue's worker polling (it polls once, looks once with notifications
/// on, and sleeps). The other queue is still served.
#[test]
fn an_avail_index_past_the_ring_does_not_keep_a_queue_worker_busy() {
    let (_fx, daemon, socket, _) = setup("");
    let mut c = BlkClient::connect(&socket, 2, 4 << 20).expect("vhost-user-blk set-up");
    let data = BUFFERS + 4096;
    let (status, _) = c
        .request(0, T_IN, 0, &[(data, 4096)])
        .expect("a first read");
    assert_eq!(status, S_OK);
    // EVENT_IDX is what the worker polls under: the harness takes every
    // feature the device offers.
    assert_ne!(c.features & (1 << 29), 0, "EVENT_IDX not negotiated");
    c.set_avail_index(0, 1000);
    let used = cpu_seconds_in_the_next_second(daemon.child.id());
    assert!(
        used < 0.5,
        "the daemon used {used:.2} s of CPU in 1 s after a bogus avail index\n{}",
        daemon.stderr()
    );
    let (status, _) = c.request(1, T_IN, 0, &[(data, 4096)]).unwrap_or_else(|e| {
        panic!(
            "queue 1 after queue 0's bogus index: {e:?}\n{}",
            daemon.stderr()
        )
    });
    assert_eq!(status, S_OK);
}
