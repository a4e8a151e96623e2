//! The request parser against hand-built descriptor chains in a small
//! guest memory: every well-formed type, and each kind of bad input a
//! guest can send, with the status it must get.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const MEMORY: u64 = 0x10000;
const HEADER: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0x8000;
const CAPACITY: u64 = 1 << 20;

fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY as usize)]).unwrap()
}

fn limits() -> Limits {
    Limits {
        capacity: CAPACITY,
        max_data: 64 << 10,
        read_only: false,
        discard: true,
        max_segments: 4,
        max_zero_sectors: 1 << 10,
    }
}

fn header(mem: &GuestMemoryMmap<()>, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
}

const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

/// A chain: (addr, len, writable) in order, `next` flags set on all but
/// the last.
fn chain(parts: &[(u64, u32, u16)]) -> Vec<Descriptor> {
    parts
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let next = if i + 1 < parts.len() {
                VRING_DESC_F_NEXT as u16
            } else {
                0
            };
            Descriptor::new(addr, len, flags | next, (i + 1) as u16)
        })
        .collect()
}

fn rejected(result: Result<Request, Rejection>) -> (Option<GuestAddress>, RequestError) {
    let r = result.expect_err("should be refused");
    (r.status, r.error)
}

#[test]
fn parses_a_read_over_two_buffers() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 8);
    let c = chain(&[
        (HEADER, 16, R),
        (DATA, 4096, W),
        (DATA + 4096, 512, W),
        (STATUS, 1, W),
    ]);
    let req = parse(c, &mem, &limits()).unwrap();
    assert_eq!(req.command, Command::Read { offset: 4096 });
    assert_eq!(req.len, 4608);
    assert_eq!(req.data.len(), 2);
    assert_eq!(req.status, GuestAddress(STATUS));
}

