//! The build container: one per build, alive from the clone phase to the last step.
//!
//! Daemon side ([`Container::start`]): mount an overlay (lower = the read-only build image, upper
//! and work on the work-dir tmpfs), then re-execute this binary as `__container-init` with
//! `unshare(mount|uts|ipc|net|pid)` done between fork and exec. That helper forks once more; its
//! child is PID 1 of the new pid namespace, mounts /proc, a minimal /dev and /tmp inside the
//! overlay, pivots into it and then only reaps. Each step is `__container-exec`: it `setns`-es into
//! the container's namespaces, forks (the child lands in the container's pid namespace), drops to
//! uid/gid 1000 with no capabilities and no new privileges, and execs `/bin/sh -c STEP`. The daemon
//! starts it in its own process group, so cancel signals reach the whole step.
//!
//! Networking (isolated mode): a link, `hivec0` in the cell and `eth0` in the container,
//! 169.254.200.1/30 <-> .2/30, default route via the cell, masquerade in the cell (nft). The link
//! is a TUN pair joined by the daemon ([`crate::tunpair`]) because these kernels lack veth. The cell's
//! own egress policy is the box's job; WireGuard (issue 5) goes into the container's netns.

use crate::config::NetMode;
use crate::reaper::{Exit, Reaper};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::ffi::CString;
use std::io::{BufRead, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Cell-side link name (the container side is `eth0`).
pub const CELL_LINK: &str = "hivec0";
const CELL_ADDR: &str = "169.254.200.1";
const CONTAINER_ADDR: &str = "169.254.200.2";
const LINK_NET: &str = "169.254.200.0/30";

/// Errors making, using or removing the container.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("create {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount overlay (lower {lower}) at {target}")]
    Overlay {
        lower: PathBuf,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("chown {path} to the build user")]
    Chown {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("find this executable (needed to start the container helper)")]
    SelfExe(#[source] std::io::Error),
    #[error("start the container helper")]
    Spawn(#[source] std::io::Error),
    #[error("container set-up failed: {0}")]
    Setup(String),
    #[error("container did not come up within 10 s")]
    SetupTimeout,
    #[error("network set-up: `{command}` failed: {detail}")]
    Net { command: String, detail: String },
    #[error("open pipe")]
    Pipe(#[source] std::io::Error),
}

/// What the container is built from.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub image: PathBuf,
    /// Directory for upper/, work/ and rootfs/ (on a tmpfs).
    pub dir: PathBuf,
    pub hostname: String,
    pub uid: u32,
    pub gid: u32,
    pub net: NetMode,
}

/// A running container.
#[derive(Debug)]
pub struct Container {
    spec: ContainerSpec,
    rootfs: PathBuf,
    /// The outer `__container-init` process: in the container's mount/uts/ipc/net namespaces,
    /// its `pid_for_children` is the container's pid namespace.
    init_pid: Pid,
    init_exit: Option<oneshot::Receiver<Exit>>,
    exe: PathBuf,
    reaper: Arc<Reaper>,
    /// The packet copier of the container's link (isolated mode).
    link: std::sync::Mutex<Option<crate::tunpair::Forwarder>>,
}

/// Turns a child's pipe end into a non-blocking tokio reader.
pub fn pipe_reader<T: Into<OwnedFd>>(
    fd: Option<T>,
) -> std::io::Result<tokio::net::unix::pipe::Receiver> {
    let fd: OwnedFd = fd
        .ok_or_else(|| std::io::Error::other("child pipe was not set up"))?
        .into();
    tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
}

impl Container {
    /// Mounts the overlay, starts the namespaces and (isolated mode) wires the network.
    pub async fn start(spec: ContainerSpec, reaper: Arc<Reaper>) -> Result<Self, ContainerError> {
        let upper = spec.dir.join("upper");
        let work = spec.dir.join("work");
        let rootfs = spec.dir.join("rootfs");
        for d in [&upper, &work, &rootfs] {
            std::fs::create_dir_all(d).map_err(|source| ContainerError::CreateDir {
                path: d.clone(),
                source,
            })?;
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            spec.image.display(),
            upper.display(),
            work.display()
        );
        mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(opts.as_str()),
        )
        .map_err(|source| ContainerError::Overlay {
            lower: spec.image.clone(),
            target: rootfs.clone(),
            source,
        })?;
        // /work is the build user's home, /work/src the checkout.
        for (d, owner) in [
            ("work", true),
            ("work/src", true),
            ("proc", false),
            ("dev", false),
            ("tmp", false),
        ] {
            let p = rootfs.join(d);
            std::fs::create_dir_all(&p).map_err(|source| ContainerError::CreateDir {
                path: p.clone(),
                source,
            })?;
            if owner {
                nix::unistd::chown(
                    &p,
                    Some(nix::unistd::Uid::from_raw(spec.uid)),
                    Some(nix::unistd::Gid::from_raw(spec.gid)),
                )
                .map_err(|source| ContainerError::Chown { path: p, source })?;
            }
        }

        write_etc(&rootfs, &spec.hostname)?;

        let exe = std::env::current_exe().map_err(ContainerError::SelfExe)?;
        let mut flags = CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWPID;
        if spec.net == NetMode::Isolated {
            flags |= CloneFlags::CLONE_NEWNET;
        }
        let mut cmd = Command::new(&exe);
        cmd.arg("__container-init")
            .arg("--rootfs")
            .arg(&rootfs)
            .arg("--hostname")
            .arg(&spec.hostname)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // SAFETY: runs in the forked child before exec; unshare(2) is a single async-signal-safe
        // syscall and touches no memory shared with the parent's other threads.
        unsafe {
            cmd.pre_exec(move || nix::sched::unshare(flags).map_err(std::io::Error::from));
        }
        let (mut child, exited) = reaper.spawn(&mut cmd).map_err(ContainerError::Spawn)?;
        let init_pid = Pid::from_raw(child.id() as i32);
        let mut container = Container {
            spec,
            rootfs,
            init_pid,
            init_exit: Some(exited),
            exe,
            reaper,
            link: std::sync::Mutex::new(None),
        };
        // The helper answers with one line: "ready" or "error: ...".
        let stdout = child.stdout.take();
        let line = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                if let Some(out) = stdout {
                    let _ = std::io::BufReader::new(out).read_line(&mut line);
                }
                line
            }),
        )
        .await;
        let line = match line {
            Ok(Ok(l)) => l,
            _ => {
                container.kill().await;
                return Err(ContainerError::SetupTimeout);
            }
        };
        if line.trim() != "ready" {
            container.kill().await;
            let msg = line.trim().trim_start_matches("error: ").to_string();
            return Err(ContainerError::Setup(if msg.is_empty() {
                "helper exited without a word".into()
            } else {
                msg
            }));
        }
        if container.spec.net == NetMode::Isolated {
            if let Err(e) = container.wire_network().await {
                container.kill().await;
                return Err(e);
            }
        }
        Ok(container)
    }

    /// The container's network namespace (`/proc/<init>/ns/net`), or `None` when it shares the
    /// cell's (`NetMode::Cell`).
    pub fn netns_path(&self) -> Option<PathBuf> {
        match self.spec.net {
            NetMode::Isolated => Some(PathBuf::from(format!(
                "/proc/{}/ns/net",
                self.init_pid.as_raw()
            ))),
            NetMode::Cell => None,
        }
    }

    /// Root of the container's filesystem as the daemon sees it.
    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }

    /// A command that runs `argv` inside the container (as the build user when `as_user`), with
    /// exactly `env` as its environment. The caller spawns it through the reaper.
    pub fn command(
        &self,
        argv: &[String],
        env: &[(String, String)],
        cwd: &str,
        as_user: bool,
    ) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("__container-exec")
            .arg("--target")
            .arg(self.init_pid.as_raw().to_string())
            .arg("--cwd")
            .arg(cwd);
        if as_user {
            cmd.arg("--uid")
                .arg(self.spec.uid.to_string())
                .arg("--gid")
                .arg(self.spec.gid.to_string());
        }
        cmd.arg("--")
            .args(argv)
            .env_clear()
            .envs(env.iter().cloned());
        // Its own process group: cancel signals the group, reaching the step and its children
        // (process groups span pid namespaces).
        cmd.process_group(0);
        cmd
    }

    async fn net_cmd(&self, netns: Option<&OwnedFd>, args: &[&str]) -> Result<(), ContainerError> {
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..]);
        if let Some(fd) = netns {
            let raw = fd.as_raw_fd();
            // SAFETY: runs in the forked child before exec; setns(2) on an fd the parent keeps
            // open is a single async-signal-safe syscall, and a forked child is single-threaded
            // as setns(CLONE_NEWNET) requires.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = std::os::fd::BorrowedFd::borrow_raw(raw);
                    nix::sched::setns(fd, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
                });
            }
        }
        let command = args.join(" ");
        let out = crate::reaper::run(&self.reaper, &mut cmd)
            .await
            .map_err(|e| ContainerError::Net {
                command: command.clone(),
                detail: e.to_string(),
            })?;
        if out.exit != Exit::Code(0) {
            return Err(ContainerError::Net {
                command,
                detail: format!(
                    "{}: {}",
                    out.exit,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(())
    }

    async fn wire_network(&self) -> Result<(), ContainerError> {
        let pid = self.init_pid.as_raw().to_string();
        let netns: OwnedFd = std::fs::File::open(format!("/proc/{pid}/ns/net"))
            .map_err(|e| ContainerError::Net {
                command: format!("open /proc/{pid}/ns/net"),
                detail: e.to_string(),
            })?
            .into();
        let cell_addr = format!("{CELL_ADDR}/30");
        let ctr_addr = format!("{CONTAINER_ADDR}/30");
        // Each end is made in its own netns: the container's on a thread that entered it (a TUN
        // device belongs to the namespace it was opened in). Moving a link into another
        // namespace costs the kernel a network-wide synchronisation under its global netlink
        // lock (15-50 ms here), which every other cell's and build's link changes would wait
        // behind. The daemon keeps both fds, so both stay attached.
        let tun_err = |end: &str| {
            let command = format!("create TUN link {end}");
            move |e: crate::tunpair::TunError| ContainerError::Net {
                command,
                detail: hive_sys::error_chain(&e),
            }
        };
        let cell_end = crate::tunpair::open_tun(CELL_LINK)
            .map_err(tun_err(&format!("{CELL_LINK} (cell side)")))?;
        let ctr_ns = std::path::PathBuf::from(format!("/proc/{pid}/ns/net"));
        let ctr_end = hive_sys::netns::run_in(&ctr_ns, || crate::tunpair::open_tun("eth0"))
            .map_err(|e| ContainerError::Net {
                command: format!("enter {} to create eth0", ctr_ns.display()),
                detail: hive_sys::error_chain(&e),
            })?
            .map_err(tun_err("eth0 (in the container's netns)"))?;
        let ns = Some(&netns);
        self.net_cmd(ns, &["ip", "link", "set", "lo", "up"]).await?;
        self.net_cmd(ns, &["ip", "addr", "add", &ctr_addr, "dev", "eth0"])
            .await?;
        self.net_cmd(ns, &["ip", "link", "set", "eth0", "up"])
            .await?;
        self.net_cmd(ns, &["ip", "route", "add", "default", "via", CELL_ADDR])
            .await?;
        self.net_cmd(None, &["ip", "addr", "add", &cell_addr, "dev", CELL_LINK])
            .await?;
        self.net_cmd(None, &["ip", "link", "set", CELL_LINK, "up"])
            .await?;
        let fwd = crate::tunpair::forward((CELL_LINK, cell_end), ("eth0", ctr_end))
            .map_err(tun_err("pair: forwarding"))?;
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = Some(fwd);
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| ContainerError::Net {
            command: "sysctl net.ipv4.ip_forward=1".into(),
            detail: e.to_string(),
        })?;
        let _ = self
            .net_cmd(None, &["nft", "delete", "table", "ip", "hive_cell"])
            .await;
        self.net_cmd(None, &["nft", "add", "table", "ip", "hive_cell"])
            .await?;
        self.net_cmd(
            None,
            &[
                "nft",
                "add",
                "chain",
                "ip",
                "hive_cell",
                "post",
                "{ type nat hook postrouting priority 100 ; }",
            ],
        )
        .await?;
        self.net_cmd(
            None,
            &[
                "nft",
                "add",
                "rule",
                "ip",
                "hive_cell",
                "post",
                "ip",
                "saddr",
                LINK_NET,
                "oifname",
                "!=",
                CELL_LINK,
                "masquerade",
            ],
        )
        .await?;
        Ok(())
    }

    /// The build gets no public egress: nothing it sends leaves through the cell (forwarded
    /// or to the cell itself), and the cell's own namespace sends nothing new except to the
    /// connector's WireGuard endpoint `tunnel` (UDP) when the build has a private network, so
    /// the tunnel is the build's only way out. One `inet` table of its own, loaded atomically
    /// and removed with the container; `reject` so a build's connection fails at once instead
    /// of hanging.
    pub async fn deny_public_egress(
        &self,
        tunnel: Option<std::net::SocketAddr>,
    ) -> Result<(), ContainerError> {
        let path = self.spec.dir.join("egress.nft");
        let ruleset = egress_ruleset(tunnel, crate::privnet::IFACE);
        std::fs::write(&path, &ruleset).map_err(|source| ContainerError::Write {
            path: path.clone(),
            source,
        })?;
        let _ = self
            .net_cmd(None, &["nft", "delete", "table", "inet", EGRESS_TABLE])
            .await;
        let file = path.display().to_string();
        self.net_cmd(None, &["nft", "-f", &file]).await
    }

    /// Kills everything in the container (its filesystem stays until [`Container::destroy`]).
    pub async fn kill(&mut self) {
        // SIGKILL to the outer helper; its child (the container's PID 1) has PDEATHSIG=SIGKILL,
        // and when a pid namespace's init dies the kernel kills everything in it.
        let _ = kill(self.init_pid, Signal::SIGKILL);
        self.link.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(rx) = self.init_exit.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
    }

    /// Kills everything in the container and removes its filesystem.
    pub async fn destroy(mut self) {
        self.kill().await;
        if self.spec.net == NetMode::Isolated {
            // The veth pair dies with the container's netns; the table is ours to remove.
            let _ = self
                .net_cmd(None, &["nft", "delete", "table", "ip", "hive_cell"])
                .await;
        }
        let _ = self
            .net_cmd(None, &["nft", "delete", "table", "inet", EGRESS_TABLE])
            .await;
        let _ = umount2(&self.rootfs, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.spec.dir);
    }
}

/// The nftables table of a build without public egress.
const EGRESS_TABLE: &str = "hive_egress";

/// The no-public-egress ruleset (see [`Container::deny_public_egress`]): `tunnel` is the only
/// new flow the cell's namespace may open; `wg_iface` (the tunnel's interface, when the build
/// shares the cell's namespace) and replies stay allowed.
fn egress_ruleset(tunnel: Option<std::net::SocketAddr>, wg_iface: &str) -> String {
    let allow = match tunnel {
        Some(std::net::SocketAddr::V4(a)) => {
            format!("\t\tip daddr {} udp dport {} accept\n", a.ip(), a.port())
        }
        Some(std::net::SocketAddr::V6(a)) => {
            format!("\t\tip6 daddr {} udp dport {} accept\n", a.ip(), a.port())
        }
        None => String::new(),
    };
    format!(
        "table inet {EGRESS_TABLE} {{\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{CELL_LINK}\" reject with icmpx type admin-prohibited\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{CELL_LINK}\" reject with icmpx type admin-prohibited\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority filter; policy accept;\n\
         \t\toifname \"lo\" accept\n\
         \t\toifname \"{wg_iface}\" accept\n\
         \t\toifname \"{CELL_LINK}\" accept\n\
         \t\tct state established,related accept\n\
         {allow}\
         \t\treject with icmpx type admin-prohibited\n\
         \t}}\n\
         }}\n"
    )
}

/// The container's own /etc/hosts (its hostname resolves locally: git and others look it up,
/// and a DNS miss costs the resolver's 5 s timeout) and the cell's resolver configuration.
fn write_etc(rootfs: &Path, hostname: &str) -> Result<(), ContainerError> {
    let etc = rootfs.join("etc");
    let write = |name: &str, text: &[u8]| {
        let p = etc.join(name);
        // The image may ship these as symlinks; the overlay lets us replace them.
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, text).map_err(|source| ContainerError::Write { path: p, source })
    };
    write(
        "hosts",
        format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{hostname}\n").as_bytes(),
    )?;
    if let Ok(resolv) = std::fs::read("/etc/resolv.conf") {
        write("resolv.conf", &resolv)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Helper modes. These run in a freshly exec'd, single-threaded process (no tokio), so forking and
// namespace calls are safe here.
// ---------------------------------------------------------------------------------------------

/// Arguments of `__container-init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    #[arg(long)]
    pub rootfs: PathBuf,
    #[arg(long)]
    pub hostname: String,
}

/// Arguments of `__container-exec`.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Pid (in the daemon's pid namespace) of the container's outer init helper.
    #[arg(long)]
    pub target: i32,
    #[arg(long, default_value = "/")]
    pub cwd: String,
    #[arg(long)]
    pub uid: Option<u32>,
    #[arg(long)]
    pub gid: Option<u32>,
    #[arg(last = true, required = true)]
    pub argv: Vec<String>,
}

