//! Projects: what a push builds (repository, branch, steps, env, size class, network) and the
//! webhook secret. Looked up by id or name, and by repository URL for webhooks ([`repo_key`]).
//!
//! Webhooks look projects up by repository from an in-memory copy of the table
//! ([`ProjectCache`]): one control plane serves a database, every project write goes through
//! this module, and each drops the copy after its commit, so the next lookup reads the table
//! again. A webhook then costs no database read before its group commit.
//!
//! The webhook secret is sealed at rest with the control plane's secrets key (set once at
//! start, [`Store::set_sealer`]): the `secret` column holds the sealed value and
//! `secret_nonce` its nonce; [`ProjectRow::secret`] is always the plaintext (the HMAC key),
//! opened on read. A row from before sealing (empty nonce) is read as it is and sealed by
//! [`Store::seal_webhook_secrets`] at start.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::audit::{insert_audit_tx, Audit};
use super::{checked, from_json, new_id, now_ms, q, to_json, Result, Store, StoreError};
use crate::cluster::{Bus, Note};

/// A project as read (the secret opened: it is the webhook HMAC key).
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectRow {
    pub id: String,
    pub name: String,
    pub repo_url: String,
    pub secret: String,
    pub branch: String,
    /// Tags pushed that build: a glob (`v*`, `*`); empty builds none.
    pub tags: String,
    pub size_class: String,
    pub private_network: String,
    pub steps: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout_secs: u32,
    pub created_at_ms: i64,
    /// The hive that builds it: '' (or this hive's name) here; another hive's name: pushes are
    /// forwarded there ([`crate::regions`]).
    pub hive: String,
}

/// What `create_project` needs; already validated by the caller.
#[derive(Debug, Clone)]
pub struct NewProject {
    pub name: String,
    pub repo_url: String,
    pub secret: String,
    pub branch: String,
    pub tags: String,
    pub size_class: String,
    pub private_network: String,
    pub steps: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout_secs: u32,
    pub hive: String,
}

const PROJECT_COLUMNS: &str = "id, name, repo_url, secret, secret_nonce, branch, tags, \
    size_class, private_network, steps_json, env_json, timeout_secs, created_at_ms, hive";

/// The name a webhook secret is sealed under (the associated data with the project id): no
/// project secret can have it (names are environment variable names), so neither opens as
/// the other.
const WEBHOOK_SECRET_NAME: &str = "\0webhook";

/// The matching key of a repository URL ([`crate::repo_url::RepoUrl::key`]); a URL that does
/// not parse keeps its trimmed self, so it still matches only itself.
pub fn repo_key(url: &str) -> String {
    crate::repo_url::key_of(url).unwrap_or_else(|| url.trim().to_string())
}

/// Every project with its repository key, in creation order.
type Keyed = Arc<Vec<(String, ProjectRow)>>;

/// Every project with its repository key, in creation order, as last read; a generation
/// number keeps a read that raced a write from installing what it read.
/// With other control planes on the database, their writes drop this copy through a note
/// (`cluster`); should a note be lost, a copy older than [`SHARED_MAX_AGE`] is read again.
#[derive(Debug, Default)]
pub(crate) struct ProjectCache {
    inner: Mutex<CacheState>,
    /// Where project writes are announced to the other control planes (set once at start).
    bus: std::sync::OnceLock<Bus>,
    /// What webhook secrets are sealed with (set once at start; without it, as in store
    /// tests, new secrets are stored as given).
    sealer: std::sync::OnceLock<crate::secrets::Sealer>,
}

/// How long a shared database's project copy is trusted without news.
const SHARED_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Default)]
struct CacheState {
    generation: u64,
    projects: Option<(Keyed, std::time::Instant)>,
}

impl ProjectCache {
    fn get(&self) -> (u64, Option<Keyed>) {
        let shared = self.bus.get().is_some_and(Bus::is_shared);
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = s
            .projects
            .as_ref()
            .filter(|(_, at)| !shared || at.elapsed() < SHARED_MAX_AGE)
            .map(|(p, _)| p.clone());
        (s.generation, fresh)
    }

    fn put(&self, generation: u64, projects: Keyed) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if s.generation == generation {
            s.projects = Some((projects, std::time::Instant::now()));
        }
    }

    /// After a committed project write: the next lookup here reads the table, and so do the
    /// other control planes'.
    fn invalidate(&self) {
        self.invalidate_here();
        if let Some(bus) = self.bus.get() {
            bus.publish(Note::Projects);
        }
    }

    fn invalidate_here(&self) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.generation += 1;
        s.projects = None;
    }
}

impl Store {
    /// Announces project writes on `bus` from now on (once; later calls are ignored).
    pub fn set_bus(&self, bus: Bus) {
        let _ = self.projects.bus.set(bus);
    }

    /// Seals webhook secrets with `sealer` from now on (once; later calls are ignored).
    pub fn set_sealer(&self, sealer: crate::secrets::Sealer) {
        let _ = self.projects.sealer.set(sealer);
    }

