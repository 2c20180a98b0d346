//! The microvm backend against the real kernel: real KVM, real netns + veth + TAP, real jail,
//! real cgroup. This machine's KVM cannot boot Linux (DESIGN.md), so the "kernel" is the
//! project's test guest (vmm/guest): the backend boots it exactly as it would boot
//! vmlinux (same VM config, disks, TAP, vsock, jail), and the guest drives every device and
//! answers a host `CONNECT 1024` by echoing with an `ECHO:` prefix, then resets the VM.
//!
//! Needs root, nftables and /dev/kvm; without /dev/kvm the KVM tests skip loudly (and fail under
//! CI=true, as the other VMM tests do).

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hive_box::backend::microvm::{GuestFiles, MicrovmBackend, MicrovmConfig, VMM_OVERHEAD_MIB};
use hive_box::backend::{CellBackend, CellSpec};
use hive_box::net::{link_exists, link_exists_in, BoxNet, CellNetNames, CELL_TAP, NETNS_DIR};
use hive_proto::v1::SizeClass;
use hive_sys::error_chain;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Whether /dev/kvm opens; without it the test skips, loudly. Under `CI=true` it fails instead:
/// CI has KVM, and a skip there would pass an untested backend.
fn kvm_or_skip(test: &str) -> bool {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => panic!(
            "{test}: cannot open /dev/kvm ({e}), and CI=true requires the microvm tests to run \
             (a skip there would pass an untested backend)"
        ),
        Err(e) => {
            eprintln!("\n!!!!!!!! SKIPPING {test}: cannot open /dev/kvm ({e}); the microvm backend was NOT tested !!!!!!!!\n");
            false
        }
    }
}

/// Builds the test guest once per test binary (its own output dir: other test binaries build
/// theirs at the same time).
fn guest_elf() -> PathBuf {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        // One directory per process (nextest runs each test in its own process; builds race).
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("hive-test-guest-microvm-{}", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmm/guest/build.sh");
        let o = std::process::Command::new("sh")
            .arg(&script)
            .arg(&out)
            .output()
            .expect("run guest/build.sh");
        assert!(
            o.status.success(),
            "guest build failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out.join("hive-test-guest.elf")
    })
    .clone()
}

fn tiny() -> SizeClass {
    SizeClass {
        name: "tiny".into(),
        vcpus: 1,
        memory_mib: 32,
        pids_max: 64,
        ..Default::default()
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

struct TestBox {
    dir: tempfile::TempDir,
    backend: Arc<MicrovmBackend>,
    net: BoxNet,
}

/// A microvm backend whose kernel is the test guest, with names unique to this test (table,
/// subnet, cgroup parent). Subnets use third octets 241..=248: the sandbox tests use 201..=205
/// and the e2e tests (pid % 12) * 20 + 0..=19, at most 239. The two "disks" are small files: the guest reads their first sectors.
fn microvm(tag: &str, third_octet: u8) -> TestBox {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let dir = tempfile::Builder::new()
        .prefix(&format!("hive-mv-{tag}-"))
        .tempdir()
        .unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let kernel = images.join("vmlinux");
    std::fs::copy(guest_elf(), &kernel).unwrap();
    for (name, fill) in [("rootfs.ext4", 0x11u8), ("build.ext4", 0x22u8)] {
        std::fs::write(images.join(name), vec![fill; 256 * 1024]).unwrap();
    }
    let guest = hive_box::config::guest_files(
        Some(&images),
        Some(&images.join("rootfs.ext4")),
        Some(&images.join("build.ext4")),
    )
    .expect("guest files");
    let net = BoxNet {
        table: format!("hive_t_{tag}"),
        subnet: format!("100.96.{third_octet}.0/24").parse().unwrap(),
        blocked: vec![],
    };
    net.setup().expect("load nftables table");
    let mut cfg = MicrovmConfig::new(
        dir.path().join("data"),
        guest,
        net.clone(),
        format!("hive-test-{tag}"),
    );
    cfg.vmm_binary = PathBuf::from(env!("CARGO_BIN_EXE_hive-box"));
    let backend = MicrovmBackend::new(cfg).expect("microvm backend");
    TestBox {
        dir,
        backend: Arc::new(backend),
        net,
    }
}

impl Drop for TestBox {
    /// Even when a test fails half-way, leave no cell behind (the reaper finds them on disk).
    fn drop(&mut self) {
        let backend = Arc::clone(&self.backend);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(hive_box::reaper::reap(backend.as_ref()));
        })
        .join();
        self.backend
            .cgroups()
            .remove_parent(&self.backend.config().cgroup_parent);
        let _ = self.net.teardown();
        let _ = self.dir.path();
    }
}

