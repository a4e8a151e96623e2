//! The client's sockets: a connected [`Stream`] (Unix or TCP; `nbds`
//! runs its TLS session in a relay, `tls.rs`, so it is a plain socket
//! too), blocking reads and writes bounded by one handshake deadline
//! ([`Deadlined`]), and the error opening a connection gives. No protocol
//! here: the handshake is `negotiate.rs`, the reply reader `link.rs`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::negotiate::NegotiateError;

/// A connected socket. `nbds` connections are plain sockets too: the TLS
/// session runs in a relay (`super::tls`), so reads and writes can use
/// separate threads as they do here.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    pub(super) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    pub(super) fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

/// A socket whose blocking reads and writes can be bounded in time.
pub(super) trait Timed {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Timed for UnixStream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl Timed for TcpStream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl Timed for Stream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_timeout(t),
            Stream::Tcp(s) => s.set_timeout(t),
        }
    }
}

/// A socket during the handshake: every read and write gets only the
/// time left until `deadline`, so the handshake as a whole is bounded.
pub(super) struct Deadlined<'a, S> {
    stream: &'a S,
    deadline: Instant,
}

impl<'a, S: Timed> Deadlined<'a, S> {
    pub(super) fn new(stream: &'a S, deadline: Instant) -> Self {
        Deadlined { stream, deadline }
    }

    fn arm(&self) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake's deadline passed",
            ));
        }
        self.stream.set_timeout(Some(left))
    }
}

impl<S: Timed> Read for Deadlined<'_, S>
where
    for<'b> &'b S: Read,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        let mut s = self.stream;
        s.read(buf)
    }
}

impl<S: Timed> Write for Deadlined<'_, S>
where
    for<'b> &'b S: Write,
{
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        let mut s = self.stream;
        s.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Tcp(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).write(buf),
            Stream::Tcp(s) => (&*s).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).write_vectored(bufs),
            Stream::Tcp(s) => (&*s).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Io(#[source] io::Error),
    #[error("{0}")]
    Negotiate(#[source] NegotiateError),
    #[error("connecting and the NBD handshake took longer than {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
}
