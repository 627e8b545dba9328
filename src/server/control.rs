//! What a control plane (`fcdev server --role control`) does where a single-host server runs the orchestrator:
//! placement (a namespace lives on one host), the agents' work (`GET /v1/agent/jobs`: what each host must
//! run, long-polled by its agent), their reports (`POST /v1/agent/report`: the clusters' state, VMs and
//! events, copied into the store), and lost hosts' clusters.
//!
//! The control plane keeps the wanted state in the store (namespaces with their host, clusters, peers); the
//! agents make their host match it and report back. Nothing of it lives only in this process's memory, so a
//! control plane restart loses nothing: agents long-poll again and get the same work.

use crate::api::{self, ClusterState};
use crate::names;
use crate::server::orchestrator::{hostname, OrchestratorError, UpOutcome};
use crate::server::service::{Service, ServiceError, ServiceResult, MAX_SSH_KEYS};
use crate::server::store::{
    ClusterMirror, ClusterRow, EventRow, HostRow, HostState, Intent, NamespaceRow, StoreError, User,
};

/// The longest an agent's long poll for work is held (`?wait=` is capped at this).
pub const MAX_WORK_WAIT_SECS: u64 = 30;
/// How often a held long poll looks for a change in the store.
const WORK_CHECK: std::time::Duration = std::time::Duration::from_millis(200);

/// A namespace placed on a host since that host's last heartbeat counts as this much less free memory there,
/// until the host's next heartbeat reports what it really has free. Heartbeats come every lease/3: without it,
/// every `up` of a morning rush within one interval would go to the same host.
pub const PLACED_RESERVE_MB: u64 = 1024;

/// The placements made since each host's last heartbeat: (host id, when, on the control plane's clock). Memory
/// only: a restarted control plane forgets them, and the hosts' next heartbeats report their real free memory.
/// Its lock is held from reading the hosts to recording the choice, so two placements never both see the old
/// figures.
#[derive(Default)]
pub struct Placements(std::sync::Mutex<Vec<(i64, i64)>>);

/// The host for a new namespace: a live host (not revoked) whose agent has the image, with the most free memory
/// once `reserved` (MB promised to namespaces placed there since its last heartbeat) is taken off (ties: the
/// first by name). `image` None: any live host (a peer registered before any cluster).
pub fn pick_host<'a>(
    hosts: &'a [HostRow],
    image: Option<&str>,
    reserved: &dyn Fn(&HostRow) -> u64,
) -> Option<&'a HostRow> {
    let free = |h: &HostRow| free_mb(h) as i128 - reserved(h) as i128;
    hosts
        .iter()
        .filter(|h| usable(h))
        .filter(|h| {
            image.is_none_or(|i| {
                h.capacity
                    .as_ref()
                    .is_some_and(|c| c.images.iter().any(|have| have == i))
            })
        })
        .fold(None, |best: Option<&HostRow>, h| match best {
            Some(b) if free(b) >= free(h) => Some(b),
            _ => Some(h),
        })
}

fn free_mb(h: &HostRow) -> u64 {
    h.capacity.as_ref().map_or(0, |c| c.free_memory_mb)
}

/// A host a namespace may live on now.
fn usable(h: &HostRow) -> bool {
    h.state == HostState::Live && !h.revoked && h.hub_endpoint.is_some()
}

/// The message of the event that moves a lost host's cluster to another host.
fn moved_message(image: &str, to: &str, from: &str) -> String {
    format!(
        "re-created on host {to} from image {image}: host {from} is lost, so everything since the onboarding \
         snapshot is gone"
    )
}

