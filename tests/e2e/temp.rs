//! `temp` volumes: a fresh key at every start, so a restart erases them.

use std::process::Command;

use hostcrypt_e2e::*;

#[test]
fn temp_volume_contents_are_gone_after_restart() {
    require_tool("qemu-io");
    let mut fx = Fixture::new();
    let backing = fx.volume("scratch", "temp", "size = \"32M\"");
    let daemon = fx.start();
    let marker = "0x5d";
    qemu_io(
        &fx.uri("scratch"),
        &[
            &format!("write -P {marker} 0 4M"),
            &format!("read -P {marker} 0 4M"),
        ],
    );
    assert_eq!(daemon.stop(), 0);
    // Ciphertext only on disk while stopped.
    let raw = std::fs::read(&backing).unwrap();
    assert!(memchr::memmem::find(&raw, &[0x5d; 64]).is_none());

    let _daemon = fx.start();
    let out = fx.path("after.bin");
    run_ok(Command::new("nbdcopy").arg(fx.uri("scratch")).arg(&out));
    let after = std::fs::read(&out).unwrap();
    assert_eq!(after.len(), 32 << 20);
    assert!(
        memchr::memmem::find(&after[..4 << 20], &[0x5d; 64]).is_none(),
        "old plaintext readable after restart"
    );
    let raw = std::fs::read(&backing).unwrap();
    assert!(
        raw[1 << 20..].iter().all(|&b| b == 0),
        "old ciphertext left in a recreated temp backing"
    );
}

#[test]
fn temp_volume_refuses_a_cache_backing() {
    let mut fx = Fixture::new();
    let backing = fx.volume("c", "cache", "");
    fx.create("c", "16M", 4096);
    let before = sha256_file(&backing);
    // Point a temp volume at the cache volume's backing: refused, untouched.
    std::fs::write(
        &fx.config,
        format!(
            "[server]\nunix = \"{}\"\nstate_dir = \"{}\"\n[[volume]]\nname = \"t\"\nbacking = \"{}\"\nrole = \"temp\"\nsize = \"16M\"\n",
            fx.socket.display(),
            fx.state_dir().display(),
            backing.display()
        ),
    )
    .unwrap();
    // The volume is refused (and retried), never formatted over.
    let d = fx.start_with_unavailable("t");
    assert!(
        d.stderr().contains("holds a cache volume"),
        "{}",
        d.stderr()
    );
    // This config still has the old [server] section: it works, with one
    // warning that says where its keys went.
    assert_eq!(
        d.stderr().matches("[server] section is deprecated").count(),
        1,
        "{}",
        d.stderr()
    );
    assert_eq!(d.stop(), 0);
    assert_eq!(sha256_file(&backing), before);
}
