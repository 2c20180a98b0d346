//! The microVM backend: each cell is a guest kernel on the box's own VMM (`hive-box vmm`), the
//! cell daemon as its init, reached over virtio-vsock.
//!
//! The [jailed core](super::jailed) does the cell's directory, cgroup, network and helper; this
//! adds, per cell: `vm.json` (a typed [`VmConfig`] written with serde, checked against the host
//! paths first), `serial.log` and `run/` owned by the cell's VMM uid, cgroup limits of guest
//! memory plus a VMM allowance, a TAP in the cell's netns for the guest ([`create_guest_link`]:
//! routed, the netns masquerades the guest out of its `eth0`), and the jail: `hive-box jail`
//! running `hive-box vmm-launch` ([`hive_jail::launch`]), which gives the jail its own /dev/kvm
//! and /dev/net/tun owned by the cell's unprivileged uid, becomes that uid and execs
//! `hive-box vmm --config /cell/vm.json`. The jail's root holds only the VMM binary and its
//! shared libraries ([`hive_jail::libs`]), the cell's files and the guest's kernel and disks
//! (read-only). The box daemon reaches the cell daemon through the VMM's vsock muxer socket
//! ([`Connector::VsockMux`], guest port [`AGENT_PORT`]).
//!
//! The guest ending (i8042 reset, crash, panic with `panic=-1 reboot=t`) ends the VMM process,
//! hence the jail helper: `is_alive` turns false and the pool replaces the cell.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hive_jail::cgroup::{Hierarchy, Limits, MICROVM_DEVICES};
pub use hive_jail::launch::DevNum;
use hive_jail::launch::{launch_args, KVM_NODE, VMM_BINARY};
use hive_jail::{BindSpec, JailSpec, RootSpec};
use hive_proto::v1::SizeClass;
pub use hive_vmm::config::CpuTemplate;
use hive_vmm::config::{BlockConfig, NetConfig, SerialConfig, VmConfig, VsockConfig, MAX_VCPUS};
use hive_vmm::memory::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};
use hive_vmm::ratelimit::{BucketConfig, RateLimitConfig};

use super::jailed::{tail, CellKind, Jailed, Layout};
use super::{BackendError, CellSpec};
use crate::cell::Connector;
use crate::net::{
    create_guest_link, delete_tap, BoxNet, CELL_TAP, GUEST_LINK_ADDR, GUEST_LINK_GATEWAY,
};

/// Default first uid of the VMMs: cell slot N runs as uid (and gid) base + N, so no two cells
/// share one and none is a uid a host user has.
pub const DEFAULT_VMM_UID_BASE: u32 = 900_000;
/// Guest vsock port the cell daemon listens on (`hive.listen=vsock:1024`).
pub const AGENT_PORT: u32 = 1024;
/// Memory the cgroup allows on top of guest memory: the VMM's own heap, stacks, page tables,
/// device buffers and the page cache of the disk images it reads.
pub const VMM_OVERHEAD_MIB: u64 = 64;
/// Processes in a cell's cgroup besides one thread per vCPU: jail helper, VMM main, signal and
/// device threads, with room to spare.
pub const BASE_PIDS: u32 = 32;

/// Paths inside the jail.
const JAIL_VM_CONFIG: &str = "/cell/vm.json";
const JAIL_SERIAL: &str = "/cell/serial.log";
const JAIL_RUN: &str = "/cell/run";
const JAIL_KERNEL: &str = "/images/kernel";
const JAIL_ROOTFS_DISK: &str = "/images/rootfs.ext4";
const JAIL_BUILD_DISK: &str = "/images/build.ext4";
/// Name of the vsock muxer socket in `<cell>/run/`.
const VSOCK_SOCKET: &str = "v.sock";
/// The guest's console in the cell directory (rate-limited by the VMM).
const SERIAL_LOG: &str = "serial.log";

/// The files a microVM cell boots: kernel, root disk (/dev/vda) and build image disk (/dev/vdb).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFiles {
    /// Guest kernel (ELF vmlinux with a PVH note, or bzImage).
    pub kernel: PathBuf,
    /// Cell rootfs as an ext4 image, the cell daemon as init (attached read-only).
    pub rootfs_disk: PathBuf,
    /// Build image as an ext4 image (attached read-only, mounted by the cell daemon).
    pub build_disk: PathBuf,
}

