//! The `azure` KEK provider: an RSA key in Azure Key Vault or Managed HSM,
//! through the data-plane REST API (`wrapkey` / `unwrapkey` with
//! `RSA-OAEP-256`, api-version 7.4 by default).
//!
//! Versions: with `key_version` set every wrap uses that version; without
//! it, the current version is looked up (`GET keys/NAME`, which needs the
//! `keys/get` permission) before each wrap, so rotating the key in Azure and
//! then `hostcrypt rotate-kek` (or `auto_rotate`) moves volumes to it. The
//! version is the last segment of the `kid` the service returns, stored in
//! the header; unwrap always names that version.
//!
//! Tokens: a managed identity via IMDS (`Metadata: true`, optional
//! `client_id`; 404/410/429/5xx retried with exponential backoff, as
//! Microsoft's IMDS guidance asks) or client credentials (tenant, client id,
//! secret read from `client_secret_file` at each token request). Tokens are
//! cached until five minutes before expiry; a 401 drops the cached token and
//! retries once. Endpoints (IMDS, authority) are overridable for tests and
//! sovereign clouds.
//!
//! Failure classes: 401 after a fresh token, and 403, are access denied (a
//! 403 on a disabled key is key loss); 404 is key loss; 429/5xx/transport
//! errors are retried, then unavailable. Key checks unwrap (Key Vault has
//! no rewrap), so the DEK crosses TLS once per `key_check_interval`.
//!
//! Blocking HTTP, like the vault provider: providers run on control threads.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::http::Backoff;
use super::{KekError, KekRef, KeyProvider, WrappedDek};
use crate::crypto::Dek;

pub const PROVIDER: &str = "azure";
const ALGORITHM: &str = "RSA-OAEP-256";

/// How the daemon gets its Entra ID token.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum AzureAuth {
    /// The VM's managed identity, through IMDS.
    #[default]
    ManagedIdentity,
    /// An application's client id and secret (`tenant_id`, `client_id`,
    /// `client_secret_file`).
    ClientCredentials,
}

/// The `[kek.NAME]` table of an `azure` provider.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// The Key Vault or Managed HSM, e.g.
    /// `https://myhsm.managedhsm.azure.net` for a Managed HSM.
    #[schemars(extend("examples" = ["https://myvault.vault.azure.net"]))]
    pub vault_url: String,
    /// Name of the RSA key.
    #[schemars(extend("examples" = ["hostcrypt"]))]
    pub key_name: String,
    /// Pin one key version; absent = always the current version.
    #[schemars(extend("examples" = ["0123456789abcdef0123456789abcdef"]))]
    pub key_version: Option<String>,
    /// How the daemon gets its Entra ID token.
    #[serde(default)]
    #[schemars(extend("examples" = ["client-credentials"]))]
    pub auth: AzureAuth,
    /// Managed identity: which user-assigned identity (optional).
    /// Client credentials: the application (client) id (required).
    #[schemars(extend("examples" = ["00000000-0000-0000-0000-000000000000"]))]
    pub client_id: Option<String>,
    /// Client credentials: the directory (tenant) id.
    #[schemars(extend("examples" = ["00000000-0000-0000-0000-000000000000"]))]
    pub tenant_id: Option<String>,
    /// Client credentials: file holding the client secret (mode 0600).
    #[schemars(extend("examples" = ["/etc/hostcrypt/azure.secret"]))]
    pub client_secret_file: Option<PathBuf>,
    /// PEM bundle of CAs to trust in addition to the system roots
    /// (private endpoints, TLS-inspecting proxies).
    #[schemars(extend("examples" = ["/etc/hostcrypt/azure-ca.pem"]))]
    pub ca_file: Option<PathBuf>,
    /// Token audience; `https://managedhsm.azure.net` for Managed HSM.
    #[serde(default = "default_resource")]
    #[schemars(extend("examples" = ["https://managedhsm.azure.net"]))]
    pub resource: String,
    /// Key Vault REST API version.
    #[serde(default = "default_api_version")]
    #[schemars(extend("examples" = ["7.5"]))]
    pub api_version: String,
    /// The instance metadata service that issues managed-identity tokens
    /// (tests, sovereign clouds).
    #[serde(default = "default_imds")]
    #[schemars(extend("examples" = ["http://127.0.0.1:8081"]))]
    pub imds_endpoint: String,
    /// The Entra ID authority that issues client-credentials tokens
    /// (sovereign clouds).
    #[serde(default = "default_authority")]
    #[schemars(extend("examples" = ["https://login.microsoftonline.us"]))]
    pub authority: String,
    /// Attempts for retryable failures.
    #[serde(default = "super::default_attempts")]
    #[schemars(extend("examples" = [8]))]
    pub attempts: u32,
    /// Per-request timeout in seconds.
    #[serde(default = "super::default_timeout")]
    #[schemars(extend("examples" = [30]))]
    pub timeout_secs: u64,
}

