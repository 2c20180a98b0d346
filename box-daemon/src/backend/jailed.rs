//! The jailed core both cell backends share: a cell is one `hive-box jail` helper process.
//!
//! Per cell it lays out `<data>/cells/<id>/` (`upper/ work/ rootfs/` for the jail's overlay,
//! `run/` for the agent socket, the record `cell.json`), makes the cgroup and the network (netns +
//! veth + firewall membership, from [`net`](crate::net)), writes `jail.json` and starts
//! `hive-box jail` on it with its output in the cell's log file; readiness is the cell daemon
//! answering health through the cell's [`Connector`]. Destroy kills the jail's PID 1, the
//! cgroup, the network and the directory; it is idempotent and the reaper uses it on leftovers.
//!
//! What differs between backends is a [`CellKind`]: the files it adds to the cell directory and
//! the cgroup limits ([`CellKind::prepare`]), what it adds to the cell's netns
//! ([`CellKind::attach`]), the jail spec, the connector and the words its errors carry.
use std::collections::HashMap;
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hive_jail::cgroup::{Hierarchy, Limits};
use hive_jail::JailSpec;

use super::{BackendError, CellBackend, CellRecord, CellSpec, Leftover};
use crate::cell::{Cell, CellError, Connector};
use crate::net::{BoxNet, CellNetNames, NETNS_DIR};
use hive_sys::{now_ms, Backoff};

/// Sub-directories of every cell directory.
const CELL_SUBDIRS: [&str; 4] = ["upper", "work", "rootfs", "run"];

/// What one backend adds to the jailed core.
pub trait CellKind: Send + Sync + 'static {
    /// `sandbox` or `microvm`, as reported to the control plane.
    const NAME: &'static str;
    /// File in the cell directory that gets the jail helper's and its program's stdout and
    /// stderr (kept with the cell, never in the box daemon's log).
    const LOG_FILE: &'static str;
    /// First and longest pause between two readiness checks.
    const READY_POLL: (Duration, Duration);

    /// Writes the backend's own files into `dir` (the common layout and the record exist) and
    /// returns the cell's cgroup limits. Runs before anything outside the directory is made, so
    /// a bad class or file fails here.
    fn prepare(&self, spec: &CellSpec, dir: &Path) -> Result<Limits, BackendError>;

    /// The user namespace map of the cell (sandbox), or None to keep the box's (microvm).
    fn id_map(&self, _spec: &CellSpec) -> Option<hive_jail::userns::IdMap> {
        None
    }

    /// Adds to the cell's network namespace `netns` once it exists (microvm: the TAP).
    fn attach(
        &self,
        spec: &CellSpec,
        netns: &Path,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Removes what [`CellKind::attach`] added, before the namespace goes. Idempotent.
    fn detach(&self, netns: &Path) -> impl Future<Output = ()> + Send;

    /// The jail: root, binds, program, environment.
    fn jail_spec(
        &self,
        spec: &CellSpec,
        dir: &Path,
        netns: PathBuf,
        cgroup_procs: Vec<PathBuf>,
    ) -> JailSpec;

    /// How the box reaches the cell daemon of the cell in `dir`.
    fn connector(&self, dir: &Path) -> Connector;

    /// Why the cell in `dir` ended, for [`CellError::Died`]; `exit` is the helper's exit code
    /// when this daemon started it (`None`: not known, `Some(None)`: killed by a signal).
    fn death_detail(&self, dir: &Path, exit: Option<Option<i32>>) -> String;

    /// The cell's last output, appended to [`CellError::NotReady`].
    fn last_words(&self, dir: &Path) -> String;
}

/// Where the core keeps cells and which helper it runs; the rest of a backend's configuration
/// belongs to its [`CellKind`].
#[derive(Debug, Clone)]
pub struct Layout {
    /// `<data-dir>/cells` holds one directory per cell.
    pub data_dir: PathBuf,
    /// Parent cgroup name for this box's cells.
    pub cgroup_parent: String,
    /// The box's cell network.
    pub net: BoxNet,
    /// The `hive-box` binary to run as `hive-box jail` (normally our own executable).
    pub helper: PathBuf,
}

