//! The durable store: projects, builds and their transitions, log chunks, webhook deliveries,
//! boxes, cells and leases, in SQLite (a file, the zero-set-up default) or PostgreSQL, through one
//! sqlx `Any` pool. Every build state change is one transaction that also writes its transition
//! row and is conditional on the state (and lease) it expects, so two racing writers cannot both
//! win; callers announce a change only after the call returned (after commit).
//!
//! Portability rules kept here: `$n` placeholders, times as i64 ms, ids and states as TEXT,
//! flags as 0/1 BIGINT, one migrations folder per database (`migrations/{sqlite,postgres}`).

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use hive_proto::v1::{BuildState, LogChunk, LogStream};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Executor, Row, Transaction};

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

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A new id: UUIDv7, so ids sort by creation time.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A project as stored (the secret included: it is the webhook HMAC key).
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectRow {
    pub id: String,
    pub name: String,
    pub repo_url: String,
    pub secret: String,
    pub branch: String,
    pub size_class: String,
    pub private_network: String,
    pub steps: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout_secs: u32,
    pub created_at_ms: i64,
}

/// What `create_project` needs; already validated by the caller.
#[derive(Debug, Clone)]
pub struct NewProject {
    pub name: String,
    pub repo_url: String,
    pub secret: String,
    pub branch: String,
    pub size_class: String,
    pub private_network: String,
    pub steps: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout_secs: u32,
}

/// A build as stored. Steps, env and timeout are a snapshot of the project at trigger time.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildRow {
    pub id: String,
    pub project_id: String,
    pub project_name: String,
    pub repo_url: String,
    pub revision: String,
    pub git_ref: String,
    pub state: BuildState,
    pub box_id: String,
    pub cell_id: String,
    pub lease_id: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub started_at_ms: i64,
    pub exit_code: i32,
    pub message: String,
    pub trigger: String,
    pub size_class: String,
    pub private_network: String,
    pub steps: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout_secs: u32,
    pub warm_start: bool,
    pub attempt: u32,
    /// The cell backend of the box it was last placed on (`microvm`, `sandbox`; empty before).
    pub backend: String,
}

impl BuildRow {
    /// A fresh queued build of `project`.
    pub fn new_queued(project: &ProjectRow, revision: &str, git_ref: &str, trigger: &str) -> Self {
        let now = now_ms();
        BuildRow {
            id: new_id(),
            project_id: project.id.clone(),
            project_name: project.name.clone(),
            repo_url: project.repo_url.clone(),
            revision: revision.to_string(),
            git_ref: git_ref.to_string(),
            state: BuildState::Queued,
            box_id: String::new(),
            cell_id: String::new(),
            lease_id: String::new(),
            created_at_ms: now,
            updated_at_ms: now,
            started_at_ms: 0,
            exit_code: -1,
            message: "queued".to_string(),
            trigger: trigger.to_string(),
            size_class: project.size_class.clone(),
            private_network: project.private_network.clone(),
            steps: project.steps.clone(),
            env: project.env.clone(),
            timeout_secs: project.timeout_secs,
            warm_start: false,
            backend: String::new(),
            attempt: 1,
        }
    }
}

/// One row of `build_transitions`.
#[derive(Debug, Clone, PartialEq)]
pub struct TransitionRow {
    pub state: BuildState,
    pub at_ms: i64,
    pub reason: String,
}

/// A live lease.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRow {
    pub id: String,
    pub build_id: String,
    pub box_id: String,
    pub deadline_ms: i64,
    pub confirmed: bool,
}

/// A placement the scheduler wants to make.
#[derive(Debug, Clone)]
pub struct Placement {
    pub build_id: String,
    pub lease_id: String,
    pub box_id: String,
    /// The box's cell backend, recorded with the build.
    pub backend: String,
    pub deadline_ms: i64,
}

/// A box as stored. `state` is the operator's intent (active, cordoned, draining, left);
/// whether it is connected lives in memory (see `boxes`).
#[derive(Debug, Clone, PartialEq)]
pub struct BoxRow {
    pub id: String,
    pub hostname: String,
    pub state: String,
    pub backend: String,
    pub pools_json: String,
    pub last_heartbeat_ms: i64,
    pub registered_at_ms: i64,
    pub acked_seq: u64,
}

/// A cell as last reported by its box.
#[derive(Debug, Clone, PartialEq)]
pub struct CellRow {
    pub id: String,
    pub box_id: String,
    pub size_class: String,
    pub state: String,
    pub build_id: String,
    pub updated_at_ms: i64,
}

/// What a webhook delivery turned into.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// First time this delivery id was seen; the build (if any) was inserted with it.
    New,
    /// Seen before: the stored answer.
    Duplicate { build_id: String, outcome: String },
}

/// Filters for `list_builds`.
#[derive(Debug, Clone, Default)]
pub struct BuildFilter {
    pub project_id: Option<String>,
    pub state: Option<BuildState>,
    pub limit: u32,
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
    kind: DbKind,
}

const BUILD_COLUMNS: &str = "id, project_id, project_name, repo_url, revision, git_ref, state, \
    box_id, cell_id, lease_id, created_at_ms, updated_at_ms, started_at_ms, exit_code, message, \
    trigger_source, size_class, private_network, steps_json, env_json, timeout_secs, warm_start, \
    attempt, backend";

const PROJECT_COLUMNS: &str = "id, name, repo_url, secret, branch, size_class, private_network, \
    steps_json, env_json, timeout_secs, created_at_ms";

/// Normalizes a repository URL for matching: trims, drops a trailing `/` and `.git`.
pub fn repo_key(url: &str) -> String {
    let mut s = url.trim();
    s = s.trim_end_matches('/');
    if let Some(stripped) = s.strip_suffix(".git") {
        s = stripped;
    }
    s.trim_end_matches('/').to_string()
}

