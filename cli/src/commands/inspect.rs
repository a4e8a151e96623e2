//! `hostcrypt inspect`: a volume header as text or JSON, never a secret.

use hostcryptd::volume::{self, Header, HeaderCopies, HeaderError};
use std::path::Path;

pub fn inspect(path: &Path, json: bool) -> anyhow::Result<()> {
    let copies = volume::read_headers(path)?;
    let header = volume::current_header(path, &copies)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&header_json(path, &header, &copies))?
        );
        return Ok(());
    }
    println!("backing:        {}", path.display());
    println!("uuid:           {}", header.uuid);
    println!("format version: {}", format_version(&header));
    println!("role:           {}", header.role);
    println!("size:           {} bytes", header.size);
    println!("sector size:    {}", header.sector_size);
    println!("data offset:    {}", header.data_offset);
    println!("DEK generation: {}", header.dek_generation);
    match header.reencrypt {
        Some(r) => println!(
            "re-encryption:  to generation {} at byte {}",
            r.target_generation, r.checkpoint
        ),
        None => println!("re-encryption:  none"),
    }
    match &header.owner {
        Some(o) => println!(
            "owner:          daemon {} on {} (generation {}{})",
            o.daemon,
            o.host,
            o.generation,
            if o.released {
                ", released"
            } else {
                ", serving or not stopped cleanly"
            }
        ),
        None => println!("owner:          none recorded"),
    }
    println!(
        "header copies:  primary {}, backup {}",
        copy_state(&copies.primary),
        copy_state(&copies.backup)
    );
    for slot in &header.keyslots {
        println!(
            "keyslot:        generation {}, {} layer, {} ({} wrapped bytes)",
            slot.generation,
            slot.layer,
            slot.wrapped.kek,
            slot.wrapped.blob.len()
        );
    }
    Ok(())
}

/// The format version the header was read as: 3 when authenticated.
fn format_version(header: &Header) -> u16 {
    match (&header.auth, header.inner_cipher) {
        (Some(_), _) => volume::header::FORMAT_VERSION_AUTH,
        (None, volume::InnerCipher::AesXts) => volume::header::FORMAT_VERSION,
        (None, volume::InnerCipher::Adiantum) => volume::header::FORMAT_VERSION_INNER_CIPHER,
    }
}

pub fn copy_state(copy: &Result<Header, HeaderError>) -> String {
    match copy {
        Ok(h) => format!("valid (sequence {})", h.sequence),
        Err(e) => format!("INVALID ({e})"),
    }
}

pub fn header_json(path: &Path, header: &Header, copies: &HeaderCopies) -> serde_json::Value {
    serde_json::json!({
        "backing": path,
        "uuid": header.uuid,
        "format_version": format_version(header),
        "owner": header.owner.as_ref().map(|o| serde_json::json!({
            "daemon": o.daemon,
            "host": o.host,
            "generation": o.generation,
            "released": o.released,
        })),
        "inner_cipher": header.has_inner_layer().then_some(header.inner_cipher),
        "role": header.role,
        "size": header.size,
        "sector_size": header.sector_size,
        "data_offset": header.data_offset,
        "dek_generation": header.dek_generation,
        "reencrypt": header.reencrypt.map(|r| serde_json::json!({
            "checkpoint": r.checkpoint,
            "target_generation": r.target_generation,
        })),
        "header_copies": {
            "primary": copy_state(&copies.primary),
            "backup": copy_state(&copies.backup),
        },
        "keyslots": header.keyslots.iter().map(|k| serde_json::json!({
            "generation": k.generation,
            "layer": k.layer,
            "provider": k.wrapped.kek.provider,
            "key_id": k.wrapped.kek.key_id,
            "key_version": k.wrapped.kek.key_version,
            "wrapped_len": k.wrapped.blob.len(),
        })).collect::<Vec<_>>(),
    })
}
