//! The cluster state machine: requested → cloning → booting → ready / failed; reset; delete; named snapshots
//! (saving, restoring); stop (stopping → stopped) and start; progress events.
//!
//! Every operation on one cluster holds that cluster's lock, so `up`, `reset` and `down` never interleave. State is
//! written to the store before each step, so a server killed mid-operation finds the cluster in a transient state
//! at start-up and drives it on (`recover`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::broadcast;

use crate::api::{self, ClusterState, VmState};
use crate::names;
use crate::server::backend::{disk_usage, Backend, NamespaceNet, StartMode, VmSpec};
use crate::server::images::{Catalog, Image, ImageError};
use crate::server::store::{
    ClusterRow, EventRow, NamespaceRow, NewVm, SnapshotRow, Store, StoreError, VmRow,
};

#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("cluster `{name}` already exists with image `{image}`")]
    ImageMismatch { name: String, image: String },
    #[error("cluster `{0}` not found")]
    NotFound(String),
    #[error("cluster `{name}` is busy: {what}")]
    Busy { name: String, what: String },
    #[error("no VM `{vm}` in cluster `{cluster}` (its VMs: {known})")]
    UnknownVm {
        vm: String,
        cluster: String,
        known: String,
    },
    #[error("cluster `{name}` is {state}")]
    NotRunning { name: String, state: String },
    #[error("snapshot `{name}` of cluster `{cluster}` not found")]
    SnapshotNotFound { cluster: String, name: String },
    #[error("cluster `{cluster}` already has a snapshot `{name}`")]
    SnapshotExists { cluster: String, name: String },
    #[error("snapshot `{name}` cannot be restored: {reason}")]
    Incompatible { name: String, reason: String },
    #[error("snapshots use {} of your {} quota{}", human(*.used), human(*.quota), .what)]
    Quota {
        used: u64,
        quota: u64,
        /// What pushed it over, when a save did.
        what: String,
        /// `cluster/name (size)`, largest first: what to remove.
        largest: Vec<String>,
    },
    #[error("{0}")]
    SaveFailed(String),
}

/// A save or a stop needs a ready cluster: busy while another operation runs, refused in any other state.
pub(crate) fn require_ready(cluster: &ClusterRow) -> Result<(), OrchestratorError> {
    match cluster.state {
        ClusterState::Ready => Ok(()),
        state if state.is_transient() => Err(OrchestratorError::Busy {
            name: cluster.name.clone(),
            what: format!("it is {}", state.as_str()),
        }),
        state => Err(OrchestratorError::NotRunning {
            name: cluster.name.clone(),
            state: state.as_str().to_string(),
        }),
    }
}

/// `1.2 GiB`
pub fn human(n: u64) -> String {
    let mut v = n as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if v < 1024.0 {
            return if unit == "B" {
                format!("{n} B")
            } else {
                format!("{v:.1} {unit}")
            };
        }
        v /= 1024.0;
    }
    format!("{v:.1} TiB")
}

/// What a drive does before it brings the VMs up.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DriveMode {
    /// Start what is not running (a stopped VM resumes its saved state).
    Up,
    /// Stop every VM and throw its disk away: back to the onboarding snapshot.
    Reset,
    /// Stop every VM, throw its disk away, start it from this named snapshot.
    Restore(String),
}

/// What `up` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpOutcome {
    /// A new cluster is being created.
    Created,
    /// An existing cluster is being (re)started or repaired.
    Resumed,
    /// The cluster was already ready; nothing to do.
    AlreadyReady,
}

pub struct Orchestrator {
    store: Arc<Store>,
    backend: Arc<dyn Backend>,
    catalog: Catalog,
    vms_dir: PathBuf,
    events: broadcast::Sender<EventRow>,
    locks: Mutex<HashMap<i64, Arc<tokio::sync::Mutex<()>>>>,
    /// Serializes health checks, so a request never reads a cluster while the watchdog is half-way marking it.
    refresh_lock: Mutex<()>,
    /// Admission control: VMs starting at once (a restore until its guest is configured, a boot until it is
    /// ready). Fair (FIFO), so a morning rush is served in order instead of starving every VM at once.
    start_slots: Arc<tokio::sync::Semaphore>,
    /// VMs waiting for a start slot (for "queued (n ahead)").
    queued: std::sync::atomic::AtomicUsize,
    /// Named snapshots: `<snapshots_dir>/<namespace>/<cluster>/<name>/<vm>/`, disk layers in `…/<cluster>/.layers/`.
    snapshots_dir: PathBuf,
    /// Bytes of snapshots one engineer may keep (0: no limit).
    snapshot_quota: u64,
}

/// The backend's view of a namespace row.
pub fn namespace_net(ns: &NamespaceRow) -> NamespaceNet {
    NamespaceNet {
        name: ns.name.clone(),
        index: ns.index,
        subnet: ns.subnet,
        gateway: ns.gateway(),
    }
}

/// `<vm>.<namespace>.fcdev` for the default cluster, `<vm>.<cluster>.<namespace>.fcdev` for the others.
pub fn hostname(vm: &str, cluster: &str, namespace: &str) -> String {
    if cluster == names::DEFAULT_CLUSTER {
        names::vm_hostname(vm, namespace)
    } else {
        names::vm_hostname(&format!("{vm}.{cluster}"), namespace)
    }
}

impl Orchestrator {
    pub fn new(
        store: Arc<Store>,
        backend: Arc<dyn Backend>,
        catalog: Catalog,
        vms_dir: PathBuf,
        max_starts: usize,
        snapshots_dir: PathBuf,
        snapshot_quota: u64,
    ) -> Arc<Orchestrator> {
        let (events, _) = broadcast::channel(1024);
        let max_starts = if max_starts == 0 {
            (4 * std::thread::available_parallelism().map_or(2, |n| n.get())).max(8)
        } else {
            max_starts
        };
        Arc::new(Orchestrator {
            store,
            backend,
            catalog,
            vms_dir,
            events,
            locks: Mutex::new(HashMap::new()),
            refresh_lock: Mutex::new(()),
            start_slots: Arc::new(tokio::sync::Semaphore::new(max_starts)),
            queued: std::sync::atomic::AtomicUsize::new(0),
            snapshots_dir,
            snapshot_quota,
        })
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn subscribe(&self) -> broadcast::Receiver<EventRow> {
        self.events.subscribe()
    }

    fn lock_for(&self, cluster_id: i64) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(cluster_id).or_default().clone()
    }

