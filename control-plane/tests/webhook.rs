//! The webhook over real HTTP against a real database (SQLite file; PostgreSQL when
//! `HIVE_TEST_POSTGRES_URL` is set): every answer in issue 2, and that rejections change nothing.

mod common;

use common::{api, http, post_github as post, start};
use hive_control_plane::http::webhook::sign;
use hive_proto::v1::{CreateProjectRequest, ListBuildsRequest};
use serde_json::json;

const SECRET: &str = "s3cret-for-tests";

/// A push as GitHub sends it for `repo` (`https://host/owner/name`): every URL form names it.
fn push(repo: &str, git_ref: &str, after: &str) -> Vec<u8> {
    let (host, path) = repo
        .strip_prefix("https://")
        .and_then(|r| r.split_once('/'))
        .expect("https://host/owner/name");
    json!({
        "ref": git_ref,
        "before": "0000000000000000000000000000000000000001",
        "after": after,
        "deleted": false,
        "repository": {
            "full_name": path,
            "clone_url": format!("{repo}.git"),
            "html_url": repo,
            "ssh_url": format!("git@{host}:{path}.git"),
            "git_url": format!("git://{host}/{path}.git"),
        },
        "head_commit": { "id": after, "message": "change" },
    })
    .to_string()
    .into_bytes()
}

