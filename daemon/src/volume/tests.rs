//! Unit tests of `volume/mod.rs`, in a file of their own to keep that one short.

use super::*;
use crate::kek::LocalKek;
use std::os::unix::fs::FileExt;

fn records(dir: &Path) -> Records {
    Records::new(&dir.join("state"))
}

/// A fresh cache volume `v` at `dir/v.img`, its record under `dir`.
fn created_v(dir: &Path, kek: &LocalKek) -> (Records, PathBuf) {
    let records = records(dir);
    let path = dir.join("v.img");
    create(
        &path,
        geometry(),
        kek,
        None,
        false,
        Some(&records.volume("v")),
    )
    .unwrap();
    (records, path)
}

fn geometry() -> Geometry {
    Geometry {
        size: 16 * 4096,
        sector_size: 4096,
    }
}

/// The backing's first MiB and data area, to prove a refusal wrote nothing.
fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn header_of(path: &Path) -> Header {
    current_header(path, &read_headers(path).unwrap()).unwrap()
}

/// A refusal that names the volume and leaves the backing as it was.
fn refused(path: &Path, kek: &dyn KeyProvider, records: &Records, what: &str) -> VolumeError {
    let before = bytes(path);
    let err = open_cache(
        "v",
        path,
        None,
        kek,
        None,
        &IoSetup::default(),
        records,
        &Claimant::local(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("\"v\""), "the error names the volume: {text}");
    assert!(text.contains(what), "expected {what:?}: {text}");
    assert!(bytes(path) == before, "a refused open wrote to the backing");
    err
}

/// Starts a re-encryption by hand, as `reencrypt.rs` does: pin, seal
/// with both generations' keys, write, record. Returns the keys and
/// the new DEK.
fn start_reencryption(
    path: &Path,
    kek: &dyn KeyProvider,
    records: &Records,
) -> (Header, HeaderKeys, Dek) {
    let (volume, mut header, mut keys) = open_cache(
        "v",
        path,
        None,
        kek,
        None,
        &IoSetup::default(),
        records,
        &Claimant::local(),
    )
    .unwrap();
    drop(volume);
    let backing = Backing::open(path).unwrap();
    let new_dek = Dek::generate().unwrap();
    header.keyslots.push(Keyslot {
        generation: 2,
        layer: Layer::Outer,
        wrapped: kek.wrap(&new_dek).unwrap(),
    });
    header.reencrypt = Some(header::Reencrypt {
        checkpoint: 0,
        target_generation: 2,
    });
    let target = GenerationKeys::derive(header.uuid, 2, &new_dek, None);
    let record = records.volume("v");
    record
        .pin_target(&header_of(path), 2, target.key_check)
        .unwrap();
    keys.target = Some(target);
    store::write_header(&backing, &mut header, &keys).unwrap();
    record.save(&header).unwrap();
    (header, keys, new_dek)
}

/// A crash in the middle of a window's in-place write, made by hand:
/// the hash journal records the window's old ciphertext, half of its
/// sectors already hold the new. Opening finishes the window (only the
/// old half is re-encrypted), moves the checkpoint past it, and every
/// sector reads back as written; holes stay holes.
#[test]
fn hash_journal_replay_finishes_a_torn_window() {
    let dir = tempfile::tempdir().unwrap();
    let kek = LocalKek::init(&dir.path().join("kek.key")).unwrap();
    let records = records(dir.path());
    let path = dir.path().join("v.img");
    let sector = 4096usize;
    let created = create(&path, geometry(), &kek, None, false, None).unwrap();
    let old_dek = kek
        .unwrap(&created.active_slot(Layer::Outer).unwrap().wrapped)
        .unwrap();
    let old = VolumeCipher::new(&old_dek, None, InnerCipher::AesXts, sector);

    // Sectors 0..8 hold data under the old key, 8..10 are holes.
    let mut plain = vec![0u8; 10 * sector];
    getrandom::fill(&mut plain[..8 * sector]).unwrap();
    let mut disk = plain.clone();
    old.encrypt(&mut disk[..8 * sector], 0);
    Backing::open(&path)
        .unwrap()
        .write_at(&disk, created.data_offset)
        .unwrap();

    // Re-encryption of the window 0..10 sectors began: journal, then
    // sectors 0..4 rewritten in place, then the crash.
    let (header, keys, new_dek) = start_reencryption(&path, &kek, &records);
    let new = VolumeCipher::new(&new_dek, None, InnerCipher::AesXts, sector);
    let backing = Backing::open(&path).unwrap();
    journal::prepare(&backing).unwrap();
    let hashes: Vec<[u8; 32]> = disk
        .chunks_exact(sector)
        .map(journal::sector_hash)
        .collect();
    let key = journal::JournalKey {
        uuid: header.uuid,
        checkpoint: 0,
        target_generation: 2,
    };
    let mac_key = keys.current.journal_key();
    journal::write_hashes(&backing, key, &mac_key, sector as u32, &hashes).unwrap();
    let mut half = disk[..4 * sector].to_vec();
    old.decrypt(&mut half, 0);
    new.encrypt(&mut half, 0);
    backing.write_at(&half, header.data_offset).unwrap();
    drop(backing);

    let (volume, opened, _) = open_cache(
        "v",
        &path,
        None,
        &kek,
        None,
        &IoSetup::default(),
        &records,
        &Claimant::local(),
    )
    .unwrap();
    let r = opened
        .reencrypt
        .expect("still re-encrypting past the window");
    assert_eq!(r.checkpoint, 10 * sector as u64);
    let got = volume.data.read(0, 10 * sector).unwrap();
    assert!(got[..] == plain[..], "data differs after the replay");
    // On disk: the whole window under the new key, holes untouched.
    let mut raw = vec![0u8; 10 * sector];
    Backing::open_read_only(&path)
        .unwrap()
        .read_at(&mut raw, opened.data_offset)
        .unwrap();
    assert!(raw[8 * sector..].iter().all(|&b| b == 0));
    let mut expect = plain[..8 * sector].to_vec();
    new.encrypt(&mut expect, 0);
    assert!(raw[..8 * sector] == expect[..]);
}

/// Attack 1: a writer of the backing who can wrap a DEK of their own
/// (an RSA KEK's public part; here the local KEK stands in for it)
/// adds a target keyslot and marks a re-encryption in progress. Every
/// variant is refused, naming the volume, and nothing is written: the
/// old MAC does not cover the change; resealing with the attacker's own
/// key fails the key check; sealing everything under the attacker's
/// DEK passes the MAC but not the record; dropping the MAC is a
/// downgrade, and without a record an unauthenticated re-encryption.
#[test]
fn a_forged_reencryption_target_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kek = LocalKek::init(&dir.path().join("kek.key")).unwrap();
    let (records, path) = created_v(dir.path(), &kek);
    open_cache(
        "v",
        &path,
        None,
        &kek,
        None,
        &IoSetup::default(),
        &records,
        &Claimant::local(),
    )
    .unwrap();
    let genuine = header_of(&path);
    let mine = Dek::generate().unwrap();
    let mut forged = genuine.clone();
    forged.keyslots.push(Keyslot {
        generation: 2,
        layer: Layer::Outer,
        wrapped: kek.wrap(&mine).unwrap(),
    });
    forged.reencrypt = Some(header::Reencrypt {
        checkpoint: 0,
        target_generation: 2,
    });
    let my_target = GenerationKeys::derive(genuine.uuid, 2, &mine, None);
    forged.auth.as_mut().unwrap().target_key_check = Some(my_target.key_check);
    let backing = Backing::open(&path).unwrap();
    store::write_as_is(&backing, &mut forged.clone()).unwrap();
    drop(backing);
    // The record refuses it first; without one, the MAC does.
    let fresh = Records::new(&dir.path().join("empty"));
    refused(&path, &kek, &records, "not started by this daemon");
    refused(&path, &kek, &fresh, "MAC does not verify");

    // Everything sealed under the attacker's own DEK, as current.
    let mut whole = forged.clone();
    whole.keyslots = vec![Keyslot {
        generation: 1,
        layer: Layer::Outer,
        wrapped: kek.wrap(&mine).unwrap(),
    }];
    whole.reencrypt = None;
    let my_keys = HeaderKeys {
        current: GenerationKeys::derive(genuine.uuid, 1, &mine, None),
        target: None,
    };
    let backing = Backing::open(&path).unwrap();
    store::write_header(&backing, &mut whole, &my_keys).unwrap();
    drop(backing);
    refused(&path, &kek, &records, "another data key than recorded");

    let backing = Backing::open(&path).unwrap();
    store::write_legacy(&backing, &mut forged.clone()).unwrap();
    drop(backing);
    refused(&path, &kek, &records, "downgrade");
    refused(&path, &kek, &fresh, "re-encryption in progress");
}

