//! `fcdev server --idle-stop DURATION`: stop clusters nobody uses, so they do not hold the host's RAM overnight.
//!
//! A ready cluster is idle when its state has not changed for the duration (no up, reset, restore, save…) and no
//! tunnel peer of its namespace has completed a WireGuard handshake within it (a tunnel in use re-handshakes every
//! two minutes, and `fcdev ssh` needs the tunnel). An idle cluster is stopped like `fcdev stop` (its memory and
//! disks kept); `fcdev start` or `fcdev up` resumes it. Off by default.

use std::sync::Arc;
use std::time::Duration;

use crate::server::hub_control::HubControl;
use crate::server::orchestrator::Orchestrator;
use crate::server::store::{Store, StoreResult};

/// Check every `after / 4`, at most every minute and at least every second.
pub fn spawn(
    store: Arc<Store>,
    hub: Arc<dyn HubControl>,
    orchestrator: Arc<Orchestrator>,
    after: Duration,
) {
    let every = (after / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    tracing::info!("clusters idle for {after:?} are stopped (checked every {every:?})");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let (store, hub, orch) = (store.clone(), hub.clone(), orchestrator.clone());
            let checked =
                tokio::task::spawn_blocking(move || stop_idle(&store, hub.as_ref(), &orch, after))
                    .await;
            if let Ok(Err(e)) = checked {
                tracing::warn!("idle check: {e}");
            }
        }
    });
}

/// Stop every ready cluster idle for `after` (see the module doc). The stops go on in the background.
fn stop_idle(
    store: &Store,
    hub: &dyn HubControl,
    orchestrator: &Arc<Orchestrator>,
    after: Duration,
) -> StoreResult<()> {
    for cluster in store.clusters_ready_since(after.as_secs())? {
        let tunnel_in_use = store.peers_in(cluster.namespace_id)?.iter().any(|p| {
            hub.counters(p.id)
                .and_then(|c| c.handshake_age)
                .is_some_and(|age| age < after)
        });
        if tunnel_in_use {
            continue;
        }
        tracing::info!(
            "cluster {} (namespace #{}) idle for {after:?}: stopping it",
            cluster.name,
            cluster.namespace_id
        );
        if let Err(e) = orchestrator.stop(&cluster) {
            tracing::warn!("idle stop of {}: {e}", cluster.name);
        }
    }
    Ok(())
}
