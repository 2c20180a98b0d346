//! `hive-box`: the box daemon binary. Thin: parses flags, wires the library parts, handles signals.
//!
//! `hive-box [FLAGS]` runs the daemon; `hive-box jail --spec FILE` is the single-threaded helper
//! both backends re-execute to put a cell process into its namespaces (`hive_jail::recipe`), and
//! `hive-box vmm --config FILE` is one microVM (`hive_vmm::cli`; run inside that jail by the
//! microvm backend, via the internal `hive-box vmm-launch` (`hive_jail::launch`), which drops to
//! the cell's uid first).
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use hive_box::agent::{Agent, AgentConfig};
use hive_box::backend::microvm::{GuestFiles, MicrovmBackend, MicrovmConfig};
use hive_box::backend::sandbox::{Sandbox, SandboxConfig};
use hive_box::backend::CellBackend;
use hive_box::claim::Claim;
use hive_box::config::{self, BackendChoice, ClassCount};
use hive_box::net::{BoxNet, Subnet};
use hive_box::pool::Pool;
use hive_jail::cgroup::Hierarchy;
use hive_jail::JailSpec;
use hive_sys::error_chain;

#[derive(Debug, Parser)]
#[command(
    name = "hive-box",
    version,
    about = "Hive box daemon: keeps warm cells per size class, runs the builds the control plane \
             assigns in them, streams their logs back, destroys each cell after its one build.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Internal: jail helper re-executed by the daemon (single-threaded; not for direct use).
    Jail(JailArgs),
    /// Run one microVM (a cell) in this process until the guest resets or a vCPU dies; the
    /// daemon starts it inside the cell's jail. Exit: 0 reset, 2 set-up, 3 shutdown, 4 vCPU
    /// failure, 143 SIGTERM.
    Vmm(hive_vmm::cli::VmmArgs),
    /// Internal: first program in a microVM cell's jail; gives the jail its own /dev/kvm and
    /// /dev/net/tun owned by the cell's uid, becomes that uid and execs `hive-box vmm`.
    #[command(hide = true)]
    VmmLaunch(hive_jail::launch::LaunchArgs),
}

