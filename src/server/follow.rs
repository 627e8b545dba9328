//! The running server follows the store. Admin commands (`fcdev server user revoke/remove/…`) are separate
//! processes that change the store and nothing else; every [`EVERY`] the server reads the store's `data_version`
//! (SQLite: `PRAGMA data_version`, which changes only when another process committed; PostgreSQL: a counter those
//! commands bump) and, when it moved, brings its running parts in line:
//! the hub accepts exactly the peers in the store, and engineers marked for removal have their clusters
//! stopped and are then deleted. The same step runs once at start-up, which is how the hub gets its peers.
//!
//! A lock file (`server.lock`, held shared while a server runs) lets an admin command tell whether a server
//! will pick its change up.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::server::hub_control::{HubControl, HubPeerEntry, HubPeerError};
use crate::server::orchestrator::Orchestrator;
use crate::server::store::{Store, StoreResult, User};

/// How often the server looks for admin changes.
pub const EVERY: Duration = Duration::from_millis(250);
/// Unfinished removals (a cluster failed to stop) are retried this often even without a change.
const RETRY: Duration = Duration::from_secs(30);
pub const LOCK_FILE: &str = "server.lock";

/// Makes the hub accept exactly the peers of the store. A stored peer the hub refuses for its key (a point of
/// small order, stored before registration checked for it) is deleted from the store, with a log line.
pub fn sync_peers(store: &Store, hub: &dyn HubControl) -> StoreResult<()> {
    // The hub first, then the store: the API writes a new peer to the store before the hub, so a peer the
    // hub had a moment ago and the store lacks now was deleted.
    let in_hub = hub.peer_ids();
    let wanted = store.hub_peers()?;
    let ids: HashSet<i64> = wanted.iter().map(|p| p.peer.id).collect();
    for id in in_hub.into_iter().filter(|id| !ids.contains(id)) {
        hub.remove_peer(id);
        tracing::info!("peer {id} is gone from the store: removed from the hub");
    }
    for p in wanted {
        let entry = HubPeerEntry {
            id: p.peer.id,
            public_key: p.peer.public_key.clone(),
            address: p.peer.address,
            subnet: p.subnet,
        };
        match hub.add_peer(entry) {
            Ok(()) => {}
            Err(HubPeerError::InvalidKey(e)) => {
                tracing::warn!(
                    "peer {} `{}` ({}) disabled and deleted: its public key {} is refused: {e}",
                    p.peer.id,
                    p.peer.name,
                    p.peer.address,
                    p.peer.public_key
                );
                store.remove_peer(p.peer.id)?;
            }
            Err(HubPeerError::Refused(e)) => {
                tracing::warn!("peer {} not accepted by the hub: {e}", p.peer.id);
            }
        }
    }
    Ok(())
}

/// Stops every cluster of an engineer marked for removal, then deletes them (namespace, tokens, keys).
async fn finish_removal(store: Arc<Store>, orchestrator: Arc<Orchestrator>, user: User) {
    let s = store.clone();
    let id = user.id;
    let clusters = tokio::task::spawn_blocking(move || -> StoreResult<_> {
        Ok(match s.namespace_of(id)? {
            Some(ns) => s.clusters_in(ns.id)?,
            None => Vec::new(),
        })
    })
    .await;
    let clusters = match clusters {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return tracing::error!("removing `{}`: {e}", user.name),
        Err(e) => return tracing::error!("removing `{}`: {e}", user.name),
    };
    for c in clusters {
        tracing::info!("removing `{}`: deleting cluster `{}`", user.name, c.name);
        if let Err(e) = orchestrator.delete(&c).await {
            tracing::error!("removing `{}`: cluster `{}`: {e}", user.name, c.name);
        }
    }
    let s = store.clone();
    match tokio::task::spawn_blocking(move || s.delete_user(id)).await {
        Ok(Ok(true)) => tracing::info!("engineer `{}` removed", user.name),
        Ok(Ok(false)) => tracing::warn!(
            "engineer `{}` not removed yet: a cluster did not stop (retried in {} s)",
            user.name,
            RETRY.as_secs()
        ),
        Ok(Err(e)) => tracing::error!("removing `{}`: {e}", user.name),
        Err(e) => tracing::error!("removing `{}`: {e}", user.name),
    }
}

/// One follow step: peers, then removals not already under way.
async fn step(
    store: &Arc<Store>,
    hub: &Arc<dyn HubControl>,
    orchestrator: &Arc<Orchestrator>,
    removing: &Arc<Mutex<HashSet<i64>>>,
) -> anyhow::Result<()> {
    let (s, h) = (store.clone(), hub.clone());
    let users = tokio::task::spawn_blocking(move || -> StoreResult<Vec<User>> {
        sync_peers(&s, h.as_ref())?;
        s.users_being_removed()
    })
    .await??;
    for user in users {
        let fresh = removing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user.id);
        if !fresh {
            continue;
        }
        let (s, o, r) = (store.clone(), orchestrator.clone(), removing.clone());
        tokio::spawn(async move {
            let id = user.id;
            finish_removal(s, o, user).await;
            r.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
    }
    Ok(())
}

/// Runs the first step now (the hub gets the stored peers), then follows the store in a task.
pub async fn start(
    store: Arc<Store>,
    hub: Arc<dyn HubControl>,
    orchestrator: Arc<Orchestrator>,
) -> anyhow::Result<()> {
    let removing = Arc::new(Mutex::new(HashSet::new()));
    step(&store, &hub, &orchestrator, &removing).await?;
    tokio::spawn(async move {
        let mut seen = None;
        let mut last_step = Instant::now();
        loop {
            tokio::time::sleep(EVERY).await;
            let s = store.clone();
            let version = match tokio::task::spawn_blocking(move || s.data_version()).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    tracing::warn!("reading the store's version: {e}");
                    continue;
                }
                Err(_) => continue,
            };
            let changed = seen.is_some_and(|s| s != version);
            seen = Some(version);
            if changed || last_step.elapsed() >= RETRY {
                last_step = Instant::now();
                if let Err(e) = step(&store, &hub, &orchestrator, &removing).await {
                    tracing::warn!("following the store: {e}");
                }
            }
        }
    });
    Ok(())
}

/// Held (shared) by a running server for its whole life.
pub struct ServerLock(#[allow(dead_code)] std::fs::File);

fn open_lock(data_dir: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join(LOCK_FILE))
}

fn flock(file: &std::fs::File, op: libc::c_int) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    unsafe { libc::flock(file.as_raw_fd(), op) == 0 }
}

/// Marks the data dir as served by this process until the lock is dropped.
pub fn hold_server_lock(data_dir: &Path) -> std::io::Result<ServerLock> {
    let file = open_lock(data_dir)?;
    if !flock(&file, libc::LOCK_SH) {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ServerLock(file))
}

/// Whether a server runs on this data dir (and so picks up admin changes within [`EVERY`]).
pub fn server_running(data_dir: &Path) -> bool {
    let Ok(file) = open_lock(data_dir) else {
        return false;
    };
    // An exclusive lock is granted only when no server holds its shared one.
    !flock(&file, libc::LOCK_EX | libc::LOCK_NB)
}
