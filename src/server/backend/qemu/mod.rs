//! Real VMs with qemu-system-x86_64 (Debian package `qemu-system-x86`), one detached qemu per VM controlled over
//! QMP, a qcow2 overlay per VM on the image's base disk, one tap per VM on the namespace bridge.
//!
//! A VM's run dir holds everything about it: `qemu.pid`, `qmp.sock`, `agent.sock` (guest agent on ttyS1),
//! `console.log` (ttyS0), `qemu.log` (qemu's stderr and the backend's notes), `disk.qcow2`, `mode`.
//! qemu runs in its own session, so it survives a server restart; `start` re-adopts a running VM through the pid
//! file instead of starting a second one.

pub mod agent;
pub mod bench;
pub mod cmdline;
pub mod hostkey;
pub mod proc;
pub mod qmp;
pub mod saved;
pub mod snapshot;
pub mod switch;

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use self::cmdline::{files, Launch, Memory, Net};
use super::{Backend, BackendError, BackendResult, NamespaceNet, StartMode, VmSpec};
use crate::server::images::{Image, VmTemplate};
use crate::server::netns;

/// Which accelerator qemu uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM when /proc/cpuinfo shows vmx or svm, else TCG.
    Auto,
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not an accelerator (auto, kvm, tcg)")]
pub struct AccelParseError(String);

impl FromStr for Accel {
    type Err = AccelParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(AccelParseError(s.to_string())),
        }
    }
}

impl Accel {
    /// Resolve `auto`: KVM only where the CPU shows hardware virtualization (a nested paravirtual /dev/kvm without
    /// vmx/svm is far slower than TCG).
    pub fn resolve(self) -> Accel {
        match self {
            Accel::Auto => {
                let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
                let hw = cpuinfo
                    .lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
                if hw && Path::new("/dev/kvm").exists() {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                }
            }
            other => other,
        }
    }
}

#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub accel: Accel,
    /// qemu-system-x86_64 to use; default: found on PATH.
    pub qemu_binary: Option<PathBuf>,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            accel: Accel::Auto,
            qemu_binary: None,
        }
    }
}

pub struct QemuBackend {
    binary: PathBuf,
    qemu_img: PathBuf,
    accel: Accel,
    boot_deadline: Duration,
    /// `qemu-system-x86_64 --version`, first line (a saved VM is only resumed by the qemu that saved it).
    qemu_version: String,
}

/// The server's constructor: `accel` is `auto`, `kvm` or `tcg` (from `fcdev server --accel`).
pub fn make(accel: &str) -> anyhow::Result<Arc<dyn Backend>> {
    let accel: Accel = accel.parse()?;
    let backend = QemuBackend::new(QemuConfig {
        accel,
        qemu_binary: None,
    })?;
    tracing::info!("qemu backend: accelerator {}", backend.accel());
    Ok(Arc::new(backend))
}

/// Find an executable on PATH (or in the usual sbin folders).
pub use crate::sys::which;

fn err_with_log(message: impl Into<String>, run_dir: &Path) -> BackendError {
    BackendError::Failed {
        message: message.into(),
        log_tail: log_tail_of(run_dir),
    }
}

fn tail_lines(path: &Path, n: usize) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let out = lines[start..].join("\n");
    (!out.trim().is_empty()).then_some(out)
}

fn log_tail_of(run_dir: &Path) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(t) = tail_lines(&run_dir.join(files::LOG), 20) {
        parts.push(format!("--- qemu.log ---\n{t}"));
    }
    if let Some(t) = tail_lines(&run_dir.join(files::CONSOLE), 30) {
        parts.push(format!("--- console.log ---\n{t}"));
    }
    (!parts.is_empty()).then(|| parts.join("\n"))
}

