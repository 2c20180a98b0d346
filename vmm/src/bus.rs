//! The I/O bus: routes port and MMIO exits from the vCPUs to the devices.
//!
//! Ports: COM1 (0x3f8-0x3ff) and the i8042 (0x60, 0x64); every other port reads as all ones
//! (nothing there, which is what a probing Linux expects: no PCI, no RTC). MMIO: one 4 KiB
//! virtio-mmio window per device from [`MMIO_BASE`]. After a write that may give a device new
//! work (queue notify, status), the device thread is woken so it re-checks what to wait on.

use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::boottimer::BootTimer;
use super::i8042::{self, I8042};
use super::kvm::{IoAction, IoHandler};
use super::memory::{MMIO_BASE, MMIO_SIZE};
use super::serial::{Console, COM1_BASE, COM1_LEN};
use super::virtio::mmio::{reg, MmioTransport};

/// A virtio device shared by the vCPU threads and the device thread.
pub type SharedTransport = Arc<Mutex<MmioTransport>>;

/// Locks a mutex, carrying on with the data if another thread panicked while holding it (a
/// device's state is still better than killing the VM from the vCPU thread).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Port and MMIO devices of one VM.
pub struct Bus {
    serial: Mutex<Console>,
    i8042: I8042,
    devices: Vec<SharedTransport>,
    wake: EventFd,
    boot_timer: Option<BootTimer>,
}

impl Bus {
    /// A bus with COM1, the i8042 and `devices` at consecutive MMIO windows.
    pub fn new(serial: Console, devices: Vec<SharedTransport>, wake: EventFd) -> Self {
        Self {
            serial: Mutex::new(serial),
            i8042: I8042,
            devices,
            wake,
            boot_timer: None,
        }
    }

    /// Adds the boot timer at [`super::boottimer::BOOT_TIMER_ADDR`].
    pub fn with_boot_timer(mut self, timer: BootTimer) -> Self {
        self.boot_timer = Some(timer);
        self
    }

    fn device_at(&self, addr: u64) -> Option<(&SharedTransport, u64)> {
        let rel = addr.checked_sub(MMIO_BASE)?;
        let index = (rel / MMIO_SIZE) as usize;
        self.devices.get(index).map(|d| (d, rel % MMIO_SIZE))
    }

    /// Flushes the console output.
    pub fn flush_console(&self) {
        use std::io::Write;
        let _ = lock(&self.serial).writer_mut().flush();
    }
}

impl IoHandler for Bus {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port) && data.len() == 1 {
            data[0] = lock(&self.serial).read((port - COM1_BASE) as u8);
        } else if port == i8042::DATA_PORT || port == i8042::COMMAND_PORT {
            data.fill(self.i8042.read(port));
        } else {
            data.fill(0xff);
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> IoAction {
        if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port) && data.len() == 1 {
            if let Err(e) = lock(&self.serial).write((port - COM1_BASE) as u8, data[0]) {
                tracing::debug!(error = ?e, "serial write");
            }
        } else if (port == i8042::DATA_PORT || port == i8042::COMMAND_PORT)
            && data.len() == 1
            && self.i8042.write(port, data[0]) == i8042::Effect::Reset
        {
            return IoAction::Reset;
        }
        IoAction::Continue
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if self.boot_timer.is_some() && BootTimer::contains(addr) {
            data.fill(0);
            return;
        }
        match self.device_at(addr) {
            Some((dev, offset)) => lock(dev).read(offset, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> IoAction {
        if let Some(timer) = &self.boot_timer {
            if BootTimer::contains(addr) {
                timer.write(data);
                return IoAction::Continue;
            }
        }
        if let Some((dev, offset)) = self.device_at(addr) {
            let mut d = lock(dev);
            d.write(offset, data);
            if (offset == reg::QUEUE_NOTIFY || offset == reg::STATUS) && d.host_side() {
                let _ = self.wake.write(1);
            }
        }
        IoAction::Continue
    }
}