impl Store {
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
        let pool_options = match kind {
            // One connection: SQLite serializes writers anyway, and a single connection cannot
            // hit the "upgrade a read transaction to write" SQLITE_BUSY that busy_timeout does
            // not cover.
            DbKind::Sqlite => {
                AnyPoolOptions::new()
                    .max_connections(1)
                    .after_connect(|conn, _meta| {
                        Box::pin(async move {
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute("PRAGMA busy_timeout = 5000").await?;
                            conn.execute("PRAGMA synchronous = FULL").await?;
                            Ok(())
                        })
                    })
            }
            DbKind::Postgres => AnyPoolOptions::new().max_connections(16),
        };
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
        Ok(Store { pool, reads, kind })
    }

    pub fn kind(&self) -> DbKind {
        self.kind
    }

    /// The pool, for the other modules that own tables (`network`).
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Starts a transaction (for the other modules that own tables).
    pub(crate) async fn begin_tx(&self) -> Result<Transaction<'static, Any>> {
        self.begin().await
    }

    /// Waits for in-flight queries and closes every connection.
    pub async fn close(&self) {
        self.reads.close().await;
        self.pool.close().await;
    }

    /// A round trip to the database (for `/healthz`).
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(q("health check query"))?;
        Ok(())
    }

    // ---------------------------------------------------------------- projects

    pub async fn create_project(&self, p: &NewProject) -> Result<ProjectRow> {
        let row = ProjectRow {
            id: new_id(),
            name: p.name.clone(),
            repo_url: p.repo_url.clone(),
            secret: p.secret.clone(),
            branch: p.branch.clone(),
            size_class: p.size_class.clone(),
            private_network: p.private_network.clone(),
            steps: p.steps.clone(),
            env: p.env.clone(),
            timeout_secs: p.timeout_secs,
            created_at_ms: now_ms(),
        };
        let res = sqlx::query(
            "INSERT INTO projects (id, name, repo_url, repo_key, secret, branch, size_class, \
             private_network, steps_json, env_json, timeout_secs, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&row.id)
        .bind(&row.name)
        .bind(&row.repo_url)
        .bind(repo_key(&row.repo_url))
        .bind(&row.secret)
        .bind(&row.branch)
        .bind(&row.size_class)
        .bind(&row.private_network)
        .bind(to_json(&row.steps))
        .bind(to_json(&row.env))
        .bind(row.timeout_secs as i64)
        .bind(row.created_at_ms)
        .execute(&self.pool)
        .await
        .map_err(q("insert project"))?;
        if res.rows_affected() == 0 {
            return Err(StoreError::ProjectExists(row.name));
        }
        Ok(row)
    }

    /// A project by id or by name.
    pub async fn get_project(&self, name_or_id: &str) -> Result<Option<ProjectRow>> {
        let sql = format!("SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1 OR name = $1");
        let row = sqlx::query(&sql)
            .bind(name_or_id)
            .fetch_optional(&self.reads)
            .await
            .map_err(q("select project"))?;
        row.map(|r| project_from_row(&r)).transpose()
    }

    pub async fn list_projects(&self) -> Result<Vec<ProjectRow>> {
        let sql = format!("SELECT {PROJECT_COLUMNS} FROM projects ORDER BY name");
        let rows = sqlx::query(&sql)
            .fetch_all(&self.reads)
            .await
            .map_err(q("list projects"))?;
        rows.iter().map(project_from_row).collect()
    }

    /// Deletes a project; its builds stay (they carry a snapshot). False if there was none.
    pub async fn delete_project(&self, name_or_id: &str) -> Result<bool> {
        let res = sqlx::query("DELETE FROM projects WHERE id = $1 OR name = $1")
            .bind(name_or_id)
            .execute(&self.pool)
            .await
            .map_err(q("delete project"))?;
        Ok(res.rows_affected() > 0)
    }

    /// Projects whose repository URL matches any of `urls` (after [`repo_key`]).
    pub async fn projects_for_repo(&self, urls: &[String]) -> Result<Vec<ProjectRow>> {
        let mut keys: Vec<String> = urls
            .iter()
            .map(|u| repo_key(u))
            .filter(|k| !k.is_empty())
            .collect();
        keys.sort();
        keys.dedup();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let marks: Vec<String> = (1..=keys.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT {PROJECT_COLUMNS} FROM projects WHERE repo_key IN ({}) \
             ORDER BY created_at_ms, id",
            marks.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for k in &keys {
            query = query.bind(k);
        }
        let rows = query
            .fetch_all(&self.reads)
            .await
            .map_err(q("select projects by repository"))?;
        rows.iter().map(project_from_row).collect()
    }

    // ---------------------------------------------------------------- webhook deliveries

    /// Records a webhook delivery and, in the same transaction, its build (if any). A delivery
    /// id seen before changes nothing and returns the stored answer.
    pub async fn record_delivery(
        &self,
        delivery_id: &str,
        project_id: &str,
        build: Option<&BuildRow>,
        outcome: &str,
    ) -> Result<Delivery> {
        let mut tx = self.begin().await?;
        let res = sqlx::query(
            "INSERT INTO webhook_deliveries (delivery_id, project_id, build_id, outcome, at_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (delivery_id) DO NOTHING",
        )
        .bind(delivery_id)
        .bind(project_id)
        .bind(build.map(|b| b.id.as_str()).unwrap_or(""))
        .bind(outcome)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(q("insert webhook delivery"))?;
        if res.rows_affected() == 0 {
            tx.rollback().await.map_err(q("rollback"))?;
            let row = sqlx::query(
                "SELECT build_id, outcome FROM webhook_deliveries WHERE delivery_id = $1",
            )
            .bind(delivery_id)
            .fetch_one(&self.pool)
            .await
            .map_err(q("select webhook delivery"))?;
            return Ok(Delivery::Duplicate {
                build_id: get(&row, "build_id")?,
                outcome: get(&row, "outcome")?,
            });
        }
        if let Some(build) = build {
            insert_build_tx(&mut tx, build, "webhook push").await?;
        }
        tx.commit().await.map_err(q("commit webhook delivery"))?;
        Ok(Delivery::New)
    }

    // ---------------------------------------------------------------- builds

    /// Inserts a queued build with its first transition.
    pub async fn insert_build(&self, build: &BuildRow, reason: &str) -> Result<()> {
        let mut tx = self.begin().await?;
        insert_build_tx(&mut tx, build, reason).await?;
        tx.commit().await.map_err(q("commit new build"))?;
        Ok(())
    }

    pub async fn get_build(&self, id: &str) -> Result<Option<BuildRow>> {
        let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.reads)
            .await
            .map_err(q("select build"))?;
        row.map(|r| build_from_row(&r)).transpose()
    }

    /// Newest first.
    pub async fn list_builds(&self, filter: &BuildFilter) -> Result<Vec<BuildRow>> {
        let mut sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE 1 = 1");
        let mut n = 0;
        if filter.project_id.is_some() {
            n += 1;
            sql.push_str(&format!(" AND project_id = ${n}"));
        }
        if filter.state.is_some() {
            n += 1;
            sql.push_str(&format!(" AND state = ${n}"));
        }
        n += 1;
        sql.push_str(&format!(" ORDER BY created_at_ms DESC, id DESC LIMIT ${n}"));
        let mut query = sqlx::query(&sql);
        if let Some(p) = &filter.project_id {
            query = query.bind(p.clone());
        }
        if let Some(s) = filter.state {
            query = query.bind(s.short_name());
        }
        let limit = if filter.limit == 0 {
            100
        } else {
            filter.limit.min(10_000)
        };
        let rows = query
            .bind(limit as i64)
            .fetch_all(&self.reads)
            .await
            .map_err(q("list builds"))?;
        rows.iter().map(build_from_row).collect()
    }

    pub async fn transitions(&self, build_id: &str) -> Result<Vec<TransitionRow>> {
        let rows = sqlx::query(
            "SELECT state, at_ms, reason FROM build_transitions WHERE build_id = $1 ORDER BY id",
        )
        .bind(build_id)
        .fetch_all(&self.reads)
        .await
        .map_err(q("select build transitions"))?;
        rows.iter()
            .map(|r| {
                Ok(TransitionRow {
                    state: parse_state(&get::<String>(r, "state")?)?,
                    at_ms: get(r, "at_ms")?,
                    reason: get(r, "reason")?,
                })
            })
            .collect()
    }

    /// Queued builds, oldest first (the queue order).
    pub async fn queued_builds(&self, limit: u32) -> Result<Vec<BuildRow>> {
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM builds WHERE state = 'queued' \
             ORDER BY created_at_ms, id LIMIT $1"
        );
        let rows = sqlx::query(&sql)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(q("select queued builds"))?;
        rows.iter().map(build_from_row).collect()
    }

    /// Counts of builds per state, for `/metrics`.
    pub async fn count_builds_by_state(&self) -> Result<BTreeMap<String, i64>> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM builds GROUP BY state")
            .fetch_all(&self.reads)
            .await
            .map_err(q("count builds by state"))?;
        rows.iter()
            .map(|r| Ok((get::<String>(r, "state")?, get::<i64>(r, "n")?)))
            .collect()
    }

    /// Places queued builds: per placement, the build goes queued -> placed and a live lease is
    /// written, all in one transaction. Returns, per placement, whether it took (false when the
    /// build was no longer queued).
    pub async fn place(&self, placements: &[Placement]) -> Result<Vec<bool>> {
        let now = now_ms();
        let mut tx = self.begin().await?;
        let mut took = Vec::with_capacity(placements.len());
        for p in placements {
            let res = sqlx::query(
                "UPDATE builds SET state = 'placed', box_id = $1, lease_id = $2, cell_id = '', \
                 updated_at_ms = $3, message = $4, backend = $6 WHERE id = $5 AND state = 'queued'",
            )
            .bind(&p.box_id)
            .bind(&p.lease_id)
            .bind(now)
            .bind(format!("placed on box {}", p.box_id))
            .bind(&p.build_id)
            .bind(&p.backend)
            .execute(&mut *tx)
            .await
            .map_err(q("update build to placed"))?;
            if res.rows_affected() == 0 {
                took.push(false);
                continue;
            }
            sqlx::query(
                "INSERT INTO leases (id, build_id, box_id, deadline_ms, confirmed, state, \
                 created_at_ms) VALUES ($1, $2, $3, $4, 0, 'live', $5)",
            )
            .bind(&p.lease_id)
            .bind(&p.build_id)
            .bind(&p.box_id)
            .bind(p.deadline_ms)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(q("insert lease"))?;
            let reason = format!("placed on box {} (lease {})", p.box_id, p.lease_id);
            add_transition(&mut tx, &p.build_id, BuildState::Placed, now, &reason).await?;
            took.push(true);
        }
        tx.commit().await.map_err(q("commit placements"))?;
        Ok(took)
    }

    /// The box accepted the assignment: confirm the lease and record the cell.
    pub async fn confirm_lease(
        &self,
        build_id: &str,
        lease_id: &str,
        cell_id: &str,
        warm_start: bool,
        deadline_ms: i64,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let ok = confirm_lease_tx(
            &mut tx,
            None,
            build_id,
            lease_id,
            cell_id,
            warm_start,
            deadline_ms,
        )
        .await?;
        tx.commit().await.map_err(q("commit lease confirmation"))?;
        Ok(ok)
    }

    /// placed -> running (also confirms the lease: running implies accepted).
    pub async fn set_running(&self, build_id: &str, lease_id: &str, reason: &str) -> Result<bool> {
        let mut tx = self.begin().await?;
        let ok = set_running_tx(&mut tx, None, build_id, lease_id, reason).await?;
        tx.commit().await.map_err(q("commit running"))?;
        Ok(ok)
    }

    /// The box reports the end of the build under `lease_id`: placed|running -> terminal.
    pub async fn finish_build(
        &self,
        build_id: &str,
        lease_id: &str,
        state: BuildState,
        exit_code: i32,
        reason: &str,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let ok =
            finish_build_tx(&mut tx, None, build_id, lease_id, state, exit_code, reason).await?;
        tx.commit().await.map_err(q("commit finished build"))?;
        Ok(ok)
    }

    /// Puts a placed/running build under `lease_id` back in the queue (attempt + 1), ending the
    /// lease as `lease_end` (`expired` or `released`). The log keeps going densely: the new
    /// attempt's chunks are stored after a system line saying why the last attempt ended.
    pub async fn requeue(
        &self,
        build_id: &str,
        lease_id: &str,
        lease_end: &str,
        reason: &str,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let ok = requeue_tx(&mut tx, build_id, lease_id, lease_end, reason).await?;
        tx.commit().await.map_err(q("commit re-queue"))?;
        Ok(ok)
    }

    /// Ends a not-yet-terminal build as `state` (cancelled, timed_out, or failed when it cannot
    /// be run), releasing its lease. Returns the build as it was before, or None when it had
    /// already ended.
    pub async fn end_build(
        &self,
        build_id: &str,
        state: BuildState,
        reason: &str,
    ) -> Result<Option<BuildRow>> {
        debug_assert!(state.is_terminal());
        let now = now_ms();
        let mut tx = self.begin().await?;
        let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = $1");
        let Some(row) = sqlx::query(&sql)
            .bind(build_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(q("select build to end"))?
        else {
            tx.rollback().await.map_err(q("rollback"))?;
            return Ok(None);
        };
        let before = build_from_row(&row)?;
        if before.state.is_terminal() {
            tx.rollback().await.map_err(q("rollback"))?;
            return Ok(None);
        }
        let res = sqlx::query(
            "UPDATE builds SET state = $1, message = $2, updated_at_ms = $3 \
             WHERE id = $4 AND state = $5",
        )
        .bind(state.short_name())
        .bind(reason)
        .bind(now)
        .bind(build_id)
        .bind(before.state.short_name())
        .execute(&mut *tx)
        .await
        .map_err(q("update build to ended"))?;
        if res.rows_affected() == 0 {
            tx.rollback().await.map_err(q("rollback"))?;
            return Ok(None);
        }
        sqlx::query("UPDATE leases SET state = 'released' WHERE build_id = $1 AND state = 'live'")
            .bind(build_id)
            .execute(&mut *tx)
            .await
            .map_err(q("release lease"))?;
        add_transition(&mut tx, build_id, state, now, reason).await?;
        tx.commit().await.map_err(q("commit ended build"))?;
        Ok(Some(before))
    }

    /// Running builds whose timeout has passed.
    pub async fn overdue_builds(&self, now: i64) -> Result<Vec<BuildRow>> {
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM builds WHERE state = 'running' AND started_at_ms > 0 \
             AND started_at_ms + timeout_secs * 1000 <= $1"
        );
        let rows = sqlx::query(&sql)
            .bind(now)
            .fetch_all(&self.pool)
            .await
            .map_err(q("select overdue builds"))?;
        rows.iter().map(build_from_row).collect()
    }

    // ---------------------------------------------------------------- leases

    /// Pushes the deadline of `box_id`'s live leases on `build_ids`. Returns the ids among
    /// `build_ids` that have no live lease on this box (the box should stop them).
    pub async fn renew_leases(
        &self,
        box_id: &str,
        build_ids: &[String],
        deadline_ms: i64,
    ) -> Result<Vec<String>> {
        if build_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        let mut orphans = Vec::new();
        for b in build_ids {
            let res = sqlx::query(
                "UPDATE leases SET deadline_ms = $1 \
                 WHERE box_id = $2 AND build_id = $3 AND state = 'live' AND deadline_ms < $1",
            )
            .bind(deadline_ms)
            .bind(box_id)
            .bind(b)
            .execute(&mut *tx)
            .await
            .map_err(q("renew lease"))?;
            if res.rows_affected() == 0 {
                let live = sqlx::query(
                    "SELECT id FROM leases WHERE box_id = $1 AND build_id = $2 AND state = 'live'",
                )
                .bind(box_id)
                .bind(b)
                .fetch_optional(&mut *tx)
                .await
                .map_err(q("select lease"))?;
                if live.is_none() {
                    orphans.push(b.clone());
                }
            }
        }
        tx.commit().await.map_err(q("commit lease renewal"))?;
        Ok(orphans)
    }

    /// Gives every live lease at least until `deadline_ms` (at start-up: boxes get one lease
    /// to reconnect before their builds are re-queued for the control plane's own downtime).
    pub async fn extend_live_leases(&self, deadline_ms: i64) -> Result<u64> {
        let res = sqlx::query(
            "UPDATE leases SET deadline_ms = $1 WHERE state = 'live' AND deadline_ms < $1",
        )
        .bind(deadline_ms)
        .execute(&self.pool)
        .await
        .map_err(q("extend live leases"))?;
        Ok(res.rows_affected())
    }

    /// Live leases past their deadline.
    pub async fn expired_leases(&self, now: i64) -> Result<Vec<LeaseRow>> {
        let rows = sqlx::query(
            "SELECT id, build_id, box_id, deadline_ms, confirmed FROM leases \
             WHERE state = 'live' AND deadline_ms < $1 ORDER BY deadline_ms",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(q("select expired leases"))?;
        rows.iter().map(lease_from_row).collect()
    }

    /// Live leases held by a box.
    pub async fn live_leases(&self, box_id: &str) -> Result<Vec<LeaseRow>> {
        let rows = sqlx::query(
            "SELECT id, build_id, box_id, deadline_ms, confirmed FROM leases \
             WHERE state = 'live' AND box_id = $1",
        )
        .bind(box_id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("select live leases"))?;
        rows.iter().map(lease_from_row).collect()
    }

    /// Live leases of a build (never more than one: a unique index says so).
    pub async fn live_leases_of_build(&self, build_id: &str) -> Result<Vec<LeaseRow>> {
        let rows = sqlx::query(
            "SELECT id, build_id, box_id, deadline_ms, confirmed FROM leases \
             WHERE state = 'live' AND build_id = $1",
        )
        .bind(build_id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("select live leases of build"))?;
        rows.iter().map(lease_from_row).collect()
    }

    // ---------------------------------------------------------------- logs

    /// Stores one log chunk of the box's current attempt (idempotent on (build, seq)), and
    /// raises the box's acked seq to `acked_seq` in the same transaction. Returns false when the
    /// build is not on this box (chunk from a stale attempt, dropped).
    pub async fn store_log(
        &self,
        box_id: &str,
        chunk: &LogChunk,
        acked_seq: Option<u64>,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let stored = store_log_tx(&mut tx, box_id, chunk).await? != LogStored::NotThisBox;
        if let Some(acked) = acked_seq {
            set_acked_tx(&mut tx, box_id, acked).await?;
        }
        tx.commit().await.map_err(q("commit log chunk"))?;
        Ok(stored)
    }

    /// Opens one transaction for a run of `box_id`'s session messages (group commit).
    pub async fn box_batch(&self, box_id: &str) -> Result<BoxBatch> {
        Ok(BoxBatch {
            tx: self.begin().await?,
            box_id: box_id.to_string(),
        })
    }

    /// Writes a Hive-authored line into a build's log at the next seq.
    pub async fn append_system_log(&self, build_id: &str, text: &str) -> Result<()> {
        let mut tx = self.begin().await?;
        let next: i64 = sqlx::query(
            "SELECT COALESCE(MAX(seq) + 1, 0) AS next FROM log_chunks WHERE build_id = $1",
        )
        .bind(build_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(q("select next log seq"))
        .and_then(|r| get(&r, "next"))?;
        insert_log_tx(
            &mut tx,
            build_id,
            next,
            LogStream::System,
            0,
            text.as_bytes(),
            now_ms(),
        )
        .await?;
        tx.commit().await.map_err(q("commit system log line"))?;
        Ok(())
    }

    /// Chunks with seq >= `from_seq`, in seq order.
    pub async fn logs_from(
        &self,
        build_id: &str,
        from_seq: u64,
        limit: u32,
    ) -> Result<Vec<LogChunk>> {
        let rows = sqlx::query(
            "SELECT seq, stream, step, data, at_ms FROM log_chunks \
             WHERE build_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
        )
        .bind(build_id)
        .bind(from_seq as i64)
        .bind(limit as i64)
        .fetch_all(&self.reads)
        .await
        .map_err(q("select log chunks"))?;
        rows.iter()
            .map(|r| {
                Ok(LogChunk {
                    build_id: build_id.to_string(),
                    seq: get::<i64>(r, "seq")? as u64,
                    stream: get::<i64>(r, "stream")? as i32,
                    step: get::<i64>(r, "step")? as u32,
                    data: get::<Vec<u8>>(r, "data")?,
                    at_ms: get(r, "at_ms")?,
                })
            })
            .collect()
    }

    // ---------------------------------------------------------------- boxes and cells

    pub async fn get_box(&self, id: &str) -> Result<Option<BoxRow>> {
        let row = sqlx::query(
            "SELECT id, hostname, state, backend, pools_json, last_heartbeat_ms, \
             registered_at_ms, acked_seq FROM boxes WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("select box"))?;
        row.map(|r| box_from_row(&r)).transpose()
    }

    pub async fn list_boxes(&self) -> Result<Vec<BoxRow>> {
        let rows = sqlx::query(
            "SELECT id, hostname, state, backend, pools_json, last_heartbeat_ms, \
             registered_at_ms, acked_seq FROM boxes ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("list boxes"))?;
        rows.iter().map(box_from_row).collect()
    }

    /// Inserts or refreshes a box on register (keeps its acked seq).
    pub async fn upsert_box(&self, b: &BoxRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO boxes (id, hostname, state, backend, pools_json, last_heartbeat_ms, \
             registered_at_ms, acked_seq) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (id) DO UPDATE SET hostname = $2, state = $3, backend = $4, \
             pools_json = $5, last_heartbeat_ms = $6, registered_at_ms = $7",
        )
        .bind(&b.id)
        .bind(&b.hostname)
        .bind(&b.state)
        .bind(&b.backend)
        .bind(&b.pools_json)
        .bind(b.last_heartbeat_ms)
        .bind(b.registered_at_ms)
        .bind(b.acked_seq as i64)
        .execute(&self.pool)
        .await
        .map_err(q("upsert box"))?;
        Ok(())
    }

    /// Sets the operator state of a box (active, cordoned, draining, left).
    pub async fn set_box_state(&self, id: &str, state: &str) -> Result<bool> {
        let res = sqlx::query("UPDATE boxes SET state = $1 WHERE id = $2")
            .bind(state)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("update box state"))?;
        Ok(res.rows_affected() > 0)
    }

    /// Records the last heartbeat, pools and (raised) acked seq of a box.
    pub async fn touch_box(
        &self,
        id: &str,
        pools_json: &str,
        at_ms: i64,
        acked: u64,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE boxes SET last_heartbeat_ms = $1, pools_json = $2 WHERE id = $3")
            .bind(at_ms)
            .bind(pools_json)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(q("update box heartbeat"))?;
        set_acked_tx(&mut tx, id, acked).await?;
        tx.commit().await.map_err(q("commit box heartbeat"))?;
        Ok(())
    }

    /// Replaces the cells of a box with what it last reported.
    pub async fn replace_cells(&self, box_id: &str, cells: &[CellRow]) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM cells WHERE box_id = $1")
            .bind(box_id)
            .execute(&mut *tx)
            .await
            .map_err(q("delete cells"))?;
        for c in cells {
            sqlx::query(
                "INSERT INTO cells (id, box_id, size_class, state, build_id, updated_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET box_id = $2, \
                 size_class = $3, state = $4, build_id = $5, updated_at_ms = $6",
            )
            .bind(&c.id)
            .bind(box_id)
            .bind(&c.size_class)
            .bind(&c.state)
            .bind(&c.build_id)
            .bind(c.updated_at_ms)
            .execute(&mut *tx)
            .await
            .map_err(q("insert cell"))?;
        }
        tx.commit().await.map_err(q("commit cells"))?;
        Ok(())
    }

    pub async fn list_cells(&self, box_id: Option<&str>) -> Result<Vec<CellRow>> {
        let mut sql = String::from(
            "SELECT id, box_id, size_class, state, build_id, updated_at_ms FROM cells",
        );
        if box_id.is_some() {
            sql.push_str(" WHERE box_id = $1");
        }
        sql.push_str(" ORDER BY box_id, id");
        let mut query = sqlx::query(&sql);
        if let Some(b) = box_id {
            query = query.bind(b.to_string());
        }
        let rows = query.fetch_all(&self.pool).await.map_err(q("list cells"))?;
        rows.iter()
            .map(|r| {
                Ok(CellRow {
                    id: get(r, "id")?,
                    box_id: get(r, "box_id")?,
                    size_class: get(r, "size_class")?,
                    state: get(r, "state")?,
                    build_id: get(r, "build_id")?,
                    updated_at_ms: get(r, "updated_at_ms")?,
                })
            })
            .collect()
    }

    async fn begin(&self) -> Result<Transaction<'static, Any>> {
        self.pool.begin().await.map_err(q("begin transaction"))
    }
}

