//! Wall-clock time as the stores, the protocol and the CLI carry it: milliseconds since the
//! Unix epoch in an `i64`.

/// Milliseconds since the Unix epoch; 0 if the clock is set before 1970.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn is_after_2020() {
        assert!(super::now_ms() > 1_577_836_800_000);
    }
}