fn default_resource() -> String {
    "https://vault.azure.net".into()
}
fn default_api_version() -> String {
    "7.4".into()
}
fn default_imds() -> String {
    "http://169.254.169.254".into()
}
fn default_authority() -> String {
    "https://login.microsoftonline.com".into()
}

struct CachedToken {
    value: Zeroizing<String>,
    refresh_at: Instant,
}

pub struct AzureKek {
    config: AzureConfig,
    http: reqwest::blocking::Client,
    token: Mutex<Option<CachedToken>>,
}

impl std::fmt::Debug for AzureKek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureKek")
            .field("vault_url", &self.config.vault_url)
            .field("key_name", &self.config.key_name)
            .finish_non_exhaustive()
    }
}

enum Failure {
    /// HTTP status, error code, message, and Retry-After when the server
    /// sent one (429, 503).
    Status(u16, String, String, Option<Duration>),
    Transport(String),
    /// No token: already retried by the token request itself.
    Token(KekError),
}

impl AzureKek {
    pub fn new(config: AzureConfig) -> Result<Self, KekError> {
        let provider = format!("azure key {}", config.key_name);
        if config.auth == AzureAuth::ClientCredentials {
            let missing = [
                ("tenant_id", config.tenant_id.is_none()),
                ("client_id", config.client_id.is_none()),
                ("client_secret_file", config.client_secret_file.is_none()),
            ]
            .iter()
            .filter(|(_, m)| *m)
            .map(|(n, _)| *n)
            .collect::<Vec<_>>();
            if !missing.is_empty() {
                return Err(KekError::Unsupported {
                    provider: format!(
                        "{provider} (auth = \"client-credentials\" needs {})",
                        missing.join(", ")
                    ),
                    operation: "authenticate without them",
                });
            }
        }
        if let Some(secret) = &config.client_secret_file {
            super::check_secret_file(secret)?;
        }
        let http = super::http::client(&provider, config.timeout_secs, config.ca_file.as_deref())?;
        Ok(AzureKek {
            config,
            http,
            token: Mutex::new(None),
        })
    }

    fn vault(&self) -> &str {
        self.config.vault_url.trim_end_matches('/')
    }

    fn key_id(&self) -> String {
        format!("{}/keys/{}", self.vault(), self.config.key_name)
    }

    fn kek_ref(&self, version: String) -> KekRef {
        KekRef {
            provider: PROVIDER.into(),
            key_id: self.key_id(),
            key_version: version,
        }
    }

    /// A bearer token, from the cache or freshly fetched.
    fn bearer(&self) -> Result<Zeroizing<String>, KekError> {
        let mut cached = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = cached.as_ref().filter(|t| Instant::now() < t.refresh_at) {
            return Ok(t.value.clone());
        }
        let (value, expires_in) = match self.config.auth {
            AzureAuth::ManagedIdentity => self.imds_token()?,
            AzureAuth::ClientCredentials => self.client_credentials_token()?,
        };
        // Refresh five minutes early (or halfway through short lifetimes).
        let margin = Duration::from_secs(300).min(expires_in / 2);
        *cached = Some(CachedToken {
            value: value.clone(),
            refresh_at: Instant::now() + expires_in - margin,
        });
        Ok(value)
    }