/// One transaction over a run of box session messages that were already waiting on the stream
/// (group commit): build updates and log chunks are applied in stream order, the box's acked seq
/// is raised, and one commit makes them all durable together. Nothing in it may be announced or
/// acknowledged before [`BoxBatch::commit`] returns; dropped uncommitted, it rolls back.
///
/// The updates are conditional on the lease *and* the box, so a current update needs no read
/// of the build first; callers read it ([`BoxBatch::get_build`]) only to explain a miss.
pub struct BoxBatch {
    tx: Transaction<'static, Any>,
    box_id: String,
}

impl BoxBatch {
    /// The build as this transaction sees it (earlier messages of the batch included).
    pub async fn get_build(&mut self, id: &str) -> Result<Option<BuildRow>> {
        let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(q("select build"))?;
        row.map(|r| build_from_row(&r)).transpose()
    }

    /// ACCEPTED: see [`Store::confirm_lease`]; false unless the live lease is this box's.
    pub async fn confirm_lease(
        &mut self,
        build_id: &str,
        lease_id: &str,
        cell_id: &str,
        warm_start: bool,
        deadline_ms: i64,
    ) -> Result<bool> {
        confirm_lease_tx(
            &mut self.tx,
            Some(&self.box_id),
            build_id,
            lease_id,
            cell_id,
            warm_start,
            deadline_ms,
        )
        .await
    }

