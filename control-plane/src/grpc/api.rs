//! The `ControlPlane` gRPC service: projects, builds (submit, get, list, cancel, watch, logs),
//! boxes (list, cordon, drain), cells, size classes, private networks, connectors, API tokens
//! and the audit log. Errors are `tonic::Status` values whose message names the problem and the
//! input (`project "x" not found`).
//!
//! Every RPC first authenticates its caller and checks the [`Right`] it needs (`auth`), before
//! it reads its input: no token is UNAUTHENTICATED, a role without the right PERMISSION_DENIED.
//! Each change is recorded in the audit log in the change's own transaction.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use hive_proto::v1::{self as pb, BuildState};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::auth::{self, Caller, Right, Role};
use crate::domain::cancel::CancelError;
use crate::domain::logs::{self, FollowError};
use crate::domain::{cancel, drain, network, submit};
use crate::events::Event;
use crate::refglob;
use crate::repo_url::RepoUrl;
use crate::sizeclass::DEFAULT_CLASS;
use crate::state::Hive;
use crate::store::{
    AuditRow, BuildFilter, BuildRow, ConnectorRow, NetworkError, NetworkRow, NewProject,
    ProjectRow, StoreError, TokenRow, TransitionRow,
};

/// Default project build timeout.
pub const DEFAULT_TIMEOUT_SECS: u32 = 1800;
/// Longest project build timeout.
pub const MAX_TIMEOUT_SECS: u32 = 7 * 24 * 3600;
/// Longest webhook secret.
pub const MAX_SECRET_LEN: usize = 256;

/// The gRPC `ControlPlane` service.
#[derive(Clone)]
pub struct ControlPlaneService {
    pub hive: Arc<Hive>,
}

fn store_err(e: StoreError) -> Status {
    match e {
        StoreError::ProjectExists(name) => {
            Status::already_exists(format!("project {name:?} already exists"))
        }
        other => Status::internal(other.to_string()),
    }
}

fn net_err(e: NetworkError) -> Status {
    match e {
        NetworkError::Store(e) => store_err(e),
        NetworkError::Exists(_) | NetworkError::ConnectorExists(_) => {
            Status::already_exists(e.to_string())
        }
        NetworkError::NotFound(_) => Status::not_found(e.to_string()),
        NetworkError::InUse { .. } | NetworkError::PoolExhausted { .. } => {
            Status::failed_precondition(e.to_string())
        }
        _ => Status::invalid_argument(e.to_string()),
    }
}

fn network_to_proto(n: &NetworkRow) -> pb::PrivateNetwork {
    pb::PrivateNetwork {
        name: n.name.clone(),
        prefixes: n.prefixes.clone(),
        tunnel_subnet: n.tunnel_subnet.clone(),
        created_at_ms: n.created_at_ms,
    }
}

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
    }
}

/// Build as the API shows it.
pub fn build_to_proto(b: &BuildRow, transitions: &[TransitionRow]) -> pb::Build {
    pb::Build {
        id: b.id.clone(),
        project_id: b.project_id.clone(),
        project_name: b.project_name.clone(),
        revision: b.revision.clone(),
        git_ref: b.git_ref.clone(),
        state: b.state as i32,
        box_id: b.box_id.clone(),
        cell_id: b.cell_id.clone(),
        created_at_ms: b.created_at_ms,
        updated_at_ms: b.updated_at_ms,
        exit_code: b.exit_code,
        message: b.message.clone(),
        trigger: b.trigger.clone(),
        size_class: b.size_class.clone(),
        warm_start: b.warm_start,
        transitions: transitions
            .iter()
            .map(|t| pb::StateTransition {
                state: t.state as i32,
                at_ms: t.at_ms,
                reason: t.reason.clone(),
            })
            .collect(),
        attempt: b.attempt,
        backend: b.backend.clone(),
    }
}

/// Checks a project request and turns it into what the store writes.
pub fn validate_project(
    req: pb::CreateProjectRequest,
    classes: &crate::sizeclass::SizeClasses,
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
    if req.steps.is_empty() {
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
    })
}

/// A revision to build: a commit id, full (40 or 64 hex digits) or abbreviated (at least 4, as git allows).
pub fn check_revision(rev: &str) -> Result<(), Status> {
    let ok = (4..=64).contains(&rev.len()) && rev.chars().all(|c| c.is_ascii_hexdigit());
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "revision {:?} is not a commit id: give 4 to 64 hex digits (`git rev-parse HEAD`), \
             or leave it out and name a ref",
            clip(rev)
        )))
    }
}

