//! `hive-cell`: the cell daemon. See `hive-cell --help`.

use clap::{Parser, Subcommand};
use hive_cell::agent::Agent;
use hive_cell::config::{Config, InitMode, KernelCmdline, ListenAddr, NetMode};
use hive_cell::{container, init, listen, reaper::Reaper};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

const ABOUT: &str = "Hive cell daemon: PID 1 of a build cell, serving the CellAgent gRPC API";
const LONG_ABOUT: &str = "\
Hive cell daemon: PID 1 of a build cell (a microVM, or a namespace sandbox on hosts where KVM \
cannot boot Linux). It serves the hive.v1.CellAgent gRPC API to the box daemon and runs the \
cell's one build in a container: its own mount, pid, uts, ipc and net namespaces over a \
copy-on-write overlay of the read-only build image, as uid/gid 1000 with no capabilities. \
Phase 0 clones the repository into /work/src; then each step runs as `/bin/sh -c STEP`, its \
output streamed as sequenced events.

As PID 1 (or with --init yes) it also mounts /proc /sys /dev /tmp /run, sets the hostname to \
the cell id, reaps orphans, and powers off on SIGTERM or the Shutdown rpc. In a VM, \
hive.listen= and hive.cell_id= on the kernel command line are used when no flag/env is given.

Use --init no only inside a private mount+pid namespace (tests): it still mounts a tmpfs on \
the work dir unless --work-tmpfs false.";

#[derive(Debug, Parser)]
#[command(name = "hive-cell", version, about = ABOUT, long_about = LONG_ABOUT)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Where the agent listens: unix:/ABS/PATH, vsock:PORT or tcp:ADDR:PORT
    /// [default: kernel cmdline hive.listen=, else unix:/run/hive/agent.sock]
    #[arg(long, env = "HIVE_CELL_LISTEN")]
    listen: Option<String>,
    /// This cell's id (also its hostname) [default: kernel cmdline hive.cell_id=]
    #[arg(long, env = "HIVE_CELL_ID")]
    cell_id: Option<String>,
    /// Read-only build image directory, the lower layer of the build container
    #[arg(long, env = "HIVE_BUILD_IMAGE", default_value = "/images/build")]
    build_image: PathBuf,
    /// Directory for the container's writable layer (a tmpfs is mounted there)
    #[arg(long, env = "HIVE_WORK_DIR", default_value = "/var/lib/hive")]
    work_dir: PathBuf,
    /// Do the PID 1 duties: auto (when PID 1), yes, no
    #[arg(long, env = "HIVE_CELL_INIT", default_value = "auto")]
    init: InitMode,
    /// Size cap of the work dir's tmpfs, where all a build writes lives (0: no cap beyond the
    /// cell's memory limit)
    #[arg(long, env = "HIVE_CELL_WORK_SIZE_MIB", default_value_t = 0)]
    work_size_mib: u64,
    /// Mount a tmpfs on the work dir at start (always done as PID 1)
    #[arg(long, env = "HIVE_CELL_WORK_TMPFS", default_value_t = true, action = clap::ArgAction::Set)]
    work_tmpfs: bool,
    /// Container network: isolated (own netns, veth + NAT in the cell) or cell (share the cell's)
    #[arg(long, env = "HIVE_CELL_CONTAINER_NET", default_value = "isolated")]
    container_net: NetMode,
    /// Grace between SIGTERM and SIGKILL when a step is cancelled or times out
    #[arg(long, env = "HIVE_CELL_KILL_GRACE_MS", default_value_t = 5000)]
    kill_grace_ms: u64,
    /// Build timeout used when RunBuild gives 0
    #[arg(long, env = "HIVE_CELL_DEFAULT_TIMEOUT_SECS", default_value_t = 3600)]
    default_timeout_secs: u32,
    /// Most build output kept in memory for replay, MiB
    #[arg(long, env = "HIVE_CELL_MAX_LOG_MIB", default_value_t = 256)]
    max_log_mib: u64,
    /// uid and gid the build runs as
    #[arg(long, env = "HIVE_CELL_BUILD_UID", default_value_t = 1000)]
    build_uid: u32,
    #[arg(long, env = "HIVE_CELL_BUILD_GID", default_value_t = 1000)]
    build_gid: u32,
    /// Set the build container up at start so RunBuild only execs the first command
    #[arg(long, env = "HIVE_CELL_PREWARM", default_value_t = true, action = clap::ArgAction::Set)]
    prewarm: bool,
    /// With the build container set up ahead (prewarm), also make its private-network
    /// interface `hwg0` then, with a key nobody learns, no address and no peer; PrepareTunnel
    /// gives it the build's own key, and a build without a tunnel gets it removed
    #[arg(long, env = "HIVE_CELL_TUNNEL_READY", default_value_t = false, action = clap::ArgAction::Set)]
    tunnel_ready: bool,
    /// The daemon's own log lines per second (build output never goes there)
    #[arg(long, env = "HIVE_CELL_LOG_RATE", default_value_t = 50)]
    log_rate: u32,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Ask a cell daemon for Health (waiting until it is ready); optionally run a one-step
    /// build and print its log (exit 0 only when ready and the build succeeded).
    Probe(ProbeArgs),
    /// Internal: PID 1 of a build container.
    #[command(name = "__container-init", hide = true)]
    ContainerInit(container::InitArgs),
    /// Internal: run a command inside the build container.
    #[command(name = "__container-exec", hide = true)]
    ContainerExec(container::ExecArgs),
}

