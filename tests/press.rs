//! The real Press cluster end to end: the `press` image (Debian bookworm packages; n1 nginx → f1 gunicorn app
//! with Redis → m1 MariaDB, p1 Prometheus, e1 rsyslog, r1 docker-registry) built with the real CLI, its
//! onboarding snapshot of the whole cluster, then `fcdev up --image press` from two engineers' laptops (their
//! own network namespaces) and everything through a real rootless tunnel.
//!
//! The built image is cached outside the clone (`FCDEV_PRESS_CACHE`, default /var/cache/fcdev/test-images/press)
//! and rebuilt only when its recipe changes (a hash); the snapshot is retaken when the template changes.
//!
//! Needs root, /dev/net/tun, qemu-system-x86, qemu-utils, debootstrap, e2fsprogs, linux-image-cloud-amd64,
//! openssh-client and the MariaDB client (mariadb-client-core), and a Debian mirror: a missing piece fails the
//! test, it never skips. Every packet stays inside namespaces this test creates.

mod lab;
mod netns;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fcdev::server::backend::qemu::{snapshot, Accel};
use fcdev::server::images::Image;
use lab::*;
use netns::*;

fn require_press_tools() {
    require_vm_tools();
    for (tool, package) in [
        ("debootstrap", "debootstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("mariadb", "mariadb-client-core"),
        ("curl", "curl"),
    ] {
        let ok = run(&format!("command -v {tool}")).status.success();
        assert!(
            ok,
            "the press test needs `{tool}` (Debian package {package})"
        );
    }
}

fn accel() -> Accel {
    std::env::var("FCDEV_ACCEL")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(Accel::Auto)
        .resolve()
}

/// The press image with its cluster snapshot: built (or found current) with the real CLI.
fn press_image() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("FCDEV_PRESS_CACHE")
            .unwrap_or_else(|_| "/var/cache/fcdev/test-images/press".into()),
    );
    let image_cmd = |args: &[&str]| {
        let t0 = Instant::now();
        let out = Command::new(FCDEV)
            .arg("image")
            .args(args)
            .arg("--out")
            .arg(&dir)
            .env("FCDEV_ACCEL", accel().to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fcdev image {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "fcdev image {args:?} ({:.0} s): {}",
            t0.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&out.stdout)
        );
    };
    image_cmd(&["build", "press"]);
    let image = Image::load(&dir).expect("press image.toml");
    let snapshotted = image
        .spec
        .vms
        .iter()
        .all(|t| snapshot::find(&image, t, accel()).is_some());
    if !snapshotted {
        image_cmd(&["snapshot", "press"]);
    }
    dir
}

