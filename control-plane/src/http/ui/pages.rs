//! The dashboard's pages and forms: sign-in and sign-out, the builds list, a build (summary,
//! timeline, steps, log, cancel and rebuild), the raw log, the fleet, projects and networks.
//! Markup is maud's `html!`, which escapes every `(value)`; the only unescaped HTML is the log,
//! which `ansi` escapes itself.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Form;
use hive_proto::v1::{BoxState, BuildState};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde::Deserialize;

use super::ansi::LogView;
use super::session;
use super::{Signed, Ui, UiError};
use crate::auth::{self, Caller, Right};
use crate::domain::cancel::{self, CancelError};
use crate::domain::logs::LOG_PAGE;
use crate::domain::submit::{self, RebuildError};
use crate::store::{now_ms, BuildFilter, BuildRow, TransitionRow};

const CSS: &str = include_str!("assets/ui.css");
const JS: &str = include_str!("assets/ui.js");

/// Rows the builds list shows.
pub const LIST_LIMIT: u32 = 200;
/// Most log bytes a build page renders; the rest is in the raw log.
pub const PAGE_LOG_BYTES: usize = 1024 * 1024;

// ---------- formatting ----------

/// `2026-12-05 10:22:41Z` (UTC); empty for 0.
pub fn iso(ms: i64) -> String {
    hive_types::time::iso(ms, ' ')
}

/// `850ms`, `42s`, `3m 05s`, `2h 10m`.
pub fn duration(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

/// `12s ago`, `5m 02s ago`; `just now` under a second; `never` for 0.
pub fn ago(ms: i64, now: i64) -> String {
    if ms <= 0 {
        return "never".to_string();
    }
    if now - ms < 1000 {
        return "just now".to_string();
    }
    format!("{} ago", duration((now - ms) / 1000 * 1000))
}

fn time(ms: i64) -> Markup {
    html! {
        @if ms > 0 { time datetime=(iso(ms).replace(' ', "T")) { (iso(ms)) } } @else { "-" }
    }
}

fn dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

fn short_ref(r: &str) -> &str {
    r.strip_prefix("refs/heads/")
        .or_else(|| r.strip_prefix("refs/tags/"))
        .unwrap_or(r)
}

fn short_rev(r: &str) -> String {
    r.chars().take(12).collect()
}

fn state_icon(s: BuildState) -> &'static str {
    match s {
        BuildState::Queued => "◷",
        BuildState::Placed => "◔",
        BuildState::Running => "▶",
        BuildState::Succeeded => "✔",
        BuildState::Failed => "✘",
        BuildState::Cancelled => "⊘",
        BuildState::TimedOut => "⌛",
        BuildState::Unspecified => "?",
    }
}

/// A build state: icon and name, coloured by class.
pub fn state_badge(s: BuildState) -> Markup {
    html! {
        span class=(format!("state s-{}", s.short_name())) {
            span aria-hidden="true" { (state_icon(s)) } " " (s.short_name().replace('_', " "))
        }
    }
}

/// How long a build ran (or has run so far), from its start.
fn build_duration(b: &BuildRow, now: i64) -> String {
    if b.started_at_ms <= 0 {
        return "-".to_string();
    }
    let end = if b.state.is_terminal() {
        b.updated_at_ms
    } else {
        now
    };
    duration(end - b.started_at_ms)
}

// ---------- page frame ----------

fn head(title: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (title) " · Hive" }
                link rel="stylesheet" href="/ui/static/ui.css";
                script src="/ui/static/ui.js" defer {}
            }
        }
    }
}

fn layout(title: &str, signed: &Signed, active: &str, body: Markup) -> Markup {
    let nav = [
        ("builds", "/ui/builds", "Builds"),
        ("boxes", "/ui/boxes", "Fleet"),
        ("projects", "/ui/projects", "Projects"),
        ("networks", "/ui/networks", "Networks"),
    ];
    html! {
        (head(title))
        body data-now=(now_ms()) {
            header.top {
                a.brand href="/ui/builds" { "Hive" }
                nav aria-label="Main" {
                    ul {
                        @for (key, href, label) in nav {
                            li { a href=(href) aria-current=[(key == active).then_some("page")] { (label) } }
                        }
                    }
                }
                div.who {
                    span title="signed in with this API token" {
                        (signed.caller.name) " (" (signed.caller.role.name()) ")"
                    }
                    form method="post" action="/ui/signout" {
                        input type="hidden" name="csrf" value=(signed.session.csrf);
                        button type="submit" { "Sign out" }
                    }
                }
            }
            main { (body) }
        }
    }
}

