//! `fcdev image build press`: the Press cluster from Debian bookworm packages only.
//!
//! One base disk for every role (see docs/images.md for why): `debootstrap` with every role's packages, the
//! host's cloud kernel modules, the recipe files of `images/recipes/press/files/` (compiled in) and its
//! `setup.sh`, then `mkfs.ext4 -d` (no loop mount) and `qemu-img convert` to `base.qcow2`. Each VM of the
//! template starts only its role's services (`fcdev-boot` reads `fcdev.role`). The build runs in a temporary
//! folder next to the output and is renamed into place at the end, so a failed or interrupted build never
//! leaves an image `up` would use; an image whose `recipe` file matches the recipe hash is not built again.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::build::{find_kernel, BuildOptions, RECIPE_FILE};
use super::{io_err, BuildError, BuildResult};

/// Debian suite and default mirror (`FCDEV_DEBIAN_MIRROR` overrides it).
pub const SUITE: &str = "bookworm";
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// The size of the root filesystem (sparse; the qcow2 holds only what is used).
const DISK_SIZE: &str = "4G";

pub const IMAGE_TOML: &str = include_str!("../../images/recipes/press/image.toml");

/// The guest agent's sources: the agent is this binary (`fcdev guest-agent`), copied into the image as
/// `/usr/local/sbin/fcdev-agent`; a change to them is a change of the recipe.
const GUEST_AGENT: &[&str] = &[
    include_str!("../guest/mod.rs"),
    include_str!("../guest/configure.rs"),
    include_str!("../guest/netlink.rs"),
];

/// The recipe files copied into the guest, by name (see `images/recipes/press/files/`).
pub const FILES: &[(&str, &str)] = &[
    (
        "packages",
        include_str!("../../images/recipes/press/files/packages"),
    ),
    (
        "setup.sh",
        include_str!("../../images/recipes/press/files/setup.sh"),
    ),
    (
        "fcdev-boot",
        include_str!("../../images/recipes/press/files/fcdev-boot"),
    ),
    (
        "fcdev-boot.service",
        include_str!("../../images/recipes/press/files/fcdev-boot.service"),
    ),
    (
        "fcdev-agent.service",
        include_str!("../../images/recipes/press/files/fcdev-agent.service"),
    ),
    (
        "app.py",
        include_str!("../../images/recipes/press/files/app.py"),
    ),
    (
        "press-app.service",
        include_str!("../../images/recipes/press/files/press-app.service"),
    ),
    (
        "press-seed.service",
        include_str!("../../images/recipes/press/files/press-seed.service"),
    ),
    (
        "seed.sql",
        include_str!("../../images/recipes/press/files/seed.sql"),
    ),
    (
        "mariadb.cnf",
        include_str!("../../images/recipes/press/files/mariadb.cnf"),
    ),
    (
        "nginx-site",
        include_str!("../../images/recipes/press/files/nginx-site"),
    ),
    (
        "prometheus.yml",
        include_str!("../../images/recipes/press/files/prometheus.yml"),
    ),
    (
        "registry.yml",
        include_str!("../../images/recipes/press/files/registry.yml"),
    ),
    (
        "rsyslog-server.conf",
        include_str!("../../images/recipes/press/files/rsyslog-server.conf"),
    ),
    (
        "rsyslog-forward.conf",
        include_str!("../../images/recipes/press/files/rsyslog-forward.conf"),
    ),
];

