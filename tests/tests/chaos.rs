//! Issue 11, the chaos soak in CI: a minute of signed pushes and API submissions while the
//! control plane, the boxes and running cells are killed with SIGKILL at seeded random and
//! restarted, with the real daemons (`hive_tests::chaos`); on PostgreSQL the database server is
//! killed too (a server of the run's own, `hive_tests::pgserver`). Every accepted submission must
//! have exactly one build, and it ended; no build may run twice at once; nothing of the boxes may
//! be left once they stopped. Needs root and the Debian build image, like `e2e_sandbox`; the
//! PostgreSQL soak also needs Debian's PostgreSQL server binaries.
use std::time::Duration;

use hive_tests::chaos::{self, ChaosOptions};

async fn a_minute_of_chaos(postgres: bool, seed: u64) {
    let name = if postgres {
        "chaos-logs-postgres"
    } else {
        "chaos-logs"
    };
    let logs = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&logs);
    let opts = ChaosOptions {
        seconds: 60,
        seed,
        rate: 1.0,
        step_secs: 2,
        logs_dir: Some(logs.clone()),
        postgres,
    };
    let report = chaos::run(opts)
        .await
        .unwrap_or_else(|e| panic!("the chaos run could not count: {e:?}"));
    eprint!("{}", report.details());
    eprintln!("{}", report.line());
    let why = format!("{}\n(logs in {})", report.details(), logs.display());
    // A soak that killed nothing, or built nothing, proves nothing.
    assert!(report.kills() >= 5, "too few kills: {why}");
    // Every kind of fault comes among a run's first faults (the driver makes sure).
    assert!(
        report.long_cp_outages >= 1 && report.long_box_outages >= 1,
        "no outage past the lease: {why}"
    );
    assert!(
        report.cp_kills > report.long_cp_outages
            && report.box_kills > report.long_box_outages
            && report.cell_kills >= 1,
        "a kind of kill is missing: {why}"
    );
    if postgres {
        assert!(report.db_kills >= 1, "PostgreSQL was never killed: {why}");
    }
    assert!(report.builds >= 20, "too few builds accepted: {why}");
    assert!(report.api >= 5, "too few API submissions: {why}");
    assert!(report.redeliveries > 0, "no redelivery answered: {why}");
    // The overlap check looks at the step processes: it must have seen most builds run.
    assert!(
        report.runs_seen * 2 >= report.builds,
        "the sampler saw too few steps running: {why}"
    );
    assert_eq!(report.lost, 0, "lost builds: {why}");
    assert_eq!(report.duplicated, 0, "duplicated builds: {why}");
    assert_eq!(report.overlapping, 0, "builds ran twice at once: {why}");
    assert_eq!(report.orphans, 0, "left over: {why}");
    assert!(
        report.drain < Duration::from_secs(240),
        "builds still open at the end: {why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_kills_loses_doubles_and_overlaps_no_build_and_leaves_nothing() {
    a_minute_of_chaos(false, 11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_killing_the_database_too_loses_and_doubles_nothing() {
    a_minute_of_chaos(true, 12).await;
}
