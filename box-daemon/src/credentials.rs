//! The box's identity towards the control plane: a client certificate for its box id, signed by
//! the control plane's CA, kept in `<data-dir>/tls/` (`box.key` 0600, `box.pem`, `ca.pem`,
//! `cert.json` with its dates).
//!
//! A new box has none: it joins with a one-time token (`hivectl box join-token`). The token pins
//! the CA by its SHA-256, so the box first opens a TLS connection that trusts nothing but a
//! chain ending in that CA (the server sends its CA after its own certificate), keeps the CA,
//! then calls `BoxAgent.Join` over ordinary verified TLS with a certificate signing request for
//! a key it made itself: the private key never leaves the box. Afterwards every session uses
//! the certificate, and [`Credentials::renew`] replaces it when a third of its life is left.
//!
//! An `http://` control plane URL means no TLS and no certificate: only a control plane started
//! with `--insecure-boxes` on loopback accepts that (tests and development).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hive_proto::v1::box_agent_client::BoxAgentClient;
use hive_proto::v1::{JoinReply, JoinRequest, RenewCertificateRequest};
use hive_types::JoinToken;
use rcgen::{CertificateParams, DnType, KeyPair};
use tonic::transport::{Endpoint, Identity};

/// Errors getting or using the box's certificate.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
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
        "this box has no certificate in {0} and no join token: make one on the control plane \
         with `hivectl box join-token` and start the box with --join-token (HIVE_BOX_JOIN_TOKEN)"
    )]
    NoCertificate(PathBuf),
    #[error("{0}")]
    Token(#[from] hive_types::JoinTokenError),
    #[error(
        "the certificate in {dir} is box {has:?}'s, not {want:?}: start the box with \
         --box-id {has}, or move {dir} away and join again with a new token"
    )]
    OtherBox {
        dir: PathBuf,
        has: String,
        want: String,
    },
    #[error("control plane URL {0:?}: {1}")]
    Url(String, String),
    #[error("reach the control plane at {0} to join: {1}")]
    Reach(String, String),
    #[error(
        "the control plane at {0} did not show the CA this join token pins ({1}): the token is \
         for another control plane, or something in between is posing as it"
    )]
    Pin(String, String),
    #[error("the control plane refused the join: {0}")]
    Refused(String),
    #[error("the control plane refused to renew the certificate: {0}")]
    RenewRefused(String),
    #[error("key or certificate: {0}")]
    Crypto(String),
}

/// Whether a failure may pass by retrying (the control plane is not up yet) or needs the
/// operator (bad token, wrong CA, refused).
impl CredentialsError {
    pub fn is_transient(&self) -> bool {
        matches!(self, CredentialsError::Reach(..))
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Dates {
    box_id: String,
    issued_at_ms: i64,
    not_after_ms: i64,
}

#[derive(Clone)]
struct Held {
    key_pem: String,
    cert_pem: String,
    dates: Dates,
}

/// The box's certificate, key and CA, as on disk.
pub struct Credentials {
    dir: PathBuf,
    url: String,
    host: String,
    ca_pem: String,
    held: Mutex<Held>,
    /// A renewal is running (`renew_if_due`).
    renewing: std::sync::atomic::AtomicBool,
    /// The control plane last dialled (`endpoint_for`), where renewals go; None: `url`.
    last_url: Mutex<Option<String>>,
}

/// Never prints the key.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dates
            .clone();
        f.debug_struct("Credentials")
            .field("dir", &self.dir)
            .field("url", &self.url)
            .field("box_id", &d.box_id)
            .field("not_after_ms", &d.not_after_ms)
            .finish_non_exhaustive()
    }
}

fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CredentialsError + 'a {
    move |source| CredentialsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn crypto(e: impl std::fmt::Display) -> CredentialsError {
    CredentialsError::Crypto(e.to_string())
}

/// `https://host:port` -> (host, port).
fn host_port(url: &str) -> Result<(String, u16), CredentialsError> {
    let bad = |why: &str| CredentialsError::Url(url.to_string(), why.to_string());
    let rest = url.strip_prefix("https://").ok_or_else(|| {
        bad("boxes connect over TLS: use https://HOST:PORT (the control plane's --box-addr)")
    })?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6
            .split_once(']')
            .ok_or_else(|| bad("unclosed [ in the host"))?;
        (h.to_string(), p.strip_prefix(':').unwrap_or("443"))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (authority.to_string(), "443"),
        }
    };
    let port = port.parse().map_err(|_| bad("the port is not a number"))?;
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok((host, port))
}

/// A key and a certificate signing request for it.
fn new_key_and_csr(box_id: &str) -> Result<(KeyPair, Vec<u8>), CredentialsError> {
    let key = KeyPair::generate().map_err(crypto)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, box_id);
    let csr = params.serialize_request(&key).map_err(crypto)?;
    Ok((key, csr.der().to_vec()))
}

