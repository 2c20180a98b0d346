//! Builds one VM from a validated [`VmConfig`] and runs it to the end, in the order a reader
//! expects: memory -> kernel -> devices -> command line and boot structures -> vCPUs -> run.
//!
//! The VM ends when the guest resets (i8042), a vCPU shuts down or fails, or the caller's stop
//! flag is set (SIGTERM). vCPU threads blocked in KVM_RUN are kicked out with a real-time signal.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::boot;
use super::boottimer::BootTimer;
use super::bus::{Bus, SharedTransport};
use super::config::{parse_mac, VmConfig};
use super::cpuid;
use super::eventloop;
use super::kvm::{self, Hypervisor, KvmHypervisor, Vcpu, VcpuStop, Vm};
use super::memory::{self, FIRST_DEVICE_IRQ, MMIO_BASE, MMIO_SIZE, SERIAL_IRQ};
use super::seccomp;
use super::serial;
use super::virtio::block::{self, Block};
use super::virtio::mmio::MmioTransport;
use super::virtio::net::{self, Net};
use super::virtio::rng::Rng;
use super::virtio::vsock::{self, Vsock};
use super::virtio::VirtioDevice;

/// Errors building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Hypervisor call failed.
    #[error(transparent)]
    Hypervisor(#[from] kvm::Error),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::Error),
    /// Kernel or boot structures.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// A disk.
    #[error("block device {index}")]
    Block {
        /// Index in the config.
        index: usize,
        /// Cause.
        #[source]
        source: block::Error,
    },
    /// A network interface.
    #[error("net device {index}")]
    Net {
        /// Index in the config.
        index: usize,
        /// Cause.
        #[source]
        source: hive_sys::tun::Error,
    },
    /// The vsock device.
    #[error("vsock device")]
    Vsock(#[source] vsock::Error),
    /// An eventfd could not be created.
    #[error("create eventfd for {0}")]
    EventFd(&'static str, #[source] std::io::Error),
    /// The console log could not be opened.
    #[error("open serial log {path}")]
    SerialLog {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("spawn {0} thread")]
    Spawn(&'static str, #[source] std::io::Error),
    /// The seccomp allow-list could not be installed (the VM was not started).
    #[error(transparent)]
    Seccomp(#[from] seccomp::Error),
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset itself through the i8042: its normal way to stop.
    Reset,
    /// A vCPU shut down (triple fault) or halted with interrupts off.
    Shutdown,
    /// A vCPU could not continue.
    VcpuFailed(String),
    /// The caller asked the VM to stop (SIGTERM).
    Stopped,
}

impl VmExit {
    /// Process exit code for `hive-box vmm`: 0 reset, 3 shutdown, 4 vCPU failure, 143 stopped.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Reset => 0,
            VmExit::Shutdown => 3,
            VmExit::VcpuFailed(_) => 4,
            VmExit::Stopped => 143,
        }
    }
}

/// How to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Install the VMM's seccomp allow-list on every thread once the VM is built (the
    /// `hive-box vmm` process does; in-process test harnesses cannot, it would confine them).
    /// Any thread the caller started must have finished starting (see [`seccomp::install`]).
    pub seccomp: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Report {
    /// How it ended.
    pub exit: VmExit,
    /// Guest RAM backed by host pages at the end (what the guest touched).
    pub guest_resident_bytes: u64,
    /// Time from the start of `run` to the end of the VM.
    pub elapsed: Duration,
    /// The kernel command line the guest got.
    pub cmdline: String,
}

/// Holds the VM's threads at their start until the builder says go (or abort): every thread is
/// fully started (its start-up syscalls done) before the seccomp filter goes on, and none runs
/// guest or device code before it is on. Unlike a barrier it can be aborted when a later thread
/// fails to spawn, so the ones already waiting exit instead of hanging.
struct StartGate {
    state: Mutex<(usize, Option<bool>)>,
    changed: Condvar,
}

impl StartGate {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new((0, None)),
            changed: Condvar::new(),
        })
    }

    /// Thread side: report arrival, wait for the decision; true means run.
    fn arrive_and_wait(&self) -> bool {
        let mut st = super::bus::lock(&self.state);
        st.0 += 1;
        self.changed.notify_all();
        loop {
            if let Some(go) = st.1 {
                return go;
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Builder side: wait until `n` threads have arrived.
    fn wait_for(&self, n: usize) {
        let mut st = super::bus::lock(&self.state);
        while st.0 < n {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn open(&self, go: bool) {
        super::bus::lock(&self.state).1 = Some(go);
        self.changed.notify_all();
    }
}

fn eventfd(what: &'static str) -> Result<EventFd, Error> {
    EventFd::new(EFD_NONBLOCK).map_err(|e| Error::EventFd(what, e))
}

/// Creates the configured virtio devices, in guest order: disks, NICs, vsock, rng.
fn create_devices(cfg: &VmConfig) -> Result<Vec<Box<dyn VirtioDevice>>, Error> {
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for (index, b) in cfg.block.iter().enumerate() {
        let dev = Block::open(&b.path, b.read_only, &b.rate_limit)
            .map_err(|source| Error::Block { index, source })?;
        devices.push(Box::new(dev));
    }
    for (index, n) in cfg.net.iter().enumerate() {
        let tap = net::open_tap(&n.tap).map_err(|source| Error::Net { index, source })?;
        let mac = n.mac.as_deref().and_then(parse_mac);
        devices.push(Box::new(Net::new(Box::new(tap), mac, &n.rate_limit)));
    }
    if let Some(v) = &cfg.vsock {
        devices.push(Box::new(
            Vsock::new(v.guest_cid, &v.uds_path).map_err(Error::Vsock)?,
        ));
    }
    if cfg.rng {
        devices.push(Box::new(Rng::new()));
    }
    Ok(devices)
}

/// Builds the VM and runs it until it ends or `stop` is set.
pub fn run(cfg: &VmConfig, stop: Arc<AtomicBool>, opts: RunOptions) -> Result<Report, Error> {
    let started = Instant::now();
    // Memory is declared before the VM so the VM (and its memslots) is dropped first.
    let mem = memory::create(cfg.memory_mib)?;
    let hv = KvmHypervisor::open_path(&cfg.kvm_device)?;
    let vm = hv.create_vm()?;
    vm.map_memory(&mem)?;
    vm.create_irqchip()?;

    let kernel = boot::load_kernel(&mem, &cfg.kernel, cfg.boot)?;
    tracing::debug!(?kernel, "kernel loaded");

    let mut cmdline = cfg.cmdline.trim().to_owned();
    let mut transports: Vec<SharedTransport> = Vec::new();
    for (i, device) in create_devices(cfg)?.into_iter().enumerate() {
        let base = MMIO_BASE + i as u64 * MMIO_SIZE;
        let irq = FIRST_DEVICE_IRQ + i as u32;
        let irqfd = eventfd("device interrupt")?;
        vm.register_irqfd(&irqfd, irq)?;
        tracing::debug!(device = device.name(), base, irq, "virtio-mmio device");
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        transports.push(Arc::new(Mutex::new(MmioTransport::new(
            device,
            mem.clone(),
            irqfd,
        ))));
    }
    let cmdline_len = boot::write_cmdline(&mem, &cmdline)?;
    let mem_size = u64::from(cfg.memory_mib) << 20;
    boot::write_boot_structures(&mem, &kernel, mem_size, cmdline_len, cfg.vcpus)?;

    let serial_irq = eventfd("serial interrupt")?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let out: Box<dyn Write + Send> = match &cfg.serial.path {
        Some(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| Error::SerialLog {
                    path: path.display().to_string(),
                    source,
                })?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let console = serial::console(
        serial_irq,
        out,
        cfg.serial.bytes_per_sec,
        cfg.serial.burst_bytes,
    );
    let wake = eventfd("device thread wake-up")?;
    let mut bus = Bus::new(
        console,
        transports.clone(),
        wake.try_clone()
            .map_err(|e| Error::EventFd("wake clone", e))?,
    );
    if cfg.boot_timer {
        bus = bus.with_boot_timer(BootTimer::new(super::process_start()));
    }
    let bus = Arc::new(bus);

    let mut vcpus = Vec::new();
    for id in 0..cfg.vcpus {
        let vcpu = vm.create_vcpu(id)?;
        let mut table = hv.supported_cpuid()?;
        cpuid::normalize(&mut table, id, cfg.vcpus, cfg.cpu);
        vcpu.set_cpuid(&table)?;
        vcpu.setup_lapic()?;
        if id == 0 {
            boot::setup_boot_vcpu(&vcpu, &kernel)?;
        }
        vcpus.push(vcpu);
    }

    let kick = kvm::kick_signal()?;
    let gate = StartGate::new();
    let device_stop = Arc::new(AtomicBool::new(false));
    let device_thread = {
        let devices = transports.clone();
        let stop = device_stop.clone();
        let gate = gate.clone();
        let wake = wake
            .try_clone()
            .map_err(|e| Error::EventFd("wake clone", e))?;
        std::thread::Builder::new()
            .name("vmm-devices".into())
            .spawn(move || {
                if gate.arrive_and_wait() {
                    eventloop::run(devices, wake, stop)
                }
            })
            .map_err(|e| Error::Spawn("device", e))?
    };

    let vcpu_stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<(u8, Result<VcpuStop, kvm::Error>)>();
    let mut handles = Vec::new();
    for mut vcpu in vcpus {
        let bus = bus.clone();
        let tx = tx.clone();
        let stop = vcpu_stop.clone();
        let thread_gate = gate.clone();
        let id = vcpu.id();
        let h = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                if !thread_gate.arrive_and_wait() {
                    return;
                }
                loop {
                    match vcpu.run(&*bus) {
                        Ok(VcpuStop::Interrupted) if !stop.load(Ordering::Acquire) => continue,
                        other => {
                            let _ = tx.send((id, other));
                            return;
                        }
                    }
                }
            })
            .map_err(|e| Error::Spawn("vCPU", e));
        match h {
            Ok(h) => handles.push(h),
            Err(e) => {
                gate.open(false);
                return Err(e);
            }
        }
    }
    drop(tx);

    gate.wait_for(1 + handles.len());
    let hardened = if opts.seccomp {
        seccomp::install()
    } else {
        Ok(())
    };
    gate.open(hardened.is_ok());
    if let Err(e) = hardened {
        for h in handles {
            let _ = h.join();
        }
        let _ = device_thread.join();
        return Err(e.into());
    }

    let exit = loop {
        if stop.load(Ordering::Acquire) {
            break VmExit::Stopped;
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok((id, Ok(VcpuStop::Reset))) => {
                tracing::info!(vcpu = id, "guest reset: stopping VM");
                break VmExit::Reset;
            }
            Ok((id, Ok(VcpuStop::Shutdown(how)))) => {
                tracing::warn!(vcpu = id, how, "vCPU shut down");
                break VmExit::Shutdown;
            }
            Ok((id, Ok(VcpuStop::Failed(why)))) => {
                tracing::error!(vcpu = id, why, "vCPU failed");
                break VmExit::VcpuFailed(why);
            }
            Ok((id, Ok(VcpuStop::Interrupted))) => {
                break VmExit::VcpuFailed(format!("vCPU {id} interrupted before stop"));
            }
            Ok((id, Err(e))) => {
                tracing::error!(vcpu = id, error = %e, "KVM_RUN failed");
                break VmExit::VcpuFailed(e.to_string());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break VmExit::VcpuFailed("all vCPU threads gone".into())
            }
        }
    };

    // Bring every vCPU thread out of KVM_RUN: a kick sent just before a thread re-enters the
    // ioctl is lost, so keep kicking until each has finished.
    vcpu_stop.store(true, Ordering::Release);
    for h in handles {
        while !h.is_finished() {
            // SAFETY: the pthread id comes from a JoinHandle we still own, so the thread has not
            // been joined/detached and the id is valid; the kick signal has a no-op handler.
            unsafe { libc::pthread_kill(h.as_pthread_t(), kick) };
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = h.join();
    }
    device_stop.store(true, Ordering::Release);
    let _ = wake.write(1);
    let _ = device_thread.join();
    bus.flush_console();

    Ok(Report {
        exit,
        guest_resident_bytes: memory::resident_bytes(&mem),
        elapsed: started.elapsed(),
        cmdline,
    })
}