/// Command that builds the guest kernel (prints `HIVE_GUEST_KERNEL=<dir>`).
pub const BUILD_KERNEL_CMD: &str = "deploy/guest/build-kernel.sh";
/// Command that builds the disk images (prints `HIVE_CELL_ROOTFS_DISK=` and `HIVE_BUILD_IMAGE_DISK=`).
pub const BUILD_IMAGES_CMD: &str = "deploy/images/build-images.sh";

#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    /// `<data-dir>/cells` holds one directory per cell.
    pub data_dir: PathBuf,
    /// Kernel, root disk, build disk.
    pub guest: GuestFiles,
    /// The `hive-box` binary, run as `hive-box jail` and, inside it, `hive-box vmm-launch` and
    /// `hive-box vmm`.
    pub vmm_binary: PathBuf,
    /// The KVM device on the box.
    pub kvm_device: PathBuf,
    /// The TUN/TAP control device on the box.
    pub tun_device: PathBuf,
    /// Cell slot N's VMM runs as uid and gid `vmm_uid_base + N`.
    pub vmm_uid_base: u32,
    /// Parent cgroup name for this box's cells.
    pub cgroup_parent: String,
    pub net: BoxNet,
    /// Appended to the guest kernel command line (e.g. `hive.log=debug`).
    pub extra_cmdline: String,
    /// CPU features the guest sees: `host` (everything KVM offers) or `baseline` (no
    /// XSAVE/AVX/POPCNT/CMPXCHG16B, for nested KVMs that cannot emulate them).
    pub cpu_template: CpuTemplate,
    /// Environment of the VMM process (e.g. RUST_LOG); its output goes to `<cell>/vmm.log`.
    pub vmm_env: BTreeMap<String, String>,
}

impl MicrovmConfig {
    /// Defaults for everything but the data dir, guest files, network and cgroup parent.
    pub fn new(data_dir: PathBuf, guest: GuestFiles, net: BoxNet, cgroup_parent: String) -> Self {
        MicrovmConfig {
            data_dir,
            guest,
            vmm_binary: std::env::current_exe().unwrap_or_else(|_| "hive-box".into()),
            kvm_device: PathBuf::from("/dev/kvm"),
            tun_device: PathBuf::from("/dev/net/tun"),
            vmm_uid_base: DEFAULT_VMM_UID_BASE,
            cgroup_parent,
            net,
            extra_cmdline: String::new(),
            cpu_template: CpuTemplate::Host,
            vmm_env: BTreeMap::new(),
        }
    }
}

/// The microVM's part of a [`Jailed`] backend.
pub struct MicrovmKind {
    cfg: MicrovmConfig,
    /// Read-only binds of the shared libraries the VMM binary loads.
    libs: Vec<PathBuf>,
    /// Device numbers of KVM and TUN, for the jail's own nodes.
    kvm_dev: DevNum,
    tun_dev: DevNum,
    /// Empty directory: the lower layer of every VMM jail's root.
    empty_root: PathBuf,
}

impl std::fmt::Debug for MicrovmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicrovmKind")
            .field("cfg", &self.cfg)
            .field("libs", &self.libs)
            .finish()
    }
}

/// The microvm backend.
pub type MicrovmBackend = Jailed<MicrovmKind>;

fn unavailable(reason: String) -> BackendError {
    BackendError::Unavailable {
        backend: "microvm",
        reason,
    }
}