/// A ref name as git accepts it (`git check-ref-format`'s rules, full names under `refs/`).
pub fn check_ref_name(what: &str, name: &str) -> Result<(), Status> {
    let bad = |why: &str| {
        Err(Status::invalid_argument(format!(
            "{what} {:?} is not a git ref name: {why}",
            clip(name)
        )))
    };
    if name.len() > 256 {
        return bad("over 256 characters");
    }
    if !name.starts_with("refs/") {
        return bad("full ref names start with refs/ (refs/heads/main, refs/tags/v1)");
    }
    if name.chars().any(|c| {
        c.is_control() || c.is_whitespace() || matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\')
    }) {
        return bad("spaces, control characters and ~ ^ : ? * [ \\ are not allowed");
    }
    if name.contains("..") || name.contains("@{") || name.contains("//") {
        return bad("'..', '@{' and '//' are not allowed");
    }
    if name.ends_with('/') || name.ends_with('.') || name == "refs/" {
        return bad("it must not end with '/' or '.'");
    }
    if name
        .split('/')
        .any(|part| part.starts_with('.') || part.ends_with(".lock"))
    {
        return bad("no part may start with '.' or end with '.lock'");
    }
    Ok(())
}

/// At most 80 characters of user input, for messages.
fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

/// A token as the API shows it (never its secret or hash).
fn token_to_proto(t: &TokenRow) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id.clone(),
        name: t.name.clone(),
        role: t.role.clone(),
        project: t.project_name.clone(),
        project_id: t.project_id.clone(),
        created_at_ms: t.created_at_ms,
        created_by: t.created_by.clone(),
        revoked_at_ms: t.revoked_at_ms,
    }
}

fn audit_to_proto(a: AuditRow) -> pb::AuditEntry {
    pb::AuditEntry {
        id: a.id,
        at_ms: a.at_ms,
        token_id: a.entry.token_id,
        token_name: a.entry.token_name,
        action: a.entry.action,
        target: a.entry.target,
        detail: a.entry.detail,
    }
}

impl ControlPlaneService {
    /// The caller of `rpc`, if its token is good and its role holds `right`.
    async fn caller<T>(
        &self,
        request: &Request<T>,
        rpc: &'static str,
        right: Right,
    ) -> Result<Caller, Status> {
        let caller = auth::authenticate(&self.hive.store, request.metadata()).await?;
        caller.require(rpc, right)?;
        Ok(caller)
    }

    async fn project(&self, name_or_id: &str) -> Result<ProjectRow, Status> {
        if name_or_id.is_empty() {
            return Err(Status::invalid_argument("project (name or id) is required"));
        }
        self.hive
            .store
            .get_project(name_or_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| Status::not_found(format!("project {name_or_id:?} not found")))
    }

