//! The pipeline in the repository: `hive.toml` at the root of the checkout, read after the clone
//! and before the first step. It may set the steps, env (not secrets), a lower timeout and the
//! artefact paths; the size class stays the project's (the cell was chosen before the clone).
//!
//! The file is the repository's, so it is hostile: it is opened with `openat2(RESOLVE_BENEATH)`
//! from the checkout (a symlink may point inside the checkout, never out of it), must be a
//! regular file of at most [`MAX_FILE_BYTES`], and every error names the file, line and column.
//! `crate::build` applies the result; `crate::artifacts` collects what `artifacts` names.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use toml::Spanned;

/// The file's name, at the root of the checkout.
pub const FILE_NAME: &str = "hive.toml";
/// Largest pipeline file read.
pub const MAX_FILE_BYTES: usize = 64 * 1024;
/// Most steps a pipeline may have.
pub const MAX_STEPS: usize = 100;
/// Longest step command.
pub const MAX_STEP_BYTES: usize = 16 * 1024;
/// Most env entries.
pub const MAX_ENV: usize = 100;
/// Longest env value.
pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
/// Most artefact paths (or globs).
pub const MAX_ARTIFACT_PATTERNS: usize = 100;
/// Longest artefact path.
pub const MAX_PATH_BYTES: usize = 1024;

/// The pipeline as the file gives it (fields the file leaves out are the project's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pipeline {
    pub steps: Option<Vec<String>>,
    /// Added to (and overriding) the project's env; secrets still win (names may not clash).
    pub env: Vec<(String, String)>,
    pub timeout_secs: Option<u32>,
    /// Relative paths or globs (`*`, `?`, `**`) under the checkout.
    pub artifacts: Vec<String>,
}

/// What the project allows, checked while parsing.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// The project's timeout: the pipeline may only lower it.
    pub project_timeout_secs: u64,
    /// Env names the pipeline may not set (the project's secrets).
    pub reserved_env: Vec<String>,
}

/// A pipeline file that cannot be used: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct PipelineError {
    pub file: String,
    /// 1-based; 0 when the error is about the file as a whole.
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// The offending line, for the log (empty when there is none).
    pub excerpt: String,
}

impl PipelineError {
    fn whole(message: impl Into<String>) -> Self {
        PipelineError {
            file: FILE_NAME.into(),
            line: 1,
            column: 1,
            message: message.into(),
            excerpt: String::new(),
        }
    }

