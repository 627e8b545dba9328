//! Onboarding snapshots: a booted, idle guest's memory and device state, restored into every VM of a cluster.
//!
//! Layout: `<image>/snapshot/<key>/{meta.toml, state, mem}`. `key` is a hash of everything that shapes the guest
//! before it learns who it is (kernel, initrd, base disk, kernel arguments, vCPUs, memory, accelerator), so the
//! three identical VMs of the tiny image share one snapshot — and one set of page-cache pages for its `mem`.
//!
//! `mem` is the guest RAM (the source ran with `memory-backend-file,share=on`); `state` is the migration stream
//! saved with `x-ignore-shared` (device state only, a few hundred KB). Restores map `mem` privately
//! (`share=off`): copy-on-write, the snapshot file is never modified.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::cmdline::{files, Launch, Memory, Net};
use super::{agent, proc, qmp, Accel, QemuBackend};
use crate::server::backend::{BackendError, BackendResult};
use crate::server::images::{Image, VmTemplate};

pub const META: &str = "meta.toml";
pub const STATE: &str = "state";
pub const MEM: &str = "mem";
/// The kernel's boot header alone (a bzImage without its payload), passed to restores: qemu reads the whole
/// `-kernel` file into private memory for fw_cfg, which a restored guest never reads again (~14 MB per VM).
pub const KERNEL_STUB: &str = "kernel.stub";

/// The placeholder identity of the snapshot guest (a TEST-NET address on a NIC that reaches nothing).
pub const SNAPSHOT_IP: &str = "192.0.2.10/24";
pub const SNAPSHOT_GW: &str = "192.0.2.1";
pub const SNAPSHOT_MAC: &str = "52:54:00:fc:ff:fe";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub key: String,
    pub vms: Vec<String>,
    pub accel: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    /// The kernel command line the source booted with (restores pass the same one).
    pub append: String,
    pub save_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Found {
    pub dir: PathBuf,
    pub meta: Meta,
}

impl Found {
    pub fn mem_path(&self) -> PathBuf {
        self.dir.join(MEM)
    }
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE)
    }
    /// The kernel stub when the snapshot has one.
    pub fn kernel_stub(&self) -> Option<PathBuf> {
        let p = self.dir.join(KERNEL_STUB);
        p.is_file().then_some(p)
    }
}

