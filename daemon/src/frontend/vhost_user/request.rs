//! One virtio-blk request, parsed from the descriptor chain the guest put
//! on a virtqueue: a typed [`Request`] (or a [`Rejection`] saying which
//! status the guest gets), with every address and length checked, and no
//! I/O: the header, a discard/write-zeroes segment and nothing else is
//! read from guest memory, and nothing is written. `backend.rs` runs what
//! this returns; a fuzz target can drive it through virtio-queue's mock
//! guest memory (`virtio_queue::mock`).
//!
//! The guest controls the descriptor table, so everything here is
//! untrusted: addresses must lie in guest memory, lengths are summed with
//! checked arithmetic, the data's direction must match the request type,
//! and a read or write must lie inside the volume. Layout (virtio 1.x,
//! where descriptor boundaries carry no meaning): the device-readable
//! descriptors come first, then the device-writable ones; the header is
//! the first 16 bytes of the readable part (it may span descriptors or
//! share one with data), the status byte the last byte of the writable
//! part, and the data what lies between. Bytes in the wrong direction for
//! the request type are refused, never dropped. Requests over what the
//! configuration space advertises (seg_max, the discard and write-zeroes
//! sector limits) are refused. Loops and chains longer than the queue end
//! the chain early (virtio-queue's iterator stops), which is refused too.
//!
//! Hand-written on purpose: the typed request is ours (it maps onto
//! `volume::Op`), and the checks are the frontend's security boundary.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// virtio-blk counts sectors of 512 bytes, whatever the block size.
pub const SECTOR: u64 = 512;
/// `struct virtio_blk_outhdr`: type, ioprio, sector.
pub const HEADER_LEN: u32 = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
pub const SEGMENT_LEN: u32 = 16;
/// Longest chain read: the queue size bounds a direct chain, and this an
/// indirect table (INDIRECT_DESC, which virtio-queue's chain walker
/// follows), so a guest cannot make one request cost more than this.
pub const MAX_DESCRIPTORS: usize = 1024;
/// The serial a GET_ID request returns, at most this long.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// What a parsed request asks for; offsets and lengths in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// VIRTIO_BLK_T_IN: read into the (device-writable) data buffers.
    Read {
        offset: u64,
    },
    /// VIRTIO_BLK_T_OUT: write the (device-readable) data buffers.
    Write {
        offset: u64,
    },
    Flush,
    /// VIRTIO_BLK_T_GET_ID: the serial into the data buffers.
    GetId,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
}

/// One guest buffer of a request's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    /// The data buffers, in order (empty for FLUSH, DISCARD, WRITE_ZEROES).
    pub data: Vec<Segment>,
    /// Their total length: bounded by `Limits::max_data`.
    pub len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// What the device allows, for the checks.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The volume's size in bytes.
    pub capacity: u64,
    /// Longest read or write accepted, in bytes.
    pub max_data: u64,
    /// VIRTIO_BLK_F_RO: writes, discards and write-zeroes fail.
    pub read_only: bool,
    /// VIRTIO_BLK_F_DISCARD was offered (`allow_discards`).
    pub discard: bool,
    /// Data buffers per request at most (`seg_max`).
    pub max_segments: usize,
    /// Sectors per discard or write-zeroes at most (`max_discard_sectors`,
    /// `max_write_zeroes_sectors`).
    pub max_zero_sectors: u32,
}

/// Why a chain was refused. Those with a status address get
/// [`RequestError::status`] written there; the others (no status byte to
/// write) are only returned to the guest as used, with nothing written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: Option<GuestAddress>,
    pub error: RequestError,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the descriptor chain is empty")]
    Empty,
    #[error("the descriptor chain ends early or runs on (a bad descriptor, a loop, or a chain longer than the queue or 1024 descriptors)")]
    Truncated,
    #[error("the last descriptor is not a device-writable status byte")]
    NoStatus,
    #[error("the status byte at {0:#x} is outside guest memory")]
    StatusOutside(u64),
    #[error("the request header is in a device-writable descriptor")]
    HeaderWritable,
    #[error("the device-readable part has {0} bytes, less than the 16-byte header")]
    HeaderShort(u64),
    #[error("the request header at {0:#x} is outside guest memory")]
    HeaderOutside(u64),
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("data descriptor {index} has the wrong direction for this request type")]
    WrongDirection { index: usize },
    #[error("a data buffer ({addr:#x}, {len} bytes) is outside guest memory")]
    DataOutside { addr: u64, len: u32 },
    #[error("the data length {0} is not a multiple of 512")]
    NotSectorMultiple(u64),
    #[error("the data length {0} is over the largest request accepted")]
    TooLong(u64),
    #[error("{0} data buffers, over the seg_max the device advertises")]
    TooManySegments(usize),
    #[error("{sectors} sectors to discard or zero, over the {max} the device advertises")]
    TooManySectors { sectors: u32, max: u32 },
    #[error("a read or write without data")]
    NoData,
    #[error("sector {sector} with {len} bytes is beyond the end of the volume ({capacity} bytes)")]
    BeyondEnd {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("the device is read-only")]
    ReadOnly,
    #[error("discards are not enabled on this volume (allow_discards)")]
    DiscardOff,
    #[error("a discard or write-zeroes request needs exactly one 16-byte segment")]
    BadSegment,
    #[error("unknown discard or write-zeroes flags {0:#x}")]
    BadFlags(u32),
}