impl Jailed<MicrovmKind> {
    /// Checks the guest files, the KVM device and the helpers; fails with a message naming what is
    /// missing (and what builds it) instead of failing every cell later.
    pub fn new(mut cfg: MicrovmConfig) -> Result<Self, BackendError> {
        // Every path below ends up in a jail spec, which wants absolute paths.
        for p in [
            &mut cfg.guest.kernel,
            &mut cfg.guest.rootfs_disk,
            &mut cfg.guest.build_disk,
            &mut cfg.vmm_binary,
        ] {
            if let Ok(abs) = fs::canonicalize(&*p) {
                *p = abs;
            }
        }
        let g = &cfg.guest;
        for (what, path, build) in [
            ("guest kernel", &g.kernel, BUILD_KERNEL_CMD),
            ("cell rootfs disk image", &g.rootfs_disk, BUILD_IMAGES_CMD),
            ("build image disk", &g.build_disk, BUILD_IMAGES_CMD),
        ] {
            if !path.is_file() {
                return Err(unavailable(format!(
                    "{what} {}: no such file ({build} builds it)",
                    path.display()
                )));
            }
        }
        if !cfg.vmm_binary.is_file() {
            return Err(unavailable(format!(
                "VMM binary {}: no such file",
                cfg.vmm_binary.display()
            )));
        }
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cfg.kvm_device)
            .map_err(|e| {
                unavailable(format!(
                    "open {}: {e} (the host needs KVM; use --backend sandbox without it)",
                    cfg.kvm_device.display()
                ))
            })?;
        let dev = |path: &Path| {
            DevNum::of(path).map_err(|e| unavailable(format!("stat {}: {e}", path.display())))
        };
        let kvm_dev = dev(&cfg.kvm_device)?;
        let tun_dev = dev(&cfg.tun_device)?;
        if cfg
            .vmm_uid_base
            .checked_add(cfg.net.subnet.slots())
            .is_none()
        {
            return Err(unavailable(format!(
                "VMM uid base {} + {} cell slots overflows",
                cfg.vmm_uid_base,
                cfg.net.subnet.slots()
            )));
        }
        // The VMM is this binary re-executed: its jail gets the libraries the loader would map.
        let libs = hive_jail::libs::shared_libs(&cfg.vmm_binary).map_err(|e| {
            unavailable(format!(
                "shared libraries of {}: {}",
                cfg.vmm_binary.display(),
                hive_sys::error_chain(&e)
            ))
        })?;
        let cgroups = Hierarchy::detect()?;
        let dir_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BackendError::CellDir { path, source }
        };
        let cells = cfg.data_dir.join("cells");
        fs::create_dir_all(&cells).map_err(dir_err(&cells))?;
        cfg.data_dir = fs::canonicalize(&cfg.data_dir).map_err(dir_err(&cfg.data_dir))?;
        let empty_root = cfg.data_dir.join("vmm-root");
        fs::create_dir_all(&empty_root).map_err(dir_err(&empty_root))?;
        let g = &cfg.guest;
        tracing::info!(
            kernel = %g.kernel.display(),
            rootfs_disk = %g.rootfs_disk.display(),
            build_disk = %g.build_disk.display(),
            cgroup = cgroups.version(),
            uid_base = cfg.vmm_uid_base,
            "microvm backend: one jailed VMM per cell (own uid, no capabilities, seccomp, \
             no_new_privs)"
        );
        let layout = Layout {
            data_dir: cfg.data_dir.clone(),
            cgroup_parent: cfg.cgroup_parent.clone(),
            net: cfg.net.clone(),
            helper: cfg.vmm_binary.clone(),
        };
        let kind = MicrovmKind {
            cfg,
            libs,
            kvm_dev,
            tun_dev,
            empty_root,
        };
        Jailed::with_kind(kind, layout, cgroups)
    }

    pub fn config(&self) -> &MicrovmConfig {
        &self.kind().cfg
    }

    /// The uid (and gid) the VMM of the cell in `slot` runs as.
    pub fn vmm_uid(&self, slot: u32) -> u32 {
        self.kind().vmm_uid(slot)
    }

    /// Host side of the cell's vsock muxer (guest connections to host port P go to `<this>_P`).
    pub fn vsock_path(&self, id: &str) -> PathBuf {
        self.run_dir(id).join(VSOCK_SOCKET)
    }

    /// The guest's serial console.
    pub fn serial_log(&self, id: &str) -> PathBuf {
        self.cell_dir(id).join(SERIAL_LOG)
    }

    /// The VMM's (and jail helper's) own stdout/stderr.
    pub fn vmm_log(&self, id: &str) -> PathBuf {
        self.cell_dir(id).join(MicrovmKind::LOG_FILE)
    }
}

