//! Helpers shared by the integration tests and the VM benchmark: VM specs for a whole image template and
//! "start every VM at once, wait until every probe answers".

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::api::Subnet;
use crate::server::backend::{
    Backend, BackendError, BackendResult, NamespaceNet, StartMode, VmSpec,
};
use crate::server::images::Image;

/// A namespace `name` with index `index` on 10.240.<index>.0/24.
pub fn namespace(name: &str, index: u32) -> NamespaceNet {
    let subnet = Subnet::new(Ipv4Addr::new(10, 240, (index % 256) as u8, 0), 24);
    NamespaceNet {
        name: name.to_string(),
        index,
        subnet,
        gateway: subnet.host(1),
    }
}

/// The specs of every VM of `image` in `ns`, run dirs under `run_root/<vm>` (created).
pub fn cluster_specs(
    image: &Image,
    ns: &NamespaceNet,
    cluster: &str,
    run_root: &Path,
) -> std::io::Result<Vec<VmSpec>> {
    image
        .spec
        .vms
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let slot = i as u32;
            let run_dir = run_root.join(&t.name);
            std::fs::create_dir_all(&run_dir)?;
            let hosts = image
                .spec
                .vms
                .iter()
                .enumerate()
                .map(|(j, t)| (vec![t.name.clone()], ns.subnet.host(10 + j as u32)))
                .collect();
            Ok(VmSpec {
                hosts,
                namespace: ns.clone(),
                cluster: cluster.to_string(),
                slot,
                name: t.name.clone(),
                address: ns.subnet.host(10 + slot),
                mac: format!("52:54:00:fc:{:02x}:{:02x}", ns.index % 256, 10 + slot),
                image: image.clone(),
                template: t.clone(),
                run_dir,
                ssh_keys: Vec::new(),
                restore_from: None,
            })
        })
        .collect()
}

/// Start every VM (in parallel) and wait until all probes answer; returns the modes and the elapsed time.
pub fn up(
    backend: &dyn Backend,
    vms: &[VmSpec],
    deadline: Duration,
) -> BackendResult<(Vec<StartMode>, Duration)> {
    up_until(backend, vms, deadline, |vm| backend.probe(vm))
}

/// Whether `vm` serves a page over HTTP that names it.
pub fn serves_own_page(vm: &VmSpec) -> bool {
    http_get(vm.address).is_ok_and(|p| p.contains(&format!("vm {} ", vm.name)))
}

/// Start every VM (in parallel) and wait until `ready` holds for all of them.
pub fn up_until(
    backend: &dyn Backend,
    vms: &[VmSpec],
    deadline: Duration,
    ready_check: impl Fn(&VmSpec) -> bool,
) -> BackendResult<(Vec<StartMode>, Duration)> {
    let t0 = Instant::now();
    let modes: Vec<BackendResult<StartMode>> = std::thread::scope(|s| {
        let handles: Vec<_> = vms
            .iter()
            .map(|vm| s.spawn(move || backend.start(vm)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(BackendError::msg("start panicked")))
            })
            .collect()
    });
    let modes = modes.into_iter().collect::<BackendResult<Vec<_>>>()?;
    let mut ready = vec![false; vms.len()];
    loop {
        for (i, vm) in vms.iter().enumerate() {
            if !ready[i] {
                ready[i] = ready_check(vm);
            }
        }
        if ready.iter().all(|r| *r) {
            return Ok((modes, t0.elapsed()));
        }
        if t0.elapsed() > deadline {
            let (i, vm) = vms
                .iter()
                .enumerate()
                .find(|(i, _)| !ready[*i])
                .ok_or_else(|| BackendError::msg("inconsistent readiness"))?;
            let _ = i;
            return Err(BackendError::Failed {
                message: format!("{} not ready within {} s", vm.name, deadline.as_secs()),
                log_tail: backend.log_tail(vm),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Stop every VM and throw its disk away.
pub fn down(backend: &dyn Backend, vms: &[VmSpec]) -> BackendResult<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = vms
            .iter()
            .map(|vm| {
                s.spawn(move || {
                    backend.stop(vm)?;
                    backend.discard_disk(vm)
                })
            })
            .collect();
        for h in handles {
            h.join()
                .unwrap_or_else(|_| Err(BackendError::msg("stop panicked")))?;
        }
        Ok(())
    })
}

/// Fetch `http://addr/` (HTTP/1.0) and return the body.
pub fn http_get(addr: Ipv4Addr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&(addr, 80).into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(out))
}

/// Proportional set size of a process in KiB (shared snapshot pages are split between the VMs mapping them).
pub fn pss_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find(|l| l.starts_with("Pss:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Median of durations (sorted copy).
pub fn median(values: &[Duration]) -> Duration {
    let mut v = values.to_vec();
    v.sort();
    if v.is_empty() {
        Duration::ZERO
    } else {
        v[v.len() / 2]
    }
}
