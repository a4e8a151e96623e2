//! `hostcrypt attach`: a volume as a kernel block device. This machine's
//! kernel has no nbd module, so the whole check runs in a guest
//! (tests/vm/attach.sh): attach through the kernel's NBD client, a
//! filesystem on /dev/hostcrypt/v, fio with verify while hostcryptd is
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
