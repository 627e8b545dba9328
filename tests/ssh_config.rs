//! ssh from the laptop the way IDEs and scripts use it, against real VMs: `fcdev ssh-config` writes a block
//! that `ssh -F`, scp and rsync use with no `fcdev tunnel` running (the ProxyCommand starts one shared
//! background tunnel that ends when idle); host keys come from the server, so a reset gives no warning and a
//! wrong key is refused. Also: names in TUN mode through the namespace's hosts file, and `fcdev logs` showing
//! the boot of a restored VM.
//!
//! Needs root, /dev/net/tun, qemu-system-x86, linux-image-cloud-amd64, busybox-static, dropbear-bin,
//! openssh-client, openssh-sftp-server and rsync: a missing piece fails the test, it never skips. Every packet
//! stays inside namespaces this test creates (deleted at the end, with their /etc/netns folders).

mod lab;
mod netns;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use lab::*;
use netns::*;

fn require_ssh_tools() {
    require_tools(&[
        ("ssh", "openssh-client"),
        ("scp", "openssh-client"),
        ("rsync", "rsync"),
    ]);
}

/// The `fcdev tunnel` processes running in a namespace (pid, command line).
fn tunnels_in(ns: &str) -> Vec<String> {
    let out = run(&format!(
        "for p in $(ip netns pids {ns}); do tr '\\0' ' ' < /proc/$p/cmdline 2>/dev/null; echo; done"
    ));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" tunnel ") && l.contains("fcdev"))
        .map(str::to_string)
        .collect()
}

/// /etc/netns/<ns>: `ip netns exec` mounts its files over /etc (the laptop's own hosts file); removed on drop.
struct EtcNetns(std::path::PathBuf);

impl Drop for EtcNetns {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn ssh_config_scp_rsync_and_names_work_with_no_tunnel_running() {
    require_ssh_tools();
    let lab = TinyLab::start("shost", "slap", "192.168.86");
    let (tmp, alice) = (&lab.tmp, lab.alice());
    let up: serde_json::Value = serde_json::from_str(&alice.ok(&["up", "--json"])).unwrap();
    assert_eq!(up["state"], "ready", "{up}");
    let key_of = |status: &serde_json::Value, vm: &str| -> String {
        status["clusters"][0]["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == vm)
            .and_then(|v| v["host_key"].as_str())
            .unwrap_or_else(|| panic!("no host key for {vm}: {status}"))
            .to_string()
    };
    let n1_key = key_of(&alice.status(), "n1");
    assert!(n1_key.starts_with("ssh-ed25519 "), "{n1_key}");

    // The block goes after the user's own lines, which stay; a backup of the file before.
    let home = tmp.path().join("home");
    let ssh_dir = home.join(".ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    let config = ssh_dir.join("config");
    let mine = "Host keepme\n    User someone\n";
    std::fs::write(&config, mine).unwrap();
    let ssh_config = |args: &[&str]| -> serde_json::Value {
        let mut full = vec!["ssh-config", "--json"];
        full.extend_from_slice(args);
        let out = alice
            .fcdev(&full)
            .env("HOME", &home)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ssh-config {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("ssh-config JSON")
    };
    let wrote = ssh_config(&[]);
    assert_eq!(wrote["changed"], true, "{wrote}");
    let hosts: Vec<String> = wrote["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        hosts,
        ["n1.alice.fcdev", "f1.alice.fcdev", "m1.alice.fcdev"]
    );
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.starts_with(mine), "{text}");
    assert!(
        text.contains("Host n1.alice.fcdev f1.alice.fcdev m1.alice.fcdev"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(ssh_dir.join("config.fcdev.bak")).unwrap(),
        mine
    );
    assert_eq!(
        ssh_config(&[])["changed"],
        false,
        "a second run changed the file"
    );
    let doctor = alice
        .fcdev(&["doctor", "--json"])
        .env("HOME", &home)
        .output()
        .unwrap();
    let doctor: serde_json::Value = serde_json::from_slice(&doctor.stdout).expect("doctor JSON");
    let verdict = doctor["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "ssh-config")
        .unwrap_or_else(|| panic!("no ssh-config check: {doctor}"))["verdict"]
        .clone();
    assert_eq!(verdict, "ok", "{doctor}");

    // ssh, scp and rsync run in the laptop namespace with this config and nothing else: no tunnel before.
    assert!(tunnels_in(&alice.ns).is_empty());
    let cfg_s = config.display().to_string();
    let sh = |cmd: &str| -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &alice.ns, "sh", "-c", cmd])
            .env("FCDEV_CONFIG_DIR", &alice.cfg)
            .env("FCDEV_TUNNEL_IDLE_SECS", "8")
            .current_dir(tmp.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let must = |cmd: &str| -> String {
        let out = sh(cmd);
        assert!(
            out.status.success(),
            "`{cmd}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Three at once (an IDE, a shell, scp): one background tunnel carries them all.
    let three = must(&format!(
        "for vm in n1 f1 m1; do ssh -F {cfg_s} -o ConnectTimeout=30 $vm.alice.fcdev 'cat /proc/sys/kernel/hostname' > out.$vm & done; wait; cat out.n1 out.f1 out.m1"
    ));
    assert_eq!(
        three.split_whitespace().collect::<Vec<_>>(),
        ["n1", "f1", "m1"]
    );
    let running = tunnels_in(&alice.ns);
    assert_eq!(running.len(), 1, "one shared tunnel: {running:?}");
    assert!(running[0].contains("--background"), "{running:?}");
    let tunnel = &alice.status()["tunnel"];
    assert_eq!(
        (&tunnel["mode"], &tunnel["background"]),
        (&serde_json::json!("proxy"), &serde_json::json!(true)),
        "status shows the background tunnel: {tunnel}"
    );
    let text = alice.ok(&["status"]);
    assert!(text.contains("started by `fcdev ssh`"), "{text}");

    // scp both ways (SFTP under OpenSSH 9), rsync both ways.
    let payload: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(tmp.path().join("up.txt"), &payload).unwrap();
    must(&format!("scp -F {cfg_s} up.txt n1.alice.fcdev:/tmp/up.txt"));
    must(&format!(
        "scp -F {cfg_s} n1.alice.fcdev:/tmp/up.txt down.txt"
    ));
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("down.txt")).unwrap(),
        payload
    );
    std::fs::create_dir_all(tmp.path().join("tree/sub")).unwrap();
    std::fs::write(tmp.path().join("tree/sub/a"), "rsync-a\n").unwrap();
    must(&format!(
        "rsync -a -e 'ssh -F {cfg_s}' tree/ f1.alice.fcdev:/tmp/tree/ && rsync -a -e 'ssh -F {cfg_s}' f1.alice.fcdev:/tmp/tree/ back/"
    ));
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("back/sub/a")).unwrap(),
        "rsync-a\n"
    );

    // A key that is not the VM's is refused: n1 checked against f1's key.
    let wrong = sh(&format!(
        "ssh -F {cfg_s} -o HostKeyAlias=f1.alice.fcdev n1.alice.fcdev true"
    ));
    assert!(!wrong.status.success());
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("Host key verification failed"), "{stderr}");

