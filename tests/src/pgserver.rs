//! A PostgreSQL server of a test's own: `initdb` in a temp dir, the `postgres` binary run as
//! the `postgres` user on a loopback port, so a test can `kill -9` it and start it again (crash
//! recovery included) without touching the machine's shared server that other tests use.
//!
//! Needs root (the data dir is handed to the `postgres` user) and Debian's PostgreSQL packages
//! (`deploy/install-deps.sh` installs them; the binaries are found under
//! `/usr/lib/postgresql/<version>/bin`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Why the server could not be made or started.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (deploy/install-deps.sh installs them)")]
    NoBinaries,
    #[error("no user 'postgres' on this machine (the postgresql package makes it)")]
    NoUser,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("initdb failed: {0}")]
    Initdb(String),
    #[error(
        "postgres did not accept connections on 127.0.0.1:{port} within {secs} s; its log:\n{log}"
    )]
    NotReady { port: u16, secs: u64, log: String },
}

/// A running (or killed) private PostgreSQL server.
pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    uid: u32,
    gid: u32,
    pub port: u16,
    child: Option<Child>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PgError {
    let what = what.into();
    move |source| PgError::Io { what, source }
}

fn bin_dir() -> Result<PathBuf, PgError> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| PgError::NoBinaries)?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists() && p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().ok_or(PgError::NoBinaries)
}

fn postgres_ids() -> Result<(u32, u32), PgError> {
    let user = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .ok_or(PgError::NoUser)?;
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}

impl PgServer {
    /// Makes a cluster (trust authentication on loopback: a test server) with database `hive`
    /// owned by role `hive`, and starts it on `port`.
    pub fn start(port: u16) -> Result<PgServer, PgError> {
        let bin = bin_dir()?;
        let (uid, gid) = postgres_ids()?;
        let dir = tempfile::Builder::new()
            .prefix("hive-pg-")
            .tempdir()
            .map_err(io("temp dir for the PostgreSQL cluster"))?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data).map_err(io("make the data dir"))?;
        for p in [dir.path(), data.as_path()] {
            nix::unistd::chown(p, Some(uid.into()), Some(gid.into())).map_err(|e| PgError::Io {
                what: format!("chown {} to postgres", p.display()),
                source: e.into(),
            })?;
        }
        let out = Command::new(bin.join("initdb"))
            .args([
                "--auth=trust",
                "--username=hive",
                "--encoding=UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .uid(uid)
            .gid(gid)
            .current_dir(dir.path())
            .output()
            .map_err(io("run initdb"))?;
        if !out.status.success() {
            return Err(PgError::Initdb(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        let mut pg = PgServer {
            bin,
            dir,
            uid,
            gid,
            port,
            child: None,
        };
        pg.launch()?;
        let out = Command::new(pg.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "hive",
                "hive",
            ])
            .uid(uid)
            .gid(gid)
            .output()
            .map_err(io("run createdb"))?;
        if !out.status.success() {
            return Err(PgError::Initdb(format!(
                "createdb hive: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(pg)
    }

    /// The URL a control plane is given.
    pub fn url(&self) -> String {
        format!("postgres://hive@127.0.0.1:{}/hive", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn launch(&mut self) -> Result<(), PgError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io("open the server log"))?;
        let err = log.try_clone().map_err(io("server log"))?;
        let data = self.dir.path().join("data");
        let child = Command::new(self.bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "max_connections=200"])
            .uid(self.uid)
            .gid(self.gid)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(io("start postgres"))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60))
    }

    fn wait_ready(&mut self, within: Duration) -> Result<(), PgError> {
        let t0 = Instant::now();
        while t0.elapsed() < within {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(PgError::NotReady {
            port: self.port,
            secs: within.as_secs(),
            log: crate::kvmhost::tail_lines(&self.log(), 30),
        })
    }

    /// `kill -9` of the postmaster (its backends exit when they notice it gone; the next start
    /// waits for them and recovers from the WAL).
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Starts the server again after [`PgServer::crash`]: crash recovery, then ready.
    pub fn restart(&mut self) -> Result<(), PgError> {
        self.crash();
        // Orphaned backends hold the shared memory until they exit; postgres refuses to start
        // while one lives, so wait for the pid file's owner to be gone.
        let pidfile = self.dir.path().join("data/postmaster.pid");
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) && backends_alive(self.dir.path()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(pidfile);
        self.launch()
    }
}

/// Whether any process still runs with this cluster's data dir on its command line or cwd.
fn backends_alive(dir: &Path) -> bool {
    let want = dir.join("data");
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .any(|e| std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd == want))
        })
        .unwrap_or(false)
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // Fast shutdown (SIGINT); then make sure.
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGINT);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) && backends_alive(self.dir.path()) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
