//! (d) kill -9 during `hostcrypt reencrypt`: at a random checkpoint. Half
//! the trials hold each window 200 ms between its in-place write and its
//! sync (a debug-build fault hook), so kills land inside windows; the
//! other half run at 32 MB/s, so kills land between windows (unlimited,
//! the 16 MiB volume is done before the first status poll).
//! After the restart the whole volume reads back as written.

use std::process::Command;
use std::time::Duration;

use hostcrypt_e2e::*;

use crate::{both_headers_valid, kill_9, random_u64, trials, Figures};

const SIZE: usize = 16 << 20;

#[test]
fn kill_9_during_reencrypt() {
    require_tool("nbdcopy");
    let mut plain_fx = Fixture::new();
    plain_fx.volume("r", "cache", "");
    let control = format!("control = \"{}\"", plain_fx.path("control.sock").display());
    plain_fx.write_config(&control);
    plain_fx.create("r", "16M", 4096);
    let mut data = vec![0u8; SIZE];
    getrandom::fill(&mut data).expect("getrandom");
    // A hole in the middle: never-written sectors stay zeros under any key.
    data[4 << 20..5 << 20].fill(0);
    let expected = plain_fx.path("expected.bin");
    std::fs::write(&expected, &data).expect("write");
    let d = plain_fx.start();
    run_ok(
        Command::new("nbdcopy")
            .arg(&expected)
            .arg(plain_fx.uri("r")),
    );
    assert_eq!(d.stop(), 0);
    let want = sha256_file(&expected);

    let mut figures = Figures::new("reencrypt");
    for trial in 0..trials() {
        let mut fx_env = Vec::new();
        if trial % 2 == 0 {
            fx_env.push((
                "HOSTCRYPT_TEST_WINDOW_DELAY_MS".to_string(),
                "200".to_string(),
            ));
        }
        plain_fx.env = fx_env;
        let mut d = plain_fx.start();
        let rate = if trial % 2 == 0 { "0" } else { "32" };
        let out = plain_fx.cli(&["reencrypt", "r", "--rate", rate, "--no-wait"]);
        assert!(out.status.success(), "{}", output_text(&out));
        // A window held 200 ms stays 1 MiB (it grows only under 100 ms):
        // a target short of the last window leaves one for the kill.
        let span = if trial % 2 == 0 {
            SIZE - (2 << 20)
        } else {
            SIZE
        };
        let target = random_u64() % span as u64;
        let mut done = false;
        wait_until("a random checkpoint", Duration::from_secs(60), || {
            let out = plain_fx.cli(&["reencrypt", "r", "--status", "--json"]);
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            done = s["state"] == "done" || s["state"] == "idle";
            s["checkpoint"].as_u64().unwrap_or(0) >= target || done
        });
        kill_9(&mut d);
        if done {
            figures.completed += 1;
        }

        plain_fx.env.clear();
        let d = plain_fx.start();
        let out = plain_fx.path("out.bin");
        run_ok(Command::new("nbdcopy").arg(plain_fx.uri("r")).arg(&out));
        // Volumes open after the socket listens: the log is complete only
        // once a client has been served.
        figures.saw_open(&d.stderr());
        assert_eq!(
            sha256_file(&out),
            want,
            "trial {trial}: data differs after kill -9 at checkpoint >= {target}:\n{}",
            d.stderr()
        );
        assert!(both_headers_valid(&plain_fx.path("r.img")));
        assert_eq!(d.stop(), 0);
        figures.trials += 1;
    }
    // The kills inside held windows must have exercised the replay.
    assert!(
        figures.replays > 0 || trials() < 2,
        "no journal replay in {} trials",
        figures.trials
    );
    figures.require(
        "kills that landed before the operation finished",
        figures.trials - figures.completed,
    );
    figures.report();
}
