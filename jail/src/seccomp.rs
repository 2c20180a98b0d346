//! Seccomp profiles.
//!
//! - [`deny_list`]: what a microVM cell's jail gets before the VMM (which then adds its own
//!   allow-list, `hive_vmm::seccomp`, once its VM is built).
//! - [`cell_daemon`]: a sandbox cell daemon's allow-list. Everything its build steps run inherits
//!   it too (filters stack and cannot be removed), so it is the list of what any build may ever
//!   call: the ordinary Linux userland's system calls, the namespace and mount calls the daemon
//!   needs for the build container, and nothing that reaches the box's kernel-wide state (modules,
//!   kexec, bpf, perf, keyrings, clocks, swap, io_uring, the new mount API, ...). Unknown calls fail
//!   with ENOSYS, so programs probing newer calls fall back; calls of another ABI (x32, i386)
//!   are not in the list and fail too.
//! - [`step`]: stacked on that for each build step: no mount or namespace call at all, no
//!   clone with a namespace flag, no ptrace attach to a process that is not one's child, no
//!   access to other processes' memory. clone3 answers ENOSYS so the C library falls back to
//!   clone, whose flags a filter can see.
//!
//! The jail recipe ([`crate::recipe`]) installs the first two just before exec; the cell daemon
//! installs [`step`] in each step's process.

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

/// Allow-list entries: every syscall a sandbox cell (daemon and builds) may make.
macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), sys::$name)),*]
    };
}

