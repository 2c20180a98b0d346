//! `POST /webhooks/github`, `/webhooks/gitea` and `/webhooks/gitlab`: push (and ping) events
//! from the forges to queued builds. One path for all three; a [`Forge`] says where each keeps
//! its event name, delivery id, proof and repository URLs:
//!
//! | forge | event | delivery id | proof |
//! | --- | --- | --- | --- |
//! | GitHub | `X-GitHub-Event` | `X-GitHub-Delivery` | `X-Hub-Signature-256: sha256=<hex>`, HMAC-SHA256 of the raw body; the body JSON or form-encoded (`payload=<JSON>`) |
//! | Gitea, Forgejo | `X-Gitea-Event` / `X-Forgejo-Event` | `X-Gitea-Delivery` / `X-Forgejo-Delivery` | `X-Gitea-Signature` / `X-Forgejo-Signature: <hex>`, HMAC-SHA256 of the body |
//! | GitLab | `X-Gitlab-Event` (`Push Hook`, `Tag Push Hook`) | `Idempotency-Key` (else `X-Gitlab-Event-UUID` with the body's SHA-256, else the hash alone) | `X-Gitlab-Token`: the secret itself, compared in constant time |
//!
//! Order of checks, and why:
//! 1. body over 5 MiB -> 413 (before anything is parsed);
//! 2. no event header -> 400; no (or malformed) proof header -> 401;
//! 3. body not JSON (for GitHub, nor a form with a JSON `payload`) -> 400. The signature is per project, so the project has to be found from
//!    the payload's repository before the signature can be checked; a body that does not parse
//!    cannot name one. Answering 400 here tells a sender nothing it did not send and changes
//!    nothing, so it is safe to answer before authentication (but only to requests that at
//!    least carry a well-formed signature header);
//! 4. no repository in the payload: `push` -> 400, `ping` -> 200 pong, others -> 202 (org-level
//!    hooks; there is no project secret to check and nothing is done);
//! 5. no project with that repository whose secret verifies the signature (HMAC-SHA256,
//!    constant time) -> 401. An unknown repository gets exactly the answer of a bad signature
//!    (same status, message, metrics label, and an HMAC computed all the same), so a sender
//!    without a secret cannot learn which repositories are registered;
//! 6. `ping` -> 200 pong; events other than `push` -> 202 and no build;
//! 7. push: no delivery id, no `ref`, or (unless the branch was deleted) an `after`
//!    that is not 40 hex digits -> 400. Then for each project the signature verified (several
//!    projects may build one repository): a delivery that project saw before -> its same answer
//!    again (`duplicate: true`, no second build); a deleted branch, a tag, or a branch the
//!    project does not build -> no build; else the build and the project's delivery record are
//!    written in one transaction, shared with the other deliveries waiting at the time (group
//!    commit, `domain::submit`), and the answer waits for that commit. The answer is 202 with
//!    the first project's result (`{"build_id": ..., "duplicate": false, "project": ...}`, the
//!    first that builds, if any) and, when several projects verified, `projects`: each one's
//!    result. A full commit queue (or a shutdown) -> 503 with `Retry-After`, nothing stored.
//!    A verified project of another hive (`crate::regions`) is not built here: the push goes
//!    on, as received, to that hive (once per hive; never a push that was itself forwarded),
//!    and its answer is this project's result; that hive unreachable (or its 5xx) -> 502 with
//!    `Retry-After` (what was built here is recorded, so the redelivery builds nothing twice).
//!
//! Every rejection is logged with the reason and counted in `/metrics` by outcome; text taken
//! from the request (repository URLs, event names, delivery ids) is cut to 200 characters there
//! and in the answer.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::domain::submit::submit_delivery;
use crate::intake::IntakeError;
use crate::refglob;
use crate::state::Hive;
use crate::store::{BuildRow, Delivery, NewDelivery, ProjectRow};

/// Largest body accepted (GitHub caps payloads at 25 MiB; pushes that big are not builds).
pub const MAX_BODY: usize = 5 * 1024 * 1024;

