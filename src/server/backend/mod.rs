//! How VMs are run. The orchestrator only talks to this trait; `qemu` runs real VMs, `process` is a test backend
//! whose "VMs" are local processes serving HTTP on loopback (for control-plane tests; never the server default).
//!
//! Every method is blocking: the orchestrator calls them from `spawn_blocking`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::api::Subnet;
use crate::server::images::{Image, VmTemplate};

pub mod process;
pub mod qemu;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{message}")]
    Failed {
        message: String,
        /// The last lines of the VM's log (qemu stderr/serial), for the user.
        log_tail: Option<String>,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl BackendError {
    pub fn msg(message: impl Into<String>) -> Self {
        BackendError::Failed {
            message: message.into(),
            log_tail: None,
        }
    }
}

pub type BackendResult<T> = Result<T, BackendError>;

/// Bytes a file or folder takes on disk (allocated blocks: sparse files count what they hold; a file with
/// several names counts once).
pub fn disk_usage(path: &Path) -> u64 {
    fn walk(path: &Path, seen: &mut std::collections::HashSet<(u64, u64)>) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return 0;
        };
        if meta.is_dir() {
            std::fs::read_dir(path)
                .map(|entries| entries.flatten().map(|e| walk(&e.path(), seen)).sum())
                .unwrap_or(0)
        } else if seen.insert((meta.dev(), meta.ino())) {
            meta.blocks() * 512
        } else {
            0
        }
    }
    walk(path, &mut std::collections::HashSet::new())
}

/// One engineer's network: a /24 with the host gateway on `.1`.
#[derive(Debug, Clone)]
pub struct NamespaceNet {
    /// The namespace name (a DNS label, e.g. `alice`).
    pub name: String,
    /// Stable small integer, unique per namespace; use it for bridge/tap names (`fcbr<index>`, `fct<index>v<slot>`).
    pub index: u32,
    pub subnet: Subnet,
    pub gateway: Ipv4Addr,
}

/// Everything a backend needs to start one VM of a cluster.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub namespace: NamespaceNet,
    pub cluster: String,
    /// Position in the image template (0-based); the address is `.10 + slot`.
    pub slot: u32,
    pub name: String,
    pub address: Ipv4Addr,
    pub mac: String,
    pub image: Image,
    pub template: VmTemplate,
    /// The VM's own folder: overlay disk, sockets, pid file, logs. Created by the orchestrator; the backend owns
    /// what is inside it. Removing the folder must be enough to forget the VM once it is stopped.
    pub run_dir: PathBuf,
    /// Engineers' ssh public keys to authorize inside the guest (never baked into the shared image).
    pub ssh_keys: Vec<String>,
    /// The cluster's VMs by name (short name first, then the others such as `n1.alice.fcdev`) and address:
    /// the guest's /etc/hosts, so services find each other by name after any re-addressing.
    pub hosts: Vec<(Vec<String>, Ipv4Addr)>,
    /// A named snapshot's saved VM (see `save`) to start from instead of the onboarding snapshot
    /// (`fcdev snapshot restore`).
    pub restore_from: Option<PathBuf>,
}

impl VmSpec {
    /// The number of the VM's tap (`fct<namespace>v<n>`): the host part of its address, unique in its namespace
    /// across all its clusters (the template slot is not: two clusters of one engineer both have a slot 0).
    pub fn tap_number(&self) -> u32 {
        u32::from(self.address.octets()[3])
    }
}

/// How a VM was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// Restored from the image's onboarding snapshot.
    Restore,
    /// Booted from the kernel/disk.
    Boot,
    /// Resumed from a saved state: a named snapshot, or its own state after `fcdev stop`.
    Resume,
}

impl StartMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StartMode::Restore => "restore",
            StartMode::Boot => "boot",
            StartMode::Resume => "resume",
        }
    }
}

pub trait Backend: Send + Sync {
    /// Short name for logs and `/v1/health` (`qemu`, `process`).
    fn kind(&self) -> &'static str;

    /// The accelerator in use (`kvm`, `tcg`, or `none`), reported by `/v1/health`.
    fn accelerator(&self) -> String {
        "none".to_string()
    }

    /// How long a VM may take to pass its probe once `start` returned (per image and start mode; a boot is
    /// slower under TCG).
    fn ready_deadline(&self, _vm: &VmSpec, _mode: StartMode) -> std::time::Duration {
        std::time::Duration::from_secs(60)
    }

    /// Create the namespace's bridge/isolation (idempotent).
    fn ensure_namespace(&self, ns: &NamespaceNet) -> BackendResult<()>;

    /// Remove the namespace's bridge/isolation (idempotent; called when it has no VMs left).
    fn remove_namespace(&self, ns: &NamespaceNet) -> BackendResult<()>;

