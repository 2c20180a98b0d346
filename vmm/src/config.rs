//! The VM description a box daemon hands to `hive-box vmm --config <file.json>`.
//!
//! Parsed with serde (unknown fields are an error, so a typo never silently drops a limit), then
//! [`VmConfig::validate`] turns every bad value into a typed error naming the field. The builder
//! only ever sees validated configs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::memory::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};
use super::ratelimit::{self, RateLimitConfig};

/// Most vCPUs one cell gets (the MP table and APIC ids are laid out for this many).
pub const MAX_VCPUS: u8 = 32;
/// Most virtio devices on one VM (one 4 KiB MMIO window and one IRQ each).
pub const MAX_DEVICES: usize = 16;

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// PVH if the ELF carries the note, else the Linux 64-bit boot protocol.
    #[default]
    Auto,
    /// Require the PVH entry (32-bit protected mode, `hvm_start_info`).
    Pvh,
    /// Linux 64-bit boot protocol (long mode, zero page), ignoring any PVH note.
    Linux64,
}

/// Which CPU features the guest sees.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CpuTemplate {
    /// Everything KVM supports (normalized topology).
    #[default]
    Host,
    /// No XSAVE/AVX/AVX-512, POPCNT or CMPXCHG16B: portable, and what nested KVMs that cannot
    /// emulate those instructions need.
    Baseline,
}

/// Where the serial console goes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Log file (created or appended); `None` means the VMM's stdout.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Bytes per second the guest may write before output is dropped (and the drop counted).
    #[serde(default = "default_serial_rate")]
    pub bytes_per_sec: u64,
    /// Burst allowance in bytes.
    #[serde(default = "default_serial_burst")]
    pub burst_bytes: u64,
}

fn default_serial_rate() -> u64 {
    64 * 1024
}
fn default_serial_burst() -> u64 {
    256 * 1024
}

impl Default for SerialConfig {
    fn default() -> Self {
        Self {
            path: None,
            bytes_per_sec: default_serial_rate(),
            burst_bytes: default_serial_burst(),
        }
    }
}

/// One virtio-blk disk backed by a raw file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// Offer VIRTIO_BLK_F_RO and refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// Bandwidth/ops limits from the size class.
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
}

/// One virtio-net interface backed by a TAP device in the VMM's network namespace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// TAP interface name (created if absent, attached if it exists).
    pub tap: String,
    /// Guest MAC `aa:bb:cc:dd:ee:ff`; offered with VIRTIO_NET_F_MAC.
    #[serde(default)]
    pub mac: Option<String>,
    /// Limits applied to guest transmit and receive separately.
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
}

/// The virtio-vsock device and its host-side Unix socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Guest context id (>= 3; 0-2 are reserved).
    pub guest_cid: u64,
    /// Host side: the VMM listens here for `CONNECT <port>\n`; guest connections to host port P
    /// go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// The whole VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image: ELF vmlinux (PVH note or not) or bzImage.
    pub kernel: PathBuf,
    /// Extra kernel command line; the VMM appends its `virtio_mmio.device=` entries.
    #[serde(default)]
    pub cmdline: String,
    /// Boot protocol.
    #[serde(default)]
    pub boot: BootProtocol,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// CPU feature template.
    #[serde(default)]
    pub cpu: CpuTemplate,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Serial console.
    #[serde(default)]
    pub serial: SerialConfig,
    /// Disks, in the order the guest sees them.
    #[serde(default)]
    pub block: Vec<BlockConfig>,
    /// Network interfaces.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Add a virtio-rng device fed from the host's getrandom.
    #[serde(default)]
    pub rng: bool,
    /// The KVM device node (inside a jail it may be bound somewhere else).
    #[serde(default = "default_kvm_device")]
    pub kvm_device: PathBuf,
    /// Add the boot timer ([`super::boottimer`]): the guest's writes to its page are logged with
    /// the time since the VMM started.
    #[serde(default)]
    pub boot_timer: bool,
}

fn default_kvm_device() -> PathBuf {
    PathBuf::from("/dev/kvm")
}

fn default_vcpus() -> u8 {
    1
}

