//! `hive-control-plane`: the Hive control plane server.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use hive_control_plane::placement::Policy;
use hive_control_plane::server::{self, Config};
use hive_control_plane::sizeclass::SizeClasses;
use tracing_subscriber::EnvFilter;

/// The Hive control plane.
///
/// Turns GitHub-style push webhooks into builds, keeps them in a database (a SQLite file by
/// default, nothing to set up; or PostgreSQL), places them on box daemons that connect over gRPC,
/// and serves the operator API that `hivectl` uses.
///
/// HTTP: POST /webhooks/github, GET /healthz, GET /metrics (Prometheus/OpenMetrics text).
/// gRPC: hive.v1.ControlPlane (operators, with API tokens), plus grpc.health.v1.Health and
/// server reflection. Both are plaintext on loopback (the log says so) and TLS anywhere else
/// (--tls-cert/--tls-key, or a certificate from the hive's CA that clients pin).
/// Agent listener (--box-addr, TLS): hive.v1.BoxAgent and hive.v1.Connector (connectors, with
/// their tokens; `hivectl connector add` prints the --ca-sha256 they pin). Each box joins once with a token from
/// `hivectl box join-token` and is then known by its client certificate, signed by the CA this
/// control plane makes on its first start in <data-dir>/pki/.
///
/// Logs go to stderr; set the level with RUST_LOG or HIVE_LOG (e.g. `info`, `hive_control_plane=debug`).
/// SIGTERM or SIGINT shuts down gracefully: stop accepting, end streams, finish in-flight
/// requests, save each connected box's session (acked seq, no owner), close the database.
#[derive(Debug, Parser)]
// args_override_self: a later `--grpc-addr` replaces an earlier one (a wrapper's defaults can be
// overridden by appending), instead of being an error.
#[command(
    name = "hive-control-plane",
    version,
    verbatim_doc_comment,
    args_override_self = true
)]
struct Args {
    /// Address for the HTTP listener (webhooks, health, metrics).
    #[arg(long, env = "HIVE_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,

    /// Address for the gRPC listener (the ControlPlane service: hivectl, internal services).
    #[arg(long, env = "HIVE_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    grpc_addr: SocketAddr,

    /// Address for the agent listener (BoxAgent and Connector over TLS; boxes and connectors
    /// dial https://HOST:PORT). Use 0.0.0.0:50052 when they run on other machines.
    #[arg(long, env = "HIVE_BOX_ADDR", default_value = "127.0.0.1:50052")]
    box_addr: SocketAddr,

    /// A DNS name or IP address boxes dial the box listener by, for its certificate (besides
    /// localhost, the loopback addresses, this host's name and a specific --box-addr IP).
    /// Repeat, or comma-separate in the variable.
    #[arg(long = "tls-san", env = "HIVE_TLS_SANS", value_delimiter = ',')]
    tls_sans: Vec<String>,

    /// PEM certificate chain for the gRPC and HTTP listeners (with --tls-key); without it the
    /// hive's CA signs one for the --tls-san names at every start, and clients pin the CA
    /// (`hivectl --ca-sha256`). Off loopback those listeners always serve TLS.
    #[arg(long, env = "HIVE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "HIVE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Serve TLS on the gRPC and HTTP listeners on loopback too (by default a loopback
    /// listener is plaintext, and the log says so; any other address always gets TLS).
    #[arg(long, env = "HIVE_TLS_ON_LOOPBACK")]
    tls_on_loopback: bool,

    /// Days a box certificate is valid; boxes renew theirs when a third is left.
    #[arg(long, env = "HIVE_BOX_CERT_DAYS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..=3650))]
    box_cert_days: u32,

    /// File with the 32-byte key (base64) project secrets are sealed with; default
    /// <data-dir>/secrets.key, made on first start (0600). Keep it apart from database backups.
    #[arg(long, env = "HIVE_SECRETS_KEY_FILE")]
    secrets_key_file: Option<PathBuf>,

    /// Also accept boxes WITHOUT certificates, and connectors without TLS, on the gRPC listener
    /// (which must then be on loopback). For tests and development only: any local process
    /// could pose as a box.
    #[arg(long, env = "HIVE_INSECURE_BOXES")]
    insecure_boxes: bool,

    /// Directory for the control plane's files (the default SQLite database lives here).
    #[arg(long, env = "HIVE_DATA_DIR", default_value = "./hive-data")]
    data_dir: PathBuf,

    /// Database URL: sqlite://PATH (created if missing) or postgres://USER:PASS@HOST/DB.
    /// Default: sqlite://<data-dir>/hive.db
    #[arg(long, env = "HIVE_DB")]
    db: Option<String>,