    /// RUNNING: see [`Store::set_running`]; false unless the build is placed on this box.
    pub async fn set_running(
        &mut self,
        build_id: &str,
        lease_id: &str,
        reason: &str,
    ) -> Result<bool> {
        set_running_tx(&mut self.tx, Some(&self.box_id), build_id, lease_id, reason).await
    }

    /// FINISHED: see [`Store::finish_build`]; false unless the build is on this box.
    pub async fn finish_build(
        &mut self,
        build_id: &str,
        lease_id: &str,
        state: BuildState,
        exit_code: i32,
        reason: &str,
    ) -> Result<bool> {
        finish_build_tx(
            &mut self.tx,
            Some(&self.box_id),
            build_id,
            lease_id,
            state,
            exit_code,
            reason,
        )
        .await
    }

    /// REJECTED: see [`Store::requeue`] (the caller has checked the lease is this box's).
    pub async fn requeue(&mut self, build_id: &str, lease_id: &str, reason: &str) -> Result<bool> {
        requeue_tx(&mut self.tx, build_id, lease_id, "released", reason).await
    }

    /// A log chunk: see [`Store::store_log`].
    pub async fn store_log(&mut self, chunk: &LogChunk) -> Result<LogStored> {
        store_log_tx(&mut self.tx, &self.box_id, chunk).await
    }

