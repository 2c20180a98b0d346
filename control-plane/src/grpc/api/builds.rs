//! Builds: submit, rebuild, show, list, cancel, watch their states and stream their logs.
//! Revisions and ref names are checked here by git's rules before a build is queued.

use hive_proto::v1::{self as pb, BuildState};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::{store_err, ControlPlaneService, Stream_};
use crate::auth::Right;
use crate::domain::cancel::{self, CancelError};
use crate::domain::logs::{self, FollowError};
use crate::domain::submit;
use crate::events::Event;
use crate::refglob;
use crate::store::{BuildFilter, BuildRow, TransitionRow};

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

/// An idempotency key of SubmitBuild: 1 to 128 characters of `[A-Za-z0-9._:-]` (a UUID fits).
pub fn check_request_id(id: &str) -> Result<(), Status> {
    let ok = (1..=128).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "request_id {:?} is not an idempotency key: give 1 to 128 characters of \
             A-Z a-z 0-9 . _ : - (a UUID will do)",
            clip(id)
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

impl ControlPlaneService {
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
}

pub(super) async fn submit_build(
    svc: &ControlPlaneService,
    request: Request<pb::SubmitBuildRequest>,
) -> Result<Response<pb::Build>, Status> {
    let caller = svc.caller(&request, "SubmitBuild", Right::Submit).await?;
    let req = request.into_inner();
    let p = svc.project(&req.project).await?;
    caller.require_project("SubmitBuild", &p.id, &p.name)?;
    if !svc.hive.regions.builds_here(&p.hive) {
        return Err(Status::failed_precondition(format!(
            "project {} is built by hive {:?}, not this one ({:?}): submit it to that hive's \
             control plane",
            p.name, p.hive, svc.hive.regions.name
        )));
    }
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
    if !req.request_id.is_empty() {
        check_request_id(&req.request_id)?;
    }
    // The trigger names the request id, as a webhook build's names its delivery.
    let trigger = if req.request_id.is_empty() {
        "api".to_string()
    } else {
        format!("api:{}", req.request_id)
    };
    let build = BuildRow::new_queued(&p, &req.revision, &git_ref, &trigger);
    let audit = caller
        .audit("SubmitBuild", &build.id)
        .with_detail(format!("project {}", p.name));
    if !req.request_id.is_empty() {
        let earlier = submit::submit_once(
            &svc.hive,
            &build,
            &req.request_id,
            "submitted via api",
            &audit,
        )
        .await
        .map_err(store_err)?;
        if let Some(id) = earlier {
            let b = svc.full_build(&id).await?;
            // The same key for other code is a client bug, not a retry: say so.
            // Only what the request names: a default (the project's branch) may have changed
            // since the first try.
            if (!req.revision.is_empty() && b.revision != req.revision)
                || (!req.git_ref.is_empty() && b.git_ref != git_ref)
            {
                let at = |rev: &str| {
                    if rev.is_empty() {
                        "its tip".to_string()
                    } else {
                        rev.to_string()
                    }
                };
                return Err(Status::already_exists(format!(
                    "request_id {:?} was used for build {id} of {} at {}; this request names \
                     {} at {}: give each submission its own request_id",
                    req.request_id,
                    b.git_ref,
                    at(&b.revision),
                    git_ref,
                    at(&req.revision)
                )));
            }
            tracing::info!(build_id = %id, project = %p.name, request_id = %req.request_id,
                "build submitted again under the same request id: answered with the first");
            return Ok(Response::new(b));
        }
    } else {
        submit::submit(&svc.hive, &build, "submitted via api", &audit)
            .await
            .map_err(store_err)?;
    }
    tracing::info!(build_id = %build.id, project = %p.name, "build submitted");
    // The build as committed (queued); the scheduler may already be placing it.
    let first = TransitionRow {
        state: BuildState::Queued,
        at_ms: build.created_at_ms,
        reason: "submitted via api".to_string(),
    };
    Ok(Response::new(build_to_proto(&build, &[first])))
}

pub(super) async fn rebuild_build(
    svc: &ControlPlaneService,
    request: Request<pb::RebuildBuildRequest>,
) -> Result<Response<pb::Build>, Status> {
    let caller = svc.caller(&request, "RebuildBuild", Right::Submit).await?;
    let old_id = request.into_inner().id;
    let (p, build, reason) = submit::rebuild_of(&svc.hive, &old_id)
        .await
        .map_err(|e| match e {
            submit::RebuildError::NotFound(_) => Status::not_found(e.to_string()),
            submit::RebuildError::ProjectGone { .. } => Status::failed_precondition(e.to_string()),
            submit::RebuildError::Store(e) => store_err(e),
        })?;
    caller.require_project("RebuildBuild", &p.id, &p.name)?;
    let audit = caller
        .audit("RebuildBuild", &build.id)
        .with_detail(format!("project {}, {reason}", p.name));
    submit::submit(&svc.hive, &build, &reason, &audit)
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

pub(super) async fn get_build(
    svc: &ControlPlaneService,
    request: Request<pb::GetBuildRequest>,
) -> Result<Response<pb::Build>, Status> {
    svc.caller(&request, "GetBuild", Right::Read).await?;
    Ok(Response::new(
        svc.full_build(&request.into_inner().id).await?,
    ))
}

pub(super) async fn list_builds(
    svc: &ControlPlaneService,
    request: Request<pb::ListBuildsRequest>,
) -> Result<Response<pb::ListBuildsReply>, Status> {
    svc.caller(&request, "ListBuilds", Right::Read).await?;
    let req = request.into_inner();
    let project_id = if req.project.is_empty() {
        None
    } else {
        Some(svc.project(&req.project).await?.id)
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
    let rows = svc
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

pub(super) async fn cancel_build(
    svc: &ControlPlaneService,
    request: Request<pb::CancelBuildRequest>,
) -> Result<Response<pb::Build>, Status> {
    let caller = svc.caller(&request, "CancelBuild", Right::Submit).await?;
    let req = request.into_inner();
    if req.id.is_empty() {
        return Err(Status::invalid_argument("build id is required"));
    }
    if !caller.project_id.is_empty() {
        let b = svc.build(&req.id).await?;
        caller.require_project("CancelBuild", &b.project_id, &b.project_name)?;
    }
    let reason = if req.reason.is_empty() {
        "cancelled via api".to_string()
    } else {
        format!("cancelled via api: {}", req.reason)
    };
    let audit = caller.audit("CancelBuild", &req.id);
    let before = cancel::cancel(&svc.hive, &req.id, &reason, &audit)
        .await
        .map_err(|e| match e {
            CancelError::NotFound(_) => Status::not_found(e.to_string()),
            CancelError::AlreadyEnded { .. } => Status::failed_precondition(e.to_string()),
            CancelError::Store(e) => store_err(e),
        })?;
    Ok(Response::new(svc.full_build(&before.id).await?))
}

pub(super) async fn watch_build(
    svc: &ControlPlaneService,
    request: Request<pb::WatchBuildRequest>,
) -> Result<Response<Stream_<pb::Build>>, Status> {
    svc.caller(&request, "WatchBuild", Right::Read).await?;
    let id = request.into_inner().id;
    // Subscribe first, then read: a change in between is then heard, not lost.
    let mut events = svc.hive.events.subscribe();
    let first = svc.full_build(&id).await?;
    let (tx, rx) = mpsc::channel(16);
    let this = svc.clone();
    let mut shutdown = svc.hive.shutdown.clone();
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

pub(super) async fn stream_logs(
    svc: &ControlPlaneService,
    request: Request<pb::StreamLogsRequest>,
) -> Result<Response<Stream_<pb::LogChunk>>, Status> {
    svc.caller(&request, "StreamLogs", Right::Read).await?;
    let req = request.into_inner();
    let events = svc.hive.events.subscribe();
    let _ = svc.build(&req.build_id).await?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(logs::follow(
        svc.hive.clone(),
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

/// The artefacts a build stored (read like its log).
pub(super) async fn list_artifacts(
    svc: &ControlPlaneService,
    request: Request<pb::ListArtifactsRequest>,
) -> Result<Response<pb::ListArtifactsReply>, Status> {
    svc.caller(&request, "ListArtifacts", Right::Read).await?;
    let req = request.into_inner();
    let _ = svc.build(&req.build_id).await?;
    let rows = svc
        .hive
        .store
        .list_artifacts(&req.build_id)
        .await
        .map_err(store_err)?;
    Ok(Response::new(pb::ListArtifactsReply {
        artifacts: rows
            .into_iter()
            .map(|r| pb::Artifact {
                path: r.path,
                size: r.size,
                stored_bytes: r.stored_bytes,
                complete: r.complete,
                sha256: r.sha256,
                created_at_ms: r.created_at_ms,
            })
            .collect(),
    }))
}

/// Bytes of an artefact per GetArtifact message (gRPC messages stay under 4 MiB).
const ARTIFACT_PIECE: usize = 1024 * 1024;

/// One artefact's bytes, in pieces (read like its log).
pub(super) async fn get_artifact(
    svc: &ControlPlaneService,
    request: Request<pb::GetArtifactRequest>,
) -> Result<Response<Stream_<pb::ArtifactData>>, Status> {
    svc.caller(&request, "GetArtifact", Right::Read).await?;
    let req = request.into_inner();
    let _ = svc.build(&req.build_id).await?;
    crate::artifacts::check_path(&req.path).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let row = svc
        .hive
        .store
        .artifact(&req.build_id, &req.path)
        .await
        .map_err(store_err)?
        .ok_or_else(|| {
            Status::not_found(format!(
                "build {} has no artifact {:?} (`hivectl artifacts {}` lists them)",
                req.build_id, req.path, req.build_id
            ))
        })?;
    if !row.complete {
        return Err(Status::failed_precondition(format!(
            "artifact {:?} is incomplete: {} of {} bytes arrived",
            req.path, row.stored_bytes, row.size
        )));
    }
    let file = svc
        .hive
        .artifacts
        .open(&req.build_id, &req.path)
        .map_err(|e| {
            Status::unavailable(format!(
                "{} (is <data-dir>/artifacts shared by every control plane of the hive?)",
                hive_sys::error_chain(&e)
            ))
        })?;
    let size = row.size;
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let mut offset = 0u64;
        while offset < size {
            let want = usize::try_from(size - offset)
                .unwrap_or(usize::MAX)
                .min(ARTIFACT_PIECE);
            let mut buf = vec![0u8; want];
            let msg = match file.read_at(&mut buf, offset) {
                Ok(0) => Err(Status::data_loss(format!(
                    "the artifact file ends at {offset} of {size} bytes"
                ))),
                Ok(n) => {
                    buf.truncate(n);
                    let m = pb::ArtifactData { offset, data: buf };
                    offset += n as u64;
                    Ok(m)
                }
                Err(e) => Err(Status::internal(format!("read artifact: {e}"))),
            };
            let stop = msg.is_err();
            if tx.blocking_send(msg).is_err() || stop {
                return;
            }
        }
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}