    /// Start one VM: create its disk overlay if missing, then restore the onboarding snapshot when the image has
    /// one, else boot. A restore returns once the guest runs and its agent confirmed its identity; a boot once
    /// qemu runs. It boots instead of restoring only when the snapshot cannot be used at all (none for this
    /// accelerator, a disk already in use, qemu refusing the state); a slow restore is an error, never a boot.
    /// Never waits for the probe and never retries: readiness, deadlines and retries belong to the orchestrator.
    fn start(&self, vm: &VmSpec) -> BackendResult<StartMode>;

    /// Why the last `start` booted instead of restoring, when the image has a snapshot (for `fcdev status`).
    fn start_detail(&self, _vm: &VmSpec) -> Option<String> {
        None
    }

    /// Whether the VM answers its readiness probe right now (must return quickly, ~1 s at most).
    fn probe(&self, vm: &VmSpec) -> bool;

    /// Whether the VM's process is alive (used to notice killed VMs and to re-adopt after a server restart).
    fn is_running(&self, vm: &VmSpec) -> bool;

    /// Stop the VM and remove its runtime files (sockets, pid file); keeps the disk overlay.
    fn stop(&self, vm: &VmSpec) -> BackendResult<()>;

    /// Throw the VM's disk overlay away (reset / delete). The VM is stopped first by the caller.
    fn discard_disk(&self, vm: &VmSpec) -> BackendResult<()>;

    /// Stop the VM and throw its disk away, to start it again at once (reset, restore of a named snapshot):
    /// nothing of the running VM is kept, so a backend may skip a graceful shutdown and keep its network
    /// plumbing for the next start.
    fn stop_discarding(&self, vm: &VmSpec) -> BackendResult<()> {
        self.stop(vm)?;
        self.discard_disk(vm)
    }

    /// The last lines of the VM's log, for error messages.
    fn log_tail(&self, vm: &VmSpec) -> Option<String>;

    /// The VM's ssh host public key (`ssh-ed25519 AAAA…`) when the backend made it, from the VM's run dir (no
    /// guest I/O: cheap enough for every status view). None when the guest made its own.
    fn host_key(&self, _run_dir: &Path) -> Option<String> {
        None
    }

    /// The file the VM's console (its serial port, or the test VM's output) is written to, for `fcdev logs`.
    /// It may not exist yet; a restart of the VM may start it over.
    fn console_log(&self, vm: &VmSpec) -> Option<PathBuf>;

    /// Run `command` in the VM, handing its output to `out` as it comes (`out` returning false stops it);
    /// returns its exit code. Blocks until the command ends. A backend may call `out(&[])` now and then while
    /// the command prints nothing: it only asks whether the command is still wanted (false: stop it).
    fn exec(
        &self,
        _vm: &VmSpec,
        _command: &str,
        _out: &mut dyn FnMut(&[u8]) -> bool,
    ) -> BackendResult<i32> {
        Err(BackendError::msg(format!(
            "the {} backend cannot run commands in VMs",
            self.kind()
        )))
    }

    // Saved VMs (named snapshots, stopped clusters). A consistent cluster snapshot pauses every VM, saves each,
    // then resumes them all; the orchestrator owns that order, the backend one VM at a time.

    /// Pause a running VM.
    fn pause(&self, vm: &VmSpec) -> BackendResult<()> {
        Err(self.cannot_save(vm))
    }

    /// Resume a paused VM and set its clock.
    fn resume(&self, vm: &VmSpec) -> BackendResult<()> {
        Err(self.cannot_save(vm))
    }

    /// Save a paused VM into `dir` (created empty by the caller): memory and device state, and its disk captured
    /// without a copy (a layer kept under `layers`, shared by the cluster's snapshots). The VM stays paused.
    /// Returns the bytes the saved VM adds on disk.
    fn save(&self, vm: &VmSpec, _dir: &Path, _layers: &Path) -> BackendResult<u64> {
        Err(self.cannot_save(vm))
    }

    /// Whether the saved VM in `dir` can be started here (same image, same qemu); the reason when not. Touches
    /// nothing.
    fn check_saved(&self, vm: &VmSpec, _dir: &Path) -> BackendResult<()> {
        Err(self.cannot_save(vm))
    }

    /// Save a paused VM's memory and device state next to its disk and end its process (`fcdev stop`); the next
    /// `start` resumes it. Returns the bytes the state takes.
    fn suspend(&self, vm: &VmSpec) -> BackendResult<u64> {
        Err(self.cannot_save(vm))
    }

    /// Delete the disk layers under `layers` that neither a VM's disk nor a saved VM under `saved` needs.
    fn collect_layers(
        &self,
        _vms: &[VmSpec],
        _saved: &[PathBuf],
        _layers: &Path,
    ) -> BackendResult<()> {
        Ok(())
    }

    /// The error of a backend that cannot save VMs.
    fn cannot_save(&self, vm: &VmSpec) -> BackendError {
        BackendError::msg(format!(
            "the {} backend cannot save or resume VM {}",
            self.kind(),
            vm.name
        ))
    }
}
