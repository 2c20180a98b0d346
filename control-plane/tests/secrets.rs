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
