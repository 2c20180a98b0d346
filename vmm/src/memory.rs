//! Guest physical memory and the fixed layout of the low megabyte.
//!
//! One anonymous mapping from guest address 0 (vm-memory) up to the MMIO window at
//! [`MMIO_BASE`]; a guest larger than that gets the rest as a second region from 4 GiB
//! ([`HIGH_RAM_START`]), leaving the hole for devices, as on a PC. The boot structures sit at fixed low addresses, the same
//! places Firecracker uses, so a Linux guest finds what it expects.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// GDT used for both boot protocols.
pub const GDT_ADDR: u64 = 0x500;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH memory map entries (right after the start info).
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Identity page tables for the Linux 64-bit entry: PML4, PDPT, PD.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory (512 x 2 MiB = 1 GiB identity map).
pub const PD_ADDR: u64 = 0xb000;
/// Boot stack top for the 64-bit entry.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Room for the command line.
pub const CMDLINE_MAX: usize = 4096;
/// MP floating pointer + table, at the top of conventional memory (the EBDA).
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// End of conventional memory.
pub const EBDA_END: u64 = 0xa0000;
/// Where kernels load (and where e820 high RAM starts).
pub const HIMEM_START: u64 = 0x10_0000;
/// First virtio-mmio window; one 4 KiB page per device.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const MMIO_SIZE: u64 = 0x1000;
/// First IRQ (GSI) handed to virtio devices (0-4 are PIT, keyboard, cascade, COM2, COM1).
pub const FIRST_DEVICE_IRQ: u32 = 5;
/// COM1 IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// TSS address KVM needs on Intel (three pages below the 4 GiB line, outside RAM).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// Smallest guest (the kernel, boot structures and queues must fit).
pub const MIN_MEMORY_MIB: u32 = 4;
/// Largest guest (256 GiB; the mapping is reserved lazily, the host backs what is touched).
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;
/// Where RAM above the MMIO hole continues.
pub const HIGH_RAM_START: u64 = 1 << 32;

/// The guest RAM ranges (start, size) for `size` bytes: below the MMIO window, then from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO_BASE);
    let mut ranges = vec![(0, low)];
    if size > MMIO_BASE {
        ranges.push((HIGH_RAM_START, size - MMIO_BASE));
    }
    ranges
}

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// mmap of the guest RAM failed.
    #[error("map {mib} MiB of guest memory")]
    Map {
        /// Size.
        mib: u32,
        /// Cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Maps `mib` MiB of guest RAM from guest address 0 (split around the MMIO hole).
pub fn create(mib: u32) -> Result<GuestMemoryMmap, Error> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(u64::from(mib) << 20)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| Error::Map { mib, source })
}

/// Bytes of guest RAM actually backed by host pages right now (mincore over every region):
/// what the guest touched, which the benchmark subtracts from the VMM's peak RSS.
pub fn resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    let page = 4096usize;
    let mut total = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
            continue;
        };
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: `host..host+len` is the live mapping of this region (vm-memory keeps it mapped
        // while `mem` is borrowed) and `vec` has one byte per page of it, as mincore requires.
        let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        if rc == 0 {
            total += vec.iter().filter(|b| **b & 1 != 0).count() as u64 * page as u64;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn resident_bytes_counts_touched_pages_only() {
        let mem = create(8).expect("8 MiB");
        let before = resident_bytes(&mem);
        for i in 0..16u64 {
            mem.write_obj(0xabu8, GuestAddress(HIMEM_START + i * 4096))
                .expect("write");
        }
        let after = resident_bytes(&mem);
        assert!(after >= before + 16 * 4096, "before {before} after {after}");
        assert!(after < 8 << 20, "untouched pages must not count: {after}");
    }

    #[test]
    fn large_guests_continue_above_the_mmio_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(MMIO_BASE), vec![(0, MMIO_BASE)]);
        let big = 16u64 << 30;
        assert_eq!(
            ram_ranges(big),
            vec![(0, MMIO_BASE), (HIGH_RAM_START, big - MMIO_BASE)]
        );
        // Mapped lazily: 16 GiB costs nothing until touched.
        let mem = create(16 * 1024).expect("16 GiB mapping");
        assert_eq!(mem.iter().count(), 2);
        mem.write_obj(7u8, GuestAddress(HIGH_RAM_START + (1 << 30)))
            .expect("write above 4 GiB");
        assert!(
            mem.read_obj::<u8>(GuestAddress(MMIO_BASE)).is_err(),
            "hole is not RAM"
        );
        assert!(resident_bytes(&mem) < 64 << 20);
    }

    #[test]
    fn layout_is_ordered_and_disjoint() {
        const {
            assert!(GDT_ADDR < PVH_INFO_ADDR);
            assert!(PVH_MEMMAP_ADDR < ZERO_PAGE_ADDR);
            assert!(ZERO_PAGE_ADDR + 4096 <= PML4_ADDR);
            assert!(PD_ADDR + 4096 <= CMDLINE_ADDR);
            assert!(CMDLINE_ADDR + CMDLINE_MAX as u64 <= MPTABLE_ADDR);
            assert!(MPTABLE_ADDR < EBDA_END && EBDA_END <= HIMEM_START);
        }
    }
}
