//! Client-side TLS to the control plane's agent listener (`--box-addr`) for boxes and
//! connectors: trusting a control plane first by the SHA-256 of its CA certificate (carried by
//! a box join token, or given to a connector as `--ca-sha256`), the way kubeadm's
//! `--discovery-token-ca-cert-hash` does, and then ordinary verified TLS with that CA.
//!
//! [`fetch_pinned_ca`] opens one TLS connection that trusts nothing but a chain carrying a CA of
//! the pinned hash (the control plane sends its CA after its own certificate) whose server
//! certificate verifies against that CA for the host dialled, and returns the CA as PEM; nothing
//! is sent over that connection. [`endpoint`] is the tonic endpoint that trusts only that CA.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Why the pinned CA could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// The URL is unusable (not https, no host, bad port).
    #[error("{0}")]
    Url(String),
    /// Nothing answered, or the link failed: worth trying again.
    #[error("{0}")]
    Reach(String),
    /// The server's chain does not carry the pinned CA, or does not verify against it.
    #[error(
        "the server did not show the pinned CA ({0}): the token or hash is for another control \
         plane, or something in between is posing as it"
    )]
    Pin(String),
}

/// `https://host[:port][/...]` -> (host, port); the port defaults to 443.
pub fn host_port(url: &str) -> Result<(String, u16), String> {
    let rest = url.strip_prefix("https://").ok_or_else(|| {
        "this link is TLS only: use https://HOST:PORT (the control plane's --box-addr)".to_string()
    })?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6
            .split_once(']')
            .ok_or_else(|| "unclosed [ in the host".to_string())?;
        (h.to_string(), p.strip_prefix(':').unwrap_or("443"))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (authority.to_string(), "443"),
        }
    };
    let port = port
        .parse()
        .map_err(|_| "the port is not a number".to_string())?;
    if host.is_empty() {
        return Err("no host".to_string());
    }
    Ok((host, port))
}

/// The tonic endpoint for `url` trusting only `ca_pem`, for `host`, with a client identity or
/// none.
pub fn endpoint(
    url: &str,
    host: &str,
    ca_pem: &str,
    identity: Option<Identity>,
) -> Result<Endpoint, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(host.to_string());
    if let Some(id) = identity {
        tls = tls.identity(id);
    }
    Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())
}

/// Trusts a server chain only when it carries the CA of SHA-256 `pin` and the server's
/// certificate verifies against that CA for the host dialled; remembers the CA.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
    found: Mutex<Option<CertificateDer<'static>>>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| hex::encode(Sha256::digest(c.as_ref())) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General("no certificate in the chain has the pinned SHA-256".into())
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let ok = webpki.verify_server_cert(end_entity, &[], server_name, ocsp, now)?;
        *self.found.lock().unwrap_or_else(|p| p.into_inner()) = Some(ca.clone().into_owned());
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The CA certificate (PEM) of the control plane at `url`, trusted because its SHA-256 (lowercase
/// hex) is `pin`.
pub async fn fetch_pinned_ca(url: &str, pin: &str) -> Result<String, PinError> {
    let (host, port) = host_port(url).map_err(PinError::Url)?;
    // The provider tonic's own TLS (feature tls-ring) uses for the session; deprecated in
    // rustls 0.23.48 only for lacking post-quantum key exchange.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCa {
        pin: pin.trim().to_ascii_lowercase(),
        provider: provider.clone(),
        found: Mutex::new(None),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PinError::Url(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from(host.clone()).map_err(|e| PinError::Url(e.to_string()))?;
    let reach = PinError::Reach;
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| reach("connect timed out after 5s".into()))?
    .map_err(|e| reach(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    match tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp)).await {
        Err(_) => return Err(reach("TLS handshake timed out after 10s".into())),
        Ok(Err(e)) => {
            let e = e.to_string();
            // Only our verifier's refusal is about the pin; anything else is the link.
            return Err(if e.contains("pinned") || e.contains("certificate") {
                PinError::Pin(e)
            } else {
                reach(e)
            });
        }
        Ok(Ok(_stream)) => {}
    }
    let der = verifier
        .found
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .ok_or_else(|| PinError::Pin("no CA was verified".to_string()))?;
    Ok(pem_encode("CERTIFICATE", der.as_ref()))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_host_and_port_and_plaintext_is_explained() {
        assert_eq!(
            host_port("https://cp.example:50052").unwrap(),
            ("cp.example".into(), 50052)
        );
        assert_eq!(
            host_port("https://10.0.2.2:7/").unwrap(),
            ("10.0.2.2".into(), 7)
        );
        assert_eq!(host_port("https://[::1]:9").unwrap(), ("::1".into(), 9));
        assert_eq!(host_port("https://cp").unwrap(), ("cp".into(), 443));
        let e = host_port("ftp://cp:1").unwrap_err();
        assert!(e.contains("https://HOST:PORT"), "{e}");
        assert!(host_port("https://:1").is_err());
    }
}