impl Service {
    /// The namespace's host: the one it lives on while that one is usable, else (first placement, or its host
    /// is lost) the best host for `image`. Returns the host and, when the namespace moved, the one it left.
    fn place(
        &self,
        ns: &NamespaceRow,
        image: Option<&str>,
    ) -> ServiceResult<(HostRow, Option<HostRow>)> {
        let store = self.store();
        let current = store.namespace_host(ns.id)?;
        if let Some(h) = current.as_ref().filter(|h| usable(h)) {
            return Ok((h.clone(), None));
        }
        let mut placed = self
            .placements
            .0
            .lock()
            .map_err(|_| ServiceError::Internal("placements lock poisoned".into()))?;
        let hosts = store.hosts()?;
        // A host's heartbeat after a placement reports it (or the host is gone): forget it.
        placed.retain(|(host, at)| {
            hosts
                .iter()
                .any(|h| h.id == *host && h.heartbeat_ms.is_none_or(|beat| beat < *at))
        });
        let reserved = |h: &HostRow| {
            placed.iter().filter(|(host, _)| *host == h.id).count() as u64 * PLACED_RESERVE_MB
        };
        let pick = pick_host(&hosts, image, &reserved).ok_or_else(|| ServiceError::NoLiveHost {
            image: image.map(str::to_string),
        })?;
        let now = store
            .place_namespace(ns.id, current.as_ref().map(|h| h.id), pick.id)?
            .ok_or_else(|| ServiceError::Internal("the namespace's host vanished".into()))?;
        if now.id != pick.id {
            // Another request placed it a moment ago: its choice stands.
            return Ok((now, None));
        }
        placed.push((now.id, super::service::now_ms()));
        drop(placed);
        tracing::info!(
            "namespace {} placed on host {}{}",
            ns.name,
            now.name,
            current
                .as_ref()
                .map(|h| format!(" (it was on {}, {})", h.name, h.state.as_str()))
                .unwrap_or_default()
        );
        Ok((now, current))
    }

    /// Record a report of a cluster (state, VMs, events) and let the event streams see its events.
    fn record(
        &self,
        id: i64,
        mirror: &ClusterMirror,
        events: &[api::ReportedEvent],
    ) -> ServiceResult<Vec<EventRow>> {
        let stored = self.store().record_report(id, mirror, events)?;
        for e in &stored {
            let _ = self.control_events.send(e.clone());
        }
        Ok(stored)
    }

    /// A cluster's view from the store: its row and the VMs its agent last reported.
    pub(crate) fn stored_view(
        &self,
        ns: &NamespaceRow,
        c: &ClusterRow,
    ) -> ServiceResult<api::Cluster> {
        let vms: Vec<api::Vm> = self
            .store()
            .cluster_report(c.id)?
            .and_then(|json| serde_json::from_str(&json).ok())
            .unwrap_or_default();
        let host = self.store().namespace_host(ns.id)?.map(|h| h.name);
        Ok(c.to_api(&ns.name, vms, host))
    }

