//! Issue 12 at the control plane's door, over the real API and webhook against a real database
//! (SQLite file; PostgreSQL when `HIVE_TEST_POSTGRES_URL` is set): input is checked before it is
//! stored, with messages that say what to do; a repository matches in every form a forge sends
//! it; operators can undo a cordon and forget a box gone for good; a build that every box
//! rejects ends `failed` with the reason instead of bouncing forever; an unreachable database
//! is reported by its cause.

mod common;

use std::time::Duration;

use common::{api, eventually, fake_box, http, pool, push_signed, start, start_with};
use hive_proto::v1::box_message::Msg as BoxMsg;
use hive_proto::v1::control_message::Msg as CtlMsg;
use hive_proto::v1::{
    BoxActionRequest, BoxState, BuildState, BuildUpdate, BuildUpdateKind, CancelBuildRequest,
    CreateProjectRequest, GetBuildRequest, ListBoxesRequest, ListBuildsRequest,
    ListProjectsRequest, SubmitBuildRequest,
};
use serde_json::json;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(15);

fn good() -> CreateProjectRequest {
    CreateProjectRequest {
        name: "widget".into(),
        repo_url: "https://github.example/acme/widget.git".into(),
        secret: "s3cret".into(),
        steps: vec!["make test".into()],
        ..Default::default()
    }
}