fn vm_addresses(cluster: &serde_json::Value) -> Vec<(String, String)> {
    cluster["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or("").to_string(),
                v["address"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

impl Laptop<'_> {
    /// A command in a VM through `fcdev ssh` (rootless tunnel running), retried until it succeeds.
    fn ssh_eventually(&self, vm: &str, cmd: &str, within: Duration) -> String {
        let mut last = String::new();
        eventually(within, || {
            let out = self
                .fcdev(&["ssh", vm, "--", cmd])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .unwrap_or_else(|| panic!("fcdev ssh {vm} -- {cmd}: {last}"))
    }

    /// A SQL query on m1 through the tunnel's forward, retried until the database answers (after up or reset).
    fn sql_eventually(&self, statement: &str) -> Option<String> {
        eventually(Duration::from_secs(20), || {
            let o = self.nss.sh(
                self.role,
                &format!(
                    "mariadb --connect-timeout=3 -h 127.0.0.1 -P 13306 -u press -ppress press -N -B -e \"{statement}\""
                ),
            );
            o.status
                .success()
                .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
        })
    }

    /// A SQL statement on m1 through the tunnel's `-L 13306:m1:3306` forward, with the real MariaDB client.
    fn sql(&self, statement: &str) -> String {
        let o = self.nss.sh(
            self.role,
            &format!(
                "mariadb --connect-timeout=5 -h 127.0.0.1 -P 13306 -u press -ppress press -N -B -e \"{statement}\""
            ),
        );
        assert!(
            o.status.success(),
            "mariadb through the tunnel: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }
}

#[test]
fn press_cluster_restores_and_works_through_the_tunnel() {
    require_root_and_tun();
    require_press_tools();
    let image = press_image();
    let (tmp, data_dir, images) = workdir_with_image("press", &image);

    let nss = Namespaces::new(&["phost", "palice", "pbob"]);
    let host = nss.name("phost");
    lan(&nss, "phost", "192.168.82", &["palice", "pbob"]);
    let (server, token) = spawn_server_at(&host, &data_dir, &images, "192.168.82.1");
    let token = token.expect("the server printed a login token");
    let url = "http://192.168.82.1:7070";
    let alice = Laptop {
        ns: nss.name("palice"),
        cfg: tmp.path().join("alice"),
        nss: &nss,
        role: "palice",
    };
    alice.login(url, &token);

    // Up from the onboarding snapshot: every VM restored, every real probe passed.
    let t0 = Instant::now();
    let cluster: serde_json::Value =
        serde_json::from_str(&alice.ok(&["up", "--image", "press", "--json"])).expect("up --json");
    eprintln!("press up: {:.2} s", t0.elapsed().as_secs_f64());
    assert_eq!(cluster["state"], "ready", "{cluster}");
    assert_eq!(cluster["start_mode"], "restore", "{cluster}");
    let vms = vm_addresses(&cluster);
    assert_eq!(
        vms.iter().map(|v| v.0.as_str()).collect::<Vec<_>>(),
        ["n1", "f1", "m1", "p1", "e1", "r1"]
    );
    assert_eq!(qemu_count(&data_dir), 6, "one qemu per VM");

    let tunnel = alice.tunnel(&[
        "--mode",
        "proxy",
        "--socks",
        "127.0.0.1:1080",
        "-L",
        "13306:m1:3306",
    ]);
    // n1 (nginx) → f1 (gunicorn, Redis) → m1 (MariaDB): the seeded sites, by the cluster's new addresses.
    let page = alice
        .curl("--socks5-hostname 127.0.0.1:1080 http://n1.alice.fcdev/")
        .expect("n1 through the tunnel");
    for site in ["alpha.fcdev.local", "beta.fcdev.local", "gamma.fcdev.local"] {
        assert!(page.contains(site), "{site} missing from n1's page: {page}");
    }
    let site_page = alice
        .curl("--socks5-hostname 127.0.0.1:1080 -H 'Host: beta.alice.fcdev' http://n1.alice.fcdev/")
        .expect("a site by host name through n1");
    assert!(
        site_page.contains("site beta.fcdev.local") && !site_page.contains("alpha"),
        "{site_page}"
    );
    // The MariaDB client through the -L forward.
    let sites = alice.sql_eventually("SELECT COUNT(*) FROM site");
    assert_eq!(sites.as_deref(), Some("3"), "seeded sites on m1");
    alice.sql("INSERT INTO site (name, bench, status) VALUES ('delta.fcdev.local', 1, 'Active')");
    assert_eq!(alice.sql("SELECT COUNT(*) FROM site"), "4");

    // Prometheus on p1 scrapes every VM's node exporter by name: all six targets up within 30 s.
    let t_prom = Instant::now();
    let targets = eventually(Duration::from_secs(45), || {
        let body = alice.curl(
            "--socks5-hostname 127.0.0.1:1080 http://p1.alice.fcdev:9090/api/v1/targets?state=active",
        )?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let node_up: Vec<String> = v["data"]["activeTargets"]
            .as_array()?
            .iter()
            .filter(|t| t["labels"]["job"] == "node" && t["health"] == "up")
            .map(|t| t["labels"]["instance"].as_str().unwrap_or("").to_string())
            .collect();
        (node_up.len() == 6).then_some(node_up)
    });
    assert!(targets.is_some(), "every node exporter up in Prometheus");
    eprintln!(
        "prometheus: 6 targets up {:.1} s after up returned",
        t_prom.elapsed().as_secs_f64() + t0.elapsed().as_secs_f64()
            - t_prom.elapsed().as_secs_f64()
    );

    // e1 receives f1's syslog.
    let marker = format!("fcdev-press-{}", std::process::id());
    alice.ssh_eventually(
        "f1",
        &format!("logger -t fcdevtest {marker}"),
        Duration::from_secs(20),
    );
    let logged = alice.ssh_eventually(
        "e1",
        &format!("for i in $(seq 1 40); do grep -rh {marker} /var/log/remote/ && exit 0; sleep 0.5; done; exit 1"),
        Duration::from_secs(40),
    );
    assert!(logged.contains(&marker), "{logged}");

    // r1's registry answers the v2 API.
    let v2 = alice
        .curl("--socks5-hostname 127.0.0.1:1080 -o /dev/null -w %{http_code} http://r1.alice.fcdev:5000/v2/")
        .expect("r1 registry");
    assert_eq!(v2.trim(), "200");

    let alice_hostkey = alice.ssh_eventually(
        "n1",
        "cat /run/fcdev/ssh_host_ed25519_key.pub",
        Duration::from_secs(10),
    );
    // The key sshd serves is the one the server made for this VM (it keeps the public half, for laptops).
    let served = std::fs::read_dir(data_dir.join("vms/alice"))
        .expect("alice's VM dirs")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("n1/host_key.pub")).ok())
        .next()
        .expect("the server keeps n1's host public key");
    let key_of = |line: &str| {
        line.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        key_of(&alice_hostkey),
        key_of(&served),
        "n1 serves the server's key"
    );
    let alice_random = alice.ssh_eventually(
        "n1",
        "head -c 32 /dev/urandom | od -An -tx1",
        Duration::from_secs(10),
    );

    // Reset: back to the onboarding snapshot; the inserted row is gone, the seeded rows are there.
    let t_reset = Instant::now();
    let reset = alice.ok(&["reset", "--yes", "--json"]);
    eprintln!("press reset: {:.2} s", t_reset.elapsed().as_secs_f64());
    assert!(reset.contains("\"ready\""), "{reset}");
    let after = alice.sql_eventually("SELECT COUNT(*) FROM site");
    assert_eq!(after.as_deref(), Some("3"), "reset drops the inserted row");

    // A named snapshot of the whole press cluster: save, change the database, restore: the change is gone and
    // every service still works together.
    let t_save = Instant::now();
    alice.ok(&["snapshot", "save", "clean"]);
    eprintln!(
        "press snapshot save: {:.2} s",
        t_save.elapsed().as_secs_f64()
    );
    alice.sql("INSERT INTO site (name, bench, status) VALUES ('epsilon.fcdev.local', 1, 'Active')");
    let t_restore = Instant::now();
    alice.ok(&["snapshot", "restore", "clean", "--yes"]);
    eprintln!(
        "press snapshot restore: {:.2} s",
        t_restore.elapsed().as_secs_f64()
    );
    let restored = alice.sql_eventually("SELECT COUNT(*) FROM site");
    assert_eq!(
        restored.as_deref(),
        Some("3"),
        "the snapshot's rows are back"
    );
    // And a command in a VM with no tunnel: n1's health page through f1 to m1.
    let health = alice.ok(&[
        "exec",
        "n1",
        "--",
        "curl -fsS -m 10 http://127.0.0.1/health",
    ]);
    assert!(health.starts_with("ok sites=3"), "{health}");
    drop(tunnel);

    // A second engineer's press cluster: restored from the same snapshot, yet its own host keys and RNG.
    let bob_token = add_user(&host, &data_dir, "bob");
    let bob = Laptop {
        ns: nss.name("pbob"),
        cfg: tmp.path().join("bob"),
        nss: &nss,
        role: "pbob",
    };
    bob.login(url, &bob_token);
    let bob_cluster: serde_json::Value =
        serde_json::from_str(&bob.ok(&["up", "--image", "press", "--json"])).expect("bob up");
    assert_eq!(bob_cluster["state"], "ready", "{bob_cluster}");
    let bob_tunnel = bob.tunnel(&["--mode", "proxy", "--socks", "127.0.0.1:1080"]);
    let bob_page = bob
        .curl("--socks5-hostname 127.0.0.1:1080 http://n1.bob.fcdev/")
        .expect("bob's n1");
    assert!(bob_page.contains("alpha.fcdev.local"), "{bob_page}");
    let bob_hostkey = bob.ssh_eventually(
        "n1",
        "cat /run/fcdev/ssh_host_ed25519_key.pub",
        Duration::from_secs(20),
    );
    let bob_random = bob.ssh_eventually(
        "n1",
        "head -c 32 /dev/urandom | od -An -tx1",
        Duration::from_secs(10),
    );
    assert_ne!(
        alice_hostkey.trim(),
        bob_hostkey.trim(),
        "clones share an ssh host key"
    );
    assert_ne!(
        alice_random.trim(),
        bob_random.trim(),
        "clones share RNG output"
    );
    drop(bob_tunnel);

    // Down leaves no qemu, tap or overlay.
    alice.ok(&["down", "--yes"]);
    bob.ok(&["down", "--yes"]);
    assert_eq!(qemu_count(&data_dir), 0, "qemu left after down");
    let taps = nss.sh("phost", "ip -o link show | grep -c fct || true");
    assert_eq!(
        String::from_utf8_lossy(&taps.stdout).trim(),
        "0",
        "taps left after down"
    );
    let overlays = Command::new("find")
        .arg(data_dir.join("vms"))
        .args(["-name", "disk.qcow2"])
        .output()
        .unwrap();
    assert!(
        overlays.stdout.is_empty(),
        "overlays left: {}",
        String::from_utf8_lossy(&overlays.stdout)
    );
    drop(server);
}