/// Errors inside the helpers; printed, never panicked.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("{op}: {source}")]
    Sys {
        op: String,
        #[source]
        source: nix::Error,
    },
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("argument contains a NUL byte")]
    Nul,
}

fn sys<T>(r: nix::Result<T>, op: impl FnOnce() -> String) -> Result<T, HelperError> {
    r.map_err(|source| HelperError::Sys { op: op(), source })
}

fn io<T>(r: std::io::Result<T>, op: impl FnOnce() -> String) -> Result<T, HelperError> {
    r.map_err(|source| HelperError::Io { op: op(), source })
}

/// `__container-init`: we are already in the new mount/uts/ipc/net namespaces; the next child
/// is PID 1 of the new pid namespace.
pub fn init_main(args: InitArgs) -> i32 {
    use nix::unistd::{fork, ForkResult};
    // SAFETY: this helper process is single-threaded (no runtime was started in this mode), so
    // the child may run arbitrary code after fork.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let code = match container_pid1_setup(&args) {
                Ok(()) => {
                    let mut out = std::io::stdout();
                    let _ = out.write_all(b"ready\n");
                    let _ = out.flush();
                    close_stdout();
                    container_pid1_loop()
                }
                Err(e) => {
                    println!("error: {e}");
                    1
                }
            };
            std::process::exit(code)
        }
        Ok(ForkResult::Parent { child }) => {
            close_stdout();
            wait_exit_code(child)
        }
        Err(e) => {
            println!("error: fork into the new pid namespace: {e}");
            1
        }
    }
}