/// Attack 2: a header saved before a rekey (same generation, older
/// sequence) and one saved before a re-encryption finished (older
/// generation) are written back: both are refused as rollbacks.
#[test]
fn a_rolled_back_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kek = LocalKek::init(&dir.path().join("kek.key")).unwrap();
    let other = LocalKek::init(&dir.path().join("other.key")).unwrap();
    let (records, path) = created_v(dir.path(), &kek);
    let saved = bytes(&path)[..DATA_OFFSET as usize].to_vec();
    let (volume, header, keys) = open_cache(
        "v",
        &path,
        None,
        &kek,
        None,
        &IoSetup::default(),
        &records,
        &Claimant::local(),
    )
    .unwrap();
    let layer_kek = |name: &str, provider: LocalKek| LayerKek {
        name: name.into(),
        provider: std::sync::Arc::new(provider),
    };
    let vk = VolumeKeys::new(
        &path,
        &volume,
        header,
        keys,
        records.volume("v"),
        layer_kek("main", LocalKek::load(&dir.path().join("kek.key")).unwrap()),
        None,
        KeyPolicy {
            on_key_loss: OnKeyLoss::Stop,
            on_key_unreachable: OnKeyUnreachable::Serve,
            unreachable_grace: std::time::Duration::from_secs(1),
            auto_rotate: false,
            check_interval: std::time::Duration::from_secs(1),
        },
        crate::kek::audit::AuditLog::disabled(),
    );
    vk.rekey(Layer::Outer, layer_kek("other", other), None)
        .unwrap();
    drop(vk);
    drop(volume);
    let other = LocalKek::load(&dir.path().join("other.key")).unwrap();
    open_cache(
        "v",
        &path,
        None,
        &other,
        None,
        &IoSetup::default(),
        &records,
        &Claimant::local(),
    )
    .unwrap();
    let rekeyed = bytes(&path)[..DATA_OFFSET as usize].to_vec();
    // The old header still unwraps with the old KEK, and its MAC holds.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&saved, 0)
        .unwrap();
    refused(&path, &kek, &records, "a rollback");

    // Across generations: back to the rekeyed header, re-encrypt to
    // generation 2 and finish; then the generation-1 header again.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&rekeyed, 0)
        .unwrap();
    let (mut header, mut keys, _) = start_reencryption(&path, &other, &records);
    header.advance_reencrypt(header.size);
    let backing = Backing::open(&path).unwrap();
    store::write_header(&backing, &mut header, &keys).unwrap();
    keys.advance(&header);
    records.volume("v").save(&header).unwrap();
    drop(backing);
    open_cache(
        "v",
        &path,
        None,
        &other,
        None,
        &IoSetup::default(),
        &records,
        &Claimant::local(),
    )
    .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&rekeyed, 0)
        .unwrap();
    refused(
        &path,
        &other,
        &records,
        "generation 1 is older than the recorded 2",
    );
}

