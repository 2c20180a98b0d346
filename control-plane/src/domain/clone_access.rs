//! How a cell clones a private repository: the project's ssh deploy key (an ed25519 key pair
//! made here; the private half is sealed like a secret, only the public half is ever shown),
//! the ssh host keys the clone trusts (the operator's known_hosts for the project, else the
//! forges' published keys below), and an https token.
//!
//! They live in the project's secrets table under reserved names (`hive.*`, which no
//! environment-variable secret can take), so they are sealed, listed and deleted like secrets;
//! but placement ([`split`]) takes them out of the steps' secrets and hands them to the cell as
//! `CloneAuth`, which the cell gives to the clone only.

use std::collections::HashMap;

use hive_proto::v1 as pb;

use crate::state::Hive;
use crate::store::{Audit, ProjectRow, SealedSecret, StoreError};

/// The deploy key's private half (OpenSSH format).
pub const DEPLOY_KEY: &str = "hive.deploy_key";
/// The operator's known_hosts for the project.
pub const KNOWN_HOSTS: &str = "hive.known_hosts";
/// The https token and the user name sent with it.
pub const HTTPS_TOKEN: &str = "hive.https_token";
pub const HTTPS_USER: &str = "hive.https_user";

/// The ssh host keys the forges publish (public facts: GitHub's "SSH key fingerprints" page,
/// GitLab.com's "SSH host keys fingerprints", Codeberg's imprint), trusted for a project that
/// gives no known_hosts of its own.
pub const FORGE_KNOWN_HOSTS: &str = "\
github.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl
github.com ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEmKSENjQEezOmxkZMy7opKgwFB9nkt5YRrYMjNuG5N87uRgg6CLrbo5wAdT/y6v0mKV0U2w0WZ2YB/++Tpockg=
github.com ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABgQCj7ndNxQowgcQnjshcLrqPEiiphnt+VTTvDP6mHBL9j1aNUkY4Ue1gvwnGLVlOhGeYrnZaMgRK6+PKCUXaDbC7qtbW8gIkhL7aGCsOr/C56SJMy/BCZfxd1nWzAOxSDPgVsmerOBYfNqltV9/hWCqBywINIR+5dIg6JTJ72pcEpEjcYgXkE2YEFXV1JHnsKgbLWNlhScqb2UmyRkQyytRLtL+38TGxkxCflmO+5Z8CSSNY7GidjMIZ7Q4zMjA2n1nGrlTDkzwDCsw+wqFPGQA179cnfGWOWRVruj16z6XyvxvjJwbz0wQZ75XK5tKSb7FNyeIEs4TT4jk+S4dhPeAUC5y+bDYirYgM4GC7uEnztnZyaVWQ7B381AK4Qdrwt51ZqExKbQpTUNn+EjqoTwvqNj4kqx5QUCI0ThS/YkOxJCXmPUWZbhjpCg56i+2aB6CmK2JGhn57K5mj0MNdBXA4/WnwH6XoPWJzK5Nyu2zB3nAZp+S5hpQs+p1vN1/wsjk=
gitlab.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAfuCHKVTjquxvt6CM6tdG4SLp1Btn/nOeHHE5UOzRdf
gitlab.com ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBFSMqzJeV9rUzU4kWitGjeR4PWSa29SPqJ1fVkhtj3Hw9xjLVXVYrU9QlYWrOLXBpQ6KWjbjTDTdDkoohFzgbEY=
codeberg.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIVIC02vnjFyL+I4RHfvIGNtOgJMe769VTF1VR4EB3ZB
";

/// Most known_hosts text a project may give.
const MAX_KNOWN_HOSTS: usize = 256 * 1024;