/// Most characters of a sender's text (a repository URL, an event name) echoed into a log line
/// or an answer: an unsigned body must not be able to flood either.
const MAX_ECHO: usize = 200;

/// `text` cut to [`MAX_ECHO`] characters (never inside one), marked with `…` when cut.
fn clip(text: &str) -> String {
    match text.char_indices().nth(MAX_ECHO) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// An answer that is not a build: status, message, and the metrics outcome label.
#[derive(Debug)]
struct Reject {
    status: StatusCode,
    outcome: &'static str,
    message: String,
    /// Seconds for a `Retry-After` header (a full commit queue, a shutdown).
    retry_after: Option<u32>,
}

fn reject(status: StatusCode, outcome: &'static str, message: impl Into<String>) -> Reject {
    Reject {
        status,
        outcome,
        message: message.into(),
        retry_after: None,
    }
}

/// What a 503 (queue full, shutting down) asks the sender to wait before it retries.
const RETRY_AFTER_SECS: u32 = 1;

/// Where a delivery comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forge {
    GitHub,
    /// Gitea and Forgejo (the same payloads; Forgejo names its headers after itself).
    Gitea,
    GitLab,
}

/// A push or a ping, or something else (answered 202, no build).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Push,
    Ping,
    Other,
}

impl Forge {
    fn name(self) -> &'static str {
        match self {
            Forge::GitHub => "GitHub",
            Forge::Gitea => "Gitea",
            Forge::GitLab => "GitLab",
        }
    }

    /// The first of `names` the request carries.
    fn first<'a>(
        headers: &'a HeaderMap,
        names: &[&'static str],
    ) -> Option<(&'static str, &'a str)> {
        names
            .iter()
            .find_map(|n| header(headers, n).map(|v| (*n, v)))
    }

    fn event_headers(self) -> &'static [&'static str] {
        match self {
            Forge::GitHub => &["x-github-event"],
            Forge::Gitea => &["x-gitea-event", "x-forgejo-event"],
            Forge::GitLab => &["x-gitlab-event"],
        }
    }

    fn proof_headers(self) -> &'static [&'static str] {
        match self {
            Forge::GitHub => &["x-hub-signature-256"],
            Forge::Gitea => &["x-gitea-signature", "x-forgejo-signature"],
            Forge::GitLab => &["x-gitlab-token"],
        }
    }

    fn delivery_headers(self) -> &'static [&'static str] {
        match self {
            Forge::GitHub => &["x-github-delivery"],
            Forge::Gitea => &["x-gitea-delivery", "x-forgejo-delivery"],
            // `Idempotency-Key` stays the same across GitLab's retries of one delivery;
            // `X-Gitlab-Event-UUID` may be shared by the hooks of one push (a branch and a tag
            // pushed together), so it is combined with the body below.
            Forge::GitLab => &["idempotency-key"],
        }
    }

    fn kind(self, event: &str) -> Kind {
        match (self, event) {
            (Forge::GitHub | Forge::Gitea, "push") => Kind::Push,
            (Forge::GitHub, "ping") => Kind::Ping,
            (Forge::GitLab, "Push Hook" | "Tag Push Hook") => Kind::Push,
            _ => Kind::Other,
        }
    }

    /// Checks the proof header's form, so a request without a usable one is refused before
    /// its body is parsed.
    fn proof_is_well_formed(self, proof: &str) -> bool {
        match self {
            Forge::GitHub => parse_signature(proof).is_some(),
            Forge::Gitea => parse_hex_signature(proof).is_some(),
            Forge::GitLab => !proof.is_empty() && proof.len() <= 1024,
        }
    }

    /// Whether `proof` shows the sender holds `secret` (constant time).
    fn verify(self, secret: &[u8], body: &[u8], proof: &str) -> bool {
        match self {
            Forge::GitHub => verify_signature(secret, body, proof),
            Forge::Gitea => parse_hex_signature(proof).is_some_and(|tag| {
                Hmac::<Sha256>::new_from_slice(secret).is_ok_and(|mut mac| {
                    mac.update(body);
                    mac.verify_slice(&tag).is_ok()
                })
            }),
            Forge::GitLab => {
                use subtle::ConstantTimeEq;
                let a = Sha256::digest(secret);
                let b = Sha256::digest(proof.as_bytes());
                bool::from(a.ct_eq(&b))
            }
        }
    }

    /// The repository's URLs in the payload, in every form the forge sends.
    fn urls(self, payload: &Value) -> Vec<String> {
        let places: &[(&str, &str)] = match self {
            Forge::GitHub | Forge::Gitea => &[
                ("repository", "clone_url"),
                ("repository", "ssh_url"),
                ("repository", "git_url"),
                ("repository", "html_url"),
            ],
            Forge::GitLab => &[
                ("project", "git_http_url"),
                ("project", "git_ssh_url"),
                ("project", "web_url"),
                ("repository", "git_http_url"),
                ("repository", "git_ssh_url"),
                ("repository", "homepage"),
            ],
        };
        places
            .iter()
            .filter_map(|(o, k)| payload[*o][*k].as_str())
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Where the forge's deliveries are taken (and forwarded to on a peer hive).
    fn path(self) -> &'static str {
        match self {
            Forge::GitHub => "/webhooks/github",
            Forge::Gitea => "/webhooks/gitea",
            Forge::GitLab => "/webhooks/gitlab",
        }
    }

    /// The trigger recorded on a build this delivery makes.
    fn trigger(self, delivery: &str) -> String {
        match self {
            Forge::GitHub => format!("webhook:{delivery}"),
            Forge::Gitea => format!("webhook-gitea:{delivery}"),
            Forge::GitLab => format!("webhook-gitlab:{delivery}"),
        }
    }
}

