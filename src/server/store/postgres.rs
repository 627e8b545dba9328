//! The PostgreSQL engine (`fcdev server --database postgres://…`), with the `postgres` crate.
//!
//! That crate is synchronous and drives each connection with a small tokio runtime of its own, so it must never
//! be called on a thread of the server's runtime ("Cannot start a runtime from within a runtime"). The store
//! owns a few worker threads, each with one connection (opened at its first job, opened again after it broke);
//! a call hands its work to a free worker over a channel and waits for the answer, like a SQLite call waits for
//! the connection's mutex. The workers start when the store opens, before the server enters its VM network
//! namespace, so they reach the database through the host's network.
//!
//! A database that cannot be reached fails the call with [`StoreError::Unavailable`] (HTTP 503) and drops the
//! connection; the next call connects again, so the server recovers by itself when the database is back.
//!
//! Allocation stays collision-free with several callers (and several processes): every write runs in a
//! SERIALIZABLE transaction; allocating VM or peer addresses first locks the namespace row (`FOR UPDATE`), so
//! allocations within one namespace queue; unique constraints named `alloc_*` (namespace index, subnet, VM and
//! peer addresses, event numbers) guard every allocated number; a transaction that loses a race (serialization
//! failure, deadlock, or a unique violation on an `alloc_*` constraint) is rolled back and run again.

use std::net::Ipv4Addr;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use ::postgres::error::SqlState;
use ::postgres::types::ToSql;
use ::postgres::{Client, Config, GenericClient, IsolationLevel, NoTls, Row, Transaction};

use super::{
    capacity_of, check_claim, hash_token, images_json, mac_for, new_host_token, new_token, to_i64,
    ClusterIntent, ClusterMirror, ClusterRow, EventRow, HostRow, HostState, HubPeerRow, Intent,
    NamespaceRow, NewVm, PeerRow, Removal, SnapshotRow, StoreEngine, StoreError, StoreResult, User,
    VmRow,
};
use crate::api::{AgentHeartbeat, ClusterState, ReportedEvent, Subnet, VmState};
use crate::server::alloc;

/// Connections (and worker threads) per store.
const WORKERS: usize = 8;
/// A connection idle this long is checked (an empty query) before use: the database may have restarted.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// How long to wait for the database when connecting, unless the URL says (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Runs of a transaction that keeps losing races before its error is returned.
const MAX_ATTEMPTS: u32 = 50;
/// Serializes migrations of concurrent servers (`pg_advisory_xact_lock`).
const MIGRATION_LOCK: i64 = 0x6663_6465_7601;

/// Schema version n is `MIGRATIONS[n - 1]`, applied in one transaction with its version.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE FUNCTION fcdev_now() RETURNS text LANGUAGE sql VOLATILE AS
    $$ SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') $$;
CREATE FUNCTION fcdev_now_ms() RETURNS text LANGUAGE sql VOLATILE AS
    $$ SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') $$;
