//! One store test suite, run against both engines: SQLite (a temp file) and a real PostgreSQL that the tests start
//! themselves (`common/pg.rs`, one server for this binary, a fresh database per test). Then the real binary on
//! PostgreSQL: `fcdev server --dev --database postgres://…` with login, up, status, down and a restart, and a
//! database that goes away (503) and comes back.

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestServer, TINY_TOML};
use fcdev::api::ClusterState;
use fcdev::server::store::{ClusterRow, NewVm, Store, StoreError};

/// An engine under test: how to open (and reopen) its store; keeps its temp dir alive.
struct Engine {
    open: Box<dyn Fn() -> Store + Send + Sync>,
    _dir: Option<tempfile::TempDir>,
}

impl Engine {
    fn sqlite() -> Engine {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        Engine {
            open: Box::new(move || Store::open(&path).unwrap()),
            _dir: Some(dir),
        }
    }

    fn postgres() -> Engine {
        let url = pg::shared().database();
        Engine {
            open: Box::new(move || Store::open_postgres(&url).unwrap()),
            _dir: None,
        }
    }

    fn store(&self) -> Store {
        (self.open)()
    }
}

/// Each test, once per engine: `sqlite::NAME` and `postgres::NAME`.
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(super::Engine::sqlite()) } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::$name(super::Engine::postgres()) } )*
        }
    };
}

on_both_engines!(
    snapshots_are_per_cluster_and_go_with_it,
    tokens_are_hashed_and_revocable,
    allocation_fills_gaps_and_survives_reopen,
    peer_addresses_run_out_cleanly,
    concurrent_allocations_never_collide,
    events_are_numbered_per_cluster,
    removal_and_revocation_reach_a_running_server,
    ssh_keys_keep_the_newest,
    clusters_ready_for_a_while_are_found,
    host_tokens_are_hashed_and_revocable,
    host_leases_refuse_a_second_agent_and_expire,
    namespaces_are_placed_once_and_clusters_keep_their_agents_reports,
    a_clusters_wanted_state_has_generations_and_stale_reports_keep_it,
);

const ONE_VM: [NewVm<'static>; 1] = [NewVm {
    name: "n1",
    role: "proxy",
}];

fn snapshots_are_per_cluster_and_go_with_it(engine: Engine) {
    let store = engine.store();
    let (a, _) = store.add_user("a").unwrap();
    let (b, _) = store.add_user("b").unwrap();
    let na = store.ensure_namespace(&a).unwrap();
    let nb = store.ensure_namespace(&b).unwrap();
    let ca = store.create_cluster(&na, "dev", "tiny", &ONE_VM).unwrap();
    let cb = store.create_cluster(&nb, "dev", "tiny", &ONE_VM).unwrap();
    let s1 = store.add_snapshot(ca.id, "s1", "tiny", 10 << 20).unwrap();
    assert_eq!((s1.cluster.as_str(), s1.size_bytes), ("dev", 10 << 20));
    assert!(matches!(
        store.add_snapshot(ca.id, "s1", "tiny", 1),
        Err(StoreError::Exists(_))
    ));
    assert!(matches!(
        store.add_snapshot(9999, "s1", "tiny", 1),
        Err(StoreError::NotFound(_))
    ));
    store.add_snapshot(ca.id, "s2", "tiny", 20 << 20).unwrap();
    assert!(
        store.snapshot(cb.id, "s1").unwrap().is_none(),
        "per cluster"
    );
    assert_eq!(store.snapshot(ca.id, "s1").unwrap(), Some(s1.clone()));
    assert!(store.snapshots_in(nb.id).unwrap().is_empty());
    let names = |v: Vec<fcdev::server::store::SnapshotRow>| -> Vec<String> {
        v.into_iter().map(|s| s.name).collect()
    };
    assert_eq!(names(store.snapshots_in(na.id).unwrap()), ["s2", "s1"]);
    assert_eq!(names(store.snapshots_of(ca.id).unwrap()), ["s1", "s2"]);
    // Stopped: its size, cleared by the next state.
    store.set_cluster_stopped(ca.id, 42, "stopped").unwrap();
    let c = store.cluster_by_id(ca.id).unwrap().unwrap();
    assert_eq!((c.state, c.disk_bytes), (ClusterState::Stopped, Some(42)));
    store
        .set_cluster_state_event(ca.id, ClusterState::Ready, None, "ready")
        .unwrap();
    assert_eq!(
        store.cluster_by_id(ca.id).unwrap().unwrap().disk_bytes,
        None
    );
    store.set_start_mode(ca.id, "restore").unwrap();
    assert_eq!(
        store
            .cluster(na.id, "dev")
            .unwrap()
            .unwrap()
            .start_mode
            .as_deref(),
        Some("restore")
    );
    assert!(store.delete_snapshot(s1.id).unwrap());
    assert!(!store.delete_snapshot(s1.id).unwrap());
    store.delete_cluster(ca.id).unwrap();
    assert!(store.snapshots_in(na.id).unwrap().is_empty());
    assert_eq!(store.all_clusters().unwrap().len(), 1);
}

