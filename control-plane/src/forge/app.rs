//! A GitHub App's credentials: its private key (PEM, PKCS#1 as GitHub hands it out, or
//! PKCS#8) signs a short JWT (RS256, `iss` = the app id), which finds the app's installation
//! on the repository (`GET /repos/{owner}/{repo}/installation`) and gets an installation token
//! (`POST /app/installations/{id}/access_tokens`). Tokens are cached per project and renewed
//! when less than [`REFRESH_MARGIN`] is left (GitHub's last an hour), or at once when the forge
//! answers 401.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};

use super::client::{CallError, Client};

/// A token with less than this left is renewed before use.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// Errors of a GitHub App's key and tokens.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(
        "GitHub App private key: not an RSA private key in PEM (expected the .pem file GitHub \
         made: -----BEGIN RSA PRIVATE KEY-----)"
    )]
    Pem,
    #[error("GitHub App private key rejected: {0}")]
    Key(String),
    #[error("sign the GitHub App JWT")]
    Sign,
    #[error("{what}: {source}")]
    Call {
        what: &'static str,
        #[source]
        source: CallError,
    },
    #[error("{what}: the forge answered {status}: {body}")]
    Refused {
        what: &'static str,
        status: u16,
        body: String,
    },
    #[error("{what}: the forge's answer is not the expected JSON")]
    Answer { what: &'static str },
}

impl AppError {
    /// Whether trying again later may help (the forge was down or slow, not a refusal of the
    /// key or the app).
    pub fn retryable(&self) -> bool {
        match self {
            AppError::Call { .. } => true,
            AppError::Refused { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// A parsed private key.
pub struct AppKey(RsaKeyPair);

impl std::fmt::Debug for AppKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppKey(..)")
    }
}

impl AppKey {
    /// A PEM private key: `RSA PRIVATE KEY` (PKCS#1) or `PRIVATE KEY` (PKCS#8).
    pub fn from_pem(pem: &str) -> Result<AppKey, AppError> {
        let (label, der) = pem_block(pem).ok_or(AppError::Pem)?;
        let pair = match label.as_str() {
            "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der),
            "PRIVATE KEY" => RsaKeyPair::from_pkcs8(&der),
            _ => return Err(AppError::Pem),
        }
        .map_err(|e| AppError::Key(e.to_string()))?;
        Ok(AppKey(pair))
    }

    /// The public key (PKCS#1 `RSAPublicKey`, DER): what verifies this key's JWTs.
    pub fn public_der(&self) -> Vec<u8> {
        self.0.public().as_ref().to_vec()
    }

    /// A JWT for app `app_id` at `now_s` (Unix seconds): issued a minute back (clock drift),
    /// valid nine minutes (GitHub allows ten).
    pub fn jwt(&self, app_id: u64, now_s: i64) -> Result<String, AppError> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iat": now_s - 60,
            "exp": now_s + 540,
            "iss": app_id.to_string(),
        });
        let claims = b64.encode(claims.to_string());
        let signing_input = format!("{header}.{claims}");
        let mut sig = vec![0u8; self.0.public().modulus_len()];
        self.0
            .sign(
                &RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| AppError::Sign)?;
        Ok(format!("{signing_input}.{}", b64.encode(sig)))
    }
}

/// The first PEM block of `text`: its label and DER bytes.
fn pem_block(text: &str) -> Option<(String, Vec<u8>)> {
    let begin = text.find("-----BEGIN ")?;
    let rest = &text[begin + 11..];
    let label_end = rest.find("-----")?;
    let label = rest[..label_end].to_string();
    let body_start = label_end + 5;
    let end_marker = format!("-----END {label}-----");
    let body_end = rest.find(&end_marker)?;
    let b64: String = rest[body_start..body_end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Some((label, der))
}

/// An installation token and when it expires.
#[derive(Debug, Clone)]
struct Cached {
    /// What the token was made from (app id, API, repository): a change makes a new one.
    key: String,
    token: String,
    expires_at_ms: i64,
}

/// Installation tokens per project.
#[derive(Debug, Default)]
pub struct Tokens {
    cache: Mutex<HashMap<String, Cached>>,
}

/// What one project's App needs.
pub struct AppTarget<'a> {
    pub project_id: &'a str,
    /// Changes whenever the key is set again (its sealing's nonce), so a new key never uses
    /// an old key's token.
    pub key_version: &'a str,
    pub app_id: u64,
    pub key: &'a AppKey,
    pub api: &'a str,
    pub repo_path: &'a str,
}

