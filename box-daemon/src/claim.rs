//! Host-wide claims: which live box uses which box id, data dir, nftables table, cgroup parent,
//! cell subnet and VMM uids on this host, so two boxes never share one.
//!
//! Each running box keeps a record file `<claims-dir>/<box-id>.box` (JSON) and holds an
//! exclusive `flock` on it for its whole life; the kernel drops the lock when the process ends,
//! however it ends, so "locked" means "its box is alive" with no pid guessing. A box starting
//! takes `<claims-dir>/lock`, reads the records of the live boxes (removing the dead ones'),
//! refuses what a live one holds (or, for a derived subnet or uid range, takes the next free
//! one), writes its own record and lets go of `lock`. [`identity`](crate::identity) makes the
//! names; this module only checks and records them.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::identity::overlaps;
use crate::net::Subnet;

/// Default claims directory: shared by every box on the host, gone at reboot with the claims.
pub const CLAIMS_DIR: &str = "/run/hive-box";
const RECORD_EXT: &str = "box";

/// What one live box holds. Unknown fields are ignored: a newer box may record more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub box_id: String,
    pub pid: u32,
    pub data_dir: PathBuf,
    pub nft_table: String,
    pub cgroup_parent: String,
    pub cell_subnet: String,
    /// The cells' host uids `[first, end)`: microvm, one VMM uid per cell; sandbox, 65536 per
    /// cell (each cell's user namespace).
    #[serde(default)]
    pub vmm_uids: Option<(u32, u32)>,
}

impl Record {
    fn subnet(&self) -> Option<Subnet> {
        self.cell_subnet.parse().ok()
    }

    fn owner(&self) -> String {
        format!(
            "box {} (pid {}, data dir {})",
            self.box_id,
            self.pid,
            self.data_dir.display()
        )
    }
}

/// A value given by a flag, or the candidates derived from the box id (first free one wins).
#[derive(Debug, Clone)]
pub enum Pick<T> {
    Given(T),
    Derived(Vec<T>),
}

/// What a starting box wants to hold.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub box_id: String,
    /// Canonical.
    pub data_dir: PathBuf,
    pub nft_table: String,
    pub cgroup_parent: String,
    pub cell_subnet: Pick<Subnet>,
    /// Networks a derived subnet must not overlap besides other boxes' (the host's routes).
    pub avoid: Vec<Subnet>,
    /// The first uid of the cells' uid range (its length is the subnet's slot count times
    /// `uids_per_cell`).
    pub vmm_uid_base: Option<Pick<u32>>,
    /// Host uids each cell slot takes: 1 (a microVM's VMM) or 65536 (a sandbox's namespace).
    pub uids_per_cell: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("claims directory {0}")]
    Dir(PathBuf, #[source] io::Error),
    #[error("lock {0}")]
    Lock(PathBuf, #[source] io::Error),
    #[error("box id {id} is already used by a live {owner}: is this box running already? (another box on this host needs its own --data-dir, or --box-id)")]
    BoxId { id: String, owner: String },
    #[error("data dir {dir} is already used by a live {owner}; give this box its own --data-dir")]
    DataDir { dir: PathBuf, owner: String },
    #[error("{what} {value} is already used by a live {owner}; give this box its own {flag} (or leave it unset: the default is derived from the box id)")]
    Taken {
        what: &'static str,
        value: String,
        flag: &'static str,
        owner: String,
    },
    #[error("no free {what} left to derive for this box on this host; give it one with {flag}")]
    Exhausted {
        what: &'static str,
        flag: &'static str,
    },
    #[error("write claim record {0}")]
    Write(PathBuf, #[source] io::Error),
}

/// This box's claim: held while the value lives; the record file goes when it is dropped.
#[derive(Debug)]
pub struct Claim {
    pub record: Record,
    subnet: Subnet,
    path: PathBuf,
    _file: Flock<File>,
}

impl Claim {
    /// The cell subnet this box got.
    pub fn cell_subnet(&self) -> Subnet {
        self.subnet
    }

    /// The first VMM uid this box got (microvm).
    pub fn vmm_uid_base(&self) -> Option<u32> {
        self.record.vmm_uids.map(|(first, _)| first)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Removed while still locked, so nobody reads a half-gone record as live.
        let _ = fs::remove_file(&self.path);
    }
}

fn lock_err(path: &Path) -> impl FnOnce((File, Errno)) -> ClaimError + '_ {
    move |(_, e)| ClaimError::Lock(path.to_path_buf(), io::Error::from(e))
}

/// The live boxes' records in `dir` (not `own`); records of dead boxes are removed.
fn live_records(dir: &Path, own: &Path) -> Result<Vec<Record>, ClaimError> {
    let mut live = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| ClaimError::Dir(dir.to_path_buf(), e))?;
    for e in entries.flatten() {
        let path = e.path();
        if path == own || path.extension().is_none_or(|x| x != RECORD_EXT) {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            // Nobody holds it: that box is gone.
            Ok(_stale) => {
                let _ = fs::remove_file(&path);
            }
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                match serde_json::from_str::<Record>(&text) {
                    Ok(r) => live.push(r),
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "unreadable claim of a live box; ignored")
                    }
                }
            }
            Err(err) => return Err(lock_err(&path)(err)),
        }
    }
    Ok(live)
}

