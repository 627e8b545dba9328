//! Named snapshots and stop/start, end to end with real parts only: `fcdev server` (qemu backend, the tiny
//! image's 3 VMs) in a `host` network namespace, engineers' laptops in their own namespaces driving the real CLI.
//! What runs inside a guest is read and changed through its serial agent (the same one the backend uses).
//!
//! Needs root, qemu-system-x86, linux-image-cloud-amd64, busybox-static, dropbear-bin and openssh-client: a
//! missing piece fails the test, it never skips. Every packet stays inside namespaces this test creates.

mod lab;
mod netns;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fcdev::server::backend::qemu::agent;
use lab::*;
use netns::*;

/// Run a shell command in VM `vm` of alice's cluster `dev` through its agent; returns its output, trimmed.
fn guest(data_dir: &Path, vm: &str, cmd: &str) -> String {
    let sock = data_dir.join("vms/alice/dev").join(vm).join("agent.sock");
    let (rc, out) = agent::run(&sock, cmd, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{vm}: `{cmd}`: {e}"));
    assert_eq!(rc, 0, "{vm}: `{cmd}` exited {rc}: {out}");
    out.trim().to_string()
}

/// The process the test leaves in f1: its pid and the value it holds in memory, as it reports them.
fn report(data_dir: &Path) -> (String, String) {
    let line = guest(data_dir, "f1", "cat /run/report 2>/dev/null; true");
    let mut words = line.split_whitespace();
    (
        words.next().unwrap_or_default().to_string(),
        words.next().unwrap_or_default().to_string(),
    )
}

/// Seconds since the guest booted (its monotonic clock, which a saved VM keeps).
fn uptime(data_dir: &Path) -> f64 {
    guest(data_dir, "f1", "cat /proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .expect("uptime")
}

fn host_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Every VM answers HTTP from the host namespace (the probe's path: the VM's replies go to the gateway).
fn pages_answer(nss: &Namespaces, vms: &[(String, String)]) {
    for (name, addr) in vms {
        let page = nss.must(
            "shost",
            &format!("curl -s --fail --max-time 5 http://{addr}/"),
        );
        assert!(page.contains(&format!("vm {name} ")), "{name}: {page}");
    }
}

fn json_of(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn snapshots_bring_back_files_and_processes_and_stop_start_resumes_them() {
    require_root_and_tun();
    require_vm_tools();
    let image = tiny_image();
    let (tmp, data_dir, images) = workdir_with_image("tiny", &image);
    let nss = Namespaces::new(&["shost", "salice", "sbob"]);
    let host = nss.name("shost");
    lan(&nss, "shost", "192.168.83", &["salice", "sbob"]);
    let (mut server, token) = spawn_server_at(&host, &data_dir, &images, "192.168.83.1");
    let token = token.expect("the server printed a login token");
    let url = "http://192.168.83.1:7070";
    let alice = Laptop {
        ns: nss.name("salice"),
        cfg: tmp.path().join("alice"),
        nss: &nss,
        role: "salice",
    };
    alice.login(url, &token);
    let up = json_of(&alice.ok(&["up", "--json"]));
    assert_eq!(up["state"], "ready", "{up}");
    let vms: Vec<(String, String)> = up["vms"]
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

    // A file on f1's disk, and a process holding a value in memory (it changes it on SIGUSR1).
    guest(&data_dir, "f1", "echo one > /data/file && sync");
    std::fs::write(
        tmp.path().join("holder.sh"),
        "v=original\ntrap 'v=changed' USR1\nwhile true; do echo \"$$ $v\" > /run/report; sleep 0.2; done\n",
    )
    .unwrap();
    let script = std::fs::read_to_string(tmp.path().join("holder.sh")).unwrap();
    guest(
        &data_dir,
        "f1",
        &format!("cat > /run/holder.sh <<'EOF'\n{script}EOF\nsh /run/holder.sh </dev/null >/dev/null 2>&1 &"),
    );
    let (pid, value) = eventually(Duration::from_secs(10), || {
        let r = report(&data_dir);
        (!r.0.is_empty()).then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "the process reports: {}",
            guest(&data_dir, "f1", "ps; ls -l /run")
        )
    });
    assert_eq!(value, "original");

    // Save s1; the cluster runs on.
    let host_key = |alice: &Laptop| {
        alice.status()["clusters"][0]["vms"][1]["host_key"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let saved_key = host_key(&alice);
    assert!(saved_key.starts_with("ssh-ed25519 "), "{saved_key}");
    let t0 = Instant::now();
    let snap = json_of(&alice.ok(&["snapshot", "save", "s1", "--json"]));
    let save_secs = t0.elapsed().as_secs_f64();
    assert_eq!(snap["name"], "s1", "{snap}");
    assert_eq!(snap["image"], "tiny", "{snap}");
    assert!(snap["size_bytes"].as_u64().unwrap_or(0) > 1 << 20, "{snap}");
    assert_eq!(alice.status()["clusters"][0]["state"], "ready");
    pages_answer(&nss, &vms);
    // The same name again is refused; a bad name too.
    let again = alice
        .fcdev(&["snapshot", "save", "s1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(5), "a second s1 is a conflict");
    let bad = alice
        .fcdev(&["snapshot", "save", "Bad_Name"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(8), "names follow the cluster rules");

    // Change both, restore s1: both are back, and the process is the same one.
    guest(&data_dir, "f1", "echo two > /data/file && sync");
    guest(&data_dir, "f1", &format!("kill -USR1 {pid}"));
    eventually(Duration::from_secs(5), || {
        (report(&data_dir).1 == "changed").then_some(())
    })
    .expect("the process changed its value");
    let mut restore_secs = Vec::new();
    for round in 0..3 {
        let t0 = Instant::now();
        let restored = json_of(&alice.ok(&["snapshot", "restore", "s1", "--yes", "--json"]));
        restore_secs.push(t0.elapsed().as_secs_f64());
        assert_eq!(restored["state"], "ready", "round {round}: {restored}");
        assert_eq!(restored["start_mode"], "resume", "{restored}");
        assert_eq!(
            guest(&data_dir, "f1", "cat /data/file"),
            "one",
            "round {round}"
        );
        assert_eq!(report(&data_dir), (pid.clone(), "original".to_string()));
        pages_answer(&nss, &vms);
        let skew = guest(&data_dir, "f1", "date +%s").parse::<i64>().unwrap() - host_now();
        assert!(
            skew.abs() <= 3,
            "round {round}: guest clock off by {skew} s"
        );
        assert_eq!(qemu_count(&data_dir), 3, "one qemu per VM after a restore");
        // Something to undo next round.
        guest(&data_dir, "f1", "echo three > /data/file && sync");
    }
    guest(&data_dir, "f1", "echo one > /data/file && sync");

    // The list: name, when, size, image.
    let list = json_of(&alice.ok(&["snapshot", "list", "--json"]));
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["name"], "s1");
    assert!(list[0]["created_at"].as_str().unwrap_or("").ends_with('Z'));
    let table = alice.ok(&["snapshot", "list"]);
    assert!(table.contains("s1") && table.contains("tiny"), "{table}");

    // Stop: no qemu left, the cluster shows stopped with its size; start: the same process goes on.
    let uptime_before = uptime(&data_dir);
    let t0 = Instant::now();
    let stopped = json_of(&alice.ok(&["stop", "--json"]));
    let stop_secs = t0.elapsed().as_secs_f64();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert_eq!(
        qemu_count(&data_dir),
        0,
        "no qemu of the cluster after stop"
    );
    let status = alice.status();
    assert_eq!(status["clusters"][0]["state"], "stopped", "{status}");
    assert!(
        status["clusters"][0]["disk_bytes"].as_u64().unwrap_or(0) > 1 << 20,
        "{status}"
    );
    let human = alice.ok(&["status"]);
    assert!(
        human.contains("stopped") && human.contains("on disk"),
        "{human}"
    );
    // The watchdog leaves it alone.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(alice.status()["clusters"][0]["state"], "stopped");
    let mut start_secs = Vec::new();
    for round in 0..3 {
        let t0 = Instant::now();
        // `up` on a stopped cluster starts it too.
        let args: &[&str] = if round == 1 {
            &["up", "--json"]
        } else {
            &["start", "--json"]
        };
        let started = json_of(&alice.ok(args));
        start_secs.push(t0.elapsed().as_secs_f64());
        assert_eq!(started["state"], "ready", "round {round}: {started}");
        assert_eq!(started["start_mode"], "resume", "{started}");
        assert_eq!(qemu_count(&data_dir), 3);
        assert_eq!(guest(&data_dir, "f1", "cat /data/file"), "one");
        let (pid_after, value_after) = report(&data_dir);
        assert_eq!((pid_after, value_after.as_str()), (pid.clone(), "original"));
        let uptime_after = uptime(&data_dir);
        assert!(
            uptime_after > uptime_before,
            "uptime goes on: {uptime_before} then {uptime_after}"
        );
        let skew = guest(&data_dir, "f1", "date +%s").parse::<i64>().unwrap() - host_now();
        assert!(
            skew.abs() <= 3,
            "round {round}: guest clock off by {skew} s"
        );
        pages_answer(&nss, &vms);
        if round < 2 {
            assert_eq!(json_of(&alice.ok(&["stop", "--json"]))["state"], "stopped");
            assert_eq!(qemu_count(&data_dir), 0);
            std::thread::sleep(Duration::from_secs(4));
        }
    }
    eprintln!(
        "save {save_secs:.2}s, restores {restore_secs:.2?}, stop {stop_secs:.2}s, starts {start_secs:.2?}"
    );

    // Another engineer can neither list nor restore alice's snapshot.
    let bob_token = add_user(&host, &data_dir, "bob");
    let bob = Laptop {
        ns: nss.name("sbob"),
        cfg: tmp.path().join("bob"),
        nss: &nss,
        role: "sbob",
    };
    bob.login(url, &bob_token);
    for args in [
        &["snapshot", "list", "--json"][..],
        &["snapshot", "restore", "s1", "--yes"][..],
        &["snapshot", "rm", "s1"][..],
    ] {
        let out = bob.fcdev(args).stdin(Stdio::null()).output().unwrap();
        assert_eq!(out.status.code(), Some(4), "bob {args:?}: {out:?}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("s1"),
            "bob {args:?}"
        );
    }

    // An image that changed: the restore is refused with the reason, the cluster is left as it is.
    let pids = qemu_pids(&data_dir);
    let initrd = image.join("initrd.img");
    let stamp = tmp.path().join("initrd.stamp");
    must(&format!(
        "touch {} && touch -r {} {}",
        stamp.display(),
        initrd.display(),
        stamp.display()
    ));
    must(&format!("touch {}", initrd.display()));
    let refused = alice
        .fcdev(&["snapshot", "restore", "s1", "--yes"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    must(&format!(
        "touch -r {} {}",
        stamp.display(),
        initrd.display()
    ));
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert_eq!(refused.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("changed"), "{stderr}");
    assert_eq!(
        qemu_pids(&data_dir),
        pids,
        "the running cluster is untouched"
    );
    assert_eq!(alice.status()["clusters"][0]["state"], "ready");
    assert_eq!(report(&data_dir).0, pid);

    // Saved by another qemu: refused with that reason, the cluster untouched.
    let meta = data_dir.join("snapshots/alice/dev/s1/n1/meta.toml");
    let original = std::fs::read_to_string(&meta).unwrap();
    let other: String = original
        .lines()
        .map(|l| {
            if l.starts_with("qemu = ") {
                "qemu = \"QEMU emulator version 6.2.0\"".to_string()
            } else {
                l.to_string()
            }
        })
        .map(|l| l + "\n")
        .collect();
    std::fs::write(&meta, other).unwrap();
    let refused = alice
        .fcdev(&["snapshot", "restore", "s1", "--yes"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    std::fs::write(&meta, original).unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert_eq!(refused.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("saved by QEMU emulator version 6.2.0"),
        "{stderr}"
    );
    assert_eq!(
        qemu_pids(&data_dir),
        pids,
        "the running cluster is untouched"
    );

    // A save cut off by a server crash leaves no half snapshot, and the VMs run on.
    let save = alice
        .fcdev(&["snapshot", "save", "cut"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tmp_dir = data_dir.join("snapshots/alice/dev/.tmp-cut");
    eventually(Duration::from_secs(20), || tmp_dir.exists().then_some(())).expect("the save began");
    must(&format!("kill -9 {}", server.0.id()));
    let _ = server.0.wait();
    let mut save = Proc(save);
    let _ = save.0.wait();
    drop(save);
    let (restarted, _) = spawn_server_at(&host, &data_dir, &images, "192.168.83.1");
    server = restarted;
    let ready = eventually(Duration::from_secs(30), || {
        let s = alice.status();
        (s["clusters"][0]["state"] == "ready").then_some(s)
    });
    assert!(
        ready.is_some(),
        "the cluster is ready after the cut save: {}",
        alice.status()
    );
    let names: Vec<String> = json_of(&alice.ok(&["snapshot", "list", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["s1"], "no half snapshot listed");
    assert!(!tmp_dir.exists(), "the half snapshot's files are gone");
    assert_eq!(report(&data_dir).0, pid, "the same process runs on");
    pages_answer(&nss, &vms);

    // Reset still goes to the onboarding snapshot: the file and the process are gone.
    alice.ok(&["reset", "--yes"]);
    assert_eq!(
        guest(&data_dir, "f1", "cat /data/file 2>/dev/null || echo gone"),
        "gone"
    );
    assert_eq!(
        guest(&data_dir, "f1", "cat /run/report 2>/dev/null || echo gone"),
        "gone"
    );
    assert_ne!(host_key(&alice), saved_key, "a reset makes a new host key");
    // …and s1 still restores after a reset, with the host key its guest holds.
    alice.ok(&["snapshot", "restore", "s1", "--yes"]);
    assert_eq!(guest(&data_dir, "f1", "cat /data/file"), "one");
    assert_eq!(report(&data_dir).0, pid);
    assert_eq!(host_key(&alice), saved_key, "the saved guest's host key");

    // rm, then deleting the cluster removes the rest of its snapshots.
    alice.ok(&["snapshot", "rm", "s1"]);
    assert_eq!(
        json_of(&alice.ok(&["snapshot", "list", "--json"])),
        serde_json::json!([])
    );
    alice.ok(&["snapshot", "save", "s3"]);
    // Quota: over the limit, a save is refused naming what to remove.
    drop(server);
    let (restarted, _) = spawn_server_with(
        &host,
        &data_dir,
        &images,
        "192.168.83.1",
        &["--snapshot-quota", "1M"],
    );
    server = restarted;
    let over = alice
        .fcdev(&["snapshot", "save", "s2"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&over.stderr).into_owned();
    assert!(!over.status.success(), "a save over the quota");
    assert!(
        stderr.contains("quota") && stderr.contains("dev/s3"),
        "{stderr}"
    );
    assert_eq!(alice.status()["clusters"][0]["state"], "ready");

    // --idle-stop: a ready cluster nobody touches (no state change, no tunnel handshake) is stopped.
    drop(server);
    let (restarted, _) = spawn_server_with(
        &host,
        &data_dir,
        &images,
        "192.168.83.1",
        &["--idle-stop", "3s"],
    );
    server = restarted;
    let idle = eventually(Duration::from_secs(30), || {
        let s = alice.status();
        (s["clusters"][0]["state"] == "stopped").then_some(s)
    });
    assert!(idle.is_some(), "the idle cluster was stopped");
    assert_eq!(
        qemu_count(&data_dir),
        0,
        "no qemu of the idle-stopped cluster"
    );
    alice.ok(&["down", "--yes"]);
    assert_eq!(qemu_count(&data_dir), 0);
    let left: Vec<PathBuf> = std::fs::read_dir(data_dir.join("snapshots/alice"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "snapshot files left after down: {left:?}");
    drop(server);
}