impl MicrovmKind {
    fn vmm_uid(&self, slot: u32) -> u32 {
        self.cfg.vmm_uid_base + slot
    }
}

impl CellKind for MicrovmKind {
    const NAME: &'static str = "microvm";
    const LOG_FILE: &'static str = "vmm.log";
    const READY_POLL: (Duration, Duration) = (Duration::from_millis(5), Duration::from_millis(100));

    fn prepare(&self, spec: &CellSpec, dir: &Path) -> Result<Limits, BackendError> {
        let dir_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BackendError::CellDir { path, source }
        };
        // The config is checked against the host paths before anything is started, so a bad
        // class or file is an error here and not a VMM that exits at once.
        let shape = Shape::of(&spec.size_class);
        let host_files = VmFiles {
            kernel: self.cfg.guest.kernel.clone(),
            rootfs_disk: self.cfg.guest.rootfs_disk.clone(),
            build_disk: self.cfg.guest.build_disk.clone(),
            serial: dir.join(SERIAL_LOG),
            vsock: dir.join("run").join(VSOCK_SOCKET),
            kvm: self.cfg.kvm_device.clone(),
        };
        let serial = &host_files.serial;
        fs::File::create(serial).map_err(dir_err(serial))?;
        // The VMM's uid writes its console and makes its sockets; everything else stays root's.
        let uid = self.vmm_uid(spec.slot);
        for p in [serial.clone(), dir.join("run")] {
            std::os::unix::fs::chown(&p, Some(uid), Some(uid)).map_err(dir_err(&p))?;
        }
        vm_config(
            spec,
            shape,
            &host_files,
            &self.cfg.extra_cmdline,
            self.cfg.cpu_template,
        )
        .validate()
        .map_err(|e| unavailable(format!("VM config for cell {}: {e}", spec.id)))?;
        let vm_path = dir.join("vm.json");
        let jail_cfg = vm_config(
            spec,
            shape,
            &VmFiles::in_jail(),
            &self.cfg.extra_cmdline,
            self.cfg.cpu_template,
        );
        fs::write(
            &vm_path,
            serde_json::to_vec_pretty(&jail_cfg)
                .map_err(std::io::Error::other)
                .map_err(dir_err(&vm_path))?,
        )
        .map_err(dir_err(&vm_path))?;
        Ok(Limits {
            vcpus: u32::from(shape.vcpus),
            memory_bytes: (u64::from(shape.memory_mib) + VMM_OVERHEAD_MIB) * 1024 * 1024,
            pids_max: BASE_PIDS + u32::from(shape.vcpus),
            devices: MICROVM_DEVICES,
            devices_v2: false,
        })
    }

    async fn attach(&self, spec: &CellSpec, netns: &Path) -> Result<(), BackendError> {
        create_guest_link(netns, CELL_TAP, self.vmm_uid(spec.slot)).await?;
        Ok(())
    }

    async fn detach(&self, netns: &Path) {
        delete_tap(netns, CELL_TAP).await;
    }

    fn jail_spec(
        &self,
        spec: &CellSpec,
        dir: &Path,
        netns: PathBuf,
        cgroup_procs: Vec<PathBuf>,
    ) -> JailSpec {
        let ro = |source: &Path, target: &str| BindSpec {
            source: source.to_path_buf(),
            target: target.into(),
            readonly: true,
            idmap: false,
        };
        let rw = |source: &Path, target: &str| BindSpec {
            source: source.to_path_buf(),
            target: target.into(),
            readonly: false,
            idmap: false,
        };
        let g = &self.cfg.guest;
        let mut binds = vec![
            ro(&self.cfg.vmm_binary, VMM_BINARY),
            ro(&g.kernel, JAIL_KERNEL),
            ro(&g.rootfs_disk, JAIL_ROOTFS_DISK),
            ro(&g.build_disk, JAIL_BUILD_DISK),
            ro(&dir.join("vm.json"), JAIL_VM_CONFIG),
            rw(&dir.join(SERIAL_LOG), JAIL_SERIAL),
            rw(&dir.join("run"), JAIL_RUN),
        ];
        for lib in &self.libs {
            binds.push(ro(lib, &lib.to_string_lossy()));
        }
        let mut env = self.cfg.vmm_env.clone();
        env.entry("RUST_LOG".into())
            .or_insert_with(|| "info".into());
        JailSpec {
            hostname: format!("vmm-{}", spec.id),
            root: RootSpec {
                lower: self.empty_root.clone(),
                upper: dir.join("upper"),
                work: dir.join("work"),
                merged: dir.join("rootfs"),
                idmapped_lower: None,
            },
            binds,
            netns: Some(netns),
            cgroup_procs,
            pid_file: dir.join("pid"),
            program: VMM_BINARY.into(),
            args: launch_args(
                self.vmm_uid(spec.slot),
                self.kvm_dev,
                self.tun_dev,
                Path::new(JAIL_VM_CONFIG),
            ),
            env,
            seccomp: true,
            seccomp_profile: hive_jail::SeccompProfile::DenyList,
            userns: None,
            keep_caps: None,
            sysfs: false,
            tmpfs: Vec::new(),
        }
    }

    fn connector(&self, dir: &Path) -> Connector {
        Connector::VsockMux {
            path: dir.join("run").join(VSOCK_SOCKET),
            port: AGENT_PORT,
        }
    }

    /// The exit code's meaning plus the ends of the serial console and of the VMM's log.
    fn death_detail(&self, dir: &Path, exit: Option<Option<i32>>) -> String {
        let how = match exit {
            Some(code) => describe_exit(code),
            None => "no VMM process of this daemon".into(),
        };
        format!(
            "VMM exited ({how}); serial: {}; vmm: {}",
            tail(&dir.join(SERIAL_LOG), 5),
            tail(&dir.join(Self::LOG_FILE), 3)
        )
    }

    fn last_words(&self, dir: &Path) -> String {
        format!("serial: {}", tail(&dir.join(SERIAL_LOG), 5))
    }
}

