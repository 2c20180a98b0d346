//! Group commit on the webhook path (issue 16): deliveries that wait while a commit is in flight
//! are stored in one transaction, each answered 202 with its own build only after that commit;
//! copies of one delivery in a group get one build; a delivery the database refuses fails alone;
//! a full queue answers 503 with Retry-After and stores nothing; a shutdown in the middle of a
//! burst loses nothing it answered 202.
//!
//! To make "waits while a commit is in flight" certain rather than likely, the tests hold the
//! deliveries table's write path (SQLite: the file's write lock; PostgreSQL: an EXCLUSIVE lock on
//! `webhook_deliveries`, which reads pass) while the first delivery's group is being stored,
//! send the rest, wait until `/metrics` shows them queued, then let go.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::{api, fake_box, http, pool, start, start_with};
use hive_control_plane::http::webhook::sign;
use hive_control_plane::server::Handle;
use hive_control_plane::store::Store;
use hive_proto::v1::box_message::Msg as BoxMsg;
use hive_proto::v1::control_message::Msg as CtlMsg;
use hive_proto::v1::{
    BuildState, BuildUpdate, BuildUpdateKind, CreateProjectRequest, GetBuildRequest, Heartbeat,
    ListBuildsRequest, PoolState, SubmitBuildRequest,
};
use serde_json::json;
use sqlx::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "group-commit-secret";
const REPO: &str = "https://git.example/team/app";
const WAIT: Duration = Duration::from_secs(20);
/// The revision the poisoned deliveries push (a trigger refuses builds of it).
const POISON: &str = "dead00000000000000000000000000000000beef";

fn push(after: &str) -> Vec<u8> {
    json!({
        "ref": "refs/heads/main",
        "after": after,
        "repository": { "clone_url": format!("{REPO}.git"), "html_url": REPO },
        "head_commit": { "id": after },
    })
    .to_string()
    .into_bytes()
}

/// A commit id per `i` (never all zeros: that is a deleted branch).
fn revision(i: usize) -> String {
    format!("c{i:039x}")
}

/// Posts a signed push; (status, JSON answer). Owns its input, so it can be spawned.
fn deliver(
    addr: SocketAddr,
    delivery: &str,
    after: &str,
) -> impl std::future::Future<Output = (u16, serde_json::Value)> + Send + 'static {
    let delivery = delivery.to_string();
    let body = push(after);
    async move {
        let r = common::push_signed(addr, SECRET.as_bytes(), &delivery, &body).await;
        (r.status, r.json())
    }
}

