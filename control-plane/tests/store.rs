//! The store against real databases: a SQLite file and (with `HIVE_TEST_POSTGRES_URL`) a fresh
//! PostgreSQL database per test.

mod common;

use std::collections::{BTreeMap, HashMap};

use hive_control_plane::store::{
    Acceptance, Audit, BuildFilter, BuildRow, Delivery, NewDelivery, NewProject, Placement,
    Requeued, Store, StoreError,
};
use hive_proto::v1::{BuildState, LogChunk, LogStream};

/// The audit entry the store tests write with their changes.
fn audit() -> Audit {
    Audit::system("StoreTest", "")
}

fn new_project(name: &str, repo: &str) -> NewProject {
    NewProject {
        name: name.into(),
        repo_url: repo.into(),
        secret: "sekrit".into(),
        branch: "main".into(),
        tags: String::new(),
        size_class: "small".into(),
        private_network: String::new(),
        steps: vec!["make".into(), "make test".into()],
        env: BTreeMap::from([("A".to_string(), "1".to_string())]),
        timeout_secs: 60,
        hive: String::new(),
    }
}

fn chunk(build: &str, seq: u64, text: &str) -> LogChunk {
    LogChunk {
        build_id: build.into(),
        seq,
        stream: LogStream::Stdout as i32,
        step: 1,
        data: text.as_bytes().to_vec(),
        at_ms: 0,
    }
}

/// Opens the store with boxes `box-a`, `box-b` and `box-c` registered and active: a placement
/// takes only onto a box the store has active.
async fn open_with_boxes(url: &str) -> Store {
    let store = Store::open(url).await.unwrap();
    for id in ["box-a", "box-b", "box-c"] {
        assert_eq!(
            store.upsert_box(&box_row(id, "active")).await.unwrap(),
            "active"
        );
    }
    store
}

/// A box's row as its registration writes it.
fn box_row(id: &str, state: &str) -> hive_control_plane::store::BoxRow {
    hive_control_plane::store::BoxRow {
        id: id.into(),
        hostname: "h".into(),
        state: state.into(),
        backend: "sandbox".into(),
        pools_json: "[]".into(),
        last_heartbeat_ms: 1,
        registered_at_ms: 1,
        acked_seq: 0,
        session_owner: "cp/1".into(),
    }
}

fn placement(build: &str, lease: &str, box_id: &str) -> Placement {
    Placement {
        build_id: build.into(),
        lease_id: lease.into(),
        box_id: box_id.into(),
        backend: "sandbox".into(),
        deadline_ms: hive_control_plane::store::now_ms() + 60_000,
    }
}

async fn projects_and_deliveries(url: String) {
    let store = Store::open(&url).await.unwrap();
    let p = store
        .create_project(
            &new_project("web", "https://git.example/o/web.git"),
            &audit(),
        )
        .await
        .unwrap();
    assert!(matches!(
        store.create_project(&new_project("web", "x"), &audit()).await,
        Err(StoreError::ProjectExists(n)) if n == "web"
    ));
    assert_eq!(store.get_project("web").await.unwrap().unwrap(), p);
    assert_eq!(store.get_project(&p.id).await.unwrap().unwrap().name, "web");
    assert!(store.get_project("nope").await.unwrap().is_none());
    let found = store
        .projects_for_repo(&["https://git.example/o/web/".into(), "ssh://nothing".into()])
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].secret, "sekrit");
    assert_eq!(found[0].env.get("A").map(String::as_str), Some("1"));

    // Delivery and build in one transaction; the second time, the stored answer.
    let b = BuildRow::new_queued(&p, "deadbeef", "refs/heads/main", "webhook:d1");
    assert_eq!(
        store
            .record_delivery("d1", &p.id, Some(&b), "build")
            .await
            .unwrap(),
        Delivery::New
    );
    let b2 = BuildRow::new_queued(&p, "deadbeef", "refs/heads/main", "webhook:d1");
    assert_eq!(
        store
            .record_delivery("d1", &p.id, Some(&b2), "build")
            .await
            .unwrap(),
        Delivery::Duplicate {
            build_id: b.id.clone(),
            outcome: "build".into()
        }
    );
    assert!(
        store.get_build(&b2.id).await.unwrap().is_none(),
        "no second build"
    );
    let got = store.get_build(&b.id).await.unwrap().unwrap();
    assert_eq!(got, b);
    let t = store.transitions(&b.id).await.unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].state, BuildState::Queued);

    // Filters.
    store
        .insert_build(&BuildRow::new_queued(&p, "", "HEAD", "api"), "api")
        .await
        .unwrap();
    let all = store.list_builds(&BuildFilter::default()).await.unwrap();
    assert_eq!(all.len(), 2);
    let queued = store
        .list_builds(&BuildFilter {
            project_id: Some(p.id.clone()),
            state: Some(BuildState::Queued),
            limit: 1,
        })
        .await
        .unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(
        store.count_builds_by_state().await.unwrap().get("queued"),
        Some(&2)
    );

    // Deleting the project keeps its builds.
    assert!(store.delete_project("web", &audit()).await.unwrap());
    assert!(!store.delete_project("web", &audit()).await.unwrap());
    assert!(store.get_build(&b.id).await.unwrap().is_some());
    store.close().await;
}
hive_testkit::on_both!(db => projects_and_deliveries);

