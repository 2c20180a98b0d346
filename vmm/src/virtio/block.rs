//! virtio-blk on a raw image file: read, write, flush, get-id; read-only disks refuse writes.
//!
//! Requests are parsed from the descriptor chain into a [`Request`] (header, data buffers, status
//! byte) before anything touches the file, and every sector range is checked against the disk
//! size. A token-bucket [`RateLimiter`] (bytes and ops, from the size class) is paid per request;
//! when it is empty the request stays in the ring and the device thread retries after refill.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use virtio_bindings::virtio_blk as blk;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{
    collect_chain, device_type, write_to_descs, ChainError, Desc, VirtioDevice, Wait,
    VIRTIO_F_VERSION_1,
};
use crate::ratelimit::{RateLimitConfig, RateLimiter};

const SECTOR: u64 = 512;
const F_RO: u64 = 1 << blk::VIRTIO_BLK_F_RO;
const F_FLUSH: u64 = 1 << blk::VIRTIO_BLK_F_FLUSH;

const T_IN: u32 = blk::VIRTIO_BLK_T_IN;
const T_OUT: u32 = blk::VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = blk::VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = blk::VIRTIO_BLK_T_GET_ID;

/// Status byte values.
pub const S_OK: u8 = blk::VIRTIO_BLK_S_OK as u8;
/// I/O error (also: out of range, write to read-only disk).
pub const S_IOERR: u8 = blk::VIRTIO_BLK_S_IOERR as u8;
/// Unsupported request type.
pub const S_UNSUPP: u8 = blk::VIRTIO_BLK_S_UNSUPP as u8;

/// Largest data transfer accepted in one request.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
const ID_LEN: usize = blk::VIRTIO_BLK_ID_BYTES as usize;

/// Errors opening the backing file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// open(2) failed.
    #[error("open disk image {path}")]
    Open {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The size is not a whole number of sectors.
    #[error("disk image {path}: size {size} is not a multiple of 512")]
    Size {
        /// Path.
        path: String,
        /// Size.
        size: u64,
    },
}

/// Why a chain is not a valid block request (the guest gets no status byte for these: the
/// chain is returned with length 0, as there may be nowhere safe to write one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Chain shape.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// Fewer than two descriptors (header + status).
    #[error("request has {0} descriptors, need header and status")]
    TooShort(usize),
    /// Header descriptor missing, writable or under 16 bytes.
    #[error("bad request header descriptor")]
    Header,
    /// Header not in guest memory.
    #[error("request header outside guest memory")]
    HeaderMemory,
    /// Status descriptor readable or empty.
    #[error("bad status descriptor")]
    Status,
    /// A data buffer points the wrong way for the request type.
    #[error("data buffer direction does not match request type {0}")]
    Direction(u32),
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// virtio-blk request type.
    pub kind: u32,
    /// First sector.
    pub sector: u64,
    /// Data buffers (between header and status).
    pub data: Vec<Desc>,
    /// The status byte.
    pub status: Desc,
}

impl Request {
    /// Parses a chain: 16-byte readable header, data buffers, 1-byte writable status.
    pub fn parse(mem: &GuestMemoryMmap, descs: &[Desc]) -> Result<Request, RequestError> {
        if descs.len() < 2 {
            return Err(RequestError::TooShort(descs.len()));
        }
        let header = descs[0];
        if header.write || header.len < 16 {
            return Err(RequestError::Header);
        }
        let mut h = [0u8; 16];
        mem.read_slice(&mut h, header.addr)
            .map_err(|_| RequestError::HeaderMemory)?;
        let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let status = descs[descs.len() - 1];
        if !status.write || status.len < 1 {
            return Err(RequestError::Status);
        }
        let data = descs[1..descs.len() - 1].to_vec();
        let want_write = matches!(kind, T_IN | T_GET_ID);
        if matches!(kind, T_IN | T_OUT | T_GET_ID) && data.iter().any(|d| d.write != want_write) {
            return Err(RequestError::Direction(kind));
        }
        Ok(Request {
            kind,
            sector,
            data,
            status,
        })
    }

