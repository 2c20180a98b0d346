//! The attack suite of issue 10 (operator side), against real databases (SQLite file;
//! PostgreSQL with `HIVE_TEST_POSTGRES_URL`) over real gRPC and HTTP:
//! - every `hive.v1.ControlPlane` RPC without a token, with a malformed one and with an unknown
//!   one is UNAUTHENTICATED, and says what to do;
//! - each role beyond its rights is PERMISSION_DENIED and changes nothing; within them it gets
//!   past the check; a submitter bound to a project touches only that project's builds;
//! - a revoked token is refused from the next call on;
//! - no API call returns a project's env values, to any role;
//! - a webhook for an unregistered repository is answered exactly like a bad signature;
//! - changes land in the audit log with who made them, and the first admin token is made once.
//!
//! The expected role of each RPC is written out here, apart from the control plane's own
//! table, and checked against the RPCs the proto declares, so a new RPC without a decision here
//! fails this suite.

mod common;

use std::collections::BTreeSet;

use common::{api, api_as, http, start, Api};
use hive_proto::v1 as pb;
use prost::Message;
use tonic::{Code, Status};

/// The least role each RPC needs: 0 read-only, 1 submitter, 2 operator, 3 admin.
const RPCS: &[(&str, usize)] = &[
    ("Health", 0),
    ("ListProjects", 0),
    ("GetProject", 0),
    ("GetBuild", 0),
    ("ListBuilds", 0),
    ("WatchBuild", 0),
    ("StreamLogs", 0),
    ("ListArtifacts", 0),
    ("GetArtifact", 0),
    ("ListBoxes", 0),
    ("ListCells", 0),
    ("ListSizeClasses", 0),
    ("ListNetworks", 0),
    ("ListConnectors", 0),
    ("ListSecrets", 0),
    ("SubmitBuild", 1),
    ("RebuildBuild", 1),
    ("CancelBuild", 1),
    ("CreateProject", 2),
    ("DeleteProject", 2),
    ("CordonBox", 2),
    ("DrainBox", 2),
    ("UncordonBox", 2),
    ("ForgetBox", 2),
    ("SetSecret", 2),
    ("DeleteSecret", 2),
    ("CloneAccess", 2),
    ("ForgeStatus", 2),
    ("ListTunnelLeases", 2),
    ("CreateNetwork", 3),
    ("DeleteNetwork", 3),
    ("AddConnector", 3),
    ("RemoveConnector", 3),
    ("CreateJoinToken", 3),
    ("ListJoinTokens", 3),
    ("RevokeJoinToken", 3),
    ("RevokeBox", 3),
    ("CreateToken", 3),
    ("ListTokens", 3),
    ("RevokeToken", 3),
    ("ListAudit", 3),
];

const ROLES: [&str; 4] = ["read-only", "submitter", "operator", "admin"];

