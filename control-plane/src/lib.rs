//! Hive control plane: turns webhooks into builds, stores them, places them on boxes.
#![forbid(unsafe_code)]