    /// Raises the box's acked seq to `acked` and commits everything in one go.
    pub async fn commit(mut self, acked: u64) -> Result<()> {
        set_acked_tx(&mut self.tx, &self.box_id, acked).await?;
        self.tx.commit().await.map_err(q("commit box messages"))
    }
}

/// `AND box_id = $n` when the caller names a box, so an update names the box it comes from.
fn box_clause(box_id: Option<&str>, n: usize) -> String {
    match box_id {
        Some(_) => format!(" AND box_id = ${n}"),
        None => String::new(),
    }
}

async fn confirm_lease_tx(
    tx: &mut Transaction<'_, Any>,
    box_id: Option<&str>,
    build_id: &str,
    lease_id: &str,
    cell_id: &str,
    warm_start: bool,
    deadline_ms: i64,
) -> Result<bool> {
    let sql = format!(
        "UPDATE leases SET confirmed = 1, deadline_ms = $1 \
         WHERE id = $2 AND build_id = $3 AND state = 'live'{}",
        box_clause(box_id, 4)
    );
    let mut query = sqlx::query(&sql)
        .bind(deadline_ms)
        .bind(lease_id)
        .bind(build_id);
    if let Some(b) = box_id {
        query = query.bind(b);
    }
    let res = query.execute(&mut **tx).await.map_err(q("confirm lease"))?;
    if res.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query(
        "UPDATE builds SET cell_id = $1, warm_start = $2, updated_at_ms = $3, message = $4 \
         WHERE id = $5 AND lease_id = $6",
    )
    .bind(cell_id)
    .bind(warm_start as i64)
    .bind(now_ms())
    .bind(format!(
        "accepted in {} cell {cell_id}",
        if warm_start { "warm" } else { "cold" }
    ))
    .bind(build_id)
    .bind(lease_id)
    .execute(&mut **tx)
    .await
    .map_err(q("record build cell"))?;
    Ok(true)
}

