//! `vmm-bench`: our VMM against QEMU microvm, side by side in one run, booting the same test
//! guest (box-daemon/guest, which carries a PVH note so both load it the same way).
//!
//! For each VMM and each round: process start -> first guest serial byte, process start -> the
//! guest's `DONE` line, peak RSS of the VMM process, guest memory touched, and the difference
//! (the VMM's own overhead). Our VMM runs as a child process of this binary (`--run-vmm`, the
//! same library code `hive-box vmm` runs); QEMU is `qemu-system-x86_64 -M microvm`, with KVM if
//! it works here, else TCG (the report says which).

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "vmm-bench",
    about = "Boot the Hive test guest in our VMM and in QEMU microvm, side by side; print start->first \
             serial byte, start->guest done, peak RSS and VMM overhead (RSS minus guest memory touched), \
             with ratios."
)]
struct Args {
    /// Test guest ELF (default: build it with box-daemon/guest/build.sh into a temp dir).
    #[arg(long, env = "HIVE_BENCH_GUEST")]
    guest: Option<PathBuf>,
    /// Rounds per VMM (the median is reported).
    #[arg(long, default_value_t = 5, env = "HIVE_BENCH_ROUNDS")]
    rounds: usize,
    /// Guest memory in MiB for both VMMs.
    #[arg(long, default_value_t = 64)]
    memory_mib: u32,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64", env = "HIVE_BENCH_QEMU")]
    qemu: String,
    /// Internal: run one VM from this config in this process (the child side of the benchmark).
    #[arg(long, hide = true)]
    run_vmm: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    first_byte: Duration,
    done: Duration,
    peak_rss_kib: u64,
    guest_touched_kib: u64,
}

impl Sample {
    fn overhead_kib(&self) -> u64 {
        self.peak_rss_kib.saturating_sub(self.guest_touched_kib)
    }
}

fn main() {
    let args = Args::parse();
    if let Some(cfg) = &args.run_vmm {
        std::process::exit(run_child(cfg));
    }
    match bench(&args) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("vmm-bench: {e}");
            std::process::exit(1);
        }
    }
}

/// Child: one VM, console to stdout, report on stderr as `guest_resident_bytes=N`.
fn run_child(path: &Path) -> i32 {
    let cfg = match hive_box::vmm::VmConfig::from_file(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm-bench child: {}", hive_box::vmm::cli::format_chain(&e));
            return 2;
        }
    };
    let opts = hive_box::vmm::RunOptions { seccomp: true };
    match hive_box::vmm::run(&cfg, Arc::new(AtomicBool::new(false)), opts) {
        Ok(r) => {
            eprintln!("guest_resident_bytes={}", r.guest_resident_bytes);
            r.exit.exit_code()
        }
        Err(e) => {
            eprintln!("vmm-bench child: {}", hive_box::vmm::cli::format_chain(&e));
            2
        }
    }
}

