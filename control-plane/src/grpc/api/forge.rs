//! Commit statuses to the project's forge (issue 14): set the forge and its credentials (a
//! token, or a GitHub App's id and key, sealed with the secrets key), turn statuses off, or
//! show the settings with the outbox's state. No reply carries a token or key.

use hive_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{store_err, ControlPlaneService};
use crate::auth::Right;
use crate::forge::outbox::{APP_KEY_NAME, TOKEN_NAME};
use crate::forge::{self, Kind};
use crate::store::{ForgeRow, ProjectRow};

/// Longest token accepted (forges' are well under 256).
const MAX_TOKEN: usize = 4096;
/// Largest App private key accepted (a 4096-bit RSA key in PEM is about 3.3 KiB).
const MAX_KEY: usize = 16 * 1024;

pub(super) async fn forge_status(
    svc: &ControlPlaneService,
    request: Request<pb::ForgeStatusRequest>,
) -> Result<Response<pb::ForgeStatusReply>, Status> {
    let caller = svc.caller(&request, "ForgeStatus", Right::Operate).await?;
    let req = request.into_inner();
    let p = svc.project(req.project.trim()).await?;
    let store = &svc.hive.store;
    if req.off {
        let audit = caller.audit("ForgeStatus", p.name.clone());
        store
            .delete_forge(&p.id, &{
                let mut a = audit;
                a.detail = "off".into();
                a
            })
            .await
            .map_err(store_err)?;
        tracing::info!(project = %p.name, by = %caller.name, "forge statuses off");
        return reply(svc, &p, None).await;
    }
    if req.forge.trim().is_empty() {
        if !req.token.is_empty() || req.app_id != 0 || !req.app_key_pem.is_empty() {
            return Err(Status::invalid_argument(
                "credentials without a forge: say which (github, gitlab or gitea)",
            ));
        }
        let row = store.get_forge(&p.id).await.map_err(store_err)?;
        return reply(svc, &p, row.as_ref()).await;
    }
    let row = forge_row(svc, &p, &req)?;
    let mut audit = caller.audit("ForgeStatus", p.name.clone());
    audit.detail = format!(
        "{} {} {}",
        row.kind,
        row.api_url,
        if row.app_id > 0 {
            "github-app"
        } else {
            "token"
        }
    );
    store.set_forge(&row, &audit).await.map_err(store_err)?;
    tracing::info!(project = %p.name, forge = %row.kind, api = %row.api_url,
        by = %caller.name, "forge statuses set");
    reply(svc, &p, Some(&row)).await
}

/// The row `req` asks for, its credentials checked and sealed.
fn forge_row(
    svc: &ControlPlaneService,
    p: &ProjectRow,
    req: &pb::ForgeStatusRequest,
) -> Result<ForgeRow, Status> {
    let bad = |e: forge::ForgeError| Status::invalid_argument(e.to_string());
    let kind = Kind::parse(&req.forge).map_err(bad)?;
    let repo_path = forge::repo_path(&p.repo_url).map_err(bad)?;
    let api_url = if req.api_url.trim().is_empty() {
        let repo = crate::repo_url::RepoUrl::parse(&p.repo_url)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        forge::default_api(kind, &repo)
    } else {
        forge::check_base_url(&req.api_url).map_err(bad)?
    };
    let has_token = !req.token.is_empty();
    let has_app = req.app_id != 0 || !req.app_key_pem.is_empty();
    let mut row = ForgeRow {
        project_id: p.id.clone(),
        kind: kind.name().to_string(),
        api_url,
        repo_path,
        token_nonce: String::new(),
        token_sealed: String::new(),
        app_id: 0,
        app_key_nonce: String::new(),
        app_key_sealed: String::new(),
        updated_at_ms: crate::store::now_ms(),
    };
    match (has_token, has_app) {
        (true, true) => Err(Status::invalid_argument(
            "give a token or a GitHub App (id and key), not both",
        )),
        (false, false) => Err(Status::invalid_argument(
            "no credentials: give a token (--token-file) or, for GitHub, an App \
             (--app-id and --app-key-file)",
        )),
        (true, false) => {
            let token = req.token.trim();
            let printable = token.chars().all(|c| c.is_ascii_graphic());
            if token.is_empty() || token.len() > MAX_TOKEN || !printable {
                return Err(Status::invalid_argument(format!(
                    "the token must be 1 to {MAX_TOKEN} printable ASCII characters without \
                     spaces (it goes into an HTTP header)"
                )));
            }
            let (nonce, sealed) = svc.hive.sealer.seal(&p.id, TOKEN_NAME, token.as_bytes());
            row.token_nonce = nonce;
            row.token_sealed = sealed;
            Ok(row)
        }
        (false, true) => {
            if kind != Kind::Github {
                return Err(Status::invalid_argument(format!(
                    "an App is GitHub's: for {} give a token",
                    kind.name()
                )));
            }
            let app_id = i64::try_from(req.app_id)
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| {
                    Status::invalid_argument("--app-id: the GitHub App's id, a positive number")
                })?;
            if req.app_key_pem.len() > MAX_KEY {
                return Err(Status::invalid_argument(format!(
                    "the App key is {} bytes: a PEM private key is under {MAX_KEY}",
                    req.app_key_pem.len()
                )));
            }
            forge::app::AppKey::from_pem(&req.app_key_pem)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let (nonce, sealed) =
                svc.hive
                    .sealer
                    .seal(&p.id, APP_KEY_NAME, req.app_key_pem.as_bytes());
            row.app_id = app_id;
            row.app_key_nonce = nonce;
            row.app_key_sealed = sealed;
            Ok(row)
        }
    }
}

async fn reply(
    svc: &ControlPlaneService,
    p: &ProjectRow,
    row: Option<&ForgeRow>,
) -> Result<Response<pb::ForgeStatusReply>, Status> {
    let summary = svc
        .hive
        .store
        .outbox_summary(&p.id)
        .await
        .map_err(store_err)?;
    let mut r = pb::ForgeStatusReply {
        project: p.name.clone(),
        pending: u64::try_from(summary.pending).unwrap_or(0),
        last_error: summary.last_error,
        ..Default::default()
    };
    if let Some(f) = row {
        r.forge = f.kind.clone();
        r.api_url = f.api_url.clone();
        r.repository = f.repo_path.clone();
        r.auth = if f.app_id > 0 { "github-app" } else { "token" }.to_string();
        r.app_id = u64::try_from(f.app_id).unwrap_or(0);
        r.updated_at_ms = f.updated_at_ms;
    }
    Ok(Response::new(r))
}
