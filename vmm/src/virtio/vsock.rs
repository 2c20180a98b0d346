//! virtio-vsock with a Unix-socket host side (Firecracker's protocol, no vhost-vsock needed).
//!
//! - Host to guest: a host process connects to `uds_path` and writes `CONNECT <port>\n`; the
//!   device picks a host port, sends the guest a REQUEST, and once the guest answers RESPONSE,
//!   writes `OK <hostport>\n` to the host process. From then on the Unix stream carries the bytes.
//!   This is how the box daemon reaches the cell daemon (`vsock:1024`).
//! - Guest to host: a guest REQUEST for host port P connects to `<uds_path>_P`.
//!
//! Packets are parsed from the TX ring by [`Packet::from_bytes`] (fuzzed). Flow control follows
//! the spec's credit scheme: the device never sends the guest more than the guest's advertised
//! buffer space, and advertises [`CONN_BUF`] per connection itself; a guest that overruns it is
//! reset.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{
    collect_chain, device_type, has_available, read_from_descs, write_to_descs, VirtioDevice, Wait,
    VIRTIO_F_VERSION_1,
};

/// The host's context id.
pub const HOST_CID: u64 = 2;
/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// Largest payload accepted from the guest in one packet.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Receive buffer the device advertises per connection (guest-to-host bytes in flight).
pub const CONN_BUF: u32 = 256 * 1024;
/// First host port handed to host-initiated connections.
pub const FIRST_HOST_PORT: u32 = 1 << 30;
const MAX_CONNECT_LINE: usize = 32;

/// Stream sockets are the only type.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    #![allow(missing_docs)]
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;

/// `struct virtio_vsock_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes the little-endian wire form.
    pub fn decode(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"));
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes to the wire form.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why bytes from the guest are not a packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer than 44 bytes.
    #[error("packet of {0} bytes is shorter than the 44-byte header")]
    Short(usize),
    /// `len` disagrees with the bytes present, or exceeds [`MAX_PAYLOAD`].
    #[error("header says {said} payload bytes, {got} present (max {MAX_PAYLOAD})")]
    Length {
        /// From the header.
        said: u32,
        /// In the buffers.
        got: usize,
    },
    /// Unknown operation.
    #[error("unknown operation {0}")]
    Op(u16),
    /// A payload on something other than RW.
    #[error("operation {0} carries a payload")]
    UnexpectedPayload(u16),
}

/// A packet from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Header.
    pub hdr: Header,
    /// Payload (RW only).
    pub payload: Vec<u8>,
}

impl Packet {
    /// Parses header + payload as read from a TX chain's readable buffers.
    pub fn from_bytes(bytes: &[u8]) -> Result<Packet, PacketError> {
        let head: &[u8; HDR_LEN] = bytes
            .get(..HDR_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(PacketError::Short(bytes.len()))?;
        let hdr = Header::decode(head);
        let got = bytes.len() - HDR_LEN;
        if hdr.len as usize > MAX_PAYLOAD || (hdr.len as usize) > got {
            return Err(PacketError::Length { said: hdr.len, got });
        }
        if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&hdr.op) {
            return Err(PacketError::Op(hdr.op));
        }
        if hdr.len != 0 && hdr.op != op::RW {
            return Err(PacketError::UnexpectedPayload(hdr.op));
        }
        Ok(Packet {
            hdr,
            payload: bytes[HDR_LEN..HDR_LEN + hdr.len as usize].to_vec(),
        })
    }
}

/// Errors setting up the host side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// bind/listen on the Unix socket failed.
    #[error("listen on vsock socket {path}")]
    Listen {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    AwaitingResponse,
    Established,
    /// The host side hung up; SHUTDOWN sent, waiting for the guest's RST.
    Closing,
}

