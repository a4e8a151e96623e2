//! Unit tests of `config/mod.rs`, in a file of their own to keep that one short.

use super::*;

const GOOD: &str = r#"
[server]
unix = "/run/hostcrypt/nbd.sock"
tcp  = "127.0.0.1:10809"

[kek.main]
provider = "local"
path = "/etc/hostcrypt/kek.key"

[[volume]]
name = "cache0"
backing = "/var/lib/hostcrypt/cache0.img"
role = "cache"
kek = "main"

[[volume]]
name = "scratch"
backing = "/var/lib/hostcrypt/scratch.img"
role = "temp"
size = "8G"
sector_size = 512
allow_discards = true
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.toml"))
}

#[test]
fn the_example_config_parses_in_the_new_form() {
    let text = include_str!("../../../systemd/hostcryptd.toml");
    let c = parse(text).unwrap();
    assert!(c.legacy_server.is_none());
    assert!(c.migrated_server().is_none());
    assert!(c.nbd.unix.is_some() && c.daemon.control.is_some());
}

#[test]
fn a_server_section_is_split_into_daemon_and_nbd() {
    let legacy = parse(GOOD).unwrap();
    assert!(legacy.legacy_server.is_some());
    let migrated = legacy.migrated_server().unwrap();
    assert!(
        migrated.contains("[nbd]") && !migrated.contains("[daemon]"),
        "{migrated}"
    );
    let new = GOOD.replace(
        "[server]\nunix = \"/run/hostcrypt/nbd.sock\"\ntcp  = \"127.0.0.1:10809\"\n",
        &migrated,
    );
    let c = parse(&new).unwrap();
    assert!(c.legacy_server.is_none());
    assert_eq!(format!("{:?}", c.nbd), format!("{:?}", legacy.nbd));
    assert_eq!(format!("{:?}", c.daemon), format!("{:?}", legacy.daemon));
    // Daemon-wide keys go to [daemon], listener keys to [nbd].
    let both = GOOD.replace(
        "[server]\n",
        "[server]\ncontrol = \"/run/c.sock\"\nmax_handshakes = 3\n",
    );
    let c = parse(&both).unwrap();
    assert_eq!(c.daemon.control.as_deref(), Some(Path::new("/run/c.sock")));
    assert_eq!(c.nbd.max_handshakes, 3);
    let text = c.migrated_server().unwrap();
    assert!(
        text.contains("[daemon]\ncontrol") && text.contains("max_handshakes = 3"),
        "{text}"
    );
}

#[test]
fn server_beside_daemon_or_nbd_is_refused_and_unknown_server_keys_named() {
    for extra in ["[daemon]\n", "[nbd]\n"] {
        let err = parse(&format!("{GOOD}\n{extra}")).unwrap_err().to_string();
        assert!(err.contains("old form of [daemon] and [nbd]"), "{err}");
    }
    let err = parse(&GOOD.replace("[server]\n", "[server]\nbogus = 1\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bogus"), "{err}");
}

#[test]
fn parses_the_documented_example() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.volumes.len(), 2);
    assert_eq!(c.volumes[1].size_bytes(), Some(8 << 30));
    assert_eq!(c.volumes[0].sector_size, 4096);
    assert!(matches!(c.kek["main"], KekConfig::Local { .. }));
}

#[test]
fn ring_idle_poll_defaults_to_50us_and_is_bounded() {
    let with = |value: &str| {
        parse(&GOOD.replace(
            "[server]\n",
            &format!("[server]\nring_idle_poll = {value}\n"),
        ))
    };
    assert_eq!(
        parse(GOOD).unwrap().daemon.ring_idle_poll,
        std::time::Duration::from_micros(50)
    );
    assert_eq!(
        with("\"200us\"").unwrap().daemon.ring_idle_poll,
        std::time::Duration::from_micros(200)
    );
    assert!(with("\"0s\"").unwrap().daemon.ring_idle_poll.is_zero());
    let err = with("\"5ms\"").unwrap_err().to_string();
    assert!(
        err.contains("ring_idle_poll") && err.contains("at most 1ms"),
        "{err}"
    );
    let err = with("\"soon\"").unwrap_err().to_string();
    assert!(err.contains("ring_idle_poll"), "{err}");
}