    /// Seconds a placement waits for the box to confirm, and a box may stay silent, before
    /// its build is re-queued.
    #[arg(long, env = "HIVE_LEASE_SECS", default_value_t = 30)]
    lease_secs: u64,

    /// How often box daemons heartbeat, in milliseconds (a box silent for 3 intervals is offline).
    #[arg(long, env = "HIVE_HEARTBEAT_INTERVAL_MS", default_value_t = 2000)]
    heartbeat_interval_ms: u64,

    /// Control messages queued for one box before it counts as not reading its stream: its
    /// session ends (it reconnects) instead of making the scheduler wait.
    #[arg(long, env = "HIVE_BOX_QUEUE", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    box_queue: u32,

    /// Seconds an HTTP request (webhook, metrics, health) may take, body included; a slower
    /// sender gets 408.
    #[arg(long, env = "HIVE_HTTP_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    http_timeout_secs: u64,

    /// HTTP requests handled at once; more wait for a turn (within the timeout).
    #[arg(long, env = "HIVE_HTTP_MAX_CONCURRENCY", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    http_max_concurrency: u32,

    /// Webhook deliveries waiting for their group commit (one transaction, one fsync for all
    /// that wait); past it a webhook is answered 503 with Retry-After.
    #[arg(long, env = "HIVE_WEBHOOK_QUEUE", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    webhook_queue: u32,

    /// Microseconds a webhook group commit waits for more deliveries after the first (0: it
    /// takes what queued while the previous group committed and waits for nothing). A window
    /// makes groups larger and every delivery wait for it: on this project's measurements
    /// (`hive-bench webhooks`) 0 was fastest on both stores.
    #[arg(long, env = "HIVE_WEBHOOK_COMMIT_WINDOW_US", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    webhook_commit_window_us: u64,

    /// gRPC streams (calls) one connection may have open at once.
    #[arg(long, env = "HIVE_GRPC_STREAMS_PER_CONNECTION", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    grpc_streams_per_connection: u32,

    /// MiB of log kept per build; past it one line says the log was cut and the rest of the
    /// output is dropped.
    #[arg(long, env = "HIVE_LOG_CAP_MIB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    log_cap_mib: u64,

    /// MiB of artefacts kept per build (what `hive.toml` names under `artifacts`); 0 takes none.
    #[arg(long, env = "HIVE_ARTIFACT_CAP_MIB", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(0..=1_048_576))]
    artifact_cap_mib: u64,

    /// Attempts a build gets before it fails: a box's rejection, a lost box and an expired
    /// lease each end an attempt and re-queue the build, up to this many.
    #[arg(long, env = "HIVE_MAX_ATTEMPTS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    max_attempts: u32,

    /// Days to keep ended builds (with their logs) and webhook deliveries; 0 keeps them forever.
    /// Builds that have not ended are never deleted.
    #[arg(long, env = "HIVE_RETENTION_DAYS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(0..=36_500))]
    retention_days: u32,

    /// Where people reach this control plane's HTTP listener (e.g. https://hive.example.com):
    /// commit statuses sent to the forges link to <public-url>/ui/builds/<id>. Without it
    /// statuses carry no link.
    #[arg(long, env = "HIVE_PUBLIC_URL")]
    public_url: Option<String>,

    /// PEM file of CA certificates to trust for forge APIs (commit statuses) besides Mozilla's
    /// roots: GitHub Enterprise, a GitLab or Gitea behind a private CA.
    #[arg(long, env = "HIVE_FORGE_CA_FILE")]
    forge_ca_file: Option<std::path::PathBuf>,

    /// JSON file adding or overriding size classes:
    /// {"size_classes": [{"name": "xl", "vcpus": 16, "memory_mib": 32768, "disk_mib": 102400}]}
    #[arg(long, env = "HIVE_SIZE_CLASSES")]
    size_classes: Option<PathBuf>,

    /// How to pick among boxes that fit: spread (most free first) or binpack (fullest first).
    #[arg(long, env = "HIVE_PLACEMENT", value_enum, default_value = "spread")]
    placement: Policy,

    /// Scheduler pass interval in milliseconds when nothing else wakes it.
    #[arg(long, env = "HIVE_SCHEDULER_TICK_MS", default_value_t = 500)]
    scheduler_tick_ms: u64,

    /// This hive's name: every control plane of one database gives the same (the first to
    /// start records it; another is refused). Projects name the hive that builds them.
    #[arg(long, env = "HIVE_NAME", default_value = server::DEFAULT_HIVE_NAME)]
    hive_name: String,