/// Calls `rpc` with a request that names nothing that exists (or is invalid), so a call that
/// gets past the check fails on its input and changes nothing.
async fn call(api: &mut Api, rpc: &str) -> Result<(), Status> {
    let nope = || "nope-does-not-exist".to_string();
    match rpc {
        "Health" => api.health(pb::HealthRequest {}).await.map(drop),
        "ListProjects" => api
            .list_projects(pb::ListProjectsRequest {})
            .await
            .map(drop),
        "GetProject" => api
            .get_project(pb::GetProjectRequest { project: nope() })
            .await
            .map(drop),
        "CreateProject" => api
            .create_project(pb::CreateProjectRequest::default())
            .await
            .map(drop),
        "DeleteProject" => api
            .delete_project(pb::DeleteProjectRequest { project: nope() })
            .await
            .map(drop),
        "SubmitBuild" => api
            .submit_build(pb::SubmitBuildRequest {
                project: nope(),
                ..Default::default()
            })
            .await
            .map(drop),
        "GetBuild" => api
            .get_build(pb::GetBuildRequest { id: nope() })
            .await
            .map(drop),
        "RebuildBuild" => api
            .rebuild_build(pb::RebuildBuildRequest { id: nope() })
            .await
            .map(drop),
        "ListBuilds" => api
            .list_builds(pb::ListBuildsRequest::default())
            .await
            .map(drop),
        "CancelBuild" => api
            .cancel_build(pb::CancelBuildRequest {
                id: nope(),
                ..Default::default()
            })
            .await
            .map(drop),
        "WatchBuild" => api
            .watch_build(pb::WatchBuildRequest { id: nope() })
            .await
            .map(drop),
        "StreamLogs" => api
            .stream_logs(pb::StreamLogsRequest {
                build_id: nope(),
                ..Default::default()
            })
            .await
            .map(drop),
        "ListArtifacts" => api
            .list_artifacts(pb::ListArtifactsRequest { build_id: nope() })
            .await
            .map(drop),
        "GetArtifact" => api
            .get_artifact(pb::GetArtifactRequest {
                build_id: nope(),
                path: "out/app".into(),
            })
            .await
            .map(drop),
        "ListBoxes" => api.list_boxes(pb::ListBoxesRequest {}).await.map(drop),
        "CordonBox" => api
            .cordon_box(pb::BoxActionRequest { box_id: nope() })
            .await
            .map(drop),
        "DrainBox" => api
            .drain_box(pb::BoxActionRequest { box_id: nope() })
            .await
            .map(drop),
        "UncordonBox" => api
            .uncordon_box(pb::BoxActionRequest { box_id: nope() })
            .await
            .map(drop),
        "ForgetBox" => api
            .forget_box(pb::BoxActionRequest { box_id: nope() })
            .await
            .map(drop),
        // Longer than the 7 days a join token may live: refused, nothing made.
        "CreateJoinToken" => api
            .create_join_token(pb::CreateJoinTokenRequest {
                ttl_secs: 8 * 86_400,
                box_id: String::new(),
            })
            .await
            .map(drop),
        "ListJoinTokens" => api
            .list_join_tokens(pb::ListJoinTokensRequest {})
            .await
            .map(drop),
        "RevokeJoinToken" => api
            .revoke_join_token(pb::RevokeJoinTokenRequest { id: nope() })
            .await
            .map(drop),
        "SetSecret" => api
            .set_secret(pb::SetSecretRequest {
                project: nope(),
                name: "X".into(),
                value: "never-stored".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "ListSecrets" => api
            .list_secrets(pb::ListSecretsRequest { project: nope() })
            .await
            .map(drop),
        "DeleteSecret" => api
            .delete_secret(pb::DeleteSecretRequest {
                project: nope(),
                name: "X".into(),
            })
            .await
            .map(drop),
        "CloneAccess" => api
            .clone_access(pb::CloneAccessRequest {
                project: nope(),
                deploy_key: true,
                ..Default::default()
            })
            .await
            .map(drop),
        "ForgeStatus" => api
            .forge_status(pb::ForgeStatusRequest {
                project: nope(),
                forge: "github".into(),
                token: "tok".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "RevokeBox" => api
            .revoke_box(pb::BoxActionRequest { box_id: nope() })
            .await
            .map(drop),
        "ListCells" => api
            .list_cells(pb::ListCellsRequest::default())
            .await
            .map(drop),
        "ListSizeClasses" => api
            .list_size_classes(pb::ListSizeClassesRequest {})
            .await
            .map(drop),
        "CreateNetwork" => api
            .create_network(pb::CreateNetworkRequest::default())
            .await
            .map(drop),
        "ListNetworks" => api
            .list_networks(pb::ListNetworksRequest {})
            .await
            .map(drop),
        "DeleteNetwork" => api
            .delete_network(pb::DeleteNetworkRequest { name: nope() })
            .await
            .map(drop),
        "AddConnector" => api
            .add_connector(pb::AddConnectorRequest::default())
            .await
            .map(drop),
        "ListConnectors" => api
            .list_connectors(pb::ListConnectorsRequest::default())
            .await
            .map(drop),
        "RemoveConnector" => api
            .remove_connector(pb::RemoveConnectorRequest { connector: nope() })
            .await
            .map(drop),
        "ListTunnelLeases" => api
            .list_tunnel_leases(pb::ListTunnelLeasesRequest::default())
            .await
            .map(drop),
        "CreateToken" => api
            .create_token(pb::CreateTokenRequest {
                role: "root".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "ListTokens" => api.list_tokens(pb::ListTokensRequest {}).await.map(drop),
        "RevokeToken" => api
            .revoke_token(pb::RevokeTokenRequest { id: nope() })
            .await
            .map(drop),
        "ListAudit" => api
            .list_audit(pb::ListAuditRequest::default())
            .await
            .map(drop),
        other => panic!("the attack suite has no call for RPC {other}"),
    }
}

#[test]
fn the_suite_covers_every_control_plane_rpc() {
    let set = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
    let declared: BTreeSet<String> = set
        .file
        .iter()
        .flat_map(|f| f.service.iter())
        .filter(|s| s.name() == "ControlPlane")
        .flat_map(|s| s.method.iter().map(|m| m.name().to_string()))
        .collect();
    let covered: BTreeSet<String> = RPCS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(declared, covered, "RPCS must list every ControlPlane RPC");
}

/// Makes a token with `role` (and project) as the admin; returns (id, secret).
async fn token(admin: &mut Api, role: &str, project: &str) -> (String, String) {
    let r = admin
        .create_token(pb::CreateTokenRequest {
            role: role.into(),
            project: project.into(),
            name: format!("{role}-{project}"),
        })
        .await
        .unwrap_or_else(|s| panic!("create {role} token: {s}"))
        .into_inner();
    (r.info.unwrap().id, r.token)
}

async fn project(admin: &mut Api, name: &str, env: &[(&str, &str)]) {
    admin
        .create_project(pb::CreateProjectRequest {
            name: name.into(),
            repo_url: format!("https://git.example/acme/{name}"),
            secret: "webhook-secret".into(),
            steps: vec!["true".into()],
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn submit(api: &mut Api, project: &str) -> Result<String, Status> {
    api.submit_build(pb::SubmitBuildRequest {
        project: project.into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().id)
}

async fn no_token_is_unauthenticated(url: String) {
    let handle = start(&url).await;
    let mut admin = api(&handle).await;
    project(&mut admin, "p1", &[]).await;
    let mut anonymous = api_as(&handle, "").await;
    let mut unknown = api_as(&handle, &format!("hvt_{}", "0".repeat(64))).await;
    for (rpc, _) in RPCS {
        let s = call(&mut anonymous, rpc).await.expect_err(rpc);
        assert_eq!(s.code(), Code::Unauthenticated, "{rpc}: {s:?}");
        assert!(
            s.message().contains("HIVE_TOKEN") && s.message().contains("admin.token"),
            "{rpc}: the message should say what to do: {}",
            s.message()
        );
        let s = call(&mut unknown, rpc).await.expect_err(rpc);
        assert_eq!(
            s.code(),
            Code::Unauthenticated,
            "{rpc} (unknown token): {s:?}"
        );
    }
    // A header that is not "Bearer <token>".
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", handle.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut basic = pb::control_plane_client::ControlPlaneClient::with_interceptor(
        channel,
        |mut r: tonic::Request<()>| {
            r.metadata_mut()
                .insert("authorization", "Basic YWRtaW46YWRtaW4=".parse().unwrap());
            Ok(r)
        },
    );
    let s = basic
        .list_builds(pb::ListBuildsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    // Nothing an anonymous caller tried was done.
    let projects = admin
        .list_projects(pb::ListProjectsRequest {})
        .await
        .unwrap()
        .into_inner()
        .projects;
    assert_eq!(projects.len(), 1);
    handle.shutdown().await;
}
hive_testkit::on_both!(db => no_token_is_unauthenticated);

async fn each_role_is_held_to_its_rights(url: String) {
    let handle = start(&url).await;
    let mut admin = api(&handle).await;
    project(&mut admin, "p1", &[]).await;
    project(&mut admin, "p2", &[]).await;
    let mut clients = Vec::new();
    for role in ROLES {
        let bound = if role == "submitter" { "p1" } else { "" };
        let (_, secret) = token(&mut admin, role, bound).await;
        clients.push(api_as(&handle, &secret).await);
    }
    for (rpc, least) in RPCS {
        for (rank, client) in clients.iter_mut().enumerate() {
            let got = call(client, rpc).await;
            let role = ROLES[rank];
            if rank < *least {
                let s = got.expect_err(rpc);
                assert_eq!(s.code(), Code::PermissionDenied, "{role} {rpc}: {s:?}");
                assert!(
                    s.message().contains("hivectl token create --role"),
                    "{role} {rpc}: the message should say what to do: {}",
                    s.message()
                );
            } else if let Err(s) = got {
                // Past the check: refused only for what it asked (nothing that exists).
                assert!(
                    !matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated),
                    "{role} {rpc} should be allowed: {s:?}"
                );
            }
        }
    }

    // Denied changes on things that exist change nothing.
    let [read_only, submitter, operator, _] = &mut clients[..] else {
        unreachable!()
    };
    let s = read_only
        .delete_project(pb::DeleteProjectRequest {
            project: "p1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert_eq!(
        submit(read_only, "p1").await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // The submitter bound to p1: its project's builds only.
    let own = submit(submitter, "p1")
        .await
        .expect("submit to its own project");
    let s = submit(submitter, "p2").await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("\"p1\""), "{}", s.message());
    let other = submit(&mut admin, "p2").await.unwrap();
    let s = submitter
        .cancel_build(pb::CancelBuildRequest {
            id: other.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    submitter
        .cancel_build(pb::CancelBuildRequest {
            id: own.clone(),
            ..Default::default()
        })
        .await
        .expect("cancel its own project's build");
    let state = admin
        .get_build(pb::GetBuildRequest { id: other.clone() })
        .await
        .unwrap()
        .into_inner()
        .state;
    assert_eq!(
        state,
        pb::BuildState::Queued as i32,
        "the other build goes on"
    );

    // An operator may cancel any build and manage projects, but not put one on a private
    // network (that reaches a customer's network), nor touch networks and connectors.
    operator
        .cancel_build(pb::CancelBuildRequest {
            id: other,
            ..Default::default()
        })
        .await
        .expect("operator cancels any build");
    admin
        .create_network(pb::CreateNetworkRequest {
            name: "corp".into(),
            prefixes: vec!["10.20.0.0/16".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let s = operator
        .create_project(pb::CreateProjectRequest {
            name: "on-corp".into(),
            repo_url: "git://h/on-corp".into(),
            private_network: "corp".into(),
            steps: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let s = operator
        .add_connector(pb::AddConnectorRequest {
            network: "corp".into(),
            endpoint: "203.0.113.1:51820".into(),
            public_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let s = operator
        .create_token(pb::CreateTokenRequest {
            role: "admin".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        s.code(),
        Code::PermissionDenied,
        "an operator cannot mint an admin"
    );
    operator
        .create_project(pb::CreateProjectRequest {
            name: "plain".into(),
            repo_url: "git://h/plain".into(),
            steps: vec!["true".into()],
            ..Default::default()
        })
        .await
        .expect("operator adds a project");
    let names: Vec<String> = admin
        .list_projects(pb::ListProjectsRequest {})
        .await
        .unwrap()
        .into_inner()
        .projects
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["p1", "p2", "plain"]);
    let connectors = admin
        .list_connectors(pb::ListConnectorsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .connectors;
    assert!(connectors.is_empty());

    // Only a submitter is bound to a project.
    let s = admin
        .create_token(pb::CreateTokenRequest {
            role: "operator".into(),
            project: "p1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    handle.shutdown().await;
}
hive_testkit::on_both!(db => each_role_is_held_to_its_rights);

async fn revoked_token_is_refused(url: String) {
    let handle = start(&url).await;
    let mut admin = api(&handle).await;
    let (id, secret) = token(&mut admin, "operator", "").await;
    let mut op = api_as(&handle, &secret).await;
    op.list_builds(pb::ListBuildsRequest::default())
        .await
        .expect("in force");
    let revoked = admin
        .revoke_token(pb::RevokeTokenRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked_at_ms > 0);
    for (rpc, _) in RPCS {
        let s = call(&mut op, rpc).await.expect_err(rpc);
        assert_eq!(s.code(), Code::Unauthenticated, "{rpc}: {s:?}");
        assert!(s.message().contains("revoked"), "{}", s.message());
    }
    // Revoking again changes nothing; the list shows it revoked, and never a secret.
    admin
        .revoke_token(pb::RevokeTokenRequest { id: id.clone() })
        .await
        .unwrap();
    let tokens = admin
        .list_tokens(pb::ListTokensRequest {})
        .await
        .unwrap()
        .into_inner();
    let listed = tokens.tokens.iter().find(|t| t.id == id).unwrap();
    assert_eq!(listed.revoked_at_ms, revoked.revoked_at_ms);
    let bytes = tokens.encode_to_vec();
    assert!(
        !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "token list carries a secret"
    );
    let admin_secret = handle.admin_token().unwrap();
    assert!(!bytes
        .windows(admin_secret.len())
        .any(|w| w == admin_secret.as_bytes()));

    // An admin can revoke itself; then it is out too.
    let first = tokens
        .tokens
        .iter()
        .find(|t| t.role == "admin")
        .unwrap()
        .id
        .clone();
    let (_, second_admin) = token(&mut admin, "admin", "").await;
    admin
        .revoke_token(pb::RevokeTokenRequest { id: first })
        .await
        .unwrap();
    let s = admin
        .list_builds(pb::ListBuildsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    api_as(&handle, &second_admin)
        .await
        .list_tokens(pb::ListTokensRequest {})
        .await
        .expect("the other admin goes on");
    handle.shutdown().await;
}
hive_testkit::on_both!(db => revoked_token_is_refused);

/// Env values may be secrets (issue 10): no role reads them back through any API call.
async fn env_values_never_leave_through_the_api(url: String) {
    const VALUE: &str = "hunter2-do-not-leak-8c1f";
    let handle = start(&url).await;
    let mut admin = api(&handle).await;
    project(
        &mut admin,
        "secretive",
        &[("DEPLOY_KEY", VALUE), ("CI", "true")],
    )
    .await;
    let build = submit(&mut admin, "secretive").await.unwrap();
    let leaks = |bytes: Vec<u8>| bytes.windows(VALUE.len()).any(|w| w == VALUE.as_bytes());
    let mut clients = vec![admin];
    for role in ["read-only", "submitter", "operator"] {
        let (_, secret) = token(&mut clients[0], role, "").await;
        clients.push(api_as(&handle, &secret).await);
    }
    for c in &mut clients {
        let p = c
            .get_project(pb::GetProjectRequest {
                project: "secretive".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(p.env_names, ["CI", "DEPLOY_KEY"]);
        assert!(!leaks(p.encode_to_vec()), "GetProject returns an env value");
        let list = c
            .list_projects(pb::ListProjectsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(
            !leaks(list.encode_to_vec()),
            "ListProjects returns an env value"
        );
        let b = c
            .get_build(pb::GetBuildRequest { id: build.clone() })
            .await
            .unwrap()
            .into_inner();
        assert!(!leaks(b.encode_to_vec()), "GetBuild returns an env value");
        let bs = c
            .list_builds(pb::ListBuildsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(
            !leaks(bs.encode_to_vec()),
            "ListBuilds returns an env value"
        );
    }
    // The audit log names the project, never its env.
    let audit = clients[0]
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        !leaks(audit.encode_to_vec()),
        "the audit log holds an env value"
    );
    handle.shutdown().await;
}
hive_testkit::on_both!(db => env_values_never_leave_through_the_api);

async fn push_to(addr: std::net::SocketAddr, repo: &str, key: &[u8]) -> common::HttpReply {
    let body = serde_json::json!({
        "ref": "refs/heads/main",
        "after": "a".repeat(40),
        "repository": { "clone_url": repo },
    })
    .to_string()
    .into_bytes();
    common::push_signed(addr, key, "probe-1", &body).await
}

/// A registered repository cannot be told from an unregistered one without its secret.
async fn unknown_repository_is_answered_like_a_bad_signature(url: String) {
    let handle = start(&url).await;
    let mut admin = api(&handle).await;
    project(&mut admin, "known", &[]).await;
    let known = "https://git.example/acme/known";
    let unknown = "https://git.example/acme/unknown";
    // Any key: the prober does not know the secret.
    let k = push_to(handle.http_addr, known, b"a guess").await;
    let u = push_to(handle.http_addr, unknown, b"a guess").await;
    assert_eq!(k.status, 401, "{}", k.body);
    assert_eq!(u.status, k.status, "{} / {}", u.body, k.body);
    // The answers differ only in the URL the sender sent.
    assert_eq!(
        u.body.replace(unknown, "URL"),
        k.body.replace(known, "URL"),
        "unknown repository answered differently from a bad signature"
    );
    // The metrics say the same too.
    let m = http(handle.http_addr, "GET", "/metrics", &[], b"").await;
    assert!(!m.body.contains("unknown_repo"), "{}", m.body);
    assert!(m.body.contains("bad_signature"), "{}", m.body);
    // And no build was made.
    let builds = admin
        .list_builds(pb::ListBuildsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .builds;
    assert!(builds.is_empty());
    handle.shutdown().await;
}
hive_testkit::on_both!(db => unknown_repository_is_answered_like_a_bad_signature);

/// Each change is in the audit log with the token that made it; the first admin token is made
/// once, on the first start, and a restart makes no other.
async fn changes_are_audited_and_the_admin_token_is_made_once(url: String) {
    let handle = start(&url).await;
    let first_admin = handle.admin_token().unwrap().to_string();
    let mut admin = api(&handle).await;
    project(&mut admin, "audited", &[("K", "v")]).await;
    let (op_id, op_secret) = token(&mut admin, "operator", "").await;
    let mut op = api_as(&handle, &op_secret).await;
    let build = submit(&mut op, "audited").await.unwrap();
    op.cancel_build(pb::CancelBuildRequest {
        id: build.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    // A refused change is not a change.
    let _ = op
        .create_token(pb::CreateTokenRequest {
            role: "admin".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let entries = admin
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    let seen: Vec<(String, String, String)> = entries
        .iter()
        .rev()
        .map(|e| (e.token_name.clone(), e.action.clone(), e.target.clone()))
        .collect();
    let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(
        seen,
        vec![
            s("control-plane", "BootstrapAdminToken", "admin-bootstrap"),
            s("admin", "CreateProject", "audited"),
            s("admin", "CreateToken", &op_id),
            s("operator-", "SubmitBuild", &build),
            s("operator-", "CancelBuild", &build),
        ]
    );
    assert!(entries.iter().all(|e| e.at_ms > 0));
    assert_eq!(entries[0].token_id, op_id);
    // Non-admins cannot read it.
    assert_eq!(
        op.list_audit(pb::ListAuditRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    handle.shutdown().await;

    let again = start(&url).await;
    assert!(
        again.admin_token().is_none(),
        "a second admin token was made"
    );
    api_as(&again, &first_admin)
        .await
        .list_tokens(pb::ListTokensRequest {})
        .await
        .expect("the first admin token still works");
    again.shutdown().await;
}
hive_testkit::on_both!(db => changes_are_audited_and_the_admin_token_is_made_once);