/// Errors of [`clone_access`]; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CloneAccessError {
    #[error(
        "known_hosts line {line}: {reason}; give lines as `ssh-keyscan HOST` prints them \
         (`HOST KEYTYPE BASE64`), checked against the keys the server's operator publishes"
    )]
    KnownHosts { line: usize, reason: String },
    #[error("known_hosts is {0} bytes: at most 256 KiB")]
    KnownHostsSize(usize),
    #[error(
        "known_hosts holds no host key: give at least one line, or none to use the forges' keys"
    )]
    KnownHostsEmpty,
    #[error(
        "https token: 4 bytes to 4 KiB without spaces or control characters (paste the token \
         alone on stdin)"
    )]
    Token,
    #[error("https user {0:?}: 1-256 characters without ':', spaces or control characters")]
    User(String),
    #[error("make the deploy key: {0}")]
    KeyGen(String),
    #[error(
        "the stored deploy key does not open or parse ({0}): make a new one with \
         `hivectl project deploy-key PROJECT --rotate` and add its public key to the forge"
    )]
    StoredKey(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Splits a project's opened secrets into the steps' secrets and the clone's credentials. The
/// clone always gets host keys: the project's, else the forges'.
pub fn split(mut secrets: HashMap<String, String>) -> (HashMap<String, String>, pb::CloneAuth) {
    let mut auth = pb::CloneAuth {
        ssh_private_key: secrets.remove(DEPLOY_KEY).unwrap_or_default(),
        known_hosts: secrets.remove(KNOWN_HOSTS).unwrap_or_default(),
        https_token: secrets.remove(HTTPS_TOKEN).unwrap_or_default(),
        https_user: secrets.remove(HTTPS_USER).unwrap_or_default(),
    };
    if auth.known_hosts.trim().is_empty() {
        auth.known_hosts = FORGE_KNOWN_HOSTS.to_string();
    }
    secrets.retain(|k, _| !k.starts_with("hive."));
    (secrets, auth)
}

/// Checks known_hosts text: every line a host key ssh can read; returns how many.
pub fn check_known_hosts(text: &str) -> Result<u32, CloneAccessError> {
    if text.len() > MAX_KNOWN_HOSTS {
        return Err(CloneAccessError::KnownHostsSize(text.len()));
    }
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if t.chars().any(|c| c.is_control() && c != '\t') {
            return Err(CloneAccessError::KnownHosts {
                line: i + 1,
                reason: "control character".into(),
            });
        }
        t.parse::<ssh_key::known_hosts::Entry>()
            .map_err(|e| CloneAccessError::KnownHosts {
                line: i + 1,
                reason: format!("not a host key line ({e})"),
            })?;
        n += 1;
    }
    if n == 0 {
        return Err(CloneAccessError::KnownHostsEmpty);
    }
    Ok(n)
}

/// A new ed25519 key pair in OpenSSH format, named after the project.
fn new_deploy_key(project: &str) -> Result<ssh_key::PrivateKey, CloneAccessError> {
    use rand::RngCore;
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let pair = ssh_key::private::Ed25519Keypair::from_seed(&seed);
    seed.fill(0);
    ssh_key::PrivateKey::new(
        ssh_key::private::KeypairData::Ed25519(pair),
        format!("hive-deploy-key-{project}"),
    )
    .map_err(|e| CloneAccessError::KeyGen(e.to_string()))
}

/// The public half of a stored deploy key: the OpenSSH line and its SHA256 fingerprint.
pub fn public_half(private_openssh: &str) -> Result<(String, String), CloneAccessError> {
    let key = ssh_key::PrivateKey::from_openssh(private_openssh)
        .map_err(|e| CloneAccessError::StoredKey(e.to_string()))?;
    let public = key.public_key();
    let line = public
        .to_openssh()
        .map_err(|e| CloneAccessError::StoredKey(e.to_string()))?;
    Ok((
        line,
        public.fingerprint(ssh_key::HashAlg::Sha256).to_string(),
    ))
}

/// Carries out a `CloneAccess` call for `project` (already authorised) and says what is in use.
pub async fn clone_access(
    hive: &Hive,
    project: &ProjectRow,
    req: &pb::CloneAccessRequest,
    audit: impl Fn(&str) -> Audit,
) -> Result<pb::CloneAccessReply, CloneAccessError> {
    // Check everything before the first write.
    let known_hosts = if req.set_known_hosts && !req.known_hosts.trim().is_empty() {
        check_known_hosts(&req.known_hosts)?;
        Some(req.known_hosts.as_str())
    } else {
        None
    };
    let token = req.https_token.trim();
    if req.set_https_token && !token.is_empty() {
        if !(4..=4096).contains(&token.len())
            || token.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(CloneAccessError::Token);
        }
        let user = req.https_user.trim();
        if user.len() > 256
            || user
                .chars()
                .any(|c| c == ':' || c.is_control() || c.is_whitespace())
        {
            return Err(CloneAccessError::User(user.to_string()));
        }
    }

    let mut stored = opened(hive, &project.id).await?;
    let mut created = false;
    let make_key = req.rotate_deploy_key || (req.deploy_key && !stored.contains_key(DEPLOY_KEY));
    if make_key {
        let key = new_deploy_key(&project.name)?;
        let pem = key
            .to_openssh(ssh_key::LineEnding::LF)
            .map_err(|e| CloneAccessError::KeyGen(e.to_string()))?;
        let action = if req.rotate_deploy_key {
            "rotate"
        } else {
            "create"
        };
        put(hive, project, DEPLOY_KEY, &pem, &audit(action)).await?;
        stored.insert(DEPLOY_KEY.to_string(), pem.to_string());
        created = true;
    }
    if req.set_known_hosts {
        match known_hosts {
            Some(text) => {
                put(hive, project, KNOWN_HOSTS, text, &audit("known hosts")).await?;
                stored.insert(KNOWN_HOSTS.to_string(), text.to_string());
            }
            None => {
                let a = audit("known hosts: the forges' keys");
                hive.store
                    .delete_secret(&project.id, KNOWN_HOSTS, &a)
                    .await?;
                stored.remove(KNOWN_HOSTS);
            }
        }
    }
    if req.set_https_token {
        if token.is_empty() {
            let a = audit("https token removed");
            hive.store
                .delete_secret(&project.id, HTTPS_TOKEN, &a)
                .await?;
            hive.store
                .delete_secret(&project.id, HTTPS_USER, &a)
                .await?;
            stored.remove(HTTPS_TOKEN);
            stored.remove(HTTPS_USER);
        } else {
            put(hive, project, HTTPS_TOKEN, token, &audit("https token")).await?;
            stored.insert(HTTPS_TOKEN.to_string(), token.to_string());
            let user = req.https_user.trim();
            if user.is_empty() {
                hive.store
                    .delete_secret(&project.id, HTTPS_USER, &audit("https user"))
                    .await?;
                stored.remove(HTTPS_USER);
            } else {
                put(hive, project, HTTPS_USER, user, &audit("https user")).await?;
                stored.insert(HTTPS_USER.to_string(), user.to_string());
            }
        }
    }

    let (deploy_public_key, deploy_key_fingerprint) = match stored.get(DEPLOY_KEY) {
        Some(pem) => public_half(pem)?,
        None => (String::new(), String::new()),
    };
    let (source, lines) = match stored.get(KNOWN_HOSTS) {
        Some(text) => ("project", check_known_hosts(text).unwrap_or(0)),
        None => ("forges", check_known_hosts(FORGE_KNOWN_HOSTS).unwrap_or(0)),
    };
    Ok(pb::CloneAccessReply {
        project: project.name.clone(),
        deploy_public_key,
        deploy_key_fingerprint,
        deploy_key_created: created,
        known_hosts_source: source.to_string(),
        known_hosts_lines: lines,
        https_token: stored.contains_key(HTTPS_TOKEN),
        https_user: stored.get(HTTPS_USER).cloned().unwrap_or_default(),
    })
}

