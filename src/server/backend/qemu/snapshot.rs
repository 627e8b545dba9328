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

/// A cluster snapshot's disk layer of one VM (its boot-time writes, on the image's base disk).
pub const DISK: &str = "disk.qcow2";

impl Found {
    /// The disk the snapshot's memory expects, when the snapshot has its own layer (cluster snapshots): a
    /// restored VM's overlay must sit on exactly this, fresh.
    pub fn disk(&self) -> Option<PathBuf> {
        let p = self.dir.join(DISK);
        p.is_file().then_some(p)
    }

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

/// A guest counts as idle when its qemu uses less than this share of a core over [`QUIET_WINDOW`].
const QUIET_SHARE: f64 = 0.12;
const QUIET_WINDOW: Duration = Duration::from_secs(2);

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Wait until every process uses less than `share` of a core over one window, or `limit` passes (false).
fn wait_quiet(pids: &[i32], share: f64, limit: Duration) -> bool {
    let tick = 1.0 / (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64);
    let start = Instant::now();
    while start.elapsed() < limit {
        let before: Vec<Option<u64>> = pids.iter().map(|p| cpu_ticks(*p)).collect();
        std::thread::sleep(QUIET_WINDOW);
        let busy = pids
            .iter()
            .zip(&before)
            .any(|(p, b)| match (b, cpu_ticks(*p)) {
                (Some(b), Some(a)) => {
                    (a.saturating_sub(*b) as f64 * tick) > share * QUIET_WINDOW.as_secs_f64()
                }
                _ => false,
            });
        if !busy {
            return true;
        }
    }
    false
}

/// How a cluster snapshot is taken; a change that makes older snapshots worse to restore bumps it, so their key
/// no longer matches and `fcdev image snapshot` (or the press test) takes a new one.
/// 2: every guest's dirty pages are written to its disk before the save.
const CLUSTER_PROCEDURE: u32 = 2;

/// The key of a cluster snapshot: every VM's shape, role and check, the accelerator and the procedure.
pub fn cluster_key(image: &Image, accel: Accel) -> String {
    let mut h = Sha256::new();
    h.update(b"cluster\0");
    h.update(CLUSTER_PROCEDURE.to_le_bytes());
    for t in &image.spec.vms {
        h.update(key(t, accel).as_bytes());
        for part in [&t.name, &t.role, t.check.as_deref().unwrap_or("")] {
            h.update(part.as_bytes());
            h.update([0u8]);
        }
    }
    hex::encode(&h.finalize()[..6])
}

/// The snapshot to restore `template` from, when the image has a usable one.
pub fn find(image: &Image, template: &VmTemplate, accel: Accel) -> Option<Found> {
    let cluster = image.spec.snapshot.as_ref().is_some_and(|s| s.cluster);
    let dir = if cluster {
        image
            .snapshot_dir()?
            .join(cluster_key(image, accel))
            .join(&template.name)
    } else {
        image.snapshot_dir()?.join(key(template, accel))
    };
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

/// Save the state of a paused guest to `state` and wait until the migration completed. `ignore_shared`: the
/// guest RAM is already in the shared memory file (onboarding snapshots), so only the device state is written;
/// else (saved VMs, `saved.rs`) every non-zero RAM page goes into the stream too.
pub(super) fn save_paused(
    q: &mut qmp::Qmp,
    state: &Path,
    ignore_shared: bool,
) -> Result<(), qmp::QmpError> {
    let t0 = Instant::now();
    q.set_capability("x-ignore-shared", ignore_shared)?;
    // qemu's default migration bandwidth is 32 MiB/s: a local file takes what the disk gives.
    q.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 8u64 << 30 }),
    )?;
    let uri = format!("exec:cat > {}", super::cmdline::shell_quote(state));
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
}

