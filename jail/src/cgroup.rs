//! Control groups for cells: CPU, memory and pids limits from the size class, and (v1) a
//! devices allow-list: a cell may open only the character devices it is given, never a block
//! device of the box, even if something in it gains CAP_MKNOD and makes a node.
//!
//! Hosts differ: this development machine runs cgroup v1 (one hierarchy per controller under
//! `/sys/fs/cgroup/<controller>`), most production hosts run the unified v2 hierarchy. The version
//! is detected at runtime ([`Hierarchy::detect`]) and both are driven through the same
//! [`Cgroup`] handle. The jail joins a cell's process to the group; `destroy` kills whatever is
//! left in it and removes the directories.
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hive_sys::Backoff;

/// CFS period used for CPU quotas (100 ms, the kernel default).
const CPU_PERIOD_US: u64 = 100_000;

/// v1 controllers a cell is limited by. `cpu` is often co-mounted as `cpu,cpuacct` with a `cpu`
/// symlink, which is what we open.
const V1_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// The v1 devices controller, used when the host mounts it (its directory is the fourth).
const V1_DEVICES: &str = "devices";

/// Character devices a sandbox cell may use: null, zero, full, random, urandom, tty, ptmx and
/// ptys (devpts), and the TUN clone device for the build container's network.
pub const SANDBOX_DEVICES: &[&str] = &[
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
    "c 10:200 rwm",
];

/// A microVM cell's VMM: the sandbox's devices and /dev/kvm.
pub const MICROVM_DEVICES: &[&str] = &[
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
    "c 10:200 rwm",
    "c 10:232 rwm",
];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy under {root}: neither v2 (cgroup.controllers with memory) nor v1 (memory/ directory)")]
    NotFound { root: PathBuf },
    #[error("create cgroup directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("remove cgroup directory {path}: still busy after killing its processes")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Which cgroup layout the host uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// One mount per controller: `<root>/cpu`, `<root>/memory`, `<root>/pids`.
    V1 { root: PathBuf },
    /// The unified hierarchy mounted at `root`.
    V2 { root: PathBuf },
}

/// Limits of one cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub pids_max: u32,
    /// Devices allowed (v1 `devices.allow` lines); everything else is denied.
    pub devices: &'static [&'static str],
    /// On cgroup v2, enforce `devices` with a BPF device program ([`crate::devices`]); without
    /// it the list is not enforced there (the microVM backend's jail: not yet switched on).
    pub devices_v2: bool,
}

/// Whether this host can load the cells' v2 devices program (the sandbox backend refuses to
/// start on cgroup v2 without it).
pub fn devices_program_loads() -> std::io::Result<()> {
    crate::devices::load(&crate::devices::parse_allow_list(SANDBOX_DEVICES)).map(drop)
}

impl Hierarchy {
    /// Looks at `/sys/fs/cgroup`.
    pub fn detect() -> Result<Self, CgroupError> {
        Self::detect_at(Path::new("/sys/fs/cgroup"))
    }

    /// v2 wins when its root lists the memory controller (a v2 mount without controllers, as on
    /// hybrid hosts at `unified/`, is useless for limits).
    pub fn detect_at(root: &Path) -> Result<Self, CgroupError> {
        if let Ok(controllers) = fs::read_to_string(root.join("cgroup.controllers")) {
            if controllers.split_whitespace().any(|c| c == "memory") {
                return Ok(Hierarchy::V2 {
                    root: root.to_path_buf(),
                });
            }
        }
        if root.join("memory").is_dir() && root.join("pids").is_dir() {
            return Ok(Hierarchy::V1 {
                root: root.to_path_buf(),
            });
        }
        Err(CgroupError::NotFound {
            root: root.to_path_buf(),
        })
    }

    pub fn version(&self) -> u8 {
        match self {
            Hierarchy::V1 { .. } => 1,
            Hierarchy::V2 { .. } => 2,
        }
    }

    /// Directories a group named `parent/name` lives in (one per controller on v1).
    fn dirs(&self, parent: &str, name: &str) -> Vec<PathBuf> {
        match self {
            Hierarchy::V1 { root } => {
                let mut dirs: Vec<PathBuf> = V1_CONTROLLERS
                    .iter()
                    .map(|c| root.join(c).join(parent).join(name))
                    .collect();
                if has_v1_devices(root) {
                    dirs.push(root.join(V1_DEVICES).join(parent).join(name));
                }
                dirs
            }
            Hierarchy::V2 { root } => vec![root.join(parent).join(name)],
        }
    }