/// Two webhook groups committing at once that carry the same delivery ids (a forge's retry
/// racing the original, on one control plane or on two sharing a PostgreSQL database) make one
/// build per delivery id: each id is `New` in exactly one group and the other group answers
/// with that group's build. The groups list the ids in opposite orders, so a group that took
/// its row locks in list order would deadlock against the other.
async fn concurrent_groups_with_the_same_deliveries_make_one_build_each(url: String) {
    let a = Store::open(&url).await.unwrap();
    // PostgreSQL: a second control plane on the same database. SQLite has one writer per
    // file: the same store, two groups at once.
    let b = if url.starts_with("postgres") {
        Some(Store::open(&url).await.unwrap())
    } else {
        None
    };
    let p = a
        .create_project(
            &new_project("race", "https://git.example/o/race.git"),
            &audit(),
        )
        .await
        .unwrap();
    let group = |ids: Vec<String>| -> Vec<NewDelivery> {
        ids.into_iter()
            .map(|d| NewDelivery {
                build: Some(BuildRow::new_queued(&p, "cafe", "refs/heads/main", &d)),
                delivery_id: d,
                project_id: p.id.clone(),
                outcome: "build".into(),
            })
            .collect()
    };
    const ROUNDS: usize = 10;
    const SHARED: usize = 24;
    for round in 0..ROUNDS {
        let shared: Vec<String> = (0..SHARED).map(|i| format!("r{round}-d{i}")).collect();
        let mut first = shared.clone();
        first.push(format!("r{round}-only-first"));
        let mut second: Vec<String> = shared.iter().rev().cloned().collect();
        second.push(format!("r{round}-only-second"));
        let (g1, g2) = (group(first), group(second));
        let s2 = b.as_ref().unwrap_or(&a);
        let (r1, r2) = tokio::join!(a.record_deliveries(&g1), s2.record_deliveries(&g2));
        let (r1, r2) = (r1.unwrap(), r2.unwrap());
        assert_eq!((r1.len(), r2.len()), (g1.len(), g2.len()));
        // Each delivery id: the build of the group that stored it.
        let mut winner: HashMap<String, String> = HashMap::new();
        for (g, r) in [(&g1, &r1), (&g2, &r2)] {
            for (item, answer) in g.iter().zip(r) {
                if *answer == Delivery::New {
                    let build = item.build.as_ref().unwrap().id.clone();
                    let before = winner.insert(item.delivery_id.clone(), build);
                    assert!(before.is_none(), "{} stored twice", item.delivery_id);
                }
            }
        }
        assert_eq!(winner.len(), SHARED + 2, "every delivery id stored once");
        for (g, r) in [(&g1, &r1), (&g2, &r2)] {
            for (item, answer) in g.iter().zip(r) {
                if let Delivery::Duplicate { build_id, outcome } = answer {
                    assert_eq!(build_id, &winner[&item.delivery_id], "{}", item.delivery_id);
                    assert_eq!(outcome, "build");
                }
            }
        }
        for build in winner.values() {
            assert!(
                a.get_build(build).await.unwrap().is_some(),
                "build {build} stored"
            );
            assert_eq!(a.transitions(build).await.unwrap().len(), 1, "{build}");
        }
    }
    let all = a
        .list_builds(&BuildFilter {
            project_id: Some(p.id.clone()),
            state: None,
            limit: 10_000,
        })
        .await
        .unwrap();
    assert_eq!(
        all.len(),
        ROUNDS * (SHARED + 2),
        "one build per delivery id, no more"
    );
    if let Some(b) = b {
        b.close().await;
    }
    a.close().await;
}
hive_testkit::on_both!(db => concurrent_groups_with_the_same_deliveries_make_one_build_each);

async fn leases_and_states(url: String) {
    let store = open_with_boxes(&url).await;
    let p = store
        .create_project(&new_project("svc", "git://h/svc"), &audit())
        .await
        .unwrap();
    let b = BuildRow::new_queued(&p, "r1", "refs/heads/main", "api");
    store.insert_build(&b, "api").await.unwrap();

    // Place once; a second placement of the same build does not take.
    let took = store
        .place(&[
            placement(&b.id, "L1", "box-a"),
            placement(&b.id, "L2", "box-b"),
        ])
        .await
        .unwrap();
    assert_eq!(took, vec![true, false]);
    assert_eq!(store.live_leases_of_build(&b.id).await.unwrap().len(), 1);

    // Updates under the wrong lease do nothing.
    assert!(!store.set_running(&b.id, "L2", "x").await.unwrap());
    assert!(store
        .confirm_lease(&b.id, "L1", "cell-9", true, i64::MAX / 2)
        .await
        .unwrap());
    assert!(store.set_running(&b.id, "L1", "running").await.unwrap());
    assert!(!store.set_running(&b.id, "L1", "again").await.unwrap());

    // Logs: idempotent, only from the box holding the build.
    assert!(store
        .store_log("box-a", &chunk(&b.id, 0, "a"), Some(1))
        .await
        .unwrap());
    assert!(store
        .store_log("box-a", &chunk(&b.id, 0, "a-dup"), Some(2))
        .await
        .unwrap());
    assert!(store
        .store_log("box-a", &chunk(&b.id, 2, "c"), None)
        .await
        .unwrap());
    assert!(!store
        .store_log("box-b", &chunk(&b.id, 1, "intruder"), None)
        .await
        .unwrap());
    let logs = store.logs_from(&b.id, 0, 100).await.unwrap();
    assert_eq!(logs.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![0, 2]);
    assert_eq!(logs[0].data, b"a");
    assert_eq!(
        store.get_box("box-a").await.unwrap().unwrap().acked_seq,
        2,
        "the box's highest ack is kept"
    );

    // A chunk seq no box could reach is refused (it would place rows past any log's end).
    assert!(
        !store
            .store_log("box-a", &chunk(&b.id, 1 << 40, "far"), None)
            .await
            .unwrap(),
        "an impossible chunk seq is not stored"
    );

    // Lease lost: back to the queue, attempt 2; the hole at seq 1 stays (readers skip holes
    // below log_base), a system line explains; the next attempt's chunk 0 lands after it.
    assert_eq!(
        store
            .requeue(&b.id, "L1", "expired", "lease L1 expired")
            .await
            .unwrap(),
        Requeued::Queued
    );
    assert_eq!(
        store
            .requeue(&b.id, "L1", "expired", "again")
            .await
            .unwrap(),
        Requeued::Moved
    );
    let q = store.get_build(&b.id).await.unwrap().unwrap();
    assert_eq!(
        (q.state, q.attempt, q.box_id.as_str()),
        (BuildState::Queued, 2, "")
    );
    assert!(store.live_leases_of_build(&b.id).await.unwrap().is_empty());
    let took = store
        .place(&[placement(&b.id, "L3", "box-b")])
        .await
        .unwrap();
    assert_eq!(took, vec![true]);
    assert!(store
        .store_log("box-b", &chunk(&b.id, 0, "second"), None)
        .await
        .unwrap());
    let logs = store.logs_from(&b.id, 0, 100).await.unwrap();
    assert_eq!(
        logs.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![0, 2, 3, 4]
    );
    assert_eq!(logs[2].stream, LogStream::System as i32);
    assert!(String::from_utf8_lossy(&logs[2].data).contains("attempt 1 ended"));
    assert_eq!(logs[3].data, b"second");
    assert_eq!(store.get_build(&b.id).await.unwrap().unwrap().log_base, 4);

    // Heartbeat renewal: box-b's lease renews; box-a holds nothing (orphan).
    let orphans = store
        .renew_leases("box-b", &[b.id.clone(), "ghost".into()], i64::MAX / 2)
        .await
        .unwrap();
    assert_eq!(orphans, vec!["ghost".to_string()]);
    let orphans = store
        .renew_leases("box-a", std::slice::from_ref(&b.id), i64::MAX / 2)
        .await
        .unwrap();
    assert_eq!(orphans, vec![b.id.clone()]);

    // Finish under the live lease; then cancel is too late.
    assert!(store.set_running(&b.id, "L3", "run").await.unwrap());
    assert!(store
        .finish_build(&b.id, "L3", BuildState::Failed, 3, "step 2 failed")
        .await
        .unwrap());
    assert!(store
        .end_build(&b.id, BuildState::Cancelled, "late")
        .await
        .unwrap()
        .is_none());
    let f = store.get_build(&b.id).await.unwrap().unwrap();
    assert_eq!((f.state, f.exit_code), (BuildState::Failed, 3));
    let states: Vec<BuildState> = store
        .transitions(&b.id)
        .await
        .unwrap()
        .iter()
        .map(|t| t.state)
        .collect();
    use BuildState::*;
    assert_eq!(
        states,
        vec![Queued, Placed, Running, Queued, Placed, Running, Failed]
    );
    assert!(store.live_leases_of_build(&b.id).await.unwrap().is_empty());
    store.close().await;
}
hive_testkit::on_both!(db => leases_and_states);

