//! A database for one test: a SQLite file in a temp dir, or a fresh PostgreSQL database
//! (`hive_t_<uuid>`) made through the admin URL in `HIVE_TEST_POSTGRES_URL` and dropped by
//! [`TestDb::drop_db`]. Without that variable a PostgreSQL test prints a SKIPPED line and is
//! skipped; under `CI=true` it fails instead, since CI must test both stores.

use sqlx::Connection;

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        })
    }
}

/// Errors making a PostgreSQL database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("postgres admin URL {url}")]
    Postgres {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("temp dir for a SQLite database")]
    TempDir(#[source] std::io::Error),
}

/// A database for one test.
#[derive(Debug)]
pub struct TestDb {
    /// What the control plane is given (`sqlite://...` or `postgres://...`).
    pub url: String,
    pg_admin: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// A SQLite file in a fresh temp dir (not `sqlite::memory:`: each pooled connection would
    /// get a database of its own).
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}/hive.db", dir.path().display());
        TestDb {
            url,
            pg_admin: None,
            _dir: Some(dir),
        }
    }

    /// A fresh database on the server in `HIVE_TEST_POSTGRES_URL`, or None after the SKIPPED
    /// line (a panic under `CI=true`). Panics if the server is set but refuses.
    pub async fn postgres(test: &str) -> Option<TestDb> {
        let Ok(admin) = std::env::var("HIVE_TEST_POSTGRES_URL") else {
            skip_postgres(test);
            return None;
        };
        Some(
            Self::postgres_from(&admin)
                .await
                .unwrap_or_else(|e| panic!("{test}: {}", hive_sys::error_chain(&e))),
        )
    }

    /// The database for `backend` (see [`TestDb::sqlite`] and [`TestDb::postgres`]).
    pub async fn new(backend: Backend, test: &str) -> Option<TestDb> {
        match backend {
            Backend::Sqlite => Some(Self::sqlite()),
            Backend::Postgres => Self::postgres(test).await,
        }
    }

    /// A fresh database through `admin_url` (a role with CREATEDB), for benchmarks that take
    /// the URL as an argument.
    pub async fn postgres_from(admin_url: &str) -> Result<TestDb, DbError> {
        let pg = |source| DbError::Postgres {
            url: admin_url.to_string(),
            source,
        };
        let name = format!("hive_t_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(admin_url).await.map_err(pg)?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .map_err(pg)?;
        conn.close().await.map_err(pg)?;
        Ok(TestDb {
            url: with_database(admin_url, &name),
            pg_admin: Some((admin_url.to_string(), name)),
            _dir: None,
        })
    }

    /// Which store this is.
    pub fn backend(&self) -> Backend {
        if self.pg_admin.is_some() {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }

    /// Drops a PostgreSQL database (forcing out any connection still open); removes a SQLite
    /// one's temp dir.
    pub async fn drop_db(self) {
        if let Some((admin, name)) = &self.pg_admin {
            if let Ok(mut conn) = sqlx::PgConnection::connect(admin).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
                let _ = conn.close().await;
            }
        }
    }
}

/// The loud skip line for a PostgreSQL test without a server; a panic under `CI=true`.
pub fn skip_postgres(test: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{test}: HIVE_TEST_POSTGRES_URL is not set, and CI=true requires the PostgreSQL \
             tests (deploy/postgres/setup-test-db.sh sets it up)"
        );
    }
    eprintln!(
        "SKIPPED {test} on postgres: HIVE_TEST_POSTGRES_URL is not set \
         (e.g. postgres://hive:hive@127.0.0.1:5432/hive_test)"
    );
}

/// Replaces the database name (path) of a `postgres://` URL, keeping any `?query`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    // postgres://user:pw@host:port/dbname: the path starts at the first '/' after "//".
    let after_scheme = base.find("//").map(|i| i + 2).unwrap_or(0);
    let host_end = base[after_scheme..]
        .find('/')
        .map(|i| after_scheme + i)
        .unwrap_or(base.len());
    let mut out = format!("{}/{}", &base[..host_end], db);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_name_is_replaced() {
        assert_eq!(
            with_database("postgres://hive:hive@127.0.0.1:5432/hive_test", "x"),
            "postgres://hive:hive@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://h@localhost/a?sslmode=disable", "b"),
            "postgres://h@localhost/b?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h@localhost", "b"),
            "postgres://h@localhost/b"
        );
    }
}
