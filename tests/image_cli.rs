//! `fcdev image build tiny --out DIR` through the real binary (needs root: Debian's /boot/vmlinuz-* is 0600).

use std::process::Command;

#[test]
fn image_build_tiny_writes_a_loadable_image() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "needs root to read the guest kernel in /boot"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("tiny");
    let status = Command::new(env!("CARGO_BIN_EXE_fcdev"))
        .args(["image", "build", "tiny", "--out"])
        .arg(&out)
        .env("FCDEV_DATA_DIR", dir.path())
        .output()
        .expect("run fcdev");
    assert!(
        status.status.success(),
        "fcdev image build failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    for f in [
        "image.toml",
        "vmlinuz",
        "initrd.img",
        "root.qcow2",
        "recipe",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let image = fcdev::server::images::Image::load(&out).expect("image.toml loads");
    let names: Vec<&str> = image.spec.vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["n1", "f1", "m1"]);
    assert!(image
        .spec
        .vms
        .iter()
        .all(|v| v.memory_mb == 256 && v.vcpus == 1 && v.probe == "tcp:80"));
    assert!(
        image.snapshot_dir().is_none(),
        "no snapshot before `image snapshot`"
    );
    // An unknown recipe is an error that names the known ones.
    let bad = Command::new(env!("CARGO_BIN_EXE_fcdev"))
        .args(["image", "build", "nope", "--out"])
        .arg(dir.path().join("nope"))
        .output()
        .expect("run fcdev");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("known: tiny"));
}
