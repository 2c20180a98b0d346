//! The outbox task: sends the statuses the store's outbox holds (`store::forges`) to the
//! projects' forges. A forge that is down, slow or hostile costs this task only: placement and
//! the box sessions never wait on it.
//!
//! Each pass takes the statuses due (each the first pending one of its commit), claims each
//! with a conditional update (another control plane of the database may be looking at the same
//! rows; only one claim wins), and sends it in a task of its own, at most
//! `Settings::concurrency` at once, and at most a quarter of those for one project (its forge).
//! A status that fails for a reason that may pass (no answer,
//! a timeout, 5xx, 429, 408, an installation token refused) is tried again after a backoff
//! that doubles up to a cap; after `max_attempts`, or at once for a refusal (other 4xx, a
//! redirect), it is given up (`failed`, with the error). Later statuses of the same commit wait
//! for it, so a forge never sees `pending` after `success` of one build. The task wakes on
//! build changes (this control plane's and the others'), when a send ends, and every `poll`.

use std::collections::HashMap;
use std::sync::Arc;

use hive_proto::v1::BuildState;
use tokio::sync::{Notify, Semaphore};

use super::app::{AppKey, AppTarget, Tokens};
use super::client::{CallError, Client};
use super::{status_of, status_request, Kind, Settings};
use crate::state::{millis, Hive};
use crate::store::{now_ms, ForgeRow, StatusRow};

/// Statuses looked at per pass.
const BATCH: u32 = 256;

/// Passes at most this often: a burst of build changes wakes the task once.
const MIN_GAP: std::time::Duration = std::time::Duration::from_millis(50);

/// The sealed-value names of a forge's credentials (the associated data of their sealing).
pub const TOKEN_NAME: &str = "hive.forge.token";
pub const APP_KEY_NAME: &str = "hive.forge.app_key";

/// How a send ended.
#[derive(Debug)]
enum Outcome {
    Sent,
    /// May work later.
    Retry(String),
    /// Will not work: given up now.
    Refused(String),
    /// Nothing to send it to (no forge any more, no commit id, the build is gone).
    Skip(String),
}

/// Runs until shutdown, with `tls` (`client::tls_config`) for https forges.
pub async fn run(hive: Arc<Hive>, settings: Settings, tls: Arc<rustls::ClientConfig>) {
    let me = hive.bus.origin().to_string();
    let client = Client {
        timeout: settings.timeout,
        max_body: settings.max_body,
        tls,
    };
    let tokens = Arc::new(Tokens::default());
    let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let done = Arc::new(Notify::new());
    let mut events = hive.events.subscribe();
    let mut shutdown = hive.shutdown.clone();
    // A claim outlives the longest send: an App token (two calls) and the status.
    let claim_ms = millis(settings.timeout) * 3 + 10_000;
    // One forge (project) gets at most a quarter of the slots: a stalling one leaves the
    // others theirs.
    let per_project = (settings.concurrency / 4).max(1);
    let busy: Arc<std::sync::Mutex<HashMap<String, usize>>> = Arc::default();
    let mut last_purge = 0i64;
    let mut last_pass = tokio::time::Instant::now() - MIN_GAP;
    loop {
        tokio::time::sleep_until(last_pass + MIN_GAP).await;
        last_pass = tokio::time::Instant::now();
        let now = now_ms();
        match hive.store.due_statuses(now, BATCH).await {
            Ok(rows) => {
                for row in rows {
                    if lock(&busy).get(&row.project_id).copied().unwrap_or(0) >= per_project {
                        continue;
                    }
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        break;
                    };
                    match hive
                        .store
                        .claim_status(row.id, &me, now, now + claim_ms)
                        .await
                    {
                        Ok(true) => {
                            *lock(&busy).entry(row.project_id.clone()).or_insert(0) += 1;
                        }
                        Ok(false) => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, "claim a forge status failed; trying later");
                            break;
                        }
                    }
                    let (hive, client, tokens, settings, me, done, busy) = (
                        hive.clone(),
                        client.clone(),
                        tokens.clone(),
                        settings.clone(),
                        me.clone(),
                        done.clone(),
                        busy.clone(),
                    );
                    tokio::spawn(async move {
                        let outcome = send(&hive, &client, &tokens, &settings, &row).await;
                        record(&hive, &settings, &me, &row, outcome).await;
                        {
                            let mut b = lock(&busy);
                            if let Some(n) = b.get_mut(&row.project_id) {
                                *n -= 1;
                                if *n == 0 {
                                    b.remove(&row.project_id);
                                }
                            }
                        }
                        drop(slot);
                        done.notify_one();
                    });
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "read the forge status outbox failed; trying later")
            }
        }
        if let Some(keep) = settings.retention {
            if now - last_purge > 600_000 {
                last_purge = now;
                match hive.store.purge_statuses_before(now - millis(keep)).await {
                    Ok(n) if n > 0 => {
                        tracing::info!(statuses = n, "retention: purged forge statuses")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "purge forge statuses failed"),
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.poll) => {}
            _ = done.notified() => {}
            r = build_changed(&mut events) => {
                if r.is_none() {
                    return;
                }
            }
            _ = crate::events::stopped(&mut shutdown) => return,
        }
    }
}

