//! The HTTPS client the remote providers (`vault`, `azure`) share: rustls,
//! a per-request timeout, our user agent, and extra trusted CAs from a PEM
//! bundle for private endpoints. Blocking by design: providers run on
//! control threads, never on the I/O path.

use std::path::Path;
use std::time::Duration;

use super::KekError;

pub(crate) fn client(
    provider: &str,
    timeout_secs: u64,
    ca_file: Option<&Path>,
) -> Result<reqwest::blocking::Client, KekError> {
    let mut builder = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(timeout_secs.max(1)))
        .user_agent(concat!("hostcryptd/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|source| KekError::SecretFile {
            provider: provider.into(),
            path: ca.to_owned(),
            source,
        })?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| KekError::Unavailable {
                provider: provider.into(),
                reason: format!("ca_file {}: {e}", ca.display()),
            })?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| KekError::Unavailable {
        provider: provider.into(),
        reason: format!("HTTP client: {e}"),
    })
}