/// A box's FINISHED committed while the lease sweep re-queues the same build: the finish must
/// win. On PostgreSQL the re-queue's write waits on the finish's row lock and then re-checks
/// its condition; a read-then-write by id alone overwrote the finished build with `queued`
/// and ran it again.
async fn finish_wins_over_a_concurrent_requeue(url: String) {
    let store = open_with_boxes(&url).await;
    let p = store
        .create_project(&new_project("race", "git://h/race"), &audit())
        .await
        .unwrap();
    let b = BuildRow::new_queued(&p, "r1", "refs/heads/main", "api");
    store.insert_build(&b, "api").await.unwrap();
    let took = store
        .place(&[placement(&b.id, "L1", "box-a")])
        .await
        .unwrap();
    assert_eq!(took, vec![true]);
    assert!(store.set_running(&b.id, "L1", "running").await.unwrap());

    // The box's transaction: FINISHED written, not yet committed.
    let mut batch = store.box_batch("box-a").await.unwrap();
    assert!(batch
        .finish_build(&b.id, "L1", BuildState::Succeeded, 0, "exit 0", 0)
        .await
        .unwrap());
    // The sweep re-queues meanwhile (it blocks on the row lock, or on SQLite's one writer).
    let sweeper = {
        let store = store.clone();
        let id = b.id.clone();
        tokio::spawn(async move {
            store
                .requeue(&id, "L1", "expired", "lease L1 expired")
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    batch.commit(0).await.unwrap();
    let requeued = sweeper.await.unwrap().unwrap();
    assert_eq!(
        requeued,
        Requeued::Moved,
        "a finished build is not re-queued"
    );
    let after = store.get_build(&b.id).await.unwrap().unwrap();
    assert_eq!(
        (after.state, after.attempt),
        (BuildState::Succeeded, 1),
        "the box's FINISHED stands"
    );
    assert!(store.live_leases_of_build(&b.id).await.unwrap().is_empty());
    let states: Vec<_> = store
        .transitions(&b.id)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.state)
        .collect();
    assert_eq!(
        states.iter().filter(|s| **s == BuildState::Queued).count(),
        1,
        "queued once, at submit: {states:?}"
    );
}

hive_testkit::on_both!(db => finish_wins_over_a_concurrent_requeue);

/// Places one queued build per (box, lease) pair and returns their ids, in order.
async fn placed_builds(
    store: &Store,
    p: &hive_control_plane::store::ProjectRow,
    on: &[(&str, &str)],
) -> Vec<String> {
    let mut ids = Vec::new();
    for (i, (box_id, lease)) in on.iter().enumerate() {
        let b = BuildRow::new_queued(p, &format!("r{i}"), "refs/heads/main", "api");
        store.insert_build(&b, "api").await.unwrap();
        assert_eq!(
            store
                .place(&[placement(&b.id, lease, box_id)])
                .await
                .unwrap(),
            vec![true]
        );
        ids.push(b.id);
    }
    ids
}

fn acceptance(build: &str, lease: &str, cell: &str) -> Acceptance {
    Acceptance {
        build_id: build.into(),
        lease_id: lease.into(),
        cell_id: cell.into(),
        warm_start: true,
    }
}

async fn confirmed(store: &Store, build: &str) -> bool {
    store
        .live_leases_of_build(build)
        .await
        .unwrap()
        .iter()
        .any(|l| l.confirmed)
}

/// A run of ACCEPTEDs confirmed together takes exactly those whose live lease is this box's:
/// not another box's lease, not a stale lease id, not a build that has no live lease; the
/// builds that took record their cell, the others are untouched. Runs of every length from 1
/// to 11 (the power-of-two chunks) give the same answers.
async fn a_run_of_acceptances_takes_only_this_boxs_leases(url: String) {
    let store = open_with_boxes(&url).await;
    let p = store
        .create_project(&new_project("run", "git://h/run"), &audit())
        .await
        .unwrap();
    for len in 1..=11usize {
        let mut on = Vec::new();
        for i in 0..len {
            // Every third build is another box's; every fifth is named with a stale lease.
            let box_id = if i % 3 == 2 { "box-b" } else { "box-a" };
            on.push((box_id, format!("L{len}-{i}")));
        }
        let on_ref: Vec<(&str, &str)> = on.iter().map(|(b, l)| (*b, l.as_str())).collect();
        let ids = placed_builds(&store, &p, &on_ref).await;
        let runs: Vec<Acceptance> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let lease = if i % 5 == 4 {
                    "stale".to_string()
                } else {
                    on[i].1.clone()
                };
                acceptance(id, &lease, &format!("cell-{i}"))
            })
            .collect();
        let mut batch = store.box_batch("box-a").await.unwrap();
        let took = batch
            .confirm_leases(&runs, hive_control_plane::store::now_ms() + 60_000)
            .await
            .unwrap();
        batch.commit(0).await.unwrap();
        let want: Vec<bool> = (0..len).map(|i| i % 3 != 2 && i % 5 != 4).collect();
        assert_eq!(took, want, "run of {len}");
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(
                confirmed(&store, id).await,
                want[i],
                "run of {len}, build {i}"
            );
            let b = store.get_build(id).await.unwrap().unwrap();
            if want[i] {
                assert_eq!(b.cell_id, format!("cell-{i}"));
                assert_eq!(b.message, format!("accepted in warm cell cell-{i}"));
            } else {
                assert_eq!(b.cell_id, "", "run of {len}, build {i} untouched");
            }
        }
    }
    store.close().await;
}
hive_testkit::on_both!(db => a_run_of_acceptances_takes_only_this_boxs_leases);

