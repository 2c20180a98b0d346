//! Test fixtures shared by Hive's crates (a dev-dependency only).
//!
//! | module | job |
//! |---|---|
//! | [`db`] | a database per test: a SQLite temp file, or a fresh PostgreSQL database under `HIVE_TEST_POSTGRES_URL` (skipped loudly without it; under `CI=true`, a failure) |
//! | `browser` (feature `browser`) | a headless Chromium for the dashboard's browser tests: find or skip, launch, sign in, screenshot, text, js |
//! | [`cargo`] | a nested `cargo build` from a test, without the test crate's own cargo variables |
//! | [`fakebox`] | a fake box: a real tonic client speaking `BoxAgent.Session`, driven step by step by a test |
//! | [`on_both!`] | runs a test body on SQLite and on PostgreSQL |

#[cfg(feature = "browser")]
pub mod browser;
pub mod cargo;
pub mod db;
pub mod fakebox;

pub use db::{Backend, TestDb};

/// Runs each named scenario on both databases, as `<name>::sqlite` and `<name>::postgres`.
///
/// `on_both!(a, b)` calls `async fn a(backend: Backend)` (the scenario makes its own
/// database, e.g. through a control-plane process); `on_both!(db => a, b)` makes a [`TestDb`]
/// for it, calls `async fn a(url: String)` and drops the database afterwards (a PostgreSQL
/// scenario without `HIVE_TEST_POSTGRES_URL` is skipped with a SKIPPED line).
#[macro_export]
macro_rules! on_both {
    (db => $($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let db = $crate::TestDb::sqlite();
                super::$name(db.url.clone()).await;
                db.drop_db().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(db) = $crate::TestDb::postgres(stringify!($name)).await else {
                    return;
                };
                super::$name(db.url.clone()).await;
                db.drop_db().await;
            }
        }
    )*};
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::Backend::Postgres).await
            }
        }
    )*};
}
