//! The SQLite engine (WAL, one file in the data dir): the embedded default.
//!
//! One connection behind a mutex; every multi-row change runs in one `IMMEDIATE` transaction, so a crash never
//! leaves half a change and concurrent requests never hand out the same subnet or address twice.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    capacity_of, check_claim, hash_token, images_json, mac_for, new_host_token, new_token, to_i64,
    ClusterIntent, ClusterMirror, ClusterRow, EventRow, HostRow, HostState, HubPeerRow, Intent,
    NamespaceRow, NewVm, PeerRow, Removal, SnapshotRow, StoreEngine, StoreError, StoreResult, User,
    VmRow,
};
use crate::api::{AgentHeartbeat, ClusterState, ReportedEvent, VmState};
use crate::server::alloc;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now')),
    removing_at TEXT
);
CREATE TABLE IF NOT EXISTS tokens (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now')),
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS namespaces (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL UNIQUE REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL UNIQUE,
    idx INTEGER NOT NULL UNIQUE,
    subnet TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS clusters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace_id INTEGER NOT NULL REFERENCES namespaces(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    image TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    start_mode TEXT,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now')),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now')),
    UNIQUE (namespace_id, name)
);
CREATE TABLE IF NOT EXISTS vms (
    id INTEGER PRIMARY KEY,
    cluster_id INTEGER NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
    namespace_id INTEGER NOT NULL REFERENCES namespaces(id) ON DELETE CASCADE,
    slot INTEGER NOT NULL,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    address TEXT NOT NULL,
    mac TEXT NOT NULL,
    state TEXT NOT NULL,
    detail TEXT,
    UNIQUE (cluster_id, name),
    UNIQUE (namespace_id, address)
);
CREATE TABLE IF NOT EXISTS peers (
    id INTEGER PRIMARY KEY,
    namespace_id INTEGER NOT NULL REFERENCES namespaces(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    public_key TEXT NOT NULL UNIQUE,
    address TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now')),
    UNIQUE (namespace_id, address)
);
CREATE TABLE IF NOT EXISTS events (
    cluster_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    vm TEXT,
    state TEXT NOT NULL,
    message TEXT NOT NULL,
    at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    PRIMARY KEY (cluster_id, seq)
);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY,
    cluster_id INTEGER NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
    namespace_id INTEGER NOT NULL REFERENCES namespaces(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    image TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now')),
    UNIQUE (cluster_id, name)
);
CREATE TABLE IF NOT EXISTS ssh_keys (
    namespace_id INTEGER NOT NULL REFERENCES namespaces(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    UNIQUE (namespace_id, key)
);
";

/// Events are numbered per cluster (1, 2, …), so a number says nothing about other clusters. Databases of
/// earlier versions numbered them across all clusters (`seq` the table's own key): their events keep their numbers
/// (still increasing within each cluster, so a client's `after=N` stays right) and the next event of a cluster
/// follows its highest; events of deleted clusters are dropped.
const MIGRATE_EVENTS: &str = "
CREATE TABLE events_per_cluster (
    cluster_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    vm TEXT,
    state TEXT NOT NULL,
    message TEXT NOT NULL,
    at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
    PRIMARY KEY (cluster_id, seq)
);
INSERT INTO events_per_cluster (cluster_id, seq, vm, state, message, at)
    SELECT cluster_id, seq, vm, state, message, at FROM events
    WHERE cluster_id IN (SELECT id FROM clusters);
DROP TABLE events;
ALTER TABLE events_per_cluster RENAME TO events;
";

/// Store an event as the next one of its cluster.
fn insert_event(
    conn: &Connection,
    cluster_id: i64,
    vm: Option<&str>,
    state: &str,
    message: &str,
) -> rusqlite::Result<EventRow> {
    conn.query_row(
        &format!(
            "INSERT INTO events (cluster_id, seq, vm, state, message)
             VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE cluster_id = ?1), ?2, ?3, ?4)
             RETURNING {EVENT_COLS}"
        ),
        params![cluster_id, vm, state, message],
        row_event,
    )
}

/// Whether `events` still has the layout of earlier versions (one sequence across all clusters).
fn events_numbered_globally(conn: &Connection) -> rusqlite::Result<bool> {
    let key_part: Option<i64> = conn
        .query_row(
            "SELECT pk FROM pragma_table_info('events') WHERE name = 'cluster_id'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(key_part == Some(0))
}

/// Create the state file private to its owner (0600) before SQLite opens it, and tighten an existing one; SQLite
/// gives its `-wal` and `-shm` files the mode of the database file.
fn make_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn parse_addr(s: String) -> rusqlite::Result<Ipv4Addr> {
    s.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn row_namespace(r: &rusqlite::Row) -> rusqlite::Result<NamespaceRow> {
    let subnet: String = r.get(4)?;
    Ok(NamespaceRow {
        id: r.get(0)?,
        user_id: r.get(1)?,
        name: r.get(2)?,
        index: r.get(3)?,
        subnet: subnet.parse().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(4, rusqlite::types::Type::Text, Box::new(e))
        })?,
    })
}

fn row_cluster(r: &rusqlite::Row) -> rusqlite::Result<ClusterRow> {
    let state: String = r.get(4)?;
    Ok(ClusterRow {
        id: r.get(0)?,
        namespace_id: r.get(1)?,
        name: r.get(2)?,
        image: r.get(3)?,
        state: ClusterState::parse(&state).unwrap_or(ClusterState::Failed),
        reason: r.get(5)?,
        start_mode: r.get(6)?,
        created_at: r.get(7)?,
        updated_at: r.get(8)?,
        disk_bytes: r.get::<_, Option<i64>>(9)?.map(|b| b.max(0) as u64),
    })
}

fn row_snapshot(r: &rusqlite::Row) -> rusqlite::Result<SnapshotRow> {
    Ok(SnapshotRow {
        id: r.get(0)?,
        cluster_id: r.get(1)?,
        namespace_id: r.get(2)?,
        cluster: r.get(3)?,
        name: r.get(4)?,
        image: r.get(5)?,
        size_bytes: r.get::<_, i64>(6)?.max(0) as u64,
        created_at: r.get(7)?,
    })
}

