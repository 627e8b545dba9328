//! The engineer's daily loop from the laptop, through the real `fcdev` binary against a real `fcdev server --dev`
//! (test process backend) on loopback: `logs`, `doctor`, `--json`, the local server's lifecycle.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{fcdev_bin, TestServer, TINY_TOML};
use predicates::prelude::*;

/// Reads a child's stdout lines on a thread.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for a line containing `needle`; returns every line seen.
fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains(needle);
                seen.push(line);
                if hit {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!("no line with `{needle}` within {within:?}; got {seen:?}");
}

/// An HTTP request to a test VM (it prints the request line on its console).
fn poke_test_vm(server: &TestServer, vm: &str, path: &str) {
    use std::io::{Read, Write};
    let port_file = server
        .data_dir()
        .join(format!("vms/alice/dev/{vm}/vm.port"));
    let port = std::fs::read_to_string(&port_file).expect("vm.port");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port.trim().parse::<u16>().unwrap()))
        .expect("connect to the test VM");
    // One write: the test VM answers after its first read.
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .expect("write to the test VM");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
}

#[test]
fn logs_show_the_console_follow_it_and_name_the_vms_there_are() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    server.login();
    server.fcdev().arg("up").assert().success();

    server
        .fcdev()
        .args(["logs", "n1"])
        .assert()
        .success()
        .stdout(predicate::str::contains("test VM n1 starting"))
        .stdout(predicate::str::contains("test VM f1").not());
    let one = server
        .fcdev()
        .args(["logs", "f1", "--lines", "1"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let one = String::from_utf8(one).unwrap();
    assert_eq!(one.lines().count(), 1, "{one}");
    assert!(one.contains("test VM f1"), "{one}");

    // An unknown VM: exit 4, and the VMs there are.
    server
        .fcdev()
        .args(["logs", "x9"])
        .assert()
        .code(4)
        .stderr(predicate::str::contains("n1, f1, m1"));

    // -f: what the console prints next arrives as it comes, and the stream ends with the cluster.
    let mut follow = Command::new(fcdev_bin())
        .args(["logs", "n1", "-f"])
        .env("FCDEV_CONFIG_DIR", server.config_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut follow);
    wait_for_line(&rx, "listening on", Duration::from_secs(10));
    poke_test_vm(&server, "n1", "/first");
    wait_for_line(&rx, "GET /first", Duration::from_secs(5));
    poke_test_vm(&server, "n1", "/second");
    wait_for_line(&rx, "GET /second", Duration::from_secs(5));
    server.fcdev().args(["down", "--yes"]).assert().success();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = follow.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "logs -f still runs after the cluster was deleted"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "logs -f: {status}");
}

/// The verdict of one check in `fcdev doctor --json`.
fn verdict(report: &serde_json::Value, check: &str) -> String {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["check"] == check)
        .map(|c| c["verdict"].as_str().unwrap().to_string())
        .find(|v| v != "ok")
        .unwrap_or_else(|| "ok".into())
}

#[test]
fn doctor_passes_on_a_good_setup_and_names_the_broken_piece() {
    let mut server = TestServer::start(&[("tiny", TINY_TOML)]);
    server.login();
    server.fcdev().arg("up").assert().success();
    // The tunnel key and its peer, as `fcdev tunnel` makes them.
    let conf = server.dir.path().join("wg.conf");
    server
        .fcdev()
        .args(["tunnel", "--wg-config"])
        .arg(&conf)
        .assert()
        .success();

    let good = server
        .fcdev()
        .arg("doctor")
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let good = String::from_utf8(good).unwrap();
    for line in ["server", "token", "version", "hub", "ssh"] {
        assert!(
            good.lines()
                .any(|l| l.starts_with("ok") && l.contains(&format!(" {line} "))),
            "no ok line for {line}:\n{good}"
        );
    }
    assert!(good.contains("WireGuard handshake with the hub"), "{good}");
    let report = common::json(
        &server
            .fcdev()
            .args(["doctor", "--json"])
            .assert()
            .success()
            .get_output()
            .stdout,
    );
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(verdict(&report, "hub"), "ok", "{report}");

    // A key file others can read.
    let key = server.config_dir().join("keys/default.key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = server.fcdev().args(["doctor"]).assert().code(1);
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).to_string();
    assert!(
        stdout.contains(&format!("chmod 600 {}", key.display())),
        "{stdout}"
    );
    assert!(stderr.contains("broken: keys"), "{stderr}");
    let report = common::json(
        &server
            .fcdev()
            .args(["doctor", "--json"])
            .assert()
            .code(1)
            .get_output()
            .stdout,
    );
    assert_eq!(report["ok"], false);
    assert_eq!(verdict(&report, "keys"), "fail", "{report}");
    assert_eq!(verdict(&report, "server"), "ok", "{report}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The server stopped.
    server.kill();
    let out = server.fcdev().args(["doctor"]).assert().code(1);
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).to_string();
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("server")),
        "{stdout}"
    );
    assert!(stdout.contains("fix:"), "{stdout}");
    assert!(stderr.contains("broken: server"), "{stderr}");
}

