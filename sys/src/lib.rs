//! System plumbing the Hive daemons share: each piece once, with typed errors.
//!
//! | module | job | feature |
//! |---|---|---|
//! | [`clock`] | wall-clock milliseconds since the Unix epoch | — |
//! | [`backoff`] | jittered exponential backoff for reconnects, retries and polls | — |
//! | [`error`] | one line for an error and its `source()` chain | — |
//! | [`fs`] | files written whole (temporary file, fsync, rename) with their mode | — |
//! | `netns` | named network namespaces: create, pin, enter, run code inside | `netns` |
//! | `netlink` | rtnetlink look-ups (a link's index) | `netlink` |
//! | `tun` | open a TUN or TAP device | `tun` |
//! | `nft` | load an nftables ruleset | `nft` |
//!
//! Neighbours: `hive-jail` (namespaces, cgroups and seccomp for one jailed process) and
//! `hive-types` (value types: keys, prefixes, size classes).
#![deny(missing_docs)]

pub mod backoff;
pub mod clock;
pub mod error;
pub mod fs;
#[cfg(feature = "netlink")]
pub mod netlink;
#[cfg(feature = "netns")]
pub mod netns;
#[cfg(feature = "nft")]
pub mod nft;
#[cfg(feature = "tun")]
pub mod tun;

pub use backoff::Backoff;
pub use clock::now_ms;
pub use error::chain as error_chain;
pub use fs::write_file;
