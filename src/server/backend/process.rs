//! **Test backend**: each "VM" is a local `fcdev __test-vm` process serving HTTP on a loopback port. It exists so
//! the control plane (store, orchestrator, API, CLI) can be tested without QEMU; it is never the default of
//! `fcdev server` and must be asked for with `--backend process`.
//!
//! The template's `cmdline` can steer it for fault tests: `test:never-ready` (never listens),
//! `test:delay-ms=N` (listens after N ms).
//!
//! `fcdev stop`/`start` work on it the way they do on qemu, without memory to save: pause is SIGSTOP, resume
//! SIGCONT, suspend writes a `suspended` file into the run dir and ends the process; the next start finds the
//! file, starts the process again and reports a resume (the file goes; a reset or delete drops it too).
//!
//! `fcdev exec` runs the command with `sh -c` as a host process in the VM's run dir: this backend's "VMs" are
//! host processes, so a host shell beside one is as far inside it as a command gets. It is a test backend's
//! exec (the protocol around it — the server's stream, a control plane's relay, the exit code, stopping the
//! command when the client leaves — is what it exercises), not a guest.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Backend, BackendError, BackendResult, NamespaceNet, StartMode, VmSpec};

pub const PID_FILE: &str = "vm.pid";
pub const PORT_FILE: &str = "vm.port";
pub const LOG_FILE: &str = "vm.log";
pub const DISK_DIR: &str = "disk";
/// A stopped VM's "saved state" (`fcdev stop`): its presence makes the next start a resume.
pub const SUSPENDED_FILE: &str = "suspended";

/// Send `sig` to the VM's process, if it runs.
fn signal(vm: &VmSpec, sig: libc::c_int) -> BackendResult<()> {
    let pid =
        vm_pid(vm).ok_or_else(|| BackendError::msg(format!("VM {} does not run", vm.name)))?;
    // SAFETY: kill(2) with a pid we own; no memory is touched.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

#[derive(Debug, Default)]
pub struct ProcessBackend;

impl ProcessBackend {
    pub fn new() -> Self {
        ProcessBackend
    }
}

/// The pid in a pid file, if the process is alive (not a zombie).
pub fn live_pid(pid_file: &Path, expect_in_cmdline: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state is the first field after the `(comm)`.
    let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
    if state == 'Z' || state == 'X' {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    // A whole argument, so `.../n1` never matches `.../n10`.
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == expect_in_cmdline.as_bytes())
        .then_some(pid)
}

/// A live process whose command line contains `marker`, found by scanning /proc: adopts a VM whose pid file was
/// never written (a server killed between spawning it and recording it).
fn find_by_marker(marker: &str) -> Option<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        if pid == me {
            return None;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_vm = args.contains(&&b"__test-vm"[..]);
        (is_vm && args.contains(&marker.as_bytes())).then_some(pid)
    })
}