/// A line in the VM's console log before qemu starts writing to it: where a boot, a restore or a resume begins.
fn console_mark(run_dir: &Path, what: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join(files::CONSOLE))
    {
        let _ = writeln!(f, "\n--- fcdev: {what} at {} ---", utc_stamp(now));
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (the civil-from-days algorithm).
pub fn utc_stamp(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Append a line to the VM's qemu.log (the backend's own notes, next to qemu's stderr).
fn note(run_dir: &Path, msg: &str) {
    tracing::info!(run_dir = %run_dir.display(), "{msg}");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join(files::LOG))
    {
        let _ = writeln!(f, "fcdev: {msg}");
    }
}

/// The kernel command line of a booted VM: the template's arguments plus who the VM is.
pub fn boot_append(template: &VmTemplate, guest: &agent::GuestConfig) -> String {
    use base64::Engine;
    let keys = base64::engine::general_purpose::STANDARD.encode(guest.ssh_keys.join("\n"));
    let mut s = format!(
        "{} fcdev.ip={} fcdev.gw={} fcdev.name={} fcdev.ns={} fcdev.mac={}",
        template.cmdline.trim(),
        guest.ip_cidr,
        guest.gateway,
        guest.name,
        guest.namespace,
        guest.mac
    );
    if !guest.role.is_empty() {
        s.push_str(&format!(" fcdev.role={}", guest.role));
    }
    if !keys.is_empty() {
        s.push_str(&format!(" fcdev.keys={keys}"));
    }
    if !guest.hosts.is_empty() {
        s.push_str(&format!(" fcdev.hosts={}", guest.hosts_b64()));
    }
    s.trim().to_string()
}

fn guest_config(vm: &VmSpec) -> agent::GuestConfig {
    agent::GuestConfig {
        ip_cidr: format!("{}/{}", vm.address, vm.namespace.subnet.prefix),
        gateway: vm.namespace.gateway.to_string(),
        name: vm.name.clone(),
        namespace: vm.namespace.name.clone(),
        role: vm.template.role.clone(),
        mac: vm.mac.clone(),
        ssh_keys: vm.ssh_keys.clone(),
        hosts: vm
            .hosts
            .iter()
            .map(|(names, addr)| format!("{addr} {}", names.join(" ")))
            .collect(),
        host_key: None,
    }
}

/// The config of a restored guest: also a new ssh host key, whose public half is kept in the run dir
/// (`host_key.pub`) for laptops to check against.
fn restore_config(vm: &VmSpec) -> agent::GuestConfig {
    let key = hostkey::HostKey::generate();
    let mut cfg = guest_config(vm);
    if std::fs::write(
        vm.run_dir.join(files::HOST_KEY_PUB),
        key.public_line() + "\n",
    )
    .is_ok()
    {
        cfg.host_key = Some(agent::GuestHostKey {
            openssh_pem: key.private_pem(&vm.name),
            dropbear: key.dropbear_private(),
        });
    }
    cfg
}

/// Probe a VM's service on `addr`, ~3.5 s at most (a first request after a restore runs every code path of
/// nginx → app → database for the first time under TCG, and can take more than a second: waiting for it is
/// cheaper than abandoning it and asking again):
/// - `tcp:PORT`: the port accepts a connection;
/// - `http:PORT[/PATH]`: `GET PATH` answers 200 (default `/`);
/// - `mysql:PORT`: a MySQL/MariaDB server accepts a login of the probe user `fcdev_probe` (no password, no
///   rights) and answers a `COM_PING`: the database works, not only its port.
pub fn probe_addr(probe: &str, addr: std::net::Ipv4Addr) -> bool {
    let (kind, rest) = probe.split_once(':').unwrap_or(("tcp", probe));
    let (port, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let Ok(port) = port.parse::<u16>() else {
        return false;
    };
    let sa = SocketAddr::from((addr, port));
    let Ok(mut s) = TcpStream::connect_timeout(&sa, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
    match kind {
        "http" => probe_http(&mut s, &addr.to_string(), path),
        "mysql" => probe_mysql(&mut s).is_some(),
        _ => true,
    }
}

fn probe_http(s: &mut TcpStream, host: &str, path: &str) -> bool {
    if s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(n) => {
            let head = String::from_utf8_lossy(&buf[..n]);
            head.starts_with("HTTP/") && head.split_whitespace().nth(1) == Some("200")
        }
        Err(_) => false,
    }
}

/// One MySQL protocol packet: (sequence id, payload).
fn mysql_read(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).ok()?;
    let len = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
    if len > 1 << 16 {
        return None;
    }
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).ok()?;
    Some((head[3], payload))
}

