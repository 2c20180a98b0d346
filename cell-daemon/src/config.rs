//! Daemon configuration: flags and env (`HIVE_CELL_*`) first, then the kernel command line
//! (`hive.listen=`, `hive.cell_id=` when PID 1 of a VM), then defaults; checked by [`Config::validate`].

use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where the agent listens (or, for the probe client, where it connects).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum ListenAddr {
    /// `unix:/run/hive/agent.sock` (sandbox cells).
    Unix(PathBuf),
    /// `vsock:1024` (microVM cells; any CID).
    Vsock(u32),
    /// `tcp:127.0.0.1:7000` (QEMU boot checks without vhost-vsock).
    Tcp(SocketAddr),
}

/// Errors parsing an address or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("listen address {0:?}: expected unix:/ABS/PATH, vsock:PORT or tcp:ADDR:PORT")]
    ListenScheme(String),
    #[error("listen address {0:?}: unix socket path must be absolute")]
    UnixNotAbsolute(String),
    #[error("listen address {0:?}: vsock port must be a number 1..=4294967294")]
    VsockPort(String),
    #[error("listen address {0:?}: tcp address must be ADDR:PORT (e.g. 127.0.0.1:7000)")]
    TcpAddr(String),
    #[error(
        "cell id {0:?}: must be 1..=63 characters of [A-Za-z0-9._-] (it becomes the hostname)"
    )]
    CellId(String),
    #[error("cell id is not set: pass --cell-id, HIVE_CELL_ID, or hive.cell_id= on the kernel command line")]
    CellIdMissing,
    #[error("{what} {path:?} must be an absolute path")]
    NotAbsolute { what: &'static str, path: PathBuf },
    #[error("build image {0:?} is not a directory (pass --build-image or HIVE_BUILD_IMAGE)")]
    BuildImage(PathBuf),
    #[error("kill grace {0} ms is out of range 0..=60000")]
    KillGrace(u64),
    #[error("build uid/gid must not be 0 (the build runs unprivileged)")]
    RootBuildUser,
    #[error("--init {0:?}: expected auto, yes or no")]
    InitMode(String),
    #[error("--container-net {0:?}: expected isolated or cell")]
    NetMode(String),
}

impl FromStr for ListenAddr {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            let p = PathBuf::from(path);
            if !p.is_absolute() {
                return Err(ConfigError::UnixNotAbsolute(s.to_string()));
            }
            Ok(ListenAddr::Unix(p))
        } else if let Some(port) = s.strip_prefix("vsock:") {
            match port.parse::<u32>() {
                Ok(p) if p != 0 && p != u32::MAX => Ok(ListenAddr::Vsock(p)),
                _ => Err(ConfigError::VsockPort(s.to_string())),
            }
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            addr.parse()
                .map(ListenAddr::Tcp)
                .map_err(|_| ConfigError::TcpAddr(s.to_string()))
        } else {
            Err(ConfigError::ListenScheme(s.to_string()))
        }
    }
}

impl TryFrom<String> for ListenAddr {
    type Error = ConfigError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Vsock(p) => write!(f, "vsock:{p}"),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// How the build container is networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// Own netns, joined to the cell's by a veth pair, NAT in the cell (the default).
    Isolated,
    /// Share the cell's netns (for cells without `ip`/`nft`; weaker).
    Cell,
}

impl FromStr for NetMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "isolated" => Ok(NetMode::Isolated),
            "cell" => Ok(NetMode::Cell),
            _ => Err(ConfigError::NetMode(s.to_string())),
        }
    }
}

/// `--init auto|yes|no`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitMode {
    Auto,
    Yes,
    No,
}

impl FromStr for InitMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(InitMode::Auto),
            "yes" | "true" => Ok(InitMode::Yes),
            "no" | "false" => Ok(InitMode::No),
            _ => Err(ConfigError::InitMode(s.to_string())),
        }
    }
}

impl InitMode {
    /// Whether to do the PID 1 duties: `auto` means "if we are PID 1".
    pub fn resolve(self) -> bool {
        match self {
            InitMode::Auto => std::process::id() == 1,
            InitMode::Yes => true,
            InitMode::No => false,
        }
    }
}

/// The resolved daemon configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub cell_id: String,
    pub listen: ListenAddr,
    /// Read-only build image directory (lower layer of the container's overlay).
    pub build_image: PathBuf,
    /// Where the container's overlay upper/work dirs live (a tmpfs when `work_tmpfs`).
    pub work_dir: PathBuf,
    /// Doing the PID 1 duties (mounts, hostname, power off).
    pub init: bool,
    /// Mount a tmpfs on `work_dir` at start (always true as PID 1).
    pub work_tmpfs: bool,
    pub container_net: NetMode,
    /// Time between SIGTERM and SIGKILL when a step is cancelled or times out.
    pub kill_grace_ms: u64,
    /// Build timeout when RunBuild says 0.
    pub default_timeout_secs: u32,
    /// Most build output kept for replay; past it the log says it was truncated.
    pub max_log_bytes: u64,
    pub build_uid: u32,
    pub build_gid: u32,
    /// Set the build container up at start, before RunBuild (a warm cell is a ready container).
    pub prewarm: bool,
    /// With prewarm: the container's `hwg0` is made then too (`privnet::Standby`).
    pub tunnel_ready: bool,
}

