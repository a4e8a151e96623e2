//! TLS for `nbds://` backings: STARTTLS, then a rustls client session
//! with libnbd's credential layout (`ca-cert.pem`; `client-cert.pem` and
//! `client-key.pem` when present, for servers that verify clients).
//!
//! The session runs in a relay thread (tokio-rustls on a one-thread
//! runtime) that pumps between the TLS socket and one end of a Unix
//! socket pair; the client gets the other end. A rustls connection is
//! one object that both directions need, while the client reads replies
//! on one thread and writes requests from many: the relay lets both
//! stay plain blocking sockets, at the cost of one copy per byte.

use std::io;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::negotiate::{choose, greet, starttls, ExportInfo, NegotiateError};
use super::socket::{Deadlined, OpenError, Stream};
use super::uri::{Address, NbdUri};
use super::RemoteOptions;

const CA_CERT: &str = "ca-cert.pem";
const CLIENT_CERT: &str = "client-cert.pem";
const CLIENT_KEY: &str = "client-key.pem";

fn io_other(what: String) -> OpenError {
    OpenError::Io(io::Error::other(what))
}

/// Loads the client's TLS configuration from `dir`.
pub fn client_config(dir: &Path) -> Result<rustls::ClientConfig, OpenError> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = dir.join(CA_CERT);
    let certs = CertificateDer::pem_file_iter(&ca)
        .map_err(|e| io_other(format!("cannot read {}: {e}", ca.display())))?;
    for cert in certs {
        let cert = cert.map_err(|e| io_other(format!("{}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| io_other(format!("{}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| io_other(e.to_string()))?
        .with_root_certificates(roots);
    let (cert, key) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
    if cert.exists() {
        let chain = CertificateDer::pem_file_iter(&cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| io_other(format!("{}: {e}", cert.display())))?;
        // The key's text is never part of an error: only its path.
        let key = PrivateKeyDer::from_pem_file(&key)
            .map_err(|_| io_other(format!("{}: not a readable PEM private key", key.display())))?;
        builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| io_other(format!("{}: {e}", cert.display())))
    } else {
        Ok(builder.with_no_client_auth())
    }
}

/// Greeting and STARTTLS in plaintext, the TLS handshake, then the export
/// chosen inside the session.
/// All of it by `deadline`.
pub fn negotiate_tls(
    stream: Stream,
    uri: &NbdUri,
    options: &RemoteOptions,
    deadline: std::time::Instant,
) -> Result<(Stream, ExportInfo), OpenError> {
    let Stream::Tcp(tcp) = stream else {
        return Err(io_other(
            "nbds+unix:// is not supported; use nbd+unix:// (a Unix socket is local) or nbds://HOST".into(),
        ));
    };
    let dir = uri
        .tls_certificates
        .as_deref()
        .or(options.tls_certificates.as_deref())
        .ok_or_else(|| {
            io_other("nbds:// needs backing_tls_certificates (or ?tls-certificates=DIR)".into())
        })?;
    let config = client_config(dir)?;
    let host = match &uri.address {
        Address::Tcp { host, .. } => host.clone(),
        Address::Unix(_) => "localhost".to_string(),
    };
    let name = ServerName::try_from(host.clone())
        .map_err(|_| io_other(format!("{host:?} is not a valid TLS server name")))?;
    let mut plain = Deadlined::new(&tcp, deadline);
    greet(&mut plain).map_err(OpenError::Negotiate)?;
    starttls(&mut plain).map_err(OpenError::Negotiate)?;
    let (ours, theirs) = UnixStream::pair().map_err(OpenError::Io)?;
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    std::thread::Builder::new()
        .name("hostcrypt-nbd-tls".into())
        .spawn(move || relay(tcp, theirs, config, name, left, ready_tx))
        .map_err(OpenError::Io)?;
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(io_other(format!("TLS handshake with {host} failed: {e}"))),
        Err(_) => return Err(io_other("the TLS relay stopped".into())),
    }
    let stream = Stream::Unix(ours);
    let info = {
        let mut s = Deadlined::new(&stream, deadline);
        choose(&mut s, &uri.export).map_err(|e| match e {
            NegotiateError::Io(e) => io_other(format!("inside TLS: {e}")),
            other => OpenError::Negotiate(other),
        })?
    };
    Ok((stream, info))
}

/// The relay thread: handshake, report it, then pump both ways until
/// either side closes.
fn relay(
    tcp: TcpStream,
    local: UnixStream,
    config: rustls::ClientConfig,
    name: ServerName<'static>,
    within: std::time::Duration,
    ready: std::sync::mpsc::SyncSender<io::Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    runtime.block_on(async move {
        let setup = async {
            tcp.set_read_timeout(None)?;
            tcp.set_write_timeout(None)?;
            tcp.set_nonblocking(true)?;
            local.set_nonblocking(true)?;
            let tcp = tokio::net::TcpStream::from_std(tcp)?;
            let local = tokio::net::UnixStream::from_std(local)?;
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let tls = tokio::time::timeout(within, connector.connect(name, tcp))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no TLS handshake"))??;
            Ok::<_, io::Error>((tls, local))
        };
        let (tls, mut local) = match setup.await {
            Ok(pair) => {
                let _ = ready.send(Ok(()));
                pair
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        // Either direction ending ends the relay: a half-open session
        // would only hold a thread while the client reconnects anyway.
        let (mut tls_in, mut tls_out) = tokio::io::split(tls);
        let (mut local_in, mut local_out) = local.split();
        tokio::select! {
            _ = tokio::io::copy(&mut tls_in, &mut local_out) => {}
            _ = tokio::io::copy(&mut local_in, &mut tls_out) => {}
        }
    });
}
