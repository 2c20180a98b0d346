//! Who this box is, and the host-global names that follow from it.
//!
//! Several boxes may run on one host (each with its own `--data-dir`). Everything they could
//! share by accident is named after the box id unless a flag names it: the nftables table, the
//! cgroup parent, the cell subnet and (microvm) the VMM uid range. The id itself is made once
//! per data dir (`<hostname>-<hash of /etc/machine-id and the data dir>`) and kept in
//! `<data-dir>/box-id`, so a restart is the same box to the control plane. [`claim`](crate::claim)
//! then checks with the other boxes on the host that none of these is taken.
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::net::Subnet;

/// File in the data dir that keeps the box id made on first start.
pub const BOX_ID_FILE: &str = "box-id";
/// Longest box id (it becomes part of names and log lines).
pub const MAX_BOX_ID: usize = 63;
/// Longest nftables table or cgroup parent name we accept.
pub const MAX_NAME: usize = 64;

/// Where derived cell subnets come from: the shared address space of RFC 6598.
const DERIVED_SPACE: Subnet = Subnet {
    base: Ipv4Addr::new(100, 64, 0, 0),
    prefix: 10,
};
/// Size of a derived cell subnet: 1024 cells.
pub const DERIVED_PREFIX: u8 = 20;
/// Never derived: the old default subnet, which explicit configurations and test harnesses use.
const NOT_DERIVED: Subnet = Subnet {
    base: Ipv4Addr::new(100, 96, 0, 0),
    prefix: 16,
};
/// Derived VMM uid ranges are this long and start at [`DEFAULT_VMM_UID_BASE`] + k times it.
///
/// [`DEFAULT_VMM_UID_BASE`]: crate::backend::microvm::DEFAULT_VMM_UID_BASE
pub const VMM_UID_STRIDE: u32 = 1 << (30 - DERIVED_PREFIX);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "invalid box id {0:?}: want 1 to {MAX_BOX_ID} characters of a-z A-Z 0-9 . _ -, \
         starting with a letter or digit"
    )]
    BoxId(String),
    #[error("invalid {what} {name:?}: {why}")]
    Name {
        what: &'static str,
        name: String,
        why: &'static str,
    },
    #[error("read box id file {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("box id file {0}")]
    BadFile(PathBuf, #[source] Box<IdentityError>),
    #[error("write box id file {0}")]
    Write(PathBuf, #[source] io::Error),
}

/// Checks a box id: non-empty, at most [`MAX_BOX_ID`] characters of `[A-Za-z0-9._-]`, starting
/// with a letter or digit.
pub fn validate_box_id(id: &str) -> Result<(), IdentityError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_BOX_ID
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BoxId(id.to_string()))
    }
}

/// Checks an nftables table name: a letter, then letters, digits and `_`.
pub fn validate_table(name: &str) -> Result<(), IdentityError> {
    let bad = |why| IdentityError::Name {
        what: "nftables table",
        name: name.to_string(),
        why,
    };
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(bad("want 1 to 64 characters"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic())
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(bad("want a letter, then letters, digits and _"));
    }
    Ok(())
}

/// Checks a cgroup parent name: one path component of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn validate_cgroup_parent(name: &str) -> Result<(), IdentityError> {
    let bad = |why| IdentityError::Name {
        what: "cgroup parent",
        name: name.to_string(),
        why,
    };
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(bad("want 1 to 64 characters"));
    }
    if name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(bad(
            "want one path component of letters, digits, . _ - (not starting with .)",
        ));
    }
    Ok(())
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        h.update([0u8]);
    }
    h.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The id a box on this machine with this (canonical) data dir gets when none is given:
/// `<hostname>-<8 hex of sha256(machine id, data dir)>`. The hostname is cut to what fits and
/// characters a box id may not hold become `-`.
pub fn derive_box_id(hostname: &str, machine_id: &str, data_dir: &Path) -> String {
    let h = sha256(&[
        machine_id.trim().as_bytes(),
        data_dir.as_os_str().as_encoded_bytes(),
    ]);
    let mut host: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(MAX_BOX_ID - 9)
        .collect();
    if !host.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        host.insert(0, 'b');
        host.truncate(MAX_BOX_ID - 9);
    }
    format!("{host}-{}", hex(&h[..4]))
}

