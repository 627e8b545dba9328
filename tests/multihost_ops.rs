//! `fcdev reset`, `fcdev stop`, `fcdev start` and `fcdev up` of a stopped cluster through a control plane: the
//! control plane records the wanted state (a generation per request), the cluster's agent does the work with its
//! own orchestrator and reports the generation it applied. Real binaries on loopback: PostgreSQL, a control
//! plane, agents with the process backend, the laptop's CLI.

mod common;
#[path = "common/multihost.rs"]
mod multihost;
#[path = "common/pg.rs"]
mod pg;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::json;
use multihost::{add_host, add_user, cluster, live_vms, wait_state, Agent, Control, Reaper};
use predicates::prelude::*;

/// A control plane with one agent `h1` (its data dir in `data`, a fresh one when None) and alice logged in
/// on the laptop, her cluster `dev` up on h1 through `fcdev up`.
fn one_host_with_a_cluster(lease: u64, data: Option<&Path>) -> (Control, Agent, String) {
    let control = Control::start(lease);
    let token = add_host(&control.at(), "h1");
    let mut agent = Agent::start(&control.server.url, "h1", &token, data);
    agent.wait_registered();
    control.server.login();
    control.server.fcdev().arg("up").assert().success();
    let c = cluster(&control.server.url, &control.server.token);
    assert_eq!(c["state"], "ready", "{c}");
    assert_eq!(c["host"], "h1", "{c}");
    assert_eq!(live_vms(&agent.data).len(), 3);
    (control, agent, token)
}

/// The cluster's stored events as the laptop can read them (the stream ends: the cluster is not transient).
fn events(control: &Control) -> String {
    let (code, body) = common::http(
        &control.server.url,
        "GET",
        "/v1/clusters/dev/events?after=0",
        Some(&control.server.token),
        None,
    );
    assert_eq!(code, 200, "{body}");
    body
}

/// Files named `name` under the agent's VM run dirs.
fn files_named(data: &Path, name: &str) -> Vec<PathBuf> {
    common::find_files(&data.join("vms"), name)
}

