//! In-build attacks on a real sandbox cell: a real `hive-cell` in the real jail runs one build
//! whose steps try to break out (new user namespaces, mounts, ptrace, raw system calls the
//! profiles forbid, /proc's kernel state, device nodes, capabilities, fork and memory bombs,
//! filling the disk); each step prints `ATTACK <name>: blocked|ESCAPED (...)`. The box side then
//! checks the host is untouched (core_pattern, the cell's host uid and capabilities, its cgroup
//! limits). Prints `attacks: N tried, 0 escapes` and fails on any escape.
mod common;

use std::time::Duration;

use hive_box::backend::{CellBackend, CellSpec};
use hive_proto::v1::{CellEventKind, CellEventsRequest, RunBuildRequest, SizeClass};

/// Every step ends with `true`: a blocked attack must not end the build before the next one.
const STEPS: &[&str] = &[
    // 1. The build's uid is a host uid of the cell's own range, not host uid 1000 (nor 0).
    r#"m=$(cat /proc/self/uid_map | tr -s ' '); echo "UIDMAP$m";
       set -- $m; if [ "$2" = "0" ]; then echo "ATTACK host-uid: ESCAPED (uid_map$m: uid $(id -u) is the box's)";
       else echo "ATTACK host-uid: blocked (uid_map$m)"; fi; true"#,
    // 2. New user namespaces (and mounting inside one).
    r#"if unshare -Ur true 2>/dev/null; then echo "ATTACK unshare-user: ESCAPED"; else echo "ATTACK unshare-user: blocked"; fi;
       if unshare -Urm sh -c 'mount -t tmpfs none /tmp && echo MOUNTED' 2>/dev/null | grep -q MOUNTED;
       then echo "ATTACK mount-in-new-userns: ESCAPED"; else echo "ATTACK mount-in-new-userns: blocked"; fi;
       v=$(cat /proc/sys/user/max_user_namespaces);
       if [ "$v" = 0 ]; then echo "ATTACK userns-limit: blocked (max_user_namespaces 0)"; else echo "ATTACK userns-limit: ESCAPED (max_user_namespaces $v)"; fi;
       if mount -t tmpfs none /tmp 2>/dev/null; then echo "ATTACK mount: ESCAPED"; else echo "ATTACK mount: blocked"; fi;
       if mount -t sysfs none /tmp 2>/dev/null; then echo "ATTACK mount-sysfs: ESCAPED"; else echo "ATTACK mount-sysfs: blocked"; fi; true"#,
    // 3. Raw system calls (perl's syscall(), no compiler needed). Blocked = the filter (or the
    // kernel's permission check) answered, never the call's own work.
    r#"perl -e '
       my $kid = fork(); if ($kid == 0) { sleep 60; exit 0 }
       my ($EPERM, $ENOSYS) = (1, 38);
       sub try { my ($name, $want, $nr, @a) = @_; $! = 0; my $r = syscall($nr, @a); my $e = $! + 0;
         my $ok = ($r == -1 && grep { $_ == $e } @$want);
         printf "ATTACK %s: %s (ret %d errno %d)\n", $name, $ok ? "blocked" : "ESCAPED", $r, $e; }
       try("clone3-hides-flags", [$ENOSYS], 435, 0, 0);
       try("keyctl", [$EPERM, $ENOSYS], 250, 0, -3, 1);
       try("add_key", [$EPERM, $ENOSYS], 248, "user", "hive", "x", 1, -3);
       try("bpf", [$EPERM, $ENOSYS], 321, 0, 0, 0);
       try("perf_event_open", [$EPERM, $ENOSYS], 298, 0, 0, -1, -1, 0);
       try("kexec_load", [$EPERM, $ENOSYS], 246, 0, 0, 0, 0);
       try("init_module", [$EPERM, $ENOSYS], 175, 0, 0, 0);
       try("open_by_handle_at", [$EPERM, $ENOSYS], 304, -1, 0, 0);
       try("userfaultfd", [$EPERM, $ENOSYS], 323, 0);
       try("io_uring_setup", [$EPERM, $ENOSYS], 425, 1, 0);
       try("setns", [$EPERM], 308, -1, 0);
       try("fsopen", [$EPERM, $ENOSYS], 430, "tmpfs", 0);
       try("ptrace-attach", [$EPERM], 101, 16, $kid, 0, 0);
       try("process_vm_readv", [$EPERM], 310, $kid, 0, 0, 0, 0, 0);
       try("x32-abi", [$ENOSYS, $EPERM], 39 | 0x40000000);
       try("unshare-newuser-raw", [$EPERM], 272, 0x10000000);
       kill 9, $kid; waitpid($kid, 0);'; true"#,
    // 4. /proc: kernel internals hidden, sysctls and the sysrq trigger not writable.
    r#"for f in timer_list sched_debug kallsyms kcore; do n=$(head -c 4096 /proc/$f 2>/dev/null | wc -c);
         if [ "$n" -gt 0 ]; then echo "ATTACK read-proc-$f: ESCAPED ($n bytes)"; else echo "ATTACK read-proc-$f: blocked"; fi; done;
       for f in sys/kernel/core_pattern sysrq-trigger sys/kernel/sysrq sys/vm/drop_caches; do
         if (printf 'x' > /proc/$f) 2>/dev/null; then echo "ATTACK write-proc-$f: ESCAPED"; else echo "ATTACK write-proc-$f: blocked"; fi; done;
       if grep -E ' /proc/sys ro,' /proc/self/mountinfo >/dev/null; then echo "ATTACK proc-sys-mount: blocked (read-only)";
       else echo "ATTACK proc-sys-mount: ESCAPED (/proc/sys is not a read-only mount)"; fi; true"#,
    // 5. Devices: no block device, and no node made for one or for /dev/mem.
    r#"b=$(find / -xdev -type b 2>/dev/null | head -3; find /dev -type b 2>/dev/null | head -3);
       if [ -n "$b" ]; then echo "ATTACK block-device-visible: ESCAPED ($b)"; else echo "ATTACK block-device-visible: blocked"; fi;
       if mknod /tmp/sda b 8 0 2>/dev/null && head -c 1 /tmp/sda >/dev/null 2>&1; then echo "ATTACK mknod-block: ESCAPED"; else echo "ATTACK mknod-block: blocked"; fi;
       if mknod /tmp/mem c 1 1 2>/dev/null && head -c 1 /tmp/mem >/dev/null 2>&1; then echo "ATTACK mknod-mem: ESCAPED"; else echo "ATTACK mknod-mem: blocked"; fi; true"#,
    // 6. Capabilities: the step has none in any set; its container's PID 1 has the cell's keep-list.
    r#"c=$(grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status | grep -v '0000000000000000');
       if [ -n "$c" ]; then echo "ATTACK step-capabilities: ESCAPED ($c)"; else echo "ATTACK step-capabilities: blocked (none)"; fi;
       echo "PID1CAPBND $(awk '/^CapBnd/{print $2}' /proc/1/status)"; true"#,
    // 7. Disk filling: the build's writable space is capped (64 MiB class).
    r#"dd if=/dev/zero of=/work/fill bs=1M count=256 2>/dev/null; s=$(du -m /work/fill | cut -f1); rm -f /work/fill;
       if [ "$s" -le 64 ]; then echo "ATTACK disk-fill: blocked (${s} MiB written)"; else echo "ATTACK disk-fill: ESCAPED (${s} MiB written)"; fi; true"#,
    // 8. Memory bomb: 4 GiB asked for in a 512 MiB cell.
    r#"perl -e 'my @a; my $s = "x" x (1 << 20); push @a, $s . "" for 1 .. 4096; print "allocated\n"' > /tmp/mem.out 2>&1; e=$?;
       if grep -q allocated /tmp/mem.out; then echo "ATTACK memory-bomb: ESCAPED (4 GiB allocated)"; else echo "ATTACK memory-bomb: blocked (exit $e)"; fi; true"#,
    // 9. Fork bomb, bounded: up to 5000 children in a cell whose pids.max is 256.
    r#"perl -e 'my @k; while (@k < 5000) { my $p = fork(); last unless defined $p; if ($p == 0) { sleep 30; exit 0 } push @k, $p }
       my $n = @k; kill 9, @k; waitpid($_, 0) for @k;
       printf "ATTACK fork-bomb: %s (%d processes)\n", $n < 256 ? "blocked" : "ESCAPED", $n;'; true"#,
    // The cell still works after all that.
    "echo STILL-ALIVE",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_build_attacks_do_not_escape_the_sandbox() {
    let tb = common::sandbox("atk", 203);
    let core_pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let class = SizeClass {
        name: "attack".into(),
        vcpus: 1,
        memory_mib: 512,
        pids_max: 256,
        disk_mib: 64,
        ..Default::default()
    };
    let slot = 3;
    let cell = tb
        .sandbox
        .create(CellSpec {
            id: id.clone(),
            size_class: class,
            slot,
        })
        .await
        .expect("create cell");
    tb.sandbox
        .wait_ready(&cell, Duration::from_secs(60))
        .await
        .expect("cell ready");
    let map = hive_jail::userns::IdMap::for_slot(tb.sandbox.config().cell_uid_base, slot).unwrap();

    // From the box: the cell daemon is its namespace's root, the box's uid `map.host_base`,
    // with only the kept capabilities.
    let pid = std::fs::read_to_string(tb.sandbox.cell_dir(&id).join("pid")).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let mut host_side = Vec::new();
    let uid = field("Uid:");
    host_side.push((
        "cell-daemon-host-uid",
        uid.iter().all(|u| *u == map.host_base.to_string()),
        format!("Uid: {uid:?}, want {}", map.host_base),
    ));
    let keep = hive_jail::caps::CELL_DAEMON
        .iter()
        .fold(0u64, |m, c| m | (1u64 << c));
    let bnd = u64::from_str_radix(&field("CapBnd:").concat(), 16).unwrap_or(u64::MAX);
    host_side.push((
        "cell-daemon-capabilities",
        bnd == keep,
        format!("CapBnd {bnd:x}, want {keep:x}"),
    ));

    let mut client = cell.client();
    let reply = client
        .run_build(RunBuildRequest {
            build_id: "b-attacks".into(),
            steps: STEPS.iter().map(|s| s.to_string()).collect(),
            timeout_secs: 600,
            ..Default::default()
        })
        .await
        .expect("RunBuild")
        .into_inner();
    assert!(reply.accepted);
    let mut events = client
        .events(CellEventsRequest {
            build_id: "b-attacks".into(),
            from_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = String::new();
    while let Some(ev) = events.message().await.unwrap() {
        match CellEventKind::try_from(ev.kind).unwrap() {
            CellEventKind::Log => out.push_str(&String::from_utf8_lossy(&ev.data)),
            CellEventKind::BuildFinished => break,
            _ => {}
        }
    }
    eprintln!("build output:\n{out}");

    // The box after the build: core_pattern as before, the cell's cgroup held its limits.
    host_side.push((
        "host-core-pattern",
        std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap() == core_pattern,
        "core_pattern changed".into(),
    ));
    let uidmap = out
        .lines()
        .find_map(|l| l.strip_prefix("UIDMAP"))
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_string)
        .collect::<Vec<_>>();
    host_side.push((
        "build-uid-range",
        uidmap == ["0", &map.host_base.to_string(), "65536"],
        format!("uid_map {uidmap:?}"),
    ));
    let pid1 = out
        .lines()
        .find_map(|l| l.strip_prefix("PID1CAPBND "))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(u64::MAX);
    host_side.push((
        "container-pid1-capabilities",
        pid1 & !keep == 0,
        format!("CapBnd {pid1:x}"),
    ));
    host_side.push((
        "cell-survives",
        out.contains("STILL-ALIVE"),
        "the last step did not run".into(),
    ));

    tb.sandbox.destroy(&id).await.expect("destroy");

    let mut tried = 0;
    let mut escapes = Vec::new();
    for line in out.lines().filter_map(|l| l.trim().strip_prefix("ATTACK ")) {
        tried += 1;
        if line.contains(": ESCAPED") {
            escapes.push(line.to_string());
        }
    }
    for (name, ok, detail) in &host_side {
        tried += 1;
        if !ok {
            escapes.push(format!("{name}: ESCAPED ({detail})"));
        }
    }
    println!("attacks: {tried} tried, {} escapes", escapes.len());
    assert!(tried >= 40, "only {tried} attacks reported:\n{out}");
    assert!(escapes.is_empty(), "escapes:\n{}", escapes.join("\n"));
}
