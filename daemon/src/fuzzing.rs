//! Entry points for the coverage-guided fuzz targets in `fuzz/` (cargo
//! feature `fuzzing`, off in every normal build). Each takes raw bytes and
//! drives one private parser the way a peer or a disk would feed it, so
//! the protocol and format modules stay private to the crate.
//!
//! What lives elsewhere: the targets, their seed corpora and the runner
//! (`fuzz/`); the public parsers (header, config, control protocol), which
//! the targets call directly.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::export::access::AllowList;
use crate::export::peer::Peer;
use crate::export::{Export, Exports};
use crate::frontend::nbd::handshake::{Session, Then, TlsPhase};
use crate::io::Backing;
use crate::volume::journal::{self, JournalKey, JOURNAL_AT};
use crate::wire::nbd::{OPTION_REPLY_MAGIC, OPT_EXPORT_NAME};

/// What every execution reuses: one runtime, one small temp volume (on a
/// tmpfs where there is one), one journal area.
struct Harness {
    runtime: tokio::runtime::Runtime,
    export: Arc<Export>,
    exports: Exports,
    journal: Backing,
}

fn scratch(name: &str) -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("hostcrypt-fuzz-{}-{name}", std::process::id()))
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        // Set-up failures are the fuzzing machine's, not an input's: panic
        // with the reason before the first execution.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
        // 64 KiB: every path (partial sectors, ranges past the end) is
        // reachable, and whole-volume reads stay cheap under the coverage
        // instrumentation (a 1 MiB read spent most of its time comparing
        // bytes in the zero-sector scan).
        let geometry = crate::volume::Geometry {
            size: 64 << 10,
            sector_size: 512,
        };
        let volume = crate::volume::open_temp(
            "fuzz",
            &scratch("volume"),
            geometry,
            &Default::default(),
            &crate::volume::Claimant::local(),
        )
        .unwrap_or_else(|e| panic!("temp volume: {e}"));
        let export = Arc::new(Export::new(
            volume,
            "fuzz".into(),
            true,
            AllowList::anyone(),
        ));
        let exports = Exports::new(vec![export.clone()]);
        let journal = Backing::open_or_create(&scratch("journal"))
            .unwrap_or_else(|e| panic!("journal backing: {e}"));
        Harness {
            runtime,
            export,
            exports,
            journal,
        }
    })
}

