//! The VMM process's own seccomp allow-list, installed once the VM is built.
//!
//! Everything that needs a path, a new device or a new mapping of host resources is done before
//! (open the kernel, disks, TAP, sockets, KVM fds, threads); what is left for the run is I/O on
//! fds already open, memory management, threads waiting and waking, and Unix sockets for vsock.
//! `ioctl` is limited to KVM_RUN, KVM_GET_REGS/SREGS (read for a shutdown's log) and FIONBIO. Anything else kills the process: the box daemon
//! sees the VMM die and destroys the cell. This sits on top of the jail's namespaces, cgroup and
//! deny-list, as Firecracker's per-VMM filters sit inside its jailer.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors building or installing the filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The rules did not compile.
    #[error("build VMM seccomp filter: {0}")]
    Build(String),
    /// seccomp(2) refused it.
    #[error("install VMM seccomp filter on all threads")]
    Install(#[source] seccompiler::Error),
}

const KVM_RUN: u64 = 0xae80;
/// `_IOR(KVMIO, nr, T)`: read-only KVM vCPU ioctls.
const fn kvm_ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}
/// Read when a vCPU shuts down, to log where it was (reading state changes nothing).
const KVM_GET_REGS: u64 = kvm_ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>());
const KVM_GET_SREGS: u64 = kvm_ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>());
const FIONBIO: u64 = 0x5421;

/// Syscalls allowed with any arguments.
const ALLOWED: &[(&str, libc::c_long)] = &[
    ("read", libc::SYS_read),
    ("write", libc::SYS_write),
    ("readv", libc::SYS_readv),
    ("writev", libc::SYS_writev),
    ("pread64", libc::SYS_pread64),
    ("pwrite64", libc::SYS_pwrite64),
    ("lseek", libc::SYS_lseek),
    ("close", libc::SYS_close),
    ("fsync", libc::SYS_fsync),
    ("fdatasync", libc::SYS_fdatasync),
    ("fcntl", libc::SYS_fcntl),
    ("poll", libc::SYS_poll),
    ("ppoll", libc::SYS_ppoll),
    ("futex", libc::SYS_futex),
    ("sched_yield", libc::SYS_sched_yield),
    ("nanosleep", libc::SYS_nanosleep),
    ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("clock_gettime", libc::SYS_clock_gettime),
    ("gettimeofday", libc::SYS_gettimeofday),
    ("mmap", libc::SYS_mmap),
    ("munmap", libc::SYS_munmap),
    ("mremap", libc::SYS_mremap),
    ("madvise", libc::SYS_madvise),
    ("mprotect", libc::SYS_mprotect),
    ("mincore", libc::SYS_mincore),
    ("brk", libc::SYS_brk),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("rt_sigtimedwait", libc::SYS_rt_sigtimedwait),
    ("sigaltstack", libc::SYS_sigaltstack),
    ("tgkill", libc::SYS_tgkill),
    ("getpid", libc::SYS_getpid),
    ("gettid", libc::SYS_gettid),
    ("exit", libc::SYS_exit),
    ("exit_group", libc::SYS_exit_group),
    ("restart_syscall", libc::SYS_restart_syscall),
    ("getrandom", libc::SYS_getrandom),
    // vsock: accept host connections, connect guest connections to `<uds>_PORT`.
    ("accept4", libc::SYS_accept4),
    ("connect", libc::SYS_connect),
    ("recvfrom", libc::SYS_recvfrom),
    ("sendto", libc::SYS_sendto),
    ("recvmsg", libc::SYS_recvmsg),
    ("sendmsg", libc::SYS_sendmsg),
    ("shutdown", libc::SYS_shutdown),
];

fn cond(arg: u8, value: u64) -> Result<SeccompCondition, Error> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .map_err(|e| Error::Build(e.to_string()))
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, Error> {
    SeccompRule::new(conds).map_err(|e| Error::Build(e.to_string()))
}

/// Compiles the allow-list; anything else kills the process.
pub fn program() -> Result<BpfProgram, Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|(_, nr)| (*nr, Vec::new())).collect();
    rules.insert(
        libc::SYS_ioctl,
        vec![
            rule(vec![cond(1, KVM_RUN)?])?,
            rule(vec![cond(1, KVM_GET_REGS)?])?,
            rule(vec![cond(1, KVM_GET_SREGS)?])?,
            rule(vec![cond(1, FIONBIO)?])?,
        ],
    );
    // Only Unix sockets (guest-initiated vsock connections).
    rules.insert(
        libc::SYS_socket,
        vec![rule(vec![cond(0, libc::AF_UNIX as u64)?])?],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| Error::Build(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Build(e.to_string()))
}

/// Installs the allow-list on every thread of this process (TSYNC), with no-new-privileges.
///
/// Every thread must have finished starting first: a thread still in its start-up (glibc's
/// `rseq` and `set_robust_list` registration, its signal mask; std's thread name and alternate
/// signal stack) would make syscalls the list does not allow, and the whole process would be
/// killed with SIGSYS, only on the runs where that thread was scheduled late. The builder gates
/// its own threads; `hive-box vmm` waits for its signal thread.
pub fn install() -> Result<(), Error> {
    let prog = program()?;
    seccompiler::apply_filter_all_threads(&prog).map_err(Error::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_reads_have_the_kernel_ioctl_numbers() {
        // From <linux/kvm.h> on x86_64.
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
    }

    #[test]
    fn allow_list_compiles() {
        let p = program().expect("compiles");
        assert!(
            p.len() > ALLOWED.len(),
            "one or more instructions per allowed syscall"
        );
    }

    #[test]
    fn filter_kills_a_forbidden_syscall_and_allows_the_rest() {
        // In a forked child (seccomp is per process tree, the test harness must not get it).
        // The program is built before fork: the child must not allocate.
        let prog = program().expect("program");
        // SAFETY: the child only makes raw syscalls and _exit()s; no locks are taken after fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if seccompiler::apply_filter(&prog).is_err() {
                // SAFETY: terminating the forked child.
                unsafe { libc::_exit(10) };
            }
            // Allowed: getpid. Forbidden: openat (any path).
            // SAFETY: raw syscalls with valid arguments.
            unsafe {
                libc::syscall(libc::SYS_getpid);
                libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    c"/etc/hostname".as_ptr(),
                    libc::O_RDONLY,
                );
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFSIGNALED(status),
            "child should be killed, status {status:#x}"
        );
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }
}