    /// `fcdev up` on a control plane (blocking: called inside `blocking`): place the namespace, record the
    /// wanted cluster; the host's agent picks it up at its next poll (at once: it is waiting).
    pub(crate) fn control_up(
        &self,
        user: &User,
        req: &api::CreateCluster,
    ) -> ServiceResult<(api::Cluster, UpOutcome)> {
        let store = self.store();
        let ns = store.ensure_namespace(user)?;
        if !req.ssh_keys.is_empty() {
            store.add_ssh_keys(ns.id, &req.ssh_keys, MAX_SSH_KEYS)?;
        }
        let existing = store.cluster(ns.id, &req.name)?;
        if let Some(c) = &existing {
            if c.image != req.image {
                return Err(OrchestratorError::ImageMismatch {
                    name: req.name.clone(),
                    image: c.image.clone(),
                }
                .into());
            }
        }
        let seq_before = match &existing {
            Some(c) => store.last_event_seq(c.id)?,
            None => 0,
        };
        let (host, left) = self.place(&ns, Some(&req.image))?;
        if let Some(old) = &left {
            // The namespace moved: every cluster in it is made again (running) on the new host.
            for c in store.clusters_in(ns.id)? {
                self.request(
                    c.id,
                    Intent::Run,
                    ClusterState::Requested,
                    &moved_message(&c.image, &host.name, &old.name),
                    true,
                )?;
            }
        }
        let (row, outcome) = match existing {
            None => {
                let row = match store.create_cluster(&ns, &req.name, &req.image, &[]) {
                    Ok(row) => row,
                    Err(crate::server::store::StoreError::Exists(_)) => {
                        // Another `up` created it a moment ago: join it.
                        return self.control_up(user, req);
                    }
                    Err(e) => return Err(e.into()),
                };
                let e = store.add_event(
                    row.id,
                    None,
                    ClusterState::Requested.as_str(),
                    &format!(
                        "cluster requested from image {} on host {}",
                        req.image, host.name
                    ),
                )?;
                let _ = self.control_events.send(e);
                (row, UpOutcome::Created)
            }
            Some(_) if left.is_some() => {
                let row = store
                    .cluster(ns.id, &req.name)?
                    .ok_or_else(|| ServiceError::ClusterNotFound(req.name.clone()))?;
                (row, UpOutcome::Resumed)
            }
            Some(c) if c.state == ClusterState::Ready => (c, UpOutcome::AlreadyReady),
            Some(c) if c.state.is_transient() => (c, UpOutcome::Resumed),
            Some(c) => {
                // Failed, stopped, or lost on a host that came back: the agent brings it up again.
                self.request(
                    c.id,
                    Intent::Run,
                    ClusterState::Requested,
                    &format!("up requested on host {}", host.name),
                    false,
                )?;
                let row = store.cluster_by_id(c.id)?.unwrap_or(c);
                (row, UpOutcome::Resumed)
            }
        };
        let mut view = self.stored_view(&ns, &row)?;
        view.event_seq = seq_before;
        Ok((view, outcome))
    }

    /// Record a request for a cluster's agent (the wanted state, its generation, the state and its event) and
    /// let the event streams see the event (blocking).
    fn request(
        &self,
        id: i64,
        intent: Intent,
        state: ClusterState,
        message: &str,
        forget_report: bool,
    ) -> ServiceResult<()> {
        let (_, e) = self
            .store()
            .request_intent(id, intent, state, message, forget_report)
            .map_err(|e| match e {
                StoreError::NotFound(_) => ServiceError::ClusterNotFound(format!("#{id}")),
                e => e.into(),
            })?;
        let _ = self.control_events.send(e);
        Ok(())
    }

    /// The live host a cluster runs on: a cluster whose host is lost (or revoked) cannot be reset or stopped
    /// there; `fcdev up` makes it again elsewhere.
    pub(crate) fn live_host_of(
        &self,
        ns: &NamespaceRow,
        row: &ClusterRow,
        what: &'static str,
    ) -> ServiceResult<HostRow> {
        let host = self.store().namespace_host(ns.id)?;
        match host {
            Some(h) if usable(&h) && row.state != ClusterState::Lost => Ok(h),
            Some(h) => Err(ServiceError::HostLost {
                cluster: row.name.clone(),
                host: h.name.clone(),
                what,
                why: if h.revoked {
                    "its host token was revoked".to_string()
                } else {
                    h.reason
                        .clone()
                        .unwrap_or_else(|| format!("it is {}", h.state.as_str()))
                },
            }),
            None => Err(ServiceError::HostLost {
                cluster: row.name.clone(),
                host: "(none)".into(),
                what,
                why: "its namespace is on no host".into(),
            }),
        }
    }

    /// `fcdev reset` on a control plane (blocking): a new reset generation in the wanted state; the host's
    /// agent resets its copy when it sees it (its long poll: at once) and reports the generation applied.
    /// Answered at once with the `resetting` view, as `--role all` does: the laptop follows the events its
    /// agent reports.
    pub(crate) fn control_reset(
        &self,
        ns: &NamespaceRow,
        row: &ClusterRow,
        seq_before: i64,
    ) -> ServiceResult<api::Cluster> {
        let host = self.live_host_of(ns, row, "it cannot be reset or stopped there")?;
        if row.state.is_transient() {
            return Err(OrchestratorError::Busy {
                name: row.name.clone(),
                what: format!("it is {}", row.state.as_str()),
            }
            .into());
        }
        self.request(
            row.id,
            Intent::Reset,
            ClusterState::Resetting,
            &format!("reset requested on host {}", host.name),
            false,
        )?;
        self.view_now(ns, row, seq_before)
    }