/// The 32 bytes of a bare `<64 hex>` signature (Gitea, Forgejo).
fn parse_hex_signature(header: &str) -> Option<Vec<u8>> {
    let hexed = header.trim();
    if hexed.len() != 64 {
        return None;
    }
    hex::decode(hexed).ok()
}

/// The JSON of a form-encoded GitHub delivery (`payload=<urlencoded JSON>`).
fn form_payload(body: &[u8]) -> Option<Vec<u8>> {
    form_urlencoded::parse(body)
        .find(|(k, _)| k == "payload")
        .map(|(_, v)| v.into_owned().into_bytes())
}

/// Checks a `X-Hub-Signature-256` header value against `body` with `secret`, in constant time.
pub fn verify_signature(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(tag) = parse_signature(header) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&tag).is_ok()
}

/// The 32 bytes of a `sha256=<64 hex>` header.
fn parse_signature(header: &str) -> Option<Vec<u8>> {
    let hexed = header.trim().strip_prefix("sha256=")?;
    if hexed.len() != 64 {
        return None;
    }
    hex::decode(hexed).ok()
}

/// Signs `body` the way GitHub does (tests and benchmarks use it).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// `POST /webhooks/github`.
pub async fn github(state: State<Arc<Hive>>, headers: HeaderMap, body: Body) -> Response {
    handle(Forge::GitHub, state, headers, body).await
}

/// `POST /webhooks/gitea` (Gitea and Forgejo).
pub async fn gitea(state: State<Arc<Hive>>, headers: HeaderMap, body: Body) -> Response {
    handle(Forge::Gitea, state, headers, body).await
}

/// `POST /webhooks/gitlab`.
pub async fn gitlab(state: State<Arc<Hive>>, headers: HeaderMap, body: Body) -> Response {
    handle(Forge::GitLab, state, headers, body).await
}

