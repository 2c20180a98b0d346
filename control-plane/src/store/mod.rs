//! The durable store: projects, builds and their transitions, log chunks, webhook deliveries,
//! boxes, cells, leases and private networks, in SQLite (a file, the zero-set-up default) or
//! PostgreSQL, through one sqlx `Any` pool. Every build state change is one transaction that also
//! writes its transition row and is conditional on the state (and lease) it expects, so two
//! racing writers cannot both win; callers announce a change only after the call returned (after
//! commit).
//!
//! One file per table family: `projects`, `deliveries`, `builds` (with transitions), `leases`,
//! `logs`, `boxes` (with cells and the box session's [`BoxBatch`]), `networks` (private
//! networks, connectors, tunnel leases), `forges` (forge credentials, the commit-status
//! outbox), `tokens` (API tokens, hashed) and `audit` (who changed
//! what; each entry in its change's transaction). Rows are read into `sqlx::FromRow` records of the
//! column types and converted with checked conversions ([`checked`]); a value out of range is
//! [`StoreError::Corrupt`], never a wrapped number. Each write has one path, a `*_tx` function
//! taking the transaction; the `Store` methods run it in a transaction of their own (`in_tx!`).
//!
//! Portability rules kept here: `$n` placeholders, times as i64 ms, ids and states as TEXT,
//! flags as 0/1 BIGINT, one migrations folder per database (`migrations/{sqlite,postgres}`).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use hive_proto::v1::BuildState;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyPool, Executor, Transaction};

/// Runs one write path (a `*_tx` function, or a few) in a transaction of its own and commits it:
/// `in_tx!(store, "commit what", |tx| expr)`, where `expr` awaits on `tx: &mut Transaction` and
/// gives a `Result`. An error returns before the commit, and the dropped transaction rolls back.
/// (A macro, not a function taking an async closure: the futures must stay `Send` for tonic.)
macro_rules! in_tx {
    ($store:expr, $op:expr, |$tx:ident| $body:expr) => {{
        let mut tx = $store.begin().await?;
        let out = {
            let $tx = &mut tx;
            $body
        }?;
        tx.commit().await.map_err($crate::store::q($op))?;
        Ok(out)
    }};
}

mod artifacts;
mod audit;
mod box_certs;
mod boxes;
mod builds;
mod deliveries;
mod forges;
mod leases;
mod logs;
pub mod networks;
mod projects;
mod retention;
mod secrets;
mod tokens;

