//! A daemon started in-process through the library (`daemon::Daemon`), as
//! a test or another program would, on each engine: it serves a real NBD
//! client and answers on its control socket, then stops and drains.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use hostcrypt_e2e::*;
use hostcryptd::config::Config;
use hostcryptd::control::protocol::ControlReply;
use hostcryptd::control::{client, ControlRequest};
use hostcryptd::daemon::{Daemon, Settings};

fn serve_in_process(engine: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let kek = path("kek.key");
    std::fs::write(&kek, [7u8; 32]).unwrap();
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = format!(
        "[daemon]\nio_engine = \"{engine}\"\nstate_dir = \"{}\"\ncontrol = \"{}\"\n\
         [nbd]\nunix = \"{}\"\n\
         [kek.main]\nprovider = \"local\"\npath = \"{}\"\n\
         [[volume]]\nname = \"t\"\nbacking = \"{}\"\nrole = \"temp\"\nsize = \"16M\"\n",
        path("state").display(),
        path("control.sock").display(),
        path("nbd.sock").display(),
        kek.display(),
        path("t.img").display(),
    );
    let config_path = path("hostcryptd.toml");
    std::fs::write(&config_path, &text).unwrap();
    let config = Config::load(&config_path).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut daemon = runtime
        .block_on(Daemon::start(Settings {
            config_path,
            config,
            handle_signals: false,
        }))
        .unwrap_or_else(|e| panic!("the daemon did not start on {engine}: {e}"));
    assert_eq!(daemon.engine().name(), engine);

    // A real client writes and reads back through the in-process daemon.
    let uri = format!("nbd+unix:///t?socket={}", path("nbd.sock").display());
    let out = qemu_io(
        &uri,
        &[
            "write -P 0x5a 4096 64k",
            "read -P 0x5a 4096 64k",
            "read -P 0 0 4096",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");

    let answer = client::call(
        &path("control.sock"),
        &ControlRequest::Status,
        Duration::from_secs(10),
    )
    .unwrap();
    let Some(ControlReply::Status(status)) = answer.result else {
        panic!("not a status: {answer:?}");
    };
    assert_eq!(status.engine, engine);
    assert_eq!(status.volumes.len(), 1);

    daemon.stop();
    runtime.block_on(async {
        daemon.wait_for_stop().await;
        daemon.drain().await.unwrap();
    });
    assert!(
        !path("control.sock").exists(),
        "drain removes the control socket"
    );
    assert!(
        std::os::unix::net::UnixStream::connect(path("nbd.sock")).is_err(),
        "no NBD listener after drain"
    );
}

#[test]
fn an_in_process_daemon_serves_on_the_thread_pool() {
    serve_in_process("threads");
}

#[test]
fn an_in_process_daemon_serves_on_io_uring() {
    if !crate::protocol::kernel_allows_io_uring() {
        skip("this kernel refuses io_uring");
        return;
    }
    serve_in_process("uring");
}