CREATE TABLE users (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL DEFAULT fcdev_now(),
    removing_at TEXT
);
CREATE TABLE tokens (
    id BIGSERIAL PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL DEFAULT fcdev_now(),
    revoked_at TEXT
);
CREATE TABLE namespaces (
    id BIGSERIAL PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    idx BIGINT NOT NULL,
    subnet TEXT NOT NULL,
    CONSTRAINT alloc_namespace_user UNIQUE (user_id),
    CONSTRAINT alloc_namespace_name UNIQUE (name),
    CONSTRAINT alloc_namespace_idx UNIQUE (idx),
    CONSTRAINT alloc_namespace_subnet UNIQUE (subnet)
);
CREATE TABLE clusters (
    id BIGSERIAL PRIMARY KEY,
    namespace_id BIGINT NOT NULL REFERENCES namespaces(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    image TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    start_mode TEXT,
    created_at TEXT NOT NULL DEFAULT fcdev_now(),
    updated_at TEXT NOT NULL DEFAULT fcdev_now(),
    disk_bytes BIGINT,
    UNIQUE (namespace_id, name)
);
CREATE TABLE vms (
    id BIGSERIAL PRIMARY KEY,
    cluster_id BIGINT NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
    namespace_id BIGINT NOT NULL REFERENCES namespaces(id) ON DELETE CASCADE,
    slot BIGINT NOT NULL,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    address TEXT NOT NULL,
    mac TEXT NOT NULL,
    state TEXT NOT NULL,
    detail TEXT,
    UNIQUE (cluster_id, name),
    CONSTRAINT alloc_vm_address UNIQUE (namespace_id, address)
);
CREATE TABLE peers (
    id BIGSERIAL PRIMARY KEY,
    namespace_id BIGINT NOT NULL REFERENCES namespaces(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    public_key TEXT NOT NULL UNIQUE,
    address TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT fcdev_now(),
    CONSTRAINT alloc_peer_address UNIQUE (namespace_id, address)
);
CREATE TABLE events (
    cluster_id BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    vm TEXT,
    state TEXT NOT NULL,
    message TEXT NOT NULL,
    at TEXT NOT NULL DEFAULT fcdev_now_ms(),
    CONSTRAINT alloc_event_seq PRIMARY KEY (cluster_id, seq)
);
CREATE TABLE snapshots (
    id BIGSERIAL PRIMARY KEY,
    cluster_id BIGINT NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
    namespace_id BIGINT NOT NULL REFERENCES namespaces(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    image TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    created_at TEXT NOT NULL DEFAULT fcdev_now(),
    UNIQUE (cluster_id, name)
);
CREATE TABLE ssh_keys (
    id BIGSERIAL PRIMARY KEY,
    namespace_id BIGINT NOT NULL REFERENCES namespaces(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    UNIQUE (namespace_id, key)
);
-- Bumped by the admin changes a running server must follow (see `data_version`).
CREATE TABLE admin_changes (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO admin_changes (id, version) VALUES (1, 0);
"#,
    // 2: hosts of a control plane (`fcdev server host add`, `--role agent`).
    r#"
CREATE TABLE hosts (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL DEFAULT fcdev_now(),
    revoked_at TEXT,
    state TEXT NOT NULL DEFAULT 'new',
    reason TEXT,
    instance TEXT,
    heartbeat_ms BIGINT,
    hub_endpoint TEXT,
    hub_public_key TEXT,
    memory_mb BIGINT,
    free_memory_mb BIGINT,
    cpus BIGINT,
    disk_free_bytes BIGINT,
    images TEXT
);
"#,
    // 3: the host a namespace lives on (placement by a control plane; NULL: not placed, or `--role all`).
    r#"
ALTER TABLE namespaces ADD COLUMN host_id BIGINT;
ALTER TABLE clusters ADD COLUMN report TEXT;
CREATE INDEX namespaces_host ON namespaces (host_id);
"#,
    // 4: a control plane's wanted state of a cluster and the generation its agent applied (`ClusterIntent`).
    r#"
ALTER TABLE clusters ADD COLUMN gen BIGINT NOT NULL DEFAULT 0;
ALTER TABLE clusters ADD COLUMN reset_gen BIGINT NOT NULL DEFAULT 0;
ALTER TABLE clusters ADD COLUMN want_running BOOLEAN NOT NULL DEFAULT TRUE;
ALTER TABLE clusters ADD COLUMN applied_gen BIGINT NOT NULL DEFAULT 0;
ALTER TABLE clusters ADD COLUMN reported_seq BIGINT NOT NULL DEFAULT 0;
"#,
];

pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// An error with the server's message and code (the crate's own text for those is only "db error").
pub fn describe(e: &::postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

/// A URL without its password, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{}", &rest[authority_end..])
        }
        _ => url.to_string(),
    }
}

type Job = Box<dyn FnOnce(&mut Conn) + Send>;

/// One worker's connection.
struct Conn {
    config: Config,
    target: String,
    client: Option<Client>,
    last_used: Instant,
}

impl Conn {
    /// The open connection, checked when it sat idle, or a new one.
    fn client(&mut self) -> StoreResult<&mut Client> {
        let healthy = match &mut self.client {
            Some(c) if c.is_closed() => false,
            Some(c) if self.last_used.elapsed() >= IDLE_CHECK => c.is_valid(IDLE_CHECK).is_ok(),
            Some(_) => true,
            None => false,
        };
        self.last_used = Instant::now();
        let client = match self.client.take() {
            Some(c) if healthy => c,
            _ => self.config.connect(NoTls).map_err(|e| {
                StoreError::Unavailable(format!("{}: {}", self.target, describe(&e)))
            })?,
        };
        Ok(self.client.insert(client))
    }

    /// A lost connection becomes `Unavailable` and is dropped (the next job connects again).
    fn settle<T>(&mut self, result: StoreResult<T>) -> StoreResult<T> {
        match result {
            Err(StoreError::Pg(e))
                if connection_lost(&e) || self.client.as_ref().is_none_or(|c| c.is_closed()) =>
            {
                self.client = None;
                Err(StoreError::Unavailable(format!(
                    "{}: {}",
                    self.target,
                    describe(&e)
                )))
            }
            r => r,
        }
    }
}

fn connection_lost(e: &::postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        let c = code.code();
        // 08: connection exception; 57P01-03: the server is shutting down, crashed or is starting.
        return c.starts_with("08") || c.starts_with("57P");
    }
    std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

/// Whether a transaction failed only because a concurrent one won a race: run it again.
fn lost_race(e: &::postgres::Error) -> bool {
    match e.as_db_error() {
        Some(db) => {
            *db.code() == SqlState::T_R_SERIALIZATION_FAILURE
                || *db.code() == SqlState::T_R_DEADLOCK_DETECTED
                || (*db.code() == SqlState::UNIQUE_VIOLATION
                    && db.constraint().is_some_and(|c| c.starts_with("alloc_")))
        }
        None => false,
    }
}

fn is_unique_violation(e: &::postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// Run `f` in a SERIALIZABLE transaction, again (after a short random pause) when it lost a race.
fn transaction<T>(
    c: &mut Client,
    mut f: impl FnMut(&mut Transaction<'_>) -> StoreResult<T>,
) -> StoreResult<T> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match attempt_once(c, &mut f) {
            Err(StoreError::Pg(e)) if attempt < MAX_ATTEMPTS && lost_race(&e) => {
                use rand::Rng;
                let ms = rand::thread_rng().gen_range(1..=(2 * attempt.min(20)) as u64);
                std::thread::sleep(Duration::from_millis(ms));
            }
            r => return r,
        }
    }
}

fn attempt_once<T>(
    c: &mut Client,
    f: &mut impl FnMut(&mut Transaction<'_>) -> StoreResult<T>,
) -> StoreResult<T> {
    let mut tx = c
        .build_transaction()
        .isolation_level(IsolationLevel::Serializable)
        .start()?;
    let value = f(&mut tx)?;
    tx.commit()?;
    Ok(value)
}

fn migrate(c: &mut Client) -> StoreResult<()> {
    let mut tx = c.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
    let found: Option<i64> = tx
        .query_one("SELECT MAX(version) FROM schema_version", &[])?
        .try_get(0)?;
    let mut version = found.unwrap_or(0);
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            found: version,
            known: SCHEMA_VERSION,
        });
    }
    if found.is_none() {
        tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[])?;
    }
    for sql in &MIGRATIONS[version as usize..] {
        tx.batch_execute(sql)?;
        version += 1;
        tx.execute("UPDATE schema_version SET version = $1", &[&version])?;
    }
    tx.commit()?;
    Ok(())
}

pub struct PgStore {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl PgStore {
    /// Start the workers, connect and migrate (so a wrong URL or an unreachable database fails now).
    pub fn open(url: &str) -> StoreResult<PgStore> {
        let target = redact(url);
        let mut config: Config = url
            .parse()
            .map_err(|e| StoreError::BadLocation(format!("{target}: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("fcdev");
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..WORKERS {
            let rx = rx.clone();
            let mut conn = Conn {
                config: config.clone(),
                target: target.clone(),
                client: None,
                last_used: Instant::now(),
            };
            std::thread::Builder::new()
                .name(format!("fcdev-pg-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    match job {
                        Ok(job) => job(&mut conn),
                        // The store was dropped.
                        Err(_) => break,
                    }
                })
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot start a database thread: {e}"))
                })?;
        }
        let store = PgStore {
            jobs: Mutex::new(tx),
        };
        store.run(migrate)?;
        Ok(store)
    }

    /// The user's namespace; when missing, created at `index` (an agent adopting the control plane's) or at
    /// the lowest free /24 of the pool.
    fn namespace_with(&self, user: &User, index: Option<u32>) -> StoreResult<NamespaceRow> {
        let user = user.clone();
        self.run(move |c| {
            transaction(c, |tx| {
                if let Some(r) = tx.query_opt(
                    &format!("SELECT {NS_COLS} FROM namespaces WHERE user_id = $1"),
                    &[&user.id],
                )? {
                    return row_namespace(&r);
                }
                let index = match index {
                    Some(index) => index,
                    None => {
                        let used = tx
                            .query("SELECT idx FROM namespaces ORDER BY idx", &[])?
                            .iter()
                            .map(|r| Ok(r.try_get::<_, i64>(0)? as u32))
                            .collect::<StoreResult<Vec<u32>>>()?;
                        alloc::lowest_free(&used, alloc::NAMESPACE_COUNT)
                            .ok_or(StoreError::NamespacesExhausted)?
                    }
                };
                let subnet = alloc::namespace_subnet(index);
                let row = tx.query_one(
                    &format!(
                        "INSERT INTO namespaces (user_id, name, idx, subnet) VALUES ($1, $2, $3, $4)
                         RETURNING {NS_COLS}"
                    ),
                    &[&user.id, &user.name, &(index as i64), &subnet.to_string()],
                )?;
                row_namespace(&row)
            })
        })
    }

