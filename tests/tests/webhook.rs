//! The webhook end to end: the real `hive-control-plane` binary, projects added with the real
//! `hivectl`, GitHub-shaped deliveries over real HTTP, results read back with `hivectl --json`.
//! Every test runs on SQLite and on PostgreSQL (`HIVE_TEST_POSTGRES_URL`, else loudly skipped).

use hive_tests::controlplane::{Backend, ControlPlaneOptions, TestHive};
use hive_tests::github::{ping_payload, push_payload, send_raw, sign, Delivery, WebhookClient};
use serde_json::Value;

const REPO: &str = "http://198.18.0.2/demo.git";
const SECRET: &str = "It's a Secret to Everybody";
const SHA: &str = "9fceb02d0ae598e95dc970b74767f19372d61af8";

hive_testkit::on_both!(
    push_makes_one_queued_build_and_redelivery_reuses_it,
    bad_input_is_refused_and_changes_nothing,
    ping_branch_filter_deleted_branch_and_other_events_make_no_build,
    repository_urls_match_in_every_form,
    readme_minimal_push_health_and_metrics,
    concurrent_redeliveries_make_one_build,
);

/// Runs hivectl, asserts exit 0, parses stdout as JSON.
fn ctl_json(h: &TestHive, args: &[&str]) -> Value {
    let mut full = args.to_vec();
    full.push("--json");
    let out = h.cp.hivectl(&full).expect("run hivectl");
    assert!(
        out.status.success(),
        "hivectl {args:?} failed ({}): {}\ncontrol plane log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        h.cp.log()
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "hivectl {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn add_project(h: &TestHive, name: &str, repo: &str, branch: Option<&str>) {
    let mut args = vec![
        "project",
        "add",
        name,
        "--repo",
        repo,
        "--secret",
        SECRET,
        "--step",
        "make",
        "--step",
        "make test",
    ];
    if let Some(b) = branch {
        args.extend(["--branch", b]);
    }
    let p = ctl_json(h, &args);
    assert_eq!(p["name"], name);
    assert_eq!(p["has_secret"], true);
}

/// `curl` a signed push, as the README does; returns status and body.
fn curl_push(h: &TestHive, delivery: &str, body: &[u8]) -> hive_tests::github::Answer {
    let file = h.cp.data_dir.join(format!("push-{delivery}.json"));
    std::fs::write(&file, body).expect("write payload");
    let out = std::process::Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "-X", "POST"])
        .args(["-H", "Content-Type: application/json"])
        .args(["-H", "X-GitHub-Event: push"])
        .args(["-H", &format!("X-GitHub-Delivery: {delivery}")])
        .args([
            "-H",
            &format!("X-Hub-Signature-256: {}", sign(SECRET, body)),
        ])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(h.cp.webhook_url())
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text
        .rsplit_once('\n')
        .expect("curl -w adds the status line");
    hive_tests::github::Answer {
        status: code.trim().parse().expect("status code"),
        body: body.to_string(),
    }
}

fn builds(h: &TestHive) -> Vec<Value> {
    ctl_json(h, &["builds"])
        .as_array()
        .cloned()
        .expect("builds --json is an array")
}

