//! The control plane's certificate authority: made on first start in `<data-dir>/pki/`
//! (`ca.key` 0600, `ca.pem`), it signs the box listener's server certificate (made at every
//! start, for the names in `--tls-san` and the usual local ones) and each box's client
//! certificate (`BoxAgent.Join`, `RenewCertificate`). A box certificate's subject common name
//! is the box id; its serial is recorded in the store, so a revoked box's certificates are
//! refused though they still verify.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// How long the CA certificate is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long a server certificate is valid (a new one is made at every start).
const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// Certificates start this far in the past, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(300);

/// Errors of the CA.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
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
        "the CA in {dir} is unusable ({reason}): restore ca.key and ca.pem from a backup, or move \
         the directory away to make a new CA (every box must then join again)"
    )]
    BadCa { dir: PathBuf, reason: String },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("the certificate signing request is not valid: {0}")]
    BadCsr(rcgen::Error),
    #[error("the peer certificate cannot be read: {0}")]
    BadPeer(String),
}

/// The CA, loaded or made.
pub struct Ca {
    key: KeyPair,
    cert_der: Vec<u8>,
    cert_pem: String,
    sha256: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// A certificate the CA issued to a box.
#[derive(Debug, Clone)]
pub struct Issued {
    pub pem: String,
    /// The serial, lowercase hex of its DER integer bytes.
    pub serial: String,
    pub not_after_ms: i64,
}

/// Who a verified client certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub box_id: String,
    pub serial: String,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    // A positive DER integer with no leading zero byte: what is written is what is read back.
    b[0] = (b[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&b)
}

fn validity(params: &mut CertificateParams, valid: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + valid;
}

fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

impl Ca {
    /// Loads the CA from `<data_dir>/pki`, making it on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<Ca, PkiError> {
        let dir = data_dir.join("pki");
        let key_path = dir.join("ca.key");
        let cert_path = dir.join("ca.pem");
        if key_path.exists() || cert_path.exists() {
            let bad = |reason: String| PkiError::BadCa {
                dir: dir.clone(),
                reason,
            };
            let key_pem = std::fs::read_to_string(&key_path).map_err(io("read", &key_path))?;
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(io("read", &cert_path))?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(format!("ca.key: {e}")))?;
            let cert_der = pem_der(&cert_pem).ok_or_else(|| bad("ca.pem is not PEM".into()))?;
            let ca = Ca {
                sha256: sha256_hex(&cert_der),
                key,
                cert_der,
                cert_pem,
            };
            // The pair must belong together, or every certificate it signs fails to verify.
            Issuer::from_ca_cert_der(&ca.cert_der.clone().into(), &ca.key)
                .map_err(|e| bad(format!("ca.pem: {e}")))?;
            let (_, x) = x509_parser::parse_x509_certificate(&ca.cert_der)
                .map_err(|e| bad(format!("ca.pem: {e}")))?;
            if x.public_key().subject_public_key.data.as_ref() != ca.key.public_key_raw() {
                return Err(bad("ca.key is not the key of ca.pem".into()));
            }
            return Ok(ca);
        }
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("chmod", &dir))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "Hive control plane CA");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Hive");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        // The key first: a ca.pem without its key would be a CA that can sign nothing.
        hive_sys::write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        hive_sys::write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(dir = %dir.display(), "made the control plane's CA (first start)");
        Ok(Ca {
            sha256: sha256_hex(cert.der()),
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key,
        })
    }

    /// SHA-256 of the CA certificate (DER), lowercase hex: the pin in join tokens.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, PkiError> {
        Ok(Issuer::from_ca_cert_der(
            &self.cert_der.clone().into(),
            &self.key,
        )?)
    }

    /// A new server certificate for `names` (DNS names or IP addresses) with its key, as PEM:
    /// the certificate chain (server, then CA, so a joining box sees the CA it pinned) and the
    /// key.
    pub fn server_identity(&self, names: &[String]) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for n in names {
            let san = match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.as_str().try_into()?),
            };
            if !params.subject_alt_names.contains(&san) {
                params.subject_alt_names.push(san);
            }
        }
        params
            .distinguished_name
            .push(DnType::CommonName, "Hive control plane");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        validity(&mut params, SERVER_VALIDITY);
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok((
            format!("{}{}", cert.pem(), self.cert_pem),
            key.serialize_pem(),
        ))
    }

    /// A client certificate for box `box_id`, for the key in `csr_der` (whose signature proves
    /// the box holds it). Nothing else of the request is used: the names, usages and validity
    /// are the CA's.
    pub fn issue_box(
        &self,
        box_id: &str,
        csr_der: &[u8],
        valid: Duration,
    ) -> Result<Issued, PkiError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(PkiError::BadCsr)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, box_id);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Hive boxes");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        validity(&mut params, valid);
        let not_after_ms = (params.not_after.unix_timestamp_nanos() / 1_000_000) as i64;
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok(Issued {
            pem: cert.pem(),
            serial: serial_hex,
            not_after_ms,
        })
    }
}

/// The first PEM block's DER bytes.
fn pem_der(pem: &str) -> Option<Vec<u8>> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    Some(p.contents)
}

/// The box id (subject common name) and serial of a client certificate TLS already verified
/// against the CA.
pub fn peer_identity(der: &[u8]) -> Result<PeerIdentity, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::BadPeer(e.to_string()))?;
    let box_id = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| PkiError::BadPeer("no subject common name".into()))?
        .to_string();
    Ok(PeerIdentity {
        box_id,
        serial: hex::encode(cert.raw_serial()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_made_once_kept_private_and_signs_box_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("pki/ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "ca.key is the owner's only");
        let again = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(
            ca.sha256(),
            again.sha256(),
            "the second start loads the same CA"
        );

        let key = KeyPair::generate().unwrap();
        let mut req = CertificateParams::default();
        req.distinguished_name
            .push(DnType::CommonName, "someone-else");
        let csr = req.serialize_request(&key).unwrap();
        let issued = ca
            .issue_box("box-a", csr.der(), Duration::from_secs(3600))
            .unwrap();
        let der = pem_der(&issued.pem).unwrap();
        let who = peer_identity(&der).unwrap();
        assert_eq!(who.box_id, "box-a", "the CA names the box, not the request");
        assert_eq!(who.serial, issued.serial);

        assert!(matches!(
            ca.issue_box("box-a", b"not a csr", Duration::from_secs(60)),
            Err(PkiError::BadCsr(_))
        ));
    }

    #[test]
    fn a_mismatched_key_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path()).unwrap();
        let other = KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("pki/ca.key"), other.serialize_pem()).unwrap();
        let e = Ca::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("not the key of ca.pem") && e.contains("backup"),
            "{e}"
        );
    }
}