fn close_stdout() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
    }
}

fn wait_exit_code(child: Pid) -> i32 {
    use nix::sys::wait::WaitStatus;
    loop {
        match nix::sys::wait::waitpid(child, None) {
            Ok(WaitStatus::Exited(_, c)) => return c,
            Ok(WaitStatus::Signaled(_, s, _)) => return 128 + s as i32,
            Err(nix::errno::Errno::EINTR) | Ok(_) => continue,
            Err(_) => return 1,
        }
    }
}

fn container_pid1_setup(args: &InitArgs) -> Result<(), HelperError> {
    let root = &args.rootfs;
    let none: Option<&str> = None;
    sys(nix::sys::prctl::set_pdeathsig(Signal::SIGKILL), || {
        "set parent-death signal".into()
    })?;
    // Our mounts must not propagate back to the cell.
    sys(
        mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none),
        || "make / private".into(),
    )?;
    sys(nix::unistd::sethostname(&args.hostname), || {
        format!("set hostname {}", args.hostname)
    })?;
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    sys(
        mount(
            Some("proc"),
            &root.join("proc"),
            Some("proc"),
            nosuid | MsFlags::MS_NOEXEC,
            none,
        ),
        || format!("mount proc at {}/proc", root.display()),
    )?;
    mask_proc(&root.join("proc"))?;
    // A minimal /dev: a tmpfs with the harmless nodes bound in from the cell's /dev.
    let dev = root.join("dev");
    sys(
        mount(
            Some("tmpfs"),
            &dev,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=755,size=1m"),
        ),
        || format!("mount tmpfs at {}", dev.display()),
    )?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let src = Path::new("/dev").join(node);
        if !src.exists() {
            continue;
        }
        let dst = dev.join(node);
        io(std::fs::File::create(&dst), || {
            format!("create {}", dst.display())
        })?;
        sys(
            mount(Some(&src), &dst, none, MsFlags::MS_BIND, none),
            || format!("bind {} to {}", src.display(), dst.display()),
        )?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let _ = std::os::unix::fs::symlink(target, dev.join(name));
    }
    for d in ["pts", "shm"] {
        io(std::fs::create_dir_all(dev.join(d)), || {
            format!("create {}/{d}", dev.display())
        })?;
    }
    // A private devpts instance; without it there are no ptys, which builds rarely need.
    let _ = mount(
        Some("devpts"),
        &dev.join("pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620"),
    );
    sys(
        mount(
            Some("tmpfs"),
            &dev.join("shm"),
            Some("tmpfs"),
            nosuid,
            Some("mode=1777"),
        ),
        || "mount /dev/shm".into(),
    )?;
    sys(
        mount(
            Some("tmpfs"),
            &root.join("tmp"),
            Some("tmpfs"),
            nosuid,
            Some("mode=1777"),
        ),
        || format!("mount tmpfs at {}/tmp", root.display()),
    )?;
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching "." then drops
    // it, leaving no path back to the cell's filesystem.
    sys(nix::unistd::chdir(root), || {
        format!("chdir {}", root.display())
    })?;
    sys(nix::unistd::pivot_root(".", "."), || {
        format!("pivot_root into {}", root.display())
    })?;
    sys(umount2(".", MntFlags::MNT_DETACH), || {
        "detach the old root".into()
    })?;
    sys(nix::unistd::chdir("/"), || "chdir /".into())?;
    Ok(())
}

