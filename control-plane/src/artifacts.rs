//! The artefact store on disk: `<data-dir>/artifacts/<build>/<path>`, written only by
//! `domain::artifacts` from box chunks and read by the API.
//!
//! Boxes and cells are hostile here: a build id and a path are checked before either becomes
//! part of a file name ([`check_build_id`], [`check_path`]: relative, `/`-separated, no empty,
//! `.` or `..` component, no control character, bounded), files are opened with `O_NOFOLLOW`
//! and written at an offset only up to the size the row gives (a resend writes the same bytes
//! again; a hole is refused). Nothing else writes under this directory, so no symlink can be
//! there to follow; `O_NOFOLLOW` and `symlink_metadata` checks keep it so.

use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::Digest;

/// Longest artefact path.
pub const MAX_PATH_BYTES: usize = 1024;
/// Deepest artefact path.
const MAX_DEPTH: usize = 32;
/// Most artefacts of one build.
pub const MAX_FILES: u64 = 1000;

/// A failed artefact operation: what, and with which input.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("build id {0:?}: must be 1-64 characters of [A-Za-z0-9_-]")]
    BuildId(String),
    #[error("artifact path {path:?}: {why}")]
    Path { path: String, why: &'static str },
    #[error("artifact {path:?}: {why}")]
    Refused { path: String, why: String },
    #[error("artifact file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Checks a build id before it names a directory.
pub fn check_build_id(id: &str) -> Result<(), ArtifactError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ArtifactError::BuildId(id.chars().take(80).collect()))
    }
}

/// Checks an artefact path: relative, `/`-separated components that are not empty, `.` or
/// `..`, no control characters or backslashes, bounded length and depth.
pub fn check_path(path: &str) -> Result<(), ArtifactError> {
    let bad = |why| {
        Err(ArtifactError::Path {
            path: path.chars().take(200).collect(),
            why,
        })
    };
    if path.is_empty() {
        return bad("is empty");
    }
    if path.len() > MAX_PATH_BYTES {
        return bad("is too long (at most 1024 bytes)");
    }
    if path.starts_with('/') {
        return bad("is absolute");
    }
    if path.chars().any(|c| c.is_control() || c == '\\') {
        return bad("contains a control character or a backslash");
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() > MAX_DEPTH {
        return bad("is too deep (at most 32 components)");
    }
    for p in parts {
        match p {
            "" => return bad("has an empty component"),
            "." | ".." => return bad("has a `.` or `..` component"),
            p if p.len() > 255 => return bad("has a component over 255 bytes"),
            _ => {}
        }
    }
    Ok(())
}

/// The directory tree of artefacts.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
    /// Most bytes of artefacts per build.
    pub cap_bytes: u64,
}

impl ArtifactStore {
    pub fn new(root: PathBuf, cap_bytes: u64) -> Self {
        ArtifactStore { root, cap_bytes }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn file(&self, build_id: &str, path: &str) -> Result<PathBuf, ArtifactError> {
        check_build_id(build_id)?;
        check_path(path)?;
        Ok(self.root.join(build_id).join(path))
    }

    /// Writes `data` at `offset` of the artefact (whose whole size is `size`); returns the
    /// bytes the file now holds. A write past `size` or leaving a hole is refused.
    pub fn write(
        &self,
        build_id: &str,
        path: &str,
        size: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, ArtifactError> {
        let file = self.file(build_id, path)?;
        let refused = |why: String| ArtifactError::Refused {
            path: path.to_string(),
            why,
        };
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= size)
            .ok_or_else(|| {
                refused(format!(
                    "bytes {offset}+{} pass its size {size}",
                    data.len()
                ))
            })?;
        let io = |source| ArtifactError::Io {
            path: file.clone(),
            source,
        };
        // Every directory on the way is made here, by us; one that is not a plain directory
        // (a file of another artefact, say) is refused rather than followed.
        let mut dir = self.root.clone();
        std::fs::create_dir_all(&dir).map_err(io)?;
        let parent = Path::new(build_id).join(path);
        let parent = parent.parent().unwrap_or(Path::new(""));
        for c in parent.components() {
            dir.push(c);
            match std::fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(refused(format!(
                        "{} is a file, not a directory",
                        dir.strip_prefix(&self.root).unwrap_or(&dir).display()
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir(&dir).map_err(io)?;
                }
                Err(e) => return Err(io(e)),
            }
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&file)
            .map_err(io)?;
        let meta = f.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(refused("is not a regular file".into()));
        }
        let have = meta.len();
        if offset > have {
            return Err(refused(format!(
                "a piece at {offset} when {have} bytes arrived (a hole)"
            )));
        }
        f.write_all_at(data, offset).map_err(io)?;
        let now = have.max(end);
        if now == size {
            f.sync_all().map_err(io)?;
        }
        Ok(now)
    }

    /// The SHA-256 (hex) of an artefact's file.
    pub fn sha256(&self, build_id: &str, path: &str) -> Result<String, ArtifactError> {
        let mut f = self.open(build_id, path)?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).map_err(|source| ArtifactError::Io {
                path: PathBuf::from(path),
                source,
            })?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(hex::encode(h.finalize()))
    }

