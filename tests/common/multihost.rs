//! A control plane and its agents on loopback, for the multi-host tests: `fcdev server --role control` on a
//! fresh PostgreSQL database (tests/common/pg.rs) and `fcdev server --role agent` processes with the process
//! backend and the tiny template (tests/fixtures/process-tiny.toml).
//!
//! A test binary that uses it declares, at its root: `mod common;`, `#[path = "common/pg.rs"] mod pg;` and
//! `#[path = "common/multihost.rs"] mod multihost;`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{self, fcdev_bin, json, TestServer, TINY_TOML};
use crate::pg;

/// `fcdev server host …` with these store arguments (`--data-dir D` or `--database URL`).
pub fn host_cmd(at: &[&str], args: &[&str]) -> std::process::Output {
    Command::new(fcdev_bin())
        .args(["server", "host"])
        .args(args)
        .args(at)
        .env_remove("FCDEV_DATABASE")
        .env_remove("FCDEV_DATA_DIR")
        .output()
        .expect("run fcdev server host")
}

/// `fcdev server host add NAME`: its token.
pub fn add_host(at: &[&str], name: &str) -> String {
    let out = host_cmd(at, &["add", name, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out.stdout);
    assert_eq!(v["name"], name);
    v["token"].as_str().expect("a token").to_string()
}

/// `fcdev server host list --json`.
pub fn hosts(at: &[&str]) -> serde_json::Value {
    let out = host_cmd(at, &["list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&out.stdout)
}

pub fn host<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("no host {name} in {list}"))
}

/// A control plane (`--role control`) on a fresh PostgreSQL database, with this lease. Its `server.token` is
/// alice's (`--user alice`).
pub struct Control {
    pub server: TestServer,
    pub url: String,
}

impl Control {
    pub fn start(lease_secs: u64) -> Control {
        let url = pg::shared().database();
        let lease = lease_secs.to_string();
        let server = TestServer::start_with(
            &[],
            &[
                "--role",
                "control",
                "--database",
                &url,
                "--host-lease",
                &lease,
            ],
        );
        Control { server, url }
    }

    pub fn at(&self) -> [&str; 2] {
        ["--database", &self.url]
    }

    pub fn hosts(&self) -> serde_json::Value {
        hosts(&self.at())
    }

    pub fn state_of(&self, name: &str) -> String {
        host(&self.hosts(), name)["state"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// An agent process (`--role agent`); killed when dropped.
pub struct Agent {
    pub child: Child,
    stderr: Arc<Mutex<String>>,
    registered: mpsc::Receiver<String>,
    pub data: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl Agent {
    /// Start an agent for `name` with `token`, its data dir in `data` (a fresh one when None), the tiny image
    /// in its catalog.
    pub fn start(control: &str, name: &str, token: &str, data: Option<&Path>) -> Agent {
        let (dir, data): (Option<tempfile::TempDir>, PathBuf) = match data {
            Some(d) => (None, d.to_path_buf()),
            None => {
                let t = tempfile::tempdir().unwrap();
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let images = data.join("images").join("tiny");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::write(images.join("image.toml"), TINY_TOML).unwrap();
        let mut child = Command::new(fcdev_bin())
            .args([
                "server",
                "--role",
                "agent",
                "--control",
                control,
                "--host-name",
                name,
            ])
            .args(["--hub-listen", "127.0.0.1:0", "--hub-tun", "none"])
            .args(["--backend", "process"])
            .arg("--data-dir")
            .arg(&data)
            .env("FCDEV_HOST_TOKEN", token)
            .env_remove("FCDEV_DATABASE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the agent");
        let (tx, registered) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("registered with") {
                    let _ = tx.send(line);
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Agent {
            child,
            stderr,
            registered,
            data: data.clone(),
            dir,
        }
    }

    /// Wait until the agent says it registered; panics with its stderr when it exits first.
    pub fn wait_registered(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self
                .registered
                .recv_timeout(Duration::from_millis(100))
                .is_ok()
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the agent exited ({status}): {}", self.stderr());
            }
        }
        panic!("the agent did not register: {}", self.stderr());
    }

    /// Wait for the agent to exit: its exit status and stderr.
    pub fn wait_exit(&mut self, within: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the stderr thread take the last bytes.
                std::thread::sleep(Duration::from_millis(100));
                return (status, self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the agent still runs after {within:?}: {}", self.stderr());
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        // A data dir of its own is never reused by another agent: its VMs go with it (a killed agent's
        // process-backend VMs outlive it, as qemu would).
        if self.dir.is_some() {
            common::kill_vms(&self.data);
        }
    }
}

/// Kills the VMs left in data dirs shared by successive agents, once the agents are gone (declare it after the
/// dirs and before the agents: locals drop in reverse order).
pub struct Reaper(pub Vec<PathBuf>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for d in &self.0 {
            common::kill_vms(d);
        }
    }
}

/// `fcdev server user add NAME` on the control plane's database: the engineer's token.
pub fn add_user(at: &[&str], name: &str) -> String {
    let out = Command::new(fcdev_bin())
        .args(["server", "user", "add", name])
        .args(at)
        .env_remove("FCDEV_DATABASE")
        .output()
        .expect("run fcdev server user add");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `GET /v1/clusters/dev` as this engineer.
pub fn cluster(url: &str, token: &str) -> serde_json::Value {
    let (code, body) = common::http(url, "GET", "/v1/clusters/dev", Some(token), None);
    assert_eq!(code, 200, "{body}");
    json(body.as_bytes())
}

/// Wait until the engineer's cluster `dev` is in `state`; its view.
pub fn wait_state(url: &str, token: &str, state: &str, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let c = cluster(url, token);
        if c["state"] == state {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "not {state} after {within:?}: {c}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The VM processes of a data dir that are alive: (VM run dir, pid), by run dir.
pub fn live_vms(data: &Path) -> Vec<(PathBuf, i32)> {
    let mut out: Vec<(PathBuf, i32)> = common::find_files(&data.join("vms"), "vm.pid")
        .into_iter()
        .filter_map(|f| {
            let pid: i32 = std::fs::read_to_string(&f).ok()?.trim().parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Not a zombie.
            let state = stat.rsplit_once(") ")?.1.split_whitespace().next()?;
            (state != "Z").then(|| (f.parent().unwrap().to_path_buf(), pid))
        })
        .collect();
    out.sort();
    out
}