/// Files of /proc a build gets /dev/null in place of: kernel memory and symbols, keyrings,
/// timer and scheduler internals, the sysrq trigger.
const PROC_MASKED_FILES: &[&str] = &[
    "kcore",
    "kallsyms",
    "keys",
    "key-users",
    "timer_list",
    "sched_debug",
    "sysrq-trigger",
    "latency_stats",
    "kpagecount",
    "kpageflags",
    "kpagecgroup",
    "kmsg",
    "config.gz",
    "vmallocinfo",
    "slabinfo",
];
/// Directories of /proc a build sees empty.
const PROC_MASKED_DIRS: &[&str] = &["acpi", "scsi", "asound", "driver", "tty/driver"];
/// Directories of /proc a build sees read-only (sysctls included: core_pattern, ...).
const PROC_READONLY: &[&str] = &["sys", "irq", "bus", "fs", "sysvipc"];

/// Masks the container's fresh /proc as container runtimes do: what reaches kernel-wide state
/// or leaks the box's internals is hidden or read-only. The step runs without capabilities and
/// cannot unmount any of it; the user namespace already keeps it from writing kernel-wide
/// sysctls, this keeps it from reading them too.
fn mask_proc(proc_dir: &Path) -> Result<(), HelperError> {
    let none: Option<&str> = None;
    for f in PROC_MASKED_FILES {
        let p = proc_dir.join(f);
        if !p.exists() {
            continue;
        }
        sys(
            mount(Some("/dev/null"), &p, none, MsFlags::MS_BIND, none),
            || format!("mask {}", p.display()),
        )?;
    }
    for d in PROC_MASKED_DIRS {
        let p = proc_dir.join(d);
        if !p.is_dir() {
            continue;
        }
        sys(
            mount(
                Some("tmpfs"),
                &p,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=0,mode=0555"),
            ),
            || format!("mask {}", p.display()),
        )?;
    }
    for d in PROC_READONLY {
        let p = proc_dir.join(d);
        if !p.exists() {
            continue;
        }
        sys(
            mount(Some(&p), &p, none, MsFlags::MS_BIND | MsFlags::MS_REC, none),
            || format!("bind {}", p.display()),
        )?;
        sys(
            mount(
                none,
                &p,
                none,
                MsFlags::MS_BIND
                    | MsFlags::MS_REMOUNT
                    | MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV
                    | MsFlags::MS_NOEXEC,
                none,
            ),
            || format!("make {} read-only", p.display()),
        )?;
    }
    Ok(())
}

