//! nftables: a ruleset text loaded with `nft -f -`, atomically (all of it or nothing).

use std::io::{self, Write};
use std::process::{Command, Stdio};

/// Errors loading a ruleset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `nft` could not be run or fed.
    #[error("run nft ({what})")]
    Spawn {
        /// What the ruleset was for.
        what: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `nft` refused the ruleset.
    #[error("nft failed ({what}): {stderr}")]
    Refused {
        /// What the ruleset was for.
        what: String,
        /// What nft said.
        stderr: String,
    },
}

/// Loads `ruleset` in the calling thread's network namespace; `what` names it in errors.
pub fn apply(ruleset: &str, what: &str) -> Result<(), Error> {
    let spawn = |source| Error::Spawn {
        what: what.to_string(),
        source,
    };
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(ruleset.as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if !out.status.success() {
        return Err(Error::Refused {
            what: what.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Whether `element` is in set `set` of table `family table` (false when the set or nft is
/// missing).
pub fn set_contains(family: &str, table: &str, set: &str, element: &str) -> bool {
    Command::new("nft")
        .args(["list", "set", family, table, set])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("\"{element}\"")))
        .unwrap_or(false)
}
