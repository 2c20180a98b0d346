//! Repository URLs: which ones Hive accepts for a project, and the key under which a webhook's
//! URLs find their projects.
//!
//! Accepted forms are those a cell can fetch from: `https://` and `http://`, `ssh://` and the
//! scp-like `user@host:path`, and `git://`. Refused at the door, with a message that says what to
//! do: local paths (`file://`, `/srv/x.git`), other schemes, URLs without a host or a path, and
//! credentials in the URL (a URL is shown to every reader of the project).
//!
//! The key ([`RepoUrl::key`]) is what forges treat as one repository: the host and the path,
//! lower case (GitHub, GitLab and Gitea names are case-insensitive), without the scheme, user,
//! port, a `.git` suffix or trailing slashes. So `https://GitHub.com/Acme/Widget.git`,
//! `git@github.com:acme/widget` and `ssh://git@github.com/acme/widget/` share one key. Matching
//! by key only selects candidates: a webhook builds a project only when its signature verifies
//! with that project's secret.

use std::fmt;

/// Longest repository URL accepted.
pub const MAX_LEN: usize = 2048;

/// How a cell fetches the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Https,
    Http,
    Ssh,
    Git,
}

/// A repository URL Hive can fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoUrl {
    pub scheme: Scheme,
    /// Lower-case host name or IP literal (brackets kept for IPv6).
    pub host: String,
    /// Path after the host, without its leading `/` (or `:` of the scp-like form).
    pub path: String,
}

/// Why a repository URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepoUrlError {
    #[error("repository URL is empty: give the URL a cell clones from, e.g. https://github.com/owner/repo.git")]
    Empty,
    #[error("repository URL is over {MAX_LEN} characters")]
    TooLong,
    #[error("repository URL {0:?} contains spaces or control characters")]
    Whitespace(String),
    #[error(
        "repository URL {0:?} is not one Hive can fetch: use https://host/owner/repo.git, \
         ssh://user@host/path, user@host:path or git://host/path"
    )]
    NotAUrl(String),
    #[error(
        "repository URL {url:?}: scheme {scheme:?} is not supported (Hive fetches over https, \
         http, ssh and git)"
    )]
    Scheme { url: String, scheme: String },
    #[error(
        "repository URL {0:?} is a local path: a cell cannot reach the control plane's files; \
         serve the repository over https, ssh or git"
    )]
    Local(String),
    #[error("repository URL {0:?} has no host")]
    NoHost(String),
    #[error(
        "repository URL {0:?} has a bad host (letters, digits, '-', '.', or an [IPv6] literal)"
    )]
    BadHost(String),
    #[error("repository URL {0:?} has a bad port")]
    BadPort(String),
    #[error("repository URL {0:?} names no repository (its path is empty)")]
    NoPath(String),
    #[error(
        "repository URL {0:?} carries credentials: take them out (the URL is shown to every \
         reader of the project): give an https token with `hivectl project https-token PROJECT`, \
         or clone over ssh with `hivectl project deploy-key PROJECT`"
    )]
    Credentials(String),
}