/// The Debian packages of the base disk.
pub fn packages() -> Vec<&'static str> {
    FILES
        .iter()
        .find(|(n, _)| *n == "packages")
        .map(|(_, text)| {
            text.lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// A hash of everything that makes the press base disk: the recipe files, the suite, the operator's hook (when
/// there is one) and the kernel version. A built image with another hash is stale. image.toml is not part of
/// it: the template (sizes, probes) is rewritten without a rebuild, and the snapshot's key covers it.
pub fn recipe_hash(kernel_version: &str, hook: Option<&[u8]>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"press\0");
    h.update(SUITE.as_bytes());
    for (name, text) in FILES {
        h.update(name.as_bytes());
        h.update([0u8]);
        h.update(text.as_bytes());
        h.update([0u8]);
    }
    h.update(b"guest agent\0");
    for source in GUEST_AGENT {
        h.update(source.as_bytes());
        h.update([0u8]);
    }
    h.update(kernel_version.as_bytes());
    if let Some(hook) = hook {
        h.update(b"hook\0");
        h.update(hook);
    }
    hex::encode(&h.finalize()[..8])
}

/// Whether `out` holds a press image built from this recipe.
pub fn is_current(out: &Path, hash: &str) -> bool {
    std::fs::read_to_string(out.join(RECIPE_FILE)).is_ok_and(|h| h.trim() == hash)
        && out.join("base.qcow2").is_file()
        && out.join("image.toml").is_file()
}

/// Where one build step writes its output; on failure the error names the step and shows the log's tail.
struct Steps {
    log: PathBuf,
    progress: bool,
}

impl Steps {
    fn run(&self, step: &str, cmd: &mut Command) -> BuildResult<()> {
        if self.progress {
            eprintln!("press: {step} ...");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io_err(format!("build log {}", self.log.display())))?;
        let mut log2 = log.try_clone().map_err(io_err("build log"))?;
        let _ = writeln!(log2, "== {step}: {cmd:?}");
        let status = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("build log"))?)
            .stderr(log)
            .status()
            .map_err(|e| BuildError::Missing {
                what: format!("`{}` ({e})", cmd.get_program().to_string_lossy()),
                hint: "install the Debian packages debootstrap, e2fsprogs and qemu-utils".into(),
            })?;
        if !status.success() {
            let tail = super::build::tail_of(&self.log, 25);
            return Err(BuildError::Step {
                step: step.to_string(),
                log: self.log.clone(),
                tail,
            });
        }
        Ok(())
    }
}

/// Unmounts what the build mounted inside the root folder, also when a step fails.
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