/// SQLite's group commit of box sessions: batches of two boxes waiting together share one
/// commit and both are stored; a session that stops half-way (its batch dropped uncommitted)
/// rolls its whole group back, and the other member hears that its messages were not stored
/// (so it acknowledges nothing, and its box sends them again). The next batch stores as usual.
#[tokio::test]
async fn sqlite_group_commit_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("hive.db").display());
    let store = open_with_boxes(&url).await;
    let p = store
        .create_project(&new_project("group", "git://h/group"), &audit())
        .await
        .unwrap();
    let ids = placed_builds(
        &store,
        &p,
        &[
            ("box-a", "LA1"),
            ("box-c", "LC1"),
            ("box-a", "LA2"),
            ("box-c", "LC2"),
        ],
    )
    .await;
    let deadline = hive_control_plane::store::now_ms() + 60_000;

    // Two members, one commit: box-c's batch is taken while box-a's is still open.
    let mut a = store.box_batch("box-a").await.unwrap();
    assert_eq!(
        a.confirm_leases(&[acceptance(&ids[0], "LA1", "ca1")], deadline)
            .await
            .unwrap(),
        vec![true]
    );
    let a_done = tokio::spawn(a.commit(1));
    let mut c = store.box_batch("box-c").await.unwrap();
    assert_eq!(
        c.confirm_leases(&[acceptance(&ids[1], "LC1", "cc1")], deadline)
            .await
            .unwrap(),
        vec![true]
    );
    c.commit(1).await.unwrap();
    a_done.await.unwrap().unwrap();
    assert!(confirmed(&store, &ids[0]).await && confirmed(&store, &ids[1]).await);

    // box-c finishes its part and waits for the commit; box-a's session stops half-way.
    let mut c = store.box_batch("box-c").await.unwrap();
    assert_eq!(
        c.confirm_leases(&[acceptance(&ids[3], "LC2", "cc2")], deadline)
            .await
            .unwrap(),
        vec![true]
    );
    let c_done = tokio::spawn(c.commit(2));
    let mut a = store.box_batch("box-a").await.unwrap();
    assert_eq!(
        a.confirm_leases(&[acceptance(&ids[2], "LA2", "ca2")], deadline)
            .await
            .unwrap(),
        vec![true]
    );
    drop(a);
    let err = c_done.await.unwrap().unwrap_err();
    assert!(matches!(err, StoreError::GroupCommit(_)), "{err}");
    assert!(
        err.to_string().contains("the box sends them again"),
        "{err}"
    );
    assert!(
        !confirmed(&store, &ids[2]).await,
        "the stopped session's half is not stored"
    );
    assert!(
        !confirmed(&store, &ids[3]).await,
        "its group is rolled back whole"
    );

    // The box sends it again: stored.
    let mut c = store.box_batch("box-c").await.unwrap();
    assert_eq!(
        c.confirm_leases(&[acceptance(&ids[3], "LC2", "cc2")], deadline)
            .await
            .unwrap(),
        vec![true]
    );
    c.commit(2).await.unwrap();
    assert!(confirmed(&store, &ids[3]).await);
    store.close().await;
}

