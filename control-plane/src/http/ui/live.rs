//! The dashboard's Server-Sent Events: `/ui/builds/events` sends a builds list's rows as they
//! change (`row`: the row's HTML; `gone`: a build left the filter; `resync`: too much was
//! missed, reload), and `/ui/builds/{id}/events` a build's summary (`build`), its log lines
//! (`log`, from `domain::logs::follow`) and where each step's output starts (`step`: `n:line`)
//! until it has ended (`end`).
//!
//! Each stream holds one of [`super::MAX_LIVE_STREAMS`] permits, checks its session again every
//! [`RECHECK`] (a signed-out session or a revoked token ends it), ends on shutdown, and is fed
//! by a task that never blocks the broadcast: a slow browser makes its own stream lag and
//! resync, nothing else.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, KeepAliveStream, Sse};
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::ansi::LogView;
use super::pages::{self, BuildsQuery};
use super::{Signed, Ui, UiError};
use crate::domain::logs::{self, FollowError};
use crate::events::Event;
use crate::store::now_ms;

/// How often a stream checks that its session still stands.
pub const RECHECK: Duration = Duration::from_secs(30);
/// Most log bytes sent in one `log` event (chunks waiting are sent together up to this).
const LOG_EVENT_BYTES: usize = 256 * 1024;

type Events = Sse<KeepAliveStream<ReceiverStream<Result<SseEvent, Infallible>>>>;

/// An SSE event of HTML. Carriage returns cannot travel in SSE data (lines are split on them),
/// and in escaped markup they are only whitespace: dropped.
fn html_event(name: &str, html: &str) -> SseEvent {
    SseEvent::default().event(name).data(html.replace('\r', ""))
}

fn sse(rx: mpsc::Receiver<Result<SseEvent, Infallible>>) -> Events {
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}

/// Whether `signed`'s session and token still stand.
async fn still_signed(ui: &Ui, signed: &Signed) -> bool {
    ui.sessions.get(&signed.session_id).is_some()
        && crate::auth::authenticate_hash(&ui.hive.store, &signed.session.token_hash)
            .await
            .is_ok()
}

fn permit(ui: &Ui) -> Result<tokio::sync::OwnedSemaphorePermit, UiError> {
    ui.live.clone().try_acquire_owned().map_err(|_| {
        tracing::warn!("dashboard: too many live streams; one refused");
        UiError::Busy
    })
}

/// `GET /ui/builds/events?project=&state=`: rows of the filtered list as builds change.
pub async fn builds(
    State(ui): State<Arc<Ui>>,
    signed: Signed,
    Query(q): Query<BuildsQuery>,
) -> Result<Events, UiError> {
    let permit = permit(&ui)?;
    let filter = pages::build_filter(&ui, &q).await?;
    let mut events = ui.hive.events.subscribe();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let _permit = permit;
        let mut shutdown = ui.hive.shutdown.clone();
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.tick().await;
        loop {
            let heard = tokio::select! {
                e = events.recv() => e,
                _ = recheck.tick() => {
                    if still_signed(&ui, &signed).await { continue } else { return }
                }
                _ = crate::events::stopped(&mut shutdown) => return,
                _ = tx.closed() => return,
            };
            let id = match heard {
                Ok(Event::Build(id)) => id,
                Ok(Event::Log(..)) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = tx
                        .send(Ok(SseEvent::default().event("resync").data("lagged")))
                        .await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let ev = match ui.hive.store.get_build(&id).await {
                Ok(Some(b)) if pages::matches(&filter, &b) => {
                    html_event("row", &pages::build_row(&b, now_ms()).into_string())
                }
                Ok(_) => SseEvent::default().event("gone").data(id),
                Err(e) => {
                    tracing::warn!(error = %e, build_id = %id, "dashboard: read build for the live list");
                    continue;
                }
            };
            // A browser that does not keep up loses its stream (it reconnects and reloads),
            // never holds up this task's reading of the broadcast for long.
            match tokio::time::timeout(Duration::from_secs(10), tx.send(Ok(ev))).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    });
    Ok(sse(rx))
}

#[derive(Debug, Deserialize)]
pub struct FromQuery {
    /// The first log seq the page does not show.
    #[serde(default)]
    seq: u64,
    /// The number of the first line the stream sends.
    #[serde(default)]
    line: u64,
}

