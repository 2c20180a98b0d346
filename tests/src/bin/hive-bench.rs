//! hive-bench: measures the real control plane binary.
//!
//! `webhooks`: signed push webhooks accepted per second, each answered 202 only after the
//! delivery and its build are committed, on SQLite and on PostgreSQL; N keep-alive clients over
//! loopback, distinct delivery ids; total, rate, p50/p99/max latency; and, as the baseline on the
//! same database in the same run, a plain INSERT-per-request HTTP server (its own 2-thread
//! runtime, the control plane's pool size, one autocommit INSERT of the body per request) with
//! the same clients and payloads. The ratio is webhooks/s over that server's requests/s; the
//! same INSERT loop run in the benchmark itself, without HTTP, is printed too (its ratio shows
//! what the HTTP hop costs, which the webhook path pays and a bare loop does not).
//!
//! `schedule`: scheduler placements per second: submit B builds (10,000), then connect M fake
//! boxes (100) that accept every assignment; time from the first to the last assignment.
//!
//! `cluster` (PostgreSQL): the same two measurements with 1 and with 3 control planes on one
//! database (webhooks spread round-robin over the control planes, boxes spread over them), then
//! the failover time with 3: `kill -9` of the control plane holding a third of the boxes -> each
//! of those boxes registered on another -> a build submitted at the kill placed.
//!
//! Run: `cargo run --release -p hive-tests --bin hive-bench -- webhooks|schedule|cluster [flags]`.
//! The release control plane is built on first use. PostgreSQL needs `--pg-url` or
//! `HIVE_TEST_POSTGRES_URL` (a role with CREATEDB; a throw-away database is made and dropped).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use hive_proto::v1::control_plane_client::ControlPlaneClient;
use hive_proto::v1::{CreateProjectRequest, SubmitBuildRequest};
use hive_testkit::fakebox::{FakeBox, FakeBoxConfig};
use hive_tests::controlplane::{ControlPlane, ControlPlaneOptions, TestDb};
use hive_tests::github::{push_payload, WebhookClient};
use sqlx::ConnectOptions;

/// Benchmarks of the Hive control plane (real binary, real databases, loopback).
#[derive(Debug, Parser)]
#[command(
    name = "hive-bench",
    version,
    about = "Benchmarks of the real hive-control-plane: signed webhooks/s (durable) and scheduler \
             placements/s, on SQLite and PostgreSQL; the same with 1 and 3 control planes on one \
             PostgreSQL, and the failover time",
    after_help = "Default runs take under 2 minutes. The control plane binary of the same profile \
                  is built first (HIVE_TEST_NO_BUILD=1 skips that). Example:\n  \
                  cargo run --release -p hive-tests --bin hive-bench -- webhooks --clients 32"
)]
struct Cli {
    /// Admin URL of a PostgreSQL server (role with CREATEDB); without it PostgreSQL is skipped.
    #[arg(long, env = "HIVE_TEST_POSTGRES_URL", global = true)]
    pg_url: Option<String>,
    /// Which stores to measure.
    #[arg(long, value_enum, default_value = "both", global = true)]
    backend: Which,
    /// Heartbeat interval the control plane asks boxes for (ms).
    #[arg(long, default_value_t = 2000, global = true)]
    heartbeat_interval_ms: u64,
    /// RUST_LOG of the control plane under test.
    #[arg(long, default_value = "warn", global = true)]
    cp_log: String,
    #[command(subcommand)]
    command: Bench,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    Sqlite,
    Postgres,
    Both,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Signed webhooks accepted per second (durable), vs a plain INSERT-per-request server.
    Webhooks {
        /// Webhooks to send per backend.
        #[arg(long, default_value_t = 3000)]
        requests: usize,
        /// Concurrent clients (each its own keep-alive connection).
        #[arg(long, default_value_t = 16)]
        clients: usize,
    },
    /// Scheduler placements per second with many boxes and a deep queue.
    Schedule {
        /// Builds queued before the boxes connect.
        #[arg(long, default_value_t = 10_000)]
        builds: usize,
        /// Fake boxes.
        #[arg(long, default_value_t = 100)]
        boxes: usize,
        /// Concurrent submitters while queueing.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Turnover mode: each box has only this many warm cells and finishes every build right
        /// after accepting it (so placements wait for cells to free up). Default: every box has
        /// room for its whole share up front (pure placement rate).
        #[arg(long)]
        warm: Option<u32>,
        /// Instead of one size, the curve: 10 boxes / 1,000 builds, 100 / 10,000 and 1,000 /
        /// 100,000 (--boxes and --builds are ignored), then placements/s by size per store.
        #[arg(long)]
        curve: bool,
    },
    /// 1 vs 3 control planes on one PostgreSQL: webhooks/s, placements/s, failover time.
    Cluster {
        /// Webhooks per run.
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// Concurrent webhook clients.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Builds queued before the boxes connect.
        #[arg(long, default_value_t = 3000)]
        builds: usize,
        /// Fake boxes (spread over the control planes).
        #[arg(long, default_value_t = 30)]
        boxes: usize,
    },
    /// Exactly-once under faults (issue 11): webhooks and API submissions while the control
    /// plane, boxes and cells (and with --postgres the database server) are killed; ends with
    /// `chaos: kills=N builds=N lost=N duplicated=N overlapping=N orphans=N` (needs root and
    /// the build image; SQLite, or a PostgreSQL server of its own).
    Chaos {
        /// How long load and faults go on.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Seeds the fault schedule and the load's choices.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// New webhook deliveries per second.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// Copy the daemons' logs and the fault timeline here at the end.
        #[arg(long)]
        logs: Option<std::path::PathBuf>,
        /// Run the control plane on a PostgreSQL server of the run's own (initdb in a temp
        /// dir, a loopback port), and kill -9 that server too.
        #[arg(long)]
        postgres: bool,
    },
}