fn mysql_write(s: &mut TcpStream, seq: u8, payload: &[u8]) -> Option<()> {
    let len = payload.len();
    let mut p = vec![len as u8, (len >> 8) as u8, (len >> 16) as u8, seq];
    p.extend_from_slice(payload);
    s.write_all(&p).ok()
}

/// Greeting → login as `fcdev_probe` with an empty password → OK → COM_PING → OK → COM_QUIT.
fn probe_mysql(s: &mut TcpStream) -> Option<()> {
    let (_, greeting) = mysql_read(s)?;
    if greeting.first() != Some(&10) {
        return None; // not protocol 10 (or an error packet: too many connections, host blocked)
    }
    const LONG_PASSWORD: u32 = 1;
    const PROTOCOL_41: u32 = 0x200;
    const SECURE_CONNECTION: u32 = 0x8000;
    let caps = LONG_PASSWORD | PROTOCOL_41 | SECURE_CONNECTION;
    let mut login = Vec::new();
    login.extend_from_slice(&caps.to_le_bytes());
    login.extend_from_slice(&(1u32 << 24).to_le_bytes()); // max packet
    login.push(33); // utf8
    login.extend_from_slice(&[0u8; 23]);
    login.extend_from_slice(b"fcdev_probe\0");
    login.push(0); // empty auth response
    mysql_write(s, 1, &login)?;
    let (_, ok) = mysql_read(s)?;
    if ok.first() != Some(&0) {
        return None;
    }
    mysql_write(s, 0, &[0x0e])?; // COM_PING
    let (_, pong) = mysql_read(s)?;
    // COM_QUIT: a probe that just closes is an "Aborted connection" warning in the server's log, a log line that
    // the press cluster also ships to e1, on every probe.
    let _ = mysql_write(s, 0, &[0x01]);
    (pong.first() == Some(&0)).then_some(())
}

