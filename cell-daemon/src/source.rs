//! Phase 0 of a build: get the source into `/work/src` at the pushed revision.
//!
//! Runs inside the build container as the build user (the network the clone uses is the build's
//! own), as a small shell script whose inputs are positional parameters, never spliced into the
//! script text, so a hostile URL or ref cannot inject commands.
//!
//! A private repository's credentials ([`CloneAuth`]) reach only the clone: the deploy key and
//! the known hosts as 0600 files of the build user under [`AUTH_DIR`] (deleted by
//! `crate::build` before the first step), the https token as an `Authorization` header in git's
//! configuration passed through the clone's environment (`GIT_CONFIG_*`), never its argv, the
//! URL or `.git/config`. The steps' environment never holds any of it.

/// Errors in the source request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SourceError {
    #[error("{what} {value:?} must not start with '-' (it would read as a git option)")]
    Dash { what: &'static str, value: String },
    #[error("{what} contains a control character or NUL")]
    Control { what: &'static str },
}

/// Where the source comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub repo_url: String,
    /// Commit to check out; empty = tip of `git_ref` (or of the default branch).
    pub revision: String,
    /// e.g. `refs/heads/main`; empty = the default branch.
    pub git_ref: String,
    /// Credentials and host keys for a private repository.
    pub auth: CloneAuth,
}

/// The checkout, inside the container.
pub const WORK_SRC: &str = "/work/src";

/// Directory (inside the container) that holds the deploy key and known hosts during the clone.
pub const AUTH_DIR: &str = "/run/hive-clone";

/// What a private repository's clone needs (from `hive.v1.CloneAuth`). Debug shows only which
/// parts are there.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CloneAuth {
    pub ssh_private_key: String,
    pub known_hosts: String,
    pub https_user: String,
    pub https_token: String,
}

impl std::fmt::Debug for CloneAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloneAuth")
            .field("ssh_private_key", &!self.ssh_private_key.is_empty())
            .field("known_hosts_lines", &self.known_hosts.lines().count())
            .field("https_token", &!self.https_token.is_empty())
            .finish()
    }
}

/// How the repository is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Ssh,
    Https,
    Other,
}

/// A file the clone needs, written by the daemon into the container before the clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFile {
    /// Name under [`AUTH_DIR`].
    pub name: &'static str,
    pub contents: String,
}

/// The checkout, as the script sees it.
/// The clone: one session brings every branch and tag, as `git clone` does; a second one only
/// for what that lacks (a ref outside `refs/heads/`, or a commit no branch holds). Each git
/// session costs round trips (with `git://`, each stalls on a delayed ACK: ~40 ms), so the
/// common case, a webhook's branch and its commit, pays one.
const SCRIPT: &str = r#"set -eu
url=$1 rev=$2 ref=$3 dest=$4
git clone --quiet --no-checkout -- "$url" "$dest"
cd "$dest"
if [ -n "$rev" ]; then
    if ! git cat-file -e "$rev^{commit}" 2>/dev/null; then
        git fetch --quiet origin "${ref:-$rev}"
    fi
    at=$rev
