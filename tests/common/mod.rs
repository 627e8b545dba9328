//! Test support: a real `fcdev server` on an ephemeral loopback port with temp dirs, and `fcdev` commands pointed
//! at it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn fcdev_bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("fcdev")
}

/// The 3-VM template of the tiny image, for the test (process) backend (bench/api-latency.sh reads it too).
pub const TINY_TOML: &str = include_str!("../fixtures/process-tiny.toml");

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub token: String,
    child: Option<Child>,
    extra_args: Vec<String>,
}

impl TestServer {
    /// A server with the test backend and the given images (name, image.toml).
    pub fn start(images: &[(&str, &str)]) -> TestServer {
        Self::start_with(images, &[])
    }

    pub fn start_with(images: &[(&str, &str)], extra: &[&str]) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, toml) in images {
            let d = dir.path().join("images").join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("image.toml"), toml).unwrap();
        }
        let mut s = TestServer {
            dir,
            url: String::new(),
            token: String::new(),
            child: None,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn("127.0.0.1:0");
        s
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("cfg")
    }

    fn spawn(&mut self, listen: &str) {
        let mut child = Command::new(fcdev_bin())
            .args(["server", "--dev", "--backend", "process", "--netns", "none"])
            .args([
                "--hub-tun",
                "none",
                "--hub-listen",
                "127.0.0.1:0",
                "--user",
                "alice",
            ])
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--images")
            .arg(self.dir.path().join("images"))
            .args(&self.extra_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fcdev server");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let start = Instant::now();
        let mut url = None;
        let mut token = None;
        while start.elapsed() < Duration::from_secs(30) {
            let Some(Ok(line)) = lines.next() else { break };
            if let Some(rest) = line.split("listening on ").nth(1) {
                url = rest.split_whitespace().next().map(str::to_string);
            }
            if let Some(t) = line.split_whitespace().find(|w| w.starts_with("fcd_")) {
                token = Some(t.to_string());
                break;
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        self.url = url.expect("server printed its URL");
        self.token = token.expect("server printed a login token");
        self.child = Some(child);
    }

    /// SIGKILL the server (VM processes survive, as after a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port and data dir.
    pub fn restart(&mut self) {
        self.kill();
        let listen = self.url.trim_start_matches("http://").to_string();
        let start = Instant::now();
        loop {
            // The port may linger for a moment.
            if std::net::TcpListener::bind(&listen).is_ok()
                || start.elapsed() > Duration::from_secs(10)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.spawn(&listen);
    }

    /// `fcdev` with this server's temp config and data dirs.
    pub fn fcdev(&self) -> assert_cmd::Command {
        let mut cmd = assert_cmd::Command::new(fcdev_bin());
        cmd.env("FCDEV_CONFIG_DIR", self.config_dir())
            .env("FCDEV_DATA_DIR", self.data_dir())
            .env_remove("FCDEV_PROFILE")
            .env_remove("FCDEV_SERVER")
            .timeout(Duration::from_secs(60));
        cmd
    }

    /// `fcdev` with a separate config dir (another engineer's laptop).
    pub fn fcdev_as(&self, config_dir: &Path) -> assert_cmd::Command {
        let mut cmd = self.fcdev();
        cmd.env("FCDEV_CONFIG_DIR", config_dir);
        cmd
    }

    pub fn login(&self) {
        self.fcdev()
            .args(["login", "--server", &self.url, "--token-stdin"])
            .write_stdin(self.token.clone())
            .assert()
            .success();
    }

    /// `fcdev status --json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let out = self
            .fcdev()
            .args(["status", "--json"])
            .assert()
            .success()
            .get_output()
            .stdout
            .clone();
        json(&out)
    }

    /// How many test-VM processes of this server run (to prove none is duplicated).
    pub fn vm_processes(&self) -> usize {
        let out = Command::new("pgrep")
            .args([
                "-f",
                "--",
                &format!("--run-dir={}", self.data_dir().join("vms").display()),
            ])
            .output()
            .expect("pgrep");
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    /// Kill every test-VM process this server started.
    pub fn kill_vms(&self) {
        kill_vms(&self.data_dir());
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
        self.kill_vms();
    }
}

/// Kill every VM process (test backend or qemu) whose pid file lies under `DATA/vms`: VMs run detached from
/// the server or agent that started them.
pub fn kill_vms(data: &Path) {
    for name in ["vm.pid", "qemu.pid"] {
        for pid_file in find_files(&data.join("vms"), name) {
            if let Ok(pid) = std::fs::read_to_string(&pid_file) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            }
        }
    }
}

pub fn find_files(root: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(find_files(&p, name));
        } else if p.file_name().and_then(|n| n.to_str()) == Some(name) {
            out.push(p);
        }
    }
    out
}