/// The guest's connection to host port 5000 (`<uds>_5000`): reads its hello, answers. The
/// socket belongs to the VMM's uid, which connects to it.
fn vsock_5000(uds: &Path, uid: u32) -> std::thread::JoinHandle<Result<(), String>> {
    let path = format!("{}_5000", uds.display());
    let listener = UnixListener::bind(&path).expect("bind <uds>_5000");
    std::os::unix::fs::chown(&path, Some(uid), Some(uid)).expect("chown <uds>_5000");
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let mut hello = [0u8; 21];
        s.read_exact(&mut hello)
            .map_err(|e| format!("read guest hello: {e}"))?;
        if &hello != b"HELLO from hive guest" {
            return Err(format!("guest said {:?}", String::from_utf8_lossy(&hello)));
        }
        s.write_all(b"REPLY from host")
            .map_err(|e| format!("reply: {e}"))
    })
}

const ETH_HIVE: u16 = 0x88b5;

/// An AF_PACKET socket on `ifname` (in this thread's network namespace) for `ethertype`.
fn packet_socket(ifname: &str, ethertype: u16) -> Result<OwnedFd, String> {
    // SAFETY: plain socket(2) call; the result is checked and owned immediately.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ethertype.to_be()),
        )
    };
    if fd < 0 {
        return Err(format!(
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).map_err(|e| e.to_string())?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(format!("no interface {ifname} in the cell netns"));
    }
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ethertype.to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a valid sockaddr_ll and the length passed matches it.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(format!(
            "bind AF_PACKET: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(fd)
}

/// The guest's TAP peer, inside the cell's network namespace on the TAP the backend made: waits
/// for its HIVE-PING frame and answers HIVE-PONG to its MAC; returns that MAC.
fn tap_peer(netns: PathBuf) -> std::thread::JoinHandle<Result<[u8; 6], String>> {
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&netns).map_err(|e| format!("open {netns:?}: {e}"))?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns: {e}"))?;
        let fd = packet_socket(CELL_TAP, ETH_HIVE)?;
        let tv = libc::timeval {
            tv_sec: 60,
            tv_usec: 0,
        };
        // SAFETY: setting SO_RCVTIMEO with a valid timeval of the right size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: `buf` is writable for its full length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(format!("recv on TAP: {}", std::io::Error::last_os_error()));
            }
            let f = &buf[..n as usize];
            if f.len() < 14 + 9 || &f[14..23] != b"HIVE-PING" {
                continue;
            }
            let mut guest_mac = [0u8; 6];
            guest_mac.copy_from_slice(&f[6..12]);
            let mut reply = [0u8; 60];
            reply[..6].copy_from_slice(&guest_mac);
            reply[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xfe]);
            reply[12..14].copy_from_slice(&ETH_HIVE.to_be_bytes());
            reply[14..23].copy_from_slice(b"HIVE-PONG");
            // SAFETY: `reply` is readable for its full length; the socket is bound to the TAP.
            let sent = unsafe { libc::send(fd.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0) };
            if sent != reply.len() as isize {
                return Err(format!("send on TAP: {}", std::io::Error::last_os_error()));
            }
            return Ok(guest_mac);
        }
    })
}

fn status_field(pid: &str, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .map(|l| l[field.len()..].trim().to_string())
        .unwrap_or_default()
}

