//! WireGuard key pairs (X25519), made in memory for one tunnel.
//!
//! The private half never leaves this process as text: it is handed to the WireGuard backend in
//! zeroizing buffers (see `uapi` and `tunnel`) and wiped when the [`KeyPair`] is dropped. Only the
//! [`PublicKey`] is printable, in the base64 form `wg` prints, because it is what a cell sends to
//! the key exchange; that type (and its parse errors) is `hive-types`', re-exported here.

use std::fmt;

use x25519_dalek::StaticSecret;
use zeroize::{Zeroize, Zeroizing};

pub use hive_types::key::{KeyError, PublicKey};

/// A private key and its public key. The private key is wiped from memory on drop and has no
/// `Debug`/`Display` that could print it.
pub struct KeyPair {
    secret: StaticSecret,
    public: PublicKey,
}

impl KeyPair {
    /// A fresh key pair from the operating system's random source.
    pub fn generate() -> Self {
        let secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let public = PublicKey::from_bytes(x25519_dalek::PublicKey::from(&secret).to_bytes());
        Self { secret, public }
    }

    /// A key pair from stored private key bytes (the connector's long-lived key file). The
    /// caller's buffer wipes itself; the copy kept here is wiped on drop.
    pub fn from_secret_bytes(secret: &Zeroizing<[u8; 32]>) -> Self {
        let secret = StaticSecret::from(**secret);
        let public = PublicKey::from_bytes(x25519_dalek::PublicKey::from(&secret).to_bytes());
        Self { secret, public }
    }

    /// The public half: safe to send anywhere.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// A copy of the private key bytes in a buffer that wipes itself when dropped. Only the
    /// WireGuard backend (and the leak test, which must know what to look for) should call this.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }

    /// Wipes the private key now (also done on drop); the public key stays readable.
    pub fn wipe(&mut self) {
        self.secret.zeroize();
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use base64::Engine as _;

    #[test]
    fn from_secret_bytes_gives_the_same_public_key() {
        let kp = KeyPair::generate();
        let again = KeyPair::from_secret_bytes(&kp.secret_bytes());
        assert_eq!(again.public(), kp.public());
    }

    #[test]
    fn public_key_round_trips_through_base64() {
        let kp = KeyPair::generate();
        let text = kp.public().to_base64();
        assert_eq!(text.len(), 44);
        assert_eq!(text.parse::<PublicKey>().unwrap(), kp.public());
    }

    #[test]
    fn public_key_matches_wireguard_control_derivation() {
        let kp = KeyPair::generate();
        let wc = wireguard_control::Key(*kp.secret_bytes());
        assert_eq!(wc.get_public().0, *kp.public().as_bytes());
    }

    #[test]
    fn bad_public_keys_are_named() {
        let e = "not base64!".parse::<PublicKey>().unwrap_err().to_string();
        assert!(e.contains("not base64!"), "{e}");
        let e = "AAAA".parse::<PublicKey>().unwrap_err().to_string();
        assert!(e.contains("3 bytes"), "{e}");
    }

    #[test]
    fn debug_never_prints_the_secret() {
        let kp = KeyPair::generate();
        let secret = kp.secret_bytes();
        let dbg = format!("{kp:?}");
        assert!(!dbg.contains(&BASE64.encode(*secret)));
        assert!(!dbg.contains(&hex::encode(*secret)));
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn wipe_zeroes_the_secret() {
        let mut kp = KeyPair::generate();
        kp.wipe();
        assert_eq!(*kp.secret_bytes(), [0u8; 32]);
    }

    #[test]
    fn keys_are_distinct() {
        let a = KeyPair::generate();
        let b = KeyPair::generate();
        assert_ne!(a.public(), b.public());
    }
}
