//! The operations of the control plane, between the HTTP API (`http.rs`: parse, authorize, call, map the error)
//! and the rest (store, orchestrator, backend, hub).
//!
//! Every blocking call (a store query, a backend probe, the orchestrator's synchronous steps, a file read) runs
//! through [`Service::blocking`], one `spawn_blocking` boundary: nothing here blocks a thread of the async
//! runtime. The orchestrator's long operations (delete, save, restore) are async and run as tasks of their own,
//! so a client that goes away does not cut them off half-way.

use std::convert::Infallible;
use std::sync::Arc;

use crate::api::{self, ClusterState};
use crate::names;
use crate::server::hub_control::{HubControl, HubPeerEntry, HubPeerError};
use crate::server::orchestrator::{hostname, Orchestrator, OrchestratorError, UpOutcome};
use crate::server::store::{
    ClusterRow, EventRow, HostRow, NamespaceRow, SnapshotRow, Store, StoreError, User,
};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Orchestrator(#[from] OrchestratorError),
    #[error("`{name}` is not a valid {kind} name")]
    InvalidName { kind: &'static str, name: String },
    #[error("`{0}` is not an ssh public key")]
    InvalidSshKey(String),
    #[error("at most {MAX_SSH_KEYS} ssh keys per request")]
    TooManySshKeys,
    #[error(
        "public_key must be a base64 x25519 public key (32 bytes, not a point of small order)"
    )]
    InvalidPublicKey,
    #[error("the command is empty")]
    EmptyCommand,
    #[error("cluster `{0}` not found")]
    ClusterNotFound(String),
    #[error("cluster `{0}` is being deleted")]
    BeingDeleted(String),
    #[error("no VM `{vm}` in cluster `{cluster}`; its VMs are: {known}")]
    NoSuchVm {
        vm: String,
        cluster: String,
        known: String,
    },
    #[error("VM `{0}` has no console log")]
    NoConsole(String),
    #[error("peer {0} not found")]
    PeerNotFound(i64),
    #[error("{0}")]
    DeleteFailed(String),
    #[error(
        "at most {MAX_STREAMS_PER_USER} streams (events and followed logs) may be open at once"
    )]
    TooManyStreams,
    /// A control plane with no live host that could take the namespace.
    #[error("{}", match image {
        Some(i) => format!("no live host has image `{i}` (every agent is down, or none has the image)"),
        None => "no host is live (no agent is connected)".to_string(),
    })]
    NoLiveHost { image: Option<String> },
    /// An operation a control plane does not relay to agents yet.
    #[error(
        "a control plane does not {0} yet: it runs on the cluster's host only with `--role all`"
    )]
    NotOnControl(&'static str),
    /// A control plane cannot act on a cluster whose host is lost (or revoked): `fcdev up` makes it again on
    /// another host.
    #[error("cluster `{cluster}` is on host {host}, which is lost ({why}): {what}")]
    HostLost {
        cluster: String,
        host: String,
        why: String,
        /// What cannot happen there ("it cannot be reset or stopped there").
        what: &'static str,
    },
    /// An agent's post for an exec session that is over (its laptop left, or the control plane restarted).
    #[error("exec session {0} is over (its client went away, or the control plane restarted)")]
    ExecGone(String),
    /// An agent's post for an exec session of another host.
    #[error("exec session {0} is not this host's")]
    NotYourExec(String),
    #[error("the output must be base64")]
    BadExecOutput,
    /// A heartbeat for another host than the token's.
    #[error("this host token is not host `{0}`'s")]
    WrongHost(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type ServiceResult<T> = Result<T, ServiceError>;

/// Seconds a host's heartbeat lease lasts unless `fcdev server --host-lease` says.
pub const DEFAULT_HOST_LEASE_SECS: u64 = 15;
/// Streams one engineer may have open at once (event streams and followed console logs); one more is refused.
pub const MAX_STREAMS_PER_USER: usize = 16;
/// The longest ssh key line accepted (an ed25519 key with a comment is ~100 bytes).
const MAX_SSH_KEY_LEN: usize = 256;
/// Keys kept per namespace (the newest win): the guest gets them all on its kernel command line.
pub const MAX_SSH_KEYS: usize = 4;
/// How often a followed console log is read for what was appended.
const CONSOLE_POLL: std::time::Duration = std::time::Duration::from_millis(250);
/// How often a follow checks that the cluster still exists (it ends when the cluster is deleted).
const CONSOLE_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// What runs VMs in this process: the orchestrator (with its backend) and the hub. None on a control plane.
#[derive(Clone)]
pub struct Local {
    pub orchestrator: Arc<Orchestrator>,
    pub hub: Arc<dyn HubControl>,
}

/// The operations, shared by every request (cheap to clone).
#[derive(Clone)]
pub struct Service {
    store: Arc<Store>,
    local: Option<Local>,
    streams: Arc<StreamLimits>,
    /// A control plane's events (copied from its agents' reports), for the event streams.
    pub(crate) control_events: tokio::sync::broadcast::Sender<EventRow>,
    /// Seconds a host's heartbeat lease lasts (`fcdev server --host-lease`).
    pub host_lease_secs: u64,
    /// A control plane's `fcdev exec` sessions, waiting for or running on their agents (memory only).
    exec_relay: Arc<crate::server::exec_relay::ExecRelay>,
    /// A control plane's placements since each host's last heartbeat (memory only).
    pub(crate) placements: Arc<crate::server::control::Placements>,
}

/// One line of a command run in a VM.
pub enum ExecLine {
    Out(Vec<u8>),
    Exit(i32),
    Error(String),
}

/// A VM's console: what it printed, or that and what it prints next.
pub enum Console {
    Text(Vec<u8>),
    Follow(tokio::sync::mpsc::Receiver<Result<Vec<u8>, Infallible>>),
}

/// The cluster of a request, with its namespace.
type Found = (NamespaceRow, ClusterRow);

impl Service {
    pub fn new(store: Arc<Store>, local: Option<Local>, host_lease_secs: u64) -> Service {
        Service {
            store,
            local,
            streams: Arc::new(StreamLimits::default()),
            control_events: tokio::sync::broadcast::channel(1024).0,
            host_lease_secs,
            exec_relay: Arc::default(),
            placements: Arc::default(),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub(crate) fn exec_relay(&self) -> &Arc<crate::server::exec_relay::ExecRelay> {
        &self.exec_relay
    }

    fn local(&self) -> ServiceResult<&Local> {
        self.local.as_ref().ok_or(ServiceError::NotOnControl(
            "relay snapshots or console logs to the agents",
        ))
    }

    fn orchestrator(&self) -> ServiceResult<&Arc<Orchestrator>> {
        Ok(&self.local()?.orchestrator)
    }

    /// The one boundary to blocking work: `f` runs on the blocking pool with this service.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Service) -> ServiceResult<T> + Send + 'static,
    ) -> ServiceResult<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))?
    }

    // ---- engineers ----

    /// The engineer of a bearer token; None when it is unknown or revoked.
    pub async fn authenticate(&self, token: String) -> ServiceResult<Option<User>> {
        self.blocking(move |s| Ok(s.store.user_by_token(&token)?))
            .await
    }

    pub fn health(&self) -> api::Health {
        let (backend, accelerator) = match &self.local {
            Some(local) => {
                let b = local.orchestrator.backend();
                (b.kind().to_string(), b.accelerator())
            }
            None => ("none".to_string(), "none".to_string()),
        };
        api::Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            backend,
            accelerator,
        }
    }

    pub async fn me(&self, user: User) -> ServiceResult<api::Me> {
        self.blocking(move |s| {
            let namespace = match s.store.namespace_of(user.id)? {
                Some(ns) => Some(s.namespace_with_hub(&ns)?),
                None => None,
            };
            Ok(api::Me {
                user: user.name,
                namespace,
            })
        })
        .await
    }

    pub async fn ensure_namespace(&self, user: User) -> ServiceResult<api::Namespace> {
        self.blocking(move |s| s.namespace_with_hub(&s.store.ensure_namespace(&user)?))
            .await
    }

    /// A namespace's view with its hub: this server's own, or on a control plane its host's (none before it
    /// is placed).
    fn namespace_with_hub(&self, ns: &NamespaceRow) -> ServiceResult<api::Namespace> {
        let mut view = namespace_view(ns);
        match &self.local {
            Some(l) => {
                view.hub_endpoint = Some(l.hub.endpoint());
                view.hub_public_key = Some(l.hub.public_key());
            }
            None => {
                if let Some(h) = self.store.namespace_host(ns.id)? {
                    view.hub_endpoint = h.hub_endpoint;
                    view.hub_public_key = h.hub_public_key;
                }
            }
        }
        Ok(view)
    }

    pub async fn images(&self) -> ServiceResult<Vec<api::ImageInfo>> {
        self.blocking(|s| {
            let Some(local) = &s.local else {
                return Ok(Vec::new());
            };
            Ok(local
                .orchestrator
                .catalog()
                .list()
                .iter()
                .map(|i| i.info())
                .collect())
        })
        .await
    }

    // ---- clusters (blocking helpers, called inside `blocking`) ----

    pub(crate) fn find_cluster(&self, user: &User, name: &str) -> ServiceResult<Found> {
        check_name("cluster", name)?;
        let ns = self
            .store
            .namespace_of(user.id)?
            .ok_or_else(|| ServiceError::ClusterNotFound(name.to_string()))?;
        let row = self
            .store
            .cluster(ns.id, name)?
            .ok_or_else(|| ServiceError::ClusterNotFound(name.to_string()))?;
        Ok((ns, row))
    }

    /// The cluster's view now, with `event_seq` where the events of the request start.
    fn view_after(
        &self,
        ns: &NamespaceRow,
        id: i64,
        name: &str,
        seq_before: i64,
    ) -> ServiceResult<api::Cluster> {
        let row = self
            .store
            .cluster_by_id(id)?
            .ok_or_else(|| ServiceError::ClusterNotFound(name.to_string()))?;
        let mut view = self.orchestrator()?.view(ns, &row)?;
        view.event_seq = seq_before;
        Ok(view)
    }

    // ---- clusters ----

    /// `fcdev up`: create the cluster, or resume/repair it. The work goes on in the background.
    pub async fn up(
        &self,
        user: User,
        req: api::CreateCluster,
    ) -> ServiceResult<(api::Cluster, UpOutcome)> {
        check_name("cluster", &req.name)?;
        check_name("image", &req.image)?;
        if let Some(key) = req.ssh_keys.iter().find(|k| !valid_ssh_public_key(k)) {
            return Err(ServiceError::InvalidSshKey(key.chars().take(40).collect()));
        }
        if req.ssh_keys.len() > MAX_SSH_KEYS {
            return Err(ServiceError::TooManySshKeys);
        }
        self.blocking(move |s| {
            if s.local.is_none() {
                return s.control_up(&user, &req);
            }
            let orch = s.orchestrator()?.clone();
            let ns = s.store.ensure_namespace(&user)?;
            if !req.ssh_keys.is_empty() {
                s.store.add_ssh_keys(ns.id, &req.ssh_keys, MAX_SSH_KEYS)?;
            }
            // Events after this one belong to this request: the client follows `/events?after=event_seq`.
            let seq_before = match s.store.cluster(ns.id, &req.name)? {
                Some(existing) => {
                    // Notice a dead VM first, so its `failed` event comes before this request's progress.
                    orch.refresh(&existing)?;
                    s.store.last_event_seq(existing.id)?
                }
                // A new cluster's events are numbered from 1.
                None => 0,
            };
            // `up` spawns the background work on the runtime (this thread has its handle).
            let (row, outcome) = orch.up(&ns, &req.name, &req.image)?;
            let row = s.store.cluster_by_id(row.id)?.unwrap_or(row);
            let mut view = orch.view(&ns, &row)?;
            view.event_seq = seq_before;
            Ok((view, outcome))
        })
        .await
    }

    pub async fn clusters(&self, user: User) -> ServiceResult<Vec<api::Cluster>> {
        self.blocking(move |s| {
            let Some(ns) = s.store.namespace_of(user.id)? else {
                return Ok(Vec::new());
            };
            if s.local.is_none() {
                return s
                    .store
                    .clusters_in(ns.id)?
                    .iter()
                    .map(|row| s.stored_view(&ns, row))
                    .collect();
            }
            let orch = s.orchestrator()?;
            s.store
                .clusters_in(ns.id)?
                .iter()
                .map(|row| Ok(orch.view(&ns, row)?))
                .collect()
        })
        .await
    }

    /// One cluster, after checking its VMs still run.
    pub async fn cluster(&self, user: User, name: String) -> ServiceResult<api::Cluster> {
        self.blocking(move |s| {
            let (ns, row) = s.find_cluster(&user, &name)?;
            if s.local.is_none() {
                return s.stored_view(&ns, &row);
            }
            let orch = s.orchestrator()?;
            orch.refresh(&row)?;
            let row = s
                .store
                .cluster_by_id(row.id)?
                .ok_or_else(|| ServiceError::ClusterNotFound(name.clone()))?;
            Ok(orch.view(&ns, &row)?)
        })
        .await
    }

    pub async fn reset(&self, user: User, name: String) -> ServiceResult<api::Cluster> {
        self.blocking(move |s| {
            let (ns, row) = s.find_cluster(&user, &name)?;
            if matches!(row.state, ClusterState::Deleting) {
                return Err(ServiceError::BeingDeleted(name));
            }
            let seq_before = s.store.last_event_seq(row.id)?;
            if s.local.is_none() {
                return s.control_reset(&ns, &row, seq_before);
            }
            s.orchestrator()?.reset(&row)?;
            s.view_after(&ns, row.id, &name, seq_before)
        })
        .await
    }

    /// Stop the VMs and forget the cluster; the delete runs in a task of its own (a client that goes away does
    /// not cut it off).
    pub async fn delete(&self, user: User, name: String) -> ServiceResult<()> {
        let n = name.clone();
        let (_ns, row) = self.blocking(move |s| s.find_cluster(&user, &n)).await?;
        if self.local.is_none() {
            return self.blocking(move |s| s.control_delete(&row)).await;
        }
        self.orchestrator()?
            .spawn_delete(row.clone())
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))??;
        let id = row.id;
        match self
            .blocking(move |s| Ok(s.store.cluster_by_id(id)?))
            .await?
        {
            Some(after) => Err(ServiceError::DeleteFailed(
                after.reason.unwrap_or_else(|| "delete failed".into()),
            )),
            None => Ok(()),
        }
    }

    /// Stop a ready cluster: true when it is stopping, false when it already was stopped.
    pub async fn stop(&self, user: User, name: String) -> ServiceResult<(api::Cluster, bool)> {
        self.blocking(move |s| {
            let (ns, row) = s.find_cluster(&user, &name)?;
            let seq_before = s.store.last_event_seq(row.id)?;
            if s.local.is_none() {
                return s.control_stop(&ns, &row, seq_before);
            }
            let stopping = s.orchestrator()?.stop(&row)?;
            Ok((s.view_after(&ns, row.id, &name, seq_before)?, stopping))
        })
        .await
    }

    /// `up` of the existing cluster: a stopped one resumes, a failed one is repaired, a ready one is left alone.
    pub async fn start(
        &self,
        user: User,
        name: String,
    ) -> ServiceResult<(api::Cluster, UpOutcome)> {
        self.blocking(move |s| {
            let (ns, row) = s.find_cluster(&user, &name)?;
            if s.local.is_none() {
                // As `up` of the cluster: the agent resumes it (a lost one is made again on another host).
                let req = api::CreateCluster {
                    name: row.name.clone(),
                    image: row.image.clone(),
                    ssh_keys: Vec::new(),
                };
                return s.control_up(&user, &req);
            }
            let seq_before = s.store.last_event_seq(row.id)?;
            let (_, outcome) = s.orchestrator()?.up(&ns, &row.name, &row.image)?;
            Ok((s.view_after(&ns, row.id, &name, seq_before)?, outcome))
        })
        .await
    }

    // ---- snapshots ----

    pub async fn save_snapshot(
        &self,
        user: User,
        name: String,
        snapshot: String,
    ) -> ServiceResult<api::Snapshot> {
        check_name("snapshot", &snapshot)?;
        let (ns, row) = self.blocking(move |s| s.find_cluster(&user, &name)).await?;
        // A task of its own: a client that goes away must not leave the VMs paused half-way.
        let task = tokio::spawn(
            self.orchestrator()?
                .clone()
                .save_snapshot(ns, row.id, snapshot),
        );
        let snap = task
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))??;
        Ok(snapshot_view(&snap))
    }

    pub async fn snapshots(&self, user: User, name: String) -> ServiceResult<Vec<api::Snapshot>> {
        self.blocking(move |s| {
            let (_ns, row) = s.find_cluster(&user, &name)?;
            let rows = s.orchestrator()?.snapshots(&row)?;
            Ok(rows.iter().map(snapshot_view).collect())
        })
        .await
    }

    pub async fn delete_snapshot(
        &self,
        user: User,
        name: String,
        snapshot: String,
    ) -> ServiceResult<()> {
        check_name("snapshot", &snapshot)?;
        let (ns, row) = self.blocking(move |s| s.find_cluster(&user, &name)).await?;
        let task = tokio::spawn(
            self.orchestrator()?
                .clone()
                .delete_snapshot(ns, row, snapshot),
        );
        task.await
            .map_err(|e| ServiceError::Internal(e.to_string()))??;
        Ok(())
    }

    pub async fn restore_snapshot(
        &self,
        user: User,
        name: String,
        snapshot: String,
    ) -> ServiceResult<api::Cluster> {
        check_name("snapshot", &snapshot)?;
        let n = name.clone();
        let (ns, row, seq_before) = self
            .blocking(move |s| {
                let (ns, row) = s.find_cluster(&user, &n)?;
                let seq = s.store.last_event_seq(row.id)?;
                Ok((ns, row, seq))
            })
            .await?;
        let orch = self.orchestrator()?.clone();
        let (ns2, row2) = (ns.clone(), row.clone());
        tokio::spawn(async move { orch.restore_snapshot(&ns2, &row2, &snapshot).await })
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))??;
        self.blocking(move |s| s.view_after(&ns, row.id, &name, seq_before))
            .await
    }

    // ---- streams ----

    /// Every stored event of the cluster after `after`, then live ones; the stream ends once the cluster is
    /// ready, failed or deleted (at once when it already is), or when the receiver is dropped.
    pub async fn events(
        &self,
        user: User,
        name: String,
        after: i64,
    ) -> ServiceResult<tokio::sync::mpsc::Receiver<api::ClusterEvent>> {
        let uid = user.id;
        let (_ns, row) = self.blocking(move |s| s.find_cluster(&user, &name)).await?;
        let permit = self
            .streams
            .acquire(uid)
            .ok_or(ServiceError::TooManyStreams)?;
        // Subscribe before reading the store, so no event falls between the two.
        let mut live = match &self.local {
            Some(local) => local.orchestrator.subscribe(),
            None => self.control_events.subscribe(),
        };
        let cid = row.id;
        // The state is read before the events: a final state's event is stored with it, so it is among `past`.
        let (current, past) = self
            .blocking(move |s| {
                Ok((
                    s.store.cluster_by_id(cid)?,
                    s.store.events_after(cid, after)?,
                ))
            })
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<api::ClusterEvent>(64);
        let cluster_name = row.name.clone();
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let to_event = |e: &EventRow| api::ClusterEvent {
                seq: e.seq,
                cluster: cluster_name.clone(),
                vm: e.vm.clone(),
                state: e.state.clone(),
                message: e.message.clone(),
                at: e.at.clone(),
            };
            let is_end = |e: &EventRow| e.vm.is_none() && ClusterState::ends_stream(&e.state);
            let mut last = after;
            let mut ended = false;
            for e in &past {
                last = e.seq;
                if tx.send(to_event(e)).await.is_err() {
                    return;
                }
                ended = is_end(e);
            }
            if is_final(&current) {
                return;
            }
            // A stored terminal event ends the stream unless the cluster moved on since (a retry after failure).
            if ended {
                let now = this
                    .blocking(move |s| Ok(s.store.cluster_by_id(cid)?))
                    .await
                    .ok()
                    .flatten();
                if is_final(&now) {
                    return;
                }
            }
            loop {
                let received = tokio::select! {
                    // The client went away: end now, not at the next write.
                    _ = tx.closed() => return,
                    received = live.recv() => received,
                };
                match received {
                    Ok(e) if e.cluster_id == cid && e.seq > last => {
                        last = e.seq;
                        if tx.send(to_event(&e)).await.is_err() || is_end(&e) {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Catch up from the store.
                        let from = last;
                        let missed = this
                            .blocking(move |s| Ok(s.store.events_after(cid, from)?))
                            .await
                            .unwrap_or_default();
                        for e in missed {
                            last = e.seq;
                            if tx.send(to_event(&e)).await.is_err() || is_end(&e) {
                                return;
                            }
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(rx)
    }

    /// A VM's console log: its last `lines` lines, and with `follow` what it prints next, until the cluster is
    /// deleted or the receiver is dropped (a follow counts as one of the engineer's streams).
    pub async fn console(
        &self,
        user: User,
        name: String,
        vm: String,
        lines: usize,
        follow: bool,
    ) -> ServiceResult<Console> {
        use crate::server::console;
        let uid = user.id;
        let (path, cid) = self
            .blocking(move |s| {
                let (ns, row) = s.find_cluster(&user, &name)?;
                let vms = s.store.vms_of(row.id)?;
                let Some(vm_row) = vms.iter().find(|v| v.name == vm) else {
                    return Err(ServiceError::NoSuchVm {
                        known: vms
                            .iter()
                            .map(|v| v.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        vm,
                        cluster: name,
                    });
                };
                let path = s
                    .orchestrator()?
                    .console_log(&ns, &row, vm_row)?
                    .ok_or(ServiceError::NoConsole(vm))?;
                Ok((path, row.id))
            })
            .await?;
        let permit = if follow {
            Some(
                self.streams
                    .acquire(uid)
                    .ok_or(ServiceError::TooManyStreams)?,
            )
        } else {
            None
        };
        let p = path.clone();
        let first = self
            .blocking(move |_| {
                console::tail(&p, lines).map_err(|e| ServiceError::Internal(e.to_string()))
            })
            .await?;
        let Some(permit) = permit else {
            return Ok(Console::Text(first.bytes));
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, Infallible>>(16);
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if !first.bytes.is_empty() && tx.send(Ok(first.bytes)).await.is_err() {
                return;
            }
            let mut next = first.next;
            let mut checked = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(CONSOLE_POLL) => {}
                }
                if checked.elapsed() >= CONSOLE_CHECK {
                    checked = tokio::time::Instant::now();
                    let exists = this
                        .blocking(move |s| Ok(s.store.cluster_by_id(cid)?.is_some()))
                        .await;
                    // Gone (a store error is not "gone": keep following).
                    if matches!(exists, Ok(false)) {
                        return;
                    }
                }
                let p = path.clone();
                let from = next;
                let Ok(chunk) = this
                    .blocking(move |_| {
                        console::read_from(&p, from)
                            .map_err(|e| ServiceError::Internal(e.to_string()))
                    })
                    .await
                else {
                    continue;
                };
                next = chunk.next;
                if !chunk.bytes.is_empty() && tx.send(Ok(chunk.bytes)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Console::Follow(rx))
    }

    /// Run a shell line in a VM through its guest agent; the output comes as it is printed, then the exit code.
    /// Dropping the receiver stops the command.
    pub async fn exec(
        &self,
        user: User,
        name: String,
        vm: String,
        command: String,
    ) -> ServiceResult<tokio::sync::mpsc::Receiver<ExecLine>> {
        check_name("VM", &vm)?;
        if command.trim().is_empty() {
            return Err(ServiceError::EmptyCommand);
        }
        if self.local.is_none() {
            return self.control_exec(user, name, vm, command).await;
        }
        let (spec, command, backend) = self
            .blocking(move |s| {
                let (ns, row) = s.find_cluster(&user, &name)?;
                let orch = s.orchestrator()?;
                Ok((
                    orch.spec_of(&ns, &row, &vm)?,
                    command,
                    orch.backend().clone(),
                ))
            })
            .await?;
        Ok(run_exec(backend, spec, command))
    }

    // ---- peers ----

    /// Register a laptop's WireGuard key in the engineer's namespace and give it to the hub: its config.
    pub async fn register_peer(
        &self,
        user: User,
        req: api::CreatePeer,
    ) -> ServiceResult<api::PeerConfig> {
        check_name("peer", &req.name)?;
        if !valid_public_key(&req.public_key) {
            return Err(ServiceError::InvalidPublicKey);
        }
        self.blocking(move |s| {
            if s.local.is_none() {
                return s.control_register_peer(&user, &req.name, req.public_key.trim());
            }
            let hub = s.local()?.hub.clone();
            let ns = s.store.ensure_namespace(&user)?;
            let peer = s.store.add_peer(&ns, &req.name, req.public_key.trim())?;
            if let Err(e) = hub.add_peer(HubPeerEntry {
                id: peer.id,
                public_key: peer.public_key.clone(),
                address: peer.address,
                subnet: ns.subnet,
            }) {
                return Err(match e {
                    HubPeerError::InvalidKey(_) => {
                        s.store.remove_peer(peer.id)?;
                        ServiceError::InvalidPublicKey
                    }
                    HubPeerError::Refused(e) => {
                        ServiceError::Internal(format!("the hub refused the peer: {e}"))
                    }
                });
            }
            let hosts = s
                .store
                .vms_in_namespace(ns.id)?
                .into_iter()
                .map(|(cluster, vm)| api::HostEntry {
                    name: hostname(&vm.name, &cluster, &ns.name),
                    address: vm.address.to_string(),
                })
                .collect();
            Ok(api::PeerConfig {
                id: peer.id,
                name: peer.name,
                address: peer.address.to_string(),
                server_public_key: hub.public_key(),
                endpoint: hub.endpoint(),
                allowed_ips: vec![ns.subnet.to_string()],
                keepalive: 25,
                namespace: ns.name.clone(),
                dns_suffix: format!("{}.{}", ns.name, names::DNS_SUFFIX),
                hosts,
            })
        })
        .await
    }

    pub async fn peers(&self, user: User) -> ServiceResult<Vec<api::Peer>> {
        self.blocking(move |s| {
            let Some(ns) = s.store.namespace_of(user.id)? else {
                return Ok(Vec::new());
            };
            let peers = s.store.peers_in(ns.id)?;
            let hub = s.local.as_ref().map(|l| l.hub.clone());
            Ok(peers
                .into_iter()
                .map(|p| {
                    let c = hub
                        .as_ref()
                        .and_then(|h| h.counters(p.id))
                        .unwrap_or_default();
                    api::Peer {
                        id: p.id,
                        name: p.name,
                        public_key: p.public_key,
                        address: p.address.to_string(),
                        handshake_age_secs: c.handshake_age.map(|d| d.as_secs()),
                        rx_bytes: c.rx_bytes,
                        tx_bytes: c.tx_bytes,
                        dropped_packets: c.dropped_packets,
                        endpoint: c.endpoint,
                    }
                })
                .collect())
        })
        .await
    }

    pub async fn delete_peer(&self, user: User, id: i64) -> ServiceResult<()> {
        self.blocking(move |s| {
            let ns = s
                .store
                .namespace_of(user.id)?
                .ok_or(ServiceError::PeerNotFound(id))?;
            if !s.store.delete_peer(ns.id, id)? {
                return Err(ServiceError::PeerNotFound(id));
            }
            if let Some(local) = &s.local {
                local.hub.remove_peer(id);
            }
            Ok(())
        })
        .await
    }
}

/// Run a command with a backend on a blocking thread of its own (it runs as long as the command does); the
/// output comes as it is printed, then the exit code or an error. Dropping the receiver stops the command (at
/// its next output, or the backend's next empty `out` call, which asks whether it is still wanted). Used by a
/// single-host server and by an agent for its control plane's sessions.
pub fn run_exec(
    backend: Arc<dyn crate::server::backend::Backend>,
    spec: crate::server::backend::VmSpec,
    command: String,
) -> tokio::sync::mpsc::Receiver<ExecLine> {
    let (tx, rx) = tokio::sync::mpsc::channel::<ExecLine>(64);
    tokio::task::spawn_blocking(move || {
        let mut out = |bytes: &[u8]| {
            if bytes.is_empty() {
                return !tx.is_closed();
            }
            tx.blocking_send(ExecLine::Out(bytes.to_vec())).is_ok()
        };
        let last = match backend.exec(&spec, &command, &mut out) {
            Ok(code) => ExecLine::Exit(code),
            Err(e) => ExecLine::Error(e.to_string()),
        };
        let _ = tx.blocking_send(last);
    });
    rx
}

// ---- hosts (agents) ----

/// Unix milliseconds now: the control plane's clock, the only one leases are measured on.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Service {
    fn lease_ms(&self) -> i64 {
        i64::try_from(self.host_lease_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    /// The host of a host token; None when it is unknown or revoked.
    pub async fn authenticate_host(&self, token: String) -> ServiceResult<Option<HostRow>> {
        self.blocking(move |s| Ok(s.store.host_by_token(&token)?))
            .await
    }

    /// An agent's heartbeat (its first one registers it): the host is live for another lease. Refused while
    /// another agent holds the name (`StoreError::Claimed`, 409).
    pub async fn host_heartbeat(
        &self,
        host: HostRow,
        beat: api::AgentHeartbeat,
    ) -> ServiceResult<api::AgentLease> {
        if beat.name != host.name {
            return Err(ServiceError::WrongHost(beat.name));
        }
        if !valid_public_key(&beat.hub_public_key) {
            return Err(ServiceError::InvalidPublicKey);
        }
        let lease_ms = self.lease_ms();
        let lease_secs = self.host_lease_secs;
        self.blocking(move |s| {
            let before = host.state;
            let now = s.store.host_heartbeat(host.id, &beat, now_ms(), lease_ms)?;
            if before != now.state || host.instance != now.instance {
                tracing::info!(
                    "host {}: {} (agent {}, hub {})",
                    now.name,
                    now.state.as_str(),
                    beat.instance,
                    beat.hub_endpoint
                );
            }
            Ok(api::AgentLease {
                name: now.name,
                lease_secs,
                heartbeat_ms: (lease_secs * 1000 / 3).max(100),
            })
        })
        .await
    }

    /// Every quarter second (at most), mark `lost` the live hosts whose lease ran out. For one lease after this
    /// process starts nothing is marked: agents that kept trying while the control plane was down renew first.
    pub fn spawn_host_reaper(&self) {
        let this = self.clone();
        let lease = std::time::Duration::from_secs(self.host_lease_secs);
        let every = (lease / 4).clamp(
            std::time::Duration::from_millis(50),
            std::time::Duration::from_millis(250),
        );
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if started.elapsed() < lease {
                    continue;
                }
                let lease_ms = this.lease_ms();
                let secs = this.host_lease_secs;
                let lost = this
                    .blocking(move |s| {
                        let reason =
                            format!("its agent sent no heartbeat for {secs} s (the lease)");
                        Ok(s.store.expire_hosts(now_ms(), lease_ms, &reason)?)
                    })
                    .await;
                let lost = match lost {
                    Ok(hosts) if !hosts.is_empty() => {
                        let h = hosts.clone();
                        this.blocking(move |s| s.mark_clusters_lost(&h))
                            .await
                            .map(|()| hosts)
                    }
                    other => other,
                };
                match lost {
                    Ok(hosts) => {
                        for h in hosts {
                            tracing::warn!(
                                "host {} is lost: {}",
                                h.name,
                                h.reason.unwrap_or_default()
                            );
                        }
                    }
                    Err(e) => tracing::warn!("cannot check the hosts' leases: {e}"),
                }
            }
        });
    }
}

fn namespace_view(ns: &NamespaceRow) -> api::Namespace {
    api::Namespace {
        name: ns.name.clone(),
        subnet: ns.subnet.to_string(),
        gateway: ns.gateway().to_string(),
        hub_endpoint: None,
        hub_public_key: None,
    }
}

fn snapshot_view(row: &SnapshotRow) -> api::Snapshot {
    api::Snapshot {
        name: row.name.clone(),
        cluster: row.cluster.clone(),
        image: row.image.clone(),
        size_bytes: row.size_bytes,
        created_at: row.created_at.clone(),
    }
}

fn check_name(kind: &'static str, name: &str) -> ServiceResult<()> {
    if names::is_dns_label(name) {
        Ok(())
    } else {
        Err(ServiceError::InvalidName {
            kind,
            name: name.to_string(),
        })
    }
}

/// A cluster in a final state (or gone) produces no more events until someone acts on it.
fn is_final(cluster: &Option<ClusterRow>) -> bool {
    cluster.as_ref().is_none_or(|c| !c.state.is_transient())
}

/// One line `TYPE BASE64 [comment]` of a known key type, nothing that could break the guest's authorized_keys.
fn valid_ssh_public_key(key: &str) -> bool {
    use base64::Engine;
    let mut parts = key.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return false;
    };
    // Short key types only: every key rides on the guest's kernel command line (2 KB in all) at boot.
    key.len() <= MAX_SSH_KEY_LEN
        && !key.contains(['\n', '\r', '\0'])
        && matches!(
            kind,
            "ssh-ed25519" | "ecdsa-sha2-nistp256" | "ecdsa-sha2-nistp384"
        )
        && base64::engine::general_purpose::STANDARD
            .decode(blob)
            .is_ok()
}

/// 32 bytes of base64 and not a point of small order (with such a key anyone completes a handshake).
fn valid_public_key(key: &str) -> bool {
    crate::tunnel::PublicKey::from_base64(key).is_ok()
}

/// Open streams per engineer.
#[derive(Default)]
pub struct StreamLimits {
    open: std::sync::Mutex<std::collections::HashMap<i64, usize>>,
}

/// One open stream, counted until it is dropped (the stream's task ends).
pub struct StreamPermit {
    limits: Arc<StreamLimits>,
    user_id: i64,
}

impl StreamLimits {
    fn acquire(self: &Arc<Self>, user_id: i64) -> Option<StreamPermit> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(user_id).or_default();
        if *n >= MAX_STREAMS_PER_USER {
            return None;
        }
        *n += 1;
        Some(StreamPermit {
            limits: self.clone(),
            user_id,
        })
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.user_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.user_id);
            }
        }
    }
}
