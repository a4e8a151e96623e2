//! The `vault` KEK provider: an OpenBao / HashiCorp Vault transit key.
//!
//! Wrap = `transit/encrypt`, unwrap = `transit/decrypt`, rotation =
//! `transit/rewrap` (the server re-encrypts; the DEK does not travel again).
//! The key version is the `N` of the ciphertext's `vault:vN:` prefix, so a
//! token that may only use encrypt/decrypt/rewrap (no read on
//! `transit/keys/KEY`) is enough for everything, including finding the newest
//! version: a rewrap answers with it.
//!
//! Errors follow OpenBao's documented statuses: 403 is never retried (one
//! `auth/token/lookup-self` tells a dead token from a missing policy, then
//! the call fails closed); 429/5xx (503 = sealed) and connection failures are
//! retried with exponential backoff, then reported as unavailable; 400s that
//! say the key or version is gone ("not found", "too old", "deleted",
//! "disabled") are key loss. The token is read from `token_file` whenever the
//! file changes, so an operator (or an agent) can replace it without a
//! restart; renewable tokens are renewed at key checks once less than a third
//! of their TTL is left.
//!
//! Blocking HTTP (`reqwest::blocking`, rustls) by design: providers run on
//! control threads, never on the I/O path, and must not be called from
//! inside the async runtime (reqwest's blocking client owns its own).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::http::Backoff;
use super::{KekError, KekRef, KeyProvider, WrappedDek};
use crate::crypto::Dek;

pub const PROVIDER: &str = "vault";

/// The `[kek.NAME]` table of a `vault` provider.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// Address of the server, `https://` (see `insecure_http`).
    #[schemars(extend("examples" = ["https://bao.example:8200"]))]
    pub address: String,
    /// Mount path of the transit secrets engine.
    #[serde(default = "default_mount")]
    #[schemars(extend("examples" = ["transit-hostcrypt"]))]
    pub mount: String,
    /// Transit key name.
    #[schemars(extend("examples" = ["hostcrypt"]))]
    pub key: String,
    /// File holding the token (re-read when it changes). Its policy needs
    /// update on `transit/{encrypt,decrypt,rewrap}/KEY`.
    #[schemars(extend("examples" = ["/etc/hostcrypt/bao.token"]))]
    pub token_file: PathBuf,
    /// PEM bundle of CAs to trust in addition to the system roots.
    #[schemars(extend("examples" = ["/etc/hostcrypt/bao-ca.pem"]))]
    pub ca_file: Option<PathBuf>,
    /// Optional namespace (Vault Enterprise / OpenBao namespaces).
    #[schemars(extend("examples" = ["team-a"]))]
    pub namespace: Option<String>,
    /// Attempts for retryable failures (429, 5xx, sealed, connection errors).
    #[serde(default = "super::default_attempts")]
    #[schemars(extend("examples" = [8]))]
    pub attempts: u32,
    /// Per-request timeout in seconds.
    #[serde(default = "super::default_timeout")]
    #[schemars(extend("examples" = [30]))]
    pub timeout_secs: u64,
    /// Allow an `http://` address: the token and every wrapped and
    /// unwrapped DEK then cross the network in the clear. Only for a dev
    /// server on loopback.
    #[serde(default)]
    #[schemars(extend("examples" = [true]))]
    pub insecure_http: bool,
}

fn default_mount() -> String {
    "transit".into()
}

/// A token read from its file, with the file's mtime to notice changes.
struct Token {
    value: Zeroizing<String>,
    modified: Option<SystemTime>,
}

pub struct VaultKek {
    config: VaultConfig,
    http: reqwest::blocking::Client,
    token: Mutex<Option<Token>>,
}

impl std::fmt::Debug for VaultKek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultKek")
            .field("address", &self.config.address)
            .field("mount", &self.config.mount)
            .field("key", &self.config.key)
            .finish_non_exhaustive()
    }
}

/// What went wrong with one HTTP exchange, before classification.
enum Failure {
    Status(u16, String),
    Transport(String),
}