impl Config {
    /// Checks everything that can be checked before serving.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_cell_id(&self.cell_id)?;
        for (what, path) in [
            ("build image", &self.build_image),
            ("work dir", &self.work_dir),
        ] {
            if !path.is_absolute() {
                return Err(ConfigError::NotAbsolute {
                    what,
                    path: path.clone(),
                });
            }
        }
        if !self.build_image.is_dir() {
            return Err(ConfigError::BuildImage(self.build_image.clone()));
        }
        if self.kill_grace_ms > 60_000 {
            return Err(ConfigError::KillGrace(self.kill_grace_ms));
        }
        if self.build_uid == 0 || self.build_gid == 0 {
            return Err(ConfigError::RootBuildUser);
        }
        Ok(())
    }
}

/// Cell ids become hostnames and interface-free path parts, so keep them plain.
pub fn validate_cell_id(id: &str) -> Result<(), ConfigError> {
    if id.is_empty() {
        return Err(ConfigError::CellIdMissing);
    }
    let ok = id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::CellId(id.to_string()))
    }
}

/// The `hive.*=` settings found on a kernel command line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KernelCmdline {
    pub listen: Option<String>,
    pub cell_id: Option<String>,
    /// Block device holding the build image (ext4), mounted read-only at the build image path.
    pub build_disk: Option<String>,
    /// `hive.boot_timer=1`: mark boot milestones on the VMM's boot timer (`init::boot_mark`).
    pub boot_timer: bool,
}

impl KernelCmdline {
    /// Parses `/proc/cmdline` text; unknown words are ignored (they belong to the kernel).
    pub fn parse(text: &str) -> Self {
        let mut out = KernelCmdline::default();
        for word in text.split_ascii_whitespace() {
            if let Some(v) = word.strip_prefix("hive.listen=") {
                out.listen = Some(v.to_string());
            } else if let Some(v) = word.strip_prefix("hive.cell_id=") {
                out.cell_id = Some(v.to_string());
            } else if let Some(v) = word.strip_prefix("hive.build_disk=") {
                out.build_disk = Some(v.to_string());
            } else if word == "hive.boot_timer=1" {
                out.boot_timer = true;
            }
        }
        out
    }

    /// Reads the running kernel's command line; missing `/proc` reads as empty.
    pub fn read(path: &Path) -> Self {
        std::fs::read_to_string(path)
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "unix:/run/hive/agent.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/hive/agent.sock".into())
        );
        assert_eq!(
            "vsock:1024".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock(1024)
        );
        assert_eq!(
            "tcp:127.0.0.1:7000".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:7000".parse().unwrap())
        );
        for bad in [
            "unix:rel/path",
            "vsock:x",
            "vsock:0",
            "tcp:nope",
            "http://x",
            "",
        ] {
            let err = bad.parse::<ListenAddr>().unwrap_err().to_string();
            assert!(err.contains(bad), "{err} should name {bad}");
        }
    }

    #[test]
    fn kernel_cmdline_picks_hive_words() {
        let c = KernelCmdline::parse(
            "console=ttyS0 hive.cell_id=c-42 root=/dev/vda hive.listen=tcp:0.0.0.0:7000 hive.build_disk=/dev/vdb\n",
        );
        assert_eq!(c.cell_id.as_deref(), Some("c-42"));
        assert_eq!(c.listen.as_deref(), Some("tcp:0.0.0.0:7000"));
        assert_eq!(c.build_disk.as_deref(), Some("/dev/vdb"));
        assert!(!c.boot_timer);
        assert!(KernelCmdline::parse("ro hive.boot_timer=1").boot_timer);
        assert_eq!(KernelCmdline::parse("quiet"), KernelCmdline::default());
    }

    #[test]
    fn cell_ids_are_checked() {
        assert!(validate_cell_id("cell-1.a_b").is_ok());
        assert!(matches!(
            validate_cell_id(""),
            Err(ConfigError::CellIdMissing)
        ));
        assert!(validate_cell_id("a/b").is_err());
        assert!(validate_cell_id(&"x".repeat(64)).is_err());
    }

    #[test]
    fn validate_names_the_bad_field() {
        let cfg = Config {
            cell_id: "c1".into(),
            listen: ListenAddr::Vsock(1024),
            build_image: "/nonexistent/image".into(),
            work_dir: "/var/lib/hive".into(),
            init: false,
            work_tmpfs: true,
            container_net: NetMode::Isolated,
            kill_grace_ms: 5000,
            default_timeout_secs: 3600,
            max_log_bytes: 1 << 20,
            build_uid: 1000,
            build_gid: 1000,
            prewarm: true,
            tunnel_ready: false,
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/image"), "{err}");
        let cfg = Config {
            build_image: "/".into(),
            build_uid: 0,
            ..cfg
        };
        assert!(matches!(cfg.validate(), Err(ConfigError::RootBuildUser)));
    }
}