/// Attack 3: the keyslot of another volume under the same KEK is
/// pasted into this header: its DEK unwraps, but it fails this
/// header's key check (bound to this volume's UUID and generation).
#[test]
fn another_volumes_keyslot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kek = LocalKek::init(&dir.path().join("kek.key")).unwrap();
    let (records, path) = created_v(dir.path(), &kek);
    let theirs = create(
        &dir.path().join("w.img"),
        geometry(),
        &kek,
        None,
        false,
        Some(&records.volume("w")),
    )
    .unwrap();
    let mut pasted = header_of(&path);
    pasted.keyslots[0] = theirs.keyslots[0].clone();
    let backing = Backing::open(&path).unwrap();
    store::write_as_is(&backing, &mut pasted).unwrap();
    drop(backing);
    // Without a record too: the key check alone refuses it.
    refused(
        &path,
        &kek,
        &Records::new(&dir.path().join("empty")),
        "not this volume's",
    );
    refused(&path, &kek, &records, "not this volume's");
}

/// Attack 4: a journal record for the header's window, forged under a
/// key of the attacker's choosing, or in the old unauthenticated
/// format: refused before any sector or the checkpoint moves.
#[test]
fn a_forged_journal_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kek = LocalKek::init(&dir.path().join("kek.key")).unwrap();
    let (records, path) = created_v(dir.path(), &kek);
    let (header, _, _) = start_reencryption(&path, &kek, &records);
    let backing = Backing::open(&path).unwrap();
    journal::prepare(&backing).unwrap();
    let key = journal::JournalKey {
        uuid: header.uuid,
        checkpoint: 0,
        target_generation: 2,
    };
    // Claims the whole data area: every sector would change key.
    journal::write_hashes(&backing, key, &[0x66; 32], 4096, &[[0; 32]; 16]).unwrap();
    drop(backing);
    let err = refused(&path, &kek, &records, "MAC that does not verify");
    assert!(matches!(err, VolumeError::Journal { .. }));
}