    fn forget_token(&self) {
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn imds_token(&self) -> Result<(Zeroizing<String>, Duration), KekError> {
        let url = format!(
            "{}/metadata/identity/oauth2/token",
            self.config.imds_endpoint.trim_end_matches('/')
        );
        let mut query = vec![
            ("api-version", "2018-02-01"),
            ("resource", self.config.resource.as_str()),
        ];
        if let Some(id) = &self.config.client_id {
            query.push(("client_id", id.as_str()));
        }
        self.token_request("managed identity (IMDS)", || {
            self.http.get(&url).header("Metadata", "true").query(&query)
        })
    }

    fn client_credentials_token(&self) -> Result<(Zeroizing<String>, Duration), KekError> {
        let (Some(tenant), Some(client_id), Some(secret_file)) = (
            &self.config.tenant_id,
            &self.config.client_id,
            &self.config.client_secret_file,
        ) else {
            return Err(KekError::Unsupported {
                provider: self.describe(),
                operation:
                    "use client credentials without tenant_id, client_id and client_secret_file",
            });
        };
        let secret = Zeroizing::new(
            std::fs::read_to_string(secret_file)
                .map_err(|source| KekError::SecretFile {
                    provider: self.describe(),
                    path: secret_file.clone(),
                    source,
                })?
                .trim()
                .to_string(),
        );
        let url = format!(
            "{}/{tenant}/oauth2/v2.0/token",
            self.config.authority.trim_end_matches('/')
        );
        let scope = format!("{}/.default", self.config.resource.trim_end_matches('/'));
        self.token_request("client credentials", || {
            self.http.post(&url).form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id.as_str()),
                ("client_secret", secret.as_str()),
                ("scope", scope.as_str()),
            ])
        })
    }

    /// Sends a token request with retries on 404/410/429/5xx.
    fn token_request(
        &self,
        source: &str,
        request: impl Fn() -> reqwest::blocking::RequestBuilder,
    ) -> Result<(Zeroizing<String>, Duration), KekError> {
        let mut backoff = Backoff::new(self.config.attempts, Duration::from_secs(10));
        let what = format!("{source} token");
        loop {
            let last = match request().send() {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let body: Value = resp.json().unwrap_or(Value::Null);
                    if status == 200 {
                        let token = body["access_token"].as_str().unwrap_or_default();
                        if token.is_empty() {
                            "token response without access_token".to_string()
                        } else {
                            // IMDS sends expires_in as a string, Entra ID as a number.
                            let expires_in = body["expires_in"]
                                .as_u64()
                                .or_else(|| {
                                    body["expires_in"].as_str().and_then(|s| s.parse().ok())
                                })
                                .unwrap_or(300);
                            return Ok((
                                Zeroizing::new(token.to_string()),
                                Duration::from_secs(expires_in.max(1)),
                            ));
                        }
                    } else {
                        let detail = body["error_description"]
                            .as_str()
                            .or(body["error"].as_str())
                            .unwrap_or_default()
                            .chars()
                            .take(300)
                            .collect::<String>();
                        let last = format!("HTTP {status}: {detail}");
                        if !(matches!(status, 404 | 410 | 429) || status >= 500) {
                            return Err(KekError::AccessDenied {
                                provider: self.describe(),
                                reason: format!("{source} token request refused: {last}"),
                            });
                        }
                        last
                    }
                }
                Err(e) => e.without_url().to_string(),
            };
            if !backoff.wait(PROVIDER, &what, &last) {
                return Err(backoff.exhausted(self.describe(), &format!("{what}: {last}")));
            }
        }
    }

    /// One Key Vault request.
    fn exchange(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        let token = self.bearer().map_err(Failure::Token)?;
        let mut req = self
            .http
            .request(method, format!("{}/{path}", self.vault()))
            .query(&[("api-version", self.config.api_version.as_str())])
            .bearer_auth(token.as_str());
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req
            .send()
            .map_err(|e| Failure::Transport(e.without_url().to_string()))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let value: Value = resp.json().unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(value);
        }
        let code = value["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let inner = value["error"]["innererror"]["code"]
            .as_str()
            .unwrap_or_default();
        let mut message: String = value["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        if !inner.is_empty() {
            message = format!("{message} ({inner})");
        }
        Err(Failure::Status(status, code, message, retry_after))
    }

    /// A Key Vault request with one token refresh on 401 and retries for
    /// transient failures; failures classified.
    fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, KekError> {
        let mut backoff = Backoff::new(self.config.attempts, Duration::from_secs(5));
        let mut refreshed = false;
        loop {
            let last = match self.exchange(method.clone(), path, body) {
                Ok(v) => return Ok(v),
                Err(Failure::Status(401, code, msg, _)) if !refreshed => {
                    tracing::info!(
                        provider = PROVIDER,
                        "401 {code}: {msg}; fetching a fresh token"
                    );
                    self.forget_token();
                    refreshed = true;
                    continue;
                }
                Err(Failure::Status(status, code, msg, retry_after))
                    if status == 429 || status >= 500 =>
                {
                    if let Some(wait) = retry_after {
                        backoff.honour_retry_after(wait);
                    }
                    format!("HTTP {status} {code}: {msg}")
                }
                Err(Failure::Status(status, code, msg, _)) => {
                    return Err(self.classify(status, &code, msg))
                }
                Err(Failure::Transport(msg)) => msg,
                Err(Failure::Token(e)) => return Err(e),
            };
            if !backoff.wait(PROVIDER, path, &last) {
                return Err(backoff.exhausted(self.describe(), &last));
            }
        }
    }

    fn classify(&self, status: u16, code: &str, msg: String) -> KekError {
        let provider = self.describe();
        let reason = format!("HTTP {status} {code}: {msg}");
        let disabled = msg.to_lowercase().contains("disabled");
        match status {
            404 => KekError::KeyGone { provider, reason },
            403 | 400 | 409 if disabled => KekError::KeyGone { provider, reason },
            401 | 403 => KekError::AccessDenied { provider, reason },
            _ => KekError::WrapFailed { provider, reason },
        }
    }

    /// The key bundle (attributes, public key) of the pinned or current version.
    fn key_bundle(&self) -> Result<Value, KekError> {
        let path = match &self.config.key_version {
            Some(v) => format!("keys/{}/{v}", self.config.key_name),
            None => format!("keys/{}", self.config.key_name),
        };
        self.call(reqwest::Method::GET, &path, None)
    }

    /// The version wraps use now: the pinned one, or the key's current one.
    /// Refuses an RSA key under 2048 bits.
    fn target_version(&self) -> Result<String, KekError> {
        let bundle = match self.key_bundle() {
            Ok(b) => b,
            // A pinned version needs no keys/get; then the size is not known here.
            Err(KekError::AccessDenied { .. }) if self.config.key_version.is_some() => Value::Null,
            Err(e) => return Err(e),
        };
        if let Some(bits) = rsa_bits(&bundle).filter(|b| *b < super::MIN_RSA_BITS) {
            return Err(KekError::WeakKey {
                provider: self.describe(),
                bits,
            });
        }
        if let Some(v) = &self.config.key_version {
            return Ok(v.clone());
        }
        if bundle["attributes"]["enabled"].as_bool() == Some(false) {
            return Err(KekError::KeyGone {
                provider: self.describe(),
                reason: "the current key version is disabled".into(),
            });
        }
        bundle["key"]["kid"]
            .as_str()
            .and_then(version_of_kid)
            .ok_or_else(|| KekError::WrapFailed {
                provider: self.describe(),
                reason: "the key bundle has no kid".into(),
            })
    }

    fn wrap_version(&self, dek: &Dek, version: &str) -> Result<WrappedDek, KekError> {
        let value =
            Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(dek.expose()));
        let mut body = json!({ "alg": ALGORITHM, "value": value.as_str() });
        let result = self.call(
            reqwest::Method::POST,
            &format!("keys/{}/{version}/wrapkey", self.config.key_name),
            Some(&body),
        );
        // The request carried the DEK in base64: wiped, whatever happened.
        super::scrub_json(&mut body);
        let result = result?;
        let kid_version = result["kid"].as_str().and_then(version_of_kid);
        let blob = result["value"]
            .as_str()
            .and_then(decode_base64url)
            .ok_or_else(|| KekError::WrapFailed {
                provider: self.describe(),
                reason: "the wrapkey response has no value".into(),
            })?;
        Ok(WrappedDek {
            kek: self.kek_ref(kid_version.unwrap_or_else(|| version.to_string())),
            blob,
        })
    }
}