/// A bare page for errors (no session needed).
pub fn error_page(status: StatusCode, message: &str) -> Markup {
    html! {
        (head("Error"))
        body {
            main.narrow {
                h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                p.error role="alert" { (message) }
                p { a href="/ui/builds" { "Back to the builds" } }
            }
        }
    }
}

fn see_other(path: &str) -> Response {
    let loc = HeaderValue::from_str(path).unwrap_or(HeaderValue::from_static("/ui/builds"));
    (StatusCode::SEE_OTHER, [(header::LOCATION, loc)]).into_response()
}

// ---------- assets ----------

pub async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        CSS,
    )
        .into_response()
}

pub async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        JS,
    )
        .into_response()
}

// ---------- sign-in ----------

#[derive(Debug, Deserialize)]
pub struct NextQuery {
    #[serde(default)]
    next: String,
}

/// Where to go after signing in: a dashboard path, else the builds list (never elsewhere).
fn safe_next(next: &str) -> &str {
    if next.starts_with("/ui/")
        && next
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b))
    {
        next
    } else {
        "/ui/builds"
    }
}

fn signin_page(next: &str, error: Option<&str>) -> Markup {
    html! {
        (head("Sign in"))
        body {
            main.narrow {
                h1 { "Sign in to Hive" }
                @if let Some(e) = error { p.error role="alert" { (e) } }
                form.signin method="post" action="/ui/signin" {
                    input type="hidden" name="next" value=(safe_next(next));
                    label for="token" { "API token" }
                    input #token type="password" name="token" autocomplete="off" required
                        spellcheck="false" placeholder="hvt_…";
                    button type="submit" { "Sign in" }
                }
                p.hint {
                    "Use an API token, as with " code { "hivectl" } ". On its first start the control "
                    "plane wrote an admin token to " code { "admin.token" } " in its data directory; "
                    "make others with " code { "hivectl token create" } "."
                }
            }
        }
    }
}

pub async fn signin_form(Query(q): Query<NextQuery>) -> Markup {
    signin_page(&q.next, None)
}

#[derive(Debug, Deserialize)]
pub struct SigninForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

pub async fn signin(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Form(f): Form<SigninForm>,
) -> Response {
    let token = f.token.trim();
    if token.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            signin_page(&f.next, Some("Paste an API token.")),
        )
            .into_response();
    }
    match auth::authenticate_token(&ui.hive.store, token).await {
        Ok(caller) => {
            let id = ui.sessions.create(auth::token_hash(token));
            tracing::info!(token_id = %caller.token_id, token = %caller.name,
                role = caller.role.name(), "dashboard sign-in");
            let mut res = see_other(safe_next(&f.next));
            let (k, v) = session::set_cookie(&id, &headers);
            res.headers_mut().insert(k, v);
            res
        }
        Err(status) if status.code() == tonic::Code::Unauthenticated => {
            tracing::debug!("dashboard sign-in with an unknown or revoked token refused");
            (
                StatusCode::UNAUTHORIZED,
                signin_page(
                    &f.next,
                    Some("That token was not accepted: it is unknown to this control plane, or revoked."),
                ),
            )
                .into_response()
        }
        Err(status) => UiError::Internal(status.message().to_string()).into_response(),
    }
}

/// The CSRF field of a form.
#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

fn check_csrf(signed: &Signed, f: &CsrfForm, what: &str) -> Result<(), UiError> {
    if signed.session.csrf_ok(&f.csrf) {
        return Ok(());
    }
    tracing::warn!(token_id = %signed.caller.token_id, token = %signed.caller.name, what,
        "dashboard form without this session's CSRF token refused");
    Err(UiError::Forbidden(
        "this form is not from this session (missing or stale CSRF token): reload the page and \
         try again"
            .to_string(),
    ))
}

pub async fn signout(
    State(ui): State<Arc<Ui>>,
    signed: Signed,
    Form(f): Form<CsrfForm>,
) -> Result<Response, UiError> {
    check_csrf(&signed, &f, "sign out")?;
    ui.sessions.remove(&signed.session_id);
    let mut res = see_other("/ui/signin");
    let (k, v) = session::clear_cookie();
    res.headers_mut().insert(k, v);
    Ok(res)
}

// ---------- builds ----------

#[derive(Debug, Default, Deserialize)]
pub struct BuildsQuery {
    #[serde(default)]
    pub project: String,
    #[serde(default)]
    pub state: String,
}

