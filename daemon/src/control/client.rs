//! The CLI side of the control socket: send one request, read one response.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::{ControlRequest, ControlResponse};

#[derive(Debug, thiserror::Error)]
pub enum ControlClientError {
    #[error("cannot reach the daemon at {path}: {source} (is hostcryptd running, and is `control` set in [daemon]?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent an unreadable response: {0}")]
    Protocol(#[from] serde_json::Error),
}

/// Sends `request` and waits (up to `timeout`) for the daemon's answer.
pub fn call(
    path: &Path,
    request: &ControlRequest,
    timeout: Duration,
) -> Result<ControlResponse, ControlClientError> {
    let mut stream = UnixStream::connect(path).map_err(|source| ControlClientError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    // A daemon that refuses us may close before reading everything; its
    // answer can still be waiting, so read it before reporting the write.
    let written = stream.write_all(line.as_bytes());
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    match reader.read_line(&mut answer) {
        Ok(n) if n > 0 => Ok(serde_json::from_str(&answer)?),
        Ok(_) => Err(written.err().map_or_else(
            || ControlClientError::Io(std::io::ErrorKind::UnexpectedEof.into()),
            ControlClientError::Io,
        )),
        Err(e) => Err(ControlClientError::Io(written.err().unwrap_or(e))),
    }
}