/// What can stop a benchmark.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error(transparent)]
    Harness(#[from] hive_tests::controlplane::HarnessError),
    #[error(transparent)]
    Db(#[from] hive_testkit::db::DbError),
    #[error("gRPC {what}: {source}")]
    Grpc {
        what: &'static str,
        #[source]
        source: tonic::Status,
    },
    #[error("connect gRPC: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error(transparent)]
    FakeBox(#[from] hive_testkit::fakebox::FakeBoxError),
    #[error(transparent)]
    Webhook(#[from] hive_tests::github::WebhookError),
    #[error("baseline database: {0}")]
    Baseline(#[from] sqlx::Error),
    #[error("baseline server: {0}")]
    BaselineServer(String),
    #[error("check failed: {0}")]
    Check(String),
    #[error("task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

const SECRET: &str = "bench-secret";
const REPO: &str = "http://198.18.0.2/bench.git";

struct Store {
    label: &'static str,
    pg: Option<TestDb>,
}

fn stores(cli: &Cli) -> Vec<&'static str> {
    let mut v = Vec::new();
    if matches!(cli.backend, Which::Sqlite | Which::Both) {
        v.push("sqlite");
    }
    if matches!(cli.backend, Which::Postgres | Which::Both) {
        if cli.pg_url.is_some() {
            v.push("postgres");
        } else {
            eprintln!("SKIPPED postgres: set --pg-url or HIVE_TEST_POSTGRES_URL");
        }
    }
    v
}

async fn start(cli: &Cli, label: &'static str) -> Result<(ControlPlane, Store), BenchError> {
    let pg = match (label, &cli.pg_url) {
        ("postgres", Some(url)) => Some(TestDb::postgres_from(url).await?),
        _ => None,
    };
    let opts = ControlPlaneOptions {
        db: pg.as_ref().map(|p| p.url.clone()),
        log_filter: cli.cp_log.clone(),
        heartbeat_interval_ms: cli.heartbeat_interval_ms,
        // The benchmark's boxes are FakeBoxes without certificates (loopback gRPC listener).
        extra_args: vec!["--insecure-boxes".into()],
        ..ControlPlaneOptions::default()
    };
    let cp = tokio::task::spawn_blocking(move || ControlPlane::start(opts)).await??;
    Ok((cp, Store { label, pg }))
}

async fn finish(mut cp: ControlPlane, store: Store) {
    if !cp.stop() {
        eprintln!(
            "warning: control plane did not exit cleanly; log:\n{}",
            cp.log()
        );
    }
    if let Some(pg) = store.pg {
        pg.drop_db().await;
    }
}

async fn create_project(cp: &ControlPlane) -> Result<(), BenchError> {
    let mut c = hive_tests::controlplane::api(&cp.grpc_url()).await?;
    c.create_project(CreateProjectRequest {
        name: "bench".into(),
        repo_url: REPO.into(),
        secret: SECRET.into(),
        steps: vec!["make".into()],
        ..Default::default()
    })
    .await
    .map_err(|source| BenchError::Grpc {
        what: "CreateProject",
        source,
    })?;
    Ok(())
}

struct Figures {
    total: usize,
    elapsed: Duration,
    lat: Vec<Duration>,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.total as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> Duration {
        if self.lat.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.lat.len() as f64 - 1.0) * p).round() as usize;
        self.lat[i.min(self.lat.len() - 1)]
    }
    fn line(&self, what: &str) -> String {
        format!(
            "{what:<34} {:>7} in {:>6.2}s = {:>8.0}/s   p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
            self.total,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.pct(0.50).as_secs_f64() * 1e3,
            self.pct(0.99).as_secs_f64() * 1e3,
            self.lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        )
    }
}

/// Runs `job(i)` for i in 0..total on `clients` concurrent tasks; times each call.
async fn drive<F, Fut>(total: usize, clients: usize, job: F) -> Result<Figures, BenchError>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), BenchError>> + Send,
{
    let job = Arc::new(job);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let job = job.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                job(i).await?;
                lat.push(t.elapsed());
            }
            Ok::<_, BenchError>(lat)
        }));
    }
    let mut lat = Vec::with_capacity(total);
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = t0.elapsed();
    lat.sort();
    Ok(Figures {
        total,
        elapsed,
        lat,
    })
}

