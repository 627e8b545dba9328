//! Real VMs (no mocks): the tiny image under qemu, inside a network namespace each test creates.
//!
//! Needs root, qemu-system-x86 + qemu-utils, busybox-static and linux-image-cloud-amd64; a missing piece fails
//! the test with a message saying what is missing. The tiny image (and its snapshot) is built once into
//! `target/fcdev-test-images/tiny`. Tests run one at a time (2-core machines, TCG).
//! Accelerator: `FCDEV_ACCEL` (auto|kvm|tcg, default auto).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fcdev::server::backend::qemu::bench::{cluster_specs, down, http_get, namespace, up};
use fcdev::server::backend::qemu::{Accel, QemuBackend, QemuConfig};
use fcdev::server::backend::{Backend, StartMode, VmSpec};
use fcdev::server::images::Image;
use fcdev::server::netns::{self, ThreadNetns};

static SERIAL: Mutex<()> = Mutex::new(());

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "these tests need root (network namespaces, bridges, taps): run them with sudo"
    );
}

fn backend() -> QemuBackend {
    let accel: Accel = std::env::var("FCDEV_ACCEL")
        .unwrap_or_else(|_| "auto".into())
        .parse()
        .expect("FCDEV_ACCEL must be auto, kvm or tcg");
    let b = QemuBackend::new(QemuConfig {
        accel,
        qemu_binary: None,
    })
    .unwrap_or_else(|e| panic!("cannot use qemu: {e}"));
    eprintln!("accelerator: {}", b.accel());
    b
}

fn image_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fcdev-test-images/tiny")
}

/// The tiny image with its onboarding snapshot, built if missing.
fn tiny_image(b: &QemuBackend) -> Image {
    let dir = image_dir();
    let stamp =
        std::fs::read_to_string(dir.join(fcdev::image::build::RECIPE_FILE)).unwrap_or_default();
    let fresh = stamp.trim() == format!("tiny {}", fcdev::image::build::tiny_recipe_hash());
    if !fresh || !dir.join("initrd.img").is_file() {
        fcdev::image::build::build_tiny(&dir, &Default::default())
            .unwrap_or_else(|e| panic!("cannot build the tiny image: {e}"));
    }
    let image = Image::load(&dir).expect("tiny image.toml");
    let has = image
        .spec
        .vms
        .iter()
        .all(|t| fcdev::server::backend::qemu::snapshot::find(&image, t, b.accel()).is_some());
    if !has {
        fcdev::image::snapshot::snapshot_image(&dir, b)
            .unwrap_or_else(|e| panic!("cannot snapshot the tiny image: {e}"));
    }
    Image::load(&dir).expect("tiny image.toml")
}

/// The same image without its snapshot: VMs boot.
fn without_snapshot(image: &Image) -> Image {
    let mut i = image.clone();
    i.spec.snapshot = None;
    i
}

fn run_root(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("fcdev-{tag}-"))
        .tempdir()
        .expect("temp dir")
}

/// Stops the VMs even when an assertion fails (qemu outlives the test process otherwise).
struct Cleanup<'a> {
    backend: &'a QemuBackend,
    vms: Vec<VmSpec>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = down(self.backend, &self.vms);
    }
}

fn enter_netns(tag: &str) -> ThreadNetns {
    let name = format!("fcdevtest-{}-{tag}", std::process::id());
    ThreadNetns::create_and_enter(&name).unwrap_or_else(|e| panic!("netns {name}: {e}"))
}

#[test]
fn boot_three_vms_and_fetch_their_pages() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    let b = backend();
    let image = without_snapshot(&tiny_image(&b));
    let _ns = enter_netns("boot");
    let ns = namespace("alice", 1);
    b.ensure_namespace(&ns).expect("namespace");
    let root = run_root("boot");
    let vms = cluster_specs(&image, &ns, "c1", root.path()).expect("specs");
    let _cleanup = Cleanup {
        backend: &b,
        vms: vms.clone(),
    };
    let result = up(&b, &vms, b.ready_deadline(&vms[0], StartMode::Boot));
    let (modes, took) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = down(&b, &vms);
            panic!("cold boot failed: {e:?}");
        }
    };
    eprintln!("3 VMs booted in {:.2} s", took.as_secs_f64());
    assert!(modes.iter().all(|m| *m == StartMode::Boot));
    for vm in &vms {
        let page = http_get(vm.address).expect("page");
        assert!(page.contains(&vm.name) && page.contains("alice"), "{page}");
    }
    // A file written on the disk survives in a booted VM (the disk is at /data).
    let (rc, out) = b
        .guest_exec(
            &vms[1],
            "echo hello > /data/marker && sync && cat /data/marker",
        )
        .expect("exec");
    assert_eq!((rc, out.trim()), (0, "hello"));
    down(&b, &vms).expect("down");
    b.remove_namespace(&ns).expect("remove namespace");
    assert!(!netns::link_exists("fcbr1"));
}

