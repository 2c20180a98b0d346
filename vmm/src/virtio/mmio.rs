//! The virtio-mmio (version 2) transport: one 4 KiB register window per device.
//!
//! The guest finds each window from `virtio_mmio.device=4K@<addr>:<irq>` on its command line.
//! Register reads have no side effects (with the in-kernel irqchip here KVM has been seen to
//! deliver one MMIO read twice); only writes change state. Interrupts go out through an irqfd.

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioDevice, Wait, VIRTIO_F_VERSION_1};
use crate::memory::GuestRam;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4856_4948; // "HIVH"

/// Register offsets (the kernel's `VIRTIO_MMIO_*`, from virtio-bindings).
pub mod reg {
    #![allow(missing_docs)]
    use virtio_bindings::virtio_mmio as m;

    pub const MAGIC: u64 = m::VIRTIO_MMIO_MAGIC_VALUE as u64;
    pub const VERSION: u64 = m::VIRTIO_MMIO_VERSION as u64;
    pub const DEVICE_ID: u64 = m::VIRTIO_MMIO_DEVICE_ID as u64;
    pub const VENDOR_ID: u64 = m::VIRTIO_MMIO_VENDOR_ID as u64;
    pub const DEVICE_FEATURES: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES as u64;
    pub const DEVICE_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
    pub const DRIVER_FEATURES: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES as u64;
    pub const DRIVER_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
    pub const QUEUE_SEL: u64 = m::VIRTIO_MMIO_QUEUE_SEL as u64;
    pub const QUEUE_NUM_MAX: u64 = m::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
    pub const QUEUE_NUM: u64 = m::VIRTIO_MMIO_QUEUE_NUM as u64;
    pub const QUEUE_READY: u64 = m::VIRTIO_MMIO_QUEUE_READY as u64;
    pub const QUEUE_NOTIFY: u64 = m::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
    pub const INTERRUPT_STATUS: u64 = m::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
    pub const INTERRUPT_ACK: u64 = m::VIRTIO_MMIO_INTERRUPT_ACK as u64;
    pub const STATUS: u64 = m::VIRTIO_MMIO_STATUS as u64;
    pub const QUEUE_DESC_LOW: u64 = m::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
    pub const QUEUE_DESC_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
    pub const QUEUE_AVAIL_LOW: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
    pub const QUEUE_AVAIL_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
    pub const QUEUE_USED_LOW: u64 = m::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
    pub const QUEUE_USED_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
    pub const CONFIG_GENERATION: u64 = m::VIRTIO_MMIO_CONFIG_GENERATION as u64;
    pub const CONFIG: u64 = m::VIRTIO_MMIO_CONFIG as u64;
}

/// Device status bits (`VIRTIO_CONFIG_S_*`).
pub mod status {
    #![allow(missing_docs)]
    use virtio_bindings::virtio_config as c;

    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

const INT_USED_RING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;

/// One device behind its register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestRam,
    queues: Vec<Queue>,
    irq: EventFd,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    status: u32,
    activated: bool,
    interrupt_status: u32,
}

