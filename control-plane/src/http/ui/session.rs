//! Dashboard sessions: signing in with an API token (the same tokens as `hivectl`) makes a
//! random session id, sent as an HttpOnly, SameSite=Strict cookie scoped to `/ui`. The server
//! keeps, per session, only the token's SHA-256 (never the token) and a CSRF token for the
//! session's forms; each request looks the hash up again (`auth::authenticate_hash`), so a
//! revoked token's sessions end at once and a role change applies at once.
//!
//! Sessions live in memory (a restart signs everyone out), expire after [`SESSION_TTL`], and are
//! capped at [`MAX_SESSIONS`] (the oldest goes first), so signing in in a loop cannot grow the
//! map without bound.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::header::{COOKIE, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue};
use subtle::ConstantTimeEq;

/// The session cookie's name.
pub const COOKIE_NAME: &str = "hive_session";
/// How long a session lasts from sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions held at once.
pub const MAX_SESSIONS: usize = 10_000;

/// One signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// The SHA-256 (hex) of the token signed in with.
    pub token_hash: String,
    /// The value every form of this session must carry.
    pub csrf: String,
    created: Instant,
}

impl Session {
    /// Whether `given` is this session's CSRF token (constant time).
    pub fn csrf_ok(&self, given: &str) -> bool {
        !given.is_empty() && bool::from(self.csrf.as_bytes().ct_eq(given.as_bytes()))
    }
}

/// The sessions of this control plane.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

/// 32 random bytes, hex.
fn random_hex() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic elsewhere while holding it leaves a map that is still consistent.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session for the token with `token_hash`; returns its id (the cookie's value).
    pub fn create(&self, token_hash: String) -> String {
        let id = random_hex();
        let mut map = self.lock();
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| s.created.elapsed() < SESSION_TTL);
        }
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            id.clone(),
            Session {
                token_hash,
                csrf: random_hex(),
                created: Instant::now(),
            },
        );
        id
    }

    /// The live session with `id`.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.lock();
        match map.get(id) {
            Some(s) if s.created.elapsed() < SESSION_TTL => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The session id a request's cookies carry, if it has the shape of one.
pub fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE_NAME)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether the request came over HTTPS through a proxy that says so: then the cookie is also
/// `Secure`. (Over plain HTTP, as on a laptop's 127.0.0.1, a `Secure` cookie would not be kept.)
fn behind_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// The `Set-Cookie` header that gives the browser session `id`.
pub fn set_cookie(id: &str, request: &HeaderMap) -> (axum::http::HeaderName, HeaderValue) {
    let secure = if behind_https(request) {
        "; Secure"
    } else {
        ""
    };
    let v = format!(
        "{COOKIE_NAME}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    );
    (
        SET_COOKIE,
        HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static("")),
    )
}

/// The `Set-Cookie` header that ends the browser's session.
pub fn clear_cookie() -> (axum::http::HeaderName, HeaderValue) {
    (
        SET_COOKIE,
        HeaderValue::from_static("hive_session=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_random_checked_and_bounded() {
        let s = Sessions::default();
        let a = s.create("h".into());
        let b = s.create("h".into());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        let sa = s.get(&a).unwrap();
        assert!(sa.csrf_ok(&sa.csrf.clone()));
        assert!(!sa.csrf_ok(""));
        assert!(!sa.csrf_ok(&s.get(&b).unwrap().csrf));
        s.remove(&a);
        assert!(s.get(&a).is_none());
        for _ in 0..MAX_SESSIONS + 5 {
            s.create("x".into());
        }
        assert_eq!(s.len(), MAX_SESSIONS);
    }

    #[test]
    fn the_cookie_is_found_among_others_and_must_look_like_an_id() {
        let id = "ab".repeat(32);
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            format!("other=1; {COOKIE_NAME}={id}; x=y").parse().unwrap(),
        );
        assert_eq!(session_id(&h), Some(id));
        h.insert(COOKIE, format!("{COOKIE_NAME}=<script>").parse().unwrap());
        assert_eq!(session_id(&h), None);
        let (_, v) = set_cookie("abc", &HeaderMap::new());
        let v = v.to_str().unwrap();
        assert!(v.contains("HttpOnly") && v.contains("SameSite=Strict") && !v.contains("Secure"));
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        assert!(set_cookie("abc", &h)
            .1
            .to_str()
            .unwrap()
            .ends_with("; Secure"));
    }
}
