//! NBD URIs as libnbd spells them (the NBD project's `doc/uri.md`):
//! `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`, and the
//! TLS forms `nbds://` and `nbds+unix://`. Parsing only; connecting lives
//! in `mod.rs`, negotiation in `negotiate.rs`.

use std::path::PathBuf;

/// The default NBD TCP port (IANA).
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server is and which export to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: Address,
    pub export: String,
    /// `nbds…`: STARTTLS is required before the export is chosen.
    pub tls: bool,
    /// `?tls-certificates=DIR` (libnbd's spelling).
    pub tls_certificates: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UriError {
    #[error("not an NBD URI (expected nbd://, nbds://, nbd+unix:// or nbds+unix://)")]
    NotNbd,
    #[error("malformed NBD URI: {0}")]
    Malformed(String),
}

impl NbdUri {
    /// Whether `text` is meant as an NBD URI rather than a path (an NBD
    /// scheme before `://`); such a string must then parse.
    pub fn looks_like(text: &str) -> bool {
        ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
            .iter()
            .any(|scheme| text.starts_with(scheme))
    }

    pub fn parse(text: &str) -> Result<Self, UriError> {
        if !Self::looks_like(text) {
            return Err(UriError::NotNbd);
        }
        let url = url::Url::parse(text).map_err(|e| UriError::Malformed(e.to_string()))?;
        let tls = url.scheme().starts_with("nbds");
        let unix = url.scheme().ends_with("+unix");
        let mut socket = None;
        let mut tls_certificates = None;
        for (key, value) in url.query_pairs() {
            match key.as_ref() {
                "socket" if unix => socket = Some(PathBuf::from(value.as_ref())),
                "tls-certificates" if tls => tls_certificates = Some(PathBuf::from(value.as_ref())),
                other => {
                    return Err(UriError::Malformed(format!(
                        "unsupported query parameter {other:?}"
                    )))
                }
            }
        }
        // The export is the path without its leading slash, percent-decoded.
        let raw = url.path().strip_prefix('/').unwrap_or(url.path());
        let export = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| UriError::Malformed("the export name is not UTF-8".into()))?
            .into_owned();
        let address = if unix {
            if url.host_str().is_some_and(|h| !h.is_empty()) {
                return Err(UriError::Malformed(
                    "nbd+unix:// takes no host (write nbd+unix:///EXPORT?socket=PATH)".into(),
                ));
            }
            Address::Unix(
                socket
                    .ok_or_else(|| UriError::Malformed("nbd+unix:// needs ?socket=PATH".into()))?,
            )
        } else {
            let host = url
                .host_str()
                .filter(|h| !h.is_empty())
                .ok_or_else(|| UriError::Malformed("no host".into()))?;
            // IPv6 literals come back bracketed; the socket API wants them bare.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            Address::Tcp {
                host: host.to_string(),
                port: url.port().unwrap_or(DEFAULT_PORT),
            }
        };
        Ok(NbdUri {
            address,
            export,
            tls,
            tls_certificates,
        })
    }

    /// The host name a TLS certificate must carry (TCP only).
    pub fn host(&self) -> Option<&str> {
        match &self.address {
            Address::Tcp { host, .. } => Some(host),
            Address::Unix(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_libnbd_forms() {
        let u = NbdUri::parse("nbd+unix:///disk?socket=/run/nbd.sock").unwrap();
        assert_eq!(u.address, Address::Unix("/run/nbd.sock".into()));
        assert_eq!(u.export, "disk");
        assert!(!u.tls);
        let u = NbdUri::parse("nbd://storage.example:10900/vol%201").unwrap();
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "storage.example".into(),
                port: 10900
            }
        );
        assert_eq!(u.export, "vol 1");
        let u = NbdUri::parse("nbds://[::1]/?tls-certificates=/etc/pki/x").unwrap();
        assert_eq!(u.tls_certificates, Some("/etc/pki/x".into()));
        assert!(u.tls);
        assert_eq!(u.export, "");
        assert_eq!(u.host(), Some("::1"));
        assert_eq!(
            NbdUri::parse("nbd://h").unwrap().address,
            Address::Tcp {
                host: "h".into(),
                port: DEFAULT_PORT
            }
        );
    }

    #[test]
    fn rejects_what_it_cannot_connect_to() {
        assert_eq!(NbdUri::parse("/var/lib/x.img"), Err(UriError::NotNbd));
        assert!(NbdUri::parse("nbd+unix:///disk").is_err());
        assert!(NbdUri::parse("nbd+unix://host/disk?socket=/s").is_err());
        assert!(NbdUri::parse("nbd:///disk").is_err());
        assert!(NbdUri::parse("nbd://h/disk?tls-psk-file=/x").is_err());
    }
}