async fn project(handle: &Handle) {
    api(handle)
        .await
        .create_project(CreateProjectRequest {
            name: "app".into(),
            repo_url: REPO.into(),
            secret: SECRET.into(),
            steps: vec!["make".into()],
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Holds the deliveries' write path until the connection is dropped (or rolled back).
async fn hold_writes(url: &str) -> sqlx::AnyConnection {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    if url.starts_with("sqlite") {
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut conn)
            .await
            .unwrap();
    } else {
        sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
        sqlx::query("LOCK TABLE webhook_deliveries IN EXCLUSIVE MODE")
            .execute(&mut conn)
            .await
            .unwrap();
    }
    conn
}

async fn release(mut hold: sqlx::AnyConnection) {
    sqlx::query("ROLLBACK").execute(&mut hold).await.unwrap();
    hold.close().await.unwrap();
}

/// A metric's value from `/metrics` (0 when absent).
async fn metric(addr: SocketAddr, line_start: &str) -> f64 {
    let text = http(addr, "GET", "/metrics", &[], b"").await.body;
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Groups that commit at once on the database of `url`: while the write path is held, the
/// first deliveries become that many stuck groups, and only the rest queue.
fn in_flight(url: &str) -> usize {
    let kind = hive_control_plane::store::DbKind::from_url(url).unwrap();
    hive_control_plane::domain::submit::groups_in_flight(kind)
}

async fn wait_queued(addr: SocketAddr, n: usize) {
    common::eventually(WAIT, &format!("{n} deliveries queued"), || async move {
        metric(addr, "hive_webhook_queue_depth ").await >= n as f64
    })
    .await;
}

/// (delivery id, build id) of every stored delivery.
async fn stored(url: &str) -> HashMap<String, String> {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT delivery_id, build_id FROM webhook_deliveries")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let builds: Vec<(String,)> = sqlx::query_as("SELECT id FROM builds")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let builds: HashSet<String> = builds.into_iter().map(|(b,)| b).collect();
    // Each build's first transition (placements, where a box took them, add their own).
    let transitions: Vec<(String,)> =
        sqlx::query_as("SELECT build_id FROM build_transitions WHERE state = 'queued'")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        transitions.len(),
        builds.len(),
        "each build has exactly its first transition"
    );
    let delivered: HashMap<String, String> = rows.into_iter().collect();
    for b in delivered.values() {
        assert!(builds.contains(b), "the build {b} of a delivery is stored");
    }
    assert_eq!(builds.len(), delivered.len(), "one build per delivery");
    delivered
}

/// The warm start's shortcut: a webhook's build, with a free cell and no build of its size
/// class queued, is placed in the webhook's own transaction (counted by `hive_placed_at_once`)
/// and its box gets it; a copy of that delivery places nothing again; an older build of
/// another class waiting (a large one no box has a cell for) does not hold it back, as it would
/// not in a round; an older build of its own class does: with the box full, the next webhooks'
/// builds wait, and once the box has room the scheduler places them in order, after which
/// webhooks place at once again (the hint does not stay set).
async fn a_webhook_build_is_placed_at_once_only_when_none_of_its_class_waits(url: String) {
    let handle = start_with(&url, |c| c.lease = Duration::from_secs(60)).await;
    project(&handle).await;
    let (mut fb, _) = fake_box(&handle, "box-a", vec![pool("small", 2, 2)]).await;
    let addr = handle.http_addr;
    #[track_caller]
    fn assigned(m: Option<CtlMsg>) -> hive_proto::v1::Assignment {
        match m {
            Some(CtlMsg::Assign(a)) => a,
            other => panic!("no assignment: {other:?}"),
        }
    }
    let at_once = || metric(addr, "hive_placed_at_once_total ");

    let (status, answer) = deliver(addr, "d-1", &revision(1)).await;
    assert_eq!(status, 202, "{answer}");
    let first = answer["build_id"].as_str().unwrap().to_string();
    let a1 = assigned(fb.next_non_ack(WAIT).await);
    assert_eq!(a1.build_id, first);
    assert_eq!(at_once().await, 1.0);
    let (status, answer) = deliver(addr, "d-1", &revision(1)).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["build_id"].as_str(), Some(first.as_str()));

    let mut client = api(&handle).await;
    client
        .create_project(CreateProjectRequest {
            name: "big".into(),
            repo_url: "https://git.example/team/big".into(),
            secret: SECRET.into(),
            steps: vec!["make".into()],
            size_class: "large".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let big = client
        .submit_build(SubmitBuildRequest {
            project: "big".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    // The round the submit woke has let go of the choosing lock (a group only tries it).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, answer) = deliver(addr, "d-2", &revision(2)).await;
    assert_eq!(status, 202, "{answer}");
    let a2 = assigned(fb.next_non_ack(WAIT).await);
    assert_eq!(a2.build_id, answer["build_id"].as_str().unwrap());
    assert_eq!(
        at_once().await,
        2.0,
        "placed at once: the build waiting is of another class"
    );

    // The box is full: d-3 waits, and d-4 waits behind it (its webhook leaves it queued).
    let mut waiting = Vec::new();
    for n in 3..=4 {
        let (status, answer) = deliver(addr, &format!("d-{n}"), &revision(n)).await;
        assert_eq!(status, 202, "{answer}");
        waiting.push(answer["build_id"].as_str().unwrap().to_string());
    }
    let more = fb.next_non_ack(Duration::from_millis(300)).await;
    assert!(more.is_none(), "the box has no room: {more:?}");
    // Room for three more: the scheduler places d-3, then d-4.
    for a in [&a1, &a2] {
        let s = fb
            .send_acked(BoxMsg::Update(BuildUpdate {
                build_id: a.build_id.clone(),
                lease_id: a.lease_id.clone(),
                kind: BuildUpdateKind::Accepted as i32,
                cell_id: format!("cell-{}", a.build_id),
                warm_start: true,
                ..Default::default()
            }))
            .await;
        fb.wait_ack(s, WAIT).await.unwrap();
    }
    fb.send_plain(BoxMsg::Heartbeat(Heartbeat {
        pools: vec![PoolState {
            busy: 2,
            ..pool("small", 3, 5)
        }],
        running_builds: vec![a1.build_id.clone(), a2.build_id.clone()],
        cells: vec![],
    }))
    .await
    .unwrap();
    let order: Vec<String> = vec![
        assigned(fb.next_non_ack(WAIT).await).build_id,
        assigned(fb.next_non_ack(WAIT).await).build_id,
    ];
    assert_eq!(order, waiting, "placed by the scheduler in queue order");
    assert_eq!(
        at_once().await,
        2.0,
        "left to the scheduler behind a waiting build of their class"
    );
    assert_eq!(metric(addr, "hive_placements_total ").await, 4.0);
    let big = client
        .get_build(GetBuildRequest { id: big })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(big.state, BuildState::Queued as i32, "{big:?}");

    // Nothing of its class waits any more: the next webhook's build is placed at once again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, answer) = deliver(addr, "d-5", &revision(5)).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        assigned(fb.next_non_ack(WAIT).await).build_id,
        answer["build_id"].as_str().unwrap()
    );
    assert_eq!(at_once().await, 3.0, "placed at once again");
    handle.shutdown().await;
}

/// Webhook groups placing their builds at once and the scheduler's rounds placing API builds,
/// all at the same moment, never give a box more builds than it has free cells: a burst of
/// webhooks and API submits against a box with four warm cells gets exactly four assignments;
/// the rest stay queued, each delivery stored once.
async fn webhooks_and_rounds_racing_never_overfill_a_box(url: String) {
    let handle = start_with(&url, |c| c.lease = Duration::from_secs(60)).await;
    project(&handle).await;
    let (mut fb, _) = fake_box(&handle, "box-a", vec![pool("small", 4, 4)]).await;
    let addr = handle.http_addr;
    let hooks: Vec<_> = (0..16)
        .map(|i| tokio::spawn(deliver(addr, &format!("race-{i}"), &revision(100 + i))))
        .collect();
    let submits: Vec<_> = (0..8)
        .map(|_| {
            let handle = &handle;
            async move {
                api(handle)
                    .await
                    .submit_build(SubmitBuildRequest {
                        project: "app".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
            }
        })
        .collect();
    futures::future::join_all(submits).await;
    for h in hooks {
        let (status, answer) = h.await.unwrap();
        assert_eq!(status, 202, "{answer}");
    }
    let mut assigned = HashSet::new();
    while let Some(m) = fb.next_non_ack(Duration::from_secs(2)).await {
        if let CtlMsg::Assign(a) = m {
            assert!(assigned.insert(a.build_id.clone()), "{} twice", a.build_id);
        }
    }
    assert_eq!(
        assigned.len(),
        4,
        "assignments beyond the box's four free cells"
    );
    let builds = api(&handle)
        .await
        .list_builds(ListBuildsRequest {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .builds;
    assert_eq!(builds.len(), 24);
    let placed: HashSet<String> = builds
        .iter()
        .filter(|b| b.state == BuildState::Placed as i32)
        .map(|b| b.id.clone())
        .collect();
    assert_eq!(placed, assigned, "placed in the store = sent to the box");
    handle.shutdown().await;
}

hive_testkit::on_both!(db =>
    a_webhook_build_is_placed_at_once_only_when_none_of_its_class_waits,
    webhooks_and_rounds_racing_never_overfill_a_box,
    waiting_deliveries_share_one_commit_and_each_gets_its_build,
    a_delivery_the_database_refuses_fails_alone,
    a_full_queue_answers_503_and_stores_nothing,
    shutdown_mid_burst_loses_nothing_answered_202,
);

async fn waiting_deliveries_share_one_commit_and_each_gets_its_build(url: String) {
    let handle = start(&url).await;
    project(&handle).await;
    let addr = handle.http_addr;

    let hold = hold_writes(&url).await;
    let first = tokio::spawn(deliver(addr, "first", &revision(1_000)));
    // The first group is stuck in its transaction; the committer is busy with it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stuck = in_flight(&url) - 1;
    let mut burst = Vec::new();
    for i in 0..40 {
        burst.push(tokio::spawn(deliver(addr, &format!("d-{i}"), &revision(i))));
    }
    // Two copies of one delivery in the same group (a forge's retry racing the original).
    burst.push(tokio::spawn(deliver(addr, "d-7", &revision(7))));
    wait_queued(addr, burst.len() - stuck).await;
    release(hold).await;

    let (status, answer) = first.await.unwrap();
    assert_eq!(status, 202, "{answer}");
    let mut builds: HashMap<String, (String, bool)> = HashMap::new();
    let mut copies = Vec::new();
    for (i, task) in burst.into_iter().enumerate() {
        let (status, answer) = task.await.unwrap();
        assert_eq!(status, 202, "{answer}");
        let id = answer["build_id"].as_str().expect("a build id").to_string();
        let dup = answer["duplicate"].as_bool().unwrap();
        let delivery = format!("d-{}", if i == 40 { 7 } else { i });
        if delivery == "d-7" {
            copies.push((id, dup));
        } else {
            assert!(!dup, "{answer}");
            builds.insert(delivery, (id, dup));
        }
    }
    assert_eq!(copies.len(), 2);
    assert_eq!(
        copies[0].0, copies[1].0,
        "both copies answer the same build"
    );
    assert_eq!(
        copies.iter().filter(|(_, dup)| *dup).count(),
        1,
        "one copy is new, the other the duplicate: {copies:?}"
    );

    let stored = stored(&url).await;
    assert_eq!(stored.len(), 41, "40 deliveries and the first, each once");
    for (delivery, (id, _)) in &builds {
        assert_eq!(
            &stored[delivery], id,
            "{delivery} answered its stored build"
        );
    }
    assert_eq!(stored["d-7"], copies[0].0);

    // The stuck groups (one delivery each), then the waiting ones (up to 41 requests) together.
    let groups = metric(addr, "hive_webhook_commit_batch_size_count ").await;
    let deliveries = metric(addr, "hive_webhook_commit_batch_size_sum ").await;
    let small = metric(addr, "hive_webhook_commit_batch_size_bucket{le=\"32.0\"} ").await;
    assert_eq!(
        deliveries, 42.0,
        "every request went through the group commit"
    );
    assert!(
        groups <= (stuck + 2) as f64,
        "{groups} transactions for 42 deliveries"
    );
    assert!(small < groups, "one group held more than 32 deliveries");
    handle.shutdown().await;
}

async fn a_delivery_the_database_refuses_fails_alone(url: String) {
    let handle = start(&url).await;
    project(&handle).await;
    let addr = handle.http_addr;
    poison_builds_of(&url, POISON).await;
    // A box with a free cell for each good build: the failed group had taken cells for its
    // builds in the registry (placing them at once); it must give them back, or the builds it
    // then stores one by one find no room.
    let good = 10 + in_flight(&url);
    let cells = u32::try_from(good).unwrap();
    let (mut fb, _) = fake_box(&handle, "box-a", vec![pool("small", cells, cells)]).await;

    let hold = hold_writes(&url).await;
    let first = tokio::spawn(deliver(addr, "first", &revision(1_000)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Fillers for the other groups that commit at once, so the poisoned one shares a group.
    let mut fillers = Vec::new();
    for i in 1..in_flight(&url) {
        fillers.push(tokio::spawn(deliver(
            addr,
            &format!("filler-{i}"),
            &revision(500 + i),
        )));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut burst = Vec::new();
    for i in 0..10 {
        burst.push(tokio::spawn(deliver(
            addr,
            &format!("ok-{i}"),
            &revision(i),
        )));
        if i == 4 {
            burst.push(tokio::spawn(deliver(addr, "poisoned", POISON)));
        }
    }
    wait_queued(addr, burst.len()).await;
    release(hold).await;

    assert_eq!(first.await.unwrap().0, 202);
    for f in fillers {
        assert_eq!(f.await.unwrap().0, 202);
    }
    let mut builds = HashSet::new();
    let mut failed = 0;
    for task in burst {
        let (status, answer) = task.await.unwrap();
        if status == 500 {
            assert!(answer["error"].as_str().unwrap().contains("internal error"));
            failed += 1;
            continue;
        }
        assert_eq!(status, 202, "{answer}");
        assert!(builds.insert(answer["build_id"].as_str().unwrap().to_string()));
    }
    assert_eq!(failed, 1, "only the poisoned delivery failed");
    assert_eq!(builds.len(), 10);
    let stored = stored(&url).await;
    assert_eq!(
        stored.len(),
        10 + in_flight(&url),
        "the 10 good deliveries, the first and the fillers"
    );
    assert!(!stored.contains_key("poisoned"));
    for i in 0..10 {
        assert!(builds.contains(&stored[&format!("ok-{i}")]), "ok-{i}");
    }
    // The group's transaction failed as a whole; the good ones were then stored one by one.
    let text = http(addr, "GET", "/metrics", &[], b"").await.body;
    assert!(
        text.contains("hive_webhooks_total{outcome=\"error\"} 1\n"),
        "{text}"
    );
    // Every good build reached the box, each once: none is left queued for want of a cell.
    let mut assigned = HashSet::new();
    while assigned.len() < good {
        match fb.next_non_ack(WAIT).await {
            Some(CtlMsg::Assign(a)) => assert!(assigned.insert(a.build_id.clone()), "twice"),
            Some(_) => {}
            None => break,
        }
    }
    let want: HashSet<String> = stored.values().cloned().collect();
    assert_eq!(assigned, want, "every good build placed on the box once");
    handle.shutdown().await;
}

/// Makes the database refuse any build of `revision` (as it would a value it cannot store).
async fn poison_builds_of(url: &str, revision: &str) {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    let sql = if url.starts_with("sqlite") {
        vec![format!(
            "CREATE TRIGGER poison BEFORE INSERT ON builds WHEN NEW.revision = '{revision}' \
             BEGIN SELECT RAISE(ABORT, 'poisoned build'); END"
        )]
    } else {
        vec![
            format!(
                "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN \
                 IF NEW.revision = '{revision}' THEN RAISE EXCEPTION 'poisoned build'; END IF; \
                 RETURN NEW; END $$ LANGUAGE plpgsql"
            ),
            "CREATE TRIGGER poison BEFORE INSERT ON builds FOR EACH ROW \
             EXECUTE FUNCTION poison()"
                .to_string(),
        ]
    };
    for s in sql {
        sqlx::raw_sql(&s).execute(&mut conn).await.unwrap();
    }
}

async fn a_full_queue_answers_503_and_stores_nothing(url: String) {
    let handle = start_with(&url, |c| c.webhook_queue = 3).await;
    project(&handle).await;
    let addr = handle.http_addr;

    let hold = hold_writes(&url).await;
    let first = tokio::spawn(deliver(addr, "first", &revision(1_000)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut fillers = Vec::new();
    for i in 1..in_flight(&url) {
        fillers.push(tokio::spawn(deliver(
            addr,
            &format!("filler-{i}"),
            &revision(500 + i),
        )));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut queued = Vec::new();
    for i in 0..3 {
        queued.push(tokio::spawn(deliver(addr, &format!("q-{i}"), &revision(i))));
    }
    wait_queued(addr, 3).await;
    // The queue is full: these are refused at once, while the write path is still held.
    for i in 0..4 {
        let body = push(&revision(100 + i));
        let sig = sign(SECRET.as_bytes(), &body);
        let reply = raw_post(addr, &format!("over-{i}"), &sig, &body).await;
        assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
        assert!(
            reply
                .to_ascii_lowercase()
                .contains("\r\nretry-after: 1\r\n"),
            "{reply}"
        );
        assert!(reply.contains("queue is full"), "{reply}");
    }
    release(hold).await;
    assert_eq!(first.await.unwrap().0, 202);
    for task in queued.into_iter().chain(fillers) {
        assert_eq!(task.await.unwrap().0, 202);
    }
    let stored = stored(&url).await;
    assert_eq!(stored.len(), 3 + in_flight(&url));
    assert!(stored.keys().all(|d| !d.starts_with("over-")));
    let text = http(addr, "GET", "/metrics", &[], b"").await.body;
    assert!(text.contains("hive_webhooks_total{outcome=\"queue_full\"} 4\n"));
    assert!(text.contains("hive_limit{name=\"webhook_queue\"} 3\n"));
    handle.shutdown().await;
}

/// A signed push over a fresh connection; the raw reply (head and body).
async fn raw_post(addr: SocketAddr, delivery: &str, sig: &str, body: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /webhooks/github HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nX-GitHub-Event: push\r\nX-GitHub-Delivery: {delivery}\r\n\
         X-Hub-Signature-256: {sig}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    String::from_utf8_lossy(&raw).to_string()
}

/// Like `raw_post`, but a refused or cut connection is `None` (the server is going away).
async fn try_deliver(addr: SocketAddr, delivery: String, after: String) -> Option<(u16, String)> {
    let body = push(&after);
    let sig = sign(SECRET.as_bytes(), &body);
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let head = format!(
            "POST /webhooks/github HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nX-GitHub-Event: push\r\n\
             X-GitHub-Delivery: {delivery}\r\nX-Hub-Signature-256: {sig}\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.ok()?;
        s.write_all(&body).await.ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw).to_string();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n")?.1.to_string();
        Some((status, body))
    };
    tokio::time::timeout(WAIT, attempt)
        .await
        .expect("no request hangs through a shutdown")
}

async fn shutdown_mid_burst_loses_nothing_answered_202(url: String) {
    let handle = start(&url).await;
    project(&handle).await;
    let addr = handle.http_addr;

    // 16 senders, each sending its deliveries one after another until the server goes.
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for c in 0..16 {
        let answered = answered.clone();
        senders.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..200 {
                let delivery = format!("s-{c}-{i}");
                let reply = try_deliver(addr, delivery.clone(), revision(c * 1000 + i)).await;
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match reply {
                    None => break,
                    Some((status, body)) => got.push((delivery, status, body)),
                }
            }
            got
        }));
    }
    common::eventually(WAIT, "some deliveries answered", || {
        let answered = answered.clone();
        async move { answered.load(std::sync::atomic::Ordering::Relaxed) >= 100 }
    })
    .await;
    handle.shutdown().await;

    let mut accepted = HashMap::new();
    let mut refused = Vec::new();
    for s in senders {
        for (delivery, status, body) in s.await.unwrap() {
            match status {
                202 => {
                    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
                    accepted.insert(delivery, answer["build_id"].as_str().unwrap().to_string());
                }
                503 => refused.push(delivery),
                other => panic!("{delivery}: {other} {body}"),
            }
        }
    }
    assert!(accepted.len() >= 100, "{} answered 202", accepted.len());

    // Reopened (as a restart would): every delivery answered 202 is there, with its build.
    let store = Store::open(&url).await.unwrap();
    store.close().await;
    let stored = stored(&url).await;
    for (delivery, build) in &accepted {
        assert_eq!(
            stored.get(delivery),
            Some(build),
            "{delivery} was answered 202 with {build}"
        );
    }
    // A 503 was refused before it was queued: not stored, so the forge's retry builds it.
    for delivery in &refused {
        assert!(
            !stored.contains_key(delivery),
            "{delivery} was refused yet stored"
        );
    }
}
