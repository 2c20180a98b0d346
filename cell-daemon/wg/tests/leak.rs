//! The private keys of a tunnel's two ends must not be written to any file. A key can only
//! land in a file written after it was made, so the scan reads every regular file under /run,
//! /var and /tmp modified since the test started, looking for the key as raw bytes, hex and
//! base64. A canary file proves the scan finds what it looks for.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use common::{echo_until, Echo, Pair};
use hive_wg::{KeyPair, Tunnel};

const SCAN_ROOTS: &[&str] = &["/run", "/var", "/tmp"];
const MAX_FILE: u64 = 256 << 20;

fn needles(secret: &[u8; 32]) -> Vec<Vec<u8>> {
    vec![
        secret.to_vec(),
        hex::encode(secret).into_bytes(),
        hex::encode_upper(secret).into_bytes(),
        base64::engine::general_purpose::STANDARD
            .encode(secret)
            .into_bytes(),
    ]
}

/// Files modified at or after `since` that contain any needle.
fn scan(since: SystemTime, needles: &[Vec<u8>]) -> (Vec<PathBuf>, usize) {
    let mut hits = Vec::new();
    let mut scanned = 0;
    let mut stack: Vec<PathBuf> = SCAN_ROOTS.iter().map(PathBuf::from).collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            if !meta.is_file() || meta.len() > MAX_FILE {
                continue;
            }
            if meta.modified().map(|m| m < since).unwrap_or(false) {
                continue;
            }
            let Ok(data) = std::fs::read(&path) else {
                continue;
            };
            scanned += 1;
            if needles.iter().any(|n| contains(&data, n)) {
                hits.push(path);
            }
        }
    }
    (hits, scanned)
}

/// Substring search that skips ahead on the first byte (the naive `windows().any()` is too slow
/// for the big files other programs write to /tmp while this runs).
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    let mut i = 0;
    while let Some(pos) = hay[i..].iter().position(|&b| b == first) {
        let at = i + pos;
        if hay.len() - at < needle.len() {
            return false;
        }
        if &hay[at + 1..at + needle.len()] == rest {
            return true;
        }
        i = at + 1;
    }
    false
}

#[test]
fn private_keys_are_in_no_file() {
    // File times have coarse granularity on some filesystems.
    let since = SystemTime::now() - Duration::from_secs(2);
    let pair = Pair::new("leak", 15);
    let conn_keys = KeyPair::generate();
    let cell_keys = KeyPair::generate();
    let mut all = needles(&conn_keys.secret_bytes());
    all.extend(needles(&cell_keys.secret_bytes()));

    let connector = pair.connector(conn_keys);
    connector
        .add_peer(Pair::cell_as_peer(2, cell_keys.public()))
        .unwrap();
    let cell = Tunnel::up(pair.cell_spec(2, connector.public_key()), cell_keys).unwrap();
    let _server = Echo::start(&pair.conn, "10.250.0.1:7000");
    echo_until(
        &pair.cell,
        "10.250.0.1:7000",
        "leak check",
        Duration::from_secs(5),
    )
    .unwrap();
    // Scan while the tunnels are up (the UAPI sockets exist) and again after.
    let (hits, scanned_up) = scan(since, &all);
    assert!(hits.is_empty(), "private key found in {hits:?}");
    cell.down().unwrap();
    connector.down().unwrap();
    let (hits, scanned) = scan(since, &all);
    assert!(hits.is_empty(), "private key found in {hits:?}");
    eprintln!("scanned {scanned_up} + {scanned} recently written files, no key");

    // The scan can fail: a canary with a fresh key in hex is found.
    let canary_key = KeyPair::generate();
    let canary = Path::new("/tmp").join(format!("hive-wg-canary-{}", std::process::id()));
    std::fs::write(
        &canary,
        format!("x={}\n", hex::encode(*canary_key.secret_bytes())),
    )
    .unwrap();
    let (hits, _) = scan(since, &needles(&canary_key.secret_bytes()));
    std::fs::remove_file(&canary).unwrap();
    assert_eq!(hits, vec![canary]);
}
