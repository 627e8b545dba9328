//! Saved VMs: a running VM's whole memory and device state in a file, for named snapshots (`fcdev snapshot save`)
//! and stopped clusters (`fcdev stop`).
//!
//! A saved VM is a folder with `state` (the migration stream: device state and every non-zero RAM page; QEMU 7.2
//! writes each non-zero page once, zero pages as an 8-byte marker) and `meta.toml` (how qemu ran, the image and
//! qemu it ran with, the disk layers it needs). It is written by the same migration code as the onboarding
//! snapshot (`snapshot::save_paused`) and resumed by the same restore path (`QemuBackend::launch_incoming`).
//!
//! Disks are never copied. A named snapshot freezes the VM's active overlay as a layer: while the VM is paused,
//! `blockdev-snapshot-sync` (mode `existing`) puts a fresh overlay on top of it, and the old overlay file moves to
//! the cluster's `layers/` folder, where it never changes again. Restoring puts a new overlay on that layer. The
//! VM keeps the list of its active disk's layers (`layers` in its run dir), each saved VM the list of its own;
//! a layer that no list names any more is deleted (`collect_layers`). A stopped VM needs no new layer: its qemu
//! ends, its disk stays as it is.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::cmdline::{files, Launch, Memory};
use super::{agent, err_with_log, note, proc, qmp, snapshot, QemuBackend};
use crate::server::backend::{disk_usage, BackendError, BackendResult, VmSpec};

pub const STATE: &str = "state";
pub const META: &str = "meta.toml";

/// How long a guest may take to confirm its clock after a resume.
const CLOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// How qemu was started: a saved VM is resumed with the same kernel, command line and RAM layout (the migration
/// stream names the RAM blocks).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LaunchRecord {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: String,
    /// RAM in a memory backend named `mem` (`memory-backend=mem`), else plain `-m`.
    pub memory_backend: bool,
    pub vcpus: u32,
    pub memory_mb: u32,
}

impl LaunchRecord {
    pub fn of(launch: &Launch) -> LaunchRecord {
        LaunchRecord {
            kernel: launch.kernel.clone(),
            initrd: launch.initrd.clone(),
            append: launch.append.clone(),
            memory_backend: !matches!(launch.memory, Memory::Anonymous),
            vcpus: launch.vcpus,
            memory_mb: launch.memory_mb,
        }
    }
}