/// Takes this box's claim in `dir` (created if missing), or says which live box holds what it
/// wants.
pub fn claim(dir: &Path, want: &Wanted) -> Result<Claim, ClaimError> {
    fs::create_dir_all(dir).map_err(|e| ClaimError::Dir(dir.to_path_buf(), e))?;
    let lock_path = dir.join("lock");
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| ClaimError::Lock(lock_path.clone(), e))?;
    // Held only while boxes start, so waiting is short.
    let _guard = Flock::lock(lock_file, FlockArg::LockExclusive).map_err(lock_err(&lock_path))?;

    let own_path = dir.join(format!("{}.{RECORD_EXT}", want.box_id));
    let own = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&own_path)
        .map_err(|e| ClaimError::Lock(own_path.clone(), e))?;
    let mut own = match Flock::lock(own, FlockArg::LockExclusiveNonblock) {
        Ok(f) => f,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let owner = serde_json::from_str::<Record>(&text)
                .map(|r| r.owner())
                .unwrap_or_else(|_| "box".into());
            return Err(ClaimError::BoxId {
                id: want.box_id.clone(),
                owner,
            });
        }
        Err(err) => return Err(lock_err(&own_path)(err)),
    };

    match hold(dir, want, &own_path, &mut own) {
        Ok((record, subnet)) => Ok(Claim {
            record,
            subnet,
            path: own_path,
            _file: own,
        }),
        Err(e) => {
            // Still locked: nobody took it meanwhile.
            let _ = fs::remove_file(&own_path);
            Err(e)
        }
    }
}

/// Under the claims lock, with this box's record file locked: checks `want` against the live
/// boxes and writes this box's record.
fn hold(
    dir: &Path,
    want: &Wanted,
    own_path: &Path,
    own: &mut File,
) -> Result<(Record, Subnet), ClaimError> {
    let others = live_records(dir, own_path)?;
    for r in &others {
        if r.data_dir == want.data_dir {
            return Err(ClaimError::DataDir {
                dir: want.data_dir.clone(),
                owner: r.owner(),
            });
        }
        if r.nft_table == want.nft_table {
            return Err(ClaimError::Taken {
                what: "nftables table",
                value: want.nft_table.clone(),
                flag: "--nft-table",
                owner: r.owner(),
            });
        }
        if r.cgroup_parent == want.cgroup_parent {
            return Err(ClaimError::Taken {
                what: "cgroup parent",
                value: want.cgroup_parent.clone(),
                flag: "--cgroup-parent",
                owner: r.owner(),
            });
        }
    }
    let subnet = pick_subnet(want, &others)?;
    let vmm_uids = match &want.vmm_uid_base {
        None => None,
        Some(pick) => Some(pick_uids(
            pick,
            subnet.slots().saturating_mul(want.uids_per_cell.max(1)),
            &others,
        )?),
    };

    let record = Record {
        box_id: want.box_id.clone(),
        pid: std::process::id(),
        data_dir: want.data_dir.clone(),
        nft_table: want.nft_table.clone(),
        cgroup_parent: want.cgroup_parent.clone(),
        cell_subnet: subnet.to_string(),
        vmm_uids,
    };
    let text = serde_json::to_vec_pretty(&record).map_err(io::Error::other);
    text.and_then(|t| {
        own.set_len(0)?;
        own.rewind()?;
        own.write_all(&t)?;
        own.flush()
    })
    .map_err(|e| ClaimError::Write(own_path.to_path_buf(), e))?;
    Ok((record, subnet))
}

fn pick_subnet(want: &Wanted, others: &[Record]) -> Result<Subnet, ClaimError> {
    let held_by = |s: Subnet| {
        others
            .iter()
            .find(|r| r.subnet().is_some_and(|o| overlaps(o, s)))
    };
    match &want.cell_subnet {
        Pick::Given(s) => match held_by(*s) {
            Some(r) => Err(ClaimError::Taken {
                what: "cell subnet (or part of it)",
                value: s.to_string(),
                flag: "--cell-subnet",
                owner: r.owner(),
            }),
            None => Ok(*s),
        },
        Pick::Derived(candidates) => candidates
            .iter()
            .copied()
            .find(|s| held_by(*s).is_none() && !want.avoid.iter().any(|a| overlaps(*a, *s)))
            .ok_or(ClaimError::Exhausted {
                what: "cell subnet",
                flag: "--cell-subnet",
            }),
    }
}