elif [ -n "$ref" ]; then
    at=
    case $ref in
    refs/heads/*)
        if git rev-parse --quiet --verify "refs/remotes/origin/${ref#refs/heads/}^{commit}" >/dev/null; then
            at=refs/remotes/origin/${ref#refs/heads/}
        fi
        ;;
    esac
    if [ -z "$at" ]; then
        git fetch --quiet origin "$ref"
        at=FETCH_HEAD
    fi
else
    at=HEAD
fi
git -c advice.detachedHead=false checkout --quiet --detach "$at"
git log -1 --format='checked out %H %s'
"#;

impl Source {
    /// Checks the fields that reach git's command line.
    pub fn validate(&self) -> Result<(), SourceError> {
        for (what, value) in [
            ("repo_url", &self.repo_url),
            ("revision", &self.revision),
            ("git_ref", &self.git_ref),
        ] {
            if value.starts_with('-') {
                return Err(SourceError::Dash {
                    what,
                    value: value.clone(),
                });
            }
            if value.chars().any(|c| c.is_control()) {
                return Err(SourceError::Control { what });
            }
        }
        Ok(())
    }

    /// Whether there is anything to clone (an empty URL starts the build in an empty /work/src).
    pub fn is_empty(&self) -> bool {
        self.repo_url.is_empty()
    }

    /// Whether the URL is reached over ssh (`ssh://` or scp-like `[user@]host:path`).
    pub fn transport(&self) -> Transport {
        let url = self.repo_url.as_str();
        if let Some((scheme, _)) = url.split_once("://") {
            return match scheme.to_ascii_lowercase().as_str() {
                "ssh" | "git+ssh" | "ssh+git" => Transport::Ssh,
                "https" => Transport::Https,
                _ => Transport::Other,
            };
        }
        // scp-like: a colon before any slash.
        match (url.find(':'), url.find('/')) {
            (Some(c), Some(s)) if c < s => Transport::Ssh,
            (Some(_), None) => Transport::Ssh,
            _ => Transport::Other,
        }
    }

    /// The server's host name as ssh or https sees it (for messages).
    pub fn host(&self) -> String {
        let url = self.repo_url.as_str();
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let authority = rest.split('/').next().unwrap_or("");
        let authority = authority.rsplit('@').next().unwrap_or("");
        let host = if let Some(h) = authority.strip_prefix('[') {
            h.split(']').next().unwrap_or("")
        } else {
            authority.split(':').next().unwrap_or("")
        };
        host.to_string()
    }

    /// The files the clone reads: the deploy key and known hosts, for an ssh URL only.
    pub fn auth_files(&self) -> Vec<AuthFile> {
        if self.transport() != Transport::Ssh {
            return Vec::new();
        }
        let mut key = self.auth.ssh_private_key.clone();
        if !key.is_empty() && !key.ends_with('\n') {
            key.push('\n');
        }
        let mut files = vec![AuthFile {
            name: "known_hosts",
            contents: self.auth.known_hosts.clone(),
        }];
        if !key.is_empty() {
            files.push(AuthFile {
                name: "id",
                contents: key,
            });
        }
        files
    }

    /// The clone's environment on top of the build's: ssh with the deploy key and strict
    /// host-key checking, or the https token as a header for the repository's origin only.
    pub fn clone_env(&self) -> Vec<(String, String)> {
        let mut env = vec![("GIT_TERMINAL_PROMPT".to_string(), "0".to_string())];
        match self.transport() {
            Transport::Ssh => {
                let mut ssh = format!(
                    "ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=yes \
                     -o UserKnownHostsFile={AUTH_DIR}/known_hosts \
                     -o GlobalKnownHostsFile=/dev/null -o ConnectTimeout=30 \
                     -o IdentityAgent=none -o IdentitiesOnly=yes"
                );
                if !self.auth.ssh_private_key.is_empty() {
                    ssh.push_str(&format!(" -i {AUTH_DIR}/id"));
                }
                env.push(("GIT_SSH_COMMAND".to_string(), ssh));
                env.push(("GIT_SSH_VARIANT".to_string(), "ssh".to_string()));
            }
            Transport::Https if !self.auth.https_token.is_empty() => {
                if let Some(origin) = self.https_origin() {
                    env.push(("GIT_CONFIG_COUNT".to_string(), "1".to_string()));
                    env.push((
                        "GIT_CONFIG_KEY_0".to_string(),
                        format!("http.{origin}.extraHeader"),
                    ));
                    env.push((
                        "GIT_CONFIG_VALUE_0".to_string(),
                        format!("Authorization: Basic {}", self.basic_credentials()),
                    ));
                }
            }
            _ => {}
        }
        env
    }

    /// `scheme://host[:port]/` of an https URL (credentials in it are refused at the door).
    fn https_origin(&self) -> Option<String> {
        let (scheme, rest) = self.repo_url.split_once("://")?;
        let authority = rest.split('/').next()?;
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        Some(format!("{}://{}/", scheme.to_ascii_lowercase(), authority))
    }

    /// base64 of `user:token` (the user defaults to `x-access-token`, which GitHub, GitLab and
    /// Gitea accept with a token as the password).
    fn basic_credentials(&self) -> String {
        use base64::Engine;
        let user = if self.auth.https_user.is_empty() {
            "x-access-token"
        } else {
            &self.auth.https_user
        };
        base64::engine::general_purpose::STANDARD
            .encode(format!("{user}:{}", self.auth.https_token))
    }

    /// Values that must never reach the log: the key (whole and each of its lines), the token
    /// and the header made from it.
    pub fn auth_secrets(&self) -> Vec<String> {
        let mut out = Vec::new();
        let key = self.auth.ssh_private_key.trim();
        if !key.is_empty() {
            out.push(key.to_string());
            out.extend(
                key.lines()
                    .map(str::trim)
                    .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
                    .map(str::to_string),
            );
        }
        if !self.auth.https_token.is_empty() {
            out.push(self.auth.https_token.clone());
            out.push(self.basic_credentials());
        }
        out
    }

    /// A line for the log that says what to do after a failed clone, from what ssh or git
    /// printed (`output`, already masked).
    pub fn failure_hint(&self, output: &str) -> Option<String> {
        let host = self.host();
        if output.contains("Host key verification failed")
            || output.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        {
            return Some(format!(
                "hive: the ssh host key of {host} is not one the project trusts, so the clone \
                 was stopped (StrictHostKeyChecking=yes). If {host} is your git server, give its \
                 host keys with `hivectl project deploy-key PROJECT --known-hosts FILE` (e.g. \
                 `ssh-keyscan {host} > FILE`, checked against the keys the server's operator \
                 publishes); without that only github.com, gitlab.com and codeberg.org keys are \
                 known"
            ));
        }
        if output.contains("Permission denied (publickey") {
            return Some(if self.auth.ssh_private_key.is_empty() {
                format!(
                    "hive: {host} refused the clone over ssh and the project has no deploy key: \
                     make one with `hivectl project deploy-key PROJECT` and add the public key \
                     it prints to the repository (read access)"
                )
            } else {
                format!(
                    "hive: {host} refused the project's deploy key: add the public key that \
                     `hivectl project deploy-key PROJECT` prints to the repository (read \
                     access), or check the user in the URL"
                )
            });
        }
        if self.transport() == Transport::Https
            && (output.contains("Authentication failed")
                || output.contains("could not read Username")
                || output.contains("The requested URL returned error: 401")
                || output.contains("The requested URL returned error: 403"))
        {
            return Some(if self.auth.https_token.is_empty() {
                format!(
                    "hive: {host} asks for credentials and the project has no https token: \
                     set one with `hivectl project https-token PROJECT` (the token on stdin)"
                )
            } else {
                format!(
                    "hive: {host} refused the project's https token: set a valid one with \
                     `hivectl project https-token PROJECT` (and `--user` if the forge needs a \
                     particular user name)"
                )
            });
        }
        None
    }

    /// argv of the clone phase.
    pub fn clone_argv(&self) -> Vec<String> {
        self.clone_argv_into(WORK_SRC)
    }

    /// argv of the same clone into `dest` (a directory that must not exist yet): what the
    /// warm-start benchmark runs by hand as its baseline.
    pub fn clone_argv_into(&self, dest: &str) -> Vec<String> {
        vec![
            "/bin/sh".into(),
            "-c".into(),
            SCRIPT.into(),
            "hive-clone".into(),
            self.repo_url.clone(),
            self.revision.clone(),
            self.git_ref.clone(),
            dest.into(),
        ]
    }

    /// For the build log: what is being fetched.
    pub fn describe(&self) -> String {
        let at = match (self.revision.as_str(), self.git_ref.as_str()) {
            ("", "") => "default branch".to_string(),
            ("", r) => r.to_string(),
            (rev, _) => rev.to_string(),
        };
        format!("{} at {}", self.repo_url, at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(url: &str, rev: &str, r: &str) -> Source {
        Source {
            repo_url: url.into(),
            revision: rev.into(),
            git_ref: r.into(),
            auth: CloneAuth::default(),
        }
    }

    #[test]
    fn transports_and_hosts() {
        for (url, t, host) in [
            ("git@github.com:a/b.git", Transport::Ssh, "github.com"),
            (
                "ssh://git@198.18.0.3:2222/srv/r.git",
                Transport::Ssh,
                "198.18.0.3",
            ),
            ("ssh://[::1]/r", Transport::Ssh, "::1"),
            ("https://gitlab.com/a/b", Transport::Https, "gitlab.com"),
            ("git://198.18.0.2/demo.git", Transport::Other, "198.18.0.2"),
        ] {
            let s = src(url, "", "");
            assert_eq!(s.transport(), t, "{url}");
            assert_eq!(s.host(), host, "{url}");
        }
    }

    #[test]
    fn ssh_clone_uses_the_key_file_and_strict_host_keys_only() {
        let mut s = src("git@h:r.git", "", "");
        s.auth.ssh_private_key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----".into();
        s.auth.known_hosts = "h ssh-ed25519 AAAA".into();
        let env = s.clone_env();
        let ssh = &env.iter().find(|(k, _)| k == "GIT_SSH_COMMAND").unwrap().1;
        assert!(ssh.contains("StrictHostKeyChecking=yes"), "{ssh}");
        assert!(ssh.contains("-i /run/hive-clone/id"), "{ssh}");
        assert!(
            !ssh.contains("BEGIN"),
            "the key itself is in a file, not the command"
        );
        let files = s.auth_files();
        assert_eq!(files.len(), 2);
        assert!(files[1].contents.ends_with('\n'));
        let masked = s.auth_secrets();
        assert!(masked.iter().any(|m| m == "b3BlbnNzaC1rZXktdjEAAAAA"));
        // The argv names no credential.
        assert!(s.clone_argv().iter().all(|a| !a.contains("b3Blbn")));
    }

    #[test]
    fn https_token_is_a_header_for_the_origin_never_in_argv() {
        let mut s = src("https://git.example.com:8443/a/b.git", "", "");
        s.auth.https_token = "tok-123456".into();
        let env = s.clone_env();
        let key = &env.iter().find(|(k, _)| k == "GIT_CONFIG_KEY_0").unwrap().1;
        assert_eq!(key, "http.https://git.example.com:8443/.extraHeader");
        let val = &env
            .iter()
            .find(|(k, _)| k == "GIT_CONFIG_VALUE_0")
            .unwrap()
            .1;
        // x-access-token:tok-123456
        assert_eq!(
            val,
            "Authorization: Basic eC1hY2Nlc3MtdG9rZW46dG9rLTEyMzQ1Ng=="
        );
        assert!(s.clone_argv().iter().all(|a| !a.contains("tok-")));
        assert!(s.auth_secrets().contains(&"tok-123456".to_string()));
        assert!(s.auth_files().is_empty());
        // Not sent to a git:// URL.
        let mut g = src("git://h/r", "", "");
        g.auth.https_token = "tok-123456".into();
        assert!(g
            .clone_env()
            .iter()
            .all(|(k, _)| !k.starts_with("GIT_CONFIG")));
    }

    #[test]
    fn failures_get_a_line_saying_what_to_do() {
        let s = src("ssh://git@198.18.0.3/srv/r.git", "", "");
        let h = s
            .failure_hint(
                "No ED25519 host key is known for 198.18.0.3\nHost key verification failed.",
            )
            .unwrap();
        assert!(h.contains("--known-hosts"), "{h}");
        let h = s
            .failure_hint("git@198.18.0.3: Permission denied (publickey).")
            .unwrap();
        assert!(h.contains("no deploy key"), "{h}");
        assert!(s.failure_hint("fatal: repository not found").is_none());
    }

    #[test]
    fn options_and_control_chars_are_refused() {
        assert!(src("git://h/r", "abc", "refs/heads/main")
            .validate()
            .is_ok());
        let e = src("--upload-pack=x", "", "").validate().unwrap_err();
        assert!(e.to_string().contains("repo_url"), "{e}");
        assert!(src("git://h/r", "-x", "").validate().is_err());
        assert!(src("git://h/r\n", "", "").validate().is_err());
    }

    #[test]
    fn inputs_are_positional_not_script_text() {
        let argv = src("git://h/$(reboot)", "r", "").clone_argv();
        assert_eq!(argv[4], "git://h/$(reboot)");
        assert!(!argv[2].contains("reboot"));
    }

    /// Runs the clone script with this machine's git against a real repository (file://, so
    /// git starts an upload-pack per session, which git's trace counts): every kind of request
    /// lands on the right commit, with the branches and tags a clone brings, and the common
    /// ones (a branch, a commit on one, the default branch) in one session.
    #[test]
    fn the_clone_lands_on_the_asked_commit_in_as_few_sessions_as_it_can() {
        use std::process::Command;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        let git = |args: &[&str]| {
            let out = Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .current_dir(dir.join("w"))
                .output()
                .unwrap();
            assert!(out.status.success(), "git {args:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        std::fs::create_dir(dir.join("w")).unwrap();
        let commit = |msg: &str| {
            std::fs::write(dir.join("w/f"), msg).unwrap();
            git(&["add", "f"]);
            git(&["commit", "-q", "-m", msg]);
            git(&["rev-parse", "HEAD"])
        };
        git(&["init", "-q", "-b", "main"]);
        let c1 = commit("c1");
        git(&["tag", "v1"]);
        let c2 = commit("c2");
        git(&["checkout", "-q", "-b", "other"]);
        let c3 = commit("c3");
        // c4 is on no branch: only refs/pull/1/head holds it, as a forge's pull request.
        git(&["checkout", "-q", "--detach", "main"]);
        let c4 = commit("c4");
        git(&["checkout", "-q", "main"]);
        git(&["clone", "-q", "--bare", ".", "../r.git"]);
        git(&["push", "-q", "../r.git", &format!("{c4}:refs/pull/1/head")]);
        let url = format!("file://{}/r.git", dir.display());

        let clone = |rev: &str, r#ref: &str| {
            let dest = dir.join("d");
            let _ = std::fs::remove_dir_all(&dest);
            let trace = dir.join("trace.json");
            let _ = std::fs::remove_file(&trace);
            let argv = src(&url, rev, r#ref).clone_argv_into(dest.to_str().unwrap());
            let out = Command::new(&argv[0])
                .args(&argv[1..])
                .env("GIT_TRACE2_EVENT", &trace)
                .output()
                .unwrap();
            let sessions = std::fs::read_to_string(&trace)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("\"child_start\"") && l.contains("upload-pack"))
                .count();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            (out.status.success(), text, sessions)
        };
        for (rev, r#ref, want, sessions) in [
            (c1.as_str(), "refs/heads/main", c1.as_str(), 1),
            ("", "refs/heads/other", c3.as_str(), 1),
            ("", "", c2.as_str(), 1),
            (c1.as_str(), "", c1.as_str(), 1),
            (c4.as_str(), "refs/pull/1/head", c4.as_str(), 2),
            ("", "refs/pull/1/head", c4.as_str(), 2),
            (c4.as_str(), "", c4.as_str(), 2),
            ("", "v1", c1.as_str(), 2),
            ("", "main", c2.as_str(), 2),
        ] {
            let (ok, text, n) = clone(rev, r#ref);
            assert!(ok, "rev {rev:?} ref {ref:?}: {text}");
            assert!(text.starts_with(&format!("checked out {want} ")), "{text}");
            assert_eq!(n, sessions, "rev {rev:?} ref {ref:?}: git sessions");
        }
        // What a clone brings: every branch and the tags.
        let d = dir.join("d");
        let listed = |args: &[&str]| {
            let out = Command::new("git")
                .args(args)
                .current_dir(&d)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        assert!(listed(&["tag"]).contains("v1"));
        let branches = listed(&["branch", "-r"]);
        assert!(
            branches.contains("origin/main") && branches.contains("origin/other"),
            "{branches}"
        );
        // A ref the server lacks fails with git's own words.
        let (ok, text, _) = clone("", "refs/heads/nope");
        assert!(!ok);
        assert!(
            text.contains("couldn't find remote ref refs/heads/nope"),
            "{text}"
        );
    }
}
