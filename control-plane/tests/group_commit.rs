//! Group commit on the BoxAgent stream: box messages that are already waiting when the control
//! plane turns to the stream are stored in one transaction and answered by one cumulative ack,
//! sent only after that commit. None is lost, the log keeps the box's order, and the acked seq
//! a reconnect is told is the one committed with them.
//!
//! To make "already waiting" certain rather than likely, the test holds the database's write
//! path (SQLite: the file's write lock; PostgreSQL: the build's row lock) while the first message
//! is being stored, sends the rest of the burst, then lets go.

mod common;

use std::time::Duration;

use common::{api, fake_box, pool, start_with};
use hive_control_plane::server::Handle;
use hive_proto::v1::box_message::Msg as BoxMsg;
use hive_proto::v1::control_message::Msg as CtlMsg;
use hive_proto::v1::{
    Assignment, BuildState, BuildUpdate, BuildUpdateKind, CreateProjectRequest, GetBuildRequest,
    LogChunk, LogStream, StreamLogsRequest, SubmitBuildRequest,
};
use hive_testkit::fakebox::FakeBoxError;
use sqlx::Connection;
use tokio_stream::StreamExt;

const WAIT: Duration = Duration::from_secs(10);
const LINES: u64 = 40;

hive_testkit::on_both!(db => a_burst_of_box_messages_is_stored_in_one_go_and_acked_once);

