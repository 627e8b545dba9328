//! The catalog of prepared images: one folder per image under `<data>/images/<name>/`, described by `image.toml`.
//!
//! ```toml
//! name = "tiny"
//! description = "busybox + httpd on :80, for tests and demos"
//!
//! [[vm]]
//! name = "n1"            # Press server letters: n = proxy, f = app, m = database
//! role = "proxy"
//! vcpus = 1
//! memory_mb = 256
//! kernel = "vmlinuz"     # paths are relative to the image folder
//! initrd = "initrd.img"
//! disk = "root.qcow2"    # optional base disk; each VM gets a qcow2 overlay on it
//! cmdline = "console=ttyS0 quiet"
//! probe = "tcp:80"       # readiness: tcp:PORT or http:PORT
//!
//! [snapshot]             # optional onboarding snapshot, restored instead of booting
//! dir = "snapshot"
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api;

pub const IMAGE_FILE: &str = "image.toml";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image `{0}` not found")]
    NotFound(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid image.toml: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(rename = "vm")]
    pub vms: Vec<VmTemplate>,
    #[serde(default)]
    pub snapshot: Option<SnapshotSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmTemplate {
    pub name: String,
    #[serde(default)]
    pub role: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mb: u32,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub disk: Option<String>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default = "default_probe")]
    pub probe: String,
    /// VMs of the same cluster whose probe must pass before this VM's probe starts (n1's probe goes through
    /// f1 to m1: asking it earlier only makes the guests work for an answer that cannot be yes yet).
    #[serde(default)]
    pub probe_after: Vec<String>,
    /// A shell command run inside the guest (by the agent) that must succeed before the onboarding snapshot is
    /// taken: the role's service works, not only its port.
    #[serde(default)]
    pub check: Option<String>,
    /// How long one cold boot of this VM may take before it is killed and booted once more (default: the
    /// backend's, 45 s). Images of several systemd guests need more under TCG.
    #[serde(default)]
    pub boot_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotSpec {
    pub dir: String,
    /// One snapshot of the whole cluster (every VM with its own memory, device state and disk layer, all taken
    /// together on a private network) instead of one per VM shape.
    #[serde(default)]
    pub cluster: bool,
}

impl VmTemplate {
    /// A template with defaults and only a name.
    pub fn named(name: &str) -> VmTemplate {
        VmTemplate {
            name: name.to_string(),
            role: String::new(),
            vcpus: default_vcpus(),
            memory_mb: default_memory(),
            kernel: None,
            initrd: None,
            disk: None,
            cmdline: String::new(),
            probe: default_probe(),
            probe_after: Vec::new(),
            check: None,
            boot_secs: None,
        }
    }
}

fn default_vcpus() -> u32 {
    1
}
fn default_memory() -> u32 {
    256
}
fn default_probe() -> String {
    "tcp:80".to_string()
}

/// A loaded image: its spec and the folder it lives in.
#[derive(Debug, Clone)]
pub struct Image {
    pub spec: ImageSpec,
    pub dir: PathBuf,
}

impl Image {
    pub fn load(dir: &Path) -> Result<Image, ImageError> {
        let path = dir.join(IMAGE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ImageError::Read {
            path: path.clone(),
            source,
        })?;
        let spec: ImageSpec = toml::from_str(&text).map_err(|e| ImageError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if spec.vms.is_empty() {
            return Err(ImageError::Invalid {
                path,
                message: "an image needs at least one [[vm]]".into(),
            });
        }
        for vm in &spec.vms {
            if let Some(other) = vm
                .probe_after
                .iter()
                .find(|o| *o == &vm.name || !spec.vms.iter().any(|v| &v.name == *o))
            {
                return Err(ImageError::Invalid {
                    path,
                    message: format!(
                        "vm {}: probe_after names `{other}`, which is not another VM of this image",
                        vm.name
                    ),
                });
            }
        }
        Ok(Image {
            spec,
            dir: dir.to_path_buf(),
        })
    }

    /// A path from image.toml, resolved against the image folder.
    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.join(relative)
    }

    /// The onboarding snapshot folder, when the image has one and it exists on disk.
    pub fn snapshot_dir(&self) -> Option<PathBuf> {
        let dir = self.path(&self.spec.snapshot.as_ref()?.dir);
        dir.is_dir().then_some(dir)
    }

    pub fn info(&self) -> api::ImageInfo {
        api::ImageInfo {
            name: self.spec.name.clone(),
            description: self.spec.description.clone(),
            vms: self
                .spec
                .vms
                .iter()
                .map(|v| api::ImageVm {
                    name: v.name.clone(),
                    role: v.role.clone(),
                    vcpus: v.vcpus,
                    memory_mb: v.memory_mb,
                })
                .collect(),
            has_snapshot: self.snapshot_dir().is_some(),
        }
    }
}

/// All images under one folder.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub root: PathBuf,
}

impl Catalog {
    pub fn new(root: PathBuf) -> Self {
        Catalog { root }
    }

    pub fn get(&self, name: &str) -> Result<Image, ImageError> {
        if !crate::names::is_dns_label(name) {
            return Err(ImageError::NotFound(name.to_string()));
        }
        let dir = self.root.join(name);
        if !dir.join(IMAGE_FILE).is_file() {
            return Err(ImageError::NotFound(name.to_string()));
        }
        Image::load(&dir)
    }

    /// Every loadable image, sorted by name. Broken folders are skipped with a warning.
    pub fn list(&self) -> Vec<Image> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut images: Vec<Image> = entries
            .flatten()
            .filter(|e| e.path().join(IMAGE_FILE).is_file())
            .filter_map(|e| match Image::load(&e.path()) {
                Ok(image) => Some(image),
                Err(err) => {
                    tracing::warn!("skipping image: {err}");
                    None
                }
            })
            .collect();
        images.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        images
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_after_naming_no_other_vm_of_the_image_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let toml = |after: &str| {
            format!("name = \"x\"\n[[vm]]\nname = \"n1\"\nprobe_after = [{after}]\n[[vm]]\nname = \"f1\"\n")
        };
        std::fs::write(dir.path().join(IMAGE_FILE), toml("\"f1\"")).expect("write");
        assert!(Image::load(dir.path()).is_ok());
        for bad in ["\"m9\"", "\"n1\""] {
            std::fs::write(dir.path().join(IMAGE_FILE), toml(bad)).expect("write");
            let Err(err) = Image::load(dir.path()) else {
                panic!("probe_after = [{bad}] was accepted");
            };
            let err = err.to_string();
            assert!(err.contains("probe_after"), "{err}");
        }
    }
}
