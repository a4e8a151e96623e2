//! Unit tests of `export/access.rs`, in a file of their own to keep that one short.

use super::*;

fn unix(uid: u32, gid: u32, groups: Vec<u32>) -> Peer {
    Peer {
        transport: Transport::Unix {
            uid,
            gid,
            pid: None,
            groups,
        },
        dn: None,
    }
}

fn tcp(addr: &str) -> Peer {
    Peer::tcp(addr.parse().unwrap())
}

#[test]
fn parses_nbdkit_ip_filter_entries() {
    assert_eq!(Rule::parse("uid:107"), Ok(Rule::Uid(107)));
    assert_eq!(Rule::parse("gid:root"), Ok(Rule::Gid(0)));
    assert_eq!(
        Rule::parse("dn: cn=vm-17 , O=Example"),
        Ok(Rule::Dn("CN=vm-17,O=Example".into()))
    );
    assert_eq!(
        Rule::parse("10.0.0.0/8"),
        Ok(Rule::Net {
            addr: "10.0.0.0".parse().unwrap(),
            prefix: 8
        })
    );
    assert!(matches!(
        Rule::parse("10.0.0.0/33"),
        Err(RuleError::BadPrefix(_))
    ));
    assert!(matches!(
        Rule::parse("gid:no-such-group-here"),
        Err(RuleError::UnknownGroup(_))
    ));
    assert!(matches!(
        Rule::parse("dn:novalue"),
        Err(RuleError::BadDn(_))
    ));
    assert!(matches!(Rule::parse("hello"), Err(RuleError::Unknown(_))));
}

#[test]
fn matches_by_transport() {
    let list = AllowList::parse(Some(&[
        "uid:107",
        "gid:36",
        "dn:CN=vm-17,O=Example",
        "10.0.0.0/8",
        "::1",
    ]))
    .unwrap();
    assert!(list.permits(&unix(107, 5, vec![])));
    assert!(list.permits(&unix(5, 5, vec![36])));
    assert!(!list.permits(&unix(5, 5, vec![])));
    assert!(list.permits(&tcp("10.9.8.7:1")));
    assert!(list.permits(&tcp("[::ffff:10.9.8.7]:1")));
    assert!(list.permits(&tcp("[::1]:1")));
    assert!(!list.permits(&tcp("11.0.0.1:1")));
    let mut certified = tcp("192.168.0.1:1");
    assert!(!list.permits(&certified));
    certified.dn = Some("CN=vm-17,O=Example".into());
    assert!(list.permits(&certified));
    // uid rules never match a TCP peer, addresses never a Unix peer.
    assert!(!AllowList::parse(Some(&["uid:0"]))
        .unwrap()
        .permits(&tcp("127.0.0.1:1")));
    assert!(!AllowList::parse(Some(&["0.0.0.0/0"]))
        .unwrap()
        .permits(&unix(0, 0, vec![])));
    assert!(AllowList::anyone().permits(&unix(1, 1, vec![])));
    assert!(!AllowList::parse(Some::<&[&str]>(&[]))
        .unwrap()
        .permits(&unix(0, 0, vec![])));
}

/// No list: Unix peers and verified certificates, never a bare TCP
/// address, loopback included (every local user can reach it).
#[test]
fn no_list_never_admits_a_bare_tcp_address() {
    let none = AllowList::parse::<&str>(None).unwrap();
    assert!(none.permits(&unix(65534, 65534, vec![])));
    assert!(!none.permits(&tcp("127.0.0.1:1")));
    assert!(!none.permits(&tcp("[::1]:1")));
    let mut verified = tcp("127.0.0.1:1");
    verified.dn = Some("CN=vm-17,O=Example".into());
    assert!(none.permits(&verified));
    let all = AllowList::parse(Some(&["all"])).unwrap();
    assert!(all.permits(&tcp("127.0.0.1:1")));
}

#[test]
fn only_the_kernel_peer_the_daemon_made_passes_every_list() {
    // The kernel's connections to an attached device pass any list, an
    // empty one included; the same uid over a Unix socket, root, or a
    // TCP peer claiming a certificate subject, do not.
    let none: &[&str] = &[];
    for list in [
        AllowList::parse(Some(none)).unwrap(),
        AllowList::parse(Some(&["uid:4242"])).unwrap(),
    ] {
        assert!(list.permits(&Peer::kernel()));
        assert!(!list.permits(&unix(0, 0, vec![])));
        let mut claims = tcp("127.0.0.1:10809");
        claims.dn = Some("CN=kernel".into());
        assert!(!list.permits(&claims));
    }
}
