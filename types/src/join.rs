//! The join token a new box trades for its client certificate (`hivectl box join-token`,
//! `hive-box --join-token`): `hjt1.<id>.<secret>.<ca-sha256>`, modelled on kubeadm's bootstrap
//! token plus `--discovery-token-ca-cert-hash` in one string.
//!
//! - `id` (16 hex) names the token in the control plane's store and its audit log;
//! - `secret` (32 hex) is stored only as its SHA-256;
//! - `ca-sha256` (64 hex) is the SHA-256 of the control plane's CA certificate (DER): the box
//!   trusts the first certificate chain it is shown only if it ends in that CA, so a token
//!   cannot be used to lure a box to another server, and nothing else needs copying.

use std::fmt;
use std::str::FromStr;

/// The token's fixed prefix (and format version).
pub const PREFIX: &str = "hjt1";

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    pub ca_sha256: String,
}

/// Why a string is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinTokenError {
    #[error(
        "not a join token: expected hjt1.<16 hex>.<32 hex>.<64 hex> as printed by \
         `hivectl box join-token` ({0})"
    )]
    Malformed(&'static str),
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl FromStr for JoinToken {
    type Err = JoinTokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('.');
        if parts.next() != Some(PREFIX) {
            return Err(JoinTokenError::Malformed("it does not start with hjt1."));
        }
        let (Some(id), Some(secret), Some(ca), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JoinTokenError::Malformed(
                "it does not have four dot-separated parts",
            ));
        };
        if !is_hex(id, 16) || !is_hex(secret, 32) || !is_hex(ca, 64) {
            return Err(JoinTokenError::Malformed(
                "a part has the wrong length or is not lowercase hex",
            ));
        }
        Ok(JoinToken {
            id: id.to_string(),
            secret: secret.to_string(),
            ca_sha256: ca.to_string(),
        })
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{}.{}", self.id, self.secret, self.ca_sha256)
    }
}

/// Never prints the secret.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("ca_sha256", &self.ca_sha256)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_not_a_token() {
        let t = JoinToken {
            id: "0123456789abcdef".into(),
            secret: "00112233445566778899aabbccddeeff".into(),
            ca_sha256: "ab".repeat(32),
        };
        let s = t.to_string();
        assert_eq!(s.parse::<JoinToken>().unwrap(), t);
        assert_eq!(
            format!(" {s}\n").parse::<JoinToken>().unwrap(),
            t,
            "whitespace is trimmed"
        );
        assert!(
            !format!("{t:?}").contains(&t.secret),
            "Debug hides the secret"
        );
        for bad in [
            "",
            "hjt2.0123456789abcdef.00112233445566778899aabbccddeeff.abab",
            &s.replace("hjt1.", "hjt1"),
            &s.to_uppercase(),
            &format!("{s}.x"),
            &s[..s.len() - 1],
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad:?} parsed");
        }
    }
}
