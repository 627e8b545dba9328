//! A real PostgreSQL for tests: Debian's postgresql-15, `initdb` into a temp dir and `pg_ctl start` listening only
//! on a unix socket in that dir, run as `nobody` (PostgreSQL refuses to run as root). One server per test binary
//! ([`shared`], stopped and deleted when the binary exits); a fresh database per test ([`Postgres::database`]).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

pub const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Postgres {
    /// Data dir and socket dir live here; deleted at stop.
    pub dir: PathBuf,
    stopped: std::sync::atomic::AtomicBool,
}

/// The uid and gid the server runs as when we are root (`nobody`).
fn unprivileged() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions; getpwnam returns a pointer to static storage or null, read at once.
    unsafe {
        if libc::geteuid() != 0 {
            return None;
        }
        let pw = libc::getpwnam(c"nobody".as_ptr());
        assert!(
            !pw.is_null(),
            "no user `nobody` to run PostgreSQL as (it refuses root)"
        );
        Some(((*pw).pw_uid, (*pw).pw_gid))
    }
}

fn pg_command(dir: &Path, program: &str) -> Command {
    let path = Path::new(BIN).join(program);
    assert!(
        path.exists(),
        "{} is missing: these tests need a real PostgreSQL 15. Install it with \
         `apt-get install -y --no-install-recommends postgresql-15 postgresql-client-15` \
         (scripts/install-packages.sh --ci does)",
        path.display()
    );
    let mut cmd = match unprivileged() {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".to_string(),
                "--".to_string(),
            ])
            .arg(path);
            c
        }
        None => Command::new(path),
    };
    cmd.current_dir(dir).env("LC_ALL", "C").env_remove("PGDATA");
    cmd
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Postgres {
    /// initdb and start a new server (a few seconds).
    pub fn start() -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("fcdev-pg-")
            .tempdir()
            .expect("tempdir")
            .keep();
        if let Some((uid, gid)) = unprivileged() {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown the PostgreSQL dir");
        }
        let mut initdb = pg_command(&dir, "initdb");
        initdb.args([
            "-D",
            "data",
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        ]);
        run(initdb, "initdb");
        let pg = Postgres {
            dir,
            stopped: false.into(),
        };
        pg.start_again();
        pg
    }

    /// Start the (stopped) server on its data dir.
    pub fn start_again(&self) {
        let mut start = pg_command(&self.dir, "pg_ctl");
        start
            .args(["-D", "data", "-l", "log", "-w", "-t", "60", "-o"])
            .arg(format!(
                "-k {} -c listen_addresses='' -F -c max_connections=400 -c shared_buffers=32MB",
                self.dir.display()
            ));
        start.arg("start");
        run(start, "pg_ctl start");
        self.stopped.store(false, Ordering::SeqCst);
    }

    /// Stop the server (connections are cut at once); the data stays.
    pub fn stop(&self) {
        let mut stop = pg_command(&self.dir, "pg_ctl");
        stop.args(["-D", "data", "-m", "fast", "-w", "stop"]);
        run(stop, "pg_ctl stop");
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// A URL for database `db` (unix socket).
    pub fn url(&self, db: &str) -> String {
        format!("postgres:///{db}?host={}&user=postgres", self.dir.display())
    }

    /// A fresh, empty database: its URL.
    pub fn database(&self) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let url = self.url("postgres");
        // The postgres client runs its own runtime: keep it off any async test's thread.
        let sql = format!("CREATE DATABASE {name}");
        std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
            c.batch_execute(&sql).expect("create database");
        })
        .join()
        .expect("create database");
        self.url(&name)
    }

    fn stop_and_delete(&self) {
        if !self.stopped.load(Ordering::SeqCst) {
            let mut stop = pg_command(&self.dir, "pg_ctl");
            stop.args(["-D", "data", "-m", "immediate", "-w", "stop"]);
            let _ = stop.output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop_and_delete();
    }
}

static SHARED: OnceLock<Postgres> = OnceLock::new();

extern "C" fn stop_shared() {
    if let Some(pg) = SHARED.get() {
        pg.stop_and_delete();
    }
}

/// The server of this test binary, started at first use; stopped and deleted when the binary exits.
pub fn shared() -> &'static Postgres {
    SHARED.get_or_init(|| {
        let pg = Postgres::start();
        // SAFETY: registers a plain function to run at exit; it only reads a static.
        unsafe {
            libc::atexit(stop_shared);
        }
        pg
    })
}
