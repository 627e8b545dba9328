//! What the end-to-end tests share: a process killed on drop, a laptop (its own network namespace and config
//! dir) driving the real `fcdev` CLI, `fcdev server --dev` in a host namespace, VM process counts.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::netns::*;

pub const FCDEV: &str = env!("CARGO_BIN_EXE_fcdev");

pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn require_vm_tools() {
    for (tool, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
    ] {
        let ok = run(&format!("command -v {tool}")).status.success();
        assert!(
            ok,
            "the end-to-end test needs `{tool}` (Debian package {package})"
        );
    }
    assert!(
        run("ls /boot/vmlinuz-*").status.success(),
        "the end-to-end test needs a guest kernel: apt-get install --no-install-recommends linux-image-cloud-amd64"
    );
}

/// The tiny image with its onboarding snapshot, built once with the real CLI into target/fcdev-test-images.
pub fn tiny_image() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fcdev-test-images/tiny");
    // An image of another recipe (the init script changed) is stale, and so is its snapshot.
    let recipe = format!("tiny {}\n", fcdev::image::build::tiny_recipe_hash());
    if dir.exists()
        && std::fs::read_to_string(dir.join(fcdev::image::build::RECIPE_FILE)).ok() != Some(recipe)
    {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let snapshot_ready = dir.join("snapshot").is_dir();
    let image_cmd = |verb: &str| {
        let out = Command::new(FCDEV)
            .args(["image", verb, "tiny", "--out"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fcdev image {verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    };
    if !dir.join("image.toml").is_file() || !dir.join("initrd.img").is_file() {
        image_cmd("build");
    }
    if !snapshot_ready {
        image_cmd("snapshot");
    }
    dir
}

pub struct Laptop<'a> {
    pub ns: String,
    pub cfg: PathBuf,
    pub nss: &'a Namespaces,
    pub role: &'static str,
}

impl Laptop<'_> {
    pub fn fcdev(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, FCDEV])
            .args(args)
            .env("FCDEV_CONFIG_DIR", &self.cfg);
        c
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.fcdev(args).stdin(Stdio::null()).output().unwrap();
        assert!(
            out.status.success(),
            "fcdev {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn login(&self, url: &str, token: &str) {
        let mut c = self
            .fcdev(&["login", "--server", url, "--token-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(token.as_bytes()).unwrap();
        assert!(c.wait().unwrap().success(), "fcdev login");
    }

    pub fn tunnel(&self, args: &[&str]) -> Proc {
        let mut full = vec!["tunnel"];
        full.extend_from_slice(args);
        Proc(
            self.fcdev(&full)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    /// curl inside the laptop namespace, retried until it answers (the handshake takes a moment).
    pub fn curl(&self, args: &str) -> Option<String> {
        eventually(Duration::from_secs(15), || {
            let o = self
                .nss
                .sh(self.role, &format!("curl -s --fail --max-time 3 {args}"));
            o.status
                .success()
                .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
        })
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status JSON")
    }
}

/// `fcdev server --dev` in the host namespace; returns it and the login token it printed.
pub fn spawn_server(host: &str, data_dir: &Path, images: &Path) -> (Proc, Option<String>) {
    spawn_server_at(host, data_dir, images, "192.168.81.1")
}

/// `fcdev server --dev` in the host namespace listening on `ip` (API :7070, hub :51820).
pub fn spawn_server_at(
    host: &str,
    data_dir: &Path,
    images: &Path,
    ip: &str,
) -> (Proc, Option<String>) {
    spawn_server_with(host, data_dir, images, ip, &[])
}

/// `spawn_server_at` with more server arguments; the server's log goes to `DATA_DIR/../server.log` (appended).
pub fn spawn_server_with(
    host: &str,
    data_dir: &Path,
    images: &Path,
    ip: &str,
    extra: &[&str],
) -> (Proc, Option<String>) {
    let log = data_dir
        .parent()
        .map(|d| d.join("server.log"))
        .and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        })
        .map(Stdio::from)
        .unwrap_or_else(Stdio::null);
    let mut server = Proc(
        Command::new("ip")
            .args([
                "netns", "exec", host, FCDEV, "server", "--dev", "--netns", "none",
            ])
            .args(["--user", "alice", "--listen", &format!("{ip}:7070")])
            .args([
                "--hub-listen",
                &format!("{ip}:51820"),
                "--hub-tun",
                "fcdevhub",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--images")
            .arg(images)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn fcdev server"),
    );
    let mut lines = BufReader::new(server.0.stdout.take().unwrap()).lines();
    let mut token = None;
    for line in lines.by_ref() {
        let line = line.expect("server output");
        eprintln!("server: {line}");
        if let Some(t) = line.split_whitespace().find(|w| w.starts_with("fcd_")) {
            token = Some(t.to_string());
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (server, token)
}

pub fn qemu_pids(data_dir: &Path) -> Vec<String> {
    let out = Command::new("pgrep")
        .args([
            "-f",
            "--",
            &format!("qemu-system.*{}/vms/", data_dir.display()),
        ])
        .output()
        .unwrap();
    let mut pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    pids.sort();
    pids
}

pub fn qemu_count(data_dir: &Path) -> usize {
    qemu_pids(data_dir).len()
}

/// A test's folders: `data` for the server and `images` holding `name` (a link to the built image `image`).
pub fn workdir_with_image(name: &str, image: &Path) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::os::unix::fs::symlink(image, images.join(name)).unwrap();
    (tmp, data_dir, images)
}

/// `fcdev server user add NAME` in the host namespace; returns the token it printed.
pub fn add_user(host: &str, data_dir: &Path, name: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", host, FCDEV, "server", "user", "add", name])
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "user add {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A LAN: a bridge `lan` in the host namespace at `NET.1/24`, and one veth per laptop (`NET.2`, `NET.3`, …).
pub fn lan(nss: &Namespaces, host_role: &str, net: &str, laptops: &[&str]) {
    let host = nss.name(host_role);
    must(&format!(
        "ip -n {host} link add lan type bridge && ip -n {host} addr add {net}.1/24 dev lan && ip -n {host} link set lan up"
    ));
    for (i, role) in laptops.iter().enumerate() {
        let ns = nss.name(role);
        let ip = format!("{net}.{}", i + 2);
        must(&format!(
            "ip -n {host} link add v{role} type veth peer name lan0 netns {ns} && \
             ip -n {host} link set v{role} master lan up && \
             ip -n {ns} addr add {ip}/24 dev lan0 && ip -n {ns} link set lan0 up"
        ));
    }
}

/// `fcdev server` with the tiny image (real VMs) in a host namespace, and alice's laptop namespace on a LAN
/// (`NET.1` the host, `NET.2` the laptop), logged in. Fields drop in order: the server, then the namespaces.
pub struct TinyLab {
    pub server: Proc,
    pub nss: Namespaces,
    pub laptop_role: &'static str,
    pub url: String,
    pub data_dir: PathBuf,
    pub tmp: tempfile::TempDir,
}

impl TinyLab {
    /// Roles are short (they name veth devices); `net` is a /24 prefix such as `192.168.86`, unique per test.
    pub fn start(host_role: &'static str, laptop_role: &'static str, net: &str) -> TinyLab {
        require_root_and_tun();
        require_vm_tools();
        let image = tiny_image();
        let (tmp, data_dir, images) = workdir_with_image("tiny", &image);
        let nss = Namespaces::new(&[host_role, laptop_role]);
        lan(&nss, host_role, net, &[laptop_role]);
        let ip = format!("{net}.1");
        let (server, token) = spawn_server_at(&nss.name(host_role), &data_dir, &images, &ip);
        let token = token.expect("the server printed a login token");
        let lab = TinyLab {
            server,
            nss,
            laptop_role,
            url: format!("http://{ip}:7070"),
            data_dir,
            tmp,
        };
        lab.alice().login(&lab.url, &token);
        lab
    }

    pub fn alice(&self) -> Laptop<'_> {
        Laptop {
            ns: self.nss.name(self.laptop_role),
            cfg: self.tmp.path().join("alice"),
            nss: &self.nss,
            role: self.laptop_role,
        }
    }
}