async fn webhooks(cli: &Cli, requests: usize, clients: usize) -> Result<(), BenchError> {
    println!(
        "webhooks: {requests} signed push deliveries per store, {clients} concurrent keep-alive clients, loopback"
    );
    for label in stores(cli) {
        let (cp, store) = start(cli, label).await?;
        create_project(&cp).await?;
        let url = cp.webhook_url();
        let metrics_url = format!("http://{}/metrics", cp.http_addr);
        let client = WebhookClient::new();
        let metrics_client = client.clone();
        let body_len = push_payload(REPO, "refs/heads/main", &"a".repeat(40), false).len();
        // Warm-up (connections, caches), not counted.
        for i in 0..20 {
            let body = push_payload(REPO, "refs/heads/main", &format!("a{i:039}"), false);
            client
                .send_signed(&url, SECRET, "push", &format!("warm-{i}"), body)
                .await?;
        }
        let ids = Arc::new(std::sync::Mutex::new(HashSet::new()));
        let hooks = {
            let ids = ids.clone();
            drive(requests, clients, move |i| {
                let client = client.clone();
                let url = url.clone();
                let ids = ids.clone();
                async move {
                    let body = push_payload(REPO, "refs/heads/main", &format!("b{i:039x}"), false);
                    let a = client
                        .send_signed(&url, SECRET, "push", &format!("bench-{i}"), body)
                        .await?;
                    let id = a.json()["build_id"].as_str().map(str::to_string);
                    match (a.status, id) {
                        (202, Some(id)) => {
                            ids.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
                            Ok(())
                        }
                        (s, _) => Err(BenchError::Check(format!("delivery {i}: {s} {}", a.body))),
                    }
                }
            })
            .await?
        };
        let groups = commit_groups(&metrics_client, &metrics_url).await?;
        let distinct = ids.lock().unwrap_or_else(|e| e.into_inner()).len();
        if distinct != requests {
            return Err(BenchError::Check(format!(
                "{distinct} distinct builds for {requests} deliveries"
            )));
        }

        // Baseline: a plain server on the same database with the control plane's durability
        // and pool size, one INSERT (autocommit) of the request's body per request, driven by
        // the same clients over HTTP; then the same INSERT loop without HTTP.
        let base_db = match &store.pg {
            None => BaseDb::Sqlite(cp.data_dir.join("hive.db")),
            Some(pg) => BaseDb::Postgres(pg.url.clone()),
        };
        let server = BaselineServer::start(base_db.clone())?;
        let base = {
            let client = WebhookClient::new();
            let url = server.url.clone();
            drive(requests, clients, move |i| {
                let client = client.clone();
                let url = url.clone();
                async move {
                    let body = push_payload(REPO, "refs/heads/main", &format!("b{i:039x}"), false);
                    let a = client
                        .send_signed(&url, SECRET, "push", &format!("server-{i}"), body)
                        .await?;
                    match a.status {
                        202 => Ok(()),
                        s => Err(BenchError::Check(format!("baseline {i}: {s} {}", a.body))),
                    }
                }
            })
            .await?
        };
        server.stop();
        let payload = "x".repeat(body_len);
        let bare = {
            let pool = base_db.pool().await?;
            drive(requests, clients, move |i| {
                let pool = pool.clone();
                let payload = payload.clone();
                async move {
                    pool.insert(format!("bench-{i}"), payload).await?;
                    Ok(())
                }
            })
            .await?
        };
        println!("[{}]", store.label);
        println!("  {}", hooks.line("webhooks accepted (202, durable)"));
        println!("  {}", base.line("baseline: INSERT-per-request server"));
        println!("  {}", bare.line("bare INSERT loop (no HTTP)"));
        println!(
            "  ratio webhook/baseline: {:.2}  (webhook/bare loop {:.2}; {} B payloads, {} distinct builds made)",
            hooks.rate() / base.rate(),
            hooks.rate() / bare.rate(),
            body_len,
            distinct
        );
        println!("  {groups}");
        finish(cp, store).await;
    }
    Ok(())
}

