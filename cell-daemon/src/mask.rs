//! Secret masking: every occurrence of a secret value in a step's output is replaced by `***`
//! before the output enters the build's log (and so before it leaves the cell), as GitHub
//! Actions does. What a pipe read ends with and could still grow into a secret (a proper
//! prefix of one) is held back until the next read or the end of the output; everything else
//! goes out masked at once. So a value split across reads, or spanning lines (a PEM key), is
//! still caught, at most (longest secret - 1) bytes are ever held, and with no secrets nothing
//! is. A value written in pieces with other bytes between, or encoded, is not (nor is it by
//! any CI's masking).

/// What replaces a secret in the log.
pub const MASK: &[u8] = b"***";

/// A stream's masker.
#[derive(Debug, Default)]
pub struct Masker {
    /// Values, longest first (a value containing another is masked whole).
    secrets: Vec<Vec<u8>>,
    /// Raw bytes that may be the start of a secret.
    held: Vec<u8>,
}

impl Masker {
    pub fn new(secrets: &[String]) -> Masker {
        let mut secrets: Vec<Vec<u8>> = secrets
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.as_bytes().to_vec())
            .collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Masker {
            secrets,
            held: Vec::new(),
        }
    }

    /// Takes a read from the pipe; returns what may go to the log now (possibly nothing).
    pub fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        if self.secrets.is_empty() {
            return data.to_vec();
        }
        self.held.extend_from_slice(data);
        let buf = std::mem::take(&mut self.held);
        let (out, rest) = self.mask(&buf, false);
        self.held = rest;
        out
    }

    /// The end of the output: whatever is held, masked.
    pub fn finish(&mut self) -> Vec<u8> {
        let buf = std::mem::take(&mut self.held);
        self.mask(&buf, true).0
    }

    /// Masks `data`; unless `last`, stops at the first position from which the rest of `data`
    /// is a proper prefix of some secret and returns that rest unmasked, to be held.
    fn mask(&self, data: &[u8], last: bool) -> (Vec<u8>, Vec<u8>) {
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        'scan: while i < data.len() {
            for s in &self.secrets {
                if data[i..].starts_with(s) {
                    out.extend_from_slice(MASK);
                    i += s.len();
                    continue 'scan;
                }
            }
            if !last {
                let tail = &data[i..];
                if self
                    .secrets
                    .iter()
                    .any(|s| tail.len() < s.len() && s.starts_with(tail))
                {
                    return (out, tail.to_vec());
                }
            }
            out.push(data[i]);
            i += 1;
        }
        (out, Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(secrets: &[&str], reads: &[&str]) -> String {
        let secrets: Vec<String> = secrets.iter().map(|s| s.to_string()).collect();
        let mut m = Masker::new(&secrets);
        let mut out = Vec::new();
        for r in reads {
            out.extend(m.feed(r.as_bytes()));
        }
        out.extend(m.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn values_are_masked_also_when_split_across_reads() {
        assert_eq!(run(&["hunter22"], &["pw=hunter22\n"]), "pw=***\n");
        assert_eq!(
            run(&["hunter22"], &["pw=hun", "ter22 and hunter22\nok\n"]),
            "pw=*** and ***\nok\n"
        );
        assert_eq!(
            run(&["hunter22"], &["no newline hunter", "22"]),
            "no newline ***"
        );
        // A value containing another is masked whole.
        assert_eq!(
            run(&["abcd", "abcdefgh"], &["abcdefgh abcd\n"]),
            "*** ***\n"
        );
        // A held prefix that turns out not to be the secret goes out as it was.
        assert_eq!(
            run(&["hunter22"], &["a hunt", "ing trip"]),
            "a hunting trip"
        );
        assert_eq!(run(&["aab"], &["aa", "aab"]), "aa***");
        // Nothing to mask: passed through as it comes, nothing held.
        let mut m = Masker::new(&[]);
        assert_eq!(m.feed(b"partial"), b"partial");
    }

    #[test]
    fn a_multi_line_value_or_one_in_a_huge_line_is_masked_whatever_the_reads() {
        let pem = "-----BEGIN KEY-----\nMIIB\nabcd\n-----END KEY-----";
        let text = format!("key:\n{pem}\ndone\n");
        let big = format!("{}{}{}", "x".repeat(70_000), "s3cr3t-value", "y".repeat(10));
        for input in [text.as_str(), big.as_str()] {
            // Every way of cutting the output into two reads.
            for cut in (0..input.len()).step_by(7).chain([input.len()]) {
                let out = run(&[pem, "s3cr3t-value"], &[&input[..cut], &input[cut..]]);
                assert!(
                    !out.contains("MIIB") && !out.contains("s3cr3t"),
                    "cut {cut}"
                );
                assert!(out.contains("***"), "cut {cut}");
            }
        }
        // At most a secret's length is held.
        let mut m = Masker::new(&["s3cr3t-value".to_string()]);
        assert!(m.feed(big.as_bytes()).len() >= big.len() - 12);
    }
}
