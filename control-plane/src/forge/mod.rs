//! Commit statuses back to the forges (issue 14): what a build's state says on GitHub, GitLab
//! and Gitea/Forgejo, and the request that says it. The sending is `outbox`'s (a task that
//! drains the store's outbox with retries); `client` is its HTTP client (timeouts, capped
//! bodies, no redirects) and `app` a GitHub App's installation tokens.
//!
//! | build | GitHub, Gitea | GitLab |
//! | --- | --- | --- |
//! | queued | pending "queued" | pending |
//! | running | pending "running" | running |
//! | succeeded | success | success |
//! | failed | failure | failed |
//! | cancelled | error "cancelled: ..." | canceled |
//! | timed out | error "timed out: ..." | failed "timed out: ..." |

pub mod app;
pub mod client;
pub mod outbox;

use std::time::Duration;

use hive_proto::v1::BuildState;

use crate::repo_url::RepoUrl;

/// The forges Hive reports to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Github,
    Gitlab,
    /// Gitea and Forgejo (one API).
    Gitea,
}

/// Why forge settings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForgeError {
    #[error("forge {0:?} is not one Hive reports to: use github, gitlab or gitea (Forgejo too)")]
    Kind(String),
    #[error(
        "API URL {0:?} is not an http(s) URL with a host: give the forge's API base, e.g. \
         https://api.github.com, https://HOST/api/v3 (GitHub Enterprise), \
         https://HOST/api/v4 (GitLab), https://HOST/api/v1 (Gitea, Forgejo)"
    )]
    ApiUrl(String),
    #[error("API URL {0:?} carries credentials: give the token with --token-file instead")]
    ApiUrlCredentials(String),
    #[error(
        "the project's repository {0:?} names no owner/repository path a forge API knows \
         (expected https://HOST/OWNER/REPO.git or git@HOST:OWNER/REPO.git)"
    )]
    RepoPath(String),
}

impl Kind {
    pub fn parse(s: &str) -> Result<Kind, ForgeError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "github" => Ok(Kind::Github),
            "gitlab" => Ok(Kind::Gitlab),
            "gitea" | "forgejo" => Ok(Kind::Gitea),
            _ => Err(ForgeError::Kind(s.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Github => "github",
            Kind::Gitlab => "gitlab",
            Kind::Gitea => "gitea",
        }
    }
}

/// How the outbox task sends: every number bounds what a slow or hostile forge can take.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The control plane's public URL (`--public-url`): a status links to
    /// `<public_url>/ui/builds/<id>`; None sends no link.
    pub public_url: Option<String>,
    /// Longest one HTTP call may take, connect to last body byte.
    pub timeout: Duration,
    /// Most bytes of a forge's answer read.
    pub max_body: usize,
    /// Sends in flight at once.
    pub concurrency: usize,
    /// First retry after this, doubling per attempt ...
    pub backoff: Duration,
    /// ... up to this.
    pub backoff_cap: Duration,
    /// Attempts before a status is given up (failed).
    pub max_attempts: u32,
    /// More CA certificates (PEM) to trust for forge APIs besides Mozilla's roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// How often the outbox is looked at when nothing wakes the task.
    pub poll: Duration,
    /// Sent and given-up statuses older than this are deleted (None: kept); the server sets
    /// the control plane's `--retention-days`.
    pub retention: Option<Duration>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            public_url: None,
            timeout: Duration::from_secs(10),
            max_body: 64 * 1024,
            concurrency: 16,
            backoff: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
            max_attempts: 30,
            ca_file: None,
            poll: Duration::from_secs(1),
            retention: Some(Duration::from_secs(7 * 86_400)),
        }
    }
}

/// `url` as an API base or public URL: http(s), a host, no credentials, query or fragment;
/// without a trailing `/`.
pub fn check_base_url(url: &str) -> Result<String, ForgeError> {
    let url = url.trim();
    let bad = || ForgeError::ApiUrl(url.to_string());
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(bad)?;
    if url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    if url.contains(['?', '#']) {
        return Err(bad());
    }
    let authority = rest.split('/').next().unwrap_or("");
    if authority.contains('@') {
        return Err(ForgeError::ApiUrlCredentials(url.to_string()));
    }
    let parsed: http::Uri = url.parse().map_err(|_| bad())?;
    if parsed.host().is_none_or(str::is_empty) {
        return Err(bad());
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// The API base a forge of `kind` most likely has for `repo`: api.github.com for github.com,
/// else the host's own (`/api/v3`, `/api/v4`, `/api/v1`), over https.
pub fn default_api(kind: Kind, repo: &RepoUrl) -> String {
    let host = &repo.host;
    match kind {
        Kind::Github if host == "github.com" => "https://api.github.com".to_string(),
        Kind::Github => format!("https://{host}/api/v3"),
        Kind::Gitlab => format!("https://{host}/api/v4"),
        Kind::Gitea => format!("https://{host}/api/v1"),
    }
}

/// The repository's path on the forge: `owner/repo` (GitLab: `group/sub/project`), without
/// `.git`.
pub fn repo_path(repo_url: &str) -> Result<String, ForgeError> {
    let bad = || ForgeError::RepoPath(repo_url.to_string());
    let parsed = RepoUrl::parse(repo_url).map_err(|_| bad())?;
    let path = parsed.path.trim_matches('/');
    let path = path
        .strip_suffix(".git")
        .unwrap_or(path)
        .trim_end_matches('/');
    let parts: Vec<&str> = path.split('/').collect();
    let ok = parts.len() >= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.~".contains(c))
        });
    if ok {
        Ok(path.to_string())
    } else {
        Err(bad())
    }
}