fn build_guest(dir: &Path) -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
    let o = Command::new("sh")
        .arg(&script)
        .arg(dir)
        .output()
        .map_err(|e| format!("run {}: {e}", script.display()))?;
    if !o.status.success() {
        return Err(format!(
            "guest build failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(dir.join("hive-test-guest.elf"))
}

/// Reads the child's stdout until `DONE`, timestamping the first byte and the DONE line.
/// `at_done` runs while the process is still alive (to sample /proc).
fn watch(
    mut child: std::process::Child,
    t0: Instant,
    mut at_done: impl FnMut(u32) -> Option<u64>,
    kill_at_done: bool,
) -> Result<(Sample, String), String> {
    let mut out = child.stdout.take().ok_or("no stdout pipe")?;
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    let mut first = None;
    let mut done = None;
    let mut touched = None;
    let deadline = t0 + Duration::from_secs(60);
    while done.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("guest did not finish within 60 s".into());
        }
        let n = out
            .read(&mut buf)
            .map_err(|e| format!("read console: {e}"))?;
        if n == 0 {
            break;
        }
        if first.is_none() {
            first = Some(t0.elapsed());
        }
        text.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&text).contains("DONE ok=") {
            done = Some(t0.elapsed());
            touched = at_done(child.id());
        }
    }
    if kill_at_done {
        let _ = child.kill();
    }
    let pid = child.id() as i32;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our un-reaped child; status and usage point to valid locals.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if rc != pid {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()));
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let console = String::from_utf8_lossy(&text).into_owned();
    let (Some(first), Some(done)) = (first, done) else {
        return Err(format!(
            "no DONE line (exit {:?}); console:\n{console}\nstderr:\n{err}",
            std::process::ExitStatus::from_raw(status)
        ));
    };
    let guest_touched_kib = match touched {
        Some(k) => k,
        None => err
            .lines()
            .find_map(|l| l.strip_prefix("guest_resident_bytes="))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|b| b / 1024)
            .ok_or_else(|| format!("child did not report guest memory; stderr:\n{err}"))?,
    };
    Ok((
        Sample {
            first_byte: first,
            done,
            peak_rss_kib: usage.ru_maxrss as u64,
            guest_touched_kib,
        },
        console,
    ))
}

fn run_ours(cfg: &Path) -> Result<Sample, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let t0 = Instant::now();
    let child = Command::new(exe)
        .arg("--run-vmm")
        .arg(cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn our VMM: {e}"))?;
    let (s, console) = watch(child, t0, |_| None, false)?;
    check_console("hive-vmm", &console)?;
    Ok(s)
}

/// Resident KiB of QEMU's guest RAM mapping (the anonymous mapping of exactly `mib` MiB).
fn qemu_guest_rss_kib(pid: u32, mib: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let want = format!("Size:           {} kB", u64::from(mib) * 1024);
    let mut in_guest = false;
    let mut best: Option<u64> = None;
    for line in smaps.lines() {
        if line.starts_with("Size:") {
            in_guest = line.split_whitespace().nth(1) == want.split_whitespace().nth(1);
        } else if in_guest && line.starts_with("Rss:") {
            let kib = line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
            best = Some(best.map_or(kib, |b: u64| b.max(kib)));
        }
    }
    best
}