    /// The error as log lines: the message, then the line with a caret under the column.
    pub fn log_text(&self) -> String {
        let mut s = format!("hive: {self}");
        if !self.excerpt.is_empty() {
            s.push_str(&format!(
                "\nhive:   {}\nhive:   {}^",
                self.excerpt,
                " ".repeat(self.column.saturating_sub(1))
            ));
        }
        s
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    steps: Option<Spanned<Vec<Spanned<String>>>>,
    env: Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>,
    timeout_secs: Option<Spanned<i64>>,
    artifacts: Option<Spanned<Vec<Spanned<String>>>>,
}

/// 1-based line and column (in characters) of byte offset `at` in `text`, and that line.
fn position(text: &str, at: usize) -> (usize, usize, String) {
    let at = at.min(text.len());
    let mut at = at;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[start..at].chars().count() + 1;
    let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let excerpt: String = text[start..end]
        .trim_end_matches('\r')
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    (line, column, excerpt)
}

fn error_at(text: &str, span: std::ops::Range<usize>, message: impl Into<String>) -> PipelineError {
    let (line, column, excerpt) = position(text, span.start);
    PipelineError {
        file: FILE_NAME.into(),
        line,
        column,
        message: message.into(),
        excerpt,
    }
}

/// Parses and checks a pipeline file's text.
pub fn parse(text: &str, limits: &Limits) -> Result<Pipeline, PipelineError> {
    if text.len() > MAX_FILE_BYTES {
        return Err(PipelineError::whole(format!(
            "the file is {} bytes; at most {MAX_FILE_BYTES} are read",
            text.len()
        )));
    }
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let message = e.message().trim().to_string();
        match e.span() {
            Some(span) => error_at(text, span, message),
            None => PipelineError::whole(message),
        }
    })?;
    let mut p = Pipeline::default();
    if let Some(steps) = raw.steps {
        let span = steps.span();
        let steps = steps.into_inner();
        if steps.is_empty() {
            return Err(error_at(
                text,
                span,
                "steps is empty: list at least one command, or leave `steps` out to run the \
                 project's",
            ));
        }
        if steps.len() > MAX_STEPS {
            return Err(error_at(
                text,
                span,
                format!("{} steps; at most {MAX_STEPS}", steps.len()),
            ));
        }
        let mut out = Vec::with_capacity(steps.len());
        for (i, s) in steps.into_iter().enumerate() {
            let span = s.span();
            let s = s.into_inner();
            let why = if s.trim().is_empty() {
                Some("is empty".to_string())
            } else if s.contains('\0') {
                Some("contains a NUL character".into())
            } else if s.len() > MAX_STEP_BYTES {
                Some(format!("is {} bytes; at most {MAX_STEP_BYTES}", s.len()))
            } else {
                None
            };
            if let Some(why) = why {
                return Err(error_at(text, span, format!("step {} {why}", i + 1)));
            }
            out.push(s);
        }
        p.steps = Some(out);
    }
    if let Some(env) = raw.env {
        let span = env.span();
        let env = env.into_inner();
        if env.len() > MAX_ENV {
            return Err(error_at(
                text,
                span,
                format!("{} env entries; at most {MAX_ENV}", env.len()),
            ));
        }
        for (k, v) in env {
            let kspan = k.span();
            let k = k.into_inner();
            let key_ok = !k.is_empty()
                && !k.as_bytes()[0].is_ascii_digit()
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !key_ok {
                return Err(error_at(
                    text,
                    kspan,
                    format!("env name {k:?} must match [A-Za-z_][A-Za-z0-9_]*"),
                ));
            }
            if k.starts_with("HIVE_") {
                return Err(error_at(
                    text,
                    kspan,
                    format!("env name {k}: names starting with HIVE_ are set by Hive"),
                ));
            }
            if limits.reserved_env.iter().any(|r| r == &k) {
                return Err(error_at(
                    text,
                    kspan,
                    format!(
                        "env name {k} is one of the project's secrets; a pipeline cannot \
                         override a secret (pick another name)"
                    ),
                ));
            }
            let vspan = v.span();
            let v = v.into_inner();
            if v.contains('\0') {
                return Err(error_at(
                    text,
                    vspan,
                    format!("env {k}: the value contains a NUL character"),
                ));
            }
            if v.len() > MAX_ENV_VALUE_BYTES {
                return Err(error_at(
                    text,
                    vspan,
                    format!(
                        "env {k}: the value is {} bytes; at most {MAX_ENV_VALUE_BYTES}",
                        v.len()
                    ),
                ));
            }
            p.env.push((k, v));
        }
    }
    if let Some(t) = raw.timeout_secs {
        let span = t.span();
        let t = *t.get_ref();
        if t < 1 {
            return Err(error_at(
                text,
                span,
                format!("timeout_secs {t}: must be at least 1"),
            ));
        }
        if (t as u64) > limits.project_timeout_secs {
            return Err(error_at(
                text,
                span,
                format!(
                    "timeout_secs {t} is over the project's {} s: a pipeline may only lower \
                     the timeout (an operator raises it with `hivectl project add --timeout`)",
                    limits.project_timeout_secs
                ),
            ));
        }
        p.timeout_secs = Some(t as u32);
    }
    if let Some(arts) = raw.artifacts {
        let span = arts.span();
        let arts = arts.into_inner();
        if arts.len() > MAX_ARTIFACT_PATTERNS {
            return Err(error_at(
                text,
                span,
                format!(
                    "{} artifact paths; at most {MAX_ARTIFACT_PATTERNS}",
                    arts.len()
                ),
            ));
        }
        for a in arts {
            let span = a.span();
            let a = a.into_inner();
            let clean = check_artifact_path(&a)
                .map_err(|why| error_at(text, span, format!("artifact path {a:?}: {why}")))?;
            p.artifacts.push(clean);
        }
    }
    Ok(p)
}