/// The box id: `explicit` when given (checked), else the one kept in `<data_dir>/box-id`, else
/// a new one from [`derive_box_id`], written there for the next start. `data_dir` must exist.
pub fn box_id(explicit: Option<&str>, data_dir: &Path) -> Result<String, IdentityError> {
    if let Some(id) = explicit {
        validate_box_id(id)?;
        return Ok(id.to_string());
    }
    let file = data_dir.join(BOX_ID_FILE);
    match fs::read_to_string(&file) {
        Ok(text) => {
            let id = text.trim().to_string();
            validate_box_id(&id).map_err(|e| IdentityError::BadFile(file.clone(), Box::new(e)))?;
            return Ok(id);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(IdentityError::Read(file, e)),
    }
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "box".into());
    // Without a machine id (a bare container) the data dir alone still tells boxes apart.
    let machine_id = fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let data_dir = fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let id = derive_box_id(&hostname, &machine_id, &data_dir);
    let tmp = file.with_extension("tmp");
    fs::write(&tmp, format!("{id}\n"))
        .and_then(|()| fs::rename(&tmp, &file))
        .map_err(|e| IdentityError::Write(file, e))?;
    Ok(id)
}

/// Eight hex characters naming the box in host-global names (the id may be too long or hold
/// characters those names may not).
pub fn short_hash(box_id: &str) -> String {
    hex(&sha256(&[box_id.as_bytes()])[..4])
}

/// Default nftables table of a box: `hive_box_<hash>`.
pub fn derived_table(box_id: &str) -> String {
    format!("hive_box_{}", short_hash(box_id))
}

/// Default cgroup parent of a box: `hive-box-<hash>`.
pub fn derived_cgroup_parent(box_id: &str) -> String {
    format!("hive-box-{}", short_hash(box_id))
}

/// Where the derived choices start: a number from the id's hash.
fn start_index(box_id: &str) -> u32 {
    let h = sha256(&[b"subnet", box_id.as_bytes()]);
    u32::from_be_bytes([h[4], h[5], h[6], h[7]])
}

/// The /20s of 100.64.0.0/10 a box may take, in the order it tries them: from one the id's hash
/// picks, onwards, wrapping; 100.96.0.0/16 is left out.
pub fn subnet_candidates(box_id: &str) -> impl Iterator<Item = Subnet> {
    let n = 1u32 << (DERIVED_PREFIX - DERIVED_SPACE.prefix);
    let first = start_index(box_id) % n;
    (0..n)
        .map(move |k| {
            let i = (first + k) % n;
            Subnet {
                base: Ipv4Addr::from(u32::from(DERIVED_SPACE.base) + (i << (32 - DERIVED_PREFIX))),
                prefix: DERIVED_PREFIX,
            }
        })
        .filter(|s| !overlaps(*s, NOT_DERIVED))
}

/// VMM uid bases a box may take, in the order it tries them: `base + k * VMM_UID_STRIDE` for k
/// from one the id's hash picks, onwards, wrapping over 1024 ranges.
pub fn vmm_uid_candidates(box_id: &str, base: u32) -> impl Iterator<Item = u32> {
    let n = 1024u32;
    let first = start_index(box_id) % n;
    (0..n).map(move |k| base + ((first + k) % n) * VMM_UID_STRIDE)
}

/// Where derived sandbox uid ranges start: systemd's container range (0x80000..0x6fffffff,
/// 65536 per container) is what other tools on a host stay out of, and VMM uids are below it.
pub const SANDBOX_UID_BASE: u32 = 0x1000_0000;
/// Derived sandbox uid ranges: one /20's 1024 cells x 65536 ids each.
pub const SANDBOX_UID_STRIDE: u32 = 1 << 26;

/// Sandbox cell uid bases a box may take: `SANDBOX_UID_BASE + k * SANDBOX_UID_STRIDE` for the
/// 24 ranges below 0x70000000, from one the id's hash picks, onwards, wrapping.
pub fn sandbox_uid_candidates(box_id: &str) -> impl Iterator<Item = u32> {
    let n = (0x7000_0000 - SANDBOX_UID_BASE) / SANDBOX_UID_STRIDE;
    let first = start_index(box_id) % n;
    (0..n).map(move |k| SANDBOX_UID_BASE + ((first + k) % n) * SANDBOX_UID_STRIDE)
}

/// Whether two prefixes share an address.
pub fn overlaps(a: Subnet, b: Subnet) -> bool {
    let p = a.prefix.min(b.prefix);
    let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
    u32::from(a.base) & mask == u32::from(b.base) & mask
}