/// The list's filter, checked: the project by name or id, the state by its short name.
pub async fn build_filter(ui: &Ui, q: &BuildsQuery) -> Result<BuildFilter, UiError> {
    let project_id = if q.project.is_empty() {
        None
    } else {
        let p = ui
            .hive
            .store
            .get_project(&q.project)
            .await?
            .ok_or_else(|| UiError::NotFound(format!("project {:?} not found", q.project)))?;
        Some(p.id)
    };
    let state = if q.state.is_empty() {
        None
    } else {
        Some(BuildState::from_short_name(&q.state).ok_or_else(|| {
            UiError::BadRequest(format!(
                "state {:?} is not a build state (queued, placed, running, succeeded, failed, \
                 cancelled, timed_out)",
                q.state
            ))
        })?)
    };
    Ok(BuildFilter {
        project_id,
        state,
        limit: LIST_LIMIT,
    })
}

/// Whether `b` passes `f`.
pub fn matches(f: &BuildFilter, b: &BuildRow) -> bool {
    f.project_id.as_ref().is_none_or(|p| *p == b.project_id) && f.state.is_none_or(|s| s == b.state)
}

/// One row of the builds list (also sent live).
pub fn build_row(b: &BuildRow, now: i64) -> Markup {
    html! {
        tr id=(format!("b-{}", b.id)) {
            td { a href=(format!("/ui/projects/{}", b.project_name)) { (b.project_name) } }
            td.ref { (short_ref(&b.git_ref)) }
            td { a.mono href=(format!("/ui/builds/{}", b.id)) title=(b.revision) {
                @if b.revision.is_empty() { "(tip)" } @else { (short_rev(&b.revision)) }
            } }
            td { (state_badge(b.state)) }
            td.mono { (dash(&b.box_id)) @if !b.cell_id.is_empty() { " / " (b.cell_id) } }
            td { (time(b.created_at_ms)) }
            td { (time(b.started_at_ms)) }
            (duration_cell(b, now))
        }
    }
}

/// A build's duration; while it runs, the script counts on from `data-start`.
fn duration_cell(b: &BuildRow, now: i64) -> Markup {
    let running = b.started_at_ms > 0 && !b.state.is_terminal();
    html! {
        td.duration data-start=[running.then_some(b.started_at_ms)] { (build_duration(b, now)) }
    }
}

/// The head of a table of [`build_row`]s.
fn build_head() -> Markup {
    html! {
        thead { tr {
            th scope="col" { "Project" } th scope="col" { "Ref" }
            th scope="col" { "Commit" } th scope="col" { "State" }
            th scope="col" { "Box / cell" } th scope="col" { "Queued" }
            th scope="col" { "Started" } th scope="col" { "Duration" }
        } }
    }
}

pub async fn builds(
    State(ui): State<Arc<Ui>>,
    signed: Signed,
    Query(q): Query<BuildsQuery>,
) -> Result<Markup, UiError> {
    let filter = build_filter(&ui, &q).await?;
    let rows = ui.hive.store.list_builds(&filter).await?;
    let projects = ui.hive.store.list_projects().await?;
    let now = now_ms();
    let live = format!(
        "/ui/builds/events?{}",
        form_urlencoded::Serializer::new(String::new())
            .append_pair("project", &q.project)
            .append_pair("state", &q.state)
            .finish()
    );
    let states = [
        BuildState::Queued,
        BuildState::Placed,
        BuildState::Running,
        BuildState::Succeeded,
        BuildState::Failed,
        BuildState::Cancelled,
        BuildState::TimedOut,
    ];
    Ok(layout(
        "Builds",
        &signed,
        "builds",
        html! {
            div.titlebar {
                h1 { "Builds" }
                span #live.live role="status" { "" }
            }
            form.filters method="get" action="/ui/builds" {
                label for="f-project" { "Project" }
                select #f-project name="project" {
                    option value="" { "all" }
                    @for p in &projects {
                        option value=(p.name) selected[p.name == q.project || p.id == q.project] { (p.name) }
                    }
                }
                label for="f-state" { "State" }
                select #f-state name="state" {
                    option value="" { "all" }
                    @for s in states {
                        option value=(s.short_name()) selected[s.short_name() == q.state] { (s.short_name()) }
                    }
                }
                button type="submit" { "Filter" }
            }
            div.scroll {
                table #builds data-live=(live) {
                    caption.visually-hidden { "Builds, newest first" }
                    (build_head())
                    tbody {
                        @for b in &rows { (build_row(b, now)) }
                    }
                }
            }
            @if rows.is_empty() { p #no-builds { "No builds yet." } }
        },
    ))
}

