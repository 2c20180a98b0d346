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

/// Whether a build of `git_ref` may see a secret limited to `refs` (comma-separated globs): a
/// pattern without `refs/` names branches (matched only against `refs/heads/NAME`), one with it
/// names full refs (`refs/tags/v*`), and `*` alone is every build, whatever its ref. A tag
/// named like a protected branch (`refs/tags/main`) therefore does not pass for it.
pub fn ref_allowed(refs: &str, git_ref: &str) -> bool {
    refs.split(',').map(str::trim).any(|p| {
        if p == "*" {
            true
        } else if p.is_empty() {
            false
        } else if p.starts_with("refs/") {
            matches(p, git_ref)
        } else {
            git_ref
                .strip_prefix("refs/heads/")
                .is_some_and(|branch| matches(p, branch))
        }
    })
}

/// Checks a secret's `refs` list: what is wrong with it, to tell the caller.
pub fn check_refs(refs: &str) -> Result<(), String> {
    if refs.len() > 1024 {
        return Err(format!("{} bytes of refs: at most 1024", refs.len()));
    }
    let patterns: Vec<&str> = refs.split(',').map(str::trim).collect();
    if patterns.len() > 32 {
        return Err(format!("{} ref patterns: at most 32", patterns.len()));
    }
    for p in patterns {
        if p.is_empty() {
            return Err("an empty ref pattern (two commas, or a trailing one)".into());
        }
        if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "ref pattern {p:?} holds a space or a control character"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn secrets_follow_branches_and_full_refs_as_written() {
        use super::{check_refs, ref_allowed};
        for (refs, git_ref, want) in [
            ("main", "refs/heads/main", true),
            ("main", "refs/tags/main", false),
            ("main", "refs/heads/feature", false),
            ("main,release/*", "refs/heads/release/1.2", true),
            ("main, release/*", "refs/heads/release/1.2", true),
            ("release/*", "refs/heads/main", false),
            ("refs/tags/v*", "refs/tags/v1.0", true),
            ("refs/tags/v*", "refs/heads/v1.0", false),
            ("*", "refs/tags/anything", true),
            ("*", "", true),
            ("main", "", false),
            ("main", "0123abcd", false),
        ] {
            assert_eq!(ref_allowed(refs, git_ref), want, "{refs:?} for {git_ref:?}");
        }
        assert!(check_refs("main,release/*,refs/tags/v*").is_ok());
        assert!(check_refs("main,,x").unwrap_err().contains("empty"));
        assert!(check_refs("ma in").unwrap_err().contains("space"));
        assert!(check_refs(&"a,".repeat(40)).is_err());
    }

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