    async fn build(&self, id: &str) -> Result<BuildRow, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("build id is required"));
        }
        self.hive
            .store
            .get_build(id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| Status::not_found(format!("build {id:?} not found")))
    }

    /// The build with its history, as one commit left them (`Store::build_with_history`).
    async fn full_build(&self, id: &str) -> Result<pb::Build, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("build id is required"));
        }
        let (b, t) = self
            .hive
            .store
            .build_with_history(id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| Status::not_found(format!("build {id:?} not found")))?;
        Ok(build_to_proto(&b, &t))
    }

    async fn connector_info(&self, r: &ConnectorRow) -> Result<pb::ConnectorInfo, Status> {
        let active = self
            .hive
            .store
            .list_tunnel_leases(&r.network, "", true)
            .await
            .map_err(net_err)?;
        Ok(pb::ConnectorInfo {
            id: r.id.clone(),
            network: r.network.clone(),
            public_key: r.public_key.clone(),
            endpoint: r.endpoint.clone(),
            created_at_ms: r.created_at_ms,
            connected: self.hive.connectors.is_connected(&r.id),
            active_peers: u32::try_from(active.len()).unwrap_or(u32::MAX),
        })
    }

    async fn box_info(&self, box_id: &str) -> Result<pb::BoxInfo, Status> {
        let row = self
            .hive
            .store
            .get_box(box_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| Status::not_found(format!("box {box_id:?} not found")))?;
        Ok(self.hive.registry.info(&row))
    }
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::control_plane_server::ControlPlane for ControlPlaneService {
    type WatchBuildStream = Stream_<pb::Build>;
    type StreamLogsStream = Stream_<pb::LogChunk>;

    async fn health(
        &self,
        request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthReply>, Status> {
        self.caller(&request, "Health", Right::Read).await?;
        let (ok, detail) = match self.hive.store.ping().await {
            Ok(()) => (true, format!("{} ok", self.hive.store.kind().name())),
            Err(e) => (false, e.to_string()),
        };
        Ok(Response::new(pb::HealthReply {
            ok,
            version: env!("CARGO_PKG_VERSION").to_string(),
            detail,
        }))
    }

    async fn create_project(
        &self,
        request: Request<pb::CreateProjectRequest>,
    ) -> Result<Response<pb::Project>, Status> {
        let caller = self
            .caller(&request, "CreateProject", Right::Operate)
            .await?;
        let new = validate_project(request.into_inner(), &self.hive.classes)?;
        if !new.private_network.is_empty() {
            // A project on a private network reaches into a customer's network: that is the
            // admin's to grant, like the network itself.
            if caller.role != Role::Admin {
                caller.require("CreateProject with a private network", Right::Admin)?;
            }
            let net = self
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
        let row = self
            .hive
            .store
            .create_project(&new, &caller.audit("CreateProject", &new.name))
            .await
            .map_err(store_err)?;
        tracing::info!(project = %row.name, repo = %row.repo_url, "project created");
        Ok(Response::new(project_to_proto(&row)))
    }

    async fn list_projects(
        &self,
        request: Request<pb::ListProjectsRequest>,
    ) -> Result<Response<pb::ListProjectsReply>, Status> {
        self.caller(&request, "ListProjects", Right::Read).await?;
        let rows = self.hive.store.list_projects().await.map_err(store_err)?;
        Ok(Response::new(pb::ListProjectsReply {
            projects: rows.iter().map(project_to_proto).collect(),
        }))
    }

    async fn get_project(
        &self,
        request: Request<pb::GetProjectRequest>,
    ) -> Result<Response<pb::Project>, Status> {
        self.caller(&request, "GetProject", Right::Read).await?;
        let p = self.project(&request.into_inner().project).await?;
        Ok(Response::new(project_to_proto(&p)))
    }

    async fn delete_project(
        &self,
        request: Request<pb::DeleteProjectRequest>,
    ) -> Result<Response<pb::DeleteProjectReply>, Status> {
        let caller = self
            .caller(&request, "DeleteProject", Right::Operate)
            .await?;
        let name = request.into_inner().project;
        let p = self.project(&name).await?;
        self.hive
            .store
            .delete_project(&p.id, &caller.audit("DeleteProject", &p.name))
            .await
            .map_err(store_err)?;
        tracing::info!(project = %p.name, "project deleted");
        Ok(Response::new(pb::DeleteProjectReply {}))
    }

    async fn submit_build(
        &self,
        request: Request<pb::SubmitBuildRequest>,
    ) -> Result<Response<pb::Build>, Status> {
        let caller = self.caller(&request, "SubmitBuild", Right::Submit).await?;
        let req = request.into_inner();
        let p = self.project(&req.project).await?;
        caller.require_project("SubmitBuild", &p.id, &p.name)?;
        if !req.revision.is_empty() {
            check_revision(&req.revision)?;
        }
        if !req.git_ref.is_empty() && req.git_ref != "HEAD" {
            check_ref_name("git_ref", &req.git_ref)?;
        }
        let git_ref = if !req.git_ref.is_empty() {
            req.git_ref.clone()
        } else if refglob::is_glob(&p.branch) {
            return Err(Status::invalid_argument(format!(
                "project {} builds branches matching {:?}: name the one to build \
                 (git_ref, `hivectl submit --ref refs/heads/...`)",
                p.name, p.branch
            )));
        } else if !p.branch.is_empty() {
            format!("refs/heads/{}", p.branch)
        } else {
            "HEAD".to_string()
        };
        let build = BuildRow::new_queued(&p, &req.revision, &git_ref, "api");
        let audit = caller
            .audit("SubmitBuild", &build.id)
            .with_detail(format!("project {}", p.name));
        submit::submit(&self.hive, &build, "submitted via api", &audit)
            .await
            .map_err(store_err)?;
        tracing::info!(build_id = %build.id, project = %p.name, "build submitted");
        // The build as committed (queued); the scheduler may already be placing it.
        let first = TransitionRow {
            state: BuildState::Queued,
            at_ms: build.created_at_ms,
            reason: "submitted via api".to_string(),
        };
        Ok(Response::new(build_to_proto(&build, &[first])))
    }

    async fn rebuild_build(
        &self,
        request: Request<pb::RebuildBuildRequest>,
    ) -> Result<Response<pb::Build>, Status> {
        let caller = self.caller(&request, "RebuildBuild", Right::Submit).await?;
        let old_id = request.into_inner().id;
        let (p, build, reason) =
            submit::rebuild_of(&self.hive, &old_id)
                .await
                .map_err(|e| match e {
                    submit::RebuildError::NotFound(_) => Status::not_found(e.to_string()),
                    submit::RebuildError::ProjectGone { .. } => {
                        Status::failed_precondition(e.to_string())
                    }
                    submit::RebuildError::Store(e) => store_err(e),
                })?;
        caller.require_project("RebuildBuild", &p.id, &p.name)?;
        let audit = caller
            .audit("RebuildBuild", &build.id)
            .with_detail(format!("project {}, {reason}", p.name));
        submit::submit(&self.hive, &build, &reason, &audit)
            .await
            .map_err(store_err)?;
        tracing::info!(build_id = %build.id, rebuild_of = %old_id, project = %p.name, "build submitted");
        let first = TransitionRow {
            state: BuildState::Queued,
            at_ms: build.created_at_ms,
            reason,
        };
        Ok(Response::new(build_to_proto(&build, &[first])))
    }

    async fn get_build(
        &self,
        request: Request<pb::GetBuildRequest>,
    ) -> Result<Response<pb::Build>, Status> {
        self.caller(&request, "GetBuild", Right::Read).await?;
        Ok(Response::new(
            self.full_build(&request.into_inner().id).await?,
        ))
    }

    async fn list_builds(
        &self,
        request: Request<pb::ListBuildsRequest>,
    ) -> Result<Response<pb::ListBuildsReply>, Status> {
        self.caller(&request, "ListBuilds", Right::Read).await?;
        let req = request.into_inner();
        let project_id = if req.project.is_empty() {
            None
        } else {
            Some(self.project(&req.project).await?.id)
        };
        let state = match BuildState::try_from(req.state) {
            Ok(BuildState::Unspecified) => None,
            Ok(s) => Some(s),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "state {} is not a build state",
                    req.state
                )))
            }
        };
        let rows = self
            .hive
            .store
            .list_builds(&BuildFilter {
                project_id,
                state,
                limit: req.limit,
            })
            .await
            .map_err(store_err)?;
        Ok(Response::new(pb::ListBuildsReply {
            builds: rows.iter().map(|b| build_to_proto(b, &[])).collect(),
        }))
    }

    async fn cancel_build(
        &self,
        request: Request<pb::CancelBuildRequest>,
    ) -> Result<Response<pb::Build>, Status> {
        let caller = self.caller(&request, "CancelBuild", Right::Submit).await?;
        let req = request.into_inner();
        if req.id.is_empty() {
            return Err(Status::invalid_argument("build id is required"));
        }
        if !caller.project_id.is_empty() {
            let b = self.build(&req.id).await?;
            caller.require_project("CancelBuild", &b.project_id, &b.project_name)?;
        }
        let reason = if req.reason.is_empty() {
            "cancelled via api".to_string()
        } else {
            format!("cancelled via api: {}", req.reason)
        };
        let audit = caller.audit("CancelBuild", &req.id);
        let before = cancel::cancel(&self.hive, &req.id, &reason, &audit)
            .await
            .map_err(|e| match e {
                CancelError::NotFound(_) => Status::not_found(e.to_string()),
                CancelError::AlreadyEnded { .. } => Status::failed_precondition(e.to_string()),
                CancelError::Store(e) => store_err(e),
            })?;
        Ok(Response::new(self.full_build(&before.id).await?))
    }

    async fn watch_build(
        &self,
        request: Request<pb::WatchBuildRequest>,
    ) -> Result<Response<Self::WatchBuildStream>, Status> {
        self.caller(&request, "WatchBuild", Right::Read).await?;
        let id = request.into_inner().id;
        // Subscribe first, then read: a change in between is then heard, not lost.
        let mut events = self.hive.events.subscribe();
        let first = self.full_build(&id).await?;
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        let mut shutdown = self.hive.shutdown.clone();
        tokio::spawn(async move {
            let mut last = first.clone();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            while !BuildState::try_from(last.state).is_ok_and(|s| s.is_terminal()) {
                let heard = tokio::select! {
                    e = events.recv() => e,
                    _ = crate::events::stopped(&mut shutdown) => {
                        let _ = tx.send(Err(Status::unavailable("control plane shutting down"))).await;
                        return;
                    }
                    _ = tx.closed() => return,
                };
                match heard {
                    Ok(Event::Build(b)) if b == id => {}
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
                let now = match this.full_build(&id).await {
                    Ok(b) => b,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                if now.state != last.state
                    || now.transitions.len() != last.transitions.len()
                    || now.updated_at_ms != last.updated_at_ms
                {
                    last = now.clone();
                    if tx.send(Ok(now)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        self.caller(&request, "StreamLogs", Right::Read).await?;
        let req = request.into_inner();
        let events = self.hive.events.subscribe();
        let _ = self.build(&req.build_id).await?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(logs::follow(
            self.hive.clone(),
            req.build_id,
            req.from_seq,
            req.follow,
            events,
            tx,
        ));
        let stream = ReceiverStream::new(rx).map(|r| {
            r.map_err(|e| match e {
                FollowError::Deleted => Status::not_found("build deleted"),
                FollowError::ShuttingDown => Status::unavailable("control plane shutting down"),
                FollowError::Store(e) => store_err(e),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_boxes(
        &self,
        request: Request<pb::ListBoxesRequest>,
    ) -> Result<Response<pb::ListBoxesReply>, Status> {
        self.caller(&request, "ListBoxes", Right::Read).await?;
        let rows = self.hive.store.list_boxes().await.map_err(store_err)?;
        Ok(Response::new(pb::ListBoxesReply {
            boxes: rows.iter().map(|r| self.hive.registry.info(r)).collect(),
        }))
    }

    async fn cordon_box(
        &self,
        request: Request<pb::BoxActionRequest>,
    ) -> Result<Response<pb::BoxInfo>, Status> {
        let caller = self.caller(&request, "CordonBox", Right::Operate).await?;
        let box_id = request.into_inner().box_id;
        let info = self.box_info(&box_id).await?;
        if matches!(
            pb::BoxState::try_from(info.state),
            Ok(pb::BoxState::Draining | pb::BoxState::Left)
        ) {
            return Err(Status::failed_precondition(format!(
                "box {box_id:?} is draining or gone; cordon does not apply"
            )));
        }
        drain::cordon_box(&self.hive, &box_id, &caller.audit("CordonBox", &box_id))
            .await
            .map_err(store_err)?;
        tracing::info!(%box_id, "box cordoned");
        Ok(Response::new(self.box_info(&box_id).await?))
    }

    async fn drain_box(
        &self,
        request: Request<pb::BoxActionRequest>,
    ) -> Result<Response<pb::BoxInfo>, Status> {
        let caller = self.caller(&request, "DrainBox", Right::Operate).await?;
        let box_id = request.into_inner().box_id;
        let info = self.box_info(&box_id).await?;
        if pb::BoxState::try_from(info.state) == Ok(pb::BoxState::Left) {
            return Err(Status::failed_precondition(format!(
                "box {box_id:?} has already left"
            )));
        }
        drain::drain_box(&self.hive, &box_id, &caller.audit("DrainBox", &box_id))
            .await
            .map_err(store_err)?;
        tracing::info!(%box_id, "box draining");
        Ok(Response::new(self.box_info(&box_id).await?))
    }

    async fn uncordon_box(
        &self,
        request: Request<pb::BoxActionRequest>,
    ) -> Result<Response<pb::BoxInfo>, Status> {
        let caller = self.caller(&request, "UncordonBox", Right::Operate).await?;
        let box_id = request.into_inner().box_id;
        let info = self.box_info(&box_id).await?;
        if pb::BoxState::try_from(info.state) != Ok(pb::BoxState::Cordoned) {
            return Err(Status::failed_precondition(format!(
                "box {box_id:?} is {}, not cordoned; uncordon does not apply",
                pb::BoxState::try_from(info.state)
                    .unwrap_or(pb::BoxState::Unspecified)
                    .short_name()
            )));
        }
        let changed =
            drain::uncordon_box(&self.hive, &box_id, &caller.audit("UncordonBox", &box_id))
                .await
                .map_err(store_err)?;
        if !changed {
            return Err(Status::failed_precondition(format!(
                "box {box_id:?} changed state meanwhile; look again with `hivectl boxes`"
            )));
        }
        tracing::info!(%box_id, "box uncordoned");
        Ok(Response::new(self.box_info(&box_id).await?))
    }

    async fn forget_box(
        &self,
        request: Request<pb::BoxActionRequest>,
    ) -> Result<Response<pb::ForgetBoxReply>, Status> {
        let caller = self.caller(&request, "ForgetBox", Right::Operate).await?;
        let box_id = request.into_inner().box_id;
        drain::forget_box(&self.hive, &box_id, &caller.audit("ForgetBox", &box_id))
            .await
            .map_err(|e| match e {
                drain::ForgetError::NotFound(_) => Status::not_found(e.to_string()),
                drain::ForgetError::Store(e) => store_err(e),
                _ => Status::failed_precondition(e.to_string()),
            })?;
        tracing::info!(%box_id, "box forgotten");
        Ok(Response::new(pb::ForgetBoxReply {}))
    }

    async fn set_secret(
        &self,
        request: Request<pb::SetSecretRequest>,
    ) -> Result<Response<pb::SecretInfo>, Status> {
        let caller = self.caller(&request, "SetSecret", Right::Operate).await?;
        let req = request.into_inner();
        let p = self.project(req.project.trim()).await?;
        check_secret_name(&req.name)?;
        let len = req.value.len();
        if !(4..=65_536).contains(&len) {
            return Err(Status::invalid_argument(format!(
                "secret {} is {len} bytes: a value is 4 bytes to 64 KiB (a shorter one would be \
                 masked all over the log)",
                req.name
            )));
        }
        if req.value.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "secret {}: a value cannot hold a NUL byte (it goes into an environment variable)",
                req.name
            )));
        }
        let (nonce, sealed) = self
            .hive
            .sealer
            .seal(&p.id, &req.name, req.value.as_bytes());
        let row = crate::store::SealedSecret {
            project_id: p.id.clone(),
            name: req.name.clone(),
            nonce,
            sealed,
            updated_at_ms: crate::store::now_ms(),
        };
        let audit = caller.audit("SetSecret", format!("{}/{}", p.name, req.name));
        self.hive
            .store
            .set_secret(&row, &audit)
            .await
            .map_err(store_err)?;
        tracing::info!(project = %p.name, name = %req.name, by = %caller.name, "secret set");
        Ok(Response::new(pb::SecretInfo {
            project: p.name,
            name: row.name,
            updated_at_ms: row.updated_at_ms,
        }))
    }

    async fn list_secrets(
        &self,
        request: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsReply>, Status> {
        self.caller(&request, "ListSecrets", Right::Read).await?;
        let p = self.project(request.into_inner().project.trim()).await?;
        let rows = self
            .hive
            .store
            .list_secrets(&p.id)
            .await
            .map_err(store_err)?;
        Ok(Response::new(pb::ListSecretsReply {
            secrets: rows
                .into_iter()
                .map(|r| pb::SecretInfo {
                    project: p.name.clone(),
                    name: r.name,
                    updated_at_ms: r.updated_at_ms,
                })
                .collect(),
        }))
    }

    async fn delete_secret(
        &self,
        request: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretReply>, Status> {
        let caller = self
            .caller(&request, "DeleteSecret", Right::Operate)
            .await?;
        let req = request.into_inner();
        let p = self.project(req.project.trim()).await?;
        let audit = caller.audit("DeleteSecret", format!("{}/{}", p.name, req.name));
        if !self
            .hive
            .store
            .delete_secret(&p.id, &req.name, &audit)
            .await
            .map_err(store_err)?
        {
            return Err(Status::not_found(format!(
                "project {} has no secret {:?} (see `hivectl secret list {}`)",
                p.name, req.name, p.name
            )));
        }
        Ok(Response::new(pb::DeleteSecretReply {}))
    }

    async fn clone_access(
        &self,
        request: Request<pb::CloneAccessRequest>,
    ) -> Result<Response<pb::CloneAccessReply>, Status> {
        let caller = self.caller(&request, "CloneAccess", Right::Operate).await?;
        let req = request.into_inner();
        let p = self.project(req.project.trim()).await?;
        let target = p.name.clone();
        crate::domain::clone_access::clone_access(&self.hive, &p, &req, |what| {
            let mut a = caller.audit("CloneAccess", target.clone());
            a.detail = what.to_string();
            a
        })
        .await
        .map(Response::new)
        .map_err(|e| match e {
            crate::domain::clone_access::CloneAccessError::Store(e) => store_err(e),
            e => Status::invalid_argument(e.to_string()),
        })
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenReply>, Status> {
        let caller = self
            .caller(&request, "CreateJoinToken", Right::Admin)
            .await?;
        let req = request.into_inner();
        const MAX_TTL: u64 = 7 * 86_400;
        let ttl = match req.ttl_secs {
            0 => 3600,
            t if t > MAX_TTL => {
                return Err(Status::invalid_argument(format!(
                    "--ttl {t}s is longer than 7 days: a join token is for joining a box now"
                )))
            }
            t => t,
        };
        let box_id = req.box_id.trim().to_string();
        if !box_id.is_empty() {
            crate::grpc::boxes::check_box_id(&box_id)?;
        }
        use rand::RngCore;
        let mut id = [0u8; 8];
        let mut secret = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let token = hive_types::JoinToken {
            id: hex::encode(id),
            secret: hex::encode(secret),
            ca_sha256: self.hive.ca.sha256().to_string(),
        };
        let now = crate::store::now_ms();
        let expires_at_ms = now.saturating_add(i64::try_from(ttl * 1000).unwrap_or(i64::MAX));
        let row = crate::store::JoinTokenRow {
            id: token.id.clone(),
            box_id: box_id.clone(),
            created_at_ms: now,
            created_by: caller.name.clone(),
            expires_at_ms,
            used_at_ms: 0,
            used_by: String::new(),
        };
        let audit = caller
            .audit("CreateJoinToken", &token.id)
            .with_detail(format!("ttl {ttl}s, box {box_id:?}"));
        self.hive
            .store
            .create_join_token(&row, &crate::auth::token_hash(&token.secret), &audit)
            .await
            .map_err(store_err)?;
        tracing::info!(token = %token.id, ttl_secs = ttl, box_id = %box_id, by = %caller.name, "join token made");
        Ok(Response::new(pb::CreateJoinTokenReply {
            token: token.to_string(),
            expires_at_ms,
            ca_sha256: token.ca_sha256,
        }))
    }

    async fn revoke_box(
        &self,
        request: Request<pb::BoxActionRequest>,
    ) -> Result<Response<pb::RevokeBoxReply>, Status> {
        let caller = self.caller(&request, "RevokeBox", Right::Admin).await?;
        let box_id = request.into_inner().box_id;
        crate::grpc::boxes::check_box_id(&box_id)?;
        let audit = caller.audit("RevokeBox", &box_id);
        // First in memory, so no session can connect between the commit and the end below.
        self.hive.registry.mark_revoked(&box_id);
        let n = self
            .hive
            .store
            .revoke_box_certs(&box_id, crate::store::now_ms(), &audit)
            .await
            .map_err(store_err)?;
        let ended = self.hive.registry.end_session(&box_id);
        if n == 0 && !ended {
            return Err(Status::not_found(format!(
                "box {box_id:?} has no certificate in force and no session (see `hivectl boxes`)"
            )));
        }
        tracing::warn!(%box_id, certificates = n, session_ended = ended, by = %caller.name, "box revoked");
        Ok(Response::new(pb::RevokeBoxReply {
            certificates: u32::try_from(n).unwrap_or(u32::MAX),
        }))
    }

    async fn list_cells(
        &self,
        request: Request<pb::ListCellsRequest>,
    ) -> Result<Response<pb::ListCellsReply>, Status> {
        self.caller(&request, "ListCells", Right::Read).await?;
        let box_id = request.into_inner().box_id;
        let filter = if box_id.is_empty() {
            None
        } else {
            Some(box_id.as_str())
        };
        let rows = self
            .hive
            .store
            .list_cells(filter)
            .await
            .map_err(store_err)?;
        Ok(Response::new(pb::ListCellsReply {
            cells: rows
                .into_iter()
                .map(|c| pb::CellInfo {
                    id: c.id,
                    box_id: c.box_id,
                    size_class: c.size_class,
                    state: c.state,
                    build_id: c.build_id,
                    updated_at_ms: c.updated_at_ms,
                })
                .collect(),
        }))
    }

    async fn list_size_classes(
        &self,
        request: Request<pb::ListSizeClassesRequest>,
    ) -> Result<Response<pb::ListSizeClassesReply>, Status> {
        self.caller(&request, "ListSizeClasses", Right::Read)
            .await?;
        Ok(Response::new(pb::ListSizeClassesReply {
            classes: self.hive.classes.all(),
        }))
    }

    async fn create_network(
        &self,
        request: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::PrivateNetwork>, Status> {
        let caller = self.caller(&request, "CreateNetwork", Right::Admin).await?;
        let req = request.into_inner();
        let name = req.name.trim();
        network::validate_name(name).map_err(net_err)?;
        let prefixes = network::validate_prefixes(&req.prefixes).map_err(net_err)?;
        let subnet =
            network::validate_tunnel_subnet(&req.tunnel_subnet, &prefixes).map_err(net_err)?;
        let row = self
            .hive
            .store
            .create_network(
                name,
                &prefixes,
                &subnet,
                &caller.audit("CreateNetwork", name),
            )
            .await
            .map_err(net_err)?;
        tracing::info!(network = %row.name, prefixes = ?row.prefixes, tunnel_subnet = %row.tunnel_subnet, "private network created");
        Ok(Response::new(network_to_proto(&row)))
    }

    async fn list_networks(
        &self,
        request: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::ListNetworksReply>, Status> {
        self.caller(&request, "ListNetworks", Right::Read).await?;
        let rows = self.hive.store.list_networks().await.map_err(net_err)?;
        Ok(Response::new(pb::ListNetworksReply {
            networks: rows.iter().map(network_to_proto).collect(),
        }))
    }

    async fn delete_network(
        &self,
        request: Request<pb::DeleteNetworkRequest>,
    ) -> Result<Response<pb::DeleteNetworkReply>, Status> {
        let caller = self.caller(&request, "DeleteNetwork", Right::Admin).await?;
        let name = request.into_inner().name;
        let connectors = self
            .hive
            .store
            .list_connectors(Some(&name))
            .await
            .map_err(net_err)?;
        self.hive
            .store
            .delete_network(&name, &caller.audit("DeleteNetwork", &name))
            .await
            .map_err(net_err)?;
        for c in connectors {
            self.hive.connectors.kick(&c.id);
        }
        tracing::info!(network = %name, "private network deleted");
        Ok(Response::new(pb::DeleteNetworkReply {}))
    }

    async fn add_connector(
        &self,
        request: Request<pb::AddConnectorRequest>,
    ) -> Result<Response<pb::AddConnectorReply>, Status> {
        let caller = self.caller(&request, "AddConnector", Right::Admin).await?;
        let req = request.into_inner();
        let endpoint = network::validate_endpoint(&req.endpoint).map_err(net_err)?;
        let key = network::validate_public_key(&req.public_key).map_err(net_err)?;
        let token = network::new_token();
        let row = self
            .hive
            .store
            .add_connector(
                req.network.trim(),
                &key,
                &endpoint,
                &crate::store::networks::token_hash(&token),
                &caller
                    .audit("AddConnector", req.network.trim())
                    .with_detail(format!("endpoint {endpoint} key {key}")),
            )
            .await
            .map_err(net_err)?;
        tracing::info!(network = %row.network, connector_id = %row.id, public_key = %row.public_key, endpoint = %row.endpoint, "connector added");
        let info = self.connector_info(&row).await?;
        Ok(Response::new(pb::AddConnectorReply {
            connector: Some(info),
            token,
            ca_sha256: self.hive.ca.sha256().to_string(),
        }))
    }

    async fn list_connectors(
        &self,
        request: Request<pb::ListConnectorsRequest>,
    ) -> Result<Response<pb::ListConnectorsReply>, Status> {
        self.caller(&request, "ListConnectors", Right::Read).await?;
        let network = request.into_inner().network;
        let rows = self
            .hive
            .store
            .list_connectors((!network.is_empty()).then_some(network.as_str()))
            .await
            .map_err(net_err)?;
        let mut connectors = Vec::with_capacity(rows.len());
        for r in &rows {
            connectors.push(self.connector_info(r).await?);
        }
        Ok(Response::new(pb::ListConnectorsReply { connectors }))
    }

    async fn remove_connector(
        &self,
        request: Request<pb::RemoveConnectorRequest>,
    ) -> Result<Response<pb::RemoveConnectorReply>, Status> {
        let caller = self
            .caller(&request, "RemoveConnector", Right::Admin)
            .await?;
        let which = request.into_inner().connector;
        let row = self
            .hive
            .store
            .remove_connector(which.trim(), &caller.audit("RemoveConnector", which.trim()))
            .await
            .map_err(net_err)?
            .ok_or_else(|| Status::not_found(format!("connector {which:?} not found")))?;
        self.hive.connectors.kick(&row.id);
        tracing::info!(network = %row.network, connector_id = %row.id, "connector removed");
        Ok(Response::new(pb::RemoveConnectorReply {}))
    }

    async fn list_tunnel_leases(
        &self,
        request: Request<pb::ListTunnelLeasesRequest>,
    ) -> Result<Response<pb::ListTunnelLeasesReply>, Status> {
        self.caller(&request, "ListTunnelLeases", Right::Operate)
            .await?;
        let req = request.into_inner();
        let rows = self
            .hive
            .store
            .list_tunnel_leases(&req.network, &req.build_id, false)
            .await
            .map_err(net_err)?;
        Ok(Response::new(pb::ListTunnelLeasesReply {
            leases: rows
                .into_iter()
                .map(|l| pb::TunnelLease {
                    build_id: l.build_id,
                    network: l.network,
                    public_key: l.public_key,
                    tunnel_address: l.tunnel_address,
                    state: l.state,
                    issued_at_ms: l.issued_at_ms,
                    revoked_at_ms: l.revoked_at_ms,
                    lease_id: l.lease_id,
                })
                .collect(),
        }))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenReply>, Status> {
        let caller = self.caller(&request, "CreateToken", Right::Admin).await?;
        let req = request.into_inner();
        let Some(role) = Role::parse(req.role.trim()) else {
            return Err(Status::invalid_argument(format!(
                "role {:?} is not one of admin, operator, read-only, submitter",
                req.role
            )));
        };
        let (project_id, project_name) = match req.project.trim() {
            "" => (String::new(), String::new()),
            p if role == Role::Submitter => {
                let p = self.project(p).await?;
                (p.id, p.name)
            }
            _ => {
                return Err(Status::invalid_argument(format!(
                    "--project binds a submitter token to one project; a {} token is not bound",
                    role.name()
                )))
            }
        };
        let name = req.name.trim();
        if name.len() > 64 || name.chars().any(|c| c.is_control()) {
            return Err(Status::invalid_argument(format!(
                "token name {name:?} must be at most 64 printable characters"
            )));
        }
        let id = crate::store::new_id();
        let row = TokenRow {
            name: if name.is_empty() {
                format!("{}-{}", role.name(), &id[id.len() - 8..])
            } else {
                name.to_string()
            },
            id,
            role: role.name().to_string(),
            project_id,
            project_name,
            created_at_ms: crate::store::now_ms(),
            created_by: caller.name.clone(),
            revoked_at_ms: 0,
        };
        let token = auth::new_token();
        let audit = caller.audit("CreateToken", &row.id).with_detail(format!(
            "name {} role {}{}",
            row.name,
            row.role,
            if row.project_name.is_empty() {
                String::new()
            } else {
                format!(" project {}", row.project_name)
            }
        ));
        self.hive
            .store
            .create_token(&row, &auth::token_hash(&token), &audit)
            .await
            .map_err(store_err)?;
        tracing::info!(token_id = %row.id, name = %row.name, role = %row.role,
            project = %row.project_name, by = %caller.name, "API token created");
        Ok(Response::new(pb::CreateTokenReply {
            info: Some(token_to_proto(&row)),
            token,
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensReply>, Status> {
        self.caller(&request, "ListTokens", Right::Admin).await?;
        let rows = self.hive.store.list_tokens().await.map_err(store_err)?;
        Ok(Response::new(pb::ListTokensReply {
            tokens: rows.iter().map(token_to_proto).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        let caller = self.caller(&request, "RevokeToken", Right::Admin).await?;
        let id = request.into_inner().id;
        let id = id.trim();
        if id.is_empty() {
            return Err(Status::invalid_argument("token id is required"));
        }
        let row = self
            .hive
            .store
            .revoke_token(id, crate::store::now_ms(), &caller.audit("RevokeToken", id))
            .await
            .map_err(store_err)?
            .ok_or_else(|| Status::not_found(format!("token {id:?} not found")))?;
        tracing::info!(token_id = %row.id, name = %row.name, by = %caller.name, "API token revoked");
        Ok(Response::new(token_to_proto(&row)))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditReply>, Status> {
        self.caller(&request, "ListAudit", Right::Admin).await?;
        let limit = request.into_inner().limit;
        let rows = self.hive.store.list_audit(limit).await.map_err(store_err)?;
        Ok(Response::new(pb::ListAuditReply {
            entries: rows.into_iter().map(audit_to_proto).collect(),
        }))
    }
}

/// A secret's name is an environment variable's: `[A-Za-z_][A-Za-z0-9_]*`, at most 128, and not
/// `HIVE_*` (Hive's own settings ride in the environment).
fn check_secret_name(name: &str) -> Result<(), Status> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("HIVE_");
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "secret name {name:?}: an environment variable name ([A-Za-z_][A-Za-z0-9_]*, at most \
             128), not starting with HIVE_"
        )))
    }
}