/// PID 1 of the container: reap orphans until killed.
fn container_pid1_loop() -> i32 {
    loop {
        match nix::sys::wait::wait() {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `__container-exec`: join the container, fork into its pid namespace, drop privileges, exec.
pub fn exec_main(args: ExecArgs) -> i32 {
    match exec_inner(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "hive-cell: cannot run {:?} in the container: {e}",
                args.argv.join(" ")
            );
            127
        }
    }
}

fn exec_inner(args: &ExecArgs) -> Result<i32, HelperError> {
    use nix::sys::signal::{signal, SigHandler};
    use nix::unistd::{fork, ForkResult};
    let argv: Vec<CString> = args
        .argv
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| HelperError::Nul))
        .collect::<Result<_, _>>()?;
    // Open every namespace before joining any: after the mount namespace, /proc is the
    // container's and the target pid means something else.
    let mut fds = Vec::new();
    for (name, flag) in [
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid_for_children", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ] {
        let path = format!("/proc/{}/ns/{name}", args.target);
        let f = io(std::fs::File::open(&path), || format!("open {path}"))?;
        fds.push((path, f, flag));
    }
    // The container's root as its own processes see it. setns(mnt) alone would put us at the
    // namespace's root mount, which is not the container's root when the cell itself was only
    // chroot'ed (not pivot_root'ed) into its rootfs.
    let root_path = format!("/proc/{}/root", args.target);
    let root = io(std::fs::File::open(&root_path), || {
        format!("open {root_path}")
    })?;
    for (path, f, flag) in &fds {
        sys(nix::sched::setns(f.as_fd(), *flag), || {
            format!("join {path}")
        })?;
    }
    drop(fds);
    sys(nix::unistd::fchdir(root.as_raw_fd()), || {
        format!("chdir {root_path}")
    })?;
    sys(nix::unistd::chroot("."), || format!("chroot {root_path}"))?;
    drop(root);
    // The daemon signals our whole process group on cancel; we stay to report the exit code.
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: SIG_IGN installs no handler code; nothing else in this process uses signals.
        let _ = unsafe { signal(s, SigHandler::SigIgn) };
    }
    // SAFETY: this helper process is single-threaded, so the child may run arbitrary code.
    match sys(unsafe { fork() }, || "fork into the container".into())? {
        ForkResult::Child => {
            let err = exec_child(args, &argv);
            eprintln!("hive-cell: exec {:?}: {err}", args.argv.join(" "));
            std::process::exit(127)
        }
        ForkResult::Parent { child } => Ok(wait_exit_code(child)),
    }
}

