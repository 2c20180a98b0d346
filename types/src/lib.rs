//! Value types that cross crate boundaries in Hive and need no I/O: a WireGuard public key as
//! `wg` prints it ([`key`]) and IP prefixes such as `10.20.0.0/16` ([`prefix`], on `ipnet`).
//!
//! The control plane and `hivectl` only parse and print these, so they depend on this crate and
//! not on `hive-wg` (which brings a WireGuard implementation and netlink); `hive-wg` re-exports
//! the same types, so a key or prefix means the same thing on both sides of the key exchange.
#![forbid(unsafe_code)]

pub mod key;
pub mod prefix;

pub use key::{KeyError, PublicKey};
pub use prefix::{Prefix, PrefixError};