/// What is wrong with a VM configuration; each variant names the field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The JSON file could not be read.
    #[error("read VM config {path}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The JSON did not match the schema.
    #[error("parse VM config {path}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause (names the field and line).
        #[source]
        source: serde_json::Error,
    },
    /// `vcpus` out of range.
    #[error("vcpus = {0}: must be 1..={MAX_VCPUS}")]
    Vcpus(u8),
    /// `memory_mib` out of range.
    #[error("memory_mib = {0}: must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}")]
    Memory(u32),
    /// A path that must exist does not.
    #[error("{field} = {path}: no such file")]
    Missing {
        /// Config field.
        field: String,
        /// Path.
        path: PathBuf,
    },
    /// Too many virtio devices.
    #[error("{0} virtio devices: at most {MAX_DEVICES}")]
    TooManyDevices(usize),
    /// Bad TAP name.
    #[error("net[{index}].tap = {name:?}: must be 1-15 bytes of [A-Za-z0-9_.-]")]
    TapName {
        /// Interface index.
        index: usize,
        /// Name.
        name: String,
    },
    /// Bad MAC.
    #[error("net[{index}].mac = {mac:?}: expected six hex bytes like 02:00:00:00:00:01, unicast")]
    Mac {
        /// Interface index.
        index: usize,
        /// Text.
        mac: String,
    },
    /// Reserved vsock CID.
    #[error("vsock.guest_cid = {0}: must be >= 3 and < 2^32")]
    Cid(u64),
    /// vsock socket path too long for sockaddr_un (with the `_PORT` suffix).
    #[error("vsock.uds_path = {0}: too long for a Unix socket (max 96 bytes, port suffix added)")]
    UdsPath(PathBuf),
    /// Bad rate limit.
    #[error("{field}")]
    RateLimit {
        /// Config field.
        field: String,
        /// Cause.
        #[source]
        source: ratelimit::Error,
    },
    /// The command line contains a NUL byte or is too long.
    #[error("cmdline: {0}")]
    Cmdline(&'static str),
}

impl VmConfig {
    /// A VM booting `kernel` with `memory_mib` of memory and every other field at its default
    /// (one vCPU, host CPU template, serial to stdout, no devices); set the rest as plain fields.
    /// Serialized with serde, it is the file `hive-box vmm --config` reads.
    pub fn new(kernel: impl Into<PathBuf>, memory_mib: u32) -> Self {
        VmConfig {
            kernel: kernel.into(),
            cmdline: String::new(),
            boot: BootProtocol::default(),
            vcpus: default_vcpus(),
            cpu: CpuTemplate::default(),
            memory_mib,
            serial: SerialConfig::default(),
            block: Vec::new(),
            net: Vec::new(),
            vsock: None,
            rng: false,
            kvm_device: default_kvm_device(),
            boot_timer: false,
        }
    }

    /// Reads, parses and validates a JSON file.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg: VmConfig = serde_json::from_str(&text).map_err(|source| Error::Parse {
            path: path.to_owned(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), Error> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::Vcpus(self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(Error::Memory(self.memory_mib));
        }
        must_exist("kernel", &self.kernel)?;
        must_exist("kvm_device", &self.kvm_device)?;
        if self.cmdline.contains('\0') {
            return Err(Error::Cmdline("contains a NUL byte"));
        }
        if self.cmdline.len() > 2048 {
            return Err(Error::Cmdline("longer than 2048 bytes"));
        }
        let devices = self.block.len()
            + self.net.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng);
        if devices > MAX_DEVICES {
            return Err(Error::TooManyDevices(devices));
        }
        for (i, b) in self.block.iter().enumerate() {
            must_exist(&format!("block[{i}].path"), &b.path)?;
            b.rate_limit.validate().map_err(|source| Error::RateLimit {
                field: format!("block[{i}].rate_limit"),
                source,
            })?;
        }
        for (i, n) in self.net.iter().enumerate() {
            let name_ok = !n.tap.is_empty()
                && n.tap.len() <= 15
                && n.tap
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c));
            if !name_ok {
                return Err(Error::TapName {
                    index: i,
                    name: n.tap.clone(),
                });
            }
            if let Some(mac) = &n.mac {
                parse_mac(mac).ok_or_else(|| Error::Mac {
                    index: i,
                    mac: mac.clone(),
                })?;
            }
            n.rate_limit.validate().map_err(|source| Error::RateLimit {
                field: format!("net[{i}].rate_limit"),
                source,
            })?;
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX) {
                return Err(Error::Cid(v.guest_cid));
            }
            if v.uds_path.as_os_str().len() > 96 {
                return Err(Error::UdsPath(v.uds_path.clone()));
            }
        }
        Ok(())
    }
}