/// Where a reconnecting browser left off: its `Last-Event-ID` (`seq:line`), else the query.
fn resume_point(headers: &HeaderMap, q: &FromQuery) -> (u64, u64) {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(':'))
        .and_then(|(s, l)| Some((s.parse().ok()?, l.parse().ok()?)))
        .unwrap_or((q.seq, q.line))
}

/// `GET /ui/builds/{id}/events?seq=&line=`: the build's summary now and on each change, and
/// its log lines from `seq` on, until the build has ended.
pub async fn build(
    State(ui): State<Arc<Ui>>,
    signed: Signed,
    Path(id): Path<String>,
    Query(q): Query<FromQuery>,
    headers: HeaderMap,
) -> Result<Events, UiError> {
    let permit = permit(&ui)?;
    let (from_seq, first_line) = resume_point(&headers, &q);
    // Subscribe before reading, so no change falls in between.
    let mut events = ui.hive.events.subscribe();
    let follower_events = ui.hive.events.subscribe();
    let (b, t) = ui
        .hive
        .store
        .build_with_history(&id)
        .await?
        .ok_or_else(|| UiError::NotFound(format!("build {id:?} not found")))?;
    let (tx, rx) = mpsc::channel(64);
    let (chunk_tx, mut chunks) = mpsc::channel(64);
    tokio::spawn(logs::follow(
        ui.hive.clone(),
        b.id.clone(),
        from_seq,
        true,
        follower_events,
        chunk_tx,
    ));
    let check = signed.clone();
    let summary = move |b: &crate::store::BuildRow, t: &[crate::store::TransitionRow]| {
        pages::summary(b, t, &signed, now_ms()).into_string()
    };
    let first = html_event("build", &summary(&b, &t));
    tokio::spawn(async move {
        let _permit = permit;
        let id = b.id;
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        let mut view = LogView::starting_at(first_line);
        let mut next_seq = from_seq;
        let mut shutdown = ui.hive.shutdown.clone();
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.tick().await;
        let send = |ev: SseEvent| {
            let tx = tx.clone();
            async move {
                matches!(
                    tokio::time::timeout(Duration::from_secs(10), tx.send(Ok(ev))).await,
                    Ok(Ok(()))
                )
            }
        };
        loop {
            tokio::select! {
                chunk = chunks.recv() => {
                    let mut html = String::new();
                    let mut done = false;
                    let mut chunk = chunk;
                    let mut bytes = 0;
                    // This chunk and those already waiting, as one event.
                    loop {
                        match chunk {
                            Some(Ok(c)) => {
                                next_seq = c.seq + 1;
                                bytes += c.data.len();
                                view.push(c.step, &c.data, &mut html);
                            }
                            Some(Err(FollowError::ShuttingDown)) => return,
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, build_id = %id, "dashboard: log follow ended");
                                done = true;
                                break;
                            }
                            None => {
                                done = true;
                                break;
                            }
                        }
                        if bytes >= LOG_EVENT_BYTES {
                            break;
                        }
                        match chunks.try_recv() {
                            Ok(c) => chunk = Some(c),
                            Err(_) => break,
                        }
                    }
                    if done {
                        view.flush(&mut html);
                    }
                    for (step, line) in view.take_step_starts() {
                        // Numbers only: the script makes the link itself.
                        let ev = SseEvent::default().event("step").data(format!("{step}:{line}"));
                        if !send(ev).await {
                            return;
                        }
                    }
                    if !html.is_empty() {
                        let ev = html_event("log", &html)
                            .id(format!("{next_seq}:{}", view.next_line()));
                        if !send(ev).await {
                            return;
                        }
                    }
                    if done {
                        // The follower ends once the build has ended and every chunk is sent.
                        if let Ok(Some((b, t))) = ui.hive.store.build_with_history(&id).await {
                            let _ = send(html_event("build", &summary(&b, &t))).await;
                        }
                        let _ = send(SseEvent::default().event("end").data("ended")).await;
                        return;
                    }
                }
                heard = events.recv() => {
                    match heard {
                        Ok(Event::Build(b)) if b == id => {}
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                    match ui.hive.store.build_with_history(&id).await {
                        Ok(Some((b, t))) => {
                            if !send(html_event("build", &summary(&b, &t))).await {
                                return;
                            }
                        }
                        Ok(None) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, build_id = %id, "dashboard: read build for its live page");
                        }
                    }
                }
                _ = recheck.tick() => {
                    if !still_signed(&ui, &check).await { return }
                }
                _ = crate::events::stopped(&mut shutdown) => return,
                _ = tx.closed() => return,
            }
        }
    });
    Ok(sse(rx))
}
