//! The break-glass path: with the KEK, an operator can unwrap the DEK and
//! decrypt the data area with any standard XTS implementation. Here OpenSSL
//! (aes-256-xts, tweak = sector number little-endian) is the oracle.

use std::process::Command;

use hostcrypt_e2e::*;
use hostcryptd::kek::{KeyProvider, LocalKek};
use hostcryptd::volume;
use openssl::symm::{Cipher, Crypter, Mode};

pub(crate) fn openssl_decrypt_sector(key: &[u8], sector: &[u8], index: u64) -> Vec<u8> {
    let iv = u128::from(index).to_le_bytes();
    let mut c = Crypter::new(Cipher::aes_256_xts(), Mode::Decrypt, key, Some(&iv)).unwrap();
    c.pad(false);
    let mut out = vec![0u8; sector.len() + 16];
    let n = c.update(sector, &mut out).unwrap();
    let m = c.finalize(&mut out[n..]).unwrap();
    out.truncate(n + m);
    out
}

#[test]
fn openssl_decrypts_the_data_area_given_the_dek() {
    require_tool("nbdcopy");
    for sector_size in [512usize, 4096] {
        let mut fx = Fixture::new();
        let backing = fx.volume("bg", "cache", "");
        fx.create("bg", "8M", sector_size as u32);
        let daemon = fx.start();
        let mut data = vec![0u8; 8 << 20];
        getrandom::fill(&mut data).unwrap();
        let input = fx.path("in.bin");
        std::fs::write(&input, &data).unwrap();
        run_ok(Command::new("nbdcopy").arg(&input).arg(fx.uri("bg")));
        assert_eq!(daemon.stop(), 0);

        // Test-only access to the DEK, exactly as an operator holding the KEK would get it.
        let copies = volume::read_headers(&backing).unwrap();
        let header = volume::current_header(&backing, &copies).unwrap();
        let kek = LocalKek::load(&fx.kek).unwrap();
        let dek = kek
            .unwrap(&header.active_keyslot().unwrap().wrapped)
            .unwrap();

        let raw = std::fs::read(&backing).unwrap();
        let area = &raw[header.data_offset as usize..];
        assert_eq!(area.len(), data.len());
        for (i, (ct, pt)) in area
            .chunks(sector_size)
            .zip(data.chunks(sector_size))
            .enumerate()
        {
            assert_ne!(ct, pt);
            assert_eq!(
                openssl_decrypt_sector(dek.expose(), ct, i as u64),
                pt,
                "sector {i} ({sector_size}-byte sectors)"
            );
        }
    }
}