    /// Run `f` with a connection on a worker thread and wait for its result.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |conn: &mut Conn| {
            let result = match conn.client() {
                Ok(client) => f(client),
                Err(e) => Err(e),
            };
            let _ = tx.send(conn.settle(result));
        });
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| StoreError::Unavailable("the database workers stopped".into()))?;
        rx.recv()
            .map_err(|_| StoreError::Unavailable("a database worker stopped".into()))?
    }

    /// Every row of a query, mapped.
    fn all<T: Send + 'static>(
        &self,
        sql: String,
        params: Vec<Box<dyn ToSql + Sync + Send>>,
        map: fn(&Row) -> StoreResult<T>,
    ) -> StoreResult<Vec<T>> {
        self.run(move |c| {
            let refs: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
            c.query(&sql, &refs)?.iter().map(map).collect()
        })
    }

    /// The first row of a query, mapped.
    fn opt<T: Send + 'static>(
        &self,
        sql: String,
        params: Vec<Box<dyn ToSql + Sync + Send>>,
        map: fn(&Row) -> StoreResult<T>,
    ) -> StoreResult<Option<T>> {
        Ok(self.all(sql, params, map)?.into_iter().next())
    }

    /// Rows changed by one statement.
    fn exec(
        &self,
        sql: &'static str,
        params: Vec<Box<dyn ToSql + Sync + Send>>,
    ) -> StoreResult<u64> {
        self.run(move |c| {
            let refs: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
            Ok(c.execute(sql, &refs)?)
        })
    }
}

fn bad(what: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("stored {what} `{value}` does not parse"))
}

fn parse_addr(s: &str) -> StoreResult<Ipv4Addr> {
    s.parse().map_err(|_| bad("address", s))
}

fn parse_subnet(s: &str) -> StoreResult<Subnet> {
    s.parse().map_err(|_| bad("subnet", s))
}

fn row_user(r: &Row) -> StoreResult<User> {
    Ok(User {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
    })
}

fn row_namespace(r: &Row) -> StoreResult<NamespaceRow> {
    Ok(NamespaceRow {
        id: r.try_get(0)?,
        user_id: r.try_get(1)?,
        name: r.try_get(2)?,
        index: r.try_get::<_, i64>(3)? as u32,
        subnet: parse_subnet(r.try_get(4)?)?,
    })
}

fn row_cluster(r: &Row) -> StoreResult<ClusterRow> {
    let state: &str = r.try_get(4)?;
    Ok(ClusterRow {
        id: r.try_get(0)?,
        namespace_id: r.try_get(1)?,
        name: r.try_get(2)?,
        image: r.try_get(3)?,
        state: ClusterState::parse(state).unwrap_or(ClusterState::Failed),
        reason: r.try_get(5)?,
        start_mode: r.try_get(6)?,
        created_at: r.try_get(7)?,
        updated_at: r.try_get(8)?,
        disk_bytes: r.try_get::<_, Option<i64>>(9)?.map(|b| b.max(0) as u64),
    })
}

fn row_snapshot(r: &Row) -> StoreResult<SnapshotRow> {
    Ok(SnapshotRow {
        id: r.try_get(0)?,
        cluster_id: r.try_get(1)?,
        namespace_id: r.try_get(2)?,
        cluster: r.try_get(3)?,
        name: r.try_get(4)?,
        image: r.try_get(5)?,
        size_bytes: r.try_get::<_, i64>(6)?.max(0) as u64,
        created_at: r.try_get(7)?,
    })
}

fn row_vm(r: &Row) -> StoreResult<VmRow> {
    let state: &str = r.try_get(7)?;
    Ok(VmRow {
        id: r.try_get(0)?,
        cluster_id: r.try_get(1)?,
        slot: r.try_get::<_, i64>(2)? as u32,
        name: r.try_get(3)?,
        role: r.try_get(4)?,
        address: parse_addr(r.try_get(5)?)?,
        mac: r.try_get(6)?,
        state: VmState::parse(state).unwrap_or(VmState::Failed),
        detail: r.try_get(8)?,
    })
}

fn row_peer(r: &Row) -> StoreResult<PeerRow> {
    Ok(PeerRow {
        id: r.try_get(0)?,
        namespace_id: r.try_get(1)?,
        name: r.try_get(2)?,
        public_key: r.try_get(3)?,
        address: parse_addr(r.try_get(4)?)?,
    })
}

fn row_host(r: &Row) -> StoreResult<HostRow> {
    Ok(HostRow {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        state: HostState::parse(r.try_get(2)?),
        reason: r.try_get(3)?,
        revoked: r.try_get::<_, Option<String>>(4)?.is_some(),
        created_at: r.try_get(5)?,
        instance: r.try_get(6)?,
        heartbeat_ms: r.try_get(7)?,
        hub_endpoint: r.try_get(8)?,
        hub_public_key: r.try_get(9)?,
        capacity: capacity_of(
            r.try_get(10)?,
            r.try_get(11)?,
            r.try_get(12)?,
            r.try_get(13)?,
            r.try_get(14)?,
        ),
    })
}

fn row_event(r: &Row) -> StoreResult<EventRow> {
    Ok(EventRow {
        seq: r.try_get(0)?,
        cluster_id: r.try_get(1)?,
        vm: r.try_get(2)?,
        state: r.try_get(3)?,
        message: r.try_get(4)?,
        at: r.try_get(5)?,
    })
}

use super::{CLUSTER_COLS, EVENT_COLS, HOST_COLS, NS_COLS, PEER_COLS, SNAPSHOT_COLS, VM_COLS};

/// Store an event as the next one of its cluster.
fn insert_event(
    c: &mut impl GenericClient,
    cluster_id: i64,
    vm: Option<&str>,
    state: &str,
    message: &str,
) -> StoreResult<EventRow> {
    let row = c.query_one(
        &format!(
            "INSERT INTO events (cluster_id, seq, vm, state, message)
             VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE cluster_id = $1), $2, $3, $4)
             RETURNING {EVENT_COLS}"
        ),
        &[&cluster_id, &vm, &state, &message],
    )?;
    row_event(&row)
}

fn user_id(c: &mut impl GenericClient, name: &str) -> StoreResult<i64> {
    match c.query_opt("SELECT id FROM users WHERE name = $1", &[&name])? {
        Some(r) => Ok(r.try_get(0)?),
        None => Err(StoreError::NotFound(format!("user `{name}`"))),
    }
}

/// Host numbers (offsets in the namespace /24), sorted, already taken by the rows of `table` (`vms` or `peers`).
fn used_hosts(c: &mut impl GenericClient, table: &str, ns: &NamespaceRow) -> StoreResult<Vec<u32>> {
    let rows = c.query(
        &format!("SELECT address FROM {table} WHERE namespace_id = $1"),
        &[&ns.id],
    )?;
    let mut used = rows
        .iter()
        .map(|r| {
            let a = parse_addr(r.try_get(0)?)?;
            Ok(u32::from(a).wrapping_sub(u32::from(ns.subnet.base)))
        })
        .collect::<StoreResult<Vec<_>>>()?;
    used.sort_unstable();
    Ok(used)
}