    /// Opens an artefact's file for reading.
    pub fn open(&self, build_id: &str, path: &str) -> Result<std::fs::File, ArtifactError> {
        let file = self.file(build_id, path)?;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&file)
            .map_err(|source| ArtifactError::Io { path: file, source })
    }

    /// Removes a build's artefacts (retention).
    pub fn remove_build(&self, build_id: &str) -> Result<(), ArtifactError> {
        check_build_id(build_id)?;
        let dir = self.root.join(build_id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ArtifactError::Io { path: dir, source }),
        }
    }

    /// The build ids that have an artefact directory (at most `max`).
    pub fn build_dirs(&self, max: usize) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| check_build_id(n).is_ok())
            .take(max)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_ids_that_could_leave_the_directory_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./b",
            "a//b",
            "a/",
            "a\\..\\b",
            "a\nb",
            "..",
            ".",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_path(&"a/".repeat(40)).is_err());
        assert!(check_path(&"x".repeat(1025)).is_err());
        for ok in ["a", "out/app", "..a/b..", "reports/x.xml", "a b/c"] {
            check_path(ok).unwrap();
        }
        for bad in ["", "../x", "a/b", ".", &"x".repeat(65)] {
            assert!(check_build_id(bad).is_err(), "{bad:?} accepted");
        }
        check_build_id("0190f1a2-7b3c-7def-8123-456789abcdef").unwrap();
    }

    #[test]
    fn pieces_are_written_in_order_resends_are_harmless_and_holes_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let s = ArtifactStore::new(tmp.path().join("artifacts"), 1 << 20);
        assert_eq!(s.write("b1", "out/app", 6, 0, b"abc").unwrap(), 3);
        // A resend of the first piece, then the rest.
        assert_eq!(s.write("b1", "out/app", 6, 0, b"abc").unwrap(), 3);
        assert!(
            s.write("b1", "out/app", 6, 5, b"f").is_err(),
            "hole accepted"
        );
        assert!(
            s.write("b1", "out/app", 6, 3, b"defg").is_err(),
            "past the size"
        );
        assert_eq!(s.write("b1", "out/app", 6, 3, b"def").unwrap(), 6);
        let mut got = String::new();
        s.open("b1", "out/app")
            .unwrap()
            .read_to_string(&mut got)
            .unwrap();
        assert_eq!(got, "abcdef");
        assert_eq!(
            s.sha256("b1", "out/app").unwrap(),
            "bef57ec7f53a6d40beb640a780a639c83bc29ac8a9816f1fc6c5c6dcd93c4721"
        );
        // A file where a directory would go, and a symlink planted in the tree.
        assert!(s.write("b1", "out/app/x", 1, 0, b"x").is_err());
        std::os::unix::fs::symlink("/etc", tmp.path().join("artifacts/b1/link")).unwrap();
        assert!(s.write("b1", "link/passwd", 1, 0, b"x").is_err());
        assert!(s.write("b1", "link", 1, 0, b"x").is_err());
        assert!(s.write("../b1", "x", 1, 0, b"x").is_err());
        assert_eq!(s.build_dirs(10), vec!["b1".to_string()]);
        s.remove_build("b1").unwrap();
        assert!(s.build_dirs(10).is_empty());
    }
}
