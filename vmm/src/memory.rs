//! Guest physical memory and the fixed layout of the low megabyte.
//!
//! One anonymous mapping from guest address 0 up to the MMIO window at [`MMIO_BASE`]; a guest
//! larger than that gets the rest as a second region from 4 GiB ([`HIGH_RAM_START`]), leaving
//! the hole for devices, as on a PC. The boot structures sit at fixed low addresses, the same
//! places Firecracker uses, so a Linux guest finds what it expects.
//!
//! Each region starts at a 2 MiB-aligned host address ([`HUGE_PAGE`]), as QEMU's RAM does, so
//! a transparent huge page of the host backs exactly one 2 MiB page of guest-physical memory
//! and KVM can map it whole. The kernel does not align large anonymous mappings itself before
//! Linux 6.7; unaligned, every host huge page straddles two guest pages.

use std::ops::Deref;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

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

/// The host huge-page size every region's host address is aligned to.
pub const HUGE_PAGE: usize = 2 << 20;

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
        source: std::io::Error,
    },
    /// vm-memory refused the mapping (a bug: the ranges are fixed and disjoint).
    #[error("guest memory layout for {mib} MiB: {reason}")]
    Layout {
        /// Size.
        mib: u32,
        /// What vm-memory said.
        reason: String,
    },
}

/// One anonymous private mapping of guest RAM, unmapped when the last [`GuestRam`] holding it
/// drops.
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory; it is only unmapped in `drop`, once nothing holds it.
unsafe impl Send for Mapping {}
// SAFETY: as above; concurrent access to guest memory goes through vm-memory's volatile accessors.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `len` bytes (a multiple of [`HUGE_PAGE`]) at a [`HUGE_PAGE`]-aligned address: reserve
    /// `len + HUGE_PAGE`, then give back the unaligned head and the tail.
    fn new(len: usize) -> std::io::Result<Mapping> {
        let reserve = len
            .checked_add(HUGE_PAGE)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks; nothing else refers
        // to it yet. MAP_NORESERVE: the host backs only what the guest touches.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let start = base as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE);
        let head = aligned - start;
        let tail = reserve - head - len;
        // SAFETY: both ranges lie inside the reservation just made and are page-aligned (mmap
        // returns page-aligned addresses and HUGE_PAGE is a multiple of the page size); the
        // kept range [aligned, aligned + len) is not touched.
        unsafe {
            if head > 0 {
                libc::munmap(base, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        Ok(Mapping {
            addr: aligned as *mut libc::c_void,
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr..addr+len` is the mapping `new` kept, and the last `GuestRam` (whose
        // regions point into it) is gone.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Guest RAM: vm-memory's view of the regions plus the host mappings behind them, which stay
/// mapped while any clone lives. Derefs to [`GuestMemoryMmap`] for everything that reads or
/// writes guest memory; hold a `GuestRam` (not a clone of the inner `GuestMemoryMmap`) to
/// keep the memory beyond a call.
#[derive(Clone)]
pub struct GuestRam {
    // Dropped before the mappings it points into.
    mem: GuestMemoryMmap,
    _mappings: Arc<Vec<Mapping>>,
}

impl Deref for GuestRam {
    type Target = GuestMemoryMmap;
    fn deref(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

/// Maps `mib` MiB of guest RAM from guest address 0 (split around the MMIO hole), each region
/// at a 2 MiB-aligned host address.
pub fn create(mib: u32) -> Result<GuestRam, Error> {
    let mut mappings = Vec::new();
    let mut regions = Vec::new();
    for (start, size) in ram_ranges(u64::from(mib) << 20) {
        let size = size as usize;
        let map = Mapping::new(size.next_multiple_of(HUGE_PAGE))
            .map_err(|source| Error::Map { mib, source })?;
        // SAFETY: `map.addr..map.addr + size` lies inside `map`, which `GuestRam` keeps mapped
        // for as long as these regions (in `mem`) live.
        let region = unsafe {
            MmapRegionBuilder::new(size)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .with_raw_mmap_pointer(map.addr.cast())
        }
        .build()
        .map_err(|e| Error::Layout {
            mib,
            reason: e.to_string(),
        })?;
        let region =
            GuestRegionMmap::new(region, GuestAddress(start)).ok_or_else(|| Error::Layout {
                mib,
                reason: format!("region at {start:#x} of {size:#x} bytes overflows"),
            })?;
        mappings.push(map);
        regions.push(region);
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Layout {
        mib,
        reason: e.to_string(),
    })?;
    Ok(GuestRam {
        mem,
        _mappings: Arc::new(mappings),
    })
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
    fn every_region_starts_on_a_host_huge_page() {
        for mib in [4, 6, 512, 4 * 1024 - 1, 5 * 1024] {
            let mem = create(mib).expect("guest memory");
            let mut total = 0;
            for region in mem.iter() {
                let host = region
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .expect("host address") as usize;
                assert_eq!(host % HUGE_PAGE, 0, "{mib} MiB: region at {host:#x}");
                total += region.len();
            }
            assert_eq!(total, u64::from(mib) << 20, "{mib} MiB");
        }
    }

    #[test]
    fn memory_stays_mapped_while_any_clone_lives() {
        let first = create(8).expect("8 MiB");
        first
            .write_obj(0x5au8, GuestAddress(7 << 20))
            .expect("write");
        let kept = first.clone();
        drop(first);
        assert_eq!(
            kept.read_obj::<u8>(GuestAddress(7 << 20)).expect("read"),
            0x5a
        );
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
