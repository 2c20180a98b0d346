//! A build's life through the real BoxAgent stream (tonic client as the box) against a real
//! database: placement, accept/run/logs/finish with acks, WatchBuild and StreamLogs, lease expiry
//! and re-queue, reject, cancel, timeout, cordon and drain, reconnect with acked seq.

mod common;

use std::time::Duration;

use common::{api, eventually, fake_box, pool, start, start_with, FakeBox};
use hive_control_plane::server::Handle;
use hive_proto::v1::box_message::Msg as BoxMsg;
use hive_proto::v1::control_message::Msg as CtlMsg;
use hive_proto::v1::{
    Assignment, BoxActionRequest, BoxState, BuildState, BuildUpdate, BuildUpdateKind,
    CancelBuildRequest, CreateProjectRequest, GetBuildRequest, Heartbeat, ListBoxesRequest,
    LogChunk, LogStream, StreamLogsRequest, SubmitBuildRequest, WatchBuildRequest,
};
use tokio_stream::StreamExt;

const WAIT: Duration = Duration::from_secs(10);

async fn project(handle: &Handle, name: &str, timeout_secs: u32) {
    api(handle)
        .await
        .create_project(CreateProjectRequest {
            name: name.into(),
            repo_url: format!("git://198.18.0.2/{name}.git"),
            secret: "s".into(),
            steps: vec!["echo hi".into(), "make".into()],
            timeout_secs,
            env: [("CI".to_string(), "1".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn submit(handle: &Handle, project: &str) -> String {
    api(handle)
        .await
        .submit_build(SubmitBuildRequest {
            project: project.into(),
            revision: "abc123".into(),
            git_ref: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id
}

async fn state(handle: &Handle, id: &str) -> hive_proto::v1::Build {
    api(handle)
        .await
        .get_build(GetBuildRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn expect_assign(b: &mut FakeBox) -> Assignment {
    match b.next_non_ack(WAIT).await {
        Some(CtlMsg::Assign(a)) => a,
        other => panic!("box {} expected an Assignment, got {other:?}", b.box_id()),
    }
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

async fn full_life(url: String) {
    let handle = start(&url).await;
    project(&handle, "app", 0).await;
    let (mut bx, acked) = fake_box(&handle, "box-a", vec![pool("small", 1, 4)]).await;
    assert_eq!(acked, 0);
    let id = submit(&handle, "app").await;

    let mut client = api(&handle).await;
    let mut watch = client
        .watch_build(WatchBuildRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();

    let a = expect_assign(&mut bx).await;
    assert_eq!(a.build_id, id);
    assert_eq!(a.steps, vec!["echo hi", "make"]);
    assert_eq!(a.env.get("CI").map(String::as_str), Some("1"));
    assert_eq!(a.timeout_secs, 1800);
    assert_eq!(a.size_class.as_ref().unwrap().name, "small");
    assert_eq!(a.revision, "abc123");
    assert!(a.lease_deadline_ms > 0);
    assert_eq!(state(&handle, &id).await.state, BuildState::Placed as i32);

    let s = bx.send_acked(update(&a, BuildUpdateKind::Accepted)).await;
    bx.wait_ack(s, WAIT).await.unwrap();
    let b = state(&handle, &id).await;
    assert_eq!(b.cell_id, "cell-1");
    assert!(b.warm_start);
    bx.send_acked(update(&a, BuildUpdateKind::Running)).await;
    for (i, line) in ["one\n", "two\n", "three\n"].iter().enumerate() {
        bx.send_acked(log(&a, i as u64, line)).await;
    }
    // A resent chunk is stored once.
    bx.send_acked(log(&a, 1, "two\n")).await;
    let mut fin = match update(&a, BuildUpdateKind::Finished) {
        BoxMsg::Update(u) => u,
        _ => unreachable!(),
    };
    fin.state = BuildState::Succeeded as i32;
    fin.exit_code = 0;
    let s = bx.send_acked(BoxMsg::Update(fin)).await;
    bx.wait_ack(s, WAIT).await.unwrap();

    // WatchBuild: the state now, then each change, ending at the terminal one. Changes that
    // land between two reads are coalesced into one answer, but every answer carries the
    // whole history, so nothing is lost to a slow watcher.
    let mut states = Vec::new();
    let mut last = None;
    while let Some(b) = tokio::time::timeout(WAIT, watch.next()).await.unwrap() {
        let b = b.unwrap();
        states.push(BuildState::try_from(b.state).unwrap());
        last = Some(b);
    }
    // Watching began after submit: the first answer is the state then (queued, or placed if
    // the scheduler was quicker).
    assert!(
        matches!(states[0], BuildState::Queued | BuildState::Placed),
        "{states:?}"
    );
    assert_eq!(states.last(), Some(&BuildState::Succeeded), "{states:?}");
    let mut sorted = states.clone();
    sorted.sort_by_key(|s| *s as i32);
    assert_eq!(states, sorted, "answers only go forward");
    let history: Vec<BuildState> = last
        .expect("a final answer")
        .transitions
        .iter()
        .map(|t| BuildState::try_from(t.state).unwrap())
        .collect();
    assert_eq!(
        history,
        [
            BuildState::Queued,
            BuildState::Placed,
            BuildState::Running,
            BuildState::Succeeded
        ],
        "the final answer carries the whole history"
    );

    let b = state(&handle, &id).await;
    assert_eq!(b.state, BuildState::Succeeded as i32);
    assert_eq!(b.exit_code, 0);
    let names: Vec<BuildState> = b
        .transitions
        .iter()
        .map(|t| BuildState::try_from(t.state).unwrap())
        .collect();
    assert_eq!(
        names,
        vec![
            BuildState::Queued,
            BuildState::Placed,
            BuildState::Running,
            BuildState::Succeeded
        ]
    );

    // StreamLogs from 0 and from 1; the build has ended so follow ends too.
    let logs: Vec<LogChunk> = client
        .stream_logs(StreamLogsRequest {
            build_id: id.clone(),
            from_seq: 1,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner()
        .map(|c| c.unwrap())
        .collect()
        .await;
    let text: Vec<String> = logs
        .iter()
        .map(|c| String::from_utf8_lossy(&c.data).to_string())
        .collect();
    assert_eq!(text, vec!["two\n", "three\n"]);
    assert_eq!(logs.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![1, 2]);

    // Reconnect: Registered carries the highest stored seq.
    drop(bx);
    eventually(WAIT, "box offline", || async {
        let boxes = api(&handle)
            .await
            .list_boxes(ListBoxesRequest {})
            .await
            .unwrap()
            .into_inner()
            .boxes;
        boxes[0].state == BoxState::Offline as i32
    })
    .await;
    let (_bx, acked) = fake_box(&handle, "box-a", vec![pool("small", 1, 4)]).await;
    assert_eq!(acked, 7, "3 updates + 4 logs were stored and acked");
    handle.shutdown().await;
}
hive_testkit::on_both!(db => full_life);

/// Logs followed live arrive in order with no gaps, and the follow ends with the build.
async fn follow_logs(url: String) {
    let handle = start(&url).await;
    project(&handle, "app", 0).await;
    let (mut bx, _) = fake_box(&handle, "box-a", vec![pool("small", 1, 4)]).await;
    let id = submit(&handle, "app").await;
    let a = expect_assign(&mut bx).await;
    bx.send_acked(update(&a, BuildUpdateKind::Running)).await;
    let mut client = api(&handle).await;
    let follower = tokio::spawn(async move {
        client
            .stream_logs(StreamLogsRequest {
                build_id: id,
                from_seq: 0,
                follow: true,
            })
            .await
            .unwrap()
            .into_inner()
            .map(|c| c.unwrap().seq)
            .collect::<Vec<u64>>()
            .await
    });
    for i in 0..50u64 {
        bx.send_acked(log(&a, i, &format!("line {i}\n"))).await;
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut fin = match update(&a, BuildUpdateKind::Finished) {
        BoxMsg::Update(u) => u,
        _ => unreachable!(),
    };
    fin.state = BuildState::Failed as i32;
    fin.exit_code = 2;
    let s = bx.send_acked(BoxMsg::Update(fin)).await;
    bx.wait_ack(s, WAIT).await.unwrap();
    let seqs = tokio::time::timeout(WAIT, follower).await.unwrap().unwrap();
    assert_eq!(seqs, (0..50).collect::<Vec<u64>>());
    handle.shutdown().await;
}
hive_testkit::on_both!(db => follow_logs);

/// An unconfirmed placement expires and the build goes back to the queue (attempt 2), onto
/// another box; the old box is told to stop and its late updates are ignored.
async fn lease_expiry_requeues(url: String) {
    let handle = start_with(&url, |c| c.lease = Duration::from_millis(800)).await;
    project(&handle, "app", 0).await;
    let (mut silent, _) = fake_box(&handle, "box-a", vec![pool("small", 1, 1)]).await;
    let id = submit(&handle, "app").await;
    let first = expect_assign(&mut silent).await;
    // box-a stays connected (heartbeats) but never confirms. box-b joins with room.
    let _hb_a = silent.heartbeat_every(
        Duration::from_millis(100),
        vec![pool("small", 1, 1)],
        vec![],
    );
    let (mut good, _) = fake_box(&handle, "box-b", vec![pool("small", 1, 1)]).await;
    let _hb_b = good.heartbeat_every(
        Duration::from_millis(100),
        vec![pool("small", 1, 1)],
        vec![],
    );
    match silent.next_non_ack(WAIT).await {
        Some(CtlMsg::Cancel(c)) => {
            assert_eq!(c.build_id, id);
            assert!(c.reason.contains("expired"), "{}", c.reason);
        }
        other => panic!("expected CancelBuild after expiry, got {other:?}"),
    }
    // Re-placed on box-b (box-a's rejected... no: box-a's pool still claims a warm cell, so
    // either box may get it; wait on both).
    let second = tokio::select! {
        a = expect_assign(&mut good) => a,
        a = expect_assign(&mut silent) => a,
    };
    assert_eq!(second.build_id, id);
    assert_ne!(second.lease_id, first.lease_id);
    let b = state(&handle, &id).await;
    assert_eq!(b.attempt, 2);
    assert_eq!(b.state, BuildState::Placed as i32);
    assert!(b
        .transitions
        .iter()
        .any(|t| t.state == BuildState::Queued as i32 && t.reason.contains("expired")));

    // A late update under the first lease changes nothing.
    let s = silent
        .send_acked(update(&first, BuildUpdateKind::Running))
        .await;
    silent.wait_ack(s, WAIT).await.unwrap();
    assert_eq!(state(&handle, &id).await.state, BuildState::Placed as i32);

    // The log says why attempt 1 ended, and attempt 2's chunk 0 follows it densely.
    // Either box may hold attempt 2; send as the holder.
    let a2 = &second;
    let holder = if state(&handle, &id).await.box_id == "box-b" {
        &mut good
    } else {
        &mut silent
    };
    let s = holder.send_acked(log(a2, 0, "attempt two\n")).await;
    holder.wait_ack(s, WAIT).await.unwrap();
    let logs: Vec<LogChunk> = api(&handle)
        .await
        .stream_logs(StreamLogsRequest {
            build_id: id.clone(),
            from_seq: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner()
        .map(|c| c.unwrap())
        .collect()
        .await;
    assert_eq!(logs.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(logs[0].stream, LogStream::System as i32);
    assert!(String::from_utf8_lossy(&logs[0].data).contains("attempt 1 ended"));
    assert_eq!(logs[1].data, b"attempt two\n");

    // Only one live lease ever.
    let leases = handle.store().live_leases_of_build(&id).await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].id, second.lease_id);
    handle.shutdown().await;
}
hive_testkit::on_both!(db => lease_expiry_requeues);

/// A box that stops heartbeating loses its running build after the lease; heartbeats keep it.
async fn heartbeats_renew_leases(url: String) {
    let handle = start_with(&url, |c| c.lease = Duration::from_millis(1000)).await;
    project(&handle, "app", 0).await;
    let (mut bx, _) = fake_box(&handle, "box-a", vec![pool("small", 1, 1)]).await;
    let id = submit(&handle, "app").await;
    let a = expect_assign(&mut bx).await;
    bx.send_acked(update(&a, BuildUpdateKind::Accepted)).await;
    bx.send_acked(update(&a, BuildUpdateKind::Running)).await;
    // Heartbeat for 2.5 leases: the build stays running.
    for _ in 0..25 {
        bx.send_plain(BoxMsg::Heartbeat(Heartbeat {
            pools: vec![pool("small", 0, 1)],
            running_builds: vec![id.clone()],
            cells: vec![],
        }))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state(&handle, &id).await.state, BuildState::Running as i32);
    // Silence: offline after 3 heartbeats, re-queued after the lease.
    eventually(WAIT, "build re-queued after silence", || async {
        state(&handle, &id).await.attempt == 2
    })
    .await;
    // Silent for 3 heartbeat intervals: offline (the stream stays open, the box is not heard).
    eventually(WAIT, "silent box offline", || async {
        let boxes = api(&handle)
            .await
            .list_boxes(ListBoxesRequest {})
            .await
            .unwrap()
            .into_inner()
            .boxes;
        boxes[0].state == BoxState::Offline as i32
    })
    .await;
    handle.shutdown().await;
}
hive_testkit::on_both!(db => heartbeats_renew_leases);

/// Cancel of a queued build is immediate; of a running one, the box is told.
async fn cancel_builds(url: String) {
    let handle = start(&url).await;
    project(&handle, "app", 0).await;
    let queued = submit(&handle, "app").await;
    let mut client = api(&handle).await;
    let b = client
        .cancel_build(CancelBuildRequest {
            id: queued.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state, BuildState::Cancelled as i32);
    let again = client
        .cancel_build(CancelBuildRequest {
            id: queued.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    let missing = client
        .cancel_build(CancelBuildRequest {
            id: "nope".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert!(missing.message().contains("\"nope\""));

    let (mut bx, _) = fake_box(&handle, "box-a", vec![pool("small", 1, 2)]).await;
    let running = submit(&handle, "app").await;
    let a = expect_assign(&mut bx).await;
    assert_eq!(a.build_id, running, "the cancelled build is never placed");
    let s = bx.send_acked(update(&a, BuildUpdateKind::Running)).await;
    bx.wait_ack(s, WAIT).await.unwrap();
    client
        .cancel_build(CancelBuildRequest {
            id: running.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    match bx.next_non_ack(WAIT).await {
        Some(CtlMsg::Cancel(c)) => {
            assert_eq!(c.build_id, running);
            assert_eq!(c.state, BuildState::Cancelled as i32);
        }
        other => panic!("expected CancelBuild, got {other:?}"),
    }
    // The box's FINISHED(cancelled) afterwards is fine and changes nothing.
    let mut fin = match update(&a, BuildUpdateKind::Finished) {
        BoxMsg::Update(u) => u,
        _ => unreachable!(),
    };
    fin.state = BuildState::Cancelled as i32;
    let s = bx.send_acked(BoxMsg::Update(fin)).await;
    bx.wait_ack(s, WAIT).await.unwrap();
    assert_eq!(
        state(&handle, &running).await.state,
        BuildState::Cancelled as i32
    );
    handle.shutdown().await;
}
hive_testkit::on_both!(db => cancel_builds);

/// A running build past its project's timeout ends timed_out and the box is told.
async fn timeout_ends_build(url: String) {
    let handle = start(&url).await;
    project(&handle, "slow", 1).await;
    let (mut bx, _) = fake_box(&handle, "box-a", vec![pool("small", 1, 1)]).await;
    let id = submit(&handle, "slow").await;
    let a = expect_assign(&mut bx).await;
    bx.send_acked(update(&a, BuildUpdateKind::Running)).await;
    let started = std::time::Instant::now();
    let hb = bx.heartbeat_every(
        Duration::from_millis(100),
        vec![pool("small", 0, 1)],
        vec![id.clone()],
    );
    match bx.next_non_ack(WAIT).await {
        Some(CtlMsg::Cancel(c)) => {
            assert_eq!(c.build_id, id);
            assert_eq!(c.state, BuildState::TimedOut as i32);
        }
        other => panic!("expected CancelBuild(timed_out), got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(900));
    let b = state(&handle, &id).await;
    assert_eq!(b.state, BuildState::TimedOut as i32);
    assert!(b.message.contains("timed out after 1s"), "{}", b.message);
    hb.abort();
    handle.shutdown().await;
}
hive_testkit::on_both!(db => timeout_ends_build);

/// Rejected builds go back to the queue; cordoned boxes get nothing; draining boxes are told
/// and leave once empty and gone; builds wait in order when no box has room.
async fn reject_cordon_drain(url: String) {
    let handle = start(&url).await;
    project(&handle, "app", 0).await;
    let mut client = api(&handle).await;
    let (mut a_box, _) = fake_box(&handle, "box-a", vec![pool("small", 1, 1)]).await;
    let first = submit(&handle, "app").await;
    let a = expect_assign(&mut a_box).await;
    let mut rej = match update(&a, BuildUpdateKind::Rejected) {
        BoxMsg::Update(u) => u,
        _ => unreachable!(),
    };
    rej.message = "no room".into();
    let s = a_box.send_acked(BoxMsg::Update(rej)).await;
    a_box.wait_ack(s, WAIT).await.unwrap();
    let b = state(&handle, &first).await;
    assert_eq!(b.state, BuildState::Queued as i32);
    assert_eq!(b.attempt, 2);
    assert!(b.message.contains("no room"));

    // Cordon box-a: nothing new goes there even after it reports room again.
    let info = client
        .cordon_box(BoxActionRequest {
            box_id: "box-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.state, BoxState::Cordoned as i32);
    let _hb_a = a_box.heartbeat_every(
        Duration::from_millis(100),
        vec![pool("small", 1, 1)],
        vec![],
    );
    assert!(a_box
        .next_non_ack(Duration::from_millis(600))
        .await
        .is_none());

    // box-b takes the queued build; a second build waits (box-b is full), in order.
    let (mut b_box, _) = fake_box(&handle, "box-b", vec![pool("small", 1, 1)]).await;
    let hb_b = b_box.heartbeat_every(
        Duration::from_millis(100),
        vec![pool("small", 1, 1)],
        vec![],
    );
    let got = expect_assign(&mut b_box).await;
    assert_eq!(got.build_id, first, "the re-queued build");
    // After taking the build, box-b is full: no warm cell, one busy.
    hb_b.abort();
    let full = hive_proto::v1::PoolState {
        busy: 1,
        ..pool("small", 0, 1)
    };
    let hb_b = b_box.heartbeat_every(Duration::from_millis(100), vec![full], vec![]);
    let second = submit(&handle, "app").await;
    assert!(b_box
        .next_non_ack(Duration::from_millis(600))
        .await
        .is_none());
    assert_eq!(
        state(&handle, &second).await.state,
        BuildState::Queued as i32
    );

    // Drain box-b: it is told, gets nothing new, and leaves once empty and disconnected.
    let info = client
        .drain_box(BoxActionRequest {
            box_id: "box-b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.state, BoxState::Draining as i32);
    assert!(matches!(
        b_box.next_non_ack(WAIT).await,
        Some(CtlMsg::Drain(_))
    ));
    let mut fin = match update(&got, BuildUpdateKind::Finished) {
        BoxMsg::Update(u) => u,
        _ => unreachable!(),
    };
    fin.state = BuildState::Succeeded as i32;
    let s = b_box.send_acked(BoxMsg::Update(fin)).await;
    b_box.wait_ack(s, WAIT).await.unwrap();
    hb_b.abort();
    drop(b_box);
    eventually(WAIT, "drained box left", || async {
        let boxes = api(&handle)
            .await
            .list_boxes(ListBoxesRequest {})
            .await
            .unwrap()
            .into_inner()
            .boxes;
        boxes
            .iter()
            .any(|b| b.id == "box-b" && b.state == BoxState::Left as i32)
    })
    .await;
    assert_eq!(
        state(&handle, &second).await.state,
        BuildState::Queued as i32
    );

    // Unknown things are named in errors.
    let e = client
        .cordon_box(BoxActionRequest {
            box_id: "box-z".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = client
        .create_project(CreateProjectRequest {
            name: "big".into(),
            repo_url: "git://x/y".into(),
            size_class: "huge".into(),
            steps: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "size class \"huge\" unknown (known: small, large)"
    );
    handle.shutdown().await;
}
hive_testkit::on_both!(db => reject_cordon_drain);

/// Every heartbeat is answered (an Ack of what is stored), so a box that only heartbeats (a long
/// quiet build) still hears the control plane and does not fence itself.
async fn heartbeats_are_answered(url: String) {
    let handle = start(&url).await;
    let (mut bx, _) = fake_box(&handle, "box-a", vec![pool("small", 1, 1)]).await;
    for _ in 0..3 {
        bx.send_plain(BoxMsg::Heartbeat(Heartbeat {
            pools: vec![pool("small", 1, 1)],
            running_builds: vec![],
            cells: vec![],
        }))
        .await
        .unwrap();
        let m = bx
            .next_raw(WAIT)
            .await
            .expect("an answer to the heartbeat")
            .expect("stream open");
        assert!(
            matches!(m.msg, Some(CtlMsg::Ack(hive_proto::v1::Ack { seq: 0 }))),
            "{m:?}"
        );
    }
    handle.shutdown().await;
}
hive_testkit::on_both!(db => heartbeats_are_answered);

/// A box that restarted gives back the attempt it lost (LOST): the build goes back to the queue
/// as attempt 2, visibly (message and a system line in its log), and runs again. Another box
/// that knows the build and lease ids cannot give it back, and a LOST after the build finished
/// changes nothing.
async fn lost_attempt_runs_again(url: String) {
    let handle = start(&url).await;
    project(&handle, "app", 0).await;
    let (mut a_box, _) = fake_box(&handle, "box-a", vec![pool("small", 1, 1)]).await;
    let id = submit(&handle, "app").await;
    let a = expect_assign(&mut a_box).await;
    a_box.send_acked(update(&a, BuildUpdateKind::Running)).await;
    let s = a_box.send_acked(log(&a, 0, "first attempt\n")).await;
    a_box.wait_ack(s, WAIT).await.unwrap();

    // The attacker: another box, sending LOST for box-a's lease.
    // (Full, so the re-queued build below can only go back to box-a.)
    let full = hive_proto::v1::PoolState {
        busy: 1,
        ..pool("small", 0, 1)
    };
    let (mut evil, _) = fake_box(&handle, "box-evil", vec![full]).await;
    let mut forged = match update(&a, BuildUpdateKind::Lost) {
        BoxMsg::Update(u) => u,
        _ => unreachable!(),
    };
    forged.message = "box restarted while it ran".into();
    let s = evil.send_acked(BoxMsg::Update(forged.clone())).await;
    evil.wait_ack(s, WAIT).await.unwrap();
    let b = state(&handle, &id).await;
    assert_eq!(b.state, BuildState::Running as i32, "{b:?}");
    assert_eq!((b.attempt, b.box_id.as_str()), (1, "box-a"));

    // box-a gives it back: attempt 2, queued, saying why.
    let s = a_box.send_acked(BoxMsg::Update(forged)).await;
    a_box.wait_ack(s, WAIT).await.unwrap();
    let b = state(&handle, &id).await;
    assert_eq!(b.state, BuildState::Queued as i32, "{b:?}");
    assert_eq!(b.attempt, 2);
    assert!(
        b.message.contains("attempt lost on box box-a")
            && b.message.contains("box restarted while it ran"),
        "{}",
        b.message
    );

    // It runs again (here on box-a, the only box with room) and finishes; the log keeps the
    // first attempt's line and says why a second one ran.
    let _hb = a_box.heartbeat_every(
        Duration::from_millis(100),
        vec![pool("small", 1, 1)],
        vec![],
    );
    let again = expect_assign(&mut a_box).await;
    assert_eq!(again.build_id, id);
    assert_ne!(again.lease_id, a.lease_id, "a new attempt has a new lease");
    a_box
        .send_acked(update(&again, BuildUpdateKind::Running))
        .await;
    let mut fin = match update(&again, BuildUpdateKind::Finished) {
        BoxMsg::Update(u) => u,
        _ => unreachable!(),
    };
    fin.state = BuildState::Succeeded as i32;
    let s = a_box.send_acked(BoxMsg::Update(fin)).await;
    a_box.wait_ack(s, WAIT).await.unwrap();
    // A late LOST for the first lease, or for the finished one, changes nothing.
    for lease in [&a, &again] {
        let mut late = match update(lease, BuildUpdateKind::Lost) {
            BoxMsg::Update(u) => u,
            _ => unreachable!(),
        };
        late.message = "late".into();
        let s = a_box.send_acked(BoxMsg::Update(late)).await;
        a_box.wait_ack(s, WAIT).await.unwrap();
    }
    let b = state(&handle, &id).await;
    assert_eq!(b.state, BuildState::Succeeded as i32, "{b:?}");
    assert_eq!(b.attempt, 2);
    let text: String = api(&handle)
        .await
        .stream_logs(StreamLogsRequest {
            build_id: id.clone(),
            from_seq: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner()
        .map(|c| String::from_utf8_lossy(&c.unwrap().data).into_owned())
        .collect::<Vec<String>>()
        .await
        .concat();
    assert!(text.contains("first attempt"), "{text}");
    assert!(text.contains("attempt lost on box box-a"), "{text}");
    handle.shutdown().await;
}
hive_testkit::on_both!(db => lost_attempt_runs_again);

/// A SubmitBuild retried with its request id (the caller lost the answer: a timeout, a control
/// plane that died after the commit) gets the first build, never a second; so do many copies
/// racing each other. The key is the project's: another project may use the same one. Reusing
/// it for other code, or a malformed one, is refused with what to do.
async fn retried_submit_with_a_request_id_makes_one_build(url: String) {
    let handle = start(&url).await;
    project(&handle, "once", 60).await;
    project(&handle, "other", 60).await;
    let req = |project: &str, rid: &str| SubmitBuildRequest {
        project: project.into(),
        revision: "abc123".into(),
        git_ref: String::new(),
        request_id: rid.into(),
    };
    let first = api(&handle)
        .await
        .submit_build(req("once", "deploy-7f3e"))
        .await
        .unwrap()
        .into_inner();
    let again = api(&handle)
        .await
        .submit_build(req("once", "deploy-7f3e"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.id, first.id, "a retry made a second build");
    assert_eq!(first.trigger, "api:deploy-7f3e");
    assert_eq!(again.state, BuildState::Queued as i32, "{again:?}");

    // Sixteen copies of a new request at once: one build, every caller told its id.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let mut c = api(&handle).await;
        let r = req("once", "race:1");
        calls.spawn(async move { c.submit_build(r).await.map(|b| b.into_inner().id) });
    }
    let mut ids = Vec::new();
    while let Some(r) = calls.join_next().await {
        ids.push(r.unwrap().expect("every racing copy is answered"));
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1, "racing copies made builds {ids:?}");
    assert_ne!(ids[0], first.id);

    // The same key in another project is another request.
    let other = api(&handle)
        .await
        .submit_build(req("other", "deploy-7f3e"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.id, first.id);

    // The key reused for another revision: refused, nothing queued.
    let e = api(&handle)
        .await
        .submit_build(SubmitBuildRequest {
            revision: "def456".into(),
            ..req("once", "deploy-7f3e")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains(&first.id), "{}", e.message());
    for bad in ["a b", "x/y", &"k".repeat(129)] {
        let e = api(&handle)
            .await
            .submit_build(req("once", bad))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}: {e:?}");
        assert!(e.message().contains("request_id"), "{}", e.message());
    }
    let builds = api(&handle)
        .await
        .list_builds(hive_proto::v1::ListBuildsRequest {
            project: "once".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .builds;
    assert_eq!(builds.len(), 2, "{builds:?}");
    handle.shutdown().await;
}
hive_testkit::on_both!(db => retried_submit_with_a_request_id_makes_one_build);

/// A graceful shutdown ends every connected box's session in the store before it closes the
/// database: no box is left owned by a control plane that is gone, each box's acked seq is
/// saved, and its running build stays where it was (the next control plane renews its lease).
async fn shutdown_saves_every_box_session(url: String) {
    let handle = start(&url).await;
    project(&handle, "app", 0).await;
    let mut boxes = Vec::new();
    for i in 0..8 {
        let (bx, _) = fake_box(&handle, &format!("box-{i}"), vec![pool("small", 1, 1)]).await;
        boxes.push(bx);
    }
    let mut running = Vec::new();
    for _ in 0..8 {
        running.push(submit(&handle, "app").await);
    }
    let mut acked = Vec::new();
    for bx in &mut boxes {
        let a = expect_assign(bx).await;
        bx.send_acked(update(&a, BuildUpdateKind::Accepted)).await;
        bx.send_acked(update(&a, BuildUpdateKind::Running)).await;
        let s = bx.send_acked(log(&a, 0, "building\n")).await;
        bx.wait_ack(s, WAIT).await.unwrap();
        acked.push((bx.box_id().to_string(), s));
    }
    // The boxes stay connected: the shutdown itself ends their sessions.
    handle.shutdown().await;
    let store = hive_control_plane::store::Store::open(&url).await.unwrap();
    for (box_id, seq) in &acked {
        let row = store.get_box(box_id).await.unwrap().expect("box stored");
        assert_eq!(
            row.session_owner, "",
            "{box_id}: still owned by the stopped control plane"
        );
        assert_eq!(row.acked_seq, *seq, "{box_id}: acked seq saved");
        assert_eq!(row.pools_json, "[]", "{box_id}: its cells are not offered");
    }
    for id in &running {
        let b = store.get_build(id).await.unwrap().expect("build stored");
        assert_eq!(b.state, BuildState::Running, "{id}");
    }
    store.close().await;
    drop(boxes);
}
hive_testkit::on_both!(db => shutdown_saves_every_box_session);