async fn push_makes_one_queued_build_and_redelivery_reuses_it(backend: Backend) {
    let Some(h) = TestHive::start(
        backend,
        "push_makes_one_queued_build",
        ControlPlaneOptions::default(),
    )
    .await
    else {
        return;
    };
    add_project(&h, "demo", REPO, Some("main"));
    let client = WebhookClient::new();
    let body = push_payload(REPO, "refs/heads/main", SHA, false);
    // The first delivery goes out with curl, exactly as the README shows it.
    let a = curl_push(&h, "delivery-1", &body);
    assert_eq!(a.status, 202, "push answer: {}", a.body);
    let build_id = a.json()["build_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no build_id in {}", a.body))
        .to_string();

    let bs = builds(&h);
    assert_eq!(bs.len(), 1, "{bs:?}");
    assert_eq!(bs[0]["id"], build_id.as_str());
    assert_eq!(bs[0]["state"], "queued");
    assert_eq!(bs[0]["project"], "demo");
    assert_eq!(bs[0]["revision"], SHA);
    assert_eq!(bs[0]["ref"], "refs/heads/main");
    assert_eq!(bs[0]["trigger"], "webhook:delivery-1");

    // The same delivery again (GitHub's "Redeliver"): same build, no second one.
    let again = client
        .send_signed(&h.cp.webhook_url(), SECRET, "push", "delivery-1", body)
        .await
        .expect("redeliver");
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(again.json()["build_id"], build_id.as_str());
    assert_eq!(again.json()["duplicate"], true);
    assert_eq!(builds(&h).len(), 1);

    // A new delivery of another push makes a second build.
    let other = client
        .send_signed(
            &h.cp.webhook_url(),
            SECRET,
            "push",
            "delivery-2",
            push_payload(
                REPO,
                "refs/heads/main",
                "1111111111111111111111111111111111111111",
                false,
            ),
        )
        .await
        .expect("second push");
    assert_eq!(other.status, 202, "{}", other.body);
    assert_ne!(other.json()["build_id"], build_id.as_str());
    assert_eq!(builds(&h).len(), 2);

    // Also visible one by one, and the store survives a restart with both.
    let one = ctl_json(&h, &["build", &build_id]);
    assert_eq!(one["state"], "queued");
    let h = h.restart().await;
    assert_eq!(builds(&h).len(), 2);
    h.finish().await;
}

