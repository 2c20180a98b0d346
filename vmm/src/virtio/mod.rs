//! virtio devices and their MMIO transport.
//!
//! A device implements [`VirtioDevice`]: identity, features, config space, and two entry points
//! for work — [`VirtioDevice::queue_notify`] when the guest kicks a queue (on the vCPU thread, in
//! the MMIO exit) and [`VirtioDevice::process_host`] when host-side input arrives (on the device
//! thread, see `eventloop`). The transport (`mmio`) owns the queues and the interrupt line and
//! calls both with the guest memory and queue slice, so devices are tested against plain guest
//! memory with virtio-queue's mock driver.

pub mod block;
/// Fuzz entry points: built for tests and with the `fuzz` feature only.
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use std::os::fd::RawFd;
use std::time::Duration;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// virtio 1.x feature bit every device offers (no legacy interface).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// virtio device ids (`VIRTIO_ID_*`).
pub mod device_type {
    use virtio_bindings::virtio_ids as ids;

    /// Network card.
    pub const NET: u32 = ids::VIRTIO_ID_NET;
    /// Block device.
    pub const BLOCK: u32 = ids::VIRTIO_ID_BLOCK;
    /// Entropy source.
    pub const RNG: u32 = ids::VIRTIO_ID_RNG;
    /// Socket device.
    pub const VSOCK: u32 = ids::VIRTIO_ID_VSOCK;
}

/// Most descriptors one chain may have before the device refuses it.
pub const MAX_CHAIN_LEN: usize = 64;

/// One descriptor of a chain, copied out of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (else device-readable).
    pub write: bool,
}

/// Errors walking a descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// More than [`MAX_CHAIN_LEN`] descriptors (or a loop).
    #[error("descriptor chain longer than {MAX_CHAIN_LEN}")]
    TooLong,
    /// A readable descriptor after a writable one (the spec forbids it).
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
}

/// Copies a chain's descriptors out, checking length and ordering.
pub fn collect_chain<M>(chain: DescriptorChain<M>) -> Result<Vec<Desc>, ChainError>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut out = Vec::new();
    for d in chain {
        if out.len() == MAX_CHAIN_LEN {
            return Err(ChainError::TooLong);
        }
        let desc = Desc {
            addr: d.addr(),
            len: d.len(),
            write: d.is_write_only(),
        };
        if !desc.write && out.last().is_some_and(|p: &Desc| p.write) {
            return Err(ChainError::ReadableAfterWritable);
        }
        out.push(desc);
    }
    Ok(out)
}

/// Whether the driver has made buffers available that the device has not taken yet.
pub fn has_available(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    use virtio_queue::QueueT;
    if !queue.ready() {
        return false;
    }
    match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(idx) => idx.0 != queue.next_avail(),
        Err(_) => false,
    }
}

/// What the device thread should wait for on behalf of a device.
#[derive(Debug, Default)]
pub struct Wait {
    /// (fd, poll events) pairs.
    pub fds: Vec<(RawFd, i16)>,
    /// Wake up after this long even without fd activity (rate limiter refills).
    pub timeout: Option<Duration>,
}