async fn handle(
    forge: Forge,
    State(hive): State<Arc<Hive>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let delivery = clip(
        Forge::first(&headers, forge.delivery_headers())
            .map(|(_, v)| v)
            .unwrap_or(""),
    );
    let event = clip(
        Forge::first(&headers, forge.event_headers())
            .map(|(_, v)| v)
            .unwrap_or(""),
    );
    let forge_name = forge.name();
    match process(forge, &hive, &headers, body).await {
        Ok((status, outcome, answer)) => {
            hive.metrics.webhook(outcome);
            tracing::info!(forge = forge_name, %delivery, %event, outcome, %answer, "webhook accepted");
            (status, Json(answer)).into_response()
        }
        Err(r) => {
            hive.metrics.webhook(r.outcome);
            if let Some(secs) = r.retry_after {
                // Counted by outcome; at debug only, so an overload does not also flood the log.
                tracing::debug!(forge = forge_name, %delivery, %event, status = r.status.as_u16(), reason = %r.message, "webhook refused for now");
                let headers = [(axum::http::header::RETRY_AFTER, secs.to_string())];
                return (r.status, headers, Json(json!({ "error": r.message }))).into_response();
            }
            // A peer hive's refusal is the sender's to see (it names no internals).
            if r.status.is_server_error() && r.outcome != "forward_refused" {
                tracing::error!(forge = forge_name, %delivery, %event, status = r.status.as_u16(), reason = %r.message, "webhook failed");
                // The detail (a database error) is for the operator's log, not the sender.
                let answer = json!({ "error": "internal error; the control plane's log has the detail (the git host will retry)" });
                return (r.status, Json(answer)).into_response();
            }
            tracing::warn!(forge = forge_name, %delivery, %event, status = r.status.as_u16(), reason = %r.message, "webhook rejected");
            (r.status, Json(json!({ "error": r.message }))).into_response()
        }
    }
}