async fn set_running_tx(
    tx: &mut Transaction<'_, Any>,
    box_id: Option<&str>,
    build_id: &str,
    lease_id: &str,
    reason: &str,
) -> Result<bool> {
    let now = now_ms();
    let sql = format!(
        "UPDATE builds SET state = 'running', started_at_ms = $1, updated_at_ms = $1, \
         message = $2 WHERE id = $3 AND lease_id = $4 AND state = 'placed'{}",
        box_clause(box_id, 5)
    );
    let mut query = sqlx::query(&sql)
        .bind(now)
        .bind(reason)
        .bind(build_id)
        .bind(lease_id);
    if let Some(b) = box_id {
        query = query.bind(b);
    }
    let res = query
        .execute(&mut **tx)
        .await
        .map_err(q("update build to running"))?;
    if res.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query("UPDATE leases SET confirmed = 1 WHERE id = $1 AND state = 'live'")
        .bind(lease_id)
        .execute(&mut **tx)
        .await
        .map_err(q("confirm lease"))?;
    add_transition(tx, build_id, BuildState::Running, now, reason).await?;
    Ok(true)
}

async fn finish_build_tx(
    tx: &mut Transaction<'_, Any>,
    box_id: Option<&str>,
    build_id: &str,
    lease_id: &str,
    state: BuildState,
    exit_code: i32,
    reason: &str,
) -> Result<bool> {
    debug_assert!(state.is_terminal());
    let now = now_ms();
    let sql = format!(
        "UPDATE builds SET state = $1, exit_code = $2, message = $3, updated_at_ms = $4 \
         WHERE id = $5 AND lease_id = $6 AND state IN ('placed', 'running'){}",
        box_clause(box_id, 7)
    );
    let mut query = sqlx::query(&sql)
        .bind(state.short_name())
        .bind(exit_code as i64)
        .bind(reason)
        .bind(now)
        .bind(build_id)
        .bind(lease_id);
    if let Some(b) = box_id {
        query = query.bind(b);
    }
    let res = query
        .execute(&mut **tx)
        .await
        .map_err(q("update build to finished"))?;
    if res.rows_affected() == 0 {
        return Ok(false);
    }
    release_lease_tx(tx, lease_id, "released").await?;
    add_transition(tx, build_id, state, now, reason).await?;
    Ok(true)
}

