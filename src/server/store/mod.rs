//! Server state: users, hashed tokens, namespaces, clusters, VMs, peers, events, snapshots.
//!
//! One interface ([`StoreEngine`]), two engines: SQLite (WAL, one file in the data dir: the embedded default,
//! `sqlite.rs`) and PostgreSQL (`fcdev server --database postgres://…`, `postgres.rs`). All SQL lives in those two
//! files. Callers hold a [`Store`] (usually `Arc<Store>`) and call the same synchronous methods whatever the engine.
//!
//! Every multi-row change is one transaction, so a crash never leaves half a change, and allocation (namespace
//! subnets, VM and peer addresses: the lowest free number) never hands a number out twice under concurrency:
//! SQLite serializes writers (`BEGIN IMMEDIATE`); PostgreSQL runs SERIALIZABLE transactions that lock the
//! namespace row while they allocate in it, with unique constraints behind them, and retries a transaction that
//! lost a race (serialization failure, deadlock, or a unique violation on an allocated number).
//!
//! Both engines keep a schema version (`schema_version`) and apply their numbered migrations at open.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::api::{AgentHeartbeat, ClusterState, HostCapacity, ReportedEvent, Subnet, VmState};

// The columns each row type is read from, in its mapper's order: the same tables in both engines.
pub(super) const EVENT_COLS: &str = "seq, cluster_id, vm, state, message, at";
pub(super) const NS_COLS: &str = "id, user_id, name, idx, subnet";
pub(super) const CLUSTER_COLS: &str =
    "id, namespace_id, name, image, state, reason, start_mode, created_at, updated_at, disk_bytes";
pub(super) const SNAPSHOT_COLS: &str =
    "s.id, s.cluster_id, s.namespace_id, c.name, s.name, s.image, s.size_bytes, s.created_at";
pub(super) const VM_COLS: &str = "id, cluster_id, slot, name, role, address, mac, state, detail";
pub(super) const PEER_COLS: &str = "id, namespace_id, name, public_key, address";
pub(super) const HOST_COLS: &str =
    "id, name, state, reason, revoked_at, created_at, instance, heartbeat_ms, \
     hub_endpoint, hub_public_key, memory_mb, free_memory_mb, cpus, disk_free_bytes, images";