/// A header's name as the forges' documentation writes it (`X-GitHub-Event`).
fn header_name(lower: &str) -> String {
    match lower {
        "x-github-event" => "X-GitHub-Event".into(),
        "x-github-delivery" => "X-GitHub-Delivery".into(),
        "x-hub-signature-256" => "X-Hub-Signature-256".into(),
        "x-gitlab-event-uuid" => "X-Gitlab-Event-UUID".into(),
        "x-gitlab-webhook-uuid" => "X-Gitlab-Webhook-UUID".into(),
        other => other
            .split('-')
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("-"),
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn process(
    forge: Forge,
    hive: &Hive,
    headers: &HeaderMap,
    body: Body,
) -> Result<(StatusCode, &'static str, Value), Reject> {
    let too_big = || {
        reject(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("body is larger than {MAX_BODY} bytes"),
        )
    };
    if let Some(len) = header(headers, "content-length").and_then(|v| v.parse::<u64>().ok()) {
        if len > MAX_BODY as u64 {
            return Err(too_big());
        }
    }
    let body = axum::body::to_bytes(body, MAX_BODY).await.map_err(|e| {
        if e.to_string().contains("length limit") {
            too_big()
        } else {
            reject(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("reading body: {e}"),
            )
        }
    })?;

    let Some((_, event)) = Forge::first(headers, forge.event_headers()) else {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "missing {} header ({} webhook)",
                header_name(forge.event_headers()[0]),
                forge.name()
            ),
        ));
    };
    let Some((proof_header, signature)) = Forge::first(headers, forge.proof_headers()) else {
        return Err(reject(
            StatusCode::UNAUTHORIZED,
            "bad_signature",
            format!("missing {} header", header_name(forge.proof_headers()[0])),
        ));
    };
    if !forge.proof_is_well_formed(signature) {
        return Err(reject(
            StatusCode::UNAUTHORIZED,
            "bad_signature",
            match forge {
                Forge::GitHub => format!(
                    "{} is not of the form sha256=<64 hex digits>",
                    header_name(proof_header)
                ),
                Forge::Gitea => format!("{} is not 64 hex digits", header_name(proof_header)),
                Forge::GitLab => format!("{} is empty or too long", header_name(proof_header)),
            },
        ));
    }
    // GitHub's default content type for a new hook is a form whose `payload` field holds the
    // JSON; the signature covers the raw body either way.
    let form = forge == Forge::GitHub
        && header(headers, "content-type")
            .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
    let json_bytes = if form {
        form_payload(&body).ok_or_else(|| {
            reject(
                StatusCode::BAD_REQUEST,
                "bad_json",
                "form-encoded body has no payload field",
            )
        })?
    } else {
        body.to_vec()
    };
    let payload: Value = serde_json::from_slice(&json_bytes).map_err(|e| {
        reject(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("body is not valid JSON: {e}"),
        )
    })?;
    if !payload.is_object() {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "body is JSON but not an object",
        ));
    }
    let kind = forge.kind(event);

    let urls = forge.urls(&payload);
    if urls.is_empty() {
        // Organisation-level hooks send pings and other events without a repository: there
        // is no project (so no secret) to check them against, and nothing is done for them.
        return match kind {
            Kind::Push => Err(reject(
                StatusCode::BAD_REQUEST,
                "bad_json",
                match forge {
                    Forge::GitLab => {
                        "push payload has no repository URL \
                        (project.git_http_url/git_ssh_url/web_url)"
                    }
                    _ => {
                        "push payload has no repository URL \
                        (repository.clone_url/ssh_url/git_url/html_url)"
                    }
                },
            )),
            Kind::Ping => Ok((
                StatusCode::OK,
                "ping",
                json!({ "message": "pong (no repository in the payload; nothing verified)" }),
            )),
            Kind::Other => Ok((
                StatusCode::ACCEPTED,
                "unsupported_event",
                json!({ "message": format!("event {:?} is not handled; no build", clip(event)), "build_id": null }),
            )),
        };
    }
    let projects = hive.store.projects_for_repo(&urls).await.map_err(|e| {
        reject(
            StatusCode::INTERNAL_SERVER_ERROR,
            "error",
            format!("looking up projects: {e}"),
        )
    })?;
    // One check per project with a stand-in key for a project without a secret, and one for
    // no project at all: the time taken does not tell an unknown repository (or one built only
    // through the API) from a wrong secret.
    if projects.is_empty() {
        let _ = forge.verify(UNKNOWN_REPO_KEY, &body, signature);
    }
    let verified: Vec<&ProjectRow> = projects
        .iter()
        .filter(|p| {
            if p.secret.is_empty() {
                let _ = forge.verify(UNKNOWN_REPO_KEY, &body, signature);
                false
            } else {
                forge.verify(p.secret.as_bytes(), &body, signature)
            }
        })
        .collect();
    if verified.is_empty() {
        return Err(reject(
            StatusCode::UNAUTHORIZED,
            "bad_signature",
            format!(
                "signature does not match the secret of any project for {}",
                clip(&urls[0])
            ),
        ));
    }

    match kind {
        Kind::Ping => {
            return Ok((
                StatusCode::OK,
                "ping",
                json!({ "message": "pong", "project": verified[0].name }),
            ))
        }
        Kind::Push => {}
        Kind::Other => {
            return Ok((
                StatusCode::ACCEPTED,
                "unsupported_event",
                json!({ "message": format!("event {:?} is not handled; no build", clip(event)), "build_id": null }),
            ))
        }
    }

    let body_hash;
    let delivery =
        match Forge::first(headers, forge.delivery_headers()).filter(|(_, d)| !d.is_empty()) {
            Some((_, d)) => d,
            // Older GitLab sends no Idempotency-Key: a retry repeats the body exactly, so the
            // body's hash (with the event UUID when there is one) dedupes it.
            None if forge == Forge::GitLab => {
                let hash = hex::encode(Sha256::digest(&body));
                body_hash = match header(headers, "x-gitlab-event-uuid").filter(|u| {
                    !u.is_empty() && u.len() <= 60 && u.bytes().all(|b| b.is_ascii_graphic())
                }) {
                    Some(uuid) => format!("{uuid}:{hash}"),
                    None => format!("sha256:{hash}"),
                };
                &body_hash
            }
            None => {
                return Err(reject(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!(
                        "missing {} header",
                        header_name(forge.delivery_headers()[0])
                    ),
                ))
            }
        };
    if delivery.len() > 128 {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the delivery id is longer than 128 characters",
        ));
    }
    let Some(git_ref) = payload["ref"].as_str() else {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "push payload has no \"ref\"",
        ));
    };
    if git_ref.len() > 256 {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "push payload's \"ref\" is longer than 256 characters",
        ));
    }
    // For a tag, the commit it names (an annotated tag's `after` is the tag object): GitHub
    // and Gitea send it as `head_commit.id`, GitLab as `checkout_sha`.
    let is_commit = |s: &&str| s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let peeled = if git_ref.starts_with("refs/tags/") {
        payload["head_commit"]["id"]
            .as_str()
            .or_else(|| payload["checkout_sha"].as_str())
            .filter(is_commit)
    } else {
        None
    };
    let after = peeled.unwrap_or_else(|| payload["after"].as_str().unwrap_or(""));
    let commit_id = after.len() == 40 && after.bytes().all(|b| b.is_ascii_hexdigit());
    let deleted = payload["deleted"].as_bool().unwrap_or(false)
        || (commit_id && after.bytes().all(|b| b == b'0'));
    // The build's revision: a push that names no commit (and deletes nothing) is malformed.
    if !deleted && !commit_id {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "push payload's \"after\" is not a commit id (40 hex digits)",
        ));
    }

    // Every verified project whose branch (or tag) filter takes this ref builds it; each
    // records the delivery under its own id scope, in the transaction of its build.
    let branch = git_ref.strip_prefix("refs/heads/");
    let tag = git_ref.strip_prefix("refs/tags/");
    let mut results = Vec::with_capacity(verified.len());
    // Projects of other hives are not built here: their pushes go on to those hives below.
    let (here, elsewhere): (Vec<&ProjectRow>, Vec<&ProjectRow>) = verified
        .iter()
        .partition(|p| hive.regions.builds_here(&p.hive));
    for project in &here {
        let (build, outcome, skip_reason) = if deleted {
            (
                None,
                "deleted_branch",
                format!("{} was deleted; no build", clip(git_ref)),
            )
        } else {
            match (branch, tag) {
                (Some(b), _)
                    if !project.branch.is_empty() && !refglob::matches(&project.branch, b) =>
                {
                    (
                        None,
                        "branch_filtered",
                        format!(
                            "project {} builds branch {:?}, not {}; no build",
                            project.name,
                            project.branch,
                            clip(git_ref)
                        ),
                    )
                }
                (_, Some(t)) if project.tags.is_empty() || !refglob::matches(&project.tags, t) => (
                    None,
                    "not_a_branch",
                    if project.tags.is_empty() {
                        format!(
                            "project {} builds no tags (hivectl project add --tags GLOB); no build \
                             for {}",
                            project.name,
                            clip(git_ref)
                        )
                    } else {
                        format!(
                            "project {} builds tags {:?}, not {}; no build",
                            project.name,
                            project.tags,
                            clip(git_ref)
                        )
                    },
                ),
                (None, None) => (
                    None,
                    "not_a_branch",
                    format!("{} is neither a branch nor a tag; no build", clip(git_ref)),
                ),
                _ => (
                    Some(BuildRow::new_queued(
                        project,
                        after,
                        git_ref,
                        &forge.trigger(delivery),
                    )),
                    "build",
                    String::new(),
                ),
            }
        };
        let started = std::time::Instant::now();
        let recorded = submit_delivery(
            hive,
            NewDelivery {
                delivery_id: delivery.to_string(),
                project_id: project.id.clone(),
                build: build.clone(),
                outcome: if build.is_some() {
                    "build".to_string()
                } else {
                    skip_reason.clone()
                },
            },
        )
        .await
        .map_err(|e| match e {
            // Nothing was stored for this delivery: the sender retries later.
            IntakeError::Full(_) | IntakeError::Closed => Reject {
                retry_after: Some(RETRY_AFTER_SECS),
                ..reject(
                    StatusCode::SERVICE_UNAVAILABLE,
                    if matches!(e, IntakeError::Full(_)) {
                        "queue_full"
                    } else {
                        "shutting_down"
                    },
                    format!("{e}; retry later"),
                )
            },
            IntakeError::Store(e) => reject(
                StatusCode::INTERNAL_SERVER_ERROR,
                "error",
                format!(
                    "recording delivery {delivery} for project {}: {e}",
                    project.name
                ),
            ),
        })?;
        tracing::debug!(%delivery, project = %project.name,
            store_us = started.elapsed().as_micros() as u64, "webhook delivery stored");
        results.push(project_result(
            &project.name,
            recorded,
            build,
            outcome,
            skip_reason,
        ));
    }
    forward(forge, hive, headers, &body, &elsewhere, &mut results).await?;
    // The first project that builds (or built, on a redelivery) answers; else the first.
    let first = results
        .iter()
        .position(|r| r.answer["build_id"].is_string())
        .unwrap_or(0);
    let mut answer = results[first].answer.clone();
    let label = results[first].label;
    if results.len() > 1 {
        answer["projects"] = Value::Array(
            results
                .into_iter()
                .map(|r| {
                    let mut a = r.answer;
                    a["project"] = json!(r.project);
                    a
                })
                .collect(),
        );
    }
    Ok((StatusCode::ACCEPTED, label, answer))
}