impl Credentials {
    /// The box's credentials for `url`: None for an `http://` URL (no TLS); loaded from
    /// `<data_dir>/tls` when there; else made by joining with `token`.
    pub async fn ensure(
        url: &str,
        box_id: &str,
        data_dir: &Path,
        token: Option<&str>,
    ) -> Result<Option<Arc<Credentials>>, CredentialsError> {
        if let Some(rest) = url.strip_prefix("http://") {
            let authority = rest.split('/').next().unwrap_or(rest);
            let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
            if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
                return Err(CredentialsError::Url(
                    url.to_string(),
                    "a plaintext link is for a control plane on this machine only (tests, \
                     development): use https://HOST:PORT (its --box-addr) and a join token"
                        .to_string(),
                ));
            }
            tracing::warn!(control_plane = %url, "plaintext control plane URL: no TLS, no certificate (only a control plane with --insecure-boxes on loopback accepts this box)");
            return Ok(None);
        }
        let token = token.map(str::trim).filter(|t| !t.is_empty());
        let (host, _) = host_port(url)?;
        let dir = data_dir.join("tls");
        Credentials::recover(&dir);
        if dir.join("box.pem").exists() {
            let c = Credentials::load(&dir, url, &host)?;
            let has = c.box_id();
            if has != box_id {
                return Err(CredentialsError::OtherBox {
                    dir,
                    has,
                    want: box_id.to_string(),
                });
            }
            if token.is_some() {
                tracing::info!(dir = %dir.display(), "already joined: the join token is not needed (nor used) again");
            }
            return Ok(Some(Arc::new(c)));
        }
        let token: JoinToken = token
            .ok_or_else(|| CredentialsError::NoCertificate(dir.clone()))?
            .parse()?;
        let c = Credentials::join(url, &host, box_id, &dir, &token).await?;
        Ok(Some(Arc::new(c)))
    }

    fn load(dir: &Path, url: &str, host: &str) -> Result<Credentials, CredentialsError> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(io("read", &p))
        };
        let dates: Dates = serde_json::from_str(&read("cert.json")?).map_err(crypto)?;
        Ok(Credentials {
            dir: dir.to_path_buf(),
            url: url.to_string(),
            host: host.to_string(),
            ca_pem: read("ca.pem")?,
            held: Mutex::new(Held {
                key_pem: read("box.key")?,
                cert_pem: read("box.pem")?,
                dates,
            }),
            renewing: Default::default(),
            last_url: Mutex::new(None),
        })
    }

    async fn join(
        url: &str,
        host: &str,
        box_id: &str,
        dir: &Path,
        token: &JoinToken,
    ) -> Result<Credentials, CredentialsError> {
        let ca_pem = hive_proto::pin::fetch_pinned_ca(url, &token.ca_sha256)
            .await
            .map_err(|e| match e {
                hive_proto::pin::PinError::Reach(why) => {
                    CredentialsError::Reach(url.to_string(), why)
                }
                hive_proto::pin::PinError::Url(why) => CredentialsError::Url(url.to_string(), why),
                hive_proto::pin::PinError::Pin(why) => CredentialsError::Pin(url.to_string(), why),
            })?;
        let (key, csr_der) = new_key_and_csr(box_id)?;
        let channel = endpoint(url, host, &ca_pem, None)?
            .connect()
            .await
            .map_err(|e| CredentialsError::Reach(url.to_string(), hive_sys::error_chain(&e)))?;
        let reply = BoxAgentClient::new(channel)
            .join(JoinRequest {
                token: token.to_string(),
                box_id: box_id.to_string(),
                csr_der,
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unavailable => {
                    CredentialsError::Reach(url.to_string(), s.message().to_string())
                }
                _ => CredentialsError::Refused(s.message().to_string()),
            })?
            .into_inner();
        let c = Credentials {
            dir: dir.to_path_buf(),
            url: url.to_string(),
            host: host.to_string(),
            ca_pem,
            held: Mutex::new(Held {
                key_pem: key.serialize_pem(),
                cert_pem: reply.certificate_pem.clone(),
                dates: Dates {
                    box_id: reply.box_id.clone(),
                    issued_at_ms: hive_sys::now_ms() as i64,
                    not_after_ms: reply.not_after_ms,
                },
            }),
            renewing: Default::default(),
            last_url: Mutex::new(None),
        };
        c.save()?;
        tracing::info!(box_id = %reply.box_id, dir = %dir.display(), "joined the control plane: certificate kept");
        Ok(c)
    }

    /// Writes key, certificate, CA and dates into `tls.new/`, then swaps it for `tls/`: a
    /// crash leaves the old set or the new one whole, never a key with another's certificate
    /// ([`Credentials::recover`] finishes a swap a crash cut short).
    fn save(&self) -> Result<(), CredentialsError> {
        let new = self.dir.with_extension("new");
        let old = self.dir.with_extension("old");
        let _ = std::fs::remove_dir_all(&new);
        std::fs::create_dir_all(&new).map_err(io("create", &new))?;
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o700))
            .map_err(io("chmod", &new))?;
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner()).clone();
        hive_sys::write_file(&new.join("ca.pem"), self.ca_pem.as_bytes(), 0o644)?;
        hive_sys::write_file(&new.join("box.key"), held.key_pem.as_bytes(), 0o600)?;
        let dates = serde_json::to_vec(&held.dates).map_err(crypto)?;
        hive_sys::write_file(&new.join("cert.json"), &dates, 0o644)?;
        hive_sys::write_file(&new.join("box.pem"), held.cert_pem.as_bytes(), 0o644)?;
        let _ = std::fs::remove_dir_all(&old);
        if self.dir.exists() {
            std::fs::rename(&self.dir, &old).map_err(io("rename", &self.dir))?;
        }
        std::fs::rename(&new, &self.dir).map_err(io("rename", &new))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// A crash between the two renames of [`Credentials::save`] leaves `tls.new/` complete
    /// and no `tls/`: finish the swap.
    fn recover(dir: &Path) {
        let new = dir.with_extension("new");
        if !dir.exists() && new.join("box.pem").exists() {
            let _ = std::fs::rename(&new, dir);
        }
    }

    /// The box id the certificate names.
    pub fn box_id(&self) -> String {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dates
            .box_id
            .clone()
    }

    /// The endpoint of the control plane with the box's certificate (the one last dialled).
    pub fn endpoint(&self) -> Result<Endpoint, CredentialsError> {
        let last = self
            .last_url
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match last {
            Some(url) => self.endpoint_for(&url),
            None => {
                let held = self.held.lock().unwrap_or_else(|p| p.into_inner()).clone();
                endpoint(
                    &self.url,
                    &self.host,
                    &self.ca_pem,
                    Some(Identity::from_pem(held.cert_pem, held.key_pem)),
                )
            }
        }
    }

    /// The endpoint of the control plane at `url` (one of a hive's several; the same CA signs
    /// all their certificates) with the box's certificate; renewals go there from now on.
    pub fn endpoint_for(&self, url: &str) -> Result<Endpoint, CredentialsError> {
        let (host, _) = host_port(url)?;
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let e = endpoint(
            url,
            &host,
            &self.ca_pem,
            Some(Identity::from_pem(held.cert_pem, held.key_pem)),
        )?;
        *self.last_url.lock().unwrap_or_else(|p| p.into_inner()) = Some(url.to_string());
        Ok(e)
    }

    /// True when less than a third of the certificate's life is left.
    pub fn due_for_renewal(&self) -> bool {
        let d = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dates
            .clone();
        let life = (d.not_after_ms - d.issued_at_ms).max(1);
        d.not_after_ms - (hive_sys::now_ms() as i64) < life / 3
    }

    /// Starts a renewal in the background when one is due and none is running: a session may
    /// stay up longer than a certificate lives, and TLS checks it only when a connection opens.
    pub fn renew_if_due(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if !self.due_for_renewal() || self.renewing.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = me.renew().await {
                tracing::warn!(error = %e, "box certificate renewal failed; trying again later");
            }
            me.renewing.store(false, Ordering::SeqCst);
        });
    }

    /// A new certificate (and key) for the same box, asked for with the current one.
    pub async fn renew(&self) -> Result<(), CredentialsError> {
        let box_id = self.box_id();
        let (key, csr_der) = new_key_and_csr(&box_id)?;
        let url = self
            .last_url
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| self.url.clone());
        let channel = self
            .endpoint()?
            .connect()
            .await
            .map_err(|e| CredentialsError::Reach(url, hive_sys::error_chain(&e)))?;
        let reply: JoinReply = BoxAgentClient::new(channel)
            .renew_certificate(RenewCertificateRequest { csr_der })
            .await
            .map_err(|s| CredentialsError::RenewRefused(s.message().to_string()))?
            .into_inner();
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = Held {
            key_pem: key.serialize_pem(),
            cert_pem: reply.certificate_pem,
            dates: Dates {
                box_id,
                issued_at_ms: hive_sys::now_ms() as i64,
                not_after_ms: reply.not_after_ms,
            },
        };
        self.save()?;
        tracing::info!(not_after_ms = reply.not_after_ms, "box certificate renewed");
        Ok(())
    }
}

fn endpoint(
    url: &str,
    host: &str,
    ca_pem: &str,
    identity: Option<Identity>,
) -> Result<Endpoint, CredentialsError> {
    hive_proto::pin::endpoint(url, host, ca_pem, identity)
        .map_err(|why| CredentialsError::Url(url.to_string(), why))
}