    fn emit(&self, cluster_id: i64, vm: Option<&str>, state: &str, message: &str) {
        match self.store.add_event(cluster_id, vm, state, message) {
            Ok(event) => {
                let _ = self.events.send(event);
            }
            Err(e) => tracing::warn!("cannot record event: {e}"),
        }
    }

    fn set_cluster(&self, c: &ClusterRow, state: ClusterState, reason: Option<&str>) {
        let message = match (state, reason) {
            (_, Some(reason)) => reason.to_string(),
            (ClusterState::Ready, None) => "every VM is ready".to_string(),
            (ClusterState::Saving, None) => "saving a snapshot: pausing every VM".to_string(),
            (state, None) => format!("cluster is {}", state.as_str()),
        };
        // State and event in one transaction: an event stream that reads a final state finds its event stored.
        match self
            .store
            .set_cluster_state_event(c.id, state, reason, &message)
        {
            Ok(event) => {
                let _ = self.events.send(event);
            }
            Err(e) => tracing::error!("cannot record state of cluster {}: {e}", c.name),
        }
    }

    fn set_vm(&self, c: &ClusterRow, vm: &VmRow, state: VmState, detail: Option<&str>) {
        if let Err(e) = self.store.set_vm_state(vm.id, state, detail) {
            tracing::error!("cannot record state of VM {}: {e}", vm.name);
        }
        self.emit(
            c.id,
            Some(&vm.name),
            state.as_str(),
            detail.unwrap_or(state.as_str()),
        );
    }

    fn run_dir_of(&self, ns: &NamespaceRow, c: &ClusterRow, vm: &str) -> PathBuf {
        self.vms_dir.join(&ns.name).join(&c.name).join(vm)
    }

    fn vm_spec(&self, ns: &NamespaceRow, c: &ClusterRow, vm: &VmRow, image: &Image) -> VmSpec {
        let template = image
            .spec
            .vms
            .iter()
            .find(|t| t.name == vm.name)
            .or_else(|| image.spec.vms.get(vm.slot as usize))
            .cloned()
            .unwrap_or_else(|| image.spec.vms[0].clone());
        let hosts = self
            .store
            .vms_of(c.id)
            .unwrap_or_default()
            .iter()
            .map(|v| {
                (
                    vec![v.name.clone(), hostname(&v.name, &c.name, &ns.name)],
                    v.address,
                )
            })
            .collect();
        VmSpec {
            hosts,
            namespace: namespace_net(ns),
            cluster: c.name.clone(),
            slot: vm.slot,
            name: vm.name.clone(),
            address: vm.address,
            mac: vm.mac.clone(),
            image: image.clone(),
            template,
            run_dir: self.run_dir_of(ns, c, &vm.name),
            ssh_keys: self.store.ssh_keys(ns.id).unwrap_or_default(),
            restore_from: None,
        }
    }

    /// The spec of one VM of a cluster, by name (for commands run in it); an unknown name lists the VMs there are.
    pub fn spec_of(
        &self,
        ns: &NamespaceRow,
        c: &ClusterRow,
        vm_name: &str,
    ) -> Result<VmSpec, OrchestratorError> {
        let vms = self.store.vms_of(c.id)?;
        let Some(vm) = vms.iter().find(|v| v.name == vm_name) else {
            return Err(OrchestratorError::UnknownVm {
                vm: vm_name.to_string(),
                cluster: c.name.clone(),
                known: vms
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let image = self.catalog.get(&c.image)?;
        Ok(self.vm_spec(ns, c, vm, &image))
    }

    /// Create the cluster, or resume/repair it when it exists. Returns at once; the work goes on in the background.
    pub fn up(
        self: &Arc<Self>,
        ns: &NamespaceRow,
        name: &str,
        image_name: &str,
    ) -> Result<(ClusterRow, UpOutcome), OrchestratorError> {
        if let Some(existing) = self.store.cluster(ns.id, name)? {
            if existing.image != image_name {
                return Err(OrchestratorError::ImageMismatch {
                    name: name.to_string(),
                    image: existing.image,
                });
            }
            let healthy = existing.state == ClusterState::Ready && self.refresh(&existing)?;
            if healthy {
                return Ok((existing, UpOutcome::AlreadyReady));
            }
            let cluster = self.store.cluster_by_id(existing.id)?.unwrap_or(existing);
            let busy = self.lock_for(cluster.id).try_lock().is_err();
            if cluster.state == ClusterState::Deleting {
                if !busy {
                    // A delete that was cut off (client gone, error): finish it.
                    self.spawn_delete(cluster.clone());
                }
                return Err(OrchestratorError::Busy {
                    name: name.to_string(),
                    what: "it is being deleted".into(),
                });
            }
            // A transient cluster with an operation holding it will be brought up by that operation; anything
            // else (failed, a dead VM) gets a drive, which waits for the lock if a health check holds it.
            if !(busy && cluster.state.is_transient()) {
                if !cluster.state.is_transient() {
                    // Recorded before the 202: an event stream opened after it must not take the old final state
                    // (failed) for the outcome of this request.
                    self.set_cluster(&cluster, ClusterState::Requested, None);
                }
                self.spawn_drive(cluster.id, DriveMode::Up);
            }
            return Ok((cluster, UpOutcome::Resumed));
        }
        let image = self.catalog.get(image_name)?;
        let vms: Vec<NewVm<'_>> = image
            .spec
            .vms
            .iter()
            .map(|t| NewVm {
                name: &t.name,
                role: &t.role,
            })
            .collect();
        let cluster = match self.store.create_cluster(ns, name, image_name, &vms) {
            Ok(cluster) => cluster,
            // Another `up` created it a moment ago: join it.
            Err(StoreError::Exists(_)) => return self.up(ns, name, image_name),
            Err(e) => return Err(e.into()),
        };
        self.emit(
            cluster.id,
            None,
            ClusterState::Requested.as_str(),
            &format!("cluster requested from image {image_name}"),
        );
        self.spawn_drive(cluster.id, DriveMode::Up);
        Ok((cluster, UpOutcome::Created))
    }

    /// Reset a ready or failed cluster; refused while another operation runs on it (its events would be taken
    /// for the reset's).
    pub fn reset(self: &Arc<Self>, cluster: &ClusterRow) -> Result<(), OrchestratorError> {
        if cluster.state.is_transient() {
            return Err(OrchestratorError::Busy {
                name: cluster.name.clone(),
                what: format!("it is {}", cluster.state.as_str()),
            });
        }
        self.set_cluster(cluster, ClusterState::Resetting, None);
        self.spawn_drive(cluster.id, DriveMode::Reset);
        Ok(())
    }

    /// Delete in a task of its own, so a client that goes away mid-delete does not cut it off.
    pub fn spawn_delete(
        self: &Arc<Self>,
        cluster: ClusterRow,
    ) -> tokio::task::JoinHandle<Result<(), OrchestratorError>> {
        let this = self.clone();
        tokio::spawn(async move { this.delete(&cluster).await })
    }

    fn spawn_drive(self: &Arc<Self>, cluster_id: i64, mode: DriveMode) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.drive(cluster_id, mode).await {
                tracing::error!("cluster #{cluster_id}: {e}");
            }
        });
    }