#[derive(Debug, clap::Args)]
struct ProbeArgs {
    /// unix:/ABS/PATH or tcp:HOST:PORT
    #[arg(long, env = "HIVE_CELL_CONNECT")]
    connect: String,
    /// Run this one step as a build (after Health)
    #[arg(long)]
    run_step: Option<String>,
    /// Repository to clone first (empty: start in an empty /work/src)
    #[arg(long, default_value = "")]
    repo: String,
    /// Build timeout for --run-step
    #[arg(long, default_value_t = 300)]
    timeout_secs: u32,
    /// How long to wait for Health to say ready (exit 1 if it never does)
    #[arg(long, default_value_t = 30)]
    wait_ready_secs: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        // The helpers run single-threaded, before any runtime exists.
        Some(Cmd::ContainerInit(a)) => return exit(container::init_main(a)),
        Some(Cmd::ContainerExec(a)) => return exit(container::exec_main(a)),
        Some(Cmd::Probe(a)) => return probe(a),
        None => {}
    }
    let rate = cli.run.log_rate;
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HIVE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(hive_cell::ratelimit::LimitedStderr::new(
            rate,
            rate.saturating_mul(4),
        ))
        .init();
    let is_init = cli.run.init.resolve();
    match daemon(cli.run, is_init) {
        Ok(()) => {
            if is_init {
                init::power_off();
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e:#}");
            if is_init {
                // PID 1 must not just exit: in a VM that is a kernel panic.
                init::power_off();
            }
            ExitCode::FAILURE
        }
    }
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn resolve(args: RunArgs, is_init: bool) -> anyhow::Result<Config> {
    let cmdline = if is_init {
        KernelCmdline::read(std::path::Path::new("/proc/cmdline"))
    } else {
        KernelCmdline::default()
    };
    let listen: ListenAddr = args
        .listen
        .or(cmdline.listen)
        .unwrap_or_else(|| "unix:/run/hive/agent.sock".to_string())
        .parse()?;
    let cfg = Config {
        cell_id: args.cell_id.or(cmdline.cell_id).unwrap_or_default(),
        listen,
        build_image: args.build_image,
        work_dir: args.work_dir,
        init: is_init,
        work_tmpfs: args.work_tmpfs || is_init,
        container_net: args.container_net,
        kill_grace_ms: args.kill_grace_ms,
        default_timeout_secs: args.default_timeout_secs,
        max_log_bytes: args.max_log_mib.saturating_mul(1 << 20),
        build_uid: args.build_uid,
        build_gid: args.build_gid,
        prewarm: args.prewarm,
        tunnel_ready: args.tunnel_ready && args.prewarm,
    };
    if args.tunnel_ready && !args.prewarm {
        tracing::warn!(
            "--tunnel-ready does nothing with --prewarm false (no container is made ahead)"
        );
    }
    cfg.validate()?;
    Ok(cfg)
}

fn daemon(args: RunArgs, is_init: bool) -> anyhow::Result<()> {
    let mut build_disk = None;
    let mut boot_timer = false;
    if is_init {
        init::mount_proc()?;
        init::default_path();
        let cmdline = KernelCmdline::read(std::path::Path::new("/proc/cmdline"));
        build_disk = cmdline.build_disk;
        boot_timer = cmdline.boot_timer;
    }
    let work_size_mib = args.work_size_mib;
    let cfg = resolve(args, is_init)?;
    if is_init {
        init::setup(&cfg.cell_id)?;
        if boot_timer {
            init::boot_mark(init::BOOT_MARK_INIT);
        }
        if let Some(dev) = build_disk {
            init::mount_build_disk(&dev, &cfg.build_image)?;
        }
    }
    if cfg.work_tmpfs {
        init::mount_work_tmpfs(&cfg.work_dir, work_size_mib)?;
    }
    let cfg = Arc::new(cfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve(cfg, boot_timer))
}

async fn serve(cfg: Arc<Config>, boot_timer: bool) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let reaper = Reaper::start()?;
    let prepared = cfg
        .prewarm
        .then(|| hive_cell::build::prepare(&cfg, reaper.clone()));
    let agent = Agent::new(cfg.clone(), reaper, prepared);
    if cfg.tunnel_ready {
        agent.make_standby_tunnel();
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut shutdown_rpc = agent.shutdown_requested();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let agent = agent.clone();
        let cfg = cfg.clone();
        tokio::spawn(async move {
            listen::serve(
                &cfg.listen,
                agent,
                || {
                    if boot_timer {
                        init::boot_mark(init::BOOT_MARK_READY);
                    }
                    tracing::info!(
                        cell = %cfg.cell_id,
                        listen = %cfg.listen,
                        init = cfg.init,
                        image = %cfg.build_image.display(),
                        "cell daemon ready"
                    )
                },
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
        })
    };
    tokio::pin!(server);
    let why = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = shutdown_rpc.wait_for(|v| *v) => "Shutdown rpc",
        r = &mut server => {
            r??;
            return Ok(());
        }
    };
    tracing::info!(reason = why, "shutting down: cancelling the build");
    let grace = Duration::from_millis(cfg.kill_grace_ms) + Duration::from_secs(5);
    agent
        .stop_build(&format!("cell shut down ({why})"), grace)
        .await;
    // Let the Shutdown reply and the final events reach the box before the listener closes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(2), &mut server).await;
    Ok(())
}

fn probe(a: ProbeArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hive-cell probe: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout();
    let r = rt.block_on(hive_cell::client::probe(
        &a.connect,
        a.run_step.as_deref(),
        &a.repo,
        a.timeout_secs,
        Duration::from_secs(a.wait_ready_secs),
        &mut out,
    ));
    match r {
        Ok(p) => match p.state {
            None => ExitCode::SUCCESS,
            Some(hive_proto::v1::BuildState::Succeeded) => ExitCode::SUCCESS,
            Some(_) => ExitCode::FAILURE,
        },
        Err(e) => {
            eprintln!("hive-cell probe: {}", hive_sys::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
