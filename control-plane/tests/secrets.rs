//! Issue 10: project secrets. Values go in and never come out of any API: they are stored
//! sealed (the database row does not hold the value), listed by name only, handed to the box
//! only inside the build's assignment, and gone with their project. Roles: operators set and
//! delete, read-only lists names. On SQLite and PostgreSQL.

mod common;

use std::time::Duration;

use common::{api, api_as, fake_box, pool, start};
use hive_proto::v1::control_message::Msg as CtlMsg;
use hive_proto::v1::{
    CreateProjectRequest, CreateTokenRequest, DeleteProjectRequest, DeleteSecretRequest,
    GetProjectRequest, ListAuditRequest, ListSecretsRequest, SetSecretRequest, SubmitBuildRequest,
};
use sqlx::Connection;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);
const VALUE: &str = "s3cr3t-v4lue-xyz";

hive_testkit::on_both!(db => secrets_go_in_and_only_the_build_gets_them);

async fn secrets_go_in_and_only_the_build_gets_them(url: String) {
    let h = start(&url).await;
    let mut admin = api(&h).await;
    admin
        .create_project(CreateProjectRequest {
            name: "web".into(),
            repo_url: "git://198.18.0.2/web.git".into(),
            secret: "s".into(),
            steps: vec!["make".into()],
            env: [("CI".to_string(), "1".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let token = |role: &str| {
        let mut admin = admin.clone();
        let role = role.to_string();
        async move {
            admin
                .create_token(CreateTokenRequest {
                    role,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .token
        }
    };
    let mut reader = api_as(&h, &token("read-only").await).await;
    let mut operator = api_as(&h, &token("operator").await).await;
    let set = |name: &str, value: &str| SetSecretRequest {
        project: "web".into(),
        name: name.into(),
        value: value.into(),
        ..Default::default()
    };

    // Roles: read-only may not set; an operator may.
    let e = reader
        .set_secret(set("API_TOKEN", VALUE))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let info = operator
        .set_secret(set("API_TOKEN", VALUE))
        .await
        .expect("operator sets a secret")
        .into_inner();
    assert_eq!(
        (info.project.as_str(), info.name.as_str()),
        ("web", "API_TOKEN")
    );
    // Bad names and values are refused, saying why.
    for (name, value, says) in [
        ("HIVE_EGRESS", VALUE, "HIVE_"),
        ("1X", VALUE, "environment variable"),
        ("A-B", VALUE, "environment variable"),
        ("SHORT", "abc", "4 bytes"),
    ] {
        let e = operator.set_secret(set(name, value)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}");
        assert!(e.message().contains(says), "{name}: {}", e.message());
    }
    let e = operator
        .set_secret(SetSecretRequest {
            project: "nope".into(),
            ..set("X", VALUE)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Names out, never values: not in ListSecrets, GetProject or the audit log.
    let listed = reader
        .list_secrets(ListSecretsRequest {
            project: "web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.secrets.len(), 1);
    let everywhere = format!(
        "{listed:?}{:?}{:?}",
        reader
            .get_project(GetProjectRequest {
                project: "web".into()
            })
            .await
            .unwrap()
            .into_inner(),
        admin
            .list_audit(ListAuditRequest { limit: 100 })
            .await
            .unwrap()
            .into_inner()
    );
    assert!(everywhere.contains("API_TOKEN"));
    assert!(
        !everywhere.contains(VALUE),
        "a secret value came out of the API"
    );

    // At rest: the row holds no value (nor its base64).
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT nonce, sealed FROM project_secrets")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(VALUE);
    assert!(!rows[0].1.contains(VALUE) && !rows[0].1.contains(&b64[..12]));

    // The build's assignment carries it (apart from env), and only that.
    let (mut b, _) = fake_box(&h, "box-1", vec![pool("small", 1, 2)]).await;
    admin
        .submit_build(SubmitBuildRequest {
            project: "web".into(),
            revision: "a".repeat(40),
            git_ref: "refs/heads/main".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let a = match b.next_non_ack(WAIT).await {
        Some(CtlMsg::Assign(a)) => a,
        other => panic!("expected an assignment, got {other:?}"),
    };
    assert_eq!(a.secrets.get("API_TOKEN").map(String::as_str), Some(VALUE));
    assert!(
        !a.env.contains_key("API_TOKEN"),
        "secrets ride apart from env"
    );

    // Deleted: gone from the list, and a second delete says there is none.
    let e = reader
        .delete_secret(DeleteSecretRequest {
            project: "web".into(),
            name: "API_TOKEN".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    operator
        .delete_secret(DeleteSecretRequest {
            project: "web".into(),
            name: "API_TOKEN".into(),
        })
        .await
        .unwrap();
    let e = operator
        .delete_secret(DeleteSecretRequest {
            project: "web".into(),
            name: "API_TOKEN".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // A deleted project takes its secrets with it.
    operator.set_secret(set("OTHER", VALUE)).await.unwrap();
    admin
        .delete_project(DeleteProjectRequest {
            project: "web".into(),
        })
        .await
        .unwrap();
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM project_secrets")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0);
    drop(conn);
    h.shutdown().await;
}

hive_testkit::on_both!(db => a_lost_secrets_key_stops_the_start_instead_of_dropping_secrets);

/// A control plane whose secrets key went missing does not make a new one over sealed secrets
/// (every build would silently run without them): it refuses to start, saying what to do.
async fn a_lost_secrets_key_stops_the_start_instead_of_dropping_secrets(url: String) {
    let dir = tempfile::tempdir().unwrap();
    let config = || hive_control_plane::server::Config {
        data_dir: dir.path().to_path_buf(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        box_addr: "127.0.0.1:0".parse().unwrap(),
        db: Some(url.clone()),
        ..Default::default()
    };
    let h = hive_control_plane::server::start(config()).await.unwrap();
    let mut admin = api(&h).await;
    admin
        .create_project(CreateProjectRequest {
            name: "k".into(),
            repo_url: "git://x/k.git".into(),
            steps: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .set_secret(SetSecretRequest {
            project: "k".into(),
            name: "T".into(),
            value: VALUE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    h.shutdown().await;
    std::fs::remove_file(dir.path().join("secrets.key")).unwrap();
    let e = hive_control_plane::server::start(config())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("secrets.key") && e.contains("restore"), "{e}");
    assert!(
        !dir.path().join("secrets.key").exists(),
        "the new key is set aside"
    );
}

hive_testkit::on_both!(db => webhook_secrets_are_sealed_at_rest_and_old_rows_sealed_at_start);

/// A push for `repo` signed with `key`: the webhook's answer status.
async fn push_status(h: &hive_control_plane::server::Handle, repo: &str, key: &str) -> u16 {
    let body = serde_json::json!({
        "ref": "refs/heads/main",
        "after": "b".repeat(40),
        "repository": { "clone_url": repo },
    })
    .to_string()
    .into_bytes();
    let delivery = uuid::Uuid::new_v4().to_string();
    common::push_signed(h.http_addr, key.as_bytes(), &delivery, &body)
        .await
        .status
}

/// The `projects` row of `name` as the database holds it: (secret, secret_nonce).
async fn stored_secret(url: &str, name: &str) -> (String, String) {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    sqlx::query_as("SELECT secret, secret_nonce FROM projects WHERE name = $1")
        .bind(name)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// Someone who reads the database (a backup, a replica, a leaked dump) learns no webhook
/// secret, so cannot forge pushes; rows an older version stored in plaintext are sealed at
/// the next start, once, and still verify.
async fn webhook_secrets_are_sealed_at_rest_and_old_rows_sealed_at_start(url: String) {
    const HOOK: &str = "whsec-Plain-Text-123";
    const REPO: &str = "https://git.example/acme/hooked";
    let h = start(&url).await;
    let mut admin = api(&h).await;
    admin
        .create_project(CreateProjectRequest {
            name: "hooked".into(),
            repo_url: REPO.into(),
            secret: HOOK.into(),
            steps: vec!["make".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let (stored, nonce) = stored_secret(&url, "hooked").await;
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(HOOK);
    assert!(
        !stored.contains(HOOK) && !stored.contains(&b64[..12]) && !nonce.is_empty(),
        "the database holds the webhook secret: {stored:?}"
    );
    // The webhook still verifies with it (opened into the project cache), and not without.
    assert_eq!(push_status(&h, REPO, HOOK).await, 202);
    assert_eq!(push_status(&h, REPO, "a guess").await, 401);
    let shown = admin
        .get_project(GetProjectRequest {
            project: "hooked".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!format!("{shown:?}").contains(HOOK), "{shown:?}");
    h.shutdown().await;

    // A row as a version before sealing left it: plaintext, no nonce.
    const OLD: &str = "legacy-hook-secret-456";
    {
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        sqlx::query("UPDATE projects SET secret = $1, secret_nonce = '' WHERE name = 'hooked'")
            .bind(OLD)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let h = start(&url).await;
    let (stored, nonce) = stored_secret(&url, "hooked").await;
    assert!(
        !stored.contains(OLD) && !nonce.is_empty(),
        "sealed at start: {stored:?}"
    );
    assert_eq!(
        push_status(&h, REPO, OLD).await,
        202,
        "the old secret still works"
    );
    // Idempotent: nothing left to seal.
    assert_eq!(h.store().seal_webhook_secrets().await.unwrap(), 0);

    // Two control planes sealing the same plaintext row at once: one writes it, the other
    // leaves it (on PostgreSQL these are two connections racing).
    {
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        sqlx::query("UPDATE projects SET secret = $1, secret_nonce = '' WHERE name = 'hooked'")
            .bind(OLD)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let (a, b) = tokio::join!(
        h.store().seal_webhook_secrets(),
        h.store().seal_webhook_secrets()
    );
    assert_eq!(a.unwrap() + b.unwrap(), 1, "sealed exactly once");
    assert_eq!(push_status(&h, REPO, OLD).await, 202);
    h.shutdown().await;
}

hive_testkit::on_both!(db => secrets_reach_only_builds_of_the_refs_they_are_for);

/// Anyone who can push a branch (or a tag, or ask for a build of one) must not get the
/// secrets meant for the protected branch: a secret reaches only builds whose ref its `refs`
/// allow, and a rebuild keeps its build's ref. By default a secret is for the project's
/// branch.
async fn secrets_reach_only_builds_of_the_refs_they_are_for(url: String) {
    use hive_proto::v1::RebuildBuildRequest;
    let h = start(&url).await;
    let mut admin = api(&h).await;
    admin
        .create_project(CreateProjectRequest {
            name: "rel".into(),
            repo_url: "git://198.18.0.2/rel.git".into(),
            branch: "main".into(),
            tags: "*".into(),
            steps: vec!["make".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let set = |name: &str, refs: &str| SetSecretRequest {
        project: "rel".into(),
        name: name.into(),
        value: format!("value-of-{name}"),
        refs: refs.into(),
    };
    let r = admin
        .set_secret(set("DEPLOY", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.refs, "main", "the default: the project's branch");
    admin.set_secret(set("WIDE", "*")).await.unwrap();
    admin
        .set_secret(set("RELEASE", "release/*,refs/tags/v*"))
        .await
        .unwrap();
    let e = admin.set_secret(set("BAD", "main,,x")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("empty"), "{}", e.message());
    let listed: Vec<(String, String)> = admin
        .list_secrets(ListSecretsRequest {
            project: "rel".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .secrets
        .into_iter()
        .map(|s| (s.name, s.refs))
        .collect();
    assert_eq!(
        listed,
        [
            ("DEPLOY".to_string(), "main".to_string()),
            ("RELEASE".into(), "release/*,refs/tags/v*".into()),
            ("WIDE".into(), "*".into())
        ]
    );

    let (mut b, _) = fake_box(&h, "box-1", vec![pool("small", 8, 8)]).await;
    let submit = |git_ref: &str| {
        let mut admin = admin.clone();
        let git_ref = git_ref.to_string();
        async move {
            admin
                .submit_build(SubmitBuildRequest {
                    project: "rel".into(),
                    revision: "c".repeat(40),
                    git_ref,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .id
        }
    };
    let cases = [
        ("refs/heads/main", vec!["DEPLOY", "WIDE"]),
        ("refs/heads/feature", vec!["WIDE"]),
        // A tag named like the protected branch is not the branch.
        ("refs/tags/main", vec!["WIDE"]),
        ("refs/heads/release/2.0", vec!["RELEASE", "WIDE"]),
        ("refs/tags/v1.0", vec!["RELEASE", "WIDE"]),
    ];
    let mut want = std::collections::HashMap::new();
    for (git_ref, names) in &cases {
        want.insert(submit(git_ref).await, (git_ref.to_string(), names.clone()));
    }
    let feature = want
        .iter()
        .find(|(_, (r, _))| r == "refs/heads/feature")
        .map(|(id, _)| id.clone())
        .unwrap();
    let rebuilt = admin
        .rebuild_build(RebuildBuildRequest { id: feature })
        .await
        .unwrap()
        .into_inner()
        .id;
    want.insert(
        rebuilt,
        ("rebuild of refs/heads/feature".into(), vec!["WIDE"]),
    );
    let mut seen = std::collections::HashMap::new();
    while seen.len() < want.len() {
        match b.next_non_ack(WAIT).await {
            Some(CtlMsg::Assign(a)) => {
                let mut names: Vec<String> = a.secrets.keys().cloned().collect();
                names.sort();
                for (k, v) in &a.secrets {
                    assert_eq!(v, &format!("value-of-{k}"));
                }
                seen.insert(a.build_id, names);
            }
            Some(_) => {}
            None => panic!("only {} of {} builds were assigned", seen.len(), want.len()),
        }
    }
    for (id, (git_ref, names)) in want {
        assert_eq!(seen[&id], names, "secrets given to a build of {git_ref}");
    }
    h.shutdown().await;
}