async fn requeue_tx(
    tx: &mut Transaction<'_, Any>,
    build_id: &str,
    lease_id: &str,
    lease_end: &str,
    reason: &str,
) -> Result<bool> {
    let now = now_ms();
    let row = sqlx::query(
        "SELECT attempt FROM builds WHERE id = $1 AND lease_id = $2 \
         AND state IN ('placed', 'running')",
    )
    .bind(build_id)
    .bind(lease_id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(q("select build to re-queue"))?;
    let Some(row) = row else {
        // The build moved on (finished, cancelled); the lease still must not stay live.
        release_lease_tx(tx, lease_id, lease_end).await?;
        return Ok(false);
    };
    let attempt: i64 = get(&row, "attempt")?;
    // Fill any holes the lost attempt left, then one system line; the next attempt's
    // chunk n is stored at log_base + n.
    let seqs: Vec<i64> = sqlx::query("SELECT seq FROM log_chunks WHERE build_id = $1 ORDER BY seq")
        .bind(build_id)
        .fetch_all(&mut **tx)
        .await
        .map_err(q("select log seqs"))?
        .iter()
        .map(|r| get::<i64>(r, "seq"))
        .collect::<Result<_>>()?;
    let next = seqs.last().map(|s| s + 1).unwrap_or(0);
    let mut expect = 0;
    for s in seqs.iter().copied().chain(std::iter::once(next)) {
        while expect < s {
            insert_log_tx(tx, build_id, expect, LogStream::System, 0, b"", now).await?;
            expect += 1;
        }
        expect = s + 1;
    }
    let line = format!(
        "hive: attempt {attempt} ended ({reason}); build re-queued as attempt {}\n",
        attempt + 1
    );
    insert_log_tx(
        tx,
        build_id,
        next,
        LogStream::System,
        0,
        line.as_bytes(),
        now,
    )
    .await?;
    sqlx::query(
        "UPDATE builds SET state = 'queued', box_id = '', cell_id = '', lease_id = '', \
         started_at_ms = 0, warm_start = 0, attempt = attempt + 1, log_base = $1, \
         updated_at_ms = $2, message = $3 WHERE id = $4",
    )
    .bind(next + 1)
    .bind(now)
    .bind(reason)
    .bind(build_id)
    .execute(&mut **tx)
    .await
    .map_err(q("update build to queued"))?;
    release_lease_tx(tx, lease_id, lease_end).await?;
    add_transition(tx, build_id, BuildState::Queued, now, reason).await?;
    Ok(true)
}

/// What became of a log chunk a box sent.
#[derive(Debug, Clone, PartialEq)]
pub enum LogStored {
    /// Stored now; the chunk as stored (its seq is the build's log seq, `log_base + n`).
    New(LogChunk),
    /// Stored before (a resend).
    Duplicate,
    /// The build is not on this box (a chunk from a stale attempt): dropped.
    NotThisBox,
}

/// Stores a chunk of `box_id`'s current attempt at `log_base + chunk.seq` (a duplicate is a
/// no-op).
async fn store_log_tx(
    tx: &mut Transaction<'_, Any>,
    box_id: &str,
    chunk: &LogChunk,
) -> Result<LogStored> {
    let at_ms = if chunk.at_ms > 0 {
        chunk.at_ms
    } else {
        now_ms()
    };
    let row = sqlx::query(
        "INSERT INTO log_chunks (build_id, seq, stream, step, data, at_ms) \
         SELECT id, log_base + $1, $2, $3, $4, $5 FROM builds WHERE id = $6 AND box_id = $7 \
         ON CONFLICT (build_id, seq) DO NOTHING RETURNING seq",
    )
    .bind(chunk.seq as i64)
    .bind(chunk.stream as i64)
    .bind(chunk.step as i64)
    .bind(chunk.data.clone())
    .bind(at_ms)
    .bind(&chunk.build_id)
    .bind(box_id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(q("insert log chunk"))?;
    if let Some(row) = row {
        return Ok(LogStored::New(LogChunk {
            seq: get::<i64>(&row, "seq")? as u64,
            at_ms,
            ..chunk.clone()
        }));
    }
    // Either a duplicate (fine, already stored) or not this box's build.
    let ours = sqlx::query("SELECT id FROM builds WHERE id = $1 AND box_id = $2")
        .bind(&chunk.build_id)
        .bind(box_id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(q("select build of log chunk"))?
        .is_some();
    Ok(if ours {
        LogStored::Duplicate
    } else {
        LogStored::NotThisBox
    })
}

async fn insert_build_tx(tx: &mut Transaction<'_, Any>, b: &BuildRow, reason: &str) -> Result<()> {
    let sql = format!(
        "INSERT INTO builds ({BUILD_COLUMNS}, log_base) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
         $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, 0)"
    );
    sqlx::query(&sql)
        .bind(&b.id)
        .bind(&b.project_id)
        .bind(&b.project_name)
        .bind(&b.repo_url)
        .bind(&b.revision)
        .bind(&b.git_ref)
        .bind(b.state.short_name())
        .bind(&b.box_id)
        .bind(&b.cell_id)
        .bind(&b.lease_id)
        .bind(b.created_at_ms)
        .bind(b.updated_at_ms)
        .bind(b.started_at_ms)
        .bind(b.exit_code as i64)
        .bind(&b.message)
        .bind(&b.trigger)
        .bind(&b.size_class)
        .bind(&b.private_network)
        .bind(to_json(&b.steps))
        .bind(to_json(&b.env))
        .bind(b.timeout_secs as i64)
        .bind(b.warm_start as i64)
        .bind(b.attempt as i64)
        .bind(&b.backend)
        .execute(&mut **tx)
        .await
        .map_err(q("insert build"))?;
    add_transition(tx, &b.id, b.state, b.created_at_ms, reason).await
}

async fn add_transition(
    tx: &mut Transaction<'_, Any>,
    build_id: &str,
    state: BuildState,
    at_ms: i64,
    reason: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO build_transitions (build_id, state, at_ms, reason) VALUES ($1, $2, $3, $4)",
    )
    .bind(build_id)
    .bind(state.short_name())
    .bind(at_ms)
    .bind(reason)
    .execute(&mut **tx)
    .await
    .map_err(q("insert build transition"))?;
    Ok(())
}

async fn release_lease_tx(tx: &mut Transaction<'_, Any>, lease_id: &str, end: &str) -> Result<()> {
    sqlx::query("UPDATE leases SET state = $1 WHERE id = $2 AND state = 'live'")
        .bind(end)
        .bind(lease_id)
        .execute(&mut **tx)
        .await
        .map_err(q("end lease"))?;
    Ok(())
}

async fn set_acked_tx(tx: &mut Transaction<'_, Any>, box_id: &str, acked: u64) -> Result<()> {
    sqlx::query("UPDATE boxes SET acked_seq = $1 WHERE id = $2 AND acked_seq < $1")
        .bind(acked as i64)
        .bind(box_id)
        .execute(&mut **tx)
        .await
        .map_err(q("update box acked seq"))?;
    Ok(())
}

async fn insert_log_tx(
    tx: &mut Transaction<'_, Any>,
    build_id: &str,
    seq: i64,
    stream: LogStream,
    step: u32,
    data: &[u8],
    at_ms: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO log_chunks (build_id, seq, stream, step, data, at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (build_id, seq) DO NOTHING",
    )
    .bind(build_id)
    .bind(seq)
    .bind(stream as i64)
    .bind(step as i64)
    .bind(data.to_vec())
    .bind(at_ms)
    .execute(&mut **tx)
    .await
    .map_err(q("insert log chunk"))?;
    Ok(())
}

pub(crate) fn get<T>(row: &AnyRow, col: &str) -> Result<T>
where
    T: for<'r> sqlx::Decode<'r, Any> + sqlx::Type<Any>,
{
    row.try_get(col)
        .map_err(|e| StoreError::Corrupt(format!("column {col}: {e}")))
}

fn parse_state(s: &str) -> Result<BuildState> {
    BuildState::from_short_name(s).ok_or_else(|| StoreError::Corrupt(format!("build state {s:?}")))
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_string())
}