/// What a build state says on a forge of `kind`: its state word and description. None for
/// states a forge is not told (`placed`).
pub fn status_of(kind: Kind, state: BuildState, reason: &str) -> Option<(&'static str, String)> {
    let with = |what: &str| {
        let reason = reason.trim();
        if reason.is_empty() || reason == what {
            what.to_string()
        } else {
            format!("{what}: {reason}")
        }
    };
    let (word, description) = match (kind, state) {
        (_, BuildState::Placed | BuildState::Unspecified) => return None,
        (_, BuildState::Queued) => ("pending", "queued".to_string()),
        (Kind::Gitlab, BuildState::Running) => ("running", "running".to_string()),
        (_, BuildState::Running) => ("pending", "running".to_string()),
        (_, BuildState::Succeeded) => ("success", "succeeded".to_string()),
        (Kind::Gitlab, BuildState::Failed) => ("failed", with("failed")),
        (_, BuildState::Failed) => ("failure", with("failed")),
        (Kind::Gitlab, BuildState::Cancelled) => ("canceled", with("cancelled")),
        (_, BuildState::Cancelled) => ("error", with("cancelled")),
        (Kind::Gitlab, BuildState::TimedOut) => ("failed", with("timed out")),
        (_, BuildState::TimedOut) => ("error", with("timed out")),
    };
    Some((word, truncate(&description, 140)))
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// One status as a request: the URL to POST to and its JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusRequest {
    pub url: String,
    pub body: serde_json::Value,
}

/// The request that sets commit `sha`'s status `context` on a forge of `kind`.
pub fn status_request(
    kind: Kind,
    api: &str,
    repo_path: &str,
    sha: &str,
    (state, description): (&str, &str),
    context: &str,
    target_url: Option<&str>,
) -> StatusRequest {
    let mut body = serde_json::json!({
        "state": state,
        "description": description,
    });
    if let Some(t) = target_url {
        body["target_url"] = t.into();
    }
    let url = match kind {
        Kind::Github | Kind::Gitea => {
            body["context"] = context.into();
            format!("{api}/repos/{repo_path}/statuses/{sha}")
        }
        Kind::Gitlab => {
            body["name"] = context.into();
            let id: String = form_urlencoded::byte_serialize(repo_path.as_bytes()).collect();
            format!("{api}/projects/{id}/statuses/{sha}")
        }
    };
    StatusRequest { url, body }
}

/// Whether `rev` is a full commit id (SHA-1 or SHA-256, hex): the only thing a status can
/// name.
pub fn is_commit_id(rev: &str) -> bool {
    (rev.len() == 40 || rev.len() == 64) && rev.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_per_forge() {
        use BuildState as S;
        assert_eq!(
            status_of(Kind::Github, S::Queued, "queued"),
            Some(("pending", "queued".into()))
        );
        assert_eq!(status_of(Kind::Github, S::Placed, "x"), None);
        assert_eq!(
            status_of(Kind::Gitlab, S::Running, "started"),
            Some(("running", "running".into()))
        );
        assert_eq!(
            status_of(Kind::Gitea, S::TimedOut, "after 5s").unwrap(),
            ("error", "timed out: after 5s".into())
        );
        assert_eq!(
            status_of(Kind::Gitlab, S::Cancelled, "by admin").unwrap(),
            ("canceled", "cancelled: by admin".into())
        );
        let long = "é".repeat(200);
        assert!(status_of(Kind::Github, S::Failed, &long).unwrap().1.len() <= 140);
    }

    #[test]
    fn urls_and_paths() {
        assert_eq!(
            check_base_url("https://api.github.com/").unwrap(),
            "https://api.github.com"
        );
        assert_eq!(
            check_base_url("http://127.0.0.1:9/api/v4").unwrap(),
            "http://127.0.0.1:9/api/v4"
        );
        for bad in [
            "ftp://x/",
            "file:///etc/passwd",
            "https://",
            "https:// x",
            "javascript:alert(1)",
            "https://x/?a=1",
        ] {
            assert!(check_base_url(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            check_base_url("https://u:p@x/"),
            Err(ForgeError::ApiUrlCredentials(_))
        ));
        assert_eq!(
            repo_path("https://github.com/acme/widget.git").unwrap(),
            "acme/widget"
        );
        assert_eq!(
            repo_path("git@gitlab.example:grp/sub/proj.git").unwrap(),
            "grp/sub/proj"
        );
        assert!(repo_path("https://github.com/solo").is_err());
        assert!(repo_path("https://github.com/a/../b").is_err());
        let r = status_request(
            Kind::Gitlab,
            "https://gl/api/v4",
            "grp/sub/proj",
            "abc",
            ("running", "running"),
            "hive/p",
            None,
        );
        assert_eq!(
            r.url,
            "https://gl/api/v4/projects/grp%2Fsub%2Fproj/statuses/abc"
        );
        assert_eq!(r.body["name"], "hive/p");
        assert!(r.body.get("target_url").is_none());
        let u = RepoUrl::parse("https://ghe.corp/acme/w.git").unwrap();
        assert_eq!(default_api(Kind::Github, &u), "https://ghe.corp/api/v3");
        assert!(is_commit_id(&"a".repeat(40)));
        assert!(!is_commit_id("abc123"));
    }
}
