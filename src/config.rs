//! Laptop-side files: `config.toml` (profiles: server URL, default image and cluster) and `credentials.toml`
//! (API tokens, 0600), both in the config dir (`directories`; `FCDEV_CONFIG_DIR` overrides it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const CONFIG_FILE: &str = "config.toml";
pub const CREDENTIALS_FILE: &str = "credentials.toml";
pub const DEFAULT_PROFILE: &str = "default";
pub const DEFAULT_IMAGE: &str = "tiny";
pub use crate::names::DEFAULT_CLUSTER;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot find a home directory for fcdev's config; set FCDEV_CONFIG_DIR")]
    NoHome,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid TOML ({message}); fix it by hand, or delete it and run `fcdev login` again")]
    Corrupt { path: PathBuf, message: String },
}

/// The config dir (`~/.config/fcdev` on Linux), unless `FCDEV_CONFIG_DIR` says otherwise.
pub fn config_dir() -> Result<PathBuf, ConfigError> {
    if let Some(dir) = std::env::var_os("FCDEV_CONFIG_DIR") {
        return Ok(PathBuf::from(dir));
    }
    directories::ProjectDirs::from("dev", "fcdev", "fcdev")
        .map(|d| d.config_dir().to_path_buf())
        .ok_or(ConfigError::NoHome)
}

/// The data dir (`~/.local/share/fcdev` on Linux), unless `FCDEV_DATA_DIR` says otherwise. The server keeps its
/// SQLite state, images and VM folders here.
pub fn data_dir() -> Result<PathBuf, ConfigError> {
    if let Some(dir) = std::env::var_os("FCDEV_DATA_DIR") {
        return Ok(PathBuf::from(dir));
    }
    directories::ProjectDirs::from("dev", "fcdev", "fcdev")
        .map(|d| d.data_dir().to_path_buf())
        .ok_or(ConfigError::NoHome)
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Config {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_profile: Option<String>,
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Profile {
    /// The fcdev server's API URL, e.g. `http://127.0.0.1:7070`.
    pub server: String,
    /// The image `fcdev up` uses when `--image` is not given.
    #[serde(default = "default_image")]
    pub image: String,
    /// The cluster name `fcdev up/status/reset/down` use when `--name` is not given.
    #[serde(default = "default_cluster")]
    pub cluster: String,
}

fn default_image() -> String {
    DEFAULT_IMAGE.to_string()
}
fn default_cluster() -> String {
    DEFAULT_CLUSTER.to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Credentials {
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileCredentials>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProfileCredentials {
    pub token: String,
}

const CONFIG_HEADER: &str = "\
# fcdev client configuration (written by `fcdev login`; safe to edit).
#
# default_profile = \"default\"     # the profile used when --profile is not given
#
# [profiles.NAME]
# server  = \"http://HOST:7070\"    # the fcdev server's API URL
# image   = \"tiny\"                # the image `fcdev up` uses without --image (`fcdev images` lists them)
# cluster = \"dev\"                 # the cluster name used without --name
#
# Tokens are not kept here but in credentials.toml beside this file (mode 0600).

";

const CREDENTIALS_HEADER: &str = "\
# fcdev API tokens, one per profile (written by `fcdev login`). Keep this file private (mode 0600).

";

fn read_toml<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> Result<T, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| ConfigError::Corrupt {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Write a file atomically (temp file + rename) with the given mode, so a crash never leaves half a file.
pub fn write_private(path: &Path, contents: &str, mode: u32) -> Result<(), ConfigError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| ConfigError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    // The mode given to open() is filtered by the umask; set it exactly.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(())
}

pub use crate::sys::create_private_dir;

/// Both files of one config dir.
#[derive(Debug, Clone)]
pub struct Store {
    pub dir: PathBuf,
}

impl Store {
    pub fn open() -> Result<Store, ConfigError> {
        Ok(Store { dir: config_dir()? })
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    pub fn credentials_path(&self) -> PathBuf {
        self.dir.join(CREDENTIALS_FILE)
    }

    /// The folder of this machine's private keys (WireGuard, ssh).
    pub fn keys_dir(&self) -> PathBuf {
        self.dir.join("keys")
    }

    /// The keys folder, created (or tightened, when an earlier version left it 0755) private to its owner (0700).
    pub fn ensure_keys_dir(&self) -> Result<PathBuf, ConfigError> {
        let dir = self.keys_dir();
        create_private_dir(&dir).map_err(|source| ConfigError::Write {
            path: dir.clone(),
            source,
        })?;
        Ok(dir)
    }

    /// The WireGuard private key of a profile (0600; generated on this machine, never sent anywhere).
    pub fn key_path(&self, profile: &str) -> PathBuf {
        self.keys_dir().join(format!("{profile}.key"))
    }

    pub fn load_config(&self) -> Result<Config, ConfigError> {
        read_toml(&self.config_path())
    }

    pub fn save_config(&self, config: &Config) -> Result<(), ConfigError> {
        let body = toml::to_string_pretty(config).map_err(|e| ConfigError::Corrupt {
            path: self.config_path(),
            message: e.to_string(),
        })?;
        write_private(
            &self.config_path(),
            &format!("{CONFIG_HEADER}{body}"),
            0o644,
        )
    }

    pub fn load_credentials(&self) -> Result<Credentials, ConfigError> {
        read_toml(&self.credentials_path())
    }

    pub fn save_credentials(&self, creds: &Credentials) -> Result<(), ConfigError> {
        let body = toml::to_string_pretty(creds).map_err(|e| ConfigError::Corrupt {
            path: self.credentials_path(),
            message: e.to_string(),
        })?;
        write_private(
            &self.credentials_path(),
            &format!("{CREDENTIALS_HEADER}{body}"),
            0o600,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store {
            dir: dir.path().to_path_buf(),
        };
        let mut config = Config::default();
        config.profiles.insert(
            "default".into(),
            Profile {
                server: "http://127.0.0.1:7070".into(),
                image: "tiny".into(),
                cluster: "dev".into(),
            },
        );
        store.save_config(&config).unwrap();
        assert_eq!(store.load_config().unwrap(), config);
        let mut creds = Credentials::default();
        creds.profiles.insert(
            "default".into(),
            ProfileCredentials {
                token: "fcd_x".into(),
            },
        );
        store.save_credentials(&creds).unwrap();
        let mode = std::fs::metadata(store.credentials_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(store.load_credentials().unwrap(), creds);
    }

    #[test]
    fn corrupt_file_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store {
            dir: dir.path().to_path_buf(),
        };
        std::fs::write(store.config_path(), "profiles = [[[").unwrap();
        let err = store.load_config().unwrap_err().to_string();
        assert!(err.contains("config.toml"), "{err}");
        assert!(err.contains("fcdev login"), "{err}");
    }
}
