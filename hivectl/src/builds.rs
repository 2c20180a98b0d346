//! `submit`, `rebuild`, `builds`, `build`, `logs`, `watch` and `cancel`.

use std::io::Write;

use hive_proto::v1::{
    Build, BuildState, CancelBuildRequest, GetArtifactRequest, ListArtifactsRequest,
    ListBuildsRequest, RebuildBuildRequest, StreamLogsRequest, SubmitBuildRequest,
};
use tokio_stream::StreamExt;

use crate::ctl::{follow_states, outcome, progress_line, CliError, Ctl, Progress};
use crate::render;

/// Tries of a SubmitBuild whose answer was lost (the control plane restarts, or died after the
/// build was queued but before it answered; the connection broke): the same request id every time, so the
/// retry is answered with the build the lost call made, never a second one.
const SUBMIT_TRIES: u32 = 5;

/// `submit`, with `--wait` following the build to its end.
pub(crate) async fn submit(
    ctl: &mut Ctl,
    project: String,
    rev: Option<String>,
    git_ref: Option<String>,
    request_id: Option<String>,
    wait: bool,
) -> Result<(), CliError> {
    let req = SubmitBuildRequest {
        project: project.clone(),
        revision: rev.unwrap_or_default(),
        git_ref: git_ref.unwrap_or_default(),
        request_id: request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
    };
    let mut tries = 0;
    let b = loop {
        tries += 1;
        match ctl.client.submit_build(req.clone()).await {
            Ok(b) => break b.into_inner(),
            // Lost on the way (the connection broke, the control plane went away): safe to
            // send again under the same request id.
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) && tries < SUBMIT_TRIES =>
            {
                eprintln!(
                    "hivectl: control plane unavailable ({}); retrying with request id {}",
                    s.message(),
                    req.request_id
                );
                tokio::time::sleep(std::time::Duration::from_secs(u64::from(tries))).await;
            }
            Err(s) => return Err(ctl.status(format!("submit build of {project:?}"), s)),
        }
    };
    queued(ctl, b, wait).await
}

/// `rebuild`.
pub(crate) async fn rebuild(ctl: &mut Ctl, id: String, wait: bool) -> Result<(), CliError> {
    let b = ctl
        .client
        .rebuild_build(RebuildBuildRequest { id: id.clone() })
        .await
        .map_err(|s| ctl.status(format!("rebuild {id}"), s))?
        .into_inner();
    queued(ctl, b, wait).await
}

/// Shows a build just queued; with `wait`, follows it to its end (the exit code tells how).
async fn queued(ctl: &mut Ctl, b: Build, wait: bool) -> Result<(), CliError> {
    if !wait {
        return if ctl.json {
            ctl.out_json(&render::build_json(&b))
        } else {
            ctl.out(&format!("build {} {}\n", b.id, render::state_name(b.state)))
        };
    }
    let mut progress = Progress::new();
    progress.set(progress_line(&b));
    // Transitions already shown: a watch answer that comes late (the build moved on meanwhile)
    // still shows every state the build went through, in order.
    let mut shown = b.transitions.len().max(1);
    let end = follow_states(
        ctl,
        &b.id,
        |b, p| {
            if let Some(p) = p {
                let earlier = b.transitions.len().saturating_sub(1);
                for t in b.transitions.iter().take(earlier).skip(shown) {
                    let mut line = format!("build {}: {}", b.id, render::state_name(t.state));
                    if !t.reason.is_empty() {
                        line.push_str(&format!(" — {}", t.reason));
                    }
                    p.set(line);
                }
                shown = shown.max(b.transitions.len());
                p.set(progress_line(b));
            }
        },
        Some(&mut progress),
    )
    .await?;
    progress.finish(progress_line(&end));
    if ctl.json {
        ctl.out_json(&render::build_json(&end))?;
    } else {
        ctl.out(&format!(
            "build {} {}\n",
            end.id,
            render::state_name(end.state)
        ))?;
    }
    outcome(&end)
}

/// `builds`.
pub(crate) async fn list(
    ctl: &mut Ctl,
    project: Option<String>,
    state: Option<BuildState>,
    limit: u32,
    now: i64,
) -> Result<(), CliError> {
    let bs = ctl
        .client
        .list_builds(ListBuildsRequest {
            project: project.unwrap_or_default(),
            state: state.unwrap_or(BuildState::Unspecified) as i32,
            limit,
        })
        .await
        .map_err(|s| ctl.status("list builds", s))?
        .into_inner()
        .builds;
    if ctl.json {
        ctl.out_json(&serde_json::Value::Array(
            bs.iter().map(render::build_json).collect(),
        ))
    } else {
        ctl.out(&render::builds_table(&bs, now))
    }
}

/// `build`.
pub(crate) async fn show(ctl: &mut Ctl, id: String, now: i64) -> Result<(), CliError> {
    let b = ctl.get_build(&id).await?;
    if ctl.json {
        ctl.out_json(&render::build_json(&b))
    } else {
        ctl.out(&render::build_text(&b, now))
    }
}

