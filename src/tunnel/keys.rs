//! x25519 key pairs, base64 like `wg genkey` / `wg pubkey`, and the private key file (mode 0600).

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::RngCore;
use x25519_dalek as x25519;

use super::TunnelError;

/// A WireGuard private key. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct PrivateKey(x25519::StaticSecret);

/// A WireGuard public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

fn decode32(s: &str) -> Result<[u8; 32], TunnelError> {
    let bytes = STANDARD
        .decode(s.trim())
        .map_err(|e| TunnelError::InvalidKey(format!("not base64: {e}")))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| TunnelError::InvalidKey(format!("{} bytes, want 32", bytes.len())))
}

impl PrivateKey {
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        // Clamp like `wg genkey` so the file is byte-identical to what wg would print.
        bytes[0] &= 248;
        bytes[31] = (bytes[31] & 127) | 64;
        PrivateKey(x25519::StaticSecret::from(bytes))
    }

    pub fn from_base64(s: &str) -> Result<Self, TunnelError> {
        Ok(PrivateKey(x25519::StaticSecret::from(decode32(s)?)))
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.to_bytes())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PrivateKey(x25519::StaticSecret::from(bytes))
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.0).to_bytes())
    }

    /// Loads a key file written by [`PrivateKey::save`] (or `wg genkey`). A file readable by group or others
    /// is refused: the key may have leaked.
    pub fn load(path: &Path) -> Result<Self, TunnelError> {
        let err = |source| TunnelError::KeyFile {
            path: path.to_path_buf(),
            source,
        };
        let mode = fs::metadata(path).map_err(err)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TunnelError::KeyPermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(err)?;
        Self::from_base64(&text)
    }

    /// Writes the key (base64 and a newline) with mode 0600, creating parent directories (0700).
    pub fn save(&self, path: &Path) -> Result<(), TunnelError> {
        let err = |source| TunnelError::KeyFile {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(err)?;
            }
        }
        let tmp = path.with_extension("tmp");
        let _ = fs::remove_file(&tmp);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        file.write_all(format!("{}\n", self.to_base64()).as_bytes())
            .map_err(err)?;
        file.sync_all().map_err(err)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(err)?;
        fs::rename(&tmp, path).map_err(err)
    }

    /// Loads the key at `path`, or generates and saves a new one when there is none.
    pub fn load_or_generate(path: &Path) -> Result<Self, TunnelError> {
        if path.exists() {
            Self::load(path)
        } else {
            let key = Self::generate();
            key.save(path)?;
            Ok(key)
        }
    }
}

/// The base64 public key of the private key stored in `path` (used by `fcdev down` to find this machine's
/// peer); a loosely-permissioned file is refused like in [`PrivateKey::load`].
pub fn public_key_of_file(path: &Path) -> std::io::Result<String> {
    PrivateKey::load(path)
        .map(|k| k.public_key().to_base64())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// The well-known blacklist of Curve25519 points of small order (libsodium, WireGuard): 0, 1, the two points
/// of order 8, p-1, p, p+1, the order-8 points + p, 2p-1, 2p, 2p+1 (little-endian, as sent on the wire).
const LOW_ORDER: [[u8; 32]; 12] = [
    hex32("0000000000000000000000000000000000000000000000000000000000000000"),
    hex32("0100000000000000000000000000000000000000000000000000000000000000"),
    hex32("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    hex32("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    hex32("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    hex32("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    hex32("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    hex32("cdeb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b880"),
    hex32("4c9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f11d7"),
    hex32("d9ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"),
    hex32("daffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"),
    hex32("dbffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"),
];

const fn hex32(s: &str) -> [u8; 32] {
    const fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not hex"),
        }
    }
    let b = s.as_bytes();
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = nibble(b[2 * i]) << 4 | nibble(b[2 * i + 1]);
        i += 1;
    }
    out
}

impl PublicKey {
    /// A key the hub may accept: 32 bytes of base64 that are not a point of small order.
    pub fn from_base64(s: &str) -> Result<Self, TunnelError> {
        let key = PublicKey(decode32(s)?);
        key.check_not_low_order()?;
        Ok(key)
    }

    /// True for a point of small order in any encoding. Diffie-Hellman with such a point gives a fixed,
    /// publicly known result (all zeros), so a handshake "authenticated" by it needs no private key: the
    /// hub must never accept one. Besides the blacklist, every encoding x25519 decodes to a small-order
    /// point (the top bit is ignored, values are reduced mod p) is caught by the Diffie-Hellman itself:
    /// with a clamped scalar (a multiple of the cofactor 8) the result is all zeros exactly then.
    pub fn is_low_order(&self) -> bool {
        if LOW_ORDER.contains(&self.0) {
            return true;
        }
        let probe = x25519::StaticSecret::from([0x5a; 32]);
        !probe
            .diffie_hellman(&x25519::PublicKey::from(self.0))
            .was_contributory()
    }

    pub fn check_not_low_order(&self) -> Result<(), TunnelError> {
        if self.is_low_order() {
            Err(TunnelError::InvalidKey(
                "a point of small order (no private key needed to handshake with it)".into(),
            ))
        } else {
            Ok(())
        }
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip_and_public_key() {
        let k = PrivateKey::generate();
        let again = PrivateKey::from_base64(&k.to_base64()).unwrap();
        assert_eq!(k.public_key(), again.public_key());
        assert_eq!(k.to_base64().len(), 44);
        assert!(PrivateKey::from_base64("abc").is_err());
        assert!(!format!("{k:?}").contains(&k.to_base64()));
    }

    #[test]
    fn small_order_points_are_refused_in_every_encoding() {
        for bad in LOW_ORDER {
            let mut with_top_bit = bad;
            with_top_bit[31] |= 0x80;
            for bytes in [bad, with_top_bit] {
                assert!(
                    PublicKey(bytes).is_low_order(),
                    "{}",
                    STANDARD.encode(bytes)
                );
                assert!(PublicKey::from_base64(&STANDARD.encode(bytes)).is_err());
            }
        }
        assert!(PublicKey::from_base64("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").is_err());
        for _ in 0..100 {
            let k = PrivateKey::generate().public_key();
            assert!(!k.is_low_order());
            assert_eq!(PublicKey::from_base64(&k.to_base64()).unwrap(), k);
        }
    }

    #[test]
    fn matches_wg_pubkey_vector() {
        // `echo <priv> | wg pubkey`
        let k = PrivateKey::from_base64("GHuMYVcPQiFCCwZkwgGgsmN1ebKxdmVXcVP9tAkrX0o=").unwrap();
        assert_eq!(
            k.public_key().to_base64(),
            "qlAeJZXqgBBVxUipFfs+GRH7YFyoijVj5vHE17CrryM="
        );
    }

    #[test]
    fn file_is_0600_and_loose_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("fcdev-keys-{}", std::process::id()));
        let path = dir.join("keys/default.key");
        let k = PrivateKey::load_or_generate(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            PrivateKey::load(&path).unwrap().public_key(),
            k.public_key()
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            PrivateKey::load(&path),
            Err(TunnelError::KeyPermissions { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