/// The database of a baseline, with the control plane's settings for it.
#[derive(Clone)]
enum BaseDb {
    /// The control plane's SQLite file (WAL, synchronous FULL).
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL database URL.
    Postgres(String),
}

/// A baseline pool, the size of the control plane's (SQLite: 1, PostgreSQL: 16).
#[derive(Clone)]
enum BasePool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

const BASE_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS bench_baseline (id TEXT PRIMARY KEY, body TEXT NOT NULL)";
const BASE_INSERT: &str = "INSERT INTO bench_baseline (id, body) VALUES ($1, $2)";

impl BaseDb {
    /// A pool on the database, with the baseline table made.
    async fn pool(&self) -> Result<BasePool, BenchError> {
        Ok(match self {
            BaseDb::Sqlite(path) => {
                let opts = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(path)
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(5))
                    .disable_statement_logging();
                // One connection, like the control plane's SQLite pool: writes are serial anyway.
                let pool = sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(opts)
                    .await?;
                sqlx::query(BASE_TABLE).execute(&pool).await?;
                BasePool::Sqlite(pool)
            }
            BaseDb::Postgres(url) => {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(16)
                    .connect(url)
                    .await?;
                sqlx::query(BASE_TABLE).execute(&pool).await?;
                BasePool::Postgres(pool)
            }
        })
    }
}

impl BasePool {
    /// One autocommit INSERT.
    async fn insert(&self, id: String, body: String) -> Result<(), sqlx::Error> {
        match self {
            BasePool::Sqlite(p) => sqlx::query(BASE_INSERT)
                .bind(id)
                .bind(body)
                .execute(p)
                .await
                .map(drop),
            BasePool::Postgres(p) => sqlx::query(BASE_INSERT)
                .bind(id)
                .bind(body)
                .execute(p)
                .await
                .map(drop),
        }
    }
}

/// The plain server of the webhook baseline: POST /webhooks/github stores the body under the
/// delivery id with one INSERT and answers 202, on its own 2-thread runtime (as the control
/// plane runs on 2 cores here) so it does not share the clients' threads.
struct BaselineServer {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl BaselineServer {
    fn start(db: BaseDb) -> Result<BaselineServer, BenchError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let pool = match db.pool().await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("bind 127.0.0.1:0: {e}")));
                        return;
                    }
                };
                let _ = ready_tx.send(listener.local_addr().map_err(|e| e.to_string()));
                let app = axum::Router::new()
                    .route("/webhooks/github", axum::routing::post(baseline_request))
                    .with_state(pool);
                tokio::select! {
                    served = axum::serve(listener, app) => {
                        if let Err(e) = served {
                            eprintln!("baseline server: {e}");
                        }
                    }
                    _ = stopped => {}
                }
            });
        });
        let addr = ready_rx
            .recv()
            .map_err(|_| BenchError::BaselineServer("ended before it listened".into()))?
            .map_err(BenchError::BaselineServer)?;
        Ok(BaselineServer {
            url: format!("http://{addr}/webhooks/github"),
            stop,
            thread,
        })
    }

    /// Stops serving (open connections are dropped with the runtime).
    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