/// Write the setup part of a bzImage (boot sector + setup sectors) plus one zero sector: enough for qemu to
/// accept it as `-kernel` and register the same option ROM as the real kernel. None when `kernel` is no bzImage.
pub fn write_kernel_stub(kernel: &Path, out: &Path) -> std::io::Result<bool> {
    let data = std::fs::read(kernel)?;
    if data.len() < 0x210 || &data[0x202..0x206] != b"HdrS" {
        return Ok(false);
    }
    let setup_sects = match data[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let setup = (setup_sects + 1) * 512;
    if data.len() < setup {
        return Ok(false);
    }
    let mut stub = data[..setup].to_vec();
    stub.extend_from_slice(&[0u8; 512]);
    std::fs::write(out, stub)?;
    Ok(true)
}

pub fn key(template: &VmTemplate, accel: Accel) -> String {
    let mut h = Sha256::new();
    for part in [
        template.kernel.clone().unwrap_or_default(),
        template.initrd.clone().unwrap_or_default(),
        template.disk.clone().unwrap_or_default(),
        template.cmdline.trim().to_string(),
        template.vcpus.to_string(),
        template.memory_mb.to_string(),
        accel.to_string(),
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    hex::encode(&h.finalize()[..6])
}

/// The snapshot to restore `template` from, when the image has a usable one.
pub fn find(image: &Image, template: &VmTemplate, accel: Accel) -> Option<Found> {
    let dir = image.snapshot_dir()?.join(key(template, accel));
    let text = std::fs::read_to_string(dir.join(META)).ok()?;
    let meta: Meta = toml::from_str(&text).ok()?;
    (dir.join(STATE).is_file() && dir.join(MEM).is_file()).then_some(Found { dir, meta })
}

fn snapshot_append(template: &VmTemplate) -> String {
    format!(
        "{} fcdev.snapshot=1 fcdev.ip={SNAPSHOT_IP} fcdev.gw={SNAPSHOT_GW} fcdev.name=snapshot fcdev.ns=snapshot",
        template.cmdline.trim()
    )
    .trim()
    .to_string()
}

impl QemuBackend {
    /// Whether a qcow2 overlay holds any data of its own (`qemu-img map`: an extent at depth 0 with data).
    fn overlay_has_data(&self, overlay: &Path) -> BackendResult<bool> {
        let out = std::process::Command::new(self.qemu_img())
            .args(["map", "--output=json", "-f", "qcow2"])
            .arg(overlay)
            .output()?;
        if !out.status.success() {
            return Err(BackendError::msg(format!(
                "qemu-img map {}: {}",
                overlay.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let extents: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
            .map_err(|e| BackendError::msg(format!("qemu-img map output: {e}")))?;
        Ok(extents.iter().any(|e| {
            e.get("depth").and_then(serde_json::Value::as_u64) == Some(0)
                && e.get("data").and_then(serde_json::Value::as_bool) == Some(true)
        }))
    }

    /// Boot `template` on an isolated NIC, wait until its agent answers, pause it, save the device state and
    /// kill it with SIGKILL (a clean shutdown would write queued packets into the shared RAM file and break the
    /// next restore). Writes `out_root/<key>/`. Returns the meta.
    ///
    /// Disk consistency: whatever the guest wrote to its disk before the snapshot (a root filesystem mounted
    /// read-write, journals, logs) is in the source's overlay. With `commit_disk`, that overlay is committed into
    /// the image's base disk (`qemu-img commit`), so every restored VM's fresh overlay shows exactly the disk the
    /// snapshot's kernel saw. Only when no other snapshot shares that base, and never while VMs of the image run.
    /// Without it, the guest must not write its disk before the snapshot (the tiny image mounts /data later).
    pub fn take_snapshot(
        &self,
        image: &Image,
        template: &VmTemplate,
        out_root: &Path,
        vms: Vec<String>,
        commit_disk: bool,
    ) -> BackendResult<Meta> {
        let key = key(template, self.accel());
        let dir = out_root.join(&key);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(dir.join("run"))?;
        // qemu runs in the run dir: absolute paths only.
        let dir = dir.canonicalize()?;
        let run = dir.join("run");
        let (kernel, initrd) = Self::kernel_paths(image, template)?;
        let disk = match &template.disk {
            Some(d) => {
                let overlay = run.join(files::DISK);
                self.create_overlay(&image.path(d), &overlay)?;
                Some(overlay)
            }
            None => None,
        };
        let append = snapshot_append(template);
        let launch = Launch {
            accel: self.accel(),
            name: format!("snapshot-{key}"),
            vcpus: template.vcpus,
            memory_mb: template.memory_mb,
            kernel,
            initrd,
            append: append.clone(),
            disk,
            net: Net::Isolated,
            mac: SNAPSHOT_MAC.to_string(),
            memory: Memory::File {
                path: dir.join(MEM),
                share: true,
            },
            incoming: false,
            run_dir: run.clone(),
        };
        let mut last_err = String::new();
        let mut pid = None;
        for attempt in 1..=2 {
            let _ = std::fs::remove_file(dir.join(MEM));
            let p = self.launch(&launch)?;
            match agent::ping(&run.join(files::AGENT), Duration::from_secs(60)) {
                Ok(()) => {
                    pid = Some(p);
                    break;
                }
                Err(e) => {
                    last_err = format!("attempt {attempt}: {e}");
                    proc::kill9(p);
                    proc::wait_gone(p, &run, Duration::from_secs(5));
                }
            }
        }
        let Some(pid) = pid else {
            return Err(BackendError::Failed {
                message: format!("snapshot guest never became ready ({last_err})"),
                log_tail: super::log_tail_of(&run),
            });
        };
        // Let the guest go idle (late boot work, first timers) before freezing it.
        std::thread::sleep(Duration::from_millis(500));
        let t0 = Instant::now();
        let result = (|| -> Result<(), qmp::QmpError> {
            let mut q = qmp::Qmp::connect(&run.join(files::QMP), Duration::from_secs(5))?;
            q.execute("stop", json!({}))?;
            q.set_capability("x-ignore-shared", true)?;
            let uri = format!(
                "exec:cat > {}",
                super::cmdline::shell_quote(&dir.join(STATE))
            );
            q.execute("migrate", json!({ "uri": uri }))?;
            loop {
                let (status, err) = q.migrate_status()?;
                match status.as_str() {
                    "completed" => return Ok(()),
                    "failed" | "cancelled" => {
                        return Err(qmp::QmpError::Protocol(format!(
                            "migration {status}: {}",
                            err.unwrap_or_default()
                        )))
                    }
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
                if t0.elapsed() > Duration::from_secs(60) {
                    return Err(qmp::QmpError::Protocol("migration did not finish".into()));
                }
            }
        })();
        // SIGKILL right away, also on failure.
        proc::kill9(pid);
        proc::wait_gone(pid, &run, Duration::from_secs(5));
        let save_ms = t0.elapsed().as_millis() as u64;
        if let Err(e) = result {
            return Err(BackendError::Failed {
                message: format!("saving the snapshot failed: {e}"),
                log_tail: super::log_tail_of(&run),
            });
        }
        // The RAM file is complete once the kernel wrote the page cache back; make it durable.
        if let Ok(f) = std::fs::File::open(dir.join(MEM)) {
            let _ = f.sync_all();
        }
        let meta = Meta {
            key: key.clone(),
            vms,
            accel: self.accel().to_string(),
            vcpus: template.vcpus,
            memory_mb: template.memory_mb,
            append,
            save_ms,
        };
        if !write_kernel_stub(&launch.kernel, &dir.join(KERNEL_STUB))? {
            tracing::info!("kernel is not a bzImage: restores load the full kernel");
        }
        let text =
            toml::to_string(&meta).map_err(|e| BackendError::msg(format!("snapshot meta: {e}")))?;
        std::fs::write(dir.join(META), text)?;
        let overlay = run.join(files::DISK);
        if commit_disk && overlay.is_file() && self.overlay_has_data(&overlay)? {
            let out = std::process::Command::new(self.qemu_img())
                .args(["commit", "-q", "-f", "qcow2"])
                .arg(&overlay)
                .output()?;
            if !out.status.success() {
                return Err(BackendError::msg(format!(
                    "qemu-img commit of the snapshot disk: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        std::fs::remove_dir_all(&run)?;
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(name: &str, memory_mb: u32) -> VmTemplate {
        VmTemplate {
            name: name.into(),
            role: String::new(),
            vcpus: 1,
            memory_mb,
            kernel: Some("vmlinuz".into()),
            initrd: Some("initrd.img".into()),
            disk: Some("root.qcow2".into()),
            cmdline: "console=ttyS0".into(),
            probe: "tcp:80".into(),
        }
    }

    #[test]
    fn identical_vms_share_a_key_and_shapes_do_not() {
        let k = |t: &VmTemplate, a| key(t, a);
        assert_eq!(
            k(&template("n1", 256), Accel::Tcg),
            k(&template("f1", 256), Accel::Tcg)
        );
        assert_ne!(
            k(&template("n1", 256), Accel::Tcg),
            k(&template("n1", 512), Accel::Tcg)
        );
        assert_ne!(
            k(&template("n1", 256), Accel::Tcg),
            k(&template("n1", 256), Accel::Kvm)
        );
    }

    #[test]
    fn kernel_stub_keeps_the_boot_header_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bz = vec![0u8; 0x4000];
        bz[0x1f1] = 3; // setup sectors
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, &bz).expect("write");
        let stub = dir.path().join("stub");
        assert!(write_kernel_stub(&kernel, &stub).expect("stub"));
        let s = std::fs::read(&stub).expect("read");
        assert_eq!(s.len(), 4 * 512 + 512);
        assert_eq!(&s[0x202..0x206], b"HdrS");
        std::fs::write(&kernel, b"not a kernel").expect("write");
        assert!(!write_kernel_stub(&kernel, &stub).expect("stub"));
    }
}