/// Whether `caller` may cancel and rebuild `b` (the gRPC API's rule: `Submit`, and a
/// submitter only in its project).
pub fn can_act(caller: &Caller, b: &BuildRow) -> bool {
    caller.role.grants(Right::Submit)
        && (caller.project_id.is_empty() || caller.project_id == b.project_id)
}

/// The timeline: one bar segment per state, as long as the build stayed in it.
fn timeline(b: &BuildRow, t: &[TransitionRow], now: i64) -> Markup {
    let Some(first) = t.first() else {
        return html! {};
    };
    let end = if b.state.is_terminal() {
        t.last().map_or(now, |l| l.at_ms)
    } else {
        now
    };
    let total = (end - first.at_ms).max(1) as f64;
    // Each segment at least 1% wide so a short state still shows.
    let mut x = 0.0f64;
    let segs: Vec<(f64, f64, &TransitionRow, i64)> = t
        .iter()
        .enumerate()
        .map(|(i, tr)| {
            let to = t.get(i + 1).map_or(end, |n| n.at_ms);
            let w = ((to - tr.at_ms) as f64 / total * 100.0).max(1.0);
            let seg = (x, w, tr, to - tr.at_ms);
            x += w;
            seg
        })
        .collect();
    let scale = if x > 100.0 { 100.0 / x } else { 1.0 };
    html! {
        svg.timeline viewBox="0 0 100 4" preserveAspectRatio="none" role="img"
            aria-label="state timeline" {
            @for (x, w, tr, _) in &segs {
                rect x=(format!("{:.2}", x * scale)) y="0" width=(format!("{:.2}", w * scale))
                    height="4" class=(format!("s-{}", tr.state.short_name())) {
                    title { (tr.state.short_name()) }
                }
            }
        }
        ol.transitions {
            @for (_, _, tr, spent) in &segs {
                li {
                    (state_badge(tr.state)) " "
                    (time(tr.at_ms))
                    @if !tr.state.is_terminal() { " · " (duration(*spent)) }
                    @if !tr.reason.is_empty() { span.reason { " — " (tr.reason) } }
                }
            }
        }
    }
}

/// The part of a build page that changes with its state (also sent live).
pub fn summary(b: &BuildRow, t: &[TransitionRow], signed: &Signed, now: i64) -> Markup {
    let act = can_act(&signed.caller, b);
    html! {
        section #summary aria-label="Build summary" {
            div.titlebar {
                h1 { (b.project_name) " " span.ref { (short_ref(&b.git_ref)) } }
                (state_badge(b.state))
            }
            dl.facts {
                dt { "Commit" } dd.mono { (dash(&b.revision)) }
                dt { "Ref" } dd { (b.git_ref) }
                dt { "Box / cell" } dd.mono { (dash(&b.box_id)) " / " (dash(&b.cell_id)) }
                dt { "Backend" } dd { (dash(&b.backend)) }
                dt { "Size class" } dd { (b.size_class) }
                dt { "Attempt" } dd { (b.attempt) }
                dt { "Trigger" } dd { (b.trigger) }
                dt { "Duration" }
                dd.duration data-start=[(b.started_at_ms > 0 && !b.state.is_terminal()).then_some(b.started_at_ms)] {
                    (build_duration(b, now))
                }
                @if b.state.is_terminal() { dt { "Exit code" } dd { (b.exit_code) } }
                dt { "Message" } dd { (b.message) }
            }
            h2 { "Timeline" }
            (timeline(b, t, now))
            @if act {
                div.actions {
                    @if !b.state.is_terminal() {
                        form method="post" action=(format!("/ui/builds/{}/cancel", b.id)) {
                            input type="hidden" name="csrf" value=(signed.session.csrf);
                            button.danger type="submit" { "Cancel build" }
                        }
                    }
                    form method="post" action=(format!("/ui/builds/{}/rebuild", b.id)) {
                        input type="hidden" name="csrf" value=(signed.session.csrf);
                        button type="submit" { "Rebuild" }
                    }
                }
            }
        }
    }
}

