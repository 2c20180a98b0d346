//! Secret masking: every occurrence of a secret value in a step's output is replaced by `***`
//! before the output enters the build's log (and so before it leaves the cell), as GitHub
//! Actions does. Output is cut at line ends, so a value split across two reads of the pipe is
//! still found: a line is held until its newline, or until it passes [`HOLD`] bytes (then all
//! but the last value-length bytes go out), and the rest at the end of the output. With no
//! secrets nothing is held.

/// Most bytes of one unfinished line held back while waiting for its newline.
pub const HOLD: usize = 64 * 1024;

/// What replaces a secret in the log.
pub const MASK: &[u8] = b"***";

/// A stream's masker.
#[derive(Debug, Default)]
pub struct Masker {
    /// Values, longest first (a value containing another is masked whole).
    secrets: Vec<Vec<u8>>,
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
        let cut = match self.held.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None if self.held.len() > HOLD => {
                let longest = self.secrets[0].len();
                self.held.len().saturating_sub(longest.saturating_sub(1))
            }
            None => 0,
        };
        if cut == 0 {
            return Vec::new();
        }
        let rest = self.held.split_off(cut);
        let out = std::mem::replace(&mut self.held, rest);
        self.mask(&out)
    }

    /// The end of the output: whatever is held, masked.
    pub fn finish(&mut self) -> Vec<u8> {
        let out = std::mem::take(&mut self.held);
        self.mask(&out)
    }

    fn mask(&self, data: &[u8]) -> Vec<u8> {
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
            out.push(data[i]);
            i += 1;
        }
        out
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
        // Nothing to mask: passed through as it comes, nothing held.
        let mut m = Masker::new(&[]);
        assert_eq!(m.feed(b"partial"), b"partial");
    }

    #[test]
    fn a_long_line_without_newline_is_let_out_but_never_half_a_value() {
        let secret = "s3cr3t-value";
        let mut m = Masker::new(&[secret.to_string()]);
        let mut out = Vec::new();
        let filler = "x".repeat(HOLD + 10);
        out.extend(m.feed(filler.as_bytes()));
        assert!(!out.is_empty(), "a line past HOLD bytes goes out");
        out.extend(m.feed(b"s3cr3t-"));
        out.extend(m.feed(b"value tail"));
        out.extend(m.finish());
        let text = String::from_utf8(out).unwrap();
        assert!(
            !text.contains(secret) && text.ends_with("*** tail"),
            "{}",
            &text[text.len() - 30..]
        );
    }
}
