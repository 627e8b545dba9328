//! The package step of `install.sh` and `.ci/run` (scripts/install-packages.sh), run for real against stub
//! `apt-get`, `apt-cache`, `dpkg-query` and `sudo` (tests/install_stub/) that behave like apt on a fresh machine of
//! this image: qemu-utils 1:10 from bookworm-backports is installed and Breaks the qemu-system-common that
//! qemu-system-x86 7.2 needs, so apt removes it (or refuses) unless qemu-utils is pinned to 7.2 with
//! --allow-downgrades. The machine's own packages are never touched: the scripts see a PATH of the stubs, the
//! programs the stub "installed", and a few real tools (bash, sed, grep, ...), and no cargo, so install.sh and
//! .ci/run stop right after the package step.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const QEMU_BOOKWORM: &str = "1:7.2+dfsg-7+deb12u18+b3";
const QEMU_BACKPORTS: &str = "1:10.0.2+ds-2+deb13u1~bpo12+1";

/// Real programs the scripts and the stubs use (everything else they run must come from a stub package).
const TOOLS: &[&str] = &[
    "bash", "env", "id", "dirname", "basename", "sed", "grep", "head", "cat", "ls", "tr", "mkdir",
    "rm", "chmod", "sort",
];

const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-utils",
    "linux-image-cloud-amd64",
    "busybox-static",
    "dropbear-bin",
    "iproute2",
    "nftables",
    "procps",
    "curl",
    "ca-certificates",
    "openssh-client",
    "openssh-sftp-server",
    "rsync",
    "xz-utils",
    "zstd",
    "gcc",
    "debootstrap",
    "e2fsprogs",
];

const CI_PACKAGES: &[&str] = &[
    "socat",
    "iperf3",
    "wireguard-tools",
    "wireguard-go",
    "mariadb-client-core",
    "postgresql-15",
    "postgresql-client-15",
];

/// A fresh machine of this image, as the stubs see it.
struct FakeHost {
    dir: tempfile::TempDir,
}

impl FakeHost {
    fn fresh_image() -> FakeHost {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for d in ["apt", "bin", "state", "tools"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        let stubs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/install_stub");
        for f in ["apt-get", "apt-cache", "dpkg-query", "sudo", "common.sh"] {
            std::fs::copy(stubs.join(f), root.join("apt").join(f)).expect("copy stub");
        }
        for tool in TOOLS {
            let real = ["/usr/bin", "/bin"]
                .iter()
                .map(|d| Path::new(d).join(tool))
                .find(|p| p.is_file())
                .unwrap_or_else(|| panic!("{tool} not found in /usr/bin or /bin"));
            std::os::unix::fs::symlink(real, root.join("tools").join(tool)).expect("symlink");
        }
        let host = FakeHost { dir };
        // What the image ships: qemu-utils from bookworm-backports (with its qemu-img).
        host.set_installed("qemu-utils", QEMU_BACKPORTS);
        let img = host.dir.path().join("bin/qemu-img");
        std::fs::write(&img, "#!/bin/sh\necho qemu-img 10\n").expect("write");
        Command::new("chmod")
            .arg("+x")
            .arg(&img)
            .status()
            .expect("chmod");
        host
    }

    fn set_installed(&self, package: &str, version: &str) {
        std::fs::write(
            self.dir.path().join("state").join(package),
            format!("{version}\n"),
        )
        .expect("write state");
    }

    fn installed(&self, package: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join("state").join(package))
            .ok()
            .map(|s| s.trim().to_string())
    }

    fn has_program(&self, program: &str) -> bool {
        self.dir.path().join("bin").join(program).is_file()
    }

