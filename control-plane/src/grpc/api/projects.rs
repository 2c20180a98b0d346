//! Projects: create, list, show and delete them. A project's input is checked here
//! (`validate_project`) before the store sees it; the API never shows the webhook secret nor the
//! environment's values.

use std::collections::BTreeMap;

use hive_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::builds::check_ref_name;
use super::{net_err, store_err, ControlPlaneService};
use crate::auth::{Right, Role};
use crate::refglob;
use crate::repo_url::RepoUrl;
use crate::sizeclass::DEFAULT_CLASS;
use crate::store::{NewProject, ProjectRow};

/// Default project build timeout.
pub const DEFAULT_TIMEOUT_SECS: u32 = 1800;
/// Longest project build timeout.
pub const MAX_TIMEOUT_SECS: u32 = 7 * 24 * 3600;
/// Longest webhook secret.
pub const MAX_SECRET_LEN: usize = 256;

/// Project as the API shows it: never the webhook secret, and of the environment only the names
/// (values may be secrets; no caller needs them back).
pub fn project_to_proto(p: &ProjectRow) -> pb::Project {
    pb::Project {
        id: p.id.clone(),
        name: p.name.clone(),
        repo_url: p.repo_url.clone(),
        branch: p.branch.clone(),
        tags: p.tags.clone(),
        size_class: p.size_class.clone(),
        private_network: p.private_network.clone(),
        steps: p.steps.clone(),
        timeout_secs: p.timeout_secs,
        created_at_ms: p.created_at_ms,
        has_secret: !p.secret.is_empty(),
        env_names: p.env.keys().cloned().collect(),
        hive: p.hive.clone(),
    }
}

/// Checks a project request and turns it into what the store writes.
pub fn validate_project(
    req: pb::CreateProjectRequest,
    classes: &crate::sizeclass::SizeClasses,
    regions: &crate::regions::Regions,
) -> Result<NewProject, Status> {
    let name = req.name.trim();
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Status::invalid_argument(format!(
            "project name {:?} must be 1-64 characters of letters, digits, '-', '_', '.'",
            req.name
        )));
    }
    let repo_url = req.repo_url.trim();
    RepoUrl::parse(repo_url).map_err(|e| Status::invalid_argument(e.to_string()))?;
    // An empty secret is a project for API builds only: no webhook can ever verify against it.
    // Present, it must be usable as the HMAC key a git host is given.
    if req.secret.len() > MAX_SECRET_LEN
        || req.secret.chars().any(|c| c.is_control())
        || (!req.secret.is_empty() && req.secret.trim().is_empty())
    {
        return Err(Status::invalid_argument(format!(
            "webhook secret must be 1-{MAX_SECRET_LEN} characters without control characters \
             and not only spaces (leave it out for a project built only through the API)"
        )));
    }
    let size_class = if req.size_class.is_empty() {
        DEFAULT_CLASS.to_string()
    } else {
        classes
            .get(&req.size_class)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        req.size_class.clone()
    };
    // A project of another hive is built there: here it only routes that hive's pushes, so
    // it needs the webhook secret (to check a push before passing it on) and no steps.
    let hive = req.hive.trim();
    let elsewhere = !regions.builds_here(hive);
    if elsewhere {
        crate::regions::check_name(hive).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !regions.has_peer(hive) {
            let peers = regions.peer_names();
            return Err(Status::failed_precondition(format!(
                "hive {hive:?} is not a peer of this control plane (this is hive {:?}; peers: \
                 {}): start the control planes with --peer-hive {hive}=URL, or leave --hive \
                 out to build here",
                regions.name,
                if peers.is_empty() {
                    "none".to_string()
                } else {
                    peers.join(", ")
                }
            )));
        }
        if req.secret.is_empty() {
            return Err(Status::invalid_argument(format!(
                "a project of hive {hive:?} needs the webhook secret (pushes are checked here \
                 before they are forwarded)"
            )));
        }
        if !req.private_network.trim().is_empty() {
            return Err(Status::invalid_argument(
                "a project of another hive takes no private network here (give it to the \
                 project on that hive)",
            ));
        }
    } else if req.steps.is_empty() {
        return Err(Status::invalid_argument(
            "a project needs at least one step",
        ));
    }
    if let Some(i) = req.steps.iter().position(|s| s.trim().is_empty()) {
        return Err(Status::invalid_argument(format!("step {i} is empty")));
    }
    let branch = req.branch.trim();
    let branch = branch.strip_prefix("refs/heads/").unwrap_or(branch);
    for key in req.env.keys() {
        let ok = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(Status::invalid_argument(format!(
                "env name {key:?} must be letters, digits and '_', not starting with a digit"
            )));
        }
    }
    if req.timeout_secs > MAX_TIMEOUT_SECS {
        return Err(Status::invalid_argument(format!(
            "timeout_secs {} is over a week ({MAX_TIMEOUT_SECS}); 0 or absent means the \
             default, {DEFAULT_TIMEOUT_SECS}",
            req.timeout_secs
        )));
    }
    // Names or globs, checked by git's rules with the wildcards standing in for letters.
    if !branch.is_empty() {
        check_ref_name(
            "branch",
            &format!("refs/heads/{}", refglob::as_name(branch)),
        )?;
    }
    let tags = req.tags.trim();
    let tags = tags.strip_prefix("refs/tags/").unwrap_or(tags);
    if !tags.is_empty() {
        check_ref_name("tags", &format!("refs/tags/{}", refglob::as_name(tags)))?;
    }
    Ok(NewProject {
        name: name.to_string(),
        repo_url: repo_url.to_string(),
        secret: req.secret,
        branch: branch.to_string(),
        tags: tags.to_string(),
        size_class,
        private_network: req.private_network.trim().to_string(),
        steps: req.steps,
        env: req.env.into_iter().collect::<BTreeMap<_, _>>(),
        timeout_secs: if req.timeout_secs == 0 {
            DEFAULT_TIMEOUT_SECS
        } else {
            req.timeout_secs
        },
        hive: if elsewhere {
            hive.to_string()
        } else {
            String::new()
        },
    })
}