fn tokens_are_hashed_and_revocable(engine: Engine) {
    let store = engine.store();
    let (user, token) = store.add_user("alice").unwrap();
    assert!(token.starts_with("fcd_") && token.len() == 68);
    assert_eq!(store.user_by_token(&token).unwrap(), Some(user.clone()));
    assert!(matches!(
        store.add_user("alice"),
        Err(StoreError::Exists(_))
    ));
    let second = store.issue_token("alice").unwrap();
    assert_ne!(second, token);
    assert_eq!(store.user_by_token(&second).unwrap(), Some(user));
    assert!(matches!(
        store.issue_token("nobody"),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.revoke_user("alice").unwrap(), (2, 0));
    assert_eq!(store.user_by_token(&token).unwrap(), None);
    assert_eq!(store.user_by_token(&second).unwrap(), None);
    assert!(store.user_exists("alice").unwrap());
    assert_eq!(store.list_users().unwrap().len(), 1);
}

fn allocation_fills_gaps_and_survives_reopen(engine: Engine) {
    let store = engine.store();
    let (a, _) = store.add_user("a").unwrap();
    let (b, _) = store.add_user("b").unwrap();
    let na = store.ensure_namespace(&a).unwrap();
    let nb = store.ensure_namespace(&b).unwrap();
    assert_eq!(na.subnet.to_string(), "10.240.0.0/24");
    assert_eq!(nb.subnet.to_string(), "10.240.1.0/24");
    assert_eq!(store.ensure_namespace(&a).unwrap(), na, "idempotent");
    assert_eq!(store.namespace_by_id(na.id).unwrap(), na);
    let vms = [
        NewVm {
            name: "n1",
            role: "proxy",
        },
        NewVm {
            name: "f1",
            role: "app",
        },
    ];
    let c1 = store.create_cluster(&na, "one", "tiny", &vms).unwrap();
    let c2 = store.create_cluster(&na, "two", "tiny", &vms).unwrap();
    assert!(matches!(
        store.create_cluster(&na, "two", "tiny", &vms),
        Err(StoreError::Exists(_))
    ));
    let addr = |c: &ClusterRow| -> Vec<String> {
        store
            .vms_of(c.id)
            .unwrap()
            .iter()
            .map(|v| v.address.to_string())
            .collect()
    };
    assert_eq!(addr(&c1), ["10.240.0.10", "10.240.0.11"]);
    assert_eq!(addr(&c2), ["10.240.0.12", "10.240.0.13"]);
    let vm = &store.vms_of(c1.id).unwrap()[0];
    assert_eq!(vm.mac, "52:54:00:f0:00:0a");
    store
        .set_vm_state(vm.id, fcdev::api::VmState::Ready, Some("up"))
        .unwrap();
    let in_ns = store.vms_in_namespace(na.id).unwrap();
    assert_eq!(in_ns.len(), 4);
    assert_eq!(in_ns[0].0, "one");
    assert_eq!(in_ns[0].1.state, fcdev::api::VmState::Ready);
    assert_eq!(in_ns[0].1.detail.as_deref(), Some("up"));
    store.delete_cluster(c1.id).unwrap();
    let c3 = store
        .create_cluster(&na, "three", "tiny", &vms[..1])
        .unwrap();
    assert_eq!(addr(&c3), ["10.240.0.10"], "freed addresses are reused");
    let key = "x".repeat(44);
    let p = store.add_peer(&na, "laptop", &key).unwrap();
    assert_eq!(p.address.to_string(), "10.240.0.2");
    assert_eq!(
        store.add_peer(&na, "laptop2", &key).unwrap().address,
        p.address,
        "same key, same address"
    );
    assert!(matches!(
        store.add_peer(&nb, "x", &key),
        Err(StoreError::Exists(_))
    ));
    let hub = store.hub_peers().unwrap();
    assert_eq!(hub.len(), 1);
    assert_eq!(
        (hub[0].peer.name.as_str(), hub[0].subnet),
        ("laptop2", na.subnet)
    );
    assert!(
        !store.delete_peer(nb.id, p.id).unwrap(),
        "another namespace's"
    );
    drop(store);
    let store = engine.store();
    assert_eq!(store.namespace_of(b.id).unwrap(), Some(nb.clone()));
    assert_eq!(store.peers_in(na.id).unwrap().len(), 1);
    assert!(store.delete_peer(na.id, p.id).unwrap());
    let q = store.add_peer(&nb, "x", &key).unwrap();
    assert!(store.remove_peer(q.id).unwrap());
    assert!(store.hub_peers().unwrap().is_empty());
}

fn peer_addresses_run_out_cleanly(engine: Engine) {
    let store = engine.store();
    let (a, _) = store.add_user("a").unwrap();
    let ns = store.ensure_namespace(&a).unwrap();
    for i in 0..8 {
        store.add_peer(&ns, "p", &format!("{i:0>44}")).unwrap();
    }
    assert!(matches!(
        store.add_peer(&ns, "p", &"9".repeat(44)),
        Err(StoreError::Exhausted(_))
    ));
}

/// 24 engineers get namespaces at once; 24 clusters of 3 VMs start in one namespace at once (through two
/// stores, as two processes would); 8 laptops register at once: no number is handed out twice.
fn concurrent_allocations_never_collide(engine: Engine) {
    const N: usize = 24;
    let stores = [Arc::new(engine.store()), Arc::new(engine.store())];
    let users: Vec<_> = (0..N)
        .map(|i| stores[0].add_user(&format!("u{i}")).unwrap().0)
        .collect();
    let in_threads = |f: &(dyn Fn(usize, &Store) + Sync)| {
        std::thread::scope(|s| {
            for i in 0..N {
                let store = stores[i % 2].clone();
                s.spawn(move || f(i, &store));
            }
        })
    };
    in_threads(&|i, store| {
        store.ensure_namespace(&users[i]).unwrap();
    });
    let namespaces: Vec<_> = users
        .iter()
        .map(|u| stores[0].namespace_of(u.id).unwrap().unwrap())
        .collect();
    let subnets: HashSet<String> = namespaces.iter().map(|n| n.subnet.to_string()).collect();
    let indexes: HashSet<u32> = namespaces.iter().map(|n| n.index).collect();
    assert_eq!((subnets.len(), indexes.len()), (N, N), "{namespaces:?}");
    assert_eq!(indexes, (0..N as u32).collect(), "lowest free first");

    let ns = &namespaces[0];
    let vms = [
        NewVm {
            name: "n1",
            role: "proxy",
        },
        NewVm {
            name: "f1",
            role: "app",
        },
        NewVm {
            name: "m1",
            role: "database",
        },
    ];
    in_threads(&|i, store| {
        store
            .create_cluster(ns, &format!("c{i}"), "tiny", &vms)
            .unwrap();
    });
    let addrs: Vec<String> = stores[0]
        .vms_in_namespace(ns.id)
        .unwrap()
        .iter()
        .map(|(_, v)| v.address.to_string())
        .collect();
    let unique: HashSet<&String> = addrs.iter().collect();
    assert_eq!((addrs.len(), unique.len()), (3 * N, 3 * N), "{addrs:?}");

    let peers = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for i in 0..8 {
            let (store, peers) = (stores[i % 2].clone(), &peers);
            s.spawn(move || {
                let p = store.add_peer(ns, "p", &format!("{i:0>44}")).unwrap();
                peers.lock().unwrap().push(p.address);
            });
        }
    });
    let peers = peers.into_inner().unwrap();
    assert_eq!(peers.iter().collect::<HashSet<_>>().len(), 8, "{peers:?}");

    // Events of one cluster from many threads: numbered 1..=N, none twice.
    let cluster = stores[0].cluster(ns.id, "c0").unwrap().unwrap();
    in_threads(&|i, store| {
        store
            .add_event(cluster.id, None, "x", &format!("e{i}"))
            .unwrap();
    });
    let seqs: Vec<i64> = stores[0]
        .events_after(cluster.id, 0)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=N as i64).collect::<Vec<_>>());
}