/// Syscall numbers by name (x86_64).
#[allow(non_upper_case_globals)]
mod sys {
    macro_rules! nr {
        ($($name:ident),* $(,)?) => { $(pub const $name: i64 = libc_nr::$name;)* };
    }
    mod libc_nr {
        pub use libc::{
            SYS_accept as accept, SYS_accept4 as accept4, SYS_access as access, SYS_alarm as alarm,
            SYS_arch_prctl as arch_prctl, SYS_bind as bind, SYS_brk as brk, SYS_capget as capget,
            SYS_capset as capset, SYS_chdir as chdir, SYS_chmod as chmod, SYS_chown as chown,
            SYS_chroot as chroot, SYS_clock_getres as clock_getres,
            SYS_clock_gettime as clock_gettime, SYS_clock_nanosleep as clock_nanosleep,
            SYS_clone as clone, SYS_clone3 as clone3, SYS_close as close,
            SYS_close_range as close_range, SYS_connect as connect,
            SYS_copy_file_range as copy_file_range, SYS_creat as creat, SYS_dup as dup,
            SYS_dup2 as dup2, SYS_dup3 as dup3, SYS_epoll_create as epoll_create,
            SYS_epoll_create1 as epoll_create1, SYS_epoll_ctl as epoll_ctl,
            SYS_epoll_pwait as epoll_pwait, SYS_epoll_pwait2 as epoll_pwait2,
            SYS_epoll_wait as epoll_wait, SYS_eventfd as eventfd, SYS_eventfd2 as eventfd2,
            SYS_execve as execve, SYS_execveat as execveat, SYS_exit as exit,
            SYS_exit_group as exit_group, SYS_faccessat as faccessat, SYS_faccessat2 as faccessat2,
            SYS_fadvise64 as fadvise64, SYS_fallocate as fallocate, SYS_fchdir as fchdir,
            SYS_fchmod as fchmod, SYS_fchmodat as fchmodat, SYS_fchown as fchown,
            SYS_fchownat as fchownat, SYS_fcntl as fcntl, SYS_fdatasync as fdatasync,
            SYS_fgetxattr as fgetxattr, SYS_flistxattr as flistxattr, SYS_flock as flock,
            SYS_fork as fork, SYS_fremovexattr as fremovexattr, SYS_fsconfig as fsconfig,
            SYS_fsetxattr as fsetxattr, SYS_fsmount as fsmount, SYS_fsopen as fsopen,
            SYS_fspick as fspick, SYS_fstat as fstat, SYS_fstatfs as fstatfs, SYS_fsync as fsync,
            SYS_ftruncate as ftruncate, SYS_futex as futex, SYS_futex_waitv as futex_waitv,
            SYS_futimesat as futimesat, SYS_get_mempolicy as get_mempolicy,
            SYS_get_robust_list as get_robust_list, SYS_getcpu as getcpu, SYS_getcwd as getcwd,
            SYS_getdents as getdents, SYS_getdents64 as getdents64, SYS_getegid as getegid,
            SYS_geteuid as geteuid, SYS_getgid as getgid, SYS_getgroups as getgroups,
            SYS_getitimer as getitimer, SYS_getpeername as getpeername, SYS_getpgid as getpgid,
            SYS_getpgrp as getpgrp, SYS_getpid as getpid, SYS_getppid as getppid,
            SYS_getpriority as getpriority, SYS_getrandom as getrandom, SYS_getresgid as getresgid,
            SYS_getresuid as getresuid, SYS_getrlimit as getrlimit, SYS_getrusage as getrusage,
            SYS_getsid as getsid, SYS_getsockname as getsockname, SYS_getsockopt as getsockopt,
            SYS_gettid as gettid, SYS_gettimeofday as gettimeofday, SYS_getuid as getuid,
            SYS_getxattr as getxattr, SYS_inotify_add_watch as inotify_add_watch,
            SYS_inotify_init as inotify_init, SYS_inotify_init1 as inotify_init1,
            SYS_inotify_rm_watch as inotify_rm_watch, SYS_io_cancel as io_cancel,
            SYS_io_destroy as io_destroy, SYS_io_getevents as io_getevents,
            SYS_io_setup as io_setup, SYS_io_submit as io_submit,
            SYS_io_uring_enter as io_uring_enter, SYS_io_uring_register as io_uring_register,
            SYS_io_uring_setup as io_uring_setup, SYS_ioctl as ioctl, SYS_ioprio_get as ioprio_get,
            SYS_ioprio_set as ioprio_set, SYS_kcmp as kcmp, SYS_kill as kill,
            SYS_landlock_add_rule as landlock_add_rule,
            SYS_landlock_create_ruleset as landlock_create_ruleset,
            SYS_landlock_restrict_self as landlock_restrict_self, SYS_lchown as lchown,
            SYS_lgetxattr as lgetxattr, SYS_link as link, SYS_linkat as linkat,
            SYS_listen as listen, SYS_listxattr as listxattr, SYS_llistxattr as llistxattr,
            SYS_lremovexattr as lremovexattr, SYS_lseek as lseek, SYS_lsetxattr as lsetxattr,
            SYS_lstat as lstat, SYS_madvise as madvise, SYS_mbind as mbind,
            SYS_membarrier as membarrier, SYS_memfd_create as memfd_create, SYS_mincore as mincore,
            SYS_mkdir as mkdir, SYS_mkdirat as mkdirat, SYS_mknod as mknod, SYS_mknodat as mknodat,
            SYS_mlock as mlock, SYS_mlock2 as mlock2, SYS_mlockall as mlockall, SYS_mmap as mmap,
            SYS_mount as mount, SYS_mount_setattr as mount_setattr, SYS_move_mount as move_mount,
            SYS_mprotect as mprotect, SYS_mq_getsetattr as mq_getsetattr,
            SYS_mq_notify as mq_notify, SYS_mq_open as mq_open,
            SYS_mq_timedreceive as mq_timedreceive, SYS_mq_timedsend as mq_timedsend,
            SYS_mq_unlink as mq_unlink, SYS_mremap as mremap, SYS_msgctl as msgctl,
            SYS_msgget as msgget, SYS_msgrcv as msgrcv, SYS_msgsnd as msgsnd, SYS_msync as msync,
            SYS_munlock as munlock, SYS_munlockall as munlockall, SYS_munmap as munmap,
            SYS_nanosleep as nanosleep, SYS_newfstatat as newfstatat, SYS_open as open,
            SYS_open_tree as open_tree, SYS_openat as openat, SYS_openat2 as openat2,
            SYS_pause as pause, SYS_personality as personality, SYS_pidfd_open as pidfd_open,
            SYS_pidfd_send_signal as pidfd_send_signal, SYS_pipe as pipe, SYS_pipe2 as pipe2,
            SYS_pivot_root as pivot_root, SYS_pkey_alloc as pkey_alloc, SYS_pkey_free as pkey_free,
            SYS_pkey_mprotect as pkey_mprotect, SYS_poll as poll, SYS_ppoll as ppoll,
            SYS_prctl as prctl, SYS_pread64 as pread64, SYS_preadv as preadv,
            SYS_preadv2 as preadv2, SYS_prlimit64 as prlimit64,
            SYS_process_madvise as process_madvise, SYS_process_vm_readv as process_vm_readv,
            SYS_process_vm_writev as process_vm_writev, SYS_pselect6 as pselect6,
            SYS_ptrace as ptrace, SYS_pwrite64 as pwrite64, SYS_pwritev as pwritev,
            SYS_pwritev2 as pwritev2, SYS_read as read, SYS_readahead as readahead,
            SYS_readlink as readlink, SYS_readlinkat as readlinkat, SYS_readv as readv,
            SYS_recvfrom as recvfrom, SYS_recvmmsg as recvmmsg, SYS_recvmsg as recvmsg,
            SYS_remap_file_pages as remap_file_pages, SYS_removexattr as removexattr,
            SYS_rename as rename, SYS_renameat as renameat, SYS_renameat2 as renameat2,
            SYS_restart_syscall as restart_syscall, SYS_rmdir as rmdir, SYS_rseq as rseq,
            SYS_rt_sigaction as rt_sigaction, SYS_rt_sigpending as rt_sigpending,
            SYS_rt_sigprocmask as rt_sigprocmask, SYS_rt_sigqueueinfo as rt_sigqueueinfo,
            SYS_rt_sigreturn as rt_sigreturn, SYS_rt_sigsuspend as rt_sigsuspend,
            SYS_rt_sigtimedwait as rt_sigtimedwait, SYS_rt_tgsigqueueinfo as rt_tgsigqueueinfo,
            SYS_sched_get_priority_max as sched_get_priority_max,
            SYS_sched_get_priority_min as sched_get_priority_min,
            SYS_sched_getaffinity as sched_getaffinity, SYS_sched_getattr as sched_getattr,
            SYS_sched_getparam as sched_getparam, SYS_sched_getscheduler as sched_getscheduler,
            SYS_sched_rr_get_interval as sched_rr_get_interval,
            SYS_sched_setaffinity as sched_setaffinity, SYS_sched_setattr as sched_setattr,
            SYS_sched_setparam as sched_setparam, SYS_sched_setscheduler as sched_setscheduler,
            SYS_sched_yield as sched_yield, SYS_seccomp as seccomp, SYS_select as select,
            SYS_semctl as semctl, SYS_semget as semget, SYS_semop as semop,
            SYS_semtimedop as semtimedop, SYS_sendfile as sendfile, SYS_sendmmsg as sendmmsg,
            SYS_sendmsg as sendmsg, SYS_sendto as sendto, SYS_set_mempolicy as set_mempolicy,
            SYS_set_robust_list as set_robust_list, SYS_set_tid_address as set_tid_address,
            SYS_setdomainname as setdomainname, SYS_setfsgid as setfsgid, SYS_setfsuid as setfsuid,
            SYS_setgid as setgid, SYS_setgroups as setgroups, SYS_sethostname as sethostname,
            SYS_setitimer as setitimer, SYS_setns as setns, SYS_setpgid as setpgid,
            SYS_setpriority as setpriority, SYS_setregid as setregid, SYS_setresgid as setresgid,
            SYS_setresuid as setresuid, SYS_setreuid as setreuid, SYS_setrlimit as setrlimit,
            SYS_setsid as setsid, SYS_setsockopt as setsockopt, SYS_setuid as setuid,
            SYS_setxattr as setxattr, SYS_shmat as shmat, SYS_shmctl as shmctl, SYS_shmdt as shmdt,
            SYS_shmget as shmget, SYS_shutdown as shutdown, SYS_sigaltstack as sigaltstack,
            SYS_signalfd as signalfd, SYS_signalfd4 as signalfd4, SYS_socket as socket,
            SYS_socketpair as socketpair, SYS_splice as splice, SYS_stat as stat,
            SYS_statfs as statfs, SYS_statx as statx, SYS_symlink as symlink,
            SYS_symlinkat as symlinkat, SYS_sync as sync, SYS_sync_file_range as sync_file_range,
            SYS_syncfs as syncfs, SYS_sysinfo as sysinfo, SYS_tee as tee, SYS_tgkill as tgkill,
            SYS_time as time, SYS_timer_create as timer_create, SYS_timer_delete as timer_delete,
            SYS_timer_getoverrun as timer_getoverrun, SYS_timer_gettime as timer_gettime,
            SYS_timer_settime as timer_settime, SYS_timerfd_create as timerfd_create,
            SYS_timerfd_gettime as timerfd_gettime, SYS_timerfd_settime as timerfd_settime,
            SYS_times as times, SYS_tkill as tkill, SYS_truncate as truncate, SYS_umask as umask,
            SYS_umount2 as umount2, SYS_uname as uname, SYS_unlink as unlink,
            SYS_unlinkat as unlinkat, SYS_unshare as unshare, SYS_utime as utime,
            SYS_utimensat as utimensat, SYS_utimes as utimes, SYS_vfork as vfork,
            SYS_vmsplice as vmsplice, SYS_wait4 as wait4, SYS_waitid as waitid, SYS_write as write,
            SYS_writev as writev,
        };
    }
    nr!(
        accept,
        accept4,
        access,
        alarm,
        arch_prctl,
        bind,
        brk,
        capget,
        capset,
        chdir,
        chmod,
        chown,
        chroot,
        clock_getres,
        clock_gettime,
        clock_nanosleep,
        clone,
        clone3,
        close,
        close_range,
        connect,
        copy_file_range,
        creat,
        dup,
        dup2,
        dup3,
        epoll_create,
        epoll_create1,
        epoll_ctl,
        epoll_pwait,
        epoll_pwait2,
        epoll_wait,
        eventfd,
        eventfd2,
        execve,
        execveat,
        exit,
        exit_group,
        faccessat,
        faccessat2,
        fadvise64,
        fallocate,
        fchdir,
        fchmod,
        fchmodat,
        fchown,
        fchownat,
        fcntl,
        fdatasync,
        fgetxattr,
        flistxattr,
        flock,
        fork,
        fremovexattr,
        fsetxattr,
        fstat,
        fstatfs,
        fsync,
        ftruncate,
        futex,
        futimesat,
        get_mempolicy,
        get_robust_list,
        getcpu,
        getcwd,
        getdents,
        getdents64,
        getegid,
        geteuid,
        getgid,
        getgroups,
        getitimer,
        getpeername,
        getpgid,
        getpgrp,
        getpid,
        getppid,
        getpriority,
        getrandom,
        getresgid,
        getresuid,
        getrlimit,
        getrusage,
        getsid,
        getsockname,
        getsockopt,
        gettid,
        gettimeofday,
        getuid,
        getxattr,
        inotify_add_watch,
        inotify_init,
        inotify_init1,
        inotify_rm_watch,
        io_cancel,
        io_destroy,
        io_getevents,
        io_setup,
        io_submit,
        ioctl,
        ioprio_get,
        ioprio_set,
        kcmp,
        kill,
        lchown,
        lgetxattr,
        link,
        linkat,
        listen,
        listxattr,
        llistxattr,
        lremovexattr,
        lseek,
        lsetxattr,
        lstat,
        madvise,
        mbind,
        membarrier,
        memfd_create,
        mincore,
        mkdir,
        mkdirat,
        mknod,
        mknodat,
        mlock,
        mlock2,
        mlockall,
        mmap,
        mount,
        mprotect,
        mq_getsetattr,
        mq_notify,
        mq_open,
        mq_timedreceive,
        mq_timedsend,
        mq_unlink,
        mremap,
        msgctl,
        msgget,
        msgrcv,
        msgsnd,
        msync,
        munlock,
        munlockall,
        munmap,
        nanosleep,
        newfstatat,
        open,
        openat,
        openat2,
        pause,
        personality,
        pidfd_open,
        pidfd_send_signal,
        pipe,
        pipe2,
        pivot_root,
        pkey_alloc,
        pkey_free,
        pkey_mprotect,
        poll,
        ppoll,
        prctl,
        pread64,
        preadv,
        preadv2,
        prlimit64,
        process_vm_readv,
        process_vm_writev,
        pselect6,
        ptrace,
        pwrite64,
        pwritev,
        pwritev2,
        read,
        readahead,
        readlink,
        readlinkat,
        readv,
        recvfrom,
        recvmmsg,
        recvmsg,
        remap_file_pages,
        removexattr,
        rename,
        renameat,
        renameat2,
        restart_syscall,
        rmdir,
        rseq,
        rt_sigaction,
        rt_sigpending,
        rt_sigprocmask,
        rt_sigqueueinfo,
        rt_sigreturn,
        rt_sigsuspend,
        rt_sigtimedwait,
        rt_tgsigqueueinfo,
        sched_get_priority_max,
        sched_get_priority_min,
        sched_getaffinity,
        sched_getattr,
        sched_getparam,
        sched_getscheduler,
        sched_rr_get_interval,
        sched_setaffinity,
        sched_setattr,
        sched_setparam,
        sched_setscheduler,
        sched_yield,
        seccomp,
        select,
        semctl,
        semget,
        semop,
        semtimedop,
        sendfile,
        sendmmsg,
        sendmsg,
        sendto,
        set_mempolicy,
        set_robust_list,
        set_tid_address,
        setdomainname,
        setfsgid,
        setfsuid,
        setgid,
        setgroups,
        sethostname,
        setitimer,
        setns,
        setpgid,
        setpriority,
        setregid,
        setresgid,
        setresuid,
        setreuid,
        setrlimit,
        setsid,
        setsockopt,
        setuid,
        setxattr,
        shmat,
        shmctl,
        shmdt,
        shmget,
        shutdown,
        sigaltstack,
        signalfd,
        signalfd4,
        socket,
        socketpair,
        splice,
        stat,
        statfs,
        statx,
        symlink,
        symlinkat,
        sync,
        sync_file_range,
        syncfs,
        sysinfo,
        tee,
        tgkill,
        time,
        timer_create,
        timer_delete,
        timer_getoverrun,
        timer_gettime,
        timer_settime,
        timerfd_create,
        timerfd_gettime,
        timerfd_settime,
        times,
        tkill,
        truncate,
        umask,
        umount2,
        uname,
        unlink,
        unlinkat,
        unshare,
        utime,
        utimensat,
        utimes,
        vfork,
        vmsplice,
        wait4,
        waitid,
        write,
        writev,
        landlock_create_ruleset,
        landlock_add_rule,
        landlock_restrict_self,
        process_madvise,
        futex_waitv,
        fsopen,
        fsconfig,
        fsmount,
        fspick,
        open_tree,
        move_mount,
        mount_setattr,
        io_uring_setup,
        io_uring_enter,
        io_uring_register,
    );
}

