//! The sandbox backend: the cell daemon runs as PID 1 of its own namespaces on the box's kernel.
//!
//! This is WEAKER isolation than a microVM: the cell shares the box's kernel, so a kernel bug
//! reachable through the allowed syscalls is a way out. It exists for hosts where KVM cannot boot
//! Linux (developer machines, CI, this one). The [jailed core](super::jailed) does the cell's
//! directory, cgroup, network and helper; this adds the cell daemon's jail: the cell rootfs as the
//! overlay's lower layer, `run/` at `/run/hive` and the build image at `/images/build`. The cell
//! daemon then listens on `<cell>/run/agent.sock`; its output is the cell's `console.log`.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hive_jail::cgroup::{Hierarchy, Limits, SANDBOX_DEVICES};
use hive_jail::{BindSpec, JailSpec, RootSpec};

use super::jailed::{CellKind, Jailed, Layout};
use super::{BackendError, CellSpec};
use crate::cell::Connector;
use crate::net::BoxNet;

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

/// The sandbox's part of a [`Jailed`] backend.
#[derive(Debug)]
pub struct SandboxKind {
    cfg: SandboxConfig,
}

/// The sandbox backend.
pub type Sandbox = Jailed<SandboxKind>;

impl Jailed<SandboxKind> {
    /// Checks the two image directories and the cgroup hierarchy.
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
        let layout = Layout {
            data_dir: cfg.data_dir.clone(),
            cgroup_parent: cfg.cgroup_parent.clone(),
            net: cfg.net.clone(),
            helper: cfg.jail_helper.clone(),
        };
        let backend = Jailed::with_kind(SandboxKind { cfg }, layout, cgroups)?;
        tracing::warn!(
            "sandbox backend: cells share the box's kernel (namespaces, cgroup v{}, seccomp); \
             this is weaker isolation than a microVM",
            backend.cgroups().version()
        );
        Ok(backend)
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.kind().cfg
    }
}

impl CellKind for SandboxKind {
    const NAME: &'static str = "sandbox";
    const LOG_FILE: &'static str = "console.log";
    const READY_POLL: (Duration, Duration) = (Duration::from_millis(2), Duration::from_millis(50));

    fn prepare(&self, spec: &CellSpec, _dir: &Path) -> Result<Limits, BackendError> {
        let class = &spec.size_class;
        Ok(Limits {
            vcpus: class.vcpus.max(1),
            memory_bytes: class.memory_mib.max(64) * 1024 * 1024,
            pids_max: if class.pids_max == 0 {
                1024
            } else {
                class.pids_max
            },
            devices: SANDBOX_DEVICES,
        })
    }

    async fn attach(&self, _spec: &CellSpec, _netns: &Path) -> Result<(), BackendError> {
        Ok(())
    }

    async fn detach(&self, _netns: &Path) {}

    fn jail_spec(
        &self,
        spec: &CellSpec,
        dir: &Path,
        netns: PathBuf,
        cgroup_procs: Vec<PathBuf>,
    ) -> JailSpec {
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

    fn connector(&self, dir: &Path) -> Connector {
        Connector::Unix(dir.join("run").join("agent.sock"))
    }

    fn death_detail(&self, dir: &Path, _exit: Option<Option<i32>>) -> String {
        format!("console: {}", console_tail(dir))
    }

    fn last_words(&self, dir: &Path) -> String {
        format!("console: {}", console_tail(dir))
    }
}

/// The last five lines of the cell daemon's console.
fn console_tail(dir: &Path) -> String {
    let text = fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}
