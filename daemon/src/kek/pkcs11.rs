//! The `pkcs11` KEK provider: a key held by any PKCS#11 module (an HSM, a
//! smart card, SoftHSM2), through the `cryptoki` crate.
//!
//! Key versions are key objects: version N of key `key_label` is the object
//! labelled `{key_label}:v{N}`, so rotating means creating the next label on
//! the token (`pkcs11-tool --keygen --label hostcrypt-kek:v2 ...`); the
//! newest is the highest N present. Old versions stay usable until their
//! object is deleted — which is key loss for volumes still wrapped by them.
//!
//! Two mechanisms, chosen by the key object's type:
//! - an AES key: `CKM_AES_KEY_WRAP_PAD` (RFC 5649) via `C_WrapKey` /
//!   `C_UnwrapKey`. The DEK is imported as a short-lived, non-token session
//!   object to be wrapped (and unwrapped into one to be read back), because
//!   modules implement KWP for key wrapping, not for `C_Encrypt`.
//! - an RSA key pair (both objects carry the label): `CKM_RSA_PKCS_OAEP`
//!   encrypt with the public key, decrypt with the private key; the OAEP
//!   hash is `oaep_hash` (`sha256` by default; SoftHSM2 2.6 only does `sha1`).
//!
//! A session is opened per operation and the PIN re-read from `pin_file`
//! each time, so a changed PIN or a re-inserted token is picked up without a
//! restart; operations are rare (open, key checks, rotation).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use serde::Deserialize;
use zeroize::{Zeroize, Zeroizing};

use super::{KekError, KekRef, KeyProvider, WrappedDek};
use crate::crypto::Dek;

pub const PROVIDER: &str = "pkcs11";

/// Digest for RSA-OAEP (and its MGF1).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum OaepHash {
    /// SHA-256.
    #[default]
    Sha256,
    /// SHA-1, for modules that offer nothing else (SoftHSM2 2.6).
    Sha1,
}

/// The `[kek.NAME]` table of a `pkcs11` provider.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (`.so`).
    #[schemars(extend("examples" = ["/usr/lib/softhsm/libsofthsm2.so"]))]
    pub module: PathBuf,
    /// Label of the token that holds the key.
    #[schemars(extend("examples" = ["hostcrypt"]))]
    pub token_label: String,
    /// File holding the user PIN (mode 0600).
    #[schemars(extend("examples" = ["/etc/hostcrypt/hsm.pin"]))]
    pub pin_file: PathBuf,
    /// Key label without the `:vN` version suffix: version N is the
    /// object labelled `KEY_LABEL:vN`.
    #[schemars(extend("examples" = ["hostcrypt-kek"]))]
    pub key_label: String,
    /// Digest of RSA-OAEP and its MGF1, for an RSA key pair.
    #[serde(default)]
    #[schemars(extend("examples" = ["sha1"]))]
    pub oaep_hash: OaepHash,
}

pub struct Pkcs11Kek {
    config: Pkcs11Config,
    /// One module context per provider; serialised because some modules
    /// dislike concurrent logins, and operations are rare.
    context: Mutex<Pkcs11>,
    /// mtime of a PIN file whose PIN the token rejected: not retried until
    /// the file changes, because repeated wrong logins lock real tokens.
    rejected_pin: Mutex<Option<Option<SystemTime>>>,
}

impl std::fmt::Debug for Pkcs11Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Kek")
            .field("module", &self.config.module)
            .field("token_label", &self.config.token_label)
            .field("key_label", &self.config.key_label)
            .finish_non_exhaustive()
    }
}

/// A key object found on the token: version and the handles to use.
struct KeyVersion {
    version: u64,
    kind: KeyKind,
}

enum KeyKind {
    Aes(ObjectHandle),
    Rsa {
        public: Option<ObjectHandle>,
        private: Option<ObjectHandle>,
    },
}