impl KeyProvider for AzureKek {
    fn describe(&self) -> String {
        format!("azure key {} in {}", self.config.key_name, self.vault())
    }

    fn owns(&self, kek: &KekRef) -> bool {
        kek.provider == PROVIDER && kek.key_id == self.key_id()
    }

    fn wrap(&self, dek: &Dek) -> Result<WrappedDek, KekError> {
        let version = self.target_version()?;
        self.wrap_version(dek, &version)
    }

    fn unwrap(&self, wrapped: &WrappedDek) -> Result<Dek, KekError> {
        if !self.owns(&wrapped.kek) {
            return Err(KekError::WrongKey {
                wrapped_by: wrapped.kek.clone(),
                configured: self.describe(),
            });
        }
        let body = json!({
            "alg": ALGORITHM,
            "value": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&wrapped.blob),
        });
        let result = self.call(
            reqwest::Method::POST,
            &format!(
                "keys/{}/{}/unwrapkey",
                self.config.key_name, wrapped.kek.key_version
            ),
            Some(&body),
        )?;
        let mut result = result;
        // Key Vault sends base64url without padding; accept padding too.
        let dek = super::dek_from_base64(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            result["value"].as_str().map(|v| v.trim_end_matches('=')),
            || self.describe(),
        );
        // The response carried the DEK in base64.
        super::scrub_json(&mut result);
        dek
    }

    /// Purge protection, enabled, expiry, key_ops and RSA size of the key
    /// version wraps use (needs keys/get; without it, that is the warning).
    fn safety_warnings(&self) -> Result<Vec<String>, KekError> {
        let name = &self.config.key_name;
        let bundle = match self.key_bundle() {
            Ok(b) => b,
            Err(KekError::AccessDenied { .. }) => {
                return Ok(vec![format!("cannot read the settings of key {name} (the identity lacks keys/get): whether it can be purged, is enabled or expires is unknown")])
            }
            Err(e) => return Err(e),
        };
        let attributes = &bundle["attributes"];
        let mut warnings = Vec::new();
        let level = attributes["recoveryLevel"].as_str().unwrap_or("");
        if level.is_empty() || level.contains("Purgeable") {
            warnings.push(format!("key {name} can be purged for good (recoveryLevel {level:?}): enable purge protection on the vault"));
        }
        if attributes["enabled"].as_bool() == Some(false) {
            warnings.push(format!("key {name} is disabled"));
        }
        if let Some(exp) = attributes["exp"].as_u64() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            if exp <= now + 30 * 24 * 3600 {
                let when = humantime::format_rfc3339_seconds(
                    std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(exp),
                );
                warnings.push(format!("key {name} expires at {when} (within 30 days): extend it or rotate to a new key"));
            }
        }
        let ops: Vec<&str> = bundle["key"]["key_ops"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let missing: Vec<&str> = ["wrapKey", "unwrapKey"]
            .into_iter()
            .filter(|op| !ops.contains(op))
            .collect();
        if !missing.is_empty() {
            warnings.push(format!(
                "key {name} does not allow {} (key_ops {ops:?})",
                missing.join(" and ")
            ));
        }
        if let Some(bits) = rsa_bits(&bundle).filter(|b| *b < super::MIN_RSA_BITS) {
            warnings.push(format!("key {name} is RSA-{bits}: new wraps are refused; move to an RSA key of 3072 or 4096 bits"));
        }
        Ok(warnings)
    }

    fn rewrap(
        &self,
        wrapped: &WrappedDek,
        to_version: Option<&str>,
    ) -> Result<WrappedDek, KekError> {
        let dek = self.unwrap(wrapped)?;
        let version = match to_version {
            Some(v) => v.to_string(),
            None => self.target_version()?,
        };
        if version == wrapped.kek.key_version {
            return Ok(wrapped.clone());
        }
        self.wrap_version(&dek, &version)
    }
}

