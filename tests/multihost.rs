//! Many hosts behind one control plane, through the real binary on loopback: `fcdev server host add/list/revoke`
//! on both stores, `fcdev server --role control` on PostgreSQL, and agents (`--role agent`) that register,
//! heartbeat, are refused (wrong or revoked token, a name another live agent holds) and go `lost` when killed.

mod common;
mod lab;
#[path = "common/multihost.rs"]
mod multihost;
mod netns;
#[path = "common/pg.rs"]
mod pg;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{fcdev_bin, json};
use multihost::{
    add_host, add_user, cluster, host, host_cmd, hosts, wait_state, Agent, Control, Reaper,
};

/// add, list, a second add of the name, revoke, revoke again, revoke of an unknown host.
fn host_admin_commands_work(at: &[&str]) {
    let token = add_host(at, "h1");
    assert!(token.starts_with("fch_") && token.len() == 68, "{token}");
    let token2 = add_host(at, "h2");
    assert_ne!(token, token2);
    let list = hosts(at);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(host(&list, "h1")["state"], "new");
    assert_eq!(host(&list, "h1")["capacity"], serde_json::Value::Null);
    // Only the hash is stored: the token is nowhere in what list shows.
    assert!(!list.to_string().contains(&token[4..]), "{list}");

    let again = host_cmd(at, &["add", "h1"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let bad = host_cmd(at, &["add", "Bad_Name"]);
    assert!(!bad.status.success());

    let out = host_cmd(at, &["revoke", "h1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(host(&hosts(at), "h1")["state"], "revoked");
    assert_eq!(host(&hosts(at), "h2")["state"], "new");
    assert!(
        host_cmd(at, &["revoke", "h1"]).status.success(),
        "twice is fine"
    );
    let unknown = host_cmd(at, &["revoke", "nope"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no host `nope`"));
}

#[test]
fn host_add_list_revoke_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    let at = ["--data-dir", d.to_str().unwrap()];
    host_admin_commands_work(&at);
    assert!(d.join("state.db").exists());
}

#[test]
fn host_add_list_revoke_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    let url = pg::shared().database();
    let at = ["--data-dir", d.to_str().unwrap(), "--database", &url];
    host_admin_commands_work(&at);
    assert!(!d.join("state.db").exists(), "nothing went to SQLite");
}

// ---- a control plane and its agents ----

#[test]
fn an_agent_registers_and_reports_its_hub_and_capacity() {
    let control = Control::start(15);
    let token = add_host(&control.at(), "h1");
    let mut agent = Agent::start(&control.server.url, "h1", &token, None);
    agent.wait_registered();
    let list = control.hosts();
    let h = host(&list, "h1");
    assert_eq!(h["state"], "live", "{list}");
    assert!(h["capacity"]["memory_mb"].as_u64().unwrap() > 0, "{h}");
    assert!(h["capacity"]["free_memory_mb"].as_u64().unwrap() > 0, "{h}");
    assert!(h["capacity"]["cpus"].as_u64().unwrap() > 0, "{h}");
    assert!(
        h["capacity"]["disk_free_bytes"].as_u64().unwrap() > 0,
        "{h}"
    );
    assert_eq!(h["capacity"]["images"], serde_json::json!(["tiny"]), "{h}");
    assert!(
        h["hub_endpoint"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{h}"
    );
    assert_eq!(h["hub_public_key"].as_str().unwrap().len(), 44, "{h}");
    assert!(h["heartbeat_age_ms"].as_i64().unwrap() < 15_000, "{h}");
}

#[test]
fn a_control_plane_runs_no_vms_and_says_so() {
    let control = Control::start(15);
    let (code, body) = common::http(&control.server.url, "GET", "/v1/health", None, None);
    assert_eq!(code, 200);
    assert_eq!(json(body.as_bytes())["backend"], "none", "{body}");
    let (code, body) = common::http(
        &control.server.url,
        "POST",
        "/v1/clusters",
        Some(&control.server.token),
        Some(r#"{"name": "dev", "image": "tiny"}"#),
    );
    assert_eq!(code, 503, "{body}");
    assert_eq!(json(body.as_bytes())["error"]["code"], "no_host", "{body}");
    // Auth and allocation still work there.
    let (code, body) = common::http(
        &control.server.url,
        "PUT",
        "/v1/namespace",
        Some(&control.server.token),
        None,
    );
    assert_eq!(code, 200, "{body}");
}

#[test]
fn an_agent_with_a_wrong_token_is_refused() {
    let control = Control::start(15);
    let token = add_host(&control.at(), "h1");
    let wrong = format!("fch_{}", "0".repeat(64));
    let mut agent = Agent::start(&control.server.url, "h1", &wrong, None);
    let (status, stderr) = agent.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    assert!(stderr.contains("HTTP 401"), "{stderr}");
    assert!(stderr.contains("unknown or revoked host token"), "{stderr}");
    // Another host's (valid) token for this name: refused too.
    let other = add_host(&control.at(), "h2");
    let mut agent = Agent::start(&control.server.url, "h1", &other, None);
    let (status, stderr) = agent.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    assert!(stderr.contains("HTTP 401"), "{stderr}");
    assert_eq!(control.state_of("h1"), "new");
    drop(token);
}

#[test]
fn a_revoked_host_token_is_refused() {
    let control = Control::start(15);
    let token = add_host(&control.at(), "h1");
    let mut agent = Agent::start(&control.server.url, "h1", &token, None);
    agent.wait_registered();
    let out = host_cmd(&control.at(), &["revoke", "h1"]);
    assert!(out.status.success());
    // Refused at its next heartbeat (every 5 s with a 15 s lease).
    let (status, stderr) = agent.wait_exit(Duration::from_secs(15));
    assert!(!status.success());
    assert!(stderr.contains("HTTP 401"), "{stderr}");
    // A new agent with the revoked token: refused at once.
    let mut again = Agent::start(&control.server.url, "h1", &token, None);
    let (status, stderr) = again.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    assert!(stderr.contains("HTTP 401"), "{stderr}");
}

#[test]
fn two_live_agents_claiming_one_name_are_refused() {
    let control = Control::start(15);
    let token = add_host(&control.at(), "h1");
    let mut first = Agent::start(&control.server.url, "h1", &token, None);
    first.wait_registered();
    // Another machine (its own data dir: another agent id) with the same name and token.
    let mut second = Agent::start(&control.server.url, "h1", &token, None);
    let (status, stderr) = second.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    assert!(stderr.contains("HTTP 409"), "{stderr}");
    assert!(stderr.contains("held by another live agent"), "{stderr}");
    // The first one is untouched and keeps its lease.
    assert!(
        first.child.try_wait().unwrap().is_none(),
        "{}",
        first.stderr()
    );
    assert_eq!(control.state_of("h1"), "live");
}

#[test]
fn an_agent_restarted_on_its_data_dir_takes_its_host_back_at_once() {
    let control = Control::start(15);
    let token = add_host(&control.at(), "h1");
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&control.server.url, "h1", &token, Some(dir.path()));
    agent.wait_registered();
    agent.kill9();
    // Same host (same agent id in its data dir): not a second agent, even while the old lease runs.
    let mut again = Agent::start(&control.server.url, "h1", &token, Some(dir.path()));
    again.wait_registered();
    assert_eq!(control.state_of("h1"), "live");
}

#[test]
fn an_agent_killed_with_sigkill_goes_lost_within_the_lease() {
    const LEASE: u64 = 2;
    let control = Control::start(LEASE);
    let token = add_host(&control.at(), "h1");
    let token2 = add_host(&control.at(), "h2");
    let mut agent = Agent::start(&control.server.url, "h1", &token, None);
    let mut other = Agent::start(&control.server.url, "h2", &token2, None);
    agent.wait_registered();
    other.wait_registered();
    // Past the control plane's start-up grace (one lease), and live for more than a lease: heartbeats renew.
    std::thread::sleep(Duration::from_secs(2 * LEASE + 1));
    assert_eq!(control.state_of("h1"), "live");
    let last_seen = host(&control.hosts(), "h1")["heartbeat_age_ms"]
        .as_u64()
        .unwrap();
    agent.kill9();
    let killed = Instant::now();
    loop {
        let list = control.hosts();
        let h = host(&list, "h1");
        if h["state"] == "lost" {
            assert!(
                h["reason"].as_str().unwrap().contains("no heartbeat"),
                "{h}"
            );
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_millis(LEASE * 1000 + 1500),
            "still {} {:?} after the kill: {list}",
            h["state"],
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Lost no earlier than a lease after its last heartbeat.
    assert!(
        killed.elapsed() + Duration::from_millis(last_seen)
            >= Duration::from_millis(LEASE * 1000 - 300),
        "lost too early: {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(
        control.state_of("h2"),
        "live",
        "the other host is untouched"
    );
}

#[test]
fn a_control_plane_restart_loses_no_host_rows() {
    let mut control = Control::start(3);
    let t1 = add_host(&control.at(), "h1");
    let t2 = add_host(&control.at(), "h2");
    add_host(&control.at(), "h3");
    let mut a1 = Agent::start(&control.server.url, "h1", &t1, None);
    let mut a2 = Agent::start(&control.server.url, "h2", &t2, None);
    a1.wait_registered();
    a2.wait_registered();
    let before = control.hosts();
    control.server.kill();
    // Down for longer than a lease: the agents keep trying.
    std::thread::sleep(Duration::from_secs(4));
    control.server.restart();
    let after = control.hosts();
    assert_eq!(after.as_array().unwrap().len(), 3, "{after}");
    for name in ["h1", "h2", "h3"] {
        assert_eq!(
            host(&after, name)["created_at"],
            host(&before, name)["created_at"]
        );
        assert_eq!(
            host(&after, name)["hub_public_key"],
            host(&before, name)["hub_public_key"]
        );
    }
    assert_eq!(host(&after, "h3")["state"], "new");
    // The agents come back by themselves, and no host is marked lost for the control plane's own downtime.
    std::thread::sleep(Duration::from_secs(5));
    let list = control.hosts();
    assert_eq!(host(&list, "h1")["state"], "live", "{list}");
    assert_eq!(host(&list, "h2")["state"], "live", "{list}");
    assert!(a1.child.try_wait().unwrap().is_none(), "{}", a1.stderr());
    assert!(a2.child.try_wait().unwrap().is_none(), "{}", a2.stderr());
}

// ---- placement, work on the agents, host loss ----

fn up(url: &str, token: &str) -> serde_json::Value {
    let (code, body) = common::http(
        url,
        "POST",
        "/v1/clusters",
        Some(token),
        Some(r#"{"name": "dev", "image": "tiny"}"#),
    );
    assert!(code == 202 || code == 200, "{code} {body}");
    json(body.as_bytes())
}

fn vm_pids(data: &Path) -> usize {
    fn walk(d: &Path, n: &mut usize) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, n);
            } else if p.file_name().is_some_and(|f| f == "vm.pid") {
                *n += 1;
            }
        }
    }
    let mut n = 0;
    walk(&data.join("vms"), &mut n);
    n
}

#[test]
fn clusters_run_on_agents_and_a_lost_hosts_clusters_are_recreated_elsewhere() {
    const LEASE: u64 = 2;
    let mut control = Control::start(LEASE);
    let url = control.server.url.clone();
    const HOSTS: [&str; 3] = ["h1", "h2", "h3"];
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let _reaper = Reaper(dirs.iter().map(|d| d.path().to_path_buf()).collect());
    let tokens: Vec<String> = HOSTS.iter().map(|h| add_host(&control.at(), h)).collect();
    let mut agents: Vec<Agent> = HOSTS
        .iter()
        .zip(&tokens)
        .zip(&dirs)
        .map(|((h, t), d)| Agent::start(&url, h, t, Some(d.path())))
        .collect();
    for a in &mut agents {
        a.wait_registered();
    }
    // Twenty engineers at once: each namespace is placed on a host, its cluster runs there.
    let engineers: Vec<String> = (0..20)
        .map(|i| add_user(&control.at(), &format!("eng{i}")))
        .collect();
    let threads: Vec<_> = engineers
        .iter()
        .cloned()
        .map(|t| {
            let u = url.clone();
            std::thread::spawn(move || up(&u, &t))
        })
        .collect();
    for t in threads {
        let c = t.join().unwrap();
        assert!(HOSTS.iter().any(|h| c["host"] == *h), "{c}");
    }
    let mut on = std::collections::HashMap::new();
    for t in &engineers {
        let c = wait_state(&url, t, "ready", Duration::from_secs(60));
        assert_eq!(c["vms"].as_array().unwrap().len(), 3, "{c}");
        on.insert(t.clone(), c["host"].as_str().unwrap().to_string());
    }
    // The VMs run on the agents (their data dirs), none on the control plane.
    let all_vms: usize = dirs.iter().map(|d| vm_pids(d.path())).sum();
    assert_eq!(all_vms, 60);
    assert_eq!(vm_pids(&control.server.data_dir()), 0);

    // A control plane restart loses nothing.
    control.server.restart();
    for t in &engineers {
        let c = cluster(&url, t);
        assert_eq!(c["state"], "ready", "{c}");
        assert_eq!(c["host"].as_str().unwrap(), on[t]);
    }

    // The host of the first engineer's cluster dies: its clusters go lost within the lease.
    std::thread::sleep(Duration::from_secs(LEASE + 1));
    let victim = on[&engineers[0]].clone();
    let vi = HOSTS.iter().position(|h| *h == victim).unwrap();
    agents[vi].kill9();
    let killed = Instant::now();
    let lost: Vec<&String> = engineers.iter().filter(|t| on[*t] == victim).collect();
    for t in &lost {
        let c = wait_state(&url, t, "lost", Duration::from_millis(LEASE * 1000 + 2000));
        assert!(
            c["reason"]
                .as_str()
                .unwrap()
                .contains(&format!("host {victim} is lost")),
            "{c}"
        );
    }
    assert!(killed.elapsed() < Duration::from_millis(LEASE * 1000 + 2000));
    for t in engineers.iter().filter(|t| on[*t] != victim) {
        assert_eq!(cluster(&url, t)["state"], "ready");
    }
    // `up` makes them again on the other host, and says what is gone.
    for t in &lost {
        let c = up(&url, t);
        assert_ne!(c["host"].as_str().unwrap(), victim, "{c}");
        let c = wait_state(&url, t, "ready", Duration::from_secs(60));
        assert_ne!(c["host"].as_str().unwrap(), victim, "{c}");
        let (code, body) = common::http(
            &url,
            "GET",
            "/v1/clusters/dev/events?after=0",
            Some(t),
            None,
        );
        assert_eq!(code, 200);
        assert!(
            body.contains("everything since the onboarding snapshot is gone"),
            "{body}"
        );
    }
    // The lost agent comes back: it stops the VMs of the namespaces that moved away.
    let mut back = Agent::start(&url, &victim, &tokens[vi], Some(dirs[vi].path()));
    back.wait_registered();
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm_pids(dirs[vi].path()) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} VMs still run on the host that came back",
            vm_pids(dirs[vi].path())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(control.state_of(&victim), "live");
    // `down` on the control plane: the agent deletes the cluster.
    let now_on = cluster(&url, lost[0])["host"].as_str().unwrap().to_string();
    let other = HOSTS.iter().position(|h| *h == now_on).unwrap();
    let before = vm_pids(dirs[other].path());
    let (code, body) = common::http(&url, "DELETE", "/v1/clusters/dev", Some(lost[0]), None);
    assert!(code == 200 || code == 204, "{code} {body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm_pids(dirs[other].path()) != before - 3 {
        assert!(
            Instant::now() < deadline,
            "the deleted cluster's VMs still run"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---- many hosts as network namespaces, real VMs ----

/// A process started under `ip netns exec`, its output appended to a log file; SIGKILLed when dropped.
struct NsProc {
    child: Child,
    log: PathBuf,
}

impl NsProc {
    fn spawn(ns: &str, args: &[&str], envs: &[(&str, &str)], log: PathBuf) -> NsProc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(fcdev_bin())
            .args(args)
            .envs(envs.iter().copied())
            .env_remove("FCDEV_DATABASE")
            .env_remove("FCDEV_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn fcdev under ip netns exec");
        NsProc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait until the log has `needle`; panics with the log when the process exits first or time runs out.
    fn wait_for(&mut self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log().contains(needle) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("exited ({status}) before `{needle}`:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no `{needle}` after {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for NsProc {
    /// SIGTERM first: a TUN-mode tunnel removes its block from /etc/hosts (shared with the machine) when it ends.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill9();
    }
}

/// The issue's multi-host run with real VMs: each host is a network namespace (`h1`, `h2`: an agent with the
/// qemu backend, its hub and its VMs), the control plane another (`ctl`, on PostgreSQL through its unix
/// socket), the laptop another (`lap`), all on one bridge in a namespace of its own (`lan`). The laptop reaches
/// a real VM through its host's hub (the peer config names that agent's address, not the control plane's);
/// the host is killed (SIGKILL): the cluster is `lost` within the lease, `fcdev up` makes it again on the other
/// host, the running `fcdev tunnel`s follow by itself (new hub endpoint and key): the TUN-mode one of the laptop
/// and the rootless one (proxy mode, a `-L` port forward) of the engineer's second machine; and `fcdev status`
/// says the exported wg-config must be exported again. Every packet stays in the namespaces this test makes.
#[test]
fn a_laptop_follows_its_cluster_to_another_host_after_its_host_dies() {
    netns::require_root_and_tun();
    lab::require_vm_tools();
    const LEASE: u64 = 3;
    const NET: &str = "192.168.93";
    let image = lab::tiny_image();
    let db = pg::shared().database();
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::os::unix::fs::symlink(&image, images.join("tiny")).unwrap();
    let data: Vec<PathBuf> = ["h1", "h2"]
        .iter()
        .map(|h| tmp.path().join(format!("data-{h}")))
        .collect();
    // Dropped last (declared first among the guards): the VMs the killed agent left behind.
    let _reaper = Reaper(data.clone());

    let nss = netns::Namespaces::new(&["lan", "ctl", "h1", "h2", "lap"]);
    let lan = nss.name("lan");
    netns::must(&format!(
        "ip -n {lan} link add br0 type bridge && ip -n {lan} link set br0 up"
    ));
    let addr = |role: &str| match role {
        "ctl" => format!("{NET}.1"),
        "h1" => format!("{NET}.11"),
        "h2" => format!("{NET}.12"),
        _ => format!("{NET}.2"),
    };
    for role in ["ctl", "h1", "h2", "lap"] {
        let ns = nss.name(role);
        netns::must(&format!(
            "ip -n {lan} link add v{role} type veth peer name eth0 netns {ns} && \
             ip -n {lan} link set v{role} master br0 up && \
             ip -n {ns} addr add {}/24 dev eth0 && ip -n {ns} link set eth0 up",
            addr(role)
        ));
    }

    // The control plane in its namespace (the database through its unix socket: no network).
    let control_url = format!("http://{}:7070", addr("ctl"));
    let lease = LEASE.to_string();
    let listen = format!("{}:7070", addr("ctl"));
    let mut control = NsProc::spawn(
        &nss.name("ctl"),
        &[
            "server",
            "--role",
            "control",
            "--database",
            &db,
            "--listen",
            &listen,
            "--host-lease",
            &lease,
            "--data-dir",
            tmp.path().join("data-ctl").to_str().unwrap(),
        ],
        &[],
        tmp.path().join("control.log"),
    );
    control.wait_for("listening on", Duration::from_secs(30));
    let at = ["--database", db.as_str()];

    // Two hosts, each an agent with real VMs, its hub on its own address.
    let mut agents: Vec<NsProc> = Vec::new();
    for (i, h) in ["h1", "h2"].iter().enumerate() {
        let token = add_host(&at, h);
        let hub = format!("{}:51820", addr(h));
        let mut a = NsProc::spawn(
            &nss.name(h),
            &[
                "server",
                "--role",
                "agent",
                "--control",
                &control_url,
                "--host-name",
                h,
                "--hub-listen",
                &hub,
                "--hub-endpoint",
                &hub,
                "--hub-tun",
                "fcdevhub",
                "--backend",
                "qemu",
                "--data-dir",
                data[i].to_str().unwrap(),
                "--images",
                images.to_str().unwrap(),
            ],
            &[("FCDEV_HOST_TOKEN", token.as_str())],
            tmp.path().join(format!("agent-{h}.log")),
        );
        a.wait_for("registered with", Duration::from_secs(30));
        agents.push(a);
    }

    // The laptop, logged in to the control plane.
    let alice_token = add_user(&at, "alice");
    let laptop = lab::Laptop {
        ns: nss.name("lap"),
        cfg: tmp.path().join("alice"),
        nss: &nss,
        role: "lap",
    };
    laptop.login(&control_url, &alice_token);
    let up: serde_json::Value = serde_json::from_str(&laptop.ok(&["up", "--json"])).unwrap();
    assert_eq!(up["state"], "ready", "{up}");
    let first = up["host"].as_str().expect("the cluster's host").to_string();
    let (vi, other) = match first.as_str() {
        "h1" => (0, "h2"),
        "h2" => (1, "h1"),
        h => panic!("placed on unknown host {h}"),
    };
    let n1 = up["vms"][0]["address"].as_str().unwrap().to_string();
    assert_eq!(up["vms"][0]["name"], "n1", "{up}");

    // The hub is that host's, never the control plane.
    let status = laptop.status();
    assert_eq!(
        status["namespace"]["hub_endpoint"],
        format!("{}:51820", addr(&first)),
        "{status}"
    );
    let conf = tmp.path().join("alice.conf");
    laptop.ok(&["tunnel", "--wg-config", conf.to_str().unwrap()]);
    let exported = std::fs::read_to_string(&conf).unwrap();
    assert!(
        exported.contains(&format!("Endpoint = {}:51820", addr(&first))),
        "{exported}"
    );
    let mut tunnel = NsProc::spawn(
        &nss.name("lap"),
        &["tunnel", "--mode", "tun"],
        &[("FCDEV_CONFIG_DIR", laptop.cfg.to_str().unwrap())],
        tmp.path().join("tunnel.log"),
    );
    tunnel.wait_for("Tunnel up", Duration::from_secs(30));
    let page = laptop.curl(&format!("http://{n1}/"));
    assert!(
        page.as_deref().is_some_and(|p| p.contains("n1")),
        "the laptop did not reach n1 through host {first}'s hub: {page:?}\n{}",
        tunnel.log()
    );
    // Alice's second machine (its own key and address in the namespace) runs a rootless tunnel: no TUN, a
    // port forward to n1.
    let laptop2 = lab::Laptop {
        ns: nss.name("lap"),
        cfg: tmp.path().join("alice-2"),
        nss: &nss,
        role: "lap",
    };
    laptop2.login(&control_url, &alice_token);
    let mut rootless = NsProc::spawn(
        &nss.name("lap"),
        &[
            "tunnel",
            "--mode",
            "proxy",
            "--name",
            "alice-second",
            "--socks",
            "127.0.0.1:1081",
            "-L",
            "8080:n1:80",
        ],
        &[("FCDEV_CONFIG_DIR", laptop2.cfg.to_str().unwrap())],
        tmp.path().join("rootless.log"),
    );
    rootless.wait_for("Tunnel up (proxy mode)", Duration::from_secs(30));
    let page = laptop.curl("http://127.0.0.1:8080/");
    assert!(
        page.as_deref().is_some_and(|p| p.contains("n1")),
        "the rootless tunnel's -L 8080:n1:80 did not reach n1 on {first}: {page:?}\n{}",
        rootless.log()
    );
    // The VMs run on that host's agent, in its namespace.
    assert_eq!(lab::qemu_count(&data[vi]), 3);
    assert_eq!(lab::qemu_count(&data[1 - vi]), 0);

    // The host dies.
    agents[vi].kill9();
    let killed = Instant::now();
    // The lease plus the reaper's step, with room for a loaded machine (2 cores shared with other work).
    let deadline = killed + Duration::from_millis(LEASE * 1000 + 3000);
    // Polled with curl from the laptop's namespace (cheaper than a whole `fcdev status`).
    let get_cluster = format!(
        "curl -s --max-time 2 -H 'Authorization: Bearer {alice_token}' {control_url}/v1/clusters/dev"
    );
    let lost = loop {
        let out = nss.sh("lap", &get_cluster);
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        let c: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        if c["state"] == "lost" {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "not lost within the lease: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let lost_after = killed.elapsed();
    let reason = lost["reason"].as_str().unwrap().to_string();
    let status = laptop.status();
    assert_eq!(status["clusters"][0]["state"], "lost", "{status}");
    assert!(
        reason.contains(&format!("host {first} is lost")),
        "{reason}"
    );

    // `up` makes it again on the other host.
    let again: serde_json::Value = serde_json::from_str(&laptop.ok(&["up", "--json"])).unwrap();
    assert_eq!(again["state"], "ready", "{again}");
    assert_eq!(again["host"], other, "{again}");
    assert_eq!(lab::qemu_count(&data[1 - vi]), 3);

    // The running tunnel follows by itself, to the other host's hub.
    let moved = Instant::now();
    let page = netns::eventually(Duration::from_secs(60), || {
        let o = nss.sh("lap", &format!("curl -s --fail --max-time 3 http://{n1}/"));
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    });
    assert!(
        page.as_deref().is_some_and(|p| p.contains("n1")),
        "the running tunnel did not follow the cluster to {other}: {page:?}\n{}",
        tunnel.log()
    );
    assert!(
        tunnel.log().contains("the tunnel follows"),
        "{}",
        tunnel.log()
    );
    let tun_followed = moved.elapsed();
    // And so does the rootless one, its port forward on the same local port.
    let page = netns::eventually(Duration::from_secs(60), || {
        let o = nss.sh("lap", "curl -s --fail --max-time 3 http://127.0.0.1:8080/");
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    });
    assert!(
        page.as_deref().is_some_and(|p| p.contains("n1")),
        "the rootless tunnel did not follow the cluster to {other}: {page:?}\n{}",
        rootless.log()
    );
    assert!(
        rootless.log().contains("the tunnel follows"),
        "{}",
        rootless.log()
    );
    eprintln!(
        "lost after {:?}; the TUN tunnel followed {:?} and the rootless one {:?} after `up` returned\n\
         --- tunnel ---\n{}\n--- rootless tunnel ---\n{}",
        lost_after,
        tun_followed,
        moved.elapsed(),
        tunnel.log(),
        rootless.log()
    );

    // An exported wg-config is stale now: status says to export it again.
    let status = laptop.status();
    assert_eq!(
        status["namespace"]["hub_endpoint"],
        format!("{}:51820", addr(other)),
        "{status}"
    );
    assert_eq!(
        status["stale_wg_config"]["endpoint"],
        format!("{}:51820", addr(&first)),
        "{status}"
    );
    let text = laptop.ok(&["status"]);
    assert!(text.contains("export it again"), "{text}");
    laptop.ok(&["tunnel", "--wg-config", conf.to_str().unwrap()]);
    let text = laptop.ok(&["status"]);
    assert!(!text.contains("export it again"), "{text}");
    drop(tunnel);
    drop(rootless);
    drop(agents);
    drop(control);
}

// ---- three hosts, twenty engineers, a dead host and a control plane restart, in namespaces ----

/// `fcdev server --role control` in namespace `ns` on PostgreSQL (its unix socket: no network), its log in
/// `log` (a new file per start, so `listening on` is this start's).
fn spawn_control(
    ns: &str,
    db: &str,
    listen: &str,
    lease: u64,
    data: &Path,
    log: PathBuf,
) -> NsProc {
    let lease = lease.to_string();
    let mut control = NsProc::spawn(
        ns,
        &[
            "server",
            "--role",
            "control",
            "--database",
            db,
            "--listen",
            listen,
            "--host-lease",
            &lease,
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[],
        log,
    );
    control.wait_for("listening on", Duration::from_secs(30));
    control
}

/// GET `path` of the API as `token`, with curl inside the laptop namespace; Null when it does not answer.
fn api_get(nss: &netns::Namespaces, url: &str, token: &str, path: &str) -> serde_json::Value {
    api(nss, "GET", url, token, path)
}

/// `method` `path` of the API as `token`, with curl inside the laptop namespace; Null when it does not answer.
fn api(
    nss: &netns::Namespaces,
    method: &str,
    url: &str,
    token: &str,
    path: &str,
) -> serde_json::Value {
    let out = nss.sh(
        "xlap",
        &format!(
            "curl -s --max-time 3 -X {method} -H 'Authorization: Bearer {token}' {url}/v1{path}"
        ),
    );
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// The pids in the VM pid files under `DATA/vms` (process backend or qemu), sorted.
fn vm_pid_files(data: &Path) -> Vec<String> {
    let mut pids: Vec<String> = ["vm.pid", "qemu.pid"]
        .iter()
        .flat_map(|f| common::find_files(&data.join("vms"), f))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .collect();
    pids.sort();
    pids
}

/// `fcdev up --image ptiny --json` of these engineers at once (each its own laptop config); their clusters.
fn up_all(laptops: &[lab::Laptop<'_>]) -> Vec<serde_json::Value> {
    let children: Vec<Child> = laptops
        .iter()
        .map(|l| {
            l.fcdev(&["up", "--image", "ptiny", "--json"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn fcdev up")
        })
        .collect();
    // Each in well under a minute even on a loaded machine; a hang fails the test instead of stalling it.
    let deadline = Instant::now() + Duration::from_secs(120);
    children
        .into_iter()
        .map(|mut c| {
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let out = c.wait_with_output().unwrap();
                    panic!(
                        "fcdev up did not return within 120 s: {}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "fcdev up: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            json(&out.stdout)
        })
        .collect()
}

/// The issue's multi-host run at its size, every host a network namespace on one bridge: `h1` an agent with
/// real VMs (the image `tiny`), `h2` and `h3` agents with the process backend (the image `ptiny`), the control
/// plane in `ctl` on PostgreSQL, the laptops in `lap`. Alice's cluster runs on h1 and her TUN-mode tunnel goes to
/// h1's hub; twenty engineers `fcdev up` at once and land on h2 and h3. The control plane is killed (SIGKILL),
/// stays down longer than a lease and starts again: nothing is lost (host rows, namespaces, peers, clusters and
/// their hosts, not one VM restarted) and alice's traffic, which never passes through the control plane, flows
/// the whole time. Then the host of the first engineer's cluster is killed: its clusters go `lost` within the
/// lease, the others stay `ready`, and `fcdev up` makes them again on the remaining process host.
#[test]
fn twenty_engineers_on_three_hosts_keep_everything_across_a_control_plane_restart_and_leave_a_dead_host(
) {
    netns::require_root_and_tun();
    lab::require_vm_tools();
    const LEASE: u64 = 3;
    const NET: &str = "192.168.94";
    const ENGINEERS: usize = 20;
    const HOSTS: [&str; 3] = ["h1", "h2", "h3"];
    let image = lab::tiny_image();
    let db = pg::shared().database();
    let at = ["--database", db.as_str()];
    let tmp = tempfile::tempdir().unwrap();
    // h1's catalog: the real tiny image; h2's and h3's: the process-backend template, named `ptiny`.
    let vm_images = tmp.path().join("images-vm");
    std::fs::create_dir_all(&vm_images).unwrap();
    std::os::unix::fs::symlink(&image, vm_images.join("tiny")).unwrap();
    let process_images = tmp.path().join("images-process");
    std::fs::create_dir_all(process_images.join("ptiny")).unwrap();
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/process-tiny.toml"),
    )
    .unwrap()
    .replace("name = \"tiny\"", "name = \"ptiny\"");
    std::fs::write(process_images.join("ptiny/image.toml"), template).unwrap();
    let data: Vec<PathBuf> = HOSTS
        .iter()
        .map(|h| tmp.path().join(format!("data-{h}")))
        .collect();
    let _reaper = Reaper(data.clone());

    // Roles of their own (namespace names are per process and role: the other namespace test may run at once).
    let nss = netns::Namespaces::new(&["xlan", "xctl", "xh1", "xh2", "xh3", "xlap"]);
    let lan = nss.name("xlan");
    netns::must(&format!(
        "ip -n {lan} link add br0 type bridge && ip -n {lan} link set br0 up"
    ));
    let addr = |role: &str| match role {
        "ctl" => format!("{NET}.1"),
        "h1" => format!("{NET}.11"),
        "h2" => format!("{NET}.12"),
        "h3" => format!("{NET}.13"),
        _ => format!("{NET}.2"),
    };
    for role in ["ctl", "h1", "h2", "h3", "lap"] {
        let ns = nss.name(&format!("x{role}"));
        netns::must(&format!(
            "ip -n {lan} link add v{role} type veth peer name eth0 netns {ns} && \
             ip -n {lan} link set v{role} master br0 up && \
             ip -n {ns} addr add {}/24 dev eth0 && ip -n {ns} link set eth0 up",
            addr(role)
        ));
    }

    let control_url = format!("http://{}:7070", addr("ctl"));
    let listen = format!("{}:7070", addr("ctl"));
    let control_data = tmp.path().join("data-ctl");
    let mut control = spawn_control(
        &nss.name("xctl"),
        &db,
        &listen,
        LEASE,
        &control_data,
        tmp.path().join("control-1.log"),
    );
    let mut agents: Vec<NsProc> = Vec::new();
    for (i, h) in HOSTS.iter().enumerate() {
        let token = add_host(&at, h);
        let hub = format!("{}:51820", addr(h));
        let (backend, images, tun) = if *h == "h1" {
            ("qemu", &vm_images, "fcdevhub")
        } else {
            ("process", &process_images, "none")
        };
        let mut a = NsProc::spawn(
            &nss.name(&format!("x{h}")),
            &[
                "server",
                "--role",
                "agent",
                "--control",
                &control_url,
                "--host-name",
                h,
                "--hub-listen",
                &hub,
                "--hub-tun",
                tun,
                "--backend",
                backend,
                "--data-dir",
                data[i].to_str().unwrap(),
                "--images",
                images.to_str().unwrap(),
            ],
            &[("FCDEV_HOST_TOKEN", token.as_str())],
            tmp.path().join(format!("agent-{h}.log")),
        );
        a.wait_for("registered with", Duration::from_secs(30));
        agents.push(a);
    }

    // Alice: her cluster on the host with real VMs, her TUN-mode tunnel to its hub.
    let alice_token = add_user(&at, "alice");
    let alice = lab::Laptop {
        ns: nss.name("xlap"),
        cfg: tmp.path().join("alice"),
        nss: &nss,
        role: "xlap",
    };
    alice.login(&control_url, &alice_token);
    let up_alice: serde_json::Value = serde_json::from_str(&alice.ok(&["up", "--json"])).unwrap();
    assert_eq!(up_alice["state"], "ready", "{up_alice}");
    assert_eq!(up_alice["host"], "h1", "{up_alice}");
    let n1 = up_alice["vms"][0]["address"].as_str().unwrap().to_string();
    let mut tunnel = NsProc::spawn(
        &nss.name("xlap"),
        &["tunnel", "--mode", "tun"],
        &[("FCDEV_CONFIG_DIR", alice.cfg.to_str().unwrap())],
        tmp.path().join("tunnel.log"),
    );
    tunnel.wait_for("Tunnel up", Duration::from_secs(30));
    let page = alice.curl(&format!("http://{n1}/"));
    assert!(
        page.as_deref().is_some_and(|p| p.contains("n1")),
        "alice did not reach n1 through h1's hub: {page:?}\n{}",
        tunnel.log()
    );

    // Twenty engineers, each on a laptop of their own (a config dir), `fcdev up` at once.
    let tokens: Vec<String> = (0..ENGINEERS)
        .map(|i| add_user(&at, &format!("eng{i}")))
        .collect();
    let laptops: Vec<lab::Laptop<'_>> = (0..ENGINEERS)
        .map(|i| lab::Laptop {
            ns: nss.name("xlap"),
            cfg: tmp.path().join(format!("eng{i}")),
            nss: &nss,
            role: "xlap",
        })
        .collect();
    for (l, t) in laptops.iter().zip(&tokens) {
        l.login(&control_url, t);
    }
    let started = Instant::now();
    let ups = up_all(&laptops);
    eprintln!(
        "{ENGINEERS} engineers up at once in {:?}",
        started.elapsed()
    );
    let mut on: Vec<String> = Vec::new();
    for c in &ups {
        assert_eq!(c["state"], "ready", "{c}");
        assert_eq!(c["vms"].as_array().unwrap().len(), 3, "{c}");
        let h = c["host"].as_str().unwrap().to_string();
        assert!(h == "h2" || h == "h3", "ptiny placed on {h}: {c}");
        on.push(h);
    }
    let count_on = |h: &str| on.iter().filter(|x| x.as_str() == h).count();
    assert_eq!(vm_pid_files(&data[1]).len(), 3 * count_on("h2"));
    assert_eq!(vm_pid_files(&data[2]).len(), 3 * count_on("h3"));
    assert_eq!(lab::qemu_count(&data[0]), 3);

    // What must survive the control plane's restart.
    let hosts_before = hosts(&at);
    let alice_before = alice.status();
    assert_eq!(
        alice_before["peers"].as_array().unwrap().len(),
        1,
        "{alice_before}"
    );
    let clusters_before: Vec<serde_json::Value> = tokens
        .iter()
        .map(|t| api_get(&nss, &control_url, t, "/clusters/dev"))
        .collect();
    // Their namespaces (`PUT /v1/namespace` returns the engineer's namespace, made at the first `up`).
    let namespaces_before: Vec<serde_json::Value> = tokens
        .iter()
        .map(|t| api(&nss, "PUT", &control_url, t, "/namespace"))
        .collect();
    for (ns, h) in namespaces_before.iter().zip(&on) {
        assert_eq!(ns["hub_endpoint"], format!("{}:51820", addr(h)), "{ns}");
    }
    let pids_before: Vec<Vec<String>> = data.iter().map(|d| vm_pid_files(d)).collect();

    // Alice's traffic, all along: a request to n1 every 200 ms.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let ns = nss.name("xlap");
        let target = format!("http://{n1}/");
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let o = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &ns,
                        "curl",
                        "-s",
                        "--fail",
                        "--max-time",
                        "3",
                    ])
                    .arg(&target)
                    .output()
                    .unwrap();
                if o.status.success() && String::from_utf8_lossy(&o.stdout).contains("n1") {
                    ok += 1;
                } else {
                    failed.push(t0.elapsed());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            (ok, failed)
        })
    };

    // The control plane dies, stays down longer than a lease, and starts again.
    std::thread::sleep(Duration::from_secs(1));
    control.kill9();
    let down = Instant::now();
    let health = format!("curl -s --fail --max-time 2 {control_url}/v1/health");
    assert!(
        !nss.sh("xlap", &health).status.success(),
        "the control plane still answers"
    );
    std::thread::sleep(Duration::from_secs(LEASE + 1));
    control = spawn_control(
        &nss.name("xctl"),
        &db,
        &listen,
        LEASE,
        &control_data,
        tmp.path().join("control-2.log"),
    );
    let restarted = Instant::now();
    eprintln!("the control plane was down {:?}", down.elapsed());
    // Every agent heartbeats to the new one (a heartbeat since it started); its long poll for work gets the same work back.
    let all_live = netns::eventually(Duration::from_secs(15), || {
        let list = hosts(&at);
        HOSTS
            .iter()
            .all(|h| {
                let h = host(&list, h);
                h["state"] == "live"
                    && h["heartbeat_age_ms"].as_i64().unwrap_or(i64::MAX)
                        < restarted.elapsed().as_millis() as i64
            })
            .then_some(list)
    });
    assert!(
        all_live.is_some(),
        "not every agent came back: {}",
        hosts(&at)
    );
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.join().unwrap();
    assert!(
        failed.is_empty() && ok >= 10,
        "alice's traffic stopped while the control plane restarted: {ok} answers, failures at {failed:?}\n{}",
        tunnel.log()
    );
    assert!(!tunnel.log().contains("follows"), "{}", tunnel.log());

    // Nothing lost: hosts, namespaces, peers, clusters, and not one VM restarted.
    let hosts_after = hosts(&at);
    for h in HOSTS {
        for field in ["created_at", "hub_endpoint", "hub_public_key"] {
            assert_eq!(
                host(&hosts_after, h)[field],
                host(&hosts_before, h)[field],
                "{h} {field}: {hosts_after}"
            );
        }
        assert_eq!(host(&hosts_after, h)["state"], "live", "{hosts_after}");
    }
    let alice_after = alice.status();
    assert_eq!(
        alice_after["namespace"], alice_before["namespace"],
        "{alice_after}"
    );
    let peer_ids =
        |s: &serde_json::Value| -> Vec<(serde_json::Value, serde_json::Value, serde_json::Value)> {
            s["peers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p["id"].clone(),
                        p["public_key"].clone(),
                        p["address"].clone(),
                    )
                })
                .collect()
        };
    assert_eq!(
        peer_ids(&alice_after),
        peer_ids(&alice_before),
        "{alice_after}"
    );
    assert_eq!(
        alice_after["clusters"][0]["state"], "ready",
        "{alice_after}"
    );
    assert_eq!(alice_after["clusters"][0]["host"], "h1", "{alice_after}");
    for ((t, before), ns_before) in tokens.iter().zip(&clusters_before).zip(&namespaces_before) {
        let c = api_get(&nss, &control_url, t, "/clusters/dev");
        for field in ["state", "host", "created_at", "image"] {
            assert_eq!(c[field], before[field], "{field}: {c}");
        }
        assert_eq!(c["vms"], before["vms"], "{c}");
        let ns = api(&nss, "PUT", &control_url, t, "/namespace");
        assert_eq!(&ns, ns_before);
    }
    let pids_after: Vec<Vec<String>> = data.iter().map(|d| vm_pid_files(d)).collect();
    assert_eq!(pids_after, pids_before, "VMs were restarted");

    // The host of the first engineer's cluster dies (past the new control plane's start-up grace of a lease).
    std::thread::sleep(Duration::from_secs(LEASE + 1).saturating_sub(restarted.elapsed()));
    let victim = on[0].clone();
    let survivor = if victim == "h2" { "h3" } else { "h2" };
    let vi = HOSTS.iter().position(|h| *h == victim).unwrap();
    agents[vi].kill9();
    let killed = Instant::now();
    let deadline = killed + Duration::from_millis(LEASE * 1000 + 3000);
    let lost: Vec<usize> = (0..ENGINEERS).filter(|i| on[*i] == victim).collect();
    for &i in &lost {
        let c = loop {
            let c = api_get(&nss, &control_url, &tokens[i], "/clusters/dev");
            if c["state"] == "lost" {
                break c;
            }
            assert!(
                Instant::now() < deadline,
                "eng{i} not lost within the lease: {c}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            c["reason"]
                .as_str()
                .unwrap()
                .contains(&format!("host {victim} is lost")),
            "{c}"
        );
    }
    eprintln!(
        "{} clusters seen lost (polled one after the other) {:?} after the kill",
        lost.len(),
        killed.elapsed()
    );
    assert_eq!(host(&hosts(&at), &victim)["state"], "lost");
    for i in (0..ENGINEERS).filter(|i| on[*i] != victim) {
        let c = api_get(&nss, &control_url, &tokens[i], "/clusters/dev");
        assert_eq!(c["state"], "ready", "{c}");
    }
    assert_eq!(alice.status()["clusters"][0]["state"], "ready");

    // `fcdev up` makes them again, all at once, on the other process host (h1 lacks the image).
    let again = up_all(
        &lost
            .iter()
            .map(|&i| lab::Laptop {
                ns: nss.name("xlap"),
                cfg: laptops[i].cfg.clone(),
                nss: &nss,
                role: "xlap",
            })
            .collect::<Vec<_>>(),
    );
    for c in &again {
        assert_eq!(c["state"], "ready", "{c}");
        assert_eq!(c["host"], survivor, "{c}");
    }
    let si = HOSTS.iter().position(|h| *h == survivor).unwrap();
    assert_eq!(vm_pid_files(&data[si]).len(), 3 * ENGINEERS);
    let page = alice.curl(&format!("http://{n1}/"));
    assert!(
        page.as_deref().is_some_and(|p| p.contains("n1")),
        "{page:?}"
    );
    drop(tunnel);
    drop(agents);
    drop(control);
}