pub mod postgres;
pub mod sqlite;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database error: {}", postgres::describe(.0))]
    Pg(#[from] ::postgres::Error),
    /// The database cannot be reached (PostgreSQL down or unreachable); the next call tries again.
    #[error("the database is unreachable: {0}")]
    Unavailable(String),
    /// The database was written by a newer fcdev (its schema version is unknown here).
    #[error("the database has schema version {found}, newer than this fcdev knows ({known}): upgrade fcdev")]
    TooNew { found: i64, known: i64 },
    /// A stored value that does not parse (an address, a subnet).
    #[error("corrupt state: {0}")]
    Corrupt(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("cannot set up {path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// Every namespace subnet is taken: only removing an engineer frees one.
    #[error("no free namespace subnet left")]
    NamespacesExhausted,
    /// Another agent holds this host's name: its lease has not run out.
    #[error("{0}")]
    Claimed(String),
    #[error("invalid --database `{0}`: use postgres://USER@HOST/DB (without --database the state is DATA_DIR/state.db)")]
    BadLocation(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: i64,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NamespaceRow {
    pub id: i64,
    pub user_id: i64,
    pub name: String,
    pub index: u32,
    pub subnet: Subnet,
}

impl NamespaceRow {
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.host(1)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterRow {
    pub id: i64,
    pub namespace_id: i64,
    pub name: String,
    pub image: String,
    pub state: ClusterState,
    pub reason: Option<String>,
    pub start_mode: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    /// Bytes on disk while the cluster is stopped (disks and saved memory), else None.
    pub disk_bytes: Option<u64>,
}

impl ClusterRow {
    /// The API view of this cluster in namespace `namespace`, with its VMs and (on a control plane) its host.
    /// `event_seq` is 0: the caller sets it when it matters.
    pub fn to_api(
        &self,
        namespace: &str,
        vms: Vec<crate::api::Vm>,
        host: Option<String>,
    ) -> crate::api::Cluster {
        crate::api::Cluster {
            name: self.name.clone(),
            image: self.image.clone(),
            namespace: namespace.to_string(),
            state: self.state,
            reason: self.reason.clone(),
            start_mode: self.start_mode.clone(),
            disk_bytes: self.disk_bytes,
            vms,
            host,
            event_seq: 0,
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
        }
    }
}

/// A named snapshot of a cluster (its files: `DATA/snapshots/<namespace>/<cluster>/<name>/`).
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRow {
    pub id: i64,
    pub cluster_id: i64,
    pub namespace_id: i64,
    /// The cluster's name.
    pub cluster: String,
    pub name: String,
    pub image: String,
    pub size_bytes: u64,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VmRow {
    pub id: i64,
    pub cluster_id: i64,
    pub slot: u32,
    pub name: String,
    pub role: String,
    pub address: Ipv4Addr,
    pub mac: String,
    pub state: VmState,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PeerRow {
    pub id: i64,
    pub namespace_id: i64,
    pub name: String,
    pub public_key: String,
    pub address: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub seq: i64,
    pub cluster_id: i64,
    pub vm: Option<String>,
    pub state: String,
    pub message: String,
    pub at: String,
}

/// A cluster as its agent reported it (`record_report`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterMirror {
    pub state: ClusterState,
    pub reason: Option<String>,
    pub start_mode: Option<String>,
    /// The VMs, JSON of `api::Vm`s; None: forget the last report (the cluster moves to another host).
    pub vms_json: Option<String>,
    /// Bytes on disk while stopped, as the agent measured them.
    pub disk_bytes: Option<u64>,
    /// The wanted-state generation ([`ClusterIntent::gen`]) the agent had applied when it reported: the state,
    /// reason, start mode and disk bytes are taken only when it is the current one (an older report describes
    /// the cluster before the request: a stale `ready` must not end a reset); the VMs and events always are.
    /// None: the control plane's own record, taken as it is.
    pub applied_gen: Option<i64>,
    /// The agent's own number of the last event in this report (None: unchanged).
    pub reported_seq: Option<i64>,
}

/// What a control plane wants of a cluster (its agent's work), and how far the agent got. One row per
/// cluster in both engines (schema: SQLite 5–9, PostgreSQL 4); on an agent's own store only `applied_gen` is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterIntent {
    /// Bumped by every request the agent must act on: `up` of a cluster that is not ready, reset, stop, start.
    pub gen: i64,
    /// The `gen` of the last reset (0: none): an agent resets when it is above the `gen` it applied.
    pub reset_gen: i64,
    /// Stopped (`fcdev stop`) or running (`up`, `start`, reset).
    pub want_running: bool,
    /// The `gen` applied: on an agent, by itself (kept across its restarts, so a reset is never applied
    /// twice); on a control plane, as its agent last reported.
    pub applied_gen: i64,
    /// On a control plane: the agent's own number of the last event it reported, so a restarted agent goes on
    /// after it instead of sending its events again (0 again when the cluster moves to another host).
    pub reported_seq: i64,
}

/// A request recorded by a control plane for a cluster's agent ([`StoreEngine::request_intent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Run (`up` of a cluster that is not ready, `start`).
    Run,
    /// Put back to the onboarding snapshot (and run).
    Reset,
    /// Stop (memory and disks to disk).
    Stop,
}

/// A VM to create with its cluster: name and role from the image template.
pub struct NewVm<'a> {
    pub name: &'a str,
    pub role: &'a str,
}

/// A peer as the hub needs it: with its namespace's subnet.
#[derive(Debug, Clone, PartialEq)]
pub struct HubPeerRow {
    pub peer: PeerRow,
    pub subnet: Subnet,
}

/// What `begin_user_removal` found and did.
#[derive(Debug, Clone, PartialEq)]
pub struct Removal {
    pub user: User,
    pub clusters: usize,
    pub peers: usize,
}

/// A host's state, as the control plane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    /// Added (`fcdev server host add`), no agent heard from yet.
    New,
    /// Its agent's lease runs.
    Live,
    /// Its agent's lease ran out (no heartbeat within `--host-lease`).
    Lost,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::New => "new",
            HostState::Live => "live",
            HostState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> HostState {
        match s {
            "live" => HostState::Live,
            "lost" => HostState::Lost,
            _ => HostState::New,
        }
    }
}

/// A host of the control plane (`fcdev server host add`), with what its agent last reported.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRow {
    pub id: i64,
    pub name: String,
    pub state: HostState,
    /// Why it is lost.
    pub reason: Option<String>,
    /// Its token was revoked (`fcdev server host revoke`).
    pub revoked: bool,
    pub created_at: String,
    /// The agent that holds the name (see [`AgentHeartbeat::instance`]).
    pub instance: Option<String>,
    /// Unix milliseconds of the last heartbeat, on the control plane's clock.
    pub heartbeat_ms: Option<i64>,
    pub hub_endpoint: Option<String>,
    pub hub_public_key: Option<String>,
    /// None before the first heartbeat.
    pub capacity: Option<HostCapacity>,
}

/// A host token as handed to the operator: `fch_` + 32 random bytes in hex. Only its SHA-256 is stored.
pub fn new_host_token() -> String {
    format!("fch_{}", &new_token()[4..])
}

/// A number for an integer column (capacities are far below `i64::MAX`).
pub(super) fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The images list as stored (a JSON array).
pub(super) fn images_json(images: &[String]) -> String {
    serde_json::to_string(images).unwrap_or_else(|_| "[]".into())
}

/// A host's capacity from its stored columns (None before the first heartbeat).
pub(super) fn capacity_of(
    memory_mb: Option<i64>,
    free_memory_mb: Option<i64>,
    cpus: Option<i64>,
    disk_free_bytes: Option<i64>,
    images: Option<String>,
) -> Option<HostCapacity> {
    let n = |v: Option<i64>| v.unwrap_or(0).max(0) as u64;
    memory_mb.map(|m| HostCapacity {
        memory_mb: m.max(0) as u64,
        free_memory_mb: n(free_memory_mb),
        cpus: n(cpus) as u32,
        disk_free_bytes: n(disk_free_bytes),
        images: images
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default(),
    })
}

/// Whether a heartbeat from `instance` may take the host: refused while another agent's lease runs.
pub(super) fn check_claim(
    host: &HostRow,
    instance: &str,
    now_ms: i64,
    lease_ms: i64,
) -> StoreResult<()> {
    let held_by_other = host.state == HostState::Live
        && host.instance.as_deref().is_some_and(|i| i != instance)
        && host.heartbeat_ms.is_some_and(|t| t + lease_ms > now_ms);
    if held_by_other {
        let ago = host.heartbeat_ms.map_or(0, |t| (now_ms - t).max(0)) as f64 / 1000.0;
        return Err(StoreError::Claimed(format!(
            "host `{}` is held by another live agent (its last heartbeat {ago:.1} s ago)",
            host.name
        )));
    }
    Ok(())
}

/// A token as handed to a user: `fcd_` + 32 random bytes in hex. Only its SHA-256 is stored.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("fcd_{}", hex::encode(bytes))
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The MAC of a VM, derived from its address so it is unique wherever the address is.
pub fn mac_for(addr: Ipv4Addr) -> String {
    let o = addr.octets();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3])
}