#[test]
fn reset_through_a_control_plane_resets_the_vms_on_the_agent() {
    let (control, agent, _) = one_host_with_a_cluster(15, None);
    let before = live_vms(&agent.data);
    // Something written "inside" each VM since it started: a reset throws it away.
    for (run_dir, _) in &before {
        std::fs::create_dir_all(run_dir.join("disk")).unwrap();
        std::fs::write(run_dir.join("disk").join("written"), "x").unwrap();
    }
    let out = control
        .server
        .fcdev()
        .args(["reset", "--yes", "--json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let c = json(&out);
    assert_eq!(c["state"], "ready", "{c}");
    assert_eq!(c["host"], "h1", "{c}");
    assert_eq!(c["vms"].as_array().unwrap().len(), 3, "{c}");
    // The agent really did it: new VM processes in the same run dirs, their disks discarded.
    let after = live_vms(&agent.data);
    assert_eq!(after.len(), 3, "{after:?}");
    for ((dir_before, pid_before), (dir_after, pid_after)) in before.iter().zip(&after) {
        assert_eq!(dir_before, dir_after);
        assert_ne!(
            pid_before,
            pid_after,
            "VM {} was not restarted",
            dir_after.display()
        );
        assert!(!dir_after.join("disk").join("written").exists());
    }
    let log = events(&control);
    assert!(log.contains("reset requested on host h1"), "{log}");
    assert!(
        log.contains("discarding disk"),
        "the agent's own events: {log}"
    );
}

#[test]
fn stop_and_start_through_a_control_plane_stop_and_resume_the_vms_on_the_agent() {
    let (control, agent, _) = one_host_with_a_cluster(15, None);
    control
        .server
        .fcdev()
        .arg("stop")
        .assert()
        .success()
        .stdout(predicate::str::contains("Cluster `dev` is stopped"));
    let status = control.server.status_json();
    assert_eq!(status["clusters"][0]["state"], "stopped", "{status}");
    assert!(
        status["clusters"][0]["disk_bytes"].as_u64().unwrap() > 0,
        "the agent's measure: {status}"
    );
    // On the agent: no VM process left, each VM's state saved.
    assert_eq!(live_vms(&agent.data), vec![]);
    assert_eq!(files_named(&agent.data, "suspended").len(), 3);
    // Stopping what is stopped is fine.
    control.server.fcdev().arg("stop").assert().success();

    // `fcdev up` of the stopped cluster resumes it on the agent.
    control.server.fcdev().arg("up").assert().success();
    let c = cluster(&control.server.url, &control.server.token);
    assert_eq!(c["state"], "ready", "{c}");
    assert_eq!(c["start_mode"], "resume", "{c}");
    assert_eq!(live_vms(&agent.data).len(), 3);
    assert_eq!(files_named(&agent.data, "suspended").len(), 0);

    // And so does `fcdev start`.
    control.server.fcdev().arg("stop").assert().success();
    assert_eq!(live_vms(&agent.data), vec![]);
    control
        .server
        .fcdev()
        .arg("start")
        .assert()
        .success()
        .stdout(predicate::str::contains("n1"));
    let c = cluster(&control.server.url, &control.server.token);
    assert_eq!(c["state"], "ready", "{c}");
    assert_eq!(live_vms(&agent.data).len(), 3);
    let log = events(&control);
    assert!(log.contains("stop requested on host h1"), "{log}");
}

#[test]
fn an_agent_restart_does_not_apply_an_old_reset_again() {
    let dir = tempfile::tempdir().unwrap();
    let _reaper = Reaper(vec![dir.path().to_path_buf()]);
    let (control, mut agent, token) = one_host_with_a_cluster(15, Some(dir.path()));
    control
        .server
        .fcdev()
        .args(["reset", "--yes"])
        .assert()
        .success();
    let reset = live_vms(dir.path());
    assert_eq!(reset.len(), 3);

    // The agent restarts on its data dir (its VMs run on, as qemu would): it gets the same work, with the
    // reset's generation, and must not reset again.
    agent.kill9();
    let mut again = Agent::start(&control.server.url, "h1", &token, Some(dir.path()));
    again.wait_registered();
    // Several polls and reports later.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(live_vms(dir.path()), reset, "the VMs were reset again");
    let c = cluster(&control.server.url, &control.server.token);
    assert_eq!(c["state"], "ready", "{c}");
    assert_eq!(
        events(&control).matches("discarding disk").count(),
        3,
        "one reset of 3 VMs"
    );

    // A new reset still is one.
    control
        .server
        .fcdev()
        .args(["reset", "--yes"])
        .assert()
        .success();
    let second = live_vms(dir.path());
    assert_eq!(second.len(), 3);
    for ((_, a), (_, b)) in reset.iter().zip(&second) {
        assert_ne!(a, b);
    }
}

#[test]
fn reset_or_stop_of_a_lost_hosts_cluster_says_up_recreates_it() {
    const LEASE: u64 = 2;
    let (control, mut agent, _) = one_host_with_a_cluster(LEASE, None);
    // Past the control plane's start-up grace (one lease), then the host dies.
    std::thread::sleep(Duration::from_secs(LEASE + 1));
    agent.kill9();
    wait_state(
        &control.server.url,
        &control.server.token,
        "lost",
        Duration::from_secs(LEASE + 3),
    );
    for args in [&["reset", "--yes"][..], &["stop"][..]] {
        let started = Instant::now();
        control
            .server
            .fcdev()
            .args(args)
            .assert()
            .failure()
            .stderr(predicate::str::contains("on host h1, which is lost"))
            .stderr(predicate::str::contains(
                "`fcdev up` re-creates the cluster on another host",
            ));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{args:?} answered at once"
        );
    }
    let (code, body) = common::http(
        &control.server.url,
        "POST",
        "/v1/clusters/dev/reset",
        Some(&control.server.token),
        Some("{}"),
    );
    assert_eq!(code, 409, "{body}");
    assert_eq!(
        json(body.as_bytes())["error"]["code"],
        "host_lost",
        "{body}"
    );
    // Nothing was recorded for the lost host to act on.
    assert_eq!(
        cluster(&control.server.url, &control.server.token)["state"],
        "lost"
    );
}

/// `fcdev ARGS` on alice's laptop as a plain process (to read its output while it runs).
fn spawn_fcdev(control: &Control, args: &[&str]) -> std::process::Child {
    std::process::Command::new(common::fcdev_bin())
        .args(args)
        .env("FCDEV_CONFIG_DIR", control.server.config_dir())
        .env("FCDEV_DATA_DIR", control.server.data_dir())
        .env_remove("FCDEV_PROFILE")
        .env_remove("FCDEV_SERVER")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("fcdev")
}

/// Whether a process runs (and is not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .and_then(|(_, r)| r.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

#[test]
fn exec_through_a_control_plane_runs_on_the_agent_streams_and_passes_the_exit_code() {
    use std::io::Read;
    let (control, agent, _) = one_host_with_a_cluster(15, None);
    // A line, a pause, more lines: the first arrives before the command ends. `pwd`: the process backend runs
    // it in the VM's run dir on the agent's host.
    let t0 = Instant::now();
    let mut child = spawn_fcdev(
        &control,
        &[
            "exec",
            "n1",
            "--",
            "echo tick1; sleep 1.5; echo tick2 >&2; pwd; exit 7",
        ],
    );
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 6];
    stdout.read_exact(&mut first).expect("the first line");
    let first_at = t0.elapsed();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    let all_at = t0.elapsed();
    assert_eq!(&first, b"tick1\n");
    assert_eq!(status.code(), Some(7), "the command's exit code: {rest}");
    let mut lines = rest.lines();
    assert_eq!(lines.next(), Some("tick2"), "{rest}");
    let pwd = PathBuf::from(lines.next().expect("pwd"));
    assert!(
        pwd.starts_with(agent.data.join("vms")) && pwd.ends_with("n1"),
        "ran in n1's run dir on the agent: {pwd:?}"
    );
    assert!(
        all_at - first_at >= Duration::from_millis(1000),
        "output streamed: first line at {first_at:?}, end at {all_at:?}"
    );

    // Success is exit 0; words are quoted for the shell as on one host.
    let out = control
        .server
        .fcdev()
        .args(["exec", "f1", "--", "printf", "%s|", "it's", "two words"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    assert_eq!(String::from_utf8_lossy(&out), "it's|two words|");

    // An unknown VM: 404 naming the VMs there are, exit 4.
    control
        .server
        .fcdev()
        .args(["exec", "zz9", "--", "true"])
        .assert()
        .code(4)
        .stderr(predicate::str::contains("n1, f1, m1"));
    let (code, body) = common::http(
        &control.server.url,
        "POST",
        "/v1/clusters/dev/vms/zz9/exec",
        Some(&control.server.token),
        Some(r#"{"command": "true"}"#),
    );
    assert_eq!(code, 404, "{body}");
}

#[test]
fn a_laptop_that_hangs_up_stops_its_command_on_the_agent() {
    use std::io::{BufRead, BufReader};
    let (control, _agent, _) = one_host_with_a_cluster(15, None);
    let mut child = spawn_fcdev(
        &control,
        &[
            "exec",
            "n1",
            "--",
            "echo $$; while :; do echo x; sleep 0.2; done",
        ],
    );
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let pid: i32 = line.trim().parse().expect("the shell's pid");
    assert!(alive(pid));
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "the command on the agent still runs after its laptop hung up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn exec_on_a_lost_hosts_cluster_says_up_recreates_it() {
    const LEASE: u64 = 2;
    let (control, mut agent, _) = one_host_with_a_cluster(LEASE, None);
    std::thread::sleep(Duration::from_secs(LEASE + 1));
    agent.kill9();
    wait_state(
        &control.server.url,
        &control.server.token,
        "lost",
        Duration::from_secs(LEASE + 3),
    );
    let started = Instant::now();
    control
        .server
        .fcdev()
        .args(["exec", "n1", "--", "true"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("on host h1, which is lost"))
        .stderr(predicate::str::contains(
            "`fcdev up` re-creates the cluster on another host",
        ));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered at once"
    );
    let (code, body) = common::http(
        &control.server.url,
        "POST",
        "/v1/clusters/dev/vms/n1/exec",
        Some(&control.server.token),
        Some(r#"{"command": "true"}"#),
    );
    assert_eq!(code, 409, "{body}");
    assert_eq!(
        json(body.as_bytes())["error"]["code"],
        "host_lost",
        "{body}"
    );
}

#[test]
fn a_rush_of_ups_within_one_heartbeat_interval_spreads_over_the_hosts() {
    // Lease 60 s: heartbeats every 20 s, so the hosts' stored figures stay the same during the rush.
    let control = Control::start(60);
    let mut agents = Vec::new();
    for h in ["h1", "h2"] {
        let token = add_host(&control.at(), h);
        let mut agent = Agent::start(&control.server.url, h, &token, None);
        agent.wait_registered();
        agents.push(agent);
    }
    let tokens: Vec<String> = (0..4)
        .map(|i| add_user(&control.at(), &format!("e{i}")))
        .collect();
    let rush: Vec<_> = tokens
        .iter()
        .map(|token| {
            let url = control.server.url.clone();
            let token = token.clone();
            std::thread::spawn(move || {
                let (code, body) = common::http(
                    &url,
                    "POST",
                    "/v1/clusters",
                    Some(&token),
                    Some(r#"{"name": "dev", "image": "tiny"}"#),
                );
                assert!(code == 202 || code == 200, "{code} {body}");
            })
        })
        .collect();
    for t in rush {
        t.join().expect("an up of the rush");
    }
    let placed: Vec<String> = tokens
        .iter()
        .map(|t| {
            cluster(&control.server.url, t)["host"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    for h in ["h1", "h2"] {
        assert!(
            placed.iter().any(|p| p == h),
            "four namespaces placed within one heartbeat interval all went to one host: {placed:?}"
        );
    }
    drop(agents);
}