/// Retention deletes ended builds with their logs and history, and old deliveries; a build
/// that has not ended stays whatever its age (and so does its delivery, so a redelivery or an
/// API retry under the same id makes no second build), and nothing newer than the cutoff goes.
async fn retention_purges_only_what_ended(url: String) {
    let store = open_with_boxes(&url).await;
    let p = store
        .create_project(&new_project("keep", "git://h/keep"), &audit())
        .await
        .unwrap();
    let done = BuildRow::new_queued(&p, "r1", "refs/heads/main", "webhook:d1");
    assert_eq!(
        store
            .record_delivery("d1", &p.id, Some(&done), "build")
            .await
            .unwrap(),
        Delivery::New
    );
    store
        .place(&[placement(&done.id, "L1", "box-a")])
        .await
        .unwrap();
    assert!(store.set_running(&done.id, "L1", "run").await.unwrap());
    assert!(store
        .store_log("box-a", &chunk(&done.id, 0, "old line"), None)
        .await
        .unwrap());
    assert!(store
        .finish_build(&done.id, "L1", BuildState::Succeeded, 0, "exit 0")
        .await
        .unwrap());
    let live = BuildRow::new_queued(&p, "r2", "refs/heads/main", "webhook:d2");
    assert_eq!(
        store
            .record_delivery("d2", &p.id, Some(&live), "build")
            .await
            .unwrap(),
        Delivery::New
    );
    store
        .place(&[placement(&live.id, "L2", "box-a")])
        .await
        .unwrap();

    // An API request id whose own time is ahead of the cutoff (written by a control plane
    // whose clock runs ahead) for a build that ended long ago: it goes with its build, in the
    // same transaction, so a retry never finds a key naming a purged build.
    let api = BuildRow::new_queued(&p, "r3", "refs/heads/main", "api:req-1");
    assert_eq!(
        store
            .insert_build_once(&api, "req-1", "submitted", &audit())
            .await
            .unwrap(),
        None
    );
    assert!(store
        .end_build(&api.id, BuildState::Cancelled, "cancelled")
        .await
        .unwrap()
        .is_some());
    {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        sqlx::query(
            "UPDATE webhook_deliveries SET at_ms = at_ms + 86400000 \
             WHERE delivery_id = 'api:req-1'",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }

    // A cutoff in the past deletes nothing.
    let none = store
        .purge_before(hive_control_plane::store::now_ms() - 86_400_000, 1)
        .await
        .unwrap();
    assert_eq!(none, Default::default());
    assert!(store.get_build(&done.id).await.unwrap().is_some());

    // A cutoff after everything: the ended build goes (batches of 1), the placed one stays.
    let later = hive_control_plane::store::now_ms() + 1_000;
    let purged = store.purge_before(later, 1).await.unwrap();
    assert_eq!(
        (purged.builds, purged.log_chunks, purged.deliveries),
        (2, 1, 2)
    );
    assert!(store.get_build(&done.id).await.unwrap().is_none());
    assert!(store.get_build(&api.id).await.unwrap().is_none());
    // A retry of the purged request makes a new build: the old answer is gone with its build.
    let again = BuildRow::new_queued(&p, "r3", "refs/heads/main", "api:req-1");
    assert_eq!(
        store
            .insert_build_once(&again, "req-1", "submitted", &audit())
            .await
            .unwrap(),
        None
    );
    assert!(store.logs_from(&done.id, 0, 10).await.unwrap().is_empty());
    assert!(store.transitions(&done.id).await.unwrap().is_empty());
    let kept = store.get_build(&live.id).await.unwrap().unwrap();
    assert_eq!(kept.state, BuildState::Placed);
    assert_eq!(store.live_leases_of_build(&live.id).await.unwrap().len(), 1);
    assert_eq!(store.transitions(&live.id).await.unwrap().len(), 2);
    // The live build's delivery is kept too: a redelivery still finds its build.
    assert_eq!(
        store
            .record_delivery("d2", &p.id, None, "build")
            .await
            .unwrap(),
        Delivery::Duplicate {
            build_id: live.id.clone(),
            outcome: "build".into()
        }
    );
    store.close().await;
}
hive_testkit::on_both!(db => retention_purges_only_what_ended);

/// The per-build log cap: chunks are kept up to it, the first one past it becomes a line
/// saying the log was cut, later ones are dropped; a resend of any of them changes nothing.
async fn log_cap_cuts_the_log_once(url: String) {
    let store = open_with_boxes(&url).await.with_log_cap(10);
    let p = store
        .create_project(&new_project("chatty", "git://h/chatty"), &audit())
        .await
        .unwrap();
    let b = BuildRow::new_queued(&p, "r1", "refs/heads/main", "api");
    store.insert_build(&b, "api").await.unwrap();
    store
        .place(&[placement(&b.id, "L1", "box-a")])
        .await
        .unwrap();
    let put = |seq: u64, text: &'static str| {
        let store = store.clone();
        let id = b.id.clone();
        async move {
            store
                .store_log("box-a", &chunk(&id, seq, text), None)
                .await
                .unwrap()
        }
    };
    assert!(put(0, "12345").await);
    assert!(
        put(1, "67890X").await,
        "the first chunk over the cap is answered as stored"
    );
    assert!(!put(2, "more").await, "later chunks are dropped");
    assert!(
        put(1, "67890X").await,
        "a resend of the cut chunk is a duplicate"
    );
    assert!(put(0, "12345").await);
    let logs = store.logs_from(&b.id, 0, 10).await.unwrap();
    assert_eq!(logs.len(), 2, "{logs:?}");
    assert_eq!(logs[0].data, b"12345");
    assert_eq!(logs[1].stream, LogStream::System as i32);
    assert!(String::from_utf8_lossy(&logs[1].data).contains("log cut at 10 bytes"));
    store.close().await;
}
hive_testkit::on_both!(db => log_cap_cuts_the_log_once);

async fn expiry_and_timeouts(url: String) {
    let store = open_with_boxes(&url).await;
    let mut np = new_project("t", "git://h/t");
    np.timeout_secs = 1;
    let p = store.create_project(&np, &audit()).await.unwrap();
    let b = BuildRow::new_queued(&p, "", "HEAD", "api");
    store.insert_build(&b, "api").await.unwrap();
    let mut pl = placement(&b.id, "L1", "box-a");
    pl.deadline_ms = 1_000; // long past
    store.place(&[pl]).await.unwrap();
    let now = hive_control_plane::store::now_ms();
    let expired = store.expired_leases(now).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].build_id, b.id);
    assert!(!expired[0].confirmed);

    assert!(store.set_running(&b.id, "L1", "run").await.unwrap());
    assert!(store.overdue_builds(now).await.unwrap().is_empty());
    // Measured after set_running (its start time is its own now_ms, however slow it was).
    let later = store
        .overdue_builds(hive_control_plane::store::now_ms() + 1_100)
        .await
        .unwrap();
    assert_eq!(later.len(), 1);
    let before = store
        .end_build(&b.id, BuildState::TimedOut, "timed out after 1s")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (before.state, before.box_id.as_str()),
        (BuildState::Running, "box-a")
    );
    assert!(
        store.expired_leases(now).await.unwrap().is_empty(),
        "lease released"
    );
    store.close().await;
}
hive_testkit::on_both!(db => expiry_and_timeouts);

/// The SQLite file is created on first start and keeps everything across a reopen.
#[tokio::test]
async fn sqlite_file_created_and_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/hive.db");
    let url = format!("sqlite://{}", path.display());
    let store = Store::open(&url).await.unwrap();
    assert!(path.exists());
    let p = store
        .create_project(&new_project("keep", "git://h/k"), &audit())
        .await
        .unwrap();
    store.close().await;
    let store = Store::open(&url).await.unwrap();
    assert_eq!(store.get_project("keep").await.unwrap().unwrap(), p);
    store.close().await;
    let err = Store::open("mysql://x/y").await.unwrap_err().to_string();
    assert!(err.contains("neither sqlite:// nor postgres://"), "{err}");
}