fn from_json<T: serde::de::DeserializeOwned>(col: &str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("column {col}: {e}")))
}

fn project_from_row(r: &AnyRow) -> Result<ProjectRow> {
    Ok(ProjectRow {
        id: get(r, "id")?,
        name: get(r, "name")?,
        repo_url: get(r, "repo_url")?,
        secret: get(r, "secret")?,
        branch: get(r, "branch")?,
        size_class: get(r, "size_class")?,
        private_network: get(r, "private_network")?,
        steps: from_json("steps_json", &get::<String>(r, "steps_json")?)?,
        env: from_json("env_json", &get::<String>(r, "env_json")?)?,
        timeout_secs: get::<i64>(r, "timeout_secs")? as u32,
        created_at_ms: get(r, "created_at_ms")?,
    })
}

fn build_from_row(r: &AnyRow) -> Result<BuildRow> {
    Ok(BuildRow {
        id: get(r, "id")?,
        project_id: get(r, "project_id")?,
        project_name: get(r, "project_name")?,
        repo_url: get(r, "repo_url")?,
        revision: get(r, "revision")?,
        git_ref: get(r, "git_ref")?,
        state: parse_state(&get::<String>(r, "state")?)?,
        box_id: get(r, "box_id")?,
        cell_id: get(r, "cell_id")?,
        lease_id: get(r, "lease_id")?,
        created_at_ms: get(r, "created_at_ms")?,
        updated_at_ms: get(r, "updated_at_ms")?,
        started_at_ms: get(r, "started_at_ms")?,
        exit_code: get::<i64>(r, "exit_code")? as i32,
        message: get(r, "message")?,
        trigger: get(r, "trigger_source")?,
        size_class: get(r, "size_class")?,
        private_network: get(r, "private_network")?,
        steps: from_json("steps_json", &get::<String>(r, "steps_json")?)?,
        env: from_json("env_json", &get::<String>(r, "env_json")?)?,
        timeout_secs: get::<i64>(r, "timeout_secs")? as u32,
        warm_start: get::<i64>(r, "warm_start")? != 0,
        attempt: get::<i64>(r, "attempt")? as u32,
        backend: get(r, "backend")?,
    })
}

fn lease_from_row(r: &AnyRow) -> Result<LeaseRow> {
    Ok(LeaseRow {
        id: get(r, "id")?,
        build_id: get(r, "build_id")?,
        box_id: get(r, "box_id")?,
        deadline_ms: get(r, "deadline_ms")?,
        confirmed: get::<i64>(r, "confirmed")? != 0,
    })
}

fn box_from_row(r: &AnyRow) -> Result<BoxRow> {
    Ok(BoxRow {
        id: get(r, "id")?,
        hostname: get(r, "hostname")?,
        state: get(r, "state")?,
        backend: get(r, "backend")?,
        pools_json: get(r, "pools_json")?,
        last_heartbeat_ms: get(r, "last_heartbeat_ms")?,
        registered_at_ms: get(r, "registered_at_ms")?,
        acked_seq: get::<i64>(r, "acked_seq")? as u64,
    })
}

/// The file path of a `sqlite://` URL (None for in-memory databases).
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
    fn repo_keys_ignore_git_suffix_and_slash() {
        assert_eq!(
            repo_key("https://github.com/o/r.git"),
            "https://github.com/o/r"
        );
        assert_eq!(
            repo_key("https://github.com/o/r/"),
            "https://github.com/o/r"
        );
        assert_eq!(
            repo_key(" https://github.com/o/r.git/ "),
            "https://github.com/o/r"
        );
        assert_eq!(repo_key("git@github.com:o/r.git"), "git@github.com:o/r");
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