pub fn json(out: &[u8]) -> serde_json::Value {
    serde_json::from_slice(out)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(out)))
}

/// A raw HTTP/1.1 response: status, head (status line and headers) and body as sent (chunked bodies unparsed).
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl RawResponse {
    /// A header's value (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The `code` of the documented JSON error body, checking the content type and the message on the way.
    pub fn error_code(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "an error that is not JSON: {}\n{}",
            self.head,
            self.body
        );
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|_| panic!("not a JSON error body: {}", self.body));
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}",
            self.body
        );
        v["error"]["code"].as_str().unwrap_or_default().to_string()
    }
}

/// Send one request (`Connection: close`) with extra header lines and a body of any size (written from another
/// thread while the response is read, so a server that answers before reading it all is seen answering).
pub fn raw_request(
    url: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Vec<u8>,
) -> RawResponse {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        // The server may close before taking the whole body; that is its right.
        let _ = writer.write_all(head.as_bytes());
        let _ = writer.write_all(&body);
    });
    let mut resp = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => resp.extend_from_slice(&buf[..n]),
            // A reset after the answer (the body was not read) ends it too.
            Err(e) if !resp.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the response to {method} {path}: {e}"),
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = sender.join();
    let resp = String::from_utf8_lossy(&resp).to_string();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    RawResponse {
        status: head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status in {head:?}")),
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// Open `GET path` and read only the response head; the connection stays open (an event stream).
pub fn open_stream(url: &str, path: &str, token: &str) -> (u16, std::net::TcpStream) {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!("no response head for {path}: {other:?}"),
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, s)
}

/// Add an engineer with `fcdev server user add` and return their token.
pub fn add_engineer(server: &TestServer, name: &str) -> String {
    let out = server
        .fcdev()
        .args(["server", "user", "add", name])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    String::from_utf8(out).unwrap().trim().to_string()
}

/// Read an open stream until the server ends it; None when it is still open after `within`.
pub fn read_until_closed(mut s: std::net::TcpStream, within: Duration) -> Option<String> {
    use std::io::Read;
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&out).to_string()),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("reading a stream: {e}"),
        }
    }
    None
}

/// The `id:` numbers of the server-sent events in a stream's text, in order.
pub fn event_ids(stream_text: &str) -> Vec<i64> {
    stream_text
        .lines()
        .filter_map(|l| l.strip_prefix("id: ")?.trim().parse().ok())
        .collect()
}

/// A raw HTTP/1.1 request; returns (status, body).
pub fn http(
    url: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
    let mut resp = String::new();
    std::io::Read::read_to_string(&mut s, &mut resp).unwrap();
    let status: u16 = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// 20 engineers (added with `fcdev server user add`, plus `admin_args`) run `fcdev up` at once: every cluster gets
/// ready, and no subnet or address is handed out twice.
pub fn twenty_engineers_up_at_once(server: &TestServer, admin_args: &[&str]) {
    let mut laptops = Vec::new();
    for i in 0..20 {
        let name = format!("eng{i}");
        let out = server
            .fcdev()
            .args(["server", "user", "add", &name])
            .args(admin_args)
            .assert()
            .success()
            .get_output()
            .stdout
            .clone();
        let token = String::from_utf8(out).unwrap().trim().to_string();
        let cfg = server.dir.path().join(format!("laptop{i}"));
        server
            .fcdev_as(&cfg)
            .args(["login", "--server", &server.url, "--token-stdin"])
            .write_stdin(token)
            .assert()
            .success();
        laptops.push(cfg);
    }
    let handles: Vec<_> = laptops
        .iter()
        .map(|cfg| {
            let mut cmd = std::process::Command::new(fcdev_bin());
            cmd.env("FCDEV_CONFIG_DIR", cfg).args(["up", "--json"]);
            std::thread::spawn(move || cmd.output().unwrap())
        })
        .collect();
    let mut subnets = std::collections::HashSet::new();
    let mut addresses = std::collections::HashSet::new();
    for h in handles {
        let out = h.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = json(&out.stdout);
        assert_eq!(cluster["state"], "ready");
        for vm in cluster["vms"].as_array().unwrap() {
            assert!(
                addresses.insert(vm["address"].as_str().unwrap().to_string()),
                "address handed out twice"
            );
        }
    }
    for cfg in &laptops {
        let out = server
            .fcdev_as(cfg)
            .args(["status", "--json"])
            .output()
            .unwrap();
        let status = json(&out.stdout);
        assert!(
            subnets.insert(status["namespace"]["subnet"].as_str().unwrap().to_string()),
            "subnet handed out twice"
        );
    }
    assert_eq!(subnets.len(), 20);
    assert_eq!(addresses.len(), 60);
}