fn pick_uids(pick: &Pick<u32>, len: u32, others: &[Record]) -> Result<(u32, u32), ClaimError> {
    // A range that would run past the last uid is cut there (and a cell past it refused by
    // the backend), never wrapped.
    let range = |first: u32| (first, first.saturating_add(len));
    let held_by = |(a, b): (u32, u32)| {
        others
            .iter()
            .find(|r| r.vmm_uids.is_some_and(|(c, d)| a < d && c < b))
    };
    match pick {
        Pick::Given(first) => match held_by(range(*first)) {
            Some(r) => Err(ClaimError::Taken {
                what: "VMM uid range starting at",
                value: first.to_string(),
                flag: "--vmm-uid-base",
                owner: r.owner(),
            }),
            None => Ok(range(*first)),
        },
        Pick::Derived(candidates) => candidates
            .iter()
            .map(|f| range(*f))
            .find(|r| held_by(*r).is_none())
            .ok_or(ClaimError::Exhausted {
                what: "VMM uid range",
                flag: "--vmm-uid-base",
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(id: &str, data: &str, subnet: Pick<Subnet>) -> Wanted {
        Wanted {
            box_id: id.into(),
            data_dir: PathBuf::from(data),
            nft_table: format!("t_{id}"),
            cgroup_parent: format!("c-{id}"),
            cell_subnet: subnet,
            avoid: vec![],
            vmm_uid_base: None,
            uids_per_cell: 1,
        }
    }

    fn s(t: &str) -> Subnet {
        t.parse().unwrap()
    }

    // A flock belongs to an open file, so two claims in one process conflict as two boxes do.
    #[test]
    fn live_claims_are_refused_and_dead_ones_free() {
        let dir = tempfile::tempdir().unwrap();
        let a = claim(
            dir.path(),
            &want("a", "/d/a", Pick::Given(s("100.80.0.0/20"))),
        )
        .unwrap();
        assert_eq!(a.record.pid, std::process::id());
        assert!(dir.path().join("a.box").exists());

        let msg = |w: &Wanted| hive_sys::error_chain(&claim(dir.path(), w).unwrap_err());
        let e = msg(&want("a", "/d/x", Pick::Given(s("100.81.0.0/20"))));
        assert!(
            e.contains("box id a is already used") && e.contains("/d/a"),
            "{e}"
        );
        let e = msg(&want("b", "/d/a", Pick::Given(s("100.81.0.0/20"))));
        assert!(e.contains("data dir /d/a"), "{e}");
        let mut w = want("b", "/d/b", Pick::Given(s("100.81.0.0/20")));
        w.nft_table = "t_a".into();
        let e = msg(&w);
        assert!(
            e.contains("nftables table t_a is already used by a live box a")
                && e.contains("--nft-table"),
            "{e}"
        );
        let mut w = want("b", "/d/b", Pick::Given(s("100.81.0.0/20")));
        w.cgroup_parent = "c-a".into();
        assert!(msg(&w).contains("cgroup parent c-a"));
        // Overlap, not only equality.
        let e = msg(&want("b", "/d/b", Pick::Given(s("100.80.4.0/24"))));
        assert!(
            e.contains("cell subnet") && e.contains("--cell-subnet"),
            "{e}"
        );

        // Derived: the held and the avoided subnets are skipped.
        let mut w = want(
            "b",
            "/d/b",
            Pick::Derived(vec![
                s("100.80.0.0/20"),
                s("100.81.0.0/20"),
                s("100.82.0.0/20"),
            ]),
        );
        w.avoid = vec![s("100.81.0.0/16")];
        w.vmm_uid_base = Some(Pick::Derived(vec![1000, 5000]));
        let b = claim(dir.path(), &w).unwrap();
        assert_eq!(b.cell_subnet(), s("100.82.0.0/20"));
        assert_eq!(b.record.vmm_uids, Some((1000, 1000 + 1024)));
        let mut w = want("c", "/d/c", Pick::Derived(vec![s("100.82.0.0/20")]));
        assert!(msg(&w).contains("no free cell subnet"));
        w.cell_subnet = Pick::Given(s("100.83.0.0/20"));
        w.vmm_uid_base = Some(Pick::Given(1500));
        assert!(msg(&w).contains("VMM uid range starting at 1500"));

        // A box that ends frees everything; its record goes.
        drop(a);
        assert!(!dir.path().join("a.box").exists());
        claim(
            dir.path(),
            &want("x", "/d/a", Pick::Given(s("100.80.0.0/20"))),
        )
        .unwrap();
    }

    #[test]
    fn a_crashed_boxs_record_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        // What a killed box leaves: its record, with no lock on it.
        let old = Record {
            box_id: "old".into(),
            pid: 1,
            data_dir: "/d/old".into(),
            nft_table: "t_old".into(),
            cgroup_parent: "c-old".into(),
            cell_subnet: "100.80.0.0/20".into(),
            vmm_uids: None,
        };
        fs::write(
            dir.path().join("old.box"),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        let mut w = want("new", "/d/old", Pick::Given(s("100.80.0.0/20")));
        w.nft_table = "t_old".into();
        claim(dir.path(), &w).unwrap();
        assert!(!dir.path().join("old.box").exists());
    }
}