impl QemuBackend {
    pub fn new(cfg: QemuConfig) -> Result<QemuBackend, BackendError> {
        let binary = match cfg.qemu_binary {
            Some(p) if p.is_file() => p,
            Some(p) => {
                return Err(BackendError::msg(format!(
                    "qemu binary {} does not exist",
                    p.display()
                )))
            }
            None => which("qemu-system-x86_64").ok_or_else(|| {
                BackendError::msg(
                    "qemu-system-x86_64 not found: install the Debian package `qemu-system-x86`",
                )
            })?,
        };
        let qemu_img = which("qemu-img").ok_or_else(|| {
            BackendError::msg("qemu-img not found: install the Debian package `qemu-utils`")
        })?;
        let accel = cfg.accel.resolve();
        if accel == Accel::Kvm && !Path::new("/dev/kvm").exists() {
            return Err(BackendError::msg(
                "accelerator kvm requested but /dev/kvm does not exist (use --accel tcg)",
            ));
        }
        let qemu_version = std::process::Command::new(&binary)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(|l| l.trim().to_string())
            })
            .unwrap_or_else(|| "qemu (unknown version)".to_string());
        Ok(QemuBackend {
            binary,
            qemu_img,
            accel,
            boot_deadline: Duration::from_secs(45),
            qemu_version,
        })
    }

    /// How long one boot attempt may take before the VM is killed and booted once more (default 45 s).
    pub fn with_boot_deadline(mut self, deadline: Duration) -> Self {
        self.boot_deadline = deadline;
        self
    }

    /// One boot attempt's deadline for a VM of this template: the image's `boot_secs`, else the backend's.
    pub fn boot_deadline_of(&self, template: &VmTemplate) -> Duration {
        template
            .boot_secs
            .map(Duration::from_secs)
            .unwrap_or(self.boot_deadline)
    }

    /// The resolved accelerator (never `Auto`).
    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub fn qemu_version(&self) -> &str {
        &self.qemu_version
    }

    pub fn qemu_img(&self) -> &Path {
        &self.qemu_img
    }

    /// Create `overlay` as a qcow2 on `base` (never a copy).
    pub fn create_overlay(&self, base: &Path, overlay: &Path) -> BackendResult<()> {
        let base = base
            .canonicalize()
            .map_err(|e| BackendError::msg(format!("base disk {}: {e}", base.display())))?;
        let fmt = if base.extension().is_some_and(|e| e == "qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        let out = std::process::Command::new(&self.qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-F", fmt, "-b"])
            .arg(&base)
            .arg(overlay)
            .output()?;
        if !out.status.success() {
            return Err(BackendError::msg(format!(
                "qemu-img create overlay {}: {}",
                overlay.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Start qemu detached (own session; survives the server) and wait for its pid file.
    pub fn launch(&self, launch: &Launch) -> BackendResult<i32> {
        launch.check_paths().map_err(BackendError::msg)?;
        let run = &launch.run_dir;
        for f in [files::QMP, files::AGENT, files::PID] {
            let _ = std::fs::remove_file(run.join(f));
        }
        note(
            run,
            &format!(
                "starting qemu ({}, accel {})",
                if launch.incoming { "restore" } else { "boot" },
                launch.accel
            ),
        );
        saved::record_launch(launch)
            .map_err(|e| err_with_log(format!("cannot record the launch: {e}"), run))?;
        console_mark(
            run,
            if launch.incoming {
                "restored"
            } else {
                "booting"
            },
        );
        proc::spawn_detached(&self.binary, &launch.args(), run)
            .map_err(|e| err_with_log(format!("qemu did not start: {e}"), run))
    }

    fn tap_for(&self, vm: &VmSpec) -> BackendResult<String> {
        netns::ensure_tap(vm.namespace.index, vm.tap_number())
            .map_err(|e| BackendError::msg(format!("tap for {}: {e}", vm.name)))
    }

    fn kernel_paths(
        image: &Image,
        template: &VmTemplate,
    ) -> BackendResult<(PathBuf, Option<PathBuf>)> {
        let kernel = template
            .kernel
            .as_deref()
            .map(|k| image.path(k))
            .ok_or_else(|| {
                BackendError::msg(format!(
                    "image {} VM {} has no kernel",
                    image.spec.name, template.name
                ))
            })?;
        if !kernel.is_file() {
            return Err(BackendError::msg(format!(
                "kernel {} is missing",
                kernel.display()
            )));
        }
        // qemu runs in the VM's run dir: make the paths absolute.
        let kernel = kernel.canonicalize()?;
        let initrd = match template.initrd.as_deref() {
            Some(i) => Some(image.path(i).canonicalize().map_err(|e| {
                BackendError::msg(format!("initrd {}: {e}", image.path(i).display()))
            })?),
            None => None,
        };
        Ok((kernel, initrd))
    }

    /// The launch settings of one VM booting; a restore changes memory and `incoming` from these.
    fn launch_for(
        &self,
        vm: &VmSpec,
        tap: String,
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        append: String,
    ) -> Launch {
        Launch {
            accel: self.accel,
            name: format!("{}-{}", vm.namespace.name, vm.name),
            vcpus: vm.template.vcpus,
            memory_mb: vm.template.memory_mb,
            kernel,
            initrd,
            append,
            disk: vm
                .template
                .disk
                .as_ref()
                .map(|_| saved::active_disk(&vm.run_dir)),
            net: Net::Tap(tap),
            mac: vm.mac.clone(),
            memory: Memory::Anonymous,
            incoming: false,
            run_dir: vm.run_dir.clone(),
        }
    }

    fn boot_launch(&self, vm: &VmSpec, tap: String) -> BackendResult<Launch> {
        let (kernel, initrd) = Self::kernel_paths(&vm.image, &vm.template)?;
        let append = boot_append(&vm.template, &guest_config(vm));
        Ok(self.launch_for(vm, tap, kernel, initrd, append))
    }

    /// Start qemu waiting for an incoming migration and feed it the snapshot's state.
    fn launch_restore(
        &self,
        vm: &VmSpec,
        tap: String,
        snap: &snapshot::Found,
    ) -> BackendResult<()> {
        // The kernel and initrd only feed fw_cfg, which a restored guest never reads again, yet qemu keeps a
        // private copy of both: pass the kernel's boot header alone (same option ROM, same RAM blocks) and no
        // initrd. Saves ~20 MB per VM.
        let (kernel, _initrd) = Self::kernel_paths(&vm.image, &vm.template)?;
        let kernel = snap.kernel_stub().unwrap_or(kernel);
        // The console starts with the boot the snapshot was taken from (`fcdev logs` shows it).
        let console = vm.run_dir.join(files::CONSOLE);
        if std::fs::copy(snap.dir.join(files::CONSOLE), &console).is_err() {
            let _ = std::fs::write(&console, "");
        }
        let launch = Launch {
            memory: Memory::File {
                path: snap.mem_path(),
                share: false,
            },
            incoming: true,
            ..self.launch_for(vm, tap, kernel, None, snap.meta.append.clone())
        };
        self.launch_incoming(&launch, &snap.state_path(), true)
    }

    /// Start qemu waiting for an incoming migration and feed it `state` (the one restore path of onboarding
    /// snapshots and saved VMs). `ignore_shared`: the RAM comes from the shared memory file, not the stream.
    fn launch_incoming(
        &self,
        launch: &Launch,
        state: &Path,
        ignore_shared: bool,
    ) -> BackendResult<()> {
        self.launch(launch)?;
        let run = &launch.run_dir;
        let mut q = qmp::Qmp::connect(&run.join(files::QMP), Duration::from_secs(5))
            .map_err(|e| err_with_log(e.to_string(), run))?;
        if ignore_shared {
            q.set_capability("x-ignore-shared", true)
                .map_err(|e| err_with_log(e.to_string(), run))?;
        }
        let uri = format!("exec:cat {}", cmdline::shell_quote(state));
        q.execute("migrate-incoming", json!({ "uri": uri }))
            .map_err(|e| err_with_log(e.to_string(), run))?;
        Ok(())
    }

    /// Stop qemu (`quit` first when `graceful`, else SIGKILL) and remove its runtime files; keeps disk and tap.
    fn stop_vm(&self, vm: &VmSpec, graceful: bool) -> BackendResult<()> {
        let run = &vm.run_dir;
        Self::kill_vm(run, graceful);
        if let Some(pid) = proc::read_pid(run) {
            if proc::alive(pid, run) {
                return Err(err_with_log(format!("qemu (pid {pid}) did not exit"), run));
            }
        }
        for f in [
            files::QMP,
            files::AGENT,
            files::PID,
            files::MODE,
            files::LAUNCH,
        ] {
            let _ = std::fs::remove_file(run.join(f));
        }
        if run.is_dir() {
            saved::settle_disk(run)?;
        }
        Ok(())
    }

    /// Kill qemu of this run dir (QMP quit first when `graceful`, then SIGKILL) and wait until it is gone.
    fn kill_vm(run_dir: &Path, graceful: bool) {
        let Some(pid) = proc::read_pid(run_dir) else {
            return;
        };
        if !proc::alive(pid, run_dir) {
            return;
        }
        if graceful {
            if let Ok(mut q) =
                qmp::Qmp::connect(&run_dir.join(files::QMP), Duration::from_millis(300))
            {
                let _ = q.execute("quit", json!({}));
            }
            if proc::wait_gone(pid, run_dir, Duration::from_secs(3)) {
                return;
            }
        }
        proc::kill9(pid);
        proc::wait_gone(pid, run_dir, Duration::from_secs(5));
    }

    /// Run a shell command inside the guest through the serial agent (tests, debugging).
    pub fn guest_exec(&self, vm: &VmSpec, command: &str) -> BackendResult<(i32, String)> {
        // The agent starts after httpd at boot: make sure it listens before sending a command (sent once).
        agent::ping(&vm.run_dir.join(files::AGENT), Duration::from_secs(20))
            .map_err(|e| err_with_log(e.to_string(), &vm.run_dir))?;
        agent::run(
            &vm.run_dir.join(files::AGENT),
            command,
            Duration::from_secs(20),
        )
        .map_err(|e| err_with_log(e.to_string(), &vm.run_dir))
    }

    /// The pid of the VM's qemu when it runs.
    pub fn pid(&self, vm: &VmSpec) -> Option<i32> {
        proc::read_pid(&vm.run_dir).filter(|p| proc::alive(*p, &vm.run_dir))
    }
}

impl fmt::Display for RestoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestoreError::Unusable(e) | RestoreError::Slow(e) => f.write_str(e),
        }
    }
}