/// What a sandbox cell daemon and everything it starts may call (see the module docs). Not in
/// it, among others: kexec_*, *_module, bpf, perf_event_open, keyctl, add_key, request_key,
/// open_by_handle_at, name_to_handle_at, userfaultfd, swapon/off, reboot, acct, quotactl,
/// syslog, iopl/ioperm, clock and time setting, the new mount API (fsopen, fsmount,
/// open_tree, move_mount, mount_setattr, ...), io_uring, lookup_dcookie, fanotify, vhangup.
pub const CELL_DAEMON_ALLOWED: &[(&str, i64)] = syscalls!(
    accept,
    accept4,
    access,
    alarm,
    arch_prctl,
    bind,
    brk,
    capget,
    capset,
    chdir,
    chmod,
    chown,
    chroot,
    clock_getres,
    clock_gettime,
    clock_nanosleep,
    clone,
    clone3,
    close,
    close_range,
    connect,
    copy_file_range,
    creat,
    dup,
    dup2,
    dup3,
    epoll_create,
    epoll_create1,
    epoll_ctl,
    epoll_pwait,
    epoll_pwait2,
    epoll_wait,
    eventfd,
    eventfd2,
    execve,
    execveat,
    exit,
    exit_group,
    faccessat,
    faccessat2,
    fadvise64,
    fallocate,
    fchdir,
    fchmod,
    fchmodat,
    fchown,
    fchownat,
    fcntl,
    fdatasync,
    fgetxattr,
    flistxattr,
    flock,
    fork,
    fremovexattr,
    fsetxattr,
    fstat,
    fstatfs,
    fsync,
    ftruncate,
    futex,
    futimesat,
    get_mempolicy,
    get_robust_list,
    getcpu,
    getcwd,
    getdents,
    getdents64,
    getegid,
    geteuid,
    getgid,
    getgroups,
    getitimer,
    getpeername,
    getpgid,
    getpgrp,
    getpid,
    getppid,
    getpriority,
    getrandom,
    getresgid,
    getresuid,
    getrlimit,
    getrusage,
    getsid,
    getsockname,
    getsockopt,
    gettid,
    gettimeofday,
    getuid,
    getxattr,
    inotify_add_watch,
    inotify_init,
    inotify_init1,
    inotify_rm_watch,
    io_cancel,
    io_destroy,
    io_getevents,
    io_setup,
    io_submit,
    ioctl,
    ioprio_get,
    ioprio_set,
    kcmp,
    kill,
    lchown,
    lgetxattr,
    link,
    linkat,
    listen,
    listxattr,
    llistxattr,
    lremovexattr,
    lseek,
    lsetxattr,
    lstat,
    madvise,
    mbind,
    membarrier,
    memfd_create,
    mincore,
    mkdir,
    mkdirat,
    mknod,
    mknodat,
    mlock,
    mlock2,
    mlockall,
    mmap,
    mount,
    mprotect,
    mq_getsetattr,
    mq_notify,
    mq_open,
    mq_timedreceive,
    mq_timedsend,
    mq_unlink,
    mremap,
    msgctl,
    msgget,
    msgrcv,
    msgsnd,
    msync,
    munlock,
    munlockall,
    munmap,
    nanosleep,
    newfstatat,
    open,
    openat,
    openat2,
    pause,
    personality,
    pidfd_open,
    pidfd_send_signal,
    pipe,
    pipe2,
    pivot_root,
    pkey_alloc,
    pkey_free,
    pkey_mprotect,
    poll,
    ppoll,
    prctl,
    pread64,
    preadv,
    preadv2,
    prlimit64,
    process_vm_readv,
    process_vm_writev,
    pselect6,
    ptrace,
    pwrite64,
    pwritev,
    pwritev2,
    read,
    readahead,
    readlink,
    readlinkat,
    readv,
    recvfrom,
    recvmmsg,
    recvmsg,
    remap_file_pages,
    removexattr,
    rename,
    renameat,
    renameat2,
    restart_syscall,
    rmdir,
    rseq,
    rt_sigaction,
    rt_sigpending,
    rt_sigprocmask,
    rt_sigqueueinfo,
    rt_sigreturn,
    rt_sigsuspend,
    rt_sigtimedwait,
    rt_tgsigqueueinfo,
    sched_get_priority_max,
    sched_get_priority_min,
    sched_getaffinity,
    sched_getattr,
    sched_getparam,
    sched_getscheduler,
    sched_rr_get_interval,
    sched_setaffinity,
    sched_setattr,
    sched_setparam,
    sched_setscheduler,
    sched_yield,
    seccomp,
    select,
    semctl,
    semget,
    semop,
    semtimedop,
    sendfile,
    sendmmsg,
    sendmsg,
    sendto,
    set_mempolicy,
    set_robust_list,
    set_tid_address,
    setdomainname,
    setfsgid,
    setfsuid,
    setgid,
    setgroups,
    sethostname,
    setitimer,
    setns,
    setpgid,
    setpriority,
    setregid,
    setresgid,
    setresuid,
    setreuid,
    setrlimit,
    setsid,
    setsockopt,
    setuid,
    setxattr,
    shmat,
    shmctl,
    shmdt,
    shmget,
    shutdown,
    sigaltstack,
    signalfd,
    signalfd4,
    socket,
    socketpair,
    splice,
    stat,
    statfs,
    statx,
    symlink,
    symlinkat,
    sync,
    sync_file_range,
    syncfs,
    sysinfo,
    tee,
    tgkill,
    time,
    timer_create,
    timer_delete,
    timer_getoverrun,
    timer_gettime,
    timer_settime,
    timerfd_create,
    timerfd_gettime,
    timerfd_settime,
    times,
    tkill,
    truncate,
    umask,
    umount2,
    uname,
    unlink,
    unlinkat,
    unshare,
    utime,
    utimensat,
    utimes,
    vfork,
    vmsplice,
    wait4,
    waitid,
    write,
    writev,
    landlock_create_ruleset,
    landlock_add_rule,
    landlock_restrict_self,
    process_madvise,
    futex_waitv,
);