fn events_are_numbered_per_cluster(engine: Engine) {
    let store = engine.store();
    let (a, _) = store.add_user("a").unwrap();
    let ns = store.ensure_namespace(&a).unwrap();
    let one = store.create_cluster(&ns, "one", "tiny", &ONE_VM).unwrap();
    let two = store.create_cluster(&ns, "two", "tiny", &ONE_VM).unwrap();
    assert_eq!(store.last_event_seq(one.id).unwrap(), 0);
    assert_eq!(
        store
            .add_event(one.id, Some("n1"), "booting", "b")
            .unwrap()
            .seq,
        1
    );
    let e = store
        .set_cluster_state_event(one.id, ClusterState::Failed, Some("why"), "failed")
        .unwrap();
    assert_eq!((e.seq, e.state.as_str()), (2, "failed"));
    assert!(e.at.ends_with('Z') && e.at.contains('T'), "{}", e.at);
    assert_eq!(store.add_event(two.id, None, "x", "y").unwrap().seq, 1);
    let after = store.events_after(one.id, 1).unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].message, "failed");
    let c = store.cluster_by_id(one.id).unwrap().unwrap();
    assert_eq!(
        (c.state, c.reason.as_deref()),
        (ClusterState::Failed, Some("why"))
    );
    let deleted = store.delete_cluster(one.id).unwrap();
    assert_eq!((deleted.seq, deleted.state.as_str()), (3, "deleted"));
    assert!(store.events_after(one.id, 0).unwrap().is_empty());
    assert!(store.cluster_by_id(one.id).unwrap().is_none());
    assert_eq!(store.clusters_in(ns.id).unwrap().len(), 1);
}

