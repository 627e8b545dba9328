//! A morning rush on real VMs: 20 engineers run `fcdev up` at the same moment (60 tiny VMs restored from the
//! onboarding snapshot on one host). Admission control (a fair queue of VM starts) must bring every cluster up,
//! by its real probes, within 30 s on this 2-core machine, start nothing twice, and leave no VM of a failed start
//! running. Then one more engineer's cluster, with the 20 idle, still comes up quickly.
//!
//! Needs root, qemu-system-x86, qemu-utils, busybox-static and linux-image-cloud-amd64: a missing piece fails the
//! test, it never skips. Every packet stays inside the namespace this test creates.

mod lab;
mod netns;

use std::process::Stdio;
use std::time::{Duration, Instant};

use lab::*;
use netns::*;

const ENGINEERS: usize = 20;

#[test]
fn twenty_engineers_up_at_once_all_ready_within_30_s() {
    require_root_and_tun();
    require_vm_tools();
    let image = tiny_image();
    let (tmp, data_dir, images) = workdir_with_image("tiny", &image);
    let nss = Namespaces::new(&["rhost"]);
    let host = nss.name("rhost");
    let (server, token) = spawn_server_at(&host, &data_dir, &images, "127.0.0.1");
    let url = "http://127.0.0.1:7070";

    let mut laptops = Vec::new();
    for i in 0..=ENGINEERS {
        let name = format!("eng{i}");
        let token = if i == 0 {
            token.clone().expect("the server printed a login token")
        } else {
            add_user(&host, &data_dir, &name)
        };
        let laptop = Laptop {
            ns: host.clone(),
            cfg: tmp.path().join(&name),
            nss: &nss,
            role: "rhost",
        };
        laptop.login(url, &token);
        laptops.push(laptop);
    }
    // The last one comes later, with the others idle.
    let late = laptops.pop().expect("late engineer");

    let t0 = Instant::now();
    let children: Vec<_> = laptops
        .iter()
        .map(|l| {
            l.fcdev(&["up", "--json"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut times = Vec::new();
    let mut failures = Vec::new();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        times.push(t0.elapsed().as_secs_f64());
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let ready = serde_json::from_str::<serde_json::Value>(&text)
            .map(|v| v["state"] == "ready")
            .unwrap_or(false);
        if !out.status.success() || !ready {
            failures.push(format!(
                "eng{i}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let all = t0.elapsed();
    eprintln!(
        "{ENGINEERS} engineers: all ready after {:.1} s (first {:.1} s)",
        all.as_secs_f64(),
        times.iter().cloned().fold(f64::MAX, f64::min)
    );
    assert!(
        failures.is_empty(),
        "clusters not ready:\n{}",
        failures.join("\n")
    );
    assert!(
        all < Duration::from_secs(30),
        "{ENGINEERS} clusters took {:.1} s",
        all.as_secs_f64()
    );
    assert_eq!(
        qemu_count(&data_dir),
        3 * ENGINEERS,
        "exactly one qemu per VM, nothing left from retries"
    );

    let t1 = Instant::now();
    late.ok(&["up", "--json"]);
    let one_more = t1.elapsed();
    eprintln!(
        "one more up with {ENGINEERS} clusters idle: {:.2} s",
        one_more.as_secs_f64()
    );
    assert!(
        one_more < Duration::from_secs(5),
        "one more up took {:.1} s",
        one_more.as_secs_f64()
    );
    for l in laptops.iter().chain(std::iter::once(&late)) {
        l.ok(&["down", "--yes"]);
    }
    assert_eq!(qemu_count(&data_dir), 0, "qemu left after down");
    drop(server);
}