/// Why a restore did not finish.
enum RestoreError {
    /// qemu refused the snapshot (its state does not load): the snapshot cannot be used, boot instead.
    Unusable(String),
    /// The guest runs but did not confirm its new identity in time: slow, not broken (never a reason to boot).
    Slow(String),
}

/// How long a restored guest may take to confirm its identity before the start counts as failed.
const CONFIGURE_TIMEOUT: Duration = Duration::from_secs(60);

impl QemuBackend {
    /// After `migrate-incoming`: wait until the guest runs (resume it: the snapshot was taken paused), then tell
    /// it who it is and wait for its agent's confirmation.
    fn finish_restore(&self, vm: &VmSpec) -> Result<(), RestoreError> {
        let run = &vm.run_dir;
        let t0 = Instant::now();
        let resumed = self.wait_running(run)?;
        agent::configure(
            &run.join(files::AGENT),
            &restore_config(vm),
            CONFIGURE_TIMEOUT,
        )
        .map_err(|e| RestoreError::Slow(e.to_string()))?;
        note(
            run,
            &format!(
                "restored: running after {:.0} ms, guest configured after {:.0} ms",
                resumed.as_secs_f64() * 1000.0,
                t0.elapsed().as_secs_f64() * 1000.0
            ),
        );
        Ok(())
    }