/// Calls a build step may never make, on top of [`CELL_DAEMON_ALLOWED`] (EPERM).
pub const STEP_DENIED: &[(&str, i64)] = syscalls!(
    mount,
    umount2,
    pivot_root,
    chroot,
    setns,
    unshare,
    fsopen,
    fsconfig,
    fsmount,
    fspick,
    open_tree,
    move_mount,
    mount_setattr,
    process_vm_readv,
    process_vm_writev,
    sethostname,
    setdomainname,
    io_uring_setup,
    io_uring_enter,
    io_uring_register,
);

/// Namespace flags a step's clone may not carry.
const CLONE_NS_FLAGS: [u64; 7] = [
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// ptrace requests that take hold of a running process (a step may still trace its own
/// children, which ask for it with PTRACE_TRACEME).
const PTRACE_TAKE: [u64; 2] = [libc::PTRACE_ATTACH as u64, libc::PTRACE_SEIZE as u64];

fn compile(
    rules: std::collections::BTreeMap<i64, Vec<seccompiler::SeccompRule>>,
    mismatch: seccompiler::SeccompAction,
    matched: seccompiler::SeccompAction,
) -> Result<seccompiler::BpfProgram, seccompiler::BackendError> {
    seccompiler::SeccompFilter::new(rules, mismatch, matched, seccompiler::TargetArch::x86_64)?
        .try_into()
}

/// clone3 answers ENOSYS (stacked on the allow-list): the C library then uses clone, whose
/// flags the step filter can see (clone3 passes them in memory, out of a filter's reach).
fn no_clone3() -> Result<seccompiler::BpfProgram, seccompiler::BackendError> {
    compile(
        [(sys::clone3, Vec::new())].into_iter().collect(),
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::ENOSYS as u32),
    )
}

