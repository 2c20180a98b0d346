//! virtio-rng: fills guest buffers from the host's getrandom(2).

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{collect_chain, device_type, write_to_descs, VirtioDevice, VIRTIO_F_VERSION_1};

/// Most bytes handed out per request (a guest asking for more gets a short buffer).
const MAX_REQUEST: usize = 64 * 1024;

/// The entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    sizes: [u16; 1],
}

impl Rng {
    /// One request queue.
    pub fn new() -> Self {
        Self { sizes: [256] }
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which we own.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }
    fn name(&self) -> &'static str {
        "rng"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn host_side(&self) -> bool {
        false
    }

    fn queue_notify(&mut self, mem: &GuestMemoryMmap, queues: &mut [Queue], _index: u16) -> bool {
        let q = &mut queues[0];
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let written = match collect_chain(chain) {
                Ok(descs) => {
                    let want: usize = descs
                        .iter()
                        .filter(|d| d.write)
                        .map(|d| d.len as usize)
                        .sum();
                    let mut buf = vec![0u8; want.min(MAX_REQUEST)];
                    match getrandom(&mut buf).map(|_| write_to_descs(mem, &descs, &buf)) {
                        Ok(Ok(n)) => n as u32,
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "rng: guest buffer outside memory");
                            0
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "rng: getrandom failed");
                            0
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "rng: bad descriptor chain");
                    0
                }
            };
            if q.add_used(mem, head, written).is_err() {
                tracing::warn!("rng: used ring outside guest memory");
                break;
            }
            used = true;
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{desc, memory, queue_with_chains, used, used_idx};
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn fills_writable_buffers_with_entropy() {
        let mem = memory();
        let (mock, q) = queue_with_chains(
            &mem,
            0x1000,
            &[
                vec![desc(0x10_0000, 64, true)],
                vec![desc(0x10_1000, 16, true), desc(0x10_2000, 16, true)],
            ],
        );
        let mut rng = Rng::new();
        let mut queues = vec![q];
        assert!(rng.queue_notify(&mem, &mut queues, 0));
        assert_eq!(used_idx(&mem, &mock), 2);
        assert_eq!(used(&mem, &mock, 0), (0, 64));
        assert_eq!(used(&mem, &mock, 1), (1, 32));
        let mut b = [0u8; 64];
        mem.read_slice(&mut b, GuestAddress(0x10_0000))
            .expect("read");
        assert!(b.iter().any(|x| *x != 0), "64 random bytes all zero");
        let mut c = [0u8; 16];
        mem.read_slice(&mut c, GuestAddress(0x10_2000))
            .expect("read");
        assert!(c.iter().any(|x| *x != 0), "second descriptor filled too");
    }

    #[test]
    fn readable_only_chain_gets_zero_length() {
        let mem = memory();
        let (mock, q) = queue_with_chains(&mem, 0x1000, &[vec![desc(0x10_0000, 64, false)]]);
        let mut queues = vec![q];
        assert!(Rng::new().queue_notify(&mem, &mut queues, 0));
        assert_eq!(used(&mem, &mock, 0), (0, 0));
    }
}