/// Where the state lives: the SQLite file of the data dir, or a PostgreSQL database (`--database`).
#[derive(Debug, Clone, PartialEq)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Location {
    /// `--database` if given (a `postgres://` or `postgresql://` URL), else `DATA_DIR/state.db`.
    pub fn from_args(database: Option<&str>, data_dir: &Path) -> StoreResult<Location> {
        match database.map(str::trim) {
            None | Some("") => Ok(Location::Sqlite(
                data_dir.join(crate::server::run::STATE_FILE),
            )),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(Location::Postgres(url.to_string()))
            }
            Some(other) => Err(StoreError::BadLocation(other.to_string())),
        }
    }

    /// For messages: the file, or the database URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres(url) => postgres::redact(url),
        }
    }
}

/// What every engine does. Callers use it through [`Store`] (the methods of a trait object need no import).
pub trait StoreEngine: Send + Sync {
    // ---- users and tokens ----
    fn add_user(&self, name: &str) -> StoreResult<(User, String)>;
    /// A fresh extra token for an existing user (old tokens stay valid).
    fn issue_token(&self, name: &str) -> StoreResult<String>;
    /// Revoke every token of a user and delete their WireGuard peers, in one transaction: a running server
    /// drops the peers from its hub when it sees the change (see `server::follow`). Returns (tokens, peers).
    fn revoke_user(&self, name: &str) -> StoreResult<(usize, usize)>;
    /// First step of removing an engineer: revoke their tokens, delete their peers and mark them as being
    /// removed. A user without clusters is deleted at once (with their namespace); otherwise the running
    /// server stops the clusters and then deletes the user (`users_being_removed`, `delete_user`).
    fn begin_user_removal(&self, name: &str) -> StoreResult<Removal>;
    /// Users marked by `begin_user_removal` whose clusters are still to be stopped.
    fn users_being_removed(&self) -> StoreResult<Vec<User>>;
    /// Whether a user of this name exists (removed users do not).
    fn user_exists(&self, name: &str) -> StoreResult<bool>;
    /// Delete a user with their tokens, namespace, peers and SSH keys, when they have no cluster left.
    /// False when a cluster remains.
    fn delete_user(&self, id: i64) -> StoreResult<bool>;
    /// Changes when an admin command (another process: `fcdev server user revoke/remove`) committed a change
    /// the running server must follow; a cheap way for the server to notice admin changes.
    fn data_version(&self) -> StoreResult<i64>;
    fn list_users(&self) -> StoreResult<Vec<User>>;
    fn user_by_token(&self, token: &str) -> StoreResult<Option<User>>;