pub async fn build(
    State(ui): State<Arc<Ui>>,
    signed: Signed,
    Path(id): Path<String>,
) -> Result<Markup, UiError> {
    let (b, t) = ui
        .hive
        .store
        .build_with_history(&id)
        .await?
        .ok_or_else(|| UiError::NotFound(format!("build {id:?} not found")))?;
    // The log so far; the live stream goes on from the next seq.
    let mut view = LogView::starting_at(1);
    let mut html_log = String::new();
    let mut next_seq = 0u64;
    let mut bytes = 0usize;
    let mut cut = false;
    loop {
        let chunks = ui.hive.store.logs_from(&b.id, next_seq, LOG_PAGE).await?;
        let n = chunks.len();
        for c in chunks {
            next_seq = c.seq + 1;
            bytes += c.data.len();
            view.push(c.step, &c.data, &mut html_log);
            if bytes > PAGE_LOG_BYTES {
                cut = true;
                break;
            }
        }
        if cut || n < LOG_PAGE as usize {
            break;
        }
    }
    view.flush(&mut html_log);
    // The latest start of each step's output (a re-queued build's last attempt).
    let step_starts: std::collections::BTreeMap<u32, u64> =
        view.take_step_starts().into_iter().collect();
    let live = (!b.state.is_terminal() && !cut).then(|| {
        format!(
            "/ui/builds/{}/events?seq={next_seq}&line={}",
            b.id,
            view.next_line()
        )
    });
    let artifacts = ui.hive.store.list_artifacts(&b.id).await?;
    let now = now_ms();
    Ok(layout(
        &format!("Build {}", short_rev(&b.id)),
        &signed,
        "builds",
        html! {
            (summary(&b, &t, &signed, now))
            @if !b.steps.is_empty() {
                h2 { "Steps" }
                ol.steps {
                    @for (i, s) in b.steps.iter().enumerate() {
                        @let n = i as u32 + 1;
                        li id=(format!("step-{n}")) {
                            code { (s) }
                            @if let Some(line) = step_starts.get(&n) {
                                " " a.steplink href=(format!("#L{line}")) { "output from line " (line) }
                            }
                        }
                    }
                }
            }
            @if !artifacts.is_empty() {
                h2 { "Artifacts" }
                ul.artifacts {
                    @for a in &artifacts {
                        li {
                            @if a.complete {
                                a href=(format!("/ui/builds/{}/artifacts/{}", b.id, path_url(&a.path))) download { code { (a.path) } }
                                " " (a.size) " bytes"
                            } @else {
                                code { (a.path) }
                                " incomplete: " (a.stored_bytes) " of " (a.size) " bytes"
                            }
                        }
                    }
                }
            }
            div.titlebar {
                h2 { "Log" }
                span #live.live role="status" { "" }
                a href=(format!("/ui/builds/{}/log.txt", b.id)) download { "Download raw log" }
            }
            @if cut {
                p.hint { "The log is longer than the page shows: download the raw log for all of it." }
            }
            div #log.log role="log" data-live=[live] {
                (PreEscaped(html_log))
            }
        },
    ))
}

pub async fn raw_log(
    State(ui): State<Arc<Ui>>,
    _signed: Signed,
    Path(id): Path<String>,
) -> Result<Response, UiError> {
    let b = ui
        .hive
        .store
        .get_build(&id)
        .await?
        .ok_or_else(|| UiError::NotFound(format!("build {id:?} not found")))?;
    // Read page by page as the client takes it: a long log is never held whole.
    let hive = ui.hive.clone();
    let build_id = b.id.clone();
    let pages = futures::stream::unfold(Some(0u64), move |from| {
        let hive = hive.clone();
        let build_id = build_id.clone();
        async move {
            let from = from?;
            match hive.store.logs_from(&build_id, from, LOG_PAGE).await {
                Ok(chunks) if chunks.is_empty() => None,
                Ok(chunks) => {
                    let next = chunks
                        .last()
                        .map(|c| c.seq + 1)
                        .filter(|_| chunks.len() == LOG_PAGE as usize);
                    let data: Vec<u8> = chunks.into_iter().flat_map(|c| c.data).collect();
                    Some((Ok::<_, crate::store::StoreError>(data), next))
                }
                Err(e) => Some((Err(e), None)),
            }
        }
    });
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"build-{}.log\"", b.id),
            ),
        ],
        Body::from_stream(pages),
    )
        .into_response())
}

