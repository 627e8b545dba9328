//! Integration tests: the real `fcdev` binary against a real `fcdev server --dev` (test process backend) on an
//! ephemeral loopback port, with temp config and data dirs.

mod common;

use std::time::Duration;

use common::{http, json, TestServer, TINY_TOML};
use predicates::prelude::*;

fn error_code(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not a JSON error body: {body}"));
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    v["error"]["code"].as_str().unwrap().to_string()
}

#[test]
fn login_up_status_reset_down() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    server.login();

    // Credentials are private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(server.config_dir().join("credentials.toml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let config = std::fs::read_to_string(server.config_dir().join("config.toml")).unwrap();
    assert!(
        config.contains(&server.url) && !config.contains(&server.token),
        "{config}"
    );

    server
        .fcdev()
        .arg("up")
        .assert()
        .success()
        .stdout(predicate::str::contains("n1").and(predicate::str::contains("10.240.0.10")))
        .stdout(predicate::str::contains("fcdev tunnel"));

    let status = server.status_json();
    assert_eq!(status["user"], "alice");
    assert_eq!(status["namespace"]["subnet"], "10.240.0.0/24");
    let cluster = &status["clusters"][0];
    assert_eq!(cluster["name"], "dev");
    assert_eq!(cluster["state"], "ready");
    let vms = cluster["vms"].as_array().unwrap();
    let names: Vec<&str> = vms.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["n1", "f1", "m1"]);
    let addrs: Vec<&str> = vms.iter().map(|v| v["address"].as_str().unwrap()).collect();
    assert_eq!(addrs, ["10.240.0.10", "10.240.0.11", "10.240.0.12"]);
    assert_eq!(vms[0]["hostname"], "n1.alice.fcdev");
    assert!(vms.iter().all(|v| v["state"] == "ready"));

    // A second `up` is idempotent.
    server
        .fcdev()
        .arg("up")
        .assert()
        .success()
        .stdout(predicate::str::contains("already up"));
    let pids_before = common::find_files(&server.data_dir().join("vms"), "vm.pid").len();
    assert_eq!(pids_before, 3);

    // Reset without --yes and without a terminal refuses instead of hanging.
    server
        .fcdev()
        .arg("reset")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--yes"));
    server
        .fcdev()
        .args(["reset", "--yes", "--json"])
        .assert()
        .success()
        .stdout(predicate::str::contains("\"ready\""));

    server
        .fcdev()
        .args(["images", "--json"])
        .assert()
        .success()
        .stdout(predicate::str::contains("\"tiny\""));

    server.fcdev().args(["down", "--yes"]).assert().success();
    assert_eq!(
        server.status_json()["clusters"].as_array().unwrap().len(),
        0
    );
    assert!(
        common::find_files(&server.data_dir().join("vms"), "vm.pid").is_empty(),
        "VM folders left behind"
    );
    server.fcdev().args(["down", "--yes"]).assert().code(4);
}

#[test]
fn bad_and_revoked_tokens_are_refused() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    server
        .fcdev()
        .args(["login", "--server", &server.url, "--token-stdin"])
        .write_stdin("fcd_not-a-real-token")
        .assert()
        .code(3)
        .stderr(predicate::str::contains("unknown or revoked token"));
    // Nothing was saved by the failed login.
    assert!(!server.config_dir().join("credentials.toml").exists());

    server.login();
    server
        .fcdev()
        .args(["server", "user", "revoke", "alice"])
        .assert()
        .success();
    server
        .fcdev()
        .arg("status")
        .assert()
        .code(3)
        .stderr(predicate::str::contains("hint:"));

    let (status, body) = http(&server.url, "GET", "/v1/me", None, None);
    assert_eq!((status, error_code(&body).as_str()), (401, "unauthorized"));
    let (status, _) = http(&server.url, "GET", "/v1/health", None, None);
    assert_eq!(status, 200);
}

