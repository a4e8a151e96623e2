//! TLS for NBD (NBD_OPT_STARTTLS): loading X.509 credentials from a
//! directory in the layout qemu, nbdkit and libnbd share (`ca-cert.pem`,
//! `server-cert.pem`, `server-key.pem`, optional `ca-crl.pem`), building the
//! rustls acceptor, and reading a verified client certificate's subject.
//!
//! rustls (with ring, as reqwest already uses here) rather than OpenSSL or
//! GnuTLS: one TLS stack in the binary, memory-safe, TLS 1.3 and 1.2 only.
//! The session runs in userspace: kernel TLS offload needs the kernel's
//! `tls` module, which the machines we measure on lack (TCP_ULP "tls" gives
//! ENOENT); benches/results/history.md ("NBD over TLS") has the TLS
//! numbers and what was tried.
//! The handshake itself runs in `connection.rs`; the STARTTLS option in
//! `handshake.rs`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_CRL: &str = "ca-crl.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";

/// `tls` in `[nbd]`, with nbdkit's `--tls` meanings.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// STARTTLS is refused; everything is plaintext.
    #[default]
    Off,
    /// Clients may upgrade with STARTTLS; plaintext clients are served too.
    On,
    /// Only STARTTLS and ABORT are answered before TLS is up.
    Require,
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: the CRL's nextUpdate ({next_update}) has passed, so revoked certificates may be missing from it; publish a fresh ca-crl.pem, or set tls_crl_expired = \"warn\" to serve with it anyway")]
    CrlExpired { path: PathBuf, next_update: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} is readable by group or others (mode {mode:04o}); a private key must be 0600: chmod 600 {path}")]
    KeyNotPrivate { path: PathBuf, mode: u32 },
    #[error("{path} is owned by uid {owner}, neither root nor the daemon's user: whoever owns it can replace the key; run `chown root {path}`")]
    KeyNotOwned { path: PathBuf, owner: u32 },
    #[error("tls_verify_peer = true needs {path} (the CA that signs client certificates)")]
    NoCa { path: PathBuf },
    #[error("{path}: {message}")]
    Certificate { path: PathBuf, message: String },
    #[error("client certificate verification: {0}")]
    Verifier(String),
    #[error("{cert} and {key} do not form a usable pair: {message}")]
    KeyPair {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
}

/// What was loaded, for `hostcrypt status` and `hostcryptd --check`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TlsInfo {
    pub dir: PathBuf,
    pub server_subject: String,
    pub server_not_after: String,
    /// Subject of the CA that verifies client certificates, when present.
    pub ca_subject: Option<String>,
    pub verify_peer: bool,
    /// Certificates the CRL revokes (`None`: no ca-crl.pem).
    pub crl_revoked: Option<usize>,
}

/// A loaded credential set; a reload builds a new one and swaps it in.
pub struct TlsContext {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub info: TlsInfo,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl TlsContext {
    /// Loads and checks the credentials in `dir`: the key is private, the
    /// server certificate is valid now and (when ca-cert.pem exists) signed
    /// by that CA, and key and certificate belong together.
    pub fn load(dir: &Path, verify_peer: bool, crl_expired: CrlExpired) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert_path = dir.join(SERVER_CERT);
        let key_path = dir.join(SERVER_KEY);
        let ca_path = dir.join(CA_CERT);
        let crl_path = dir.join(CA_CRL);

        check_key_mode(&key_path)?;
        let chain = read_certs(&cert_path)?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Pem {
            path: key_path.clone(),
            message: pem_message(e),
        })?;
        let cas = if ca_path.exists() {
            Some(read_certs(&ca_path)?)
        } else if verify_peer {
            return Err(TlsError::NoCa { path: ca_path });
        } else {
            None
        };
        let server = describe_cert(&cert_path, &chain[0])?;
        if let Some(cas) = &cas {
            check_signed_by(&cert_path, &chain, cas, &ca_path)?;
        }
        let crls = if crl_path.exists() {
            let crls = CertificateRevocationListDer::pem_file_iter(&crl_path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TlsError::Pem {
                    path: crl_path.clone(),
                    message: pem_message(e),
                })?;
            Some(crls)
        } else {
            None
        };
        let crl_revoked = crls.as_ref().map(|list| {
            list.iter()
                .filter_map(|c| x509_parser::parse_x509_crl(c.as_ref()).ok())
                .map(|(_, crl)| crl.iter_revoked_certificates().count())
                .sum()
        });
        if let Some(list) = &crls {
            for crl in list {
                let Ok((_, parsed)) = x509_parser::parse_x509_crl(crl.as_ref()) else {
                    continue;
                };
                let Some(next) = parsed.next_update() else {
                    continue;
                };
                if next.timestamp() < x509_parser::time::ASN1Time::now().timestamp() {
                    match crl_expired {
                        CrlExpired::Refuse => {
                            return Err(TlsError::CrlExpired {
                                path: crl_path.clone(),
                                next_update: next.to_string(),
                            })
                        }
                        CrlExpired::Warn => tracing::warn!(
                            crl = %crl_path.display(),
                            next_update = %next,
                            "the CRL has expired; serving with it anyway (tls_crl_expired = \"warn\")"
                        ),
                    }
                }
            }
        }

        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let builder = match &cas {
            Some(cas) => {
                let mut roots = RootCertStore::empty();
                for ca in cas {
                    roots.add(ca.clone()).map_err(|e| TlsError::Certificate {
                        path: ca_path.clone(),
                        message: e.to_string(),
                    })?;
                }
                let mut verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
                match crls {
                    // Once a CRL is configured, a certificate whose status
                    // it cannot tell is not let in, and (unless the config
                    // says warn) neither is any while the CRL is stale.
                    Some(crls) => {
                        verifier = verifier.with_crls(crls);
                        if crl_expired == CrlExpired::Refuse {
                            verifier = verifier.enforce_revocation_expiration();
                        }
                    }
                    None => verifier = verifier.allow_unknown_revocation_status(),
                }
                if !verify_peer {
                    verifier = verifier.allow_unauthenticated();
                }
                let verifier = verifier
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::KeyPair {
                cert: cert_path.clone(),
                key: key_path.clone(),
                message: e.to_string(),
            })?;
        let ca_subject = match &cas {
            Some(cas) => Some(describe_cert(&ca_path, &cas[0])?.0),
            None => None,
        };
        Ok(TlsContext {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            info: TlsInfo {
                dir: dir.to_owned(),
                server_subject: server.0,
                server_not_after: server.1,
                ca_subject,
                verify_peer,
                crl_revoked,
            },
        })
    }
}

