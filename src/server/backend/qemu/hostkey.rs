//! A VM's ssh host key, made by the server for each restore or boot it configures: clones of one snapshot must
//! not share host keys, and a key made here costs the guest nothing (`ssh-keygen` in a guest is a few hundred
//! milliseconds of CPU under TCG, on the path to ready). The private half goes to the guest over its agent
//! socket (0600, in the VM's 0700 run dir) and is not kept; the public half is what laptops check against.

use base64::Engine;
use ed25519_dalek::SigningKey;

/// An ed25519 host key in OpenSSH's formats.
pub struct HostKey {
    signing: SigningKey,
}

impl HostKey {
    pub fn generate() -> Self {
        HostKey {
            signing: SigningKey::from_bytes(&rand::random::<[u8; 32]>()),
        }
    }

    fn public_blob(&self) -> Vec<u8> {
        let mut blob = Vec::new();
        put_string(&mut blob, b"ssh-ed25519");
        put_string(&mut blob, self.signing.verifying_key().as_bytes());
        blob
    }

    /// `ssh-ed25519 AAAA…` (the known_hosts / .pub form, without a comment).
    pub fn public_line(&self) -> String {
        format!(
            "ssh-ed25519 {}",
            base64::engine::general_purpose::STANDARD.encode(self.public_blob())
        )
    }

    /// The private key file, unencrypted, as `ssh-keygen` writes it (PROTOCOL.key: `openssh-key-v1`).
    pub fn private_pem(&self, comment: &str) -> String {
        let public = self.signing.verifying_key();
        let check: u32 = rand::random();
        let mut private = Vec::new();
        private.extend_from_slice(&check.to_be_bytes());
        private.extend_from_slice(&check.to_be_bytes());
        put_string(&mut private, b"ssh-ed25519");
        put_string(&mut private, public.as_bytes());
        let mut pair = self.signing.to_bytes().to_vec();
        pair.extend_from_slice(public.as_bytes());
        put_string(&mut private, &pair);
        put_string(&mut private, comment.as_bytes());
        let mut pad = 1u8;
        while private.len() % 8 != 0 {
            private.push(pad);
            pad += 1;
        }
        let mut body = b"openssh-key-v1\0".to_vec();
        put_string(&mut body, b"none");
        put_string(&mut body, b"none");
        put_string(&mut body, b"");
        body.extend_from_slice(&1u32.to_be_bytes());
        put_string(&mut body, &self.public_blob());
        put_string(&mut body, &private);
        let b64 = base64::engine::general_purpose::STANDARD.encode(body);
        let mut pem = String::from("-----BEGIN OPENSSH PRIVATE KEY-----\n");
        for chunk in b64.as_bytes().chunks(70) {
            pem.push_str(&String::from_utf8_lossy(chunk));
            pem.push('\n');
        }
        pem.push_str("-----END OPENSSH PRIVATE KEY-----\n");
        pem
    }
}

impl HostKey {
    /// The private key in dropbear's own file format (`/etc/dropbear/dropbear_ed25519_host_key`, what
    /// `dropbearkey -t ed25519` writes): the key type, then the 32-byte seed and the 32-byte public key.
    pub fn dropbear_private(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_string(&mut out, b"ssh-ed25519");
        let mut pair = self.signing.to_bytes().to_vec();
        pair.extend_from_slice(self.signing.verifying_key().as_bytes());
        put_string(&mut out, &pair);
        out
    }
}

fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_keys_differ_and_have_openssh_shapes() {
        let (a, b) = (HostKey::generate(), HostKey::generate());
        assert_ne!(a.public_line(), b.public_line());
        assert!(a
            .public_line()
            .starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"));
        let pem = a.private_pem("n1");
        assert!(pem.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEA"));
        assert!(pem.ends_with("-----END OPENSSH PRIVATE KEY-----\n"));
    }

    /// `dropbearkey -y` reads the dropbear form and prints the same public key (CI installs dropbear-bin).
    #[test]
    fn dropbearkey_reads_the_dropbear_form() {
        let key = HostKey::generate();
        let dir = std::env::temp_dir().join(format!("fcdev-dbkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("key");
        std::fs::write(&file, key.dropbear_private()).expect("write");
        let out = std::process::Command::new("dropbearkey")
            .arg("-y")
            .arg("-f")
            .arg(&file)
            .output()
            .expect("dropbearkey must be installed (dropbear-bin)");
        let _ = std::fs::remove_dir_all(&dir);
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{printed}");
        let line = printed
            .lines()
            .find(|l| l.starts_with("ssh-ed25519 "))
            .unwrap_or_default();
        assert_eq!(
            line.split(' ').take(2).collect::<Vec<_>>().join(" "),
            key.public_line(),
            "{printed}"
        );
    }

    /// `ssh-keygen -y` reads the private file and prints the same public key (when ssh-keygen is installed;
    /// CI installs openssh-client).
    #[test]
    fn ssh_keygen_reads_the_private_key() {
        let key = HostKey::generate();
        let dir = std::env::temp_dir().join(format!("fcdev-hostkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("key");
        std::fs::write(&file, key.private_pem("test")).expect("write");
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        let out = std::process::Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&file)
            .output()
            .expect("ssh-keygen must be installed (openssh-client)");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            printed
                .trim()
                .split(' ')
                .take(2)
                .collect::<Vec<_>>()
                .join(" "),
            key.public_line()
        );
    }
}