/// Lock the namespace row for the rest of the transaction: allocations in one namespace queue behind it.
fn lock_namespace(c: &mut impl GenericClient, ns_id: i64) -> StoreResult<()> {
    match c.query_opt(
        "SELECT id FROM namespaces WHERE id = $1 FOR UPDATE",
        &[&ns_id],
    )? {
        Some(_) => Ok(()),
        None => Err(StoreError::NotFound(format!("namespace #{ns_id}"))),
    }
}

/// Tell a running server to look at the store again (admin changes).
fn bump_admin_version(c: &mut impl GenericClient) -> StoreResult<()> {
    c.execute(
        "UPDATE admin_changes SET version = version + 1 WHERE id = 1",
        &[],
    )?;
    Ok(())
}

fn clusters_of_user(c: &mut impl GenericClient, id: i64) -> StoreResult<i64> {
    Ok(c.query_one(
        "SELECT COUNT(*) FROM clusters c JOIN namespaces n ON n.id = c.namespace_id WHERE n.user_id = $1",
        &[&id],
    )?
    .try_get(0)?)
}

fn row_intent(r: &Row) -> StoreResult<ClusterIntent> {
    Ok(ClusterIntent {
        gen: r.try_get(0)?,
        reset_gen: r.try_get(1)?,
        want_running: r.try_get(2)?,
        applied_gen: r.try_get(3)?,
        reported_seq: r.try_get(4)?,
    })
}

macro_rules! params {
    ($($p:expr),* $(,)?) => {
        vec![$(Box::new($p) as Box<dyn ToSql + Sync + Send>),*]
    };
}

impl StoreEngine for PgStore {
    // ---- users and tokens ----

    fn add_user(&self, name: &str) -> StoreResult<(User, String)> {
        let name = name.to_string();
        self.run(move |c| {
            let token = new_token();
            let hash = hash_token(&token);
            let id = transaction(c, |tx| {
                if tx
                    .query_opt("SELECT id FROM users WHERE name = $1", &[&name])?
                    .is_some()
                {
                    return Err(StoreError::Exists(format!("user `{name}`")));
                }
                let id: i64 = tx
                    .query_one(
                        "INSERT INTO users (name) VALUES ($1) RETURNING id",
                        &[&name],
                    )?
                    .try_get(0)?;
                tx.execute(
                    "INSERT INTO tokens (user_id, hash) VALUES ($1, $2)",
                    &[&id, &hash],
                )?;
                Ok(id)
            });
            match id {
                Err(StoreError::Pg(e)) if is_unique_violation(&e) => {
                    Err(StoreError::Exists(format!("user `{name}`")))
                }
                Err(e) => Err(e),
                Ok(id) => Ok((User { id, name }, token)),
            }
        })
    }

    fn issue_token(&self, name: &str) -> StoreResult<String> {
        let name = name.to_string();
        self.run(move |c| {
            let id = user_id(c, &name)?;
            let token = new_token();
            c.execute(
                "INSERT INTO tokens (user_id, hash) VALUES ($1, $2)",
                &[&id, &hash_token(&token)],
            )?;
            Ok(token)
        })
    }

    fn revoke_user(&self, name: &str) -> StoreResult<(usize, usize)> {
        let name = name.to_string();
        self.run(move |c| {
            transaction(c, |tx| {
                let id = user_id(tx, &name)?;
                let tokens = tx.execute(
                    "UPDATE tokens SET revoked_at = fcdev_now() WHERE revoked_at IS NULL AND user_id = $1",
                    &[&id],
                )?;
                let peers = tx.execute(
                    "DELETE FROM peers WHERE namespace_id IN (SELECT id FROM namespaces WHERE user_id = $1)",
                    &[&id],
                )?;
                bump_admin_version(tx)?;
                Ok((tokens as usize, peers as usize))
            })
        })
    }

    fn begin_user_removal(&self, name: &str) -> StoreResult<Removal> {
        let name = name.to_string();
        self.run(move |c| {
            transaction(c, |tx| {
                let id = user_id(tx, &name)?;
                tx.execute(
                    "UPDATE tokens SET revoked_at = fcdev_now() WHERE revoked_at IS NULL AND user_id = $1",
                    &[&id],
                )?;
                let peers = tx.execute(
                    "DELETE FROM peers WHERE namespace_id IN (SELECT id FROM namespaces WHERE user_id = $1)",
                    &[&id],
                )?;
                let clusters = clusters_of_user(tx, id)?;
                if clusters == 0 {
                    tx.execute("DELETE FROM users WHERE id = $1", &[&id])?;
                } else {
                    tx.execute(
                        "UPDATE users SET removing_at = fcdev_now() WHERE id = $1 AND removing_at IS NULL",
                        &[&id],
                    )?;
                }
                bump_admin_version(tx)?;
                Ok(Removal {
                    user: User {
                        id,
                        name: name.clone(),
                    },
                    clusters: clusters as usize,
                    peers: peers as usize,
                })
            })
        })
    }

    fn users_being_removed(&self) -> StoreResult<Vec<User>> {
        self.all(
            "SELECT id, name FROM users WHERE removing_at IS NOT NULL ORDER BY id".into(),
            params![],
            row_user,
        )
    }

    fn user_exists(&self, name: &str) -> StoreResult<bool> {
        Ok(self
            .opt(
                "SELECT id, name FROM users WHERE name = $1".into(),
                params![name.to_string()],
                row_user,
            )?
            .is_some())
    }

    fn delete_user(&self, id: i64) -> StoreResult<bool> {
        self.run(move |c| {
            transaction(c, |tx| {
                if clusters_of_user(tx, id)? > 0 {
                    return Ok(false);
                }
                tx.execute("DELETE FROM users WHERE id = $1", &[&id])?;
                Ok(true)
            })
        })
    }

    fn data_version(&self) -> StoreResult<i64> {
        self.run(|c| {
            Ok(
                c.query_one("SELECT version FROM admin_changes WHERE id = 1", &[])?
                    .try_get(0)?,
            )
        })
    }

    fn list_users(&self) -> StoreResult<Vec<User>> {
        self.all(
            "SELECT id, name FROM users ORDER BY name".into(),
            params![],
            row_user,
        )
    }

    fn user_by_token(&self, token: &str) -> StoreResult<Option<User>> {
        self.opt(
            "SELECT u.id, u.name FROM tokens t JOIN users u ON u.id = t.user_id
             WHERE t.hash = $1 AND t.revoked_at IS NULL"
                .into(),
            params![hash_token(token)],
            row_user,
        )
    }