    /// `fcdev stop` on a control plane (blocking): true when the agent is asked to stop it, false when it
    /// already is stopped.
    pub(crate) fn control_stop(
        &self,
        ns: &NamespaceRow,
        row: &ClusterRow,
        seq_before: i64,
    ) -> ServiceResult<(api::Cluster, bool)> {
        let host = self.live_host_of(ns, row, "it cannot be reset or stopped there")?;
        if row.state == ClusterState::Stopped {
            return Ok((self.view_now(ns, row, seq_before)?, false));
        }
        crate::server::orchestrator::require_ready(row)?;
        self.request(
            row.id,
            Intent::Stop,
            ClusterState::Stopping,
            &format!("stop requested on host {}", host.name),
            false,
        )?;
        Ok((self.view_now(ns, row, seq_before)?, true))
    }

    /// The cluster's stored view now, with `event_seq` where the request's events start.
    fn view_now(
        &self,
        ns: &NamespaceRow,
        row: &ClusterRow,
        seq_before: i64,
    ) -> ServiceResult<api::Cluster> {
        let now = self
            .store()
            .cluster_by_id(row.id)?
            .ok_or_else(|| ServiceError::ClusterNotFound(row.name.clone()))?;
        let mut view = self.stored_view(ns, &now)?;
        view.event_seq = seq_before;
        Ok(view)
    }

    /// `fcdev down` on a control plane: the cluster is forgotten now; its agent stops its VMs and deletes its
    /// files when it sees the cluster gone from its work (its next poll: at once).
    pub(crate) fn control_delete(&self, row: &ClusterRow) -> ServiceResult<()> {
        let e = self.store().delete_cluster(row.id)?;
        let _ = self.control_events.send(e);
        Ok(())
    }

    /// A laptop's peer on a control plane: stored here, accepted by the hub of the namespace's host (the
    /// agent adds it at its next poll), whose endpoint and key the config names: tunnel traffic goes to
    /// that host, never through the control plane.
    pub(crate) fn control_register_peer(
        &self,
        user: &User,
        name: &str,
        public_key: &str,
    ) -> ServiceResult<api::PeerConfig> {
        let store = self.store();
        let ns = store.ensure_namespace(user)?;
        let host = match store.namespace_host(ns.id)? {
            // A namespace with clusters moves only with an `up`, which makes them again on the new host: until
            // then its peers get its host, lost or not (a tunnel asking again while its host is lost must not
            // move the namespace away from its clusters).
            Some(h) if !store.clusters_in(ns.id)?.is_empty() => h,
            _ => self.place(&ns, None)?.0,
        };
        let peer = store.add_peer(&ns, name, public_key)?;
        let hosts = store
            .clusters_in(ns.id)?
            .iter()
            .map(|c| self.stored_view(&ns, c))
            .collect::<ServiceResult<Vec<_>>>()?
            .into_iter()
            .flat_map(|c| {
                let cluster = c.name.clone();
                let ns_name = ns.name.clone();
                c.vms.into_iter().map(move |vm| api::HostEntry {
                    name: hostname(&vm.name, &cluster, &ns_name),
                    address: vm.address,
                })
            })
            .collect();
        Ok(api::PeerConfig {
            id: peer.id,
            name: peer.name,
            address: peer.address.to_string(),
            server_public_key: host.hub_public_key.clone().unwrap_or_default(),
            endpoint: host.hub_endpoint.clone().unwrap_or_default(),
            allowed_ips: vec![ns.subnet.to_string()],
            keepalive: 25,
            namespace: ns.name.clone(),
            dns_suffix: format!("{}.{}", ns.name, names::DNS_SUFFIX),
            hosts,
        })
    }

