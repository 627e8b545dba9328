//! Real VMs with qemu-system-x86_64 (placeholder until the VM work lands).

use std::sync::Arc;

use super::Backend;

pub fn make(_accel: &str) -> anyhow::Result<Arc<dyn Backend>> {
    anyhow::bail!(
        "the qemu backend is not available in this build; use --backend process for tests"
    )
}
