//! COM1 (0x3f8): the guest console, into a per-cell log file, rate-limited.
//!
//! The UART model is vm-superio's 16550A; this module gives it an interrupt line (an irqfd on
//! GSI 4) and an output that a guest cannot use to flood the host: past the configured rate,
//! bytes are dropped and counted, and a marker line says how many were lost.

use std::io::{self, Write};
use std::time::Instant;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::ratelimit::{BucketConfig, RateLimitConfig, RateLimiter};

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of UART registers.
pub const COM1_LEN: u16 = 8;

/// Raises the serial IRQ through an irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A writer that passes at most `bytes_per_sec` (with a burst) and counts what it drops.
pub struct LimitedOutput<W: Write> {
    out: W,
    limiter: RateLimiter,
    dropped: u64,
    first_byte_written: bool,
}

impl<W: Write> LimitedOutput<W> {
    /// Wraps `out`.
    pub fn new(out: W, bytes_per_sec: u64, burst: u64) -> Self {
        let burst = burst.max(1);
        let refill_ms = (burst.saturating_mul(1000) / bytes_per_sec.max(1)).max(1);
        let cfg = RateLimitConfig {
            bandwidth: Some(BucketConfig {
                size: burst,
                refill_time_ms: refill_ms,
            }),
            ops: None,
        };
        Self {
            out,
            limiter: RateLimiter::new(&cfg, Instant::now()),
            dropped: 0,
            first_byte_written: false,
        }
    }

    /// Bytes dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Writes one byte if the limiter allows it, at time `now`.
    pub fn write_byte_at(&mut self, byte: u8, now: Instant) -> io::Result<()> {
        if !self.limiter.consume(1, now) {
            self.dropped += 1;
            return Ok(());
        }
        if self.dropped > 0 && byte == b'\n' {
            // Say what was lost at the next line break that gets through.
            let note = format!(
                "\n[hive-vmm: {} console bytes dropped by rate limit]",
                self.dropped
            );
            self.out.write_all(note.as_bytes())?;
            self.dropped = 0;
        }
        self.out.write_all(&[byte])?;
        if byte == b'\n' || !self.first_byte_written {
            self.first_byte_written = true;
            self.out.flush()?;
        }
        Ok(())
    }

    /// The inner writer.
    pub fn get_ref(&self) -> &W {
        &self.out
    }
}

impl<W: Write> Write for LimitedOutput<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let now = Instant::now();
        for b in buf {
            self.write_byte_at(*b, now)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The console device: the UART plus its output.
pub type Console = Serial<IrqLine, NoEvents, LimitedOutput<Box<dyn Write + Send>>>;

/// A COM1 writing to `out` at most `bytes_per_sec`.
pub fn console(
    irq: EventFd,
    out: Box<dyn Write + Send>,
    bytes_per_sec: u64,
    burst: u64,
) -> Console {
    Serial::new(IrqLine(irq), LimitedOutput::new(out, bytes_per_sec, burst))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn output_is_rate_limited_and_drops_are_reported() {
        // 10 bytes/s with a 10-byte burst.
        let mut out = LimitedOutput::new(Vec::new(), 10, 10);
        let t0 = Instant::now();
        for b in b"0123456789abcdef\n" {
            out.write_byte_at(*b, t0).expect("write");
        }
        assert_eq!(out.get_ref().as_slice(), b"0123456789");
        assert_eq!(out.dropped(), 7);
        // A second later the bucket is full again; the next newline carries the note.
        out.write_byte_at(b'\n', t0 + Duration::from_secs(1))
            .expect("write");
        let text = String::from_utf8(out.get_ref().clone()).expect("utf8");
        assert!(
            text.contains("[hive-vmm: 7 console bytes dropped by rate limit]"),
            "{text}"
        );
        assert_eq!(out.dropped(), 0);
    }

    #[test]
    fn uart_transmits_written_bytes_to_output() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut serial = Serial::new(
            IrqLine(irq),
            LimitedOutput::new(Vec::<u8>::new(), 1 << 20, 1 << 20),
        );
        for b in b"OK\n" {
            serial.write(0, *b).expect("THR write");
        }
        assert_eq!(serial.writer().get_ref().as_slice(), b"OK\n");
        // LSR says the transmitter is empty, so polling guests never stall.
        assert_ne!(serial.read(5) & 0x20, 0);
    }
}