/// IPv4 destinations the host routes now (main table, from `/proc/net/route`), without the
/// default route: a derived subnet must not shadow a network the host already reaches.
pub fn host_routes() -> Vec<Subnet> {
    let text = fs::read_to_string("/proc/net/route").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...; little-endian hex.
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?.swap_bytes();
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?.swap_bytes();
            let prefix = mask.leading_ones() as u8;
            (prefix > 0).then(|| Subnet {
                base: Ipv4Addr::from(dest & mask),
                prefix,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_ids_are_checked() {
        for good in ["vm", "box-1", "a.b_c-d", &"x".repeat(MAX_BOX_ID)] {
            validate_box_id(good).unwrap();
        }
        for bad in [
            "",
            "-x",
            ".x",
            "a b",
            "a/b",
            "ä",
            "x\n",
            &"x".repeat(MAX_BOX_ID + 1),
        ] {
            let e = validate_box_id(bad).unwrap_err().to_string();
            assert!(e.contains("invalid box id"), "{e}");
        }
        validate_table("hive_box_1").unwrap();
        assert!(validate_table("hive-box").is_err());
        assert!(validate_table("1x").is_err());
        validate_cgroup_parent("hive-e2e-x").unwrap();
        for bad in ["a/b", "..", ".x", "", "a b"] {
            assert!(validate_cgroup_parent(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn derived_id_depends_on_machine_and_data_dir_and_is_valid() {
        let a = derive_box_id("vm", "m1", Path::new("/var/lib/a"));
        assert_eq!(a, derive_box_id("vm", "m1\n", Path::new("/var/lib/a")));
        assert!(a.starts_with("vm-") && a.len() == 11, "{a}");
        assert_ne!(a, derive_box_id("vm", "m1", Path::new("/var/lib/b")));
        assert_ne!(a, derive_box_id("vm", "m2", Path::new("/var/lib/a")));
        for host in ["", "-odd host!", &"h".repeat(200)] {
            let id = derive_box_id(host, "m", Path::new("/d"));
            validate_box_id(&id).unwrap();
        }
    }

    #[test]
    fn box_id_is_made_once_per_data_dir_and_explicit_wins() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let a = box_id(None, d1.path()).unwrap();
        assert_eq!(box_id(None, d1.path()).unwrap(), a);
        assert_eq!(
            fs::read_to_string(d1.path().join(BOX_ID_FILE))
                .unwrap()
                .trim(),
            a
        );
        assert_ne!(box_id(None, d2.path()).unwrap(), a);
        assert_eq!(box_id(Some("mine"), d1.path()).unwrap(), "mine");
        assert!(box_id(Some("no way"), d1.path()).is_err());
        fs::write(d2.path().join(BOX_ID_FILE), "bad id\n").unwrap();
        let e = hive_sys::error_chain(&box_id(None, d2.path()).unwrap_err());
        assert!(e.contains("box-id") && e.contains("invalid box id"), "{e}");
    }

    #[test]
    fn derived_names_and_subnets() {
        assert_eq!(derived_table("a"), derived_table("a"));
        assert_ne!(derived_table("a"), derived_table("b"));
        validate_table(&derived_table("a")).unwrap();
        validate_cgroup_parent(&derived_cgroup_parent("a")).unwrap();
        let all: Vec<Subnet> = subnet_candidates("a").collect();
        assert_eq!(all.len(), 1024 - 16);
        assert!(all
            .iter()
            .all(|s| s.prefix == 20 && overlaps(*s, DERIVED_SPACE) && !overlaps(*s, NOT_DERIVED)));
        let set: std::collections::BTreeSet<u32> = all.iter().map(|s| u32::from(s.base)).collect();
        assert_eq!(set.len(), all.len());
        assert_ne!(
            subnet_candidates("a").next(),
            subnet_candidates("b").next(),
            "(could collide by chance, not for these two)"
        );
        let uids: Vec<u32> = vmm_uid_candidates("a", 900_000).take(2).collect();
        assert_eq!(uids[1] - uids[0], VMM_UID_STRIDE);
    }

    #[test]
    fn overlap() {
        let s = |t: &str| t.parse::<Subnet>().unwrap();
        assert!(overlaps(s("100.96.0.0/16"), s("100.96.201.0/24")));
        assert!(overlaps(s("100.96.201.0/24"), s("100.96.0.0/16")));
        assert!(!overlaps(s("100.96.0.0/16"), s("100.97.0.0/16")));
        assert!(!overlaps(s("100.64.0.0/20"), s("100.64.16.0/20")));
        // Whatever the host has, the parser gives prefixes without the default route.
        assert!(host_routes().iter().all(|r| r.prefix > 0));
    }
}
