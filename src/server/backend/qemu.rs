//! Real VMs with qemu-system-x86_64 (placeholder).