fn row_vm(r: &rusqlite::Row) -> rusqlite::Result<VmRow> {
    let state: String = r.get(7)?;
    Ok(VmRow {
        id: r.get(0)?,
        cluster_id: r.get(1)?,
        slot: r.get(2)?,
        name: r.get(3)?,
        role: r.get(4)?,
        address: parse_addr(r.get(5)?)?,
        mac: r.get(6)?,
        state: VmState::parse(&state).unwrap_or(VmState::Failed),
        detail: r.get(8)?,
    })
}

fn row_peer(r: &rusqlite::Row) -> rusqlite::Result<PeerRow> {
    Ok(PeerRow {
        id: r.get(0)?,
        namespace_id: r.get(1)?,
        name: r.get(2)?,
        public_key: r.get(3)?,
        address: parse_addr(r.get(4)?)?,
    })
}

/// Host numbers (offsets in the namespace /24), sorted, already taken by the rows of `table` (`vms` or `peers`).
fn used_hosts(conn: &Connection, table: &str, ns: &NamespaceRow) -> rusqlite::Result<Vec<u32>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT address FROM {table} WHERE namespace_id = ?1"
    ))?;
    let rows = stmt.query_map([ns.id], |r| parse_addr(r.get(0)?))?;
    let mut used = rows
        .map(|a| a.map(|a| u32::from(a) - u32::from(ns.subnet.base)))
        .collect::<Result<Vec<_>, _>>()?;
    used.sort_unstable();
    Ok(used)
}

fn row_host(r: &rusqlite::Row) -> rusqlite::Result<HostRow> {
    Ok(HostRow {
        id: r.get(0)?,
        name: r.get(1)?,
        state: HostState::parse(&r.get::<_, String>(2)?),
        reason: r.get(3)?,
        revoked: r.get::<_, Option<String>>(4)?.is_some(),
        created_at: r.get(5)?,
        instance: r.get(6)?,
        heartbeat_ms: r.get(7)?,
        hub_endpoint: r.get(8)?,
        hub_public_key: r.get(9)?,
        capacity: capacity_of(r.get(10)?, r.get(11)?, r.get(12)?, r.get(13)?, r.get(14)?),
    })
}

fn host_by_id(conn: &Connection, id: i64) -> StoreResult<HostRow> {
    conn.query_row(
        &format!("SELECT {HOST_COLS} FROM hosts WHERE id = ?1"),
        [id],
        row_host,
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound(format!("host #{id}")))
}

fn row_event(r: &rusqlite::Row) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        seq: r.get(0)?,
        cluster_id: r.get(1)?,
        vm: r.get(2)?,
        state: r.get(3)?,
        message: r.get(4)?,
        at: r.get(5)?,
    })
}

use super::{CLUSTER_COLS, EVENT_COLS, HOST_COLS, NS_COLS, PEER_COLS, SNAPSHOT_COLS, VM_COLS};

fn user_id(conn: &Connection, name: &str) -> StoreResult<i64> {
    conn.query_row("SELECT id FROM users WHERE name = ?1", [name], |r| r.get(0))
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("user `{name}`")))
}

/// Schema version 1 is `SCHEMA` with the fix-ups of `migrate` and `MIGRATE_EVENTS` (state files made before the
/// version table get them at open and are then version 1). Later versions are `MIGRATIONS[n - 2]`.
const MIGRATIONS: &[&str] = &[
    // 2: hosts of a control plane (`fcdev server host add`, `--role agent`). `IF NOT EXISTS`: a file whose
    // version row was lost (it opens as version 1) may already have the table.
    "CREATE TABLE IF NOT EXISTS hosts (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        token_hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now')),
        revoked_at TEXT,
        state TEXT NOT NULL DEFAULT 'new',
        reason TEXT,
        instance TEXT,
        heartbeat_ms INTEGER,
        hub_endpoint TEXT,
        hub_public_key TEXT,
        memory_mb INTEGER,
        free_memory_mb INTEGER,
        cpus INTEGER,
        disk_free_bytes INTEGER,
        images TEXT
    );",
    // 3: the host a namespace lives on (placement by a control plane; NULL: not placed, or `--role all`).
    "ALTER TABLE namespaces ADD COLUMN host_id INTEGER",
    // 4: the VMs a control plane's agent last reported for a cluster (JSON).
    "ALTER TABLE clusters ADD COLUMN report TEXT",
    // 5–8: a control plane's wanted state of a cluster and the generation its agent applied (`ClusterIntent`;
    // an agent's own copy keeps the generation it applied). One column each: a migration is one statement.
    "ALTER TABLE clusters ADD COLUMN gen INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE clusters ADD COLUMN reset_gen INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE clusters ADD COLUMN want_running INTEGER NOT NULL DEFAULT 1",
    "ALTER TABLE clusters ADD COLUMN applied_gen INTEGER NOT NULL DEFAULT 0",
    // 9: the agent's number of the last event it reported (`ClusterIntent::reported_seq`).
    "ALTER TABLE clusters ADD COLUMN reported_seq INTEGER NOT NULL DEFAULT 0",
];

pub const SCHEMA_VERSION: i64 = 1 + MIGRATIONS.len() as i64;

/// Record the schema version (1 for a file made before the table) and apply the migrations after it, each in
/// one transaction with its version. A file of a newer fcdev is refused.
fn schema_version(conn: &mut Connection) -> StoreResult<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let found: Option<i64> =
        tx.query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))?;
    let mut version = match found {
        Some(v) => v,
        None => {
            tx.execute("INSERT INTO schema_version (version) VALUES (1)", [])?;
            1
        }
    };
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            found: version,
            known: SCHEMA_VERSION,
        });
    }
    for sql in &MIGRATIONS[(version - 1) as usize..] {
        // A file whose version row was lost (it opens as version 1) may have the column already.
        let added = sql
            .strip_prefix("ALTER TABLE ")
            .and_then(|rest| rest.split_once(" ADD COLUMN "))
            .and_then(|(table, col)| Some((table, col.split_whitespace().next()?)));
        let exists = match added {
            Some((table, col)) => tx.query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
                [table, col],
                |r| r.get(0),
            )?,
            None => false,
        };
        if !exists {
            tx.execute_batch(sql)?;
        }
        version += 1;
        tx.execute("UPDATE schema_version SET version = ?1", [version])?;
    }
    tx.commit()?;
    Ok(())
}