pub use artifacts::{ArtifactRow, ArtifactTarget};
pub use audit::{Audit, AuditRow, Forgotten, MAX_AUDIT_PAGE};
pub use box_certs::{BoxCertRow, JoinRefused, JoinTokenRevoke, JoinTokenRow, PurgedCredentials};
pub use boxes::{BoxBatch, BoxRow, CellRow, CellsWrite, BOX_STATE_LOCK};
pub use builds::{Acceptance, BuildFilter, BuildRow, Placement, Requeued, TransitionRow};
pub use deliveries::{Delivery, NewDelivery};
pub use forges::{ForgeRow, OutboxSummary, StatusRow};
pub use leases::LeaseRow;
pub use logs::{LogStored, MAX_CHUNK_SEQ};
pub use networks::{ConnectorRow, Issued, NetworkError, NetworkRow, TunnelLeaseRow};
pub use projects::{repo_key, NewProject, ProjectRow};
pub use retention::Purged;
pub use secrets::SealedSecret;
pub use tokens::{TokenRow, BOOTSTRAP_TOKEN_ID};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Errors from the store. Each names the operation and its subject.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database URL {0:?} is neither sqlite:// nor postgres://")]
    UnsupportedUrl(String),
    #[error("create database directory {path}: {source}")]
    CreateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to database {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("connect to database {url}: no answer within {secs} s (is the server up, and is this its address?)")]
    ConnectTimeout { url: String, secs: u64 },
    #[error("run {kind} migrations: {source}")]
    Migrate {
        kind: &'static str,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("project named {0:?} already exists")]
    ProjectExists(String),
    #[error("{op}: {source}")]
    Query {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
    #[error("value {value} for column {col} does not fit a 64-bit integer")]
    OutOfRange { col: &'static str, value: String },
    #[error("box messages not stored: {0} (nothing was acknowledged; the box sends them again)")]
    GroupCommit(&'static str),
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

pub(crate) fn q(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { op, source }
}

/// Which database sits behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

impl DbKind {
    /// Picks the database from the URL scheme.
    pub fn from_url(url: &str) -> Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(DbKind::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DbKind::Postgres)
        } else {
            Err(StoreError::UnsupportedUrl(url.to_string()))
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DbKind::Sqlite => "sqlite",
            DbKind::Postgres => "postgres",
        }
    }
}

// Re-exported so the store's modules and callers keep one import path.
pub use hive_sys::now_ms;

/// A new id: UUIDv7, so ids sort by creation time.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The handle on the database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// For reads outside transactions that API callers wait on (logs, builds, projects). On a
    /// SQLite file these are separate read-only connections: under WAL they see every commit
    /// that returned before they start, without queueing behind the one writer connection.
    /// Elsewhere the same pool as `pool`.
    reads: AnyPool,
    /// The scheduler's reads of the queue and its placements. On PostgreSQL connections of their
    /// own ([`PLACE_CONNECTIONS`]): with a hundred box sessions writing, a round waited up to
    /// 140 ms for one of the shared pool's connections, every round. Elsewhere `pool`.
    placing: AnyPool,
    kind: DbKind,
    /// Most bytes of log kept per build (see `logs::store_log_tx`).
    log_cap: u64,
    /// Most attempts of a build (placements that ended without an outcome) before it fails.
    max_attempts: u32,
    /// Projects for webhook lookups (see `projects`), shared by the store's clones.
    projects: std::sync::Arc<projects::ProjectCache>,
    /// SQLite: the box sessions' shared transaction (see `boxes::BoxGroup`).
    box_group: std::sync::Arc<boxes::BoxGroup>,
    /// SQLite file: the connection of the WAL checkpointer ([`checkpointer`]).
    checkpoints: Option<AnyPool>,
    /// PostgreSQL: the connection the webhook group commit keeps between groups (see
    /// `deliveries::Store::record_leaders_pg`).
    intake_conn: std::sync::Arc<tokio::sync::Mutex<Option<KeptConnection>>>,
    /// Set by [`Store::close`] before it takes the kept connection back: a group that finishes
    /// after that keeps nothing (a connection kept then would hold the pool's close for ever).
    closing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// A pool connection kept out of the pool, with the time it was last used.
type KeptConnection = (sqlx::pool::PoolConnection<Any>, std::time::Instant);

/// SQLite: how often [`checkpointer`] copies the WAL back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// SQLite: how long the WAL may stay uncopied before [`checkpointer`] warns, and how often a
/// lasting checkpoint error is repeated.
const CHECKPOINT_WARN_AFTER: Duration = Duration::from_secs(60);
/// SQLite: how long [`Store::close`] waits for a checkpoint in flight.
const CHECKPOINT_CLOSE_WAIT: Duration = Duration::from_secs(2);
/// SQLite: the WAL file is cut back to this size whenever a checkpoint lets it start over.
const WAL_SIZE_LIMIT: u64 = 64 * 1024 * 1024;

/// PostgreSQL: connections of the scheduler's own (see `Store::placing`): one per part of a
/// placement round run side by side (`builds::PLACE_PARTS`), and one for the read of the next
/// batch meanwhile.
const PLACE_CONNECTIONS: u32 = 5;

/// The per-build log cap unless the operator sets one.
pub const DEFAULT_LOG_CAP: u64 = 64 * 1024 * 1024;
/// Attempts a build gets by default before a re-queue fails it (rejections, lost boxes,
/// unconfirmed or expired leases each end one).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

impl Store {
    /// The same store with a per-build log cap of `bytes`.
    pub fn with_log_cap(mut self, bytes: u64) -> Store {
        self.log_cap = bytes;
        self
    }

    /// Sets the most attempts a build gets (at least 1) before a re-queue fails it instead.
    pub fn with_max_attempts(mut self, attempts: u32) -> Store {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Opens (creating a SQLite file if missing) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let kind = DbKind::from_url(url)?;
        let mut url = url.to_string();
        if kind == DbKind::Sqlite {
            if let Some(path) = sqlite_path(&url) {
                if let Some(parent) = Path::new(&path).parent() {
                    if !parent.as_os_str().is_empty() {
                        std::fs::create_dir_all(parent).map_err(|source| {
                            StoreError::CreateDir {
                                path: parent.display().to_string(),
                                source,
                            }
                        })?;
                    }
                }
            }
            if !url.contains("mode=") {
                url.push_str(if url.contains('?') { "&" } else { "?" });
                url.push_str("mode=rwc");
            }
        }
        let shown = redact(&url);
        let connect_err = |source| StoreError::Connect {
            url: shown.clone(),
            source,
        };
        let options = AnyConnectOptions::from_str(&url).map_err(connect_err)?;
        let read_options = options.clone();
        let checkpoint_options = options.clone();
        let pool_options = match kind {
            // One connection: SQLite serializes writers anyway, and a single connection cannot
            // hit the "upgrade a read transaction to write" SQLITE_BUSY that busy_timeout does
            // not cover.
            DbKind::Sqlite => {
                AnyPoolOptions::new()
                    .max_connections(1)
                    // The connection is a file this process opened, not a socket that can go
                    // stale: no ping (a round trip to its worker thread) before every use.
                    .test_before_acquire(false)
                    .after_connect(|conn, _meta| {
                        Box::pin(async move {
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute("PRAGMA busy_timeout = 5000").await?;
                            conn.execute("PRAGMA synchronous = FULL").await?;
                            conn.execute(
                                format!("PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}").as_str(),
                            )
                            .await?;
                            Ok(())
                        })
                    })
            }
            DbKind::Postgres => AnyPoolOptions::new().max_connections(16),
        };
        let placing_options = options.clone();
        if kind == DbKind::Postgres {
            // One connection first, so an unreachable server is reported by its cause
            // ("connection refused", "password authentication failed") rather than as the
            // pool's "timed out" ten seconds later.
            use sqlx::Connection as _;
            match tokio::time::timeout(
                Duration::from_secs(10),
                sqlx::AnyConnection::connect_with(&options),
            )
            .await
            {
                Ok(Ok(conn)) => {
                    let _ = conn.close().await;
                }
                Ok(Err(source)) => return Err(connect_err(source)),
                Err(_) => {
                    return Err(StoreError::ConnectTimeout {
                        url: shown.clone(),
                        secs: 10,
                    })
                }
            }
        }
        let pool = pool_options
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(connect_err)?;
        let migrator = match kind {
            DbKind::Sqlite => &SQLITE_MIGRATIONS,
            DbKind::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator
            .run(&pool)
            .await
            .map_err(|source| StoreError::Migrate {
                kind: kind.name(),
                source,
            })?;
        // Opened after the migrations, so the file exists and is in WAL mode. An in-memory
        // database is one per connection: there the writer serves the reads too.
        let reads = match kind {
            DbKind::Sqlite if sqlite_path(&url).is_some() => AnyPoolOptions::new()
                .max_connections(2)
                .test_before_acquire(false)
                .after_connect(|conn, _meta| {
                    Box::pin(async move {
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                        conn.execute("PRAGMA query_only = ON").await?;
                        Ok(())
                    })
                })
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(read_options)
                .await
                .map_err(connect_err)?,
            _ => pool.clone(),
        };
        let placing = match kind {
            DbKind::Postgres => AnyPoolOptions::new()
                .max_connections(PLACE_CONNECTIONS)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(placing_options)
                .await
                .map_err(connect_err)?,
            DbKind::Sqlite => pool.clone(),
        };
        // Its own connection (not query_only): the checkpoint writes the database file.
        let checkpoints = match kind {
            DbKind::Sqlite if sqlite_path(&url).is_some() => {
                let c = AnyPoolOptions::new()
                    .max_connections(1)
                    .test_before_acquire(false)
                    .after_connect(|conn, _meta| {
                        Box::pin(async move {
                            conn.execute("PRAGMA busy_timeout = 5000").await?;
                            Ok(())
                        })
                    })
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(checkpoint_options)
                    .await
                    .map_err(connect_err)?;
                Some(c)
            }
            _ => None,
        };
        let store = Store {
            pool,
            reads,
            placing,
            kind,
            log_cap: DEFAULT_LOG_CAP,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            projects: Default::default(),
            box_group: Default::default(),
            checkpoints,
            intake_conn: Default::default(),
            closing: Default::default(),
        };
        let rekeyed = store.rekey_projects().await?;
        if rekeyed > 0 {
            tracing::info!(
                projects = rekeyed,
                "repository keys brought to this version's rule"
            );
        }
        // Only once the store is open: a failed open leaves no task behind.
        if let Some(c) = &store.checkpoints {
            tokio::spawn(checkpointer(c.clone(), shown.clone()));
        }
        Ok(store)
    }

    pub fn kind(&self) -> DbKind {
        self.kind
    }

    /// Waits for in-flight queries and closes every connection.
    pub async fn close(&self) {
        if let Some(c) = &self.checkpoints {
            // A checkpoint in flight is only a copy of what is already committed: not worth
            // holding a shutdown for (SQLite finishes or rolls it back on the next open).
            if tokio::time::timeout(CHECKPOINT_CLOSE_WAIT, c.close())
                .await
                .is_err()
            {
                tracing::warn!("a WAL checkpoint was still running at close; left to SQLite");
            }
        }
        self.reads.close().await;
        self.placing.close().await;
        // A connection kept out of the pool would hold its close up until it came back. From
        // here on a group keeps none (it checks `closing` under the lock), so this waits at
        // most for a group still committing (none: the webhook committer ends first).
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut held) =
            tokio::time::timeout(CHECKPOINT_CLOSE_WAIT, self.intake_conn.lock()).await
        {
            held.take();
        }
        self.pool.close().await;
    }

    /// Sends `payload` to the listeners of `channel` (PostgreSQL `NOTIFY`; other control
    /// planes of this database). Nothing on SQLite.
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<()> {
        if self.kind != DbKind::Postgres {
            return Ok(());
        }
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(&self.pool)
            .await
            .map_err(q("notify the other control planes"))?;
        Ok(())
    }

    /// Whether the control plane `origin` is alive: its listening connection is open
    /// ([`crate::cluster::presence_name`]). Always false on SQLite (one control plane).
    pub async fn control_plane_present(&self, origin: &str) -> Result<bool> {
        if self.kind != DbKind::Postgres {
            return Ok(false);
        }
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
                .bind(crate::cluster::presence_name(origin))
                .fetch_one(&self.pool)
                .await
                .map_err(q("look for another control plane's connection"))?;
        Ok(n > 0)
    }

    /// Records `value` under `name` in the hive's identity if none is there, and returns
    /// what is there (the first control plane's value wins).
    pub async fn claim_identity(&self, name: &str, value: &str) -> Result<String> {
        sqlx::query(
            "INSERT INTO hive_identity (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(value)
        .execute(&self.pool)
        .await
        .map_err(q("record hive identity"))?;
        let (v,): (String,) = sqlx::query_as("SELECT value FROM hive_identity WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .map_err(q("read hive identity"))?;
        Ok(v)
    }

    /// A round trip to the database (for `/healthz`).
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(q("health check query"))?;
        Ok(())
    }

    async fn begin(&self) -> Result<Transaction<'static, Any>> {
        self.pool.begin().await.map_err(q("begin transaction"))
    }
}

/// A stored integer as the narrower or unsigned type a row field has; out of range is corrupt
/// (never wrapped).
pub(crate) fn checked<T, V>(col: &'static str, v: V) -> Result<T>
where
    T: TryFrom<V>,
    V: Copy + std::fmt::Display,
{
    T::try_from(v).map_err(|_| {
        StoreError::Corrupt(format!(
            "column {col}: {v} is out of range for {}",
            std::any::type_name::<T>()
        ))
    })
}

/// A number to bind into an i64 column; one that does not fit is refused (never wrapped).
pub(crate) fn to_i64<V>(col: &'static str, v: V) -> Result<i64>
where
    i64: TryFrom<V>,
    V: Copy + std::fmt::Display,
{
    i64::try_from(v).map_err(|_| StoreError::OutOfRange {
        col,
        value: v.to_string(),
    })
}

pub(crate) fn parse_state(s: &str) -> Result<BuildState> {
    BuildState::from_short_name(s).ok_or_else(|| StoreError::Corrupt(format!("build state {s:?}")))
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_string())
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(col: &str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("column {col}: {e}")))
}

/// The file path of a `sqlite://` URL (None for in-memory databases).
/// The file of a `sqlite:` URL (None for in-memory databases).
pub fn sqlite_file(url: &str) -> Option<String> {
    sqlite_path(url)
}

/// SQLite file: copies the WAL back into the database file every [`CHECKPOINT_EVERY`], from a
/// connection of its own, until its pool closes.
///
/// SQLite's own automatic checkpoint runs on the writer connection after a commit, and only
/// then. In two runs of `hive-bench schedule` (2026-12-06, before this task) it never copied a
/// page back: the WAL reached 14 GB in 7 minutes (241 MB in 8 s in the other run), the database
/// file stayed one page long, and every statement slowed as it searched the WAL
/// (`walFindFrame` was 28% of the control plane's CPU). Later runs of the same binary and
/// workload checkpointed normally; why those two did not is not known. A PASSIVE checkpoint
/// from another connection never blocks the writer or a reader: it copies what no reader still
/// needs, and once all is copied the next commit starts the WAL over (cut back to
/// `journal_size_limit`). If readers hold it back for a minute, it says so.
async fn checkpointer(pool: AnyPool, db: String) {
    use sqlx::Row as _;
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut behind = Behind::default();
    let mut last_error: Option<std::time::Instant> = None;
    loop {
        tick.tick().await;
        if pool.is_closed() {
            return;
        }
        let res = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&pool)
            .await
            .and_then(|row| {
                Ok((
                    row.try_get::<i64, _>(0)?,
                    row.try_get::<i64, _>(1)?,
                    row.try_get::<i64, _>(2)?,
                ))
            });
        match res {
            Ok((busy, log, copied)) => {
                last_error = None;
                match behind.saw(busy != 0, log, copied, std::time::Instant::now()) {
                    Some(Said::Behind) => tracing::warn!(%db, wal_frames = log, copied,
                        "SQLite has not copied its WAL back for a minute and the WAL keeps growing: a long reader holds it back"),
                    Some(Said::CaughtUp) => {
                        tracing::info!(%db, "SQLite's WAL is copied back again")
                    }
                    None => {}
                }
            }
            Err(_) if pool.is_closed() => return,
            Err(e) => {
                // Said once a minute while it lasts, not every tick.
                if last_error.is_none_or(|t| t.elapsed() >= CHECKPOINT_WARN_AFTER) {
                    last_error = Some(std::time::Instant::now());
                    tracing::warn!(%db, error = %e, "SQLite WAL checkpoint failed; trying again");
                }
            }
        }
    }
}

/// What [`Behind::saw`] has to say.
#[derive(Debug, PartialEq, Eq)]
enum Said {
    Behind,
    CaughtUp,
}

/// Whether the checkpoints have been falling behind: frames left uncopied (or the checkpoint
/// busy) on every tick for [`CHECKPOINT_WARN_AFTER`], with the WAL never starting over in that
/// time. Steady readers leave a few frames behind on most ticks, yet the WAL starts over
/// between them (its frame count drops): that is no reason to warn.
#[derive(Default)]
struct Behind {
    /// Since when, and the WAL's frame count at the last tick.
    since: Option<(std::time::Instant, i64)>,
    warned: bool,
}

impl Behind {
    fn saw(&mut self, busy: bool, log: i64, copied: i64, now: std::time::Instant) -> Option<Said> {
        let left_behind = busy || copied < log;
        let started_over = matches!(self.since, Some((_, prev)) if log >= 0 && log < prev);
        if !left_behind || started_over {
            self.since = if left_behind { Some((now, log)) } else { None };
            return std::mem::take(&mut self.warned).then_some(Said::CaughtUp);
        }
        let (since, _) = *self.since.get_or_insert((now, log));
        if log >= 0 {
            self.since = Some((since, log));
        }
        if !self.warned && now.duration_since(since) >= CHECKPOINT_WARN_AFTER {
            self.warned = true;
            return Some(Said::Behind);
        }
        None
    }
}

fn sqlite_path(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or("");
    if path.is_empty() || path == ":memory:" {
        None
    } else {
        Some(path.to_string())
    }
}

/// The URL with any password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((creds, host)) = rest.split_once('@') {
            if let Some((user, _)) = creds.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpointer_warns_only_when_the_wal_never_starts_over() {
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Steady readers: frames left behind on every tick, but the WAL starts over.
        let mut b = Behind::default();
        for s in 0..200 {
            let log = 100 + (s % 7) as i64 * 10;
            assert_eq!(b.saw(false, log, log - 5, at(s)), None, "tick {s}");
        }
        // A reader that holds it back: the WAL only grows; one warning, after a minute.
        let mut b = Behind::default();
        let said: Vec<_> = (0..200)
            .filter_map(|s| b.saw(false, 100 + s as i64, 10, at(s)).map(|w| (s, w)))
            .collect();
        assert_eq!(said, vec![(60, Said::Behind)]);
        // Busy (-1, -1) counts as behind; all copied again is said once.
        let mut b = Behind::default();
        assert_eq!(b.saw(true, -1, -1, at(0)), None);
        assert_eq!(b.saw(true, -1, -1, at(61)), Some(Said::Behind));
        assert_eq!(b.saw(true, -1, -1, at(200)), None);
        assert_eq!(b.saw(false, 50, 50, at(201)), Some(Said::CaughtUp));
        assert_eq!(b.saw(false, 50, 50, at(202)), None);
    }

    #[test]
    fn repo_keys_ignore_git_suffix_slash_scheme_and_case() {
        for url in [
            "https://github.com/o/r.git",
            "https://github.com/o/r/",
            " https://github.com/O/R.git/ ",
            "git@github.com:o/r.git",
        ] {
            assert_eq!(repo_key(url), "github.com/o/r", "{url}");
        }
        assert_eq!(repo_key("not a url"), "not a url");
    }

    #[test]
    fn urls() {
        assert_eq!(
            DbKind::from_url("sqlite:///tmp/x.db").unwrap(),
            DbKind::Sqlite
        );
        assert_eq!(
            DbKind::from_url("postgres://a@b/c").unwrap(),
            DbKind::Postgres
        );
        assert!(DbKind::from_url("mysql://x").is_err());
        assert_eq!(
            sqlite_path("sqlite:///tmp/x.db?mode=rwc").unwrap(),
            "/tmp/x.db"
        );
        assert_eq!(sqlite_path("sqlite://rel/x.db").unwrap(), "rel/x.db");
        assert_eq!(
            redact("postgres://hive:pw@h:5432/db"),
            "postgres://hive:***@h:5432/db"
        );
    }
}
