//! The API under hostile or careless clients: every error is the documented JSON error, event streams end and are
//! bounded, event numbers reveal nothing of other engineers, and the server's and the laptop's files are private.
//! Real `fcdev server` (test process backend) over real HTTP on loopback.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{
    add_engineer, event_ids, json, open_stream, raw_request, read_until_closed, TestServer,
    TINY_TOML,
};

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

#[test]
fn errors_are_json_for_undecodable_paths_huge_bodies_and_any_bearer_case() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    let auth = bearer(&server.token);
    // A path segment that is not UTF-8, on every route with a path parameter.
    for (method, path) in [
        ("GET", "/v1/clusters/%ff"),
        ("DELETE", "/v1/clusters/%ff"),
        ("GET", "/v1/clusters/%ff/events"),
        ("POST", "/v1/clusters/%ff/reset"),
        ("DELETE", "/v1/peers/%ff"),
    ] {
        let r = raw_request(&server.url, method, path, &[&auth], Vec::new());
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "bad_request"),
            "{method} {path}"
        );
    }

    // 50 MB of body: 413 with the JSON error, not 400 "length limit exceeded".
    let r = raw_request(
        &server.url,
        "POST",
        "/v1/clusters",
        &[&auth, "Content-Type: application/json"],
        vec![b' '; 50 << 20],
    );
    assert_eq!((r.status, r.error_code().as_str()), (413, "too_large"));

    // The scheme of `Authorization` is case-insensitive (RFC 7235).
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let header = format!("Authorization: {scheme} {}", server.token);
        let r = raw_request(&server.url, "GET", "/v1/me", &[&header], Vec::new());
        assert_eq!(r.status, 200, "{scheme}: {}", r.body);
        assert_eq!(json(r.body.as_bytes())["user"], "alice");
    }
    let r = raw_request(
        &server.url,
        "GET",
        "/v1/me",
        &[&format!("Authorization: Basic {}", server.token)],
        Vec::new(),
    );
    assert_eq!((r.status, r.error_code().as_str()), (401, "unauthorized"));
}

#[test]
fn event_stream_of_a_finished_cluster_ends_after_what_is_there() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    server.login();
    server.fcdev().arg("up").assert().success();
    let (status, stream) = open_stream(
        &server.url,
        "/v1/clusters/dev/events?after=0",
        &server.token,
    );
    assert_eq!(status, 200);
    let all = read_until_closed(stream, Duration::from_secs(5))
        .expect("the stream of a ready cluster ends");
    let last = *event_ids(&all).last().expect("the cluster's events");
    for after in [last, last + 100] {
        let (status, stream) = open_stream(
            &server.url,
            &format!("/v1/clusters/dev/events?after={after}"),
            &server.token,
        );
        assert_eq!(status, 200);
        let rest = read_until_closed(stream, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("the stream after={after} of a ready cluster never ended"));
        assert!(event_ids(&rest).is_empty(), "{rest}");
    }
}

