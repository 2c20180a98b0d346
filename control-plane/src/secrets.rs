//! Project secrets at rest: sealed with XChaCha20-Poly1305 under the control plane's secrets
//! key, a 32-byte key made on first start in `<data-dir>/secrets.key` (0600) or read from the
//! file `--secrets-key-file` names (e.g. from the operator's secret store). The project id and
//! the secret's name are the associated data: a sealed value copied to another row does not
//! open. The database alone therefore reveals no value; the key file with it does, so keep the
//! two apart in backups.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

/// Errors of the secrets key and of sealing.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file written whole (`hive_sys::write_file`).
    #[error(transparent)]
    Write(#[from] hive_sys::fs::WriteError),
    #[error(
        "secrets key {0}: expected 32 bytes, base64 on one line (as made on first start); \
         restore it from a backup: without it no stored secret can be read"
    )]
    BadKey(PathBuf),
    #[error(
        "secrets key file {path} is readable by group or others (mode {mode:o}): chmod 600 it"
    )]
    KeyMode { path: PathBuf, mode: u32 },
    #[error(
        "a stored secret does not open with this key (was the secrets key replaced?): set it \
         again with `hivectl secret set`"
    )]
    Open,
    #[error(
        "{0} was missing, so a new secrets key was made, but the database holds secrets sealed \
         with the old one: restore the old key file (from a backup) and start again, or delete \
         the new one and the secrets and set them again"
    )]
    KeyLost(PathBuf),
}

/// The key that seals and opens project secrets (and webhook secrets, `store::projects`).
#[derive(Clone)]
pub struct Sealer {
    cipher: XChaCha20Poly1305,
    /// A fingerprint of the key (not the key): every control plane of one database must
    /// have the same.
    key_id: String,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn aad(project_id: &str, name: &str) -> Vec<u8> {
    format!("hive-secret\0{project_id}\0{name}").into_bytes()
}

impl Sealer {
    /// The key in `file` if given (it must exist), else `<data_dir>/secrets.key`, made on
    /// first start.
    pub fn load_or_create(data_dir: &Path, file: Option<&Path>) -> Result<Sealer, SecretsError> {
        Ok(Self::load_or_create_reporting(data_dir, file)?.0)
    }

    /// As [`Sealer::load_or_create`], also saying whether the key was made just now.
    pub fn load_or_create_reporting(
        data_dir: &Path,
        file: Option<&Path>,
    ) -> Result<(Sealer, bool), SecretsError> {
        let path = file.map_or_else(|| data_dir.join("secrets.key"), Path::to_path_buf);
        let io = |what: &'static str| {
            let path = path.clone();
            move |source| SecretsError::Io { what, path, source }
        };
        let made = file.is_none() && !path.exists();
        if made {
            let mut key = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut key);
            std::fs::create_dir_all(data_dir).map_err(io("create dir for"))?;
            hive_sys::write_file(&path, format!("{}\n", b64().encode(key)).as_bytes(), 0o600)?;
            tracing::info!(path = %path.display(), "made the secrets key (first start); back it up apart from the database");
        }
        let meta = std::fs::metadata(&path).map_err(io("read"))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretsError::KeyMode { path, mode });
        }
        let text = std::fs::read_to_string(&path).map_err(io("read"))?;
        let key = b64()
            .decode(text.trim())
            .ok()
            .filter(|k| k.len() == 32)
            .ok_or_else(|| SecretsError::BadKey(path.clone()))?;
        let cipher =
            XChaCha20Poly1305::new_from_slice(&key).map_err(|_| SecretsError::BadKey(path))?;
        let key_id = {
            use sha2::Digest as _;
            let mut h = sha2::Sha256::new();
            h.update(b"hive secrets key id\0");
            h.update(&key);
            hex::encode(h.finalize())
        };
        Ok((Sealer { cipher, key_id }, made))
    }

    /// The key's fingerprint (SHA-256 of a label and the key).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Seals `value` for (`project_id`, `name`): (nonce, sealed), both base64.
    pub fn seal(&self, project_id: &str, name: &str, value: &[u8]) -> (String, String) {
        let mut nonce = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = aad(project_id, name);
        // Encryption into a Vec cannot fail for inputs this size.
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: value,
                    aad: &aad,
                },
            )
            .unwrap_or_default();
        (b64().encode(nonce), b64().encode(sealed))
    }

    /// Opens what [`Sealer::seal`] made for the same project id and name.
    pub fn open(
        &self,
        project_id: &str,
        name: &str,
        nonce: &str,
        sealed: &str,
    ) -> Result<Vec<u8>, SecretsError> {
        let nonce = b64().decode(nonce).map_err(|_| SecretsError::Open)?;
        let sealed = b64().decode(sealed).map_err(|_| SecretsError::Open)?;
        if nonce.len() != 24 {
            return Err(SecretsError::Open);
        }
        let aad = aad(project_id, name);
        self.cipher
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| SecretsError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_for_their_project_and_name_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sealer::load_or_create(dir.path(), None).unwrap();
        let mode = std::fs::metadata(dir.path().join("secrets.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (n, c) = s.seal("p1", "TOKEN", b"hunter22");
        assert!(!c.contains("hunter22"));
        assert_eq!(s.open("p1", "TOKEN", &n, &c).unwrap(), b"hunter22");
        assert!(
            s.open("p2", "TOKEN", &n, &c).is_err(),
            "moved to another project"
        );
        assert!(s.open("p1", "OTHER", &n, &c).is_err(), "renamed");
        // The same key file again opens it; another key does not.
        let again = Sealer::load_or_create(dir.path(), None).unwrap();
        assert_eq!(again.open("p1", "TOKEN", &n, &c).unwrap(), b"hunter22");
        let other = tempfile::tempdir().unwrap();
        let s2 = Sealer::load_or_create(other.path(), None).unwrap();
        assert!(matches!(
            s2.open("p1", "TOKEN", &n, &c),
            Err(SecretsError::Open)
        ));
        // A key file others can read is refused, saying what to do.
        std::fs::set_permissions(
            dir.path().join("secrets.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let e = Sealer::load_or_create(dir.path(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("chmod 600"), "{e}");
        // A named key file must exist.
        let e = Sealer::load_or_create(dir.path(), Some(&dir.path().join("nope")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }
}