#[test]
fn parses_write_flush_and_get_id() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let c = chain(&[(HEADER, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    assert_eq!(
        parse(c, &mem, &limits()).unwrap().command,
        Command::Write { offset: 0 }
    );
    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let c = chain(&[(HEADER, 16, R), (STATUS, 1, W)]);
    assert_eq!(parse(c, &mem, &limits()).unwrap().command, Command::Flush);
    header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let c = chain(&[(HEADER, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
    assert_eq!(parse(c, &mem, &limits()).unwrap().command, Command::GetId);
}

fn segment(mem: &GuestMemoryMmap<()>, sector: u64, sectors: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&s, GuestAddress(DATA)).unwrap();
}

#[test]
fn parses_discard_and_write_zeroes_segments() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    segment(&mem, 16, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let c = chain(&[(HEADER, 16, R), (DATA, 16, R), (STATUS, 1, W)]);
    let req = parse(c.clone(), &mem, &limits()).unwrap();
    assert_eq!(
        req.command,
        Command::WriteZeroes {
            offset: 8192,
            len: 4096,
            unmap: true
        }
    );
    assert!(req.data.is_empty());

    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        parse(c.clone(), &mem, &limits()).unwrap_err().error,
        RequestError::BadFlags(VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
    );
    segment(&mem, 16, 8, 0);
    assert_eq!(
        parse(c.clone(), &mem, &limits()).unwrap().command,
        Command::Discard {
            offset: 8192,
            len: 4096
        }
    );
    // Without allow_discards: UNSUPP, as the feature was not offered.
    let off = Limits {
        discard: false,
        ..limits()
    };
    let (status, error) = rejected(parse(c, &mem, &off));
    assert_eq!((status, error.status()), (Some(GuestAddress(STATUS)), 2));
    // Beyond the end.
    header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    segment(&mem, CAPACITY / 512, 1, 0);
    let c = chain(&[(HEADER, 16, R), (DATA, 16, R), (STATUS, 1, W)]);
    assert!(matches!(
        rejected(parse(c, &mem, &limits())).1,
        RequestError::BeyondEnd { .. }
    ));
}

#[test]
fn unknown_types_are_unsupported() {
    let mem = memory();
    header(&mem, 0xdead, 0);
    let c = chain(&[(HEADER, 16, R), (STATUS, 1, W)]);
    let (status, error) = rejected(parse(c, &mem, &limits()));
    assert_eq!(status, Some(GuestAddress(STATUS)));
    assert_eq!(error, RequestError::Unsupported(0xdead));
    assert_eq!(error.status(), VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn bad_chains_without_a_status_byte_get_none() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        rejected(parse(Vec::new(), &mem, &limits())),
        (None, RequestError::Empty)
    );
    // The last descriptor is read-only: nowhere to write a status.
    let c = chain(&[(HEADER, 16, R), (DATA, 512, W), (STATUS, 1, R)]);
    assert_eq!(
        rejected(parse(c, &mem, &limits())).1,
        RequestError::NoStatus
    );
    // The chain stopped with NEXT still set (a loop cut at the queue size).
    let mut c = chain(&[(HEADER, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    c[2] = Descriptor::new(STATUS, 1, W | VRING_DESC_F_NEXT as u16, 0);
    assert_eq!(
        rejected(parse(c, &mem, &limits())).1,
        RequestError::Truncated
    );
    // A status byte outside guest memory.
    let c = chain(&[(HEADER, 16, R), (MEMORY + 10, 1, W)]);
    assert_eq!(
        rejected(parse(c, &mem, &limits())),
        (None, RequestError::StatusOutside(MEMORY + 10))
    );
}

#[test]
fn bad_buffers_get_an_error_status() {
    let mem = memory();
    let io_error = |c: Vec<Descriptor>| {
        let (status, error) = rejected(parse(c, &mem, &limits()));
        assert_eq!(status, Some(GuestAddress(STATUS)), "{error}");
        assert_eq!(error.status(), VIRTIO_BLK_S_IOERR as u8, "{error}");
        error
    };
    header(&mem, VIRTIO_BLK_T_IN, 0);
    // A header shorter than 16 bytes.
    let e = io_error(chain(&[(HEADER, 8, R), (STATUS, 1, W)]));
    assert_eq!(e, RequestError::HeaderShort(8));
    // Header outside guest memory, and writable.
    let e = io_error(chain(&[(MEMORY - 8, 16, R), (STATUS, 1, W)]));
    assert_eq!(e, RequestError::HeaderOutside(MEMORY - 8));
    let e = io_error(chain(&[(HEADER, 16, W), (STATUS, 1, W)]));
    assert_eq!(e, RequestError::HeaderWritable);
    // A read into a device-readable buffer.
    let e = io_error(chain(&[(HEADER, 16, R), (DATA, 512, R), (STATUS, 1, W)]));
    assert_eq!(e, RequestError::WrongDirection { index: 1 });
    // A data buffer past the end of guest memory, and one near 2^64.
    let e = io_error(chain(&[
        (HEADER, 16, R),
        (MEMORY - 256, 512, W),
        (STATUS, 1, W),
    ]));
    assert!(matches!(e, RequestError::DataOutside { .. }));
    let e = io_error(chain(&[
        (HEADER, 16, R),
        (u64::MAX - 100, 512, W),
        (STATUS, 1, W),
    ]));
    assert!(matches!(e, RequestError::DataOutside { .. }));
    // Lengths: not a multiple of 512, none, too long.
    let e = io_error(chain(&[(HEADER, 16, R), (DATA, 513, W), (STATUS, 1, W)]));
    assert_eq!(e, RequestError::NotSectorMultiple(513));
    let e = io_error(chain(&[(HEADER, 16, R), (STATUS, 1, W)]));
    assert_eq!(e, RequestError::NoData);
    let short = Limits {
        max_data: 16 << 10,
        ..limits()
    };
    let c = chain(&[(HEADER, 16, R), (DATA, 0x8000, W), (STATUS, 1, W)]);
    assert_eq!(
        rejected(parse(c, &mem, &short)),
        (Some(GuestAddress(STATUS)), RequestError::TooLong(0x8000))
    );
    // Past the end of the volume, and a sector whose offset overflows.
    header(&mem, VIRTIO_BLK_T_IN, CAPACITY / 512);
    let e = io_error(chain(&[(HEADER, 16, R), (DATA, 512, W), (STATUS, 1, W)]));
    assert!(matches!(e, RequestError::BeyondEnd { .. }));
    header(&mem, VIRTIO_BLK_T_IN, u64::MAX / 256);
    let e = io_error(chain(&[(HEADER, 16, R), (DATA, 512, W), (STATUS, 1, W)]));
    assert!(matches!(e, RequestError::BeyondEnd { .. }));
}

#[test]
fn a_read_only_device_refuses_writes() {
    let mem = memory();
    let ro = Limits {
        read_only: true,
        ..limits()
    };
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let c = chain(&[(HEADER, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    assert_eq!(rejected(parse(c, &mem, &ro)).1, RequestError::ReadOnly);
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let c = chain(&[(HEADER, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert!(parse(c, &mem, &ro).is_ok());
}

/// Through virtio-queue's own chain walker, as the backend uses it: a
/// chain in a mock split queue, and a descriptor loop.
#[test]
fn chains_from_a_mock_queue_parse_and_loops_end() {
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let raw = |addr, len, flags, next| RawDescriptor::from(Descriptor::new(addr, len, flags, next));
    let vq = MockSplitQueue::create(&mem, GuestAddress(0xa000), 16);
    let chain = vq
        .build_desc_chain(&[
            raw(HEADER, 16, R, 0),
            raw(DATA, 512, W, 0),
            raw(STATUS, 1, W, 0),
        ])
        .unwrap();
    let req = parse(chain, &mem, &limits()).unwrap();
    assert_eq!(req.command, Command::Read { offset: 0 });

    // Descriptor 1 points back at itself: the walker stops at the queue
    // size and the parser sees NEXT still set.
    let next = VRING_DESC_F_NEXT as u16;
    let vq = MockSplitQueue::create(&mem, GuestAddress(0xa000), 16);
    let chain = vq
        .build_multiple_desc_chains(&[raw(HEADER, 16, next, 1), raw(DATA, 512, W | next, 1)])
        .unwrap();
    assert_eq!(
        parse(chain, &mem, &limits()).unwrap_err().error,
        RequestError::Truncated
    );
}

/// virtio 1.x layout: the header may span descriptors or share one with
/// the data, and the status is the last byte of the last descriptor.
#[test]
fn descriptor_boundaries_carry_no_meaning() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 8);
    // A header split in two, data and status in one descriptor.
    let c = chain(&[(HEADER, 8, R), (HEADER + 8, 8, R), (DATA, 4097, W)]);
    let req = parse(c, &mem, &limits()).unwrap();
    assert_eq!(req.command, Command::Read { offset: 4096 });
    assert_eq!(req.len, 4096);
    assert_eq!(
        req.data,
        vec![Segment {
            addr: GuestAddress(DATA),
            len: 4096
        }]
    );
    assert_eq!(req.status, GuestAddress(DATA + 4096));

    // A write whose header and data share the first descriptor.
    let mut block = vec![0u8; 16 + 512];
    block[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    mem.write_slice(&block, GuestAddress(DATA)).unwrap();
    let c = chain(&[(DATA, 16 + 512, R), (STATUS, 1, W)]);
    let req = parse(c, &mem, &limits()).unwrap();
    assert_eq!(req.command, Command::Write { offset: 0 });
    assert_eq!(
        req.data,
        vec![Segment {
            addr: GuestAddress(DATA + 16),
            len: 512
        }]
    );
    assert_eq!(req.status, GuestAddress(STATUS));
}

/// Bytes that would be dropped are refused instead: a read whose header
/// descriptor carries more than the header, a write with device-writable
/// data before its status, a readable descriptor after a writable one.
#[test]
fn bytes_in_the_wrong_direction_are_refused_not_dropped() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let c = chain(&[(HEADER, 16 + 512, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!(
        rejected(parse(c, &mem, &limits())),
        (
            Some(GuestAddress(STATUS)),
            RequestError::WrongDirection { index: 0 }
        )
    );
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let c = chain(&[(HEADER, 16, R), (DATA, 512, R), (STATUS, 2, W)]);
    assert_eq!(
        rejected(parse(c, &mem, &limits())).1,
        RequestError::WrongDirection { index: 2 }
    );
    let c = chain(&[
        (HEADER, 16, R),
        (DATA, 512, W),
        (DATA, 512, R),
        (STATUS, 1, W),
    ]);
    assert_eq!(
        rejected(parse(c, &mem, &limits())).1,
        RequestError::WrongDirection { index: 2 }
    );
}

/// What the configuration space advertises is enforced: seg_max, and the
/// discard / write-zeroes sector limits (a 0xffffffff-sector write-zeroes
/// would hold a worker thread for a 2 TiB zeroing).
#[test]
fn requests_over_the_advertised_limits_are_refused() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let mut parts = vec![(HEADER, 16, R)];
    parts.extend((0..5).map(|i| (DATA + i * 512, 512, W)));
    parts.push((STATUS, 1, W));
    let (status, error) = rejected(parse(chain(&parts), &mem, &limits()));
    assert_eq!(
        (status, error.clone()),
        (Some(GuestAddress(STATUS)), RequestError::TooManySegments(5))
    );
    assert_eq!(error.status(), VIRTIO_BLK_S_IOERR as u8);
    parts.remove(1);
    assert!(parse(chain(&parts), &mem, &limits()).is_ok());

    for kind in [VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD] {
        header(&mem, kind, 0);
        segment(&mem, 0, u32::MAX, 0);
        let c = chain(&[(HEADER, 16, R), (DATA, 16, R), (STATUS, 1, W)]);
        assert_eq!(
            rejected(parse(c.clone(), &mem, &limits())).1,
            RequestError::TooManySectors {
                sectors: u32::MAX,
                max: 1 << 10
            }
        );
        segment(&mem, 0, 1 << 10, 0);
        assert!(parse(c, &mem, &limits()).is_ok());
        // Two segments (max_*_seg is 1).
        let c = chain(&[(HEADER, 16, R), (DATA, 32, R), (STATUS, 1, W)]);
        assert_eq!(
            rejected(parse(c, &mem, &limits())).1,
            RequestError::BadSegment
        );
    }
}
