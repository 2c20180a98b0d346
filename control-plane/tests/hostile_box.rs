//! A box that misbehaves on purpose, over the real BoxAgent stream against a real database:
//! one that stops reading its control stream must lose its own session, never stall the
//! scheduler for every other box; one that numbers its messages absurdly far ahead is cut off
//! before the control plane remembers anything for it; one that reports impossible pools or
//! floods a heartbeat with cells and builds is cut to what a box could hold.

mod common;

use std::time::Duration;

use common::{api, eventually, fake_box, http, pool, start_with, FakeBox, FakeBoxConfig};
use hive_control_plane::server::Handle;
use hive_proto::v1::box_message::Msg as BoxMsg;
use hive_proto::v1::control_message::Msg as CtlMsg;
use hive_proto::v1::{BoxMessage, CreateProjectRequest, Heartbeat, SubmitBuildRequest};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_that_stops_reading_loses_its_session_not_the_scheduler() {
    let db = hive_testkit::TestDb::sqlite();
    // A small per-box queue so a few assignments fill it (the HTTP/2 windows take ~128 KiB
    // first: each assignment here carries 16 KiB of env).
    let handle = start_with(&db.url, |c| c.box_queue = 4).await;
    let mut client = api(&handle).await;
    client
        .create_project(CreateProjectRequest {
            name: "big".into(),
            repo_url: "git://198.18.0.2/big.git".into(),
            secret: "s".into(),
            steps: vec!["true".into()],
            env: [("PAD".to_string(), "x".repeat(16 * 1024))].into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // box-a has room for everything and never reads what it is sent.
    let stalled = FakeBox::connect(
        &format!("http://{}", handle.grpc_addr),
        FakeBoxConfig {
            reads: false,
            ..FakeBoxConfig::quiet("box-a", vec![pool("small", 500, 500)])
        },
    )
    .await
    .expect("box-a registers");
    let stalled_beat = stalled.heartbeat_every(
        Duration::from_millis(200),
        vec![pool("small", 500, 500)],
        vec![],
    );
    for _ in 0..40 {
        client
            .submit_build(SubmitBuildRequest {
                project: "big".into(),
                revision: "abc123".into(),
                git_ref: String::new(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // Let the scheduler push at box-a until its queue is full.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // box-b joins with room and reads: it must be given builds.
    let (mut good, _) = fake_box(&handle, "box-b", vec![pool("small", 50, 50)]).await;
    let _good_beat = good.heartbeat_every(
        Duration::from_millis(200),
        vec![pool("small", 50, 50)],
        vec![],
    );
    match good.next_non_ack(WAIT).await {
        Some(CtlMsg::Assign(a)) => assert!(!a.build_id.is_empty()),
        other => panic!("box-b got no assignment while box-a stalled: {other:?}"),
    }

    // box-a's session was ended for it, and /metrics says so.
    let metrics = http(handle.http_addr, "GET", "/metrics", &[], b"").await;
    assert!(
        metrics
            .body
            .lines()
            .any(|l| l.starts_with("hive_box_queue_overflows ") && !l.ends_with(" 0")),
        "{}",
        metrics.body
    );
    assert!(metrics.body.contains("hive_limit{name=\"box_queue\"} 4\n"));
    stalled_beat.abort();
    drop(stalled);
    handle.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_seq_far_ahead_ends_the_session() {
    let db = hive_testkit::TestDb::sqlite();
    let handle = start_with(&db.url, |_| {}).await;
    let (mut b, acked) = fake_box(&handle, "box-x", vec![pool("small", 1, 1)]).await;
    b.send_raw(BoxMessage {
        seq: acked + (1 << 40),
        msg: Some(BoxMsg::Heartbeat(Heartbeat::default())),
    })
    .await
    .unwrap();
    // The control plane closes the stream (no ack for it) and counts the violation.
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match b.next_raw(WAIT).await {
                Ok(Some(m)) => assert!(
                    !matches!(m.msg, Some(CtlMsg::Ack(ref a)) if a.seq > acked),
                    "acked an impossible seq: {m:?}"
                ),
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "session still open after a seq 2^40 ahead");
    eventually(WAIT, "the violation is counted", || async {
        http(handle.http_addr, "GET", "/metrics", &[], b"")
            .await
            .body
            .contains("hive_box_violations_total{kind=\"seq_ahead\"} 1\n")
    })
    .await;
    // A well-behaved reconnect is welcome again.
    let (_again, acked_again) = fake_box(&handle, "box-x", vec![pool("small", 1, 1)]).await;
    assert_eq!(acked_again, acked);
    handle.shutdown().await;
    db.drop_db().await;
}

/// Opens a session as `id` without the test box's checks: the control plane's answer.
async fn register_as(
    handle: &hive_control_plane::server::Handle,
    id: &str,
) -> Result<(), tonic::Status> {
    use hive_proto::v1::box_agent_client::BoxAgentClient;
    use hive_proto::v1::Register;
    let mut client = BoxAgentClient::connect(format!("http://{}", handle.grpc_addr))
        .await
        .expect("connect BoxAgent");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(BoxMessage {
        seq: 0,
        msg: Some(BoxMsg::Register(Register {
            box_id: id.to_string(),
            hostname: "impostor.test".into(),
            backend: "sandbox".into(),
            pools: vec![pool("small", 100, 100)],
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(drop)
}

/// Issue 10: two boxes claiming one id used to knock each other off in a loop, each taking the
/// other's assignments. The second is refused with an error naming the first; once the first
/// has gone, the id is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_box_with_a_connected_id_is_refused() {
    let db = hive_testkit::TestDb::sqlite();
    let handle = start_with(&db.url, |_| {}).await;
    let (first, _) = fake_box(&handle, "box-d", vec![pool("small", 1, 1)]).await;
    let beat = first.heartbeat_every(
        Duration::from_millis(200),
        vec![pool("small", 1, 1)],
        vec![],
    );
    let e = register_as(&handle, "box-d")
        .await
        .expect_err("a second session for a connected box id");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert!(
        e.message()
            .contains("\"box-d\" is already connected from 127.0.0.1:")
            && e.message().contains("box-d.test")
            && e.message().contains("--box-id"),
        "{}",
        e.message()
    );
    // The first box kept its session and its registration.
    let boxes = api(&handle)
        .await
        .list_boxes(hive_proto::v1::ListBoxesRequest {})
        .await
        .unwrap()
        .into_inner()
        .boxes;
    assert_eq!(boxes.len(), 1);
    assert_eq!(boxes[0].hostname, "box-d.test");
    assert_eq!(boxes[0].state, hive_proto::v1::BoxState::Active as i32);
    let metrics = http(handle.http_addr, "GET", "/metrics", &[], b"").await;
    assert!(
        metrics
            .body
            .contains("hive_box_violations_total{kind=\"duplicate_id\"} 1\n"),
        "{}",
        metrics.body
    );
    // The first box goes (as a restarting box would): the id is free at once.
    beat.abort();
    drop(first);
    register_as(&handle, "box-d")
        .await
        .expect("the id is free once its box has gone");
    handle.shutdown().await;
    db.drop_db().await;
}

/// Issue 10/11: a box that claims a huge pool, or pools of classes the control plane does not
/// know, would draw every build; its report is capped and cleaned before placement sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impossible_pool_report_is_capped() {
    let db = hive_testkit::TestDb::sqlite();
    let handle = start_with(&db.url, |_| {}).await;
    let huge = hive_proto::v1::PoolState {
        size_class: "small".into(),
        warm: u32::MAX,
        booting: u32::MAX,
        busy: 7,
        target: u32::MAX,
        capacity: u32::MAX,
    };
    let pools = vec![huge.clone(), huge, pool("galactic", 5, 5)];
    let (b, _) = fake_box(&handle, "box-big", pools).await;
    let boxes = api(&handle)
        .await
        .list_boxes(hive_proto::v1::ListBoxesRequest {})
        .await
        .unwrap()
        .into_inner()
        .boxes;
    let p = &boxes[0].pools;
    assert_eq!(p.len(), 1, "unknown and repeated classes dropped: {p:?}");
    assert_eq!(p[0].size_class, "small");
    assert_eq!(p[0].capacity, 1024);
    assert_eq!(p[0].busy, 7);
    assert_eq!(p[0].warm, 1024 - 7);
    assert_eq!(p[0].booting, 0);
    let metrics = http(handle.http_addr, "GET", "/metrics", &[], b"").await;
    assert!(
        metrics
            .body
            .contains("hive_box_violations_total{kind=\"pool_report\"} 1\n"),
        "{}",
        metrics.body
    );
    drop(b);
    handle.shutdown().await;
    db.drop_db().await;
}

/// Issue 11: a heartbeat is one message of up to 4 MiB, and every cell and running build in it
/// used to be written or looked up: tens of thousands of rows and a stop order per unknown
/// build, every beat, from one hostile box. The lists are cut to what a box could hold (1024
/// cells per class), ids longer than 128 bytes and repeats are dropped, the violation is
/// counted, at most 64 stop orders answer one heartbeat, and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impossible_heartbeat_is_cut_to_what_a_box_can_hold() {
    let db = hive_testkit::TestDb::sqlite();
    // A long lease: the test box sends no heartbeats of its own, and must not count as silent
    // while the control plane works through the flood.
    let handle = start_with(&db.url, |c| c.lease = Duration::from_secs(60)).await;
    let (mut b, acked) = fake_box(&handle, "box-flood", vec![pool("small", 1, 1)]).await;
    let cell = |id: String| hive_proto::v1::CellInfo {
        id,
        box_id: "box-flood".into(),
        size_class: "small".into(),
        state: "warm".into(),
        ..Default::default()
    };
    let mut cells: Vec<_> = (0..3)
        .map(|i| cell(format!("{i}{}", "x".repeat(300))))
        .collect();
    cells.extend((0..5000).map(|i| cell(format!("cell-{i}"))));
    let mut running: Vec<String> = (0..5000).map(|i| format!("ghost-{i}")).collect();
    running.extend((0..100).map(|i| format!("ghost-{i}")));
    running.push("g".repeat(300));
    b.send_raw(BoxMessage {
        seq: 0,
        msg: Some(BoxMsg::Heartbeat(Heartbeat {
            pools: vec![pool("small", 1, 1)],
            running_builds: running,
            cells,
        })),
    })
    .await
    .unwrap();
    // Every heartbeat is answered (with the current ack) once handled. The stop orders for the
    // builds it names without a lease come before that answer: at most 64 per heartbeat.
    let stops = tokio::time::timeout(WAIT, async {
        let mut stops = 0;
        loop {
            match b.next_raw(WAIT).await {
                Ok(Some(m)) => match m.msg {
                    Some(CtlMsg::Ack(_)) => return Ok(stops),
                    Some(CtlMsg::Cancel(_)) => stops += 1,
                    _ => {}
                },
                Ok(None) => return Err("the control plane closed the stream".to_string()),
                Err(e) => return Err(format!("{e:?}")),
            }
        }
    })
    .await
    .expect("the flooding heartbeat was answered within the wait");
    assert_eq!(stops, Ok(64), "stop orders in answer to one heartbeat");
    assert_eq!(b.acked_seq(), acked);
    let stored = api(&handle)
        .await
        .list_cells(hive_proto::v1::ListCellsRequest {
            box_id: "box-flood".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .cells;
    // Two classes are built in (small, large): at most 2 x 1024 cells.
    assert_eq!(stored.len(), 2048, "cells stored from one heartbeat");
    assert!(
        stored.iter().all(|c| c.id.len() <= 128),
        "a 300-byte cell id was stored"
    );
    let metrics = http(handle.http_addr, "GET", "/metrics", &[], b"").await;
    assert!(
        metrics
            .body
            .contains("hive_box_violations_total{kind=\"heartbeat_lists\"} 1\n"),
        "{}",
        metrics.body
    );
    drop(b);
    handle.shutdown().await;
    db.drop_db().await;
}

/// Issue 11: a build's FINISHED (or REJECTED) message becomes the build's message and a
/// transition's reason. It came from the box uncut, up to the 4 MiB message limit; it is now
/// cut to 2 KiB and marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_finish_message_is_cut() {
    use hive_proto::v1::{BuildState, BuildUpdate, BuildUpdateKind, GetBuildRequest};
    let db = hive_testkit::TestDb::sqlite();
    let handle = start_with(&db.url, |c| c.lease = Duration::from_secs(60)).await;
    let mut client = api(&handle).await;
    client
        .create_project(CreateProjectRequest {
            name: "talky".into(),
            repo_url: "git://198.18.0.2/talky.git".into(),
            secret: "s".into(),
            steps: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let (mut b, _) = fake_box(&handle, "box-talky", vec![pool("small", 1, 1)]).await;
    let _beat = b.heartbeat_every(
        Duration::from_millis(200),
        vec![pool("small", 1, 1)],
        vec![],
    );
    let id = client
        .submit_build(SubmitBuildRequest {
            project: "talky".into(),
            revision: "abc123".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let a = b.next_assignment(WAIT).await.expect("assigned");
    b.accept(&a, "cell-talky", true).await;
    let seq = b
        .send_acked(BoxMsg::Update(BuildUpdate {
            build_id: a.build_id.clone(),
            lease_id: a.lease_id.clone(),
            kind: BuildUpdateKind::Finished as i32,
            state: BuildState::Failed as i32,
            exit_code: 1,
            message: "ab".repeat(512 * 1024),
            ..Default::default()
        }))
        .await;
    b.wait_ack(seq, WAIT).await.expect("finish acked");
    let build = client
        .get_build(GetBuildRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(build.state, BuildState::Failed as i32);
    assert!(
        build.message.len() <= 2048 + '…'.len_utf8() && build.message.starts_with("abab"),
        "message of {} bytes stored",
        build.message.len()
    );
    assert!(build.message.ends_with('…'));
    drop(b);
    handle.shutdown().await;
    db.drop_db().await;
}

/// A heartbeat writes only the cells that changed since the session's last write (at 1,000
/// boxes of 100 cells, writing them all every beat was most of SQLite's work), and of several
/// heartbeats waiting at once only the last is applied. The stored cells must still be exactly
/// what the box last reported: changed, new and gone cells, a burst, and a new session (which
/// writes them all, as another session may have left rows behind), and no other box can take a
/// cell row over by naming its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_cells_follow_each_heartbeat_a_burst_and_a_new_session() {
    let db = hive_testkit::TestDb::sqlite();
    let handle = start_with(&db.url, |c| c.lease = Duration::from_secs(60)).await;
    let cell = |id: &str, state: &str, build: &str| hive_proto::v1::CellInfo {
        id: id.into(),
        box_id: "box-cells".into(),
        size_class: "small".into(),
        state: state.into(),
        build_id: build.into(),
        ..Default::default()
    };
    let beat = |cells: Vec<hive_proto::v1::CellInfo>| BoxMessage {
        seq: 0,
        msg: Some(BoxMsg::Heartbeat(Heartbeat {
            pools: vec![pool("small", 8, 8)],
            running_builds: Vec::new(),
            cells,
        })),
    };
    async fn answered(b: &mut FakeBox) {
        loop {
            match b.next_raw(WAIT).await {
                Ok(Some(m)) if matches!(m.msg, Some(CtlMsg::Ack(_))) => return,
                Ok(Some(_)) => {}
                other => panic!("no answer to a heartbeat: {other:?}"),
            }
        }
    }
    async fn stored(handle: &Handle) -> Vec<(String, String, String)> {
        let mut cells: Vec<(String, String, String)> = api(handle)
            .await
            .list_cells(hive_proto::v1::ListCellsRequest {
                box_id: "box-cells".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .cells
            .into_iter()
            .map(|c| (c.id, c.state, c.build_id))
            .collect();
        cells.sort();
        cells
    }
    let want = |v: &[(&str, &str, &str)]| -> Vec<(String, String, String)> {
        v.iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect()
    };

    let (mut b, _) = fake_box(&handle, "box-cells", vec![pool("small", 8, 8)]).await;
    b.send_raw(beat(vec![
        cell("c1", "warm", ""),
        cell("c2", "warm", ""),
        cell("c3", "warm", ""),
    ]))
    .await
    .unwrap();
    answered(&mut b).await;
    assert_eq!(
        stored(&handle).await,
        want(&[("c1", "warm", ""), ("c2", "warm", ""), ("c3", "warm", "")])
    );

    // c1 changed, c2 the same, c3 gone, c4 new. (This soon after the last stored heartbeat it
    // is stored when half an interval has passed since that one.)
    b.send_raw(beat(vec![
        cell("c1", "busy", "b-1"),
        cell("c2", "warm", ""),
        cell("c4", "booting", ""),
    ]))
    .await
    .unwrap();
    answered(&mut b).await;
    let changed = want(&[
        ("c1", "busy", "b-1"),
        ("c2", "warm", ""),
        ("c4", "booting", ""),
    ]);
    eventually(WAIT, "the changed cells stored", || {
        let (handle, changed) = (&handle, changed.clone());
        async move { stored(handle).await == changed }
    })
    .await;

    // A burst: whatever is applied of it, the last report is what stays.
    for cells in [
        vec![cell("c5", "warm", "")],
        vec![cell("c6", "warm", ""), cell("c1", "warm", "")],
        vec![cell("c2", "busy", "b-2"), cell("c7", "warm", "")],
    ] {
        b.send_raw(beat(cells)).await.unwrap();
    }
    let last = want(&[("c2", "busy", "b-2"), ("c7", "warm", "")]);
    eventually(WAIT, "the burst's last cells stored", || {
        let (handle, last) = (&handle, last.clone());
        async move { stored(handle).await == last }
    })
    .await;

    // A new session writes the box's cells whole.
    drop(b);
    let (mut b, _) = fake_box(&handle, "box-cells", vec![pool("small", 8, 8)]).await;
    b.send_raw(beat(vec![cell("c8", "warm", "")]))
        .await
        .unwrap();
    answered(&mut b).await;
    assert_eq!(stored(&handle).await, want(&[("c8", "warm", "")]));

    // Another box naming this box's cell id does not take the row over.
    let (mut other, _) = fake_box(&handle, "box-other", vec![pool("small", 8, 8)]).await;
    other
        .send_raw(beat(vec![cell("c8", "busy", "evil")]))
        .await
        .unwrap();
    answered(&mut other).await;
    assert_eq!(stored(&handle).await, want(&[("c8", "warm", "")]));
    drop(other);
    drop(b);
    handle.shutdown().await;
    db.drop_db().await;
}

/// The `hive_box_heartbeats_total` counter of one kind (`stored` or `live`).
async fn heartbeats(handle: &Handle, kind: &str) -> u64 {
    let text = http(handle.http_addr, "GET", "/metrics", &[], b"")
        .await
        .body;
    let prefix = format!("hive_box_heartbeats_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |n| n.trim().parse().expect("a counter"))
}

/// A box that sends heartbeats as fast as it is answered, each naming a build it holds no lease
/// for: each one reaches the live view (the scheduler's) at once, but the store gets about one
/// write per half heartbeat interval, not one per heartbeat (the made-up build is checked at a
/// renewal, not on each heartbeat); and the flood's last heartbeat is stored once the gap has
/// passed, though nothing comes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_flood_costs_the_store_one_write_per_half_interval() {
    let db = hive_testkit::TestDb::sqlite();
    // Heartbeats every 400 ms (the tests' setting): a write per 200 ms at most.
    let handle = start_with(&db.url, |c| c.lease = Duration::from_secs(60)).await;
    let interval = Duration::from_millis(400);
    let beat = |warm: u32| BoxMessage {
        seq: 0,
        msg: Some(BoxMsg::Heartbeat(Heartbeat {
            pools: vec![pool("small", warm, 64)],
            running_builds: vec!["no-such-build".into()],
            cells: (0..warm)
                .map(|i| hive_proto::v1::CellInfo {
                    id: format!("c{i}"),
                    box_id: "box-flood".into(),
                    size_class: "small".into(),
                    state: "warm".into(),
                    ..Default::default()
                })
                .collect(),
        })),
    };
    async fn live_warm(handle: &Handle) -> u32 {
        let boxes = api(handle)
            .await
            .list_boxes(hive_proto::v1::ListBoxesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .boxes;
        let b = boxes.iter().find(|b| b.id == "box-flood").expect("listed");
        b.pools.iter().map(|p| p.warm).sum()
    }
    /// The box's stored pools and how many cells rows it has.
    async fn in_store(store: &hive_control_plane::store::Store) -> (String, usize) {
        let row = store.get_box("box-flood").await.unwrap().expect("stored");
        let cells = store.list_cells(Some("box-flood")).await.unwrap().len();
        (row.pools_json, cells)
    }
    let store = hive_control_plane::store::Store::open(&db.url)
        .await
        .unwrap();

    let (mut b, _) = fake_box(&handle, "box-flood", vec![pool("small", 0, 64)]).await;
    let before = heartbeats(&handle, "stored").await;
    let started = std::time::Instant::now();
    let mut sent = 0u32;
    while started.elapsed() < Duration::from_secs(2) {
        sent += 1;
        let warm = 1 + sent % 60;
        b.send_raw(beat(warm)).await.unwrap();
        loop {
            match b.next_raw(WAIT).await {
                Ok(Some(m)) if matches!(m.msg, Some(CtlMsg::Ack(_))) => break,
                Ok(Some(_)) => {}
                other => panic!("no answer to heartbeat {sent}: {other:?}"),
            }
        }
        // The live view follows each heartbeat (checked now and then: the check is an RPC).
        if sent.is_multiple_of(50) {
            assert_eq!(
                live_warm(&handle).await,
                warm,
                "live view after heartbeat {sent}"
            );
        }
    }
    let elapsed = started.elapsed();
    let written = heartbeats(&handle, "stored").await - before;
    let live = heartbeats(&handle, "live").await;
    let bound = u64::try_from(elapsed.as_millis() / (interval.as_millis() / 2)).unwrap() + 2;
    eprintln!("{sent} heartbeats in {elapsed:?}: {written} stored, {live} live only");
    // A flood: several heartbeats per gap, or the bound below says little.
    assert!(sent >= 40, "only {sent} heartbeats answered in {elapsed:?}");
    assert!(
        written <= bound,
        "{written} of {sent} heartbeats written to the store in {elapsed:?} (at most {bound})"
    );
    // A heartbeat left to the live view is stored later if none comes within the gap.
    assert!(written + live >= u64::from(sent), "every heartbeat applied");

    // Nothing comes after the flood: its last heartbeat is stored once half an interval has
    // passed (waited for up to WAIT: this machine is sometimes slow, and without the deferred
    // write it is never stored).
    let last = 1 + sent % 60;
    let want_pools = format!("\"warm\":{last}");
    eventually(WAIT, "the flood's last heartbeat stored", || {
        let (store, want_pools) = (&store, want_pools.clone());
        async move {
            let (pools, cells) = in_store(store).await;
            pools.contains(&want_pools) && cells == last as usize
        }
    })
    .await;
    drop(b);
    handle.shutdown().await;
    store.close().await;
    db.drop_db().await;
}

/// A message acked on receipt (a key exchange) has the acked seq stored before the ack goes
/// out. Otherwise a control plane killed right after the ack would tell the box's next session
/// an older seq, and the box, which dropped the acked message, would resend from past a gap
/// that session's acks never get over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_on_receipt_is_stored_before_the_box_hears_it() {
    let db = hive_testkit::TestDb::sqlite();
    let handle = start_with(&db.url, |c| c.lease = Duration::from_secs(60)).await;
    let (mut b, acked) = fake_box(&handle, "box-kx", vec![pool("small", 1, 1)]).await;
    assert_eq!(acked, 0);
    let seq = b
        .key_exchange(hive_proto::v1::KeyExchangeRequest {
            build_id: "no-such-build".into(),
            lease_id: "no-such-lease".into(),
            cell_id: "cell-kx".into(),
            cell_public_key: hive_types::PublicKey::from_bytes([7; 32]).to_base64(),
        })
        .await;
    b.wait_ack(seq, WAIT).await.expect("the key exchange acked");
    let store = hive_control_plane::store::Store::open(&db.url)
        .await
        .unwrap();
    let row = store.get_box("box-kx").await.unwrap().expect("stored");
    assert_eq!(
        row.acked_seq, seq,
        "the acked seq the box was told is stored"
    );
    // The box's next session is told the same seq.
    drop(b);
    let (_b, acked) = fake_box(&handle, "box-kx", vec![pool("small", 1, 1)]).await;
    assert_eq!(acked, seq);
    store.close().await;
    handle.shutdown().await;
    db.drop_db().await;
}