/// Every refused input gets INVALID_ARGUMENT naming the problem, and nothing is stored.
async fn bad_input_is_refused_with_what_to_do(url: String) {
    let handle = start(&url).await;
    let mut client = api(&handle).await;
    let cases: Vec<(CreateProjectRequest, &str)> = vec![
        (
            CreateProjectRequest {
                repo_url: "not-a-url".into(),
                ..good()
            },
            "is not one Hive can fetch: use https://",
        ),
        (
            CreateProjectRequest {
                repo_url: "http://".into(),
                ..good()
            },
            "has no host",
        ),
        (
            CreateProjectRequest {
                repo_url: "ftp://x/y.git".into(),
                ..good()
            },
            "scheme \"ftp\" is not supported",
        ),
        (
            CreateProjectRequest {
                repo_url: "file:///etc".into(),
                ..good()
            },
            "is a local path",
        ),
        (
            CreateProjectRequest {
                repo_url: "https://user:tok3n@github.example/acme/widget.git".into(),
                ..good()
            },
            "carries credentials",
        ),
        (
            CreateProjectRequest {
                repo_url: "https://github.example/".into(),
                ..good()
            },
            "names no repository",
        ),
        (
            CreateProjectRequest {
                secret: "   ".into(),
                ..good()
            },
            "leave it out for a project built only through the API",
        ),
        (
            CreateProjectRequest {
                timeout_secs: 8 * 24 * 3600,
                ..good()
            },
            "is over a week",
        ),
        (
            CreateProjectRequest {
                branch: "a..b".into(),
                ..good()
            },
            "is not a git ref name",
        ),
    ];
    for (req, needle) in cases {
        let shown = format!("{:?}/{:?}/{}", req.repo_url, req.branch, req.timeout_secs);
        let e = client.create_project(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{shown}: {e:?}");
        assert!(e.message().contains(needle), "{shown}: {}", e.message());
        assert!(
            !e.message().contains("tok3n"),
            "a credential echoed: {}",
            e.message()
        );
    }
    let stored = client
        .list_projects(ListProjectsRequest {})
        .await
        .unwrap()
        .into_inner()
        .projects;
    assert!(
        stored.is_empty(),
        "refused projects were stored: {stored:?}"
    );

    // The accepted forms, including an API-only project (no secret) and an scp-like URL.
    client.create_project(good()).await.unwrap();
    client
        .create_project(CreateProjectRequest {
            name: "api-only".into(),
            repo_url: "git@github.example:acme/tool.git".into(),
            secret: String::new(),
            ..good()
        })
        .await
        .unwrap();

    // Submissions: a revision must look like a commit, a ref like a full ref name.
    let submit = |revision: &str, git_ref: &str| SubmitBuildRequest {
        project: "widget".into(),
        revision: revision.into(),
        git_ref: git_ref.into(),
        ..Default::default()
    };
    for (req, needle) in [
        (submit("nothex", ""), "is not a commit id"),
        (submit("abc", ""), "is not a commit id"),
        (submit("", "main"), "full ref names start with refs/"),
        (submit("", "refs/heads/a b"), "spaces"),
        (submit("", "refs/heads/x.lock"), ".lock"),
    ] {
        let shown = format!("{req:?}");
        let e = client.submit_build(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{shown}");
        assert!(e.message().contains(needle), "{shown}: {}", e.message());
    }
    let builds = client
        .list_builds(ListBuildsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .builds;
    assert!(builds.is_empty(), "a refused submission made a build");
    for req in [
        submit(&"a".repeat(40), "refs/heads/main"),
        submit("abc1234", ""),
        submit("", "refs/tags/v1.0"),
        submit("", "HEAD"),
    ] {
        client.submit_build(req).await.unwrap();
    }
    handle.shutdown().await;
}
hive_testkit::on_both!(db => bad_input_is_refused_with_what_to_do);

/// A push finds a project registered in any form of the repository's URL: scheme, user,
/// `.git`, trailing slash and case do not matter (GitHub names are case-insensitive).
async fn webhook_urls_match_as_forges_do(url: String) {
    let handle = start(&url).await;
    let mut client = api(&handle).await;
    client
        .create_project(CreateProjectRequest {
            repo_url: "ssh://git@GitHub.example/Acme/Widget.git/".into(),
            ..good()
        })
        .await
        .unwrap();
    let push = |owner_repo: &str, delivery: &str| {
        let body = json!({
            "ref": "refs/heads/main",
            "before": "0".repeat(40),
            "after": "b".repeat(40),
            "deleted": false,
            "repository": {
                "full_name": owner_repo,
                "clone_url": format!("https://github.example/{owner_repo}.git"),
                "html_url": format!("https://github.example/{owner_repo}"),
                "ssh_url": format!("git@github.example:{owner_repo}.git"),
            },
        })
        .to_string()
        .into_bytes();
        let addr = handle.http_addr;
        let delivery = delivery.to_string();
        async move { push_signed(addr, b"s3cret", &delivery, &body).await }
    };
    let r = push("acme/widget", "d-1").await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["project"], "widget", "{}", r.body);
    let r = push("ACME/Widget", "d-2").await;
    assert_eq!(r.status, 202, "{}", r.body);
    // Another repository on the same host is not this project's.
    let r = push("acme/other", "d-3").await;
    assert_eq!(r.status, 401, "{}", r.body);
    let builds = client
        .list_builds(ListBuildsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .builds;
    assert_eq!(builds.len(), 2);
    handle.shutdown().await;
}
hive_testkit::on_both!(db => webhook_urls_match_as_forges_do);

async fn box_state(handle: &hive_control_plane::server::Handle, id: &str) -> Option<i32> {
    api(handle)
        .await
        .list_boxes(ListBoxesRequest {})
        .await
        .unwrap()
        .into_inner()
        .boxes
        .into_iter()
        .find(|b| b.id == id)
        .map(|b| b.state)
}

/// `box uncordon` undoes `box cordon` (and the box gets builds again); `box forget` removes a
/// box that is gone, refusing one that is connected or still holds a build.
async fn uncordon_and_forget(url: String) {
    let handle = start_with(&url, |c| c.lease = Duration::from_secs(60)).await;
    let mut client = api(&handle).await;
    client.create_project(good()).await.unwrap();
    let req = |id: &str| BoxActionRequest { box_id: id.into() };
    let (mut b, _) = fake_box(&handle, "box-a", vec![pool("small", 1, 1)]).await;
    let beat = b.heartbeat_every(
        Duration::from_millis(100),
        vec![pool("small", 1, 1)],
        vec![],
    );

    // Uncordon applies to a box out of service (cordoned, draining, left), not an active one.
    let e = client.uncordon_box(req("box-a")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message()
            .contains("is active: uncordon applies to a cordoned, draining or left box"),
        "{}",
        e.message()
    );
    let info = client.cordon_box(req("box-a")).await.unwrap().into_inner();
    assert_eq!(info.state, BoxState::Cordoned as i32);
    let id = client
        .submit_build(SubmitBuildRequest {
            project: "widget".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let got = b.next_non_ack(Duration::from_millis(800)).await;
    assert!(got.is_none(), "a cordoned box was given: {got:?}");
    let info = client
        .uncordon_box(req("box-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.state, BoxState::Active as i32);
    let a = match b.next_non_ack(WAIT).await {
        Some(CtlMsg::Assign(a)) => a,
        other => panic!("the uncordoned box got no build: {other:?}"),
    };
    assert_eq!(a.build_id, id);

    // Connected: not forgotten. Disconnected with a live lease: not forgotten either.
    let e = client.forget_box(req("box-a")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("is connected"), "{}", e.message());
    beat.abort();
    drop(b);
    eventually(WAIT, "box-a offline", || async {
        box_state(&handle, "box-a").await == Some(BoxState::Offline as i32)
    })
    .await;
    // Its build's lease is live (this control plane's leases are long): refused.
    let e = client.forget_box(req("box-a")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("1 build lease"), "{}", e.message());
    // Once the build has moved on, the box can go.
    client
        .cancel_build(CancelBuildRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    client.forget_box(req("box-a")).await.unwrap();
    assert_eq!(box_state(&handle, "box-a").await, None);
    let e = client.forget_box(req("box-a")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let b = client
        .get_build(GetBuildRequest { id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state, BuildState::Cancelled as i32, "{b:?}");
    assert_eq!(b.box_id, "box-a", "a build keeps its box as history");
    // It comes back as a new box, active.
    let (_again, _) = fake_box(&handle, "box-a", vec![pool("small", 1, 1)]).await;
    assert_eq!(
        box_state(&handle, "box-a").await,
        Some(BoxState::Active as i32)
    );
    handle.shutdown().await;
}
hive_testkit::on_both!(db => uncordon_and_forget);

/// A box cordoned in the store by someone this control plane has not heard from (another
/// control plane whose note is late or lost): the store refuses the placement onto it, the
/// round reads the box's state back into the registry, and the build goes to another box at
/// once, instead of being offered to the cordoned box on every pass.
async fn a_cordon_this_control_plane_has_not_heard_of_holds(url: String) {
    use sqlx::Connection as _;
    let handle = start_with(&url, |c| c.lease = Duration::from_secs(60)).await;
    // Ready means (on PostgreSQL) the cluster listener is up and its first resync has run:
    // that resync, had it run after the cordon below, would correct the registry by itself.
    eventually(WAIT, "ready", || async {
        http(handle.http_addr, "GET", "/readyz", &[], b"")
            .await
            .status
            == 200
    })
    .await;
    let mut client = api(&handle).await;
    client.create_project(good()).await.unwrap();
    // Spread placement prefers box-a (more warm cells), as long as it thinks box-a is active.
    let (mut a, _) = fake_box(&handle, "box-a", vec![pool("small", 3, 3)]).await;
    let (mut b, _) = fake_box(&handle, "box-b", vec![pool("small", 1, 1)]).await;
    sqlx::any::install_default_drivers();
    let mut other = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::query("UPDATE boxes SET state = 'cordoned' WHERE id = 'box-a'")
        .execute(&mut other)
        .await
        .unwrap();
    other.close().await.unwrap();
    let id = client
        .submit_build(SubmitBuildRequest {
            project: "widget".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    match b.next_non_ack(WAIT).await {
        Some(CtlMsg::Assign(x)) => assert_eq!(x.build_id, id),
        other => panic!("box-b got no build: {other:?}"),
    }
    let got = a.next_non_ack(Duration::from_millis(300)).await;
    assert!(got.is_none(), "the cordoned box was given: {got:?}");
    let build = client
        .get_build(GetBuildRequest { id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(build.box_id, "box-b");
    handle.shutdown().await;
}
hive_testkit::on_both!(db => a_cordon_this_control_plane_has_not_heard_of_holds);

/// A build every box rejects is not bounced forever: after `max_attempts` it fails with the
/// last reason, in its state message and its log.
async fn rejected_builds_fail_after_the_attempt_limit(url: String) {
    let handle = start_with(&url, |c| c.max_attempts = 3).await;
    let mut client = api(&handle).await;
    client.create_project(good()).await.unwrap();
    let (mut b, _) = fake_box(&handle, "box-r", vec![pool("small", 1, 1)]).await;
    let _beat = b.heartbeat_every(
        Duration::from_millis(100),
        vec![pool("small", 1, 1)],
        vec![],
    );
    let id = client
        .submit_build(SubmitBuildRequest {
            project: "widget".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    for attempt in 1..=3 {
        let a = match b.next_non_ack(WAIT).await {
            Some(CtlMsg::Assign(a)) => a,
            other => panic!("attempt {attempt}: no assignment: {other:?}"),
        };
        assert_eq!(a.build_id, id);
        let s = b
            .send_acked(BoxMsg::Update(BuildUpdate {
                build_id: a.build_id.clone(),
                lease_id: a.lease_id.clone(),
                kind: BuildUpdateKind::Rejected as i32,
                message: "nft failed: No such file or directory".into(),
                ..Default::default()
            }))
            .await;
        b.wait_ack(s, WAIT).await.unwrap();
    }
    let build = client
        .get_build(GetBuildRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(build.state, BuildState::Failed as i32, "{build:?}");
    assert_eq!(build.attempt, 3);
    assert!(
        build.message.contains("gave up after 3 attempts") && build.message.contains("nft failed"),
        "{}",
        build.message
    );
    // Nothing more is placed.
    assert!(b.next_non_ack(Duration::from_millis(800)).await.is_none());
    let metrics = http(handle.http_addr, "GET", "/metrics", &[], b"").await;
    assert!(
        metrics
            .body
            .contains("hive_limit{name=\"max_attempts\"} 3\n"),
        "{}",
        metrics.body
    );
    handle.shutdown().await;
}
hive_testkit::on_both!(db => rejected_builds_fail_after_the_attempt_limit);

/// A PostgreSQL URL with nothing listening is reported at once by its cause, not as a pool
/// timeout ten seconds later.
#[tokio::test]
async fn an_unreachable_database_is_named_by_its_cause() {
    let started = std::time::Instant::now();
    let Err(e) =
        hive_control_plane::store::Store::open("postgres://hive:pw@127.0.0.1:1/hive").await
    else {
        panic!("nothing listens on port 1, yet the store opened");
    };
    let msg = hive_sys::error_chain(&e);
    assert!(msg.contains("refused"), "{msg}");
    assert!(!msg.contains(":pw@"), "the password shown: {msg}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// Issue 12: a build's start and end are when its box says they happened (a box that was cut
/// off reports them late), as long as that is after the build's last change and not in the
/// future; other times (a skewed clock, a hostile box) give way to the control plane's own.
async fn start_and_end_times_come_from_the_box_when_they_make_sense(url: String) {
    let handle = start_with(&url, |c| c.lease = Duration::from_secs(60)).await;
    let mut client = api(&handle).await;
    client.create_project(good()).await.unwrap();
    let (mut b, _) = fake_box(&handle, "box-t", vec![pool("small", 1, 1)]).await;
    let _beat = b.heartbeat_every(
        Duration::from_millis(100),
        vec![pool("small", 1, 1)],
        vec![],
    );
    let submit = || SubmitBuildRequest {
        project: "widget".into(),
        ..Default::default()
    };
    let get = |id: String| {
        let handle = &handle;
        async move {
            api(handle)
                .await
                .get_build(GetBuildRequest { id })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let at = |build: &hive_proto::v1::Build, state: BuildState| {
        build
            .transitions
            .iter()
            .find(|t| t.state == state as i32)
            .map(|t| t.at_ms)
            .unwrap_or_else(|| panic!("no {state:?} in {build:?}"))
    };
    let update = |a: &hive_proto::v1::Assignment, kind: BuildUpdateKind, at_ms: i64| {
        BoxMsg::Update(BuildUpdate {
            build_id: a.build_id.clone(),
            lease_id: a.lease_id.clone(),
            kind: kind as i32,
            state: BuildState::Succeeded as i32,
            cell_id: "cell-1".into(),
            at_ms,
            ..Default::default()
        })
    };

    // Reported late: the box's times stand.
    let id = client.submit_build(submit()).await.unwrap().into_inner().id;
    let a = match b.next_non_ack(WAIT).await {
        Some(CtlMsg::Assign(a)) => a,
        other => panic!("no assignment: {other:?}"),
    };
    let placed = at(&get(id.clone()).await, BuildState::Placed);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (started, ended) = (placed + 300, placed + 900);
    for (kind, t) in [
        (BuildUpdateKind::Accepted, 0),
        (BuildUpdateKind::Running, started),
        (BuildUpdateKind::Finished, ended),
    ] {
        let s = b.send_acked(update(&a, kind, t)).await;
        b.wait_ack(s, WAIT).await.unwrap();
    }
    let done = get(id).await;
    assert_eq!(at(&done, BuildState::Running), started);
    assert_eq!(at(&done, BuildState::Succeeded), ended);
    assert_eq!(done.updated_at_ms, ended);

    // From the future, or from before the build's last change: the control plane's time.
    let id = client.submit_build(submit()).await.unwrap().into_inner().id;
    let a = match b.next_non_ack(WAIT).await {
        Some(CtlMsg::Assign(a)) => a,
        other => panic!("no assignment: {other:?}"),
    };
    let placed = at(&get(id.clone()).await, BuildState::Placed);
    let before = hive_sys::now_ms();
    for (kind, t) in [
        (BuildUpdateKind::Running, placed - 60_000),
        (BuildUpdateKind::Finished, before + 3_600_000),
    ] {
        let s = b.send_acked(update(&a, kind, t)).await;
        b.wait_ack(s, WAIT).await.unwrap();
    }
    let after = hive_sys::now_ms();
    let done = get(id).await;
    for state in [BuildState::Running, BuildState::Succeeded] {
        let t = at(&done, state);
        assert!(
            (before..=after).contains(&t),
            "{state:?} at {t}, not in [{before}, {after}]"
        );
    }
    handle.shutdown().await;
}
hive_testkit::on_both!(db => start_and_end_times_come_from_the_box_when_they_make_sense);