    /// After `migrate-incoming`: wait until the guest runs, resuming it when the state was saved paused.
    /// Returns how long that took.
    fn wait_running(&self, run: &Path) -> Result<Duration, RestoreError> {
        let t0 = Instant::now();
        let mut q = qmp::Qmp::connect(&run.join(files::QMP), Duration::from_secs(5))
            .map_err(|e| RestoreError::Unusable(e.to_string()))?;
        loop {
            let status = q
                .status()
                .map_err(|e| RestoreError::Unusable(e.to_string()))?;
            match status.as_str() {
                "running" => break,
                "paused" => {
                    q.execute("cont", json!({}))
                        .map_err(|e| RestoreError::Unusable(e.to_string()))?;
                    continue;
                }
                "inmigrate" | "prelaunch" | "restore-vm" => {}
                other => {
                    let (_, err) = q.migrate_status().unwrap_or(("?".into(), None));
                    return Err(RestoreError::Unusable(format!(
                        "restore ended in state {other}: {}",
                        err.unwrap_or_default()
                    )));
                }
            }
            if t0.elapsed() > Duration::from_secs(60) {
                return Err(RestoreError::Slow(
                    "the snapshot's state did not load within 60 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(t0.elapsed())
    }
}

impl Backend for QemuBackend {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn accelerator(&self) -> String {
        self.accel.to_string()
    }

    fn ready_deadline(&self, vm: &VmSpec, mode: StartMode) -> Duration {
        match mode {
            // The guest already runs as itself: its services were running in the snapshot.
            StartMode::Restore | StartMode::Resume => Duration::from_secs(30),
            StartMode::Boot => self.boot_deadline_of(&vm.template),
        }
    }

    fn ensure_namespace(&self, ns: &NamespaceNet) -> BackendResult<()> {
        netns::ensure_bridge(ns.index, ns.subnet, ns.gateway)
            .map_err(|e| BackendError::msg(format!("namespace {} network: {e}", ns.name)))
    }

    fn remove_namespace(&self, ns: &NamespaceNet) -> BackendResult<()> {
        netns::remove_bridge(ns.index)
            .map_err(|e| BackendError::msg(format!("namespace {} network: {e}", ns.name)))
    }

    fn start(&self, vm: &VmSpec) -> BackendResult<StartMode> {
        // qemu runs in the run dir and the snapshot paths end up in its arguments: use absolute paths.
        let mut owned = vm.clone();
        owned.image.dir = vm.image.dir.canonicalize().map_err(|e| {
            BackendError::msg(format!("image folder {}: {e}", vm.image.dir.display()))
        })?;
        std::fs::create_dir_all(&vm.run_dir)?;
        owned.run_dir = vm.run_dir.canonicalize()?;
        let vm = &owned;
        let run = &vm.run_dir;
        if self.is_running(vm) {
            // Re-adopt: never start a second qemu for one VM.
            let mode = std::fs::read_to_string(run.join(files::MODE)).unwrap_or_default();
            if mode.trim() == "resume" {
                return Ok(StartMode::Resume);
            }
            if mode.trim() != "restore" {
                // (`boot` or `boot <why>`)
                return Ok(StartMode::Boot);
            }
            // A restore whose supervisor died with the previous server may not have told the guest who it is
            // yet: say it again (idempotent).
            if !self.probe(vm) {
                let sock = run.join(files::AGENT);
                if let Err(e) = agent::configure(&sock, &restore_config(vm), CONFIGURE_TIMEOUT) {
                    note(run, &format!("re-adopted VM not configured: {e}"));
                }
            }
            return Ok(StartMode::Restore);
        }
        // The disk names a snapshot left while the previous qemu ran.
        saved::settle_disk(run)?;
        let tap = self.tap_for(vm)?;
        // A VM stopped by `fcdev stop` resumes its own state on its own disk; never booted over it.
        if run.join(files::SUSPENDED).join(saved::META).is_file() {
            self.start_suspended(vm, tap)?;
            return Ok(StartMode::Resume);
        }
        // A named snapshot: its saved state on a fresh overlay of its disk layer.
        if let Some(dir) = &vm.restore_from {
            self.start_from_saved(vm, tap, dir)?;
            return Ok(StartMode::Resume);
        }
        let mut snap = snapshot::find(&vm.image, &vm.template, self.accel);
        // Why this start boots instead of restoring, for `fcdev status` (written next to the mode).
        let mut why_boot = match (&snap, vm.image.snapshot_dir()) {
            (None, Some(_)) => Some(format!(
                "no onboarding snapshot for accelerator {} (run `fcdev image snapshot {}`)",
                self.accel, vm.image.spec.name
            )),
            _ => None,
        };
        let overlay = run.join(files::DISK);
        let mut fresh_overlay = false;
        if let Some(disk) = &vm.template.disk {
            // A snapshot with a disk layer expects exactly that disk: its overlay must be new. A VM whose disk
            // is already in use (repaired after its qemu died) keeps its data and boots from it.
            if let (Some(found), true) = (&snap, overlay.exists()) {
                if found.disk().is_some() {
                    let why =
                        "the disk already holds this VM's data: booting it instead of restoring";
                    note(run, why);
                    why_boot = Some(why.to_string());
                    snap = None;
                }
            }
            if !overlay.exists() {
                let base = match snap.as_ref().and_then(|f| f.disk()) {
                    Some(layer) => layer,
                    None => vm.image.path(disk),
                };
                self.create_overlay(&base, &overlay)?;
                fresh_overlay = true;
            }
        }
        let boot = self.boot_launch(vm, tap.clone())?;
        if let Some(snap) = snap {
            let restored = self
                .launch_restore(vm, tap, &snap)
                .map_err(|e| RestoreError::Unusable(e.to_string()))
                .and_then(|()| {
                    std::fs::write(run.join(files::MODE), "restore")
                        .map_err(|e| RestoreError::Unusable(e.to_string()))?;
                    self.finish_restore(vm)
                });
            match restored {
                Ok(()) => return Ok(StartMode::Restore),
                Err(RestoreError::Slow(e)) => {
                    // Never a boot: the caller retries the restore (on a new overlay) or gives up.
                    note(run, &format!("restore too slow ({e}); stopping it"));
                    Self::kill_vm(run, false);
                    if fresh_overlay {
                        let _ = std::fs::remove_file(&overlay);
                    }
                    return Err(err_with_log(format!("restore too slow: {e}"), run));
                }
                Err(RestoreError::Unusable(e)) => {
                    let why = format!("the snapshot cannot be restored ({e}); booting instead");
                    note(run, &why);
                    why_boot = Some(why);
                    Self::kill_vm(run, false);
                }
            }
        }
        let mode_line = match &why_boot {
            Some(why) => format!("boot {why}"),
            None => "boot".to_string(),
        };
        std::fs::write(run.join(files::MODE), mode_line)?;
        self.launch(&boot)?;
        Ok(StartMode::Boot)
    }

    fn start_detail(&self, vm: &VmSpec) -> Option<String> {
        let mode = std::fs::read_to_string(vm.run_dir.join(files::MODE)).ok()?;
        let why = mode.trim().strip_prefix("boot ")?;
        Some(format!("booting: {why}"))
    }

    fn probe(&self, vm: &VmSpec) -> bool {
        probe_addr(&vm.template.probe, vm.address)
    }

    fn is_running(&self, vm: &VmSpec) -> bool {
        self.pid(vm).is_some()
    }

    fn stop(&self, vm: &VmSpec) -> BackendResult<()> {
        self.stop_vm(vm, true)?;
        netns::remove_tap(vm.namespace.index, vm.tap_number())
            .map_err(|e| BackendError::msg(format!("tap of {}: {e}", vm.name)))?;
        Ok(())
    }

    /// No `quit` (it flushes a disk that is thrown away next) and the tap stays for the next start: a reset of
    /// a press cluster spent ~0.1 s here.
    fn stop_discarding(&self, vm: &VmSpec) -> BackendResult<()> {
        self.stop_vm(vm, false)?;
        self.discard_disk(vm)
    }

    fn discard_disk(&self, vm: &VmSpec) -> BackendResult<()> {
        // The disk, the list of its layers, and a stopped VM's state (meaningless without its disk).
        saved::settle_disk(&vm.run_dir).or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(()),
            _ => Err(e),
        })?;
        for f in [files::DISK, files::LAYERS] {
            match std::fs::remove_file(vm.run_dir.join(f)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        match std::fs::remove_dir_all(vm.run_dir.join(files::SUSPENDED)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    fn pause(&self, vm: &VmSpec) -> BackendResult<()> {
        self.pause_vm(vm)
    }

    fn resume(&self, vm: &VmSpec) -> BackendResult<()> {
        self.resume_vm(vm)
    }

    fn save(&self, vm: &VmSpec, dir: &Path, layers: &Path) -> BackendResult<u64> {
        self.save_vm(vm, dir, layers)
    }

    fn check_saved(&self, vm: &VmSpec, dir: &Path) -> BackendResult<()> {
        self.check_saved_vm(vm, dir).map(|_| ())
    }

    fn suspend(&self, vm: &VmSpec) -> BackendResult<u64> {
        let bytes = self.suspend_vm(vm)?;
        self.stop(vm)?;
        Ok(bytes)
    }

    fn collect_layers(
        &self,
        vms: &[VmSpec],
        saved: &[PathBuf],
        layers: &Path,
    ) -> BackendResult<()> {
        self.collect_layers_of(vms, saved, layers)
    }

    fn log_tail(&self, vm: &VmSpec) -> Option<String> {
        log_tail_of(&vm.run_dir)
    }

    fn host_key(&self, run_dir: &Path) -> Option<String> {
        let line = std::fs::read_to_string(run_dir.join(files::HOST_KEY_PUB)).ok()?;
        let line = line.trim();
        line.starts_with("ssh-").then(|| line.to_string())
    }

    fn console_log(&self, vm: &VmSpec) -> Option<PathBuf> {
        Some(vm.run_dir.join(files::CONSOLE))
    }

    fn exec(
        &self,
        vm: &VmSpec,
        command: &str,
        out: &mut dyn FnMut(&[u8]) -> bool,
    ) -> BackendResult<i32> {
        if self.pid(vm).is_none() {
            return Err(BackendError::msg(format!("VM {} is not running", vm.name)));
        }
        agent::exec(&vm.run_dir.join(files::AGENT), command, out, EXEC_LIMIT)
            .map_err(|e| BackendError::msg(e.to_string()))
    }
}

/// The longest `fcdev exec` runs.
const EXEC_LIMIT: Duration = Duration::from_secs(6 * 3600);

#[cfg(test)]
mod tests {
    #[test]
    fn utc_stamps_of_known_times() {
        assert_eq!(super::utc_stamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc_stamp(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(super::utc_stamp(1_795_699_115), "2026-11-26T13:18:35Z");
    }
}
