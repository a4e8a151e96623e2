//! What the remote providers (`vault`, `azure`) share: the HTTPS client
//! (rustls, a per-request timeout, our user agent, extra trusted CAs from a
//! PEM bundle for private endpoints) and the retry pacing for transient
//! failures. Blocking by design: providers run on control threads, never
//! on the I/O path.

use std::path::Path;
use std::time::Duration;

use super::KekError;

/// Retry pacing for transient failures: up to `attempts` tries, waiting
/// 200 ms before the second and doubling up to `cap`.
pub(crate) struct Backoff {
    attempts: u32,
    attempt: u32,
    delay: Duration,
    cap: Duration,
}

impl Backoff {
    pub(crate) fn new(attempts: u32, cap: Duration) -> Self {
        Backoff {
            attempts: attempts.max(1),
            attempt: 1,
            delay: Duration::from_millis(200),
            cap,
        }
    }

    /// After a transient failure (`last`) of `what`: waits and returns true
    /// when another attempt is left, false when they are used up.
    pub(crate) fn wait(&mut self, provider: &str, what: &str, last: &str) -> bool {
        if self.attempt >= self.attempts {
            return false;
        }
        tracing::warn!(
            provider,
            attempt = self.attempt,
            "{what}: {last}; retrying in {:?}",
            self.delay
        );
        std::thread::sleep(self.delay);
        self.delay = (self.delay * 2).min(self.cap);
        self.attempt += 1;
        true
    }

    /// Makes the next wait at least `at_least` (a server's Retry-After),
    /// capped at one minute so a confused server cannot park a check.
    pub(crate) fn honour_retry_after(&mut self, at_least: Duration) {
        self.delay = self.delay.max(at_least.min(Duration::from_secs(60)));
    }

    /// The error once the attempts are used up.
    pub(crate) fn exhausted(&self, provider: String, last: &str) -> KekError {
        KekError::Unavailable {
            provider,
            reason: format!("{last} (after {} attempts)", self.attempts),
        }
    }
}

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