fn qemu_cmdline() -> String {
    // microvm has 24 virtio-mmio transports at 0xfeb00000 (512 bytes apart); devices fill them
    // from the top. Listing all lets the guest find them the way it finds ours.
    (0..24u64)
        .map(|i| {
            format!(
                "virtio_mmio.device=512@{:#x}:{}",
                0xfeb0_0000u64 + i * 512,
                5 + i
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn run_qemu(args: &Args, guest: &Path, disk: &Path, accel: &str) -> Result<Sample, String> {
    let mut cmd = Command::new(&args.qemu);
    cmd.args(["-M", "microvm,rtc=off,pic=off,pit=on", "-accel", accel]);
    if accel == "kvm" {
        // This nested KVM refuses IA32_ARCH_CAPABILITIES, which `-cpu host` would set.
        cmd.args(["-cpu", "host,-arch-capabilities"]);
    } else {
        cmd.args(["-cpu", "max"]);
    }
    cmd.args(["-m", &args.memory_mib.to_string(), "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-display",
            "none",
            "-serial",
            "stdio",
        ])
        .args(["-no-reboot", "-global", "virtio-mmio.force-legacy=false"])
        .arg("-kernel")
        .arg(guest)
        .args(["-append", &qemu_cmdline()])
        .arg("-drive")
        .arg(format!("id=d0,file={},format=raw,if=none", disk.display()))
        .args([
            "-device",
            "virtio-blk-device,drive=d0",
            "-device",
            "virtio-rng-device",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mib = args.memory_mib;
    let t0 = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", args.qemu))?;
    let (s, console) = watch(child, t0, |pid| qemu_guest_rss_kib(pid, mib), true)?;
    check_console(&format!("qemu-{accel}"), &console)?;
    Ok(s)
}

fn check_console(who: &str, console: &str) -> Result<(), String> {
    let ok = console.lines().any(|l| l.starts_with("OK block rw"))
        && console.lines().any(|l| l.starts_with("OK rng"));
    if !ok || console.contains("FAIL") {
        return Err(format!(
            "{who}: guest did not report OK block + rng:\n{console}"
        ));
    }
    Ok(())
}

fn median(mut v: Vec<Sample>) -> Sample {
    let mid = v.len() / 2;
    let pick = |v: &mut Vec<Sample>, key: fn(&Sample) -> u128| {
        v.sort_by_key(key);
        v[mid]
    };
    Sample {
        first_byte: pick(&mut v, |s| s.first_byte.as_nanos()).first_byte,
        done: pick(&mut v, |s| s.done.as_nanos()).done,
        peak_rss_kib: pick(&mut v, |s| u128::from(s.peak_rss_kib)).peak_rss_kib,
        guest_touched_kib: pick(&mut v, |s| u128::from(s.guest_touched_kib)).guest_touched_kib,
    }
}

/// A private scratch directory, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<Self, String> {
        let p = std::env::temp_dir().join(format!("hive-vmm-bench-{}", std::process::id()));
        std::fs::create_dir_all(&p).map_err(|e| format!("create {}: {e}", p.display()))?;
        Ok(Self(p))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bench(args: &Args) -> Result<(), String> {
    let dir = ScratchDir::new()?;
    let guest = match &args.guest {
        Some(g) => g.clone(),
        None => build_guest(dir.path())?,
    };
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .map_err(|e| format!("create disk: {e}"))?;
    let cfg_path = dir.path().join("vm.json");
    let cfg = serde_json::json!({
        "kernel": guest,
        "memory_mib": args.memory_mib,
        "block": [{"path": disk}],
        "rng": true,
    });
    std::fs::write(&cfg_path, cfg.to_string()).map_err(|e| format!("write config: {e}"))?;

    // QEMU: KVM if it boots the guest here, else TCG.
    let accel = match run_qemu(args, &guest, &disk, "kvm") {
        Ok(_) => "kvm",
        Err(e) => {
            eprintln!(
                "vmm-bench: QEMU with KVM failed here, using TCG: {}",
                e.lines().next().unwrap_or("")
            );
            "tcg"
        }
    };
    // Warm both (page cache, binaries), then alternate rounds so drift hits both alike.
    run_ours(&cfg_path)?;
    let mut ours = Vec::new();
    let mut qemu = Vec::new();
    for _ in 0..args.rounds.max(1) {
        ours.push(run_ours(&cfg_path)?);
        qemu.push(run_qemu(args, &guest, &disk, accel)?);
    }
    let (o, q) = (median(ours), median(qemu));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "vmm-bench: test guest (block + rng), {} MiB, 1 vCPU, median of {} rounds; QEMU microvm accel={accel}",
        args.memory_mib, args.rounds
    );
    println!(
        "{:<34} {:>12} {:>14} {:>8}",
        "",
        "hive-vmm",
        format!("qemu-{accel}"),
        "ratio"
    );
    let row = |name: &str, a: f64, b: f64, unit: &str| {
        println!(
            "{:<34} {:>10.1}{unit} {:>12.1}{unit} {:>7.3}x",
            name,
            a,
            b,
            if b > 0.0 { a / b } else { f64::NAN }
        );
    };
    row(
        "start -> first serial byte (ms)",
        ms(o.first_byte),
        ms(q.first_byte),
        "  ",
    );
    row("start -> guest DONE (ms)", ms(o.done), ms(q.done), "  ");
    row(
        "peak RSS (KiB)",
        o.peak_rss_kib as f64,
        q.peak_rss_kib as f64,
        "  ",
    );
    row(
        "guest memory touched (KiB)",
        o.guest_touched_kib as f64,
        q.guest_touched_kib as f64,
        "  ",
    );
    row(
        "VMM overhead = RSS - guest (KiB)",
        o.overhead_kib() as f64,
        q.overhead_kib() as f64,
        "  ",
    );
    Ok(())
}
