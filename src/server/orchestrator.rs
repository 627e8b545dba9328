//! The cluster state machine: requested → cloning → booting → ready / failed; reset; delete; progress events.
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
use crate::server::backend::{Backend, NamespaceNet, StartMode, VmSpec};
use crate::server::images::{Catalog, Image, ImageError};
use crate::server::store::{ClusterRow, EventRow, NamespaceRow, NewVm, Store, StoreError, VmRow};

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
    if cluster == crate::config::DEFAULT_CLUSTER {
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
            run_dir: self.vms_dir.join(&ns.name).join(&c.name).join(&vm.name),
            ssh_keys: self.store.ssh_keys(ns.id).unwrap_or_default(),
        }
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
                self.spawn_drive(cluster.id, false);
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
        self.spawn_drive(cluster.id, false);
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
        self.spawn_drive(cluster.id, true);
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

    fn spawn_drive(self: &Arc<Self>, cluster_id: i64, reset: bool) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.drive(cluster_id, reset).await {
                tracing::error!("cluster #{cluster_id}: {e}");
            }
        });
    }

    /// Bring every VM of the cluster to ready (after throwing disks away when `reset`).
    async fn drive(self: Arc<Self>, cluster_id: i64, reset: bool) -> Result<(), OrchestratorError> {
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
        let specs: Vec<(VmRow, VmSpec)> = vms
            .iter()
            .map(|vm| (vm.clone(), self.vm_spec(&ns, &cluster, vm, &image)))
            .collect();

        if reset {
            // Stop every VM and drop its disk at once: they are independent.
            let tasks: Vec<_> = specs
                .iter()
                .map(|(vm, spec)| {
                    self.set_vm(&cluster, vm, VmState::Pending, Some("discarding disk"));
                    let backend = self.backend.clone();
                    let spec = spec.clone();
                    let name = vm.name.clone();
                    tokio::task::spawn_blocking(move || {
                        backend.stop(&spec)?;
                        backend.discard_disk(&spec)
                    })
                    .map(move |r| (name, r))
                })
                .collect();
            for (name, result) in futures::future::join_all(tasks).await {
                if let Some(err) = join_error(result) {
                    let reason = format!("reset of {name} failed: {err}");
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
        let tasks: Vec<_> = specs
            .into_iter()
            .map(|(vm, spec)| {
                let this = self.clone();
                let cluster = cluster.clone();
                tokio::spawn(async move { this.bring_up_vm(&cluster, &vm, spec).await })
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
                match tokio::task::spawn_blocking(move || backend.start(&s)).await {
                    Ok(Ok(mode)) => {
                        let what = match mode {
                            StartMode::Restore => "restored, waiting for its services".to_string(),
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
            let ready = self.wait_ready(&spec, deadline).await;
            drop(slot);
            match ready {
                Ok(()) => {
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
                    if mode == StartMode::Restore {
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
                Duration::from_millis(200)
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
        let _ = std::fs::remove_dir_all(self.vms_dir.join(&ns.name).join(&cluster.name));
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
                ClusterState::Resetting => self.spawn_drive(cluster.id, true),
                state if state.is_transient() => {
                    tracing::info!("resuming cluster {} (was {})", cluster.name, state.as_str());
                    self.emit(
                        cluster.id,
                        None,
                        state.as_str(),
                        "server restarted, resuming",
                    );
                    self.spawn_drive(cluster.id, false);
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
                hostname: hostname(&vm.name, &c.name, &ns.name),
                name: vm.name,
                role: vm.role,
                address: vm.address.to_string(),
                state: vm.state,
                detail: vm.detail,
            })
            .collect();
        Ok(api::Cluster {
            name: c.name.clone(),
            image: c.image.clone(),
            namespace: ns.name.clone(),
            state: c.state,
            reason: c.reason.clone(),
            start_mode: c.start_mode.clone(),
            vms,
            event_seq: 0,
            created_at: c.created_at.clone(),
            updated_at: c.updated_at.clone(),
        })
    }
}

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
