//! Globs over branch and tag names (`release/*`, `v1.*`, `*`): `*` stands for any run of
//! characters (slashes included), `?` for one; everything else stands for itself. What a
//! project's `branch` and `tags` filters are written in.

/// Whether `name` (a branch or tag name, without `refs/heads/` or `refs/tags/`) matches
/// `pattern`. At worst the product of the lengths (one resumption point, no exponential
/// backtracking on hostile names).
pub fn matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and the name position it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether `pattern` has a wildcard (else it is a plain name).
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// A stand-in name for checking a glob by git's ref-name rules (wildcards as letters).
pub fn as_name(pattern: &str) -> String {
    pattern.replace(['*', '?'], "x")
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs_match_as_written() {
        for (p, n, want) in [
            ("main", "main", true),
            ("main", "mainline", false),
            ("*", "anything/at/all", true),
            ("release/*", "release/1.2", true),
            ("release/*", "release", false),
            ("release/*", "hotfix/1", false),
            ("v?.*", "v1.0", true),
            ("v?.*", "v10.0", false),
            ("*-rc*", "v2-rc1", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("", "", true),
            ("", "x", false),
            ("*a", "*ba", true),
        ] {
            assert_eq!(matches(p, n), want, "{p:?} vs {n:?}");
        }
        // Hostile input stays quick.
        let name = "a".repeat(5000);
        assert!(!matches(&"*a".repeat(100).replace("a", "b"), &name));
    }
}