    // A reset gives every VM a new host key, and ssh goes on without a warning.
    alice.ok(&["reset", "--yes"]);
    let new_key = key_of(&alice.status(), "n1");
    assert_ne!(new_key, n1_key, "a reset keeps the old host key");
    let out = sh(&format!("ssh -F {cfg_s} n1.alice.fcdev echo after-reset"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "after-reset",
        "{stderr}"
    );
    assert!(!stderr.contains("WARNING"), "{stderr}");

    // The background tunnel ends once nothing has used it for its idle time (8 s here).
    assert!(
        eventually(Duration::from_secs(30), || tunnels_in(&alice.ns)
            .is_empty()
            .then_some(()))
        .is_some(),
        "the background tunnel did not end when idle: {:?}",
        tunnels_in(&alice.ns)
    );

    // `fcdev logs` of a restored VM starts with the boot its snapshot was taken from.
    let logs = alice.ok(&["logs", "n1", "--lines", "1000"]);
    let booted = logs.find("--- fcdev: booting at ");
    let restored = logs.find("--- fcdev: restored at ");
    assert!(
        booted.is_some() && restored.is_some() && booted < restored,
        "no snapshot boot before the restore in:\n{logs}"
    );
    assert!(logs.contains("fcdev: snapshot ready"), "{logs}");
    let json = alice.ok(&["logs", "n1", "--lines", "5", "--json"]);
    for line in json.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert_eq!(v["vm"], "n1", "{line}");
    }

    // TUN mode puts the names in the laptop's hosts file (here /etc/netns/<ns>/hosts, which `ip netns exec`
    // mounts over /etc/hosts) while it runs, and takes them out when it ends.
    let etc = EtcNetns(Path::new("/etc/netns").join(&alice.ns));
    std::fs::create_dir_all(&etc.0).unwrap();
    let hosts_file = etc.0.join("hosts");
    let base = "127.0.0.1\tlocalhost\n";
    std::fs::write(&hosts_file, base).unwrap();
    let tunnel = alice.tunnel(&["--mode", "tun"]);
    let page = alice.curl("http://n1.alice.fcdev/");
    assert!(
        page.as_deref().is_some_and(|p| p.contains("vm n1")),
        "n1 by name in TUN mode: {page:?}\n{}",
        std::fs::read_to_string(&hosts_file).unwrap_or_default()
    );
    // …and answers DNS for them on its own address (what systemd-resolved is given where it runs).
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(alice.cfg.join("run/tunnel-default.json")).unwrap(),
    )
    .unwrap();
    let own = state["address"].as_str().unwrap().to_string();
    let lookup = alice.nss.sh(
        alice.role,
        &format!("busybox nslookup f1.alice.fcdev {own}"),
    );
    let lookup = String::from_utf8_lossy(&lookup.stdout).to_string();
    let f1 = alice.status()["clusters"][0]["vms"][1]["address"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(lookup.contains(&f1), "nslookup f1 at {own}: {lookup}");
    drop(tunnel);
    assert_eq!(
        std::fs::read_to_string(&hosts_file).unwrap(),
        base,
        "the tunnel left its names in the hosts file"
    );

    // --remove puts the user's file back as it was.
    assert_eq!(ssh_config(&["--remove"])["changed"], true);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), mine);

    alice.ok(&["down", "--yes"]);
}
