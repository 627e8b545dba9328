//! The whole system end to end, with real parts only: `fcdev server` (qemu backend, real VMs from the tiny
//! image's onboarding snapshot, the hub with its TUN) in a `host` network namespace; two engineers' laptops in
//! their own namespaces on a LAN bridge; `fcdev login/up/tunnel/ssh/reset/down` from the laptops.
//!
//! Needs root, /dev/net/tun, qemu-system-x86, linux-image-cloud-amd64, busybox-static, dropbear-bin and
//! openssh-client: a missing piece fails the test with a message, it never skips. Every packet stays inside
//! namespaces this test creates (deleted at the end).

mod lab;
mod netns;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use lab::*;
use netns::*;

#[test]
fn laptop_to_real_vms_through_the_tunnel() {
    require_root_and_tun();
    require_vm_tools();
    let image = tiny_image();
    let (tmp, data_dir, images) = workdir_with_image("tiny", &image);

    let nss = Namespaces::new(&["ehost", "ealice", "ebob"]);
    let host = nss.name("ehost");
    // A LAN: a bridge in the host namespace, one veth per laptop.
    lan(&nss, "ehost", "192.168.81", &["ealice", "ebob"]);

    let (mut server, token) = spawn_server(&host, &data_dir, &images);
    let token = token.expect("the server printed a login token");
    let url = "http://192.168.81.1:7070";

    let alice = Laptop {
        ns: nss.name("ealice"),
        cfg: tmp.path().join("alice"),
        nss: &nss,
        role: "ealice",
    };
    alice.login(url, &token);
    let up = alice.ok(&["up", "--json"]);
    let cluster: serde_json::Value = serde_json::from_str(&up).expect("up --json");
    assert_eq!(cluster["state"], "ready", "{cluster}");
    assert_eq!(
        cluster["start_mode"], "restore",
        "up restores the onboarding snapshot: {cluster}"
    );
    let vms: Vec<(String, String)> = cluster["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["address"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        vms.iter().map(|v| v.0.as_str()).collect::<Vec<_>>(),
        ["n1", "f1", "m1"]
    );
    assert_eq!(qemu_count(&data_dir), 3, "one qemu per VM");

    // A second cluster of the same engineer: its own addresses and taps (a tap named by template slot
    // collided with the first cluster's, the restore failed and the VMs booted).
    let second: serde_json::Value =
        serde_json::from_str(&alice.ok(&["up", "--name", "second", "--json"])).expect("up --json");
    assert_eq!(second["state"], "ready", "{second}");
    assert_eq!(second["start_mode"], "restore", "{second}");
    assert_eq!(qemu_count(&data_dir), 6, "two clusters, one qemu per VM");
    alice.ok(&["down", "--name", "second", "--yes"]);
    assert_eq!(qemu_count(&data_dir), 3, "down of the second cluster only");

    // TUN mode: every VM's page, by address, from the laptop.
    let tun = alice.tunnel(&["--mode", "tun"]);
    for (name, addr) in &vms {
        let page = alice
            .curl(&format!("http://{addr}/"))
            .unwrap_or_else(|| panic!("{name} through the TUN tunnel"));
        assert!(
            page.contains(&format!("vm {name} namespace alice")),
            "{name}: {page}"
        );
    }
    // A VM calls back to the laptop at its peer address (a local Press receiving agent callbacks).
    let peer_addr = alice.status()["peers"][0]["address"]
        .as_str()
        .unwrap()
        .to_string();
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from the laptop").unwrap();
    let laptop_www = Proc(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &alice.ns,
                "busybox",
                "httpd",
                "-f",
                "-p",
                &format!("{peer_addr}:8000"),
                "-h",
            ])
            .arg(&www)
            .spawn()
            .unwrap(),
    );
    let callback = eventually(Duration::from_secs(20), || {
        let out = alice
            .fcdev(&[
                "ssh",
                "n1",
                "--",
                &format!("wget -qO- http://{peer_addr}:8000/"),
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("hello from the laptop").then_some(text)
    });
    assert!(
        callback.is_some(),
        "a VM reaches the laptop through the tunnel (fcdev ssh n1 -- wget)"
    );

    // Another engineer: bob's peer can never reach alice's namespace, even with a route pointed at it.
    let bob_token = {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &host,
                FCDEV,
                "server",
                "user",
                "add",
                "bob",
                "--data-dir",
            ])
            .arg(&data_dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "user add bob");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let bob = Laptop {
        ns: nss.name("ebob"),
        cfg: tmp.path().join("bob"),
        nss: &nss,
        role: "ebob",
    };
    bob.login(url, &bob_token);
    let bob_tun = bob.tunnel(&["--mode", "tun"]);
    let bob_ns = eventually(Duration::from_secs(10), || {
        let s = bob.status();
        s["peers"][0]["address"].is_string().then_some(s)
    })
    .expect("bob's peer registered");
    assert_ne!(
        bob_ns["namespace"]["subnet"], "10.240.0.0/24",
        "bob has his own subnet"
    );
    nss.must("ebob", "ip route replace 10.240.0.0/24 dev fcdev0");
    let stolen = nss.sh(
        "ebob",
        &format!("curl -s --max-time 3 http://{}/", vms[0].1),
    );
    assert!(
        !stolen.status.success() && stolen.stdout.is_empty(),
        "bob reached alice's VM"
    );
    let dropped = eventually(Duration::from_secs(5), || {
        let d = bob.status()["peers"][0]["dropped_packets"]
            .as_u64()
            .unwrap_or(0);
        (d > 0).then_some(d)
    });
    assert!(
        dropped.is_some(),
        "the hub counts bob's packets to alice's namespace as dropped"
    );
    drop(bob_tun);
    drop(tun);

    // Rootless mode: no TUN; a port forward and the SOCKS5 proxy (names resolved by the proxy), and ssh.
    let proxy = alice.tunnel(&[
        "--mode",
        "proxy",
        "--socks",
        "127.0.0.1:1080",
        "-L",
        "18080:n1:80",
    ]);
    let page = alice
        .curl("http://127.0.0.1:18080/")
        .expect("-L forward to n1");
    assert!(page.contains("vm n1"), "{page}");
    let page = alice
        .curl("--socks5-hostname 127.0.0.1:1080 http://m1.alice.fcdev/")
        .expect("SOCKS5 to m1 by name");
    assert!(page.contains("vm m1"), "{page}");
    let hostname = alice.ok(&["ssh", "f1", "--", "cat /etc/hostname"]);
    assert_eq!(hostname.trim(), "f1");

    // Reset: a file written after `up` is gone, the VMs answer again.
    alice.ok(&["ssh", "f1", "--", "echo scribble > /data/marker && sync"]);
    assert_eq!(
        alice.ok(&["ssh", "f1", "--", "cat /data/marker"]).trim(),
        "scribble"
    );
    let reset = alice.ok(&["reset", "--yes", "--json"]);
    assert!(reset.contains("\"ready\""), "{reset}");
    let mut last_err = String::new();
    let after = eventually(Duration::from_secs(20), || {
        let out = alice
            .fcdev(&[
                "ssh",
                "f1",
                "--",
                "cat /data/marker 2>/dev/null || echo gone",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        last_err = String::from_utf8_lossy(&out.stderr).into_owned();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    assert_eq!(
        after.as_deref(),
        Some("gone"),
        "the file survived reset (or ssh failed: {last_err})"
    );
    assert!(
        alice.curl("http://127.0.0.1:18080/").is_some(),
        "n1 answers after reset, same tunnel"
    );
    drop(proxy);

    // A server restart re-adopts the running VMs: none duplicated, none lost.
    let pids_before = qemu_pids(&data_dir);
    drop(server);
    let (restarted, _) = spawn_server(&host, &data_dir, &images);
    server = restarted;
    assert_eq!(alice.status()["clusters"][0]["state"], "ready");
    assert_eq!(
        qemu_pids(&data_dir),
        pids_before,
        "the restarted server re-adopts the same qemu processes"
    );

    // A killed qemu shows in `fcdev status`; `fcdev up` repairs it.
    let victim = Command::new("pgrep")
        .args([
            "-f",
            "--",
            &format!("qemu-system.*{}/vms/alice/dev/m1/", data_dir.display()),
        ])
        .output()
        .unwrap();
    let victim = String::from_utf8_lossy(&victim.stdout).trim().to_string();
    assert!(!victim.is_empty(), "m1's qemu");
    must(&format!("kill -9 {victim}"));
    let noticed = eventually(Duration::from_secs(10), || {
        let c = alice.status()["clusters"][0].clone();
        (c["state"] == "failed").then_some(c)
    })
    .expect("fcdev status shows the killed VM");
    assert!(
        noticed["reason"].as_str().unwrap_or("").contains("m1"),
        "{noticed}"
    );
    assert_eq!(noticed["vms"][2]["state"], "stopped", "{noticed}");
    alice.ok(&["up"]);
    assert_eq!(alice.status()["clusters"][0]["state"], "ready");
    assert_eq!(
        qemu_count(&data_dir),
        3,
        "up repaired m1 without duplicating the others"
    );

    // Down leaves no qemu, tap, bridge or VM folder behind.
    alice.ok(&["down", "--yes"]);
    assert_eq!(qemu_count(&data_dir), 0, "qemu processes left after down");
    let links = nss.must("ehost", "ip -o link show");
    assert!(
        !links.contains("fct") && !links.contains("fcbr"),
        "taps or bridges left after down: {links}"
    );
    assert!(
        common_files(&data_dir.join("vms")).is_empty(),
        "VM folders left after down"
    );
    drop(laptop_www);
    drop(server);
}

fn common_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(common_files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
