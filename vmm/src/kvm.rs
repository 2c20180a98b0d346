//! The hypervisor behind a trait, and its thin KVM implementation.
//!
//! [`Hypervisor`], [`Vm`] and [`Vcpu`] are the only things the builder and boot code call, so the
//! rest of the VMM (devices, boot layout, config) is tested without `/dev/kvm`. Register state uses
//! the kvm-bindings structs directly: x86-64 KVM is the only target and a second set of register
//! types would be translation for its own sake.
//!
//! A vCPU runs in [`Vcpu::run`] until something needs the VMM's attention beyond port/MMIO I/O
//! (those are dispatched to an [`IoHandler`] inside the loop): a guest reset requested through a
//! device, a triple fault, a failed entry, or a signal kick (see [`kick_signal`]).

use std::os::fd::AsRawFd;

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_pit_config, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
    CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::memory::KVM_TSS_ADDR;

/// Errors from the hypervisor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The KVM device could not be opened.
    #[error("open {0}")]
    Open(String, #[source] kvm_ioctls::Error),
    /// The KVM API version is not 12.
    #[error("KVM API version {0}, need 12")]
    ApiVersion(i32),
    /// KVM_CREATE_VM failed.
    #[error("create VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("get supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// KVM_SET_TSS_ADDR failed.
    #[error("set TSS address")]
    Tss(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP failed.
    #[error("create in-kernel irqchip")]
    Irqchip(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_PIT2 failed.
    #[error("create in-kernel PIT")]
    Pit(#[source] kvm_ioctls::Error),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("map guest memory slot {slot} at {guest_addr:#x} ({size} bytes)")]
    MapMemory {
        /// Slot.
        slot: u32,
        /// Guest physical address.
        guest_addr: u64,
        /// Size.
        size: u64,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_IRQFD failed.
    #[error("register irqfd for GSI {gsi}")]
    Irqfd {
        /// GSI.
        gsi: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_CREATE_VCPU failed.
    #[error("create vCPU {id}")]
    CreateVcpu {
        /// vCPU id.
        id: u8,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A vCPU register ioctl failed.
    #[error("vCPU {what}")]
    VcpuState {
        /// Which ioctl.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_RUN failed with something other than EINTR/EAGAIN.
    #[error("KVM_RUN")]
    Run(#[source] kvm_ioctls::Error),
    /// The kick signal handler could not be installed.
    #[error("install vCPU kick signal handler")]
    KickSignal(#[source] vmm_sys_util::errno::Error),
}

/// What a device wants after handling an I/O exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    /// Keep running.
    Continue,
    /// The guest asked for a reset (i8042): stop the VM.
    Reset,
}

/// Port and MMIO dispatch, shared by every vCPU thread.
pub trait IoHandler: Sync {
    /// `in` from `port`; fill `data`.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// `out` to `port`.
    fn pio_write(&self, port: u16, data: &[u8]) -> IoAction;
    /// MMIO read at `addr`; fill `data`. Must be free of side effects: KVM may exit twice.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// MMIO write at `addr`.
    fn mmio_write(&self, addr: u64, data: &[u8]) -> IoAction;
}

/// Why [`Vcpu::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// A device asked for a reset (the normal way the guest stops).
    Reset,
    /// Triple fault, or HLT with interrupts off; says which and where the vCPU was.
    Shutdown(String),
    /// A signal kicked the vCPU out of KVM_RUN; the caller checks why.
    Interrupted,
    /// The vCPU cannot go on (failed entry, internal error, unhandled exit).
    Failed(String),
}

/// A hypervisor that creates VMs.
pub trait Hypervisor {
    /// Its VM type.
    type Vm: Vm;
    /// Creates an empty VM.
    fn create_vm(&self) -> Result<Self::Vm, Error>;
    /// CPUID leaves the hypervisor can expose.
    fn supported_cpuid(&self) -> Result<CpuId, Error>;
}

/// A VM: memory, interrupt controller, vCPUs.
pub trait Vm {
    /// Its vCPU type.
    type Vcpu: Vcpu;
    /// Maps every region of `mem` into the guest. `mem` must outlive the VM.
    fn map_memory(&self, mem: &GuestMemoryMmap) -> Result<(), Error>;
    /// In-kernel IOAPIC + PIC + LAPICs and PIT.
    fn create_irqchip(&self) -> Result<(), Error>;
    /// Writing 1 to `fd` raises `gsi`.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), Error>;
    /// Creates vCPU `id` (0 is the boot processor).
    fn create_vcpu(&self, id: u8) -> Result<Self::Vcpu, Error>;
}

/// One virtual CPU.
pub trait Vcpu: Send {
    /// Sets the CPUID table.
    fn set_cpuid(&self, cpuid: &CpuId) -> Result<(), Error>;
    /// Reads special registers.
    fn sregs(&self) -> Result<kvm_sregs, Error>;
    /// Writes special registers.
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), Error>;
    /// Writes general registers.
    fn set_regs(&self, regs: &kvm_regs) -> Result<(), Error>;
    /// Writes FPU state.
    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), Error>;
    /// Writes MSRs.
    fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<(), Error>;
    /// Local APIC LINT0 = ExtINT, LINT1 = NMI, as firmware would leave it.
    fn setup_lapic(&self) -> Result<(), Error>;
    /// Runs until something other than port/MMIO I/O needs the VMM.
    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuStop, Error>;
}

/// The real thing: /dev/kvm.
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    /// Opens /dev/kvm and checks the API version.
    pub fn open() -> Result<Self, Error> {
        Self::open_path(std::path::Path::new("/dev/kvm"))
    }

    /// Opens the KVM device at `path` (a jail may bind it elsewhere).
    pub fn open_path(path: &std::path::Path) -> Result<Self, Error> {
        let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
            Error::Open(
                path.display().to_string(),
                kvm_ioctls::Error::new(libc::EINVAL),
            )
        })?;
        let kvm =
            Kvm::new_with_path(&cpath).map_err(|e| Error::Open(path.display().to_string(), e))?;
        let v = kvm.get_api_version();
        if v != 12 {
            return Err(Error::ApiVersion(v));
        }
        Ok(Self { kvm })
    }
}

impl Hypervisor for KvmHypervisor {
    type Vm = KvmVm;

    fn create_vm(&self) -> Result<KvmVm, Error> {
        let fd = self.kvm.create_vm().map_err(Error::CreateVm)?;
        Ok(KvmVm { fd })
    }

    fn supported_cpuid(&self) -> Result<CpuId, Error> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::SupportedCpuid)
    }
}