    /// This hive's region (shown in /healthz and /metrics), e.g. eu-west.
    #[arg(long, env = "HIVE_REGION", default_value = "")]
    region: String,

    /// Another hive pushes may be forwarded to, as NAME=URL of its HTTP (webhook) listener,
    /// e.g. eu-west=https://hive.eu.example:8443; repeat or comma-separate. A push for a
    /// project added with --hive NAME is checked here and forwarded there.
    #[arg(long = "peer-hive", env = "HIVE_PEER_HIVES", value_delimiter = ',')]
    peer_hives: Vec<String>,

    /// PEM certificates to trust for https:// peer hives (default: the public web roots).
    #[arg(long, env = "HIVE_PEER_CA_FILE")]
    peer_ca_file: Option<PathBuf>,

    /// When the listeners are bound, write {"http":"ADDR","grpc":"ADDR","box":"ADDR",
    /// "ca_sha256":"HEX","grpc_tls":BOOL,"http_tls":BOOL} to this file.
    #[arg(long, env = "HIVE_READY_FILE")]
    ready_file: Option<PathBuf>,

    /// Log format on stderr: text, or json (one object per line, for log shippers).
    #[arg(long, env = "HIVE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_tracing(format: LogFormat) {
    let json = format == LogFormat::Json;
    let filter = std::env::var("HIVE_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    use anyhow::Context;
    let size_classes = match &args.size_classes {
        Some(path) => SizeClasses::load(path)?,
        None => SizeClasses::builtin(),
    };
    let config = Config {
        http_addr: args.http_addr,
        grpc_addr: args.grpc_addr,
        box_addr: args.box_addr,
        tls_sans: args.tls_sans.clone(),
        tls_cert: args.tls_cert.clone(),
        tls_key: args.tls_key.clone(),
        tls_on_loopback: args.tls_on_loopback,
        box_cert_validity: Duration::from_secs(u64::from(args.box_cert_days) * 86_400),
        insecure_boxes: args.insecure_boxes,
        secrets_key_file: args.secrets_key_file.clone(),
        data_dir: args.data_dir.clone(),
        db: args.db.clone(),
        lease: Duration::from_secs(args.lease_secs),
        heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms),
        size_classes,
        placement: args.placement,
        tick: Duration::from_millis(args.scheduler_tick_ms),
        box_queue: args.box_queue as usize,
        http_timeout: Duration::from_secs(args.http_timeout_secs),
        http_concurrency: args.http_max_concurrency as usize,
        webhook_queue: args.webhook_queue as usize,
        webhook_commit_window: Duration::from_micros(args.webhook_commit_window_us),
        grpc_streams_per_connection: args.grpc_streams_per_connection,
        log_cap: args.log_cap_mib * 1024 * 1024,
        artifact_cap: args.artifact_cap_mib * 1024 * 1024,
        max_attempts: args.max_attempts,
        retention: (args.retention_days > 0)
            .then(|| Duration::from_secs(u64::from(args.retention_days) * 86_400)),
        hive_name: args.hive_name.clone(),
        region: args.region.clone(),
        peer_hives: args.peer_hives.clone(),
        peer_ca_file: args.peer_ca_file.clone(),
        public_url: args.public_url.clone(),
        forge: hive_control_plane::forge::Settings {
            ca_file: args.forge_ca_file.clone(),
            ..hive_control_plane::forge::Settings::default()
        },
    };
    let handle = server::start(config).await?;
    if let Some(path) = &args.ready_file {
        let ready = serde_json::json!({
            "http": handle.http_addr.to_string(),
            "grpc": handle.grpc_addr.to_string(),
            "box": handle.box_addr.to_string(),
            "ca_sha256": handle.ca_sha256(),
            "grpc_tls": handle.grpc_tls,
            "http_tls": handle.http_tls,
        });
        // Write then rename, so a reader never sees half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, ready.to_string())
            .with_context(|| format!("write ready file {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("write ready file {}", path.display()))?;
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        r = tokio::signal::ctrl_c() => {
            r.context("wait for SIGINT")?;
            tracing::info!("SIGINT received");
        }
    }
    handle.shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    init_tracing(args.log_format);
    if let Err(e) = run(args).await {
        // The whole chain, once: our error types already spell out their cause, so skip a
        // link the one before it already said.
        let mut chain: Vec<String> = Vec::new();
        for link in e.chain().map(|c| c.to_string()) {
            if !chain.last().is_some_and(|prev| prev.contains(&link)) {
                chain.push(link);
            }
        }
        // Once, as a plain line: it reaches stderr whatever RUST_LOG filters out.
        eprintln!("hive-control-plane: {}", chain.join(": "));
        std::process::exit(1);
    }
}
