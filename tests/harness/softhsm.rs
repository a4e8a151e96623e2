//! A SoftHSM2 token private to one test: its own `SOFTHSM2_CONF` and token
//! directory (passed to the processes the fixture runs, never set in the
//! test process, because tests run in parallel), a user PIN in a 0600
//! file, and key objects made with `pkcs11-tool` (opensc) as an operator
//! would make them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::bao::write_secret;
use crate::{require_tool, run_ok};

/// Where Debian's `softhsm2` package installs the module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

pub struct SoftHsm {
    pub conf: PathBuf,
    pub pin_file: PathBuf,
    pub label: String,
    pin: String,
}

impl SoftHsm {
    /// Initialises token `label` under `dir` with a random user PIN.
    pub fn new(dir: &Path, label: &str) -> SoftHsm {
        require_tool("softhsm2-util");
        require_tool("pkcs11-tool");
        assert!(
            Path::new(MODULE).exists(),
            "{MODULE} missing: install softhsm2"
        );
        let tokens = dir.join("softhsm-tokens");
        std::fs::create_dir_all(&tokens).expect("token dir");
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("softhsm conf");
        let pin = format!("{:08}", std::process::id() % 100_000_000);
        let hsm = SoftHsm {
            pin_file: dir.join("hsm.pin"),
            conf,
            label: label.into(),
            pin,
        };
        run_ok(
            Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", &hsm.conf)
                .args([
                    "--init-token",
                    "--free",
                    "--label",
                    label,
                    "--so-pin",
                    "87654321",
                ])
                .args(["--pin", &hsm.pin]),
        );
        write_secret(&hsm.pin_file, &hsm.pin);
        hsm
    }

    /// `("SOFTHSM2_CONF", path)` for the fixture's processes.
    pub fn env(&self) -> (String, String) {
        ("SOFTHSM2_CONF".into(), self.conf.display().to_string())
    }

    /// Runs pkcs11-tool logged in to the token; returns the output whatever the outcome.
    pub fn tool(&self, args: &[&str]) -> Output {
        Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", &self.conf)
            .args(["--module", MODULE, "--token-label", &self.label, "--login"])
            .args(["--pin", &self.pin])
            .args(args)
            .output()
            .expect("run pkcs11-tool")
    }

    fn tool_ok(&self, args: &[&str]) {
        let out = self.tool(args);
        assert!(
            out.status.success(),
            "pkcs11-tool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// An AES-256 key allowed to wrap and unwrap (sensitive, not extractable).
    pub fn aes_key(&self, label: &str) {
        self.aes_key_with(label, &["--sensitive"]);
    }

    /// An AES-256 wrapping key with extra pkcs11-tool flags
    /// (`--sensitive`, `--extractable`).
    pub fn aes_key_with(&self, label: &str, flags: &[&str]) {
        let mut args = vec![
            "--keygen",
            "--key-type",
            "AES:32",
            "--usage-wrap",
            "--label",
            label,
        ];
        args.extend_from_slice(flags);
        self.tool_ok(&args);
    }

    /// An RSA-2048 key pair allowed to encrypt/decrypt.
    pub fn rsa_key(&self, label: &str) {
        self.rsa_key_bits(label, 2048);
    }

    /// An RSA key pair of `bits` allowed to encrypt/decrypt.
    pub fn rsa_key_bits(&self, label: &str, bits: u32) {
        let key_type = format!("rsa:{bits}");
        self.tool_ok(&[
            "--keypairgen",
            "--key-type",
            &key_type,
            "--usage-decrypt",
            "--label",
            label,
        ]);
    }

    /// Deletes the object of `kind` (`secrkey`, `privkey`, `pubkey`) labelled `label`.
    pub fn delete(&self, kind: &str, label: &str) {
        self.tool_ok(&["--delete-object", "--type", kind, "--label", label]);
    }

    /// A `[kek.NAME]` table for key `key_label` on this token.
    pub fn kek_table(&self, name: &str, key_label: &str, extra: &str) -> String {
        format!(
            "[kek.{name}]\nprovider = \"pkcs11\"\nmodule = \"{MODULE}\"\ntoken_label = \"{}\"\npin_file = \"{}\"\nkey_label = \"{key_label}\"\n{extra}\n",
            self.label,
            self.pin_file.display()
        )
    }

    pub fn pin(&self) -> &str {
        &self.pin
    }
}