    // ---- hosts ----

    fn add_host(&self, name: &str) -> StoreResult<(HostRow, String)> {
        let name = name.to_string();
        self.run(move |c| {
            let token = new_host_token();
            let hash = hash_token(&token);
            let host = transaction(c, |tx| {
                if tx
                    .query_opt("SELECT id FROM hosts WHERE name = $1", &[&name])?
                    .is_some()
                {
                    return Err(StoreError::Exists(format!("host `{name}`")));
                }
                let row = tx.query_one(
                    &format!(
                        "INSERT INTO hosts (name, token_hash) VALUES ($1, $2) RETURNING {HOST_COLS}"
                    ),
                    &[&name, &hash],
                )?;
                row_host(&row)
            });
            match host {
                Err(StoreError::Pg(e)) if is_unique_violation(&e) => {
                    Err(StoreError::Exists(format!("host `{name}`")))
                }
                Err(e) => Err(e),
                Ok(host) => Ok((host, token)),
            }
        })
    }

    fn hosts(&self) -> StoreResult<Vec<HostRow>> {
        self.all(
            format!("SELECT {HOST_COLS} FROM hosts ORDER BY name"),
            params![],
            row_host,
        )
    }

    fn revoke_host(&self, name: &str) -> StoreResult<bool> {
        let name = name.to_string();
        self.run(move |c| {
            transaction(c, |tx| {
                let Some(row) = tx.query_opt(
                    "SELECT revoked_at FROM hosts WHERE name = $1 FOR UPDATE",
                    &[&name],
                )?
                else {
                    return Err(StoreError::NotFound(format!("host `{name}`")));
                };
                if row.try_get::<_, Option<String>>(0)?.is_some() {
                    return Ok(false);
                }
                tx.execute(
                    "UPDATE hosts SET revoked_at = fcdev_now() WHERE name = $1",
                    &[&name],
                )?;
                Ok(true)
            })
        })
    }

    fn host_by_token(&self, token: &str) -> StoreResult<Option<HostRow>> {
        self.opt(
            format!("SELECT {HOST_COLS} FROM hosts WHERE token_hash = $1 AND revoked_at IS NULL"),
            params![hash_token(token)],
            row_host,
        )
    }

    fn host_heartbeat(
        &self,
        id: i64,
        beat: &AgentHeartbeat,
        now_ms: i64,
        lease_ms: i64,
    ) -> StoreResult<HostRow> {
        let beat = beat.clone();
        self.run(move |c| {
            transaction(c, |tx| {
                let Some(row) = tx.query_opt(
                    &format!("SELECT {HOST_COLS} FROM hosts WHERE id = $1 FOR UPDATE"),
                    &[&id],
                )?
                else {
                    return Err(StoreError::NotFound(format!("host #{id}")));
                };
                let host = row_host(&row)?;
                if host.revoked {
                    return Err(StoreError::NotFound(format!("host `{}`", host.name)));
                }
                check_claim(&host, &beat.instance, now_ms, lease_ms)?;
                let cap = &beat.capacity;
                let row = tx.query_one(
                    &format!(
                        "UPDATE hosts SET state = 'live', reason = NULL, instance = $2, heartbeat_ms = $3,
                             hub_endpoint = $4, hub_public_key = $5, memory_mb = $6, free_memory_mb = $7,
                             cpus = $8, disk_free_bytes = $9, images = $10
                         WHERE id = $1 RETURNING {HOST_COLS}"
                    ),
                    &[
                        &id,
                        &beat.instance,
                        &now_ms,
                        &beat.hub_endpoint,
                        &beat.hub_public_key,
                        &to_i64(cap.memory_mb),
                        &to_i64(cap.free_memory_mb),
                        &i64::from(cap.cpus),
                        &to_i64(cap.disk_free_bytes),
                        &images_json(&cap.images),
                    ],
                )?;
                row_host(&row)
            })
        })
    }

    fn expire_hosts(&self, now_ms: i64, lease_ms: i64, reason: &str) -> StoreResult<Vec<HostRow>> {
        let reason = reason.to_string();
        self.run(move |c| {
            transaction(c, |tx| {
                tx.query(
                    &format!(
                        "UPDATE hosts SET state = 'lost', reason = $3
                         WHERE state = 'live' AND heartbeat_ms <= $1::BIGINT - $2::BIGINT RETURNING {HOST_COLS}"
                    ),
                    &[&now_ms, &lease_ms, &reason],
                )?
                .iter()
                .map(row_host)
                .collect()
            })
        })
    }

    // ---- namespaces ----

    fn namespace_host(&self, ns_id: i64) -> StoreResult<Option<HostRow>> {
        self.opt(
            format!(
                "SELECT {HOST_COLS} FROM hosts
                 WHERE id = (SELECT host_id FROM namespaces WHERE id = $1)"
            ),
            params![ns_id],
            row_host,
        )
    }

    fn place_namespace(
        &self,
        ns_id: i64,
        expected: Option<i64>,
        host_id: i64,
    ) -> StoreResult<Option<HostRow>> {
        self.run(move |c| {
            transaction(c, |tx| {
                tx.execute(
                    "UPDATE namespaces SET host_id = $3
                     WHERE id = $1 AND host_id IS NOT DISTINCT FROM $2",
                    &[&ns_id, &expected, &host_id],
                )?;
                tx.query_opt(
                    &format!(
                        "SELECT {HOST_COLS} FROM hosts
                         WHERE id = (SELECT host_id FROM namespaces WHERE id = $1)"
                    ),
                    &[&ns_id],
                )?
                .as_ref()
                .map(row_host)
                .transpose()
            })
        })
    }

    fn namespaces_on(&self, host_id: i64) -> StoreResult<Vec<NamespaceRow>> {
        self.all(
            format!("SELECT {NS_COLS} FROM namespaces WHERE host_id = $1 ORDER BY id"),
            params![host_id],
            row_namespace,
        )
    }

    fn adopt_namespace(&self, user: &User, index: u32) -> StoreResult<NamespaceRow> {
        self.namespace_with(user, Some(index))
    }

    fn namespace_of(&self, user_id: i64) -> StoreResult<Option<NamespaceRow>> {
        self.opt(
            format!("SELECT {NS_COLS} FROM namespaces WHERE user_id = $1"),
            params![user_id],
            row_namespace,
        )
    }

    fn namespace_by_id(&self, id: i64) -> StoreResult<NamespaceRow> {
        self.opt(
            format!("SELECT {NS_COLS} FROM namespaces WHERE id = $1"),
            params![id],
            row_namespace,
        )?
        .ok_or_else(|| StoreError::NotFound(format!("namespace #{id}")))
    }

    fn ensure_namespace(&self, user: &User) -> StoreResult<NamespaceRow> {
        self.namespace_with(user, None)
    }

    // ---- clusters and VMs ----

