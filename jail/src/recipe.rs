//! The jail recipe: how one cell process is shut in.
//!
//! The box daemon is multi-threaded (tokio), and forking it to set up namespaces is unsafe, so it
//! re-executes its own binary as `hive-box jail --spec FILE` ([`run`]). That helper is single
//! threaded: it joins the cell's cgroup, enters the cell's network namespace, unshares mount, pid,
//! uts and ipc namespaces and forks. The child is PID 1 of the new pid namespace and follows the
//! recipe in [`enter`]: private mounts, copy-on-write overlay root, read-only binds, minimal /dev,
//! /proc, pivot_root, hostname, no-new-privileges, seccomp deny-list, exec. The helper stays as the
//! cell's supervisor: it writes the cell's pid, forwards SIGTERM/SIGINT and exits with PID 1's
//! status. The sandbox backend uses it for the cell daemon; the VMM process will use it too.
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use serde::{Deserialize, Serialize};

use hive_sys::error_chain;

use crate::userns::{IdMap, UsernsError};

/// Devices a cell sees; bound from the host's nodes (no mknod needed, no other device reachable).
/// `net/tun` is there for the cell daemon's build-container network; a TUN device it makes lives
/// in the cell's own network namespace.
const DEVICES: [&str; 7] = [
    "null", "zero", "full", "random", "urandom", "tty", "net/tun",
];

/// Directory the old root is moved to during pivot_root, then detached and removed.
const OLD_ROOT: &str = ".hive-oldroot";

/// What to jail and how. Written by the box daemon as JSON, read by the helper.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JailSpec {
    /// Hostname inside the jail.
    pub hostname: String,
    /// The root: an overlay of `lower` (read-only, shared) with `upper`/`work`, mounted at `root`.
    pub root: RootSpec,
    /// Extra bind mounts, targets are absolute paths inside the jail.
    #[serde(default)]
    pub binds: Vec<BindSpec>,
    /// A network namespace file (e.g. /run/netns/NAME) to enter; None keeps the box's.
    pub netns: Option<PathBuf>,
    /// `cgroup.procs` files the helper writes its pid to before forking.
    #[serde(default)]
    pub cgroup_procs: Vec<PathBuf>,
    /// Where the helper writes the jailed process's pid (host view).
    pub pid_file: PathBuf,
    /// Program (path inside the jail), its arguments (without argv0) and environment.
    pub program: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Apply the seccomp profile (off only for diagnosis).
    #[serde(default = "yes")]
    pub seccomp: bool,
    /// Which seccomp profile: the deny-list (microVM jails) or the sandbox cell daemon's
    /// allow-list.
    #[serde(default)]
    pub seccomp_profile: SeccompProfile,
    /// Run inside the user namespace that owns `netns` (made by the box with this map): the
    /// jailed process is root of that namespace only, an unprivileged uid range on the box.
    #[serde(default)]
    pub userns: Option<IdMap>,
    /// Capabilities (kernel numbers) the program keeps; None keeps the set the recipe leaves.
    #[serde(default)]
    pub keep_caps: Option<Vec<u8>>,
    /// Mount a read-only sysfs at /sys.
    #[serde(default)]
    pub sysfs: bool,
    /// tmpfs mounts made before the binds (so a bind can land inside one).
    #[serde(default)]
    pub tmpfs: Vec<TmpfsSpec>,
}

/// The seccomp profile of a jail (see [`crate::seccomp`]).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SeccompProfile {
    /// [`crate::seccomp::deny_list`].
    #[default]
    DenyList,
    /// [`crate::seccomp::cell_daemon`].
    CellDaemon,
}