pub(super) async fn create_project(
    svc: &ControlPlaneService,
    request: Request<pb::CreateProjectRequest>,
) -> Result<Response<pb::Project>, Status> {
    let caller = svc
        .caller(&request, "CreateProject", Right::Operate)
        .await?;
    let new = validate_project(request.into_inner(), &svc.hive.classes, &svc.hive.regions)?;
    if !new.private_network.is_empty() {
        // A project on a private network reaches into a customer's network: that is the
        // admin's to grant, like the network itself.
        if caller.role != Role::Admin {
            caller.require("CreateProject with a private network", Right::Admin)?;
        }
        let net = svc
            .hive
            .store
            .get_network(&new.private_network)
            .await
            .map_err(net_err)?;
        if net.is_none() {
            return Err(Status::failed_precondition(format!(
                "private network {:?} does not exist (create it with `hivectl network add`)",
                new.private_network
            )));
        }
    }
    let row = svc
        .hive
        .store
        .create_project(&new, &caller.audit("CreateProject", &new.name))
        .await
        .map_err(store_err)?;
    tracing::info!(project = %row.name, repo = %row.repo_url, "project created");
    Ok(Response::new(project_to_proto(&row)))
}

pub(super) async fn list_projects(
    svc: &ControlPlaneService,
    request: Request<pb::ListProjectsRequest>,
) -> Result<Response<pb::ListProjectsReply>, Status> {
    svc.caller(&request, "ListProjects", Right::Read).await?;
    let rows = svc.hive.store.list_projects().await.map_err(store_err)?;
    Ok(Response::new(pb::ListProjectsReply {
        projects: rows.iter().map(project_to_proto).collect(),
    }))
}

pub(super) async fn get_project(
    svc: &ControlPlaneService,
    request: Request<pb::GetProjectRequest>,
) -> Result<Response<pb::Project>, Status> {
    svc.caller(&request, "GetProject", Right::Read).await?;
    let p = svc.project(&request.into_inner().project).await?;
    Ok(Response::new(project_to_proto(&p)))
}

pub(super) async fn delete_project(
    svc: &ControlPlaneService,
    request: Request<pb::DeleteProjectRequest>,
) -> Result<Response<pb::DeleteProjectReply>, Status> {
    let caller = svc
        .caller(&request, "DeleteProject", Right::Operate)
        .await?;
    let name = request.into_inner().project;
    let p = svc.project(&name).await?;
    svc.hive
        .store
        .delete_project(&p.id, &caller.audit("DeleteProject", &p.name))
        .await
        .map_err(store_err)?;
    tracing::info!(project = %p.name, "project deleted");
    Ok(Response::new(pb::DeleteProjectReply {}))
}
