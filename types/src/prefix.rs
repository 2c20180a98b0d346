//! IP prefixes (`10.20.0.0/16`): interface addresses, allowed IPs, routes and the private
//! networks' prefixes and tunnel subnets. The arithmetic is `ipnet`'s; this type keeps the
//! address as given (an interface address keeps its host bits) and names bad input precisely.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// Errors from parsing a prefix.
#[derive(Debug, thiserror::Error)]
pub enum PrefixError {
    #[error("prefix {0:?} has no '/<length>'")]
    NoLength(String),
    #[error("prefix {input:?}: {addr:?} is not an IP address")]
    Address { input: String, addr: String },
    #[error("prefix {input:?}: length {len:?} is not a number from 0 to {max}")]
    Length { input: String, len: String, max: u8 },
}

/// An address with a prefix length. As an interface address the host bits are kept
/// (`10.250.0.2/24`); [`Prefix::network`] gives the network (`10.250.0.0/24`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix(IpNet);

impl Prefix {
    /// Builds a prefix; `None` if `len` is longer than the address.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        IpNet::new(addr, len).ok().map(Self)
    }

    /// The address as given (host bits kept).
    pub fn addr(&self) -> IpAddr {
        self.0.addr()
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }

    /// True for `/0`, the whole address family.
    pub fn is_default(&self) -> bool {
        self.0.prefix_len() == 0
    }

    /// The same prefix with the host bits cleared.
    pub fn network(&self) -> Self {
        Self(self.0.trunc())
    }

    /// True when every address of `other` is inside this prefix (never across families).
    pub fn contains(&self, other: &Prefix) -> bool {
        self.0.contains(&other.0)
    }

    /// The `ipnet` value, for address arithmetic (hosts, sizes).
    pub fn as_ipnet(&self) -> IpNet {
        self.0
    }
}

impl From<IpNet> for Prefix {
    fn from(net: IpNet) -> Self {
        Self(net)
    }
}

impl From<Prefix> for IpNet {
    fn from(p: Prefix) -> Self {
        p.0
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.prefix_len())
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Prefix {
    type Err = PrefixError;

    // Parsed in two halves rather than with `IpNet::from_str`, so the error says which half
    // is wrong.
    fn from_str(s: &str) -> Result<Self, PrefixError> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| PrefixError::NoLength(s.to_string()))?;
        let addr: IpAddr = addr.parse().map_err(|_| PrefixError::Address {
            input: s.to_string(),
            addr: addr.to_string(),
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len_err = || PrefixError::Length {
            input: s.to_string(),
            len: len.to_string(),
            max,
        };
        let len: u8 = len.parse().map_err(|_| len_err())?;
        Prefix::new(addr, len).ok_or_else(len_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_prints() {
        assert_eq!(p("10.20.0.0/16").to_string(), "10.20.0.0/16");
        assert_eq!(p("fd00::1/64").to_string(), "fd00::1/64");
        assert_eq!(p("10.250.0.2/24").network().to_string(), "10.250.0.0/24");
        assert_eq!(p("10.250.0.2/24").addr().to_string(), "10.250.0.2");
        assert_eq!(p("0.0.0.0/0").network().to_string(), "0.0.0.0/0");
        assert_eq!(p("fd00::1/64").network().to_string(), "fd00::/64");
        assert!(p("0.0.0.0/0").is_default());
        assert_eq!(format!("{:?}", p("10.0.0.1/8")), "10.0.0.1/8");
    }

    #[test]
    fn containment() {
        assert!(p("10.250.0.0/24").contains(&p("10.250.0.7/32")));
        assert!(p("10.250.0.1/24").contains(&p("10.250.0.0/24")));
        assert!(!p("10.250.0.0/24").contains(&p("10.250.0.0/16")));
        assert!(!p("10.250.0.0/24").contains(&p("10.251.0.1/32")));
        assert!(p("0.0.0.0/0").contains(&p("198.18.0.1/32")));
        assert!(!p("0.0.0.0/0").contains(&p("::1/128")));
    }

    #[test]
    fn bad_input_is_named() {
        for (input, want) in [
            ("10.0.0.0", "no '/"),
            ("10.0.0/8", "not an IP"),
            ("10.0.0.0/33", "0 to 32"),
            ("::/129", "0 to 128"),
            ("10.0.0.0/x", "\"x\""),
        ] {
            let e = input.parse::<Prefix>().unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(input), "{input}: {e}");
        }
    }
}
