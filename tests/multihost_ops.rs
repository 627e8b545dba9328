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
use multihost::{add_host, cluster, live_vms, wait_state, Agent, Control, Reaper};
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