    /// Bring every VM of the cluster to ready (after throwing disks away for a reset or a snapshot restore).
    async fn drive(
        self: Arc<Self>,
        cluster_id: i64,
        mode: DriveMode,
    ) -> Result<(), OrchestratorError> {
        let lock = self.lock_for(cluster_id);
        let _guard = lock.lock().await;
        let Some(cluster) = self.store.cluster_by_id(cluster_id)? else {
            return Ok(()); // deleted meanwhile
        };
        if cluster.state == ClusterState::Deleting {
            return Ok(());
        }
        let ns = self.store.namespace_by_id(cluster.namespace_id)?;
        let image = match self.catalog.get(&cluster.image) {
            Ok(image) => image,
            Err(e) => {
                self.set_cluster(&cluster, ClusterState::Failed, Some(&e.to_string()));
                return Ok(());
            }
        };
        let vms = self.store.vms_of(cluster.id)?;
        let restore_from = match &mode {
            DriveMode::Restore(name) => Some(self.snapshot_dir(&ns, &cluster.name, name)),
            _ => None,
        };
        let specs: Vec<(VmRow, VmSpec)> = vms
            .iter()
            .map(|vm| {
                let mut spec = self.vm_spec(&ns, &cluster, vm, &image);
                spec.restore_from = restore_from.as_ref().map(|d| d.join(&vm.name));
                (vm.clone(), spec)
            })
            .collect();

        if mode != DriveMode::Up {
            // Stop every VM and drop its disk at once: they are independent.
            let tasks: Vec<_> = specs
                .iter()
                .map(|(vm, spec)| {
                    self.set_vm(&cluster, vm, VmState::Pending, Some("discarding disk"));
                    let backend = self.backend.clone();
                    let spec = spec.clone();
                    let name = vm.name.clone();
                    tokio::task::spawn_blocking(move || backend.stop_discarding(&spec))
                        .map(move |r| (name, r))
                })
                .collect();
            for (name, result) in futures::future::join_all(tasks).await {
                if let Some(err) = join_error(result) {
                    let what = match &mode {
                        DriveMode::Restore(snap) => format!("restore of snapshot {snap}"),
                        _ => "reset".to_string(),
                    };
                    let reason = format!("{what} of {name} failed: {err}");
                    self.set_cluster(&cluster, ClusterState::Failed, Some(&reason));
                    return Ok(());
                }
            }
        } else {
            self.set_cluster(&cluster, ClusterState::Cloning, None);
        }

        let backend = self.backend.clone();
        let net = namespace_net(&ns);
        let dirs: Vec<PathBuf> = specs.iter().map(|(_, s)| s.run_dir.clone()).collect();
        let prepared = tokio::task::spawn_blocking(move || {
            backend.ensure_namespace(&net)?;
            for dir in dirs {
                std::fs::create_dir_all(&dir)?;
            }
            Ok(())
        })
        .await;
        if let Some(err) = join_error(prepared) {
            let reason = format!("cannot prepare the namespace network: {err}");
            self.set_cluster(&cluster, ClusterState::Failed, Some(&reason));
            return Ok(());
        }

        self.set_cluster(&cluster, ClusterState::Booting, None);
        let started = Instant::now();
        // Which VMs of this cluster are settled (ready or failed): a VM's probe waits for its `probe_after`.
        let (settled, _) = tokio::sync::watch::channel(std::collections::HashSet::<String>::new());
        let tasks: Vec<_> = specs
            .into_iter()
            .map(|(vm, spec)| {
                let this = self.clone();
                let cluster = cluster.clone();
                let settled = settled.clone();
                tokio::spawn(async move {
                    let result = this
                        .bring_up_vm(&cluster, &vm, spec, settled.subscribe())
                        .await;
                    settled.send_modify(|s| {
                        s.insert(vm.name.clone());
                    });
                    result
                })
            })
            .collect();
        let mut failures = Vec::new();
        let mut modes = Vec::new();
        for task in tasks {
            match task.await {
                Ok(Ok(mode)) => modes.push(mode),
                Ok(Err(reason)) => failures.push(reason),
                Err(e) => failures.push(format!("internal error: {e}")),
            }
        }
        if let Some(mode) = modes.first() {
            let _ = self.store.set_start_mode(cluster.id, mode.as_str());
        }
        if mode != DriveMode::Up {
            // The disks of before are gone: their layers that no snapshot needs go too.
            let specs: Vec<VmSpec> = vms
                .iter()
                .map(|vm| self.vm_spec(&ns, &cluster, vm, &image))
                .collect();
            self.collect_garbage(&ns, &cluster, specs).await;
        }
        if failures.is_empty() {
            tracing::info!(
                "cluster {}/{} ready in {:.2}s",
                ns.name,
                cluster.name,
                started.elapsed().as_secs_f64()
            );
            self.set_cluster(&cluster, ClusterState::Ready, None);
        } else {
            self.set_cluster(&cluster, ClusterState::Failed, Some(&failures.join("\n")));
        }
        Ok(())
    }