/// Waits for a build change (log news does not wake the task); None when the hub closed.
async fn build_changed(
    events: &mut tokio::sync::broadcast::Receiver<crate::events::Event>,
) -> Option<()> {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(crate::events::Event::Build(_)) | Err(RecvError::Lagged(_)) => return Some(()),
            Ok(_) => {}
            Err(RecvError::Closed) => return None,
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes how a send ended, counts it and logs what an operator should see (a give-up at
/// warn; retries at debug, so an outage does not flood the log).
async fn record(hive: &Hive, settings: &Settings, me: &str, row: &StatusRow, outcome: Outcome) {
    let now = now_ms();
    let attempts = u32::try_from(row.attempts + 1).unwrap_or(u32::MAX);
    // Counted once written, so `/metrics` never shows a status sent and still pending.
    let (counted, written) = match &outcome {
        Outcome::Sent => (
            "sent",
            hive.store.end_status(row.id, me, "sent", "", now).await,
        ),
        Outcome::Retry(e) if attempts < settings.max_attempts => {
            let next = now + backoff_ms(settings, attempts);
            tracing::debug!(build_id = %row.build_id, state = %row.state, attempts,
                error = %e, "forge status not sent; trying again");
            (
                "retried",
                hive.store.retry_status(row.id, me, next, e).await,
            )
        }
        Outcome::Retry(e) | Outcome::Refused(e) => {
            tracing::warn!(build_id = %row.build_id, project_id = %row.project_id,
                state = %row.state, attempts, error = %e, "forge status given up");
            (
                "failed",
                hive.store.end_status(row.id, me, "failed", e, now).await,
            )
        }
        Outcome::Skip(why) => {
            tracing::debug!(build_id = %row.build_id, why = %why, "forge status skipped");
            (
                "skipped",
                hive.store.end_status(row.id, me, "skipped", why, now).await,
            )
        }
    };
    hive.metrics.forge_status(counted);
    match written {
        Ok(true) => {}
        Ok(false) => tracing::debug!(status_id = row.id, "forge status claim lost meanwhile"),
        Err(e) => {
            tracing::warn!(error = %e, "record a forge status failed; it is sent again later")
        }
    }
}

/// The wait before attempt `attempts + 1`: `backoff` doubled per attempt made, at most
/// `backoff_cap`.
pub fn backoff_ms(settings: &Settings, attempts: u32) -> i64 {
    let base = millis(settings.backoff).max(1);
    let cap = millis(settings.backoff_cap).max(base);
    let shift = attempts.saturating_sub(1).min(30);
    base.saturating_mul(1i64 << shift).min(cap)
}

/// At most 300 bytes of a forge's answer, printable, for errors and the log.
pub fn shown(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

async fn send(
    hive: &Hive,
    client: &Client,
    tokens: &Tokens,
    settings: &Settings,
    row: &StatusRow,
) -> Outcome {
    let forge = match hive.store.get_forge(&row.project_id).await {
        Ok(Some(f)) => f,
        Ok(None) => return Outcome::Skip("the project no longer has a forge".into()),
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    if !super::is_commit_id(&row.revision) {
        return Outcome::Skip(format!(
            "revision {:?} is not a full commit id",
            super::truncate(&row.revision, 80)
        ));
    }
    let build = match hive.store.get_build(&row.build_id).await {
        Ok(Some(b)) => b,
        Ok(None) => return Outcome::Skip("the build is gone".into()),
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    let Ok(kind) = Kind::parse(&forge.kind) else {
        return Outcome::Refused(format!("stored forge kind {:?}", forge.kind));
    };
    let Some(state) = BuildState::from_short_name(&row.state) else {
        return Outcome::Skip(format!("state {:?}", row.state));
    };
    let Some((word, description)) = status_of(kind, state, &row.reason) else {
        return Outcome::Skip(format!("state {:?} is not reported", row.state));
    };
    let context = format!("hive/{}", build.project_name);
    let target = settings
        .public_url
        .as_ref()
        .map(|u| format!("{u}/ui/builds/{}", build.id));
    let req = status_request(
        kind,
        &forge.api_url,
        &forge.repo_path,
        &row.revision,
        (word, &description),
        &context,
        target.as_deref(),
    );
    let (auth, secret) = match credentials(hive, client, tokens, &forge, kind).await {
        Ok(a) => a,
        Err(o) => return o,
    };
    // A forge that echoes the credential back must not get it into the store, the log or
    // `hivectl project status`.
    let shown = |body: &[u8]| shown(body).replace(secret.as_str(), "***");
    let reply = match client
        .call(http::Method::POST, &req.url, &auth, Some(&req.body))
        .await
    {
        Ok(r) => r,
        Err(e) => return Outcome::Retry(call_error(&e)),
    };
    match reply.status {
        200..=299 => Outcome::Sent,
        300..=399 => Outcome::Refused(format!(
            "the forge answered {} (redirect to {:?}), which is not followed: give the API \
             URL itself (hivectl project status --api)",
            reply.status,
            reply.location.unwrap_or_default()
        )),
        401 if forge.app_id > 0 => {
            // An installation token revoked or expired early: a new one next time.
            tokens.forget(&forge.project_id);
            Outcome::Retry(format!("the forge answered 401: {}", shown(&reply.body)))
        }
        408 | 429 | 500..=599 => Outcome::Retry(format!(
            "the forge answered {}: {}",
            reply.status,
            shown(&reply.body)
        )),
        s => Outcome::Refused(format!("the forge answered {s}: {}", shown(&reply.body))),
    }
}

fn call_error(e: &CallError) -> String {
    hive_sys::error_chain(e)
}

/// The headers that authenticate a status call on `forge`, and the credential in them.
async fn credentials(
    hive: &Hive,
    client: &Client,
    tokens: &Tokens,
    forge: &ForgeRow,
    kind: Kind,
) -> Result<(Vec<(&'static str, String)>, String), Outcome> {
    let opened = |name: &str, nonce: &str, sealed: &str| {
        hive.sealer
            .open(&forge.project_id, name, nonce, sealed)
            .ok()
            .and_then(|v| String::from_utf8(v).ok())
            .ok_or_else(|| {
                Outcome::Refused(format!(
                    "the project's forge {} does not open with this control plane's secrets \
                     key: set it again (hivectl project status)",
                    if name == TOKEN_NAME {
                        "token"
                    } else {
                        "App key"
                    }
                ))
            })
    };
    let token = if forge.app_id > 0 {
        let pem = opened(APP_KEY_NAME, &forge.app_key_nonce, &forge.app_key_sealed)?;
        let key = AppKey::from_pem(&pem).map_err(|e| Outcome::Refused(e.to_string()))?;
        let target = AppTarget {
            project_id: &forge.project_id,
            key_version: &forge.app_key_nonce,
            app_id: u64::try_from(forge.app_id).unwrap_or(0),
            key: &key,
            api: &forge.api_url,
            repo_path: &forge.repo_path,
        };
        tokens.token(client, &target).await.map_err(|e| {
            let text = hive_sys::error_chain(&e);
            if e.retryable() {
                Outcome::Retry(text)
            } else {
                Outcome::Refused(text)
            }
        })?
    } else {
        opened(TOKEN_NAME, &forge.token_nonce, &forge.token_sealed)?
    };
    let headers = match kind {
        Kind::Github => vec![
            ("authorization", format!("Bearer {token}")),
            ("accept", "application/vnd.github+json".to_string()),
            ("x-github-api-version", "2022-11-28".to_string()),
        ],
        Kind::Gitlab => vec![("private-token", token.clone())],
        Kind::Gitea => vec![("authorization", format!("token {token}"))],
    };
    Ok((headers, token))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = Settings {
            backoff: Duration::from_millis(100),
            backoff_cap: Duration::from_millis(1000),
            ..Settings::default()
        };
        let waits: Vec<i64> = (1..=6).map(|a| backoff_ms(&s, a)).collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff_ms(&s, u32::MAX), 1000);
        assert_eq!(shown(b"a\nb\x1b[31m"), "a b [31m");
    }
}