impl Pkcs11Kek {
    /// Loads the module and checks that the token, PIN and key are usable.
    pub fn new(config: Pkcs11Config) -> Result<Self, KekError> {
        let context = Pkcs11::new(&config.module).map_err(|e| KekError::Unavailable {
            provider: format!("pkcs11 module {}", config.module.display()),
            reason: e.to_string(),
        })?;
        match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => {
                return Err(KekError::Unavailable {
                    provider: format!("pkcs11 module {}", config.module.display()),
                    reason: e.to_string(),
                })
            }
        }
        let kek = Pkcs11Kek {
            config,
            context: Mutex::new(context),
            rejected_pin: Mutex::new(None),
        };
        super::check_secret_file(&kek.config.pin_file)?;
        kek.with_session(|session| kek.newest(session).map(drop))?;
        Ok(kek)
    }

    fn key_id(&self) -> String {
        format!("{}/{}", self.config.token_label, self.config.key_label)
    }

    fn kek_ref(&self, version: u64) -> KekRef {
        KekRef {
            provider: PROVIDER.into(),
            key_id: self.key_id(),
            key_version: version.to_string(),
        }
    }

    /// Runs `f` in a fresh logged-in session on the configured token.
    fn with_session<T>(
        &self,
        f: impl FnOnce(&Session) -> Result<T, KekError>,
    ) -> Result<T, KekError> {
        let context = self.context.lock().unwrap_or_else(|p| p.into_inner());
        let slots = context
            .get_slots_with_token()
            .map_err(|e| self.fail(e, "listing slots"))?;
        let slot = slots
            .into_iter()
            .find(|s| {
                context
                    .get_token_info(*s)
                    .is_ok_and(|t| t.label().trim_end() == self.config.token_label)
            })
            .ok_or_else(|| KekError::KeyGone {
                provider: self.describe(),
                reason: format!("no token labelled {:?} is present", self.config.token_label),
            })?;
        let session = context
            .open_rw_session(slot)
            .map_err(|e| self.fail(e, "opening a session"))?;
        let pin_modified = std::fs::metadata(&self.config.pin_file)
            .and_then(|m| m.modified())
            .ok();
        let mut rejected = self.rejected_pin.lock().unwrap_or_else(|p| p.into_inner());
        if *rejected == Some(pin_modified) {
            return Err(KekError::AccessDenied {
                provider: self.describe(),
                reason: format!(
                    "the token rejected the PIN in {}; not trying it again (repeated failures lock tokens) until the file changes",
                    self.config.pin_file.display()
                ),
            });
        }
        let pin = self.read_pin()?;
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => *rejected = None,
            Err(e) => {
                if matches!(e, CkError::Pkcs11(RvError::PinIncorrect, _)) {
                    *rejected = Some(pin_modified);
                }
                return Err(self.fail(e, "logging in"));
            }
        }
        drop(rejected);
        f(&session)
    }

    fn read_pin(&self) -> Result<AuthPin, KekError> {
        let path = &self.config.pin_file;
        let raw = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
            KekError::SecretFile {
                provider: self.describe(),
                path: path.clone(),
                source,
            }
        })?);
        Ok(AuthPin::from(raw.trim().to_string()))
    }

    /// Maps a PKCS#11 failure onto the provider error classes.
    fn fail(&self, error: CkError, during: &str) -> KekError {
        let provider = self.describe();
        let reason = format!("{during}: {error}");
        match error {
            CkError::Pkcs11(rv, _) => match rv {
                RvError::PinIncorrect
                | RvError::PinLocked
                | RvError::PinExpired
                | RvError::PinInvalid
                | RvError::PinLenRange
                | RvError::UserNotLoggedIn
                | RvError::UserPinNotInitialized => KekError::AccessDenied { provider, reason },
                RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::DeviceRemoved
                | RvError::KeyFunctionNotPermitted
                | RvError::KeyTypeInconsistent => KekError::KeyGone { provider, reason },
                RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::WrappedKeyInvalid
                | RvError::WrappedKeyLenRange
                | RvError::UnwrappingKeyHandleInvalid => KekError::UnwrapFailed { provider },
                _ => KekError::Unavailable { provider, reason },
            },
            _ => KekError::Unavailable { provider, reason },
        }
    }

    /// RSA-OAEP failures: a module that rejects the configured hash gets a
    /// hint instead of PKCS#11's generic "arguments bad".
    fn oaep_fail(&self, error: CkError, during: &str) -> KekError {
        let rejected = matches!(
            error,
            CkError::Pkcs11(
                RvError::ArgumentsBad | RvError::MechanismInvalid | RvError::MechanismParamInvalid,
                _
            )
        );
        if rejected {
            let hash = match self.config.oaep_hash {
                OaepHash::Sha256 => "sha256",
                OaepHash::Sha1 => "sha1",
            };
            return KekError::Unsupported {
                provider: format!(
                    "{} (RSA-OAEP with {hash} refused while {during}; SoftHSM2 2.6 supports only oaep_hash = \"sha1\")",
                    self.describe()
                ),
                operation: "use the configured RSA-OAEP hash",
            };
        }
        self.fail(error, &format!("{during} (CKM_RSA_PKCS_OAEP)"))
    }

    /// All versions of the key present on the token.
    fn versions(&self, session: &Session) -> Result<Vec<KeyVersion>, KekError> {
        let prefix = format!("{}:v", self.config.key_label);
        let mut found: Vec<KeyVersion> = Vec::new();
        for class in [
            ObjectClass::SECRET_KEY,
            ObjectClass::PUBLIC_KEY,
            ObjectClass::PRIVATE_KEY,
        ] {
            let handles = session
                .find_objects(&[Attribute::Class(class)])
                .map_err(|e| self.fail(e, "finding key objects"))?;
            for handle in handles {
                let attrs = session
                    .get_attributes(handle, &[AttributeType::Label, AttributeType::KeyType])
                    .map_err(|e| self.fail(e, "reading key attributes"))?;
                let mut label = None;
                let mut key_type = None;
                for a in attrs {
                    match a {
                        Attribute::Label(l) => label = String::from_utf8(l).ok(),
                        Attribute::KeyType(t) => key_type = Some(t),
                        _ => {}
                    }
                }
                let Some(version) = label
                    .as_deref()
                    .and_then(|l| l.strip_prefix(&prefix))
                    .and_then(|v| v.parse::<u64>().ok())
                else {
                    continue;
                };
                let entry = match found.iter_mut().find(|k| k.version == version) {
                    Some(e) => e,
                    None => {
                        found.push(KeyVersion {
                            version,
                            kind: KeyKind::Rsa {
                                public: None,
                                private: None,
                            },
                        });
                        found.last_mut().expect("just pushed")
                    }
                };
                match (class, key_type) {
                    (ObjectClass::SECRET_KEY, Some(KeyType::AES)) => {
                        entry.kind = KeyKind::Aes(handle)
                    }
                    (ObjectClass::PUBLIC_KEY, Some(KeyType::RSA)) => {
                        if let KeyKind::Rsa { public, .. } = &mut entry.kind {
                            *public = Some(handle);
                        }
                    }
                    (ObjectClass::PRIVATE_KEY, Some(KeyType::RSA)) => {
                        if let KeyKind::Rsa { private, .. } = &mut entry.kind {
                            *private = Some(handle);
                        }
                    }
                    _ => {}
                }
            }
        }
        found.sort_by_key(|k| k.version);
        Ok(found)
    }

    fn newest(&self, session: &Session) -> Result<KeyVersion, KekError> {
        self.versions(session)?
            .into_iter()
            .rev()
            .find(|k| match &k.kind {
                KeyKind::Aes(_) => true,
                KeyKind::Rsa { public, .. } => public.is_some(),
            })
            .ok_or_else(|| KekError::KeyGone {
                provider: self.describe(),
                reason: format!(
                    "no AES key or RSA public key labelled {}:vN on the token",
                    self.config.key_label
                ),
            })
    }

    fn version(&self, session: &Session, version: u64) -> Result<KeyVersion, KekError> {
        self.versions(session)?
            .into_iter()
            .find(|k| k.version == version)
            .ok_or_else(|| KekError::KeyGone {
                provider: self.describe(),
                reason: format!(
                    "key object {}:v{version} is not on the token (deleted?)",
                    self.config.key_label
                ),
            })
    }

    fn oaep(&self) -> Mechanism<'static> {
        let (hash, mgf) = match self.config.oaep_hash {
            OaepHash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
            OaepHash::Sha1 => (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
        };
        Mechanism::RsaPkcsOaep(PkcsOaepParams::new(hash, mgf, PkcsOaepSource::empty()))
    }

    fn wrap_with(
        &self,
        session: &Session,
        key: &KeyVersion,
        dek: &Dek,
    ) -> Result<Vec<u8>, KekError> {
        match &key.kind {
            KeyKind::Aes(kek) => {
                let mut template = [
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::Token(false),
                    Attribute::Extractable(true),
                    Attribute::Sensitive(false),
                    Attribute::Value(dek.expose().to_vec()),
                ];
                let created = session.create_object(&template);
                // The template's copy of the DEK is wiped, whatever happened.
                for attribute in &mut template {
                    if let Attribute::Value(v) = attribute {
                        v.zeroize();
                    }
                }
                let dek_object =
                    created.map_err(|e| self.fail(e, "importing the data key for wrapping"))?;
                let wrapped = session.wrap_key(&Mechanism::AesKeyWrapPad, *kek, dek_object);
                let _ = session.destroy_object(dek_object);
                wrapped.map_err(|e| self.fail(e, "wrapping (CKM_AES_KEY_WRAP_PAD)"))
            }
            KeyKind::Rsa { public, .. } => {
                let public = public.ok_or_else(|| KekError::KeyGone {
                    provider: self.describe(),
                    reason: format!(
                        "no RSA public key {}:v{}",
                        self.config.key_label, key.version
                    ),
                })?;
                if let Some(bits) = self
                    .modulus_bits(session, public)?
                    .filter(|b| *b < super::MIN_RSA_BITS)
                {
                    return Err(KekError::WeakKey {
                        provider: self.describe(),
                        bits,
                    });
                }
                session
                    .encrypt(&self.oaep(), public, dek.expose())
                    .map_err(|e| self.oaep_fail(e, "encrypting"))
            }
        }
    }

    fn modulus_bits(
        &self,
        session: &Session,
        public: ObjectHandle,
    ) -> Result<Option<u64>, KekError> {
        let attrs = session
            .get_attributes(public, &[AttributeType::ModulusBits])
            .map_err(|e| self.fail(e, "reading the RSA key size"))?;
        Ok(attrs.into_iter().find_map(|a| match a {
            Attribute::ModulusBits(bits) => Some(u64::from(bits)),
            _ => None,
        }))
    }

    fn unwrap_with(
        &self,
        session: &Session,
        key: &KeyVersion,
        blob: &[u8],
    ) -> Result<Dek, KekError> {
        let raw = match &key.kind {
            KeyKind::Aes(kek) => {
                let object = session
                    .unwrap_key(
                        &Mechanism::AesKeyWrapPad,
                        *kek,
                        blob,
                        &[
                            Attribute::Class(ObjectClass::SECRET_KEY),
                            Attribute::KeyType(KeyType::GENERIC_SECRET),
                            Attribute::Token(false),
                            Attribute::Extractable(true),
                            Attribute::Sensitive(false),
                        ],
                    )
                    .map_err(|e| self.fail(e, "unwrapping (CKM_AES_KEY_WRAP_PAD)"))?;
                let value = session.get_attributes(object, &[AttributeType::Value]);
                let _ = session.destroy_object(object);
                let value = value.map_err(|e| self.fail(e, "reading the unwrapped key"))?;
                match value.into_iter().next() {
                    Some(Attribute::Value(v)) => Zeroizing::new(v),
                    _ => Zeroizing::new(Vec::new()),
                }
            }
            KeyKind::Rsa { private, .. } => {
                let private = private.ok_or_else(|| KekError::KeyGone {
                    provider: self.describe(),
                    reason: format!(
                        "no RSA private key {}:v{}",
                        self.config.key_label, key.version
                    ),
                })?;
                Zeroizing::new(
                    session
                        .decrypt(&self.oaep(), private, blob)
                        .map_err(|e| self.oaep_fail(e, "decrypting"))?,
                )
            }
        };
        Dek::from_slice(&raw).ok_or_else(|| KekError::UnwrapFailed {
            provider: self.describe(),
        })
    }

    fn wrapped_version(&self, wrapped: &WrappedDek) -> Result<u64, KekError> {
        if !self.owns(&wrapped.kek) {
            return Err(KekError::WrongKey {
                wrapped_by: wrapped.kek.clone(),
                configured: self.describe(),
            });
        }
        wrapped
            .kek
            .key_version
            .parse()
            .map_err(|_| KekError::UnwrapFailed {
                provider: self.describe(),
            })
    }
}