/// The sandbox cell daemon's filters, in the order to install them: the allow-list, then
/// clone3 -> ENOSYS.
pub fn cell_daemon() -> Result<Vec<seccompiler::BpfProgram>, seccompiler::BackendError> {
    let allowed = compile(
        CELL_DAEMON_ALLOWED
            .iter()
            .map(|(_, nr)| (*nr, Vec::new()))
            .collect(),
        seccompiler::SeccompAction::Errno(libc::ENOSYS as u32),
        seccompiler::SeccompAction::Allow,
    )?;
    Ok(vec![allowed, no_clone3()?])
}

/// A build step's filters, installed on top of the cell daemon's (or alone, in a microVM
/// guest): the step denials, then clone3 -> ENOSYS.
pub fn step() -> Result<Vec<seccompiler::BpfProgram>, seccompiler::BackendError> {
    use seccompiler::{SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond};
    let rule = |conds: Vec<Cond>| seccompiler::SeccompRule::new(conds);
    let mut rules: std::collections::BTreeMap<i64, Vec<seccompiler::SeccompRule>> = STEP_DENIED
        .iter()
        .chain(DENIED_SYSCALLS)
        .map(|(_, nr)| (*nr, Vec::new()))
        .collect();
    let clone_rules = CLONE_NS_FLAGS
        .iter()
        .map(|f| rule(vec![Cond::new(0, Len::Qword, Op::MaskedEq(*f), *f)?]))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(sys::clone, clone_rules);
    let ptrace_rules = PTRACE_TAKE
        .iter()
        .map(|r| rule(vec![Cond::new(0, Len::Qword, Op::Eq, *r)?]))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(sys::ptrace, ptrace_rules);
    let denied = compile(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
    )?;
    Ok(vec![denied, no_clone3()?])
}

