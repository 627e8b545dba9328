//! Network namespaces and tunnel nodes for the tunnel tests. Everything runs inside namespaces created here
//! and deleted on drop: no traffic leaves the root namespace except on loopback.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Fails (never skips) when the test cannot run here.
pub fn require_root_and_tun() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the tunnel end-to-end tests need root (network namespaces, TUN devices); run them with sudo"
    );
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "the tunnel end-to-end tests need /dev/net/tun (modprobe tun, or --device /dev/net/tun in a container)"
    );
    for tool in ["ip", "curl", "busybox", "socat", "nft"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(ok, "the tunnel end-to-end tests need `{tool}` installed");
    }
}

pub fn run(cmd: &str) -> Output {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap_or_else(|e| panic!("running `{cmd}`: {e}"))
}

pub fn must(cmd: &str) {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `tunnel_node` example (built by `cargo test`).
pub fn node_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("examples/tunnel_node");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --example tunnel_node` (cargo test builds it)",
        bin.display()
    );
    bin
}

/// A set of namespaces deleted (with every process started in them) on drop.
pub struct Namespaces {
    pub names: Vec<String>,
    children: Vec<Child>,
}

impl Namespaces {
    pub fn new(roles: &[&str]) -> Namespaces {
        let pid = std::process::id();
        let names: Vec<String> = roles.iter().map(|r| format!("fcdevt-{r}-{pid}")).collect();
        let ns = Namespaces {
            names,
            children: Vec::new(),
        };
        for n in &ns.names {
            must(&format!("ip netns add {n} && ip -n {n} link set lo up"));
        }
        ns
    }

    pub fn name(&self, role: &str) -> String {
        format!("fcdevt-{role}-{}", std::process::id())
    }

    /// Runs a shell command inside a namespace.
    pub fn sh(&self, role: &str, cmd: &str) -> Output {
        let ns = self.name(role);
        Command::new("ip")
            .args(["netns", "exec", &ns, "sh", "-c", cmd])
            .output()
            .unwrap_or_else(|e| panic!("running `{cmd}` in {ns}: {e}"))
    }

    pub fn must(&self, role: &str, cmd: &str) -> String {
        let out = self.sh(role, cmd);
        assert!(
            out.status.success(),
            "`{cmd}` in {role} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a background process inside a namespace, killed on drop.
    pub fn spawn_bg(&mut self, role: &str, cmd: &str) {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name(role),
                "sh",
                "-c",
                &format!("exec {cmd}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        self.children.push(child);
    }

    /// Starts a `tunnel_node` inside a namespace and waits for its READY line.
    pub fn node(&self, role: &str, args: &[&str]) -> Node {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name(role)])
            .arg(node_bin())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tunnel_node");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut node = Node {
            child,
            stdin: Some(stdin),
            stdout,
            ready: String::new(),
        };
        node.ready = node.line();
        assert!(
            node.ready.starts_with("READY"),
            "tunnel_node {args:?} did not start: {}",
            node.ready
        );
        node
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            // Kill whatever still runs in the namespace, then delete it.
            let _ = run(&format!("ip netns pids {n} | xargs -r kill -9"));
            let _ = run(&format!("ip netns del {n}"));
        }
    }
}

pub struct Node {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pub ready: String,
}

impl Node {
    fn line(&mut self) -> String {
        let mut s = String::new();
        let _ = self.stdout.read_line(&mut s);
        s.trim().to_string()
    }

    /// Sends one command and returns its one-line answer.
    pub fn cmd(&mut self, line: &str) -> String {
        let stdin = self.stdin.as_mut().expect("node stopped");
        writeln!(stdin, "{line}").expect("write to node");
        stdin.flush().expect("flush");
        self.line()
    }

    /// Closes stdin and waits for a clean exit.
    pub fn stop(mut self) {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "tunnel_node exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "tunnel_node did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Parses `key=value` fields of the hub's STATS line for peer `id`.
pub fn hub_field(stats: &str, id: i64, field: &str) -> String {
    let marker = format!("id={id} ");
    let start = stats
        .find(&marker)
        .unwrap_or_else(|| panic!("no peer {id} in {stats}"));
    let rest = &stats[start..];
    let rest = rest[marker.len()..]
        .split(" id=")
        .next()
        .unwrap_or_default();
    rest.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{field}=")))
        .unwrap_or_else(|| panic!("no {field} for peer {id} in {stats}"))
        .to_string()
}

/// Retries `f` until it returns Some or `timeout` passes.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