/// Columns added after the first release, for state files created before them.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_removing: bool = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('users') WHERE name = 'removing_at'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has_removing {
        conn.execute_batch("ALTER TABLE users ADD COLUMN removing_at TEXT")?;
    }
    let has_disk_bytes: bool = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('clusters') WHERE name = 'disk_bytes'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has_disk_bytes {
        conn.execute_batch("ALTER TABLE clusters ADD COLUMN disk_bytes INTEGER")?;
    }
    Ok(())
}

impl SqliteStore {
    pub fn open(path: &Path) -> StoreResult<SqliteStore> {
        make_private(path).map_err(|e| StoreError::File {
            path: path.to_path_buf(),
            source: e,
        })?;
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if events_numbered_globally(&tx)? {
                tx.execute_batch(MIGRATE_EVENTS)?;
            }
            tx.execute_batch(SCHEMA)?;
            tx.commit()?;
        }
        migrate(&conn)?;
        schema_version(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    /// Every row of a query, mapped.
    fn query_all<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        map: fn(&rusqlite::Row) -> rusqlite::Result<T>,
    ) -> StoreResult<Vec<T>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(sql)?;
        let rows = stmt.query_map(params, map)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll back), so a
        // poisoned lock is safe to keep using.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The user's namespace; when missing, created at `index` (an agent adopting the control plane's) or at
    /// the lowest free /24 of the pool.
    fn namespace_with(&self, user: &User, index: Option<u32>) -> StoreResult<NamespaceRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(ns) = tx
            .query_row(
                &format!("SELECT {NS_COLS} FROM namespaces WHERE user_id = ?1"),
                [user.id],
                row_namespace,
            )
            .optional()?
        {
            return Ok(ns);
        }
        let index = match index {
            Some(index) => index,
            None => {
                let used: Vec<u32> = {
                    let mut stmt = tx.prepare("SELECT idx FROM namespaces ORDER BY idx")?;
                    let rows = stmt.query_map([], |r| r.get(0))?;
                    rows.collect::<Result<_, _>>()?
                };
                alloc::lowest_free(&used, alloc::NAMESPACE_COUNT)
                    .ok_or(StoreError::NamespacesExhausted)?
            }
        };
        let subnet = alloc::namespace_subnet(index);
        tx.execute(
            "INSERT INTO namespaces (user_id, name, idx, subnet) VALUES (?1, ?2, ?3, ?4)",
            params![user.id, user.name, index, subnet.to_string()],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(NamespaceRow {
            id,
            user_id: user.id,
            name: user.name.clone(),
            index,
            subnet,
        })
    }
}

impl StoreEngine for SqliteStore {
    // ---- users and tokens ----