/// A cell backend: the core around one [`CellKind`].
pub struct Jailed<K> {
    kind: K,
    layout: Layout,
    cgroups: Hierarchy,
    helpers: Mutex<HashMap<String, tokio::process::Child>>,
}

impl<K: std::fmt::Debug> std::fmt::Debug for Jailed<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jailed")
            .field("kind", &self.kind)
            .field("layout", &self.layout)
            .field("cgroups", &self.cgroups)
            .finish()
    }
}

impl<K: CellKind> Jailed<K> {
    /// Creates `<data-dir>/cells` and wraps `kind`.
    pub fn with_kind(kind: K, layout: Layout, cgroups: Hierarchy) -> Result<Self, BackendError> {
        let cells = layout.data_dir.join("cells");
        fs::create_dir_all(&cells).map_err(|source| BackendError::CellDir {
            path: cells.clone(),
            source,
        })?;
        Ok(Jailed {
            kind,
            layout,
            cgroups,
            helpers: Mutex::new(HashMap::new()),
        })
    }

    /// The backend's own part.
    pub fn kind(&self) -> &K {
        &self.kind
    }

    /// The cgroup hierarchy cells are made in.
    pub fn cgroups(&self) -> &Hierarchy {
        &self.cgroups
    }

    /// `<data-dir>/cells/<id>`.
    pub fn cell_dir(&self, id: &str) -> PathBuf {
        self.layout.data_dir.join("cells").join(id)
    }

    /// The cell's `run/` (the sandbox's `/run/hive`, the microVM's vsock sockets).
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.cell_dir(id).join("run")
    }

    async fn try_create(&self, spec: &CellSpec) -> Result<Cell, BackendError> {
        let dir = self.cell_dir(&spec.id);
        for sub in CELL_SUBDIRS {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(dir_err(&p))?;
        }
        CellRecord {
            id: spec.id.clone(),
            size_class: spec.size_class.name.clone(),
            slot: spec.slot,
            created_at_ms: now_ms(),
            ..Default::default()
        }
        .store(&dir)
        .map_err(dir_err(&dir))?;

        let limits = self.kind.prepare(spec, &dir)?;
        let cgroup = self
            .cgroups
            .create(&self.layout.cgroup_parent, &spec.id, limits)?;
        let net = self
            .layout
            .net
            .create_cell_owned(
                &CellNetNames::for_cell(&spec.id),
                spec.slot,
                self.kind.id_map(spec),
            )
            .await?;
        self.kind.attach(spec, &net.netns).await?;

        let jail = self
            .kind
            .jail_spec(spec, &dir, net.netns.clone(), cgroup.procs_files());
        let spec_path = dir.join("jail.json");
        let text = serde_json::to_vec_pretty(&jail)
            .map_err(std::io::Error::other)
            .map_err(dir_err(&spec_path))?;
        fs::write(&spec_path, text).map_err(dir_err(&spec_path))?;
        let log_path = dir.join(K::LOG_FILE);
        let log = fs::File::create(&log_path).map_err(dir_err(&log_path))?;
        let log2 = log.try_clone().map_err(dir_err(&log_path))?;
        let child = tokio::process::Command::new(&self.layout.helper)
            .arg("jail")
            .arg("--spec")
            .arg(&spec_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .env_clear()
            .spawn()
            .map_err(|source| BackendError::Spawn {
                helper: self.layout.helper.clone(),
                source,
            })?;
        self.helpers().insert(spec.id.clone(), child);
        Ok(Cell::new(
            spec.id.clone(),
            spec.size_class.name.clone(),
            self.kind.connector(&dir),
        ))
    }

    fn helpers(&self) -> std::sync::MutexGuard<'_, HashMap<String, tokio::process::Child>> {
        self.helpers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The helper's exit status once it ended (None while it runs or when this daemon did not
    /// start it).
    fn exit_code(&self, cell_id: &str) -> Option<Option<i32>> {
        let mut helpers = self.helpers();
        let child = helpers.get_mut(cell_id)?;
        match child.try_wait() {
            Ok(Some(status)) => Some(status.code()),
            _ => None,
        }
    }

    fn died(&self, cell_id: &str) -> BackendError {
        CellError::Died {
            cell: cell_id.to_string(),
            detail: self
                .kind
                .death_detail(&self.cell_dir(cell_id), self.exit_code(cell_id)),
        }
        .into()
    }
}