    // ---- hosts (agents of `fcdev server --role agent`) ----
    /// Add a host and return its token (shown once; only its hash is stored). `Exists` when the name is taken.
    fn add_host(&self, name: &str) -> StoreResult<(HostRow, String)>;
    /// Every host, by name.
    fn hosts(&self) -> StoreResult<Vec<HostRow>>;
    /// Revoke a host's token: its agent is refused from its next heartbeat. False when it already was revoked.
    fn revoke_host(&self, name: &str) -> StoreResult<bool>;
    /// The host of a token that is not revoked.
    fn host_by_token(&self, token: &str) -> StoreResult<Option<HostRow>>;
    /// An agent's heartbeat (the first one registers it): the host is `live` with what it reported, at `now_ms`.
    /// `Claimed` while another agent (another `instance`) holds the name and its lease of `lease_ms` runs.
    fn host_heartbeat(
        &self,
        id: i64,
        beat: &AgentHeartbeat,
        now_ms: i64,
        lease_ms: i64,
    ) -> StoreResult<HostRow>;
    /// Mark `lost` (with `reason`) every live host whose last heartbeat is `lease_ms` or more before `now_ms`;
    /// returns them.
    fn expire_hosts(&self, now_ms: i64, lease_ms: i64, reason: &str) -> StoreResult<Vec<HostRow>>;

    // ---- namespaces ----
    /// The host a namespace lives on (a control plane's placement); None when it is on none yet.
    fn namespace_host(&self, ns_id: i64) -> StoreResult<Option<HostRow>>;
    /// Put a namespace on `host_id` if it still is on `expected` (None: on no host): the check and the move are
    /// one transaction, so two requests placing one namespace at once agree on one host. Returns the host it
    /// is on afterwards (the other request's choice when that one came first).
    fn place_namespace(
        &self,
        ns_id: i64,
        expected: Option<i64>,
        host_id: i64,
    ) -> StoreResult<Option<HostRow>>;
    /// The namespaces placed on a host.
    fn namespaces_on(&self, host_id: i64) -> StoreResult<Vec<NamespaceRow>>;
    /// An agent's copy of a namespace the control plane placed on its host: the user's namespace with exactly
    /// this index (and so this /24), created when missing.
    fn adopt_namespace(&self, user: &User, index: u32) -> StoreResult<NamespaceRow>;
    fn namespace_of(&self, user_id: i64) -> StoreResult<Option<NamespaceRow>>;
    fn namespace_by_id(&self, id: i64) -> StoreResult<NamespaceRow>;
    /// The user's namespace, created with the lowest free /24 of the pool when missing.
    fn ensure_namespace(&self, user: &User) -> StoreResult<NamespaceRow>;

