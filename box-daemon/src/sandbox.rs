//! The sandbox backend: the cell daemon runs as PID 1 of its own namespaces on the box's kernel.
//!
//! This is WEAKER isolation than a microVM: the cell shares the box's kernel, so a kernel bug
//! reachable through the allowed syscalls is a way out. It exists for hosts where KVM cannot boot
//! Linux (developer machines, CI, this one). Per cell it lays out `<data>/cells/<id>/` (upper,
//! work, rootfs, run), makes the cgroup and the network (netns + veth + firewall membership), writes
//! a [`JailSpec`] and starts `hive-box jail` on it; the cell daemon then listens on
//! `<cell>/run/agent.sock`. Destroy kills the cgroup, removes the network and the directory.
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::backend::{BackendError, CellBackend, CellRecord, CellSpec, Leftover};
use crate::cell::{Cell, CellError, Connector};
use crate::net::{BoxNet, CellNetNames};
use hive_jail::cgroup::{Hierarchy, Limits};
use hive_jail::{BindSpec, JailSpec, RootSpec};

/// Where the cell daemon lives in the cell rootfs.
pub const CELL_DAEMON: &str = "/sbin/hive-cell";

#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// `<data-dir>/cells` holds one directory per cell.
    pub data_dir: PathBuf,
    /// Read-only lower layer of every cell's root.
    pub cell_rootfs: PathBuf,
    /// Build image, bound read-only at /images/build.
    pub build_image: PathBuf,
    /// A cell daemon binary bound over /sbin/hive-cell (development).
    pub cell_binary: Option<PathBuf>,
    /// The `hive-box` binary to run as `hive-box jail` (normally our own executable).
    pub jail_helper: PathBuf,
    /// Parent cgroup name for this box's cells.
    pub cgroup_parent: String,
    pub net: BoxNet,
    /// Extra environment for the cell daemon (e.g. RUST_LOG).
    pub cell_env: BTreeMap<String, String>,
}

pub struct Sandbox {
    cfg: SandboxConfig,
    cgroups: Hierarchy,
    helpers: Mutex<HashMap<String, tokio::process::Child>>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("cfg", &self.cfg)
            .field("cgroups", &self.cgroups)
            .finish()
    }
}

impl Sandbox {
    pub fn new(cfg: SandboxConfig) -> Result<Self, BackendError> {
        let cgroups = Hierarchy::detect()?;
        for (what, p) in [
            ("cell rootfs", &cfg.cell_rootfs),
            ("build image", &cfg.build_image),
        ] {
            if !p.is_dir() {
                return Err(BackendError::Unavailable {
                    backend: "sandbox",
                    reason: format!("{what} {} is not a directory", p.display()),
                });
            }
        }
        let cells = cfg.data_dir.join("cells");
        fs::create_dir_all(&cells).map_err(|source| BackendError::CellDir {
            path: cells.clone(),
            source,
        })?;
        tracing::warn!(
            "sandbox backend: cells share the box's kernel (namespaces, cgroup v{}, seccomp); \
             this is weaker isolation than a microVM",
            cgroups.version()
        );
        Ok(Sandbox {
            cfg,
            cgroups,
            helpers: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.cfg
    }

    pub fn cgroups(&self) -> &Hierarchy {
        &self.cgroups
    }

    pub fn cell_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("cells").join(id)
    }

    /// The cell's `/run/hive` on the box side.
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.cell_dir(id).join("run")
    }