#[test]
fn kek_inner_must_be_another_defined_kek_on_a_cache_volume() {
    let with_inner = |inner: &str| {
        GOOD.replace(
            "kek = \"main\"\n",
            &format!("kek = \"main\"\nkek_inner = \"{inner}\"\n"),
        )
        .replace(
            "[[volume]]\nname = \"cache0\"",
            "[kek.hsm]\nprovider = \"local\"\npath = \"/etc/hostcrypt/second.key\"\n\n[[volume]]\nname = \"cache0\"",
        )
    };
    let c = parse(&with_inner("hsm")).unwrap();
    assert_eq!(c.volumes[0].kek_inner.as_ref().unwrap().get_ref(), "hsm");
    let err = parse(&with_inner("main")).unwrap_err().to_string();
    assert!(
        err.contains("kek_inner") && err.contains("different KEK"),
        "{err}"
    );
    let err = parse(&with_inner("nope")).unwrap_err().to_string();
    assert!(err.contains("[kek.nope]"), "{err}");
    let temp = GOOD.replace(
        "role = \"temp\"\n",
        "role = \"temp\"\nkek_inner = \"main\"\n",
    );
    let err = parse(&temp).unwrap_err().to_string();
    assert!(err.contains("temp volumes"), "{err}");
}

#[test]
fn tcp_beyond_loopback_needs_tls_require_or_an_explicit_opt_out() {
    let open = GOOD.replace("127.0.0.1:10809", "0.0.0.0:10809");
    let err = parse(&open).unwrap_err().to_string();
    assert!(
        err.contains("0.0.0.0:10809")
            && err.contains("tls = \"require\"")
            && err.contains("insecure_plaintext_tcp = true"),
        "{err}"
    );
    parse(&open.replace("[server]\n", "[server]\ninsecure_plaintext_tcp = true\n")).unwrap();
    let tls = open.replace(
        "[server]\n",
        "[server]\ntls = \"require\"\ntls_certificates = \"/etc/hostcrypt/tls\"\n",
    );
    let c = parse(&tls).unwrap();
    assert!(
        c.nbd.tls_verify_peer,
        "client certificates are required by default"
    );
    let err = parse(&open.replace("[server]\n", "[server]\ntls = \"on\"\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("tls_certificates"), "{err}");
    assert!(parse(&GOOD.replace("127.0.0.1:10809", "localhost:10809")).is_ok());
    assert!(parse(&GOOD.replace("127.0.0.1:10809", "[::1]:10809")).is_ok());
}

#[test]
fn allow_entries_are_checked_with_their_line() {
    let text = GOOD.replace(
        "kek = \"main\"\n",
        "kek = \"main\"\nallow = [\"uid:0\", \"10.0.0.0/40\"]\n",
    );
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("line 15") && err.contains("prefix"), "{err}");
    let ok = text.replace("10.0.0.0/40", "gid:root");
    let c = parse(&ok).unwrap();
    assert_eq!(
        c.volumes[0].allow_list().unwrap().describe(),
        Some(vec!["uid:0".to_string(), "gid:0".to_string()])
    );
}

#[test]
fn unknown_key_names_key_and_line() {
    let text = GOOD.replace("allow_discards = true", "allow_discard = true");
    let err = parse(&text).unwrap_err().to_string();
    assert!(
        err.contains("allow_discard") && err.contains("line 22"),
        "{err}"
    );
}

#[test]
fn bad_values_name_key_and_line() {
    let err = parse(&GOOD.replace("sector_size = 512", "sector_size = 1000"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("512 or 4096") && err.contains("line 21"),
        "{err}"
    );
    let err = parse(&GOOD.replace("kek = \"main\"", "kek = \"nope\""))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 14") && err.contains("[kek.nope]"),
        "{err}"
    );
    let err = parse(&GOOD.replace("size = \"8G\"", "size = \"8X\""))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown unit") && err.contains("line 20"),
        "{err}"
    );
    let err = parse(&GOOD.replace("provider = \"local\"", "provider = \"nope\""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope"), "{err}");
    let err = parse(&GOOD.replace("size = \"8G\"\n", ""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs a size"), "{err}");
}

#[test]
fn take_over_applies_to_remote_backings_only() {
    let local = GOOD.replace(
        "role = \"cache\"\nkek = \"main\"",
        "role = \"cache\"\nkek = \"main\"\ntake_over = true",
    );
    let err = parse(&local).unwrap_err().to_string();
    assert!(err.contains("take_over") && err.contains("remote"), "{err}");
    let remote = local.replace(
        "backing = \"/var/lib/hostcrypt/cache0.img\"",
        "backing = \"nbd://storage1/cache0\"",
    );
    let c = parse(&remote).unwrap();
    assert!(c.volumes[0].take_over());
    assert!(!c.volumes[1].take_over());
}

#[test]
fn vhost_user_keys_are_checked_with_their_line() {
    let with = |keys: &str| GOOD.replace("kek = \"main\"\n", &format!("kek = \"main\"\n{keys}\n"));
    let c = parse(&with(
        "vhost_user = \"/run/hostcrypt/cache0.vhost\"\nvhost_user_queues = 4\nvhost_user_group = \"root\"\nvhost_user_mode = \"0600\"",
    ))
    .unwrap();
    let spec = c.volumes[0].vhost_user_socket().unwrap().unwrap();
    assert_eq!(
        (
            spec.volume.as_str(),
            spec.queues,
            spec.mode,
            spec.group,
            spec.read_only
        ),
        ("cache0", 4, 0o600, Some(0), false)
    );
    assert!(c.volumes[1].vhost_user_socket().is_none());
    // Defaults: 0660, one queue per core, the daemon's group.
    let c = parse(&with("vhost_user = \"/run/v.sock\"")).unwrap();
    let spec = c.volumes[0].vhost_user_socket().unwrap().unwrap();
    assert_eq!((spec.mode, spec.group), (0o660, None));
    assert!((1..=64).contains(&spec.queues));
    for (keys, key) in [
        (
            "vhost_user = \"/run/v.sock\"\nvhost_user_queues = 0",
            "vhost_user_queues",
        ),
        (
            "vhost_user = \"/run/v.sock\"\nvhost_user_queues = 65",
            "vhost_user_queues",
        ),
        (
            "vhost_user = \"/run/v.sock\"\nvhost_user_mode = \"0999\"",
            "vhost_user_mode",
        ),
        (
            "vhost_user = \"/run/v.sock\"\nvhost_user_mode = \"01777\"",
            "vhost_user_mode",
        ),
        (
            "vhost_user = \"/run/v.sock\"\nvhost_user_group = \"no-such-group-here\"",
            "vhost_user_group",
        ),
        ("vhost_user_queues = 2", "vhost_user_queues"),
        ("vhost_user_read_only = true", "vhost_user_read_only"),
        ("vhost_user = \"/run/hostcrypt/nbd.sock\"", "vhost_user"),
    ] {
        let err = parse(&with(keys)).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains("line 1"), "{keys}: {err}");
    }
    // Two volumes cannot share a socket.
    let twice = with("vhost_user = \"/run/v.sock\"").replace(
        "sector_size = 512\n",
        "sector_size = 512\nvhost_user = \"/run/v.sock\"\n",
    );
    let err = parse(&twice).unwrap_err().to_string();
    assert!(err.contains("another socket"), "{err}");
}