impl RequestError {
    /// The virtio status the guest sees.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::DiscardOff | RequestError::BadFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// Parses one descriptor chain (its descriptors in order) against guest
/// memory `mem`.
pub fn parse<M, I>(chain: I, mem: &M, limits: &Limits) -> Result<Request, Rejection>
where
    M: GuestMemory,
    I: IntoIterator<Item = Descriptor>,
{
    let descriptors: Vec<Descriptor> = chain.into_iter().take(MAX_DESCRIPTORS + 1).collect();
    let no_status = |error| Rejection {
        status: None,
        error,
    };
    if descriptors.len() > MAX_DESCRIPTORS {
        return Err(no_status(RequestError::Truncated));
    }
    let (Some(head), Some(last)) = (descriptors.first(), descriptors.last()) else {
        return Err(no_status(RequestError::Empty));
    };
    if last.has_next() {
        return Err(no_status(RequestError::Truncated));
    }
    if descriptors.len() < 2 || !last.is_write_only() || last.len() == 0 {
        return Err(no_status(RequestError::NoStatus));
    }
    // virtio 1.x: the status is the last byte of the device-writable
    // part, whatever the descriptor boundaries.
    let status = last
        .addr()
        .checked_add(u64::from(last.len() - 1))
        .filter(|s| mem.check_range(*s, 1, Permissions::Write))
        .ok_or_else(|| no_status(RequestError::StatusOutside(last.addr().0)))?;
    let fail = |error| Rejection {
        status: Some(status),
        error,
    };
    if head.is_write_only() {
        return Err(fail(RequestError::HeaderWritable));
    }

    // The device-readable part, then the device-writable part: a
    // readable descriptor after a writable one is a malformed chain.
    let split = descriptors
        .iter()
        .position(|d| d.is_write_only())
        .unwrap_or(descriptors.len());
    for (index, d) in descriptors.iter().enumerate() {
        let access = if index < split {
            Permissions::Read
        } else if d.is_write_only() {
            Permissions::Write
        } else {
            return Err(fail(RequestError::WrongDirection { index }));
        };
        if !mem.check_range(d.addr(), d.len() as usize, access) {
            if index == 0 {
                return Err(fail(RequestError::HeaderOutside(d.addr().0)));
            }
            return Err(fail(RequestError::DataOutside {
                addr: d.addr().0,
                len: d.len(),
            }));
        }
    }
    let (readable, writable) = descriptors.split_at(split);
    // At most 1024 descriptors of at most 4 GiB: no overflow.
    let total = |part: &[Descriptor]| part.iter().map(|d| u64::from(d.len())).sum::<u64>();
    let (readable_total, writable_total) = (total(readable), total(writable));
    // The header is the first 16 bytes of the readable part; the status
    // byte (the writable part's last) is not data.
    if readable_total < u64::from(HEADER_LEN) {
        return Err(fail(RequestError::HeaderShort(readable_total)));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    read_pieces(
        mem,
        bytes(readable, 0, 0, u64::from(HEADER_LEN)),
        &mut header,
    )
    .map_err(|addr| fail(RequestError::HeaderOutside(addr)))?;
    let out_data = bytes(readable, 0, u64::from(HEADER_LEN), readable_total);
    // Not zero: the last descriptor is writable and not empty.
    let in_data = bytes(writable, split, 0, writable_total - 1);
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));