/// `logs`, with `-f` until the build ends.
pub(crate) async fn logs(
    ctl: &mut Ctl,
    id: String,
    follow: bool,
    from: u64,
) -> Result<(), CliError> {
    let mut stream = ctl
        .client
        .stream_logs(StreamLogsRequest {
            build_id: id.clone(),
            from_seq: from,
            follow,
        })
        .await
        .map_err(|s| ctl.status(format!("logs of build {id}"), s))?
        .into_inner();
    while let Some(item) = stream.next().await {
        let chunk = item.map_err(|s| ctl.status(format!("logs of build {id}"), s))?;
        if ctl.json {
            let mut line = render::log_json(&chunk).to_string();
            line.push('\n');
            ctl.out(&line)?;
        } else {
            let mut o = std::io::stdout().lock();
            o.write_all(&chunk.data).map_err(CliError::Output)?;
            o.flush().map_err(CliError::Output)?;
        }
    }
    if !follow {
        return Ok(());
    }
    let b = ctl.get_build(&id).await?;
    if !BuildState::try_from(b.state).is_ok_and(BuildState::is_terminal) {
        return Err(CliError::StreamCut {
            what: format!("logs of build {id}"),
        });
    }
    outcome(&b)
}

/// `watch`.
pub(crate) async fn watch(ctl: &mut Ctl, id: String) -> Result<(), CliError> {
    let json = ctl.json;
    // Transitions already printed: the first answer carries the history, so a watch
    // that attaches late still shows every state the build went through, in order.
    let mut shown = 0usize;
    let end = follow_states(
        ctl,
        &id,
        |b, _| {
            // History and live changes print alike (`render::watch_line`).
            let mut out = String::new();
            let current = render::current_transition(b);
            let earlier = if b
                .transitions
                .last()
                .is_some_and(|t| t.state == current.state)
            {
                b.transitions.len() - 1
            } else {
                b.transitions.len()
            };
            for t in b.transitions.iter().take(earlier).skip(shown) {
                out.push_str(&render::watch_line(t, &b.id, None, json));
                out.push('\n');
            }
            // The current state's line stands for its transition: never printed again.
            shown = shown.max(b.transitions.len());
            out.push_str(&render::watch_line(&current, &b.id, Some(b), json));
            // A closed stdout only ends the output, not the wait.
            let _ = writeln!(std::io::stdout().lock(), "{out}");
        },
        None,
    )
    .await?;
    outcome(&end)
}

/// `cancel`.
pub(crate) async fn cancel(ctl: &mut Ctl, id: String, reason: String) -> Result<(), CliError> {
    let b = ctl
        .client
        .cancel_build(CancelBuildRequest {
            id: id.clone(),
            reason,
        })
        .await
        .map_err(|s| ctl.status(format!("cancel build {id}"), s))?
        .into_inner();
    if ctl.json {
        ctl.out_json(&render::build_json(&b))
    } else {
        ctl.out(&format!("build {} {}\n", b.id, render::state_name(b.state)))
    }
}

/// `artifacts ID`: the build's artefacts.
pub(crate) async fn artifacts(ctl: &mut Ctl, id: String) -> Result<(), CliError> {
    let list = ctl
        .client
        .list_artifacts(ListArtifactsRequest {
            build_id: id.clone(),
        })
        .await
        .map_err(|s| ctl.status(format!("artifacts of build {id}"), s))?
        .into_inner()
        .artifacts;
    if ctl.json {
        return ctl.out_json(&serde_json::Value::Array(
            list.iter()
                .map(|a| {
                    serde_json::json!({
                        "path": a.path,
                        "size": a.size,
                        "stored_bytes": a.stored_bytes,
                        "complete": a.complete,
                        "sha256": a.sha256,
                        "created_at_ms": a.created_at_ms,
                    })
                })
                .collect(),
        ));
    }
    if list.is_empty() {
        return ctl.out(&format!(
            "build {id} has no artifacts (its hive.toml names them under `artifacts`)\n"
        ));
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|a| {
            vec![
                a.path.clone(),
                a.size.to_string(),
                if a.complete {
                    a.sha256.clone()
                } else {
                    format!("incomplete ({} of {} bytes)", a.stored_bytes, a.size)
                },
            ]
        })
        .collect();
    ctl.out(&render::table(&["PATH", "BYTES", "SHA256"], &rows))
}

/// `artifacts ID --get PATH [-o FILE]`: downloads one artefact; the file appears only once
/// all of it arrived (written to `FILE.part`, then renamed).
pub(crate) async fn get_artifact(
    ctl: &mut Ctl,
    id: String,
    path: String,
    output: Option<String>,
) -> Result<(), CliError> {
    let what = format!("artifact {path:?} of build {id}");
    let mut stream = ctl
        .client
        .get_artifact(GetArtifactRequest {
            build_id: id.clone(),
            path: path.clone(),
        })
        .await
        .map_err(|s| ctl.status(what.clone(), s))?
        .into_inner();
    let target = output.unwrap_or_else(|| {
        path.rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .unwrap_or("artifact")
            .to_string()
    });
    let to_stdout = target == "-";
    let part = format!("{target}.part");
    let write_err = |source| CliError::WriteFile {
        path: if to_stdout {
            "stdout".into()
        } else {
            part.clone()
        },
        source,
    };
    let mut sink: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::fs::File::create(&part).map_err(write_err)?)
    };
    let mut bytes = 0u64;
    while let Some(item) = stream.next().await {
        let piece = match item {
            Ok(p) => p,
            Err(s) => {
                drop(sink);
                if !to_stdout {
                    let _ = std::fs::remove_file(&part);
                }
                return Err(ctl.status(what, s));
            }
        };
        sink.write_all(&piece.data).map_err(write_err)?;
        bytes += piece.data.len() as u64;
    }
    sink.flush().map_err(write_err)?;
    drop(sink);
    if !to_stdout {
        std::fs::rename(&part, &target).map_err(|source| CliError::WriteFile {
            path: target.clone(),
            source,
        })?;
        eprintln!("{target}: {bytes} bytes");
    }
    Ok(())
}
