//! Files written whole: a crash leaves the old file or the new one, never half of one.
//!
//! The box's credentials, the control plane's CA and its secrets key are written this way.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A step of [`write_file`] failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct WriteError {
    /// The step: `create`, `chmod`, `write`, `sync` or `rename`.
    pub what: &'static str,
    /// The file the step was on (the temporary one, or the target for `rename`).
    pub path: PathBuf,
    /// What the system said.
    #[source]
    pub source: std::io::Error,
}

/// Writes `bytes` to `path` with `mode` (exactly: the umask does not narrow it), through
/// `path.tmp`, synced, then renamed over `path`.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), WriteError> {
    let err = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| WriteError { what, path, source }
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err("create", &tmp))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err("chmod", &tmp))?;
    f.write_all(bytes).map_err(err("write", &tmp))?;
    f.sync_all().map_err(err("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(err("rename", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_with_the_mode_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, b"old").unwrap();
        write_file(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!path.with_extension("tmp").exists());
        let e = write_file(&dir.path().join("no/such/dir/f"), b"x", 0o644).unwrap_err();
        assert_eq!(e.what, "create");
    }
}