    /// Wait for a start slot; says "queued (n ahead)" when the host is busy starting other VMs.
    async fn admit(&self, cluster: &ClusterRow, vm: &VmRow) -> tokio::sync::OwnedSemaphorePermit {
        use std::sync::atomic::Ordering;
        if let Ok(permit) = self.start_slots.clone().try_acquire_owned() {
            return permit;
        }
        let ahead = self.queued.fetch_add(1, Ordering::SeqCst);
        self.set_vm(
            cluster,
            vm,
            VmState::Pending,
            Some(&format!("queued ({ahead} ahead)")),
        );
        let permit = self.start_slots.clone().acquire_owned().await;
        self.queued.fetch_sub(1, Ordering::SeqCst);
        match permit {
            Ok(p) => p,
            // Never closed; a closed semaphore would only mean no admission control.
            Err(_) => Arc::new(tokio::sync::Semaphore::new(1))
                .try_acquire_owned()
                .expect("a fresh semaphore has a permit"),
        }
    }

    /// Start one VM (unless it already runs) and wait for its probe. The one owner of readiness and retries:
    /// the backend starts (a restore until the guest is configured, a boot until qemu runs), this waits for the
    /// probe with the deadline of that start mode, counted from when the VM runs (not from when it was
    /// queued), and retries once. A VM that failed is stopped, never left running. A retried restore starts
    /// from a fresh disk (its disk held only seconds of writes since the snapshot); a slow restore is never
    /// turned into a boot.
    async fn bring_up_vm(
        &self,
        cluster: &ClusterRow,
        vm: &VmRow,
        spec: VmSpec,
        mut settled: tokio::sync::watch::Receiver<std::collections::HashSet<String>>,
    ) -> Result<StartMode, String> {
        let mut last_reason = String::new();
        for attempt in 1..=2 {
            let backend = self.backend.clone();
            let s = spec.clone();
            let running = tokio::task::spawn_blocking(move || backend.is_running(&s))
                .await
                .unwrap_or(false);
            let mut started_detail = None;
            let (mode, slot) = if running {
                self.set_vm(
                    cluster,
                    vm,
                    VmState::Starting,
                    Some("already running, waiting for it"),
                );
                (StartMode::Boot, None)
            } else {
                let slot = self.admit(cluster, vm).await;
                let backend = self.backend.clone();
                let s = spec.clone();
                self.set_vm(cluster, vm, VmState::Starting, Some("starting"));
                let t0 = std::time::Instant::now();
                match tokio::task::spawn_blocking(move || backend.start(&s)).await {
                    Ok(Ok(mode)) => {
                        tracing::info!(
                            "vm {}/{}: started ({}) in {:.2}s",
                            cluster.name,
                            vm.name,
                            mode.as_str(),
                            t0.elapsed().as_secs_f64()
                        );
                        let what = match mode {
                            StartMode::Restore => "restored, waiting for its services".to_string(),
                            StartMode::Resume => "resumed, waiting for its services".to_string(),
                            StartMode::Boot => {
                                let backend = self.backend.clone();
                                let s = spec.clone();
                                tokio::task::spawn_blocking(move || backend.start_detail(&s))
                                    .await
                                    .ok()
                                    .flatten()
                                    .unwrap_or_else(|| "booting".to_string())
                            }
                        };
                        self.set_vm(cluster, vm, VmState::Starting, Some(&what));
                        if what.starts_with("booting: ") {
                            started_detail = Some(what);
                        }
                        // A restored guest costs no more than an idle one: free its slot now. A booting one
                        // keeps it until it is ready (a boot is several seconds of CPU).
                        (mode, (mode == StartMode::Boot).then_some(slot))
                    }
                    Ok(Err(e)) => {
                        last_reason = describe_backend_error(&vm.name, &e);
                        drop(slot);
                        self.stop_quietly(&spec).await;
                        if attempt == 1 {
                            self.set_vm(
                                cluster,
                                vm,
                                VmState::Starting,
                                Some("start failed, retrying"),
                            );
                        }
                        continue;
                    }
                    Err(e) => return Err(format!("{}: internal error: {e}", vm.name)),
                }
            };
            let deadline = self.backend.ready_deadline(&spec, mode);
            let after = &spec.template.probe_after;
            if !after.is_empty() {
                // Bounded by this VM's own deadline: a VM it waits for that never settles does not hold it.
                let _ = tokio::time::timeout(
                    deadline,
                    settled.wait_for(|s| after.iter().all(|name| s.contains(name))),
                )
                .await;
            }
            let t_probe = std::time::Instant::now();
            let ready = self.wait_ready(&spec, deadline).await;
            drop(slot);
            match ready {
                Ok(()) => {
                    tracing::info!(
                        "vm {}/{}: ready after {:.2}s of probes",
                        cluster.name,
                        vm.name,
                        t_probe.elapsed().as_secs_f64()
                    );
                    // A boot where a restore was expected keeps saying why (`fcdev status`).
                    let detail = match &started_detail {
                        Some(why) => format!("ready ({why})"),
                        None => "ready".to_string(),
                    };
                    self.set_vm(cluster, vm, VmState::Ready, Some(&detail));
                    return Ok(mode);
                }
                Err(reason) => {
                    let backend = self.backend.clone();
                    let s = spec.clone();
                    let tail = tokio::task::spawn_blocking(move || backend.log_tail(&s))
                        .await
                        .ok()
                        .flatten();
                    last_reason = match tail {
                        Some(tail) => format!("{}: {reason}\n--- log tail ---\n{tail}", vm.name),
                        None => format!("{}: {reason}", vm.name),
                    };
                    if attempt == 1 {
                        self.set_vm(
                            cluster,
                            vm,
                            VmState::Starting,
                            Some("not ready in time, retrying"),
                        );
                    }
                    self.stop_quietly(&spec).await;
                    // A retried restore starts on a fresh disk; a VM resumed after `stop` keeps its own.
                    if mode == StartMode::Restore || spec.restore_from.is_some() {
                        let backend = self.backend.clone();
                        let s = spec.clone();
                        let _ = tokio::task::spawn_blocking(move || backend.discard_disk(&s)).await;
                    }
                }
            }
        }
        self.set_vm(cluster, vm, VmState::Failed, Some(first_line(&last_reason)));
        Err(last_reason)
    }

