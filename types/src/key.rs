//! WireGuard public keys: 32 bytes, shown as base64 like `wg pubkey` prints them.
//!
//! Only the public half lives here; key pairs (and their private halves) are `hive-wg`'s.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

/// Errors from parsing a public key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("public key {input:?} is not base64: {source}")]
    Base64 {
        input: String,
        #[source]
        source: base64::DecodeError,
    },
    #[error("public key {input:?} decodes to {len} bytes, a WireGuard key has 32")]
    Length { input: String, len: usize },
}

/// A WireGuard public key (Curve25519 point), shown as base64 like `wg pubkey` prints it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Builds a key from its raw 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Base64, as WireGuard tools print it (44 characters).
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    /// Lower-case hex, as the UAPI protocol writes keys.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// How much of a rejected key an error repeats: a key comes from a caller, a box or a cell,
/// and an error of megabytes would pass gRPC's message limit on its way back.
const SHOWN_BYTES: usize = 64;

/// `input` as an error shows it: whole when short, else its start (on a character boundary),
/// `…` and its length.
pub fn shown_input(input: &str) -> String {
    if input.len() <= SHOWN_BYTES {
        return input.to_string();
    }
    let mut end = SHOWN_BYTES;
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &input[..end], input.len())
}

impl FromStr for PublicKey {
    type Err = KeyError;

    /// Surrounding whitespace is ignored (keys are often pasted).
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let bytes = BASE64.decode(s.trim()).map_err(|source| KeyError::Base64 {
            input: shown_input(s),
            source,
        })?;
        let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| KeyError::Length {
            input: shown_input(s),
            len: bytes.len(),
        })?;
        Ok(Self(arr))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_huge_rejected_key_is_not_repeated_whole() {
        let huge = "é".repeat(2 * 1024 * 1024);
        let err = huge.parse::<super::PublicKey>().unwrap_err().to_string();
        assert!(err.len() < 300, "{} bytes of error", err.len());
        assert!(err.contains("(4194304 bytes)"), "{err}");
        let short = "not-a-key"
            .parse::<super::PublicKey>()
            .unwrap_err()
            .to_string();
        assert!(short.contains("\"not-a-key\""), "{short}");
    }

    use super::*;

    #[test]
    fn round_trips_through_base64_and_hex() {
        let k = PublicKey::from_bytes([7; 32]);
        let text = k.to_base64();
        assert_eq!(text.len(), 44);
        assert_eq!(text.parse::<PublicKey>().unwrap(), k);
        assert_eq!(format!(" {text}\n").parse::<PublicKey>().unwrap(), k);
        assert_eq!(k.to_hex(), "07".repeat(32));
        assert_eq!(k.to_string(), text);
    }

    #[test]
    fn bad_public_keys_are_named() {
        let e = "not base64!".parse::<PublicKey>().unwrap_err().to_string();
        assert!(e.contains("not base64!"), "{e}");
        let e = "AAAA".parse::<PublicKey>().unwrap_err().to_string();
        assert!(e.contains("3 bytes"), "{e}");
    }
}
