//! Online DEK re-encryption: under a concurrent fio verify workload, with
//! pause/resume/status and the CLI's progress output, and through `kill -9`
//! at 20 random points (each followed by a restart and a full comparison
//! with what was acknowledged).

use std::process::{Command, Stdio};
use std::time::Duration;

use hostcrypt_e2e::*;

/// fio random writes with checksums over the whole 64 MiB volume; the same
/// job with `--verify_only` re-reads and checks what the first run wrote.
const FIO_VERIFY: [&str; 9] = [
    "--name=reencrypt-verify",
    "--ioengine=nbd",
    "--rw=randwrite",
    "--bsrange=4k-128k",
    "--iodepth=8",
    "--size=64M",
    "--verify=crc32c",
    "--verify_fatal=1",
    "--verify_state_save=0",
];

fn status(fx: &Fixture, volume: &str) -> serde_json::Value {
    let out = fx.cli(&["reencrypt", volume, "--status", "--json"]);
    assert!(out.status.success(), "{}", output_text(&out));
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

fn generation(fx: &Fixture, volume: &str) -> u64 {
    let header = inspect_json(&fx.path(&format!("{volume}.img")));
    header["dek_generation"].as_u64().expect("generation")
}

#[test]
fn reencrypt_under_a_fio_verify_workload_with_pause_and_resume() {
    require_tool("fio");
    let mut fx = Fixture::new();
    fx.volume("r", "cache", "");
    fx.write_config(&fx.control_and_audit());
    fx.create("r", "64M", 4096);
    let d = fx.start();

    // Slow enough (1 MB/s: ~64 s for the volume) to overlap the whole fio
    // run; fio writes with checksums and verifies everything at the end.
    let out = fx.cli(&["reencrypt", "r", "--rate", "1", "--no-wait"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let fio = Command::new("fio")
        .args(FIO_VERIFY)
        .arg(format!("--uri={}", fx.uri("r")))
        .arg("--do_verify=1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let fio = fio.wait_with_output().unwrap();
    assert!(
        fio.status.success(),
        "fio verify failed:\n{}",
        output_text(&fio)
    );
    let running = status(&fx, "r");
    assert_eq!(running["state"], "running", "{running}");
    assert!(running["checkpoint"].as_u64() > Some(0), "{running}");

    // Pause, and the operations that must wait for it.
    let paused = fx.cli(&["reencrypt", "r", "--pause", "--json"]);
    let paused: serde_json::Value = serde_json::from_slice(&paused.stdout).unwrap();
    assert_eq!(paused["state"], "paused", "{paused}");
    assert_eq!(paused["target_generation"], 2);
    let out = fx.cli(&["rotate-kek", "r"]);
    assert!(!out.status.success());
    assert!(output_text(&out).contains("re-encryption is in progress"));
    let text = output_text(&fx.cli(&["status"]));
    assert!(text.contains("re-encrypting: r: paused"), "{text}");
    let json = fx.status();
    assert_eq!(json["volumes"][0]["reencrypt"]["state"], "paused", "{json}");

    // Resume, unlimited, and follow it to the end (plain lines: no terminal).
    let out = fx.cli(&["reencrypt", "r", "--resume", "--rate", "0"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("r: done 100.0%"), "{text}");
    assert_eq!(generation(&fx, "r"), 2);
    let header = inspect_json(&fx.path("r.img"));
    assert_eq!(
        header["keyslots"].as_array().map(Vec::len),
        Some(1),
        "{header}"
    );
    assert!(header["reencrypt"].is_null(), "{header}");
    let audit = std::fs::read_to_string(fx.audit_log()).unwrap();
    for outcome in ["\"started\"", "\"paused\"", "\"done\""] {
        assert!(audit.contains(outcome), "{outcome} not audited:\n{audit}");
    }
    assert_eq!(d.stop(), 0);

    // Everything fio wrote still verifies after a restart, under the new key.
    let _d = fx.start();
    run_ok(
        Command::new("fio")
            .args(FIO_VERIFY)
            .arg(format!("--uri={}", fx.uri("r")))
            .arg("--verify_only=1"),
    );
}

/// Every window is held 100 ms between its in-place write and its sync
/// (a debug-build fault hook), so most kills land inside a window and the
/// restart must replay the journal: the test fails if no round replayed.
#[test]
fn reencrypt_survives_kill_9_at_20_random_points() {
    require_tool("nbdcopy");
    let mut fx = Fixture::new();
    fx.env
        .push(("HOSTCRYPT_TEST_WINDOW_DELAY_MS".into(), "100".into()));
    fx.volume("k", "cache", "");
    fx.write_config(&format!(
        "control = \"{}\"",
        fx.path("control.sock").display()
    ));
    const SIZE: usize = 8 << 20;
    fx.create("k", "8M", 512);
    let mut expected = vec![0u8; SIZE];
    getrandom::fill(&mut expected).unwrap();
    let expected_path = fx.path("expected.bin");
    std::fs::write(&expected_path, &expected).unwrap();
    let d = fx.start();
    run_ok(Command::new("nbdcopy").arg(&expected_path).arg(fx.uri("k")));
    assert_eq!(d.stop(), 0);

    let mut random = [0u8; 64];
    getrandom::fill(&mut random).unwrap();
    let mut replays = 0;
    for round in 0..20 {
        let mut d = fx.start();
        // Whatever was interrupted resumed at start; make sure one runs
        // (a new one after a finished one), slowed on odd rounds so kills
        // land both between and inside windows.
        let rate = if round % 2 == 1 { "16" } else { "0" };
        let out = fx.cli(&["reencrypt", "k", "--rate", rate, "--no-wait"]);
        assert!(out.status.success(), "{}", output_text(&out));
        // An acknowledged (flushed) write while it runs.
        let offset = (u64::from(random[round]) * 31 * 1024) % (SIZE as u64 - 4096);
        let byte = random[round + 20] | 1;
        qemu_io(
            &fx.uri("k"),
            &[format!("write -P {byte} {offset} 4k"), "flush".into()],
        );
        expected[offset as usize..offset as usize + 4096].fill(byte);
        // Kill at a random point of the walk.
        let target = (u64::from(random[round + 40]) * SIZE as u64) / 256;
        wait_until("a random checkpoint", Duration::from_secs(30), || {
            let s = status(&fx, "k");
            s["checkpoint"].as_u64().unwrap_or(0) >= target || s["state"] == "done"
        });
        d.child.kill().unwrap();
        d.child.wait().unwrap();
        let killed_log = d.stderr();
        if killed_log.contains("replaying it from the journal") {
            replays += 1;
        }

        // Restart: every acknowledged byte is there.
        let d = fx.start();
        if d.stderr().contains("replaying it from the journal") {
            replays += 1;
        }
        std::fs::write(&expected_path, &expected).unwrap();
        let out_path = fx.path("out.bin");
        run_ok(Command::new("nbdcopy").arg(fx.uri("k")).arg(&out_path));
        let got = std::fs::read(&out_path).unwrap();
        if let Some(first) = (0..SIZE).find(|&i| got[i] != expected[i]) {
            let last = (0..SIZE)
                .rev()
                .find(|&i| got[i] != expected[i])
                .unwrap_or(first);
            panic!(
                "round {round}: data differs after kill -9 at checkpoint >= {target}: \
                 bytes {first}..={last} (this round wrote {offset}..{}); killed daemon's log:\n{killed_log}\nrestarted daemon's log:\n{}",
                offset + 4096,
                d.stderr()
            );
        }
        drop(d);
    }
    // Let the last one finish and check once more.
    let d = fx.start();
    let out = fx.cli(&["reencrypt", "k", "--resume", "--rate", "0"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let out_path = fx.path("out.bin");
    run_ok(Command::new("nbdcopy").arg(fx.uri("k")).arg(&out_path));
    assert_eq!(sha256_file(&out_path), sha256_file(&expected_path));
    assert!(generation(&fx, "k") >= 2);
    eprintln!("journal replays seen: {replays}");
    assert!(
        replays > 0,
        "no kill landed inside a window: the journal replay went untested"
    );
    assert_eq!(d.stop(), 0);
}
