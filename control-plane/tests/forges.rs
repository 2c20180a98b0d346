//! Issue 14, the forges' webhooks over real HTTP against a real database (SQLite file;
//! PostgreSQL when `HIVE_TEST_POSTGRES_URL` is set): GitHub's form-encoded deliveries (its
//! default content type), Gitea and Forgejo (`/webhooks/gitea`, a bare hex HMAC) and GitLab
//! (`/webhooks/gitlab`, the secret as a token), each with the same contract as GitHub's JSON
//! deliveries: a verified push makes one build, a redelivery none, a wrong proof or an unknown
//! repository the same 401.

mod common;

use common::{api, http, start, HttpReply};
use hive_control_plane::http::webhook::sign;
use hive_proto::v1::{CreateProjectRequest, GetBuildRequest, ListBuildsRequest};
use serde_json::{json, Value};

const SECRET: &str = "forge-secret";

async fn setup(url: &str) -> hive_control_plane::server::Handle {
    let handle = start(url).await;
    api(&handle)
        .await
        .create_project(CreateProjectRequest {
            name: "widget".into(),
            repo_url: "https://git.example/acme/widget.git".into(),
            secret: SECRET.into(),
            branch: "main".into(),
            steps: vec!["make".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    handle
}

async fn post(
    handle: &hive_control_plane::server::Handle,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpReply {
    http(handle.http_addr, "POST", path, headers, body).await
}

async fn trigger_of(handle: &hive_control_plane::server::Handle, reply: &HttpReply) -> String {
    let id = reply.json()["build_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no build: {}", reply.body))
        .to_string();
    api(handle)
        .await
        .get_build(GetBuildRequest { id })
        .await
        .unwrap()
        .into_inner()
        .trigger
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

fn github_push(after: &str) -> Value {
    json!({
        "ref": "refs/heads/main",
        "after": after,
        "repository": {
            "clone_url": "https://git.example/acme/widget.git",
            "ssh_url": "git@git.example:acme/widget.git",
        },
    })
}

/// GitHub's default content type: `payload=<urlencoded JSON>`, signed over the raw body.
async fn github_form_encoded_deliveries_build(url: String) {
    let handle = setup(&url).await;
    let json = github_push(&"a".repeat(40)).to_string();
    let body: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", &json)
        .finish();
    let send = |sig: String, body: Vec<u8>| {
        let handle = &handle;
        async move {
            post(
                handle,
                "/webhooks/github",
                &[
                    ("Content-Type", "application/x-www-form-urlencoded"),
                    ("X-GitHub-Event", "push"),
                    ("X-GitHub-Delivery", "form-1"),
                    ("X-Hub-Signature-256", &sig),
                ],
                &body,
            )
            .await
        }
    };
    let r = send(
        sign(SECRET.as_bytes(), body.as_bytes()),
        body.clone().into_bytes(),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(trigger_of(&handle, &r).await, "webhook:form-1");
    // The signature is over the raw form body, not the JSON inside it.
    let r = send(
        sign(SECRET.as_bytes(), json.as_bytes()),
        body.clone().into_bytes(),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);
    // A form without a payload field is malformed.
    let empty = b"other=1".to_vec();
    let r = send(sign(SECRET.as_bytes(), &empty), empty).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("no payload field"), "{}", r.body);
    assert_eq!(build_count(&handle).await, 1);
    handle.shutdown().await;
}
hive_testkit::on_both!(db => github_form_encoded_deliveries_build);

fn hex_sig(body: &[u8]) -> String {
    sign(SECRET.as_bytes(), body)
        .strip_prefix("sha256=")
        .unwrap()
        .to_string()
}

/// Gitea and Forgejo: `X-Gitea-*` or `X-Forgejo-*` headers, a bare hex HMAC.
async fn gitea_and_forgejo_pushes_build(url: String) {
    let handle = setup(&url).await;
    let body = github_push(&"b".repeat(40)).to_string().into_bytes();
    let sig = hex_sig(&body);
    let r = post(
        &handle,
        "/webhooks/gitea",
        &[
            ("Content-Type", "application/json"),
            ("X-Gitea-Event", "push"),
            ("X-Gitea-Delivery", "g-1"),
            ("X-Gitea-Signature", &sig),
        ],
        &body,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(trigger_of(&handle, &r).await, "webhook-gitea:g-1");
    // A redelivery: the same build.
    let again = post(
        &handle,
        "/webhooks/gitea",
        &[
            ("X-Gitea-Event", "push"),
            ("X-Gitea-Delivery", "g-1"),
            ("X-Gitea-Signature", &sig),
        ],
        &body,
    )
    .await;
    assert_eq!(again.json()["duplicate"], true, "{}", again.body);
    // Forgejo names the headers after itself.
    let body2 = github_push(&"c".repeat(40)).to_string().into_bytes();
    let r = post(
        &handle,
        "/webhooks/gitea",
        &[
            ("X-Forgejo-Event", "push"),
            ("X-Forgejo-Delivery", "f-1"),
            ("X-Forgejo-Signature", &hex_sig(&body2)),
        ],
        &body2,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    // Wrong key, GitHub's form of signature, none at all.
    for (sig, needle) in [
        ("0".repeat(64), "signature does not match"),
        (sign(SECRET.as_bytes(), &body), "is not 64 hex digits"),
    ] {
        let r = post(
            &handle,
            "/webhooks/gitea",
            &[
                ("X-Gitea-Event", "push"),
                ("X-Gitea-Delivery", "g-2"),
                ("X-Gitea-Signature", &sig),
            ],
            &body,
        )
        .await;
        assert_eq!(r.status, 401, "{}", r.body);
        assert!(r.body.contains(needle), "{}", r.body);
    }
    let r = post(
        &handle,
        "/webhooks/gitea",
        &[("X-Gitea-Event", "push"), ("X-Gitea-Delivery", "g-3")],
        &body,
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("missing X-Gitea-Signature"), "{}", r.body);
    assert_eq!(build_count(&handle).await, 2);
    handle.shutdown().await;
}
hive_testkit::on_both!(db => gitea_and_forgejo_pushes_build);

fn gitlab_push(kind: &str, git_ref: &str, after: &str, project_path: &str) -> Vec<u8> {
    json!({
        "object_kind": kind,
        "ref": git_ref,
        "before": "0".repeat(40),
        "after": after,
        "checkout_sha": after,
        "project": {
            "path_with_namespace": project_path,
            "git_http_url": format!("https://git.example/{project_path}.git"),
            "git_ssh_url": format!("git@git.example:{project_path}.git"),
            "web_url": format!("https://git.example/{project_path}"),
        },
    })
    .to_string()
    .into_bytes()
}

/// GitLab: `X-Gitlab-Token` is the secret itself; `Push Hook` builds, `Tag Push Hook` of a
/// tag does not (the project builds branch main); without an event UUID the body dedupes.
async fn gitlab_pushes_build(url: String) {
    let handle = setup(&url).await;
    let body = gitlab_push("push", "refs/heads/main", &"d".repeat(40), "Acme/Widget");
    let r = post(
        &handle,
        "/webhooks/gitlab",
        &[
            ("Content-Type", "application/json"),
            ("X-Gitlab-Event", "Push Hook"),
            ("Idempotency-Key", "u-1"),
            ("X-Gitlab-Token", SECRET),
        ],
        &body,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(trigger_of(&handle, &r).await, "webhook-gitlab:u-1");

    // No UUID (older GitLab): the body's hash is the delivery id, so a redelivery dedupes.
    let body2 = gitlab_push("push", "refs/heads/main", &"e".repeat(40), "acme/widget");
    let send = |token: &'static str, body: Vec<u8>| {
        let handle = &handle;
        async move {
            post(
                handle,
                "/webhooks/gitlab",
                &[("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Token", token)],
                &body,
            )
            .await
        }
    };
    let first = send(SECRET, body2.clone()).await;
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(first.json()["duplicate"], false);
    let again = send(SECRET, body2.clone()).await;
    assert_eq!(again.json()["duplicate"], true, "{}", again.body);
    assert_eq!(again.json()["build_id"], first.json()["build_id"]);

    // A wrong token and an unknown repository get the same answer.
    let wrong = send("not-the-secret", body2.clone()).await;
    let unknown = send(
        SECRET,
        gitlab_push("push", "refs/heads/main", &"f".repeat(40), "acme/other"),
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(unknown.status, 401);
    assert_eq!(
        wrong.json()["error"]
            .as_str()
            .unwrap()
            .split(" for ")
            .next(),
        unknown.json()["error"]
            .as_str()
            .unwrap()
            .split(" for ")
            .next()
    );

    // One push of a branch and a tag: two hooks sharing an event UUID, both handled (the
    // UUID alone is not a delivery id).
    let shared = [
        ("X-Gitlab-Event", "Push Hook"),
        ("X-Gitlab-Event-UUID", "same-push"),
        ("X-Gitlab-Token", SECRET),
    ];
    let a = post(
        &handle,
        "/webhooks/gitlab",
        &shared,
        &gitlab_push("push", "refs/heads/main", &"7".repeat(40), "acme/widget"),
    )
    .await;
    let b = post(
        &handle,
        "/webhooks/gitlab",
        &shared,
        &gitlab_push("push", "refs/heads/main", &"8".repeat(40), "acme/widget"),
    )
    .await;
    assert_eq!(a.json()["duplicate"], false, "{}", a.body);
    assert_eq!(b.json()["duplicate"], false, "{}", b.body);
    assert_ne!(a.json()["build_id"], b.json()["build_id"]);

    // A tag push and a deleted branch make no build.
    let tag = post(
        &handle,
        "/webhooks/gitlab",
        &[
            ("X-Gitlab-Event", "Tag Push Hook"),
            ("X-Gitlab-Event-UUID", "u-tag"),
            ("X-Gitlab-Token", SECRET),
        ],
        &gitlab_push("tag_push", "refs/tags/v1", &"1".repeat(40), "acme/widget"),
    )
    .await;
    assert_eq!(tag.status, 202, "{}", tag.body);
    assert!(tag.json()["build_id"].is_null(), "{}", tag.body);
    let deleted = post(
        &handle,
        "/webhooks/gitlab",
        &[
            ("X-Gitlab-Event", "Push Hook"),
            ("X-Gitlab-Event-UUID", "u-del"),
            ("X-Gitlab-Token", SECRET),
        ],
        &gitlab_push("push", "refs/heads/main", &"0".repeat(40), "acme/widget"),
    )
    .await;
    assert_eq!(deleted.status, 202, "{}", deleted.body);
    assert!(deleted.json()["build_id"].is_null(), "{}", deleted.body);
    // Other hooks are answered and ignored; a missing event header is malformed.
    let other = post(
        &handle,
        "/webhooks/gitlab",
        &[("X-Gitlab-Event", "Issue Hook"), ("X-Gitlab-Token", SECRET)],
        &body,
    )
    .await;
    assert_eq!(other.status, 202, "{}", other.body);
    let none = post(
        &handle,
        "/webhooks/gitlab",
        &[("X-Gitlab-Token", SECRET)],
        &body,
    )
    .await;
    assert_eq!(none.status, 400, "{}", none.body);
    assert!(
        none.body.contains("missing X-Gitlab-Event"),
        "{}",
        none.body
    );
    assert_eq!(build_count(&handle).await, 4);
    handle.shutdown().await;
}
hive_testkit::on_both!(db => gitlab_pushes_build);

/// Tag builds and branch globs: a project builds the tags its `tags` glob takes and the
/// branches its `branch` glob takes; the rest are answered with why there is no build.
async fn tags_and_branch_globs_choose_what_builds(url: String) {
    let handle = start(&url).await;
    let mut client = api(&handle).await;
    client
        .create_project(CreateProjectRequest {
            name: "rel".into(),
            repo_url: "https://git.example/acme/rel.git".into(),
            secret: SECRET.into(),
            branch: "release/*".into(),
            tags: "v*".into(),
            steps: vec!["make".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let shown = client
        .get_project(hive_proto::v1::GetProjectRequest {
            project: "rel".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (shown.branch.as_str(), shown.tags.as_str()),
        ("release/*", "v*")
    );
    let mut n = 0;
    let mut push = |git_ref: &'static str| {
        n += 1;
        let delivery = format!("t-{n}");
        let body = json!({
            "ref": git_ref,
            "after": format!("{n:040x}"),
            "repository": { "clone_url": "https://git.example/acme/rel.git" },
        })
        .to_string()
        .into_bytes();
        let sig = sign(SECRET.as_bytes(), &body);
        let handle = &handle;
        async move {
            post(
                handle,
                "/webhooks/github",
                &[
                    ("X-GitHub-Event", "push"),
                    ("X-GitHub-Delivery", &delivery),
                    ("X-Hub-Signature-256", &sig),
                ],
                &body,
            )
            .await
        }
    };
    for (git_ref, builds, why) in [
        ("refs/heads/release/1.2", true, ""),
        ("refs/tags/v1.0", true, ""),
        ("refs/heads/main", false, "builds branch \"release/*\""),
        (
            "refs/tags/nightly",
            false,
            "builds tags \"v*\", not refs/tags/nightly",
        ),
        ("refs/notes/x", false, "neither a branch nor a tag"),
    ] {
        let r = push(git_ref).await;
        assert_eq!(r.status, 202, "{git_ref}: {}", r.body);
        if builds {
            let id = r.json()["build_id"].as_str().unwrap().to_string();
            let b = api(&handle)
                .await
                .get_build(GetBuildRequest { id })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(b.git_ref, git_ref);
        } else {
            assert!(r.json()["build_id"].is_null(), "{git_ref}: {}", r.body);
            let message = r.json()["message"].as_str().unwrap_or_default().to_string();
            assert!(message.contains(why), "{git_ref}: {message}");
        }
    }
    // A glob must still make a ref name.
    for (branch, tags) in [("a..*", ""), ("", "v[1"), ("", "x.lock")] {
        let e = client
            .create_project(CreateProjectRequest {
                name: "bad".into(),
                repo_url: "https://git.example/acme/bad.git".into(),
                branch: branch.into(),
                tags: tags.into(),
                steps: vec!["make".into()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::InvalidArgument,
            "{branch:?} {tags:?}"
        );
        assert!(
            e.message().contains("is not a git ref name"),
            "{}",
            e.message()
        );
    }
    handle.shutdown().await;
}
hive_testkit::on_both!(db => tags_and_branch_globs_choose_what_builds);
