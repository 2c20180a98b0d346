//! Entry points for the fuzz targets in `vmm/fuzz/` (and for the smoke runs in this
//! module's tests): untrusted guest bytes into the vsock packet parser, and untrusted descriptor
//! tables, rings and buffers into every device's queue handling. Neither may panic, loop forever
//! or touch memory outside the guest.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::block::Block;
use super::net::Net;
use super::rng::Rng;
use super::vsock::{Packet, Vsock};
use super::VirtioDevice;
use crate::ratelimit::RateLimitConfig;

const MEM_SIZE: usize = 1 << 20;
const DESC_TABLE: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUFFERS: u64 = 0x1_0000;
const QUEUE_SIZE: u16 = 16;

/// Parses arbitrary bytes as a vsock packet from the guest.
pub fn vsock_packet(data: &[u8]) {
    if let Ok(p) = Packet::from_bytes(data) {
        assert!(p.payload.len() == p.hdr.len as usize);
        let again = p.hdr.encode();
        assert_eq!(&again[..], &data[..super::vsock::HDR_LEN]);
    }
}

fn memfd(name: &str, len: u64) -> File {
    let cname = std::ffi::CString::new(name).expect("no NUL");
    // SAFETY: memfd_create with a valid C string; the fd is checked and then owned by File.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor owned by nothing else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("size memfd");
    f
}

struct Devices {
    block: Block,
    net: Net,
    rng: Rng,
    vsock: Vsock,
    _peer: File,
    _disk: File,
}

fn devices() -> &'static Mutex<Devices> {
    static DEVICES: OnceLock<Mutex<Devices>> = OnceLock::new();
    DEVICES.get_or_init(|| {
        let disk = memfd("fuzz-disk", 64 * 1024);
        let path = PathBuf::from(format!("/proc/self/fd/{}", disk.as_raw_fd()));
        let block = Block::open(&path, false, &RateLimitConfig::default()).expect("fuzz disk");
        let mut fds = [0i32; 2];
        // SAFETY: socketpair writes two descriptors into the array on success.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: both fds are fresh and owned by nothing else.
        let (dev, peer) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let net = Net::new(
            Box::new(dev),
            Some([2, 0, 0, 0, 0, 1]),
            &RateLimitConfig::default(),
        );
        let dir = std::env::temp_dir().join(format!("hive-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz dir");
        let vsock = Vsock::new(3, &dir.join("v.sock")).expect("fuzz vsock");
        Mutex::new(Devices {
            block,
            net,
            rng: Rng::new(),
            vsock,
            _peer: peer,
            _disk: disk,
        })
    })
}

/// Lays out a descriptor table, avail ring and buffer bytes from `data`, then lets one device
/// (chosen by the first byte) process a notify on one of its queues.
pub fn descriptor_chain(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("fuzz memory");
    // Descriptor table: 16 entries of 16 bytes straight from the input; addresses are folded
    // into (and sometimes just past) guest memory so chains point somewhere interesting.
    let mut table = [0u8; 16 * QUEUE_SIZE as usize];
    let n = rest.len().min(table.len());
    table[..n].copy_from_slice(&rest[..n]);
    for d in table.chunks_mut(16) {
        let raw = u64::from_le_bytes(d[0..8].try_into().expect("8 bytes"));
        let addr = if raw & 0x8000_0000_0000_0000 != 0 {
            raw
        } else {
            raw % (MEM_SIZE as u64 + 0x1000)
        };
        d[0..8].copy_from_slice(&addr.to_le_bytes());
    }
    mem.write_slice(&table, GuestAddress(DESC_TABLE))
        .expect("table");
    let rest = &rest[n..];
    // Avail ring: flags, idx, ring[16].
    let mut avail = [0u8; 4 + 2 * QUEUE_SIZE as usize];
    let m = rest.len().min(avail.len());
    avail[..m].copy_from_slice(&rest[..m]);
    mem.write_slice(&avail, GuestAddress(AVAIL)).expect("avail");
    // Whatever is left fills the buffer area (block headers, vsock headers, frames).
    let rest = &rest[m..];
    let b = rest.len().min(MEM_SIZE - BUFFERS as usize);
    mem.write_slice(&rest[..b], GuestAddress(BUFFERS))
        .expect("buffers");

    let make_queue = || {
        let mut q = Queue::new(QUEUE_SIZE).expect("queue");
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        q
    };
    if !make_queue().is_valid(&mem) {
        return;
    }
    let mut guard = devices().lock().unwrap_or_else(|p| p.into_inner());
    let d = &mut *guard;
    let (dev, index): (&mut dyn VirtioDevice, u16) = match selector % 6 {
        0 => (&mut d.block, 0),
        1 => (&mut d.rng, 0),
        2 => (&mut d.net, 0),
        3 => (&mut d.net, 1),
        4 => (&mut d.vsock, 0),
        _ => (&mut d.vsock, 1),
    };
    let mut queues: Vec<Queue> = (0..dev.queue_max_sizes().len())
        .map(|_| make_queue())
        .collect();
    dev.queue_notify(&mem, &mut queues, index);
    dev.process_host(&mem, &mut queues);
    // Device state must not leak between inputs.
    dev.reset();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic pseudo-random inputs for a smoke run of both targets.
    fn inputs(seed: u64, count: usize, max_len: usize) -> impl Iterator<Item = Vec<u8>> {
        let mut s = seed;
        let mut next = move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            s.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        (0..count).map(move |_| {
            let len = (next() as usize) % max_len;
            (0..len).map(|_| next() as u8).collect()
        })
    }

    #[test]
    fn vsock_parser_survives_random_input() {
        for input in inputs(0x9e37_79b9_7f4a_7c15, 20_000, 200) {
            vsock_packet(&input);
        }
        // And valid packets round-trip.
        let h = super::super::vsock::Header {
            len: 2,
            op: super::super::vsock::op::RW,
            type_: 1,
            ..Default::default()
        };
        let mut v = h.encode().to_vec();
        v.extend_from_slice(b"hi");
        vsock_packet(&v);
    }

    #[test]
    fn devices_survive_random_descriptor_tables() {
        for input in inputs(0x1234_5678_9abc_def1, 3_000, 1200) {
            descriptor_chain(&input);
        }
    }

    #[test]
    fn devices_survive_looping_chains() {
        // Every descriptor chains to itself: the walk must stop.
        for sel in 0..6u8 {
            let mut input = vec![sel];
            for i in 0..16u16 {
                let mut d = [0u8; 16];
                d[0..8].copy_from_slice(&(BUFFERS + u64::from(i) * 64).to_le_bytes());
                d[8..12].copy_from_slice(&64u32.to_le_bytes());
                d[12..14].copy_from_slice(&1u16.to_le_bytes()); // NEXT
                d[14..16].copy_from_slice(&i.to_le_bytes());
                input.extend_from_slice(&d);
            }
            input.extend_from_slice(&[0, 0, 4, 0, 0, 0, 1, 0, 2, 0, 3, 0]);
            descriptor_chain(&input);
        }
    }
}