    fn create_cluster(
        &self,
        ns: &NamespaceRow,
        name: &str,
        image: &str,
        vms: &[NewVm<'_>],
    ) -> StoreResult<ClusterRow> {
        let (ns, name, image) = (ns.clone(), name.to_string(), image.to_string());
        let vms: Vec<(String, String)> = vms
            .iter()
            .map(|v| (v.name.to_string(), v.role.to_string()))
            .collect();
        self.run(move |c| {
            transaction(c, |tx| {
                lock_namespace(tx, ns.id)?;
                if tx
                    .query_opt(
                        "SELECT id FROM clusters WHERE namespace_id = $1 AND name = $2",
                        &[&ns.id, &name],
                    )?
                    .is_some()
                {
                    return Err(StoreError::Exists(format!("cluster `{name}`")));
                }
                let row = tx.query_one(
                    &format!(
                        "INSERT INTO clusters (namespace_id, name, image, state) VALUES ($1, $2, $3, $4)
                         RETURNING {CLUSTER_COLS}"
                    ),
                    &[&ns.id, &name, &image, &ClusterState::Requested.as_str()],
                )?;
                let cluster = row_cluster(&row)?;
                let mut used = used_hosts(tx, "vms", &ns)?;
                for (slot, (vm_name, role)) in vms.iter().enumerate() {
                    used.sort_unstable();
                    let host =
                        alloc::lowest_free_from(&used, alloc::FIRST_VM_HOST, alloc::LAST_VM_HOST)
                            .ok_or_else(|| {
                                StoreError::Exhausted(format!(
                                    "no free VM address left in {}",
                                    ns.subnet
                                ))
                            })?;
                    used.push(host);
                    let addr = ns.subnet.host(host);
                    tx.execute(
                        "INSERT INTO vms (cluster_id, namespace_id, slot, name, role, address, mac, state)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                        &[
                            &cluster.id,
                            &ns.id,
                            &(slot as i64),
                            vm_name,
                            role,
                            &addr.to_string(),
                            &mac_for(addr),
                            &VmState::Pending.as_str(),
                        ],
                    )?;
                }
                Ok(cluster)
            })
        })
    }

    fn cluster(&self, ns_id: i64, name: &str) -> StoreResult<Option<ClusterRow>> {
        self.opt(
            format!("SELECT {CLUSTER_COLS} FROM clusters WHERE namespace_id = $1 AND name = $2"),
            params![ns_id, name.to_string()],
            row_cluster,
        )
    }

    fn cluster_by_id(&self, id: i64) -> StoreResult<Option<ClusterRow>> {
        self.opt(
            format!("SELECT {CLUSTER_COLS} FROM clusters WHERE id = $1"),
            params![id],
            row_cluster,
        )
    }

    fn clusters_in(&self, ns_id: i64) -> StoreResult<Vec<ClusterRow>> {
        self.all(
            format!("SELECT {CLUSTER_COLS} FROM clusters WHERE namespace_id = $1 ORDER BY name"),
            params![ns_id],
            row_cluster,
        )
    }

    fn all_clusters(&self) -> StoreResult<Vec<ClusterRow>> {
        self.all(
            format!("SELECT {CLUSTER_COLS} FROM clusters ORDER BY id"),
            params![],
            row_cluster,
        )
    }

