//! Error reports: the whole `source()` chain on one line, printed once where an error ends up
//! (the top of a `main`, a log line, a message to a peer).

/// `a: b: c` for an error and its sources.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("open guest kernel /x/vmlinux")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn joins_every_source() {
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "No such file",
        ));
        assert_eq!(
            super::chain(&e),
            "open guest kernel /x/vmlinux: No such file"
        );
    }
}
