//! IP prefixes (`10.20.0.0/16`): interface addresses, allowed IPs and routes.
//!
//! The type is `hive-types`' (on `ipnet`), shared with the control plane and the connector;
//! re-exported here so `hive_wg::Prefix` and `hive_wg::prefix::PrefixError` keep working.

pub use hive_types::prefix::{Prefix, PrefixError};