/// Passes a verified push on to each other hive that builds one of `projects`, once per hive,
/// and adds its answer to `results`. A hive that gives no answer, or a 5xx, fails the whole
/// delivery with a 502 and `Retry-After` (what was built here is recorded, so the git host's
/// redelivery makes nothing twice); a hive that refuses it (4xx) fails it with a 502 saying so.
/// A delivery that was itself forwarded is not forwarded again.
async fn forward(
    forge: Forge,
    hive: &Hive,
    headers: &HeaderMap,
    body: &bytes::Bytes,
    projects: &[&ProjectRow],
    results: &mut Vec<ProjectResult>,
) -> Result<(), Reject> {
    let mut hives: Vec<&str> = projects.iter().map(|p| p.hive.as_str()).collect();
    hives.dedup();
    hives.sort_unstable();
    hives.dedup();
    for target in hives {
        let names: Vec<&str> = projects
            .iter()
            .filter(|p| p.hive == target)
            .map(|p| p.name.as_str())
            .collect();
        if let Some(by) = header(headers, crate::regions::FORWARDED_BY) {
            tracing::warn!(from = %clip(by), to = target, projects = ?names,
                "a forwarded push names a project this hive routes to another hive: not forwarded again");
            results.push(ProjectResult {
                project: names[0].to_string(),
                answer: json!({
                    "message": format!(
                        "forwarded here by hive {}, but hive {} routes project {} to hive {}: not \
                         forwarded again (set the project's --hive on both hives to the one that builds it)",
                        clip(by), hive.regions.name, names[0], target
                    ),
                    "build_id": null,
                    "hive": target,
                }),
                label: "forward_loop",
            });
            continue;
        }
        let started = std::time::Instant::now();
        let answer = hive
            .regions
            .forward(target, forge.path(), headers, body.clone())
            .await;
        let ms = started.elapsed().as_millis() as u64;
        match answer {
            crate::regions::Forwarded::Answer { status, body } if status.is_success() => {
                tracing::info!(to = target, projects = ?names, status = status.as_u16(), ms, "push forwarded");
                let mut answer = match body {
                    Value::Object(_) => body,
                    other => json!({ "answer": other }),
                };
                answer["hive"] = json!(target);
                answer["forwarded"] = json!(true);
                results.push(ProjectResult {
                    project: names[0].to_string(),
                    answer,
                    label: "forwarded",
                });
            }
            crate::regions::Forwarded::Answer { status, body } if status.is_client_error() => {
                let said = body["error"].as_str().unwrap_or_default();
                return Err(reject(
                    StatusCode::BAD_GATEWAY,
                    "forward_refused",
                    format!(
                        "hive {target} (which builds project {}) refused the delivery: {} {}",
                        names[0],
                        status.as_u16(),
                        clip(said)
                    ),
                ));
            }
            crate::regions::Forwarded::Answer { status, .. } => {
                tracing::warn!(
                    to = target,
                    status = status.as_u16(),
                    ms,
                    "forwarding a push failed"
                );
                return Err(Reject {
                    retry_after: Some(FORWARD_RETRY_AFTER_SECS),
                    ..reject(
                        StatusCode::BAD_GATEWAY,
                        "forward_failed",
                        format!(
                            "hive {target} (which builds project {}) answered {}; not built yet, \
                             redeliver later",
                            names[0],
                            status.as_u16()
                        ),
                    )
                });
            }
            crate::regions::Forwarded::Failed(why) => {
                tracing::warn!(to = target, reason = %why, ms, "forwarding a push failed");
                return Err(Reject {
                    retry_after: Some(FORWARD_RETRY_AFTER_SECS),
                    ..reject(
                        StatusCode::BAD_GATEWAY,
                        "forward_failed",
                        format!(
                            "hive {target} (which builds project {}) could not be reached; not \
                             built yet, redeliver later",
                            names[0]
                        ),
                    )
                });
            }
        }
    }
    Ok(())
}

