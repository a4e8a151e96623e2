//! X.509 credentials for the TLS tests (made by `py/make_certs.py` with
//! python3-cryptography) and the URIs and config lines that use them.

use std::path::PathBuf;
use std::process::Command;

use crate::{run_ok, Fixture};

/// The credential directories `make_certs.py` writes: `server`, `server2`
/// (same CA, CN=hostcrypt-2), and client directories `client`
/// (CN=vm-17,O=Example), `other` (CN=vm-99), `rogue` (another CA),
/// `expired`, `revoked` (in the server's CRL) and `nocert`.
pub struct Certs {
    pub root: PathBuf,
}

impl Certs {
    pub fn make(fx: &Fixture) -> Certs {
        let root = fx.path("certs");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/make_certs.py");
        run_ok(Command::new("/usr/bin/python3").arg(script).arg(&root));
        Certs { root }
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// `[nbd]` lines for a loopback TCP listener with TLS `mode`.
    pub fn server_lines(&self, port: u16, mode: &str) -> String {
        format!(
            "tcp = \"127.0.0.1:{port}\"\ntls = \"{mode}\"\ntls_certificates = \"{}\"\n",
            self.dir("server").display()
        )
    }

    /// An `nbds://` URI libnbd (nbdinfo, nbdcopy, fio) connects with.
    pub fn uri(&self, port: u16, export: &str, client: &str) -> String {
        format!(
            "nbds://localhost:{port}/{export}?tls-certificates={}",
            self.dir(client).display()
        )
    }
}

/// A TCP port on loopback that nothing listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local address").port()
}