/// What an exit code of `hive-box jail` running `hive-box vmm` means.
pub fn describe_exit(code: Option<i32>) -> String {
    match code {
        Some(0) => "code 0: the guest reset the VM".into(),
        Some(2) => "code 2: VM set-up failed".into(),
        Some(3) => "code 3: a vCPU shut down (triple fault)".into(),
        Some(4) => "code 4: a vCPU failed".into(),
        Some(126) => "code 126: the jail helper failed".into(),
        Some(127) => "code 127: the jail could not start the VMM".into(),
        Some(143) => "code 143: stopped by SIGTERM".into(),
        Some(c) if c > 128 => format!("code {c}: killed by signal {}", c - 128),
        Some(c) => format!("code {c}"),
        None => "killed by a signal".into(),
    }
}

/// A size class as the VMM can give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    vcpus: u8,
    memory_mib: u32,
}

impl Shape {
    fn of(class: &SizeClass) -> Shape {
        let vcpus = class.vcpus.clamp(1, u32::from(MAX_VCPUS)) as u8;
        let want = if class.memory_mib == 0 {
            512
        } else {
            class.memory_mib
        };
        let memory_mib = want.clamp(u64::from(MIN_MEMORY_MIB), u64::from(MAX_MEMORY_MIB)) as u32;
        if u64::from(memory_mib) != want || u32::from(vcpus) != class.vcpus.max(1) {
            tracing::warn!(
                class = %class.name,
                vcpus = class.vcpus,
                memory_mib = class.memory_mib,
                got_vcpus = vcpus,
                got_memory_mib = memory_mib,
                "size class is outside what the VMM gives one guest (at most {MAX_VCPUS} vCPUs \
                 and {MAX_MEMORY_MIB} MiB); clamped"
            );
        }
        Shape { vcpus, memory_mib }
    }
}

/// The files a VM config names, either as the box sees them or as the jailed VMM does.
#[derive(Debug, Clone)]
struct VmFiles {
    kernel: PathBuf,
    rootfs_disk: PathBuf,
    build_disk: PathBuf,
    serial: PathBuf,
    vsock: PathBuf,
    kvm: PathBuf,
}

