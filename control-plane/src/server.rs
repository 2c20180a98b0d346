//! Wires the control plane: opens the store, makes the first admin token on a fresh one
//! (`auth::bootstrap`), builds the shared state (`state::Hive`), binds the
//! HTTP and gRPC listeners, mounts the services (plus the standard gRPC health and reflection
//! services), starts the scheduler and the key-exchange revoker, and shuts all of it down in
//! order (stop accepting, end streams, finish in-flight requests, stop the scheduler, close the
//! database). Only wiring lives here: no service imports this module.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hive_proto::v1::box_agent_server::BoxAgentServer;
use hive_proto::v1::connector_server::ConnectorServer;
use hive_proto::v1::control_plane_server::ControlPlaneServer;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::cluster::Bus;
use crate::domain::keyexchange;
use crate::events::Events;
use crate::grpc::api::ControlPlaneService;
use crate::grpc::boxes::BoxAgentService;
use crate::grpc::connector::ConnectorService;
use crate::intake::Intake;
use crate::metrics::Metrics;
use crate::placement::Policy;
use crate::registry::boxes::Registry;
use crate::registry::connectors::Connectors;
use crate::scheduler;
use crate::sizeclass::SizeClasses;
use crate::state::{millis, Hive};
use crate::store::{redact, Store, StoreError};

/// How long shutdown waits for in-flight requests before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// How often retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(600);

/// Largest gRPC message accepted or sent, either way (tonic's default, now stated and
/// published): the biggest legitimate ones are a log page and a box's cell list.
pub const GRPC_MESSAGE_LIMIT: usize = 4 * 1024 * 1024;