/// What a CRL past its nextUpdate does (`tls_crl_expired`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum CrlExpired {
    /// Refuse to load it (and clients, should it expire while loaded).
    #[default]
    Refuse,
    /// Log a warning and serve with it.
    Warn,
}

fn pem_message(e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM item of the expected kind".into(),
        other => other.to_string(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    if !path.exists() {
        return Err(TlsError::Read {
            path: path.to_owned(),
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            message: pem_message(e),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn check_key_mode(path: &Path) -> Result<(), TlsError> {
    let meta = std::fs::metadata(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyNotPrivate {
            path: path.to_owned(),
            mode,
        });
    }
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        return Err(TlsError::KeyNotOwned {
            path: path.to_owned(),
            owner: meta.uid(),
        });
    }
    Ok(())
}

/// (subject in RFC 4514 form, notAfter) of a certificate that must be
/// valid now.
fn describe_cert(path: &Path, der: &CertificateDer<'_>) -> Result<(String, String), TlsError> {
    let bad = |message: String| TlsError::Certificate {
        path: path.to_owned(),
        message,
    };
    let (_, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| bad(e.to_string()))?;
    let validity = cert.validity();
    if !validity.is_valid() {
        return Err(bad(format!(
            "not valid now (valid from {} to {})",
            validity.not_before, validity.not_after
        )));
    }
    Ok((rfc4514(cert.subject()), validity.not_after.to_string()))
}

/// The server certificate (or the last of its intermediates) must be signed
/// by one of the CA certificates: a chain clients cannot verify is a
/// configuration error worth finding before the first client does.
fn check_signed_by(
    cert_path: &Path,
    chain: &[CertificateDer<'_>],
    cas: &[CertificateDer<'_>],
    ca_path: &Path,
) -> Result<(), TlsError> {
    fn parse<'a>(
        der: &'a CertificateDer<'_>,
        path: &Path,
    ) -> Result<x509_parser::certificate::X509Certificate<'a>, TlsError> {
        x509_parser::parse_x509_certificate(der.as_ref())
            .map(|(_, c)| c)
            .map_err(|e| TlsError::Certificate {
                path: path.to_owned(),
                message: e.to_string(),
            })
    }
    let mut certs = chain
        .iter()
        .map(|c| parse(c, cert_path))
        .collect::<Result<Vec<_>, _>>()?;
    // Each certificate in server-cert.pem signs the one before it.
    for pair in certs.windows(2) {
        if pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .is_err()
        {
            return Err(TlsError::Certificate {
                path: cert_path.to_owned(),
                message: "the certificates in this file do not form a chain".into(),
            });
        }
    }
    let Some(top) = certs.pop() else {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    };
    let signed = cas
        .iter()
        .filter_map(|der| parse(der, ca_path).ok())
        .any(|ca| {
            top.issuer() == ca.subject() && top.verify_signature(Some(ca.public_key())).is_ok()
        });
    if signed {
        Ok(())
    } else {
        Err(TlsError::Certificate {
            path: cert_path.to_owned(),
            message: format!(
                "not signed by the CA in {} (issuer {})",
                ca_path.display(),
                rfc4514(top.issuer())
            ),
        })
    }
}

/// Protocol version and cipher suite of a finished handshake, for the log.
pub fn describe_session(conn: &rustls::ServerConnection) -> String {
    let version = conn
        .protocol_version()
        .and_then(|v| v.as_str())
        .unwrap_or("?");
    let suite = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("?");
    format!("{version} {suite}")
}

/// The subject of the client certificate a finished TLS handshake verified.
pub fn peer_subject(conn: &rustls::ServerConnection) -> Option<String> {
    let der = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(rfc4514(cert.subject()))
}

/// A name in RFC 4514 string form: most specific RDN first, `,` between
/// RDNs, `+` inside multi-valued ones, special characters escaped.
pub fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|attr| {
                    let oid = attr.attr_type().to_id_string();
                    let kind = short_name(&oid).map(str::to_owned).unwrap_or(oid);
                    let value = match attr.as_str() {
                        Ok(v) => escape_value(v),
                        Err(_) => format!("#{}", hex::encode(attr.attr_value().data)),
                    };
                    format!("{kind}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "EMAIL",
        _ => return None,
    })
}

fn escape_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_rfc4514_specials() {
        assert_eq!(escape_value("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape_value(" #x "), "\\ #x\\ ");
        assert_eq!(escape_value("plain"), "plain");
    }

    #[test]
    fn key_readable_by_others_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join(SERVER_KEY);
        std::fs::write(&key, "x").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = TlsContext::load(dir.path(), false, CrlExpired::Refuse)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&key.display().to_string()) && err.contains("0644"),
            "{err}"
        );
    }
}