async fn bad_input_is_refused_and_changes_nothing(backend: Backend) {
    let Some(h) = TestHive::start(
        backend,
        "bad_input_is_refused",
        ControlPlaneOptions::default(),
    )
    .await
    else {
        return;
    };
    add_project(&h, "demo", REPO, None);
    let client = WebhookClient::new();
    let url = h.cp.webhook_url();
    let body = push_payload(REPO, "refs/heads/main", SHA, false);

    let cases: Vec<(&str, Delivery<'_>, u16)> = vec![
        (
            "missing signature",
            Delivery {
                event: "push",
                delivery_id: "d-nosig",
                signature: None,
                body: body.clone(),
            },
            401,
        ),
        (
            "signature with the wrong secret",
            Delivery {
                event: "push",
                delivery_id: "d-badsig",
                signature: Some(sign("not the secret", &body)),
                body: body.clone(),
            },
            401,
        ),
        (
            "signature of another body",
            Delivery {
                event: "push",
                delivery_id: "d-tampered",
                signature: Some(sign(SECRET, b"{}")),
                body: body.clone(),
            },
            401,
        ),
        (
            "malformed signature header",
            Delivery {
                event: "push",
                delivery_id: "d-malformed-sig",
                signature: Some("sha256=zz".to_string()),
                body: body.clone(),
            },
            401,
        ),
        (
            "garbage JSON (validly signed)",
            Delivery {
                event: "push",
                delivery_id: "d-garbage",
                signature: Some(sign(SECRET, b"{not json")),
                body: b"{not json".to_vec(),
            },
            400,
        ),
        (
            "body over 5 MiB",
            Delivery {
                event: "push",
                delivery_id: "d-huge",
                signature: Some(sign(SECRET, &vec![b' '; 5 * 1024 * 1024 + 1])),
                body: vec![b' '; 5 * 1024 * 1024 + 1],
            },
            413,
        ),
        (
            // Answered as a bad signature, so the webhook does not reveal what is registered.
            "unknown repository",
            Delivery {
                event: "push",
                delivery_id: "d-unknown",
                signature: Some(sign(
                    SECRET,
                    &push_payload("http://198.18.0.2/other.git", "refs/heads/main", SHA, false),
                )),
                body: push_payload("http://198.18.0.2/other.git", "refs/heads/main", SHA, false),
            },
            401,
        ),
    ];
    for (what, d, want) in &cases {
        let a = if *want == 413 {
            send_raw(&h.cp.http_addr, d)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"))
        } else {
            client
                .send(&url, d)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"))
        };
        assert_eq!(a.status, *want, "{what}: answer {}", a.body);
        assert!(
            a.json()["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: the answer should say why: {}",
            a.body
        );
    }
    assert!(builds(&h).is_empty(), "a refused delivery made a build");

    // A refused delivery id is not burnt: the genuine delivery with that id still works.
    let a = client
        .send_signed(&url, SECRET, "push", "d-badsig", body)
        .await
        .expect("genuine");
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(builds(&h).len(), 1);
    h.finish().await;
}

async fn ping_branch_filter_deleted_branch_and_other_events_make_no_build(backend: Backend) {
    let Some(h) = TestHive::start(
        backend,
        "ping_branch_filter",
        ControlPlaneOptions::default(),
    )
    .await
    else {
        return;
    };
    add_project(&h, "demo", REPO, Some("main"));
    let client = WebhookClient::new();
    let url = h.cp.webhook_url();

    let ping = client
        .send_signed(&url, SECRET, "ping", "p-1", ping_payload(REPO))
        .await
        .expect("ping");
    assert_eq!(ping.status, 200, "{}", ping.body);

    let other_branch = client
        .send_signed(
            &url,
            SECRET,
            "push",
            "p-2",
            push_payload(REPO, "refs/heads/feature", SHA, false),
        )
        .await
        .expect("push to another branch");
    assert_eq!(other_branch.status, 202, "{}", other_branch.body);
    assert!(
        other_branch.json()["build_id"].is_null(),
        "{}",
        other_branch.body
    );

    let deleted = client
        .send_signed(
            &url,
            SECRET,
            "push",
            "p-3",
            push_payload(
                REPO,
                "refs/heads/main",
                "0000000000000000000000000000000000000000",
                true,
            ),
        )
        .await
        .expect("deleted branch");
    assert_eq!(deleted.status, 202, "{}", deleted.body);
    assert!(deleted.json()["build_id"].is_null(), "{}", deleted.body);

    let tag = client
        .send_signed(
            &url,
            SECRET,
            "push",
            "p-4",
            push_payload(REPO, "refs/tags/v1", SHA, false),
        )
        .await
        .expect("tag push");
    assert!(
        tag.json()["build_id"].is_null(),
        "tag push made a build: {}",
        tag.body
    );

    let issues = client
        .send_signed(
            &url,
            SECRET,
            "issues",
            "p-5",
            br#"{"action":"opened","repository":{"clone_url":"http://198.18.0.2/demo.git"}}"#
                .to_vec(),
        )
        .await
        .expect("issues event");
    assert_eq!(issues.status, 202, "{}", issues.body);
    assert!(issues.json()["build_id"].is_null(), "{}", issues.body);

    assert!(
        builds(&h).is_empty(),
        "no delivery above should make a build: {:?}",
        builds(&h)
    );

    // The push that matches does.
    let main = client
        .send_signed(
            &url,
            SECRET,
            "push",
            "p-6",
            push_payload(REPO, "refs/heads/main", SHA, false),
        )
        .await
        .expect("push to main");
    assert_eq!(main.status, 202, "{}", main.body);
    assert_eq!(builds(&h).len(), 1);
    h.finish().await;
}

async fn repository_urls_match_in_every_form(backend: Backend) {
    let Some(h) = TestHive::start(
        backend,
        "repository_urls_match",
        ControlPlaneOptions::default(),
    )
    .await
    else {
        return;
    };
    // Registered without `.git` and with a trailing slash; the payload carries the `.git` form.
    add_project(&h, "slashy", "http://198.18.0.2/slashy/", None);
    let client = WebhookClient::new();
    let a = client
        .send_signed(
            &h.cp.webhook_url(),
            SECRET,
            "push",
            "u-1",
            push_payload("http://198.18.0.2/slashy.git", "refs/heads/dev", SHA, false),
        )
        .await
        .expect("push");
    assert_eq!(a.status, 202, "{}", a.body);
    let bs = builds(&h);
    assert_eq!(bs.len(), 1, "{bs:?}");
    assert_eq!(bs[0]["project"], "slashy");

    // Registered by its ssh URL: the payload's ssh_url matches.
    add_project(
        &h,
        "by-ssh",
        "git@example.test:hive-tests/sshrepo.git",
        None,
    );
    let a = client
        .send_signed(
            &h.cp.webhook_url(),
            SECRET,
            "push",
            "u-2",
            push_payload(
                "https://example.test/hive-tests/sshrepo.git",
                "refs/heads/x",
                SHA,
                false,
            ),
        )
        .await
        .expect("push");
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.json()["project"], "by-ssh", "{}", a.body);
    h.finish().await;
}