/// Attack 5: a version-1 header is upgraded in place at open (MAC,
/// record); writing the old header back is then refused as a
/// downgrade. A crash inside the upgrade (new primary, old backup)
/// opens on the new copy.
#[test]
fn a_version_1_header_is_upgraded_and_cannot_be_downgraded() {
    let dir = tempfile::tempdir().unwrap();
    let kek = LocalKek::init(&dir.path().join("kek.key")).unwrap();
    let records = records(dir.path());
    let path = dir.path().join("v.img");
    let mut old = create(&path, geometry(), &kek, None, false, None).unwrap();
    let backing = Backing::open(&path).unwrap();
    store::write_legacy(&backing, &mut old).unwrap();
    drop(backing);
    let legacy = bytes(&path)[..DATA_OFFSET as usize].to_vec();
    assert_eq!(u16::from_le_bytes([legacy[8], legacy[9]]), 1);

    let (_, upgraded, _) = open_cache(
        "v",
        &path,
        None,
        &kek,
        None,
        &IoSetup::default(),
        &records,
        &Claimant::local(),
    )
    .unwrap();
    assert!(upgraded.auth.is_some());
    let raw = bytes(&path);
    for at in [PRIMARY_AT, BACKUP_AT] {
        let at = at as usize;
        assert_eq!(u16::from_le_bytes([raw[at + 8], raw[at + 9]]), 3);
    }
    assert!(records.volume("v").load().unwrap().is_some());

    // Torn upgrade: the old backup copy comes back; the new primary wins.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&legacy[..header::HEADER_SIZE], BACKUP_AT)
        .unwrap();
    open_cache(
        "v",
        &path,
        None,
        &kek,
        None,
        &IoSetup::default(),
        &records,
        &Claimant::local(),
    )
    .unwrap();

    f.write_all_at(&legacy, 0).unwrap();
    drop(f);
    refused(&path, &kek, &records, "downgrade");
}

