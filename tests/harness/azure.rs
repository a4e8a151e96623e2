//! The strict local Azure Key Vault / IMDS / Entra ID stand-in
//! (`tests/py/azure_kv.py`) for the azure provider's tests: started on a
//! free 127.0.0.1 port, driven through its `/_test/` controls, killed on drop.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait_until;

/// The stand-in's fixed client-credentials identity.
pub const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
pub const TENANT: &str = "contoso-tenant";
pub const CLIENT_SECRET: &str = "test-client-secret-value";

pub struct AzureKv {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl AzureKv {
    pub fn start(dir: &Path) -> AzureKv {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/azure_kv.py");
        let port_file = dir.join("azure-kv.port");
        let log = dir.join("azure-kv.log");
        let child = Command::new("/usr/bin/python3")
            .arg(&script)
            .arg(&port_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("azure log"))
            .spawn()
            .expect("start azure_kv.py");
        let mut kv = AzureKv {
            child,
            port: 0,
            log,
        };
        wait_until("azure_kv.py to listen", Duration::from_secs(30), || {
            if let Ok(Some(status)) = kv.child.try_wait() {
                panic!(
                    "azure_kv.py exited ({status}): {}",
                    std::fs::read_to_string(&kv.log).unwrap_or_default()
                );
            }
            std::fs::read_to_string(&port_file).is_ok_and(|p| !p.is_empty())
        });
        kv.port = std::fs::read_to_string(&port_file)
            .expect("port file")
            .trim()
            .parse()
            .expect("port");
        kv
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// POSTs a JSON body to a control path (`/_test/...`); returns the JSON answer.
    pub fn control(&self, path: &str, body: &str) -> serde_json::Value {
        let (status, text) = self.request("POST", path, body);
        assert_eq!(status, 200, "{path}: {text}");
        serde_json::from_str(&text).expect("control JSON")
    }

    /// Creates a key, or adds a version (rotation); returns the version id.
    pub fn new_version(&self, name: &str) -> String {
        self.new_version_with(name, "")
    }

    /// Adds a version with the given control fields (`key_size`,
    /// `recoveryLevel`, `exp`, `key_ops`, as JSON members); returns its id.
    pub fn new_version_with(&self, name: &str, fields: &str) -> String {
        self.control(&format!("/_test/keys/{name}"), &format!("{{{fields}}}"))["version"]
            .as_str()
            .expect("version")
            .to_string()
    }

    /// Changes the current version's `recoveryLevel`, `exp` or `key_ops`.
    pub fn set_attributes(&self, name: &str, fields: &str) {
        self.control(
            &format!("/_test/keys/{name}/attributes"),
            &format!("{{{fields}}}"),
        );
    }

    /// Every request the stand-in saw (method, path, api_version, authorization).
    pub fn requests(&self) -> Vec<serde_json::Value> {
        let (_, text) = self.request("POST", "/_test/log", "{}");
        serde_json::from_str(&text).expect("log JSON")
    }

    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect azure_kv");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )
        .expect("send");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("read");
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, body.to_string())
    }
}

impl Drop for AzureKv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