#[test]
fn bad_input_gets_clear_errors() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    server.login();
    server
        .fcdev()
        .args(["up", "--name", "Not_A_Label"])
        .assert()
        .code(8)
        .stderr(
            predicate::str::contains("not a valid cluster name")
                .and(predicate::str::contains("hint:")),
        );
    server
        .fcdev()
        .args(["up", "--image", "nosuch"])
        .assert()
        .code(4)
        .stderr(predicate::str::contains("image `nosuch` not found"));

    let t = Some(server.token.as_str());
    let (status, body) = http(&server.url, "POST", "/v1/clusters", t, Some("{not json"));
    assert_eq!((status, error_code(&body).as_str()), (400, "bad_request"));
    let (status, body) = http(
        &server.url,
        "POST",
        "/v1/clusters",
        t,
        Some(r#"{"name": 5}"#),
    );
    assert_eq!((status, error_code(&body).as_str()), (422, "bad_request"));
    let (status, body) = http(
        &server.url,
        "POST",
        "/v1/peers",
        t,
        Some(r#"{"name":"laptop","public_key":"short"}"#),
    );
    assert_eq!(
        (status, error_code(&body).as_str()),
        (400, "invalid_public_key")
    );
    let (status, body) = http(&server.url, "DELETE", "/v1/peers/abc", t, None);
    assert_eq!((status, error_code(&body).as_str()), (400, "bad_request"));
    let (status, body) = http(
        &server.url,
        "GET",
        "/v1/clusters/dev/events?after=abc",
        t,
        None,
    );
    assert!(status == 400 || status == 404, "{status} {body}");
    error_code(&body);
    let (status, body) = http(
        &server.url,
        "POST",
        "/v1/clusters",
        t,
        Some(r#"{"name":"dev","image":"tiny","ssh_keys":["ssh-rsa AAAA"]}"#),
    );
    assert_eq!(
        (status, error_code(&body).as_str()),
        (400, "invalid_ssh_key")
    );
    let (status, body) = http(&server.url, "GET", "/v2/nothing", t, None);
    assert_eq!((status, error_code(&body).as_str()), (404, "not_found"));

    // A taken name with another image is a conflict; nothing was half-created by the failures above.
    server.fcdev().arg("up").assert().success();
    std::fs::create_dir_all(server.dir.path().join("images/other")).unwrap();
    std::fs::write(
        server.dir.path().join("images/other/image.toml"),
        TINY_TOML.replace("\"tiny\"", "\"other\""),
    )
    .unwrap();
    server
        .fcdev()
        .args(["up", "--image", "other"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("already exists"));
    let clusters = server.status_json()["clusters"].as_array().unwrap().clone();
    assert_eq!(clusters.len(), 1);
}

#[test]
fn corrupt_config_names_the_file() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    server.login();
    std::fs::write(
        server.config_dir().join("credentials.toml"),
        "profiles = {{{",
    )
    .unwrap();
    server.fcdev().arg("status").assert().code(1).stderr(
        predicate::str::contains("credentials.toml").and(predicate::str::contains("fcdev login")),
    );
}

#[test]
fn not_logged_in_says_how() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    server
        .fcdev()
        .arg("status")
        .assert()
        .code(3)
        .stderr(predicate::str::contains("fcdev login"));
}

#[test]
fn unreachable_server_has_its_own_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    assert_cmd::Command::new(common::fcdev_bin())
        .env("FCDEV_CONFIG_DIR", dir.path())
        .args(["login", "--server", "http://127.0.0.1:1", "--token-stdin"])
        .write_stdin("fcd_x")
        .assert()
        .code(6)
        .stderr(predicate::str::contains("cannot reach"));
}

#[test]
fn twenty_engineers_up_at_once_never_share_addresses() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    common::twenty_engineers_up_at_once(&server, &[]);
}