/// Bits of an RSA key bundle's modulus (`key.n`, base64url).
fn rsa_bits(bundle: &Value) -> Option<u64> {
    let n = bundle["key"]["n"].as_str().and_then(decode_base64url)?;
    let first = n.iter().position(|&b| b != 0)?;
    Some((n.len() - first) as u64 * 8 - u64::from(n[first].leading_zeros()))
}

/// `https://v.vault.azure.net/keys/name/0123abcd` → `0123abcd`.
fn version_of_kid(kid: &str) -> Option<String> {
    let mut parts = kid.trim_end_matches('/').rsplit('/');
    let version = parts.next()?;
    let _name = parts.next()?;
    (parts.next()? == "keys" && !version.is_empty()).then(|| version.to_string())
}

/// Key Vault sends base64url without padding; accept padding too.
fn decode_base64url(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_comes_from_the_kid() {
        assert_eq!(
            version_of_kid("https://v.vault.azure.net/keys/kek/78deebed173b48e48f55abf87ed4cf71")
                .as_deref(),
            Some("78deebed173b48e48f55abf87ed4cf71")
        );
        assert_eq!(version_of_kid("https://v.vault.azure.net/keys/kek"), None);
        assert_eq!(version_of_kid("nonsense"), None);
    }

    #[test]
    fn base64url_with_or_without_padding() {
        assert_eq!(decode_base64url("_-8").as_deref(), Some(&[0xff, 0xef][..]));
        assert_eq!(decode_base64url("_-8=").as_deref(), Some(&[0xff, 0xef][..]));
    }
}