/// One owner per backing: while a volume is open, `create --force`, a
/// second open (another daemon, a reload's re-add), a temp volume on
/// the same path, erase and restore are refused before they write a
/// byte; reading the header still works. Once it closes, they work.
#[test]
fn an_open_volume_keeps_every_other_writer_off_its_backing() {
    let dir = tempfile::tempdir().unwrap();
    let kek = LocalKek::init(&dir.path().join("kek.key")).unwrap();
    let path = dir.path().join("v.img");
    let geometry = Geometry {
        size: 1 << 20,
        sector_size: 4096,
    };
    let records = records(dir.path());
    let created = create(&path, geometry, &kek, None, false, None).unwrap();
    let (volume, _, _) = open_cache(
        "v",
        &path,
        None,
        &kek,
        None,
        &IoSetup::default(),
        &records,
        &Claimant::local(),
    )
    .unwrap();
    let busy = |e: VolumeError| match e {
        VolumeError::Io { source, .. } => {
            assert_eq!(source.kind(), std::io::ErrorKind::ResourceBusy, "{source}")
        }
        other => panic!("expected a busy backing, got {other}"),
    };
    busy(create(&path, geometry, &kek, None, true, None).unwrap_err());
    busy(
        open_cache(
            "v",
            &path,
            None,
            &kek,
            None,
            &IoSetup::default(),
            &records,
            &Claimant::local(),
        )
        .unwrap_err(),
    );
    busy(
        open_temp(
            "t",
            &path,
            geometry,
            &IoSetup::default(),
            &Claimant::local(),
        )
        .unwrap_err(),
    );
    match backup::erase(&path, false).unwrap_err() {
        backup::BackupError::Volume(e) => busy(e),
        other => panic!("expected a busy backing, got {other}"),
    }
    let header = current_header(&path, &read_headers(&path).unwrap()).unwrap();
    assert_eq!(header.uuid, created.uuid, "nothing was rewritten");
    let dek = kek
        .unwrap(&header.active_slot(Layer::Outer).unwrap().wrapped)
        .unwrap();
    let keys = HeaderKeys {
        current: GenerationKeys::derive(header.uuid, 1, &dek, None),
        target: None,
    };
    match backup::restore(&path, &header, &keys, None, true).unwrap_err() {
        backup::BackupError::Volume(e) => busy(e),
        other => panic!("expected a busy backing, got {other}"),
    }
    drop(volume);
    open_cache(
        "v",
        &path,
        None,
        &kek,
        None,
        &IoSetup::default(),
        &records,
        &Claimant::local(),
    )
    .unwrap();
}

/// A backing shorter than its header says (truncated, or another
/// volume's header pasted onto a smaller file) is refused at open,
/// instead of serving the missing part as zeros.
#[test]
fn a_backing_shorter_than_its_header_says_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kek = LocalKek::init(&dir.path().join("kek.key")).unwrap();
    let path = dir.path().join("v.img");
    let geometry = Geometry {
        size: 1 << 20,
        sector_size: 4096,
    };
    let records = records(dir.path());
    create(&path, geometry, &kek, None, false, None).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(DATA_OFFSET + (1 << 19)).unwrap();
    drop(file);
    match open_cache(
        "v",
        &path,
        None,
        &kek,
        None,
        &IoSetup::default(),
        &records,
        &Claimant::local(),
    ) {
        Err(VolumeError::BackingTooSmall { have, needed, .. }) => {
            assert_eq!(have, DATA_OFFSET + (1 << 19));
            assert_eq!(needed, DATA_OFFSET + (1 << 20));
        }
        other => panic!("expected BackingTooSmall, got {:?}", other.map(|_| ())),
    }
}