/// What `server::follow` relies on: an admin command's change (another store, as another process) moves the
/// running server's `data_version`; a removal waits for the clusters to go.
fn removal_and_revocation_reach_a_running_server(engine: Engine) {
    let server = engine.store();
    let admin = engine.store();
    let (bob, _) = server.add_user("bob").unwrap();
    let ns = server.ensure_namespace(&bob).unwrap();
    let c = server.create_cluster(&ns, "dev", "tiny", &ONE_VM).unwrap();
    server.add_peer(&ns, "laptop", &"k".repeat(44)).unwrap();
    let v0 = server.data_version().unwrap();
    assert_eq!(admin.revoke_user("bob").unwrap(), (1, 1));
    let v1 = server.data_version().unwrap();
    assert_ne!(v1, v0, "a revoke is seen");
    let r = admin.begin_user_removal("bob").unwrap();
    assert_eq!((r.clusters, r.peers), (1, 0));
    assert_ne!(server.data_version().unwrap(), v1, "a removal is seen");
    assert_eq!(
        server.users_being_removed().unwrap(),
        std::slice::from_ref(&bob)
    );
    assert!(!server.delete_user(bob.id).unwrap(), "a cluster remains");
    server.delete_cluster(c.id).unwrap();
    assert!(server.delete_user(bob.id).unwrap());
    assert!(!admin.user_exists("bob").unwrap());
    assert!(server.namespace_of(bob.id).unwrap().is_none());
    // A user without clusters goes at once.
    admin.add_user("carol").unwrap();
    assert_eq!(admin.begin_user_removal("carol").unwrap().clusters, 0);
    assert!(!server.user_exists("carol").unwrap());
    assert!(matches!(
        admin.begin_user_removal("carol"),
        Err(StoreError::NotFound(_))
    ));
}

fn ssh_keys_keep_the_newest(engine: Engine) {
    let store = engine.store();
    let (a, _) = store.add_user("a").unwrap();
    let ns = store.ensure_namespace(&a).unwrap();
    let keys = |k: &[&str]| -> Vec<String> { k.iter().map(|s| s.to_string()).collect() };
    store
        .add_ssh_keys(ns.id, &keys(&["k1", "k2", "k3"]), 3)
        .unwrap();
    store.add_ssh_keys(ns.id, &keys(&["k1", "k4"]), 3).unwrap();
    assert_eq!(store.ssh_keys(ns.id).unwrap(), ["k3", "k1", "k4"]);
}

fn clusters_ready_for_a_while_are_found(engine: Engine) {
    let store = engine.store();
    let (a, _) = store.add_user("a").unwrap();
    let ns = store.ensure_namespace(&a).unwrap();
    let c = store.create_cluster(&ns, "dev", "tiny", &ONE_VM).unwrap();
    store.create_cluster(&ns, "other", "tiny", &ONE_VM).unwrap();
    store
        .set_cluster_state_event(c.id, ClusterState::Ready, None, "ready")
        .unwrap();
    assert!(store.clusters_ready_since(3600).unwrap().is_empty());
    std::thread::sleep(Duration::from_millis(1100));
    let ready = store.clusters_ready_since(1).unwrap();
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0].id, c.id);
}

