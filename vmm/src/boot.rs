//! Getting a kernel into guest memory and the boot vCPU into its entry state.
//!
//! Two entries, chosen from the image (linux-loader parses it):
//! - **PVH** (an ELF with a XEN_ELFNOTE_PHYS32_ENTRY note, as vmlinux and our test guest carry):
//!   32-bit protected mode, paging off, `%ebx` = `hvm_start_info` with the command line and a
//!   memory map.
//! - **Linux 64-bit** (bzImage, or an ELF without the note): long mode on identity page tables
//!   for the first GiB, `%rsi` = the zero page with setup header, e820 map and command line.
//!
//! Both get the same GDT and an MP table describing the vCPUs and the IOAPIC.

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::config::BootProtocol;
use super::kvm::{self as hv, Vcpu};
use super::memory::*;

/// Errors loading the kernel or writing boot structures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel file could not be opened.
    #[error("open kernel {path}")]
    OpenKernel {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// linux-loader refused the image.
    #[error("load kernel {path} as {format}: {source}")]
    LoadKernel {
        /// Path.
        path: String,
        /// ELF or bzImage.
        format: &'static str,
        /// Cause (linux-loader's error has no `source` chain, so it is printed inline).
        source: loader::Error,
    },
    /// `boot: pvh` was asked for but the ELF has no PVH note.
    #[error("kernel {0}: boot = pvh but the ELF has no XEN_ELFNOTE_PHYS32_ENTRY note")]
    NoPvhNote(String),
    /// The command line does not fit.
    #[error("kernel command line is {0} bytes; at most {CMDLINE_MAX} including the NUL")]
    CmdlineTooLong(usize),
    /// A write into guest memory failed (structure does not fit the guest).
    #[error("write {what} to guest memory at {addr:#x}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// Address.
        addr: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Setting vCPU registers failed.
    #[error("set boot vCPU state")]
    Vcpu(#[source] hv::Error),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy)]
pub enum Entry {
    /// PVH 32-bit entry.
    Pvh(GuestAddress),
    /// Linux 64-bit entry; bzImages bring their setup header.
    Linux64 {
        /// Entry point (startup_64).
        entry: GuestAddress,
        /// bzImage setup header, copied into the zero page.
        setup_header: Option<setup_header>,
    },
}

/// A kernel in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    /// How to enter it.
    pub entry: Entry,
    /// First byte after the image.
    pub end: u64,
}

/// Loads an ELF (PVH or not) or a bzImage at [`HIMEM_START`].
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    protocol: BootProtocol,
) -> Result<Kernel, Error> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| Error::OpenKernel {
        path: shown.clone(),
        source,
    })?;
    let himem = Some(GuestAddress(HIMEM_START));
    match Elf::load(mem, None, &mut file, himem) {
        Ok(r) => {
            let entry = match (r.pvh_boot_cap, protocol) {
                (
                    PvhBootCapability::PvhEntryPresent(addr),
                    BootProtocol::Auto | BootProtocol::Pvh,
                ) => Entry::Pvh(addr),
                (_, BootProtocol::Pvh) => return Err(Error::NoPvhNote(shown)),
                _ => Entry::Linux64 {
                    entry: r.kernel_load,
                    setup_header: None,
                },
            };
            Ok(Kernel {
                entry,
                end: r.kernel_end,
            })
        }
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {
            let r =
                BzImage::load(mem, None, &mut file, himem).map_err(|source| Error::LoadKernel {
                    path: shown.clone(),
                    format: "bzImage",
                    source,
                })?;
            if protocol == BootProtocol::Pvh {
                return Err(Error::NoPvhNote(shown));
            }
            // startup_64 sits 0x200 bytes into the protected-mode kernel.
            Ok(Kernel {
                entry: Entry::Linux64 {
                    entry: GuestAddress(r.kernel_load.0 + 0x200),
                    setup_header: r.setup_header,
                },
                end: r.kernel_end,
            })
        }
        Err(source) => Err(Error::LoadKernel {
            path: shown,
            format: "ELF",
            source,
        }),
    }
}