    /// What a host must run now (blocking).
    fn work_of(&self, host: &HostRow) -> ServiceResult<api::AgentWork> {
        let store = self.store();
        let users = store.list_users()?;
        let mut namespaces = Vec::new();
        for ns in store.namespaces_on(host.id)? {
            let Some(user) = users.iter().find(|u| u.id == ns.user_id) else {
                continue;
            };
            let intents: std::collections::HashMap<i64, _> =
                store.intents_in(ns.id)?.into_iter().collect();
            let clusters = store
                .clusters_in(ns.id)?
                .into_iter()
                .map(|c| {
                    let intent = intents.get(&c.id).copied();
                    Ok(api::AgentCluster {
                        id: c.id,
                        name: c.name,
                        image: c.image,
                        state: c.state,
                        gen: intent.map_or(0, |i| i.gen),
                        reset_gen: intent.map_or(0, |i| i.reset_gen),
                        want_running: intent.is_none_or(|i| i.want_running),
                        reported_seq: intent.map_or(0, |i| i.reported_seq),
                    })
                })
                .collect::<ServiceResult<Vec<_>>>()?;
            let peers = store
                .peers_in(ns.id)?
                .into_iter()
                .map(|p| api::AgentPeer {
                    id: p.id,
                    public_key: p.public_key,
                    address: p.address.to_string(),
                })
                .collect();
            namespaces.push(api::AgentNamespace {
                user: user.name.clone(),
                index: ns.index,
                subnet: ns.subnet.to_string(),
                ssh_keys: store.ssh_keys(ns.id)?,
                clusters,
                peers,
            });
        }
        let json = serde_json::to_vec(&namespaces).unwrap_or_default();
        use sha2::Digest;
        let version = hex::encode(&sha2::Sha256::digest(&json)[..16]);
        Ok(api::AgentWork {
            version,
            namespaces,
        })
    }

