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
    /// Apply the seccomp deny-list (off only for diagnosis).
    #[serde(default = "yes")]
    pub seccomp: bool,
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
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BindSpec {
    pub source: PathBuf,
    pub target: PathBuf,
    #[serde(default)]
    pub readonly: bool,
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
            let err = enter(spec);
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
fn enter(spec: &JailSpec) -> JailError {
    match enter_inner(spec) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

fn enter_inner(spec: &JailSpec) -> Result<Never, JailError> {
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
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        root.lower.display(),
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

    for b in &spec.binds {
        let target = inside(&root.merged, &b.target);
        bind(&b.source, &target, b.readonly)?;
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

    minimal_dev(&inside(&root.merged, Path::new("/dev")))?;

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

    nix::unistd::sethostname(&spec.hostname)
        .map_err(|e| JailError::Hostname(spec.hostname.clone(), e))?;

    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integer arguments only and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(JailError::NoNewPrivs(nix::Error::last()));
    }
    if spec.seccomp {
        let program = crate::seccomp::deny_list().map_err(JailError::SeccompBuild)?;
        seccompiler::apply_filter(&program).map_err(JailError::SeccompApply)?;
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

/// Bind `source` at `target` (creating a file or directory mount point to match).
fn bind(source: &Path, target: &Path, readonly: bool) -> Result<(), JailError> {
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
fn minimal_dev(dev: &Path) -> Result<(), JailError> {
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
        bind(&Path::new("/dev").join(name), &dev.join(name), false)?;
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
            },
            binds: vec![],
            netns: None,
            cgroup_procs: vec![],
            pid_file: "/p".into(),
            program: "/sbin/init".into(),
            args: vec![],
            env: BTreeMap::new(),
            seccomp: true,
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