fn write(mem: &GuestMemoryMmap, what: &'static str, addr: u64, bytes: &[u8]) -> Result<(), Error> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| Error::GuestWrite { what, addr, source })
}

/// Writes the NUL-terminated command line at [`CMDLINE_ADDR`]; returns its length without NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, Error> {
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(Error::CmdlineTooLong(cmdline.len() + 1));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    write(mem, "command line", CMDLINE_ADDR, &bytes)?;
    Ok(cmdline.len())
}

/// RAM ranges (start, size, is_ram) the guest may use: conventional memory below the MP table,
/// the MP table itself reserved, everything from 1 MiB up to the MMIO hole, and the rest from
/// 4 GiB (see `memory::ram_ranges`).
pub fn memory_map(mem_size: u64) -> Vec<(u64, u64, bool)> {
    let mut map = vec![
        (0, MPTABLE_ADDR, true),
        (MPTABLE_ADDR, EBDA_END - MPTABLE_ADDR, false),
    ];
    for (start, size) in super::memory::ram_ranges(mem_size) {
        if start == 0 {
            map.push((HIMEM_START, size - HIMEM_START, true));
        } else {
            map.push((start, size, true));
        }
    }
    map
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Writes the PVH `hvm_start_info` (version 1) and its memory map (linux-loader's structs).
pub fn write_pvh_info(mem: &GuestMemoryMmap, mem_size: u64) -> Result<(), Error> {
    let map = memory_map(mem_size);
    let mut entries = Vec::new();
    for (addr, size, ram) in &map {
        let entry = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: if *ram { E820_RAM } else { E820_RESERVED },
            reserved: 0,
        };
        entries.extend_from_slice(entry.as_slice());
    }
    write(mem, "PVH memory map", PVH_MEMMAP_ADDR, &entries)?;
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    write(mem, "PVH start info", PVH_INFO_ADDR, info.as_slice())
}

/// Writes the Linux zero page: setup header (from the bzImage, or a minimal one for an ELF),
/// command line pointer and e820 map.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    header: Option<setup_header>,
    cmdline_len: usize,
) -> Result<(), Error> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = 0xaa55;
        params.hdr.header = 0x5372_6448; // "HdrS"
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    let map = memory_map(mem_size);
    for (i, (addr, size, ram)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: if *ram { E820_RAM } else { E820_RESERVED },
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|source| Error::GuestWrite {
            what: "zero page",
            addr: ZERO_PAGE_ADDR,
            source,
        })
}

// ---- MP table (Intel MultiProcessor Specification 1.4) ----

const MP_LAPIC_ADDR: u32 = 0xfee0_0000;
const MP_IOAPIC_ADDR: u32 = 0xfec0_0000;
const MP_IOAPIC_PINS: u8 = 24;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP floating pointer + configuration table for `vcpus` CPUs, to be placed at `base`.
pub fn mptable(base: u64, vcpus: u8) -> Vec<u8> {
    let table_addr = base as u32 + 16;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        entries.push(0u8); // processor
        entries.push(id); // local APIC id
        entries.push(0x14); // local APIC version
        entries.push(if id == 0 { 0x3 } else { 0x1 }); // enabled (| BSP)
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU | APIC
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic_id = vcpus;
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&MP_IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..MP_IOAPIC_PINS {
        // I/O interrupt: INT, conforming polarity/trigger, ISA bus irq -> same IOAPIC pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1, to every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.push(4); // spec 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"HIVE    ");
    header.extend_from_slice(b"HIVE-VMM    ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&MP_LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table
    header.push(0);
    header.push(0);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4);
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0u8; 5]);
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    fp
}

/// Writes the MP table at [`MPTABLE_ADDR`].
pub fn write_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), Error> {
    let t = mptable(MPTABLE_ADDR, vcpus);
    debug_assert!(MPTABLE_ADDR + t.len() as u64 <= EBDA_END);
    write(mem, "MP table", MPTABLE_ADDR, &t)
}

// ---- GDT, page tables, registers ----

const GDT_NULL: u64 = 0;
const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
const GDT_CODE32: u64 = 0x00cf_9b00_0000_ffff;
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
const GDT_TSS: u64 = 0x008f_8b00_0000_ffff;
const SEL_CODE: u16 = 0x08;
const SEL_DATA: u16 = 0x10;
const SEL_TSS: u16 = 0x18;