    /// Every stub call, one per line (`apt-get install -y ...`).
    fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("calls")).unwrap_or_default()
    }

    fn path(&self) -> String {
        let r = self.dir.path();
        format!(
            "{}:{}:{}",
            r.join("apt").display(),
            r.join("bin").display(),
            r.join("tools").display()
        )
    }

    /// Run a script of the repository (relative path) with the stub PATH and no other environment.
    fn run(&self, script: &str, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
        let path = repo().join(script);
        let mut cmd = Command::new("/bin/bash");
        cmd.arg(&path)
            .args(args)
            .env_clear()
            .env("PATH", self.path())
            .env("FCDEV_EXTRA_PATH", "")
            .env("HOME", self.dir.path())
            .current_dir(self.dir.path());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.output().expect("run script")
    }

    /// The outcome of asking apt directly (to show the stub behaves like the image).
    fn apt_get(&self, args: &[&str]) -> Output {
        Command::new(self.dir.path().join("apt/apt-get"))
            .args(args)
            .env_clear()
            .env("PATH", self.path())
            .output()
            .expect("run stub apt-get")
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The single `apt-get install` call: it named every package, without recommends.
fn assert_one_install_of(host: &FakeHost, packages: &[&str]) {
    let calls = host.calls();
    let installs: Vec<&str> = calls
        .lines()
        .filter(|l| l.starts_with("apt-get install"))
        .collect();
    assert_eq!(installs.len(), 1, "one apt-get install call:\n{calls}");
    let words: Vec<&str> = installs[0].split_whitespace().collect();
    assert!(words.contains(&"--no-install-recommends"), "{calls}");
    for p in packages {
        assert!(
            words
                .iter()
                .any(|w| *w == *p || w.starts_with(&format!("{p}="))),
            "apt-get install did not name {p}:\n{calls}"
        );
    }
    assert!(!calls.contains("recommends installed"), "{calls}");
}

fn assert_packages_and_programs(host: &FakeHost, packages: &[&str], programs: &[&str]) {
    for p in packages {
        assert!(host.installed(p).is_some(), "{p} not installed");
    }
    for p in programs {
        assert!(host.has_program(p), "{p} missing");
    }
    assert_eq!(host.installed("qemu-utils").as_deref(), Some(QEMU_BOOKWORM));
    assert_eq!(
        host.installed("qemu-system-x86").as_deref(),
        Some(QEMU_BOOKWORM)
    );
}

const HOST_PROGRAMS: &[&str] = &[
    "qemu-system-x86_64",
    "qemu-img",
    "busybox",
    "dropbear",
    "ip",
    "nft",
    "debootstrap",
    "mkfs.ext4",
];

#[test]
fn stub_apt_refuses_or_removes_qemu_utils_like_the_fresh_image() {
    let host = FakeHost::fresh_image();
    let out = host.apt_get(&[
        "install",
        "-y",
        "--no-install-recommends",
        "qemu-system-x86",
        "qemu-utils",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("held broken packages"),
        "{}",
        text(&out)
    );
    let pinned = format!("qemu-utils={QEMU_BOOKWORM}");
    let out = host.apt_get(&["install", "-y", "qemu-system-x86", &pinned]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("without --allow-downgrades"),
        "{}",
        text(&out)
    );
    let out = host.apt_get(&["install", "-y", "qemu-system-x86"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(host.installed("qemu-utils"), None);
    assert!(!host.has_program("qemu-img"));
}

#[test]
fn install_sh_on_a_fresh_image_keeps_qemu_img_and_installs_the_whole_list() {
    let host = FakeHost::fresh_image();
    let out = host.run("install.sh", &[], &[]);
    let all = text(&out);
    // No cargo on the stub PATH: install.sh stops right after the package step, which must have succeeded.
    assert!(all.contains("cargo not found"), "{all}");
    assert!(!all.contains("still missing"), "{all}");
    assert_one_install_of(&host, HOST_PACKAGES);
    assert_packages_and_programs(&host, HOST_PACKAGES, HOST_PROGRAMS);

    // A second run asks apt for the whole list again and changes nothing.
    let out = host.run("scripts/install-packages.sh", &[], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_packages_and_programs(&host, HOST_PACKAGES, HOST_PROGRAMS);
}

#[test]
fn ci_run_on_a_fresh_image_installs_the_test_packages_too() {
    let host = FakeHost::fresh_image();
    let out = host.run(".ci/run", &[], &[]);
    let all = text(&out);
    // .ci/run goes on to `cargo test`, which the stub PATH does not have.
    assert!(all.contains("cargo: command not found"), "{all}");
    assert!(all.contains("qemu: qemu-system-x86_64 (stub"), "{all}");
    let every: Vec<&str> = HOST_PACKAGES.iter().chain(CI_PACKAGES).copied().collect();
    assert_one_install_of(&host, &every);
    let programs: Vec<&str> = HOST_PROGRAMS
        .iter()
        .chain(&[
            "wg",
            "wireguard-go",
            "iperf3",
            "socat",
            "dbclient",
            "mariadb",
        ])
        .copied()
        .collect();
    assert_packages_and_programs(&host, &every, &programs);
}

#[test]
fn install_packages_names_a_program_still_missing_after_apt() {
    let host = FakeHost::fresh_image();
    let out = host.run(
        "scripts/install-packages.sh",
        &[],
        &[("STUB_BROKEN", "debootstrap")],
    );
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("program debootstrap (package debootstrap)"),
        "{all}"
    );
    // Only what is missing is named.
    assert!(!all.contains("program qemu-img"), "{all}");
}