/// Installs `filters` on the calling thread, in order (no_new_privs must be set).
pub fn install(filters: &[seccompiler::BpfProgram]) -> Result<(), seccompiler::Error> {
    for f in filters {
        seccompiler::apply_filter(f)?;
    }
    Ok(())
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

    #[test]
    fn profiles_compile_and_lists_do_not_overlap() {
        assert_eq!(cell_daemon().unwrap().len(), 2);
        assert_eq!(step().unwrap().len(), 2);
        for (name, nr) in DENIED_SYSCALLS {
            assert!(
                !CELL_DAEMON_ALLOWED.iter().any(|(_, a)| a == nr),
                "{name} is both denied and allowed"
            );
        }
        let mut nrs: Vec<i64> = CELL_DAEMON_ALLOWED.iter().map(|(_, n)| *n).collect();
        nrs.sort_unstable();
        nrs.dedup();
        assert_eq!(nrs.len(), CELL_DAEMON_ALLOWED.len(), "duplicate entries");
    }

    /// Both profiles stacked on a throw-away thread, as a build step has them: ordinary calls
    /// work, namespace and mount calls fail, clone3 says ENOSYS, and a call outside the
    /// allow-list (an x32 number, keyctl) fails.
    #[test]
    fn step_profile_denies_namespaces_and_mounts() {
        let daemon = cell_daemon().unwrap();
        let step = step().unwrap();
        let res = std::thread::spawn(move || {
            // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integers only.
            let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            assert_eq!(rc, 0);
            install(&daemon).unwrap();
            install(&step).unwrap();
            let call = |nr: i64, a0: u64| {
                // SAFETY: raw syscalls whose arguments are plain integers (null pointers where
                // the kernel would read memory); the filter answers the denied ones first.
                let rc = unsafe { libc::syscall(nr, a0, 0, 0, 0, 0) };
                (rc, std::io::Error::last_os_error().raw_os_error())
            };
            vec![
                call(sys::unshare, libc::CLONE_NEWUSER as u64),
                call(sys::unshare, 0),
                call(sys::setns, 0),
                call(sys::mount, 0),
                call(sys::clone, (libc::CLONE_NEWUSER | libc::SIGCHLD) as u64),
                call(sys::clone3, 0),
                call(sys::ptrace, libc::PTRACE_ATTACH as u64),
                call(libc::SYS_keyctl, 0),
                call(sys::getpid | 0x4000_0000, 0),
                call(sys::getpid, 0),
            ]
        })
        .join()
        .unwrap();
        let eperm = (-1, Some(libc::EPERM));
        let enosys = (-1, Some(libc::ENOSYS));
        assert_eq!(&res[..5], &[eperm; 5]);
        assert_eq!(res[5], enosys);
        assert_eq!(res[6], eperm);
        assert_eq!(res[7], eperm, "keyctl");
        assert_eq!(res[8].0, -1, "x32 getpid");
        assert!(res[9].0 > 0);
    }
}
