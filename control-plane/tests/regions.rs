//! Issue 13, regional hives: two hives (each its own control plane and database), a project of
//! one routed from the other. A push that reaches the wrong hive is checked there and forwarded
//! to the hive that builds it; it makes one build there, none here, also when redelivered, when
//! the other hive was down at first, or when two hives each route the project to the other.
//! "us" runs on the database under test (SQLite, or PostgreSQL when `HIVE_TEST_POSTGRES_URL` is
//! set); "eu" on a SQLite file of its own.

mod common;

use std::net::SocketAddr;

use common::{api, push_signed, start_with, HttpReply};
use hive_control_plane::server::Handle;
use hive_proto::v1::{CreateProjectRequest, ListBuildsRequest, SubmitBuildRequest};
use hive_testkit::TestDb;
use serde_json::json;

const SECRET: &str = "regional-secret";
const REPO: &str = "https://git.example/acme/atlas.git";

fn push(delivery_after: &str) -> Vec<u8> {
    json!({
        "ref": "refs/heads/main",
        "after": delivery_after,
        "repository": { "clone_url": REPO },
    })
    .to_string()
    .into_bytes()
}

/// A port nothing listens on (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn hive(url: &str, name: &str, http_port: u16, peers: Vec<String>) -> Handle {
    let name = name.to_string();
    start_with(url, move |c| {
        c.hive_name = name;
        c.region = "test-region".into();
        c.peer_hives = peers;
        c.http_addr = SocketAddr::from(([127, 0, 0, 1], http_port));
    })
    .await
}

