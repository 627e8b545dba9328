//! `fcdev image snapshot NAME`: the onboarding snapshot of a built image.

use std::path::Path;

use super::{BuildError, BuildResult};
use crate::server::backend::qemu::{snapshot as qsnap, QemuBackend};
use crate::server::images::Image;

#[derive(Debug, Clone)]
pub struct SnapshotReport {
    pub accel: String,
    /// (snapshot key, VMs sharing it, save time in ms)
    pub snapshots: Vec<(String, Vec<String>, u64)>,
}

/// Take one snapshot per distinct VM shape of the image (VMs with the same kernel, initrd, disk, arguments and
/// size share one), into `image_dir/<snapshot dir>/`. Runs the guests on a NIC that reaches nothing.
pub fn snapshot_image(image_dir: &Path, backend: &QemuBackend) -> BuildResult<SnapshotReport> {
    let image_dir = image_dir.canonicalize().map_err(super::io_err(format!(
        "image folder {}",
        image_dir.display()
    )))?;
    let image = Image::load(&image_dir).map_err(|e| BuildError::Other(e.to_string()))?;
    let rel = image
        .spec
        .snapshot
        .as_ref()
        .map(|s| s.dir.clone())
        .unwrap_or_else(|| "snapshot".to_string());
    let root = image.path(&rel);
    if root.exists() {
        std::fs::remove_dir_all(&root).map_err(super::io_err("removing the old snapshot"))?;
    }
    let tmp = image.path(&format!("{rel}.new"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(super::io_err("removing a partial snapshot"))?;
    }
    std::fs::create_dir_all(&tmp).map_err(super::io_err("creating the snapshot folder"))?;
    let accel = backend.accel();
    if image.spec.snapshot.as_ref().is_some_and(|s| s.cluster) {
        let progress = |msg: &str| eprintln!("snapshot {}: {msg}", image.spec.name);
        let metas = backend
            .take_cluster_snapshot(&image, &tmp, &progress)
            .map_err(backend_error)?;
        let save_ms = metas.first().map(|m| m.save_ms).unwrap_or(0);
        let key = metas.first().map(|m| m.key.clone()).unwrap_or_default();
        let vms = metas.iter().flat_map(|m| m.vms.clone()).collect();
        std::fs::rename(&tmp, &root).map_err(super::io_err("publishing the snapshot"))?;
        return Ok(SnapshotReport {
            accel: accel.to_string(),
            snapshots: vec![(key, vms, save_ms)],
        });
    }
    let mut groups: Vec<(String, Vec<String>, usize)> = Vec::new();
    for (i, vm) in image.spec.vms.iter().enumerate() {
        let key = qsnap::key(vm, accel);
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(g) => g.1.push(vm.name.clone()),
            None => groups.push((key, vec![vm.name.clone()], i)),
        }
    }
    let mut report = SnapshotReport {
        accel: accel.to_string(),
        snapshots: Vec::new(),
    };
    for (key, vms, i) in &groups {
        let (key, vms, i) = (key.clone(), vms.clone(), *i);
        // The snapshot's disk writes go into the base only when no other snapshot of this image shares it.
        let disk = &image.spec.vms[i].disk;
        let shared = groups
            .iter()
            .filter(|g| g.0 != key)
            .any(|g| image.spec.vms[g.2].disk == *disk);
        let meta = backend
            .take_snapshot(&image, &image.spec.vms[i], &tmp, vms.clone(), !shared)
            .map_err(backend_error)?;
        report.snapshots.push((key, vms, meta.save_ms));
    }
    std::fs::rename(&tmp, &root).map_err(super::io_err("publishing the snapshot"))?;
    Ok(report)
}

fn backend_error(e: crate::server::backend::BackendError) -> BuildError {
    match e {
        crate::server::backend::BackendError::Failed { message, log_tail } => {
            BuildError::Other(match log_tail {
                Some(t) => format!("{message}\n{t}"),
                None => message,
            })
        }
        other => BuildError::Other(other.to_string()),
    }
}