    fn jail_spec(&self, spec: &CellSpec, netns: PathBuf, cgroup_procs: Vec<PathBuf>) -> JailSpec {
        let dir = self.cell_dir(&spec.id);
        let mut binds = vec![
            BindSpec {
                source: dir.join("run"),
                target: "/run/hive".into(),
                readonly: false,
            },
            BindSpec {
                source: self.cfg.build_image.clone(),
                target: "/images/build".into(),
                readonly: true,
            },
        ];
        if let Some(bin) = &self.cfg.cell_binary {
            binds.push(BindSpec {
                source: bin.clone(),
                target: CELL_DAEMON.into(),
                readonly: true,
            });
        }
        let mut env = self.cfg.cell_env.clone();
        env.insert("HIVE_CELL_ID".into(), spec.id.clone());
        env.insert(
            "HIVE_CELL_LISTEN".into(),
            "unix:/run/hive/agent.sock".into(),
        );
        env.insert("HIVE_BUILD_IMAGE".into(), "/images/build".into());
        env.insert("HIVE_WORK_DIR".into(), "/var/lib/hive".into());
        env.entry("PATH".into())
            .or_insert_with(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        JailSpec {
            hostname: format!("cell-{}", spec.id),
            root: RootSpec {
                lower: self.cfg.cell_rootfs.clone(),
                upper: dir.join("upper"),
                work: dir.join("work"),
                merged: dir.join("rootfs"),
            },
            binds,
            netns: Some(netns),
            cgroup_procs,
            pid_file: dir.join("pid"),
            program: CELL_DAEMON.into(),
            args: vec![
                "--listen".into(),
                "unix:/run/hive/agent.sock".into(),
                "--cell-id".into(),
                spec.id.clone(),
                "--build-image".into(),
                "/images/build".into(),
                "--work-dir".into(),
                "/var/lib/hive".into(),
            ],
            env,
            seccomp: true,
        }
    }

    async fn try_create(&self, spec: &CellSpec) -> Result<Cell, BackendError> {
        let dir = self.cell_dir(&spec.id);
        let dir_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BackendError::CellDir { path, source }
        };
        for sub in ["upper", "work", "rootfs", "run"] {
            fs::create_dir_all(dir.join(sub)).map_err(dir_err(&dir.join(sub)))?;
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

        let class = &spec.size_class;
        let cgroup = self.cgroups.create(
            &self.cfg.cgroup_parent,
            &spec.id,
            Limits {
                vcpus: class.vcpus.max(1),
                memory_bytes: class.memory_mib.max(64) * 1024 * 1024,
                pids_max: if class.pids_max == 0 {
                    1024
                } else {
                    class.pids_max
                },
                devices: hive_jail::cgroup::SANDBOX_DEVICES,
            },
        )?;
        let net = self
            .cfg
            .net
            .create_cell(&CellNetNames::for_cell(&spec.id), spec.slot)
            .await?;

        let jail = self.jail_spec(spec, net.netns.clone(), cgroup.procs_files());
        let spec_path = dir.join("jail.json");
        fs::write(
            &spec_path,
            serde_json::to_vec_pretty(&jail)
                .map_err(std::io::Error::other)
                .map_err(dir_err(&spec_path))?,
        )
        .map_err(dir_err(&spec_path))?;
        // The cell daemon's own output is its console: kept in the cell dir (gone with the cell),
        // never in the box daemon's log.
        let console_path = dir.join("console.log");
        let console = fs::File::create(&console_path).map_err(dir_err(&console_path))?;
        let console2 = console.try_clone().map_err(dir_err(&console_path))?;
        let child = tokio::process::Command::new(&self.cfg.jail_helper)
            .arg("jail")
            .arg("--spec")
            .arg(&spec_path)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console2)
            .env_clear()
            .spawn()
            .map_err(|source| BackendError::Spawn {
                helper: self.cfg.jail_helper.clone(),
                source,
            })?;
        self.helpers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.id.clone(), child);
        Ok(Cell::new(
            spec.id.clone(),
            class.name.clone(),
            Connector::Unix(self.run_dir(&spec.id).join("agent.sock")),
        ))
    }

    fn console_tail(&self, id: &str) -> String {
        let text = fs::read_to_string(self.cell_dir(id).join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl CellBackend for Sandbox {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    async fn create(&self, spec: CellSpec) -> Result<Cell, BackendError> {
        match self.try_create(&spec).await {
            Ok(cell) => Ok(cell),
            Err(e) => {
                if let Err(d) = self.destroy(&spec.id).await {
                    tracing::warn!(cell = %spec.id, error = %hive_jail::error_chain(&d), "cleanup after failed create");
                }
                Err(e)
            }
        }
    }

    async fn wait_ready(&self, cell: &Cell, timeout: Duration) -> Result<(), BackendError> {
        let start = Instant::now();
        let socket = self.run_dir(&cell.id).join("agent.sock");
        let mut last = String::from("agent socket not there yet");
        let mut pause = Duration::from_millis(2);
        while start.elapsed() < timeout {
            if !self.is_alive(&cell.id) {
                return Err(CellError::Died {
                    cell: cell.id.clone(),
                    detail: format!("console: {}", self.console_tail(&cell.id)),
                }
                .into());
            }
            if socket.exists() {
                match cell.health(Duration::from_secs(2)).await {
                    Ok(true) => return Ok(()),
                    Ok(false) => last = "health answered ready=false".into(),
                    Err(e) => last = e,
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        Err(CellError::NotReady {
            cell: cell.id.clone(),
            waited: timeout,
            last: format!("{last}; console: {}", self.console_tail(&cell.id)),
        }
        .into())
    }

    fn is_alive(&self, cell_id: &str) -> bool {
        let mut helpers = self.helpers.lock().unwrap_or_else(|p| p.into_inner());
        match helpers.get_mut(cell_id) {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    async fn destroy(&self, cell_id: &str) -> Result<(), BackendError> {
        let child = self
            .helpers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(cell_id);
        // PID 1 goes first, so the helper (its parent) reaps it and exits; killing both at once
        // would orphan PID 1 to the host's init, which may leave it a zombie. When PID 1 dies the
        // kernel kills the rest of its pid namespace, and the jail's mounts (overlay, binds,
        // /proc, /dev) go with the namespace.
        if let Some(mut child) = child {
            if let Some(pid) = fs::read_to_string(self.cell_dir(cell_id).join("pid"))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
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
        let cgroup = self.cgroups.open(&self.cfg.cgroup_parent, cell_id);
        let killed = cgroup.destroy().await;
        self.cfg
            .net
            .destroy_cell(&CellNetNames::for_cell(cell_id))
            .await;
        let dir = self.cell_dir(cell_id);
        if dir.exists() {
            // The overlay was mounted only inside the jail's mount namespace, so from here rootfs/
            // is a plain empty directory.
            fs::remove_dir_all(&dir).map_err(|source| BackendError::CellDir {
                path: dir.clone(),
                source,
            })?;
        }
        killed?;
        Ok(())
    }

    fn inspect(&self) -> Vec<Leftover> {
        crate::backend::find_leftovers(&self.cfg.data_dir, &self.cgroups, &self.cfg.cgroup_parent)
    }

    fn record_build(&self, cell_id: &str, build_id: &str, lease_id: &str) {
        crate::backend::record_build_in(&self.cell_dir(cell_id), cell_id, build_id, lease_id);
    }
}