    async fn wait_ready(&self, spec: &VmSpec, deadline: Duration) -> Result<(), String> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(20);
        loop {
            let backend = self.backend.clone();
            let s = spec.clone();
            let (ready, running) =
                tokio::task::spawn_blocking(move || (backend.probe(&s), backend.is_running(&s)))
                    .await
                    .unwrap_or((false, false));
            if ready {
                return Ok(());
            }
            if !running {
                return Err("the VM exited before it was ready".into());
            }
            if start.elapsed() > deadline {
                return Err(format!(
                    "not ready within {}s (probe `{}`)",
                    deadline.as_secs(),
                    spec.template.probe
                ));
            }
            tokio::time::sleep(delay).await;
            // A port check is free; an HTTP or SQL probe makes the guest's services work (nginx → app →
            // database under TCG): ask those less often.
            let cap = if spec.template.probe.starts_with("tcp:") {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(300)
            };
            delay = (delay * 2).min(cap);
        }
    }

    async fn stop_quietly(&self, spec: &VmSpec) {
        let backend = self.backend.clone();
        let s = spec.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || backend.stop(&s)).await {
            tracing::warn!("cannot stop VM {}: {e}", spec.name);
        }
    }

    /// Stop and forget the cluster: VMs, disks, folders, rows; the namespace network too when it was the last.
    pub async fn delete(self: &Arc<Self>, cluster: &ClusterRow) -> Result<(), OrchestratorError> {
        let lock = self.lock_for(cluster.id);
        let _guard = lock.lock().await;
        self.set_cluster(cluster, ClusterState::Deleting, None);
        let ns = self.store.namespace_by_id(cluster.namespace_id)?;
        let vms = self.store.vms_of(cluster.id)?;
        let image = self.catalog.get(&cluster.image).ok();
        let mut errors = Vec::new();
        for vm in &vms {
            // Without its image (removed, or being rebuilt) a VM is still stopped from its run folder: the
            // backend needs only the folder, the namespace and the slot for that.
            let stand_in = || Image {
                spec: crate::server::images::ImageSpec {
                    name: cluster.image.clone(),
                    description: String::new(),
                    vms: vec![crate::server::images::VmTemplate::named(&vm.name)],
                    snapshot: None,
                },
                dir: self.vms_dir.clone(),
            };
            let spec = match &image {
                Some(image) => self.vm_spec(&ns, cluster, vm, image),
                None => self.vm_spec(&ns, cluster, vm, &stand_in()),
            };
            let backend = self.backend.clone();
            let result = tokio::task::spawn_blocking(move || {
                backend.stop(&spec)?;
                backend.discard_disk(&spec)?;
                match std::fs::remove_dir_all(&spec.run_dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                    _ => Ok(()),
                }
            })
            .await;
            if let Some(err) = join_error(result) {
                errors.push(format!("{}: {err}", vm.name));
            }
        }
        if !errors.is_empty() {
            let reason = format!(
                "delete failed, run `fcdev down` again: {}",
                errors.join("; ")
            );
            self.set_cluster(cluster, ClusterState::Failed, Some(&reason));
            return Ok(());
        }
        let dirs = [
            self.vms_dir.join(&ns.name).join(&cluster.name),
            self.cluster_snapshots(&ns, &cluster.name),
        ];
        let _ = tokio::task::spawn_blocking(move || {
            for dir in dirs {
                let _ = std::fs::remove_dir_all(dir);
            }
        })
        .await;
        let deleted = self.store.delete_cluster(cluster.id)?;
        let _ = self.events.send(deleted);
        if self.store.clusters_in(ns.id)?.is_empty() {
            let backend = self.backend.clone();
            let net = namespace_net(&ns);
            if let Ok(Err(e)) =
                tokio::task::spawn_blocking(move || backend.remove_namespace(&net)).await
            {
                tracing::warn!("cannot remove the network of namespace {}: {e}", ns.name);
            }
        }
        Ok(())
    }

    /// A cluster's named snapshots and their disk layers: `<snapshots>/<namespace>/<cluster>/`.
    fn cluster_snapshots(&self, ns: &NamespaceRow, cluster: &str) -> PathBuf {
        self.snapshots_dir.join(&ns.name).join(cluster)
    }

    /// One named snapshot's folder (a sub-folder per VM). Names are DNS labels, so never `.layers` or `.tmp-…`.
    fn snapshot_dir(&self, ns: &NamespaceRow, cluster: &str, name: &str) -> PathBuf {
        self.cluster_snapshots(ns, cluster).join(name)
    }

    fn specs_of(
        &self,
        ns: &NamespaceRow,
        cluster: &ClusterRow,
    ) -> Result<Vec<VmSpec>, OrchestratorError> {
        let image = self.catalog.get(&cluster.image)?;
        Ok(self
            .store
            .vms_of(cluster.id)?
            .iter()
            .map(|vm| self.vm_spec(ns, cluster, vm, &image))
            .collect())
    }

    /// Run one blocking backend call on every VM at once; each VM's name with its result.
    async fn each_vm<T, F>(&self, specs: &[VmSpec], f: F) -> Vec<(String, Result<T, String>)>
    where
        T: Send + 'static,
        F: Fn(&dyn Backend, &VmSpec) -> crate::server::backend::BackendResult<T>
            + Send
            + Sync
            + Clone
            + 'static,
    {
        let tasks: Vec<_> = specs
            .iter()
            .map(|spec| {
                let backend = self.backend.clone();
                let spec = spec.clone();
                let f = f.clone();
                let name = spec.name.clone();
                tokio::task::spawn_blocking(move || f(backend.as_ref(), &spec)).map(move |r| {
                    let r = match r {
                        Ok(Ok(v)) => Ok(v),
                        Ok(Err(e)) => Err(describe_backend_error(&name, &e)),
                        Err(e) => Err(format!("{name}: internal error: {e}")),
                    };
                    (name, r)
                })
            })
            .collect();
        futures::future::join_all(tasks).await
    }

    /// Remove what no snapshot of the cluster needs any more: folders without a store row (a save cut off) and
    /// disk layers that neither a VM nor a snapshot uses. Under the cluster's lock.
    async fn collect_garbage(&self, ns: &NamespaceRow, cluster: &ClusterRow, specs: Vec<VmSpec>) {
        let names: Vec<String> = match self.store.snapshots_of(cluster.id) {
            Ok(rows) => rows.into_iter().map(|r| r.name).collect(),
            Err(e) => {
                tracing::warn!("cannot list the snapshots of {}: {e}", cluster.name);
                return;
            }
        };
        let root = self.cluster_snapshots(ns, &cluster.name);
        let backend = self.backend.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut kept = Vec::new();
            for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name == LAYERS_DIR {
                    continue;
                }
                if names.contains(&name) {
                    kept.push(entry.path());
                } else {
                    std::fs::remove_dir_all(entry.path())?;
                }
            }
            backend.collect_layers(&specs, &kept, &root.join(LAYERS_DIR))
        })
        .await;
        if let Some(err) = join_error(result) {
            tracing::warn!("cannot clean the snapshots of {}: {err}", cluster.name);
        }
    }

    /// Refuse when the engineer's snapshots take more than the quota (`adding`: the snapshot just saved, which
    /// counts already, and is what the message names).
    async fn check_quota(
        &self,
        ns: &NamespaceRow,
        adding: Option<(&str, u64)>,
    ) -> Result<(), OrchestratorError> {
        let quota = self.snapshot_quota;
        if quota == 0 {
            return Ok(());
        }
        let dir = self.snapshots_dir.join(&ns.name);
        let used = tokio::task::spawn_blocking(move || disk_usage(&dir))
            .await
            .unwrap_or(0);
        let over = match adding {
            None => used >= quota,
            Some(_) => used > quota,
        };
        if !over {
            return Ok(());
        }
        let largest = self
            .store
            .snapshots_in(ns.id)?
            .iter()
            .take(5)
            .map(|s| format!("{}/{} ({})", s.cluster, s.name, human(s.size_bytes)))
            .collect();
        Err(OrchestratorError::Quota {
            used,
            quota,
            what: adding
                .map(|(name, bytes)| {
                    format!(" with `{name}` ({}), which is not kept", human(bytes))
                })
                .unwrap_or_default(),
            largest,
        })
    }

    /// Save a named snapshot of a ready cluster: every VM paused, each one's memory, device state and disk saved,
    /// every VM resumed (its clock set). Files go to a temporary folder renamed at the end; the store row comes
    /// last, so a save cut off leaves no snapshot listed. Run it in a task of its own (`tokio::spawn`): a client
    /// that goes away must not leave the VMs paused.
    pub async fn save_snapshot(
        self: Arc<Self>,
        ns: NamespaceRow,
        cluster_id: i64,
        name: String,
    ) -> Result<SnapshotRow, OrchestratorError> {
        let lock = self.lock_for(cluster_id);
        let _guard = lock.lock().await;
        let cluster = self
            .store
            .cluster_by_id(cluster_id)?
            .ok_or_else(|| OrchestratorError::NotFound(format!("#{cluster_id}")))?;
        require_ready(&cluster)?;
        if self.store.snapshot(cluster.id, &name)?.is_some() {
            return Err(OrchestratorError::SnapshotExists {
                cluster: cluster.name.clone(),
                name,
            });
        }
        self.check_quota(&ns, None).await?;
        let specs = self.specs_of(&ns, &cluster)?;
        let root = self.cluster_snapshots(&ns, &cluster.name);
        let tmp = root.join(format!(".tmp-{name}"));
        let layers = root.join(LAYERS_DIR);
        let t0 = Instant::now();
        self.set_cluster(&cluster, ClusterState::Saving, None);
        let prepared = {
            let tmp = tmp.clone();
            tokio::task::spawn_blocking(move || {
                let _ = std::fs::remove_dir_all(&tmp);
                std::fs::create_dir_all(&tmp)
            })
            .await
        };
        let mut failure = match prepared {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("cannot create {}: {e}", tmp.display())),
            Err(e) => Some(format!("internal error: {e}")),
        };
        if failure.is_none() {
            let paused = self.each_vm(&specs, |b, s| b.pause(s)).await;
            failure = paused.into_iter().find_map(|(_, r)| r.err());
        }
        let mut bytes = 0;
        if failure.is_none() {
            self.emit(
                cluster.id,
                None,
                "saving",
                "every VM paused; saving memory and disks",
            );
            let (dir, layers) = (tmp.clone(), layers.clone());
            let saved = self
                .each_vm(&specs, move |b, s| b.save(s, &dir.join(&s.name), &layers))
                .await;
            for (_, r) in saved {
                match r {
                    Ok(n) => bytes += n,
                    Err(e) => failure = failure.or(Some(e)),
                }
            }
        }
        let resumed = self.each_vm(&specs, |b, s| b.resume(s)).await;
        let stuck: Vec<String> = resumed.into_iter().filter_map(|(_, r)| r.err()).collect();
        let after_state = |this: &Self| {
            if stuck.is_empty() {
                this.set_cluster(&cluster, ClusterState::Ready, None);
            } else {
                let reason = format!(
                    "after the snapshot a VM did not resume; `fcdev up` repairs the cluster: {}",
                    stuck.join("; ")
                );
                this.set_cluster(&cluster, ClusterState::Failed, Some(&reason));
            }
        };
        if let Some(reason) = failure {
            self.collect_garbage(&ns, &cluster, specs).await;
            after_state(&self);
            return Err(OrchestratorError::SaveFailed(format!(
                "saving snapshot `{name}` failed: {reason}"
            )));
        }
        let final_dir = root.join(&name);
        let renamed = {
            let (tmp, final_dir) = (tmp.clone(), final_dir.clone());
            tokio::task::spawn_blocking(move || std::fs::rename(tmp, final_dir)).await
        };
        if let Some(err) = match renamed {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        } {
            self.collect_garbage(&ns, &cluster, specs).await;
            after_state(&self);
            return Err(OrchestratorError::SaveFailed(format!(
                "saving snapshot `{name}` failed: {err}"
            )));
        }
        if let Err(e) = self.check_quota(&ns, Some((&name, bytes))).await {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(final_dir)).await;
            self.collect_garbage(&ns, &cluster, specs).await;
            after_state(&self);
            return Err(e);
        }
        let row = match self
            .store
            .add_snapshot(cluster.id, &name, &cluster.image, bytes)
        {
            Ok(row) => row,
            Err(e) => {
                self.collect_garbage(&ns, &cluster, specs).await;
                after_state(&self);
                return Err(e.into());
            }
        };
        self.emit(
            cluster.id,
            None,
            "saving",
            &format!(
                "snapshot {name} saved in {:.1}s ({} on disk)",
                t0.elapsed().as_secs_f64(),
                human(bytes)
            ),
        );
        after_state(&self);
        Ok(row)
    }

    /// At start-up, for a save a previous server did not finish: resume the VMs, drop the half snapshot.
    fn spawn_resume_after_save(self: &Arc<Self>, cluster: ClusterRow) {
        let this = self.clone();
        tokio::spawn(async move {
            let lock = this.lock_for(cluster.id);
            let _guard = lock.lock().await;
            let Ok(ns) = this.store.namespace_by_id(cluster.namespace_id) else {
                return;
            };
            let Ok(specs) = this.specs_of(&ns, &cluster) else {
                return;
            };
            for (vm, r) in this.each_vm(&specs, |b, s| b.resume(s)).await {
                if let Err(e) = r {
                    tracing::warn!("resuming {vm} after a cut-off save: {e}");
                }
            }
            this.collect_garbage(&ns, &cluster, specs).await;
            // Ready; the health check notices a VM that did not survive.
            this.set_cluster(&cluster, ClusterState::Ready, None);
        });
    }

    /// Restore a named snapshot: checks that every saved VM can be resumed here (same image, same qemu) before
    /// touching anything, then drives the cluster (`restoring`): every VM stopped, its disk thrown away, resumed
    /// from the snapshot. Returns at once after the checks.
    pub async fn restore_snapshot(
        self: &Arc<Self>,
        ns: &NamespaceRow,
        cluster: &ClusterRow,
        name: &str,
    ) -> Result<(), OrchestratorError> {
        if cluster.state.is_transient() {
            return Err(OrchestratorError::Busy {
                name: cluster.name.clone(),
                what: format!("it is {}", cluster.state.as_str()),
            });
        }
        if self.store.snapshot(cluster.id, name)?.is_none() {
            return Err(OrchestratorError::SnapshotNotFound {
                cluster: cluster.name.clone(),
                name: name.to_string(),
            });
        }
        let incompatible = |reason: String| OrchestratorError::Incompatible {
            name: name.to_string(),
            reason,
        };
        let specs = self
            .specs_of(ns, cluster)
            .map_err(|e| incompatible(e.to_string()))?;
        let dir = self.snapshot_dir(ns, &cluster.name, name);
        let checks = self
            .each_vm(&specs, move |b, s| b.check_saved(s, &dir.join(&s.name)))
            .await;
        if let Some(reason) = checks.into_iter().find_map(|(_, r)| r.err()) {
            return Err(incompatible(reason));
        }
        self.set_cluster(cluster, ClusterState::Restoring, None);
        self.spawn_drive(cluster.id, DriveMode::Restore(name.to_string()));
        Ok(())
    }

    pub fn snapshots(&self, cluster: &ClusterRow) -> Result<Vec<SnapshotRow>, OrchestratorError> {
        Ok(self.store.snapshots_of(cluster.id)?)
    }

    /// Remove a named snapshot: its row, its folder, and the disk layers nothing else needs.
    pub async fn delete_snapshot(
        self: Arc<Self>,
        ns: NamespaceRow,
        cluster: ClusterRow,
        name: String,
    ) -> Result<(), OrchestratorError> {
        let lock = self.lock_for(cluster.id);
        let _guard = lock.lock().await;
        let row = self.store.snapshot(cluster.id, &name)?.ok_or_else(|| {
            OrchestratorError::SnapshotNotFound {
                cluster: cluster.name.clone(),
                name: name.clone(),
            }
        })?;
        self.store.delete_snapshot(row.id)?;
        // Without its row the folder is garbage: collected with the layers only it used.
        let specs = self.specs_of(&ns, &cluster).unwrap_or_default();
        self.collect_garbage(&ns, &cluster, specs).await;
        Ok(())
    }

    /// Stop a ready cluster: its VMs' memory and device state go to disk and their processes end (`stopping`,
    /// then `stopped`). Returns false when it already is stopped.
    pub fn stop(self: &Arc<Self>, cluster: &ClusterRow) -> Result<bool, OrchestratorError> {
        if cluster.state == ClusterState::Stopped {
            return Ok(false);
        }
        require_ready(cluster)?;
        self.set_cluster(cluster, ClusterState::Stopping, None);
        self.spawn_stop(cluster.id);
        Ok(true)
    }

    fn spawn_stop(self: &Arc<Self>, cluster_id: i64) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.stop_cluster(cluster_id).await {
                tracing::error!("cluster #{cluster_id}: stop: {e}");
            }
        });
    }

    async fn stop_cluster(self: Arc<Self>, cluster_id: i64) -> Result<(), OrchestratorError> {
        let lock = self.lock_for(cluster_id);
        let _guard = lock.lock().await;
        let Some(cluster) = self.store.cluster_by_id(cluster_id)? else {
            return Ok(());
        };
        if cluster.state != ClusterState::Stopping {
            return Ok(());
        }
        let ns = self.store.namespace_by_id(cluster.namespace_id)?;
        let specs = match self.specs_of(&ns, &cluster) {
            Ok(specs) => specs,
            Err(e) => {
                self.set_cluster(&cluster, ClusterState::Failed, Some(&e.to_string()));
                return Ok(());
            }
        };
        let t0 = Instant::now();
        // A stop cut off by a restart: the VMs already saved and ended keep their state.
        let alive = self.each_vm(&specs, |b, s| Ok(b.is_running(s))).await;
        let running: Vec<VmSpec> = specs
            .iter()
            .zip(alive)
            .filter(|(_, (_, r))| matches!(r, Ok(true)))
            .map(|(s, _)| s.clone())
            .collect();
        let mut failure = self
            .each_vm(&running, |b, s| b.pause(s))
            .await
            .into_iter()
            .find_map(|(_, r)| r.err());
        if failure.is_none() {
            failure = self
                .each_vm(&running, |b, s| b.suspend(s))
                .await
                .into_iter()
                .find_map(|(_, r)| r.err());
        }
        if let Some(reason) = failure {
            let still: Vec<VmSpec> = running
                .into_iter()
                .filter(|s| self.backend.is_running(s))
                .collect();
            let _ = self.each_vm(&still, |b, s| b.resume(s)).await;
            let reason = format!(
                "stop failed: {reason}
`fcdev up` brings the cluster back as it was"
            );
            self.set_cluster(&cluster, ClusterState::Failed, Some(&reason));
            return Ok(());
        }
        for vm in self.store.vms_of(cluster.id)? {
            self.set_vm(
                &cluster,
                &vm,
                VmState::Stopped,
                Some("stopped: memory and disk saved"),
            );
        }
        let dir = self.vms_dir.join(&ns.name).join(&cluster.name);
        let bytes = tokio::task::spawn_blocking(move || disk_usage(&dir))
            .await
            .unwrap_or(0);
        let message = format!(
            "cluster stopped in {:.1}s: {} on disk, no VM running",
            t0.elapsed().as_secs_f64(),
            human(bytes)
        );
        match self.store.set_cluster_stopped(cluster.id, bytes, &message) {
            Ok(event) => {
                let _ = self.events.send(event);
            }
            Err(e) => tracing::error!("cannot record state of cluster {}: {e}", cluster.name),
        }
        Ok(())
    }

    /// Check a ready cluster's VMs are still running; a dead VM marks the cluster failed. Returns whether all run.
    /// Skips clusters that an operation holds.
    pub fn refresh(&self, cluster: &ClusterRow) -> Result<bool, OrchestratorError> {
        let _serial = self.refresh_lock.lock().unwrap_or_else(|p| p.into_inner());
        // Re-read under the lock: another check may have just marked it.
        let Some(cluster) = self.store.cluster_by_id(cluster.id)? else {
            return Ok(false);
        };
        let cluster = &cluster;
        if cluster.state != ClusterState::Ready {
            return Ok(false);
        }
        let lock = self.lock_for(cluster.id);
        let Ok(_guard) = lock.try_lock() else {
            return Ok(false);
        };
        let Ok(image) = self.catalog.get(&cluster.image) else {
            return Ok(false);
        };
        let ns = self.store.namespace_by_id(cluster.namespace_id)?;
        let mut dead = Vec::new();
        for vm in self.store.vms_of(cluster.id)? {
            let spec = self.vm_spec(&ns, cluster, &vm, &image);
            if !self.backend.is_running(&spec) {
                self.set_vm(
                    cluster,
                    &vm,
                    VmState::Stopped,
                    Some("the VM process is gone"),
                );
                dead.push(vm.name.clone());
            }
        }
        if dead.is_empty() {
            return Ok(true);
        }
        let reason = format!(
            "VM {} stopped unexpectedly; run `fcdev up` to repair the cluster",
            dead.join(", ")
        );
        self.set_cluster(cluster, ClusterState::Failed, Some(&reason));
        Ok(false)
    }

    /// At start-up: drive on every cluster a previous server left mid-operation, and notice dead VMs.
    pub fn recover(self: &Arc<Self>) -> Result<(), OrchestratorError> {
        for cluster in self.store.all_clusters()? {
            match cluster.state {
                ClusterState::Deleting => {
                    drop(self.spawn_delete(cluster));
                }
                // A save cut off: its VMs may be paused; resume them, drop the half snapshot.
                ClusterState::Saving => self.spawn_resume_after_save(cluster),
                ClusterState::Stopping => self.spawn_stop(cluster.id),
                ClusterState::Restoring => self.set_cluster(
                    &cluster,
                    ClusterState::Failed,
                    Some("a snapshot restore was cut off by a server restart: restore it again, or `fcdev reset`"),
                ),
                ClusterState::Resetting => self.spawn_drive(cluster.id, DriveMode::Reset),
                state if state.is_transient() => {
                    tracing::info!("resuming cluster {} (was {})", cluster.name, state.as_str());
                    self.emit(
                        cluster.id,
                        None,
                        state.as_str(),
                        "server restarted, resuming",
                    );
                    self.spawn_drive(cluster.id, DriveMode::Up);
                }
                ClusterState::Ready => {
                    self.refresh(&cluster)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Every few seconds, notice VMs that died under ready clusters.
    pub fn spawn_watchdog(self: &Arc<Self>, every: Duration) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let this = this.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if let Ok(clusters) = this.store.all_clusters() {
                        for c in clusters {
                            let _ = this.refresh(&c);
                        }
                    }
                })
                .await;
            }
        });
    }

    /// The console log file of one VM of a cluster (blocking: reads the store and the image catalog).
    pub fn console_log(
        &self,
        ns: &NamespaceRow,
        c: &ClusterRow,
        vm: &VmRow,
    ) -> Result<Option<PathBuf>, OrchestratorError> {
        let image = self.catalog.get(&c.image)?;
        Ok(self.backend.console_log(&self.vm_spec(ns, c, vm, &image)))
    }

    /// The API view of a cluster.
    pub fn view(&self, ns: &NamespaceRow, c: &ClusterRow) -> Result<api::Cluster, StoreError> {
        let vms = self
            .store
            .vms_of(c.id)?
            .into_iter()
            .map(|vm| api::Vm {
                host_key: self.backend.host_key(&self.run_dir_of(ns, c, &vm.name)),
                hostname: hostname(&vm.name, &c.name, &ns.name),
                name: vm.name,
                role: vm.role,
                address: vm.address.to_string(),
                state: vm.state,
                detail: vm.detail,
            })
            .collect();
        Ok(c.to_api(&ns.name, vms, None))
    }
}

/// The folder of a cluster's snapshot disk layers, next to its snapshots (not a DNS label: no snapshot's name).
const LAYERS_DIR: &str = ".layers";

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

fn describe_backend_error(vm: &str, e: &crate::server::backend::BackendError) -> String {
    match e {
        crate::server::backend::BackendError::Failed {
            message,
            log_tail: Some(tail),
        } => format!("{vm}: {message}\n--- log tail ---\n{tail}"),
        other => format!("{vm}: {other}"),
    }
}

/// The error of a `spawn_blocking` that returns a backend result, if any.
fn join_error(
    r: Result<Result<(), crate::server::backend::BackendError>, tokio::task::JoinError>,
) -> Option<String> {
    match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(e) => Some(format!("internal error: {e}")),
    }
}
