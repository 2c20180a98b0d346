//! virtio-net on a TAP device: guest frames out to the TAP, TAP frames into guest buffers.
//!
//! The TAP is opened (IFF_TAP | IFF_NO_PI, non-blocking) in the VMM's network namespace, which
//! the box daemon made for the cell; everything beyond it (veth, NAT, nftables) is the box's
//! business. The virtio-net header is not passed to the TAP: no offloads are offered, so it is
//! all zeros on receive and ignored on transmit. Transmit and receive each pay their own
//! token bucket; a frame that cannot be paid for waits (in the ring, or held on the host side).

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{
    collect_chain, device_type, has_available, read_from_descs, write_to_descs, VirtioDevice, Wait,
    VIRTIO_F_VERSION_1,
};
use crate::ratelimit::{RateLimitConfig, RateLimiter};

const F_MAC: u64 = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
/// struct virtio_net_hdr_v1 (with num_buffers), the header on every buffer in both directions.
pub const NET_HDR_LEN: usize =
    std::mem::size_of::<virtio_bindings::virtio_net::virtio_net_hdr_v1>();
/// Largest frame handled (no TSO/GSO is offered, so 1514 plus VLAN slack is plenty; the guest
/// may still post bigger buffers).
pub const MAX_FRAME: usize = 65_535;

const RX: usize = 0;
const TX: usize = 1;

/// Opens (creating if needed) TAP `name` in the current network namespace.
pub fn open_tap(name: &str) -> Result<File, hive_sys::tun::Error> {
    hive_sys::tun::open(name, hive_sys::tun::Mode::Tap)
}

/// Host side of the device: anything frames can be read from and written to (a TAP in
/// production, a socketpair in unit tests).
pub trait FrameIo: Read + Write + AsRawFd + Send {}
impl<T: Read + Write + AsRawFd + Send> FrameIo for T {}

/// The network device.
pub struct Net {
    io: Box<dyn FrameIo>,
    mac: Option<[u8; 6]>,
    tx_limiter: RateLimiter,
    rx_limiter: RateLimiter,
    pending_rx: Option<Vec<u8>>,
    sizes: [u16; 2],
    /// Frames the TAP refused (full) and dropped, as a NIC would.
    pub tx_dropped: u64,
}

impl Net {
    /// A device on `io` (a non-blocking TAP).
    pub fn new(io: Box<dyn FrameIo>, mac: Option<[u8; 6]>, limits: &RateLimitConfig) -> Self {
        let now = Instant::now();
        Self {
            io,
            mac,
            tx_limiter: RateLimiter::new(limits, now),
            rx_limiter: RateLimiter::new(limits, now),
            pending_rx: None,
            sizes: [256, 256],
            tx_dropped: 0,
        }
    }

