//! Cargo builds a test needs (a binary of another crate), run from inside a test process.

use std::path::Path;
use std::process::Command;

/// A `cargo` command run from the workspace root for a build the harness needs, without the
/// variables cargo sets for the test process itself (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...).
/// Build scripts (ring's among them) declare `rerun-if-env-changed` on those: a nested build that
/// inherited them would re-run the script with the test crate's values, and the next top-level
/// cargo, without them, would re-run it again and recompile everything above it.
pub fn nested_cargo() -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    // This crate sits one below the workspace root.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf);
    cmd.current_dir(root.unwrap_or_else(|| ".".into()));
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_for_crate = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            );
        if set_for_crate {
            cmd.env_remove(key);
        }
    }
    cmd
}