fn host_tokens_are_hashed_and_revocable(engine: Engine) {
    use fcdev::server::store::HostState;
    let store = engine.store();
    let (h, token) = store.add_host("h1").unwrap();
    assert!(token.starts_with("fch_") && token.len() == 68, "{token}");
    assert_eq!((h.name.as_str(), h.state), ("h1", HostState::New));
    assert!(h.capacity.is_none() && !h.revoked && h.heartbeat_ms.is_none());
    assert!(matches!(store.add_host("h1"), Err(StoreError::Exists(_))));
    let (_, other) = store.add_host("h2").unwrap();
    assert_eq!(store.host_by_token(&token).unwrap(), Some(h.clone()));
    assert_eq!(store.host_by_token(&other).unwrap().unwrap().name, "h2");
    assert_eq!(store.host_by_token("fch_nope").unwrap(), None);
    // A user token is not a host token, nor the other way round.
    let (_, user_token) = store.add_user("alice").unwrap();
    assert_eq!(store.host_by_token(&user_token).unwrap(), None);
    assert_eq!(store.user_by_token(&token).unwrap(), None);
    assert!(store.revoke_host("h1").unwrap());
    assert!(!store.revoke_host("h1").unwrap(), "already revoked");
    assert!(matches!(
        store.revoke_host("nope"),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.host_by_token(&token).unwrap(), None);
    drop(store);
    let store = engine.store();
    let hosts = store.hosts().unwrap();
    assert_eq!(
        hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(),
        ["h1", "h2"]
    );
    assert!(hosts[0].revoked && !hosts[1].revoked);
}

fn host_leases_refuse_a_second_agent_and_expire(engine: Engine) {
    use fcdev::api::{AgentHeartbeat, HostCapacity};
    use fcdev::server::store::HostState;
    let store = engine.store();
    let (h, _) = store.add_host("h1").unwrap();
    let beat = |instance: &str| AgentHeartbeat {
        name: "h1".into(),
        instance: instance.into(),
        hub_endpoint: "10.0.0.1:51820".into(),
        hub_public_key: "k".repeat(44),
        capacity: HostCapacity {
            memory_mb: 4096,
            free_memory_mb: 3000,
            cpus: 4,
            disk_free_bytes: 1 << 40,
            images: vec!["press".into(), "tiny".into()],
        },
    };
    const LEASE: i64 = 2000;
    let live = store
        .host_heartbeat(h.id, &beat("a"), 10_000, LEASE)
        .unwrap();
    assert_eq!(live.state, HostState::Live);
    assert_eq!(live.heartbeat_ms, Some(10_000));
    assert_eq!(live.instance.as_deref(), Some("a"));
    assert_eq!(live.capacity, Some(beat("a").capacity));
    assert_eq!(live.hub_endpoint.as_deref(), Some("10.0.0.1:51820"));
    // Another agent while a's lease runs: refused; a renews.
    assert!(matches!(
        store.host_heartbeat(h.id, &beat("b"), 11_000, LEASE),
        Err(StoreError::Claimed(_))
    ));
    store
        .host_heartbeat(h.id, &beat("a"), 11_500, LEASE)
        .unwrap();
    assert!(store
        .expire_hosts(13_000, LEASE, "gone")
        .unwrap()
        .is_empty());
    let lost = store.expire_hosts(13_500, LEASE, "gone").unwrap();
    assert_eq!(lost.len(), 1);
    assert_eq!(
        (lost[0].state, lost[0].reason.as_deref()),
        (HostState::Lost, Some("gone"))
    );
    assert!(
        store
            .expire_hosts(20_000, LEASE, "gone")
            .unwrap()
            .is_empty(),
        "once"
    );
    assert_eq!(store.hosts().unwrap()[0].state, HostState::Lost);
    // A lost host's name may be taken by another agent; it is live again.
    let back = store
        .host_heartbeat(h.id, &beat("b"), 14_000, LEASE)
        .unwrap();
    assert_eq!((back.state, back.reason), (HostState::Live, None));
    // A revoked host gets no heartbeat in.
    store.revoke_host("h1").unwrap();
    assert!(matches!(
        store.host_heartbeat(h.id, &beat("b"), 14_500, LEASE),
        Err(StoreError::NotFound(_))
    ));
}

fn namespaces_are_placed_once_and_clusters_keep_their_agents_reports(engine: Engine) {
    use fcdev::api::{ClusterState, ReportedEvent};
    use fcdev::server::store::ClusterMirror;
    let store = engine.store();
    let (h1, _) = store.add_host("h1").unwrap();
    let (h2, _) = store.add_host("h2").unwrap();
    let (alice, _) = store.add_user("alice").unwrap();
    let ns = store.ensure_namespace(&alice).unwrap();
    assert_eq!(store.namespace_host(ns.id).unwrap(), None);
    // First placement: only from "on no host".
    let on = store.place_namespace(ns.id, None, h1.id).unwrap().unwrap();
    assert_eq!(on.name, "h1");
    // A second request that also saw "on no host" does not move it: the first choice stands.
    let on = store.place_namespace(ns.id, None, h2.id).unwrap().unwrap();
    assert_eq!(on.name, "h1");
    assert_eq!(store.namespaces_on(h1.id).unwrap(), vec![ns.clone()]);
    assert!(store.namespaces_on(h2.id).unwrap().is_empty());
    // A move from h1 (lost) to h2.
    let on = store
        .place_namespace(ns.id, Some(h1.id), h2.id)
        .unwrap()
        .unwrap();
    assert_eq!(on.name, "h2");
    assert_eq!(store.namespace_host(ns.id).unwrap().unwrap().name, "h2");
    // Reopened (a control plane restart): still there.
    let again = engine.store();
    assert_eq!(again.namespace_host(ns.id).unwrap().unwrap().name, "h2");

    // A cluster without VM rows (a control plane's): its agent's reports.
    let c = store.create_cluster(&ns, "dev", "tiny", &[]).unwrap();
    assert_eq!(store.cluster_report(c.id).unwrap(), None);
    let events = store
        .record_report(
            c.id,
            &ClusterMirror {
                state: ClusterState::Ready,
                reason: None,
                start_mode: Some("boot".into()),
                vms_json: Some("[]".into()),
                disk_bytes: None,
                applied_gen: None,
                reported_seq: None,
            },
            &[
                ReportedEvent {
                    vm: Some("n1".into()),
                    state: "ready".into(),
                    message: "n1 ready".into(),
                },
                ReportedEvent {
                    vm: None,
                    state: "ready".into(),
                    message: "cluster ready".into(),
                },
            ],
        )
        .unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    let row = again.cluster_by_id(c.id).unwrap().unwrap();
    assert_eq!(row.state, ClusterState::Ready);
    assert_eq!(row.start_mode.as_deref(), Some("boot"));
    assert_eq!(again.cluster_report(c.id).unwrap().as_deref(), Some("[]"));
    assert_eq!(again.events_after(c.id, 0).unwrap().len(), 2);
    // A report for a cluster that is gone records nothing.
    store.delete_cluster(c.id).unwrap();
    let none = store
        .record_report(
            c.id,
            &ClusterMirror {
                state: ClusterState::Ready,
                reason: None,
                start_mode: None,
                vms_json: None,
                disk_bytes: None,
                applied_gen: None,
                reported_seq: None,
            },
            &[ReportedEvent {
                vm: None,
                state: "ready".into(),
                message: "late".into(),
            }],
        )
        .unwrap();
    assert!(none.is_empty());

    // An agent's local copy takes the control plane's index (and so its /24).
    let (bob, _) = store.add_user("bob").unwrap();
    let adopted = store.adopt_namespace(&bob, 77).unwrap();
    assert_eq!(adopted.index, 77);
    assert_eq!(store.adopt_namespace(&bob, 77).unwrap(), adopted);
    assert_ne!(adopted.subnet, ns.subnet);
}

fn a_clusters_wanted_state_has_generations_and_stale_reports_keep_it(engine: Engine) {
    use fcdev::api::{ClusterState, ReportedEvent};
    use fcdev::server::store::{ClusterIntent, ClusterMirror, Intent};
    let store = engine.store();
    let (alice, _) = store.add_user("alice").unwrap();
    let ns = store.ensure_namespace(&alice).unwrap();
    let c = store.create_cluster(&ns, "dev", "tiny", &[]).unwrap();
    let fresh = ClusterIntent {
        gen: 0,
        reset_gen: 0,
        want_running: true,
        applied_gen: 0,
        reported_seq: 0,
    };
    assert_eq!(store.cluster_intent(c.id).unwrap(), Some(fresh));
    let other = store.create_cluster(&ns, "two", "tiny", &[]).unwrap();
    assert_eq!(
        store.intents_in(ns.id).unwrap(),
        vec![(c.id, fresh), (other.id, fresh)]
    );
    let report = |state: ClusterState, applied: i64, seq: i64| ClusterMirror {
        state,
        reason: None,
        start_mode: None,
        vms_json: Some("[]".into()),
        disk_bytes: (state == ClusterState::Stopped).then_some(42),
        applied_gen: Some(applied),
        reported_seq: Some(seq),
    };
    let event = |state: &str| ReportedEvent {
        vm: None,
        state: state.into(),
        message: state.into(),
    };
    store
        .record_report(c.id, &report(ClusterState::Ready, 0, 3), &[event("ready")])
        .unwrap();

    // A reset: gen and reset_gen move together, the state and its event in the same transaction.
    let (now, e) = store
        .request_intent(
            c.id,
            Intent::Reset,
            ClusterState::Resetting,
            "reset requested",
            false,
        )
        .unwrap();
    assert_eq!((now.gen, now.reset_gen, now.want_running), (1, 1, true));
    assert_eq!((now.applied_gen, now.reported_seq), (0, 3));
    assert_eq!(
        (e.state.as_str(), e.message.as_str()),
        ("resetting", "reset requested")
    );
    // A report of before the reset (generation 0) keeps the state; its events and VMs are taken.
    let stored = store
        .record_report(c.id, &report(ClusterState::Ready, 0, 4), &[event("ready")])
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        store.cluster_by_id(c.id).unwrap().unwrap().state,
        ClusterState::Resetting
    );
    // At the new generation it is taken.
    store
        .record_report(c.id, &report(ClusterState::Booting, 1, 5), &[])
        .unwrap();
    assert_eq!(
        store.cluster_by_id(c.id).unwrap().unwrap().state,
        ClusterState::Booting
    );
    let now = store.cluster_intent(c.id).unwrap().unwrap();
    assert_eq!((now.applied_gen, now.reported_seq), (1, 5));

    // Stop, then run: want_running follows, reset_gen stays.
    let (now, _) = store
        .request_intent(c.id, Intent::Stop, ClusterState::Stopping, "stop", false)
        .unwrap();
    assert_eq!((now.gen, now.reset_gen, now.want_running), (2, 1, false));
    store
        .record_report(c.id, &report(ClusterState::Stopped, 2, 6), &[])
        .unwrap();
    let row = store.cluster_by_id(c.id).unwrap().unwrap();
    assert_eq!(
        (row.state, row.disk_bytes),
        (ClusterState::Stopped, Some(42))
    );
    let (now, _) = store
        .request_intent(c.id, Intent::Run, ClusterState::Requested, "up", false)
        .unwrap();
    assert_eq!((now.gen, now.reset_gen, now.want_running), (3, 1, true));
    // The control plane's own record (no generation) is taken as it is; a move forgets the agent's report.
    store
        .record_report(
            c.id,
            &ClusterMirror {
                applied_gen: None,
                reported_seq: None,
                ..report(ClusterState::Lost, 0, 0)
            },
            &[],
        )
        .unwrap();
    assert_eq!(
        store.cluster_by_id(c.id).unwrap().unwrap().state,
        ClusterState::Lost
    );
    let (now, _) = store
        .request_intent(c.id, Intent::Run, ClusterState::Requested, "moved", true)
        .unwrap();
    assert_eq!((now.gen, now.reported_seq), (4, 0));
    assert_eq!(store.cluster_report(c.id).unwrap(), None);
    // Kept across a reopen (a control plane restart); an agent's own copy notes what it applied.
    let again = engine.store();
    assert_eq!(again.cluster_intent(c.id).unwrap().unwrap().gen, 4);
    assert_eq!(
        again.intents_in(ns.id).unwrap()[0],
        (c.id, again.cluster_intent(c.id).unwrap().unwrap())
    );
    again.set_applied_gen(c.id, 4).unwrap();
    assert_eq!(store.cluster_intent(c.id).unwrap().unwrap().applied_gen, 4);
    // A cluster that is gone.
    store.delete_cluster(c.id).unwrap();
    assert_eq!(store.cluster_intent(c.id).unwrap(), None);
    assert!(matches!(
        store.request_intent(c.id, Intent::Reset, ClusterState::Resetting, "x", false),
        Err(StoreError::NotFound(_))
    ));
}