/// An artefact path as a URL path: every byte but `A-Za-z0-9 . _ ~ - /` percent-encoded.
fn path_url(path: &str) -> String {
    path.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"._~-/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One artefact's bytes (`/ui/builds/{id}/artifacts/{*path}`), signed in like every dashboard
/// route; read piece by piece as the client takes it.
pub async fn artifact(
    State(ui): State<Arc<Ui>>,
    _signed: Signed,
    Path((id, path)): Path<(String, String)>,
) -> Result<Response, UiError> {
    crate::artifacts::check_path(&path).map_err(|e| UiError::BadRequest(e.to_string()))?;
    let row = ui
        .hive
        .store
        .artifact(&id, &path)
        .await?
        .ok_or_else(|| UiError::NotFound(format!("build {id:?} has no artifact {path:?}")))?;
    if !row.complete {
        return Err(UiError::Conflict(format!(
            "artifact {path:?} is incomplete: {} of {} bytes arrived",
            row.stored_bytes, row.size
        )));
    }
    let file = ui
        .hive
        .artifacts
        .open(&id, &path)
        .map_err(|e| UiError::Internal(hive_sys::error_chain(&e)))?;
    let file = Arc::new(file);
    let size = row.size;
    let pieces = futures::stream::unfold(0u64, move |offset| {
        let file = file.clone();
        async move {
            if offset >= size {
                return None;
            }
            let want = usize::try_from(size - offset)
                .unwrap_or(usize::MAX)
                .min(256 * 1024);
            let read = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; want];
                let n = file.read_at(&mut buf, offset)?;
                if n == 0 {
                    return Err(std::io::Error::other("artifact file ends early"));
                }
                buf.truncate(n);
                Ok(buf)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            match read {
                Ok(buf) => {
                    let next = offset + buf.len() as u64;
                    Some((Ok::<_, std::io::Error>(buf), next))
                }
                Err(e) => Some((Err(e), size)),
            }
        }
    });
    let name: String = path
        .rsplit('/')
        .next()
        .unwrap_or("artifact")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        Body::from_stream(pieces),
    )
        .into_response())
}

/// PERMISSION_DENIED from the role matrix, as a 403 page.
fn denied(s: tonic::Status) -> UiError {
    UiError::Forbidden(s.message().to_string())
}