impl RepoUrl {
    /// Parses and checks `input` (surrounding whitespace ignored).
    pub fn parse(input: &str) -> Result<RepoUrl, RepoUrlError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(RepoUrlError::Empty);
        }
        if s.len() > MAX_LEN {
            return Err(RepoUrlError::TooLong);
        }
        // Every message shows the URL without what may be a password or a token.
        let url = redact(s);
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(RepoUrlError::Whitespace(url));
        }
        if let Some((scheme, rest)) = s.split_once("://") {
            let scheme_lc = scheme.to_ascii_lowercase();
            let scheme = match scheme_lc.as_str() {
                "https" => Scheme::Https,
                "http" => Scheme::Http,
                "ssh" | "git+ssh" | "ssh+git" => Scheme::Ssh,
                "git" => Scheme::Git,
                "file" => return Err(RepoUrlError::Local(url)),
                _ => {
                    return Err(RepoUrlError::Scheme {
                        url,
                        scheme: scheme.to_string(),
                    })
                }
            };
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, ""),
            };
            let host_port = match authority.rsplit_once('@') {
                Some((userinfo, hp)) => {
                    // A user alone is how ssh names its login (git@...); anything more, or a
                    // user over http(s) (a token as the user name), is a credential.
                    if scheme != Scheme::Ssh || userinfo.contains(':') || userinfo.is_empty() {
                        return Err(RepoUrlError::Credentials(url));
                    }
                    hp
                }
                None => authority,
            };
            let host = split_port(host_port, &url)?;
            Self::finish(scheme, host, path, url)
        } else if let Some((user, host, path)) = scp_like(s) {
            if user.is_some_and(|u| u.is_empty() || u.contains(':')) {
                return Err(RepoUrlError::Credentials(url));
            }
            Self::finish(Scheme::Ssh, host, path, url)
        } else if s.starts_with('/') || s.starts_with('.') || s.starts_with('~') {
            Err(RepoUrlError::Local(url))
        } else {
            Err(RepoUrlError::NotAUrl(url))
        }
    }

    fn finish(
        scheme: Scheme,
        host: &str,
        path: &str,
        url: String,
    ) -> Result<RepoUrl, RepoUrlError> {
        if host.is_empty() {
            return Err(RepoUrlError::NoHost(url));
        }
        let host_ok = if let Some(inner) = host.strip_prefix('[') {
            inner
                .strip_suffix(']')
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
        } else {
            host.len() <= 253
                && host.split('.').all(|l| {
                    !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-')
                })
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        };
        if !host_ok {
            return Err(RepoUrlError::BadHost(url));
        }
        let path = path.trim_start_matches('/');
        if strip_repo_suffix(path).is_empty() {
            return Err(RepoUrlError::NoPath(url));
        }
        Ok(RepoUrl {
            scheme,
            host: host.to_ascii_lowercase(),
            path: path.to_string(),
        })
    }

    /// The matching key: `host/path`, lower case, without `.git` or trailing slashes.
    pub fn key(&self) -> String {
        format!("{}/{}", self.host, strip_repo_suffix(&self.path)).to_lowercase()
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheme::Https => "https",
            Scheme::Http => "http",
            Scheme::Ssh => "ssh",
            Scheme::Git => "git",
        })
    }
}

/// The key of `url` if it parses (webhook payloads send several URLs, some maybe odd).
pub fn key_of(url: &str) -> Option<String> {
    RepoUrl::parse(url).ok().map(|u| u.key())
}

/// `host[:port]` → host; the port, when given, must be a number in range.
fn split_port<'a>(host_port: &'a str, url: &str) -> Result<&'a str, RepoUrlError> {
    if host_port.starts_with('[') {
        // [v6]:port
        return match host_port.find(']') {
            Some(i) => {
                let (host, rest) = host_port.split_at(i + 1);
                match rest.strip_prefix(':') {
                    Some(p) if p.parse::<u16>().is_ok_and(|p| p > 0) => Ok(host),
                    Some(_) => Err(RepoUrlError::BadPort(url.to_string())),
                    None if rest.is_empty() => Ok(host),
                    None => Err(RepoUrlError::BadHost(url.to_string())),
                }
            }
            None => Err(RepoUrlError::BadHost(url.to_string())),
        };
    }
    match host_port.split_once(':') {
        Some((host, port)) => {
            if port.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                Err(RepoUrlError::BadPort(url.to_string()))
            } else {
                Ok(host)
            }
        }
        None => Ok(host_port),
    }
}

/// The scp-like form `[user@]host:path` (git's rule: a colon before any slash, and not a
/// Windows-like drive letter); returns (user, host, path).
fn scp_like(s: &str) -> Option<(Option<&str>, &str, &str)> {
    let head = &s[..s.find('/').unwrap_or(s.len())];
    let (user, rest) = match head.rfind('@') {
        Some(at) => (Some(&s[..at]), &s[at + 1..]),
        None => (None, s),
    };
    let colon = rest.find(':')?;
    if rest[..colon].contains('/') || (user.is_none() && colon < 2) {
        return None;
    }
    Some((user, &rest[..colon], &rest[colon + 1..]))
}