/// The VMM's pid (host view), once the jail helper wrote it and `setpriv` exec'd the VMM.
async fn vmm_pid(backend: &MicrovmBackend, id: &str) -> String {
    let pid_file = backend.cell_dir(id).join("pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(pid) = std::fs::read_to_string(&pid_file) {
            let pid = pid.trim().to_string();
            // Before the exec chain (jail child -> setpriv -> VMM) ends, argv is not the VMM's.
            let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let argv: Vec<&[u8]> = argv.split(|b| *b == 0).collect();
            if argv.len() >= 3 && argv[0].ends_with(b"hive-box") && argv[1] == b"vmm" {
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no VMM process after 10 s; vmm.log: {}",
            std::fs::read_to_string(backend.vmm_log(id)).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn serial(backend: &MicrovmBackend, id: &str) -> String {
    std::fs::read_to_string(backend.serial_log(id)).unwrap_or_default()
}

/// Peak memory use of the cell's cgroup (v1 max_usage_in_bytes or v2 memory.peak), if readable.
fn cgroup_peak(dirs: &[PathBuf]) -> Option<u64> {
    dirs.iter()
        .flat_map(|d| [d.join("memory.max_usage_in_bytes"), d.join("memory.peak")])
        .find_map(|f| std::fs::read_to_string(f).ok()?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_cell_runs_jailed_reaches_the_guest_over_vsock_and_is_destroyed_completely() {
    if !kvm_or_skip("microvm cell life cycle") {
        return;
    }
    let tb = microvm("mvlife", 241);
    let be = &tb.backend;
    let id = new_id();
    let t0 = Instant::now();
    let cell = be
        .create(CellSpec {
            id: id.clone(),
            size_class: tiny(),
            slot: 1,
        })
        .await
        .expect("create microvm cell");
    let created = t0.elapsed();
    // The guest's peers: host port 5000 first (the guest asks for it once), then the TAP peer
    // (the guest re-sends its ping until answered).
    let host_5000 = vsock_5000(&be.vsock_path(&id), be.vmm_uid(1));
    let names = CellNetNames::for_cell(&id);
    let netns = Path::new(NETNS_DIR).join(&names.netns);
    let tap = tap_peer(netns.clone());

    // The VMM runs jailed: PID 1 of its own namespaces, the cell's netns, no capabilities,
    // no_new_privs, seccomp, in a root holding only its own files.
    let pid = vmm_pid(be, &id).await;
    assert!(be.is_alive(&id));
    for ns in ["pid", "mnt", "net", "uts", "ipc"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(ours, theirs, "{ns} namespace is shared with the box");
    }
    {
        use std::os::unix::fs::MetadataExt;
        let a = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap();
        let b = std::fs::metadata(&netns).unwrap();
        assert_eq!(a.ino(), b.ino(), "VMM is not in the cell's netns");
    }
    assert_eq!(status_field(&pid, "NoNewPrivs:"), "1");
    assert_ne!(status_field(&pid, "Seccomp:"), "0");
    let uid = be.vmm_uid(1).to_string();
    assert_eq!(
        status_field(&pid, "Uid:")
            .split_whitespace()
            .collect::<Vec<_>>(),
        [uid.as_str(); 4],
        "VMM runs as the cell's own uid"
    );
    assert_eq!(
        status_field(&pid, "Gid:")
            .split_whitespace()
            .collect::<Vec<_>>(),
        [uid.as_str(); 4]
    );
    assert_eq!(status_field(&pid, "Groups:"), "");
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        assert_eq!(status_field(&pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(
        status_field(&pid, "NSpid:").split_whitespace().last(),
        Some("1")
    );
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    eprintln!("VMM jail root: {top:?}");
    for absent in ["etc", "home", "root", "var", "sbin"] {
        assert!(
            !top.contains(&absent.to_string()),
            "/{absent} in the VMM's root"
        );
    }
    assert!(root.join("cell/vm.json").exists());
    {
        // The jail's own device nodes, the cell's uid's alone; the box's are untouched.
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        for dev in ["dev/kvm", "dev/net/tun"] {
            let m = std::fs::metadata(root.join(dev)).unwrap();
            assert_eq!(m.uid(), be.vmm_uid(1), "{dev} owner");
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{dev} mode");
        }
        for dev in ["/dev/kvm", "/dev/net/tun"] {
            assert_eq!(
                std::fs::metadata(dev).unwrap().uid(),
                0,
                "box's {dev} changed"
            );
        }
    }
    assert!(root.join("images/kernel").exists());

    // Resources: cgroup sized guest + allowance, veth, firewall entry, TAP in the netns.
    let cg = be.cgroups().open(&be.config().cgroup_parent, &id);
    assert_eq!(
        cg.memory_limit().unwrap(),
        (32 + VMM_OVERHEAD_MIB) * 1024 * 1024
    );
    assert!(cg.pids().unwrap().contains(&pid.parse().unwrap()));
    assert!(link_exists(&names.veth).await.unwrap());
    assert!(tb.net.has_cell(&names.veth));
    assert!(
        link_exists_in(&netns, CELL_TAP).await.unwrap(),
        "TAP missing"
    );

    // The box's way in: the cell's Connector (vsock muxer, CONNECT 1024) reaches the guest.
    let t1 = Instant::now();
    // The VMM binds the muxer socket while it builds the VM: retry until it is there.
    let open = async {
        loop {
            match cell.connector.open().await {
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                other => break other,
            }
        }
    };
    let mut s = tokio::time::timeout(Duration::from_secs(90), open)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "CONNECT 1024 not answered in 90 s; serial:\n{}",
                serial(be, &id)
            )
        })
        .expect("Connector::open");
    let connected = t1.elapsed();
    s.write_all(b"ping-from-host").await.unwrap();
    let mut echo = [0u8; 19];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .expect("read echo");
    assert_eq!(&echo, b"ECHO:ping-from-host");
    drop(s);

    // The guest finishes and resets the VM: the VMM exits, the cell is dead.
    let deadline = Instant::now() + Duration::from_secs(60);
    while be.is_alive(&id) {
        assert!(
            Instant::now() < deadline,
            "VMM still running 60 s after the exchange; serial:\n{}",
            serial(be, &id)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ended = t0.elapsed();
    let out = serial(be, &id);
    eprintln!("--- guest serial ---\n{out}---");
    eprintln!(
        "--- vmm.log ---\n{}---",
        std::fs::read_to_string(be.vmm_log(&id)).unwrap_or_default()
    );
    host_5000
        .join()
        .unwrap()
        .expect("guest reached host port 5000");
    let mac = tap.join().unwrap().expect("TAP peer saw the guest's ping");
    let want_mac: Vec<u8> = [0x02, 0x48]
        .into_iter()
        .chain((0..4).map(|i| u8::from_str_radix(&id[2 * i..2 * i + 2], 16).unwrap()))
        .collect();
    assert_eq!(mac.to_vec(), want_mac, "guest MAC from the VM config");
    assert!(out.contains("virtio_mmio=5"), "two disks, net, vsock, rng");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("OK block ro")).count(),
        2,
        "both disks read-only"
    );
    for dev in ["OK net", "OK vsock", "OK rng"] {
        assert!(out.lines().any(|l| l.starts_with(dev)), "missing {dev}");
    }
    assert!(out.contains("DONE ok=5 fail=0"), "{out}");
    let peak = cgroup_peak(cg.dirs());
    eprintln!(
        "microvm numbers: create {created:?}, create -> CONNECT 1024 answered {:?}, \
         create -> VMM exited {ended:?}, cgroup peak memory {:?} KiB (guest 32 MiB)",
        created + connected,
        peak.map(|b| b / 1024)
    );

    // Destroy: nothing of the cell is left; a second destroy is fine.
    let cell_dir = be.cell_dir(&id);
    be.destroy(&id).await.expect("destroy");
    assert!(!be.is_alive(&id));
    assert!(!cell_dir.exists(), "cell dir left");
    assert!(!link_exists(&names.veth).await.unwrap(), "veth left");
    assert!(!netns.exists(), "netns (and with it the TAP) left");
    assert!(!tb.net.has_cell(&names.veth), "firewall entry left");
    for d in cg.dirs() {
        assert!(!d.exists(), "cgroup {} left", d.display());
    }
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "VMM process left"
    );
    be.destroy(&id).await.expect("second destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ready_fails_fast_with_exited_when_the_guest_resets() {
    if !kvm_or_skip("microvm wait_ready on an exiting guest") {
        return;
    }
    let tb = microvm("mvexit", 242);
    let be = &tb.backend;
    let id = new_id();
    let cell = be
        .create(CellSpec {
            id: id.clone(),
            size_class: tiny(),
            slot: 2,
        })
        .await
        .expect("create");
    let host_5000 = vsock_5000(&be.vsock_path(&id), be.vmm_uid(2));
    let netns = Path::new(NETNS_DIR).join(CellNetNames::for_cell(&id).netns);
    let _tap = tap_peer(netns);
    // The test guest is no cell daemon: health never answers, and the guest resets the VM once
    // its device tests are done. wait_ready must say the VMM exited, long before its timeout.
    let timeout = Duration::from_secs(180);
    let t0 = Instant::now();
    let err = be.wait_ready(&cell, timeout).await.unwrap_err();
    let took = t0.elapsed();
    let msg = error_chain(&err);
    eprintln!("wait_ready after {took:?}: {msg}");
    assert!(took < timeout, "timed out instead of noticing the exit");
    assert!(msg.contains("exited before it became ready"), "{msg}");
    assert!(msg.contains("the guest reset the VM"), "{msg}");
    assert!(msg.contains("DONE ok="), "serial tail in the error: {msg}");
    let _ = host_5000.join();
    be.destroy(&id).await.expect("destroy");
    assert!(!be.cell_dir(&id).exists());
}

#[test]
fn missing_guest_kernel_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.ext4");
    std::fs::write(&disk, b"x").unwrap();
    // The flags' check.
    let e = hive_box::config::guest_files(
        Some(Path::new("/nonexistent/hive/vmlinux")),
        Some(&disk),
        Some(&disk),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("/nonexistent/hive/vmlinux") && e.contains("deploy/guest/build-kernel.sh"),
        "{e}"
    );
    // The backend's own check (a file removed after start-up flags were read).
    let cfg = MicrovmConfig::new(
        dir.path().join("data"),
        GuestFiles {
            kernel: dir.path().join("vmlinux"),
            rootfs_disk: disk.clone(),
            build_disk: disk,
        },
        BoxNet {
            table: "hive_t_unused".into(),
            subnet: "100.96.243.0/24".parse().unwrap(),
            blocked: vec![],
        },
        "hive-test-unused".into(),
    );
    let e = error_chain(&MicrovmBackend::new(cfg).unwrap_err());
    assert!(
        e.contains("guest kernel")
            && e.contains(&dir.path().join("vmlinux").display().to_string())
            && e.contains("build-kernel.sh"),
        "{e}"
    );
}

#[test]
fn hive_box_backend_microvm_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_hive-box"))
            .args(["--backend", "microvm", "--pool", "small=1", "--data-dir"])
            .arg(dir.path())
            .args(extra)
            .env_remove("HIVE_GUEST_KERNEL")
            .env_remove("HIVE_CELL_ROOTFS_DISK")
            .env_remove("HIVE_BUILD_IMAGE_DISK")
            .env_remove("HIVE_BOX_BACKEND")
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let err = run(&[]);
    if kvm {
        assert!(
            err.contains("--guest-kernel") && err.contains("HIVE_GUEST_KERNEL"),
            "{err}"
        );
        let err = run(&[
            "--guest-kernel",
            "/nonexistent/vmlinux",
            "--guest-rootfs-disk",
            "/nonexistent/root.ext4",
            "--build-image-disk",
            "/nonexistent/build.ext4",
        ]);
        assert!(
            err.contains("/nonexistent/vmlinux") && err.contains("deploy/guest/build-kernel.sh"),
            "{err}"
        );
    } else {
        assert!(err.contains("cannot open /dev/kvm"), "{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

/// Sets SO_RCVTIMEO on a socket.
fn recv_timeout(fd: &OwnedFd, d: Duration) {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setting SO_RCVTIMEO with a valid timeval of the right size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
}

/// Attaches to TAP `name` in this thread's namespace the way the VMM does.
fn attach_tap(name: &str) -> Result<std::fs::File, String> {
    hive_sys::tun::open(name, hive_sys::tun::Mode::Tap).map_err(|e| hive_sys::error_chain(&e))
}

fn ip_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame with an ICMP echo request from `src` to `dst`.
fn icmp_frame(dst_mac: [u8; 6], src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut icmp = vec![8u8, 0, 0, 0, 0x48, 0x56, 0, 1];
    icmp.extend_from_slice(b"hive-guest-link");
    let c = ip_checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = 20 + icmp.len();
    let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 1, 0, 0];
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// The guest link is routed and masqueraded: a packet the guest sends through the TAP to an
/// outside address leaves the cell on its veth with the cell's own address as source (so the
/// box's firewall and NAT treat it like a sandbox cell's). No KVM needed: the test attaches to
/// the TAP itself, as the VMM would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_link_forwards_and_masquerades_out_of_the_cell() {
    let id = new_id();
    let net = BoxNet {
        table: "hive_t_mvlink".into(),
        subnet: "100.96.244.0/24".parse().unwrap(),
        blocked: vec![],
    };
    net.setup().expect("load nftables table");
    let names = CellNetNames::for_cell(&id);
    let cell = net.create_cell(&names, 1).await.expect("cell network");
    let result = async {
        hive_box::net::create_guest_link(&cell.netns, CELL_TAP, 0)
            .await
            .map_err(|e| error_chain(&e))?;
        let out = std::process::Command::new("ip")
            .args(["-n", &names.netns, "-br", "link", "show", CELL_TAP])
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mac_text = text
            .split_whitespace()
            .nth(2)
            .ok_or(format!("no MAC in {text:?}"))?;
        let mut gw_mac = [0u8; 6];
        for (b, h) in gw_mac.iter_mut().zip(mac_text.split(':')) {
            *b = u8::from_str_radix(h, 16).map_err(|e| e.to_string())?;
        }
        let fwd = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &names.netns,
                "cat",
                "/proc/sys/net/ipv4/ip_forward",
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if String::from_utf8_lossy(&fwd.stdout).trim() != "1" {
            return Err("ip_forward is off in the cell netns".to_string());
        }

        // Host side: watch the cell's veth for the forwarded packet.
        let capture = packet_socket(&names.veth, 0x0800)?;
        recv_timeout(&capture, Duration::from_millis(200));
        let outside = Ipv4Addr::new(198, 51, 100, 7);
        let frame = icmp_frame(
            gw_mac,
            [0x02, 0x48, 0, 0, 0, 1],
            hive_box::net::GUEST_LINK_ADDR,
            outside,
        );
        // Guest side: a thread in the cell netns attached to the TAP, sending until seen.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = {
            let netns = cell.netns.clone();
            let stop = stop.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let ns = std::fs::File::open(&netns).map_err(|e| e.to_string())?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("setns: {e}"))?;
                let mut tap = attach_tap(CELL_TAP)?;
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    tap.write_all(&frame)
                        .map_err(|e| format!("write TAP: {e}"))?;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(())
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = None;
        let mut buf = [0u8; 2048];
        while seen.is_none() && Instant::now() < deadline {
            // SAFETY: `buf` is writable for its full length.
            let n =
                unsafe { libc::recv(capture.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 34 {
                continue;
            }
            let f = &buf[..n as usize];
            let (src, dst) = (&f[26..30], &f[30..34]);
            if f[23] == 1 && dst == outside.octets() {
                seen = Some(Ipv4Addr::new(src[0], src[1], src[2], src[3]));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
        sender.join().map_err(|_| "sender panicked".to_string())??;
        match seen {
            Some(src) if src == cell.cell_ip => Ok(()),
            Some(src) => Err(format!(
                "packet left the cell with source {src}, not the cell's {}",
                cell.cell_ip
            )),
            None => Err("the guest's packet never reached the cell's veth".to_string()),
        }
    }
    .await;
    hive_box::net::delete_tap(&cell.netns, CELL_TAP).await;
    net.destroy_cell(&names).await;
    let _ = net.teardown();
    result.expect("guest link forwards and masquerades");
    assert!(!cell.netns.exists());
}

/// `--backend auto` takes the sandbox here (no vmx/svm flag: nested PVM) and says why; with the
/// sandbox's images unset it then stops on those, before touching anything.
#[test]
fn auto_backend_falls_back_to_the_sandbox_without_hardware_virtualization() {
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_hive-box"))
        .args(["--backend", "auto", "--pool", "small=1", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .env_remove("HIVE_CELL_ROOTFS")
        .env_remove("HIVE_BUILD_IMAGE")
        .env_remove("HIVE_GUEST_KERNEL")
        .env_remove("HIVE_CELL_ROOTFS_DISK")
        .env_remove("HIVE_BUILD_IMAGE_DISK")
        .env_remove("HIVE_BOX_BACKEND")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--cell-rootfs") && err.contains("sandbox backend"),
        "{err}"
    );
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hw {
        // Hardware virtualization but no guest files given: still the sandbox, and why.
        assert!(
            err.contains("guest files are not configured") || err.contains("no usable KVM"),
            "{err}"
        );
    } else {
        assert!(err.contains("no vmx/svm flag"), "{err}");
    }
}

/// Newest `<cache>/<sub>/*/<file>` by modification time.
fn newest_cached(sub: &str, prefix: &str, file: &str) -> Option<PathBuf> {
    let cache = std::env::var("HIVE_CACHE").unwrap_or_else(|_| "/var/cache/hive".into());
    std::fs::read_dir(Path::new(&cache).join(sub))
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path().join(file))
        .filter(|p| p.is_file())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// The real guest (kernel from deploy/guest/build-kernel.sh, disks from
/// deploy/images/build-images.sh; HIVE_GUEST_KERNEL / HIVE_CELL_ROOTFS_DISK /
/// HIVE_BUILD_IMAGE_DISK or the newest in /var/cache/hive) through the backend: the cell daemon
/// must answer health over vsock. Ignored by default: the development machines' KVM cannot boot
/// Linux (DESIGN.md). Run it on a host with vmx/svm:
/// `cargo test -p hive-box --test microvm real_guest -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a KVM that boots Linux (not the nested PVM of the development machines)"]
async fn real_guest_image_answers_health_over_vsock() {
    if !kvm_or_skip("real guest image") {
        return;
    }
    let kernel = std::env::var_os("HIVE_GUEST_KERNEL")
        .map(PathBuf::from)
        .or_else(|| newest_cached("kernel", "", "vmlinux"));
    let rootfs = std::env::var_os("HIVE_CELL_ROOTFS_DISK")
        .map(PathBuf::from)
        .or_else(|| newest_cached("images", "cell-", "cell-rootfs.ext4"));
    let build = std::env::var_os("HIVE_BUILD_IMAGE_DISK")
        .map(PathBuf::from)
        .or_else(|| newest_cached("images", "base-", "build-image.ext4"));
    let guest =
        hive_box::config::guest_files(kernel.as_deref(), rootfs.as_deref(), build.as_deref())
            .expect("guest files (build-kernel.sh, build-images.sh)");
    eprintln!("guest: {guest:?}");
    let dir = tempfile::tempdir().unwrap();
    let net = BoxNet {
        table: "hive_t_mvreal".into(),
        subnet: "100.96.245.0/24".parse().unwrap(),
        blocked: vec![],
    };
    net.setup().expect("nftables");
    let mut cfg = MicrovmConfig::new(
        dir.path().join("data"),
        guest,
        net.clone(),
        "hive-test-mvreal".into(),
    );
    cfg.vmm_binary = PathBuf::from(env!("CARGO_BIN_EXE_hive-box"));
    if std::env::var("HIVE_GUEST_CPU_TEMPLATE").is_ok_and(|v| v == "baseline") {
        cfg.cpu_template = hive_box::backend::microvm::CpuTemplate::Baseline;
    }
    let tb = TestBox {
        dir,
        backend: Arc::new(MicrovmBackend::new(cfg).expect("backend")),
        net,
    };
    let be = &tb.backend;
    let id = new_id();
    let t0 = Instant::now();
    let cell = be
        .create(CellSpec {
            id: id.clone(),
            size_class: SizeClass {
                name: "small".into(),
                vcpus: 1,
                memory_mib: 512,
                ..Default::default()
            },
            slot: 1,
        })
        .await
        .expect("create");
    let vm: serde_json::Value =
        serde_json::from_slice(&std::fs::read(be.cell_dir(&id).join("vm.json")).unwrap()).unwrap();
    eprintln!("vm.json: cpu={} memory_mib={}", vm["cpu"], vm["memory_mib"]);
    let ready = be.wait_ready(&cell, Duration::from_secs(60)).await;
    let took = t0.elapsed();
    eprintln!("--- serial ---\n{}---", serial(be, &id));
    ready.unwrap_or_else(|e| panic!("not ready after {took:?}: {}", error_chain(&e)));
    eprintln!("real guest: create -> cell daemon healthy over vsock in {took:?}");
    be.destroy(&id).await.expect("destroy");
}

/// A box daemon that restarts finds its previous run's microVM cells on disk and in the cgroup
/// tree, reports the build one was running, and removes everything (the VMM is killed through
/// its cgroup: the new daemon never had it as a child).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_box_reaps_leftover_microvm_cells() {
    if !kvm_or_skip("microvm reaper") {
        return;
    }
    let tb = microvm("mvreap", 247);
    let id = new_id();
    // No peers: the guest waits for its TAP peer, so the VMM keeps running.
    tb.backend
        .create(CellSpec {
            id: id.clone(),
            size_class: tiny(),
            slot: 3,
        })
        .await
        .expect("create");
    tb.backend.record_build(&id, "build-left", "lease-left");
    let pid = vmm_pid(&tb.backend, &id).await;

    // "Restart": a second backend over the same data dir, cgroup parent and network.
    let again = MicrovmBackend::new(tb.backend.config().clone()).expect("second backend");
    assert!(!again.is_alive(&id), "the new daemon did not start it");
    let left = again.inspect();
    let rec = left
        .iter()
        .find(|l| l.id == id)
        .and_then(|l| l.record.clone())
        .expect("leftover with its record");
    assert_eq!(
        (rec.build_id.as_str(), rec.lease_id.as_str()),
        ("build-left", "lease-left")
    );
    let lost = hive_box::reaper::reap(&again).await;
    assert!(lost
        .iter()
        .any(|b| b.build_id == "build-left" && b.cell_id == id && b.destroyed));

    let names = CellNetNames::for_cell(&id);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}/status")).exists()
        && !status_field(&pid, "State:").starts_with('Z')
    {
        assert!(Instant::now() < deadline, "VMM {pid} survived the reaper");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!again.cell_dir(&id).exists(), "cell dir left");
    assert!(
        !Path::new(NETNS_DIR).join(&names.netns).exists(),
        "netns left"
    );
    assert!(!link_exists(&names.veth).await.unwrap(), "veth left");
    assert!(!tb.net.has_cell(&names.veth), "firewall entry left");
    for d in again
        .cgroups()
        .open(&again.config().cgroup_parent, &id)
        .dirs()
    {
        assert!(!d.exists(), "cgroup {} left", d.display());
    }
}

fn median_p90(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[(v.len() * 9 / 10).min(v.len() - 1)])
}

/// Create -> VMM up (its vsock socket bound: jail, uid drop and VM built) -> destroy, for
/// HIVE_BENCH_CELLS cells one after another (default 10):
/// `cargo test -p hive-box --test microvm bench -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_create_vmm_up_destroy() {
    if !kvm_or_skip("microvm benchmark") {
        return;
    }
    let n: usize = std::env::var("HIVE_BENCH_CELLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let tb = microvm("mvbench", 248);
    let be = &tb.backend;
    let (mut create, mut up, mut destroy) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let id = new_id();
        let t0 = Instant::now();
        be.create(CellSpec {
            id: id.clone(),
            size_class: tiny(),
            slot: 1 + i as u32,
        })
        .await
        .expect("create");
        create.push(t0.elapsed());
        let sock = be.vsock_path(&id);
        while !sock.exists() {
            assert!(t0.elapsed() < Duration::from_secs(10), "VMM not up");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        up.push(t0.elapsed());
        let t1 = Instant::now();
        be.destroy(&id).await.expect("destroy");
        destroy.push(t1.elapsed());
    }
    let (c50, c90) = median_p90(create);
    let (u50, u90) = median_p90(up);
    let (d50, d90) = median_p90(destroy);
    eprintln!(
        "microvm bench, {n} cells: create median {c50:?} p90 {c90:?}; create -> VMM up median \
         {u50:?} p90 {u90:?}; destroy median {d50:?} p90 {d90:?}"
    );
}