#[test]
fn restore_reset_down_and_readopt() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    let b = backend();
    let image = tiny_image(&b);
    let _ns = enter_netns("restore");
    let ns = namespace("bob", 2);
    b.ensure_namespace(&ns).expect("namespace");
    let root = run_root("restore");
    let vms = cluster_specs(&image, &ns, "c1", root.path()).expect("specs");
    let _cleanup = Cleanup {
        backend: &b,
        vms: vms.clone(),
    };
    let (modes, took) = up(&b, &vms, Duration::from_secs(60)).unwrap_or_else(|e| {
        let _ = down(&b, &vms);
        panic!("restore failed: {e:?}")
    });
    eprintln!("3 VMs restored in {:.2} s", took.as_secs_f64());
    eprintln!("{}", b.log_tail(&vms[0]).unwrap_or_default());
    assert!(modes.iter().all(|m| *m == StartMode::Restore), "{modes:?}");
    for vm in &vms {
        let page = http_get(vm.address).expect("page");
        assert!(
            page.contains(&format!("vm {} namespace bob", vm.name))
                && page.contains(&vm.address.to_string()),
            "{page}"
        );
        let (_, mac) = b
            .guest_exec(vm, "cat /sys/class/net/eth0/address")
            .expect("exec");
        assert_eq!(mac.trim(), vm.mac);
    }

    // A server restart re-adopts running VMs instead of starting new ones.
    let pid = b.pid(&vms[0]).expect("pid");
    let b2 = backend();
    assert!(b2.is_running(&vms[0]));
    assert_eq!(b2.start(&vms[0]).expect("re-adopt"), StartMode::Restore);
    assert_eq!(b2.pid(&vms[0]), Some(pid));

    // Reset drops a file written after up.
    let f1 = &vms[1];
    let (rc, out) = b
        .guest_exec(f1, "echo hello > /data/marker && sync && cat /data/marker")
        .expect("exec");
    assert_eq!((rc, out.trim()), (0, "hello"));
    b.stop(f1).expect("stop");
    b.discard_disk(f1).expect("discard");
    let t0 = Instant::now();
    assert_eq!(b.start(f1).expect("start"), StartMode::Restore);
    while !b.probe(f1) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{:?}",
            b.log_tail(f1)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("reset of f1 in {:.2} s", t0.elapsed().as_secs_f64());
    let (rc, _) = b.guest_exec(f1, "cat /data/marker").expect("exec");
    assert_ne!(rc, 0, "the file written before reset is still there");
    let (rc, _) = b
        .guest_exec(f1, "grep -q ' /data ' /proc/mounts")
        .expect("exec");
    assert_eq!(rc, 0, "/data is mounted after restore");

    // Down leaves nothing: no qemu, no socket, no tap, no bridge.
    let pids: Vec<i32> = vms.iter().filter_map(|vm| b.pid(vm)).collect();
    down(&b, &vms).expect("down");
    b.remove_namespace(&ns).expect("remove namespace");
    for (vm, pid) in vms.iter().zip(pids) {
        assert!(!Path::new(&format!("/proc/{pid}")).exists() || !b.is_running(vm));
        for f in ["qmp.sock", "agent.sock", "qemu.pid", "disk.qcow2"] {
            assert!(!vm.run_dir.join(f).exists(), "{f} left in {:?}", vm.run_dir);
        }
        assert!(!netns::link_exists(&netns::tap_name(
            ns.index,
            vm.tap_number()
        )));
    }
    assert!(!netns::link_exists("fcbr2"));
}

#[test]
fn namespaces_are_isolated() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    let b = backend();
    let image = tiny_image(&b);
    let _ns = enter_netns("iso");
    let ns_a = namespace("carol", 3);
    let ns_b = namespace("dave", 4);
    b.ensure_namespace(&ns_a).expect("namespace a");
    b.ensure_namespace(&ns_b).expect("namespace b");
    let root = run_root("iso");
    let mut vms = cluster_specs(&image, &ns_a, "c1", &root.path().join("a")).expect("specs");
    vms.truncate(1);
    let mut other = cluster_specs(&image, &ns_b, "c1", &root.path().join("b")).expect("specs");
    other.truncate(1);
    vms.extend(other);
    let _cleanup = Cleanup {
        backend: &b,
        vms: vms.clone(),
    };
    // What the WireGuard hub does: a route per tunnel peer to its TUN device (a dummy here).
    for cmd in [
        "tuntap add dev fcdtun0 mode tun",
        "link set fcdtun0 up",
        "route add 10.240.3.2/32 dev fcdtun0",
    ] {
        let ok = std::process::Command::new("ip")
            .args(cmd.split(' '))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip {cmd}");
    }
    up(&b, &vms, Duration::from_secs(60)).unwrap_or_else(|e| {
        let _ = down(&b, &vms);
        panic!("up failed: {e:?}")
    });
    let a = &vms[0];
    let check = |cmd: &str| {
        b.guest_exec(a, cmd)
            .unwrap_or_else(|e| panic!("exec `{cmd}`: {e:?}"))
            .0
    };
    assert_eq!(check("ping -c 1 -W 2 10.240.3.1"), 0, "own gateway");
    assert_ne!(
        check("ping -c 1 -W 2 10.240.4.1"),
        0,
        "other gateway reachable"
    );
    assert_ne!(
        check("wget -q -T 2 -O - http://10.240.4.10/"),
        0,
        "other namespace's VM reachable"
    );
    // The proxy ARP answer for a tunnel peer address (.2-.9) comes from the host.
    assert_eq!(
        check("arping -c 1 -w 2 -I eth0 10.240.3.2 | grep -q 'reply'"),
        0,
        "no proxy ARP for peer addresses"
    );
    down(&b, &vms).expect("down");
    b.remove_namespace(&ns_a).expect("rm a");
    b.remove_namespace(&ns_b).expect("rm b");
}