/// Errors starting the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("open store: {0}")]
    Store(#[from] StoreError),
    #[error("first admin token: {0}")]
    Bootstrap(#[from] crate::auth::BootstrapError),
    #[error("certificate authority: {0}")]
    Pki(#[from] crate::pki::PkiError),
    #[error("secrets key: {0}")]
    Secrets(#[from] crate::secrets::SecretsError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("{0}")]
    Cluster(String),
    #[error(transparent)]
    Region(#[from] crate::regions::RegionError),
    #[error("bind {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Everything the control plane needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    /// The agent listener: `BoxAgent` and `Connector` over TLS; boxes authenticated by their
    /// client certificate, connectors by their token (sent only over this TLS).
    pub box_addr: SocketAddr,
    /// Names (DNS or IP) the box listener's certificate is valid for, besides `localhost`,
    /// the loopback addresses, this host's name and a specific `box_addr` IP.
    pub tls_sans: Vec<String>,
    /// The operator's certificate chain and key (PEM files) for the gRPC and HTTP listeners;
    /// None: the hive's CA signs one at every start. Either both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// TLS on the gRPC and HTTP listeners on loopback too (off loopback they always have it).
    pub tls_on_loopback: bool,
    /// How long a box certificate is valid (boxes renew when a third is left).
    pub box_cert_validity: Duration,
    /// The key project secrets are sealed with; None = `<data_dir>/secrets.key`, made on first
    /// start.
    pub secrets_key_file: Option<PathBuf>,
    /// Also serve `BoxAgent` without certificates, and `Connector` without TLS, on the gRPC
    /// (API) listener, which must then be on loopback: for tests and development only.
    pub insecure_boxes: bool,
    /// Holds the default SQLite database.
    pub data_dir: PathBuf,
    /// `sqlite://...` or `postgres://...`; None = `sqlite://<data_dir>/hive.db`.
    pub db: Option<String>,
    /// How long a placement waits for the box to confirm, and how long a box may stay silent
    /// before its builds are re-queued.
    pub lease: Duration,
    /// How often boxes should heartbeat (told to them in `Registered`).
    pub heartbeat_interval: Duration,
    pub size_classes: SizeClasses,
    pub placement: Policy,
    /// Scheduler pass interval when nothing wakes it.
    pub tick: Duration,
    /// Control messages queued per box session before the box counts as not reading.
    pub box_queue: usize,
    /// Longest an HTTP request may take, body included (a slow sender gets 408).
    pub http_timeout: Duration,
    /// HTTP requests handled at once; more wait their turn (within `http_timeout`).
    pub http_concurrency: usize,
    /// Webhook deliveries waiting for their group commit; past it a webhook is answered 503
    /// with Retry-After.
    pub webhook_queue: usize,
    /// How long a webhook group commit waits for more deliveries after the first (0: takes
    /// what queued while the previous group committed, and waits for nothing).
    pub webhook_commit_window: Duration,
    /// gRPC streams one connection may have open at once.
    pub grpc_streams_per_connection: u32,
    /// Most bytes of log kept per build; past it one line says the log was cut.
    pub log_cap: u64,
    /// Most bytes of artefacts kept per build (0: none are collected).
    pub artifact_cap: u64,
    /// Attempts a build gets (placements ended by a rejection, a lost box or an expired lease)
    /// before it fails with the last reason instead of going back to the queue.
    pub max_attempts: u32,
    /// Ended builds (with their logs) and webhook deliveries older than this are deleted;
    /// None keeps everything.
    pub retention: Option<Duration>,
    /// This hive's name (every control plane of one database has the same) and region.
    pub hive_name: String,
    pub region: String,
    /// Other hives pushes are forwarded to: `NAME=URL` each (`crate::regions`).
    pub peer_hives: Vec<String>,
    /// PEM certificates trusted for `https://` peer hives; None = the public web roots.
    pub peer_ca_file: Option<PathBuf>,
    /// Where people reach this control plane (`--public-url`): commit statuses link to the
    /// build's page under it. None: statuses carry no link.
    pub public_url: Option<String>,
    /// How commit statuses are sent to the forges (timeouts, backoff, concurrency).
    pub forge: crate::forge::Settings,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            box_addr: SocketAddr::from(([127, 0, 0, 1], 50052)),
            tls_sans: Vec::new(),
            tls_cert: None,
            tls_key: None,
            tls_on_loopback: false,
            box_cert_validity: Duration::from_secs(30 * 86_400),
            secrets_key_file: None,
            insecure_boxes: false,
            data_dir: PathBuf::from("./hive-data"),
            db: None,
            lease: Duration::from_secs(30),
            heartbeat_interval: Duration::from_millis(2000),
            size_classes: SizeClasses::builtin(),
            placement: Policy::Spread,
            tick: Duration::from_millis(500),
            box_queue: 4096,
            http_timeout: Duration::from_secs(30),
            http_concurrency: 512,
            webhook_queue: 1024,
            webhook_commit_window: Duration::ZERO,
            grpc_streams_per_connection: 1024,
            retention: Some(Duration::from_secs(30 * 86_400)),
            log_cap: crate::store::DEFAULT_LOG_CAP,
            artifact_cap: 100 * 1024 * 1024,
            max_attempts: crate::store::DEFAULT_MAX_ATTEMPTS,
            hive_name: DEFAULT_HIVE_NAME.to_string(),
            region: String::new(),
            peer_hives: Vec::new(),
            peer_ca_file: None,
            public_url: None,
            forge: crate::forge::Settings::default(),
        }
    }
}

/// The name of a hive nobody named.
pub const DEFAULT_HIVE_NAME: &str = "default";

impl Config {
    /// Checks the numbers make sense together.
    pub fn validate(&self) -> Result<(), ServerError> {
        if self.lease < Duration::from_millis(500) {
            return Err(ServerError::Config(format!(
                "lease {:?} is shorter than 500ms",
                self.lease
            )));
        }
        if self.heartbeat_interval < Duration::from_millis(50) {
            return Err(ServerError::Config(format!(
                "heartbeat interval {:?} is shorter than 50ms",
                self.heartbeat_interval
            )));
        }
        if self.heartbeat_interval >= self.lease {
            return Err(ServerError::Config(format!(
                "heartbeat interval {:?} must be shorter than the lease {:?}, or leases of \
                 healthy boxes expire",
                self.heartbeat_interval, self.lease
            )));
        }
        if self.tick.is_zero() {
            return Err(ServerError::Config("scheduler tick must be > 0".into()));
        }
        if self.http_timeout < Duration::from_millis(100) {
            return Err(ServerError::Config(format!(
                "HTTP timeout {:?} is shorter than 100ms",
                self.http_timeout
            )));
        }
        if self.log_cap < 4096 {
            return Err(ServerError::Config(format!(
                "log cap {} bytes is below 4 KiB: a build could not say why it failed",
                self.log_cap
            )));
        }
        if self.max_attempts == 0 {
            return Err(ServerError::Config(
                "max attempts must be at least 1 (every build gets its first)".into(),
            ));
        }
        if self.insecure_boxes && !self.grpc_addr.ip().is_loopback() {
            return Err(ServerError::Config(format!(
                "--insecure-boxes serves boxes without certificates on the gRPC listener, so \
                 that listener must be on loopback, not {}: drop --insecure-boxes (boxes join \
                 with `hivectl box join-token`) or use --grpc-addr 127.0.0.1:PORT",
                self.grpc_addr
            )));
        }
        if self.box_cert_validity < Duration::from_secs(60) {
            return Err(ServerError::Config(format!(
                "box certificate validity {:?} is shorter than a minute",
                self.box_cert_validity
            )));
        }
        if self.webhook_queue == 0 {
            return Err(ServerError::Config(
                "the webhook queue must hold at least 1 delivery".into(),
            ));
        }
        if self.webhook_commit_window > Duration::from_secs(1) {
            return Err(ServerError::Config(format!(
                "webhook commit window {:?} is longer than 1s: every webhook would wait for it",
                self.webhook_commit_window
            )));
        }
        if let Some(url) = &self.public_url {
            crate::forge::check_base_url(url).map_err(|_| {
                ServerError::Config(format!(
                    "public URL {url:?} is not an http(s) URL with a host (e.g. \
                     https://hive.example.com): statuses link to <public-url>/ui/builds/<id>"
                ))
            })?;
        }
        if self.forge.timeout < Duration::from_millis(100) || self.forge.concurrency == 0 {
            return Err(ServerError::Config(
                "forge status calls need a timeout of at least 100ms and at least 1 in flight"
                    .into(),
            ));
        }
        if self.http_concurrency == 0 || self.grpc_streams_per_connection == 0 {
            return Err(ServerError::Config(
                "HTTP concurrency and gRPC streams per connection must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The database URL in effect.
    pub fn db_url(&self) -> String {
        match &self.db {
            Some(url) => url.clone(),
            None => format!("sqlite://{}/hive.db", self.data_dir.display()),
        }
    }
}

/// A running control plane.
#[derive(Debug)]
pub struct Handle {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub box_addr: SocketAddr,
    /// Whether the gRPC listener serves TLS (off loopback, or asked for).
    pub grpc_tls: bool,
    /// Whether the HTTP listener serves TLS.
    pub http_tls: bool,
    /// The admin token this start made (first start on a fresh store), also in
    /// `<data-dir>/admin.token`; None when tokens existed already.
    admin_token: Option<String>,
    hive: Arc<Hive>,
    shutdown_tx: watch::Sender<bool>,
    http_task: JoinHandle<()>,
    grpc_task: JoinHandle<()>,
    box_task: JoinHandle<()>,
    scheduler_task: JoinHandle<()>,
    intake_task: JoinHandle<()>,
    /// The lock on a SQLite file (one control plane per file), held until the handle is gone.
    _db_lock: Option<std::fs::File>,
}

impl Handle {
    /// The store, for tests and benchmarks that inspect what was written.
    pub fn store(&self) -> &Store {
        &self.hive.store
    }

    /// The admin token this start made, if it made one (in-process tests use it).
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    /// SHA-256 of the CA certificate: the pin in join tokens.
    pub fn ca_sha256(&self) -> &str {
        self.hive.ca.sha256()
    }

    /// The CA certificate (PEM), for tests that act as a box.
    pub fn ca_pem(&self) -> &str {
        self.hive.ca.cert_pem()
    }

    /// Runs one scheduler pass now (benchmarks time it).
    pub async fn schedule_now(&self) -> Result<scheduler::PassStats, StoreError> {
        scheduler::pass(&self.hive).await
    }

    /// Stops accepting, ends the long streams, waits for in-flight requests (up to 15 s),
    /// stops the scheduler and closes the database.
    pub async fn shutdown(self) {
        tracing::info!("shutting down: no new connections; ending streams");
        let _ = self.shutdown_tx.send(true);
        self.hive.registry.close_all();
        let grace = async {
            let _ = self.http_task.await;
            let _ = self.grpc_task.await;
            let _ = self.box_task.await;
            let _ = self.scheduler_task.await;
            // After the HTTP server: its last handlers wait on this task's answers, and it
            // commits what they queued before the database closes.
            let _ = self.intake_task.await;
            // The sessions' tasks outlive the listener: each ends its box's session in the
            // store (acked seq, no owner) as it goes, which needs the database still open.
            self.hive.sessions.close();
            self.hive.sessions.wait().await;
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, grace).await.is_err() {
            tracing::warn!(
                "in-flight requests still open after {}s; closing anyway",
                SHUTDOWN_GRACE.as_secs()
            );
        }
        self.hive.store.close().await;
        tracing::info!("control plane stopped; database closed");
    }
}

/// Opens the store, binds both listeners and starts serving.
pub async fn start(config: Config) -> Result<Handle, ServerError> {
    config.validate()?;
    // The operator's certificate is read (and checked) before anything else starts.
    let operator_cert =
        crate::tls::operator_pair(config.tls_cert.as_deref(), config.tls_key.as_deref())?;
    let url = config.db_url();
    let db_lock = lock_sqlite(&url)?;
    let store = Store::open(&url)
        .await?
        .with_log_cap(config.log_cap)
        .with_max_attempts(config.max_attempts);
    tracing::info!(db = %redact(&url), kind = store.kind().name(), "store open");
    let extended = store
        .extend_live_leases(crate::store::now_ms().saturating_add(millis(config.lease)))
        .await?;
    if extended > 0 {
        tracing::info!(
            extended,
            "live leases extended by one lease for boxes to reconnect"
        );
    }
    let admin_token = crate::auth::bootstrap(&store, &config.data_dir).await?;
    let ca = Arc::new(crate::pki::Ca::load_or_create(&config.data_dir)?);
    let (sealer, made) = crate::secrets::Sealer::load_or_create_reporting(
        &config.data_dir,
        config.secrets_key_file.as_deref(),
    )?;
    if made && store.count_secrets().await? > 0 {
        // A lost key is not replaced behind the operator's back: every build would silently
        // run without its secrets.
        let path = config.data_dir.join("secrets.key");
        let _ = std::fs::rename(&path, path.with_extension("key.unused"));
        return Err(crate::secrets::SecretsError::KeyLost(path).into());
    }

    let forge_tls = crate::forge::client::tls_config(config.forge.ca_file.as_deref())
        .map_err(|e| ServerError::Config(hive_sys::error_chain(&e)))?;

    let http_listener = TcpListener::bind(config.http_addr)
        .await
        .map_err(|source| ServerError::Bind {
            what: "HTTP",
            addr: config.http_addr,
            source,
        })?;
    let grpc_listener = TcpListener::bind(config.grpc_addr)
        .await
        .map_err(|source| ServerError::Bind {
            what: "gRPC",
            addr: config.grpc_addr,
            source,
        })?;
    let box_listener =
        TcpListener::bind(config.box_addr)
            .await
            .map_err(|source| ServerError::Bind {
                what: "box",
                addr: config.box_addr,
                source,
            })?;
    let box_addr = box_listener
        .local_addr()
        .map_err(|source| ServerError::Bind {
            what: "box",
            addr: config.box_addr,
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| ServerError::Bind {
            what: "HTTP",
            addr: config.http_addr,
            source,
        })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| ServerError::Bind {
            what: "gRPC",
            addr: config.grpc_addr,
            source,
        })?;

    let grpc_tls = crate::tls::wanted(grpc_addr, operator_cert.is_some(), config.tls_on_loopback);
    let http_tls = crate::tls::wanted(http_addr, operator_cert.is_some(), config.tls_on_loopback);
    let api_cert = if !(grpc_tls || http_tls) {
        None
    } else if let Some(c) = operator_cert {
        Some(c)
    } else {
        let (chain_pem, key_pem) =
            ca.server_identity(&server_names(&config, &[grpc_addr, http_addr]))?;
        Some(crate::tls::ServerCert {
            chain_pem,
            key_pem,
            source: crate::tls::CertSource::HiveCa,
        })
    };
    let http_tls_config = match (&api_cert, http_tls) {
        (Some(c), true) => Some(crate::tls::rustls_config(c)?),
        _ => None,
    };
    for (what, addr, tls) in [("gRPC", grpc_addr, grpc_tls), ("HTTP", http_addr, http_tls)] {
        match (tls, &api_cert) {
            (true, Some(c)) => tracing::info!(%addr, certificate = match c.source {
                crate::tls::CertSource::Operator => "--tls-cert",
                crate::tls::CertSource::HiveCa => "signed by the hive's CA (clients pin ca_sha256)",
            }, "{what} listener: TLS"),
            _ => tracing::warn!(%addr, "{what} listener: PLAINTEXT, on loopback only (this \
                host's processes); any other address gets TLS"),
        }
    }

    let regions = crate::regions::Regions::new(
        &config.hive_name,
        &config.region,
        &config.peer_hives,
        config.peer_ca_file.as_deref(),
    )?;
    check_identity(&store, &ca, &sealer, &regions).await?;
    // Webhook secrets are sealed with the same key as project secrets; rows from before that
    // are sealed now (idempotent; another control plane doing the same at once is fine).
    store.set_sealer(sealer.clone());
    let sealed = store.seal_webhook_secrets().await?;
    if sealed > 0 {
        tracing::info!(
            sealed,
            "webhook secrets stored in plaintext by an older version are now sealed"
        );
    }
    let (bus, notes) = match store.kind() {
        crate::store::DbKind::Postgres => {
            let (bus, rx) = Bus::shared();
            (bus, Some(rx))
        }
        crate::store::DbKind::Sqlite => (Bus::local(), None),
    };
    store.set_bus(bus.clone());

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let metrics = Metrics::default();
    metrics.limit("box_queue", config.box_queue as u64);
    metrics.limit(
        "http_timeout_ms",
        u64::try_from(millis(config.http_timeout)).unwrap_or(0),
    );
    metrics.limit("http_concurrency", config.http_concurrency as u64);
    metrics.limit("webhook_queue", config.webhook_queue as u64);
    metrics.limit("webhook_group", crate::domain::submit::MAX_GROUP as u64);
    metrics.limit(
        "grpc_streams_per_connection",
        u64::from(config.grpc_streams_per_connection),
    );
    metrics.limit("grpc_message_bytes", GRPC_MESSAGE_LIMIT as u64);
    metrics.limit("log_cap_bytes", config.log_cap);
    metrics.limit("max_attempts", u64::from(config.max_attempts));
    metrics.limit(
        "retention_secs",
        config.retention.map_or(0, |d| d.as_secs()),
    );
    metrics.limit("box_seq_ahead", crate::grpc::boxes::MAX_SEQ_AHEAD);
    metrics.limit("log_chunk_seq", crate::store::MAX_CHUNK_SEQ);
    let (intake, intake_queue) = Intake::new(config.webhook_queue);
    let hive = Arc::new(Hive {
        store,
        classes: config.size_classes.clone(),
        events: Events::with_bus(bus.clone()),
        registry: Registry::with_bus(
            bus.clone(),
            if bus.is_shared() {
                config.heartbeat_interval * 3
            } else {
                Duration::ZERO
            },
        ),
        connectors: std::sync::Arc::new(Connectors::with_bus(bus.clone())),
        bus,
        metrics,
        wake: Notify::new(),
        choosing: Default::default(),
        lease: config.lease,
        heartbeat: config.heartbeat_interval,
        placement: config.placement,
        box_queue: config.box_queue.max(1),
        intake,
        shutdown: shutdown_rx.clone(),
        sessions: tokio_util::task::TaskTracker::new(),
        ca: ca.clone(),
        box_cert_validity: config.box_cert_validity,
        sealer,
        regions,
        artifacts: crate::artifacts::ArtifactStore::new(
            config.data_dir.join("artifacts"),
            config.artifact_cap,
        ),
    });

    if let Some(rx) = notes {
        // Both end on the shutdown flag.
        crate::cluster::spawn(hive.clone(), url.clone(), rx);
    }
    // Ends on the shutdown flag once it has answered every delivery queued.
    let intake_task = tokio::spawn(crate::domain::submit::commit_deliveries(
        hive.clone(),
        intake_queue,
        config.webhook_commit_window,
    ));
    let app = crate::http::router(hive.clone(), config.http_timeout, config.http_concurrency);
    let mut stop = shutdown_rx.clone();
    let http_listener = match http_tls_config {
        Some(tls) => HttpListener::Tls(
            crate::tls::TlsListener::new(http_listener, tls, shutdown_rx.clone()).map_err(
                |source| ServerError::Bind {
                    what: "HTTP",
                    addr: http_addr,
                    source,
                },
            )?,
        ),
        None => HttpListener::Plain(http_listener),
    };
    let http_task = tokio::spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let served = match http_listener {
            HttpListener::Plain(plain) => {
                axum::serve(plain, app)
                    .with_graceful_shutdown(stopped)
                    .await
            }
            HttpListener::Tls(tls) => axum::serve(tls, app).with_graceful_shutdown(stopped).await,
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ControlPlaneServer<ControlPlaneService>>()
        .await;
    health_reporter
        .set_serving::<BoxAgentServer<BoxAgentService>>()
        .await;
    health_reporter
        .set_serving::<ConnectorServer<ConnectorService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(hive_proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Config(format!("gRPC reflection: {e}")))?;

    let mut stop = shutdown_rx.clone();
    let api = ControlPlaneService { hive: hive.clone() };
    let insecure_agent = config.insecure_boxes.then(|| {
        tracing::warn!(%grpc_addr, "--insecure-boxes: boxes (without a certificate) and connectors \
            (token in the clear) may also connect to the gRPC listener: tests and development only");
        BoxAgentServer::new(BoxAgentService::insecure(hive.clone()))
            .max_decoding_message_size(GRPC_MESSAGE_LIMIT)
            .max_encoding_message_size(GRPC_MESSAGE_LIMIT)
    });
    // Connectors send their token in the clear on this listener: only with --insecure-boxes.
    let insecure_connector = config.insecure_boxes.then(|| {
        ConnectorServer::new(ConnectorService { hive: hive.clone() })
            .max_decoding_message_size(GRPC_MESSAGE_LIMIT)
            .max_encoding_message_size(GRPC_MESSAGE_LIMIT)
    });
    let grpc_streams = config.grpc_streams_per_connection;
    let mut grpc_builder = tonic::transport::Server::builder();
    if let (true, Some(c)) = (grpc_tls, &api_cert) {
        use tonic::transport::{Identity, ServerTlsConfig};
        grpc_builder = grpc_builder
            .tls_config(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(&c.chain_pem, &c.key_pem))
                    .timeout(crate::tls::HANDSHAKE_TIMEOUT),
            )
            .map_err(|e| ServerError::Config(format!("gRPC listener TLS: {e}")))?;
    }
    let grpc_task = tokio::spawn(async move {
        let served = grpc_builder
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .max_concurrent_streams(Some(grpc_streams))
            .add_service(
                ControlPlaneServer::new(api)
                    .max_decoding_message_size(GRPC_MESSAGE_LIMIT)
                    .max_encoding_message_size(GRPC_MESSAGE_LIMIT),
            )
            .add_optional_service(insecure_agent)
            .add_optional_service(insecure_connector)
            .add_service(health)
            .add_service(reflection)
            // TCP_NODELAY: box messages, acks and key-exchange replies are small and each waits on
            // the answer to the last; Nagle held them ~40 ms.
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            )
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });

    let box_task = serve_boxes(&config, &hive, box_listener, box_addr, shutdown_rx.clone())?;

    let scheduler_task = tokio::spawn(scheduler::run(hive.clone(), config.tick));
    if let Some(keep) = config.retention {
        // Ends on the shutdown flag.
        tokio::spawn(crate::retention::run(hive.clone(), keep, RETENTION_EVERY));
    }
    // Ends on the shutdown flag, like the scheduler.
    tokio::spawn(keyexchange::run_revoker(hive.clone()));
    // Commit statuses to the forges; ends on the shutdown flag (sends in flight are bounded
    // by their timeout, and a status sent twice after a stop is harmless).
    let mut forge = config.forge.clone();
    forge.public_url = config
        .public_url
        .as_deref()
        .map(|u| u.trim().trim_end_matches('/').to_string());
    forge.retention = config.retention;
    tokio::spawn(crate::forge::outbox::run(hive.clone(), forge, forge_tls));
    // The queue depth per minute for the dashboard's chart; ends on the shutdown flag.
    tokio::spawn(crate::sampler::run(hive.clone(), crate::sampler::EVERY));
    tracing::info!(%http_addr, %grpc_addr, %box_addr, lease_ms = millis(config.lease),
        control_plane_id = %hive.bus.origin(), shared_db = hive.bus.is_shared(),
        placement = ?config.placement, ca_sha256 = %ca.sha256(), "control plane listening");
    Ok(Handle {
        http_addr,
        grpc_addr,
        box_addr,
        grpc_tls,
        http_tls,
        admin_token,
        hive,
        shutdown_tx,
        http_task,
        grpc_task,
        box_task,
        scheduler_task,
        intake_task,
        _db_lock: db_lock,
    })
}

/// The HTTP listener as bound: plaintext (loopback) or TLS.
enum HttpListener {
    Plain(TcpListener),
    Tls(crate::tls::TlsListener),
}

/// One control plane per SQLite file: two would each think their scheduler and box sessions
/// are the only ones. The lock (`<file>.lock`) is the kernel's, so it goes with the process
/// however it ends. PostgreSQL databases are shared (see `cluster`).
fn lock_sqlite(url: &str) -> Result<Option<std::fs::File>, ServerError> {
    let Some(path) = crate::store::sqlite_file(url) else {
        return Ok(None);
    };
    let lock_path = format!("{path}.lock");
    if let Some(parent) = std::path::Path::new(&lock_path).parent() {
        if !parent.as_os_str().is_empty() {
            let _ = std::fs::create_dir_all(parent);
        }
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|e| ServerError::Cluster(format!("open lock file {lock_path}: {e}")))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(ServerError::Cluster(format!(
            "another control plane is using the SQLite database {path} (it holds {lock_path}): \
             a SQLite file serves one control plane; stop that one, or run several on one \
             PostgreSQL (--db postgres://...)"
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(ServerError::Cluster(format!("lock {lock_path}: {e}")))
        }
    }
}

/// Every control plane of one database must sign box certificates with the same CA and seal
/// secrets with the same key; the first one to start records their fingerprints, a later one
/// with others refuses to start (its boxes' certificates and its secrets would not work on
/// the others).
async fn check_identity(
    store: &Store,
    ca: &crate::pki::Ca,
    sealer: &crate::secrets::Sealer,
    regions: &crate::regions::Regions,
) -> Result<(), ServerError> {
    let name_there = store.claim_identity("hive_name", &regions.name).await?;
    if name_there != regions.name {
        return Err(ServerError::Cluster(format!(
            "this database belongs to hive {name_there:?}, and this control plane was started \
             as hive {:?}: every control plane of one database is one hive; start it with \
             --hive-name {name_there} (each hive keeps its own database)",
            regions.name
        )));
    }
    let ca_there = store.claim_identity("ca_sha256", ca.sha256()).await?;
    if ca_there != ca.sha256() {
        return Err(ServerError::Cluster(format!(
            "this database belongs to a hive whose CA is sha256:{ca_there}, and this control \
             plane's (<data-dir>/pki) is sha256:{}: every control plane of one database needs \
             the same CA; copy pki/ca.key and pki/ca.pem from the first control plane's data \
             dir (or point --data-dir at a copy)",
            ca.sha256()
        )));
    }
    let key_there = store
        .claim_identity("secrets_key_id", sealer.key_id())
        .await?;
    if key_there != sealer.key_id() {
        return Err(ServerError::Cluster(format!(
            "this database's secrets are sealed with another key (id {}...) than this control \
             plane's (id {}...): every control plane of one database needs the same secrets \
             key; copy secrets.key from the first control plane's data dir (or use \
             --secrets-key-file)",
            &key_there[..12.min(key_there.len())],
            &sealer.key_id()[..12]
        )));
    }
    Ok(())
}

/// The names a listener certificate from the CA is valid for: the configured ones, `localhost`,
/// the loopback addresses, this host's name and the listeners' own IPs when they are specific.
fn server_names(config: &Config, addrs: &[SocketAddr]) -> Vec<String> {
    let mut names = config.tls_sans.clone();
    names.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        if !h.trim().is_empty() {
            names.push(h.trim().to_string());
        }
    }
    for addr in addrs {
        if !addr.ip().is_unspecified() {
            names.push(addr.ip().to_string());
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// Serves `BoxAgent` on the box listener: TLS with a server certificate from the CA, client
/// certificates verified against it (optional at the TLS layer, because `Join` is made before
/// the box has one; every other call requires it).
fn serve_boxes(
    config: &Config,
    hive: &Arc<Hive>,
    listener: TcpListener,
    box_addr: SocketAddr,
    mut stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, ServerError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let names = server_names(config, &[box_addr]);
    let (chain, key) = hive.ca.server_identity(&names)?;
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(chain, key))
        .client_ca_root(Certificate::from_pem(hive.ca.cert_pem()))
        .client_auth_optional(true)
        // A peer that connects and never finishes its handshake holds nothing for longer.
        .timeout(crate::tls::HANDSHAKE_TIMEOUT);
    let builder = tonic::transport::Server::builder()
        .tls_config(tls)
        .map_err(|e| ServerError::Config(format!("box listener TLS: {e}")))?;
    tracing::info!(%box_addr, ?names, "agent listener: TLS; boxes authenticated by certificate, connectors by token");
    let agent = BoxAgentService::new(hive.clone());
    let connector = ConnectorService { hive: hive.clone() };
    let streams = config.grpc_streams_per_connection;
    // Bounded: a peer (or many) holding connections open cannot take every socket.
    let incoming = crate::tls::limited_incoming(
        listener,
        crate::tls::BOX_MAX_CONNECTIONS,
        crate::tls::BOX_MAX_PER_IP,
        stop.clone(),
    );
    Ok(tokio::spawn(async move {
        let served = builder
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .max_concurrent_streams(Some(streams))
            .add_service(
                BoxAgentServer::new(agent)
                    .max_decoding_message_size(GRPC_MESSAGE_LIMIT)
                    .max_encoding_message_size(GRPC_MESSAGE_LIMIT),
            )
            .add_service(
                ConnectorServer::new(connector)
                    .max_decoding_message_size(GRPC_MESSAGE_LIMIT)
                    .max_encoding_message_size(GRPC_MESSAGE_LIMIT),
            )
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "box listener failed");
        }
    }))
}