fn strip_repo_suffix(path: &str) -> &str {
    let p = path.trim_end_matches('/');
    let p = p.strip_suffix(".git").unwrap_or(p);
    p.trim_end_matches('/')
}

/// `url` with any password or token replaced by `***`, for error messages.
fn redact(url: &str) -> String {
    let (prefix, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let end = rest.find('/').unwrap_or(rest.len());
    match rest[..end].rsplit_once('@') {
        Some((_, host)) => format!("{prefix}***@{host}{}", &rest[end..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms_share_a_key() {
        let forms = [
            "https://github.com/acme/widget.git",
            "https://GitHub.com/Acme/Widget",
            "https://github.com/acme/widget/",
            "http://github.com:80/acme/widget.git/",
            "ssh://git@github.com/acme/widget.git",
            "ssh://git@github.com:22/acme/widget",
            "git@github.com:acme/widget.git",
            "git@github.com:/acme/widget",
            "git://github.com/acme/widget.git",
            " https://github.com/acme/widget.git ",
        ];
        for f in forms {
            let u = RepoUrl::parse(f).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(u.key(), "github.com/acme/widget", "{f}");
        }
        assert_eq!(
            RepoUrl::parse("git@github.com:a/b.git").unwrap().scheme,
            Scheme::Ssh
        );
        assert_eq!(
            key_of("git://127.0.0.1:9418/base.git").unwrap(),
            "127.0.0.1/base"
        );
        assert_eq!(key_of("https://[::1]:8443/x/y").unwrap(), "[::1]/x/y");
        assert_ne!(key_of("https://h/a/b"), key_of("https://h/a/c"));
    }

    #[test]
    fn refused_forms_say_why() {
        use RepoUrlError as E;
        type Check = fn(&RepoUrlError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| *e == E::Empty),
            ("   ", |e| *e == E::Empty),
            ("not-a-url", |e| matches!(e, E::NotAUrl(_))),
            ("http://", |e| matches!(e, E::NoHost(_))),
            ("https:///a/b", |e| matches!(e, E::NoHost(_))),
            ("https://h", |e| matches!(e, E::NoPath(_))),
            ("https://h/.git", |e| matches!(e, E::NoPath(_))),
            ("ftp://x/y.git", |e| matches!(e, E::Scheme { .. })),
            ("file:///etc", |e| matches!(e, E::Local(_))),
            ("/srv/git/x.git", |e| matches!(e, E::Local(_))),
            ("./x", |e| matches!(e, E::Local(_))),
            ("https://user:token@github.com/a/b", |e| {
                matches!(e, E::Credentials(_))
            }),
            ("https://ghp_token@github.com/a/b", |e| {
                matches!(e, E::Credentials(_))
            }),
            ("ssh://git:pw@h/a", |e| matches!(e, E::Credentials(_))),
            ("https://h:x/a", |e| matches!(e, E::BadPort(_))),
            ("https://h:0/a", |e| matches!(e, E::BadPort(_))),
            ("https://h_x/a", |e| matches!(e, E::BadHost(_))),
            ("https://h/a b", |e| matches!(e, E::Whitespace(_))),
        ];
        for (input, ok) in cases {
            let e = RepoUrl::parse(input).expect_err(input);
            assert!(ok(&e), "{input:?}: {e:?}");
        }
        let long = format!("https://h/{}", "a".repeat(MAX_LEN));
        assert_eq!(RepoUrl::parse(&long).unwrap_err(), E::TooLong);
    }

    #[test]
    fn credentials_never_reach_the_message() {
        for url in [
            "https://user:s3cret@github.com/a/b",
            "https://s3cret@github.com/a/b",
            "s3cret:x@h:a/b",
            "ftp://u:s3cret@h/x",
            "https://u:s3cret@h/a b",
            "weird://u:s3cret@h",
        ] {
            let msg = RepoUrl::parse(url).unwrap_err().to_string();
            assert!(!msg.contains("s3cret"), "{msg}");
        }
    }
}