/// A size-capped tmpfs inside the jail, owned by the jail's root (the user namespace's when
/// there is one).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TmpfsSpec {
    pub target: PathBuf,
    pub size_mib: u64,
    /// Mode of its root directory (octal in meaning, e.g. 0o755).
    pub mode: u32,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RootSpec {
    pub lower: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
    /// With a user namespace: an empty directory where the lower layer is attached through an
    /// idmapped mount first (host root's files then show as the cell's root's).
    #[serde(default)]
    pub idmapped_lower: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BindSpec {
    pub source: PathBuf,
    pub target: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    /// With a user namespace: bind through an idmapped mount (read-only ones only; a writable
    /// bind stays as it is, so nothing the cell writes is owned by host root).
    #[serde(default)]
    pub idmap: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("read jail spec {path}")]
    ReadSpec {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("parse jail spec {path}")]
    ParseSpec {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid jail spec: {0}")]
    Invalid(String),
    #[error("join cgroup via {path}")]
    JoinCgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("open network namespace {path}")]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("enter network namespace {path}")]
    EnterNetns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("unshare mount/pid/uts/ipc namespaces")]
    Unshare(#[source] nix::Error),
    #[error("fork the jailed process")]
    Fork(#[source] nix::Error),
    #[error("write pid file {path}")]
    PidFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("wait for the jailed process")]
    Wait(#[source] nix::Error),
    #[error("make mounts private")]
    PrivateMounts(#[source] nix::Error),
    #[error("mount overlay root at {merged} (lower {lower})")]
    Overlay {
        lower: PathBuf,
        merged: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("prepare mount point {path}")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bind {source_path} at {target}")]
    Bind {
        source_path: PathBuf,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("mount {what} at {target}")]
    Mount {
        what: &'static str,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("pivot_root into {root}")]
    PivotRoot {
        root: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("detach the old root")]
    DetachOldRoot(#[source] nix::Error),
    #[error("set hostname {0:?}")]
    Hostname(String, #[source] nix::Error),
    #[error("set no_new_privs")]
    NoNewPrivs(#[source] nix::Error),
    #[error("build seccomp filter")]
    SeccompBuild(#[source] seccompiler::BackendError),
    #[error("install seccomp filter")]
    SeccompApply(#[source] seccompiler::Error),
    #[error("exec {program}")]
    Exec {
        program: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("argument contains a NUL byte: {0:?}")]
    Nul(String),
    #[error("user namespace")]
    Userns(#[from] UsernsError),
    #[error("the cell's user namespace maps {found:?}, not {want:?}")]
    UsernsMap {
        found: Vec<(u32, u32, u32)>,
        want: (u32, u32, u32),
    },
    #[error("enter the cell's user namespace")]
    EnterUserns(#[source] nix::Error),
    #[error("become root of the cell's user namespace")]
    BecomeRoot(#[source] nix::Error),
    #[error("unshare mount/uts/ipc namespaces inside the user namespace")]
    UnshareInner(#[source] nix::Error),
    #[error("write {path}")]
    Sysctl {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("drop capabilities")]
    Caps(#[source] io::Error),
}

impl JailSpec {
    pub fn load(path: &Path) -> Result<Self, JailError> {
        let text = fs::read_to_string(path).map_err(|source| JailError::ReadSpec {
            path: path.to_path_buf(),
            source,
        })?;
        let spec: JailSpec =
            serde_json::from_str(&text).map_err(|source| JailError::ParseSpec {
                path: path.to_path_buf(),
                source,
            })?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), JailError> {
        if !self.program.is_absolute() {
            return Err(JailError::Invalid(format!(
                "program {} must be an absolute path inside the jail",
                self.program.display()
            )));
        }
        for b in &self.binds {
            if !b.target.is_absolute() || b.target.components().any(|c| c.as_os_str() == "..") {
                return Err(JailError::Invalid(format!(
                    "bind target {} must be absolute without '..'",
                    b.target.display()
                )));
            }
        }
        if self.hostname.is_empty() || self.hostname.len() > 64 {
            return Err(JailError::Invalid(format!(
                "hostname {:?} must be 1..=64 bytes",
                self.hostname
            )));
        }
        for p in [
            &self.root.lower,
            &self.root.upper,
            &self.root.work,
            &self.root.merged,
        ] {
            if !p.is_absolute() {
                return Err(JailError::Invalid(format!(
                    "root path {} must be absolute",
                    p.display()
                )));
            }
        }
        if let Some(map) = &self.userns {
            map.validate().map_err(JailError::Invalid)?;
            if self.netns.is_none() {
                return Err(JailError::Invalid(
                    "a user namespace needs the network namespace it owns".into(),
                ));
            }
            if self.root.idmapped_lower.is_none() {
                return Err(JailError::Invalid(
                    "a user namespace needs root.idmapped_lower".into(),
                ));
            }
        }
        for t in &self.tmpfs {
            if !t.target.is_absolute() || t.target.components().any(|c| c.as_os_str() == "..") {
                return Err(JailError::Invalid(format!(
                    "tmpfs target {} must be absolute without '..'",
                    t.target.display()
                )));
            }
            if t.size_mib == 0 || t.mode > 0o7777 {
                return Err(JailError::Invalid(format!(
                    "tmpfs {}: size must be > 0 and mode at most 0o7777",
                    t.target.display()
                )));
            }
        }
        Ok(())
    }
}

/// Entry of `hive-box jail`: must run before any thread exists. Returns the exit code to use.
pub fn run(spec: &JailSpec) -> Result<i32, JailError> {
    spec.validate()?;
    let me = std::process::id().to_string();
    for procs in &spec.cgroup_procs {
        fs::write(procs, &me).map_err(|source| JailError::JoinCgroup {
            path: procs.clone(),
            source,
        })?;
    }
    // The user namespace owning the cell's netns; PID 1 checks its map against the spec once
    // inside (a netns of the wrong owner would leave the cell's root mapped elsewhere).
    let userns = match (&spec.userns, &spec.netns) {
        (Some(_), Some(ns)) => Some(crate::userns::owner_of(ns)?),
        _ => None,
    };
    if let Some(ns) = &spec.netns {
        let f = fs::File::open(ns).map_err(|source| JailError::OpenNetns {
            path: ns.clone(),
            source,
        })?;
        setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| JailError::EnterNetns {
            path: ns.clone(),
            source,
        })?;
    }
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC,
    )
    .map_err(JailError::Unshare)?;

    // Opened now: the child's pivot_root also moves this process's root (pivot_root changes every
    // process in the mount namespace rooted at the old root), so paths stop working after fork.
    let pid_file = fs::File::create(&spec.pid_file).map_err(|source| JailError::PidFile {
        path: spec.pid_file.clone(),
        source,
    })?;

    // Block the signals we forward before forking so none is lost in between; the child
    // unblocks them before exec.
    let mut forwarded = SigSet::empty();
    forwarded.add(Signal::SIGTERM);
    forwarded.add(Signal::SIGINT);
    forwarded.add(Signal::SIGHUP);
    forwarded.add(Signal::SIGCHLD);
    forwarded.thread_block().map_err(JailError::Fork)?;

    // SAFETY: the helper is single-threaded here (called from main before any runtime or thread
    // starts), so the child may run arbitrary code after fork.
    match unsafe { fork() }.map_err(JailError::Fork)? {
        ForkResult::Child => {
            let _ = forwarded.thread_unblock();
            let err = enter(spec, userns.as_ref());
            // Only reached on failure: report it through the inherited stderr.
            eprintln!("hive-box jail: {}", error_chain(&err));
            std::process::exit(127);
        }
        ForkResult::Parent { child } => supervise(spec, pid_file, child, forwarded),
    }
}

fn supervise(
    spec: &JailSpec,
    mut pid_file: fs::File,
    child: Pid,
    forwarded: SigSet,
) -> Result<i32, JailError> {
    use std::io::Write;
    pid_file
        .write_all(child.as_raw().to_string().as_bytes())
        .map_err(|source| {
            let _ = kill(child, Signal::SIGKILL);
            JailError::PidFile {
                path: spec.pid_file.clone(),
                source,
            }
        })?;
    // No threads here: after unshare(CLONE_NEWPID) the kernel refuses CLONE_THREAD. SIGCHLD is
    // blocked with the forwarded signals, so one sigwait loop both forwards and notices the exit.
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => return Err(JailError::Wait(e)),
        }
        match forwarded.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = kill(child, sig);
            }
        }
    }
}

/// The recipe, run as PID 1 of the new namespaces. Returns only on failure.
fn enter(spec: &JailSpec, userns: Option<&std::os::fd::OwnedFd>) -> JailError {
    match enter_inner(spec, userns) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

fn enter_inner(spec: &JailSpec, userns: Option<&std::os::fd::OwnedFd>) -> Result<Never, JailError> {
    // Nothing we mount may leak back to the box, nor box mounts appear later in the cell.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(JailError::PrivateMounts)?;

    let root = &spec.root;
    // With a user namespace the shared lower layer is seen through an idmapped mount: host
    // root's files are the cell root's, and the overlay (mounted here by real root) copies
    // them up owned by the cell's host uids.
    let lower = match (userns, &root.idmapped_lower) {
        (Some(ns), Some(at)) => {
            mkdir_p(at)?;
            let tree = crate::userns::idmapped_clone(&root.lower, ns.as_fd(), true)?;
            crate::userns::attach(tree, at)?;
            at.clone()
        }
        _ => root.lower.clone(),
    };
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        root.upper.display(),
        root.work.display()
    );
    mount(
        Some("overlay"),
        &root.merged,
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(|source| JailError::Overlay {
        lower: root.lower.clone(),
        merged: root.merged.clone(),
        source,
    })?;

    let owner = spec.userns.map(|m| m.host_base).unwrap_or(0);
    for t in &spec.tmpfs {
        let target = inside(&root.merged, &t.target);
        mkdir_p(&target)?;
        let opts = format!(
            "size={}m,mode={:o},uid={owner},gid={owner}",
            t.size_mib, t.mode
        );
        mount(
            Some("tmpfs"),
            &target,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(opts.as_str()),
        )
        .map_err(|source| JailError::Mount {
            what: "tmpfs",
            target: target.clone(),
            source,
        })?;
    }

    for b in &spec.binds {
        let target = inside(&root.merged, &b.target);
        match userns {
            Some(ns) if b.idmap && b.readonly => {
                prepare_target(&b.source, &target)?;
                let tree = crate::userns::idmapped_clone(&b.source, ns.as_fd(), true)?;
                crate::userns::attach(tree, &target)?;
            }
            _ => bind(&b.source, &target, b.readonly)?,
        }
    }

    let proc_dir = inside(&root.merged, Path::new("/proc"));
    mkdir_p(&proc_dir)?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|source| JailError::Mount {
        what: "proc",
        target: proc_dir.clone(),
        source,
    })?;

    if spec.sysfs {
        // Read-only from the start; the mount is locked by the user namespace below, so the
        // cell cannot remount it writable.
        let sys_dir = inside(&root.merged, Path::new("/sys"));
        mkdir_p(&sys_dir)?;
        mount(
            Some("sysfs"),
            &sys_dir,
            Some("sysfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|source| JailError::Mount {
            what: "sysfs",
            target: sys_dir.clone(),
            source,
        })?;
    }

    minimal_dev(
        &inside(&root.merged, Path::new("/dev")),
        spec.userns.map(|m| m.host_base),
    )?;

    let old = root.merged.join(OLD_ROOT);
    mkdir_p(&old)?;
    nix::unistd::chdir(&root.merged).map_err(|source| JailError::PivotRoot {
        root: root.merged.clone(),
        source,
    })?;
    nix::unistd::pivot_root(".", OLD_ROOT).map_err(|source| JailError::PivotRoot {
        root: root.merged.clone(),
        source,
    })?;
    nix::unistd::chdir("/").map_err(|source| JailError::PivotRoot {
        root: root.merged.clone(),
        source,
    })?;
    let old_inside = Path::new("/").join(OLD_ROOT);
    umount2(&old_inside, MntFlags::MNT_DETACH).map_err(JailError::DetachOldRoot)?;
    let _ = fs::remove_dir(&old_inside);

    if let (Some(ns), Some(map)) = (userns, &spec.userns) {
        enter_userns(ns, map)?;
    }

    nix::unistd::sethostname(&spec.hostname)
        .map_err(|e| JailError::Hostname(spec.hostname.clone(), e))?;

    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integer arguments only and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(JailError::NoNewPrivs(nix::Error::last()));
    }
    if let Some(keep) = &spec.keep_caps {
        crate::caps::restrict(keep).map_err(JailError::Caps)?;
    }
    if spec.seccomp {
        let filters = match spec.seccomp_profile {
            SeccompProfile::DenyList => {
                vec![crate::seccomp::deny_list().map_err(JailError::SeccompBuild)?]
            }
            SeccompProfile::CellDaemon => {
                crate::seccomp::cell_daemon().map_err(JailError::SeccompBuild)?
            }
        };
        crate::seccomp::install(&filters).map_err(JailError::SeccompApply)?;
    }

    let program = cstring(&spec.program.to_string_lossy())?;
    let mut argv = vec![program.clone()];
    for a in &spec.args {
        argv.push(cstring(a)?);
    }
    let envp = spec
        .env
        .iter()
        .map(|(k, v)| cstring(&format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    let err = nix::unistd::execve(&program, &argv, &envp).unwrap_err();
    Err(JailError::Exec {
        program: spec.program.clone(),
        source: err,
    })
}

/// Moves PID 1 (already pivoted, still real root) into the cell's user namespace: checks the
/// namespace maps what the spec says, becomes its root (the cell's host base uid), gives the
/// cell its own mount, uts and ipc namespaces owned by it (every mount made so far is then
/// locked: the cell cannot unmount or remount what hides the box), and forbids new user
/// namespaces inside it.
fn enter_userns(ns: &std::os::fd::OwnedFd, map: &IdMap) -> Result<(), JailError> {
    setns(ns.as_fd(), CloneFlags::CLONE_NEWUSER).map_err(JailError::EnterUserns)?;
    // Read from inside, the map shows the host's ids.
    let found =
        crate::userns::parse_map(&fs::read_to_string("/proc/self/uid_map").unwrap_or_default());
    let want = (0, map.host_base, map.count);
    if found != [want] {
        return Err(JailError::UsernsMap { found, want });
    }
    let root_gid = nix::unistd::Gid::from_raw(0);
    let root_uid = nix::unistd::Uid::from_raw(0);
    nix::unistd::setgroups(&[]).map_err(JailError::BecomeRoot)?;
    nix::unistd::setresgid(root_gid, root_gid, root_gid).map_err(JailError::BecomeRoot)?;
    nix::unistd::setresuid(root_uid, root_uid, root_uid).map_err(JailError::BecomeRoot)?;
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC)
        .map_err(JailError::UnshareInner)?;
    // Per user namespace and checked at every level: 0 here stops the cell and its builds from
    // making user namespaces (the cell daemon keeps no CAP_SYS_RESOURCE to raise it again).
    const MAX_USERNS: &str = "/proc/sys/user/max_user_namespaces";
    fs::write(MAX_USERNS, "0").map_err(|source| JailError::Sysctl {
        path: MAX_USERNS,
        source,
    })?;
    Ok(())
}

/// Makes a character node like `host` at `target`, owned by `uid` (and gid) with mode 0600.
fn own_node(host: &Path, target: &Path, uid: u32) -> Result<(), JailError> {
    use std::os::unix::fs::MetadataExt;
    let err = |source: io::Error| JailError::MountPoint {
        path: target.to_path_buf(),
        source,
    };
    let rdev = fs::metadata(host).map_err(err)?.rdev();
    if let Some(parent) = target.parent() {
        mkdir_p(parent)?;
    }
    nix::sys::stat::mknod(
        target,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        rdev,
    )
    .map_err(|e| err(e.into()))?;
    std::os::unix::fs::chown(target, Some(uid), Some(uid)).map_err(err)
}

fn cstring(s: &str) -> Result<CString, JailError> {
    CString::new(s).map_err(|_| JailError::Nul(s.to_string()))
}

/// `root` joined with an absolute in-jail path.
fn inside(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

fn mkdir_p(p: &Path) -> Result<(), JailError> {
    fs::create_dir_all(p).map_err(|source| JailError::MountPoint {
        path: p.to_path_buf(),
        source,
    })
}

/// Creates a file or directory at `target` to match `source`, for a mount to land on.
fn prepare_target(source: &Path, target: &Path) -> Result<(), JailError> {
    if source.is_dir() {
        mkdir_p(target)?;
    } else if !target.exists() {
        if let Some(parent) = target.parent() {
            mkdir_p(parent)?;
        }
        fs::write(target, b"").map_err(|source| JailError::MountPoint {
            path: target.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// Bind `source` at `target` (creating a file or directory mount point to match).
fn bind(source: &Path, target: &Path, readonly: bool) -> Result<(), JailError> {
    prepare_target(source, target)?;
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| JailError::Bind {
        source_path: source.to_path_buf(),
        target: target.to_path_buf(),
        source: e,
    })?;
    if readonly {
        // A bind mount ignores MS_RDONLY on creation; it takes a remount to apply it.
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(|e| JailError::Bind {
            source_path: source.to_path_buf(),
            target: target.to_path_buf(),
            source: e,
        })?;
    }
    Ok(())
}

/// A tmpfs /dev holding only the harmless character devices, a private devpts and /dev/shm.
/// With a user namespace (`owner`: the host uid of its root) the TUN node is the jail's own,
/// made here owned by the cell's root with mode 0600: the box's node is root-only, and the
/// cell's root is not the box's.
fn minimal_dev(dev: &Path, owner: Option<u32>) -> Result<(), JailError> {
    mkdir_p(dev)?;
    let tmpfs = |target: &Path, opts: &str| {
        mount(
            Some("tmpfs"),
            target,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some(opts),
        )
        .map_err(|source| JailError::Mount {
            what: "tmpfs",
            target: target.to_path_buf(),
            source,
        })
    };
    tmpfs(dev, "mode=755,size=65536k")?;
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        match owner {
            Some(uid) if name == "net/tun" => own_node(&host, &dev.join(name), uid)?,
            _ => bind(&host, &dev.join(name), false)?,
        }
    }
    let pts = dev.join("pts");
    mkdir_p(&pts)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(|source| JailError::Mount {
        what: "devpts",
        target: pts.clone(),
        source,
    })?;
    let link = |target: &str, name: &str| {
        symlink(target, dev.join(name)).map_err(|source| JailError::MountPoint {
            path: dev.join(name),
            source,
        })
    };
    link("pts/ptmx", "ptmx")?;
    link("/proc/self/fd", "fd")?;
    link("/proc/self/fd/0", "stdin")?;
    link("/proc/self/fd/1", "stdout")?;
    link("/proc/self/fd/2", "stderr")?;
    let shm = dev.join("shm");
    mkdir_p(&shm)?;
    let _ = fs::set_permissions(&shm, fs::Permissions::from_mode(0o1777));
    tmpfs(&shm, "mode=1777,size=65536k")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JailSpec {
        JailSpec {
            hostname: "cell".into(),
            root: RootSpec {
                lower: "/l".into(),
                upper: "/u".into(),
                work: "/w".into(),
                merged: "/m".into(),
                idmapped_lower: None,
            },
            binds: vec![],
            netns: None,
            cgroup_procs: vec![],
            pid_file: "/p".into(),
            program: "/sbin/init".into(),
            args: vec![],
            env: BTreeMap::new(),
            seccomp: true,
            seccomp_profile: SeccompProfile::DenyList,
            userns: None,
            keep_caps: None,
            sysfs: false,
            tmpfs: vec![],
        }
    }

    #[test]
    fn rejects_relative_program_and_escaping_binds() {
        let mut s = spec();
        assert!(s.validate().is_ok());
        s.program = "init".into();
        assert!(s.validate().unwrap_err().to_string().contains("absolute"));
        let mut s = spec();
        s.binds.push(BindSpec {
            source: "/x".into(),
            target: "/a/../../etc".into(),
            readonly: true,
            idmap: false,
        });
        assert!(s.validate().is_err());
    }

    #[test]
    fn spec_rejects_unknown_fields() {
        let mut v = serde_json::to_value(spec()).unwrap();
        v["surprise"] = serde_json::json!(1);
        assert!(serde_json::from_value::<JailSpec>(v).is_err());
    }

    #[test]
    fn inside_strips_leading_slash() {
        assert_eq!(
            inside(Path::new("/r"), Path::new("/run/hive")),
            PathBuf::from("/r/run/hive")
        );
    }
}