async fn build_count(handle: &hive_control_plane::server::Handle) -> usize {
    api(handle)
        .await
        .list_builds(ListBuildsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .builds
        .len()
}

async fn webhook_answers(url: String) {
    let handle = start(&url).await;
    let addr = handle.http_addr;
    let mut client = api(&handle).await;
    client
        .create_project(CreateProjectRequest {
            name: "widget".into(),
            repo_url: "https://github.example/acme/widget".into(),
            secret: SECRET.into(),
            branch: "main".into(),
            steps: vec!["make test".into()],
            ..Default::default()
        })
        .await
        .unwrap();

    // ping
    let body = push("https://github.example/acme/widget", "refs/heads/main", "x");
    let r = post(
        addr,
        "ping",
        "d-ping",
        Some(&sign(SECRET.as_bytes(), &body)),
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["message"], "pong");

    // Organisation-level ping (no repository): pong; a push without one is malformed.
    let org = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
    let r = post(addr, "ping", "d-org", Some(&sign(b"x", org)), org).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(addr, "push", "d-org2", Some(&sign(b"x", org)), org).await;
    assert_eq!(r.status, 400, "{}", r.body);

    // A signed push to main: one queued build.
    let sha = "a".repeat(40);
    let body = push(
        "https://github.example/acme/widget",
        "refs/heads/main",
        &sha,
    );
    let sig = sign(SECRET.as_bytes(), &body);
    let r = post(addr, "push", "d-1", Some(&sig), &body).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let build_id = r.json()["build_id"].as_str().unwrap().to_string();
    assert_eq!(r.json()["duplicate"], false);
    let b = client
        .get_build(hive_proto::v1::GetBuildRequest {
            id: build_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.revision, sha);
    assert_eq!(b.git_ref, "refs/heads/main");
    assert_eq!(b.trigger, "webhook:d-1");
    assert_eq!(b.size_class, "small");
    assert_eq!(b.transitions.len(), 1, "the queued transition is stored");
    assert_eq!(build_count(&handle).await, 1);

    // Redelivery: same build, no second one.
    let r = post(addr, "push", "d-1", Some(&sig), &body).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["build_id"], build_id.as_str());
    assert_eq!(r.json()["duplicate"], true);
    assert_eq!(build_count(&handle).await, 1);

    // Bad signature (right form, wrong key), missing signature, malformed header.
    let bad = sign(b"not the secret", &body);
    for (sig, why) in [
        (Some(bad.as_str()), "wrong key"),
        (None, "missing"),
        (Some("sha1=abc"), "malformed"),
    ] {
        let r = post(addr, "push", "d-2", sig, &body).await;
        assert_eq!(r.status, 401, "{why}: {}", r.body);
        assert!(r.json()["error"].as_str().unwrap().len() > 5);
    }
    // A signature over a different body.
    let other = push(
        "https://github.example/acme/widget",
        "refs/heads/main",
        &"b".repeat(40),
    );
    let r = post(addr, "push", "d-2", Some(&sig), &other).await;
    assert_eq!(r.status, 401, "{}", r.body);

    // Garbage JSON (signed with the right secret, as a git host would sign anything).
    let garbage = b"{\"ref\": refs/heads/main,,, not json";
    let r = post(
        addr,
        "push",
        "d-3",
        Some(&sign(SECRET.as_bytes(), garbage)),
        garbage,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains("JSON"));

    // Unknown repository: answered as a bad signature (issue 10; see tests/attack.rs).
    let body4 = push("https://github.example/acme/other", "refs/heads/main", &sha);
    let r = post(
        addr,
        "push",
        "d-4",
        Some(&sign(SECRET.as_bytes(), &body4)),
        &body4,
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);

    // Oversize body (6 MiB): 413 before anything else.
    let big = vec![b' '; 6 * 1024 * 1024];
    let r = post(
        addr,
        "push",
        "d-5",
        Some(&sign(SECRET.as_bytes(), &big)),
        &big,
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.body);

    // Unsupported event, properly signed: 202 and no build.
    let r = post(addr, "issues", "d-6", Some(&sig), &body).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(r.json()["build_id"].is_null());

    // Branch filter and deleted branch: 202, no build.
    let dev = push("https://github.example/acme/widget", "refs/heads/dev", &sha);
    let r = post(
        addr,
        "push",
        "d-7",
        Some(&sign(SECRET.as_bytes(), &dev)),
        &dev,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(r.json()["build_id"].is_null());
    let mut del: serde_json::Value = serde_json::from_slice(&push(
        "https://github.example/acme/widget",
        "refs/heads/main",
        &"0".repeat(40),
    ))
    .unwrap();
    del["deleted"] = json!(true);
    let del = del.to_string().into_bytes();
    let r = post(
        addr,
        "push",
        "d-8",
        Some(&sign(SECRET.as_bytes(), &del)),
        &del,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(r.json()["message"].as_str().unwrap().contains("deleted"));

    // The ssh_url alone (with .git) matches the project too.
    let mut ssh_only: serde_json::Value = serde_json::from_slice(&body).unwrap();
    ssh_only["repository"] = json!({ "ssh_url": "https://github.example/acme/widget.git/" });
    let ssh_only = ssh_only.to_string().into_bytes();
    let r = post(
        addr,
        "push",
        "d-9",
        Some(&sign(SECRET.as_bytes(), &ssh_only)),
        &ssh_only,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(r.json()["build_id"].is_string());

    // Rejections and no-build answers changed nothing: d-1 and d-9 made the only builds.
    assert_eq!(build_count(&handle).await, 2);

    // Metrics count outcomes; healthz answers.
    let m = http(addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(m.status, 200);
    assert!(
        m.body.contains("hive_webhooks_total{outcome=\"build\"} 2"),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("hive_webhooks_total{outcome=\"duplicate\"} 1"),
        "{}",
        m.body
    );
    // Four bad signatures and the unknown repository, counted as one of them.
    assert!(
        m.body
            .contains("hive_webhooks_total{outcome=\"bad_signature\"} 5"),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("hive_webhooks_total{outcome=\"bad_json\"} 2"),
        "{}",
        m.body
    );
    assert!(m.body.contains("hive_queue_depth 2"), "{}", m.body);
    let h = http(addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(h.status, 200, "{}", h.body);

    handle.shutdown().await;
}
hive_testkit::on_both!(db => webhook_answers);

/// A push must name the commit to build: an `after` that is not 40 hex digits is a 400 naming
/// the field (nothing recorded, so a corrected redelivery still builds), unless the push deletes
/// the branch.
async fn push_without_a_commit_is_rejected(url: String) {
    let handle = start(&url).await;
    let addr = handle.http_addr;
    api(&handle)
        .await
        .create_project(CreateProjectRequest {
            name: "widget".into(),
            repo_url: "https://github.example/acme/widget".into(),
            secret: SECRET.into(),
            branch: "main".into(),
            steps: vec!["make test".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let repo = "https://github.example/acme/widget";
    let with_after = |after: serde_json::Value, deleted: bool| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&push(repo, "refs/heads/main", "")).unwrap();
        match after {
            serde_json::Value::Null => {
                v.as_object_mut().unwrap().remove("after");
            }
            a => v["after"] = a,
        }
        v["deleted"] = json!(deleted);
        v.to_string().into_bytes()
    };
    let bad = [
        json!(null),
        json!(""),
        json!("x"),
        json!("a".repeat(39)),
        json!("a".repeat(41)),
        json!(format!("{}g", "a".repeat(39))),
        json!(1234),
    ];
    for (i, after) in bad.iter().enumerate() {
        let body = with_after(after.clone(), false);
        let delivery = format!("bad-after-{i}");
        let r = post(
            addr,
            "push",
            &delivery,
            Some(&sign(SECRET.as_bytes(), &body)),
            &body,
        )
        .await;
        assert_eq!(r.status, 400, "after {after}: {}", r.body);
        assert!(
            r.json()["error"].as_str().unwrap().contains("\"after\""),
            "after {after}: {}",
            r.body
        );
    }
    assert_eq!(build_count(&handle).await, 0);

    // A deleted branch needs no commit: 202, no build.
    for (i, after) in [json!(null), json!("0".repeat(40)), json!("")]
        .iter()
        .enumerate()
    {
        let body = with_after(after.clone(), true);
        let r = post(
            addr,
            "push",
            &format!("deleted-{i}"),
            Some(&sign(SECRET.as_bytes(), &body)),
            &body,
        )
        .await;
        assert_eq!(r.status, 202, "after {after}: {}", r.body);
        assert!(r.json()["build_id"].is_null(), "{}", r.body);
    }
    // All zeros means deleted even without `deleted: true`.
    let body = with_after(json!("0".repeat(40)), false);
    let r = post(
        addr,
        "push",
        "zeros",
        Some(&sign(SECRET.as_bytes(), &body)),
        &body,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(r.json()["build_id"].is_null(), "{}", r.body);
    assert_eq!(build_count(&handle).await, 0);

    // The rejected delivery, sent again with a commit, builds: the 400 recorded nothing.
    let sha = "0123456789abcdefABCDEF0123456789abcdef01";
    let body = with_after(json!(sha), false);
    let r = post(
        addr,
        "push",
        "bad-after-0",
        Some(&sign(SECRET.as_bytes(), &body)),
        &body,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(r.json()["build_id"].is_string(), "{}", r.body);
    assert_eq!(build_count(&handle).await, 1);
    handle.shutdown().await;
}
hive_testkit::on_both!(db => push_without_a_commit_is_rejected);

/// Repository URLs come from a body nobody has verified yet: the 401 answers (and the
/// log lines, which carry the same reason) echo at most 200 characters of them, cut on a
/// character boundary.
async fn long_repository_urls_are_cut_in_answers(url: String) {
    let handle = start(&url).await;
    let addr = handle.http_addr;
    api(&handle)
        .await
        .create_project(CreateProjectRequest {
            name: "widget".into(),
            repo_url: "https://github.example/acme/widget".into(),
            secret: SECRET.into(),
            steps: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    // Multi-byte characters, so a cut by bytes would split one.
    let long = format!("https://github.example/{}", "é".repeat(20_000));
    let check = |r: &common::HttpReply, status: u16| {
        assert_eq!(
            r.status,
            status,
            "{}",
            r.body.chars().take(500).collect::<String>()
        );
        let error = r.json()["error"].as_str().unwrap().to_string();
        assert!(
            error.chars().count() < 300,
            "{} chars",
            error.chars().count()
        );
        assert!(error.ends_with('…'), "{error}");
        assert!(error.contains("https://github.example/éé"), "{error}");
    };

    // No project: 401, as for a bad signature.
    let body = push(&long, "refs/heads/main", &"a".repeat(40));
    let r = post(
        addr,
        "push",
        "long-1",
        Some(&sign(SECRET.as_bytes(), &body)),
        &body,
    )
    .await;
    check(&r, 401);

    // A project found by another of the URLs, but the wrong key: 401 naming the first URL.
    let mut v: serde_json::Value = serde_json::from_slice(&push(
        "https://github.example/acme/widget",
        "refs/heads/main",
        &"a".repeat(40),
    ))
    .unwrap();
    v["repository"]["clone_url"] = json!(long);
    let body = v.to_string().into_bytes();
    let r = post(
        addr,
        "push",
        "long-2",
        Some(&sign(b"not the secret", &body)),
        &body,
    )
    .await;
    check(&r, 401);

    // A long event name on an organisation-level hook is cut too.
    let org = br#"{"zen":"x","hook_id":1}"#;
    let event = "e".repeat(5_000);
    let r = post(addr, &event, "long-3", Some(&sign(b"x", org)), org).await;
    assert_eq!(
        r.status,
        202,
        "{}",
        r.body.chars().take(500).collect::<String>()
    );
    assert!(r.body.len() < 400, "{}", r.body.len());
    handle.shutdown().await;
}
hive_testkit::on_both!(db => long_repository_urls_are_cut_in_answers);

/// Several projects on one repository (say, one per branch filter, or two pipelines) each get
/// their build from one push; each records the delivery under its own id scope, so a
/// redelivery is a duplicate for each of them and makes nothing new.
async fn several_projects_on_one_repository(url: String) {
    let handle = start(&url).await;
    let addr = handle.http_addr;
    let mut client = api(&handle).await;
    for (name, branch) in [("lint", ""), ("test", "main"), ("docs", "gh-pages")] {
        client
            .create_project(CreateProjectRequest {
                name: name.into(),
                repo_url: "https://github.example/acme/widget".into(),
                secret: SECRET.into(),
                branch: branch.into(),
                steps: vec!["true".into()],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let body = push(
        "https://github.example/acme/widget",
        "refs/heads/main",
        &"e".repeat(40),
    );
    let sig = sign(SECRET.as_bytes(), &body);
    let r = post(addr, "push", "multi-1", Some(&sig), &body).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let answer = r.json();
    assert_eq!(answer["duplicate"], false, "{answer}");
    assert_eq!(
        answer["project"], "lint",
        "the first project answers: {answer}"
    );
    let per: Vec<(String, bool)> = answer["projects"]
        .as_array()
        .expect("each project's result")
        .iter()
        .map(|p| {
            (
                p["project"].as_str().unwrap().to_string(),
                p["build_id"].is_string(),
            )
        })
        .collect();
    assert_eq!(
        per,
        vec![
            ("lint".to_string(), true),
            ("test".to_string(), true),
            ("docs".to_string(), false),
        ],
        "{answer}"
    );
    let builds = client
        .list_builds(ListBuildsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .builds;
    let mut names: Vec<&str> = builds.iter().map(|b| b.project_name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["lint", "test"]);

    // A redelivery is a duplicate for every project: no new build.
    let r = post(addr, "push", "multi-1", Some(&sig), &body).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["duplicate"], true, "{}", r.body);
    assert_eq!(r.json()["build_id"], answer["build_id"], "{}", r.body);
    assert_eq!(build_count(&handle).await, 2);
    handle.shutdown().await;
}
hive_testkit::on_both!(db => several_projects_on_one_repository);

/// A delivery id is scoped to its project: a delivery id one project has seen does not stop
/// another project's push with the same id (a sender signing for one project cannot suppress
/// another's builds by replaying its delivery ids).
async fn delivery_ids_are_scoped_to_their_project(url: String) {
    let handle = start(&url).await;
    let addr = handle.http_addr;
    let mut client = api(&handle).await;
    for (name, repo, secret) in [
        ("a", "https://github.example/acme/a", "secret-a"),
        ("b", "https://github.example/acme/b", "secret-b"),
    ] {
        client
            .create_project(CreateProjectRequest {
                name: name.into(),
                repo_url: repo.into(),
                secret: secret.into(),
                steps: vec!["true".into()],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let body_a = push(
        "https://github.example/acme/a",
        "refs/heads/main",
        &"1".repeat(40),
    );
    let body_b = push(
        "https://github.example/acme/b",
        "refs/heads/main",
        &"2".repeat(40),
    );
    let ra = post(
        addr,
        "push",
        "same-id",
        Some(&sign(b"secret-a", &body_a)),
        &body_a,
    )
    .await;
    let rb = post(
        addr,
        "push",
        "same-id",
        Some(&sign(b"secret-b", &body_b)),
        &body_b,
    )
    .await;
    assert_eq!(
        (ra.status, rb.status),
        (202, 202),
        "{} / {}",
        ra.body,
        rb.body
    );
    assert_eq!(ra.json()["duplicate"], false, "{}", ra.body);
    assert_eq!(rb.json()["duplicate"], false, "{}", rb.body);
    assert_ne!(ra.json()["build_id"], rb.json()["build_id"]);
    assert_eq!(rb.json()["project"], "b");
    assert_eq!(build_count(&handle).await, 2);
    handle.shutdown().await;
}
hive_testkit::on_both!(db => delivery_ids_are_scoped_to_their_project);

/// Many concurrent redeliveries of one delivery id make exactly one build.
async fn concurrent_redelivery(url: String) {
    let handle = start(&url).await;
    let mut client = api(&handle).await;
    client
        .create_project(CreateProjectRequest {
            name: "w".into(),
            repo_url: "https://github.example/acme/widget".into(),
            secret: SECRET.into(),
            steps: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let body = push(
        "https://github.example/acme/widget",
        "refs/heads/feature",
        &"c".repeat(40),
    );
    let sig = sign(SECRET.as_bytes(), &body);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (body, sig) = (body.clone(), sig.clone());
        let addr = handle.http_addr;
        tasks.push(tokio::spawn(async move {
            post(addr, "push", "same-delivery", Some(&sig), &body).await
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    let mut firsts = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        ids.insert(r.json()["build_id"].as_str().unwrap().to_string());
        if r.json()["duplicate"] == false {
            firsts += 1;
        }
    }
    assert_eq!(ids.len(), 1, "every answer names the same build");
    assert_eq!(firsts, 1, "exactly one answer made the build");
    assert_eq!(build_count(&handle).await, 1);
    handle.shutdown().await;
}
hive_testkit::on_both!(db => concurrent_redelivery);

/// Mutated and hostile bodies, correctly signed so they reach the deep parsing: every answer
/// is a clear 2xx/4xx with a reason, never a 5xx or a dropped connection, and the server
/// stays healthy. (A small deterministic fuzz; the seed makes failures reproducible.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_get_clear_answers() {
    let db = hive_testkit::TestDb::sqlite();
    let handle = start(&db.url).await;
    api(&handle)
        .await
        .create_project(CreateProjectRequest {
            name: "widget".into(),
            repo_url: "https://github.example/acme/widget".into(),
            secret: SECRET.into(),
            steps: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let base = push(
        "https://github.example/acme/widget",
        "refs/heads/main",
        &"d".repeat(40),
    );
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let hostile: Vec<Vec<u8>> = vec![
        br#"{"ref": 7, "repository": {"clone_url": "https://github.example/acme/widget"}}"#.to_vec(),
        br#"{"ref": "refs/heads/main", "repository": {"clone_url": 42}}"#.to_vec(),
        br#"{"ref": "refs/heads/main", "repository": "https://github.example/acme/widget"}"#
            .to_vec(),
        br#"{"ref": "refs/heads/main", "after": {"x": 1}, "deleted": "yes", "repository": {"html_url": "https://github.example/acme/widget"}}"#.to_vec(),
        br#"[1, 2, 3]"#.to_vec(),
        b"null".to_vec(),
        "\"\u{0}\"".as_bytes().to_vec(),
        format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
        vec![0xff, 0xfe, 0x00, 0x01],
        Vec::new(),
    ];
    let mut bodies = hostile;
    for _ in 0..150 {
        let mut b = base.clone();
        match next() % 3 {
            0 => {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            1 => b.truncate((next() as usize) % b.len()),
            _ => {
                let i = (next() as usize) % b.len();
                b.insert(i, b"{}[]\",:\\"[(next() as usize) % 8]);
            }
        }
        bodies.push(b);
    }
    for (i, body) in bodies.iter().enumerate() {
        let sig = sign(SECRET.as_bytes(), body);
        let delivery = format!("fuzz-{i}");
        let r = post(handle.http_addr, "push", &delivery, Some(&sig), body).await;
        assert!(
            matches!(r.status, 200 | 202 | 400 | 401 | 404),
            "body #{i} {:?}: status {} {}",
            String::from_utf8_lossy(&body[..body.len().min(200)]),
            r.status,
            r.body
        );
        if r.status >= 400 {
            assert!(
                r.json()["error"].as_str().is_some_and(|e| !e.is_empty()),
                "body #{i}: no reason given: {}",
                r.body
            );
        }
    }
    let h = http(handle.http_addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(h.status, 200);
    handle.shutdown().await;
}
