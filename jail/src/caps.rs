//! Capabilities: what a jailed process may keep, and dropping the rest for good.
//!
//! Three sets matter across exec: the bounding set (the most a process and its children can ever
//! hold again), the inheritable set and the ambient set (what passes to a program without file
//! capabilities). [`restrict`] trims the bounding set to a keep-list and empties the other two; a
//! root process then execs with exactly the kept capabilities. [`clear`] leaves nothing at all
//! (build steps). Capability numbers are the kernel's (`linux/capability.h`).
use std::io;

/// CAP_CHOWN.
pub const CHOWN: u8 = 0;
/// CAP_DAC_OVERRIDE.
pub const DAC_OVERRIDE: u8 = 1;
/// CAP_FOWNER.
pub const FOWNER: u8 = 3;
/// CAP_FSETID.
pub const FSETID: u8 = 4;
/// CAP_KILL.
pub const KILL: u8 = 5;
/// CAP_SETGID.
pub const SETGID: u8 = 6;
/// CAP_SETUID.
pub const SETUID: u8 = 7;
/// CAP_SETPCAP.
pub const SETPCAP: u8 = 8;
/// CAP_NET_ADMIN.
pub const NET_ADMIN: u8 = 12;
/// CAP_SYS_CHROOT.
pub const SYS_CHROOT: u8 = 18;
/// CAP_SYS_ADMIN.
pub const SYS_ADMIN: u8 = 21;

/// What a sandbox cell daemon keeps (all only over its own namespaces, as root of its own user
/// namespace): mounts and namespaces for the build container (SYS_ADMIN, SYS_CHROOT), its
/// network (NET_ADMIN), making the build user's files and becoming that user (CHOWN,
/// DAC_OVERRIDE, FOWNER, FSETID, SETUID, SETGID, SETPCAP to empty a step's bounding set), and
/// signalling its steps (KILL). Gone, among others: SYS_RESOURCE (it would let the cell raise
/// its own user-namespace limit), MKNOD, SYS_PTRACE, SYS_MODULE, SYS_RAWIO, SYS_BOOT, SYS_TIME,
/// NET_RAW, BPF, PERFMON, SETFCAP, DAC_READ_SEARCH, AUDIT_*, MAC_*, SYSLOG, IPC_OWNER.
pub const CELL_DAEMON: &[u8] = &[
    CHOWN,
    DAC_OVERRIDE,
    FOWNER,
    FSETID,
    KILL,
    SETGID,
    SETUID,
    SETPCAP,
    NET_ADMIN,
    SYS_CHROOT,
    SYS_ADMIN,
];

/// `_LINUX_CAPABILITY_VERSION_3`.
const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The highest capability number this kernel knows.
fn last_cap() -> u8 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

fn mask(keep: &[u8]) -> u64 {
    keep.iter()
        .filter(|c| **c < 64)
        .fold(0u64, |m, c| m | (1u64 << c))
}

fn capset(effective: u64, permitted: u64, inheritable: u64) -> io::Result<()> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let lo = |m: u64| m as u32;
    let hi = |m: u64| (m >> 32) as u32;
    let data = [
        Data {
            effective: lo(effective),
            permitted: lo(permitted),
            inheritable: lo(inheritable),
        },
        Data {
            effective: hi(effective),
            permitted: hi(permitted),
            inheritable: hi(inheritable),
        },
    ];
    // SAFETY: capset reads the header and two data structs of the version-3 layout given here.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn capget() -> io::Result<(u64, u64, u64)> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two data structs of the version-3 layout into the array given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut Header,
            data.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
        join(data[0].inheritable, data[1].inheritable),
    ))
}

fn clear_ambient() -> io::Result<()> {
    // SAFETY: prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL) takes integers only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn drop_bounding(keep: u64) -> io::Result<()> {
    for cap in 0..=last_cap() {
        if keep & (1u64 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl(PR_CAPBSET_DROP) takes integers only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Keeps only `keep` in the bounding, effective and permitted sets and empties the inheritable
/// and ambient sets. Needs CAP_SETPCAP (dropped last, if not kept).
pub fn restrict(keep: &[u8]) -> io::Result<()> {
    let keep = mask(keep);
    clear_ambient()?;
    drop_bounding(keep)?;
    let (eff, perm, _) = capget()?;
    capset(eff & keep, perm & keep, 0)
}

/// Drops every capability from every set (a build step, after it changed to its uid).
pub fn clear() -> io::Result<()> {
    clear_ambient()?;
    // The bounding set can only shrink with CAP_SETPCAP; a process without it has an empty
    // effective set already, and its bounding set was emptied by whoever gave it up.
    let _ = drop_bounding(0);
    capset(0, 0, 0)
}

/// The capability sets of this process as `/proc/self/status` shows them: bounding, effective,
/// permitted, inheritable, ambient (each a mask).
pub fn current() -> io::Result<[u64; 5]> {
    let text = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(u64::MAX)
    };
    Ok([
        field("CapBnd:"),
        field("CapEff:"),
        field("CapPrm:"),
        field("CapInh:"),
        field("CapAmb:"),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_ignores_out_of_range() {
        assert_eq!(mask(&[0, 1, 21]), 0b11 | (1 << 21));
        assert_eq!(mask(&[64, 200]), 0);
    }

    /// In a throw-away child (capabilities are per thread, and the bounding set cannot grow
    /// back), `restrict` leaves exactly the kept ones and `clear` none.
    #[test]
    fn restrict_then_clear_in_a_child() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root");
            return;
        }
        // SAFETY: the child only runs the code below and leaves with _exit; the test harness's
        // other threads are not touched by it.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let ok = (|| {
                    restrict(CELL_DAEMON).ok()?;
                    let [bnd, eff, prm, inh, amb] = current().ok()?;
                    let want = mask(CELL_DAEMON);
                    if bnd != want || eff != want || prm != want || inh != 0 || amb != 0 {
                        return None;
                    }
                    clear().ok()?;
                    let [_, eff, prm, inh, amb] = current().ok()?;
                    (eff == 0 && prm == 0 && inh == 0 && amb == 0).then_some(())
                })();
                // SAFETY: leaves the forked child without running the harness's exit code.
                unsafe { libc::_exit(if ok.is_some() { 0 } else { 1 }) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
