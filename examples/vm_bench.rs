//! VM benchmark: cold boot vs snapshot restore of a whole cluster (the tiny image's 3 VMs), until every VM
//! answers HTTP with its own page. Runs inside a private network namespace; needs root.
//!
//! cargo run --release --example vm_bench -- [--runs 5] [--image DIR] [--accel auto|kvm|tcg]
//! (bench/vm.sh wraps it and builds the image and snapshot first.)

use std::path::PathBuf;
use std::time::Duration;

use fcdev::server::backend::qemu::bench::{
    cluster_specs, down, median, namespace, pss_kib, serves_own_page, up_until,
};
use fcdev::server::backend::qemu::{Accel, QemuBackend, QemuConfig};
use fcdev::server::backend::{Backend, StartMode};
use fcdev::server::images::Image;
use fcdev::server::netns::ThreadNetns;

fn main() -> anyhow::Result<()> {
    let mut runs = 5usize;
    let mut image_dir = PathBuf::from("target/fcdev-test-images/tiny");
    let mut accel = Accel::Auto;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--runs" => runs = val()?.parse()?,
            "--image" => image_dir = PathBuf::from(val()?),
            "--accel" => accel = val()?.parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let backend = QemuBackend::new(QemuConfig {
        accel,
        qemu_binary: None,
    })?;
    let image = Image::load(&image_dir)?;
    anyhow::ensure!(
        image.snapshot_dir().is_some(),
        "{} has no snapshot: run `fcdev image snapshot`",
        image_dir.display()
    );
    let mut cold_image = image.clone();
    cold_image.spec.snapshot = None;
    let _netns = ThreadNetns::create_and_enter(&format!("fcdevbench-{}", std::process::id()))?;
    let ns = namespace("bench", 9);
    backend.ensure_namespace(&ns)?;
    let root = tempfile::tempdir()?;
    let deadline = image
        .spec
        .vms
        .iter()
        .map(|t| backend.boot_deadline_of(t))
        .max()
        .unwrap_or_default()
        * 2
        + Duration::from_secs(20);
    let mut boot = Vec::new();
    let mut restore = Vec::new();
    let mut pss = Vec::new();
    println!(
        "accelerator: {}  VMs: {}  runs: {runs}",
        backend.accel(),
        image.spec.vms.len()
    );
    for run in 0..runs {
        for (label, img) in [("boot", &cold_image), ("restore", &image)] {
            let vms = cluster_specs(
                img,
                &ns,
                "bench",
                &root.path().join(format!("{label}{run}")),
            )?;
            let result = up_until(&backend, &vms, deadline, serves_own_page);
            let (modes, took) = match result {
                Ok(r) => r,
                Err(e) => {
                    let _ = down(&backend, &vms);
                    return Err(anyhow::anyhow!("{label} run {run}: {e:?}"));
                }
            };
            let want = if label == "boot" {
                StartMode::Boot
            } else {
                StartMode::Restore
            };
            if modes.iter().any(|m| *m != want) {
                let _ = down(&backend, &vms);
                anyhow::bail!("{label}: modes {modes:?}");
            }
            if label == "restore" {
                std::thread::sleep(Duration::from_millis(300));
                for vm in &vms {
                    if let Some(kib) = backend.pid(vm).and_then(pss_kib) {
                        pss.push(kib);
                    }
                }
                if std::env::var_os("FCDEV_BENCH_SMAPS").is_some() {
                    if let Some(pid) = backend.pid(&vms[0]) {
                        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
                        // Mappings above 1 MB PSS: "address perms offset dev inode path" lines head each block.
                        let mut head = String::new();
                        for line in smaps.lines() {
                            let first = line.split_whitespace().next().unwrap_or("");
                            if first.contains('-') && !first.ends_with(':') {
                                head = line.to_string();
                            } else if let Some(v) = line.strip_prefix("Pss:") {
                                let kib: u64 =
                                    v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                                if kib > 1024 {
                                    println!("    {kib:>7} kB  {head}");
                                }
                            }
                        }
                    }
                }
                restore.push(took);
            } else {
                boot.push(took);
            }
            println!("run {run} {label:7} {:.3} s", took.as_secs_f64());
            if std::env::var_os("FCDEV_BENCH_VERBOSE").is_some() {
                std::thread::sleep(Duration::from_millis(500));
                for vm in &vms {
                    let log =
                        std::fs::read_to_string(vm.run_dir.join("qemu.log")).unwrap_or_default();
                    for line in log.lines().filter(|l| l.starts_with("fcdev:")) {
                        println!("    {} {line}", vm.name);
                    }
                }
            }
            down(&backend, &vms)?;
        }
    }
    backend.remove_namespace(&ns)?;
    let mb = median(&boot);
    let mr = median(&restore);
    pss.sort();
    let pss_med = pss.get(pss.len() / 2).copied().unwrap_or(0);
    println!(
        "cold boot (3 VMs, all answering HTTP): median {:.3} s",
        mb.as_secs_f64()
    );
    println!(
        "snapshot restore (3 VMs, all answering HTTP): median {:.3} s",
        mr.as_secs_f64()
    );
    println!(
        "speedup: {:.1}x  PSS per restored VM: median {} MB",
        mb.as_secs_f64() / mr.as_secs_f64().max(1e-9),
        pss_med / 1024
    );
    Ok(())
}