/// The placeholder address of VM `slot` in a cluster snapshot (TEST-NET-1, never routed).
fn cluster_ip(slot: usize) -> String {
    format!("192.0.2.{}", 10 + slot)
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
        let result =
            qmp::Qmp::connect(&run.join(files::QMP), Duration::from_secs(5)).and_then(|mut q| {
                q.execute("stop", json!({}))?;
                save_paused(&mut q, &dir.join(STATE), true)
            });
        // SIGKILL right away, also on failure.
        proc::kill9(pid);
        proc::wait_gone(pid, &run, Duration::from_secs(5));
        let save_ms = t0.elapsed().as_millis() as u64;
        // The boot this snapshot comes from: the start of every restored VM's console log.
        let _ = std::fs::copy(run.join(files::CONSOLE), dir.join(files::CONSOLE));
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

/// One VM of a cluster snapshot while it is taken.
struct Member {
    name: String,
    dir: PathBuf,
    run: PathBuf,
    pid: i32,
}

impl QemuBackend {
    /// The onboarding snapshot of a whole cluster (`[snapshot] cluster = true`): boot every VM of the template
    /// on a private switch with placeholder addresses (192.0.2.10 + slot) and the cluster's name map, wait until
    /// each agent answers and each VM's `check` passes (the services work together), pause **every** VM, then
    /// save each one's device state, and SIGKILL them. Each VM keeps its own memory file and its own disk layer
    /// (`disk.qcow2` on the image's base disk, with a relative backing path), under `out_root/<cluster key>/<vm>/`.
    pub fn take_cluster_snapshot(
        &self,
        image: &Image,
        out_root: &Path,
        progress: &dyn Fn(&str),
    ) -> BackendResult<Vec<Meta>> {
        use base64::Engine;
        let key = cluster_key(image, self.accel());
        let dir = out_root.join(&key);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        let dir = dir.canonicalize()?;
        let switch = super::switch::Switch::start(&dir.join("switch.sock"))?;
        let hosts: String = image
            .spec
            .vms
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{} {}\n", cluster_ip(i), t.name))
            .collect();
        let hosts_b64 = base64::engine::general_purpose::STANDARD.encode(hosts);
        let mut members: Vec<Member> = Vec::new();
        let kill_all = |members: &[Member]| {
            for m in members {
                proc::kill9(m.pid);
            }
            for m in members {
                proc::wait_gone(m.pid, &m.run, Duration::from_secs(5));
            }
        };
        let started = Instant::now();
        for (i, template) in image.spec.vms.iter().enumerate() {
            let vm_dir = dir.join(&template.name);
            let run = vm_dir.join("run");
            std::fs::create_dir_all(&run)?;
            let (kernel, initrd) = Self::kernel_paths(image, template)?;
            let disk = match &template.disk {
                Some(d) => {
                    let layer = vm_dir.join(DISK);
                    self.create_overlay(&image.path(d), &layer)?;
                    Some(layer)
                }
                None => None,
            };
            let append = format!(
                "{} fcdev.snapshot=1 fcdev.ip={}/24 fcdev.gw={SNAPSHOT_GW} fcdev.name={} fcdev.ns=snapshot fcdev.role={} fcdev.hosts={hosts_b64}",
                template.cmdline.trim(),
                cluster_ip(i),
                template.name,
                if template.role.is_empty() { "-" } else { &template.role },
            );
            let launch = Launch {
                accel: self.accel(),
                name: format!("snapshot-{key}-{}", template.name),
                vcpus: template.vcpus,
                memory_mb: template.memory_mb,
                kernel,
                initrd,
                append,
                disk,
                net: Net::Switch(dir.join("switch.sock")),
                mac: format!("52:54:00:fc:fe:{:02x}", 10 + i),
                memory: Memory::File {
                    path: vm_dir.join(MEM),
                    share: true,
                },
                incoming: false,
                run_dir: run.clone(),
            };
            match self.launch(&launch) {
                Ok(pid) => members.push(Member {
                    name: template.name.clone(),
                    dir: vm_dir,
                    run,
                    pid,
                }),
                Err(e) => {
                    kill_all(&members);
                    return Err(e);
                }
            }
            std::fs::write(
                members[members.len() - 1].dir.join("append"),
                &launch.append,
            )?;
            if !write_kernel_stub(
                &launch.kernel,
                &members[members.len() - 1].dir.join(KERNEL_STUB),
            )? {
                tracing::info!("kernel is not a bzImage: restores load the full kernel");
            }
        }
        progress(&format!("booting {} VMs", members.len()));
        // Boot under TCG on a small host is slow: several systemd guests share the cores.
        // Six Debian guests booting on a busy 2-core host under TCG took up to ~300 s; this runs once per recipe.
        let deadline = Duration::from_secs(900);
        let failed = |members: &[Member], m: &Member, why: String| {
            let tail = super::log_tail_of(&m.run);
            kill_all(members);
            BackendError::Failed {
                message: format!("snapshot VM {}: {why}", m.name),
                log_tail: tail,
            }
        };
        for m in &members {
            let left = deadline.saturating_sub(started.elapsed());
            if let Err(e) = agent::ping(&m.run.join(files::AGENT), left) {
                return Err(failed(&members, m, format!("agent never answered ({e})")));
            }
        }
        progress(&format!(
            "agents up after {:.0} s; checking services",
            started.elapsed().as_secs_f64()
        ));
        for (m, template) in members.iter().zip(&image.spec.vms) {
            let Some(check) = &template.check else {
                continue;
            };
            let mut last;
            loop {
                match agent::run(&m.run.join(files::AGENT), check, Duration::from_secs(30)) {
                    Ok((0, _)) => break,
                    Ok((rc, out)) => last = format!("exit {rc}: {}", out.trim()),
                    Err(e) => last = e.to_string(),
                }
                if started.elapsed() > deadline {
                    return Err(failed(
                        &members,
                        m,
                        format!("check `{check}` did not pass: {last}"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        progress(&format!(
            "every check passed after {:.0} s; saving",
            started.elapsed().as_secs_f64()
        ));
        // Write every guest's dirty pages now: pages still dirty in the saved RAM would be written back by every
        // restore (the guest's flusher wakes within 5 s of it, ext4's writeback code running for the first time
        // under TCG while the cluster starts).
        for m in &members {
            if let Err(e) = agent::run(&m.run.join(files::AGENT), "sync", Duration::from_secs(60))
                .map_err(|e| e.to_string())
                .and_then(|(rc, out)| match rc {
                    0 => Ok(()),
                    _ => Err(format!("exit {rc}: {}", out.trim())),
                })
            {
                return Err(failed(&members, m, format!("sync: {e}")));
            }
        }
        // Let late boot work settle (module loads, first scrapes, caches warming): whatever a guest still does
        // when it is saved, every restore does again. Then freeze every VM before saving any.
        let pids: Vec<i32> = members
            .iter()
            .filter_map(|m| proc::read_pid(&m.run))
            .collect();
        let quiet = wait_quiet(&pids, QUIET_SHARE, Duration::from_secs(120));
        progress(&format!(
            "{} after {:.0} s",
            if quiet {
                "guests idle"
            } else {
                "guests still busy"
            },
            started.elapsed().as_secs_f64()
        ));
        let t0 = Instant::now();
        let mut qmps = Vec::new();
        for m in &members {
            match qmp::Qmp::connect(&m.run.join(files::QMP), Duration::from_secs(5))
                .and_then(|mut q| q.execute("stop", json!({})).map(|_| q))
            {
                Ok(q) => qmps.push(q),
                Err(e) => return Err(failed(&members, m, format!("pause: {e}"))),
            }
        }
        for (m, q) in members.iter().zip(qmps.iter_mut()) {
            if let Err(e) = save_paused(q, &m.dir.join(STATE), true) {
                return Err(failed(&members, m, format!("save: {e}")));
            }
        }
        let save_ms = t0.elapsed().as_millis() as u64;
        kill_all(&members);
        drop(switch);
        let mut metas = Vec::new();
        for (m, template) in members.iter().zip(&image.spec.vms) {
            if let Ok(f) = std::fs::File::open(m.dir.join(MEM)) {
                let _ = f.sync_all();
            }
            if let Some(d) = &template.disk {
                // A relative backing path: the image folder can move.
                let base = image.path(d).canonicalize()?;
                let rel = PathBuf::from("../../..").join(base.file_name().unwrap_or_default());
                let out = std::process::Command::new(self.qemu_img())
                    .args(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
                    .arg(&rel)
                    .arg(m.dir.join(DISK))
                    .output()?;
                if !out.status.success() {
                    return Err(BackendError::msg(format!(
                        "qemu-img rebase of {}'s snapshot disk: {}",
                        m.name,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
            }
            let append = std::fs::read_to_string(m.dir.join("append"))?;
            std::fs::remove_file(m.dir.join("append"))?;
            let meta = Meta {
                key: key.clone(),
                vms: vec![m.name.clone()],
                accel: self.accel().to_string(),
                vcpus: template.vcpus,
                memory_mb: template.memory_mb,
                append,
                save_ms,
            };
            let text = toml::to_string(&meta)
                .map_err(|e| BackendError::msg(format!("snapshot meta: {e}")))?;
            std::fs::write(m.dir.join(META), text)?;
            let _ = std::fs::copy(m.run.join(files::CONSOLE), m.dir.join(files::CONSOLE));
            std::fs::remove_dir_all(&m.run)?;
            metas.push(meta);
        }
        Ok(metas)
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
            probe_after: Vec::new(),
            check: None,
            boot_secs: None,
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