    // ---- clusters and VMs ----
    /// Create a cluster and its VMs, each with the lowest free VM address of the namespace.
    fn create_cluster(
        &self,
        ns: &NamespaceRow,
        name: &str,
        image: &str,
        vms: &[NewVm<'_>],
    ) -> StoreResult<ClusterRow>;
    fn cluster(&self, ns_id: i64, name: &str) -> StoreResult<Option<ClusterRow>>;
    fn cluster_by_id(&self, id: i64) -> StoreResult<Option<ClusterRow>>;
    fn clusters_in(&self, ns_id: i64) -> StoreResult<Vec<ClusterRow>>;
    fn all_clusters(&self) -> StoreResult<Vec<ClusterRow>>;
    /// Ready clusters whose state has not changed for `secs` seconds (`fcdev server --idle-stop`).
    fn clusters_ready_since(&self, secs: u64) -> StoreResult<Vec<ClusterRow>>;
    /// Set a cluster's state and record its event in one transaction: whoever reads the new state finds the event.
    fn set_cluster_state_event(
        &self,
        id: i64,
        state: ClusterState,
        reason: Option<&str>,
        message: &str,
    ) -> StoreResult<EventRow>;
    /// Mark a cluster stopped with the bytes it keeps on disk, and record its event, in one transaction.
    fn set_cluster_stopped(&self, id: i64, disk_bytes: u64, message: &str)
        -> StoreResult<EventRow>;
    /// Record a named snapshot whose files are complete. `Exists` when the cluster has one of that name.
    fn add_snapshot(
        &self,
        cluster_id: i64,
        name: &str,
        image: &str,
        size_bytes: u64,
    ) -> StoreResult<SnapshotRow>;
    fn snapshot(&self, cluster_id: i64, name: &str) -> StoreResult<Option<SnapshotRow>>;
    /// A cluster's snapshots, oldest first.
    fn snapshots_of(&self, cluster_id: i64) -> StoreResult<Vec<SnapshotRow>>;
    /// Every snapshot of a namespace, largest first (what to remove when the quota is reached).
    fn snapshots_in(&self, ns_id: i64) -> StoreResult<Vec<SnapshotRow>>;
    fn delete_snapshot(&self, id: i64) -> StoreResult<bool>;
    fn set_start_mode(&self, id: i64, mode: &str) -> StoreResult<()>;
    /// Forget a cluster with its VMs and events. Returns its last event, `deleted`, numbered after the others for
    /// the streams that follow it, and not stored (nothing of the cluster is).
    fn delete_cluster(&self, id: i64) -> StoreResult<EventRow>;
    fn vms_of(&self, cluster_id: i64) -> StoreResult<Vec<VmRow>>;
    /// A control plane's copy of what the agent running a cluster reported: its state, its VMs (JSON of
    /// `api::Vm`s, kept as the agent sent them) and its new events, in one transaction. Returns the events as
    /// stored (numbered here); none when the cluster is gone.
    fn record_report(
        &self,
        id: i64,
        report: &ClusterMirror,
        events: &[ReportedEvent],
    ) -> StoreResult<Vec<EventRow>>;
    /// The VMs (JSON) last reported for a cluster; None before the first report.
    fn cluster_report(&self, id: i64) -> StoreResult<Option<String>>;
    /// A cluster's wanted state and how far its agent got; None when the cluster is gone.
    fn cluster_intent(&self, id: i64) -> StoreResult<Option<ClusterIntent>>;
    /// The wanted state of every cluster of a namespace, by cluster id (one query: the agents' work reads it
    /// every 200 ms while a poll is held).
    fn intents_in(&self, ns_id: i64) -> StoreResult<Vec<(i64, ClusterIntent)>>;
    /// A control plane records a request for the cluster's agent, in one transaction: `gen` + 1 (and
    /// `reset_gen` for a reset), `want_running`, the cluster's state (reason cleared; with `forget_report` its
    /// reported VMs too: it is made again elsewhere) and its event. `NotFound` when the cluster is gone.
    fn request_intent(
        &self,
        id: i64,
        intent: Intent,
        state: ClusterState,
        message: &str,
        forget_report: bool,
    ) -> StoreResult<(ClusterIntent, EventRow)>;
    /// An agent notes the wanted-state generation it applied to its copy of a cluster.
    fn set_applied_gen(&self, id: i64, gen: i64) -> StoreResult<()>;
    fn vms_in_namespace(&self, ns_id: i64) -> StoreResult<Vec<(String, VmRow)>>;
    fn set_vm_state(&self, id: i64, state: VmState, detail: Option<&str>) -> StoreResult<()>;

    // ---- ssh keys ----
    /// Remember ssh keys for the namespace, keeping only the `keep` most recently sent.
    fn add_ssh_keys(&self, ns_id: i64, keys: &[String], keep: usize) -> StoreResult<()>;
    fn ssh_keys(&self, ns_id: i64) -> StoreResult<Vec<String>>;

    // ---- peers ----
    /// Register a peer with the lowest free peer address (.2–.9) of the namespace.
    fn add_peer(&self, ns: &NamespaceRow, name: &str, public_key: &str) -> StoreResult<PeerRow>;
    fn peers_in(&self, ns_id: i64) -> StoreResult<Vec<PeerRow>>;
    /// Every peer with its namespace's subnet: what the hub should accept.
    fn hub_peers(&self) -> StoreResult<Vec<HubPeerRow>>;
    /// Delete a peer whatever its namespace (the server disabling a peer the hub must not accept).
    fn remove_peer(&self, id: i64) -> StoreResult<bool>;
    fn delete_peer(&self, ns_id: i64, id: i64) -> StoreResult<bool>;

    // ---- events ----
    fn add_event(
        &self,
        cluster_id: i64,
        vm: Option<&str>,
        state: &str,
        message: &str,
    ) -> StoreResult<EventRow>;
    fn events_after(&self, cluster_id: i64, after: i64) -> StoreResult<Vec<EventRow>>;
    /// The newest event sequence number of a cluster (0 when none).
    fn last_event_seq(&self, cluster_id: i64) -> StoreResult<i64>;
}

/// The store the server and the admin commands use: one engine behind the [`StoreEngine`] methods.
pub struct Store {
    engine: Box<dyn StoreEngine>,
    kind: &'static str,
}

impl Store {
    /// The SQLite store in this file (created when missing).
    pub fn open(path: &Path) -> StoreResult<Store> {
        Ok(Store {
            engine: Box::new(sqlite::SqliteStore::open(path)?),
            kind: "sqlite",
        })
    }

    /// The PostgreSQL store at this URL: connects and migrates now (so a wrong URL fails at start), and
    /// reconnects by itself after the database went away.
    pub fn open_postgres(url: &str) -> StoreResult<Store> {
        Ok(Store {
            engine: Box::new(postgres::PgStore::open(url)?),
            kind: "postgres",
        })
    }

    pub fn open_at(location: &Location) -> StoreResult<Store> {
        match location {
            Location::Sqlite(path) => Store::open(path),
            Location::Postgres(url) => Store::open_postgres(url),
        }
    }

    /// `sqlite` or `postgres`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

impl std::ops::Deref for Store {
    type Target = dyn StoreEngine;

    fn deref(&self) -> &Self::Target {
        &*self.engine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_flag_picks_the_engine() {
        let dir = Path::new("/data");
        assert_eq!(
            Location::from_args(None, dir).unwrap(),
            Location::Sqlite(dir.join("state.db"))
        );
        assert_eq!(
            Location::from_args(Some("postgres://u@h/db"), dir).unwrap(),
            Location::Postgres("postgres://u@h/db".into())
        );
        assert!(matches!(
            Location::from_args(Some("mysql://x"), dir),
            Err(StoreError::BadLocation(_))
        ));
    }
}