    fn process_tx(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) -> bool {
        let mut used = false;
        let mut frame = Vec::with_capacity(2048);
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            frame.clear();
            let ok = match collect_chain(chain) {
                Ok(descs) => {
                    read_from_descs(mem, &descs, NET_HDR_LEN, &mut frame, MAX_FRAME).is_ok()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "net: bad tx chain");
                    false
                }
            };
            if ok && !frame.is_empty() {
                if !self.tx_limiter.consume(frame.len() as u64, Instant::now()) {
                    q.go_to_previous_position();
                    break;
                }
                match self.io.write(&frame) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.tx_dropped += 1,
                    Err(e) => {
                        self.tx_dropped += 1;
                        tracing::debug!(error = %e, "net: tap write");
                    }
                }
            }
            if q.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    fn process_rx(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) -> bool {
        let mut used = false;
        let mut buf = vec![0u8; MAX_FRAME];
        loop {
            if self.pending_rx.is_none() {
                match self.io.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => self.pending_rx = Some(buf[..n].to_vec()),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "net: tap read");
                        break;
                    }
                }
            }
            let Some(frame) = self.pending_rx.as_ref() else {
                break;
            };
            if !has_available(q, mem) {
                break;
            }
            if !self.rx_limiter.consume(frame.len() as u64, Instant::now()) {
                break;
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut packet = vec![0u8; NET_HDR_LEN];
            packet[10] = 1; // num_buffers
            packet.extend_from_slice(frame);
            let written = match collect_chain(chain) {
                Ok(descs) => write_to_descs(mem, &descs, &packet).unwrap_or(0),
                Err(e) => {
                    tracing::warn!(error = %e, "net: bad rx chain");
                    0
                }
            };
            self.pending_rx = None;
            if q.add_used(mem, head, written as u32).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }
    fn name(&self) -> &'static str {
        "net"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | if self.mac.is_some() { F_MAC } else { 0 }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: u8 mac[6]; le16 status; ... (only mac is offered)
        let mac = self.mac.unwrap_or_default();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset as usize + i;
            *b = if at < 6 { mac[at] } else { 0 };
        }
    }
    fn reset(&mut self) {
        self.pending_rx = None;
    }
    fn queue_notify(&mut self, mem: &GuestMemoryMmap, queues: &mut [Queue], index: u16) -> bool {
        match index as usize {
            RX => self.process_rx(mem, &mut queues[RX]),
            TX => self.process_tx(mem, &mut queues[TX]),
            _ => false,
        }
    }
    fn process_host(&mut self, mem: &GuestMemoryMmap, queues: &mut [Queue]) -> bool {
        let tx = if self.tx_limiter.is_blocked() {
            self.process_tx(mem, &mut queues[TX])
        } else {
            false
        };
        let rx = self.process_rx(mem, &mut queues[RX]);
        tx || rx
    }
    fn wait(&self, mem: &GuestMemoryMmap, queues: &[Queue], wait: &mut Wait) {
        let now = Instant::now();
        if self.pending_rx.is_none() {
            wait.fds.push((self.io.as_raw_fd(), libc::POLLIN));
        } else if has_available(&queues[RX], mem) {
            // Held frame, buffers present: only the limiter can be in the way.
            wait.at_most(self.rx_limiter.wait(now).unwrap_or_default());
        }
        if let Some(d) = self.tx_limiter.wait(now) {
            wait.at_most(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{desc, memory, queue_with_chains, used, used_idx};
    use super::*;
    use std::os::fd::FromRawFd;
    use vm_memory::{Bytes, GuestAddress};

    /// A SOCK_SEQPACKET socketpair behaves like a TAP: one frame per read/write. The device side
    /// is non-blocking, like the TAP the VMM opens.
    fn pair() -> (File, File) {
        let mut fds = [0i32; 2];
        // SAFETY: socketpair writes two fds into the 2-element array on success.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
        // SAFETY: both fds were just created and are owned by nothing else.
        let (a, b) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        // SAFETY: F_SETFL with O_NONBLOCK on a valid fd we own.
        unsafe { libc::fcntl(a.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        (a, b)
    }

    #[test]
    fn tx_strips_header_and_writes_one_frame() {
        let mem = memory();
        let (dev_side, peer) = pair();
        let mut net = Net::new(
            Box::new(dev_side),
            Some([2, 0, 0, 0, 0, 9]),
            &RateLimitConfig::default(),
        );
        let frame: Vec<u8> = (0..60u8).collect();
        mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(0x10_0000))
            .expect("hdr");
        mem.write_slice(&frame, GuestAddress(0x10_1000))
            .expect("frame");
        let rxq = virtio_queue::Queue::new(256).expect("rx");
        let (mock, txq) = queue_with_chains(
            &mem,
            0x1000,
            &[vec![
                desc(0x10_0000, NET_HDR_LEN as u32, false),
                desc(0x10_1000, 60, false),
            ]],
        );
        let mut qs = vec![rxq, txq];
        assert!(net.queue_notify(&mem, &mut qs, 1));
        assert_eq!(used_idx(&mem, &mock), 1);
        let mut got = [0u8; 2048];
        let n = (&peer).read(&mut got).expect("frame at peer");
        assert_eq!(&got[..n], &frame[..]);
        let mut cfg = [0u8; 6];
        net.read_config(0, &mut cfg);
        assert_eq!(cfg, [2, 0, 0, 0, 0, 9]);
    }

    #[test]
    fn tx_rate_limit_defers_frames_until_refill() {
        use crate::ratelimit::BucketConfig;
        let mem = memory();
        let (dev_side, peer) = pair();
        let limits = RateLimitConfig {
            bandwidth: None,
            ops: Some(BucketConfig {
                size: 1,
                refill_time_ms: 50,
            }),
        };
        let mut net = Net::new(Box::new(dev_side), None, &limits);
        for (i, at) in [0x10_0000u64, 0x10_2000].iter().enumerate() {
            mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(*at))
                .expect("hdr");
            mem.write_slice(&[i as u8; 60], GuestAddress(at + 0x100))
                .expect("frame");
        }
        let (mock, txq) = queue_with_chains(
            &mem,
            0x1000,
            &[
                vec![
                    desc(0x10_0000, NET_HDR_LEN as u32, false),
                    desc(0x10_0100, 60, false),
                ],
                vec![
                    desc(0x10_2000, NET_HDR_LEN as u32, false),
                    desc(0x10_2100, 60, false),
                ],
            ],
        );
        let mut qs = vec![virtio_queue::Queue::new(256).expect("rx"), txq];
        assert!(net.queue_notify(&mem, &mut qs, 1));
        assert_eq!(used_idx(&mem, &mock), 1, "second frame waits for a token");
        let mut w = Wait::default();
        net.wait(&mem, &qs, &mut w);
        assert!(w
            .timeout
            .is_some_and(|t| t <= std::time::Duration::from_millis(50)));
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert!(net.process_host(&mem, &mut qs));
        assert_eq!(used_idx(&mem, &mock), 2);
        let mut got = [0u8; 128];
        assert_eq!((&peer).read(&mut got).expect("first"), 60);
        assert_eq!(got[0], 0);
        assert_eq!((&peer).read(&mut got).expect("second"), 60);
        assert_eq!(got[0], 1);
    }

    #[test]
    fn rx_holds_frame_until_guest_posts_a_buffer() {
        let mem = memory();
        let (dev_side, peer) = pair();
        let mut net = Net::new(Box::new(dev_side), None, &RateLimitConfig::default());
        (&peer).write_all(b"frame-from-the-tap").expect("send");
        // No buffers yet: the frame is read and held, nothing is used.
        let mut qs = vec![
            virtio_queue::Queue::new(256).expect("rx"),
            virtio_queue::Queue::new(256).expect("tx"),
        ];
        assert!(!net.process_host(&mem, &mut qs));
        assert!(net.pending_rx.is_some());
        let mut w = Wait::default();
        net.wait(&mem, &qs, &mut w);
        assert!(w.fds.is_empty(), "no TAP polling while a frame is held");

        let (mock, rxq) = queue_with_chains(&mem, 0x1000, &[vec![desc(0x20_0000, 2048, true)]]);
        qs[0] = rxq;
        assert!(net.queue_notify(&mem, &mut qs, 0));
        assert_eq!(used(&mem, &mock, 0), (0, (NET_HDR_LEN + 18) as u32));
        let mut got = vec![0u8; NET_HDR_LEN + 18];
        mem.read_slice(&mut got, GuestAddress(0x20_0000))
            .expect("read");
        assert_eq!(got[10], 1, "num_buffers");
        assert_eq!(&got[NET_HDR_LEN..], b"frame-from-the-tap");
    }
}
