//! In-memory tables of who is connected: box daemons (`boxes`: their reports, sessions and
//! placements in flight) and connectors (`connectors`: one session per private network and the
//! commands waiting for an answer). The store holds what must outlive a restart.

pub mod boxes;
pub mod connectors;