/// Becomes the step. Returns only on failure.
fn exec_child(args: &ExecArgs, argv: &[CString]) -> HelperError {
    use nix::sys::signal::{signal, SigHandler};
    let step = || -> Result<std::convert::Infallible, HelperError> {
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            // SAFETY: restores the default disposition; no handler code is involved.
            let _ = unsafe { signal(s, SigHandler::SigDfl) };
        }
        sys(nix::sys::prctl::set_pdeathsig(Signal::SIGKILL), || {
            "set parent-death signal".into()
        })?;
        if let (Some(uid), Some(gid)) = (args.uid, args.gid) {
            // Drop the bounding set while we still hold CAP_SETPCAP; the setresuid below then
            // clears permitted/effective/ambient sets (no SECBIT_KEEP_CAPS).
            for cap in 0..=63 {
                // SAFETY: prctl(PR_CAPBSET_DROP) takes plain integers; EINVAL past the last
                // capability is expected and ends the loop.
                let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
                if r != 0 {
                    break;
                }
            }
            sys(nix::unistd::setgroups(&[]), || {
                "clear supplementary groups".into()
            })?;
            let g = nix::unistd::Gid::from_raw(gid);
            sys(nix::unistd::setresgid(g, g, g), || format!("set gid {gid}"))?;
            let u = nix::unistd::Uid::from_raw(uid);
            sys(nix::unistd::setresuid(u, u, u), || format!("set uid {uid}"))?;
        }
        // Nothing left in any set, ambient and inheritable included (setresuid above cleared
        // the permitted and effective sets only).
        io(hive_jail::caps::clear(), || "drop capabilities".into())?;
        sys(nix::sys::prctl::set_no_new_privs(), || {
            "set no_new_privs".into()
        })?;
        sys(nix::unistd::chdir(args.cwd.as_str()), || {
            format!("chdir {}", args.cwd)
        })?;
        // Last before exec: the step's seccomp profile (no mounts, no namespaces, no ptrace
        // attach, no clone3), stacked on the cell daemon's allow-list in a sandbox.
        let filters = hive_jail::seccomp::step().map_err(|e| HelperError::Io {
            op: "build the step's seccomp filter".into(),
            source: std::io::Error::other(e),
        })?;
        hive_jail::seccomp::install(&filters).map_err(|e| HelperError::Io {
            op: "install the step's seccomp filter".into(),
            source: std::io::Error::other(e),
        })?;
        sys(nix::unistd::execvp(&argv[0], argv), || {
            format!("exec {}", args.argv[0])
        })
    };
    match step() {
        Err(e) => e,
        Ok(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_ruleset_allows_only_the_connector() {
        let r = egress_ruleset(Some("198.18.1.50:51820".parse().unwrap()), "hwg0");
        assert!(
            r.contains("ip daddr 198.18.1.50 udp dport 51820 accept"),
            "{r}"
        );
        assert!(r.contains("iifname \"hivec0\" reject"), "{r}");
        // The catch-all comes last in the output chain.
        let out = &r[r.find("chain output").unwrap()..];
        assert!(out.find("udp dport").unwrap() < out.find("reject").unwrap());
        let r6 = egress_ruleset(Some("[fd00::50]:51820".parse().unwrap()), "hwg0");
        assert!(
            r6.contains("ip6 daddr fd00::50 udp dport 51820 accept"),
            "{r6}"
        );
        let none = egress_ruleset(None, "hwg0");
        assert!(!none.contains("udp dport"), "{none}");
        // nft itself accepts it (check mode: nothing is loaded), where nft and root exist.
        if nix::unistd::geteuid().is_root() {
            if let Ok(mut child) = Command::new("nft")
                .args(["-c", "-f", "-"])
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
            {
                child.stdin.take().unwrap().write_all(r.as_bytes()).unwrap();
                let out = child.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "nft -c refused:\n{r}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}