/// What a 502 for an unreachable peer hive asks the sender to wait.
const FORWARD_RETRY_AFTER_SECS: u32 = 10;

/// HMAC key of the stand-in check for a repository no project builds.
const UNKNOWN_REPO_KEY: &[u8] = b"no project builds this repository";

/// What one project made of a push: its part of the answer and its metrics label.
struct ProjectResult {
    project: String,
    answer: Value,
    label: &'static str,
}

fn project_result(
    project: &str,
    recorded: Delivery,
    build: Option<BuildRow>,
    outcome: &'static str,
    skip_reason: String,
) -> ProjectResult {
    let (answer, label) = match (recorded, build) {
        (Delivery::New, Some(build)) => (
            json!({ "build_id": build.id, "duplicate": false, "project": project }),
            "build",
        ),
        (Delivery::New, None) => (
            json!({ "message": skip_reason, "build_id": null, "duplicate": false }),
            outcome_label(outcome),
        ),
        (Delivery::Duplicate { build_id, outcome }, _) => {
            if build_id.is_empty() {
                (
                    json!({ "message": outcome, "build_id": null, "duplicate": true }),
                    "duplicate",
                )
            } else {
                (
                    json!({ "build_id": build_id, "duplicate": true }),
                    "duplicate",
                )
            }
        }
    };
    ProjectResult {
        project: project.to_string(),
        answer,
        label,
    }
}