impl VaultKek {
    pub fn new(config: VaultConfig) -> Result<Self, KekError> {
        let scheme = config.address.split("://").next().unwrap_or("");
        let allowed = scheme.eq_ignore_ascii_case("https")
            || (config.insecure_http && scheme.eq_ignore_ascii_case("http"));
        if !allowed {
            return Err(KekError::Insecure {
                provider: PROVIDER,
                reason: format!(
                    "address {:?}: use https:// (the token and unwrapped DEKs cross this connection); set insecure_http = true only for a dev server on loopback",
                    config.address
                ),
            });
        }
        super::check_secret_file(&config.token_file)?;
        let http = super::http::client(PROVIDER, config.timeout_secs, config.ca_file.as_deref())?;
        let kek = VaultKek {
            config,
            http,
            token: Mutex::new(None),
        };
        // Fail at start-up, not at first use, when the token file is unreadable.
        kek.token()?;
        Ok(kek)
    }

    fn key_id(&self) -> String {
        format!("{}/{}", self.config.mount, self.config.key)
    }

    fn kek_ref(&self, version: String) -> KekRef {
        KekRef {
            provider: PROVIDER.into(),
            key_id: self.key_id(),
            key_version: version,
        }
    }

    /// The current token, re-read if the file changed since last time.
    fn token(&self) -> Result<Zeroizing<String>, KekError> {
        let path = &self.config.token_file;
        let file_err = |source| KekError::SecretFile {
            provider: PROVIDER.into(),
            path: path.clone(),
            source,
        };
        let modified = std::fs::metadata(path).map_err(file_err)?.modified().ok();
        let mut cached = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = cached
            .as_ref()
            .filter(|t| t.modified == modified && modified.is_some())
        {
            return Ok(t.value.clone());
        }
        let raw = Zeroizing::new(std::fs::read_to_string(path).map_err(file_err)?);
        let value = Zeroizing::new(raw.trim().to_string());
        if value.is_empty() {
            return Err(file_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the token file is empty",
            )));
        }
        *cached = Some(Token {
            value: value.clone(),
            modified,
        });
        Ok(value)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{}", self.config.address.trim_end_matches('/'), path)
    }

    /// One request, no retries.
    fn exchange(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        let token = self
            .token()
            .map_err(|e| Failure::Transport(e.to_string()))?;
        let mut req = self
            .http
            .request(method, self.url(path))
            .header("X-Vault-Token", token.as_str());
        if let Some(ns) = &self.config.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req
            .send()
            .map_err(|e| Failure::Transport(e.without_url().to_string()))?;
        let status = resp.status().as_u16();
        // A decrypt response carries the DEK in base64.
        let text = Zeroizing::new(resp.text().unwrap_or_default());
        if (200..300).contains(&status) {
            if text.trim().is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&text)
                .map_err(|e| Failure::Transport(format!("unparsable response: {e}")));
        }
        Err(Failure::Status(status, error_text(&text)))
    }

    /// A request with retries for transient failures, classified on failure.
    /// The request body is wiped when the call ends (an encrypt request
    /// carries a DEK in base64).
    fn call(&self, path: &str, mut body: Value) -> Result<Value, KekError> {
        let result = self.call_once_or_retry(path, &body);
        super::scrub_json(&mut body);
        result
    }

    fn call_once_or_retry(&self, path: &str, body: &Value) -> Result<Value, KekError> {
        let mut backoff = Backoff::new(self.config.attempts, Duration::from_secs(5));
        loop {
            let last = match self.exchange(reqwest::Method::POST, path, Some(body)) {
                Ok(v) => return Ok(v),
                Err(Failure::Status(403, msg)) => return Err(self.explain_denied(path, msg)),
                Err(Failure::Status(status, msg)) if status == 429 || status >= 500 => {
                    format!("HTTP {status}: {msg}")
                }
                Err(Failure::Status(status, msg)) => return Err(self.classify(status, msg)),
                Err(Failure::Transport(msg)) => msg,
            };
            if !backoff.wait(PROVIDER, path, &last) {
                return Err(backoff.exhausted(self.describe(), &last));
            }
        }
    }

    /// 403: a revoked/expired token, or a token without the policy?
    fn explain_denied(&self, path: &str, msg: String) -> KekError {
        let reason = match self.exchange(reqwest::Method::GET, "auth/token/lookup-self", None) {
            Err(Failure::Status(403, _)) => {
                "the token is revoked, expired or invalid; write a new one to the token file"
                    .to_string()
            }
            _ => format!("the token's policy does not allow update on {path} ({msg})"),
        };
        KekError::AccessDenied {
            provider: self.describe(),
            reason,
        }
    }

    fn classify(&self, status: u16, msg: String) -> KekError {
        let lower = msg.to_lowercase();
        let gone = [
            "not found",
            "too old",
            "deleted",
            "disabled",
            "no existing key",
            "does not exist",
        ];
        if status == 404 || gone.iter().any(|g| lower.contains(g)) {
            return KekError::KeyGone {
                provider: self.describe(),
                reason: format!("HTTP {status}: {msg}"),
            };
        }
        if lower.contains("message authentication failed") || lower.contains("invalid ciphertext") {
            return KekError::UnwrapFailed {
                provider: self.describe(),
            };
        }
        KekError::Unavailable {
            provider: self.describe(),
            reason: format!("HTTP {status}: {msg}"),
        }
    }

    /// `transit/encrypt` or `transit/rewrap`: the answer is a new wrapping.
    fn transit_wrap(&self, operation: &str, body: Value) -> Result<WrappedDek, KekError> {
        let response = self.call(
            &format!("{}/{operation}/{}", self.config.mount, self.config.key),
            body,
        )?;
        let (ct, version) = self.ciphertext_of(&response)?;
        Ok(WrappedDek {
            kek: self.kek_ref(version),
            blob: ct.into_bytes(),
        })
    }

    fn ciphertext_of(&self, response: &Value) -> Result<(String, String), KekError> {
        let ct = response["data"]["ciphertext"]
            .as_str()
            .ok_or_else(|| KekError::Unavailable {
                provider: self.describe(),
                reason: "response has no data.ciphertext".into(),
            })?
            .to_string();
        let version = version_of(&ct).ok_or_else(|| KekError::Unavailable {
            provider: self.describe(),
            reason: "ciphertext lacks the vault:vN: prefix".into(),
        })?;
        Ok((ct, version))
    }

    fn same_key(&self, wrapped: &WrappedDek) -> Result<(), KekError> {
        if !self.owns(&wrapped.kek) {
            return Err(KekError::WrongKey {
                wrapped_by: wrapped.kek.clone(),
                configured: self.describe(),
            });
        }
        Ok(())
    }

    fn ciphertext(&self, wrapped: &WrappedDek) -> Result<String, KekError> {
        String::from_utf8(wrapped.blob.clone()).map_err(|_| KekError::UnwrapFailed {
            provider: self.describe(),
        })
    }

    /// Renews a renewable token once less than a third of its TTL is left.
    fn maintain_token(&self) {
        let Ok(info) = self.exchange(reqwest::Method::GET, "auth/token/lookup-self", None) else {
            return;
        };
        let data = &info["data"];
        let ttl = data["ttl"].as_u64().unwrap_or(0);
        let full = data["creation_ttl"].as_u64().unwrap_or(0);
        if data["renewable"].as_bool() == Some(true) && ttl > 0 && ttl * 3 < full {
            match self.exchange(
                reqwest::Method::POST,
                "auth/token/renew-self",
                Some(&json!({})),
            ) {
                Ok(_) => tracing::info!(provider = PROVIDER, "token renewed"),
                Err(Failure::Status(s, m)) => {
                    tracing::warn!(provider = PROVIDER, "token renewal failed: HTTP {s}: {m}")
                }
                Err(Failure::Transport(m)) => {
                    tracing::warn!(provider = PROVIDER, "token renewal failed: {m}")
                }
            }
        }
    }
}