async fn add_project(h: &Handle, name: &str, hive: &str) {
    api(h)
        .await
        .create_project(CreateProjectRequest {
            name: name.into(),
            repo_url: REPO.into(),
            secret: SECRET.into(),
            branch: "main".into(),
            steps: if hive.is_empty() {
                vec!["make".into()]
            } else {
                vec![]
            },
            hive: hive.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("project {name}: {e}"));
}

async fn builds(h: &Handle) -> Vec<String> {
    api(h)
        .await
        .list_builds(ListBuildsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .builds
        .into_iter()
        .map(|b| b.id)
        .collect()
}

/// `hive_webhooks_total{outcome=...}` on `h`'s /metrics (0 when absent).
async fn webhooks(h: &Handle, outcome: &str) -> u64 {
    let m = common::http(h.http_addr, "GET", "/metrics", &[], b"").await;
    let needle = format!("outcome=\"{outcome}\"}} ");
    m.body
        .lines()
        .find(|l| l.starts_with("hive_webhooks") && l.contains(&needle))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn build_id(r: &HttpReply) -> String {
    r.json()["build_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no build id: {} {}", r.status, r.body))
        .to_string()
}

async fn a_push_for_another_hive_is_built_there_once(url: String) {
    let eu_db = TestDb::sqlite();
    let eu_port = free_port();
    let eu = hive(&eu_db.url, "eu", eu_port, vec![]).await;
    add_project(&eu, "atlas", "").await;
    let us = hive(
        &url,
        "us",
        0,
        vec![format!("eu=http://127.0.0.1:{eu_port}")],
    )
    .await;
    add_project(&us, "atlas-eu", "eu").await;

    // Shown as a project of hive eu; not submittable here.
    let p = api(&us)
        .await
        .get_project(hive_proto::v1::GetProjectRequest {
            project: "atlas-eu".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.hive, "eu");
    let e = api(&us)
        .await
        .submit_build(SubmitBuildRequest {
            project: "atlas-eu".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("hive \"eu\""), "{e}");

    let body = push(&"a".repeat(40));
    let r = push_signed(us.http_addr, SECRET.as_bytes(), "d-1", &body).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["hive"], "eu", "{}", r.body);
    assert_eq!(r.json()["forwarded"], true, "{}", r.body);
    let id = build_id(&r);
    assert_eq!(builds(&eu).await, vec![id.clone()], "built on eu");
    assert!(builds(&us).await.is_empty(), "nothing built on us");

    // The git host's redelivery: the same build, no second one.
    let again = push_signed(us.http_addr, SECRET.as_bytes(), "d-1", &body).await;
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(again.json()["duplicate"], true, "{}", again.body);
    assert_eq!(build_id(&again), id);
    assert_eq!(builds(&eu).await.len(), 1);

    // A wrong signature is refused here, and eu never hears of it.
    let before = webhooks(&eu, "bad_signature").await;
    let bad = push_signed(us.http_addr, b"not-the-secret", "d-2", &body).await;
    assert_eq!(bad.status, 401, "{}", bad.body);
    assert_eq!(webhooks(&eu, "bad_signature").await, before);
    assert_eq!(webhooks(&eu, "build").await, 1, "eu saw one build delivery");
    // Forwarded twice (the delivery and its redelivery); eu deduped the second.
    assert_eq!(webhooks(&us, "forwarded").await, 2);
    assert_eq!(webhooks(&eu, "duplicate").await, 1);

    // A project for a hive that is not a peer is refused, saying what to set.
    let e = api(&us)
        .await
        .create_project(CreateProjectRequest {
            name: "atlas-ap".into(),
            repo_url: REPO.into(),
            secret: SECRET.into(),
            hive: "ap".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("--peer-hive ap=URL"), "{e}");
    // ... and one without the secret it needs to check pushes.
    let e = api(&us)
        .await
        .create_project(CreateProjectRequest {
            name: "atlas-eu2".into(),
            repo_url: REPO.into(),
            hive: "eu".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

    // /healthz and /readyz name the hive.
    let h = common::http(us.http_addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(h.json()["hive"], "us", "{}", h.body);
    assert_eq!(h.json()["region"], "test-region", "{}", h.body);
    let r = common::http(us.http_addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(r.json()["peer_hives"], json!(["eu"]), "{}", r.body);

    us.shutdown().await;
    eu.shutdown().await;
    eu_db.drop_db().await;
}
hive_testkit::on_both!(db => a_push_for_another_hive_is_built_there_once);

async fn a_hive_that_is_down_gets_the_push_on_redelivery(url: String) {
    let eu_port = free_port();
    let us = hive(
        &url,
        "us",
        0,
        vec![format!("eu=http://127.0.0.1:{eu_port}")],
    )
    .await;
    add_project(&us, "atlas-eu", "eu").await;
    let body = push(&"b".repeat(40));

    // eu is down: 502 with Retry-After, nothing stored anywhere.
    let r = push_signed(us.http_addr, SECRET.as_bytes(), "d-down", &body).await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("10"), "{}", r.head);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("hive eu (which builds project atlas-eu) could not be reached"),
        "{}",
        r.body
    );
    assert!(builds(&us).await.is_empty());

    // eu comes up; the git host redelivers: one build there.
    let eu_db = TestDb::sqlite();
    let eu = hive(&eu_db.url, "eu", eu_port, vec![]).await;
    add_project(&eu, "atlas", "").await;
    let r = push_signed(us.http_addr, SECRET.as_bytes(), "d-down", &body).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(builds(&eu).await, vec![build_id(&r)]);

    // eu does not know the secret us has (a mis-set project): refused, said as such, no retry.
    let eu2_db = TestDb::sqlite();
    let eu2_port = free_port();
    let eu2 = hive(&eu2_db.url, "eu", eu2_port, vec![]).await;
    let us2_db = TestDb::sqlite();
    let us2 = hive(
        &us2_db.url,
        "us",
        0,
        vec![format!("eu=http://127.0.0.1:{eu2_port}")],
    )
    .await;
    add_project(&us2, "atlas-eu", "eu").await;
    let r = push_signed(us2.http_addr, SECRET.as_bytes(), "d-x", &body).await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.header("retry-after").is_none(), "{}", r.head);
    assert!(r.body.contains("refused the delivery: 401"), "{}", r.body);

    for h in [us, eu, eu2, us2] {
        h.shutdown().await;
    }
    for db in [eu_db, eu2_db, us2_db] {
        db.drop_db().await;
    }
}
hive_testkit::on_both!(db => a_hive_that_is_down_gets_the_push_on_redelivery);

/// Two hives that each think the other builds a project: the push is passed on once, then
/// stops, and says why; no build, no ping-pong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hives_routing_to_each_other_do_not_loop() {
    let (us_db, eu_db) = (TestDb::sqlite(), TestDb::sqlite());
    let (us_port, eu_port) = (free_port(), free_port());
    let eu = hive(
        &eu_db.url,
        "eu",
        eu_port,
        vec![format!("us=http://127.0.0.1:{us_port}")],
    )
    .await;
    let us = hive(
        &us_db.url,
        "us",
        us_port,
        vec![format!("eu=http://127.0.0.1:{eu_port}")],
    )
    .await;
    add_project(&us, "atlas", "eu").await;
    add_project(&eu, "atlas", "us").await;
    let r = push_signed(
        us.http_addr,
        SECRET.as_bytes(),
        "d-loop",
        &push(&"c".repeat(40)),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(r.json()["build_id"].is_null(), "{}", r.body);
    assert!(
        r.body.contains("not forwarded again"),
        "the answer says why: {}",
        r.body
    );
    assert_eq!(webhooks(&eu, "forward_loop").await, 1);
    assert_eq!(webhooks(&us, "forward_loop").await, 0);
    assert_eq!(webhooks(&us, "forwarded").await, 1);
    assert!(builds(&us).await.is_empty() && builds(&eu).await.is_empty());
    us.shutdown().await;
    eu.shutdown().await;
    us_db.drop_db().await;
    eu_db.drop_db().await;
}

/// A database is one hive: a control plane started on it under another name is refused, and
/// the message says which name to give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_belongs_to_one_hive() {
    let db = TestDb::sqlite();
    let us = hive(&db.url, "us", 0, vec![]).await;
    us.shutdown().await;
    let data_dir = tempfile::tempdir().unwrap();
    let config = hive_control_plane::server::Config {
        data_dir: data_dir.path().to_path_buf(),
        db: Some(db.url.clone()),
        hive_name: "eu".into(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        box_addr: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    let Err(e) = hive_control_plane::server::start(config.clone()).await else {
        panic!("a control plane of another hive started on hive us's database");
    };
    let text = hive_sys::error_chain(&e);
    // The data dir is not the first one's, so the CA check may speak first; the hive name
    // check comes before it.
    assert!(text.contains("belongs to hive \"us\""), "{text}");
    assert!(text.contains("--hive-name us"), "{text}");

    // Bad names and peers are refused before anything starts.
    for (name, peers, says) in [
        ("EU", vec![], "hive name"),
        ("eu", vec!["eu=https://x".to_string()], "own name"),
        ("eu", vec!["us=http://192.0.2.1".to_string()], "loopback"),
    ] {
        let Err(e) = hive_control_plane::server::start(hive_control_plane::server::Config {
            hive_name: name.into(),
            peer_hives: peers,
            ..config.clone()
        })
        .await
        else {
            panic!("started as {name:?}");
        };
        let text = hive_sys::error_chain(&e);
        assert!(text.contains(says), "{text}");
    }
    db.drop_db().await;
}