    /// Creates the group `parent/name` and applies `limits`.
    pub fn create(&self, parent: &str, name: &str, limits: Limits) -> Result<Cgroup, CgroupError> {
        if let Hierarchy::V2 { root } = self {
            if !limits.devices.is_empty() && !limits.devices_v2 {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(
                        "cgroup v2: the microVM cells' devices allow-list is not enforced on \
                         this host (the BPF device program is on for sandbox cells only)"
                    )
                });
            }
            // Controllers must be enabled in every ancestor's subtree_control to reach the leaf.
            let mut dir = root.clone();
            enable_v2_controllers(&dir)?;
            for part in Path::new(parent).components() {
                dir.push(part);
                mkdir(&dir)?;
                enable_v2_controllers(&dir)?;
            }
        }
        let cgroup = Cgroup {
            dirs: self.dirs(parent, name),
            version: self.version(),
        };
        for dir in &cgroup.dirs {
            mkdir(dir)?;
        }
        cgroup.apply(limits)?;
        if let (Hierarchy::V2 { .. }, true) = (self, limits.devices_v2) {
            crate::devices::enforce(limits.devices, &cgroup.dirs[0]).map_err(|source| {
                CgroupError::Write {
                    path: cgroup.dirs[0].clone(),
                    value: "BPF device program".into(),
                    source,
                }
            })?;
        }
        Ok(cgroup)
    }

    /// The handle of an existing group (for the reaper); it may be partly gone.
    pub fn open(&self, parent: &str, name: &str) -> Cgroup {
        Cgroup {
            dirs: self.dirs(parent, name),
            version: self.version(),
        }
    }

    /// Removes the (empty) parent group of a box's cells at shutdown; busy or missing is fine.
    pub fn remove_parent(&self, parent: &str) {
        let dirs: Vec<PathBuf> = match self {
            Hierarchy::V1 { root } => V1_CONTROLLERS
                .iter()
                .chain(has_v1_devices(root).then_some(&V1_DEVICES))
                .map(|c| root.join(c).join(parent))
                .collect(),
            Hierarchy::V2 { root } => vec![root.join(parent)],
        };
        for d in dirs {
            let _ = fs::remove_dir(d);
        }
    }

    /// Names of the groups under `parent` (the reaper's view of leftovers).
    pub fn children(&self, parent: &str) -> Vec<String> {
        let dir = match self {
            Hierarchy::V1 { root } => root.join("pids").join(parent),
            Hierarchy::V2 { root } => root.join(parent),
        };
        let Ok(entries) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()
    }
}

/// Whether the host mounts the v1 devices controller (a real one has `devices.allow`).
fn has_v1_devices(root: &Path) -> bool {
    root.join(V1_DEVICES).join("devices.allow").exists()
}

fn mkdir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

fn enable_v2_controllers(dir: &Path) -> Result<(), CgroupError> {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    for c in ["cpu", "memory", "pids"] {
        if available.split_whitespace().any(|a| a == c) {
            write(&dir.join("cgroup.subtree_control"), &format!("+{c}"))?;
        }
    }
    Ok(())
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// One cell's cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    version: u8,
}

impl Cgroup {
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The `cgroup.procs` files a process writes its pid to in order to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    fn apply(&self, limits: Limits) -> Result<(), CgroupError> {
        let quota = u64::from(limits.vcpus.max(1)) * CPU_PERIOD_US;
        if self.version == 2 {
            let dir = &self.dirs[0];
            write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
            // Without this a cell would page to swap instead of hitting its limit.
            let _ = fs::write(dir.join("memory.swap.max"), "0");
            write(&dir.join("pids.max"), &limits.pids_max.to_string())?;
        } else {
            // dirs are in V1_CONTROLLERS order: cpu, memory, pids.
            let [cpu, memory, pids] = [&self.dirs[0], &self.dirs[1], &self.dirs[2]];
            write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
            write(
                &memory.join("memory.limit_in_bytes"),
                &limits.memory_bytes.to_string(),
            )?;
            write(&pids.join("pids.max"), &limits.pids_max.to_string())?;
            if let Some(devices) = self.dirs.get(3) {
                // Deny all first, then allow the list: a new group inherits "a *:* rwm".
                write(&devices.join("devices.deny"), "a")?;
                for rule in limits.devices {
                    write(&devices.join("devices.allow"), rule)?;
                }
            }
        }
        Ok(())
    }