fn must_exist(field: &str, path: &Path) -> Result<(), Error> {
    if path.exists() {
        Ok(())
    } else {
        Err(Error::Missing {
            field: field.to_owned(),
            path: path.to_owned(),
        })
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`; multicast addresses are refused (a guest NIC must be unicast).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return None;
    }
    Some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(kernel: &Path) -> serde_json::Value {
        serde_json::json!({ "kernel": kernel, "memory_mib": 64 })
    }

    fn parse(v: serde_json::Value) -> Result<VmConfig, Error> {
        let cfg: VmConfig = serde_json::from_value(v).map_err(|source| Error::Parse {
            path: "test.json".into(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[test]
    fn minimal_config_is_valid_with_defaults() {
        let k = tempfile::NamedTempFile::new().expect("temp kernel");
        let cfg = parse(base(k.path())).expect("valid");
        assert_eq!(cfg.vcpus, 1);
        assert_eq!(cfg.boot, BootProtocol::Auto);
        assert!(cfg.block.is_empty() && cfg.net.is_empty() && cfg.vsock.is_none() && !cfg.rng);
    }

    #[test]
    fn unknown_field_is_rejected_by_name() {
        let k = tempfile::NamedTempFile::new().expect("temp kernel");
        let mut v = base(k.path());
        v["memroy_mib"] = 12.into();
        let err = parse(v).expect_err("typo must fail");
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert!(chain.contains("memroy_mib"), "{chain}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let k = tempfile::NamedTempFile::new().expect("temp kernel");
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (serde_json::json!({"vcpus": 0}), "vcpus = 0"),
            (serde_json::json!({"memory_mib": 1}), "memory_mib = 1"),
            (
                serde_json::json!({"block": [{"path": "/nonexistent/disk.img"}]}),
                "block[0].path",
            ),
            (
                serde_json::json!({"net": [{"tap": "this-name-is-far-too-long"}]}),
                "net[0].tap",
            ),
            (
                serde_json::json!({"net": [{"tap": "t0", "mac": "01:00:00:00:00:01"}]}),
                "net[0].mac",
            ),
            (
                serde_json::json!({"vsock": {"guest_cid": 2, "uds_path": "/tmp/v.sock"}}),
                "guest_cid = 2",
            ),
            (
                serde_json::json!({"net": [{"tap": "t0", "rate_limit": {"ops": {"size": 0, "refill_time_ms": 5}}}]}),
                "net[0].rate_limit",
            ),
            (
                serde_json::json!({"kernel": "/nonexistent/vmlinux"}),
                "kernel = /nonexistent/vmlinux",
            ),
        ];
        for (patch, want) in cases {
            let mut v = base(k.path());
            for (key, value) in patch.as_object().expect("object") {
                v[key] = value.clone();
            }
            let err = parse(v).expect_err(want);
            assert!(err.to_string().contains(want), "{err} should name {want}");
        }
    }

    #[test]
    fn new_has_the_file_defaults_and_round_trips() {
        let k = tempfile::NamedTempFile::new().expect("temp kernel");
        let mut cfg = VmConfig::new(k.path(), 64);
        assert_eq!(cfg, parse(base(k.path())).expect("valid"));
        cfg.vcpus = 2;
        cfg.cpu = CpuTemplate::Baseline;
        cfg.block.push(BlockConfig {
            path: k.path().into(),
            read_only: true,
            rate_limit: RateLimitConfig {
                bandwidth: Some(ratelimit::BucketConfig {
                    size: 1000,
                    refill_time_ms: 1000,
                }),
                ops: None,
            },
        });
        cfg.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: "/tmp/v.sock".into(),
        });
        let text = serde_json::to_string(&cfg).expect("serializes");
        assert!(text.contains("\"cpu\":\"baseline\""), "{text}");
        let back = parse(serde_json::from_str(&text).expect("json")).expect("valid");
        assert_eq!(back, cfg);
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:00:0a:0b:0c:ff"),
            Some([2, 0, 10, 11, 12, 255])
        );
        assert_eq!(parse_mac("02:00:0a:0b:0c"), None);
        assert_eq!(parse_mac("02:00:0a:0b:0c:ff:00"), None);
        assert_eq!(parse_mac("zz:00:0a:0b:0c:ff"), None);
        assert_eq!(parse_mac("03:00:0a:0b:0c:ff"), None, "multicast");
    }
}