// ---- the real binary on PostgreSQL ----

fn start_server_on(url: &str) -> TestServer {
    TestServer::start_with(&[("tiny", TINY_TOML)], &["--database", url])
}

#[test]
fn server_on_postgres_runs_clusters_and_keeps_them_across_a_restart() {
    let url = pg::shared().database();
    let mut server = start_server_on(&url);
    server.login();
    server.fcdev().arg("up").assert().success();
    let status = server.status_json();
    assert_eq!(status["namespace"]["subnet"], "10.240.0.0/24");
    assert_eq!(status["clusters"][0]["state"], "ready");
    assert_eq!(
        status["clusters"][0]["vms"][0]["address"], "10.240.0.10",
        "{status}"
    );
    // Admin commands on the same database; nothing was written to a SQLite file.
    server
        .fcdev()
        .args(["server", "user", "add", "bob", "--database", &url])
        .assert()
        .success();
    let out = server
        .fcdev()
        .args(["server", "user", "list", "--json", "--database", &url])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    assert_eq!(
        common::json(&out),
        serde_json::json!([{"name": "alice"}, {"name": "bob"}])
    );
    assert!(
        !server.data_dir().join("state.db").exists(),
        "the SQLite file was created"
    );

    server.restart();
    server.login();
    let status = server.status_json();
    assert_eq!(status["clusters"][0]["state"], "ready", "{status}");
    assert_eq!(server.vm_processes(), 3, "re-adopted, not duplicated");
    server
        .fcdev()
        .arg("up")
        .assert()
        .success()
        .stdout(predicates::str::contains("already up"));

    // A revoke by the admin command reaches the running server: bob's token is refused.
    let bob_token = String::from_utf8(
        server
            .fcdev()
            .args(["server", "user", "token", "bob", "--database", &url])
            .assert()
            .success()
            .get_output()
            .stdout
            .clone(),
    )
    .unwrap();
    let (code, _) = common::http(&server.url, "GET", "/v1/me", Some(bob_token.trim()), None);
    assert_eq!(code, 200);
    server
        .fcdev()
        .args(["server", "user", "revoke", "bob", "--database", &url])
        .assert()
        .success();
    let (code, _) = common::http(&server.url, "GET", "/v1/me", Some(bob_token.trim()), None);
    assert_eq!(code, 401);

    server.fcdev().args(["down", "--yes"]).assert().success();
    assert_eq!(
        server.status_json()["clusters"].as_array().unwrap().len(),
        0
    );
}