impl KeyProvider for VaultKek {
    fn owns(&self, kek: &KekRef) -> bool {
        kek.provider == PROVIDER && kek.key_id == self.key_id()
    }

    fn describe(&self) -> String {
        format!(
            "vault key {} at {}",
            self.key_id(),
            self.config.address.trim_end_matches('/')
        )
    }

    fn wrap(&self, dek: &Dek) -> Result<WrappedDek, KekError> {
        let plaintext =
            Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(dek.expose()));
        self.transit_wrap("encrypt", json!({ "plaintext": plaintext.as_str() }))
    }

    fn unwrap(&self, wrapped: &WrappedDek) -> Result<Dek, KekError> {
        self.same_key(wrapped)?;
        let body = json!({ "ciphertext": self.ciphertext(wrapped)? });
        let response = self.call(
            &format!("{}/decrypt/{}", self.config.mount, self.config.key),
            body,
        )?;
        let mut response = response;
        let dek = super::dek_from_base64(
            &base64::engine::general_purpose::STANDARD,
            response["data"]["plaintext"].as_str(),
            || self.describe(),
        );
        super::scrub_json(&mut response);
        dek
    }

    fn rewrap(
        &self,
        wrapped: &WrappedDek,
        to_version: Option<&str>,
    ) -> Result<WrappedDek, KekError> {
        self.same_key(wrapped)?;
        let mut body = json!({ "ciphertext": self.ciphertext(wrapped)? });
        if let Some(v) = to_version {
            body["key_version"] = json!(super::numeric_version(v, || self.describe())?);
        }
        self.transit_wrap("rewrap", body)
    }

    /// A rewrap to the same version proves decrypt access (transit
    /// decrypts before it re-encrypts) without the DEK crossing the wire.
    /// `deletion_allowed` and `exportable` from `transit/keys/KEY` (needs
    /// `read` on that path; without it, that is the warning).
    fn safety_warnings(&self) -> Result<Vec<String>, KekError> {
        let path = format!("{}/keys/{}", self.config.mount, self.config.key);
        let key = &self.config.key;
        match self.exchange(reqwest::Method::GET, &path, None) {
            Ok(v) => {
                let mut warnings = Vec::new();
                if v["data"]["deletion_allowed"].as_bool() == Some(true) {
                    warnings.push(format!("transit key {key} has deletion_allowed = true: it can be deleted for good, and every volume it wraps with it; set deletion_allowed=false on {path}/config"));
                }
                if v["data"]["exportable"].as_bool() == Some(true) {
                    warnings.push(format!("transit key {key} is exportable: its key material can be read out of the server"));
                }
                Ok(warnings)
            }
            Err(Failure::Status(403, _)) => Ok(vec![format!(
                "cannot read the settings of transit key {key} (the token lacks read on {path}): whether it can be deleted or exported is unknown"
            )]),
            Err(Failure::Status(status, msg)) => Err(self.classify(status, msg)),
            Err(Failure::Transport(reason)) => Err(KekError::Unavailable {
                provider: self.describe(),
                reason,
            }),
        }
    }

    fn check(&self, wrapped: &WrappedDek) -> Result<(), KekError> {
        self.maintain_token();
        self.rewrap(wrapped, Some(&wrapped.kek.key_version))
            .map(drop)
    }
}

/// `vault:v3:...` → `"3"`.
fn version_of(ciphertext: &str) -> Option<String> {
    let rest = ciphertext.strip_prefix("vault:v")?;
    let (version, _) = rest.split_once(':')?;
    version.parse::<u64>().ok().map(|v| v.to_string())
}

/// The `errors` array of a Vault error body, joined; or the raw body.
fn error_text(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    match parsed.as_ref().and_then(|v| v["errors"].as_array()) {
        Some(errors) => errors
            .iter()
            .filter_map(|e| e.as_str())
            .collect::<Vec<_>>()
            .join("; "),
        None => body.chars().take(200).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_the_prefix() {
        assert_eq!(version_of("vault:v1:abc").as_deref(), Some("1"));
        assert_eq!(version_of("vault:v12:abc:def").as_deref(), Some("12"));
        assert_eq!(version_of("vault:vx:abc"), None);
        assert_eq!(version_of("abc"), None);
    }

    #[test]
    fn error_bodies_are_joined() {
        assert_eq!(error_text(r#"{"errors":["a","b"]}"#), "a; b");
        assert_eq!(error_text("plain"), "plain");
    }
}
