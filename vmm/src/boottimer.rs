//! The boot timer (Firecracker's method for measuring guest boot): one MMIO page at
//! [`BOOT_TIMER_ADDR`] where the guest's init writes a byte at each milestone (the cell daemon:
//! 1 = init started, 2 = ready). Each write is logged with the time since the VMM process
//! started ([`crate::process_start`]), so boot time is measured from VMM exec, not from
//! a host-side guess. Reads return zero. Present only when the VM config asks for it.
//!
//! Bounded: a guest that keeps writing gets its first [`MAX_MARKS`] writes logged, no more.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

/// Guest-physical address of the page: above the virtio-mmio windows, below the 4 GiB devices.
pub const BOOT_TIMER_ADDR: u64 = 0xd800_0000;
/// Size of the page.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// Writes logged at most.
pub const MAX_MARKS: u32 = 8;

/// The device.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    marks: AtomicU32,
}

impl BootTimer {
    /// A timer counting from `start` (the VMM process's start).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            marks: AtomicU32::new(0),
        }
    }

    /// Whether `addr` is in the device's page.
    pub fn contains(addr: u64) -> bool {
        (BOOT_TIMER_ADDR..BOOT_TIMER_ADDR + BOOT_TIMER_SIZE).contains(&addr)
    }

    /// A guest write: logs the value and the time since the VMM started. Returns the value
    /// recorded, or None once the guest has used up its marks.
    pub fn write(&self, data: &[u8]) -> Option<u8> {
        if self.marks.fetch_add(1, Ordering::Relaxed) >= MAX_MARKS {
            return None;
        }
        let value = data.first().copied().unwrap_or(0);
        let since = self.start.elapsed();
        tracing::info!(
            value,
            since_start_us = since.as_micros() as u64,
            "boot timer: guest mark {value} at {:.1} ms since the VMM started",
            since.as_secs_f64() * 1000.0
        );
        Some(value)
    }
}

// The page lies above the virtio windows (64 are far more than any cell has), below the IOAPIC
// and the RAM that continues at 4 GiB.
const _: () = {
    use crate::memory::{HIGH_RAM_START, MMIO_BASE, MMIO_SIZE};
    assert!(BOOT_TIMER_ADDR >= MMIO_BASE + 64 * MMIO_SIZE);
    assert!(BOOT_TIMER_ADDR + BOOT_TIMER_SIZE <= 0xfec0_0000);
    assert!(BOOT_TIMER_ADDR < HIGH_RAM_START);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_bounded_and_the_page_is_exact() {
        let t = BootTimer::new(Instant::now());
        assert!(BootTimer::contains(BOOT_TIMER_ADDR));
        assert!(BootTimer::contains(BOOT_TIMER_ADDR + 0xfff));
        assert!(!BootTimer::contains(BOOT_TIMER_ADDR + 0x1000));
        assert!(!BootTimer::contains(BOOT_TIMER_ADDR - 1));
        assert_eq!(t.write(&[1]), Some(1));
        assert_eq!(t.write(&[]), Some(0));
        for _ in 2..MAX_MARKS {
            assert!(t.write(&[2]).is_some());
        }
        assert_eq!(t.write(&[3]), None);
    }
}
