//! qemu processes: started in their own session (they outlive the server), found again through the pid file.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::cmdline::files;

/// Spawn `binary args` detached from our session, stdout/stderr appended to `run_dir/qemu.log`; returns the pid
/// once qemu wrote its pid file. A reaper thread collects the exit status so no zombie stays behind while the
/// server lives; after a server restart the orphan is reaped by init.
pub fn spawn_detached(binary: &Path, args: &[OsString], run_dir: &Path) -> std::io::Result<i32> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join(files::LOG))?;
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .current_dir(run_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid and sched_setscheduler are async-signal-safe system calls; nothing else runs between fork
    // and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SCHED_BATCH (all of qemu's threads inherit it): a waking VM does not preempt the one running.
            // Restored VMs are CPU-bound together for their first seconds (every code path translated afresh
            // under TCG); longer slices keep each one's translation cache warm in the host's caches. A press
            // cluster was ready in 2.27 s median instead of 2.55 s (10 alternating `up`s each, 2 cores). Not
            // fatal when refused.
            let param = libc::sched_param { sched_priority: 0 };
            libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid_file = run_dir.join(files::PID);
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(std::io::Error::other(format!(
                "qemu exited at once ({status}); see qemu.log"
            )));
        }
        if let Some(pid) = read_pid(run_dir) {
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            return Ok(pid);
        }
        if t0.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!(
                "qemu wrote no pid file {} within 15 s",
                pid_file.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn read_pid(run_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(run_dir.join(files::PID)).ok()?;
    text.trim().parse().ok().filter(|p| *p > 0)
}

/// Whether `pid` is a live (not zombie) process whose command line mentions `run_dir` (guards against pid reuse).
pub fn alive(pid: i32, run_dir: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("X");
    if state == "Z" || state == "X" {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let run_dir = run_dir
        .canonicalize()
        .unwrap_or_else(|_| run_dir.to_path_buf());
    let needle = run_dir.as_os_str().as_encoded_bytes();
    !needle.is_empty() && cmdline.windows(needle.len()).any(|w| w == needle)
}

pub fn kill9(pid: i32) {
    // SAFETY: plain syscall on a pid we verified belongs to this VM.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Wait until the process is gone; true when it is.
pub fn wait_gone(pid: i32, run_dir: &Path, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if !alive(pid, run_dir) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    !alive(pid, run_dir)
}