async fn baseline_request(
    axum::extract::State(pool): axum::extract::State<BasePool>,
    headers: axum::http::HeaderMap,
    body: bytes::Bytes,
) -> (axum::http::StatusCode, String) {
    let id = headers
        .get("x-github-delivery")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    match pool
        .insert(id, String::from_utf8_lossy(&body).into_owned())
        .await
    {
        Ok(()) => (axum::http::StatusCode::ACCEPTED, String::new()),
        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The webhook group commits so far, from the control plane's `/metrics`: transactions,
/// deliveries per transaction and time per transaction, on average.
async fn commit_groups(client: &WebhookClient, url: &str) -> Result<String, BenchError> {
    let text = client.get(url).await?.body;
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let groups = value("hive_webhook_commit_batch_size_count");
    let deliveries = value("hive_webhook_commit_batch_size_sum");
    let seconds = value("hive_webhook_commit_seconds_sum");
    if groups == 0.0 {
        return Ok("group commits: none reported in /metrics".to_string());
    }
    Ok(format!(
        "group commits: {groups:.0} transactions for {deliveries:.0} deliveries \
         ({:.1} per transaction, {:.2} ms each)",
        deliveries / groups,
        seconds / groups * 1e3
    ))
}

/// Submits `n` builds of the bench project through `cp`'s API, `clients` at a time.
async fn submit_builds(cp: &ControlPlane, n: usize, clients: usize) -> Result<Figures, BenchError> {
    let chan = tonic::transport::Endpoint::from_shared(cp.grpc_url())
        .map_err(|e| BenchError::Check(e.to_string()))?
        .connect()
        .await?;
    let bearer = hive_proto::auth::Bearer::new(&cp.admin_token().unwrap_or_default())
        .map_err(|e| BenchError::Check(e.to_string()))?;
    drive(n, clients, move |_| {
        let mut c = ControlPlaneClient::with_interceptor(chan.clone(), bearer.clone());
        async move {
            c.submit_build(SubmitBuildRequest {
                project: "bench".into(),
                revision: String::new(),
                git_ref: "refs/heads/main".into(),
                ..Default::default()
            })
            .await
            .map_err(|source| BenchError::Grpc {
                what: "SubmitBuild",
                source,
            })?;
            Ok(())
        }
    })
    .await
}

async fn schedule(
    cli: &Cli,
    builds: usize,
    boxes: usize,
    clients: usize,
    warm: Option<u32>,
) -> Result<(), BenchError> {
    println!(
        "schedule: {builds} queued builds, {boxes} fake boxes accepting every assignment ({})",
        match warm {
            Some(n) => format!("{n} warm cells per box, each build finished at once"),
            None => "room for every build up front".to_string(),
        }
    );
    for label in stores(cli) {
        place(cli, label, builds, boxes, clients, warm).await?;
    }
    Ok(())
}

/// `schedule --curve`: placements/s at 10, 100 and 1,000 boxes (100 builds per box), per store.
async fn schedule_curve(cli: &Cli, clients: usize, warm: Option<u32>) -> Result<(), BenchError> {
    const SIZES: [(usize, usize); 3] = [(10, 1_000), (100, 10_000), (1_000, 100_000)];
    let labels = stores(cli);
    let mut rates = Vec::new();
    let mut failures = Vec::new();
    for (boxes, builds) in SIZES {
        println!(
            "schedule curve: {builds} queued builds, {boxes} fake boxes ({})",
            match warm {
                Some(n) => format!("{n} warm cells per box, each build finished at once"),
                None => "room for every build up front".to_string(),
            }
        );
        // A point that fails is recorded and the curve goes on: the other sizes and stores
        // still print, and the run fails at the end.
        let mut row = Vec::new();
        for label in &labels {
            match place(cli, label, builds, boxes, clients, warm).await {
                Ok(rate) => row.push(Some(rate)),
                Err(e) => {
                    println!("  [{label}] {boxes} boxes / {builds} builds failed: {e}");
                    failures.push(format!("{label} at {boxes} boxes: {e}"));
                    row.push(None);
                }
            }
        }
        rates.push(row);
    }
    println!("placements/s by size (first->last assignment):");
    println!(
        "  {:>6} {:>8} {}",
        "boxes",
        "builds",
        labels
            .iter()
            .map(|l| format!("{l:>10}"))
            .collect::<String>()
    );
    for ((boxes, builds), row) in SIZES.iter().zip(&rates) {
        println!(
            "  {boxes:>6} {builds:>8} {}",
            row.iter()
                .map(|r| match r {
                    Some(r) => format!("{r:>10.0}"),
                    None => format!("{:>10}", "failed"),
                })
                .collect::<String>()
        );
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(BenchError::Check(format!(
            "{} curve point(s) failed: {}",
            failures.len(),
            failures.join("; ")
        )))
    }
}

/// One placement run on a fresh control plane and `label`'s store: queue `builds`, connect
/// `boxes` fake boxes, time first -> last assignment. Prints its figures; returns placements/s.
async fn place(
    cli: &Cli,
    label: &'static str,
    builds: usize,
    boxes: usize,
    clients: usize,
    warm: Option<u32>,
) -> Result<f64, BenchError> {
    let (cp, store) = start(cli, label).await?;
    create_project(&cp).await?;
    let grpc = cp.grpc_url();
    let submit = submit_builds(&cp, builds, clients).await?;

    // Each box has room for its share (plus slack), warm: a pure placement measurement.
    let per_box = warm.unwrap_or(builds.div_ceil(boxes.max(1)) as u32 + 2);
    let turnover = warm.is_some();
    let t_connect = Instant::now();
    let mut tasks = Vec::new();
    let (first_tx, mut first_rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, String)>();
    let assigned = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(600);
    for b in 0..boxes {
        let grpc = grpc.clone();
        let tx = first_tx.clone();
        let assigned = assigned.clone();
        tasks.push(tokio::spawn(async move {
            let cfg = FakeBoxConfig::new(&format!("bench-box-{b:03}"), "small", per_box, per_box);
            let mut fb = FakeBox::connect(&grpc, cfg).await?;
            use std::sync::atomic::Ordering::Relaxed;
            while assigned.load(Relaxed) < builds {
                match fb.next_assignment(Duration::from_millis(200)).await {
                    Ok(a) => {
                        let _ = tx.send((Instant::now(), a.build_id.clone()));
                        assigned.fetch_add(1, Relaxed);
                        fb.accept(&a, &format!("cell-{}", a.build_id), true).await;
                        if turnover {
                            fb.running(&a).await;
                            fb.finish(&a, hive_proto::v1::BuildState::Succeeded, 0)
                                .await;
                        }
                    }
                    Err(hive_testkit::fakebox::FakeBoxError::Timeout(..)) => {
                        if Instant::now() > deadline {
                            return Err(BenchError::Check(format!(
                                "only {} of {builds} builds assigned after 600 s",
                                assigned.load(Relaxed)
                            )));
                        }
                    }
                    Err(e) => return Err(BenchError::FakeBox(e)),
                }
            }
            // Generous: at 1,000 boxes the acks trail the placements by tens of seconds.
            fb.wait_all_acked(Duration::from_secs(300)).await?;
            Ok::<_, BenchError>(())
        }));
    }
    drop(first_tx);
    let mut seen = HashSet::with_capacity(builds);
    let mut times = Vec::with_capacity(builds);
    let mut twice = None;
    while let Some((t, id)) = first_rx.recv().await {
        if !seen.insert(id.clone()) {
            twice.get_or_insert(id);
        }
        times.push(t);
    }
    // A box whose acknowledgements never came is reported after the placement figures, which
    // stand without it (every assignment arrived).
    let mut unacked = Vec::new();
    for t in tasks {
        if let Err(e) = t.await? {
            unacked.push(e);
        }
    }
    if let Some(id) = twice {
        finish(cp, store).await;
        return Err(BenchError::Check(format!("build {id} assigned twice")));
    }
    if seen.len() != builds {
        finish(cp, store).await;
        return Err(BenchError::Check(format!(
            "{} of {builds} builds were assigned",
            seen.len()
        )));
    }
    times.sort();
    let first = times[0];
    let last = times[times.len() - 1];
    let span = last - first;
    println!("[{}]", store.label);
    println!("  {}", submit.line("SubmitBuild (queue fill)"));
    let rate = builds as f64 / span.as_secs_f64().max(1e-9);
    println!(
        "  placements: {builds} on {boxes} boxes, first->last assignment {:.2}s = {rate:.0}/s \
         (connect->last {:.2}s; every build assigned exactly once)",
        span.as_secs_f64(),
        (last - t_connect).as_secs_f64()
    );
    let failed = unacked.len();
    if let Some(e) = unacked.into_iter().next() {
        println!("  {failed} of {boxes} boxes failed after their assignments: {e}");
        finish(cp, store).await;
        return Err(e);
    }
    finish(cp, store).await;
    Ok(rate)
}

/// Control planes sharing one PostgreSQL database, for `cluster`.
async fn start_cluster(
    cli: &Cli,
    admin_url: &str,
    n: usize,
) -> Result<(Vec<ControlPlane>, TestDb), BenchError> {
    let db = TestDb::postgres_from(admin_url).await?;
    let opts = ControlPlaneOptions {
        db: Some(db.url.clone()),
        log_filter: cli.cp_log.clone(),
        heartbeat_interval_ms: cli.heartbeat_interval_ms,
        extra_args: vec!["--insecure-boxes".into()],
        ..ControlPlaneOptions::default()
    };
    let first = {
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || ControlPlane::start(opts)).await??
    };
    let mut cps = vec![first];
    for _ in 1..n {
        // Copies the first's CA and secrets key (one hive) and waits for its listeners.
        let cp = ControlPlane::start_sharing(&cps[0], opts.clone())?;
        cps.push(cp);
    }
    Ok((cps, db))
}

/// One fake box that takes every assignment, and moves to the next control plane when its
/// own goes away. Reports (time, build id) of each assignment, and the time it registered again
/// after losing its control plane.
#[allow(clippy::too_many_arguments)]
async fn failover_box(
    id: String,
    urls: Vec<String>,
    mut at: usize,
    per_box: u32,
    assigned_tx: tokio::sync::mpsc::UnboundedSender<(Instant, String)>,
    moved_tx: tokio::sync::mpsc::UnboundedSender<(String, Instant)>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), BenchError> {
    use std::sync::atomic::Ordering::Relaxed;
    let cfg = FakeBoxConfig::new(&id, "small", per_box, per_box);
    let mut fb = FakeBox::connect(&urls[at], cfg).await?;
    while !stop.load(Relaxed) {
        match fb.next_assignment(Duration::from_millis(100)).await {
            Ok(a) => {
                let _ = assigned_tx.send((Instant::now(), a.build_id.clone()));
                fb.accept(&a, &format!("cell-{}", a.build_id), true).await;
            }
            Err(hive_testkit::fakebox::FakeBoxError::Timeout(..)) => {}
            Err(_) => {
                // The control plane is gone: the next one, at once (a real box adds a
                // jittered backoff; see tests/tests/multi_control_plane.rs).
                loop {
                    at = (at + 1) % urls.len();
                    fb.set_addr(&urls[at]);
                    if fb.reconnect().await.is_ok() {
                        let _ = moved_tx.send((id.clone(), Instant::now()));
                        break;
                    }
                    if stop.load(Relaxed) {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    Ok(())
}

async fn cluster(
    cli: &Cli,
    requests: usize,
    clients: usize,
    builds: usize,
    boxes: usize,
) -> Result<(), BenchError> {
    let Some(admin_url) = cli.pg_url.clone() else {
        return Err(BenchError::Check(
            "cluster needs PostgreSQL: --pg-url or HIVE_TEST_POSTGRES_URL".into(),
        ));
    };
    println!(
        "cluster: control planes on one PostgreSQL; {requests} webhooks ({clients} clients, \
         round-robin over the control planes), {builds} queued builds placed on {boxes} fake \
         boxes spread over them"
    );
    let mut rates: Vec<(usize, f64, f64)> = Vec::new();
    for n in [1usize, 3] {
        let (mut cps, db) = start_cluster(cli, &admin_url, n).await?;
        create_project(&cps[0]).await?;
        let urls: Vec<String> = cps.iter().map(|c| c.webhook_url()).collect();
        let client = WebhookClient::new();
        for (i, url) in urls.iter().enumerate() {
            for w in 0..10 {
                let body =
                    push_payload(REPO, "refs/heads/main", &format!("a{i:019}{w:020}"), false);
                client
                    .send_signed(url, SECRET, "push", &format!("warm-{i}-{w}"), body)
                    .await?;
            }
        }
        let hooks = {
            let urls = urls.clone();
            drive(requests, clients, move |i| {
                let client = client.clone();
                let url = urls[i % urls.len()].clone();
                async move {
                    let body = push_payload(REPO, "refs/heads/main", &format!("b{i:039x}"), false);
                    let a = client
                        .send_signed(&url, SECRET, "push", &format!("bench-{i}"), body)
                        .await?;
                    if a.status != 202 || !a.json()["build_id"].is_string() {
                        return Err(BenchError::Check(format!(
                            "delivery {i}: {} {}",
                            a.status, a.body
                        )));
                    }
                    Ok(())
                }
            })
            .await?
        };
        // The queue holds the webhooks' builds; add API builds up to `builds`.
        let queued = requests + 10 * n;
        let grpc: Vec<String> = cps.iter().map(|c| c.grpc_url()).collect();
        if builds > queued {
            submit_builds(&cps[0], builds - queued, clients).await?;
        }
        let total = builds.max(queued);
        let per_box = (total.div_ceil(boxes.max(1)) + 2 * n + 4) as u32;
        let (assigned_tx, mut assigned_rx) = tokio::sync::mpsc::unbounded_channel();
        let (moved_tx, mut moved_rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for b in 0..boxes {
            tasks.push(tokio::spawn(failover_box(
                format!("bench-box-{b:03}"),
                grpc.clone(),
                b % n,
                per_box,
                assigned_tx.clone(),
                moved_tx.clone(),
                stop.clone(),
            )));
        }
        let mut seen = HashSet::with_capacity(total);
        let mut times = Vec::with_capacity(total);
        let deadline = Instant::now() + Duration::from_secs(600);
        while seen.len() < total {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, assigned_rx.recv()).await {
                Ok(Some((t, id))) => {
                    if !seen.insert(id.clone()) {
                        return Err(BenchError::Check(format!("build {id} assigned twice")));
                    }
                    times.push(t);
                }
                _ => {
                    return Err(BenchError::Check(format!(
                        "only {} of {total} builds assigned within 600 s",
                        seen.len()
                    )))
                }
            }
        }
        times.sort();
        let span = times[times.len() - 1] - times[0];
        let placements = total as f64 / span.as_secs_f64().max(1e-9);
        println!("[{n} control plane{}]", if n == 1 { "" } else { "s" });
        println!("  {}", hooks.line("webhooks (202, durable)"));
        println!(
            "  placements: {total} on {boxes} boxes, first->last {:.2}s = {placements:.0}/s \
             (every build assigned exactly once)",
            span.as_secs_f64()
        );
        rates.push((n, hooks.rate(), placements));

        if n > 1 {
            // Failover: kill -9 the first control plane; its boxes move on; a build submitted
            // at the kill is placed.
            let on_first = (0..boxes).filter(|b| b % n == 0).count();
            let mut api1 = hive_tests::controlplane::api(&grpc[1]).await?;
            let t_kill = Instant::now();
            cps[0].crash();
            let submitted = api1
                .submit_build(SubmitBuildRequest {
                    project: "bench".into(),
                    revision: String::new(),
                    git_ref: "refs/heads/main".into(),
                    ..Default::default()
                })
                .await
                .map_err(|source| BenchError::Grpc {
                    what: "SubmitBuild",
                    source,
                })?
                .into_inner()
                .id;
            let mut moved = Vec::new();
            let mut placed_ms = None;
            let deadline = Instant::now() + Duration::from_secs(60);
            while moved.len() < on_first || placed_ms.is_none() {
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::select! {
                    m = moved_rx.recv() => if let Some((_, t)) = m {
                        moved.push((t - t_kill).as_millis());
                    },
                    a = assigned_rx.recv() => if let Some((t, id)) = a {
                        if id == submitted {
                            placed_ms = Some((t - t_kill).as_millis());
                        }
                    },
                    _ = tokio::time::sleep(left) => {
                        return Err(BenchError::Check(format!(
                            "failover: {} of {on_first} boxes moved, build placed: {:?}, after 60 s",
                            moved.len(), placed_ms
                        )));
                    }
                }
            }
            moved.sort();
            println!(
                "  failover (kill -9 of 1 of {n}, {on_first} boxes on it): every box registered \
                 elsewhere after {} ms (first {} ms, median {} ms); a build submitted at the \
                 kill placed after {} ms",
                moved[moved.len() - 1],
                moved[0],
                moved[moved.len() / 2],
                placed_ms.unwrap_or_default()
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tasks {
            t.await??;
        }
        for mut cp in cps {
            cp.stop();
        }
        db.drop_db().await;
    }
    if let [(_, w1, p1), (_, w3, p3)] = rates[..] {
        println!(
            "3 vs 1 control planes: webhooks {:.2}x, placements {:.2}x",
            w3 / w1,
            p3 / p1
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match &cli.command {
        Bench::Webhooks { requests, clients } => webhooks(&cli, *requests, *clients).await,
        Bench::Schedule {
            builds,
            boxes,
            clients,
            warm,
            curve: false,
        } => schedule(&cli, *builds, *boxes, *clients, *warm).await,
        Bench::Schedule {
            clients,
            warm,
            curve: true,
            ..
        } => schedule_curve(&cli, *clients, *warm).await,
        Bench::Cluster {
            requests,
            clients,
            builds,
            boxes,
        } => cluster(&cli, *requests, *clients, *builds, *boxes).await,
        Bench::Chaos {
            seconds,
            seed,
            rate,
            logs,
            postgres,
        } => {
            return hive_tests::chaos::cli(hive_tests::chaos::ChaosOptions {
                seconds: *seconds,
                seed: *seed,
                rate: *rate,
                logs_dir: logs.clone(),
                postgres: *postgres,
                ..Default::default()
            })
            .await
        }
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hive-bench: {}", hive_sys::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
