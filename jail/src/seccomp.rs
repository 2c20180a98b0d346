//! The seccomp profile every jailed process gets: a deny-list applied by the jail recipe
//! ([`crate::recipe`]) just before exec. The VMM adds its own allow-list on top once its VM is
//! built (`hive_vmm::seccomp`); that one belongs with the VMM, which knows its syscalls.

/// Syscalls a cell never needs and that reach the shared kernel's most sensitive state.
/// Denied with EPERM (not a kill) so well-behaved programs that probe for them keep working.
pub const DENIED_SYSCALLS: &[(&str, i64)] = &[
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("settimeofday", libc::SYS_settimeofday),
    ("adjtimex", libc::SYS_adjtimex),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("vhangup", libc::SYS_vhangup),
    ("fanotify_init", libc::SYS_fanotify_init),
    ("syslog", libc::SYS_syslog),
];

/// The compiled deny-list (every other syscall allowed).
pub fn deny_list() -> Result<seccompiler::BpfProgram, seccompiler::BackendError> {
    let rules = DENIED_SYSCALLS
        .iter()
        .map(|(_, nr)| (*nr, Vec::new()))
        .collect();
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        seccompiler::TargetArch::x86_64,
    )?;
    filter.try_into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_list_compiles() {
        let p = deny_list().unwrap();
        assert!(p.len() > DENIED_SYSCALLS.len());
    }

    /// The filter really denies: applied on a throw-away thread (seccomp and no_new_privs are
    /// per thread without TSYNC), denied calls fail with EPERM and others still work.
    #[test]
    fn seccomp_filter_denies_with_eperm() {
        let program = deny_list().unwrap();
        let res = std::thread::spawn(move || {
            // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integers only.
            let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            assert_eq!(rc, 0);
            seccompiler::apply_filter(&program).unwrap();
            let mut out = Vec::new();
            for nr in [libc::SYS_keyctl, libc::SYS_bpf, libc::SYS_userfaultfd] {
                // SAFETY: raw syscalls with zero arguments; the filter answers before the kernel
                // looks at them.
                let rc = unsafe { libc::syscall(nr, 0, 0, 0, 0, 0) };
                out.push((rc, std::io::Error::last_os_error().raw_os_error()));
            }
            // SAFETY: getpid has no arguments and cannot fail.
            let pid = unsafe { libc::syscall(libc::SYS_getpid) };
            (out, pid)
        })
        .join()
        .unwrap();
        for (rc, errno) in res.0 {
            assert_eq!((rc, errno), (-1, Some(libc::EPERM)));
        }
        assert_eq!(res.1, i64::from(std::process::id() as i32));
    }
}