/// A KVM VM.
pub struct KvmVm {
    fd: VmFd,
}

impl Vm for KvmVm {
    type Vcpu = KvmVcpu;

    fn map_memory(&self, mem: &GuestMemoryMmap) -> Result<(), Error> {
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("offset 0 of a mapped region is always valid")
                as u64;
            let r = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
            };
            // SAFETY: `host` is the start of a live mmap of `region.len()` bytes owned by `mem`;
            // the caller keeps `mem` alive for as long as the VM exists (builder holds both).
            unsafe { self.fd.set_user_memory_region(r) }.map_err(|source| Error::MapMemory {
                slot,
                guest_addr: region.start_addr().0,
                size: region.len(),
                source,
            })?;
        }
        Ok(())
    }

    fn create_irqchip(&self) -> Result<(), Error> {
        self.fd.set_tss_address(KVM_TSS_ADDR).map_err(Error::Tss)?;
        self.fd.create_irq_chip().map_err(Error::Irqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(Error::Pit)
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), Error> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(|source| Error::Irqfd { gsi, source })
    }

    fn create_vcpu(&self, id: u8) -> Result<KvmVcpu, Error> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|source| Error::CreateVcpu { id, source })?;
        Ok(KvmVcpu { fd, id })
    }
}

/// A KVM vCPU.
pub struct KvmVcpu {
    fd: VcpuFd,
    id: u8,
}

impl KvmVcpu {
    /// The vCPU id.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The vCPU file descriptor number (for logs).
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// `what` and the vCPU's registers that say where it was (for a shutdown's log line).
    /// On AMD, KVM resets a vCPU as it reports a triple fault: then there is nothing to say.
    fn where_(&self, what: &str) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) if r.rip == 0xfff0 && s.cr0 == 0x10 => {
                format!("{what} (the vCPU was reset to its power-on state)")
            }
            (Ok(r), Ok(s)) => format!(
                "{what} at rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} \
                 cr4={:#x} efer={:#x}",
                r.rip, r.rsp, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            ),
            (Err(e), _) | (_, Err(e)) => format!("{what} (registers unreadable: {e})"),
        }
    }
}