pub async fn cancel(
    State(ui): State<Arc<Ui>>,
    signed: Signed,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, UiError> {
    check_csrf(&signed, &f, "cancel")?;
    let caller = &signed.caller;
    caller
        .require("CancelBuild", Right::Submit)
        .map_err(denied)?;
    let b = ui
        .hive
        .store
        .get_build(&id)
        .await?
        .ok_or_else(|| UiError::NotFound(format!("build {id:?} not found")))?;
    caller
        .require_project("CancelBuild", &b.project_id, &b.project_name)
        .map_err(denied)?;
    let audit = caller
        .audit("CancelBuild", &b.id)
        .with_detail("via the dashboard".to_string());
    cancel::cancel(&ui.hive, &b.id, "cancelled via the dashboard", &audit)
        .await
        .map_err(|e| match e {
            CancelError::NotFound(_) => UiError::NotFound(e.to_string()),
            CancelError::AlreadyEnded { .. } => UiError::Conflict(e.to_string()),
            CancelError::Store(e) => e.into(),
        })?;
    tracing::info!(build_id = %b.id, token = %caller.name, "build cancelled via the dashboard");
    Ok(see_other(&format!("/ui/builds/{}", b.id)))
}

pub async fn rebuild(
    State(ui): State<Arc<Ui>>,
    signed: Signed,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, UiError> {
    check_csrf(&signed, &f, "rebuild")?;
    let caller = &signed.caller;
    caller
        .require("RebuildBuild", Right::Submit)
        .map_err(denied)?;
    let (p, build, reason) = submit::rebuild_of(&ui.hive, &id)
        .await
        .map_err(|e| match e {
            RebuildError::NotFound(_) => UiError::NotFound(e.to_string()),
            RebuildError::ProjectGone { .. } => UiError::Conflict(e.to_string()),
            RebuildError::Store(e) => e.into(),
        })?;
    caller
        .require_project("RebuildBuild", &p.id, &p.name)
        .map_err(denied)?;
    let audit = caller
        .audit("RebuildBuild", &build.id)
        .with_detail(format!("project {}, {reason}, via the dashboard", p.name));
    submit::submit(&ui.hive, &build, &reason, &audit).await?;
    tracing::info!(build_id = %build.id, rebuild_of = %id, project = %p.name,
        "build submitted via the dashboard");
    Ok(see_other(&format!("/ui/builds/{}", build.id)))
}

// ---------- fleet, projects, networks ----------

fn box_state_name(s: BoxState) -> &'static str {
    match s {
        BoxState::Active => "ready",
        BoxState::Left => "gone",
        other => other.short_name(),
    }
}

/// One bar chart of the last hour, a bar per minute (SVG attributes only: the CSP forbids
/// inline styles), with a title per bar for pointer users and a summary for everyone.
fn minute_bars(
    label: &str,
    recent: &[crate::metrics::Minute],
    now: i64,
    value: impl Fn(&crate::metrics::Minute) -> Option<i64>,
    show: impl Fn(i64) -> String,
) -> Markup {
    use crate::metrics::RECENT_MINUTES;
    let first = now - now.rem_euclid(60_000) - 60_000 * (RECENT_MINUTES as i64 - 1);
    let bars: Vec<(i64, i64)> = recent
        .iter()
        .filter_map(|m| Some(((m.start_ms - first) / 60_000, value(m)?)))
        .filter(|(i, v)| (0..RECENT_MINUTES as i64).contains(i) && *v >= 0)
        .collect();
    let top = bars.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    let last = bars.last().map(|(_, v)| *v);
    html! {
        figure.chart {
            figcaption {
                (label) ": "
                @match last { Some(v) => { "latest " (show(v)) ", most " (show(top)) " in the last hour" }
                              None => { "nothing in the last hour" } }
            }
            svg viewBox=(format!("0 0 {} 40", RECENT_MINUTES * 10)) preserveAspectRatio="none"
                role="img" aria-label=(format!("{label}, per minute, last hour")) {
                @for (i, v) in &bars {
                    // A zero is a thin baseline mark: sampled, nothing there.
                    @let h = if *v == 0 { 0.5 } else { ((*v as f64) / (top as f64) * 38.0).max(1.5) };
                    rect x=(i * 10 + 1) y=(format!("{:.1}", 40.0 - h)) width="8" height=(format!("{h:.1}")) {
                        title { (iso(first + i * 60_000)) ": " (show(*v)) }
                    }
                }
            }
        }
    }
}

pub async fn boxes(State(ui): State<Arc<Ui>>, signed: Signed) -> Result<Markup, UiError> {
    let rows = ui.hive.store.list_boxes().await?;
    let infos: Vec<_> = rows.iter().map(|r| ui.hive.registry.info(r)).collect();
    let now = now_ms();
    let recent = ui.hive.metrics.recent(now);
    Ok(layout(
        "Fleet",
        &signed,
        "boxes",
        html! {
            h1 { "Fleet" }
            div.charts {
                (minute_bars("Queue depth", &recent, now, |m| Some(m.queue_max), |v| format!("{v} queued")))
                (minute_bars("Time in queue (mean of the minute's placements)", &recent, now,
                    |m| m.wait_mean_ms(), duration))
            }
            @if infos.is_empty() { p { "No box has registered yet." } }
            @else {
                div.scroll { table {
                    caption.visually-hidden { "Boxes" }
                    thead { tr {
                        th scope="col" { "Box" } th scope="col" { "State" }
                        th scope="col" { "Backend" } th scope="col" { "Cells (warm / busy / booting of capacity)" }
                        th scope="col" { "Running" } th scope="col" { "Last heartbeat" }
                    } }
                    tbody {
                        @for b in &infos {
                            @let st = BoxState::try_from(b.state).unwrap_or(BoxState::Unspecified);
                            tr {
                                th scope="row" { span.mono { (b.id) } br; small { (b.hostname) } }
                                td { span class=(format!("state box-{}", box_state_name(st))) { (box_state_name(st)) } }
                                td { (dash(&b.backend)) }
                                td { ul.pools {
                                    @for p in &b.pools {
                                        li { strong { (p.size_class) } ": " (p.warm) " warm, " (p.busy) " busy, "
                                            (p.booting) " booting of " (p.capacity) }
                                    }
                                } }
                                td { (b.running_builds.len()) }
                                td { @if b.last_heartbeat_ms > 0 {
                                    span title=(iso(b.last_heartbeat_ms)) { (ago(b.last_heartbeat_ms, now)) }
                                } @else { "never" } }
                            }
                        }
                    }
                } }
            }
        },
    ))
}

pub async fn projects(State(ui): State<Arc<Ui>>, signed: Signed) -> Result<Markup, UiError> {
    let rows = ui.hive.store.list_projects().await?;
    Ok(layout(
        "Projects",
        &signed,
        "projects",
        html! {
            h1 { "Projects" }
            @if rows.is_empty() { p { "No projects yet (" code { "hivectl project create" } ")." } }
            @else {
                div.scroll { table {
                    caption.visually-hidden { "Projects" }
                    thead { tr {
                        th scope="col" { "Name" } th scope="col" { "Repository" }
                        th scope="col" { "Branch / tags" } th scope="col" { "Size class" }
                        th scope="col" { "Network" } th scope="col" { "Steps" }
                    } }
                    tbody {
                        @for p in &rows {
                            tr {
                                th scope="row" { a href=(format!("/ui/projects/{}", p.name)) { (p.name) } }
                                td.mono { (p.repo_url) }
                                td { (dash(&p.branch)) @if !p.tags.is_empty() { " · tags " (p.tags) } }
                                td { (p.size_class) }
                                td { (dash(&p.private_network)) }
                                td { (p.steps.len()) }
                            }
                        }
                    }
                } }
            }
        },
    ))
}

pub async fn project(
    State(ui): State<Arc<Ui>>,
    signed: Signed,
    Path(name): Path<String>,
) -> Result<Markup, UiError> {
    let p = ui
        .hive
        .store
        .get_project(&name)
        .await?
        .ok_or_else(|| UiError::NotFound(format!("project {name:?} not found")))?;
    let recent = ui
        .hive
        .store
        .list_builds(&BuildFilter {
            project_id: Some(p.id.clone()),
            state: None,
            limit: 20,
        })
        .await?;
    let now = now_ms();
    Ok(layout(
        &p.name,
        &signed,
        "projects",
        html! {
            h1 { "Project " (p.name) }
            dl.facts {
                dt { "Id" } dd.mono { (p.id) }
                dt { "Repository" } dd.mono { (p.repo_url) }
                dt { "Branch" } dd { (dash(&p.branch)) }
                dt { "Tags" } dd { (dash(&p.tags)) }
                dt { "Size class" } dd { (p.size_class) }
                dt { "Private network" } dd { (dash(&p.private_network)) }
                dt { "Timeout" } dd { (duration(i64::from(p.timeout_secs) * 1000)) }
                dt { "Webhook secret" } dd { @if p.secret.is_empty() { "not set" } @else { "set (not shown)" } }
                dt { "Environment" } dd {
                    @if p.env.is_empty() { "-" }
                    @else { @for (i, k) in p.env.keys().enumerate() { @if i > 0 { ", " } code { (k) } } " (values not shown)" }
                }
                dt { "Created" } dd { (time(p.created_at_ms)) }
            }
            h2 { "Steps" }
            ol.steps { @for s in &p.steps { li { code { (s) } } } }
            h2 { "Recent builds" }
            p { a href=(format!("/ui/builds?project={}", form_urlencoded::byte_serialize(p.name.as_bytes()).collect::<String>())) { "All builds of " (p.name) } }
            div.scroll { table {
                (build_head())
                tbody { @for b in &recent { (build_row(b, now)) } }
            } }
        },
    ))
}

pub async fn networks(State(ui): State<Arc<Ui>>, signed: Signed) -> Result<Markup, UiError> {
    let rows = ui
        .hive
        .store
        .list_networks()
        .await
        .map_err(|e| UiError::Internal(e.to_string()))?;
    let connectors = ui
        .hive
        .store
        .list_connectors(None)
        .await
        .map_err(|e| UiError::Internal(e.to_string()))?;
    Ok(layout(
        "Networks",
        &signed,
        "networks",
        html! {
            h1 { "Private networks" }
            @if rows.is_empty() { p { "No private networks." } }
            @else {
                div.scroll { table {
                    caption.visually-hidden { "Private networks" }
                    thead { tr {
                        th scope="col" { "Name" } th scope="col" { "Prefixes" }
                        th scope="col" { "Tunnel subnet" } th scope="col" { "Connectors" }
                        th scope="col" { "Created" }
                    } }
                    tbody { @for n in &rows { tr {
                        th scope="row" { (n.name) }
                        td.mono { (n.prefixes.join(", ")) }
                        td.mono { (n.tunnel_subnet) }
                        td { ul.pools {
                            @for c in connectors.iter().filter(|c| c.network == n.name) {
                                li {
                                    span.mono { (c.endpoint) } " "
                                    @if ui.hive.connectors.is_connected(&c.id) {
                                        span.state."box-ready" { "connected" }
                                    } @else {
                                        span.state."box-offline" { "not connected" }
                                    }
                                }
                            }
                        } }
                        td { (time(n.created_at_ms)) }
                    } } }
                } }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_durations() {
        assert_eq!(iso(0), "");
        assert_eq!(iso(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(duration(850), "850ms");
        assert_eq!(duration(42_000), "42s");
        assert_eq!(duration(185_000), "3m 05s");
        assert_eq!(duration(7_800_000), "2h 10m");
        assert_eq!(ago(0, 5), "never");
        assert_eq!(ago(1000, 1500), "just now");
        assert_eq!(ago(1000, 13_900), "12s ago");
    }

    #[test]
    fn next_is_a_dashboard_path_or_the_builds_list() {
        assert_eq!(safe_next("/ui/builds/abc-1"), "/ui/builds/abc-1");
        assert_eq!(safe_next("https://evil.example/"), "/ui/builds");
        assert_eq!(safe_next("//evil.example/ui/"), "/ui/builds");
        assert_eq!(safe_next("/ui/x?y=<script>"), "/ui/builds");
    }
}