/// Write the launch record of the qemu about to start in `run_dir`.
pub fn record_launch(launch: &Launch) -> std::io::Result<()> {
    let text = toml::to_string(&LaunchRecord::of(launch)).map_err(std::io::Error::other)?;
    std::fs::write(launch.run_dir.join(files::LAUNCH), text)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedMeta {
    pub vm: String,
    pub launch: LaunchRecord,
    pub accel: String,
    /// `qemu-system-x86_64 --version`, first line: another qemu may not load the stream.
    pub qemu: String,
    /// The image's files as the VM saw them (see `image_stamp`).
    pub image_stamp: String,
    /// The disk layers the saved state needs, newest first (absolute paths).
    pub layers: Vec<PathBuf>,
    /// Seconds since the epoch.
    pub saved_at: u64,
}

pub fn read_meta(dir: &Path) -> BackendResult<SavedMeta> {
    let text = std::fs::read_to_string(dir.join(META))
        .map_err(|e| BackendError::msg(format!("saved state {}: {e}", dir.display())))?;
    toml::from_str(&text)
        .map_err(|e| BackendError::msg(format!("saved state {}: {e}", dir.display())))
}

/// The file the VM's qemu writes to: `disk.qcow2`, or the overlay a snapshot put on top while it ran.
pub fn active_disk(run_dir: &Path) -> PathBuf {
    match std::fs::read_to_string(run_dir.join(files::ACTIVE)) {
        Ok(name) if !name.trim().is_empty() && !name.contains('/') => run_dir.join(name.trim()),
        _ => run_dir.join(files::DISK),
    }
}

/// Once qemu has ended: the active overlay becomes `disk.qcow2` again; the run dir's other names of frozen layers
/// go (each layer keeps its name under the snapshots' `.layers`).
pub fn settle_disk(run_dir: &Path) -> std::io::Result<()> {
    let active = active_disk(run_dir);
    let disk = run_dir.join(files::DISK);
    if active != disk {
        std::fs::rename(&active, &disk)?;
    }
    for e in std::fs::read_dir(run_dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("disk-") && name.ends_with(".qcow2") {
            std::fs::remove_file(e.path())?;
        }
    }
    match std::fs::remove_file(run_dir.join(files::ACTIVE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The active disk's layers (newest first).
pub fn read_chain(run_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string(run_dir.join(files::LAYERS))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(PathBuf::from)
        .collect()
}

fn write_chain(run_dir: &Path, chain: &[PathBuf]) -> std::io::Result<()> {
    let text: String = chain.iter().map(|p| format!("{}\n", p.display())).collect();
    std::fs::write(run_dir.join(files::LAYERS), text)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl QemuBackend {
    /// What a saved state depends on in the image: the VM's shape and the kernel, initrd, base disk and
    /// onboarding snapshot files (size and modification time: a rebuilt or re-snapshotted image changes them).
    pub(super) fn image_stamp(&self, vm: &VmSpec) -> String {
        use std::os::unix::fs::MetadataExt;
        let mut h = Sha256::new();
        h.update(snapshot::key(&vm.template, self.accel()).as_bytes());
        let t = &vm.template;
        let mut paths: Vec<PathBuf> = [&t.kernel, &t.initrd, &t.disk]
            .into_iter()
            .flatten()
            .map(|f| vm.image.path(f))
            .collect();
        if let Some(found) = snapshot::find(&vm.image, &vm.template, self.accel()) {
            paths.push(found.dir.join(snapshot::META));
        }
        for p in paths {
            h.update(p.file_name().unwrap_or_default().as_encoded_bytes());
            if let Ok(m) = std::fs::metadata(&p) {
                h.update(m.len().to_le_bytes());
                h.update(m.mtime().to_le_bytes());
                h.update(m.mtime_nsec().to_le_bytes());
            }
            h.update([0u8]);
        }
        hex::encode(&h.finalize()[..8])
    }

    fn qmp_of(run: &Path) -> BackendResult<qmp::Qmp> {
        qmp::Qmp::connect(&run.join(files::QMP), Duration::from_secs(5))
            .map_err(|e| err_with_log(e.to_string(), run))
    }

    /// Pause a running VM (every VM of a cluster is paused before any is saved).
    pub fn pause_vm(&self, vm: &VmSpec) -> BackendResult<()> {
        let mut q = Self::qmp_of(&vm.run_dir)?;
        q.execute("stop", json!({}))
            .map_err(|e| err_with_log(format!("pause: {e}"), &vm.run_dir))?;
        Ok(())
    }

    /// Resume a paused VM and set its clock (it stood still while the VM was paused).
    pub fn resume_vm(&self, vm: &VmSpec) -> BackendResult<()> {
        let mut q = Self::qmp_of(&vm.run_dir)?;
        // A save cut off (the server restarted mid-way) may have left its migration running: qemu refuses to
        // continue until it ended.
        let t0 = Instant::now();
        loop {
            let (status, _) = q
                .migrate_status()
                .map_err(|e| err_with_log(format!("resume: {e}"), &vm.run_dir))?;
            if !matches!(
                status.as_str(),
                "setup" | "active" | "device" | "pre-switchover" | "cancelling"
            ) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(err_with_log(
                    format!("resume: a migration is still {status}"),
                    &vm.run_dir,
                ));
            }
            let _ = q.execute("migrate_cancel", json!({}));
            std::thread::sleep(Duration::from_millis(20));
        }
        q.execute("cont", json!({}))
            .map_err(|e| err_with_log(format!("resume: {e}"), &vm.run_dir))?;
        drop(q);
        agent::set_clock(&vm.run_dir.join(files::AGENT), CLOCK_TIMEOUT)
            .map_err(|e| err_with_log(format!("setting the clock: {e}"), &vm.run_dir))
    }

    /// The virtual size of the VM's disk, from qemu.
    fn disk_size(q: &mut qmp::Qmp) -> BackendResult<u64> {
        let blocks = q
            .execute("query-block", json!({}))
            .map_err(|e| BackendError::msg(e.to_string()))?;
        blocks
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b.get("device").and_then(|d| d.as_str()) == Some("disk0"))
            .and_then(|b| b.pointer("/inserted/image/virtual-size"))
            .and_then(|s| s.as_u64())
            .ok_or_else(|| BackendError::msg("qemu reports no disk0"))
    }

    /// Freeze the paused VM's active disk as a new layer under `layers_dir`; the VM goes on on a fresh overlay.
    /// Returns the layer.
    ///
    /// Nothing qemu has open is renamed while it runs (qemu reopens its files by name, e.g. when a migration
    /// releases them): the active file gets a second name in `layers_dir` (a hard link), the new overlay a name
    /// of its own in the run dir (recorded in `disk.active`); `settle_disk` puts the names back to `disk.qcow2`
    /// once qemu has ended.
    fn freeze_disk(
        &self,
        vm: &VmSpec,
        q: &mut qmp::Qmp,
        layers_dir: &Path,
    ) -> BackendResult<PathBuf> {
        let run = &vm.run_dir;
        std::fs::create_dir_all(layers_dir)?;
        let id = hex::encode(rand::random::<[u8; 6]>());
        let layer = layers_dir
            .canonicalize()?
            .join(format!("{}-{id}.qcow2", vm.name));
        let next = run.join(format!("disk-{id}.qcow2"));
        let size = Self::disk_size(q)?;
        std::fs::hard_link(active_disk(run), &layer)?;
        let out = std::process::Command::new(self.qemu_img())
            .args(["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b"])
            .arg(&layer)
            .arg(&next)
            .arg(size.to_string())
            .output()?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&layer);
            return Err(BackendError::msg(format!(
                "qemu-img create {}: {}",
                next.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        // `existing`: qemu opens our overlay and puts it on top of the current disk node, without rewriting the
        // overlay's backing path (the layer's own name).
        if let Err(e) = q.execute(
            "blockdev-snapshot-sync",
            json!({"device": "disk0", "snapshot-file": next, "format": "qcow2", "mode": "existing"}),
        ) {
            let _ = std::fs::remove_file(&layer);
            let _ = std::fs::remove_file(&next);
            return Err(err_with_log(format!("new disk layer: {e}"), run));
        }
        std::fs::write(
            run.join(files::ACTIVE),
            next.file_name().unwrap_or_default().as_encoded_bytes(),
        )?;
        let mut chain = read_chain(run);
        chain.insert(0, layer.clone());
        write_chain(run, &chain)?;
        Ok(layer)
    }

    fn saved_meta(&self, vm: &VmSpec, layers: Vec<PathBuf>) -> BackendResult<SavedMeta> {
        let launch: LaunchRecord = std::fs::read_to_string(vm.run_dir.join(files::LAUNCH))
            .ok()
            .and_then(|t| toml::from_str(&t).ok())
            .ok_or_else(|| {
                BackendError::msg(format!(
                    "VM {} was started by an earlier fcdev that did not record how: `fcdev reset` it first",
                    vm.name
                ))
            })?;
        Ok(SavedMeta {
            vm: vm.name.clone(),
            launch,
            accel: self.accel().to_string(),
            qemu: self.qemu_version().to_string(),
            image_stamp: self.image_stamp(vm),
            layers,
            saved_at: unix_now(),
        })
    }

    fn write_meta(dir: &Path, meta: &SavedMeta) -> BackendResult<()> {
        let text =
            toml::to_string(meta).map_err(|e| BackendError::msg(format!("saved meta: {e}")))?;
        std::fs::write(dir.join(META), text)?;
        Ok(())
    }

    /// Save a paused VM into `dir` (a named snapshot's folder for this VM): its disk frozen as a layer under
    /// `layers_dir`, its memory and device state in `dir/state`. The VM stays paused. Returns the bytes the
    /// snapshot holds on disk (state + the new layer).
    pub fn save_vm(&self, vm: &VmSpec, dir: &Path, layers_dir: &Path) -> BackendResult<u64> {
        let t0 = Instant::now();
        let run = &vm.run_dir;
        std::fs::create_dir_all(dir)?;
        let mut meta = self.saved_meta(vm, Vec::new())?;
        let mut q = Self::qmp_of(run)?;
        let mut bytes = 0;
        if vm.template.disk.is_some() {
            let layer = self.freeze_disk(vm, &mut q, layers_dir)?;
            bytes += disk_usage(&layer);
            meta.layers = read_chain(run);
        }
        snapshot::save_paused(&mut q, &dir.join(STATE), false)
            .map_err(|e| err_with_log(format!("saving the state: {e}"), run))?;
        Self::write_meta(dir, &meta)?;
        // The guest's ssh host key is part of its saved state: keep its public half with it.
        let _ = std::fs::copy(run.join(files::HOST_KEY_PUB), dir.join(files::HOST_KEY_PUB));
        bytes += disk_usage(&dir.join(STATE));
        note(
            run,
            &format!(
                "saved to {} in {:.0} ms ({} MB)",
                dir.display(),
                t0.elapsed().as_secs_f64() * 1000.0,
                bytes >> 20
            ),
        );
        Ok(bytes)
    }

    /// Save a paused VM's memory and device state in its run dir (`suspended/`) and end its qemu; its disk stays.
    /// `start` resumes it. Returns the bytes the state takes.
    pub fn suspend_vm(&self, vm: &VmSpec) -> BackendResult<u64> {
        let run = &vm.run_dir;
        let tmp = run.join(format!("{}.tmp", files::SUSPENDED));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let meta = self.saved_meta(vm, read_chain(run))?;
        let mut q = Self::qmp_of(run)?;
        snapshot::save_paused(&mut q, &tmp.join(STATE), false)
            .map_err(|e| err_with_log(format!("saving the state: {e}"), run))?;
        drop(q);
        Self::write_meta(&tmp, &meta)?;
        let done = run.join(files::SUSPENDED);
        let _ = std::fs::remove_dir_all(&done);
        // Complete before qemu ends: a crash in between leaves a paused VM and its state, never neither.
        std::fs::rename(&tmp, &done)?;
        // The disk was flushed and released when the migration completed.
        if let Some(pid) = proc::read_pid(run) {
            proc::kill9(pid);
            proc::wait_gone(pid, run, Duration::from_secs(5));
        }
        note(run, "stopped: state saved, qemu ended");
        Ok(disk_usage(&done.join(STATE)))
    }

    /// Whether the saved VM in `dir` can be resumed here: same accelerator, qemu and image files, its layers
    /// present. The reason when not.
    pub fn check_saved_vm(&self, vm: &VmSpec, dir: &Path) -> BackendResult<SavedMeta> {
        let meta = read_meta(dir)?;
        if meta.accel != self.accel().to_string() {
            return Err(BackendError::msg(format!(
                "it was saved under accelerator {}, the server now runs {}",
                meta.accel,
                self.accel()
            )));
        }
        if meta.qemu != self.qemu_version() {
            return Err(BackendError::msg(format!(
                "it was saved by {}, the server now runs {}",
                meta.qemu,
                self.qemu_version()
            )));
        }
        if meta.image_stamp != self.image_stamp(vm) {
            return Err(BackendError::msg(format!(
                "image `{}` changed since it was saved (rebuilt or re-snapshotted): its VMs would not match the saved memory",
                vm.image.spec.name
            )));
        }
        if let Some(missing) = meta
            .layers
            .iter()
            .chain(std::iter::once(&meta.launch.kernel))
            .find(|p| !p.is_file())
        {
            return Err(BackendError::msg(format!(
                "{} is missing",
                missing.display()
            )));
        }
        Ok(meta)
    }

    /// Resume a saved VM: qemu with the saved launch settings waits for the stream, the guest resumes where it
    /// was saved and its clock is set. The disk (`disk.qcow2`) is ready before.
    pub(super) fn resume_saved(
        &self,
        vm: &VmSpec,
        tap: String,
        dir: &Path,
        meta: &SavedMeta,
    ) -> BackendResult<()> {
        let run = &vm.run_dir;
        let t0 = Instant::now();
        let l = &meta.launch;
        let launch = Launch {
            vcpus: l.vcpus,
            memory_mb: l.memory_mb,
            memory: if l.memory_backend {
                Memory::Ram
            } else {
                Memory::Anonymous
            },
            incoming: true,
            ..self.launch_for(
                vm,
                tap,
                l.kernel.clone(),
                l.initrd.clone(),
                l.append.clone(),
            )
        };
        std::fs::write(run.join(files::MODE), "resume")?;
        let result = self
            .launch_incoming(&launch, &dir.join(STATE), false)
            .map_err(|e| e.to_string())
            .and_then(|()| self.wait_running(run).map_err(|e| e.to_string()));
        let resumed = match result {
            Ok(d) => d,
            Err(e) => {
                Self::kill_vm(run, false);
                return Err(err_with_log(format!("resume failed: {e}"), run));
            }
        };
        if let Err(e) = agent::set_clock(&run.join(files::AGENT), CLOCK_TIMEOUT) {
            Self::kill_vm(run, false);
            return Err(err_with_log(format!("resumed guest: {e}"), run));
        }
        note(
            run,
            &format!(
                "resumed from {}: running after {:.0} ms, clock set after {:.0} ms",
                dir.display(),
                resumed.as_secs_f64() * 1000.0,
                t0.elapsed().as_secs_f64() * 1000.0
            ),
        );
        Ok(())
    }

    /// Start a VM from a named snapshot's saved VM: a fresh overlay on its newest layer, then resume.
    pub(super) fn start_from_saved(
        &self,
        vm: &VmSpec,
        tap: String,
        dir: &Path,
    ) -> BackendResult<()> {
        let meta = self.check_saved_vm(vm, dir)?;
        let run = &vm.run_dir;
        let overlay = run.join(files::DISK);
        if vm.template.disk.is_some() {
            let layer = meta.layers.first().ok_or_else(|| {
                BackendError::msg(format!("saved VM {} has no disk layer", vm.name))
            })?;
            let _ = std::fs::remove_file(&overlay);
            self.create_overlay(layer, &overlay)?;
            write_chain(run, &meta.layers)?;
        }
        let result = self.resume_saved(vm, tap, dir, &meta);
        if result.is_ok() {
            // The restored guest holds the host key it had when saved.
            let public = run.join(files::HOST_KEY_PUB);
            if std::fs::copy(dir.join(files::HOST_KEY_PUB), &public).is_err() {
                let _ = std::fs::remove_file(&public);
            }
        }
        if result.is_err() {
            let _ = std::fs::remove_file(&overlay);
            let _ = std::fs::remove_file(run.join(files::LAYERS));
        }
        result
    }

    /// Resume a VM stopped by `suspend_vm` on its own disk; its saved state is removed once it runs.
    pub(super) fn start_suspended(&self, vm: &VmSpec, tap: String) -> BackendResult<()> {
        let dir = vm.run_dir.join(files::SUSPENDED);
        let meta = self
            .check_saved_vm(vm, &dir)
            .map_err(|e| BackendError::msg(format!("cannot start stopped VM {}: {e}", vm.name)))?;
        self.resume_saved(vm, tap, &dir, &meta)?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// Delete the layers under `layers_dir` that no VM's active disk and no saved VM under `saved_dirs` uses.
    pub fn collect_layers_of(
        &self,
        vms: &[VmSpec],
        saved_dirs: &[PathBuf],
        layers_dir: &Path,
    ) -> BackendResult<()> {
        let Ok(entries) = std::fs::read_dir(layers_dir) else {
            return Ok(());
        };
        let mut used: Vec<PathBuf> = vms.iter().flat_map(|v| read_chain(&v.run_dir)).collect();
        for dir in saved_dirs {
            for vm_dir in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if let Ok(meta) = read_meta(&vm_dir.path()) {
                    used.extend(meta.layers);
                }
            }
        }
        let used: Vec<PathBuf> = used
            .iter()
            .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
            .collect();
        for e in entries.flatten() {
            let p = e.path().canonicalize().unwrap_or_else(|_| e.path());
            if !used.contains(&p) {
                std::fs::remove_file(&p)?;
            }
        }
        Ok(())
    }
}