async fn a_burst_of_box_messages_is_stored_in_one_go_and_acked_once(url: String) {
    // Heartbeats and leases long enough that the held write path alone decides the timing.
    let handle = start_with(&url, |c| {
        c.heartbeat_interval = Duration::from_secs(5);
        c.lease = Duration::from_secs(30);
    })
    .await;
    let mut client = api(&handle).await;
    client
        .create_project(CreateProjectRequest {
            name: "burst".into(),
            repo_url: "git://198.18.0.2/burst.git".into(),
            secret: "s".into(),
            steps: vec!["make".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let (mut bx, _) = fake_box(&handle, "box-burst", vec![pool("small", 1, 2)]).await;
    let id = client
        .submit_build(SubmitBuildRequest {
            project: "burst".into(),
            revision: "abc123".into(),
            git_ref: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let a = match bx.next_non_ack(WAIT).await {
        Some(CtlMsg::Assign(a)) => a,
        other => panic!("expected an Assignment, got {other:?}"),
    };
    assert_eq!(a.build_id, id);

    // A follower from the start: it gets the burst's chunks as announced with their commit.
    let mut follow = client
        .stream_logs(StreamLogsRequest {
            build_id: id.clone(),
            from_seq: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();

    // The first message gets stuck in its transaction behind the held write path...
    let mut hold = hold_writes(&url, &id).await;
    let first = bx.send_acked(update(&a, BuildUpdateKind::Accepted)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...while the rest of the burst arrives and waits on the stream.
    bx.send_acked(update(&a, BuildUpdateKind::Running)).await;
    let mut expect = String::new();
    for i in 0..LINES {
        let line = format!("line {i}\n");
        bx.send_acked(log(&a, i, &line)).await;
        expect.push_str(&line);
    }
    let mut fin = update(&a, BuildUpdateKind::Finished);
    if let BoxMsg::Update(u) = &mut fin {
        u.state = BuildState::Succeeded as i32;
    }
    let last = bx.send_acked(fin).await;
    assert_eq!(last, first + LINES + 2);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Nothing is acked while nothing could be stored.
    let early = bx.next_raw(Duration::from_millis(50)).await;
    assert!(
        matches!(early, Err(FakeBoxError::Timeout(..))),
        "a message arrived before anything was stored: {early:?}"
    );

    sqlx::query("COMMIT").execute(&mut hold).await.unwrap();
    hold.close().await.ok();

    // One ack for the stuck message, then one for the whole burst.
    let mut acks = Vec::new();
    while acks.last() != Some(&last) {
        let m = bx
            .next_raw(WAIT)
            .await
            .unwrap_or_else(|_| panic!("no ack of {last} in {WAIT:?}; acks so far {acks:?}"))
            .expect("stream open");
        match m.msg {
            Some(CtlMsg::Ack(ack)) => acks.push(ack.seq),
            other => panic!("expected only acks, got {other:?}"),
        }
    }
    assert_eq!(
        acks,
        vec![first, last],
        "the burst waiting on the stream is acked once"
    );

    // Acked means stored: every line is there, once, in the box's order, and the build ran
    // through every state. The follower saw the same, and its stream ended with the build.
    assert_eq!(
        logs(&handle, &id).await,
        (expect.clone(), (0..LINES).collect())
    );
    let (mut text, mut seqs) = (String::new(), Vec::new());
    while let Some(c) = tokio::time::timeout(WAIT, follow.next())
        .await
        .expect("the follower's stream ends with the build")
    {
        let c = c.unwrap();
        text.push_str(&String::from_utf8_lossy(&c.data));
        seqs.push(c.seq);
    }
    assert_eq!((text, seqs), (expect, (0..LINES).collect()));
    let b = client
        .get_build(GetBuildRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state, BuildState::Succeeded as i32);
    assert!(b.warm_start);
    assert_eq!(b.cell_id, "cell-1");
    let states: Vec<i32> = b.transitions.iter().map(|t| t.state).collect();
    assert_eq!(
        states,
        [
            BuildState::Queued,
            BuildState::Placed,
            BuildState::Running,
            BuildState::Succeeded
        ]
        .map(|s| s as i32)
        .to_vec()
    );

    // The acked seq was committed with the burst: a reconnecting box is told it.
    drop(bx);
    let (_bx, acked) = fake_box(&handle, "box-burst", vec![pool("small", 1, 2)]).await;
    assert_eq!(acked, last);
    handle.shutdown().await;
}

/// Opens a connection that holds the write path the control plane needs for build `id` until
/// it runs `COMMIT`.
async fn hold_writes(url: &str, id: &str) -> sqlx::AnyConnection {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    if url.starts_with("sqlite") {
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut conn)
            .await
            .unwrap();
    } else {
        sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
        sqlx::query("SELECT id FROM builds WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    }
    conn
}

fn update(a: &Assignment, kind: BuildUpdateKind) -> BoxMsg {
    BoxMsg::Update(BuildUpdate {
        build_id: a.build_id.clone(),
        lease_id: a.lease_id.clone(),
        kind: kind as i32,
        cell_id: "cell-1".into(),
        warm_start: true,
        ..Default::default()
    })
}

fn log(a: &Assignment, seq: u64, text: &str) -> BoxMsg {
    BoxMsg::Log(LogChunk {
        build_id: a.build_id.clone(),
        seq,
        stream: LogStream::Stdout as i32,
        step: 0,
        data: text.as_bytes().to_vec(),
        at_ms: 0,
    })
}

/// The whole stored log of a build: its text and its seqs.
async fn logs(handle: &Handle, id: &str) -> (String, Vec<u64>) {
    let mut s = api(handle)
        .await
        .stream_logs(StreamLogsRequest {
            build_id: id.into(),
            from_seq: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let (mut text, mut seqs) = (String::new(), Vec::new());
    while let Some(c) = s.next().await {
        let c = c.unwrap();
        text.push_str(&String::from_utf8_lossy(&c.data));
        seqs.push(c.seq);
    }
    (text, seqs)
}

/// A log line goes to the followers as it is written, before its transaction commits. The
/// fault: that commit fails (the session's database connection is killed while the commit
/// waits). The box was not acked, so it sends the line again on its next session: the store
/// has it once, and the follower, which saw it before the failure, does not see it twice.
/// PostgreSQL only: the commit's acked-seq write is held on the box's row, so the kill falls
/// between the announcement and the commit for certain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_followed_before_a_failed_commit_is_stored_once_after_the_resend() {
    let Some(db) = hive_testkit::TestDb::postgres("followed_before_commit").await else {
        return;
    };
    let url = db.url.clone();
    let handle = start_with(&url, |c| {
        c.heartbeat_interval = Duration::from_secs(5);
        c.lease = Duration::from_secs(30);
    })
    .await;
    let mut client = api(&handle).await;
    client
        .create_project(CreateProjectRequest {
            name: "early".into(),
            repo_url: "git://198.18.0.2/early.git".into(),
            secret: "s".into(),
            steps: vec!["make".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let (mut bx, _) = fake_box(&handle, "box-early", vec![pool("small", 1, 2)]).await;
    let id = client
        .submit_build(SubmitBuildRequest {
            project: "early".into(),
            revision: "abc123".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let a = match bx.next_non_ack(WAIT).await {
        Some(CtlMsg::Assign(a)) => a,
        other => panic!("expected an Assignment, got {other:?}"),
    };
    bx.accept(&a, "cell-1", true).await;
    let running = bx.running(&a).await;
    bx.wait_ack(running, WAIT).await.unwrap();
    let mut follow = client
        .stream_logs(StreamLogsRequest {
            build_id: id.clone(),
            from_seq: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();

    // Hold the box's row: the batch writes the line, announces it, then waits to commit.
    let mut hold = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut hold).await.unwrap();
    sqlx::query("SELECT id FROM boxes WHERE id = 'box-early' FOR UPDATE")
        .fetch_one(&mut hold)
        .await
        .unwrap();
    let line0 = bx.log(&a, LogStream::Stdout, 0, b"line 0\n").await;
    let seen = tokio::time::timeout(WAIT, follow.next())
        .await
        .expect("the follower gets the line before its commit")
        .unwrap()
        .unwrap();
    assert_eq!((seen.seq, seen.data.as_slice()), (0, &b"line 0\n"[..]));
    // The commit fails: the session's connection, waiting on the row, is killed.
    let mut killed = 0;
    for _ in 0..100 {
        let ended: Vec<(bool,)> = sqlx::query_as(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
             AND query LIKE 'UPDATE boxes SET acked_seq%' AND pid <> pg_backend_pid()",
        )
        .fetch_all(&mut hold)
        .await
        .unwrap();
        killed += ended.len();
        if killed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        killed > 0,
        "the session's commit was waiting on the box's row"
    );
    sqlx::query("ROLLBACK").execute(&mut hold).await.unwrap();
    hold.close().await.ok();
    assert!(
        bx.wait_ack(line0, Duration::from_millis(500))
            .await
            .is_err(),
        "a line whose commit failed is not acked"
    );

    // The box's next session sends it again; then the rest of the build.
    bx.reconnect().await.unwrap();
    bx.wait_ack(line0, WAIT).await.unwrap();
    bx.log(&a, LogStream::Stdout, 0, b"line 1\n").await;
    let last = bx.finish(&a, BuildState::Succeeded, 0).await;
    bx.wait_ack(last, WAIT).await.unwrap();

    let mut seqs = vec![seen.seq];
    while let Some(c) = tokio::time::timeout(WAIT, follow.next())
        .await
        .expect("the follower's stream ends with the build")
    {
        seqs.push(c.unwrap().seq);
    }
    assert_eq!(seqs, [0, 1], "the follower saw each line once");
    assert_eq!(
        logs(&handle, &id).await,
        ("line 0\nline 1\n".to_string(), vec![0, 1]),
        "the store has each line once"
    );
    handle.shutdown().await;
    db.drop_db().await;
}
