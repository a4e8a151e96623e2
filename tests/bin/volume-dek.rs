//! Test-only: prints the DEK of a volume with a local KEK, in hex, as an
//! operator holding the KEK would unwrap it for break-glass (cryptsetup
//! `--type plain`). tests/vm/attach.sh hands it to cryptsetup in a guest.
//!   volume-dek BACKING KEK_FILE [OUT]   (OUT: the raw key, mode 0600)

use hostcryptd::kek::{KeyProvider, LocalKek};
use hostcryptd::volume;

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let (backing, kek, out) = match &args[..] {
        [_, backing, kek] => (backing, kek, None),
        [_, backing, kek, out] => (backing, kek, Some(out)),
        _ => return Err("usage: volume-dek BACKING KEK_FILE [OUT]".into()),
    };
    let backing = std::path::Path::new(backing);
    let copies = volume::read_headers(backing).map_err(|e| e.to_string())?;
    let header = volume::current_header(backing, &copies).map_err(|e| e.to_string())?;
    let kek = LocalKek::load(std::path::Path::new(kek)).map_err(|e| e.to_string())?;
    let slot = header.active_keyslot().ok_or("no active keyslot")?;
    let dek = kek.unwrap(&slot.wrapped).map_err(|e| e.to_string())?;
    match out {
        Some(out) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(out)
                .and_then(|mut f| f.write_all(dek.expose()))
                .map_err(|e| format!("{out}: {e}"))?;
        }
        None => println!("{}", hex::encode(dek.expose())),
    }
    Ok(())
}