/// A round larger than one statement (on PostgreSQL several transactions side by side): each
/// build is placed once with one live lease, a build named twice takes once, a build no longer
/// queued is not taken; and the queue read from a (created at, id) key goes on after it, in order.
async fn a_large_round_places_each_build_once_and_the_queue_reads_on(url: String) {
    let store = open_with_boxes(&url).await;
    let p = store
        .create_project(&new_project("svc", "git://h/svc"), &audit())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..700 {
        let b = BuildRow::new_queued(&p, &format!("r{i}"), "refs/heads/main", "api");
        store.insert_build(&b, "api").await.unwrap();
        ids.push(b.id);
    }
    let head = store.queued_builds(300, None).await.unwrap();
    assert_eq!(head.len(), 300);
    let key = head
        .last()
        .map(|b| (b.created_at_ms, b.id.clone()))
        .unwrap();
    let rest = store.queued_builds(1000, Some(&key)).await.unwrap();
    assert_eq!(
        rest.len(),
        400,
        "the read after the key takes the other 400"
    );
    let mut order: Vec<(i64, String)> = head
        .iter()
        .chain(&rest)
        .map(|b| (b.created_at_ms, b.id.clone()))
        .collect();
    let read: Vec<(i64, String)> = order.clone();
    order.sort();
    assert_eq!(read, order, "head then rest is the queue's order");

    // One build is cancelled before the round; one is named twice.
    store
        .end_build(&ids[5], BuildState::Cancelled, "test")
        .await
        .unwrap()
        .unwrap();
    let mut round: Vec<Placement> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| placement(id, &format!("L{i}"), "box-a"))
        .collect();
    round.push(placement(&ids[9], "L-again", "box-b"));
    let took = store.place(&round).await.unwrap();
    assert_eq!(took.len(), 701);
    for (i, ok) in took.iter().enumerate() {
        let want = i != 5 && i != 700;
        assert_eq!(*ok, want, "placement {i}");
    }
    for (i, id) in ids.iter().enumerate() {
        let leases = store.live_leases_of_build(id).await.unwrap();
        let b = store.get_build(id).await.unwrap().unwrap();
        if i == 5 {
            assert!(leases.is_empty());
            assert_eq!(b.state, BuildState::Cancelled);
        } else {
            assert_eq!(leases.len(), 1, "build {i}");
            assert_eq!(leases[0].id, format!("L{i}"));
            assert_eq!(b.state, BuildState::Placed);
            assert_eq!(b.box_id, "box-a");
        }
    }
    assert!(store.queued_builds(1000, None).await.unwrap().is_empty());
    // Placed again: nothing takes.
    let again = store.place(&round[..600]).await.unwrap();
    assert!(again.iter().all(|ok| !ok));
    store.close().await;
}
hive_testkit::on_both!(db => a_large_round_places_each_build_once_and_the_queue_reads_on);

/// The forge status outbox from a webhook group (on PostgreSQL one statement): one `queued`
/// status for each new build of the project that has a forge, none for a project without one
/// or for a copy; `placed` adds none; later transitions of a build follow its earlier ones.
async fn a_group_writes_one_forge_status_per_new_build(url: String) {
    use hive_control_plane::store::ForgeRow;
    let store = open_with_boxes(&url).await;
    let with = store
        .create_project(
            &new_project("with", "https://git.example/o/with.git"),
            &audit(),
        )
        .await
        .unwrap();
    let without = store
        .create_project(
            &new_project("without", "https://git.example/o/without.git"),
            &audit(),
        )
        .await
        .unwrap();
    let forge = ForgeRow {
        project_id: with.id.clone(),
        kind: "github".into(),
        api_url: "https://api.github.example".into(),
        repo_path: "o/with".into(),
        token_nonce: "n".into(),
        token_sealed: "s".into(),
        app_id: 0,
        app_key_nonce: String::new(),
        app_key_sealed: String::new(),
        updated_at_ms: 0,
    };
    store.set_forge(&forge, &audit()).await.unwrap();
    let delivery = |p: &hive_control_plane::store::ProjectRow, d: &str, rev: &str| NewDelivery {
        build: Some(BuildRow::new_queued(p, rev, "refs/heads/main", d)),
        delivery_id: d.into(),
        project_id: p.id.clone(),
        outcome: "build".into(),
    };
    let group = vec![
        delivery(&with, "d1", "a1"),
        delivery(&without, "d2", "b1"),
        delivery(&with, "d3", "a2"),
        delivery(&with, "d1", "a9"), // a copy of d1: no build, no status
        delivery(&with, "d4", "a3"),
    ];
    let answers = store.record_deliveries(&group).await.unwrap();
    assert!(matches!(answers[3], Delivery::Duplicate { .. }));
    let new_builds: Vec<&BuildRow> = group
        .iter()
        .zip(&answers)
        .filter(|(_, a)| **a == Delivery::New)
        .map(|(g, _)| g.build.as_ref().unwrap())
        .collect();
    assert_eq!(new_builds.len(), 4);
    let due = store.due_statuses(i64::MAX, 100).await.unwrap();
    let mut got: Vec<(&str, &str, &str)> = due
        .iter()
        .map(|s| (s.build_id.as_str(), s.revision.as_str(), s.state.as_str()))
        .collect();
    got.sort();
    let mut want: Vec<(&str, &str, &str)> = new_builds
        .iter()
        .filter(|b| b.project_id == with.id)
        .map(|b| (b.id.as_str(), b.revision.as_str(), "queued"))
        .collect();
    want.sort();
    assert_eq!(got, want, "one queued status per new build with a forge");

    // Placed says nothing to a forge; running follows queued.
    let b = new_builds[0];
    assert_eq!(
        store
            .place(&[placement(&b.id, "L1", "box-a")])
            .await
            .unwrap(),
        vec![true]
    );
    assert!(store.set_running(&b.id, "L1", "running").await.unwrap());
    let states: Vec<String> = store
        .statuses_of_build(&b.id)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.state)
        .collect();
    assert_eq!(states, ["queued", "running"], "statuses of {}", b.id);
}
hive_testkit::on_both!(db => a_group_writes_one_forge_status_per_new_build);

