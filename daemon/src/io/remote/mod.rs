//! A remote backing: an NBD export (`client/`) used the way a file is,
//! with the export's block sizes honoured. Requests larger than its
//! maximum block are split and sent in parallel; requests that do not
//! cover whole minimum blocks become read-modify-write under a range lock
//! over the backend's blocks (a 64 KiB-block server still takes 4 KiB
//! client writes). FUA without server FUA is a FLUSH after the write;
//! TRIM and WRITE_ZEROES pass through when offered (zeroing otherwise
//! writes zeros; an unoffered TRIM does nothing, as a discard may).
//!
//! Per-volume connection options come from the config by URI
//! (`configure`), so that every place that opens a backing by path (the
//! daemon, `hostcrypt create`, `inspect`, `header backup`) reaches the
//! export the same way without threading options through each of them.
//!
//! The NBD client's errors keep their errno (an EIO from the backend is an
//! EIO to the client); a timeout is `TimedOut`, which the NBD server
//! answers as EIO.
//!
//! Durability: writes acknowledged but not yet flushed when a connection
//! is lost, and writes that timed out (which the backend may still apply
//! later, over newer ones), are a durability loss the client reports
//! (`client/mod.rs`); `backing.rs` records it as a failed sync, so
//! FLUSH and FUA fail until the volume is reopened.

pub mod client;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{IoBuf, RangeLock};
use crate::wire::nbd::*;
use client::{LossHook, NbdClient, RemoteOptions, RemoteStatus};

static OPTIONS: Mutex<BTreeMap<String, RemoteOptions>> = Mutex::new(BTreeMap::new());

/// Records how the backing at `uri` is to be reached (from its volume's
/// `backing_*` settings).
pub fn configure(uri: &str, options: RemoteOptions) {
    OPTIONS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(uri.to_string(), options);
}

fn options_for(uri: &str) -> RemoteOptions {
    OPTIONS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(uri)
        .cloned()
        .unwrap_or_default()
}

/// Zeroing without WRITE_ZEROES writes zeros in pieces of this size.
const ZERO_PIECE: u64 = 1 << 20;

pub struct RemoteBacking {
    client: Arc<NbdClient>,
    uri: PathBuf,
    min: u64,
    max: u64,
    /// Whole backend blocks a write is changing; only used when the
    /// backend's minimum block is over a byte (read-modify-write possible).
    blocks: RangeLock,
}

impl std::fmt::Debug for RemoteBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteBacking")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

pub type WriteDone = Box<dyn FnOnce(io::Result<()>) + Send>;

/// See `RemoteBacking::handle`.
#[derive(Clone)]
pub struct RemoteHandle {
    client: Arc<NbdClient>,
    min: u64,
}

impl std::fmt::Debug for RemoteHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteHandle").finish_non_exhaustive()
    }
}

impl RemoteHandle {
    /// `len` bytes at `offset`, a multiple of the backend's minimum block
    /// (whole blocks are read; never held by the write lease).
    pub fn read_at(&self, offset: u64, len: usize) -> io::Result<IoBuf> {
        if !offset.is_multiple_of(self.min) {
            return Err(io::Error::other(
                "a header copy that does not start on a backend block",
            ));
        }
        let whole = (len as u64).div_ceil(self.min).saturating_mul(self.min);
        let whole = u32::try_from(whole)
            .map_err(|_| io::Error::other("the backend's minimum block is too large"))?;
        let mut buf = self.client.call(Command::Read, 0, offset, whole, None)?;
        buf.truncate(len);
        Ok(buf)
    }

    /// Holds writes until `renew_write_lease` (`client/lease.rs`).
    pub fn require_write_lease(&self) {
        self.client.require_write_lease();
    }

    pub fn renew_write_lease(&self, deadline: std::time::Instant) {
        self.client.renew_write_lease(deadline);
    }

    pub fn revoke_writes(&self, reason: String) {
        self.client.revoke_writes(reason);
    }
}