    /// `GET /v1/agent/jobs`: the host's work, at once when its version is not `after`, else when it changes or
    /// after `wait` seconds.
    pub async fn agent_work(
        &self,
        host: HostRow,
        after: Option<String>,
        wait_secs: u64,
    ) -> ServiceResult<api::AgentWork> {
        let deadline = tokio::time::Instant::now()
            + std::time::Duration::from_secs(wait_secs.min(MAX_WORK_WAIT_SECS));
        loop {
            let h = host.clone();
            let work = self.blocking(move |s| s.work_of(&h)).await?;
            if after.as_deref() != Some(work.version.as_str())
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(work);
            }
            tokio::time::sleep(WORK_CHECK).await;
        }
    }

    /// `POST /v1/agent/report`: the clusters an agent runs, as they are. Only clusters of namespaces placed on
    /// the agent's host are taken (a host that came back after its namespaces moved reports nothing true).
    pub async fn agent_report(&self, host: HostRow, report: api::AgentReport) -> ServiceResult<()> {
        self.blocking(move |s| {
            let store = s.store();
            for c in &report.clusters {
                let Some(row) = store.cluster_by_id(c.id)? else {
                    continue;
                };
                if store.namespace_host(row.namespace_id)?.map(|h| h.id) != Some(host.id) {
                    continue;
                }
                let vms = serde_json::to_string(&c.vms)
                    .map_err(|e| ServiceError::Internal(e.to_string()))?;
                s.record(
                    c.id,
                    &ClusterMirror {
                        state: c.state,
                        reason: c.reason.clone(),
                        start_mode: c.start_mode.clone(),
                        vms_json: Some(vms),
                        disk_bytes: c.disk_bytes,
                        applied_gen: c.applied_gen,
                        reported_seq: c.last_seq,
                    },
                    &c.events,
                )?;
            }
            Ok(())
        })
        .await
    }

    /// The clusters of hosts that just went lost are `lost`, with the reason (blocking).
    pub(crate) fn mark_clusters_lost(&self, hosts: &[HostRow]) -> ServiceResult<()> {
        let store = self.store();
        for h in hosts {
            let why = format!(
                "host {} is lost ({}); `fcdev up` re-creates the cluster on another host",
                h.name,
                h.reason.as_deref().unwrap_or("no heartbeat")
            );
            for ns in store.namespaces_on(h.id)? {
                for c in store.clusters_in(ns.id)? {
                    if c.state == ClusterState::Lost {
                        continue;
                    }
                    self.record(
                        c.id,
                        &ClusterMirror {
                            state: ClusterState::Lost,
                            reason: Some(why.clone()),
                            start_mode: c.start_mode.clone(),
                            vms_json: store.cluster_report(c.id)?,
                            disk_bytes: c.disk_bytes,
                            applied_gen: None,
                            reported_seq: None,
                        },
                        &[api::ReportedEvent {
                            vm: None,
                            state: ClusterState::Lost.as_str().into(),
                            message: why.clone(),
                        }],
                    )?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::HostCapacity;

    fn host(name: &str, state: HostState, free: u64, images: &[&str]) -> HostRow {
        HostRow {
            id: 1,
            name: name.into(),
            state,
            reason: None,
            revoked: false,
            created_at: String::new(),
            instance: None,
            heartbeat_ms: None,
            hub_endpoint: Some("192.0.2.1:51820".into()),
            hub_public_key: None,
            capacity: Some(HostCapacity {
                memory_mb: 64_000,
                free_memory_mb: free,
                cpus: 8,
                disk_free_bytes: 1,
                images: images.iter().map(|s| s.to_string()).collect(),
            }),
        }
    }

    fn none(_: &HostRow) -> u64 {
        0
    }

    #[test]
    fn placement_takes_the_live_host_with_the_image_and_the_most_free_memory() {
        let hosts = vec![
            host("a", HostState::Live, 1000, &["tiny"]),
            host("b", HostState::Live, 9000, &["debian"]),
            host("c", HostState::Live, 5000, &["tiny", "debian"]),
            host("d", HostState::Lost, 20000, &["tiny"]),
            host("e", HostState::New, 20000, &["tiny"]),
        ];
        assert_eq!(pick_host(&hosts, Some("tiny"), &none).unwrap().name, "c");
        assert_eq!(pick_host(&hosts, Some("debian"), &none).unwrap().name, "b");
        assert_eq!(pick_host(&hosts, None, &none).unwrap().name, "b");
        assert!(pick_host(&hosts, Some("other"), &none).is_none());
        let mut revoked = host("f", HostState::Live, 30000, &["tiny"]);
        revoked.revoked = true;
        assert_eq!(
            pick_host(
                &[revoked, host("g", HostState::Live, 1, &["tiny"])],
                Some("tiny"),
                &none
            )
            .unwrap()
            .name,
            "g"
        );
        // Ties go to the first by name (the store lists hosts by name).
        let tie = vec![
            host("a", HostState::Live, 100, &["tiny"]),
            host("b", HostState::Live, 100, &["tiny"]),
        ];
        assert_eq!(pick_host(&tie, Some("tiny"), &none).unwrap().name, "a");
    }

    #[test]
    fn placements_since_a_hosts_heartbeat_count_against_its_free_memory() {
        let hosts = vec![
            host("a", HostState::Live, 5000, &["tiny"]),
            host("b", HostState::Live, 4800, &["tiny"]),
        ];
        // Two namespaces just placed on a, none on b: b has more free memory until a's next heartbeat.
        let two_on_a = |h: &HostRow| {
            if h.name == "a" {
                2 * PLACED_RESERVE_MB
            } else {
                0
            }
        };
        assert_eq!(
            pick_host(&hosts, Some("tiny"), &two_on_a).unwrap().name,
            "b"
        );
        let one_each = |_: &HostRow| PLACED_RESERVE_MB;
        assert_eq!(
            pick_host(&hosts, Some("tiny"), &one_each).unwrap().name,
            "a"
        );
    }
}