struct Conn {
    stream: UnixStream,
    state: ConnState,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes of guest data delivered to the host stream.
    fwd_cnt: u32,
    /// `fwd_cnt` last told to the guest.
    fwd_cnt_sent: u32,
    /// Guest data not yet written to the host stream.
    to_host: Vec<u8>,
    /// The guest will send no more (SHUTDOWN with SEND): shut the stream's write side once
    /// `to_host` drains.
    guest_done_sending: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: ConnState) -> Self {
        Self {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            to_host: Vec::new(),
            guest_done_sending: false,
        }
    }

    /// Bytes the guest can still take on this connection.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Writes buffered guest data to the host; false if the host side is gone.
    fn flush_to_host(&mut self) -> bool {
        while !self.to_host.is_empty() {
            match self.stream.write(&self.to_host) {
                Ok(0) => return false,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        if self.to_host.is_empty() && self.guest_done_sending {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        true
    }
}

struct PendingConnect {
    stream: UnixStream,
    line: Vec<u8>,
}

/// (host port, guest port).
type Key = (u32, u32);

/// The vsock device.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    pending: Vec<PendingConnect>,
    conns: HashMap<Key, Conn>,
    /// Header-only packets waiting for an RX buffer, in order.
    control: VecDeque<Header>,
    next_host_port: u32,
    sizes: [u16; 3],
}

const RX: usize = 0;
const TX: usize = 1;

impl Vsock {
    /// Listens on `uds_path` (replacing a stale socket file) for guest context `cid`.
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, Error> {
        let _ = std::fs::remove_file(uds_path);
        let listener = UnixListener::bind(uds_path)
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .map_err(|source| Error::Listen {
                path: uds_path.display().to_string(),
                source,
            })?;
        Ok(Self {
            cid,
            uds_path: uds_path.to_owned(),
            listener,
            pending: Vec::new(),
            conns: HashMap::new(),
            control: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
            sizes: [256, 256, 256],
        })
    }

    fn reply(&mut self, key: Key, op: u16, flags: u32) {
        let fwd_cnt = self.conns.get_mut(&key).map_or(0, |c| {
            c.fwd_cnt_sent = c.fwd_cnt;
            c.fwd_cnt
        });
        self.control.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF,
            fwd_cnt,
        });
    }

    fn reset_conn(&mut self, key: Key) {
        self.conns.remove(&key);
        self.reply(key, op::RST, 0);
    }

    /// Handles one packet from the guest.
    fn handle_tx(&mut self, pkt: Packet) {
        let h = pkt.hdr;
        let key = (h.dst_port, h.src_port);
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            tracing::debug!(
                ?h,
                "vsock: packet not from our guest to the host, resetting"
            );
            if h.op != op::RST {
                self.control.push_back(Header {
                    src_cid: HOST_CID,
                    dst_cid: self.cid,
                    src_port: h.dst_port,
                    dst_port: h.src_port,
                    type_: TYPE_STREAM,
                    op: op::RST,
                    ..Default::default()
                });
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            op::REQUEST => {
                if self.conns.contains_key(&key) {
                    self.reset_conn(key);
                    return;
                }
                let path = format!("{}_{}", self.uds_path.display(), h.dst_port);
                match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
                    Ok(stream) => {
                        let mut c = Conn::new(stream, ConnState::Established);
                        c.peer_buf_alloc = h.buf_alloc;
                        c.peer_fwd_cnt = h.fwd_cnt;
                        self.conns.insert(key, c);
                        self.reply(key, op::RESPONSE, 0);
                    }
                    Err(e) => {
                        tracing::debug!(path, error = %e, "vsock: guest connect refused");
                        self.reply(key, op::RST, 0);
                    }
                }
            }
            op::RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if c.state == ConnState::AwaitingResponse => {
                    c.state = ConnState::Established;
                    let line = format!("OK {}\n", key.0);
                    if c.stream.write_all(line.as_bytes()).is_err() {
                        self.reset_conn(key);
                    }
                }
                _ => self.reset_conn(key),
            },
            op::RW => {
                let ok = match self.conns.get_mut(&key) {
                    Some(c) if c.state != ConnState::AwaitingResponse => {
                        if c.to_host.len() + pkt.payload.len() > CONN_BUF as usize {
                            tracing::warn!(port = key.1, "vsock: guest overran its credit");
                            false
                        } else {
                            c.to_host.extend_from_slice(&pkt.payload);
                            c.flush_to_host()
                        }
                    }
                    _ => false,
                };
                if !ok {
                    self.reset_conn(key);
                } else if let Some(c) = self.conns.get(&key) {
                    if c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent) >= CONN_BUF / 4 {
                        self.reply(key, op::CREDIT_UPDATE, 0);
                    }
                }
            }
            op::CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.reply(key, op::CREDIT_UPDATE, 0);
                } else {
                    self.reply(key, op::RST, 0);
                }
            }
            op::CREDIT_UPDATE => {}
            op::SHUTDOWN => {
                if h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    // Fully closed: deliver what is buffered, then tell the guest it is gone.
                    if let Some(mut c) = self.conns.remove(&key) {
                        c.guest_done_sending = true;
                        c.flush_to_host();
                    }
                    self.reply(key, op::RST, 0);
                } else if h.flags & SHUTDOWN_SEND != 0 {
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.guest_done_sending = true;
                        c.flush_to_host();
                    }
                }
            }
            op::RST => {
                self.conns.remove(&key);
            }
            _ => {}
        }
    }

    fn process_tx(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) -> bool {
        let mut used = false;
        let mut bytes = Vec::with_capacity(HDR_LEN + 4096);
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            bytes.clear();
            let parsed = match collect_chain(chain) {
                Ok(descs) => {
                    match read_from_descs(mem, &descs, 0, &mut bytes, HDR_LEN + MAX_PAYLOAD) {
                        Ok(()) => Packet::from_bytes(&bytes).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            match parsed {
                Ok(pkt) => self.handle_tx(pkt),
                Err(e) => tracing::warn!(error = %e, "vsock: dropping malformed tx packet"),
            }
            if q.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    /// Accepts host connections and reads their `CONNECT <port>` lines.
    fn accept_host(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        self.pending.push(PendingConnect {
                            stream,
                            line: Vec::new(),
                        });
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept");
                    break;
                }
            }
        }
        let mut i = 0;
        while i < self.pending.len() {
            let p = &mut self.pending[i];
            let mut byte = [0u8; 1];
            let mut outcome = None; // Some(Ok(port)) | Some(Err(()))
            loop {
                match p.stream.read(&mut byte) {
                    Ok(0) => {
                        outcome = Some(Err(()));
                        break;
                    }
                    Ok(_) if byte[0] == b'\n' => {
                        outcome = Some(parse_connect(&p.line).ok_or(()));
                        break;
                    }
                    Ok(_) => {
                        p.line.push(byte[0]);
                        if p.line.len() > MAX_CONNECT_LINE {
                            outcome = Some(Err(()));
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        outcome = Some(Err(()));
                        break;
                    }
                }
            }
            match outcome {
                None => i += 1,
                Some(Err(())) => {
                    let p = self.pending.swap_remove(i);
                    tracing::debug!(line = %String::from_utf8_lossy(&p.line), "vsock: bad CONNECT line, closing");
                }
                Some(Ok(guest_port)) => {
                    let p = self.pending.swap_remove(i);
                    let host_port = self.next_host_port;
                    self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
                    let key = (host_port, guest_port);
                    self.conns
                        .insert(key, Conn::new(p.stream, ConnState::AwaitingResponse));
                    self.reply(key, op::REQUEST, 0);
                }
            }
        }
    }

    /// Moves control packets and host data into guest RX buffers.
    fn fill_rx(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) -> bool {
        let mut used = false;
        'buffers: while has_available(q, mem) {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let descs = match collect_chain(chain) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: bad rx chain");
                    if q.add_used(mem, head, 0).is_err() {
                        break;
                    }
                    used = true;
                    continue;
                }
            };
            let room: usize = descs
                .iter()
                .filter(|d| d.write)
                .map(|d| d.len as usize)
                .sum();
            if room < HDR_LEN {
                if q.add_used(mem, head, 0).is_err() {
                    break;
                }
                used = true;
                continue;
            }
            let mut packet: Option<Vec<u8>> = self.control.pop_front().map(|h| h.encode().to_vec());
            if packet.is_none() {
                packet = self.read_host_data(room - HDR_LEN);
            }
            let Some(bytes) = packet else {
                q.go_to_previous_position();
                break 'buffers;
            };
            let n = write_to_descs(mem, &descs, &bytes).unwrap_or(0);
            if q.add_used(mem, head, n as u32).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    /// One RW packet (header + data) from the first connection with data and credit, or a
    /// SHUTDOWN if a host side hung up.
    fn read_host_data(&mut self, room: usize) -> Option<Vec<u8>> {
        let mut hung_up = None;
        let mut out = None;
        for (&key, c) in self.conns.iter_mut() {
            if c.state != ConnState::Established {
                continue;
            }
            let credit = c.peer_credit() as usize;
            if credit == 0 {
                continue;
            }
            let mut buf = vec![0u8; HDR_LEN + room.min(credit).min(MAX_PAYLOAD)];
            match c.stream.read(&mut buf[HDR_LEN..]) {
                Ok(0) => {
                    hung_up = Some(key);
                    break;
                }
                Ok(n) => {
                    buf.truncate(HDR_LEN + n);
                    c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                    c.fwd_cnt_sent = c.fwd_cnt;
                    let h = Header {
                        src_cid: HOST_CID,
                        dst_cid: self.cid,
                        src_port: key.0,
                        dst_port: key.1,
                        len: n as u32,
                        type_: TYPE_STREAM,
                        op: op::RW,
                        flags: 0,
                        buf_alloc: CONN_BUF,
                        fwd_cnt: c.fwd_cnt,
                    };
                    buf[..HDR_LEN].copy_from_slice(&h.encode());
                    out = Some(buf);
                    break;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(_) => {
                    hung_up = Some(key);
                    break;
                }
            }
        }
        if let Some(key) = hung_up {
            if let Some(c) = self.conns.get_mut(&key) {
                c.state = ConnState::Closing;
            }
            self.reply(key, op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
            return self.control.pop_front().map(|h| h.encode().to_vec());
        }
        out
    }

    /// Flushes buffered guest data to host streams; resets connections whose host side died.
    fn flush_all(&mut self) {
        let dead: Vec<Key> = self
            .conns
            .iter_mut()
            .filter(|(_, c)| !c.to_host.is_empty())
            .filter_map(|(k, c)| (!c.flush_to_host()).then_some(*k))
            .collect();
        for k in dead {
            self.reset_conn(k);
        }
        let updates: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent) >= CONN_BUF / 4)
            .map(|(k, _)| *k)
            .collect();
        for k in updates {
            self.reply(k, op::CREDIT_UPDATE, 0);
        }
    }
}