fn gdt(long_mode: bool) -> [u64; 4] {
    [
        GDT_NULL,
        if long_mode { GDT_CODE64 } else { GDT_CODE32 },
        GDT_DATA,
        GDT_TSS,
    ]
}

/// The KVM segment register equivalent of a GDT descriptor.
fn segment(desc: u64, selector: u16) -> kvm_segment {
    let limit = ((desc & 0xffff) | ((desc >> 32) & 0xf_0000)) as u32;
    let g = ((desc >> 55) & 1) as u8;
    kvm_segment {
        base: ((desc >> 16) & 0xff_ffff) | (((desc >> 56) & 0xff) << 24),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((desc >> 40) & 0xf) as u8,
        present: ((desc >> 47) & 1) as u8,
        dpl: ((desc >> 45) & 3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g,
        avl: ((desc >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn write_gdt(mem: &GuestMemoryMmap, long_mode: bool) -> Result<(), Error> {
    let bytes: Vec<u8> = gdt(long_mode)
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect();
    write(mem, "GDT", GDT_ADDR, &bytes)
}

fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    write(mem, "PML4", PML4_ADDR, &(PDPT_ADDR | 0x3).to_le_bytes())?;
    write(mem, "PDPT", PDPT_ADDR, &(PD_ADDR | 0x3).to_le_bytes())?;
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
        .collect();
    write(mem, "page directory", PD_ADDR, &pd)
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

fn set_segments(sregs: &mut kvm_sregs, long_mode: bool) {
    let g = gdt(long_mode);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (g.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = segment(g[1], SEL_CODE);
    let data = segment(g[2], SEL_DATA);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(g[3], SEL_TSS);
}

/// Special registers for the PVH entry: flat 32-bit protected mode, paging off.
pub fn pvh_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    set_segments(&mut sregs, false);
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// Special registers for the Linux 64-bit entry: long mode on the identity map.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    set_segments(&mut sregs, true);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    // KVM's reset CR0 has caching disabled (CD|NW); a kernel entered in long mode never
    // clears it itself.
    sregs.cr0 = (sregs.cr0 & !(CR0_CD | CR0_NW)) | CR0_PE | CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Writes the boot structures the entry needs (start info or zero page, GDT, page tables).
pub fn write_boot_structures(
    mem: &GuestMemoryMmap,
    kernel: &Kernel,
    mem_size: u64,
    cmdline_len: usize,
    vcpus: u8,
) -> Result<(), Error> {
    write_mptable(mem, vcpus)?;
    match kernel.entry {
        Entry::Pvh(_) => {
            write_gdt(mem, false)?;
            write_pvh_info(mem, mem_size)
        }
        Entry::Linux64 { setup_header, .. } => {
            write_gdt(mem, true)?;
            write_page_tables(mem)?;
            write_zero_page(mem, mem_size, setup_header, cmdline_len)
        }
    }
}

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WB: u64 = 6;

/// Puts the boot vCPU at the kernel entry.
pub fn setup_boot_vcpu<V: Vcpu>(vcpu: &V, kernel: &Kernel) -> Result<(), Error> {
    let sregs = vcpu.sregs().map_err(Error::Vcpu)?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    let sregs = match kernel.entry {
        Entry::Pvh(entry) => {
            regs.rip = entry.0;
            regs.rbx = PVH_INFO_ADDR;
            pvh_sregs(sregs)
        }
        Entry::Linux64 { entry, .. } => {
            regs.rip = entry.0;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
            regs.rsi = ZERO_PAGE_ADDR;
            long_mode_sregs(sregs)
        }
    };
    vcpu.set_sregs(&sregs).map_err(Error::Vcpu)?;
    vcpu.set_regs(&regs).map_err(Error::Vcpu)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::Vcpu)?;
    // As firmware would leave them: IA32_MISC_ENABLE fast strings, and MTRRs enabled with
    // write-back as the default type. Without the latter all guest memory is uncacheable,
    // which on the nested KVM here made every guest store cost ~3 us.
    vcpu.set_msrs(&[
        (MSR_IA32_MISC_ENABLE, 1),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB),
    ])
    .map_err(Error::Vcpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mptable_checksums_and_counts() {
        let t = mptable(MPTABLE_ADDR, 4);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[0..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let phys = u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as u64;
        assert_eq!(phys, MPTABLE_ADDR + 16);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        // Walk the entries: 4 CPUs, bus, IOAPIC, 24 pins, 2 local.
        let (mut off, mut cpus, mut n) = (44usize, 0, 0u16);
        while off < len {
            let size = if table[off] == 0 { 20 } else { 8 };
            if table[off] == 0 {
                cpus += 1;
                assert_eq!(table[off + 1], cpus - 1, "APIC ids in order");
            }
            off += size;
            n += 1;
        }
        assert_eq!((cpus, n, count), (4, 4 + 1 + 1 + 24 + 2, n));
        assert!(MPTABLE_ADDR + t.len() as u64 <= EBDA_END);
    }

    #[test]
    fn segments_match_descriptors() {
        let cs = segment(GDT_CODE64, SEL_CODE);
        assert_eq!(
            (cs.l, cs.db, cs.type_, cs.present, cs.limit),
            (1, 0, 0xb, 1, 0xffff_ffff)
        );
        let cs32 = segment(GDT_CODE32, SEL_CODE);
        assert_eq!((cs32.l, cs32.db, cs32.s), (0, 1, 1));
        let tss = segment(GDT_TSS, SEL_TSS);
        assert_eq!((tss.s, tss.type_), (0, 0xb));
    }

    #[test]
    fn memory_map_skips_the_mmio_hole_for_large_guests() {
        use crate::memory::{HIGH_RAM_START, MMIO_BASE};
        let big = 16u64 << 30;
        let map = memory_map(big);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2], (HIMEM_START, MMIO_BASE - HIMEM_START, true));
        assert_eq!(map[3], (HIGH_RAM_START, big - MMIO_BASE, true));
        let ram: u64 = map.iter().filter(|m| m.2).map(|m| m.1).sum();
        assert_eq!(
            ram,
            big - (EBDA_END - MPTABLE_ADDR) - (HIMEM_START - EBDA_END)
        );
        // No RAM entry overlaps the device window.
        assert!(map
            .iter()
            .all(|(a, s, _)| a + s <= MMIO_BASE || *a >= HIGH_RAM_START));
    }

    #[test]
    fn pvh_info_and_zero_page_carry_cmdline_and_memory_map() {
        let mem = create(16).expect("mem");
        let size = 16u64 << 20;
        let len = write_cmdline(&mem, "console=ttyS0 hive.cell_id=c1").expect("cmdline");
        write_pvh_info(&mem, size).expect("pvh");
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).expect("read");
        assert_eq!(magic, 0x336e_c578, "XEN_HVM_START_MAGIC");
        let cmd: u64 = mem
            .read_obj(GuestAddress(PVH_INFO_ADDR + 24))
            .expect("read");
        assert_eq!(cmd, CMDLINE_ADDR);
        let n: u32 = mem
            .read_obj(GuestAddress(PVH_INFO_ADDR + 48))
            .expect("read");
        assert_eq!(n, 3);
        let last_size: u64 = mem
            .read_obj(GuestAddress(PVH_MEMMAP_ADDR + 2 * 24 + 8))
            .expect("read");
        assert_eq!(last_size, size - HIMEM_START);

        write_zero_page(&mem, size, None, len).expect("zero page");
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).expect("read");
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].addr }, HIMEM_START);
        let mut buf = vec![0u8; len + 1];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR))
            .expect("read");
        assert_eq!(&buf, b"console=ttyS0 hive.cell_id=c1\0");
    }

    /// A vCPU that records what the boot code sets (the trait exists so this runs without KVM).
    #[derive(Default)]
    struct RecordingVcpu {
        sregs: std::cell::RefCell<Option<kvm_sregs>>,
        regs: std::cell::RefCell<Option<kvm_regs>>,
        msrs: std::cell::RefCell<Vec<(u32, u64)>>,
    }

    impl Vcpu for RecordingVcpu {
        fn set_cpuid(&self, _: &kvm_bindings::CpuId) -> Result<(), hv::Error> {
            Ok(())
        }
        fn sregs(&self) -> Result<kvm_sregs, hv::Error> {
            // KVM's reset state: caching disabled.
            Ok(kvm_sregs {
                cr0: 0x6000_0010,
                ..Default::default()
            })
        }
        fn set_sregs(&self, s: &kvm_sregs) -> Result<(), hv::Error> {
            *self.sregs.borrow_mut() = Some(*s);
            Ok(())
        }
        fn set_regs(&self, r: &kvm_regs) -> Result<(), hv::Error> {
            *self.regs.borrow_mut() = Some(*r);
            Ok(())
        }
        fn set_fpu(&self, _: &kvm_fpu) -> Result<(), hv::Error> {
            Ok(())
        }
        fn set_msrs(&self, m: &[(u32, u64)]) -> Result<(), hv::Error> {
            self.msrs.borrow_mut().extend_from_slice(m);
            Ok(())
        }
        fn setup_lapic(&self) -> Result<(), hv::Error> {
            Ok(())
        }
        fn run(&mut self, _: &dyn hv::IoHandler) -> Result<hv::VcpuStop, hv::Error> {
            Ok(hv::VcpuStop::Shutdown("test".into()))
        }
    }

    #[test]
    fn pvh_entry_is_flat_32_bit_protected_mode_with_start_info_in_rbx() {
        let v = RecordingVcpu::default();
        let k = Kernel {
            entry: Entry::Pvh(GuestAddress(0x10_0123)),
            end: 0,
        };
        setup_boot_vcpu(&v, &k).expect("setup");
        let r = v.regs.borrow().expect("regs");
        let s = v.sregs.borrow().expect("sregs");
        assert_eq!((r.rip, r.rbx, r.rflags), (0x10_0123, PVH_INFO_ADDR, 2));
        assert_eq!(
            s.cr0,
            CR0_PE | CR0_ET,
            "protected mode, paging and cache-disable off"
        );
        assert_eq!((s.efer, s.cr4), (0, 0));
        assert_eq!((s.cs.db, s.cs.l, s.cs.selector), (1, 0, SEL_CODE));
        assert_eq!(
            (s.ds.selector, s.ss.base, s.ss.limit),
            (SEL_DATA, 0, 0xffff_ffff)
        );
        assert!(v
            .msrs
            .borrow()
            .contains(&(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB)));
    }

    #[test]
    fn linux64_entry_is_long_mode_with_zero_page_in_rsi() {
        let v = RecordingVcpu::default();
        let k = Kernel {
            entry: Entry::Linux64 {
                entry: GuestAddress(0x100_0000),
                setup_header: None,
            },
            end: 0,
        };
        setup_boot_vcpu(&v, &k).expect("setup");
        let r = v.regs.borrow().expect("regs");
        let s = v.sregs.borrow().expect("sregs");
        assert_eq!(
            (r.rip, r.rsi, r.rsp),
            (0x100_0000, ZERO_PAGE_ADDR, BOOT_STACK)
        );
        assert_eq!(s.cr0 & (CR0_PG | CR0_PE), CR0_PG | CR0_PE);
        assert_eq!(s.cr0 & (CR0_CD | CR0_NW), 0, "caches enabled");
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.cr3, s.cr4 & CR4_PAE), (PML4_ADDR, CR4_PAE));
        assert_eq!((s.cs.l, s.cs.db), (1, 0));
    }

    #[test]
    fn oversized_cmdline_is_refused() {
        let mem = create(16).expect("mem");
        let long = "x".repeat(CMDLINE_MAX);
        assert!(matches!(
            write_cmdline(&mem, &long),
            Err(Error::CmdlineTooLong(_))
        ));
    }

    #[test]
    fn non_kernel_file_is_refused_with_its_path() {
        let mem = create(16).expect("mem");
        let f = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(f.path(), b"not a kernel at all").expect("write");
        let err = load_kernel(&mem, f.path(), BootProtocol::Auto).expect_err("garbage");
        assert!(
            err.to_string().contains(&f.path().display().to_string()),
            "{err}"
        );
    }
}