    /// Pids currently in the group.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut pids = Vec::new();
        for f in self.procs_files() {
            match fs::read_to_string(&f) {
                Ok(text) => pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(CgroupError::Read { path: f, source }),
            }
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// The v1 devices allow-list as the kernel reports it (`devices.list`); None where the
    /// group has no devices controller (v2, or a v1 host without it).
    pub fn devices_list(&self) -> Option<String> {
        if self.version != 1 {
            return None;
        }
        fs::read_to_string(self.dirs.get(3)?.join("devices.list")).ok()
    }

    /// Current memory limit in bytes as the kernel reports it (tests, inspection).
    pub fn memory_limit(&self) -> Result<u64, CgroupError> {
        let path = if self.version == 2 {
            self.dirs[0].join("memory.max")
        } else {
            self.dirs[1].join("memory.limit_in_bytes")
        };
        let text = fs::read_to_string(&path).map_err(|source| CgroupError::Read {
            path: path.clone(),
            source,
        })?;
        Ok(text.trim().parse().unwrap_or(u64::MAX))
    }

    /// Kills every process in the group and removes it. Safe to call on a partly gone group.
    pub async fn destroy(&self) -> Result<(), CgroupError> {
        let mut pause = Backoff::new(Duration::from_millis(5), Duration::from_millis(50));
        for _ in 0..100 {
            let pids = self.pids()?;
            if pids.is_empty() {
                break;
            }
            if self.version == 2 {
                let _ = fs::write(self.dirs[0].join("cgroup.kill"), "1");
            }
            for pid in pids {
                // A pid can exit between read and kill; ESRCH is fine.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            tokio::time::sleep(pause.next_delay()).await;
        }
        for dir in &self.dirs {
            let mut last = None;
            for _ in 0..100 {
                match fs::remove_dir(dir) {
                    Ok(()) => {
                        last = None;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        last = None;
                        break;
                    }
                    // EBUSY while the last killed task is still being torn down.
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if let Some(source) = last {
                return Err(CgroupError::Remove {
                    path: dir.clone(),
                    source,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_v1_layout() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("memory")).unwrap();
        fs::create_dir(t.path().join("pids")).unwrap();
        assert_eq!(
            Hierarchy::detect_at(t.path()).unwrap(),
            Hierarchy::V1 {
                root: t.path().to_path_buf()
            }
        );
    }

    #[test]
    fn detects_v2_only_with_memory_controller() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("cgroup.controllers"), "").unwrap();
        assert!(Hierarchy::detect_at(t.path()).is_err());
        fs::write(t.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        assert_eq!(Hierarchy::detect_at(t.path()).unwrap().version(), 2);
    }

    /// The v2 writer against a directory shaped like a cgroup2 mount (this host runs v1, so the
    /// kernel side of v2 cannot be exercised here; the file protocol can).
    #[tokio::test]
    async fn v2_create_writes_limits_and_enables_controllers() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("cgroup.controllers"), "cpu memory pids io\n").unwrap();
        let h = Hierarchy::detect_at(t.path()).unwrap();
        // A real cgroup2 parent lists the controllers its parent enabled.
        fs::create_dir_all(t.path().join("hive")).unwrap();
        fs::write(
            t.path().join("hive/cgroup.controllers"),
            "cpu memory pids\n",
        )
        .unwrap();
        let cg = h
            .create(
                "hive",
                "c1",
                Limits {
                    vcpus: 2,
                    memory_bytes: 256 << 20,
                    pids_max: 64,
                    devices: SANDBOX_DEVICES,
                    devices_v2: false,
                },
            )
            .unwrap();
        let read = |f: &str| fs::read_to_string(t.path().join("hive/c1").join(f)).unwrap();
        assert_eq!(read("cpu.max"), "200000 100000");
        assert_eq!(read("memory.max"), (256u64 << 20).to_string());
        assert_eq!(read("pids.max"), "64");
        assert_eq!(read("memory.swap.max"), "0");
        // The last controller written wins in a plain file; the kernel accumulates them.
        assert!(
            fs::read_to_string(t.path().join("hive/cgroup.subtree_control"))
                .unwrap()
                .starts_with('+')
        );
        assert_eq!(cg.memory_limit().unwrap(), 256 << 20);
        assert_eq!(
            cg.procs_files(),
            vec![t.path().join("hive/c1/cgroup.procs")]
        );
    }

    #[test]
    fn v1_dirs_are_per_controller_with_devices_when_mounted() {
        let t = tempfile::tempdir().unwrap();
        let h = Hierarchy::V1 {
            root: t.path().to_path_buf(),
        };
        let procs = |c: &str| t.path().join(c).join("hive/abc/cgroup.procs");
        assert_eq!(
            h.open("hive", "abc").procs_files(),
            vec![procs("cpu"), procs("memory"), procs("pids")]
        );
        fs::create_dir(t.path().join("devices")).unwrap();
        fs::write(t.path().join("devices/devices.allow"), "").unwrap();
        assert_eq!(
            h.open("hive", "abc").procs_files(),
            vec![
                procs("cpu"),
                procs("memory"),
                procs("pids"),
                procs("devices")
            ]
        );
    }
}