/// Parses `CONNECT <port>` (without the newline).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.trim_end_matches('\r').strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }
    fn name(&self) -> &'static str {
        "vsock"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let cid = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset as usize + i;
            *b = if at < 8 { cid[at] } else { 0 };
        }
    }
    fn reset(&mut self) {
        // The guest driver restarted: every connection it knew is gone.
        self.conns.clear();
        self.control.clear();
    }
    fn queue_notify(&mut self, mem: &GuestMemoryMmap, queues: &mut [Queue], index: u16) -> bool {
        match index as usize {
            TX => {
                let tx = self.process_tx(mem, &mut queues[TX]);
                // Replies (RESPONSE, RST, credit) go out at once if buffers are there.
                let rx = self.fill_rx(mem, &mut queues[RX]);
                tx || rx
            }
            RX => self.fill_rx(mem, &mut queues[RX]),
            _ => false, // event queue: the device never posts transport events
        }
    }
    fn process_host(&mut self, mem: &GuestMemoryMmap, queues: &mut [Queue]) -> bool {
        self.accept_host();
        self.flush_all();
        self.fill_rx(mem, &mut queues[RX])
    }
    fn wait(&self, mem: &GuestMemoryMmap, queues: &[Queue], wait: &mut Wait) {
        wait.fds.push((self.listener.as_raw_fd(), libc::POLLIN));
        for p in &self.pending {
            wait.fds.push((p.stream.as_raw_fd(), libc::POLLIN));
        }
        let rx_room = has_available(&queues[RX], mem);
        if rx_room && !self.control.is_empty() {
            wait.at_most(std::time::Duration::ZERO);
        }
        for c in self.conns.values() {
            let mut events = 0;
            if rx_room && c.state == ConnState::Established && c.peer_credit() > 0 {
                events |= libc::POLLIN;
            }
            if !c.to_host.is_empty() {
                events |= libc::POLLOUT;
            }
            if events != 0 {
                wait.fds.push((c.stream.as_raw_fd(), events));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{desc, memory, offer_more, queue_with_chains, used, used_idx};
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    const CID: u64 = 42;

    fn guest_hdr(op_: u16, src_port: u32, dst_port: u32, len: u32, flags: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op: op_,
            flags,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn header_round_trips_and_parser_rejects_garbage() {
        let h = guest_hdr(op::RW, 7, 9, 3, 0);
        let mut bytes = h.encode().to_vec();
        bytes.extend_from_slice(b"abc");
        let p = Packet::from_bytes(&bytes).expect("valid");
        assert_eq!((p.hdr, p.payload.as_slice()), (h, &b"abc"[..]));
        assert_eq!(
            Packet::from_bytes(&bytes[..10]),
            Err(PacketError::Short(10))
        );
        assert!(matches!(
            Packet::from_bytes(&bytes[..46]),
            Err(PacketError::Length { said: 3, got: 2 })
        ));
        let mut bad = guest_hdr(99, 1, 2, 0, 0).encode().to_vec();
        assert_eq!(Packet::from_bytes(&bad), Err(PacketError::Op(99)));
        bad = guest_hdr(op::REQUEST, 1, 2, 1, 0).encode().to_vec();
        bad.push(0);
        assert_eq!(
            Packet::from_bytes(&bad),
            Err(PacketError::UnexpectedPayload(op::REQUEST))
        );
        let huge = guest_hdr(op::RW, 1, 2, u32::MAX, 0).encode();
        assert!(matches!(
            Packet::from_bytes(&huge),
            Err(PacketError::Length { .. })
        ));
    }

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 1024\r"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT x"), None);
        assert_eq!(parse_connect(b"connect 1"), None);
    }

    fn rx_header(mem: &GuestMemoryMmap, at: u64) -> Header {
        let mut b = [0u8; HDR_LEN];
        mem.read_slice(&mut b, GuestAddress(at)).expect("read");
        Header::decode(&b)
    }

    fn tx_chain(
        mem: &GuestMemoryMmap,
        at: u64,
        h: Header,
        payload: &[u8],
    ) -> Vec<virtio_queue::desc::RawDescriptor> {
        mem.write_slice(&h.encode(), GuestAddress(at)).expect("hdr");
        mem.write_slice(payload, GuestAddress(at + 0x100))
            .expect("payload");
        if payload.is_empty() {
            vec![desc(at, HDR_LEN as u32, false)]
        } else {
            vec![
                desc(at, HDR_LEN as u32, false),
                desc(at + 0x100, payload.len() as u32, false),
            ]
        }
    }

    #[test]
    fn guest_initiated_connection_reaches_host_listener_and_back() {
        let dir = tempfile::tempdir().expect("tmp");
        let uds = dir.path().join("v.sock");
        let host = UnixListener::bind(format!("{}_5000", uds.display())).expect("host listener");
        let mut dev = Vsock::new(CID, &uds).expect("vsock");
        let mem = memory();
        // RX: two buffers. TX: REQUEST, then RW "ping".
        let (rx_mock, rxq) = queue_with_chains(
            &mem,
            0x1000,
            &[
                vec![desc(0x20_0000, 4096, true)],
                vec![desc(0x20_2000, 4096, true)],
            ],
        );
        let (tx_mock, txq) = queue_with_chains(
            &mem,
            0x4000,
            &[tx_chain(
                &mem,
                0x30_0000,
                guest_hdr(op::REQUEST, 777, 5000, 0, 0),
                &[],
            )],
        );
        let evq = virtio_queue::Queue::new(256).expect("ev");
        let mut qs = vec![rxq, txq, evq];
        assert!(dev.queue_notify(&mem, &mut qs, TX as u16));
        let r = rx_header(&mem, 0x20_0000);
        assert_eq!(
            (r.op, r.src_port, r.dst_port, r.dst_cid),
            (op::RESPONSE, 5000, 777, CID)
        );
        let (mut peer, _) = host.accept().expect("VMM connected to <uds>_5000");

        offer_more(
            &tx_mock,
            1,
            &tx_chain(&mem, 0x31_0000, guest_hdr(op::RW, 777, 5000, 4, 0), b"ping"),
        );
        assert!(dev.queue_notify(&mem, &mut qs, TX as u16));
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).expect("host reads");
        assert_eq!(&got, b"ping");

        peer.write_all(b"pong!").expect("host writes");
        // Host data becomes an RW packet in the second RX buffer.
        let mut tries = 0;
        while used_idx(&mem, &rx_mock) < 2 && tries < 100 {
            dev.process_host(&mem, &mut qs);
            std::thread::sleep(std::time::Duration::from_millis(5));
            tries += 1;
        }
        assert_eq!(used(&mem, &rx_mock, 1), (1, (HDR_LEN + 5) as u32));
        let r = rx_header(&mem, 0x20_2000);
        assert_eq!(
            (r.op, r.len, r.src_port, r.dst_port),
            (op::RW, 5, 5000, 777)
        );
        let mut payload = [0u8; 5];
        mem.read_slice(&mut payload, GuestAddress(0x20_2000 + HDR_LEN as u64))
            .expect("payload");
        assert_eq!(&payload, b"pong!");
    }

    #[test]
    fn guest_connect_to_absent_port_gets_rst() {
        let dir = tempfile::tempdir().expect("tmp");
        let uds = dir.path().join("v.sock");
        let mut dev = Vsock::new(CID, &uds).expect("vsock");
        let mem = memory();
        let (_rx, rxq) = queue_with_chains(&mem, 0x1000, &[vec![desc(0x20_0000, 4096, true)]]);
        let (_tx, txq) = queue_with_chains(
            &mem,
            0x4000,
            &[tx_chain(
                &mem,
                0x30_0000,
                guest_hdr(op::REQUEST, 1, 6000, 0, 0),
                &[],
            )],
        );
        let mut qs = vec![rxq, txq, virtio_queue::Queue::new(256).expect("ev")];
        dev.queue_notify(&mem, &mut qs, TX as u16);
        assert_eq!(rx_header(&mem, 0x20_0000).op, op::RST);
    }

    #[test]
    fn host_initiated_connect_waits_for_guest_response_then_says_ok() {
        let dir = tempfile::tempdir().expect("tmp");
        let uds = dir.path().join("v.sock");
        let mut dev = Vsock::new(CID, &uds).expect("vsock");
        let mem = memory();
        let mut host = UnixStream::connect(&uds).expect("connect");
        host.write_all(b"CONNECT 1024\n").expect("connect line");
        let (_rx, rxq) = queue_with_chains(&mem, 0x1000, &[vec![desc(0x20_0000, 4096, true)]]);
        let mut qs = vec![
            rxq,
            virtio_queue::Queue::new(256).expect("tx"),
            virtio_queue::Queue::new(256).expect("ev"),
        ];
        let mut tries = 0;
        while !dev.process_host(&mem, &mut qs) && tries < 100 {
            std::thread::sleep(std::time::Duration::from_millis(5));
            tries += 1;
        }
        let req = rx_header(&mem, 0x20_0000);
        assert_eq!(
            (req.op, req.dst_port, req.src_cid),
            (op::REQUEST, 1024, HOST_CID)
        );
        assert!(req.src_port >= FIRST_HOST_PORT);
        // Guest accepts.
        let resp = Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: req.src_port,
            type_: TYPE_STREAM,
            op: op::RESPONSE,
            buf_alloc: 4096,
            ..Default::default()
        };
        dev.handle_tx(Packet {
            hdr: resp,
            payload: vec![],
        });
        let mut line = [0u8; 64];
        let n = host.read(&mut line).expect("OK line");
        assert_eq!(
            std::str::from_utf8(&line[..n]).expect("utf8"),
            format!("OK {}\n", req.src_port)
        );
    }

    #[test]
    fn bad_connect_line_closes_the_host_socket() {
        let dir = tempfile::tempdir().expect("tmp");
        let uds = dir.path().join("v.sock");
        let mut dev = Vsock::new(CID, &uds).expect("vsock");
        let mut host = UnixStream::connect(&uds).expect("connect");
        host.write_all(b"HELLO\n").expect("write");
        host.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .expect("timeout");
        let mut tries = 0;
        while dev.pending.is_empty() && tries < 50 {
            dev.accept_host();
            tries += 1;
        }
        dev.accept_host();
        let mut b = [0u8; 8];
        assert_eq!(host.read(&mut b).expect("EOF"), 0);
        assert!(dev.conns.is_empty());
    }
}