/// Checks an artefact path (or glob) named by a pipeline: relative, inside the checkout, no
/// `..`; returns it normalised (no `.` components, no doubled or trailing `/`).
pub fn check_artifact_path(path: &str) -> Result<String, String> {
    if path.is_empty() {
        return Err("is empty".into());
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(format!("is over {MAX_PATH_BYTES} bytes"));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err("contains a control character".into());
    }
    if path.starts_with('/') {
        return Err("is absolute; name a path relative to the repository's root".into());
    }
    if path.contains('\\') {
        return Err("contains '\\'; separate directories with '/'".into());
    }
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(
                    "contains `..`: artifacts must be inside the repository's work dir".into(),
                )
            }
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err("names the whole work dir; name files or globs in it".into());
    }
    Ok(parts.join("/"))
}

/// Reads `hive.toml` from the checkout (`dir`, the daemon's descriptor of `/work/src`):
/// `Ok(None)` when there is none. Never follows a symlink out of the checkout; the file must
/// belong to `owner` (the build user: a hard link to someone else's file is refused).
pub fn read(dir: &OwnedFd, owner: u32) -> Result<Option<String>, PipelineError> {
    let fd = match open_beneath(dir, FILE_NAME) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(nix::errno::Errno::EXDEV) | Err(nix::errno::Errno::ELOOP) => {
            return Err(PipelineError::whole(
                "is a symlink that leads out of the repository (or loops); it must be a file \
                 in the checkout",
            ))
        }
        Err(e) => return Err(PipelineError::whole(format!("cannot be opened: {e}"))),
    };
    let mut file = std::fs::File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| PipelineError::whole(format!("cannot be read: {e}")))?;
    if !meta.file_type().is_file() {
        return Err(PipelineError::whole("is not a regular file"));
    }
    if std::os::unix::fs::MetadataExt::uid(&meta) != owner {
        return Err(PipelineError::whole(
            "does not belong to the build user (a link to another user's file?)",
        ));
    }
    if meta.len() > MAX_FILE_BYTES as u64 {
        return Err(PipelineError::whole(format!(
            "the file is {} bytes; at most {MAX_FILE_BYTES} are read",
            meta.len()
        )));
    }
    let mut buf = Vec::new();
    (&mut file)
        .take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| PipelineError::whole(format!("cannot be read: {e}")))?;
    if buf.len() > MAX_FILE_BYTES {
        return Err(PipelineError::whole(format!(
            "the file is over {MAX_FILE_BYTES} bytes"
        )));
    }
    String::from_utf8(buf).map(Some).map_err(|e| {
        let text = String::from_utf8_lossy(e.as_bytes()).into_owned();
        error_at(
            &text,
            e.utf8_error().valid_up_to()..e.utf8_error().valid_up_to(),
            "the file is not UTF-8",
        )
    })
}

