//! The sandbox backend: the cell daemon runs as PID 1 of its own namespaces on the box's kernel.
//!
//! This is WEAKER isolation than a microVM: the cell shares the box's kernel, so a kernel bug
//! reachable through the allowed syscalls is a way out. It exists for hosts where KVM cannot boot
//! Linux (developer machines, CI, this one). The [jailed core](super::jailed) does the cell's
//! directory, cgroup, network and helper; this adds the cell daemon's jail: the cell rootfs as the
//! overlay's lower layer, `run/` at `/run/hive` and the build image at `/images/build`. The cell
//! daemon then listens on `<cell>/run/agent.sock`; its output is the cell's `console.log`.
//!
//! What the cell daemon gets (the jail enforces it; `jail/README.md` has the list): its own user
//! namespace mapping its ids 0..65535 to the cell's own host range (`cell_uid_base` + slot x
//! 65536; root in the cell is an unprivileged uid on the box), the images through idmapped
//! read-only mounts, a read-only /sys, a 16 MiB /run, only the capabilities in
//! `hive_jail::caps::CELL_DAEMON` (over its own namespaces), the seccomp allow-list
//! `hive_jail::seccomp::cell_daemon`, no new user namespaces, no_new_privs.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hive_jail::cgroup::{Hierarchy, Limits, SANDBOX_DEVICES};
use hive_jail::userns::IdMap;
use hive_jail::{BindSpec, JailSpec, RootSpec, SeccompProfile, TmpfsSpec};

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
    /// First host uid (and gid) of this box's cells: the cell in slot N maps its ids 0..65535
    /// to `cell_uid_base + N * 65536 ..` (claimed host-wide by the box, see `claim`).
    pub cell_uid_base: u32,
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
        if let Hierarchy::V2 { .. } = cgroups {
            if let Err(e) = hive_jail::cgroup::devices_program_loads() {
                return Err(BackendError::Unavailable {
                    backend: "sandbox",
                    reason: format!(
                        "cgroup v2 host, and the cells' devices policy (a BPF device program) \
                         cannot be loaded here: {e}; without it a cell could open any device \
                         node it can make"
                    ),
                });
            }
        }
        if IdMap::for_slot(cfg.cell_uid_base, 0).is_none() {
            return Err(BackendError::Unavailable {
                backend: "sandbox",
                reason: format!("cell uid base {} maps no valid range", cfg.cell_uid_base),
            });
        }
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

    fn id_map(&self, spec: &CellSpec) -> Option<IdMap> {
        IdMap::for_slot(self.cfg.cell_uid_base, spec.slot)
    }

    fn prepare(&self, spec: &CellSpec, dir: &Path) -> Result<Limits, BackendError> {
        let class = &spec.size_class;
        let map = self.id_map(spec).ok_or_else(|| BackendError::Unavailable {
            backend: "sandbox",
            reason: format!(
                "cell slot {} is past the last uid from base {}",
                spec.slot, self.cfg.cell_uid_base
            ),
        })?;
        // The cell's root owns its root directory (the overlay's upper) and its socket
        // directory; the rest of the cell directory stays the box's.
        let lower = dir.join("lower");
        fs::create_dir_all(&lower).map_err(|source| BackendError::CellDir {
            path: lower.clone(),
            source,
        })?;
        for sub in ["upper", "run"] {
            let p = dir.join(sub);
            std::os::unix::fs::chown(&p, Some(map.host_base), Some(map.host_base)).map_err(
                |source| BackendError::CellDir {
                    path: p.clone(),
                    source,
                },
            )?;
        }
        Ok(Limits {
            vcpus: class.vcpus.max(1),
            memory_bytes: class.memory_mib.max(64) * 1024 * 1024,
            pids_max: if class.pids_max == 0 {
                1024
            } else {
                class.pids_max
            },
            devices: SANDBOX_DEVICES,
            devices_v2: true,
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
                idmap: false,
            },
            BindSpec {
                source: self.cfg.build_image.clone(),
                target: "/images/build".into(),
                readonly: true,
                idmap: true,
            },
        ];
        if let Some(bin) = &self.cfg.cell_binary {
            binds.push(BindSpec {
                source: bin.clone(),
                target: CELL_DAEMON.into(),
                readonly: true,
                idmap: false,
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
                idmapped_lower: Some(dir.join("lower")),
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
                "--work-size-mib".into(),
                spec.size_class.disk_mib.to_string(),
            ],
            env,
            seccomp: true,
            seccomp_profile: SeccompProfile::CellDaemon,
            userns: self.id_map(spec),
            keep_caps: Some(hive_jail::caps::CELL_DAEMON.to_vec()),
            sysfs: true,
            // /run/hive (the agent socket) is bound inside it; the cell's own /run.
            tmpfs: vec![TmpfsSpec {
                target: "/run".into(),
                size_mib: 16,
                mode: 0o755,
            }],
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
