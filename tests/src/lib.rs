//! Shared helpers for Hive's end-to-end tests (real processes, real servers).
