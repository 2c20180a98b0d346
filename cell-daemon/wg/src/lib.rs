//! WireGuard tunnel plumbing shared by the cell daemon and the connector.
//!
//! A cell gets one tunnel, one key pair made in memory at build start and one peer (the
//! connector of its project's private network); the connector runs one tunnel with a peer per
//! running build. [`tunnel::Tunnel`] builds either side in a given network namespace, on kernel
//! WireGuard when the kernel has it and on boringtun (in-process, same UAPI) when it does not.
//!
//! - [`keys`]: X25519 key pairs; the private half is wiped on drop and never printed.
//! - [`tunnel`]: interface, peers, addresses and routes in a namespace; handshake waits.
//! - [`uapi`]: the userspace control socket (private key set, state read).
//! - [`netns`]: entering namespaces on a thread, and named namespaces for the connector/tests.
//! - [`prefix`]: `10.20.0.0/16`-style prefixes.

#![forbid(unsafe_code)]

pub mod keys;
pub mod netns;
pub mod prefix;
pub mod tunnel;
pub mod uapi;

pub use keys::{KeyPair, PublicKey};
pub use prefix::Prefix;
pub use tunnel::{Backend, BackendChoice, PeerSpec, Tunnel, TunnelError, TunnelSpec};