#[test]
fn local_server_stops_its_vms_run_on_and_status_says_whether_it_runs() {
    let mut server = TestServer::start(&[("tiny", TINY_TOML)]);
    server.login();
    server.fcdev().arg("up").assert().success();
    assert_eq!(server.vm_processes(), 3);
    server
        .fcdev()
        .arg("status")
        .assert()
        .success()
        .stdout(predicate::str::contains("Local:     running (pid"));
    let status = server.status_json();
    assert_eq!(status["local_server"]["running"], true, "{status}");
    assert!(status["local_server"]["pid"].is_i64(), "{status}");

    server
        .fcdev()
        .args(["server", "stop", "--local"])
        .assert()
        .success()
        .stdout(predicate::str::contains("VMs keep running"));
    assert!(
        !server.data_dir().join("server.pid").exists(),
        "the pid file outlived the server"
    );
    server
        .fcdev()
        .arg("status")
        .assert()
        .code(6)
        .stdout(predicate::str::contains("Local server: none runs on"));
    assert_eq!(
        server.vm_processes(),
        3,
        "the VMs run on without the server"
    );
    // Stopping what is stopped is fine.
    server
        .fcdev()
        .args(["server", "stop", "--local"])
        .assert()
        .success()
        .stdout(predicate::str::contains("No local fcdev server runs"));

    // The next start re-adopts them: ready, none duplicated.
    server.restart();
    let status = server.status_json();
    assert_eq!(status["clusters"][0]["state"], "ready", "{status}");
    assert_eq!(server.vm_processes(), 3, "re-adopted, not started again");
}

#[test]
fn every_response_names_the_server_version_and_listings_speak_json() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    server.login();
    let version = env!("CARGO_PKG_VERSION");
    for (path, headers, status) in [
        ("/v1/health", vec![], 200),
        ("/v1/me", vec![], 401),
        ("/nowhere", vec![], 404),
    ] {
        let r = common::raw_request(&server.url, "GET", path, &headers, Vec::new());
        assert_eq!(r.status, status, "{path}: {}", r.head);
        assert_eq!(
            r.header("fcdev-version"),
            Some(version),
            "{path}: {}",
            r.head
        );
    }
    // Same version: not a word about it.
    server
        .fcdev()
        .arg("status")
        .assert()
        .success()
        .stderr(predicate::str::contains("warning").not());

    let users = common::json(
        &server
            .fcdev()
            .args(["server", "user", "list", "--json"])
            .assert()
            .success()
            .get_output()
            .stdout,
    );
    assert_eq!(users, serde_json::json!([{ "name": "alice" }]));
    let images = common::json(
        &server
            .fcdev()
            .args(["images", "--json"])
            .assert()
            .success()
            .get_output()
            .stdout,
    );
    assert_eq!(images[0]["name"], "tiny", "{images}");
}

#[test]
fn followed_logs_count_against_the_engineers_stream_limit() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    server.login();
    server.fcdev().arg("up").assert().success();
    let path = "/v1/clusters/dev/vms/n1/console?follow=true";
    let mut open = Vec::new();
    for i in 0..16 {
        let (status, s) = common::open_stream(&server.url, path, &server.token);
        assert_eq!(status, 200, "stream {}", i + 1);
        open.push(s);
    }
    let r = common::raw_request(
        &server.url,
        "GET",
        path,
        &[&format!("Authorization: Bearer {}", server.token)],
        Vec::new(),
    );
    assert_eq!(r.status, 429, "{}", r.head);
    assert_eq!(r.error_code(), "too_many_streams");
    // A plain tail is not a stream.
    server.fcdev().args(["logs", "n1"]).assert().success();
    // A client that goes away frees its stream.
    drop(open.pop());
    let freed = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        let (status, s) = common::open_stream(&server.url, path, &server.token);
        let ok = status == 200;
        if ok {
            open.push(s);
        }
        ok
    });
    assert!(freed, "a closed follow never freed its stream");
}