impl Tokens {
    /// A valid installation token for `t`, from the cache or made now.
    pub async fn token(&self, client: &Client, t: &AppTarget<'_>) -> Result<String, AppError> {
        let key = format!(
            "{}\0{}\0{}\0{}",
            t.app_id, t.api, t.repo_path, t.key_version
        );
        let now = crate::store::now_ms();
        let margin = i64::try_from(REFRESH_MARGIN.as_millis()).unwrap_or(i64::MAX);
        if let Some(c) = self.lock().get(t.project_id) {
            if c.key == key && c.expires_at_ms - now > margin {
                return Ok(c.token.clone());
            }
        }
        let (token, expires_at_ms) = fetch(client, t, now).await?;
        tracing::debug!(
            project_id = t.project_id,
            app_id = t.app_id,
            expires_in_s = (expires_at_ms - now) / 1000,
            "GitHub App installation token made"
        );
        self.lock().insert(
            t.project_id.to_string(),
            Cached {
                key,
                token: token.clone(),
                expires_at_ms,
            },
        );
        Ok(token)
    }

    /// Drops a project's token (the forge refused it).
    pub fn forget(&self, project_id: &str) {
        self.lock().remove(project_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn fetch(client: &Client, t: &AppTarget<'_>, now_ms: i64) -> Result<(String, i64), AppError> {
    let jwt = t.key.jwt(t.app_id, now_ms.div_euclid(1000))?;
    let headers = [
        ("authorization", format!("Bearer {jwt}")),
        ("accept", "application/vnd.github+json".to_string()),
        ("x-github-api-version", "2022-11-28".to_string()),
    ];
    let what = "find the GitHub App's installation on the repository";
    let url = format!("{}/repos/{}/installation", t.api, t.repo_path);
    let reply = client
        .call(http::Method::GET, &url, &headers, None)
        .await
        .map_err(|source| AppError::Call { what, source })?;
    if reply.status != 200 {
        return Err(AppError::Refused {
            what,
            status: reply.status,
            body: super::outbox::shown(&reply.body),
        });
    }
    let v: serde_json::Value =
        serde_json::from_slice(&reply.body).map_err(|_| AppError::Answer { what })?;
    let installation = v["id"].as_u64().ok_or(AppError::Answer { what })?;
    let what = "make a GitHub App installation token";
    let url = format!("{}/app/installations/{installation}/access_tokens", t.api);
    let reply = client
        .call(http::Method::POST, &url, &headers, None)
        .await
        .map_err(|source| AppError::Call { what, source })?;
    if reply.status != 201 && reply.status != 200 {
        return Err(AppError::Refused {
            what,
            status: reply.status,
            body: super::outbox::shown(&reply.body),
        });
    }
    let v: serde_json::Value =
        serde_json::from_slice(&reply.body).map_err(|_| AppError::Answer { what })?;
    let token = v["token"]
        .as_str()
        .filter(|s| !s.is_empty() && s.len() <= 1024 && s.chars().all(|c| c.is_ascii_graphic()))
        .ok_or(AppError::Answer { what })?
        .to_string();
    // Without a readable expiry the token is used for a minute past the refresh margin.
    let expires_at_ms = v["expires_at"]
        .as_str()
        .and_then(parse_utc)
        .unwrap_or(now_ms + 2 * 60_000);
    Ok((token, expires_at_ms))
}

/// `YYYY-MM-DDTHH:MM:SS[.fff]Z` (or `+00:00`) as epoch milliseconds.
pub fn parse_utc(s: &str) -> Option<i64> {
    let s = s.trim();
    let s = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00"))?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.split('.').next()?;
    let mut t = time.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days since 1970-01-01 of a civil date (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400) + hh * 3600 + mm * 60 + ss) * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        for ms in [1_000i64, 1_764_950_400_000, 1_799_999_999_000] {
            let text = hive_types::time::iso(ms, 'T');
            assert_eq!(parse_utc(&text), Some(ms), "{text}");
        }
        assert_eq!(parse_utc("2016-07-11T22:14:10Z"), Some(1_468_275_250_000));
        assert_eq!(parse_utc("nonsense"), None);
        assert_eq!(parse_utc("2016-13-11T22:14:10Z"), None);
    }

    #[test]
    fn keys_that_are_not_rsa_pem_are_refused() {
        assert!(matches!(AppKey::from_pem("hello"), Err(AppError::Pem)));
        let junk = "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        assert!(matches!(AppKey::from_pem(junk), Err(AppError::Key(_))));
    }
}