    /// The webhook secret as stored for project `id`: (value, nonce), sealed when a sealer is
    /// set; an empty secret stays empty.
    fn seal_webhook(&self, id: &str, secret: &str) -> (String, String) {
        match self.projects.sealer.get() {
            Some(sealer) if !secret.is_empty() => {
                let (nonce, sealed) = sealer.seal(id, WEBHOOK_SECRET_NAME, secret.as_bytes());
                (sealed, nonce)
            }
            _ => (secret.to_string(), String::new()),
        }
    }

    /// A row as read, its webhook secret opened.
    fn project_row(&self, r: ProjectRecord) -> Result<ProjectRow> {
        let secret = if r.secret_nonce.is_empty() {
            r.secret.clone()
        } else {
            let sealer = self.projects.sealer.get().ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "project {}: its webhook secret is sealed, and no secrets key is loaded",
                    r.name
                ))
            })?;
            let plain = sealer
                .open(&r.id, WEBHOOK_SECRET_NAME, &r.secret_nonce, &r.secret)
                .map_err(|e| {
                    StoreError::Corrupt(format!("project {}: webhook secret: {e}", r.name))
                })?;
            String::from_utf8(plain).map_err(|_| {
                StoreError::Corrupt(format!("project {}: webhook secret is not UTF-8", r.name))
            })?
        };
        let mut row = ProjectRow::try_from(r)?;
        row.secret = secret;
        Ok(row)
    }

    /// Seals every webhook secret still stored in plaintext (rows from before sealing);
    /// returns how many this call sealed. Idempotent, and safe with several control planes on
    /// one database: each row is written only while it is still the plaintext that was read,
    /// so of two control planes sealing at once one wins and the other skips the row.
    pub async fn seal_webhook_secrets(&self) -> Result<u64> {
        if self.projects.sealer.get().is_none() {
            return Ok(0);
        }
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, secret FROM projects WHERE secret_nonce = '' AND secret <> ''",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("select plaintext webhook secrets"))?;
        let mut sealed = 0;
        for (id, plain) in rows {
            let (value, nonce) = self.seal_webhook(&id, &plain);
            let res = sqlx::query(
                "UPDATE projects SET secret = $1, secret_nonce = $2 \
                 WHERE id = $3 AND secret = $4 AND secret_nonce = ''",
            )
            .bind(&value)
            .bind(&nonce)
            .bind(&id)
            .bind(&plain)
            .execute(&self.pool)
            .await
            .map_err(q("seal webhook secret"))?;
            sealed += res.rows_affected();
        }
        if sealed > 0 {
            self.projects.invalidate();
        }
        Ok(sealed)
    }

    /// Another control plane wrote a project (or notes may have been lost).
    pub fn invalidate_projects_here(&self) {
        self.projects.invalidate_here();
    }

    /// Stores a new project and the audit entry of its making.
    pub async fn create_project(&self, p: &NewProject, audit: &Audit) -> Result<ProjectRow> {
        let row = ProjectRow {
            id: new_id(),
            name: p.name.clone(),
            repo_url: p.repo_url.clone(),
            secret: p.secret.clone(),
            branch: p.branch.clone(),
            tags: p.tags.clone(),
            size_class: p.size_class.clone(),
            private_network: p.private_network.clone(),
            steps: p.steps.clone(),
            env: p.env.clone(),
            timeout_secs: p.timeout_secs,
            created_at_ms: now_ms(),
            hive: p.hive.clone(),
        };
        let (stored_secret, secret_nonce) = self.seal_webhook(&row.id, &row.secret);
        let mut tx = self.begin().await?;
        let res = sqlx::query(
            "INSERT INTO projects (id, name, repo_url, repo_key, secret, branch, size_class, \
             private_network, steps_json, env_json, timeout_secs, created_at_ms, tags, \
             secret_nonce, hive) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&row.id)
        .bind(&row.name)
        .bind(&row.repo_url)
        .bind(repo_key(&row.repo_url))
        .bind(&stored_secret)
        .bind(&row.branch)
        .bind(&row.size_class)
        .bind(&row.private_network)
        .bind(to_json(&row.steps))
        .bind(to_json(&row.env))
        .bind(i64::from(row.timeout_secs))
        .bind(row.created_at_ms)
        .bind(&row.tags)
        .bind(&secret_nonce)
        .bind(&row.hive)
        .execute(&mut *tx)
        .await
        .map_err(q("insert project"))?;
        if res.rows_affected() == 0 {
            return Err(StoreError::ProjectExists(row.name));
        }
        insert_audit_tx(&mut tx, audit).await?;
        tx.commit().await.map_err(q("commit new project"))?;
        self.projects.invalidate();
        Ok(row)
    }

    /// A project by id or by name.
    pub async fn get_project(&self, name_or_id: &str) -> Result<Option<ProjectRow>> {
        let sql = format!("SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1 OR name = $1");
        let row = sqlx::query_as::<_, ProjectRecord>(&sql)
            .bind(name_or_id)
            .fetch_optional(&self.reads)
            .await
            .map_err(q("select project"))?;
        row.map(|r| self.project_row(r)).transpose()
    }

    pub async fn list_projects(&self) -> Result<Vec<ProjectRow>> {
        let sql = format!("SELECT {PROJECT_COLUMNS} FROM projects ORDER BY name");
        let rows = sqlx::query_as::<_, ProjectRecord>(&sql)
            .fetch_all(&self.reads)
            .await
            .map_err(q("list projects"))?;
        rows.into_iter().map(|r| self.project_row(r)).collect()
    }

    /// Deletes a project and records who did; its builds stay (they carry a snapshot). False
    /// (and nothing recorded) if there was none.
    pub async fn delete_project(&self, name_or_id: &str, audit: &Audit) -> Result<bool> {
        let deleted = self.delete_project_tx(name_or_id, audit).await;
        self.projects.invalidate();
        deleted
    }

    async fn delete_project_tx(&self, name_or_id: &str, audit: &Audit) -> Result<bool> {
        in_tx!(self, "commit deleted project", |tx| {
            // Its secrets go with it (a new project of the same name does not inherit them).
            sqlx::query(
                "DELETE FROM project_secrets WHERE project_id IN \
                 (SELECT id FROM projects WHERE id = $1 OR name = $1)",
            )
            .bind(name_or_id)
            .execute(&mut **tx)
            .await
            .map_err(q("delete project secrets"))?;
            let res = sqlx::query("DELETE FROM projects WHERE id = $1 OR name = $1")
                .bind(name_or_id)
                .execute(&mut **tx)
                .await
                .map_err(q("delete project"))?;
            let deleted = res.rows_affected() > 0;
            if deleted {
                insert_audit_tx(tx, audit).await?;
            }
            Ok::<_, StoreError>(deleted)
        })
    }

    /// Recomputes every project's matching key (a key rule from an older version stays
    /// matchable after an upgrade); returns how many changed. Cheap: projects are few.
    pub async fn rekey_projects(&self) -> Result<u64> {
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT id, repo_url, repo_key FROM projects")
                .fetch_all(&self.pool)
                .await
                .map_err(q("select project keys"))?;
        let mut changed = 0;
        for (id, url, key) in rows {
            let new = repo_key(&url);
            if new != key {
                sqlx::query("UPDATE projects SET repo_key = $1 WHERE id = $2")
                    .bind(&new)
                    .bind(&id)
                    .execute(&self.pool)
                    .await
                    .map_err(q("update project key"))?;
                changed += 1;
            }
        }
        self.projects.invalidate();
        Ok(changed)
    }

    /// Projects whose repository URL matches any of `urls` (after [`repo_key`]; URLs that do
    /// not parse match nothing).
    pub async fn projects_for_repo(&self, urls: &[String]) -> Result<Vec<ProjectRow>> {
        // Only URLs Hive could have accepted for a project: anything else (a sender's NUL
        // bytes, which PostgreSQL refuses in text, or any other junk) matches nothing.
        let mut keys: Vec<String> = urls
            .iter()
            .filter_map(|u| crate::repo_url::key_of(u))
            .collect();
        keys.sort();
        keys.dedup();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let all = self.projects_by_key().await?;
        Ok(all
            .iter()
            .filter(|(key, _)| keys.binary_search(key).is_ok())
            .map(|(_, p)| p.clone())
            .collect())
    }

    /// Every project with its repository key, in creation order: the in-memory copy, read
    /// from the table when there is none.
    async fn projects_by_key(&self) -> Result<Keyed> {
        let (generation, cached) = self.projects.get();
        if let Some(all) = cached {
            return Ok(all);
        }
        let sql = format!("SELECT {PROJECT_COLUMNS} FROM projects ORDER BY created_at_ms, id");
        let rows = sqlx::query_as::<_, ProjectRecord>(&sql)
            .fetch_all(&self.reads)
            .await
            .map_err(q("select projects by repository"))?;
        let all: Keyed = Arc::new(
            rows.into_iter()
                .map(|r| self.project_row(r).map(|p| (repo_key(&p.repo_url), p)))
                .collect::<Result<_>>()?,
        );
        self.projects.put(generation, all.clone());
        Ok(all)
    }
}

/// A `projects` row as the database holds it.
#[derive(sqlx::FromRow)]
struct ProjectRecord {
    id: String,
    name: String,
    repo_url: String,
    secret: String,
    secret_nonce: String,
    branch: String,
    tags: String,
    size_class: String,
    private_network: String,
    steps_json: String,
    env_json: String,
    timeout_secs: i64,
    created_at_ms: i64,
    hive: String,
}

impl TryFrom<ProjectRecord> for ProjectRow {
    type Error = StoreError;

    fn try_from(r: ProjectRecord) -> Result<Self> {
        Ok(ProjectRow {
            id: r.id,
            name: r.name,
            repo_url: r.repo_url,
            secret: r.secret,
            branch: r.branch,
            tags: r.tags,
            size_class: r.size_class,
            private_network: r.private_network,
            steps: from_json("steps_json", &r.steps_json)?,
            env: from_json::<BTreeMap<String, String>>("env_json", &r.env_json)?,
            timeout_secs: checked("timeout_secs", r.timeout_secs)?,
            created_at_ms: r.created_at_ms,
            hive: r.hive,
        })
    }
}