    /// Bytes of data the request moves.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|d| u64::from(d.len)).sum()
    }
}

/// The block device.
pub struct Block {
    file: File,
    read_only: bool,
    sectors: u64,
    id: [u8; ID_LEN],
    limiter: RateLimiter,
    limited: bool,
    sizes: [u16; 1],
}

impl Block {
    /// Opens `path` (read-only if `read_only`).
    pub fn open(path: &Path, read_only: bool, limits: &RateLimitConfig) -> Result<Self, Error> {
        let shown = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| Error::Open {
                path: shown.clone(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| Error::Open {
                path: shown.clone(),
                source,
            })?
            .len();
        if size % SECTOR != 0 {
            return Err(Error::Size { path: shown, size });
        }
        let mut id = [0u8; ID_LEN];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(ID_LEN);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Self {
            file,
            read_only,
            sectors: size / SECTOR,
            id,
            limiter: RateLimiter::new(limits, Instant::now()),
            limited: limits.bandwidth.is_some() || limits.ops.is_some(),
            sizes: [256],
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    fn in_range(&self, sector: u64, len: u64) -> bool {
        len <= MAX_REQUEST_BYTES
            && sector
                .checked_mul(SECTOR)
                .and_then(|off| off.checked_add(len))
                .is_some_and(|end| end <= self.sectors * SECTOR)
    }

    /// Runs a parsed request; returns (status, bytes written into guest buffers).
    fn execute(&mut self, mem: &GuestMemoryMmap, req: &Request) -> (u8, u32) {
        match req.kind {
            T_IN => {
                let len = req.data_len();
                if !self.in_range(req.sector, len) {
                    return (S_IOERR, 0);
                }
                let mut buf = vec![0u8; len as usize];
                if self
                    .file
                    .read_exact_at(&mut buf, req.sector * SECTOR)
                    .is_err()
                {
                    return (S_IOERR, 0);
                }
                match write_to_descs(mem, &req.data, &buf) {
                    Ok(n) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            T_OUT => {
                let len = req.data_len();
                if self.read_only || !self.in_range(req.sector, len) {
                    return (S_IOERR, 0);
                }
                let mut off = req.sector * SECTOR;
                for d in &req.data {
                    let mut buf = vec![0u8; d.len as usize];
                    if mem.read_slice(&mut buf, d.addr).is_err()
                        || self.file.write_all_at(&buf, off).is_err()
                    {
                        return (S_IOERR, 0);
                    }
                    off += u64::from(d.len);
                }
                (S_OK, 0)
            }
            T_FLUSH => {
                if self.read_only {
                    return (S_OK, 0);
                }
                match self.file.sync_data() {
                    Ok(()) => (S_OK, 0),
                    Err(_) => (S_IOERR, 0),
                }
            }
            T_GET_ID => match write_to_descs(mem, &req.data, &self.id) {
                Ok(n) => (S_OK, n as u32),
                Err(_) => (S_IOERR, 0),
            },
            _ => (S_UNSUPP, 0),
        }
    }

    fn process_queue(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) -> bool {
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let parsed = collect_chain(chain)
                .map_err(RequestError::from)
                .and_then(|descs| Request::parse(mem, &descs));
            let len = match parsed {
                Ok(req) => {
                    if !self.limiter.consume(req.data_len(), Instant::now()) {
                        // Leave it in the ring; the device thread retries after refill.
                        q.go_to_previous_position();
                        break;
                    }
                    let (status, written) = self.execute(mem, &req);
                    if mem.write_obj(status, req.status.addr).is_err() {
                        tracing::warn!("block: status byte outside guest memory");
                    }
                    written + 1
                }
                Err(e) => {
                    tracing::warn!(error = %e, "block: malformed request");
                    0
                }
            };
            if q.add_used(mem, head, len).is_err() {
                tracing::warn!("block: used ring outside guest memory");
                break;
            }
            used = true;
        }
        used
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }
    fn name(&self) -> &'static str {
        "block"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_FLUSH | if self.read_only { F_RO } else { 0 }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config starts with `le64 capacity`; the rest reads as zero.
        let cap = self.sectors.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset as usize + i;
            *b = if at < 8 { cap[at] } else { 0 };
        }
    }
    fn queue_notify(&mut self, mem: &GuestMemoryMmap, queues: &mut [Queue], _index: u16) -> bool {
        self.process_queue(mem, &mut queues[0])
    }
    fn host_side(&self) -> bool {
        // Only a rate limit leaves work for the device thread.
        self.limited
    }
    fn process_host(&mut self, mem: &GuestMemoryMmap, queues: &mut [Queue]) -> bool {
        if self.limiter.is_blocked() {
            self.process_queue(mem, &mut queues[0])
        } else {
            false
        }
    }
    fn wait(&self, _mem: &GuestMemoryMmap, _queues: &[Queue], wait: &mut Wait) {
        if let Some(d) = self.limiter.wait(Instant::now()) {
            wait.at_most(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{desc, memory, queue_with_chains, used, used_idx};
    use super::*;
    use crate::ratelimit::BucketConfig;
    use vm_memory::GuestAddress;

    fn disk(
        sectors: u64,
        read_only: bool,
        limits: RateLimitConfig,
    ) -> (tempfile::NamedTempFile, Block) {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        f.as_file().set_len(sectors * SECTOR).expect("size");
        let b = Block::open(f.path(), read_only, &limits).expect("open");
        (f, b)
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).expect("type");
        mem.write_obj(0u32, GuestAddress(at + 4)).expect("reserved");
        mem.write_obj(sector, GuestAddress(at + 8)).expect("sector");
    }

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x11_0000;
    const STATUS: u64 = 0x12_0000;

    fn status(mem: &GuestMemoryMmap) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).expect("status")
    }

    #[test]
    fn write_then_read_back_then_flush() {
        let mem = memory();
        let (f, mut blk) = disk(8, false, RateLimitConfig::default());
        let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(DATA))
            .expect("pattern");
        header(&mem, HDR, T_OUT, 3);
        let (mock, q) = queue_with_chains(
            &mem,
            0x1000,
            &[vec![
                desc(HDR, 16, false),
                desc(DATA, 512, false),
                desc(STATUS, 1, true),
            ]],
        );
        let mut qs = vec![q];
        assert!(blk.queue_notify(&mem, &mut qs, 0));
        assert_eq!(status(&mem), S_OK);
        let mut on_disk = vec![0u8; 512];
        f.as_file()
            .read_exact_at(&mut on_disk, 3 * 512)
            .expect("read file");
        assert_eq!(on_disk, pattern);
        assert_eq!(used_idx(&mem, &mock), 1);

        // Read it back into another buffer.
        header(&mem, HDR, T_IN, 3);
        let (mock, q) = queue_with_chains(
            &mem,
            0x1000,
            &[vec![
                desc(HDR, 16, false),
                desc(DATA + 0x1000, 512, true),
                desc(STATUS, 1, true),
            ]],
        );
        let mut qs = vec![q];
        assert!(blk.queue_notify(&mem, &mut qs, 0));
        assert_eq!(status(&mem), S_OK);
        assert_eq!(used(&mem, &mock, 0), (0, 513));
        let mut back = vec![0u8; 512];
        mem.read_slice(&mut back, GuestAddress(DATA + 0x1000))
            .expect("read");
        assert_eq!(back, pattern);

        header(&mem, HDR, T_FLUSH, 0);
        let (_mock, q) = queue_with_chains(
            &mem,
            0x1000,
            &[vec![desc(HDR, 16, false), desc(STATUS, 1, true)]],
        );
        let mut qs = vec![q];
        assert!(blk.queue_notify(&mem, &mut qs, 0));
        assert_eq!(status(&mem), S_OK);
    }

    #[test]
    fn read_only_disk_refuses_writes_and_offers_ro() {
        let mem = memory();
        let (_f, mut blk) = disk(8, true, RateLimitConfig::default());
        assert_ne!(blk.features() & F_RO, 0);
        header(&mem, HDR, T_OUT, 0);
        let (_m, q) = queue_with_chains(
            &mem,
            0x1000,
            &[vec![
                desc(HDR, 16, false),
                desc(DATA, 512, false),
                desc(STATUS, 1, true),
            ]],
        );
        let mut qs = vec![q];
        blk.queue_notify(&mem, &mut qs, 0);
        assert_eq!(status(&mem), S_IOERR);
    }

    #[test]
    fn out_of_range_and_unsupported_requests_fail_cleanly() {
        let mem = memory();
        let (_f, mut blk) = disk(8, false, RateLimitConfig::default());
        for (kind, sector, want) in [
            (T_IN, 8, S_IOERR),
            (T_IN, u64::MAX / 2, S_IOERR),
            (99, 0, S_UNSUPP),
        ] {
            header(&mem, HDR, kind, sector);
            let (_m, q) = queue_with_chains(
                &mem,
                0x1000,
                &[vec![
                    desc(HDR, 16, false),
                    desc(DATA, 512, true),
                    desc(STATUS, 1, true),
                ]],
            );
            let mut qs = vec![q];
            blk.queue_notify(&mem, &mut qs, 0);
            assert_eq!(status(&mem), want, "type {kind} sector {sector}");
        }
    }

    #[test]
    fn malformed_chains_are_returned_without_status() {
        let mem = memory();
        let (_f, mut blk) = disk(8, false, RateLimitConfig::default());
        header(&mem, HDR, T_IN, 0);
        // Status descriptor readable; then a data buffer of the wrong direction.
        let (mock, q) = queue_with_chains(
            &mem,
            0x1000,
            &[
                vec![desc(HDR, 16, false), desc(STATUS, 1, false)],
                vec![
                    desc(HDR, 16, false),
                    desc(DATA, 512, false),
                    desc(STATUS, 1, true),
                ],
                vec![desc(HDR, 8, false), desc(STATUS, 1, true)],
            ],
        );
        let mut qs = vec![q];
        assert!(blk.queue_notify(&mem, &mut qs, 0));
        assert_eq!(used_idx(&mem, &mock), 3);
        for i in 0..3 {
            assert_eq!(used(&mem, &mock, i).1, 0);
        }
    }

    #[test]
    fn rate_limit_defers_requests_until_refill() {
        let mem = memory();
        let limits = RateLimitConfig {
            bandwidth: None,
            ops: Some(BucketConfig {
                size: 1,
                refill_time_ms: 50,
            }),
        };
        let (_f, mut blk) = disk(8, false, limits);
        header(&mem, HDR, T_IN, 0);
        header(&mem, HDR + 0x100, T_IN, 1);
        let (mock, q) = queue_with_chains(
            &mem,
            0x1000,
            &[
                vec![
                    desc(HDR, 16, false),
                    desc(DATA, 512, true),
                    desc(STATUS, 1, true),
                ],
                vec![
                    desc(HDR + 0x100, 16, false),
                    desc(DATA + 0x1000, 512, true),
                    desc(STATUS + 1, 1, true),
                ],
            ],
        );
        let mut qs = vec![q];
        assert!(blk.queue_notify(&mem, &mut qs, 0));
        assert_eq!(used_idx(&mem, &mock), 1, "second request throttled");
        let mut w = Wait::default();
        blk.wait(&mem, &qs, &mut w);
        let t = w.timeout.expect("limiter asks for a wake-up");
        assert!(t <= std::time::Duration::from_millis(50), "{t:?}");
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert!(blk.process_host(&mem, &mut qs));
        assert_eq!(used_idx(&mem, &mock), 2);
    }

    #[test]
    fn image_size_must_be_whole_sectors() {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        f.as_file().set_len(1000).expect("size");
        let err = Block::open(f.path(), false, &RateLimitConfig::default())
            .err()
            .expect("odd size");
        assert!(err.to_string().contains("1000"), "{err}");
    }
}
