//! Value types that cross crate boundaries in Hive and need no I/O: a WireGuard public key as
//! `wg` prints it ([`key`]), IP prefixes such as `10.20.0.0/16` ([`prefix`], on `ipnet`) and
//! the built-in size classes both the control plane and the boxes start from ([`sizeclass`]), and
//! the join token a box trades for its certificate ([`join`]), and UTC times as Hive prints them
//! ([`time`]).
//!
//! The control plane and `hivectl` only parse and print these, so they depend on this crate and
//! not on `hive-wg` (which brings a WireGuard implementation and netlink); `hive-wg` re-exports
//! the same types, so a key or prefix means the same thing on both sides of the key exchange.
#![forbid(unsafe_code)]

pub mod join;
pub mod key;
pub mod prefix;
pub mod sizeclass;
pub mod time;

pub use join::{JoinToken, JoinTokenError};
pub use key::{shown_input, KeyError, PublicKey};
pub use prefix::{Prefix, PrefixError};
pub use sizeclass::{SizeClassSpec, DEFAULT_CLASS};