    fn clusters_ready_since(&self, secs: u64) -> StoreResult<Vec<ClusterRow>> {
        self.all(
            format!(
                r#"SELECT {CLUSTER_COLS} FROM clusters WHERE state = $1
                   AND updated_at <= to_char((clock_timestamp() - make_interval(secs => $2))
                                             AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
                   ORDER BY id"#
            ),
            params![ClusterState::Ready.as_str(), secs as f64],
            row_cluster,
        )
    }

    fn record_report(
        &self,
        id: i64,
        report: &ClusterMirror,
        events: &[ReportedEvent],
    ) -> StoreResult<Vec<EventRow>> {
        let (report, events) = (report.clone(), events.to_vec());
        self.run(move |c| {
            transaction(c, |tx| {
                // $6: the generation the agent applied (NULL: the control plane's own record). Only a report
                // at the current generation sets the state.
                let changed = tx.execute(
                    "UPDATE clusters SET
                         updated_at = CASE WHEN state = $2 OR ($6::BIGINT IS NOT NULL AND gen > $6::BIGINT)
                                      THEN updated_at ELSE fcdev_now() END,
                         state = CASE WHEN $6::BIGINT IS NULL OR gen <= $6::BIGINT THEN $2 ELSE state END,
                         reason = CASE WHEN $6::BIGINT IS NULL OR gen <= $6::BIGINT THEN $3 ELSE reason END,
                         start_mode = CASE WHEN $6::BIGINT IS NULL OR gen <= $6::BIGINT THEN $4
                                      ELSE start_mode END,
                         disk_bytes = CASE WHEN $6::BIGINT IS NULL OR gen <= $6::BIGINT THEN $7::BIGINT
                                      ELSE disk_bytes END,
                         applied_gen = GREATEST(applied_gen, COALESCE($6::BIGINT, applied_gen)),
                         reported_seq = COALESCE($8::BIGINT, reported_seq),
                         report = $5
                     WHERE id = $1",
                    &[
                        &id,
                        &report.state.as_str(),
                        &report.reason,
                        &report.start_mode,
                        &report.vms_json,
                        &report.applied_gen,
                        &report.disk_bytes.map(to_i64),
                        &report.reported_seq,
                    ],
                )?;
                if changed == 0 {
                    return Ok(Vec::new());
                }
                let mut stored = Vec::with_capacity(events.len());
                for e in &events {
                    stored.push(insert_event(tx, id, e.vm.as_deref(), &e.state, &e.message)?);
                }
                Ok(stored)
            })
        })
    }

    fn cluster_report(&self, id: i64) -> StoreResult<Option<String>> {
        Ok(self
            .opt(
                "SELECT report FROM clusters WHERE id = $1".to_string(),
                params![id],
                |r| Ok(r.try_get::<_, Option<String>>(0)?),
            )?
            .flatten())
    }

    fn cluster_intent(&self, id: i64) -> StoreResult<Option<ClusterIntent>> {
        self.opt(
            "SELECT gen, reset_gen, want_running, applied_gen, reported_seq FROM clusters WHERE id = $1".to_string(),
            params![id],
            row_intent,
        )
    }

    fn intents_in(&self, ns_id: i64) -> StoreResult<Vec<(i64, ClusterIntent)>> {
        self.all(
            "SELECT gen, reset_gen, want_running, applied_gen, reported_seq, id FROM clusters
             WHERE namespace_id = $1 ORDER BY id"
                .to_string(),
            params![ns_id],
            |r| Ok((r.try_get(5)?, row_intent(r)?)),
        )
    }

    fn request_intent(
        &self,
        id: i64,
        intent: Intent,
        state: ClusterState,
        message: &str,
        forget_report: bool,
    ) -> StoreResult<(ClusterIntent, EventRow)> {
        let message = message.to_string();
        self.run(move |c| {
            transaction(c, |tx| {
                let Some(row) = tx.query_opt(
                    "UPDATE clusters SET
                         gen = gen + 1,
                         reset_gen = CASE WHEN $2 THEN gen + 1 ELSE reset_gen END,
                         want_running = $3,
                         state = $4, reason = NULL, disk_bytes = NULL,
                         report = CASE WHEN $5 THEN NULL ELSE report END,
                         reported_seq = CASE WHEN $5 THEN 0 ELSE reported_seq END,
                         updated_at = fcdev_now()
                     WHERE id = $1
                     RETURNING gen, reset_gen, want_running, applied_gen, reported_seq",
                    &[
                        &id,
                        &(intent == Intent::Reset),
                        &(intent != Intent::Stop),
                        &state.as_str(),
                        &forget_report,
                    ],
                )?
                else {
                    return Err(StoreError::NotFound(format!("cluster #{id}")));
                };
                let now = row_intent(&row)?;
                let event = insert_event(tx, id, None, state.as_str(), &message)?;
                Ok((now, event))
            })
        })
    }

    fn set_applied_gen(&self, id: i64, gen: i64) -> StoreResult<()> {
        self.exec(
            "UPDATE clusters SET applied_gen = $2 WHERE id = $1",
            params![id, gen],
        )?;
        Ok(())
    }

    fn set_cluster_state_event(
        &self,
        id: i64,
        state: ClusterState,
        reason: Option<&str>,
        message: &str,
    ) -> StoreResult<EventRow> {
        let (reason, message) = (reason.map(str::to_string), message.to_string());
        self.run(move |c| {
            transaction(c, |tx| {
                tx.execute(
                    "UPDATE clusters SET state = $2, reason = $3, disk_bytes = NULL, updated_at = fcdev_now()
                     WHERE id = $1",
                    &[&id, &state.as_str(), &reason],
                )?;
                insert_event(tx, id, None, state.as_str(), &message)
            })
        })
    }

    fn set_cluster_stopped(
        &self,
        id: i64,
        disk_bytes: u64,
        message: &str,
    ) -> StoreResult<EventRow> {
        let message = message.to_string();
        self.run(move |c| {
            transaction(c, |tx| {
                tx.execute(
                    "UPDATE clusters SET state = $2, reason = NULL, disk_bytes = $3, updated_at = fcdev_now()
                     WHERE id = $1",
                    &[&id, &ClusterState::Stopped.as_str(), &(disk_bytes as i64)],
                )?;
                insert_event(tx, id, None, ClusterState::Stopped.as_str(), &message)
            })
        })
    }

    fn add_snapshot(
        &self,
        cluster_id: i64,
        name: &str,
        image: &str,
        size_bytes: u64,
    ) -> StoreResult<SnapshotRow> {
        let (name, image) = (name.to_string(), image.to_string());
        self.run(move |c| {
            let result = transaction(c, |tx| {
                let id: i64 = match tx.query_opt(
                    "INSERT INTO snapshots (cluster_id, namespace_id, name, image, size_bytes)
                     SELECT id, namespace_id, $2, $3, $4 FROM clusters WHERE id = $1 RETURNING id",
                    &[&cluster_id, &name, &image, &(size_bytes as i64)],
                )? {
                    Some(r) => r.try_get(0)?,
                    None => return Err(StoreError::NotFound(format!("cluster #{cluster_id}"))),
                };
                let row = tx.query_one(
                    &format!(
                        "SELECT {SNAPSHOT_COLS} FROM snapshots s JOIN clusters c ON c.id = s.cluster_id
                         WHERE s.id = $1"
                    ),
                    &[&id],
                )?;
                row_snapshot(&row)
            });
            match result {
                Err(StoreError::Pg(e)) if is_unique_violation(&e) => {
                    Err(StoreError::Exists(format!("snapshot `{name}`")))
                }
                r => r,
            }
        })
    }

    fn snapshot(&self, cluster_id: i64, name: &str) -> StoreResult<Option<SnapshotRow>> {
        self.opt(
            format!(
                "SELECT {SNAPSHOT_COLS} FROM snapshots s JOIN clusters c ON c.id = s.cluster_id
                 WHERE s.cluster_id = $1 AND s.name = $2"
            ),
            params![cluster_id, name.to_string()],
            row_snapshot,
        )
    }

    fn snapshots_of(&self, cluster_id: i64) -> StoreResult<Vec<SnapshotRow>> {
        self.all(
            format!(
                "SELECT {SNAPSHOT_COLS} FROM snapshots s JOIN clusters c ON c.id = s.cluster_id
                 WHERE s.cluster_id = $1 ORDER BY s.id"
            ),
            params![cluster_id],
            row_snapshot,
        )
    }

    fn snapshots_in(&self, ns_id: i64) -> StoreResult<Vec<SnapshotRow>> {
        self.all(
            format!(
                "SELECT {SNAPSHOT_COLS} FROM snapshots s JOIN clusters c ON c.id = s.cluster_id
                 WHERE s.namespace_id = $1 ORDER BY s.size_bytes DESC, s.id"
            ),
            params![ns_id],
            row_snapshot,
        )
    }

    fn delete_snapshot(&self, id: i64) -> StoreResult<bool> {
        Ok(self.exec("DELETE FROM snapshots WHERE id = $1", params![id])? > 0)
    }

    fn set_start_mode(&self, id: i64, mode: &str) -> StoreResult<()> {
        self.exec(
            "UPDATE clusters SET start_mode = $2 WHERE id = $1",
            params![id, mode.to_string()],
        )?;
        Ok(())
    }

    fn delete_cluster(&self, id: i64) -> StoreResult<EventRow> {
        self.run(move |c| {
            transaction(c, |tx| {
                let last: i64 = tx
                    .query_one(
                        "SELECT COALESCE(MAX(seq), 0) FROM events WHERE cluster_id = $1",
                        &[&id],
                    )?
                    .try_get(0)?;
                let at: String = tx.query_one("SELECT fcdev_now_ms()", &[])?.try_get(0)?;
                tx.execute("DELETE FROM vms WHERE cluster_id = $1", &[&id])?;
                tx.execute("DELETE FROM snapshots WHERE cluster_id = $1", &[&id])?;
                tx.execute("DELETE FROM events WHERE cluster_id = $1", &[&id])?;
                tx.execute("DELETE FROM clusters WHERE id = $1", &[&id])?;
                Ok(EventRow {
                    seq: last + 1,
                    cluster_id: id,
                    vm: None,
                    state: "deleted".into(),
                    message: "cluster deleted".into(),
                    at,
                })
            })
        })
    }

    fn vms_of(&self, cluster_id: i64) -> StoreResult<Vec<VmRow>> {
        self.all(
            format!("SELECT {VM_COLS} FROM vms WHERE cluster_id = $1 ORDER BY slot"),
            params![cluster_id],
            row_vm,
        )
    }

    fn vms_in_namespace(&self, ns_id: i64) -> StoreResult<Vec<(String, VmRow)>> {
        self.all(
            "SELECT v.id, v.cluster_id, v.slot, v.name, v.role, v.address, v.mac, v.state, v.detail, c.name
             FROM vms v JOIN clusters c ON c.id = v.cluster_id WHERE v.namespace_id = $1
             ORDER BY c.name, v.slot"
                .into(),
            params![ns_id],
            |r| Ok((r.try_get(9)?, row_vm(r)?)),
        )
    }

    fn set_vm_state(&self, id: i64, state: VmState, detail: Option<&str>) -> StoreResult<()> {
        self.exec(
            "UPDATE vms SET state = $2, detail = $3 WHERE id = $1",
            params![id, state.as_str(), detail.map(str::to_string)],
        )?;
        Ok(())
    }

    // ---- ssh keys ----

    fn add_ssh_keys(&self, ns_id: i64, keys: &[String], keep: usize) -> StoreResult<()> {
        let keys = keys.to_vec();
        self.run(move |c| {
            transaction(c, |tx| {
                for key in &keys {
                    // Re-inserting moves a key to the newest position.
                    tx.execute(
                        "DELETE FROM ssh_keys WHERE namespace_id = $1 AND key = $2",
                        &[&ns_id, key],
                    )?;
                    tx.execute(
                        "INSERT INTO ssh_keys (namespace_id, key) VALUES ($1, $2)",
                        &[&ns_id, key],
                    )?;
                }
                tx.execute(
                    "DELETE FROM ssh_keys WHERE namespace_id = $1 AND id NOT IN
                     (SELECT id FROM ssh_keys WHERE namespace_id = $1 ORDER BY id DESC LIMIT $2)",
                    &[&ns_id, &(keep as i64)],
                )?;
                Ok(())
            })
        })
    }

    fn ssh_keys(&self, ns_id: i64) -> StoreResult<Vec<String>> {
        self.all(
            "SELECT key FROM ssh_keys WHERE namespace_id = $1 ORDER BY id".into(),
            params![ns_id],
            |r| Ok(r.try_get(0)?),
        )
    }

    // ---- peers ----

    fn add_peer(&self, ns: &NamespaceRow, name: &str, public_key: &str) -> StoreResult<PeerRow> {
        let (ns, name, public_key) = (ns.clone(), name.to_string(), public_key.to_string());
        self.run(move |c| {
            transaction(c, |tx| {
                lock_namespace(tx, ns.id)?;
                let existing = tx.query_opt(
                    &format!("SELECT {PEER_COLS} FROM peers WHERE public_key = $1"),
                    &[&public_key],
                )?;
                if let Some(r) = existing {
                    let peer = row_peer(&r)?;
                    if peer.namespace_id == ns.id {
                        // The same laptop registering again (idempotent): keep its address.
                        tx.execute(
                            "UPDATE peers SET name = $2 WHERE id = $1",
                            &[&peer.id, &name],
                        )?;
                        return Ok(PeerRow {
                            name: name.clone(),
                            ..peer
                        });
                    }
                    return Err(StoreError::Exists(
                        "a peer with this public key in another namespace".into(),
                    ));
                }
                let used = used_hosts(tx, "peers", &ns)?;
                let host =
                    alloc::lowest_free_from(&used, alloc::FIRST_PEER_HOST, alloc::LAST_PEER_HOST)
                        .ok_or_else(|| {
                            StoreError::Exhausted(format!(
                                "all {} peer addresses of {} are taken",
                                alloc::LAST_PEER_HOST - alloc::FIRST_PEER_HOST + 1,
                                ns.subnet
                            ))
                        })?;
                let address = ns.subnet.host(host);
                let id: i64 = tx
                    .query_one(
                        "INSERT INTO peers (namespace_id, name, public_key, address) VALUES ($1, $2, $3, $4)
                         RETURNING id",
                        &[&ns.id, &name, &public_key, &address.to_string()],
                    )?
                    .try_get(0)?;
                Ok(PeerRow {
                    id,
                    namespace_id: ns.id,
                    name: name.clone(),
                    public_key: public_key.clone(),
                    address,
                })
            })
        })
    }

    fn peers_in(&self, ns_id: i64) -> StoreResult<Vec<PeerRow>> {
        self.all(
            format!("SELECT {PEER_COLS} FROM peers WHERE namespace_id = $1 ORDER BY id"),
            params![ns_id],
            row_peer,
        )
    }

    fn hub_peers(&self) -> StoreResult<Vec<HubPeerRow>> {
        self.all(
            "SELECT p.id, p.namespace_id, p.name, p.public_key, p.address, n.subnet
             FROM peers p JOIN namespaces n ON n.id = p.namespace_id ORDER BY p.id"
                .into(),
            params![],
            |r| {
                Ok(HubPeerRow {
                    peer: row_peer(r)?,
                    subnet: parse_subnet(r.try_get(5)?)?,
                })
            },
        )
    }

    fn remove_peer(&self, id: i64) -> StoreResult<bool> {
        Ok(self.exec("DELETE FROM peers WHERE id = $1", params![id])? > 0)
    }

    fn delete_peer(&self, ns_id: i64, id: i64) -> StoreResult<bool> {
        Ok(self.exec(
            "DELETE FROM peers WHERE id = $1 AND namespace_id = $2",
            params![id, ns_id],
        )? > 0)
    }

    // ---- events ----

    fn add_event(
        &self,
        cluster_id: i64,
        vm: Option<&str>,
        state: &str,
        message: &str,
    ) -> StoreResult<EventRow> {
        let (vm, state, message) = (
            vm.map(str::to_string),
            state.to_string(),
            message.to_string(),
        );
        self.run(move |c| {
            transaction(c, |tx| {
                insert_event(tx, cluster_id, vm.as_deref(), &state, &message)
            })
        })
    }

    fn events_after(&self, cluster_id: i64, after: i64) -> StoreResult<Vec<EventRow>> {
        self.all(
            format!(
                "SELECT {EVENT_COLS} FROM events WHERE cluster_id = $1 AND seq > $2 ORDER BY seq"
            ),
            params![cluster_id, after],
            row_event,
        )
    }

    fn last_event_seq(&self, cluster_id: i64) -> StoreResult<i64> {
        self.run(move |c| {
            Ok(c.query_one(
                "SELECT COALESCE(MAX(seq), 0) FROM events WHERE cluster_id = $1",
                &[&cluster_id],
            )?
            .try_get(0)?)
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_lose_their_password_in_messages() {
        assert_eq!(
            super::redact("postgres://fc:secret@db:5432/fcdev?x=1"),
            "postgres://fc:***@db:5432/fcdev?x=1"
        );
        assert_eq!(
            super::redact("postgres://fc@db/fcdev"),
            "postgres://fc@db/fcdev"
        );
    }
}