#[derive(Debug, Args)]
struct JailArgs {
    /// JSON jail spec written by the daemon.
    #[arg(long)]
    spec: PathBuf,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The control plane's box listener (its --box-addr), which the box dials out to:
    /// https://HOST:PORT. The box is known by its client certificate, kept in
    /// <data-dir>/tls/ after it joined once with --join-token. (http://HOST:PORT of the gRPC
    /// listener is plaintext without a certificate, accepted only by a control plane started
    /// with --insecure-boxes: tests and development.) Several control planes of one hive (on
    /// one PostgreSQL): their URLs comma-separated; the box holds one session at a time and
    /// fails over to the next, with jittered backoff, when its control plane goes away.
    #[arg(
        long,
        env = "HIVE_CONTROL_PLANE",
        default_value = "https://127.0.0.1:50052"
    )]
    control_plane: String,
    /// One-time join token from `hivectl box join-token` (it also pins the control plane's
    /// CA): traded for this box's certificate on its first start; not needed afterwards.
    #[arg(long, env = "HIVE_BOX_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Cell backend: microvm (one jailed VM per cell on the embedded VMM; needs /dev/kvm and the
    /// --guest-* files), sandbox (namespaces on the box's kernel: weaker isolation than a
    /// microVM), or auto: microvm when the CPU shows vmx/svm, /dev/kvm opens and the guest files
    /// are given, else sandbox with a warning saying why.
    #[arg(long, env = "HIVE_BOX_BACKEND", default_value = "auto")]
    backend: BackendChoice,
    /// Warm pool target per size class, CLASS=N; repeat or comma-separate for several classes.
    #[arg(long = "pool", env = "HIVE_BOX_POOL", value_delimiter = ',')]
    pool: Vec<ClassCount>,
    /// Most cells of a class at once, CLASS=N (default: 2 x target + 1).
    #[arg(long = "capacity", env = "HIVE_BOX_CAPACITY", value_delimiter = ',')]
    capacity: Vec<ClassCount>,
    /// Where cells' files live (`<data-dir>/cells/<id>/`) and the box id is kept
    /// (`<data-dir>/box-id`). Each box on a host needs its own.
    #[arg(long, env = "HIVE_BOX_DATA_DIR", default_value = "/var/lib/hive-box")]
    data_dir: PathBuf,
    /// This box's id: 1-63 characters of a-z A-Z 0-9 . _ - (default: made on the first start
    /// as `<hostname>-<hash of /etc/machine-id and the data dir>`, kept in `<data-dir>/box-id`
    /// and reused on every later start from that data dir).
    #[arg(long, env = "HIVE_BOX_ID")]
    box_id: Option<String>,
    /// Cell rootfs directory (read-only lower layer of every cell; from deploy/images/build-images.sh).
    #[arg(long, env = "HIVE_CELL_ROOTFS")]
    cell_rootfs: Option<PathBuf>,
    /// Build image directory, bound read-only at /images/build in every cell.
    #[arg(long, env = "HIVE_BUILD_IMAGE")]
    build_image: Option<PathBuf>,
    /// A hive-cell binary to bind over /sbin/hive-cell in cells (development; sandbox only).
    #[arg(long, env = "HIVE_CELL_BINARY")]
    cell_binary: Option<PathBuf>,
    /// Warm cells make their private-network interface (`hwg0`, with a throwaway key that
    /// never leaves the cell, no address and no peer) before any build is placed, so a
    /// private-network build's tunnel is up about 30 ms sooner; the build's own key is still
    /// made when it asks. Costs each warm cell a moved network interface and WireGuard's idle
    /// threads; a build without a private network gets the interface removed before its first
    /// step. Turn on for boxes that run private-network builds.
    #[arg(long, env = "HIVE_BOX_TUNNEL_READY_CELLS", default_value_t = false, action = clap::ArgAction::Set)]
    tunnel_ready_cells: bool,
    /// microvm: guest kernel, a vmlinux file or the directory deploy/guest/build-kernel.sh
    /// prints (its vmlinux is used).
    #[arg(long, env = "HIVE_GUEST_KERNEL")]
    guest_kernel: Option<PathBuf>,
    /// microvm: cell rootfs ext4 image, the guest's read-only /dev/vda (from
    /// deploy/images/build-images.sh).
    #[arg(long, env = "HIVE_CELL_ROOTFS_DISK")]
    guest_rootfs_disk: Option<PathBuf>,
    /// microvm: build image ext4 image, the guest's read-only /dev/vdb (from
    /// deploy/images/build-images.sh).
    #[arg(long, env = "HIVE_BUILD_IMAGE_DISK")]
    build_image_disk: Option<PathBuf>,
    /// microvm: extra words for the guest kernel command line.
    #[arg(long, env = "HIVE_GUEST_CMDLINE", default_value = "")]
    guest_cmdline: String,
    /// microvm: CPU features the guest sees: host (all KVM offers) or baseline (no
    /// XSAVE/AVX/POPCNT/CMPXCHG16B, for nested KVMs that cannot emulate them).
    #[arg(long, env = "HIVE_GUEST_CPU_TEMPLATE", default_value = "host", value_parser = ["host", "baseline"])]
    guest_cpu_template: String,
    /// microvm: the VMM of cell slot N runs as uid and gid BASE + N (default: 900000 + k * 1024,
    /// k from the box id, the first range no other box on this host holds).
    #[arg(long, env = "HIVE_VMM_UID_BASE")]
    vmm_uid_base: Option<u32>,
    /// sandbox: the cell in slot N maps its ids 0..65535 (root included) to host ids BASE + N *
    /// 65536 onwards (default: 0x10000000 + k * 2^26, k from the box id, the first range no
    /// other box on this host holds)
    #[arg(long, env = "HIVE_SANDBOX_UID_BASE")]
    sandbox_uid_base: Option<u32>,
    /// Address of the HTTP /healthz and /metrics endpoints.
    #[arg(long, env = "HIVE_BOX_HEALTH_ADDR", default_value = "127.0.0.1:8081")]
    health_addr: SocketAddr,
    /// IPv4 range cut into one /30 per cell (box side .1, cell .2) (default: a /20 of
    /// 100.64.0.0/10 picked from the box id, outside 100.96.0.0/16, the first that neither
    /// another box on this host nor a route of the host overlaps). Refused when it overlaps
    /// another live box's.
    #[arg(long, env = "HIVE_BOX_CELL_SUBNET")]
    cell_subnet: Option<Subnet>,
    /// More IPv4 addresses cells must not reach (control-plane replicas, its database...); the
    /// control plane's own address is added from --control-plane.
    #[arg(long = "block", env = "HIVE_BOX_BLOCK", value_delimiter = ',')]
    block: Vec<Ipv4Addr>,
    /// Name of this box's nftables table, inet family (default: `hive_box_<8 hex of a hash of
    /// the box id>`). Refused when another live box on this host uses it.
    #[arg(long, env = "HIVE_BOX_NFT_TABLE")]
    nft_table: Option<String>,
    /// Parent cgroup (under each controller on v1) of this box's cells (default:
    /// `hive-box-<8 hex of a hash of the box id>`). Refused when another live box uses it.
    #[arg(long, env = "HIVE_BOX_CGROUP_PARENT")]
    cgroup_parent: Option<String>,
    /// Where the boxes of this host record what each holds (id, data dir, table, cgroup parent,
    /// subnet, VMM uids); shared by all boxes of the host.
    #[arg(long, env = "HIVE_BOX_CLAIMS_DIR", default_value = hive_box::claim::CLAIMS_DIR)]
    claims_dir: PathBuf,
    /// After this many cell boots in a row fail (none succeeding), /healthz answers 503 with
    /// the last error, until a boot succeeds again.
    #[arg(long, env = "HIVE_BOX_UNHEALTHY_BOOT_FAILURES", default_value_t = 3)]
    unhealthy_boot_failures: u32,
    /// The lease time until the control plane says its own at registration (then that one
    /// counts): without the control plane for two thirds of it, the box stops its builds and
    /// gives the attempts back (they run again); a cell no box has followed for two thirds of it
    /// stops its build.
    #[arg(long, env = "HIVE_LEASE_SECS", default_value_t = 30)]
    lease_secs: u64,
    /// How long to keep trying to resolve the control plane's host name at start (cells are
    /// blocked from its addresses; without them the box does not start). The name is resolved
    /// again every 30 s; a new address is blocked too (the list only grows).
    #[arg(long, env = "HIVE_BOX_RESOLVE_TIMEOUT_SECS", default_value_t = 60)]
    resolve_timeout_secs: u64,
    /// How long a cell may take from start to answering health.
    #[arg(long, env = "HIVE_BOX_READY_TIMEOUT_SECS", default_value_t = 30)]
    ready_timeout_secs: u64,
    /// Period of the warm cells' health check.
    #[arg(long, env = "HIVE_BOX_HEALTH_CHECK_SECS", default_value_t = 10)]
    health_check_secs: u64,
    /// How long a warm cell has to answer a health check before it is replaced (raise it on slow
    /// hosts, e.g. an emulated KVM host).
    #[arg(long, env = "HIVE_BOX_HEALTH_TIMEOUT_SECS", default_value_t = 2)]
    health_timeout_secs: u64,
    /// How long a call into a cell (RunBuild, PrepareTunnel, Cancel) may take before the build
    /// fails (raise it on slow hosts).
    #[arg(long, env = "HIVE_BOX_CELL_CALL_TIMEOUT_SECS", default_value_t = 10)]
    cell_call_timeout_secs: u64,
    /// Least time in milliseconds between the extra heartbeats that tell the control plane at
    /// once of room the pool gained (a cell became warm, a used cell was released), rather than
    /// at the next periodic heartbeat; 0 sends only the periodic ones.
    #[arg(long, env = "HIVE_BOX_ROOM_HEARTBEAT_GAP_MS", default_value_t = 100)]
    room_heartbeat_gap_ms: u64,
    /// On SIGTERM: how long running builds may continue before they are stopped and given back
    /// to the control plane (reported LOST: they run again elsewhere).
    #[arg(long, env = "HIVE_BOX_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    shutdown_grace_secs: u64,
    /// When up, write {"health": "ADDR"} to this file (tests pass port 0 and read it).
    #[arg(long, env = "HIVE_BOX_READY_FILE")]
    ready_file: Option<PathBuf>,
    /// Log format on stderr: text, or json (one object per line, for log shippers).
    #[arg(long, env = "HIVE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("configuration")]
    Config(#[from] config::ConfigError),
    #[error("--backend microvm: {0}; use --backend sandbox on this host")]
    NoKvm(String),
    #[error("cell backend")]
    Backend(#[from] hive_box::backend::BackendError),
    #[error("box network set-up")]
    Net(#[from] hive_box::net::NetError),
    #[error("bind health endpoint {0}")]
    Health(SocketAddr, #[source] std::io::Error),
    #[error("write ready file {0}")]
    ReadyFile(PathBuf, #[source] std::io::Error),
    #[error("start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("resolve the current executable (the jail helper)")]
    SelfExe(#[source] std::io::Error),
    #[error("{0} is required for the sandbox backend (the images come from deploy/images/build-images.sh)")]
    Missing(&'static str),
    #[error("data dir {0}")]
    DataDir(PathBuf, #[source] std::io::Error),
    #[error("box identity")]
    Identity(#[from] hive_box::identity::IdentityError),
    #[error(
        "cannot resolve the control plane's host {host:?} ({why}): cells must be blocked from \
         it, so the box does not start; fix its DNS, give --control-plane as an address, or \
         wait longer with --resolve-timeout-secs"
    )]
    Resolve { host: String, why: String },
    #[error("claim this box's names on the host")]
    Claim(#[from] hive_box::claim::ClaimError),
    #[error("join the control plane")]
    Join(#[from] hive_box::credentials::CredentialsError),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        // No runtime, no threads: the helper forks.
        // Before any thread exists: `vmm::cli::run` blocks SIGTERM/SIGINT for its signal thread.
        Some(Cmd::Vmm(args)) => {
            // The boot timer counts from here.
            hive_vmm::process_start();
            init_tracing(LogFormat::Text);
            ExitCode::from(hive_vmm::cli::run(&args).clamp(0, 255) as u8)
        }
        Some(Cmd::VmmLaunch(args)) => {
            let e = hive_jail::launch::launch(&args);
            eprintln!("hive-box vmm-launch: {}", error_chain(&e));
            ExitCode::from(127)
        }
        Some(Cmd::Jail(args)) => {
            match JailSpec::load(&args.spec).and_then(|s| hive_jail::recipe::run(&s)) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("hive-box jail: {}", error_chain(&e));
                    ExitCode::from(126)
                }
            }
        }
        None => {
            init_tracing(cli.run.log_format);
            match run(cli.run) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{}", error_chain(&e));
                    eprintln!("hive-box: {}", error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Level from HIVE_LOG, else RUST_LOG, else `info` (as the control plane).
fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HIVE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // No colour codes when stderr is a file (the VMM's log in its cell dir, a daemon under a
    // supervisor that captures output).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// KVM is usable for microVMs when the CPU advertises hardware virtualization and /dev/kvm opens.
fn kvm_usable() -> Result<(), String> {
    let cpuinfo =
        std::fs::read_to_string("/proc/cpuinfo").map_err(|e| format!("read /proc/cpuinfo: {e}"))?;
    let has_hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !has_hw {
        return Err("the CPU shows no vmx/svm flag (nested or paravirtualized KVM cannot boot Linux guests)".into());
    }
    kvm_opens()
}

fn kvm_opens() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("cannot open /dev/kvm ({e})"))
}

/// The backend `run` settled on.
enum Chosen {
    Sandbox,
    Microvm(GuestFiles),
}

/// Applies the `--backend` rule: an explicit choice is kept (microvm must find /dev/kvm and
/// its files); auto takes microvm only with hardware virtualization, an openable /dev/kvm and
/// the guest files, and says why when it falls back to the sandbox.
fn choose_backend(args: &RunArgs) -> Result<Chosen, MainError> {
    let guest = || {
        config::guest_files(
            args.guest_kernel.as_deref(),
            args.guest_rootfs_disk.as_deref(),
            args.build_image_disk.as_deref(),
        )
    };
    match args.backend {
        BackendChoice::Sandbox => Ok(Chosen::Sandbox),
        BackendChoice::Microvm => {
            kvm_opens().map_err(MainError::NoKvm)?;
            let files = guest()?;
            if let Err(why) = kvm_usable() {
                tracing::warn!(reason = %why, "--backend microvm on a host that may not boot Linux guests");
            }
            Ok(Chosen::Microvm(files))
        }
        BackendChoice::Auto => match kvm_usable() {
            Ok(()) => match guest() {
                Ok(files) => Ok(Chosen::Microvm(files)),
                Err(e) => {
                    tracing::warn!(reason = %e, "KVM is usable but the microVM guest files are not configured: using the sandbox backend (weaker isolation)");
                    Ok(Chosen::Sandbox)
                }
            },
            Err(why) => {
                tracing::warn!(reason = %why, "no usable KVM: using the sandbox backend (weaker isolation than a microVM)");
                Ok(Chosen::Sandbox)
            }
        },
    }
}

/// The host and port of a control plane URL.
fn host_port(url: &str) -> (String, u16) {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    let default_port = if url.starts_with("https://") { 443 } else { 80 };
    match authority.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(default_port)),
        None => (authority.to_string(), default_port),
    }
}

/// The cell daemon's setting for `--tunnel-ready-cells`.
const TUNNEL_READY_ENV: &str = "HIVE_CELL_TUNNEL_READY";

/// How often the control planes' host names are resolved again for the cells' block list.
const RE_RESOLVE: Duration = Duration::from_secs(30);

/// Resolves the control planes' host names every [`RE_RESOLVE`] and blocks cells from any new
/// address too (a control plane moved, DNS failover): the block list only grows. Runs until the
/// box stops.
async fn keep_control_plane_blocked(urls: Vec<String>, net: BoxNet) {
    let mut known: std::collections::HashSet<Ipv4Addr> = net.blocked.iter().copied().collect();
    let names: Vec<(String, u16)> = urls
        .iter()
        .map(|u| host_port(u))
        .filter(|(h, _)| {
            h.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_err()
        })
        .collect();
    if names.is_empty() {
        return;
    }
    loop {
        tokio::time::sleep(RE_RESOLVE).await;
        for (name, port) in &names {
            let Ok(addrs) = tokio::net::lookup_host((name.as_str(), *port)).await else {
                tracing::debug!(host = %name, "control plane name did not resolve this time");
                continue;
            };
            let new: Vec<Ipv4Addr> = addrs
                .filter_map(|a| match a.ip() {
                    IpAddr::V4(v4) => Some(v4),
                    IpAddr::V6(_) => None,
                })
                // A private address is blocked for cells already (net::PRIVATE_RANGES).
                .filter(|ip| !known.contains(ip) && !hive_box::net::in_private_range(*ip))
                .collect();
            if new.is_empty() {
                continue;
            }
            let net = net.clone();
            let adding = new.clone();
            match tokio::task::spawn_blocking(move || net.block(&adding)).await {
                Ok(Ok(())) => {
                    tracing::warn!(host = %name, addrs = ?new,
                        "the control plane's name resolves to a new address: cells are blocked from it too");
                    known.extend(new);
                }
                Ok(Err(e)) => {
                    tracing::error!(host = %name, addrs = ?new, error = %hive_sys::error_chain(&e),
                        "could not block the control plane's new address from cells; trying again")
                }
                Err(e) => tracing::error!(error = %e, "block task"),
            }
        }
    }
}

/// The control plane's IPv4 addresses, which cells must not reach. A host name that does not
/// resolve is tried again (DNS may come up after the box) until `within` has passed; then the
/// box refuses to start rather than run cells with no block on the control plane.
async fn control_plane_addrs(url: &str, within: Duration) -> Result<Vec<Ipv4Addr>, MainError> {
    let (host, port) = host_port(url);
    if let Ok(IpAddr::V4(ip)) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let name = host.as_str();
    let waiting =
        format!("cannot resolve the control plane {name} yet (cells must be blocked from it)");
    retry(within, &waiting, || async move {
        let why = match tokio::net::lookup_host((name, port)).await {
            Ok(addrs) => {
                let all: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                let v4: Vec<Ipv4Addr> = all
                    .iter()
                    .filter_map(|ip| match ip {
                        IpAddr::V4(v4) => Some(*v4),
                        IpAddr::V6(_) => None,
                    })
                    .collect();
                if !all.is_empty() {
                    // IPv6 only: cells have no IPv6 route, so there is nothing to block.
                    return ControlFlow::Break(Ok(v4));
                }
                "no addresses".to_string()
            }
            Err(e) => e.to_string(),
        };
        ControlFlow::Continue(why)
    })
    .await
    .map_err(|why| MainError::Resolve { host, why })
}

/// Calls `attempt` until it settles (`Break`); after a transient failure (`Continue(e)`) waits
/// (jittered backoff, 200 ms doubling to 5 s) and tries again while `within` allows, else
/// gives `e`. The start-up waits for the control plane (resolving it, joining) go this way.
async fn retry<T, E: std::fmt::Display, Fut>(
    within: Duration,
    waiting: &str,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, E>
where
    Fut: std::future::Future<Output = ControlFlow<Result<T, E>, E>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut backoff = hive_sys::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let e = match attempt().await {
            ControlFlow::Break(done) => return done,
            ControlFlow::Continue(e) => e,
        };
        let pause = backoff.next_delay();
        if tokio::time::Instant::now() + pause > deadline {
            return Err(e);
        }
        tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "{waiting}");
        tokio::time::sleep(pause).await;
    }
}

fn run(args: RunArgs) -> Result<(), MainError> {
    let classes = config::classes(&args.pool, &args.capacity)?;
    let chosen = choose_backend(&args)?;
    if matches!(chosen, Chosen::Sandbox) {
        if args.cell_rootfs.is_none() {
            return Err(MainError::Missing("--cell-rootfs (HIVE_CELL_ROOTFS)"));
        }
        if args.build_image.is_none() {
            return Err(MainError::Missing("--build-image (HIVE_BUILD_IMAGE)"));
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(MainError::Runtime)?;
    rt.block_on(run_async(args, classes, chosen))
}

async fn run_async(
    args: RunArgs,
    classes: Vec<hive_box::pool::ClassConfig>,
    chosen: Chosen,
) -> Result<(), MainError> {
    use tokio::signal::unix::{signal, SignalKind};
    let signals = Signals {
        term: signal(SignalKind::terminate()).map_err(MainError::Signals)?,
        int: signal(SignalKind::interrupt()).map_err(MainError::Signals)?,
    };
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| MainError::DataDir(args.data_dir.clone(), e))?;
    let claim = claim_names(&args, matches!(chosen, Chosen::Microvm(_)))?;
    let mut blocked = Vec::new();
    for url in hive_box::agent::control_plane_urls(&args.control_plane) {
        blocked.extend(
            control_plane_addrs(url, Duration::from_secs(args.resolve_timeout_secs)).await?,
        );
    }
    blocked.extend(args.block.iter().copied());
    // Before any cell exists: a box that cannot prove who it is has nothing to run.
    let credentials = credentials(&args, &claim.record.box_id).await?;
    let net = BoxNet {
        table: claim.record.nft_table.clone(),
        subnet: claim.cell_subnet(),
        blocked,
    };
    let resolver = tokio::spawn(keep_control_plane_blocked(
        hive_box::agent::control_plane_urls(&args.control_plane)
            .into_iter()
            .map(str::to_string)
            .collect(),
        net.clone(),
    ));
    let helper = std::env::current_exe().map_err(MainError::SelfExe)?;
    let mut cell_env = std::collections::BTreeMap::new();
    if let Ok(v) = std::env::var("HIVE_CELL_LOG") {
        cell_env.insert("RUST_LOG".to_string(), v);
    }
    if args.tunnel_ready_cells {
        cell_env.insert(TUNNEL_READY_ENV.to_string(), "true".to_string());
    }
    let served = match chosen {
        Chosen::Sandbox => {
            let backend = Arc::new(Sandbox::new(SandboxConfig {
                data_dir: args.data_dir.clone(),
                cell_rootfs: args.cell_rootfs.clone().unwrap_or_default(),
                build_image: args.build_image.clone().unwrap_or_default(),
                cell_binary: args.cell_binary.clone(),
                jail_helper: helper,
                cgroup_parent: claim.record.cgroup_parent.clone(),
                net: net.clone(),
                cell_env,
                cell_uid_base: claim
                    .vmm_uid_base()
                    .unwrap_or(hive_box::identity::SANDBOX_UID_BASE),
            })?);
            let cgroups = backend.cgroups().clone();
            serve(
                args,
                classes,
                backend,
                cgroups,
                net,
                claim,
                credentials,
                signals,
            )
            .await
        }
        Chosen::Microvm(guest) => {
            let mut cfg = MicrovmConfig::new(
                args.data_dir.clone(),
                guest,
                net.clone(),
                claim.record.cgroup_parent.clone(),
            );
            cfg.vmm_binary = helper;
            cfg.extra_cmdline = args.guest_cmdline.clone();
            if args.tunnel_ready_cells {
                // A word with `=` and no dot is an environment variable of the guest's init
                // (the cell daemon). It goes first: after a `--` in the operator's words it
                // would be an argument instead.
                cfg.extra_cmdline = format!("{TUNNEL_READY_ENV}=true {}", cfg.extra_cmdline);
            }
            if let Some(base) = claim.vmm_uid_base() {
                cfg.vmm_uid_base = base;
            }
            if args.guest_cpu_template == "baseline" {
                cfg.cpu_template = hive_box::backend::microvm::CpuTemplate::Baseline;
            }
            if let Ok(v) = std::env::var("HIVE_VMM_LOG") {
                cfg.vmm_env.insert("RUST_LOG".to_string(), v);
            }
            let backend = Arc::new(MicrovmBackend::new(cfg)?);
            let cgroups = backend.cgroups().clone();
            serve(
                args,
                classes,
                backend,
                cgroups,
                net,
                claim,
                credentials,
                signals,
            )
            .await
        }
    };
    resolver.abort();
    served
}

/// The box's certificate: loaded, or bought with the join token. A control plane that is not up
/// yet is waited for (as long as --resolve-timeout-secs); a refusal ends the start at once.
async fn credentials(
    args: &RunArgs,
    box_id: &str,
) -> Result<Option<Arc<hive_box::credentials::Credentials>>, MainError> {
    use hive_box::credentials::Credentials;
    let urls = hive_box::agent::control_plane_urls(&args.control_plane);
    if urls.is_empty() {
        return Err(MainError::Missing("--control-plane (HIVE_CONTROL_PLANE)"));
    }
    // Any control plane of the hive can take the join: try them in turn.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (urls, next) = (&urls, &next);
    let within = Duration::from_secs(args.resolve_timeout_secs);
    let joined = retry(within, "cannot join yet", || async move {
        let attempt = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match Credentials::ensure(
            urls[attempt % urls.len()],
            box_id,
            &args.data_dir,
            args.join_token.as_deref(),
        )
        .await
        {
            Err(e) if e.is_transient() => ControlFlow::Continue(e),
            other => ControlFlow::Break(other),
        }
    })
    .await;
    Ok(joined?)
}

/// The box id and every host-global name of this box, from the flags or derived from the id,
/// claimed against the other boxes on this host (held until the returned claim is dropped).
fn claim_names(args: &RunArgs, microvm: bool) -> Result<Claim, MainError> {
    use hive_box::claim::{Pick, Wanted};
    use hive_box::identity;
    let data_dir = std::fs::canonicalize(&args.data_dir)
        .map_err(|e| MainError::DataDir(args.data_dir.clone(), e))?;
    let box_id = identity::box_id(args.box_id.as_deref(), &data_dir)?;
    let nft_table = match &args.nft_table {
        Some(t) => t.clone(),
        None => identity::derived_table(&box_id),
    };
    identity::validate_table(&nft_table)?;
    let cgroup_parent = match &args.cgroup_parent {
        Some(c) => c.clone(),
        None => identity::derived_cgroup_parent(&box_id),
    };
    identity::validate_cgroup_parent(&cgroup_parent)?;
    let cell_subnet = match args.cell_subnet {
        Some(s) => Pick::Given(s),
        None => Pick::Derived(identity::subnet_candidates(&box_id).collect()),
    };
    let vmm_uid_base = Some(match (microvm, args.vmm_uid_base, args.sandbox_uid_base) {
        (true, Some(base), _) | (false, _, Some(base)) => Pick::Given(base),
        (true, None, _) => Pick::Derived(
            identity::vmm_uid_candidates(&box_id, hive_box::backend::microvm::DEFAULT_VMM_UID_BASE)
                .collect(),
        ),
        (false, _, None) => Pick::Derived(identity::sandbox_uid_candidates(&box_id).collect()),
    });
    let uids_per_cell = if microvm {
        1
    } else {
        hive_jail::userns::CELL_IDS
    };
    let want = Wanted {
        box_id,
        data_dir,
        nft_table,
        cgroup_parent,
        cell_subnet,
        avoid: identity::host_routes(),
        vmm_uid_base,
        uids_per_cell,
    };
    let claim = hive_box::claim::claim(&args.claims_dir, &want)?;
    let r = &claim.record;
    tracing::info!(box_id = %r.box_id, nft_table = %r.nft_table, cgroup_parent = %r.cgroup_parent, cell_subnet = %r.cell_subnet, vmm_uids = ?r.vmm_uids, "claimed this box's names on the host");
    Ok(claim)
}

/// SIGTERM and SIGINT, installed before any set-up so neither kills the daemon half-way.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

/// Everything after the backend is made: reaper, pool, agent, health endpoint, signals, drain.
// Each is one piece of the start-up made above; bundling them would only rename them.
#[allow(clippy::too_many_arguments)]
async fn serve<B: CellBackend>(
    args: RunArgs,
    classes: Vec<hive_box::pool::ClassConfig>,
    backend: Arc<B>,
    cgroups: Hierarchy,
    net: BoxNet,
    claim: Claim,
    credentials: Option<Arc<hive_box::credentials::Credentials>>,
    signals: Signals,
) -> Result<(), MainError> {
    let box_id = claim.record.box_id.clone();
    let cgroup_parent = claim.record.cgroup_parent.clone();
    let Signals {
        term: mut sigterm,
        int: mut sigint,
    } = signals;

    // Only after the backend accepted its configuration, so a bad flag leaves no table behind.
    net.setup()?;
    let lost = hive_box::reaper::reap(backend.as_ref()).await;
    let pool = Pool::with_health_timeout(
        Arc::clone(&backend),
        classes,
        claim.cell_subnet().slots(),
        Duration::from_secs(args.ready_timeout_secs),
        Duration::from_secs(args.health_timeout_secs.max(1)),
    );
    let agent = Agent::new(
        AgentConfig {
            control_plane: args.control_plane.clone(),
            credentials,
            box_id: box_id.clone(),
            hostname: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
            lease: Duration::from_secs(args.lease_secs),
            heartbeat: Duration::from_secs(2),
            room_heartbeat_gap: (args.room_heartbeat_gap_ms > 0)
                .then(|| Duration::from_millis(args.room_heartbeat_gap_ms)),
            cancel_grace: Duration::from_secs(10),
            cell_call_timeout: Duration::from_secs(args.cell_call_timeout_secs.max(1)),
        },
        Arc::clone(&pool),
    );
    for b in &lost {
        if b.destroyed {
            tracing::warn!(build = %b.build_id, cell = %b.cell_id, "attempt lost with a leftover cell (destroyed); the control plane runs it again");
            agent.report_lost(
                &b.build_id,
                &b.lease_id,
                "box restarted while it ran and destroyed its cell before the outcome was known",
            );
        } else {
            // Its cell may still be running the build: it must not run a second time.
            tracing::error!(build = %b.build_id, cell = %b.cell_id, "leftover cell could not be destroyed; reporting its build failed");
            agent.report_failed(
                &b.build_id,
                &b.lease_id,
                "box restarted and could not destroy the cell that ran this build",
            );
        }
    }
    pool.top_up();

    let report = {
        let pool = Arc::clone(&pool);
        let agent = Arc::clone(&agent);
        let box_id = box_id.clone();
        let names = serde_json::json!({
            "nft_table": claim.record.nft_table,
            "cgroup_parent": claim.record.cgroup_parent,
            "cell_subnet": claim.record.cell_subnet,
        });
        let backend_name = backend.name();
        let unhealthy_after = args.unhealthy_boot_failures.max(1);
        Arc::new(move || {
            let pools: Vec<serde_json::Value> = pool
                .states()
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "size_class": p.size_class, "warm": p.warm, "booting": p.booting,
                        "busy": p.busy, "target": p.target, "capacity": p.capacity,
                    })
                })
                .collect();
            let (n, median, p99) = agent.dispatch_stats();
            // A box that cannot boot cells is of no use, whatever else works.
            let failures = pool.boot_failures();
            let unhealthy = (failures.in_a_row >= unhealthy_after).then(|| {
                format!(
                    "{} cell boots in a row failed; last: {}",
                    failures.in_a_row,
                    failures.last.as_deref().unwrap_or("?")
                )
            });
            serde_json::json!({
                "ok": unhealthy.is_none(),
                "unhealthy": unhealthy,
                "boot_failures_in_a_row": failures.in_a_row,
                "names": names,
                "dispatch_ms": { "n": n, "median": median, "p99": p99 },
                "box_id": box_id,
                "backend": backend_name,
                "control_plane_connected": agent.is_connected(),
                "control_plane": agent.current_control_plane(),
                "running_builds": agent.running_builds(),
                "unacked_messages": agent.unacked(),
                "outbox": agent.outbox_state(),
                "pools": pools,
            })
        }) as hive_box::health::Report
    };
    let metrics = {
        let m = Arc::clone(agent.metrics());
        Arc::new(move || m.encode()) as hive_box::health::MetricsText
    };
    let (health_addr, health_task) = hive_box::health::serve(args.health_addr, report, metrics)
        .await
        .map_err(|e| MainError::Health(args.health_addr, e))?;
    if let Some(path) = &args.ready_file {
        let body = serde_json::json!({ "health": health_addr.to_string() }).to_string();
        std::fs::write(path, body).map_err(|e| MainError::ReadyFile(path.clone(), e))?;
    }
    tracing::info!(box_id = %box_id, health = %health_addr, control_plane = %args.control_plane, "hive-box up");

    let checker = {
        let pool = Arc::clone(&pool);
        let every = Duration::from_secs(args.health_check_secs.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                pool.check_health().await;
            }
        })
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut agent_task = tokio::spawn(Arc::clone(&agent).run(stop_rx));
    let mut agent_done = false;
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: draining"),
        _ = sigint.recv() => tracing::info!("SIGINT: draining"),
        _ = &mut agent_task => {
            agent_done = true;
            tracing::info!("control plane drained this box");
        }
    }
    checker.abort();
    agent
        .drain(Duration::from_secs(args.shutdown_grace_secs))
        .await;
    let _ = stop_tx.send(true);
    if !agent_done {
        let _ = tokio::time::timeout(Duration::from_secs(5), agent_task).await;
    }
    pool.shutdown().await;
    // Anything a build task could not release (it was cut short) is reaped the same way.
    let _ = hive_box::reaper::reap(backend.as_ref()).await;
    // Only this box's: the claim kept every other box off these names.
    cgroups.remove_parent(&cgroup_parent);
    if let Err(e) = net.teardown() {
        tracing::warn!(error = %error_chain(&e), "remove firewall table");
    }
    health_task.abort();
    drop(claim);
    tracing::info!("hive-box stopped");
    Ok(())
}