    fn add_user(&self, name: &str) -> StoreResult<(User, String)> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists: Option<i64> = tx
            .query_row("SELECT id FROM users WHERE name = ?1", [name], |r| r.get(0))
            .optional()?;
        if exists.is_some() {
            return Err(StoreError::Exists(format!("user `{name}`")));
        }
        tx.execute("INSERT INTO users (name) VALUES (?1)", [name])?;
        let id = tx.last_insert_rowid();
        let token = new_token();
        tx.execute(
            "INSERT INTO tokens (user_id, hash) VALUES (?1, ?2)",
            params![id, hash_token(&token)],
        )?;
        tx.commit()?;
        Ok((
            User {
                id,
                name: name.to_string(),
            },
            token,
        ))
    }

    /// A fresh extra token for an existing user (old tokens stay valid).
    fn issue_token(&self, name: &str) -> StoreResult<String> {
        let conn = self.conn();
        let id: i64 = conn
            .query_row("SELECT id FROM users WHERE name = ?1", [name], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("user `{name}`")))?;
        let token = new_token();
        conn.execute(
            "INSERT INTO tokens (user_id, hash) VALUES (?1, ?2)",
            params![id, hash_token(&token)],
        )?;
        Ok(token)
    }

    /// Revoke every token of a user and delete their WireGuard peers, in one transaction: a running server
    /// drops the peers from its hub when it sees the change (see `server::follow`). Returns (tokens, peers).
    fn revoke_user(&self, name: &str) -> StoreResult<(usize, usize)> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = user_id(&tx, name)?;
        let tokens = tx.execute(
            "UPDATE tokens SET revoked_at = strftime('%Y-%m-%dT%H:%M:%SZ','now')
             WHERE revoked_at IS NULL AND user_id = ?1",
            [id],
        )?;
        let peers = tx.execute(
            "DELETE FROM peers WHERE namespace_id IN (SELECT id FROM namespaces WHERE user_id = ?1)",
            [id],
        )?;
        tx.commit()?;
        Ok((tokens, peers))
    }

    /// First step of removing an engineer: revoke their tokens, delete their peers and mark them as being
    /// removed. A user without clusters is deleted at once (with their namespace); otherwise the running
    /// server stops the clusters and then deletes the user (`users_being_removed`, `delete_user`).
    fn begin_user_removal(&self, name: &str) -> StoreResult<Removal> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = user_id(&tx, name)?;
        tx.execute(
            "UPDATE tokens SET revoked_at = strftime('%Y-%m-%dT%H:%M:%SZ','now')
             WHERE revoked_at IS NULL AND user_id = ?1",
            [id],
        )?;
        let peers = tx.execute(
            "DELETE FROM peers WHERE namespace_id IN (SELECT id FROM namespaces WHERE user_id = ?1)",
            [id],
        )?;
        let clusters: i64 = tx.query_row(
            "SELECT COUNT(*) FROM clusters c JOIN namespaces n ON n.id = c.namespace_id
             WHERE n.user_id = ?1",
            [id],
            |r| r.get(0),
        )?;
        if clusters == 0 {
            tx.execute("DELETE FROM users WHERE id = ?1", [id])?;
        } else {
            tx.execute(
                "UPDATE users SET removing_at = strftime('%Y-%m-%dT%H:%M:%SZ','now')
                 WHERE id = ?1 AND removing_at IS NULL",
                [id],
            )?;
        }
        tx.commit()?;
        Ok(Removal {
            user: User {
                id,
                name: name.to_string(),
            },
            clusters: clusters as usize,
            peers,
        })
    }

    /// Users marked by `begin_user_removal` whose clusters are still to be stopped.
    fn users_being_removed(&self) -> StoreResult<Vec<User>> {
        self.query_all(
            "SELECT id, name FROM users WHERE removing_at IS NOT NULL ORDER BY id",
            [],
            |r| {
                Ok(User {
                    id: r.get(0)?,
                    name: r.get(1)?,
                })
            },
        )
    }

    /// Whether a user of this name exists (removed users do not).
    fn user_exists(&self, name: &str) -> StoreResult<bool> {
        let conn = self.conn();
        Ok(conn
            .query_row("SELECT 1 FROM users WHERE name = ?1", [name], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Delete a user with their tokens, namespace, peers and SSH keys, when they have no cluster left.
    /// False when a cluster remains.
    fn delete_user(&self, id: i64) -> StoreResult<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let clusters: i64 = tx.query_row(
            "SELECT COUNT(*) FROM clusters c JOIN namespaces n ON n.id = c.namespace_id
             WHERE n.user_id = ?1",
            [id],
            |r| r.get(0),
        )?;
        if clusters > 0 {
            return Ok(false);
        }
        tx.execute("DELETE FROM users WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(true)
    }

    /// Changes on every commit made by another connection (another process: `fcdev server user …`), never
    /// on our own: a cheap way for the server to notice admin changes.
    fn data_version(&self) -> StoreResult<i64> {
        let conn = self.conn();
        Ok(conn.query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    fn list_users(&self) -> StoreResult<Vec<User>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, name FROM users ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok(User {
                id: r.get(0)?,
                name: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn user_by_token(&self, token: &str) -> StoreResult<Option<User>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                "SELECT u.id, u.name FROM tokens t JOIN users u ON u.id = t.user_id
                 WHERE t.hash = ?1 AND t.revoked_at IS NULL",
                [hash_token(token)],
                |r| {
                    Ok(User {
                        id: r.get(0)?,
                        name: r.get(1)?,
                    })
                },
            )
            .optional()?)
    }

    // ---- hosts ----

    fn add_host(&self, name: &str) -> StoreResult<(HostRow, String)> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists: Option<i64> = tx
            .query_row("SELECT id FROM hosts WHERE name = ?1", [name], |r| r.get(0))
            .optional()?;
        if exists.is_some() {
            return Err(StoreError::Exists(format!("host `{name}`")));
        }
        let token = new_host_token();
        tx.execute(
            "INSERT INTO hosts (name, token_hash) VALUES (?1, ?2)",
            params![name, hash_token(&token)],
        )?;
        let host = host_by_id(&tx, tx.last_insert_rowid())?;
        tx.commit()?;
        Ok((host, token))
    }

    fn hosts(&self) -> StoreResult<Vec<HostRow>> {
        self.query_all(
            &format!("SELECT {HOST_COLS} FROM hosts ORDER BY name"),
            [],
            row_host,
        )
    }

    fn revoke_host(&self, name: &str) -> StoreResult<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found: Option<Option<String>> = tx
            .query_row(
                "SELECT revoked_at FROM hosts WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        let Some(revoked_at) = found else {
            return Err(StoreError::NotFound(format!("host `{name}`")));
        };
        if revoked_at.is_some() {
            return Ok(false);
        }
        tx.execute(
            "UPDATE hosts SET revoked_at = strftime('%Y-%m-%dT%H:%M:%SZ','now') WHERE name = ?1",
            [name],
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn host_by_token(&self, token: &str) -> StoreResult<Option<HostRow>> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {HOST_COLS} FROM hosts WHERE token_hash = ?1 AND revoked_at IS NULL"
                ),
                [hash_token(token)],
                row_host,
            )
            .optional()?)
    }

    fn host_heartbeat(
        &self,
        id: i64,
        beat: &AgentHeartbeat,
        now_ms: i64,
        lease_ms: i64,
    ) -> StoreResult<HostRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let host = host_by_id(&tx, id)?;
        if host.revoked {
            return Err(StoreError::NotFound(format!("host `{}`", host.name)));
        }
        check_claim(&host, &beat.instance, now_ms, lease_ms)?;
        let c = &beat.capacity;
        tx.execute(
            "UPDATE hosts SET state = 'live', reason = NULL, instance = ?2, heartbeat_ms = ?3,
                 hub_endpoint = ?4, hub_public_key = ?5, memory_mb = ?6, free_memory_mb = ?7, cpus = ?8,
                 disk_free_bytes = ?9, images = ?10
             WHERE id = ?1",
            params![
                id,
                beat.instance,
                now_ms,
                beat.hub_endpoint,
                beat.hub_public_key,
                to_i64(c.memory_mb),
                to_i64(c.free_memory_mb),
                i64::from(c.cpus),
                to_i64(c.disk_free_bytes),
                images_json(&c.images),
            ],
        )?;
        let host = host_by_id(&tx, id)?;
        tx.commit()?;
        Ok(host)
    }

    fn expire_hosts(&self, now_ms: i64, lease_ms: i64, reason: &str) -> StoreResult<Vec<HostRow>> {
        self.query_all(
            &format!(
                "UPDATE hosts SET state = 'lost', reason = ?3
                 WHERE state = 'live' AND heartbeat_ms <= ?1 - ?2 RETURNING {HOST_COLS}"
            ),
            params![now_ms, lease_ms, reason],
            row_host,
        )
    }

    // ---- namespaces ----

    fn namespace_host(&self, ns_id: i64) -> StoreResult<Option<HostRow>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                &format!(
                    "SELECT {HOST_COLS} FROM hosts
                     WHERE id = (SELECT host_id FROM namespaces WHERE id = ?1)"
                ),
                [ns_id],
                row_host,
            )
            .optional()?)
    }

    fn place_namespace(
        &self,
        ns_id: i64,
        expected: Option<i64>,
        host_id: i64,
    ) -> StoreResult<Option<HostRow>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE namespaces SET host_id = ?3 WHERE id = ?1 AND host_id IS ?2",
            params![ns_id, expected, host_id],
        )?;
        let host = tx
            .query_row(
                &format!(
                    "SELECT {HOST_COLS} FROM hosts
                     WHERE id = (SELECT host_id FROM namespaces WHERE id = ?1)"
                ),
                [ns_id],
                row_host,
            )
            .optional()?;
        tx.commit()?;
        Ok(host)
    }

    fn namespaces_on(&self, host_id: i64) -> StoreResult<Vec<NamespaceRow>> {
        self.query_all(
            &format!("SELECT {NS_COLS} FROM namespaces WHERE host_id = ?1 ORDER BY id"),
            [host_id],
            row_namespace,
        )
    }

    fn adopt_namespace(&self, user: &User, index: u32) -> StoreResult<NamespaceRow> {
        self.namespace_with(user, Some(index))
    }

    fn namespace_of(&self, user_id: i64) -> StoreResult<Option<NamespaceRow>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                &format!("SELECT {NS_COLS} FROM namespaces WHERE user_id = ?1"),
                [user_id],
                row_namespace,
            )
            .optional()?)
    }

    fn namespace_by_id(&self, id: i64) -> StoreResult<NamespaceRow> {
        let conn = self.conn();
        conn.query_row(
            &format!("SELECT {NS_COLS} FROM namespaces WHERE id = ?1"),
            [id],
            row_namespace,
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("namespace #{id}")))
    }

    /// The user's namespace, created with the lowest free /24 of the pool when missing.
    fn ensure_namespace(&self, user: &User) -> StoreResult<NamespaceRow> {
        self.namespace_with(user, None)
    }

    // ---- clusters and VMs ----

    /// Create a cluster and its VMs, each with the lowest free VM address of the namespace.
    fn create_cluster(
        &self,
        ns: &NamespaceRow,
        name: &str,
        image: &str,
        vms: &[NewVm<'_>],
    ) -> StoreResult<ClusterRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists: Option<i64> = tx
            .query_row(
                "SELECT id FROM clusters WHERE namespace_id = ?1 AND name = ?2",
                params![ns.id, name],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_some() {
            return Err(StoreError::Exists(format!("cluster `{name}`")));
        }
        tx.execute(
            "INSERT INTO clusters (namespace_id, name, image, state) VALUES (?1, ?2, ?3, ?4)",
            params![ns.id, name, image, ClusterState::Requested.as_str()],
        )?;
        let cluster_id = tx.last_insert_rowid();
        let mut used = used_hosts(&tx, "vms", ns)?;
        for (slot, vm) in vms.iter().enumerate() {
            used.sort_unstable();
            let host = alloc::lowest_free_from(&used, alloc::FIRST_VM_HOST, alloc::LAST_VM_HOST)
                .ok_or_else(|| {
                    StoreError::Exhausted(format!("no free VM address left in {}", ns.subnet))
                })?;
            used.push(host);
            let addr = ns.subnet.host(host);
            tx.execute(
                "INSERT INTO vms (cluster_id, namespace_id, slot, name, role, address, mac, state)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    cluster_id,
                    ns.id,
                    slot as u32,
                    vm.name,
                    vm.role,
                    addr.to_string(),
                    mac_for(addr),
                    VmState::Pending.as_str()
                ],
            )?;
        }
        let row = tx.query_row(
            &format!("SELECT {CLUSTER_COLS} FROM clusters WHERE id = ?1"),
            [cluster_id],
            row_cluster,
        )?;
        tx.commit()?;
        Ok(row)
    }

    fn cluster(&self, ns_id: i64, name: &str) -> StoreResult<Option<ClusterRow>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                &format!(
                    "SELECT {CLUSTER_COLS} FROM clusters WHERE namespace_id = ?1 AND name = ?2"
                ),
                params![ns_id, name],
                row_cluster,
            )
            .optional()?)
    }

    fn cluster_by_id(&self, id: i64) -> StoreResult<Option<ClusterRow>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                &format!("SELECT {CLUSTER_COLS} FROM clusters WHERE id = ?1"),
                [id],
                row_cluster,
            )
            .optional()?)
    }

    fn clusters_in(&self, ns_id: i64) -> StoreResult<Vec<ClusterRow>> {
        self.query_all(
            &format!("SELECT {CLUSTER_COLS} FROM clusters WHERE namespace_id = ?1 ORDER BY name"),
            [ns_id],
            row_cluster,
        )
    }

    fn all_clusters(&self) -> StoreResult<Vec<ClusterRow>> {
        self.query_all(
            &format!("SELECT {CLUSTER_COLS} FROM clusters ORDER BY id"),
            [],
            row_cluster,
        )
    }

    /// Ready clusters whose state has not changed for `secs` seconds (`fcdev server --idle-stop`).
    fn clusters_ready_since(&self, secs: u64) -> StoreResult<Vec<ClusterRow>> {
        self.query_all(
            &format!(
                "SELECT {CLUSTER_COLS} FROM clusters WHERE state = ?1
                 AND updated_at <= strftime('%Y-%m-%dT%H:%M:%SZ', 'now', ?2) ORDER BY id"
            ),
            params![ClusterState::Ready.as_str(), format!("-{secs} seconds")],
            row_cluster,
        )
    }

    /// Set a cluster's state and record its event in one transaction: whoever reads the new state finds the event.
    fn record_report(
        &self,
        id: i64,
        report: &ClusterMirror,
        events: &[ReportedEvent],
    ) -> StoreResult<Vec<EventRow>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // ?6: the generation the agent applied (NULL: the control plane's own record). Only a report at the
        // current generation sets the state.
        let changed = tx.execute(
            "UPDATE clusters SET
                 updated_at = CASE WHEN state = ?2 OR (?6 IS NOT NULL AND gen > ?6) THEN updated_at
                              ELSE strftime('%Y-%m-%dT%H:%M:%SZ','now') END,
                 state = CASE WHEN ?6 IS NULL OR gen <= ?6 THEN ?2 ELSE state END,
                 reason = CASE WHEN ?6 IS NULL OR gen <= ?6 THEN ?3 ELSE reason END,
                 start_mode = CASE WHEN ?6 IS NULL OR gen <= ?6 THEN ?4 ELSE start_mode END,
                 disk_bytes = CASE WHEN ?6 IS NULL OR gen <= ?6 THEN ?7 ELSE disk_bytes END,
                 applied_gen = MAX(applied_gen, COALESCE(?6, applied_gen)),
                 reported_seq = COALESCE(?8, reported_seq),
                 report = ?5
             WHERE id = ?1",
            params![
                id,
                report.state.as_str(),
                report.reason,
                report.start_mode,
                report.vms_json,
                report.applied_gen,
                report.disk_bytes.map(to_i64),
                report.reported_seq
            ],
        )?;
        if changed == 0 {
            return Ok(Vec::new());
        }
        let mut stored = Vec::with_capacity(events.len());
        for e in events {
            stored.push(insert_event(
                &tx,
                id,
                e.vm.as_deref(),
                &e.state,
                &e.message,
            )?);
        }
        tx.commit()?;
        Ok(stored)
    }

    fn cluster_report(&self, id: i64) -> StoreResult<Option<String>> {
        Ok(self
            .conn()
            .query_row("SELECT report FROM clusters WHERE id = ?1", [id], |r| {
                r.get::<_, Option<String>>(0)
            })
            .optional()?
            .flatten())
    }

    fn cluster_intent(&self, id: i64) -> StoreResult<Option<ClusterIntent>> {
        Ok(self
            .conn()
            .query_row(INTENT_BY_ID, [id], intent_row)
            .optional()?)
    }

    fn intents_in(&self, ns_id: i64) -> StoreResult<Vec<(i64, ClusterIntent)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, gen, reset_gen, want_running, applied_gen, reported_seq FROM clusters
             WHERE namespace_id = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([ns_id], |r| {
            Ok((
                r.get(0)?,
                ClusterIntent {
                    gen: r.get(1)?,
                    reset_gen: r.get(2)?,
                    want_running: r.get::<_, i64>(3)? != 0,
                    applied_gen: r.get(4)?,
                    reported_seq: r.get(5)?,
                },
            ))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn request_intent(
        &self,
        id: i64,
        intent: Intent,
        state: ClusterState,
        message: &str,
        forget_report: bool,
    ) -> StoreResult<(ClusterIntent, EventRow)> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE clusters SET
                 gen = gen + 1,
                 reset_gen = CASE WHEN ?2 THEN gen + 1 ELSE reset_gen END,
                 want_running = ?3,
                 state = ?4, reason = NULL, disk_bytes = NULL,
                 report = CASE WHEN ?5 THEN NULL ELSE report END,
                 reported_seq = CASE WHEN ?5 THEN 0 ELSE reported_seq END,
                 updated_at = strftime('%Y-%m-%dT%H:%M:%SZ','now')
             WHERE id = ?1",
            params![
                id,
                intent == Intent::Reset,
                intent != Intent::Stop,
                state.as_str(),
                forget_report
            ],
        )?;
        if changed == 0 {
            return Err(StoreError::NotFound(format!("cluster #{id}")));
        }
        let now = tx.query_row(INTENT_BY_ID, [id], intent_row)?;
        let event = insert_event(&tx, id, None, state.as_str(), message)?;
        tx.commit()?;
        Ok((now, event))
    }

    fn set_applied_gen(&self, id: i64, gen: i64) -> StoreResult<()> {
        self.conn().execute(
            "UPDATE clusters SET applied_gen = ?2 WHERE id = ?1",
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
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE clusters SET state = ?2, reason = ?3, disk_bytes = NULL,
             updated_at = strftime('%Y-%m-%dT%H:%M:%SZ','now') WHERE id = ?1",
            params![id, state.as_str(), reason],
        )?;
        let event = insert_event(&tx, id, None, state.as_str(), message)?;
        tx.commit()?;
        Ok(event)
    }

    /// Mark a cluster stopped with the bytes it keeps on disk, and record its event, in one transaction.
    fn set_cluster_stopped(
        &self,
        id: i64,
        disk_bytes: u64,
        message: &str,
    ) -> StoreResult<EventRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE clusters SET state = ?2, reason = NULL, disk_bytes = ?3,
             updated_at = strftime('%Y-%m-%dT%H:%M:%SZ','now') WHERE id = ?1",
            params![id, ClusterState::Stopped.as_str(), disk_bytes as i64],
        )?;
        let event = insert_event(&tx, id, None, ClusterState::Stopped.as_str(), message)?;
        tx.commit()?;
        Ok(event)
    }

    /// Record a named snapshot whose files are complete. `Exists` when the cluster has one of that name.
    fn add_snapshot(
        &self,
        cluster_id: i64,
        name: &str,
        image: &str,
        size_bytes: u64,
    ) -> StoreResult<SnapshotRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let inserted = tx.execute(
            "INSERT INTO snapshots (cluster_id, namespace_id, name, image, size_bytes)
             SELECT id, namespace_id, ?2, ?3, ?4 FROM clusters WHERE id = ?1",
            params![cluster_id, name, image, size_bytes as i64],
        );
        match inserted {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(StoreError::Exists(format!("snapshot `{name}`")))
            }
            Err(e) => return Err(e.into()),
            Ok(0) => return Err(StoreError::NotFound(format!("cluster #{cluster_id}"))),
            Ok(_) => {}
        }
        let id = tx.last_insert_rowid();
        let row = tx.query_row(
            &format!(
                "SELECT {SNAPSHOT_COLS} FROM snapshots s JOIN clusters c ON c.id = s.cluster_id
                 WHERE s.id = ?1"
            ),
            [id],
            row_snapshot,
        )?;
        tx.commit()?;
        Ok(row)
    }

    fn snapshot(&self, cluster_id: i64, name: &str) -> StoreResult<Option<SnapshotRow>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                &format!(
                    "SELECT {SNAPSHOT_COLS} FROM snapshots s JOIN clusters c ON c.id = s.cluster_id
                     WHERE s.cluster_id = ?1 AND s.name = ?2"
                ),
                params![cluster_id, name],
                row_snapshot,
            )
            .optional()?)
    }

    /// A cluster's snapshots, oldest first.
    fn snapshots_of(&self, cluster_id: i64) -> StoreResult<Vec<SnapshotRow>> {
        self.query_all(
            &format!(
                "SELECT {SNAPSHOT_COLS} FROM snapshots s JOIN clusters c ON c.id = s.cluster_id
                 WHERE s.cluster_id = ?1 ORDER BY s.id"
            ),
            [cluster_id],
            row_snapshot,
        )
    }

    /// Every snapshot of a namespace, largest first (what to remove when the quota is reached).
    fn snapshots_in(&self, ns_id: i64) -> StoreResult<Vec<SnapshotRow>> {
        self.query_all(
            &format!(
                "SELECT {SNAPSHOT_COLS} FROM snapshots s JOIN clusters c ON c.id = s.cluster_id
                 WHERE s.namespace_id = ?1 ORDER BY s.size_bytes DESC, s.id"
            ),
            [ns_id],
            row_snapshot,
        )
    }

    fn delete_snapshot(&self, id: i64) -> StoreResult<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM snapshots WHERE id = ?1", [id])?
            > 0)
    }

    fn set_start_mode(&self, id: i64, mode: &str) -> StoreResult<()> {
        self.conn().execute(
            "UPDATE clusters SET start_mode = ?2 WHERE id = ?1",
            params![id, mode],
        )?;
        Ok(())
    }

    /// Forget a cluster with its VMs and events. Returns its last event, `deleted`, numbered after the others for
    /// the streams that follow it, and not stored (nothing of the cluster is).
    fn delete_cluster(&self, id: i64) -> StoreResult<EventRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let last: i64 = tx.query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM events WHERE cluster_id = ?1",
            [id],
            |r| r.get(0),
        )?;
        let at: String = tx.query_row("SELECT strftime('%Y-%m-%dT%H:%M:%fZ','now')", [], |r| {
            r.get(0)
        })?;
        tx.execute("DELETE FROM vms WHERE cluster_id = ?1", [id])?;
        tx.execute("DELETE FROM snapshots WHERE cluster_id = ?1", [id])?;
        tx.execute("DELETE FROM events WHERE cluster_id = ?1", [id])?;
        tx.execute("DELETE FROM clusters WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(EventRow {
            seq: last + 1,
            cluster_id: id,
            vm: None,
            state: "deleted".into(),
            message: "cluster deleted".into(),
            at,
        })
    }

    fn vms_of(&self, cluster_id: i64) -> StoreResult<Vec<VmRow>> {
        self.query_all(
            &format!("SELECT {VM_COLS} FROM vms WHERE cluster_id = ?1 ORDER BY slot"),
            [cluster_id],
            row_vm,
        )
    }

    fn vms_in_namespace(&self, ns_id: i64) -> StoreResult<Vec<(String, VmRow)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT v.id, v.cluster_id, v.slot, v.name, v.role, v.address, v.mac, v.state, v.detail, c.name
             FROM vms v JOIN clusters c ON c.id = v.cluster_id WHERE v.namespace_id = ?1
             ORDER BY c.name, v.slot",
        )?;
        let rows = stmt.query_map([ns_id], |r| Ok((r.get(9)?, row_vm(r)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_vm_state(&self, id: i64, state: VmState, detail: Option<&str>) -> StoreResult<()> {
        self.conn().execute(
            "UPDATE vms SET state = ?2, detail = ?3 WHERE id = ?1",
            params![id, state.as_str(), detail],
        )?;
        Ok(())
    }

    // ---- ssh keys ----

    /// Remember ssh keys for the namespace, keeping only the `keep` most recently sent.
    fn add_ssh_keys(&self, ns_id: i64, keys: &[String], keep: usize) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for key in keys {
            // Re-inserting moves a key to the newest position.
            tx.execute(
                "DELETE FROM ssh_keys WHERE namespace_id = ?1 AND key = ?2",
                params![ns_id, key],
            )?;
            tx.execute(
                "INSERT INTO ssh_keys (namespace_id, key) VALUES (?1, ?2)",
                params![ns_id, key],
            )?;
        }
        tx.execute(
            "DELETE FROM ssh_keys WHERE namespace_id = ?1 AND rowid NOT IN
             (SELECT rowid FROM ssh_keys WHERE namespace_id = ?1 ORDER BY rowid DESC LIMIT ?2)",
            params![ns_id, keep as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn ssh_keys(&self, ns_id: i64) -> StoreResult<Vec<String>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT key FROM ssh_keys WHERE namespace_id = ?1 ORDER BY rowid")?;
        let rows = stmt.query_map([ns_id], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- peers ----

    /// Register a peer with the lowest free peer address (.2–.9) of the namespace.
    fn add_peer(&self, ns: &NamespaceRow, name: &str, public_key: &str) -> StoreResult<PeerRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing = tx
            .query_row(
                &format!("SELECT {PEER_COLS} FROM peers WHERE public_key = ?1"),
                [public_key],
                row_peer,
            )
            .optional()?;
        if let Some(peer) = existing {
            if peer.namespace_id == ns.id {
                // The same laptop registering again (idempotent): keep its address.
                tx.execute(
                    "UPDATE peers SET name = ?2 WHERE id = ?1",
                    params![peer.id, name],
                )?;
                tx.commit()?;
                return Ok(PeerRow {
                    name: name.to_string(),
                    ..peer
                });
            }
            return Err(StoreError::Exists(
                "a peer with this public key in another namespace".into(),
            ));
        }
        let used = used_hosts(&tx, "peers", ns)?;
        let host = alloc::lowest_free_from(&used, alloc::FIRST_PEER_HOST, alloc::LAST_PEER_HOST)
            .ok_or_else(|| {
                StoreError::Exhausted(format!(
                    "all {} peer addresses of {} are taken",
                    alloc::LAST_PEER_HOST - alloc::FIRST_PEER_HOST + 1,
                    ns.subnet
                ))
            })?;
        let address = ns.subnet.host(host);
        tx.execute(
            "INSERT INTO peers (namespace_id, name, public_key, address) VALUES (?1, ?2, ?3, ?4)",
            params![ns.id, name, public_key, address.to_string()],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(PeerRow {
            id,
            namespace_id: ns.id,
            name: name.to_string(),
            public_key: public_key.to_string(),
            address,
        })
    }

    fn peers_in(&self, ns_id: i64) -> StoreResult<Vec<PeerRow>> {
        self.query_all(
            &format!("SELECT {PEER_COLS} FROM peers WHERE namespace_id = ?1 ORDER BY id"),
            [ns_id],
            row_peer,
        )
    }

    /// Every peer with its namespace's subnet: what the hub should accept.
    fn hub_peers(&self) -> StoreResult<Vec<HubPeerRow>> {
        self.query_all(
            "SELECT p.id, p.namespace_id, p.name, p.public_key, p.address, n.subnet
             FROM peers p JOIN namespaces n ON n.id = p.namespace_id ORDER BY p.id",
            [],
            |r| {
                let subnet: String = r.get(5)?;
                Ok(HubPeerRow {
                    peer: row_peer(r)?,
                    subnet: subnet.parse().map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            5,
                            rusqlite::types::Type::Text,
                            Box::new(e),
                        )
                    })?,
                })
            },
        )
    }

    /// Delete a peer whatever its namespace (the server disabling a peer the hub must not accept).
    fn remove_peer(&self, id: i64) -> StoreResult<bool> {
        let n = self
            .conn()
            .execute("DELETE FROM peers WHERE id = ?1", [id])?;
        Ok(n > 0)
    }

    fn delete_peer(&self, ns_id: i64, id: i64) -> StoreResult<bool> {
        let n = self.conn().execute(
            "DELETE FROM peers WHERE id = ?1 AND namespace_id = ?2",
            params![id, ns_id],
        )?;
        Ok(n > 0)
    }

    // ---- events ----

    fn add_event(
        &self,
        cluster_id: i64,
        vm: Option<&str>,
        state: &str,
        message: &str,
    ) -> StoreResult<EventRow> {
        Ok(insert_event(&self.conn(), cluster_id, vm, state, message)?)
    }

    fn events_after(&self, cluster_id: i64, after: i64) -> StoreResult<Vec<EventRow>> {
        self.query_all(
            &format!(
                "SELECT {EVENT_COLS} FROM events WHERE cluster_id = ?1 AND seq > ?2 ORDER BY seq"
            ),
            params![cluster_id, after],
            row_event,
        )
    }

    /// The newest event sequence number of a cluster (0 when none).
    fn last_event_seq(&self, cluster_id: i64) -> StoreResult<i64> {
        let conn = self.conn();
        Ok(conn.query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM events WHERE cluster_id = ?1",
            [cluster_id],
            |r| r.get(0),
        )?)
    }
}

/// A cluster's wanted state, by id: the columns `intent_row` reads.
const INTENT_BY_ID: &str =
    "SELECT gen, reset_gen, want_running, applied_gen, reported_seq FROM clusters WHERE id = ?1";

fn intent_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ClusterIntent> {
    Ok(ClusterIntent {
        gen: r.get(0)?,
        reset_gen: r.get(1)?,
        want_running: r.get::<_, i64>(2)? != 0,
        applied_gen: r.get(3)?,
        reported_seq: r.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn tokens_are_hashed_and_revocable() {
        let (dir, store) = store();
        let (user, token) = store.add_user("alice").unwrap();
        assert!(token.starts_with("fcd_") && token.len() == 68);
        assert_eq!(store.user_by_token(&token).unwrap(), Some(user));
        assert!(matches!(
            store.add_user("alice"),
            Err(StoreError::Exists(_))
        ));
        let raw = std::fs::read(dir.path().join("state.db")).unwrap();
        assert!(
            !raw.windows(token.len()).any(|w| w == token.as_bytes()),
            "token stored in clear"
        );
        assert_eq!(store.revoke_user("alice").unwrap(), (1, 0));
        assert_eq!(store.user_by_token(&token).unwrap(), None);
    }

    #[test]
    fn events_of_an_old_database_keep_their_numbers_and_new_clusters_start_at_one() {
        let (dir, store) = store();
        let (a, _) = store.add_user("a").unwrap();
        let ns = store.ensure_namespace(&a).unwrap();
        let vms = [NewVm {
            name: "n1",
            role: "proxy",
        }];
        let kept = store.create_cluster(&ns, "kept", "tiny", &vms).unwrap();
        let gone = store.create_cluster(&ns, "gone", "tiny", &vms).unwrap();
        drop(store);
        // The layout of earlier versions: one sequence across all clusters.
        let path = dir.path().join("state.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "DROP TABLE events;
             CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, cluster_id INTEGER NOT NULL, vm TEXT,
                 state TEXT NOT NULL, message TEXT NOT NULL,
                 at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')));
             CREATE INDEX events_cluster ON events(cluster_id, seq);
             INSERT INTO events (cluster_id, state, message) VALUES
                 ({k}, 'requested', 'a'), ({g}, 'requested', 'b'), ({k}, 'ready', 'c'), (999, 'deleted', 'd');",
            k = kept.id,
            g = gone.id
        ))
        .unwrap();
        drop(conn);

        let store = SqliteStore::open(&path).unwrap();
        let seqs = |id| -> Vec<i64> {
            store
                .events_after(id, 0)
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect()
        };
        assert_eq!(seqs(kept.id), [1, 3], "old numbers kept");
        assert_eq!(store.add_event(kept.id, None, "x", "y").unwrap().seq, 4);
        assert_eq!(store.events_after(kept.id, 3).unwrap().len(), 1);
        assert_eq!(
            seqs(999),
            Vec::<i64>::new(),
            "events of deleted clusters dropped"
        );
        let fresh = store.create_cluster(&ns, "fresh", "tiny", &vms).unwrap();
        assert_eq!(store.add_event(fresh.id, None, "x", "y").unwrap().seq, 1);
        assert_eq!(store.delete_cluster(gone.id).unwrap().seq, 3);
        drop(store);
        // Opening again changes nothing.
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.last_event_seq(kept.id).unwrap(), 4);
    }

    #[test]
    fn a_file_from_before_schema_versions_is_version_1_and_a_newer_one_is_refused() {
        let (dir, store) = store();
        store.add_user("a").unwrap();
        drop(store);
        let path = dir.path().join("state.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("DROP TABLE schema_version").unwrap();
        drop(conn);
        let store = SqliteStore::open(&path).unwrap();
        assert!(store.user_exists("a").unwrap());
        let version: i64 = store
            .conn()
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        drop(store);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("UPDATE schema_version SET version = 99")
            .unwrap();
        drop(conn);
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}