impl RemoteBacking {
    pub fn connect(uri: &Path) -> io::Result<Self> {
        let text = uri.to_string_lossy();
        let client = NbdClient::connect(&text, options_for(&text)).map_err(io::Error::other)?;
        let info = *client.info();
        Ok(RemoteBacking {
            client: Arc::new(client),
            uri: uri.to_owned(),
            min: u64::from(info.min_block),
            max: u64::from(info.max_block),
            blocks: RangeLock::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.uri
    }

    pub fn size(&self) -> u64 {
        self.client.info().size
    }

    pub fn status(&self) -> RemoteStatus {
        self.client.status()
    }

    /// See `NbdClient::on_durability_lost`.
    pub fn on_durability_lost(&self, hook: LossHook) {
        self.client.on_durability_lost(hook);
    }

    /// A handle on the same connections for a thread of its own (the
    /// owner-record check, `volume/claim.rs`): it reads the export's start
    /// and steers the write lease (`client/lease.rs`).
    pub fn handle(&self) -> RemoteHandle {
        RemoteHandle {
            client: self.client.clone(),
            min: self.min.max(1),
        }
    }

    fn has(&self, flag: u16) -> bool {
        self.client.info().has(flag)
    }

    /// An export's size is fixed: growing past it is an error.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        let have = self.size();
        if len > have {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the remote export holds {have} bytes, {len} needed"),
            ));
        }
        Ok(())
    }

    fn aligned(&self, offset: u64, len: u64) -> bool {
        offset.is_multiple_of(self.min) && len.is_multiple_of(self.min)
    }

    fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        let start = offset / self.min * self.min;
        let end = (offset + len).div_ceil(self.min) * self.min;
        (start, end)
    }

    /// Whether a read of `[offset, offset + len)` goes out as one request.
    pub fn reads_directly(&self, offset: u64, len: u64) -> bool {
        self.aligned(offset, len) && len <= self.max
    }

    /// Whether a write goes out as one request with no lock to take.
    pub fn writes_directly(&self, offset: u64, len: u64) -> bool {
        self.min == 1 && len <= self.max && offset.checked_add(len).is_some()
    }

    /// One read the caller checked with `reads_directly`; `done` runs on
    /// the connection's thread.
    pub fn submit_read(&self, offset: u64, len: usize, done: client::Done) {
        self.client
            .submit(Command::Read, 0, offset, len as u32, None, done);
    }

    /// One write the caller checked with `writes_directly`.
    pub fn submit_write(&self, data: IoBuf, offset: u64, fua: bool, done: WriteDone) {
        let native_fua = fua && self.has(TFLAG_SEND_FUA);
        let flags = if native_fua { CMD_FLAG_FUA } else { 0 };
        let then_flush = fua && !native_fua && self.has(TFLAG_SEND_FLUSH);
        let client = self.client.clone();
        self.client.submit(
            Command::Write,
            flags,
            offset,
            0,
            Some(data),
            Box::new(move |r| match r {
                Ok(_) if then_flush => client.submit(
                    Command::Flush,
                    0,
                    0,
                    0,
                    None,
                    Box::new(move |r| done(r.map(drop))),
                ),
                other => done(other.map(drop)),
            }),
        );
    }

    /// Sends `[offset, offset + len)` as requests of at most the maximum
    /// block, all in flight at once, and waits for them; `each` gets every
    /// piece's offset and outcome.
    fn pieces(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        len: u64,
        payload: impl Fn(u64, u64) -> Option<IoBuf>,
        mut each: impl FnMut(u64, IoBuf),
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let mut count = 0;
        let mut at = offset;
        while at < offset + len {
            let piece = (offset + len - at).min(self.max);
            let tx = tx.clone();
            self.client.submit(
                command,
                flags,
                at,
                piece as u32,
                payload(at, piece),
                Box::new(move |r| {
                    let _ = tx.send((at, piece, r));
                }),
            );
            count += 1;
            at += piece;
        }
        drop(tx);
        let mut first_error = None;
        for _ in 0..count {
            match rx.recv() {
                // The client hands over only whole reads; checked again
                // because a short one would leave part of the caller's
                // (pooled) buffer unwritten.
                Ok((_, piece, Ok(buf)))
                    if command == Command::Read && buf.len() as u64 != piece =>
                {
                    first_error.get_or_insert(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the remote backing returned a short read",
                    ));
                }
                Ok((at, _, Ok(buf))) => each(at, buf),
                Ok((_, _, Err(e))) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => return Err(io::Error::other("the NBD client closed")),
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn read_aligned(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.pieces(
            Command::Read,
            0,
            offset,
            buf.len() as u64,
            |_, _| None,
            |at, data| {
                let i = (at - offset) as usize;
                buf[i..i + data.len()].copy_from_slice(&data);
            },
        )
    }

    fn write_aligned(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let native_fua = fua && self.has(TFLAG_SEND_FUA);
        let flags = if native_fua { CMD_FLAG_FUA } else { 0 };
        let payload = |at: u64, len: u64| {
            let i = (at - offset) as usize;
            let mut piece = IoBuf::new(len as usize);
            piece.copy_from_slice(&data[i..i + len as usize]);
            Some(piece)
        };
        self.pieces(
            Command::Write,
            flags,
            offset,
            data.len() as u64,
            payload,
            |_, _| {},
        )?;
        if fua && !native_fua {
            self.sync()?;
        }
        Ok(())
    }

    /// Fills `buf` from `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        self.check(offset, len)?;
        if self.aligned(offset, len) {
            return self.read_aligned(buf, offset);
        }
        let (start, end) = self.span(offset, len);
        let mut whole = IoBuf::new((end - start) as usize);
        self.read_aligned(&mut whole, start)?;
        let i = (offset - start) as usize;
        buf.copy_from_slice(&whole[i..i + buf.len()]);
        Ok(())
    }

    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write(data, offset, false)
    }

    /// Writes `data` at `offset`, merging partial backend blocks.
    pub fn write(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let len = data.len() as u64;
        self.check(offset, len)?;
        if self.min == 1 {
            return self.write_aligned(data, offset, fua);
        }
        let (start, end) = self.span(offset, len);
        let _blocks = self.blocks.lock(start, end);
        if start == offset && end == offset + len {
            return self.write_aligned(data, offset, fua);
        }
        let mut whole = IoBuf::new((end - start) as usize);
        let block = self.min as usize;
        if offset != start {
            self.read_aligned(&mut whole[..block], start)?;
        }
        let last = end - self.min;
        if offset + len != end && (offset == start || last != start) {
            let i = (last - start) as usize;
            self.read_aligned(&mut whole[i..], last)?;
        }
        let i = (offset - start) as usize;
        whole[i..i + data.len()].copy_from_slice(data);
        self.write_aligned(&whole, start, fua)
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "beyond the end of the remote export",
            )),
        }
    }

    /// FLUSH (a server that does not offer it has no cache to flush).
    pub fn sync(&self) -> io::Result<()> {
        if !self.has(TFLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.client.call(Command::Flush, 0, 0, 0, None).map(drop)
    }

    /// The whole blocks inside `[offset, offset + len)`, if any.
    fn inner(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let start = offset.div_ceil(self.min) * self.min;
        let end = (offset + len) / self.min * self.min;
        (start < end).then_some((start, end))
    }

    /// Makes the range read as zeros: WRITE_ZEROES (which may deallocate)
    /// on whole blocks when offered, written zeros elsewhere.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        let inner = self
            .has(TFLAG_SEND_WRITE_ZEROES)
            .then(|| self.inner(offset, len))
            .flatten();
        let Some((start, end)) = inner else {
            return self.write_zeros(offset, len);
        };
        self.write_zeros(offset, start - offset)?;
        {
            let _blocks = (self.min > 1).then(|| self.blocks.lock(start, end));
            self.pieces(
                Command::WriteZeroes,
                0,
                start,
                end - start,
                |_, _| None,
                |_, _| {},
            )?;
        }
        self.write_zeros(end, offset + len - end)
    }

    fn write_zeros(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let zeros = vec![0u8; len.min(ZERO_PIECE) as usize];
        while offset < end {
            let n = (end - offset).min(ZERO_PIECE);
            self.write(&zeros[..n as usize], offset, false)?;
            offset += n;
        }
        Ok(())
    }

    /// TRIM on the whole blocks inside the range when offered; otherwise
    /// nothing (a discard is advisory).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        if !self.has(TFLAG_SEND_TRIM) {
            return Ok(());
        }
        let Some((start, end)) = self.inner(offset, len) else {
            return Ok(());
        };
        let _blocks = (self.min > 1).then(|| self.blocks.lock(start, end));
        self.pieces(Command::Trim, 0, start, end - start, |_, _| None, |_, _| {})
    }
}
