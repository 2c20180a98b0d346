//! PID 1 duties: the mounts a Linux userland expects, the hostname, and powering off.
//!
//! In a microVM we are the kernel's init and the root filesystem is bare. In a sandbox the box
//! has already made the namespaces, pivoted into the cell rootfs and bind-mounted `/run/hive`
//! (our socket's directory) and `/images/build`; mounting a tmpfs over `/run` would hide that
//! bind mount, so it is moved aside and back. `/dev` gets a devtmpfs only when it is empty: a
//! sandbox's /dev was made by the box, and a devtmpfs there would expose the host's devices.
//! Reaping is the [`crate::reaper`]'s job.

use nix::mount::{mount, MsFlags};
use std::path::Path;

/// Errors during PID 1 set-up.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mount {fstype} at {target}")]
    Mount {
        fstype: String,
        target: String,
        #[source]
        source: nix::Error,
    },
    #[error("move mount {from} to {to}")]
    Move {
        from: String,
        to: String,
        #[source]
        source: nix::Error,
    },
    #[error("create directory {path}")]
    Mkdir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("set hostname {name}")]
    Hostname {
        name: String,
        #[source]
        source: nix::Error,
    },
}

fn mkdir(path: &str) -> Result<(), InitError> {
    std::fs::create_dir_all(path).map_err(|source| InitError::Mkdir {
        path: path.to_string(),
        source,
    })
}

fn mount_fs(
    fstype: &str,
    target: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    mkdir(target)?;
    mount(Some(fstype), target, Some(fstype), flags, data).map_err(|source| InitError::Mount {
        fstype: fstype.to_string(),
        target: target.to_string(),
        source,
    })
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mount_point(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| t.lines().any(|l| l.split(' ').nth(4) == Some(path)))
        .unwrap_or(false)
}

/// Mounts /proc if it is not there yet: needed before reading the kernel command line.
pub fn mount_proc() -> Result<(), InitError> {
    if Path::new("/proc/self").exists() {
        return Ok(());
    }
    let f = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", f, None)
}

/// The rest of the PID 1 mounts and the hostname.
pub fn setup(hostname: &str) -> Result<(), InitError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let none: Option<&str> = None;
    // Our mounts stay in our namespace (and `mount --move` refuses shared parents).
    let _ = mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none);
    if !is_mount_point("/sys") {
        mount_fs("sysfs", "/sys", nosuid | MsFlags::MS_NOEXEC, None)?;
    }
    if !Path::new("/dev/null").exists() {
        mount_fs("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    }
    if !is_mount_point("/dev/pts") {
        // Not fatal: builds rarely need ptys, and some sandboxes forbid devpts.
        if let Err(e) = mount_fs(
            "devpts",
            "/dev/pts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=620"),
        ) {
            tracing::warn!(error = %hive_sys::error_chain(&e), "no /dev/pts");
        }
    }
    if !is_mount_point("/tmp") {
        mount_fs("tmpfs", "/tmp", nosuid, Some("mode=1777"))?;
    }
    // /run: a sandbox's jail made it already (a size-capped tmpfs with the box's /run/hive
    // inside; in the cell's user namespace those mounts are locked and could not be moved).
    if is_mount_point("/run") {
        mkdir("/run/hive")?;
        return nix::unistd::sethostname(hostname).map_err(|source| InitError::Hostname {
            name: hostname.to_string(),
            source,
        });
    }
    // Otherwise a fresh tmpfs, keeping a /run/hive bind mount (if any) by moving it aside.
    let keep_run_hive = is_mount_point("/run/hive");
    let aside = "/tmp/.hive-run";
    if keep_run_hive {
        mkdir(aside)?;
        move_mount("/run/hive", aside)?;
    }
    mount_fs("tmpfs", "/run", nosuid, Some("mode=0755"))?;
    mkdir("/run/hive")?;
    if keep_run_hive {
        move_mount(aside, "/run/hive")?;
        let _ = std::fs::remove_dir(aside);
    }
    nix::unistd::sethostname(hostname).map_err(|source| InitError::Hostname {
        name: hostname.to_string(),
        source,
    })?;
    Ok(())
}