/// SIGTERM, then SIGKILL after a grace period.
pub fn kill_pid(pid: i32, grace: Duration) {
    // SAFETY: kill(2) with a pid we own; no memory is touched.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let start = std::time::Instant::now();
    while start.elapsed() < grace {
        if std::fs::metadata(format!("/proc/{pid}")).is_err() {
            return;
        }
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if stat
                .rsplit_once(')')
                .map(|(_, s)| s.trim_start().starts_with('Z'))
                == Some(true)
            {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

fn marker(vm: &VmSpec) -> String {
    format!("--run-dir={}", vm.run_dir.display())
}

/// The VM's pid: from its pid file, or, when that is missing or stale, from a /proc scan (re-writing the file).
fn vm_pid(vm: &VmSpec) -> Option<i32> {
    let pid_file = vm.run_dir.join(PID_FILE);
    if let Some(pid) = live_pid(&pid_file, &marker(vm)) {
        return Some(pid);
    }
    let pid = find_by_marker(&marker(vm))?;
    let _ = std::fs::write(&pid_file, pid.to_string());
    Some(pid)
}

impl Backend for ProcessBackend {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn ready_deadline(&self, _vm: &VmSpec, _mode: StartMode) -> Duration {
        // Generous: a loaded 2-core CI machine can take seconds to start a process.
        Duration::from_secs(8)
    }

    fn ensure_namespace(&self, _ns: &NamespaceNet) -> BackendResult<()> {
        Ok(())
    }

    fn remove_namespace(&self, _ns: &NamespaceNet) -> BackendResult<()> {
        Ok(())
    }

    fn start(&self, vm: &VmSpec) -> BackendResult<StartMode> {
        if self.is_running(vm) {
            return Ok(StartMode::Boot);
        }
        std::fs::create_dir_all(vm.run_dir.join(DISK_DIR))?;
        let _ = std::fs::remove_file(vm.run_dir.join(PORT_FILE));
        let exe = std::env::current_exe()?;
        // Append: a retry keeps the log of the attempt before it.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(vm.run_dir.join(LOG_FILE))?;
        let mut cmd = Command::new(exe);
        cmd.arg("__test-vm")
            .arg(format!("--name={}", vm.name))
            .arg(marker(vm))
            .arg(format!("--cmdline={}", vm.template.cmdline))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| BackendError::Failed {
            message: format!("cannot start the test VM process: {e}"),
            log_tail: None,
        })?;
        std::fs::write(vm.run_dir.join(PID_FILE), child.id().to_string())?;
        // Reap it when it exits so a dead VM never lingers as a zombie that looks alive.
        std::thread::spawn(move || child.wait());
        let suspended = vm.run_dir.join(SUSPENDED_FILE);
        if suspended.exists() {
            std::fs::remove_file(&suspended)?;
            return Ok(StartMode::Resume);
        }
        let mode = if vm.image.snapshot_dir().is_some() {
            StartMode::Restore
        } else {
            StartMode::Boot
        };
        Ok(mode)
    }

    fn probe(&self, vm: &VmSpec) -> bool {
        let Ok(port) = std::fs::read_to_string(vm.run_dir.join(PORT_FILE)) else {
            return false;
        };
        let Ok(port) = port.trim().parse::<u16>() else {
            return false;
        };
        TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(500),
        )
        .is_ok()
    }

    fn is_running(&self, vm: &VmSpec) -> bool {
        vm_pid(vm).is_some()
    }

    fn stop(&self, vm: &VmSpec) -> BackendResult<()> {
        for _ in 0..5 {
            let Some(pid) = vm_pid(vm) else { break };
            kill_pid(pid, Duration::from_secs(2));
        }
        for f in [PID_FILE, PORT_FILE] {
            match std::fs::remove_file(vm.run_dir.join(f)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    fn discard_disk(&self, vm: &VmSpec) -> BackendResult<()> {
        match std::fs::remove_file(vm.run_dir.join(SUSPENDED_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        match std::fs::remove_dir_all(vm.run_dir.join(DISK_DIR)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    fn pause(&self, vm: &VmSpec) -> BackendResult<()> {
        signal(vm, libc::SIGSTOP)
    }

    fn resume(&self, vm: &VmSpec) -> BackendResult<()> {
        signal(vm, libc::SIGCONT)
    }

    fn suspend(&self, vm: &VmSpec) -> BackendResult<u64> {
        let state = format!("test VM {} stopped\n", vm.name);
        std::fs::write(vm.run_dir.join(SUSPENDED_FILE), &state)?;
        // Running again, so it takes the SIGTERM of `stop` at once.
        let _ = signal(vm, libc::SIGCONT);
        self.stop(vm)?;
        Ok(state.len() as u64)
    }

    fn log_tail(&self, vm: &VmSpec) -> Option<String> {
        let text = std::fs::read_to_string(vm.run_dir.join(LOG_FILE)).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        (!tail.is_empty()).then_some(tail)
    }

    fn console_log(&self, vm: &VmSpec) -> Option<std::path::PathBuf> {
        Some(vm.run_dir.join(LOG_FILE))
    }

    /// `sh -c COMMAND` in the VM's run dir (stdout and stderr together, no stdin), in a process group of its
    /// own: `out` returning false (also asked every 200 ms while the command is silent) ends the group.
    fn exec(
        &self,
        vm: &VmSpec,
        command: &str,
        out: &mut dyn FnMut(&[u8]) -> bool,
    ) -> BackendResult<i32> {
        use std::io::Read;
        use std::os::unix::process::ExitStatusExt;
        if !self.is_running(vm) {
            return Err(BackendError::msg(format!("VM {} is not running", vm.name)));
        }
        let (mut reader, writer) = std::io::pipe()?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .current_dir(&vm.run_dir)
            .stdin(Stdio::null())
            .stdout(writer.try_clone()?)
            .stderr(writer)
            .process_group(0)
            .spawn()?;
        let pgid = child.id() as i32;
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        // The pipe's read end is read on a thread of its own, so silence can be checked on.
        let pump = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let wanted = loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(bytes) => {
                    if !out(&bytes) {
                        break false;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if !out(&[]) {
                        break false;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break true,
            }
        };
        if !wanted {
            // SAFETY: killpg(2) on the group we made; no memory is touched.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
        }
        let status = child.wait()?;
        if !wanted {
            drop(rx);
            return Ok(130);
        }
        let _ = pump.join();
        Ok(status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
    }
}

/// The body of `fcdev __test-vm`: serve `fcdev test VM <name>` over HTTP on a loopback port written to the port
/// file, until killed.
pub fn run_test_vm(name: &str, run_dir: &Path, cmdline: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    println!("test VM {name} starting ({cmdline})");
    if cmdline.split_whitespace().any(|a| a == "test:never-ready") {
        println!("test VM {name}: told never to become ready");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    if let Some(ms) = cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix("test:delay-ms="))
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let tmp = run_dir.join(format!("{PORT_FILE}.tmp"));
    std::fs::write(&tmp, port.to_string())?;
    std::fs::rename(&tmp, run_dir.join(PORT_FILE))?;
    println!("test VM {name} listening on 127.0.0.1:{port}");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut buf = [0u8; 1024];
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let n = stream.read(&mut buf).unwrap_or(0);
        // A console line per HTTP request, so `fcdev logs -f` has something to follow.
        let request = String::from_utf8_lossy(&buf[..n]);
        if let Some(line) = request.lines().next().filter(|l| !l.is_empty()) {
            println!("test VM {name}: {line}");
        }
        let body = format!("fcdev test VM {name}\n");
        let _ = write!(
            stream,
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    }
    Ok(())
}
