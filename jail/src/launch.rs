//! `hive-box vmm-launch`: the last step of a microVM cell's jail before the VMM.
//!
//! The jail recipe ([`crate::recipe`]) runs this as PID 1 of the VMM's jail, still root: it
//! makes the jail's own `/dev/kvm` and `/dev/net/tun` owned by the cell's uid, drops to that uid
//! with no capability left (and checks so) and execs `hive-box vmm`. The box daemon's microvm
//! backend builds the jail spec around it ([`launch_args`], [`VMM_BINARY`]).
use std::ffi::CString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where the VMM binary (the box's own `hive-box`) is bound inside the jail.
pub const VMM_BINARY: &str = "/bin/hive-box";
/// The jail's KVM node, made by [`launch`].
pub const KVM_NODE: &str = "/dev/kvm";
/// The jail's TUN/TAP control node, made by [`launch`].
pub const TUN_NODE: &str = "/dev/net/tun";

/// The jail's program arguments for `hive-box vmm-launch` (the program itself is [`VMM_BINARY`]):
/// become `uid`, make the two device nodes, run the VMM on `config` (a path inside the jail).
pub fn launch_args(uid: u32, kvm: DevNum, tun: DevNum, config: &Path) -> Vec<String> {
    vec![
        "vmm-launch".into(),
        "--uid".into(),
        uid.to_string(),
        "--kvm".into(),
        kvm.to_string(),
        "--tun".into(),
        tun.to_string(),
        "--config".into(),
        config.to_string_lossy().into_owned(),
    ]
}

/// A character device number, `MAJOR:MINOR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevNum {
    /// Major number.
    pub major: u64,
    /// Minor number.
    pub minor: u64,
}

impl DevNum {
    /// The device number of the node at `path`.
    pub fn of(path: &Path) -> std::io::Result<DevNum> {
        let m = fs::metadata(path)?;
        let rdev = m.rdev();
        Ok(DevNum {
            major: nix::sys::stat::major(rdev),
            minor: nix::sys::stat::minor(rdev),
        })
    }
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl FromStr for DevNum {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected MAJOR:MINOR"))?;
        Ok(DevNum {
            major: a.parse().map_err(|_| format!("{s:?}: bad major"))?,
            minor: b.parse().map_err(|_| format!("{s:?}: bad minor"))?,
        })
    }
}

/// `hive-box vmm-launch`: the last step of the jail before the VMM (internal).
#[derive(Debug, Clone, clap::Args)]
pub struct LaunchArgs {
    /// uid and gid to run the VMM as.
    #[arg(long)]
    pub uid: u32,
    /// Device number of KVM (MAJOR:MINOR).
    #[arg(long)]
    pub kvm: DevNum,
    /// Device number of the TUN/TAP control device (MAJOR:MINOR).
    #[arg(long)]
    pub tun: DevNum,
    /// VM config, passed on to `hive-box vmm --config`.
    #[arg(long)]
    pub config: PathBuf,
}

/// What failed in [`launch`].
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum LaunchError {
    #[error("make device node {path}")]
    Node {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("give device node {path} to uid {uid}")]
    Chown {
        path: PathBuf,
        uid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("become uid/gid {uid}")]
    SetIds {
        uid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("capabilities left after becoming uid {uid}: {caps}")]
    CapsLeft { uid: u32, caps: String },
    #[error("argument contains a NUL byte")]
    Nul,
    #[error("exec {VMM_BINARY}")]
    Exec(#[source] nix::Error),
}

/// Runs as PID 1 of the VMM's jail (root, after pivot_root, no_new_privs and the jail's seccomp
/// filter): makes /dev/kvm and a fresh /dev/net/tun on the jail's private /dev, owned by `uid`
/// with mode 0600 (the jail bound the box's root-only TUN node there; that bind is undone in this
/// jail only, the box's node is not changed), drops to uid/gid `uid` with no supplementary groups
/// (which clears every capability), checks that, and execs the VMM. Returns only on failure.
pub fn launch(args: &LaunchArgs) -> LaunchError {
    match launch_inner(args) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn launch_inner(a: &LaunchArgs) -> Result<std::convert::Infallible, LaunchError> {
    use nix::unistd::{Gid, Uid};
    for (path, dev) in [(KVM_NODE, a.kvm), (TUN_NODE, a.tun)] {
        let path = Path::new(path);
        let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_file(path);
        nix::sys::stat::mknod(
            path,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(dev.major, dev.minor),
        )
        .map_err(|source| LaunchError::Node {
            path: path.to_path_buf(),
            source,
        })?;
        nix::unistd::chown(path, Some(Uid::from_raw(a.uid)), Some(Gid::from_raw(a.uid))).map_err(
            |source| LaunchError::Chown {
                path: path.to_path_buf(),
                uid: a.uid,
                source,
            },
        )?;
    }
    let ids = |source| LaunchError::SetIds { uid: a.uid, source };
    let gid = Gid::from_raw(a.uid);
    nix::unistd::setgroups(&[]).map_err(ids)?;
    nix::unistd::setresgid(gid, gid, gid).map_err(ids)?;
    let uid = Uid::from_raw(a.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(ids)?;
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    for field in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        let v = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .map(str::trim)
            .unwrap_or("?");
        if !v.bytes().all(|b| b == b'0') {
            return Err(LaunchError::CapsLeft {
                uid: a.uid,
                caps: format!("{field} {v}"),
            });
        }
    }
    let cstr = |s: &str| CString::new(s).map_err(|_| LaunchError::Nul);
    let argv = [
        cstr(VMM_BINARY)?,
        cstr("vmm")?,
        cstr("--config")?,
        cstr(&a.config.to_string_lossy())?,
    ];
    let env = std::env::vars()
        .map(|(k, v)| cstr(&format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    let err = nix::unistd::execve(&argv[0], &argv, &env).unwrap_err();
    Err(LaunchError::Exec(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_args_round_trip_through_clap() {
        #[derive(clap::Parser)]
        struct T {
            #[command(subcommand)]
            cmd: C,
        }
        #[derive(clap::Subcommand)]
        enum C {
            VmmLaunch(LaunchArgs),
        }
        let kvm = DevNum {
            major: 10,
            minor: 232,
        };
        let tun = DevNum {
            major: 10,
            minor: 200,
        };
        let args = launch_args(900_003, kvm, tun, Path::new("/cell/vm.json"));
        let t = <T as clap::Parser>::try_parse_from(
            std::iter::once("hive-box".to_string()).chain(args),
        )
        .expect("parses");
        let C::VmmLaunch(a) = t.cmd;
        assert_eq!((a.uid, a.kvm, a.tun), (900_003, kvm, tun));
        assert_eq!(a.config, Path::new("/cell/vm.json"));
        assert!("10".parse::<DevNum>().is_err());
    }

    #[test]
    fn dev_num_of_a_character_device() {
        let null = DevNum::of(Path::new("/dev/null")).expect("stat /dev/null");
        assert_eq!((null.major, null.minor), (1, 3));
        assert_eq!(null.to_string().parse::<DevNum>(), Ok(null));
    }
}