/// The webhook group commit keeps its PostgreSQL connection between groups, untested. The
/// server ends every connection of the database (a restart, a proxy's idle cut): the next
/// group, even of one delivery, is still stored (tried again on a tested connection), and a
/// group at the same time as another (the second takes a pool connection) too.
async fn a_group_survives_its_kept_connection_dying(url: String) {
    use sqlx::Connection as _;
    let store = Store::open(&url).await.unwrap();
    let p = store
        .create_project(
            &new_project("kept", "https://git.example/o/kept.git"),
            &audit(),
        )
        .await
        .unwrap();
    let one = |d: &str| {
        vec![NewDelivery {
            build: Some(BuildRow::new_queued(&p, "cafe", "refs/heads/main", d)),
            delivery_id: d.into(),
            project_id: p.id.clone(),
            outcome: "build".into(),
        }]
    };
    let stored = |answers: Vec<Delivery>| answers == vec![Delivery::New];
    assert!(stored(store.record_deliveries(&one("d1")).await.unwrap()));
    if store.kind() == hive_control_plane::store::DbKind::Postgres {
        let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
        let ended: Vec<(bool,)> = sqlx::query_as(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_all(&mut admin)
        .await
        .unwrap();
        assert!(!ended.is_empty(), "the store's connections were ended");
        admin.close().await.unwrap();
    }
    assert!(stored(store.record_deliveries(&one("d2")).await.unwrap()));
    let (a, b) = (one("d3"), one("d4"));
    let (ra, rb) = tokio::join!(store.record_deliveries(&a), store.record_deliveries(&b));
    assert!(stored(ra.unwrap()) && stored(rb.unwrap()));
    for d in ["d1", "d2", "d3", "d4"] {
        let again = store.record_deliveries(&one(d)).await.unwrap();
        assert!(
            matches!(&again[0], Delivery::Duplicate { build_id, .. } if !build_id.is_empty()),
            "{d}: {again:?}"
        );
    }
    store.close().await;
}
hive_testkit::on_both!(db => a_group_survives_its_kept_connection_dying);

/// A box registering writes its row from a read made a moment before; an operator's cordon or
/// drain committed in between stays (it came back active, in the store and in the session).
async fn a_cordon_during_registration_stays(url: String) {
    let store = Store::open(&url).await.unwrap();
    let row = |state: &str| box_row("box-a", state);
    assert_eq!(store.upsert_box(&row("active")).await.unwrap(), "active");
    for held in ["cordoned", "draining"] {
        assert!(store.set_box_state("box-a", held).await.unwrap());
        // The registration read "active" before the operator's change.
        assert_eq!(store.upsert_box(&row("active")).await.unwrap(), held);
        assert_eq!(store.get_box("box-a").await.unwrap().unwrap().state, held);
    }
    // A box that left comes back active.
    assert!(store.set_box_state("box-a", "left").await.unwrap());
    assert_eq!(store.upsert_box(&row("active")).await.unwrap(), "active");
    store.close().await;
}
hive_testkit::on_both!(db => a_cordon_during_registration_stays);

/// A placement takes only onto a box the store has active, whatever the placing control plane's
/// registry says (a cordon made on another control plane reaches it a moment later): the build
/// stays queued for the next round.
async fn a_placement_takes_only_onto_an_active_box(url: String) {
    let store = open_with_boxes(&url).await;
    let p = store
        .create_project(&new_project("cordon", "git://h/cordon"), &audit())
        .await
        .unwrap();
    let b = BuildRow::new_queued(&p, "r1", "refs/heads/main", "api");
    store.insert_build(&b, "api").await.unwrap();
    assert!(store.set_box_state("box-b", "cordoned").await.unwrap());
    assert!(store.set_box_state("box-c", "draining").await.unwrap());
    for (i, box_id) in ["box-b", "box-c", "box-unknown"].into_iter().enumerate() {
        let lease = format!("L{i}");
        let took = store.place(&[placement(&b.id, &lease, box_id)]).await;
        assert_eq!(took.unwrap(), vec![false], "{box_id}");
        assert!(store.live_leases_of_build(&b.id).await.unwrap().is_empty());
        let row = store.get_build(&b.id).await.unwrap().unwrap();
        assert_eq!(row.state.short_name(), "queued", "{box_id}");
    }
    // One round, one build onto a cordoned box and one onto an active box.
    let c = BuildRow::new_queued(&p, "r2", "refs/heads/main", "api");
    store.insert_build(&c, "api").await.unwrap();
    let took = store
        .place(&[
            placement(&b.id, "L3", "box-b"),
            placement(&c.id, "L4", "box-a"),
        ])
        .await
        .unwrap();
    assert_eq!(took, vec![false, true]);
    // Back in service, the box takes it.
    assert!(store.set_box_state("box-b", "active").await.unwrap());
    let took = store.place(&[placement(&b.id, "L5", "box-b")]).await;
    assert_eq!(took.unwrap(), vec![true]);
    store.close().await;
}
hive_testkit::on_both!(db => a_placement_takes_only_onto_an_active_box);

/// A webhook group's builds placed in the group's own transaction (`record_deliveries_placing`):
/// only builds the group inserted, only when no other build of their size class is queued (an
/// older one keeps them queued, so the scheduler keeps the class's order; one of another class
/// does not, as in a round), not when the queue is longer than the head the group reads, only
/// onto a box the store has active; a placement that did not take leaves its build queued with
/// its delivery stored.
async fn a_webhook_group_places_its_builds_only_when_none_of_their_class_waits(url: String) {
    let store = open_with_boxes(&url).await;
    let p = store
        .create_project(&new_project("atonce", "git://h/atonce"), &audit())
        .await
        .unwrap();
    let delivery = |d: &str, rev: &str| NewDelivery {
        build: Some(BuildRow::new_queued(&p, rev, "refs/heads/main", d)),
        delivery_id: d.into(),
        project_id: p.id.clone(),
        outcome: "build".into(),
    };
    let id = |n: &NewDelivery| n.build.as_ref().unwrap().id.clone();
    let state = |id: String| {
        let store = &store;
        async move {
            store
                .get_build(&id)
                .await
                .unwrap()
                .unwrap()
                .state
                .short_name()
        }
    };

    // Nothing queued: both builds of the group are placed with their deliveries; a copy of
    // d1 in the same group inserts no build, and its placement does not take.
    let group = vec![
        delivery("d1", "r1"),
        delivery("d2", "r2"),
        delivery("d1", "r9"),
    ];
    let places: Vec<Placement> = group
        .iter()
        .enumerate()
        .map(|(i, g)| placement(&id(g), &format!("L{i}"), "box-a"))
        .collect();
    let (answers, took) = store
        .record_deliveries_placing(&group, &places)
        .await
        .unwrap();
    assert_eq!(answers[..2], [Delivery::New, Delivery::New]);
    assert!(matches!(answers[2], Delivery::Duplicate { .. }));
    assert_eq!(took, vec![Some(true), Some(true), Some(false)]);
    assert_eq!(state(id(&group[0])).await, "placed");
    assert_eq!(
        store
            .live_leases_of_build(&id(&group[1]))
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(store.get_build(&id(&group[2])).await.unwrap().is_none());

    // An older build of another class waits (queued by the API, no box has room for it): it
    // does not hold the group's builds back, as it would not in a round.
    let mut large = BuildRow::new_queued(&p, "r3", "refs/heads/main", "api");
    large.size_class = "large".into();
    store.insert_build(&large, "api").await.unwrap();
    let group = vec![delivery("d2a", "r3a")];
    let places = vec![placement(&id(&group[0]), "L2a", "box-a")];
    let (_, took) = store
        .record_deliveries_placing(&group, &places)
        .await
        .unwrap();
    assert_eq!(took, vec![Some(true)], "another class waiting");
    assert_eq!(state(id(&group[0])).await, "placed");

    // An older build of its own class waits: the group's build stays queued behind it,
    // delivery and build stored.
    let older = BuildRow::new_queued(&p, "r3b", "refs/heads/main", "api");
    store.insert_build(&older, "api").await.unwrap();
    let group = vec![delivery("d3", "r4")];
    let places = vec![placement(&id(&group[0]), "L3", "box-a")];
    let (answers, took) = store
        .record_deliveries_placing(&group, &places)
        .await
        .unwrap();
    assert_eq!(
        (answers, took),
        (vec![Delivery::New], vec![None]),
        "not tried"
    );
    assert_eq!(state(id(&group[0])).await, "queued");
    assert!(store
        .live_leases_of_build(&id(&group[0]))
        .await
        .unwrap()
        .is_empty());

    // No small build queued again (the large one still waits), a placement onto a box the store has cordoned does not take;
    // the other of the group, onto an active box, does.
    store
        .place(&[
            placement(&older.id, "L4", "box-a"),
            placement(&id(&group[0]), "L5", "box-a"),
        ])
        .await
        .unwrap();
    assert!(store.set_box_state("box-b", "cordoned").await.unwrap());
    let group = vec![delivery("d4", "r5"), delivery("d5", "r6")];
    let places = vec![
        placement(&id(&group[0]), "L6", "box-b"),
        placement(&id(&group[1]), "L7", "box-c"),
    ];
    let (_, took) = store
        .record_deliveries_placing(&group, &places)
        .await
        .unwrap();
    assert_eq!(took, vec![Some(false), Some(true)]);
    // d4 stays queued while the newer d5 of its class is placed, as in a round: a build whose
    // box refused it does not hold back its class within the round that chose that box.
    assert_eq!(state(id(&group[0])).await, "queued");
    assert_eq!(state(id(&group[1])).await, "placed");
    // Placed and leased once: the scheduler's round finds nothing more to take.
    assert_eq!(
        store
            .place(&[placement(&id(&group[1]), "L8", "box-c")])
            .await
            .unwrap(),
        vec![false]
    );

    // A queue longer than the head the group reads (65 large builds waiting, d4 placed): which
    // classes wait past it is not known, nothing is tried.
    for i in 0..64 {
        let mut b = BuildRow::new_queued(&p, &format!("big{i}"), "refs/heads/main", "api");
        b.size_class = "large".into();
        store.insert_build(&b, "api").await.unwrap();
    }
    store
        .place(&[placement(&id(&group[0]), "L9", "box-a")])
        .await
        .unwrap();
    let group = vec![delivery("d6", "r7")];
    let places = vec![placement(&id(&group[0]), "L10", "box-a")];
    let (_, took) = store
        .record_deliveries_placing(&group, &places)
        .await
        .unwrap();
    assert_eq!(took, vec![None], "a long queue: not tried");
    assert_eq!(state(id(&group[0])).await, "queued");
    store.close().await;
}
hive_testkit::on_both!(db => a_webhook_group_places_its_builds_only_when_none_of_their_class_waits);

/// PostgreSQL, several control planes: a cordon and a placement round on the same box at the
/// same moment are ordered. A round that begins while the cordon commits waits for it and then
/// places nothing onto the box; a cordon that begins while a round is in flight waits for the
/// round (so once it has answered, no placement onto the box is still to commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cordon_and_a_round_in_flight_are_ordered_on_postgres() {
    use sqlx::Connection as _;
    let Some(db) = hive_testkit::TestDb::postgres("cordon_round_order").await else {
        return;
    };
    let url = db.url.clone();
    let store = open_with_boxes(&url).await;
    let p = store
        .create_project(&new_project("order", "git://h/order"), &audit())
        .await
        .unwrap();
    let b = BuildRow::new_queued(&p, "r1", "refs/heads/main", "api");
    store.insert_build(&b, "api").await.unwrap();
    let still_waiting = std::time::Duration::from_millis(300);

    // A cordon committing (as `set_box_state` does it, on a connection of its own) ...
    let mut other = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut cordon = other.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)::text")
        .bind(hive_control_plane::store::BOX_STATE_LOCK)
        .execute(&mut *cordon)
        .await
        .unwrap();
    sqlx::query("UPDATE boxes SET state = 'cordoned' WHERE id = 'box-a'")
        .execute(&mut *cordon)
        .await
        .unwrap();
    // ... holds a round onto that box off until it commits, and the round then sees it.
    let onto_a = [placement(&b.id, "L1", "box-a")];
    let round = store.place(&onto_a);
    tokio::pin!(round);
    assert!(
        tokio::time::timeout(still_waiting, &mut round)
            .await
            .is_err(),
        "the round waits for the cordon committing"
    );
    cordon.commit().await.unwrap();
    assert_eq!(
        round.await.unwrap(),
        vec![false],
        "nothing onto the cordoned box"
    );

    // A round in flight (holding what `place` holds) holds a cordon off until it commits.
    let mut placing = other.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)::text")
        .bind(hive_control_plane::store::BOX_STATE_LOCK)
        .execute(&mut *placing)
        .await
        .unwrap();
    let change = store.set_box_state("box-b", "cordoned");
    tokio::pin!(change);
    assert!(
        tokio::time::timeout(still_waiting, &mut change)
            .await
            .is_err(),
        "the cordon waits for the round in flight"
    );
    placing.commit().await.unwrap();
    assert!(change.await.unwrap());
    other.close().await.unwrap();
    store.close().await;
    db.drop_db().await;
}
