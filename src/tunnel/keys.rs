//! x25519 keys, base64 like `wg genkey`/`wg pubkey`.

use std::path::Path;

use base64::Engine;
use boringtun::x25519::{PublicKey, StaticSecret};

/// The base64 public key of the private key stored in `path`.
pub fn public_key_of_file(path: &Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not 32 bytes"))?;
    let secret = StaticSecret::from(arr);
    Ok(base64::engine::general_purpose::STANDARD.encode(PublicKey::from(&secret).as_bytes()))
}