impl Wait {
    /// Shortens the timeout to at most `d`.
    pub fn at_most(&mut self, d: Duration) {
        self.timeout = Some(self.timeout.map_or(d, |t| t.min(d)));
    }
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// virtio device id.
    fn device_type(&self) -> u32;
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered features (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads device config space at `offset`; out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver finished setup (DRIVER_OK) with these features.
    fn activate(&mut self, _acked_features: u64) {}
    /// The driver reset the device: drop all state tied to the old queues.
    fn reset(&mut self) {}
    /// The guest kicked queue `index`. Returns whether used buffers were added.
    fn queue_notify(&mut self, mem: &GuestMemoryMmap, queues: &mut [Queue], index: u16) -> bool;
    /// Host-side work (input ready, limiter refilled). Returns whether used buffers were added.
    fn process_host(&mut self, _mem: &GuestMemoryMmap, _queues: &mut [Queue]) -> bool {
        false
    }
    /// Adds what the device thread should wait on before calling [`Self::process_host`].
    fn wait(&self, _mem: &GuestMemoryMmap, _queues: &[Queue], _wait: &mut Wait) {}
    /// Whether a guest notify can change what the device thread waits on (new RX buffers,
    /// a throttled queue). Devices that finish all work in the notify say no, which saves a
    /// wake-up and a context switch per kick.
    fn host_side(&self) -> bool {
        true
    }
}

/// Reads `len` bytes starting `skip` bytes into the readable part of `descs`.
pub fn read_from_descs(
    mem: &GuestMemoryMmap,
    descs: &[Desc],
    mut skip: usize,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<(), vm_memory::GuestMemoryError> {
    use vm_memory::Bytes;
    for d in descs.iter().filter(|d| !d.write) {
        let len = d.len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = (len - skip).min(max - out.len());
        let start = out.len();
        out.resize(start + take, 0);
        mem.read_slice(&mut out[start..], d.addr.unchecked_add(skip as u64))?;
        skip = 0;
        if out.len() == max {
            break;
        }
    }
    Ok(())
}

/// Writes `data` across the writable descriptors of `descs`; returns bytes written (short if
/// the buffers are smaller than `data`).
pub fn write_to_descs(
    mem: &GuestMemoryMmap,
    descs: &[Desc],
    data: &[u8],
) -> Result<usize, vm_memory::GuestMemoryError> {
    use vm_memory::Bytes;
    let mut done = 0;
    for d in descs.iter().filter(|d| d.write) {
        if done == data.len() {
            break;
        }
        let take = (d.len as usize).min(data.len() - done);
        mem.write_slice(&data[done..done + take], d.addr)?;
        done += take;
    }
    Ok(done)
}

use vm_memory::Address as _;

#[cfg(test)]
pub(crate) mod testutil {
    //! A driver's-eye view for device tests: guest memory plus mock split queues.
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// Guest memory big enough for a few queues and their buffers.
    pub fn memory() -> crate::memory::GuestRam {
        crate::memory::create(4).expect("test memory")
    }

    /// A readable (`write == false`) or writable descriptor.
    pub fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write {
            virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Offers `chains` (each a list of descriptors) on a fresh mock queue at `base`, returning
    /// the mock (for reading the used ring) and a device-side queue.
    pub fn queue_with_chains<'a>(
        mem: &'a GuestMemoryMmap,
        base: u64,
        chains: &[Vec<RawDescriptor>],
    ) -> (MockSplitQueue<'a, GuestMemoryMmap>, Queue) {
        let mock = MockSplitQueue::create(mem, GuestAddress(base), 16);
        let mut flat = Vec::new();
        for chain in chains {
            for (i, d) in chain.iter().enumerate() {
                let sd = SplitDescriptor::from(*d);
                let idx = (flat.len()) as u16;
                let (flags, next) = if i + 1 < chain.len() {
                    (
                        sd.flags() | virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16,
                        idx + 1,
                    )
                } else {
                    (
                        sd.flags() & !(virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16),
                        0,
                    )
                };
                flat.push(RawDescriptor::from(SplitDescriptor::new(
                    sd.addr().0,
                    sd.len(),
                    flags,
                    next,
                )));
            }
        }
        mock.add_desc_chains(&flat, 0).expect("add chains");
        let q: Queue = mock.create_queue().expect("queue");
        (mock, q)
    }

    /// Adds more chains to an existing mock queue, after the descriptors already used.
    pub fn offer_more(
        mock: &MockSplitQueue<'_, GuestMemoryMmap>,
        first_desc: u16,
        chain: &[RawDescriptor],
    ) {
        let mut flat = Vec::new();
        for (i, d) in chain.iter().enumerate() {
            let sd = SplitDescriptor::from(*d);
            let idx = first_desc + i as u16;
            let (flags, next) = if i + 1 < chain.len() {
                (
                    sd.flags() | virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16,
                    idx + 1,
                )
            } else {
                (
                    sd.flags() & !(virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16),
                    0,
                )
            };
            flat.push(RawDescriptor::from(SplitDescriptor::new(
                sd.addr().0,
                sd.len(),
                flags,
                next,
            )));
        }
        mock.add_desc_chains(&flat, first_desc).expect("add chain");
    }

    /// (head id, length) of used element `i`.
    pub fn used(
        mem: &GuestMemoryMmap,
        mock: &MockSplitQueue<'_, GuestMemoryMmap>,
        i: u16,
    ) -> (u32, u32) {
        let base = mock.used_addr().0 + 4 + u64::from(i) * 8;
        let id: u32 = mem.read_obj(GuestAddress(base)).expect("used id");
        let len: u32 = mem.read_obj(GuestAddress(base + 4)).expect("used len");
        (id, len)
    }

    /// The used ring index.
    pub fn used_idx(mem: &GuestMemoryMmap, mock: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
        mem.read_obj(GuestAddress(mock.used_addr().0 + 2))
            .expect("used idx")
    }
}