/// The guest agent: this very binary (`fcdev guest-agent`), without its debug symbols when `strip` is here
/// (16 MB instead of ~120 MB; only the agent's pages are ever read in the guest).
fn guest_agent(to: &Path) -> BuildResult<()> {
    let exe = std::env::current_exe().map_err(io_err("finding this binary"))?;
    let stripped = crate::server::backend::qemu::which("strip").is_some_and(|strip| {
        Command::new(strip)
            .arg("-o")
            .arg(to)
            .arg(&exe)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !stripped {
        std::fs::copy(&exe, to).map_err(io_err(format!("copying {}", exe.display())))?;
    }
    Ok(())
}

/// Build the press image into `out` (skipped when `out` already holds this recipe's image).
pub fn build_press(out: &Path, opts: &BuildOptions) -> BuildResult<bool> {
    let kver = find_kernel(opts.kernel_version.as_deref())?;
    let hook = match &opts.hook {
        Some(p) => Some(std::fs::read(p).map_err(io_err(format!("hook {}", p.display())))?),
        None => None,
    };
    let hash = recipe_hash(&kver, hook.as_deref());
    if !opts.force && is_current(out, &hash) {
        let toml = out.join("image.toml");
        if std::fs::read_to_string(&toml).ok().as_deref() != Some(IMAGE_TOML) {
            std::fs::write(&toml, IMAGE_TOML).map_err(io_err("image.toml"))?;
        }
        return Ok(false);
    }
    for tool in ["debootstrap", "mkfs.ext4", "chroot"] {
        if crate::server::backend::qemu::which(tool).is_none() {
            return Err(BuildError::Missing {
                what: format!("`{tool}`"),
                hint: "install the Debian packages debootstrap and e2fsprogs".into(),
            });
        }
    }
    let qemu_img = crate::server::backend::qemu::which("qemu-img").ok_or(BuildError::Missing {
        what: "`qemu-img`".into(),
        hint: "install the Debian package qemu-utils".into(),
    })?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "press".into());
    let tmp = parent.join(format!(".{name}.building"));
    if tmp.exists() {
        // A build that was interrupted: nothing of it is used.
        let _ = Command::new("umount")
            .arg("-R")
            .arg("-l")
            .arg(tmp.join("root/proc"))
            .stderr(Stdio::null())
            .status();
        std::fs::remove_dir_all(&tmp).map_err(io_err("removing an interrupted build"))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err("creating the build folder"))?;
    let root = tmp.join("root");
    let steps = Steps {
        log: tmp.join("build.log"),
        progress: opts.progress,
    };
    let mirror = std::env::var("FCDEV_DEBIAN_MIRROR").unwrap_or_else(|_| DEFAULT_MIRROR.into());
    let include = packages().join(",");
    steps.run(
        "debootstrap",
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={include}"))
            .arg(SUITE)
            .arg(&root)
            .arg(&mirror),
    )?;
    // The guest kernel is the host's cloud kernel; its modules (virtio_net) go into the root filesystem.
    std::fs::create_dir_all(root.join("lib/modules")).map_err(io_err("lib/modules"))?;
    steps.run(
        "kernel modules",
        Command::new("cp")
            .arg("-a")
            .arg(format!("/lib/modules/{kver}"))
            .arg(root.join("lib/modules/")),
    )?;
    let recipe = root.join("tmp/fcdev-recipe");
    std::fs::create_dir_all(&recipe).map_err(io_err("recipe folder"))?;
    for (file, text) in FILES {
        std::fs::write(recipe.join(file), text).map_err(io_err(format!("writing {file}")))?;
    }
    guest_agent(&recipe.join("fcdev-agent"))?;
    {
        let mut mounts = Mounts(Vec::new());
        for fs in ["proc", "sys", "dev"] {
            let target = root.join(fs);
            steps.run(
                &format!("mount /{fs}"),
                Command::new("mount")
                    .arg("--bind")
                    .arg(format!("/{fs}"))
                    .arg(&target),
            )?;
            mounts.0.push(target);
        }
        steps.run(
            "setup",
            Command::new("chroot")
                .arg(&root)
                .args(["sh", "/tmp/fcdev-recipe/setup.sh", "/tmp/fcdev-recipe"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        if let Some(hook) = &hook {
            std::fs::write(recipe.join("hook.sh"), hook).map_err(io_err("writing the hook"))?;
            steps.run(
                "operator hook",
                Command::new("chroot")
                    .arg(&root)
                    .args(["sh", "/tmp/fcdev-recipe/hook.sh"])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
        }
    }
    std::fs::remove_dir_all(&recipe).map_err(io_err("removing the recipe folder"))?;
    let raw = tmp.join("base.raw");
    steps.run(
        "root filesystem",
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(&root)
            .arg(&raw)
            .arg(DISK_SIZE),
    )?;
    steps.run(
        "base disk",
        Command::new(&qemu_img)
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(tmp.join("base.qcow2")),
    )?;
    std::fs::remove_file(&raw).map_err(io_err("removing the raw disk"))?;
    std::fs::remove_dir_all(&root).map_err(io_err("removing the root folder"))?;
    for (from, to) in [
        (format!("/boot/vmlinuz-{kver}"), "vmlinuz"),
        (format!("/boot/initrd.img-{kver}"), "initrd.img"),
    ] {
        std::fs::copy(&from, tmp.join(to)).map_err(|e| BuildError::Missing {
            what: format!("{from} ({e})"),
            hint: "install the Debian package `linux-image-cloud-amd64` (its initrd is made by initramfs-tools)"
                .into(),
        })?;
    }
    std::fs::write(tmp.join("image.toml"), IMAGE_TOML).map_err(io_err("image.toml"))?;
    std::fs::write(tmp.join(RECIPE_FILE), format!("{hash}\n")).map_err(io_err("recipe"))?;
    if out.exists() {
        std::fs::remove_dir_all(out)
            .map_err(io_err(format!("removing the old {}", out.display())))?;
    }
    std::fs::rename(&tmp, out).map_err(io_err(format!("publishing {}", out.display())))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_recipe_file_is_compiled_in() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/recipes/press/files");
        for entry in std::fs::read_dir(&dir).expect("recipe folder") {
            let name = entry.expect("entry").file_name();
            let name = name.to_string_lossy();
            assert!(
                FILES.iter().any(|(n, _)| *n == name),
                "{name} is in images/recipes/press/files but not in press::FILES"
            );
        }
    }

    #[test]
    fn packages_skip_comments_and_the_hash_follows_the_hook() {
        let p = packages();
        assert!(p.contains(&"mariadb-server") && p.contains(&"docker-registry"));
        assert!(p.iter().all(|p| !p.contains('#') && !p.is_empty()));
        assert_ne!(recipe_hash("k", None), recipe_hash("k", Some(b"echo hi")));
        assert_ne!(recipe_hash("k1", None), recipe_hash("k2", None));
    }
}
