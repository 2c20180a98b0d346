//! Phase 0 of a build: get the source into `/work/src` at the pushed revision.
//!
//! Runs inside the build container as the build user (the network the clone uses is the build's
//! own), as a small shell script whose inputs are positional parameters, never spliced into the
//! script text, so a hostile URL or ref cannot inject commands.

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
}

/// The checkout, as the script sees it.
const SCRIPT: &str = r#"set -eu
url=$1 rev=$2 ref=$3
git -c advice.detachedHead=false clone --quiet -- "$url" /work/src
cd /work/src
if [ -n "$ref" ]; then
    git fetch --quiet origin "$ref"
fi
if [ -n "$rev" ]; then
    git -c advice.detachedHead=false checkout --quiet --detach "$rev"
elif [ -n "$ref" ]; then
    git -c advice.detachedHead=false checkout --quiet --detach FETCH_HEAD
fi
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

    /// argv of the clone phase.
    pub fn clone_argv(&self) -> Vec<String> {
        vec![
            "/bin/sh".into(),
            "-c".into(),
            SCRIPT.into(),
            "hive-clone".into(),
            self.repo_url.clone(),
            self.revision.clone(),
            self.git_ref.clone(),
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
        }
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
}