fn dir_err(path: &Path) -> impl FnOnce(std::io::Error) -> BackendError {
    let path = path.to_path_buf();
    move |source| BackendError::CellDir { path, source }
}

impl<K: CellKind> CellBackend for Jailed<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    async fn create(&self, spec: CellSpec) -> Result<Cell, BackendError> {
        match self.try_create(&spec).await {
            Ok(cell) => Ok(cell),
            Err(e) => {
                if let Err(d) = self.destroy(&spec.id).await {
                    tracing::warn!(cell = %spec.id, error = %hive_sys::error_chain(&d), "cleanup after failed create");
                }
                Err(e)
            }
        }
    }

    async fn wait_ready(&self, cell: &Cell, timeout: Duration) -> Result<(), BackendError> {
        let start = Instant::now();
        let (socket, what) = match &cell.connector {
            Connector::Unix(p) => (p, "agent socket"),
            Connector::VsockMux { path, .. } => (path, "vsock socket"),
        };
        let mut last = format!("{what} not there yet");
        let (first, longest) = K::READY_POLL;
        let mut pause = Backoff::new(first, longest);
        while start.elapsed() < timeout {
            if !self.is_alive(&cell.id) {
                return Err(self.died(&cell.id));
            }
            if socket.exists() {
                let left = timeout.saturating_sub(start.elapsed());
                match cell.health(left.min(Duration::from_secs(2))).await {
                    Ok(true) => return Ok(()),
                    Ok(false) => last = "health answered ready=false".into(),
                    Err(e) => last = e,
                }
            }
            tokio::time::sleep(pause.next_delay()).await;
        }
        if !self.is_alive(&cell.id) {
            return Err(self.died(&cell.id));
        }
        Err(CellError::NotReady {
            cell: cell.id.clone(),
            waited: timeout,
            last: format!("{last}; {}", self.kind.last_words(&self.cell_dir(&cell.id))),
        }
        .into())
    }

    fn last_words(&self, cell_id: &str) -> String {
        let dir = self.cell_dir(cell_id);
        match self.exit_code(cell_id) {
            // Gone: how it ended (exit code, console and VMM log ends).
            Some(code) => self.kind.death_detail(&dir, Some(code)),
            None => self.kind.last_words(&dir),
        }
    }

    fn is_alive(&self, cell_id: &str) -> bool {
        match self.helpers().get_mut(cell_id) {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    async fn destroy(&self, cell_id: &str) -> Result<(), BackendError> {
        let child = self.helpers().remove(cell_id);
        // PID 1 goes first, so the helper (its parent) reaps it and exits; killing both at once
        // would orphan PID 1 to the host's init, which may leave it a zombie. When PID 1 dies the
        // kernel kills the rest of its pid namespace, and the jail's mounts (overlay, binds,
        // /proc, /dev) go with the namespace. A helper that already ended has no PID 1 left (and
        // its pid may be another process's by now): nothing to kill.
        if let Some(mut child) = child {
            if let Ok(None) = child.try_wait() {
                if let Some(pid) = fs::read_to_string(self.cell_dir(cell_id).join("pid"))
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
        // Whatever is still in the cgroup (a helper from a previous run of the box) is killed.
        let cgroup = self.cgroups.open(&self.layout.cgroup_parent, cell_id);
        let killed = cgroup.destroy().await;
        let names = CellNetNames::for_cell(cell_id);
        self.kind
            .detach(&Path::new(NETNS_DIR).join(&names.netns))
            .await;
        self.layout.net.destroy_cell(&names).await;
        let dir = self.cell_dir(cell_id);
        if dir.exists() {
            // The overlay and binds were mounted only in the jail's mount namespace, so from
            // here rootfs/ is a plain empty directory.
            fs::remove_dir_all(&dir).map_err(|source| BackendError::CellDir {
                path: dir.clone(),
                source,
            })?;
        }
        killed?;
        Ok(())
    }

    fn inspect(&self) -> Vec<Leftover> {
        find_leftovers(
            &self.layout.data_dir,
            &self.cgroups,
            &self.layout.cgroup_parent,
        )
    }

    fn record_build(&self, cell_id: &str, build_id: &str, lease_id: &str) {
        record_build_in(&self.cell_dir(cell_id), cell_id, build_id, lease_id);
    }
}

/// The last `n` non-empty lines of a log file, joined with " | " (empty when missing). Bounded
/// and cleaned: it comes from the guest and ends up in the box daemon's log.
pub fn tail(path: &Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = Vec::new();
    if let Ok(mut f) = fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
        let _ = f.take(TAIL_BYTES).read_to_end(&mut buf);
    }
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            l.chars()
                .filter(|c| !c.is_control())
                .take(TAIL_LINE)
                .collect::<String>()
        })
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Bytes read from the end of a log for [`tail`].
const TAIL_BYTES: u64 = 8 * 1024;
/// Characters kept of each line [`tail`] returns.
const TAIL_LINE: usize = 240;

/// The cells a backend left under `<data_dir>/cells` and in its cgroup parent (both backends
/// keep the same layout); the reaper's view at start-up.
fn find_leftovers(
    data_dir: &Path,
    cgroups: &hive_jail::cgroup::Hierarchy,
    cgroup_parent: &str,
) -> Vec<Leftover> {
    let cells = data_dir.join("cells");
    let mut found: std::collections::BTreeMap<String, Leftover> = Default::default();
    if let Ok(entries) = std::fs::read_dir(&cells) {
        for e in entries.flatten() {
            let Ok(id) = e.file_name().into_string() else {
                continue;
            };
            let dir = e.path();
            found.insert(
                id.clone(),
                Leftover {
                    record: CellRecord::load(&dir),
                    id,
                    dir,
                },
            );
        }
    }
    // A cgroup without a directory (crash between the two) is still ours to remove.
    for id in cgroups.children(cgroup_parent) {
        let dir = cells.join(&id);
        found.entry(id.clone()).or_insert(Leftover {
            id,
            dir,
            record: None,
        });
    }
    found.into_values().collect()
}

/// Adds the build and lease to the record in `cell_dir` (a missing record is started afresh).
fn record_build_in(cell_dir: &Path, cell_id: &str, build_id: &str, lease_id: &str) {
    let mut rec = CellRecord::load(cell_dir).unwrap_or_else(|| CellRecord {
        id: cell_id.to_string(),
        ..Default::default()
    });
    rec.build_id = build_id.to_string();
    rec.lease_id = lease_id.to_string();
    if let Err(e) = rec.store(cell_dir) {
        tracing::warn!(cell = %cell_id, error = %e, "write cell record");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_is_bounded_and_clean() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("serial.log");
        let mut text = String::new();
        for i in 0..2000 {
            text.push_str(&format!("line {i}\x1b[31m\n"));
        }
        text.push_str(&"x".repeat(100_000));
        text.push('\n');
        fs::write(&p, text).unwrap();
        let t = tail(&p, 3);
        assert!(t.len() < 3 * (TAIL_LINE + 3), "{} bytes", t.len());
        assert!(!t.contains('\x1b'));
        assert!(tail(&dir.path().join("missing"), 3).is_empty());
        fs::write(&p, "a\n\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&p, 2), "c | d");
    }

    #[test]
    fn leftovers_and_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cells = dir.path().join("cells");
        fs::create_dir_all(cells.join("aaaaaaaaaaaa")).unwrap();
        fs::create_dir_all(cells.join("bbbbbbbbbbbb")).unwrap();
        record_build_in(&cells.join("aaaaaaaaaaaa"), "aaaaaaaaaaaa", "b1", "l1");
        // A hierarchy with no cgroups at all: only the directories count.
        let cg = Hierarchy::V2 {
            root: dir.path().join("no-cgroup"),
        };
        let found = find_leftovers(dir.path(), &cg, "parent");
        assert_eq!(found.len(), 2);
        let rec = found[0].record.as_ref().expect("record");
        assert_eq!((rec.build_id.as_str(), rec.lease_id.as_str()), ("b1", "l1"));
        assert!(found[1].record.is_none());
        assert_eq!(
            CellRecord::load(&cells.join("aaaaaaaaaaaa")).map(|r| r.id),
            Some("aaaaaaaaaaaa".to_string())
        );
        let tmp = format!("{}.tmp", crate::backend::RECORD_FILE);
        assert!(!cells.join("aaaaaaaaaaaa").join(tmp).exists());
    }
}