fn outcome_label(outcome: &str) -> &'static str {
    match outcome {
        "deleted_branch" => "deleted_branch",
        "not_a_branch" => "not_a_branch",
        _ => "branch_filtered",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // From GitHub's "Validating webhook deliveries" documentation.
    const SECRET: &str = "It's a Secret to Everybody";
    const PAYLOAD: &str = "Hello, World!";
    const SIGNATURE: &str =
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn clip_cuts_on_a_character_boundary() {
        assert_eq!(clip("short"), "short");
        let exact = "é".repeat(MAX_ECHO);
        assert_eq!(clip(&exact), exact);
        let long = format!("a{}", "é".repeat(MAX_ECHO));
        let cut = clip(&long);
        assert_eq!(cut.chars().count(), MAX_ECHO + 1);
        assert!(cut.starts_with("aé") && cut.ends_with("é…"), "{cut}");
    }

    #[test]
    fn github_test_vector() {
        assert!(verify_signature(
            SECRET.as_bytes(),
            PAYLOAD.as_bytes(),
            SIGNATURE
        ));
        assert_eq!(sign(SECRET.as_bytes(), PAYLOAD.as_bytes()), SIGNATURE);
    }

    #[test]
    fn wrong_or_malformed_signatures_fail() {
        assert!(!verify_signature(
            b"other secret",
            PAYLOAD.as_bytes(),
            SIGNATURE
        ));
        assert!(!verify_signature(
            SECRET.as_bytes(),
            b"Hello, World?",
            SIGNATURE
        ));
        let mut flipped = SIGNATURE.to_string();
        flipped.replace_range(70..71, "0");
        assert!(!verify_signature(
            SECRET.as_bytes(),
            PAYLOAD.as_bytes(),
            &flipped
        ));
        for bad in [
            "",
            "sha256=",
            "sha1=757107ea",
            "sha256=zz",
            &SIGNATURE[..70],
        ] {
            assert!(
                !verify_signature(SECRET.as_bytes(), PAYLOAD.as_bytes(), bad),
                "{bad}"
            );
        }
    }
}