/// The README's hand-made payload (only ref, after, repository.clone_url) works as shown, and
/// the health and metrics endpoints answer.
async fn readme_minimal_push_health_and_metrics(backend: Backend) {
    let Some(h) = TestHive::start(
        backend,
        "readme_minimal_push",
        ControlPlaneOptions::default(),
    )
    .await
    else {
        return;
    };
    let repo = "git://198.18.0.2/demo.git";
    let out =
        h.cp.hivectl(&[
            "project",
            "add",
            "demo",
            "--repo",
            repo,
            "--secret",
            "s3cret",
            "--step",
            "echo hello from hive",
            "--step",
            "make test",
        ])
        .expect("hivectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = format!(
        r#"{{"ref":"refs/heads/main","after":"{SHA}","repository":{{"clone_url":"{repo}"}}}}"#
    );
    let client = WebhookClient::new();
    let a = client
        .send_signed(
            &h.cp.webhook_url(),
            "s3cret",
            "push",
            "readme-1",
            body.into_bytes(),
        )
        .await
        .expect("push");
    assert!(a.status / 100 == 2, "{} {}", a.status, a.body);
    assert!(a.json()["build_id"].is_string(), "{}", a.body);
    let bs = builds(&h);
    assert_eq!(bs.len(), 1);
    assert_eq!(bs[0]["state"], "queued");

    let health = client
        .get(&format!("http://{}/healthz", h.cp.http_addr))
        .await
        .expect("healthz");
    assert_eq!(health.status, 200, "{}", health.body);
    let metrics = client
        .get(&format!("http://{}/metrics", h.cp.http_addr))
        .await
        .expect("metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.lines().any(|l| l.starts_with("# TYPE ")),
        "not Prometheus text: {}",
        metrics.body
    );
    h.finish().await;
}

/// The same delivery arriving several times at once (a git host retrying on a slow answer)
/// still makes exactly one build: the dedupe holds under a race, not only in sequence.
async fn concurrent_redeliveries_make_one_build(backend: Backend) {
    let Some(h) = TestHive::start(
        backend,
        "concurrent_redeliveries",
        ControlPlaneOptions::default(),
    )
    .await
    else {
        return;
    };
    add_project(&h, "demo", REPO, None);
    let client = WebhookClient::new();
    let body = push_payload(REPO, "refs/heads/main", SHA, false);
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let client = client.clone();
        let url = h.cp.webhook_url();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            client
                .send_signed(&url, SECRET, "push", "same-delivery", body)
                .await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let a = t.await.expect("task").expect("send");
        assert_eq!(a.status, 202, "{}", a.body);
        ids.insert(a.json()["build_id"].as_str().expect("build id").to_string());
    }
    assert_eq!(ids.len(), 1, "one delivery, several builds: {ids:?}");
    assert_eq!(builds(&h).len(), 1);
    h.finish().await;
}