/// Opens the checkout `/work/src` of the container whose root the daemon sees at `rootfs`,
/// following no symlink on the way (a step may have replaced `src` with one).
pub fn open_checkout(rootfs: &Path) -> nix::Result<OwnedFd> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    use std::os::fd::AsRawFd;
    let root = nix::fcntl::open(
        rootfs,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let root = unsafe { OwnedFd::from_raw_fd(root) };
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let fd: RawFd = nix::fcntl::openat2(root.as_raw_fd(), CHECKOUT, how)?;
    // SAFETY: `openat2` just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The checkout, relative to the container's root.
pub const CHECKOUT: &str = "work/src";

/// Opens `rel` under `dir` for reading: symlinks are followed only while they stay beneath
/// `dir` (`RESOLVE_BENEATH`: absolute targets and `..` out of it fail with EXDEV), magic links
/// never; a fifo or device is opened without blocking (callers check the type with fstat).
pub fn open_beneath(dir: &OwnedFd, rel: &str) -> nix::Result<OwnedFd> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    use std::os::fd::AsRawFd;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd: RawFd = nix::fcntl::openat2(dir.as_raw_fd(), rel, how)?;
    // SAFETY: `openat2` just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            project_timeout_secs: 1800,
            reserved_env: vec!["API_TOKEN".into()],
        }
    }

    fn err(text: &str) -> PipelineError {
        parse(text, &limits()).expect_err(text)
    }

    #[test]
    fn a_full_pipeline_parses() {
        let p = parse(
            "steps = [\"make\", \"make test\"]\ntimeout_secs = 600\nartifacts = [\"./out//app\", \"reports/**/*.xml\"]\n\n[env]\nRUST_LOG = \"debug\"\nPATH = \"/opt/bin:/usr/bin:/bin\"\n",
            &limits(),
        )
        .unwrap();
        assert_eq!(p.steps, Some(vec!["make".into(), "make test".into()]));
        assert_eq!(p.timeout_secs, Some(600));
        assert_eq!(p.artifacts, vec!["out/app", "reports/**/*.xml"]);
        assert_eq!(
            p.env,
            vec![
                ("PATH".to_string(), "/opt/bin:/usr/bin:/bin".to_string()),
                ("RUST_LOG".to_string(), "debug".to_string())
            ]
        );
        assert_eq!(parse("", &limits()).unwrap(), Pipeline::default());
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let e = err("steps = [\"make\"]\ntimeout_secs = = 3\n");
        assert_eq!((e.file.as_str(), e.line), ("hive.toml", 2), "{e}");
        assert!(e.column > 1, "{e}");
        assert!(
            e.log_text().contains("timeout_secs = = 3"),
            "{}",
            e.log_text()
        );
        let e = err("steps = [\"make\"\n");
        assert_eq!(e.line, 1, "{e}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_where_they_are() {
        let e = err("\n\nstpes = [\"make\"]\n");
        assert_eq!((e.line, e.column), (3, 1), "{e}");
        assert!(e.message.contains("stpes"), "{e}");
        let e = err("steps = \"make\"\n");
        assert_eq!((e.line, e.column), (1, 9), "{e}");
        let e = err("steps = [\"a\"]\ntimeout_secs = \"10\"\n");
        assert_eq!((e.line, e.column), (2, 16), "{e}");
        let e = err("size_class = \"large\"\n");
        assert!(e.message.contains("size_class"), "{e}");
        let e = err("[env]\nA = 1\n");
        assert_eq!((e.line, e.column), (2, 5), "{e}");
        assert_eq!(e.message, "invalid type: integer `1`, expected a string");
        assert!(e.to_string().starts_with("hive.toml:2:5: "), "{e}");
    }

    #[test]
    fn limits_are_enforced_with_positions() {
        let many = (0..=MAX_STEPS)
            .map(|i| format!("\"s{i}\""))
            .collect::<Vec<_>>();
        let e = err(&format!("steps = [{}]\n", many.join(",")));
        assert!(e.message.contains("at most 100"), "{e}");
        assert_eq!((e.line, e.column), (1, 9));
        let e = err("steps = []\n");
        assert!(e.message.contains("empty"), "{e}");
        let e = err("steps = [\"make\", \"  \"]\n");
        assert_eq!(
            (e.line, e.column, e.message.as_str()),
            (1, 18, "step 2 is empty")
        );
        let e = err("steps = [\"a\\u0000b\"]\n");
        assert!(e.message.contains("NUL"), "{e}");
        let e = err("timeout_secs = 3600\n");
        assert!(e.message.contains("only lower"), "{e}");
        let e = err("timeout_secs = 0\n");
        assert!(e.message.contains("at least 1"), "{e}");
        let e = err("timeout_secs = 99999999999999\n");
        assert!(e.message.contains("only lower"), "{e}");
        let e = err("[env]\nHIVE_BUILD_ID = \"x\"\n");
        assert_eq!((e.line, e.column), (2, 1), "{e}");
        let e = err("[env]\nAPI_TOKEN = \"x\"\n");
        assert!(e.message.contains("secret"), "{e}");
        let e = err("[env]\n\"A-B\" = \"x\"\n");
        assert!(e.message.contains("must match"), "{e}");
        let e = err(&format!("# {}\n", "x".repeat(MAX_FILE_BYTES)));
        assert!(e.message.contains("at most"), "{e}");
    }

    #[test]
    fn artifact_paths_stay_in_the_work_dir() {
        for (bad, why) in [
            ("/etc/passwd", "absolute"),
            ("../x", ".."),
            ("a/../../x", ".."),
            ("a/..", ".."),
            ("", "empty"),
            (".", "whole work dir"),
            ("./", "whole work dir"),
            ("a\\..\\b", "'\\'"),
            ("a\nb", "control"),
        ] {
            let e = check_artifact_path(bad).expect_err(bad);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert_eq!(check_artifact_path("./a//b/").unwrap(), "a/b");
        assert_eq!(check_artifact_path("..a/b..").unwrap(), "..a/b..");
        let e = err("steps = [\"a\"]\nartifacts = [\"ok\", \"../../etc/shadow\"]\n");
        assert_eq!((e.line, e.column), (2, 20), "{e}");
        assert!(e.message.contains("`..`"), "{e}");
    }

    #[test]
    fn the_file_is_read_only_from_inside_the_checkout() {
        use std::os::unix::fs::symlink;
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join(CHECKOUT);
        std::fs::create_dir_all(&work).unwrap();
        let me = nix::unistd::getuid().as_raw();
        let dir = open_checkout(root.path()).unwrap();
        let read = |_: &std::path::PathBuf| read(&dir, me);
        assert_eq!(read(&work).unwrap(), None);
        std::fs::write(root.path().join("secret"), "steps = [\"stolen\"]\n").unwrap();
        symlink("../secret", work.join(FILE_NAME)).unwrap();
        let e = read(&work).unwrap_err();
        assert!(e.message.contains("out of the repository"), "{e}");
        std::fs::remove_file(work.join(FILE_NAME)).unwrap();
        symlink(root.path().join("secret"), work.join(FILE_NAME)).unwrap();
        assert!(read(&work)
            .unwrap_err()
            .message
            .contains("out of the repository"));
        // A symlink inside the checkout is fine.
        std::fs::remove_file(work.join(FILE_NAME)).unwrap();
        std::fs::create_dir(work.join("ci")).unwrap();
        std::fs::write(work.join("ci/hive.toml"), "steps = [\"ok\"]\n").unwrap();
        symlink("ci/hive.toml", work.join(FILE_NAME)).unwrap();
        assert_eq!(read(&work).unwrap().as_deref(), Some("steps = [\"ok\"]\n"));
        // A directory, a fifo, a big file.
        std::fs::remove_file(work.join(FILE_NAME)).unwrap();
        std::fs::create_dir(work.join(FILE_NAME)).unwrap();
        assert!(read(&work).unwrap_err().message.contains("regular"));
        std::fs::remove_dir(work.join(FILE_NAME)).unwrap();
        nix::unistd::mkfifo(&work.join(FILE_NAME), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(read(&work).unwrap_err().message.contains("regular"));
        std::fs::remove_file(work.join(FILE_NAME)).unwrap();
        std::fs::write(work.join(FILE_NAME), vec![b'#'; MAX_FILE_BYTES + 1]).unwrap();
        assert!(read(&work).unwrap_err().message.contains("at most"));
        std::fs::write(work.join(FILE_NAME), b"steps = [\"\xff\"]\n").unwrap();
        let e = read(&work).unwrap_err();
        assert!(e.message.contains("UTF-8"), "{e}");
        assert_eq!((e.line, e.column), (1, 11), "{e}");
        // Someone else's file (a hard link to it, say) is not read.
        std::fs::write(work.join(FILE_NAME), "steps = [\"x\"]\n").unwrap();
        assert!(super::read(&dir, me + 1)
            .unwrap_err()
            .message
            .contains("build user"));
        // The checkout itself replaced by a symlink is not followed.
        drop(dir);
        std::fs::rename(&work, root.path().join("elsewhere")).unwrap();
        symlink("../elsewhere", &work).unwrap();
        assert!(open_checkout(root.path()).is_err());
    }
}
