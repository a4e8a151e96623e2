//! `hostcrypt attach`: a volume as a kernel block device. This machine's
//! kernel has neither the ublk_drv nor the nbd module, so the whole check
//! runs in a guest (tests/vm/attach.sh): for each of ublk and the
//! kernel's NBD client, attach, a filesystem on /dev/hostcrypt/NAME,
//! fio with verify while hostcryptd is
//! killed with -9 and restarted, detach refused while mounted, and
//! cryptsetup's plain mode reading the same files from the backing
//! (the dm-crypt compatibility docs/operating.md claims).

use hostcrypt_e2e::*;

#[test]
fn a_guest_mounts_an_attached_volume_across_a_kill_9_and_dm_crypt_reads_it() {
    if !require_root("installing qemu and booting a guest") {
        return;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/attach.sh");
    let out = std::process::Command::new(&script)
        .arg("--bin")
        .arg(bin_dir())
        .output()
        .expect("run tests/vm/attach.sh");
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("attach VM: PASS"), "{text}");
}

/// Where the kernel has no NBD client and no ublk (this machine), attach says so
/// plainly and leaves nothing behind; a name that cannot be a device
/// name and a volume that is not served are refused before the kernel
/// is asked; detach of what is not attached says so.
#[test]
fn attach_without_the_nbd_module_says_so_and_leaves_nothing() {
    // With the module loaded (not on this machine) attach may succeed
    // or fail for other reasons (not root): the refusals below still hold.
    let nbd_missing = !std::path::Path::new("/sys/module/nbd").exists();
    let mut fx = Fixture::new();
    fx.volume("v", "cache", "");
    fx.write_config(&fx.control_and_audit());
    fx.create("v", "8M", 4096);
    let daemon = fx.start();
    if nbd_missing {
        let out = fx.cli(&["attach", "v"]);
        let text = output_text(&out);
        assert!(!out.status.success(), "{text}");
        assert!(text.contains("modprobe nbd"), "{text}");
    }
    if !std::path::Path::new("/dev/ublk-control").exists() {
        let out = fx.cli(&["attach", "v", "--via", "ublk"]);
        let text = output_text(&out);
        assert!(!out.status.success(), "{text}");
        assert!(text.contains("modprobe ublk_drv"), "{text}");
    }
    for (args, want) in [
        (&["attach", "nope"][..], "no volume named"),
        (&["detach", "v"][..], "not attached"),
    ] {
        let out = fx.cli(args);
        let text = output_text(&out);
        assert!(!out.status.success(), "{args:?}: {text}");
        assert!(text.contains(want), "{args:?}: {text}");
    }
    let out = fx.cli(&["attached"]);
    assert!(output_text(&out).contains("no volume is attached"));
    // The daemon serves on.
    assert!(fx.cli(&["status"]).status.success());
    assert_eq!(daemon.stop(), 0);
}

/// The control socket is the attach door. A member of `control_group`
/// that is not root (the device would hold the plaintext) is refused
/// attach and detach but may list; raw requests that lie (a name that
/// climbs out of /dev/hostcrypt, an unknown `via`, a string for a bool,
/// fields not in the protocol, a line cut short) get an error and leave
/// the daemon serving.
#[test]
fn attach_is_root_s_and_hostile_requests_are_refused() {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    require_tool("setpriv");
    if !require_root("running a client as nobody") {
        return;
    }
    let mut fx = Fixture::new();
    fx.volume("v", "cache", "");
    let control = fx.path("control.sock");
    fx.write_config(&format!(
        "control = \"{}\"\ncontrol_group = \"nogroup\"",
        control.display()
    ));
    fx.create("v", "8M", 4096);
    let d = fx.start();
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&fx.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cli = fx.path("hostcrypt");
    std::fs::copy(bin("hostcrypt"), &cli).unwrap();
    std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        output_when_not_busy(
            std::process::Command::new("setpriv")
                .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
                .arg(&cli)
                .arg("--config")
                .arg(&fx.config)
                .args(args),
        )
    };
    for args in [&["attach", "v"][..], &["detach", "v"][..]] {
        let out = as_nobody(args);
        let text = output_text(&out);
        assert!(!out.status.success(), "{args:?}: {text}");
        assert!(text.contains("root's"), "{args:?}: {text}");
    }
    let out = as_nobody(&["attached"]);
    assert!(out.status.success(), "{}", output_text(&out));

    let ask = |line: &[u8]| -> String {
        let mut s = std::os::unix::net::UnixStream::connect(&control).unwrap();
        s.write_all(line).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply
    };
    for (line, want) in [
        (
            &b"{\"op\":\"attach\",\"volume\":\"../../etc\",\"via\":\"nbd\"}\n"[..],
            "cannot name a device",
        ),
        (
            b"{\"op\":\"attach\",\"volume\":\"v\",\"via\":\"floppy\"}\n",
            "\"ok\":false",
        ),
        (
            b"{\"op\":\"detach\",\"volume\":\"v\",\"force\":\"yes\"}\n",
            "\"ok\":false",
        ),
        (
            b"{\"op\":\"attach\",\"volume\":\"v\",\"index\":3}\n",
            "\"ok\":false",
        ),
        (b"{\"op\":\"detach\",\"volu", "\"ok\":false"),
    ] {
        let reply = ask(line);
        assert!(
            reply.contains(want),
            "{}: {reply}",
            String::from_utf8_lossy(line)
        );
    }
    assert!(fx.cli(&["status"]).status.success());
    assert_eq!(d.stop(), 0);
}