impl MmioTransport {
    /// Wraps `device`; `irq` is the eventfd registered as its irqfd.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestRam, irq: EventFd) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
            .collect();
        Self {
            device,
            mem,
            queues,
            irq,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            status: 0,
            activated: false,
            interrupt_status: 0,
        }
    }

    /// Device name for logs.
    pub fn name(&self) -> &'static str {
        self.device.name()
    }

    /// Whether guest notifies should wake the device thread (see `VirtioDevice::host_side`).
    pub fn host_side(&self) -> bool {
        self.device.host_side()
    }

    /// Whether the driver set DRIVER_OK and the device is running.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn selected_mut(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A register read. `data` is 1, 2, 4 or 8 bytes; registers below the config space are 32-bit.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let v: u32 = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => {
                let f = self.device.features() | VIRTIO_F_VERSION_1;
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A register write.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 {
            tracing::debug!(
                device = self.name(),
                offset,
                len = data.len(),
                "ignoring non-32-bit register write"
            );
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => {
                            self.acked_features =
                                (self.acked_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.acked_features =
                                (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {}
                    }
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => self.with_idle_queue(|q| q.set_size(v as u16)),
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_mut() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW => {
                self.with_idle_queue(|q| q.set_desc_table_address(Some(v), None))
            }
            reg::QUEUE_DESC_HIGH => {
                self.with_idle_queue(|q| q.set_desc_table_address(None, Some(v)))
            }
            reg::QUEUE_AVAIL_LOW => {
                self.with_idle_queue(|q| q.set_avail_ring_address(Some(v), None))
            }
            reg::QUEUE_AVAIL_HIGH => {
                self.with_idle_queue(|q| q.set_avail_ring_address(None, Some(v)))
            }
            reg::QUEUE_USED_LOW => self.with_idle_queue(|q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_USED_HIGH => {
                self.with_idle_queue(|q| q.set_used_ring_address(None, Some(v)))
            }
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => self.set_status(v),
            _ => tracing::debug!(
                device = self.name(),
                offset,
                "write to read-only or unknown register"
            ),
        }
    }

    /// Queue layout may only change while the queue is not live.
    fn with_idle_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        let activated = self.activated;
        if let Some(q) = self.selected_mut() {
            if !q.ready() && !activated {
                f(q);
            }
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        if v & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let offered = self.device.features() | VIRTIO_F_VERSION_1;
            if self.acked_features & !offered != 0 || self.acked_features & VIRTIO_F_VERSION_1 == 0
            {
                // Refuse: the driver reads FEATURES_OK back and sees it clear.
                tracing::warn!(
                    device = self.name(),
                    acked = self.acked_features,
                    offered,
                    "driver accepted unoffered features or lacks VERSION_1"
                );
                v &= !status::FEATURES_OK;
            }
        }
        self.status = v;
        if v & status::DRIVER_OK != 0 && v & status::FEATURES_OK != 0 && !self.activated {
            let mem: &vm_memory::GuestMemoryMmap = &self.mem;
            let bad = self
                .queues
                .iter()
                .position(|q| q.ready() && !q.is_valid(mem));
            if let Some(i) = bad {
                tracing::warn!(
                    device = self.name(),
                    queue = i,
                    "queue addresses invalid at DRIVER_OK"
                );
                self.status |= status::DEVICE_NEEDS_RESET;
                return;
            }
            self.device.activate(self.acked_features);
            self.activated = true;
            tracing::debug!(
                device = self.name(),
                features = self.acked_features,
                "activated"
            );
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt_status = 0;
    }

    fn notify(&mut self, index: u32) {
        if !self.activated || index as usize >= self.queues.len() {
            return;
        }
        if self
            .device
            .queue_notify(&self.mem, &mut self.queues, index as u16)
        {
            self.signal_used();
        }
    }

    /// Host-side work for the device thread.
    pub fn process_host(&mut self) {
        if !self.activated {
            return;
        }
        if self.device.process_host(&self.mem, &mut self.queues) {
            self.signal_used();
        }
    }

    /// What the device thread should wait on for this device.
    pub fn wait(&self, wait: &mut Wait) {
        if self.activated {
            self.device.wait(&self.mem, &self.queues, wait);
        }
    }

    fn signal_used(&mut self) {
        self.interrupt_status |= INT_USED_RING;
        if let Err(e) = self.irq.write(1) {
            tracing::warn!(device = self.name(), error = %e, "raise interrupt");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::rng::Rng;
    use super::super::testutil;
    use super::*;

    fn rd(t: &MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn transport() -> (MmioTransport, EventFd) {
        let mem = testutil::memory();
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let t = MmioTransport::new(Box::new(Rng::new()), mem, irq.try_clone().expect("clone"));
        (t, irq)
    }

    #[test]
    fn identity_registers_and_reads_are_side_effect_free() {
        let (t, _irq) = transport();
        for _ in 0..2 {
            assert_eq!(rd(&t, reg::MAGIC), MAGIC);
            assert_eq!(rd(&t, reg::VERSION), 2);
            assert_eq!(rd(&t, reg::DEVICE_ID), 4);
            assert_eq!(rd(&t, reg::INTERRUPT_STATUS), 0);
            assert_eq!(rd(&t, reg::QUEUE_NUM_MAX), 256);
        }
    }

    #[test]
    fn features_ok_refused_without_version_1() {
        let (mut t, _irq) = transport();
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, reg::DRIVER_FEATURES, 0);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(rd(&t, reg::STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn full_driver_handshake_then_notify_raises_interrupt_and_reset_clears() {
        let (mut t, irq) = transport();
        // The driver's rings live in the transport's own guest memory.
        let tm = t.mem.clone();
        let (mock, _q) =
            testutil::queue_with_chains(&tm, 0x10000, &[vec![testutil::desc(0x20000, 32, true)]]);
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&t, reg::DEVICE_FEATURES) & 1, 1, "VERSION_1 offered");
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(rd(&t, reg::STATUS) & status::FEATURES_OK, 0);
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_NUM, 16);
        wr(&mut t, reg::QUEUE_DESC_LOW, mock.desc_table_addr().0 as u32);
        wr(&mut t, reg::QUEUE_AVAIL_LOW, mock.avail_addr().0 as u32);
        wr(&mut t, reg::QUEUE_USED_LOW, mock.used_addr().0 as u32);
        wr(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(rd(&t, reg::QUEUE_READY), 1);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(t.is_activated());
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(testutil::used_idx(&tm, &mock), 1);
        assert_eq!(testutil::used(&tm, &mock, 0), (0, 32));
        assert_eq!(rd(&t, reg::INTERRUPT_STATUS), 1);
        assert_eq!(irq.read().expect("irq raised"), 1);
        wr(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(rd(&t, reg::INTERRUPT_STATUS), 0);
        wr(&mut t, reg::STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(rd(&t, reg::QUEUE_READY), 0);
        assert_eq!(rd(&t, reg::STATUS), 0);
    }

    #[test]
    fn notify_before_driver_ok_does_nothing() {
        let (mut t, irq) = transport();
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(rd(&t, reg::INTERRUPT_STATUS), 0);
        assert!(irq.read().is_err(), "no interrupt");
    }
}