    // Which way the data goes: the device writes it (a read, the id) or
    // reads it (everything else); bytes the other way are refused, not
    // dropped.
    let device_writes = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => true,
        VIRTIO_BLK_T_OUT
        | VIRTIO_BLK_T_FLUSH
        | VIRTIO_BLK_T_DISCARD
        | VIRTIO_BLK_T_WRITE_ZEROES => false,
        other => return Err(fail(RequestError::Unsupported(other))),
    };
    let (data, mut stray) = if device_writes {
        (in_data, out_data)
    } else {
        (out_data, in_data)
    };
    if let Some(first) = stray.next() {
        return Err(fail(RequestError::WrongDirection { index: first.index }));
    }
    let segments = data.clone().count();
    if segments > limits.max_segments {
        return Err(fail(RequestError::TooManySegments(segments)));
    }
    let mut len = 0u64;
    for piece in data.clone() {
        len = len
            .checked_add(u64::from(piece.segment.len))
            .ok_or_else(|| fail(RequestError::TooLong(u64::MAX)))?;
    }

    let command = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            if kind == VIRTIO_BLK_T_OUT && limits.read_only {
                return Err(fail(RequestError::ReadOnly));
            }
            if len == 0 {
                return Err(fail(RequestError::NoData));
            }
            if !len.is_multiple_of(SECTOR) {
                return Err(fail(RequestError::NotSectorMultiple(len)));
            }
            if len > limits.max_data {
                return Err(fail(RequestError::TooLong(len)));
            }
            let offset = inside(sector, len, limits.capacity).map_err(fail)?;
            if kind == VIRTIO_BLK_T_IN {
                Command::Read { offset }
            } else {
                Command::Write { offset }
            }
        }
        VIRTIO_BLK_T_FLUSH => Command::Flush,
        VIRTIO_BLK_T_GET_ID => {
            if len == 0 {
                return Err(fail(RequestError::NoData));
            }
            Command::GetId
        }
        _ => {
            // DISCARD or WRITE_ZEROES: one 16-byte segment (max_*_seg = 1).
            if limits.read_only {
                return Err(fail(RequestError::ReadOnly));
            }
            let discard = kind == VIRTIO_BLK_T_DISCARD;
            if discard && !limits.discard {
                return Err(fail(RequestError::DiscardOff));
            }
            if len != u64::from(SEGMENT_LEN) {
                return Err(fail(RequestError::BadSegment));
            }
            let mut raw = [0u8; SEGMENT_LEN as usize];
            read_pieces(mem, data, &mut raw).map_err(|_| fail(RequestError::BadSegment))?;
            let first = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
            let sectors = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(raw[12..16].try_into().expect("4 bytes"));
            let allowed = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                return Err(fail(RequestError::BadFlags(flags)));
            }
            // What the configuration space advertised: one request must
            // not hold a worker thread for longer than that much takes.
            if sectors > limits.max_zero_sectors {
                return Err(fail(RequestError::TooManySectors {
                    sectors,
                    max: limits.max_zero_sectors,
                }));
            }
            let bytes = u64::from(sectors) * SECTOR;
            let offset = inside(first, bytes, limits.capacity).map_err(fail)?;
            let command = if discard {
                Command::Discard { offset, len: bytes }
            } else {
                Command::WriteZeroes {
                    offset,
                    len: bytes,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                }
            };
            return Ok(Request {
                command,
                data: Vec::new(),
                len: 0,
                status,
            });
        }
    };
    Ok(Request {
        command,
        data: {
            let mut buffers = Vec::with_capacity(segments);
            buffers.extend(data.map(|p| p.segment));
            buffers
        },
        len,
        status,
    })
}

/// A non-empty descriptor's buffer and its place in the chain (for errors).
#[derive(Debug, Clone, Copy)]
struct Piece {
    index: usize,
    segment: Segment,
}

/// The non-empty pieces of `part` (whose first descriptor is number
/// `first` of the chain) that hold bytes `from..to` of its buffers laid
/// end to end; a descriptor may be cut. Nothing is allocated: the parser
/// walks the chain's descriptors instead of copying them into lists.
fn bytes(
    part: &[Descriptor],
    first: usize,
    from: u64,
    to: u64,
) -> impl Iterator<Item = Piece> + Clone + '_ {
    let mut start = 0u64;
    part.iter().enumerate().filter_map(move |(i, d)| {
        let (lo, hi) = (start, start + u64::from(d.len()));
        start = hi;
        let (a, b) = (lo.max(from), hi.min(to));
        // In range: the whole descriptor was checked against memory.
        (a < b).then(|| Piece {
            index: first + i,
            segment: Segment {
                addr: GuestAddress(d.addr().0 + (a - lo)),
                len: (b - a) as u32,
            },
        })
    })
}

/// Reads `pieces` (exactly `out.len()` bytes in all) into `out`; on
/// failure, the address that could not be read.
fn read_pieces<M: GuestMemory>(
    mem: &M,
    pieces: impl Iterator<Item = Piece>,
    out: &mut [u8],
) -> Result<(), u64> {
    let mut at = 0usize;
    for piece in pieces {
        let end = at + piece.segment.len as usize;
        let Some(target) = out.get_mut(at..end) else {
            return Err(piece.segment.addr.0);
        };
        mem.read_slice(target, piece.segment.addr)
            .map_err(|_| piece.segment.addr.0)?;
        at = end;
    }
    if at == out.len() {
        Ok(())
    } else {
        Err(0)
    }
}

/// The byte offset of `sector` when `len` bytes from there lie inside a
/// volume of `capacity` bytes.
fn inside(sector: u64, len: u64, capacity: u64) -> Result<u64, RequestError> {
    let beyond = RequestError::BeyondEnd {
        sector,
        len,
        capacity,
    };
    let offset = sector.checked_mul(SECTOR).ok_or_else(|| beyond.clone())?;
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(offset),
        _ => Err(beyond),
    }
}

#[cfg(test)]
mod tests;