#[test]
fn event_streams_are_limited_per_engineer_and_freed_when_clients_leave() {
    // f1 never gets ready: the cluster stays `booting` (a stream of it stays open) for ~16 s.
    let stuck = TINY_TOML.replace(
        "role = \"app\"",
        "role = \"app\"\ncmdline = \"test:never-ready\"",
    );
    let server = TestServer::start(&[("tiny", &stuck)]);
    server.login();
    server.fcdev().args(["up", "--no-wait"]).assert().success();
    // Wait for quiet: n1 and m1 ready, f1 waiting out its deadline (8 s), so no event wakes a stream's task and
    // only a client going away can free it.
    let start = Instant::now();
    loop {
        let status = server.status_json();
        let vms = status["clusters"][0]["vms"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let ready = vms.iter().filter(|v| v["state"] == "ready").count();
        if ready == 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "n1 and m1 never got ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let path = "/v1/clusters/dev/events?after=0";
    let mut open: Vec<_> = (0..16)
        .map(|i| {
            let (status, s) = open_stream(&server.url, path, &server.token);
            assert_eq!(status, 200, "stream {i}");
            s
        })
        .collect();
    let r = raw_request(
        &server.url,
        "GET",
        path,
        &[&bearer(&server.token)],
        Vec::new(),
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (429, "too_many_streams"),
        "the 17th stream"
    );

    // Clients that go away free their streams at once, not at the next keep-alive.
    open.truncate(12);
    let closed_at = Instant::now();
    let mut reopened = 0;
    while reopened < 4 {
        let (status, s) = open_stream(&server.url, path, &server.token);
        if status == 200 {
            open.push(s);
            reopened += 1;
        } else {
            assert_eq!(status, 429);
            assert!(
                closed_at.elapsed() < Duration::from_secs(3),
                "closed streams were not freed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let (status, _s) = open_stream(&server.url, path, &server.token);
    assert_eq!(status, 429, "16 are open again");
    let state = &server.status_json()["clusters"][0]["state"];
    assert_eq!(state, "booting", "the test needs the cluster still booting");
}

#[test]
fn a_new_cluster_numbers_its_events_from_one_whatever_others_did() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    server.login();
    // Alice's activity: a cluster, a reset, a second cluster.
    server.fcdev().arg("up").assert().success();
    server.fcdev().args(["reset", "--yes"]).assert().success();
    server
        .fcdev()
        .args(["up", "--name", "other"])
        .assert()
        .success();

    let bob = bearer(&add_engineer(&server, "bob"));
    let r = raw_request(
        &server.url,
        "POST",
        "/v1/clusters",
        &[&bob, "Content-Type: application/json"],
        br#"{"name":"dev","image":"tiny"}"#.to_vec(),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let created = json(r.body.as_bytes());
    assert_eq!(created["event_seq"], 0);
    let (status, stream) = open_stream(
        &server.url,
        "/v1/clusters/dev/events?after=0",
        bob.trim_start_matches("Authorization: Bearer "),
    );
    assert_eq!(status, 200);
    let text =
        read_until_closed(stream, Duration::from_secs(30)).expect("bob's cluster gets ready");
    let ids = event_ids(&text);
    let expected: Vec<i64> = (1..=ids.len() as i64).collect();
    assert_eq!(ids, expected, "bob's events are 1, 2, 3, …: {text}");
    assert!(text.contains(r#""state":"ready""#), "{text}");

    // `after=N` still means "after the N-th event of this cluster".
    let (_, stream) = open_stream(
        &server.url,
        "/v1/clusters/dev/events?after=2",
        bob.trim_start_matches("Authorization: Bearer "),
    );
    let rest = read_until_closed(stream, Duration::from_secs(5)).expect("ends");
    assert_eq!(event_ids(&rest), expected[2..].to_vec());
}

/// Every path under `root` (itself included) with its mode.
fn modes(root: &std::path::Path) -> Vec<(std::path::PathBuf, u32)> {
    let mut out = vec![(
        root.to_path_buf(),
        std::fs::symlink_metadata(root)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
    )];
    if root.is_dir() {
        for e in std::fs::read_dir(root).unwrap().flatten() {
            out.extend(modes(&e.path()));
        }
    }
    out
}

#[test]
fn server_state_and_laptop_keys_are_private_to_their_owner() {
    let server = TestServer::start(&[("tiny", TINY_TOML)]);
    server.login();
    // A keys folder as earlier versions left it.
    let keys = server.config_dir().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o755)).unwrap();
    server.fcdev().arg("up").assert().success();

    let data = server.data_dir();
    let all = modes(&data);
    assert_eq!(all[0].1, 0o700, "the data dir");
    for name in ["state.db", "state.db-wal", "state.db-shm", "hub.key"] {
        assert!(
            all.iter().any(|(p, _)| p == &data.join(name)),
            "{name} missing"
        );
    }
    assert!(
        common::find_files(&data.join("vms"), "vm.log").len() == 3,
        "the VM folders were checked"
    );
    let open: Vec<_> = all.iter().filter(|(_, m)| m & 0o077 != 0).collect();
    assert!(open.is_empty(), "readable by others: {open:?}");

    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&keys), 0o700, "keys/");
    assert_eq!(
        mode(&keys.join("default_ssh")),
        0o600,
        "the ssh private key"
    );
    assert_eq!(mode(&server.config_dir().join("credentials.toml")), 0o600);

    // A `user add` run before the server ever started creates the state private too.
    let fresh = server.dir.path().join("fresh");
    server
        .fcdev()
        .env("FCDEV_DATA_DIR", &fresh)
        .args(["server", "user", "add", "carol"])
        .assert()
        .success();
    let open: Vec<_> = modes(&fresh)
        .into_iter()
        .filter(|(p, m)| m & 0o077 != 0 || (p == &fresh && *m != 0o700))
        .collect();
    assert!(open.is_empty(), "readable by others: {open:?}");
}