fn state(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::VcpuState { what, source }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *byte as std::os::raw::c_char;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

impl Vcpu for KvmVcpu {
    fn set_cpuid(&self, cpuid: &CpuId) -> Result<(), Error> {
        self.fd.set_cpuid2(cpuid).map_err(state("set CPUID"))
    }

    fn sregs(&self) -> Result<kvm_sregs, Error> {
        self.fd.get_sregs().map_err(state("get sregs"))
    }

    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), Error> {
        self.fd.set_sregs(sregs).map_err(state("set sregs"))
    }

    fn set_regs(&self, regs: &kvm_regs) -> Result<(), Error> {
        self.fd.set_regs(regs).map_err(state("set regs"))
    }

    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), Error> {
        self.fd.set_fpu(fpu).map_err(state("set FPU"))
    }

    fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<(), Error> {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = msrs
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| Error::VcpuState {
            what: "build MSR list",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let written = self.fd.set_msrs(&msrs).map_err(state("set MSRs"))?;
        if written != entries.len() {
            return Err(Error::VcpuState {
                what: "set MSRs (some refused)",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }
        Ok(())
    }

    fn setup_lapic(&self) -> Result<(), Error> {
        let mut l = self.fd.get_lapic().map_err(state("get LAPIC"))?;
        let lint0 = lapic_reg(&l, APIC_LVT0);
        set_lapic_reg(
            &mut l,
            APIC_LVT0,
            with_delivery_mode(lint0, APIC_MODE_EXTINT),
        );
        let lint1 = lapic_reg(&l, APIC_LVT1);
        set_lapic_reg(&mut l, APIC_LVT1, with_delivery_mode(lint1, APIC_MODE_NMI));
        self.fd.set_lapic(&l).map_err(state("set LAPIC"))
    }

    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuStop, Error> {
        loop {
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => io.pio_read(port, data),
                Ok(VcpuExit::IoOut(port, data)) => {
                    if io.pio_write(port, data) == IoAction::Reset {
                        return Ok(VcpuStop::Reset);
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => io.mmio_read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if io.mmio_write(addr, data) == IoAction::Reset {
                        return Ok(VcpuStop::Reset);
                    }
                }
                // With the in-kernel irqchip HLT blocks in KVM; an exit here means interrupts are
                // off for good, which for our guests means "stopped".
                Ok(VcpuExit::Hlt) => return Ok(VcpuStop::Shutdown(self.where_("halted"))),
                Ok(VcpuExit::Shutdown) => {
                    return Ok(VcpuStop::Shutdown(self.where_("triple fault")))
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return Ok(VcpuStop::Failed(format!(
                        "entry failed: hardware reason {reason:#x} on cpu {cpu}"
                    )))
                }
                Ok(VcpuExit::InternalError) => {
                    return Ok(VcpuStop::Failed(
                        "KVM internal error (emulation failure?)".into(),
                    ))
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return Ok(VcpuStop::Failed(format!("system event {kind}")))
                }
                Ok(other) => return Ok(VcpuStop::Failed(format!("unhandled exit {other:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    return Ok(VcpuStop::Interrupted)
                }
                Err(e) => return Err(Error::Run(e)),
            }
        }
    }
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The real-time signal used to kick a vCPU thread out of KVM_RUN (installs a no-op handler on
/// first use, so the signal interrupts the ioctl instead of killing the process).
pub fn kick_signal() -> Result<libc::c_int, Error> {
    static INSTALLED: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> =
        std::sync::OnceLock::new();
    let sig = vmm_sys_util::signal::SIGRTMIN();
    INSTALLED
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(sig, on_kick))
        .map_err(Error::KickSignal)?;
    Ok(sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapic_lint_delivery_modes() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0000);
        let v = with_delivery_mode(lapic_reg(&l, APIC_LVT0), APIC_MODE_EXTINT);
        assert_eq!(v, 0x0001_0700);
        assert_eq!(with_delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
    }
}