#[test]
fn server_killed_during_up_recovers() {
    let slow = TINY_TOML.replace(
        "role = \"proxy\"",
        "role = \"proxy\"\ncmdline = \"test:delay-ms=2500\"",
    );
    let mut server = TestServer::start(&[("tiny", &slow)]);
    server.login();
    server.fcdev().args(["up", "--no-wait"]).assert().success();
    std::thread::sleep(Duration::from_millis(300));
    server.kill();
    server.restart();
    // The restarted server drives the cluster on; `up` follows it to ready, and no VM is duplicated.
    server.fcdev().arg("up").assert().success();
    assert_eq!(server.status_json()["clusters"][0]["state"], "ready");
    assert_eq!(
        server.vm_processes(),
        3,
        "one process per VM: {}",
        String::from_utf8_lossy(
            &std::process::Command::new("pgrep")
                .args(["-af", "--", "__test-vm"])
                .output()
                .unwrap()
                .stdout
        )
    );
}

#[test]
fn killed_vm_is_noticed_and_repaired() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    server.login();
    server.fcdev().arg("up").assert().success();
    server.kill_vms();
    std::thread::sleep(Duration::from_millis(200));
    let status = server.status_json();
    let cluster = &status["clusters"][0];
    assert_eq!(cluster["state"], "failed");
    assert!(cluster["reason"]
        .as_str()
        .unwrap()
        .contains("stopped unexpectedly"));
    assert_eq!(cluster["vms"][0]["state"], "stopped");
    server.fcdev().arg("up").assert().success();
    assert_eq!(server.status_json()["clusters"][0]["state"], "ready");
}

#[test]
fn vm_that_never_gets_ready_fails_the_cluster_with_its_log() {
    let broken = TINY_TOML.replace(
        "role = \"app\"",
        "role = \"app\"\ncmdline = \"test:never-ready\"",
    );
    let server = TestServer::start(&[("tiny", &broken)]);
    server.login();
    server
        .fcdev()
        .arg("up")
        .timeout(Duration::from_secs(60))
        .assert()
        .code(7)
        .stderr(
            predicate::str::contains("f1")
                .and(predicate::str::contains("told never to become ready")),
        );
    assert_eq!(server.status_json()["clusters"][0]["state"], "failed");
}

#[test]
fn completions_are_committed_and_fresh() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("completions");
    for (shell, file) in [
        ("bash", "fcdev.bash"),
        ("zsh", "_fcdev"),
        ("fish", "fcdev.fish"),
        ("elvish", "fcdev.elv"),
        ("powershell", "_fcdev.ps1"),
    ] {
        let out = assert_cmd::Command::new(common::fcdev_bin())
            .args(["completions", shell])
            .assert()
            .success()
            .get_output()
            .stdout
            .clone();
        let committed = std::fs::read(dir.join(file)).unwrap_or_else(|_| {
            panic!("completions/{file} is missing: run scripts/gen-completions.sh")
        });
        assert!(
            committed == out,
            "completions/{file} is stale: run scripts/gen-completions.sh and commit"
        );
    }
}

#[test]
fn concurrent_ups_of_one_cluster_join_and_reset_waits_its_turn() {
    let slow = TINY_TOML.replace(
        "role = \"proxy\"",
        "role = \"proxy\"\ncmdline = \"test:delay-ms=1500\"",
    );
    let server = TestServer::start(&[("tiny", &slow)]);
    server.login();
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let mut cmd = std::process::Command::new(common::fcdev_bin());
            cmd.env("FCDEV_CONFIG_DIR", server.config_dir())
                .args(["up", "--json"]);
            std::thread::spawn(move || cmd.output().unwrap())
        })
        .collect();
    // Once the cluster exists (it boots for 1.5 s), a reset is refused rather than mixed into the boot. (Wait
    // for it rather than a fixed time: on a loaded machine the ups may take longer to create it.)
    let t0 = std::time::Instant::now();
    while server.status_json()["clusters"]
        .as_array()
        .is_none_or(|c| c.is_empty())
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no cluster after 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
        .fcdev()
        .args(["reset", "--yes"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("busy"));
    for h in handles {
        let out = h.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(json(&out.stdout)["state"], "ready");
    }
    assert_eq!(server.vm_processes(), 3, "one process per VM");
}