#[test]
fn a_server_whose_database_is_down_answers_503_and_recovers() {
    // Its own PostgreSQL: this test stops it.
    let pg = pg::Postgres::start();
    let mut server = start_server_on(&pg.database());
    server.login();
    server.fcdev().arg("up").assert().success();
    let token = server.token.clone();
    let (code, _) = common::http(&server.url, "GET", "/v1/clusters", Some(&token), None);
    assert_eq!(code, 200);

    pg.stop();
    let (code, body) = common::http(&server.url, "GET", "/v1/clusters", Some(&token), None);
    assert_eq!(code, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "database_unavailable", "{body}");
    server
        .fcdev()
        .arg("status")
        .assert()
        .failure()
        .stderr(predicates::str::contains("cannot reach its database"));

    pg.start_again();
    let start = Instant::now();
    // Every database worker reconnects on its next call: wait until a whole `fcdev status` (several calls, on
    // several workers) goes through, within the same 10 s.
    loop {
        let (code, body) = common::http(&server.url, "GET", "/v1/clusters", Some(&token), None);
        let status_ok = code == 200
            && server
                .fcdev()
                .args(["status", "--json"])
                .output()
                .is_ok_and(|o| o.status.success());
        if code == 200 && status_ok {
            assert!(body.contains("\"ready\""), "{body}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still {code} after the database came back: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(server.status_json()["clusters"][0]["state"], "ready");
    server.kill();
}

#[test]
fn postgres_schema_is_versioned_and_a_newer_one_or_no_database_is_refused() {
    let url = pg::shared().database();
    drop(Store::open_postgres(&url).unwrap());
    // Opening again (another server, an admin command) migrates nothing and keeps the data.
    let store = Store::open_postgres(&url).unwrap();
    store.add_user("a").unwrap();
    drop(store);
    let u = url.clone();
    std::thread::spawn(move || {
        let mut c = ::postgres::Client::connect(&u, ::postgres::NoTls).unwrap();
        let v: i64 = c
            .query_one("SELECT version FROM schema_version", &[])
            .unwrap()
            .get(0);
        assert_eq!(v, fcdev::server::store::postgres::SCHEMA_VERSION);
        c.execute("UPDATE schema_version SET version = 99", &[])
            .unwrap();
    })
    .join()
    .unwrap();
    assert!(matches!(
        Store::open_postgres(&url),
        Err(StoreError::TooNew { found: 99, .. })
    ));
    let nowhere = format!(
        "postgres:///x?host={}&user=postgres",
        tempfile::tempdir().unwrap().path().display()
    );
    assert!(matches!(
        Store::open_postgres(&nowhere),
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        Store::open_postgres("postgres://h/db?connect_timeout=soon"),
        Err(StoreError::BadLocation(_))
    ));
}

#[test]
fn twenty_engineers_up_at_once_on_postgres_never_share_addresses() {
    let url = pg::shared().database();
    let server = start_server_on(&url);
    common::twenty_engineers_up_at_once(&server, &["--database", &url]);
}

/// The `postgres` crate runs a runtime of its own and panics when called on a thread of another one; the HTTP
/// handlers call the store on the server's runtime threads, so the engine must hand its work to its own threads.
#[tokio::test(flavor = "current_thread")]
async fn postgres_store_works_when_called_on_an_async_runtime_thread() {
    let store = Store::open_postgres(&pg::shared().database()).unwrap();
    let (user, token) = store.add_user("a").unwrap();
    assert_eq!(store.user_by_token(&token).unwrap(), Some(user));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_works_when_called_on_a_multi_threaded_runtime() {
    let store = Arc::new(Store::open_postgres(&pg::shared().database()).unwrap());
    let (user, _) = store.add_user("a").unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (store, user) = (store.clone(), user.clone());
            tokio::spawn(async move {
                let ns = store.ensure_namespace(&user).unwrap();
                store
                    .create_cluster(&ns, &format!("c{i}"), "tiny", &ONE_VM)
                    .unwrap()
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.all_clusters().unwrap().len(), 8);
}
