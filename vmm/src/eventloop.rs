//! The device thread: waits on every device's host-side fds and timers, then lets each device
//! move host input into the guest (TAP frames, vsock connections and data, rate-limit refills).
//!
//! One thread for all devices of a VM is plenty for a build cell and keeps locking simple: a
//! device's mutex is held by either this thread or a vCPU thread in an MMIO exit. The vCPU side
//! writes the wake eventfd after a queue notify or status change, so the wait set is rebuilt
//! whenever the guest may have posted buffers.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::bus::{lock, SharedTransport};
use super::virtio::Wait;

/// Longest sleep without a reason to wake (so a stop request is seen promptly).
const IDLE: Duration = Duration::from_millis(200);

/// Runs until `stop` is set (and `wake` written).
pub fn run(devices: Vec<SharedTransport>, wake: EventFd, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        let mut wait = Wait::default();
        wait.fds.push((wake.as_raw_fd(), libc::POLLIN));
        for d in &devices {
            lock(d).wait(&mut wait);
        }
        let timeout = wait.timeout.unwrap_or(IDLE).min(IDLE);
        // Round up so a 0.3 ms refill does not become a busy loop of 0 ms polls.
        let ms = if timeout.is_zero() {
            0
        } else {
            timeout.as_micros().div_ceil(1000) as i32
        };
        let mut fds: Vec<libc::pollfd> = wait
            .fds
            .iter()
            .map(|&(fd, events)| libc::pollfd {
                fd,
                events,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a live, correctly sized array of pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "device thread poll failed; stopping device I/O");
                return;
            }
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let _ = wake.read();
        }
        for d in &devices {
            lock(d).process_host();
        }
    }
}