fn move_mount(from: &str, to: &str) -> Result<(), InitError> {
    let none: Option<&str> = None;
    mount(Some(from), to, none, MsFlags::MS_MOVE, none).map_err(|source| InitError::Move {
        from: from.to_string(),
        to: to.to_string(),
        source,
    })
}

/// The kernel starts init with no `PATH`; the daemon runs `ip` and `nft` by name.
pub fn default_path() {
    if std::env::var_os("PATH").is_none() {
        // Called while the process is still single-threaded (before the runtime starts).
        std::env::set_var("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    }
}

/// Mounts the build image disk (`hive.build_disk=` in a microVM: an ext4 block device)
/// read-only at the build image path. Needs /dev, so it runs after [`setup`].
pub fn mount_build_disk(device: &str, target: &Path) -> Result<(), InitError> {
    let t = target.to_string_lossy().to_string();
    mkdir(&t)?;
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(Some(device), target, Some("ext4"), flags, None::<&str>).map_err(|source| {
        InitError::Mount {
            fstype: format!("ext4 ({device})"),
            target: t,
            source,
        }
    })
}

/// A tmpfs at the work dir: the container's overlay upper must not live on an overlay itself,
/// and the build's writes must vanish with the cell. `size_mib` caps it (0: the kernel's
/// default, half the memory; the cell's memory limit bounds it either way, as tmpfs pages are
/// charged to the writer's cgroup).
pub fn mount_work_tmpfs(dir: &Path, size_mib: u64) -> Result<(), InitError> {
    let d = dir.to_string_lossy().to_string();
    let opts = if size_mib == 0 {
        "mode=0755".to_string()
    } else {
        format!("mode=0755,size={size_mib}m")
    };
    mount_fs(
        "tmpfs",
        &d,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
}

/// Kills every process, syncs and powers off. In a VM the machine stops; as PID 1 of a pid
/// namespace the kernel ends the namespace. Never returns.
pub fn power_off() -> ! {
    use nix::sys::signal::{kill, Signal};
    // As PID 1, kill(-1) reaches everything in our pid namespace except ourselves.
    let _ = kill(nix::unistd::Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // Only reached when reboot(2) is not allowed (no CAP_SYS_BOOT): exiting PID 1 ends the
    // namespace just the same.
    tracing::warn!(error = ?err, "power off failed; exiting");
    std::process::exit(0)
}

/// Guest-physical address of the VMM's boot-timer page (`hive-box`'s
/// `vmm::boottimer::BOOT_TIMER_ADDR`): PID 1 writes a byte there at each boot milestone.
pub const BOOT_TIMER_ADDR: u64 = 0xd800_0000;
/// The boot-timer marks: init started, cell daemon ready.
pub const BOOT_MARK_INIT: u8 = 1;
pub const BOOT_MARK_READY: u8 = 2;

/// Writes `value` to the VMM's boot timer (Firecracker's method: the VMM timestamps the write
/// from its own start), through a one-page mapping of /dev/mem (reads and writes of /dev/mem
/// stop at the end of RAM; mappings do not). Best effort: without /dev/mem (a sandbox, a kernel
/// without CONFIG_DEVMEM) or the device, nothing happens; under another VMM the write goes to
/// unassigned memory and is dropped.
pub fn boot_mark(value: u8) {
    use std::os::fd::AsRawFd;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mem")
    {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(error = %e, "boot timer: open /dev/mem");
            return;
        }
    };
    // SAFETY: a fresh shared mapping of one page of /dev/mem at a page-aligned offset; the
    // kernel chooses the address, nothing else refers to it, and it is unmapped below.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            BOOT_TIMER_ADDR as libc::off_t,
        )
    };
    if page == libc::MAP_FAILED {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "boot timer: map the boot-timer page"
        );
        return;
    }
    // SAFETY: `page` is a writable mapping of at least one byte made above; the volatile write
    // is the device access itself (an MMIO exit to the VMM).
    unsafe { std::ptr::write_volatile(page.cast::<u8>(), value) };
    // SAFETY: unmaps exactly the mapping made above, which nothing else uses.
    unsafe { libc::munmap(page, 4096) };
}