#[test]
fn faults_are_noticed() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    let b = backend();
    let image = tiny_image(&b);
    let _ns = enter_netns("faults");
    let ns = namespace("erin", 5);
    b.ensure_namespace(&ns).expect("namespace");
    let root = run_root("faults");
    let vms = cluster_specs(&image, &ns, "c1", root.path()).expect("specs");
    let _cleanup = Cleanup {
        backend: &b,
        vms: vms.clone(),
    };

    // A killed qemu is noticed.
    let vm = &vms[0];
    up(&b, std::slice::from_ref(vm), Duration::from_secs(60)).expect("up");
    let pid = b.pid(vm).expect("pid");
    // SAFETY: pid of the qemu we just started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t0 = Instant::now();
    while b.is_running(vm) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "killed qemu still running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    b.stop(vm).expect("stop after kill");
    assert!(!netns::link_exists(&netns::tap_name(
        ns.index,
        vm.tap_number()
    )));

    // A VM that never becomes ready (nothing listens on its probe port): probe stays false, log_tail tells why.
    let mut never = vms[1].clone();
    never.template.probe = "tcp:81".into();
    never.image = without_snapshot(&image);
    assert_eq!(b.start(&never).expect("start"), StartMode::Boot);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        assert!(!b.probe(&never));
        std::thread::sleep(Duration::from_millis(500));
    }
    let tail = b.log_tail(&never).expect("log tail");
    assert!(tail.contains("console.log"), "{tail}");
    // The backend never retries by itself (the orchestrator owns retries): one boot, still the same qemu.
    assert_eq!(tail.matches("starting qemu").count(), 1, "{tail}");
    b.stop(&never).expect("stop");
    b.discard_disk(&never).expect("discard");
    assert!(!b.is_running(&never));
    b.remove_namespace(&ns).expect("remove namespace");
}

/// An ssh session (dropbear in the guest, `dbclient` here) with a key given at restore and at boot.
#[test]
fn ssh_with_keys_given_at_restore_and_boot() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    let b = backend();
    let image = tiny_image(&b);
    let keydir = tempfile::tempdir().expect("tempdir");
    let key = keydir.path().join("id");
    let gen = std::process::Command::new("dropbearkey")
        .args(["-t", "ed25519", "-f"])
        .arg(&key)
        .output()
        .unwrap_or_else(|e| panic!("dropbearkey (Debian dropbear-bin) is needed: {e}"));
    assert!(gen.status.success());
    let public = String::from_utf8_lossy(&gen.stdout)
        .lines()
        .find(|l| l.starts_with("ssh-"))
        .expect("public key")
        .to_string();
    let _ns = enter_netns("ssh");
    let ns = namespace("frank", 6);
    b.ensure_namespace(&ns).expect("namespace");
    let root = run_root("ssh");
    let mut vms = cluster_specs(&image, &ns, "c1", root.path()).expect("specs");
    vms.truncate(2);
    vms[1].image = without_snapshot(&image);
    for vm in &mut vms {
        vm.ssh_keys = vec![public.clone()];
    }
    let _cleanup = Cleanup {
        backend: &b,
        vms: vms.clone(),
    };
    let (modes, _) = up(&b, &vms, b.ready_deadline(&vms[0], StartMode::Boot)).expect("up");
    assert_eq!(modes, vec![StartMode::Restore, StartMode::Boot]);
    for vm in &vms {
        let out = std::process::Command::new("timeout")
            .arg("60")
            .arg("dbclient")
            .args(["-y", "-y", "-i"])
            .arg(&key)
            .arg(format!("root@{}", vm.address))
            .arg("cat /etc/hostname")
            .output()
            .expect("dbclient");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            vm.name,
            "ssh to {}: {}",
            vm.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