impl KeyProvider for Pkcs11Kek {
    fn describe(&self) -> String {
        format!(
            "pkcs11 key {} on token {:?} ({})",
            self.config.key_label,
            self.config.token_label,
            self.config.module.display()
        )
    }

    fn owns(&self, kek: &KekRef) -> bool {
        kek.provider == PROVIDER && kek.key_id == self.key_id()
    }

    fn wrap(&self, dek: &Dek) -> Result<WrappedDek, KekError> {
        self.with_session(|session| {
            let key = self.newest(session)?;
            Ok(WrappedDek {
                kek: self.kek_ref(key.version),
                blob: self.wrap_with(session, &key, dek)?,
            })
        })
    }

    fn unwrap(&self, wrapped: &WrappedDek) -> Result<Dek, KekError> {
        let version = self.wrapped_version(wrapped)?;
        self.with_session(|session| {
            let key = self.version(session, version)?;
            self.unwrap_with(session, &key, &wrapped.blob)
        })
    }

    /// Whether the newest key can leave the token (CKA_EXTRACTABLE) or be
    /// read in the clear (not CKA_SENSITIVE), and its RSA size.
    fn safety_warnings(&self) -> Result<Vec<String>, KekError> {
        self.with_session(|session| {
            let key = self.newest(session)?;
            let label = format!("{}:v{}", self.config.key_label, key.version);
            let mut warnings = Vec::new();
            let secret = match &key.kind {
                KeyKind::Aes(handle) => Some(*handle),
                KeyKind::Rsa { private, .. } => *private,
            };
            if let Some(handle) = secret {
                let attrs = session
                    .get_attributes(handle, &[AttributeType::Extractable, AttributeType::Sensitive])
                    .map_err(|e| self.fail(e, "reading key attributes"))?;
                for a in attrs {
                    match a {
                        Attribute::Extractable(true) => warnings.push(format!(
                            "key {label} is extractable (CKA_EXTRACTABLE): it can be exported from the token"
                        )),
                        Attribute::Sensitive(false) => warnings.push(format!(
                            "key {label} is not sensitive (CKA_SENSITIVE false): its value can be read off the token in the clear"
                        )),
                        _ => {}
                    }
                }
            }
            if let KeyKind::Rsa { public: Some(public), .. } = &key.kind {
                if let Some(bits) = self
                    .modulus_bits(session, *public)?
                    .filter(|b| *b < super::MIN_RSA_BITS)
                {
                    warnings.push(format!(
                        "key {label} is RSA-{bits}: new wraps are refused; move to an RSA key of 3072 or 4096 bits"
                    ));
                }
            }
            Ok(warnings)
        })
    }

    fn rewrap(
        &self,
        wrapped: &WrappedDek,
        to_version: Option<&str>,
    ) -> Result<WrappedDek, KekError> {
        let from = self.wrapped_version(wrapped)?;
        let to = to_version
            .map(|v| super::numeric_version(v, || self.describe()))
            .transpose()?;
        self.with_session(|session| {
            let dek = self.unwrap_with(session, &self.version(session, from)?, &wrapped.blob)?;
            let target = match to {
                Some(v) => self.version(session, v)?,
                None => self.newest(session)?,
            };
            Ok(WrappedDek {
                kek: self.kek_ref(target.version),
                blob: self.wrap_with(session, &target, &dek)?,
            })
        })
    }
}
