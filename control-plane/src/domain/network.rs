//! Checks of private-network input (names, prefixes, tunnel subnets, endpoints, WireGuard
//! public keys) and connector tokens: what the API and the key exchange accept before the store
//! (`store::networks`) writes anything. Prefixes and keys are `hive-types`' values.

use hive_types::{Prefix, PrefixError, PublicKey};

use crate::store::networks::NetworkError;

type Result<T, E = NetworkError> = std::result::Result<T, E>;

/// The tunnel subnet a network gets when none is given.
pub const DEFAULT_TUNNEL_SUBNET: &str = "10.250.0.0/24";

/// Checks a network's name.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(NetworkError::Name(name.to_string()))
    }
}

/// Parses and normalizes private prefixes (host bits cleared); refuses `/0`.
pub fn validate_prefixes(input: &[String]) -> Result<Vec<String>> {
    if input.is_empty() {
        return Err(NetworkError::NoPrefix);
    }
    let mut out = Vec::new();
    for raw in input {
        let p: Prefix = raw
            .trim()
            .parse()
            .map_err(|e: PrefixError| NetworkError::Prefix {
                input: raw.clone(),
                reason: e.to_string(),
            })?;
        if p.is_default() {
            return Err(NetworkError::Prefix {
                input: raw.clone(),
                reason: "a /0 would send all of the build's traffic into the tunnel".into(),
            });
        }
        let s = p.network().to_string();
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

/// Checks the tunnel subnet: IPv4, /16 to /29, not overlapping the network's prefixes.
pub fn validate_tunnel_subnet(input: &str, prefixes: &[String]) -> Result<String> {
    let raw = if input.trim().is_empty() {
        DEFAULT_TUNNEL_SUBNET
    } else {
        input.trim()
    };
    let bad = |reason: &str| NetworkError::TunnelSubnet {
        input: raw.to_string(),
        reason: reason.to_string(),
    };
    let p: Prefix = raw.parse().map_err(|e: PrefixError| bad(&e.to_string()))?;
    if !p.addr().is_ipv4() {
        return Err(bad("must be IPv4"));
    }
    if !(16..=29).contains(&p.prefix_len()) {
        return Err(bad("length must be /16 to /29"));
    }
    let net = p.network();
    for other in prefixes {
        if let Ok(o) = other.parse::<Prefix>() {
            if o.contains(&net) || net.contains(&o) {
                return Err(NetworkError::Overlap {
                    subnet: net.to_string(),
                    prefix: other.clone(),
                });
            }
        }
    }
    Ok(net.to_string())
}

/// Checks `HOST:PORT` (host a name or an address, port 1-65535).
pub fn validate_endpoint(input: &str) -> Result<String> {
    let s = input.trim();
    let bad = || NetworkError::Endpoint(input.to_string());
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.chars().any(char::is_whitespace) {
        return Err(bad());
    }
    Ok(s.to_string())
}

/// Checks a WireGuard public key (base64 of 32 bytes), returned in canonical form.
pub fn validate_public_key(input: &str) -> Result<String> {
    input
        .trim()
        .parse::<PublicKey>()
        .map(|k| k.to_base64())
        .map_err(|e| NetworkError::PublicKey {
            input: hive_types::shown_input(input),
            reason: e.to_string(),
        })
}

/// A new connector token: 32 random bytes, hex. Shown once; stored as [`token_hash`].
pub fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("hct_{}", hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::networks::token_hash;

    #[test]
    fn prefixes_are_normalized_and_checked() {
        assert_eq!(
            validate_prefixes(&["10.20.3.4/16".into()]).unwrap(),
            vec!["10.20.0.0/16".to_string()]
        );
        assert!(validate_prefixes(&[]).is_err());
        assert!(validate_prefixes(&["0.0.0.0/0".into()]).is_err());
        let e = validate_prefixes(&["10.20.0.0".into()]).unwrap_err();
        assert!(e.to_string().contains("10.20.0.0"), "{e}");
    }

    #[test]
    fn tunnel_subnet_rules() {
        let p = vec!["10.20.0.0/16".to_string()];
        assert_eq!(
            validate_tunnel_subnet("", &p).unwrap(),
            DEFAULT_TUNNEL_SUBNET
        );
        assert!(validate_tunnel_subnet("10.20.5.0/24", &p).is_err());
        assert!(validate_tunnel_subnet("10.0.0.0/8", &p).is_err());
        assert!(validate_tunnel_subnet("10.251.0.0/30", &p).is_err());
        assert!(validate_tunnel_subnet("fd00::/64", &p).is_err());
    }

    #[test]
    fn endpoints_and_keys() {
        assert!(validate_endpoint("198.18.0.50:51820").is_ok());
        assert!(validate_endpoint("vpn.example.com:51820").is_ok());
        assert!(validate_endpoint("198.18.0.50").is_err());
        assert!(validate_endpoint("x:0").is_err());
        let k = PublicKey::from_bytes([9; 32]).to_base64();
        assert_eq!(validate_public_key(&format!(" {k} ")).unwrap(), k);
        assert!(validate_public_key("abc").is_err());
    }

    #[test]
    fn tokens_hash_stably_and_differ() {
        let a = new_token();
        assert_ne!(a, new_token());
        assert_eq!(token_hash(&a), token_hash(&a));
        assert!(!token_hash(&a).contains(&a));
    }
}