impl VmFiles {
    fn in_jail() -> VmFiles {
        VmFiles {
            kernel: JAIL_KERNEL.into(),
            rootfs_disk: JAIL_ROOTFS_DISK.into(),
            build_disk: JAIL_BUILD_DISK.into(),
            serial: JAIL_SERIAL.into(),
            vsock: Path::new(JAIL_RUN).join(VSOCK_SOCKET),
            kvm: KVM_NODE.into(),
        }
    }
}

/// The guest kernel command line (as `deploy/guest/boot-check.sh` boots it, but with the agent on
/// vsock and the NIC on the routed TAP link); the VMM appends its `virtio_mmio.device=` entries.
pub fn guest_cmdline(cell_id: &str, extra: &str) -> String {
    let mut c = format!(
        "console=ttyS0 reboot=t panic=-1 root=/dev/vda ro rootfstype=ext4 rootwait \
         init=/sbin/hive-cell ip={GUEST_LINK_ADDR}::{GUEST_LINK_GATEWAY}:255.255.255.252:cell:eth0:off \
         hive.cell_id={cell_id} hive.listen=vsock:{AGENT_PORT} hive.build_disk=/dev/vdb \
         hive.boot_timer=1 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    );
    if !extra.trim().is_empty() {
        c.push(' ');
        c.push_str(extra.trim());
    }
    c
}

/// A locally administered unicast MAC from the cell id (stable, distinct per cell).
fn guest_mac(cell_id: &str) -> String {
    let mut b = [0u8; 4];
    for (i, chunk) in cell_id.as_bytes().chunks(2).take(4).enumerate() {
        b[i] = std::str::from_utf8(chunk)
            .ok()
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    format!("02:48:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

/// A one-second bucket of `per_sec` tokens (so the burst is one second's worth); 0 = unlimited.
fn bucket(per_sec: u64) -> Option<BucketConfig> {
    (per_sec > 0).then_some(BucketConfig {
        size: per_sec,
        refill_time_ms: 1000,
    })
}

/// The VM description for `spec` with the files at `files` (host paths to validate before start,
/// jail paths for the file the VMM reads).
fn vm_config(
    spec: &CellSpec,
    shape: Shape,
    files: &VmFiles,
    extra_cmdline: &str,
    cpu: CpuTemplate,
) -> VmConfig {
    let class = &spec.size_class;
    let disk_limit = RateLimitConfig {
        bandwidth: bucket(class.disk_bytes_per_sec),
        ops: bucket(class.disk_ops_per_sec),
    };
    let net_limit = RateLimitConfig {
        bandwidth: bucket(class.net_bytes_per_sec),
        ops: None,
    };
    let disk = |path: &Path| BlockConfig {
        path: path.to_path_buf(),
        read_only: true,
        rate_limit: disk_limit,
    };
    VmConfig {
        cmdline: guest_cmdline(&spec.id, extra_cmdline),
        vcpus: shape.vcpus,
        cpu,
        kvm_device: files.kvm.clone(),
        serial: SerialConfig {
            path: Some(files.serial.clone()),
            ..SerialConfig::default()
        },
        block: vec![disk(&files.rootfs_disk), disk(&files.build_disk)],
        net: vec![NetConfig {
            tap: CELL_TAP.into(),
            mac: Some(guest_mac(&spec.id)),
            rate_limit: net_limit,
        }],
        vsock: Some(VsockConfig {
            guest_cid: 3,
            uds_path: files.vsock.clone(),
        }),
        rng: true,
        // The cell daemon marks init start and readiness; vmm.log gets the times from VMM exec.
        boot_timer: true,
        ..VmConfig::new(&files.kernel, shape.memory_mib)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(class: SizeClass) -> CellSpec {
        CellSpec {
            id: "0123456789ab".into(),
            size_class: class,
            slot: 3,
        }
    }

    #[test]
    fn vm_config_follows_the_class_and_parses() {
        let class = SizeClass {
            name: "small".into(),
            vcpus: 2,
            memory_mib: 1024,
            net_bytes_per_sec: 1_000_000,
            disk_bytes_per_sec: 50_000_000,
            disk_ops_per_sec: 2000,
            ..Default::default()
        };
        let s = spec(class);
        let v = vm_config(
            &s,
            Shape::of(&s.size_class),
            &VmFiles::in_jail(),
            "hive.log=debug",
            CpuTemplate::Host,
        );
        // What the VMM reads back from vm.json.
        let text = serde_json::to_string(&v).expect("serializes");
        let cfg: VmConfig = serde_json::from_str(&text).expect("matches the VMM's schema");
        assert_eq!(cfg, v);
        assert_eq!((cfg.vcpus, cfg.memory_mib), (2, 1024));
        assert_eq!(cfg.kernel, Path::new(JAIL_KERNEL));
        assert_eq!(cfg.kvm_device, Path::new(KVM_NODE));
        assert_eq!(cfg.block.len(), 2);
        assert!(cfg.block.iter().all(|b| b.read_only));
        assert_eq!(cfg.cpu, CpuTemplate::Host);
        assert_eq!(cfg.block[0].path, Path::new(JAIL_ROOTFS_DISK));
        assert_eq!(cfg.block[1].path, Path::new(JAIL_BUILD_DISK));
        let disk = cfg.block[0].rate_limit;
        assert_eq!(disk.bandwidth.map(|b| b.size), Some(50_000_000));
        assert_eq!(
            disk.ops.map(|b| (b.size, b.refill_time_ms)),
            Some((2000, 1000))
        );
        assert_eq!(cfg.net[0].tap, CELL_TAP);
        assert_eq!(cfg.net[0].mac.as_deref(), Some("02:48:01:23:45:67"));
        assert_eq!(
            cfg.net[0].rate_limit.bandwidth.map(|b| b.size),
            Some(1_000_000)
        );
        assert!(cfg.net[0].rate_limit.ops.is_none());
        let vsock = cfg.vsock.expect("vsock");
        assert_eq!(vsock.uds_path, Path::new("/cell/run/v.sock"));
        assert!(cfg.rng);
        assert!(cfg.boot_timer);
        assert_eq!(cfg.serial.path.as_deref(), Some(Path::new(JAIL_SERIAL)));
        for word in [
            "root=/dev/vda",
            "init=/sbin/hive-cell",
            "hive.cell_id=0123456789ab",
            "hive.listen=vsock:1024",
            "hive.build_disk=/dev/vdb",
            "hive.boot_timer=1",
            "ip=169.254.100.2::169.254.100.1:255.255.255.252:cell:eth0:off",
            "panic=-1",
            "hive.log=debug",
        ] {
            assert!(
                cfg.cmdline.split(' ').any(|w| w == word),
                "{word} in {}",
                cfg.cmdline
            );
        }
    }

    #[test]
    fn unlimited_class_has_no_buckets_and_big_classes_keep_their_memory() {
        let class = SizeClass {
            name: "large".into(),
            vcpus: 64,
            memory_mib: 8192,
            ..Default::default()
        };
        let s = spec(class);
        let cfg = vm_config(
            &s,
            Shape::of(&s.size_class),
            &VmFiles::in_jail(),
            "",
            CpuTemplate::Baseline,
        );
        assert_eq!(cfg.vcpus, MAX_VCPUS);
        assert_eq!(cfg.cpu, CpuTemplate::Baseline);
        // 8 GiB fits (RAM continues above the MMIO hole); only vCPUs are clamped.
        assert_eq!(cfg.memory_mib, 8192);
        assert!(
            cfg.block[0].rate_limit.bandwidth.is_none() && cfg.block[0].rate_limit.ops.is_none()
        );
        assert!(cfg.net[0].rate_limit.bandwidth.is_none());
    }

    #[test]
    fn exit_codes_are_explained() {
        assert!(describe_exit(Some(0)).contains("reset"));
        assert!(describe_exit(Some(2)).contains("set-up"));
        assert!(describe_exit(Some(137)).contains("signal 9"));
        assert!(describe_exit(None).contains("signal"));
    }
}