/// The project's reserved (`hive.*`) entries, opened.
async fn opened(
    hive: &Hive,
    project_id: &str,
) -> Result<HashMap<String, String>, CloneAccessError> {
    let mut out = HashMap::new();
    for s in hive.store.list_secrets(project_id).await? {
        if !s.name.starts_with("hive.") {
            continue;
        }
        let v = hive
            .sealer
            .open(&s.project_id, &s.name, &s.nonce, &s.sealed)
            .map_err(|e| CloneAccessError::StoredKey(e.to_string()))?;
        out.insert(s.name, String::from_utf8_lossy(&v).into_owned());
    }
    Ok(out)
}

async fn put(
    hive: &Hive,
    project: &ProjectRow,
    name: &str,
    value: &str,
    audit: &Audit,
) -> Result<(), CloneAccessError> {
    let (nonce, sealed) = hive.sealer.seal(&project.id, name, value.as_bytes());
    let row = SealedSecret {
        project_id: project.id.clone(),
        name: name.to_string(),
        nonce,
        sealed,
        updated_at_ms: crate::store::now_ms(),
        // The clone needs them whatever the ref (they never reach the steps).
        refs: "*".to_string(),
    };
    hive.store.set_secret(&row, audit).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forge_keys_parse_and_name_their_hosts() {
        assert_eq!(check_known_hosts(FORGE_KNOWN_HOSTS).unwrap(), 6);
        for host in ["github.com", "gitlab.com", "codeberg.org"] {
            assert!(FORGE_KNOWN_HOSTS
                .lines()
                .any(|l| l.starts_with(&format!("{host} ssh-ed25519 "))));
        }
    }

    #[test]
    fn bad_known_hosts_name_the_line() {
        let e = check_known_hosts("# mine\ngit.example.com ssh-ed25519 not-base64!\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(matches!(
            check_known_hosts("# only a comment\n"),
            Err(CloneAccessError::KnownHostsEmpty)
        ));
    }

    #[test]
    fn a_new_deploy_key_is_ed25519_in_openssh_format() {
        let key = new_deploy_key("demo").unwrap();
        let pem = key.to_openssh(ssh_key::LineEnding::LF).unwrap();
        assert!(pem.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        let (line, fp) = public_half(&pem).unwrap();
        assert!(
            line.starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"),
            "{line}"
        );
        assert!(line.ends_with(" hive-deploy-key-demo"), "{line}");
        assert!(fp.starts_with("SHA256:"), "{fp}");
        assert_ne!(
            public_half(
                &new_deploy_key("demo")
                    .unwrap()
                    .to_openssh(ssh_key::LineEnding::LF)
                    .unwrap()
            )
            .unwrap()
            .0,
            line
        );
    }

    #[test]
    fn split_keeps_clone_credentials_out_of_the_steps() {
        let s: HashMap<String, String> = [
            (DEPLOY_KEY, "KEY"),
            (HTTPS_TOKEN, "TOK"),
            ("NPM_TOKEN", "npm"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (steps, auth) = split(s);
        assert_eq!(steps.len(), 1);
        assert_eq!(steps["NPM_TOKEN"], "npm");
        assert_eq!(auth.ssh_private_key, "KEY");
        assert_eq!(auth.https_token, "TOK");
        assert_eq!(auth.known_hosts, FORGE_KNOWN_HOSTS);
    }
}