/// The option haggling, from the greeting to GO, EXPORT_NAME, STARTTLS or
/// the end of input. The first byte picks the listener's TLS mode.
pub fn handshake(data: &[u8]) {
    let h = harness();
    let (mode, mut input) = data.split_first().unwrap_or((&0, &[]));
    let tls = match mode % 3 {
        0 => TlsPhase::Unavailable,
        1 => TlsPhase::Offered { required: false },
        _ => TlsPhase::Offered { required: true },
    };
    let peer = Peer::tcp(std::net::SocketAddr::from(([127, 0, 0, 1], 10809)));
    let mut session = Session::new(&peer, &h.exports, tls, mode & 4 == 4);
    // The state machine alone, no runtime: each option header, then its
    // data, as the async driver feeds them.
    loop {
        let Some((header, rest)) = input.split_first_chunk::<16>() else {
            let _ = session.on_eof();
            return;
        };
        let magic = u64::from_be_bytes(header[..8].try_into().unwrap_or_default());
        let option = u32::from_be_bytes(header[8..12].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(header[12..].try_into().unwrap_or_default());
        if let Some(step) = session.on_header(magic, option, len) {
            check_replies(option, &step.replies);
            return;
        }
        let Some((body, rest)) = rest.split_at_checked(len as usize) else {
            return;
        };
        input = rest;
        let step = session.on_option(option, body);
        if option != OPT_EXPORT_NAME {
            check_replies(option, &step.replies);
        }
        if !matches!(step.then, Then::Continue) {
            return;
        }
    }
}

/// Every reply to an option is well-formed: the reply magic, that option,
/// a length that matches the bytes, a bounded message.
fn check_replies(option: u32, mut replies: &[u8]) {
    while !replies.is_empty() {
        assert!(replies.len() >= 20, "a truncated option reply");
        assert_eq!(
            u64::from_be_bytes(replies[..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC
        );
        assert_eq!(
            u32::from_be_bytes(replies[8..12].try_into().unwrap()),
            option
        );
        let len = u32::from_be_bytes(replies[16..20].try_into().unwrap()) as usize;
        assert!(len <= 64 * 1024, "an option reply of {len} bytes");
        assert!(replies.len() >= 20 + len, "a reply longer than its bytes");
        replies = &replies[20 + len..];
    }
}

/// The transmission phase: `data` is the request stream a client sends
/// (headers and payloads), served against a 64 KiB temp volume. The first
/// byte picks the negotiated features (simple or structured replies,
/// `base:allocation` or not, compact or extended headers).
pub fn transmission(data: &[u8]) {
    let h = harness();
    let (mode, data) = data.split_first().unwrap_or((&0, &[]));
    let extended = mode & 4 == 4;
    let structured = mode & 1 == 1 || extended;
    let features = crate::wire::nbd::Features {
        structured,
        extended,
        base_allocation: structured && mode & 2 == 2,
    };
    h.runtime.block_on(async {
        let (_keep, shutdown) = watch::channel(false);
        let _ = crate::frontend::nbd::transmission::serve(
            data,
            tokio::io::sink(),
            crate::frontend::nbd::ReplyRoute {
                direct: None,
                timeout: std::time::Duration::from_secs(60),
                memory: crate::frontend::nbd::budget::ReplyMemory::new(
                    crate::frontend::nbd::budget::DEFAULT_REPLY_MEMORY,
                ),
            },
            h.export.clone(),
            features,
            shutdown,
            "fuzz",
        )
        .await;
    });
}

/// The journal key the fuzzed records are authenticated with.
const FUZZ_JOURNAL_KEY: [u8; 32] = [0x4a; 32];

/// The re-encryption journal as found on a disk. With the first byte odd,
/// the record's checksums and MAC are fixed up first (as a valid writer
/// would have left them), so the fuzzer gets past them to the fields
/// behind; with bit 1 set too, as the old unauthenticated format, which
/// must be refused as forged (the record always names its own window).
pub fn journal(data: &[u8]) {
    let h = harness();
    let mut area = data.to_vec();
    let fixed = area.first().copied().filter(|b| b & 1 == 1);
    if let Some(first) = fixed {
        fix_up_hash_record(&mut area, first & 2 == 0);
    }
    if h.journal.write_at(&area, JOURNAL_AT).is_err() {
        return;
    }
    let field = |at: usize, len: usize| area.get(at..at + len).map(<[u8]>::to_vec);
    let key = JournalKey {
        uuid: field(8, 16)
            .and_then(|b| uuid::Uuid::from_slice(&b).ok())
            .unwrap_or_default(),
        checkpoint: field(24, 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes),
        target_generation: field(40, 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes),
    };
    let read = journal::read_hashes(&h.journal, key, &FUZZ_JOURNAL_KEY);
    if let (Some(first), true) = (fixed, area.len() >= 144) {
        let forged = matches!(read, Err(journal::JournalError::Forged { .. }));
        assert_eq!(
            forged,
            first & 2 != 0,
            "only the unauthenticated record is refused as forged"
        );
    }
    // Whatever was read, clear it for the next execution.
    let _ = h.journal.write_at(&vec![0u8; area.len()], JOURNAL_AT);
}

fn fix_up_hash_record(area: &mut [u8], authenticated: bool) {
    const RECORD: usize = 4096;
    if area.len() < 144 {
        return;
    }
    area[..8].copy_from_slice(if authenticated {
        b"HCJRNL\x00\x03"
    } else {
        b"HCJRNL\x00\x02"
    });
    let len = u64::from_le_bytes(area[32..40].try_into().unwrap_or([0; 8]));
    let sector = u64::from(u32::from_le_bytes(
        area[44..48].try_into().unwrap_or([0; 4]),
    ));
    let count = len.checked_div(sector).unwrap_or(0);
    let table_end = (RECORD as u64).saturating_add(count.saturating_mul(32));
    let table = area
        .get(
            RECORD
                ..usize::try_from(table_end)
                    .unwrap_or(usize::MAX)
                    .min(area.len()),
        )
        .unwrap_or_default();
    let table_sum = Sha256::digest(table);
    area[48..80].copy_from_slice(&table_sum);
    let sum = Sha256::digest(&area[..80]);
    area[80..112].copy_from_slice(&sum);
    let tag = crate::volume::auth::mac(&FUZZ_JOURNAL_KEY, &area[..112]);
    area[112..144].copy_from_slice(&tag);
}

/// What an NBD server sends to the remote-backing client: handshake
/// replies, or replies to requests in flight (first byte picks which).
pub fn nbd_client(data: &[u8]) {
    crate::io::remote::client::fuzz(data);
}

/// A virtio-blk descriptor chain a guest controls: the first byte picks
/// the head descriptor and the device's settings, the next 256 fill a
/// 16-entry descriptor table, the rest guest memory from 4 KiB on (where
/// the headers and segments the descriptors point at live). The chain
/// virtio-queue walks from them either parses into a request whose every
/// buffer lies in guest memory and whose range lies inside the volume, or
/// is refused with a status address inside guest memory. Never a panic.
pub fn vhost_request(data: &[u8]) {
    use crate::frontend::vhost_user::request::{self, Command, Limits, SECTOR};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

    const MEMORY: usize = 64 << 10;
    const QUEUE: u16 = 16;
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY)])
        .unwrap_or_else(|e| panic!("guest memory: {e}"));
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE);
    let table_len = 16 * usize::from(QUEUE);
    let (table, contents) = rest.split_at(rest.len().min(table_len));
    let contents = &contents[..contents.len().min(MEMORY - 0x1000)];
    let written = mem
        .write_slice(table, vq.desc_table_addr())
        .and_then(|()| mem.write_slice(contents, GuestAddress(0x1000)));
    // One available entry, whose head the control byte picks.
    let avail = vq.avail_addr();
    let head = u16::from(control) % QUEUE;
    let written = written
        .and_then(|()| mem.write_obj(head.to_le(), avail.unchecked_add(4)))
        .and_then(|()| mem.write_obj(1u16.to_le(), avail.unchecked_add(2)));
    if let Err(e) = written {
        panic!("writing the fuzz input into guest memory: {e}");
    }
    let Ok(mut queue) = vq.create_queue::<Queue>() else {
        return;
    };
    let Some(chain) = queue.iter(&mem).ok().and_then(|mut i| i.next()) else {
        return;
    };
    let limits = Limits {
        capacity: 1 << 20,
        max_data: 64 << 10,
        read_only: control & 0x80 != 0,
        discard: control & 0x40 != 0,
        max_segments: 8,
        max_zero_sectors: 64,
    };
    match request::parse(chain, &mem, &limits) {
        Ok(r) => {
            assert!(mem.check_range(r.status, 1, Permissions::Write));
            let mut sum = 0u64;
            for s in &r.data {
                assert!(mem.check_range(s.addr, s.len as usize, Permissions::ReadWrite));
                sum += u64::from(s.len);
            }
            assert_eq!(sum, r.len);
            assert!(r.data.len() <= limits.max_segments);
            let range = match r.command {
                Command::Read { offset } | Command::Write { offset } => {
                    assert!(r.len > 0 && r.len.is_multiple_of(SECTOR) && r.len <= limits.max_data);
                    assert!(!limits.read_only || matches!(r.command, Command::Read { .. }));
                    Some((offset, r.len))
                }
                Command::Discard { offset, len } => {
                    assert!(limits.discard && !limits.read_only);
                    assert!(len <= u64::from(limits.max_zero_sectors) * SECTOR);
                    Some((offset, len))
                }
                Command::WriteZeroes { offset, len, .. } => {
                    assert!(!limits.read_only);
                    assert!(len <= u64::from(limits.max_zero_sectors) * SECTOR);
                    Some((offset, len))
                }
                Command::Flush | Command::GetId => None,
            };
            if let Some((offset, len)) = range {
                assert!(offset
                    .checked_add(len)
                    .is_some_and(|end| end <= limits.capacity));
            }
        }
        Err(rejection) => {
            if let Some(status) = rejection.status {
                assert!(mem.check_range(status, 1, Permissions::Write));
            }
        }
    }
}
