//! The WireGuard cross-platform UAPI (`/var/run/wireguard/<iface>.sock`), as served by boringtun.
//!
//! `wireguard-control` drives peers and the listen port through this socket; two things are done
//! here instead: the private key is written from a zeroizing buffer (wireguard-control formats it
//! into a plain `String`), and `get` is parsed here because boringtun reports
//! `last_handshake_time_sec` as *seconds since* the handshake rather than since the epoch, which
//! wireguard-control reads as a 1970 date (and drops when under a second).

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use zeroize::Zeroizing;

use crate::keys::PublicKey;
use crate::prefix::Prefix;

/// Where userspace WireGuard implementations put their control sockets.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// Errors talking UAPI to one interface.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    #[error("connect to the UAPI socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("UAPI {op} on {iface}: {source}")]
    Io {
        op: &'static str,
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error("UAPI {op} on {iface} failed with errno {errno}")]
    Errno {
        op: &'static str,
        iface: String,
        errno: i32,
    },
    #[error("UAPI get on {iface}: bad line {line:?}: {reason}")]
    Parse {
        iface: String,
        line: String,
        reason: &'static str,
    },
}

/// One peer as the device reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<Prefix>,
    pub persistent_keepalive: Option<u16>,
    /// When the latest handshake completed; `None` if never.
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The device as `get=1` reports it (never its private key).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceState {
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerState>,
}

/// Path of the control socket for `iface`.
pub fn socket_path(iface: &str) -> PathBuf {
    PathBuf::from(SOCKET_DIR).join(format!("{iface}.sock"))
}

fn connect(iface: &str) -> Result<UnixStream, UapiError> {
    let path = socket_path(iface);
    UnixStream::connect(&path).map_err(|source| UapiError::Connect { path, source })
}

/// Sets the interface's private key. The request text lives in a zeroizing buffer sized up
/// front so that it never reallocates (a reallocation would leave a copy behind).
pub fn set_private_key(iface: &str, secret: &[u8; 32]) -> Result<(), UapiError> {
    let mut sock = connect(iface)?;
    let mut request = Zeroizing::new(String::with_capacity(128));
    request.push_str("set=1\nprivate_key=");
    let hex = Zeroizing::new(hex::encode(secret));
    request.push_str(&hex);
    request.push_str("\n\n");
    let io_err = |source| UapiError::Io {
        op: "set private_key",
        iface: iface.to_string(),
        source,
    };
    sock.write_all(request.as_bytes()).map_err(io_err)?;
    read_errno(sock, iface, "set private_key")
}

fn read_errno(sock: UnixStream, iface: &str, op: &'static str) -> Result<(), UapiError> {
    let mut line = String::new();
    BufReader::new(sock)
        .read_line(&mut line)
        .map_err(|source| UapiError::Io {
            op,
            iface: iface.to_string(),
            source,
        })?;
    match line
        .trim_end()
        .strip_prefix("errno=")
        .map(str::parse::<i32>)
    {
        Some(Ok(0)) => Ok(()),
        Some(Ok(errno)) => Err(UapiError::Errno {
            op,
            iface: iface.to_string(),
            errno,
        }),
        _ => Err(UapiError::Parse {
            iface: iface.to_string(),
            line,
            reason: "expected errno=N",
        }),
    }
}

/// Reads the device state.
pub fn get(iface: &str) -> Result<DeviceState, UapiError> {
    let mut sock = connect(iface)?;
    let io_err = |source| UapiError::Io {
        op: "get",
        iface: iface.to_string(),
        source,
    };
    sock.write_all(b"get=1\n\n").map_err(io_err)?;
    // Other implementations (wireguard-go) answer with the private key: keep the reply in a
    // zeroizing buffer.
    let mut reply = Zeroizing::new(String::with_capacity(4096));
    let mut reader = BufReader::new(sock);
    loop {
        let before = reply.len();
        let n = reader.read_line(&mut reply).map_err(io_err)?;
        if n == 0 || reply[before..].trim_end().is_empty() {
            break;
        }
    }
    parse_get(iface, &reply, SystemTime::now())
}

/// Parses a `get=1` reply. `now` turns boringtun's "seconds since" into a time.
pub fn parse_get(iface: &str, text: &str, now: SystemTime) -> Result<DeviceState, UapiError> {
    let bad = |line: &str, reason| UapiError::Parse {
        iface: iface.to_string(),
        line: redact(line),
        reason,
    };
    let mut dev = DeviceState::default();
    let mut peer: Option<PeerState> = None;
    let mut hs_sec: Option<u64> = None;
    let mut hs_nsec: u32 = 0;
    let mut errno: Option<i32> = None;
    let finish = |peer: Option<PeerState>, sec: Option<u64>, nsec: u32, dev: &mut DeviceState| {
        if let Some(mut p) = peer {
            p.last_handshake = handshake_time(sec, nsec, now);
            dev.peers.push(p);
        }
    };
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        let (key, value) = line.split_once('=').ok_or_else(|| bad(line, "no '='"))?;
        let in_peer = |peer: &mut Option<PeerState>| -> Result<(), UapiError> {
            if peer.is_none() {
                return Err(bad(line, "peer field before any public_key"));
            }
            Ok(())
        };
        match key {
            "private_key" | "own_public_key" | "fwmark" | "protocol_version" => {}
            "listen_port" => {
                dev.listen_port = Some(value.parse().map_err(|_| bad(line, "not a port"))?)
            }
            "public_key" => {
                finish(peer.take(), hs_sec.take(), hs_nsec, &mut dev);
                hs_nsec = 0;
                let bytes: [u8; 32] = hex::decode(value)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| bad(line, "not a 32-byte hex key"))?;
                peer = Some(PeerState {
                    public_key: PublicKey::from_bytes(bytes),
                    endpoint: None,
                    allowed_ips: Vec::new(),
                    persistent_keepalive: None,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                });
            }
            "preshared_key" => in_peer(&mut peer)?,
            "endpoint" => {
                in_peer(&mut peer)?;
                let ep = value.parse().map_err(|_| bad(line, "not ip:port"))?;
                if let Some(p) = peer.as_mut() {
                    p.endpoint = Some(ep);
                }
            }
            "allowed_ip" => {
                in_peer(&mut peer)?;
                let ip = value.parse().map_err(|_| bad(line, "not a prefix"))?;
                if let Some(p) = peer.as_mut() {
                    p.allowed_ips.push(ip);
                }
            }
            "persistent_keepalive_interval" => {
                in_peer(&mut peer)?;
                let v: u16 = value.parse().map_err(|_| bad(line, "not a number"))?;
                if let Some(p) = peer.as_mut() {
                    p.persistent_keepalive = (v != 0).then_some(v);
                }
            }
            "last_handshake_time_sec" => {
                in_peer(&mut peer)?;
                hs_sec = Some(value.parse().map_err(|_| bad(line, "not a number"))?);
            }
            "last_handshake_time_nsec" => {
                in_peer(&mut peer)?;
                hs_nsec = value.parse().map_err(|_| bad(line, "not a number"))?;
            }
            "rx_bytes" | "tx_bytes" => {
                in_peer(&mut peer)?;
                let v: u64 = value.parse().map_err(|_| bad(line, "not a number"))?;
                if let Some(p) = peer.as_mut() {
                    if key == "rx_bytes" {
                        p.rx_bytes = v;
                    } else {
                        p.tx_bytes = v;
                    }
                }
            }
            "errno" => errno = Some(value.parse().map_err(|_| bad(line, "not a number"))?),
            // Newer fields are not errors: the protocol is meant to grow.
            _ => {}
        }
    }
    finish(peer, hs_sec, hs_nsec, &mut dev);
    match errno {
        Some(0) => Ok(dev),
        Some(errno) => Err(UapiError::Errno {
            op: "get",
            iface: iface.to_string(),
            errno,
        }),
        None => Err(bad("", "reply ended without errno")),
    }
}

/// Seconds below this are "seconds since" (boringtun); above, seconds since the epoch (the
/// protocol as written, wireguard-go and the kernel). 10^9 s is 2001 / 31 years of uptime.
const EPOCH_THRESHOLD_SECS: u64 = 1_000_000_000;

fn handshake_time(sec: Option<u64>, nsec: u32, now: SystemTime) -> Option<SystemTime> {
    let sec = sec?;
    if sec == 0 && nsec == 0 {
        return None;
    }
    // Clamped so that `Duration::new` cannot overflow on a hostile reply.
    let d = Duration::new(sec, nsec.min(999_999_999));
    if sec >= EPOCH_THRESHOLD_SECS {
        UNIX_EPOCH.checked_add(d)
    } else {
        now.checked_sub(d)
    }
}

/// Error messages quote the offending line, but never a private key.
fn redact(line: &str) -> String {
    if line.starts_with("private_key") || line.starts_with("preshared_key") {
        let mut s = String::new();
        let _ = write!(s, "{}=<redacted>", line.split('=').next().unwrap_or(""));
        s
    } else {
        line.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
    const K2: &str = "58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceae3b0c2e21b";

    #[test]
    fn parses_boringtun_reply_with_elapsed_handshake() {
        let now = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let text = format!(
            "own_public_key={K1}\nlisten_port=51820\npublic_key={K2}\n\
             persistent_keepalive_interval=25\nendpoint=198.18.1.1:51820\n\
             allowed_ip=10.250.0.0/24\nallowed_ip=10.20.0.0/16\n\
             last_handshake_time_sec=0\nlast_handshake_time_nsec=300000000\n\
             rx_bytes=92\ntx_bytes=148\nerrno=0\n\n"
        );
        let dev = parse_get("wg0", &text, now).unwrap();
        assert_eq!(dev.listen_port, Some(51820));
        let p = &dev.peers[0];
        assert_eq!(p.public_key.to_hex(), K2);
        assert_eq!(p.persistent_keepalive, Some(25));
        assert_eq!(p.endpoint.unwrap().to_string(), "198.18.1.1:51820");
        assert_eq!(p.allowed_ips.len(), 2);
        assert_eq!(
            p.last_handshake,
            Some(now - Duration::from_millis(300)),
            "boringtun reports seconds since the handshake"
        );
        assert_eq!((p.rx_bytes, p.tx_bytes), (92, 148));
    }

    #[test]
    fn parses_epoch_handshake_and_never() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_100);
        let text = format!(
            "private_key={K1}\npublic_key={K2}\nlast_handshake_time_sec=1800000000\n\
             last_handshake_time_nsec=0\npublic_key={K1}\nlast_handshake_time_sec=0\n\
             last_handshake_time_nsec=0\nerrno=0\n\n"
        );
        let dev = parse_get("wg0", &text, now).unwrap();
        assert_eq!(
            dev.peers[0].last_handshake,
            Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        );
        assert_eq!(dev.peers[1].last_handshake, None);
    }

    #[test]
    fn bad_replies_are_errors_that_hide_keys() {
        let now = SystemTime::now();
        let e = parse_get("wg0", "allowed_ip=10.0.0.0/8\nerrno=0\n", now).unwrap_err();
        assert!(e.to_string().contains("before any public_key"), "{e}");
        let e = parse_get("wg0", "public_key=zz\nerrno=0\n", now).unwrap_err();
        assert!(e.to_string().contains("hex key"), "{e}");
        let e = parse_get("wg0", "listen_port=1\n", now).unwrap_err();
        assert!(e.to_string().contains("without errno"), "{e}");
        let e = parse_get("wg0", "errno=19\n", now).unwrap_err();
        assert!(e.to_string().contains("19"), "{e}");
        let e = parse_get("wg0", &format!("private_key={K1}\nbogus\n"), now).unwrap_err();
        assert!(!e.to_string().contains(K1));
        let e = redact(&format!("private_key={K1}"));
        assert!(!e.contains(K1));
    }

    /// Random replies built from the protocol's own keys and hostile values.
    #[test]
    fn parser_never_panics_on_random_replies() {
        use rand::{Rng, SeedableRng};
        let keys = [
            "public_key",
            "endpoint",
            "allowed_ip",
            "last_handshake_time_sec",
            "last_handshake_time_nsec",
            "rx_bytes",
            "tx_bytes",
            "persistent_keepalive_interval",
            "listen_port",
            "errno",
            "private_key",
            "remove",
            "",
            "x",
        ];
        let values = [
            K1,
            K2,
            "",
            "0",
            "-1",
            "18446744073709551615",
            "4294967296",
            "1.2.3.4:5",
            "[::1]:5",
            "10.0.0.0/8",
            "::/0",
            "10.0.0.0/99",
            "zz",
            "=",
            "\u{0}",
            "999999999999",
        ];
        const SECRET: &str = "0101010101010101010101010101010101010101010101010101010101010101";
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let now = SystemTime::now();
        for _ in 0..20_000 {
            let mut text = String::new();
            for _ in 0..rng.gen_range(0..12) {
                let k = keys[rng.gen_range(0..keys.len())];
                let v = if k == "private_key" {
                    SECRET
                } else {
                    values[rng.gen_range(0..values.len())]
                };
                text.push_str(&format!("{k}={v}\n"));
            }
            if let Err(e) = parse_get("wg0", &text, now) {
                assert!(!e.to_string().contains(SECRET), "{e}");
            }
        }
    }

    #[test]
    fn parser_never_panics_on_garbage() {
        let now = SystemTime::now();
        let samples = [
            "",
            "=",
            "==",
            "errno=",
            "errno=-1",
            "public_key=",
            "endpoint=x",
            "\u{0}=\u{0}",
            "last_handshake_time_sec=18446744073709551615\nlast_handshake_time_nsec=4294967295",
        ];
        for s in samples {
            let _ = parse_get("wg0", s, now);
            let _ = parse_get("wg0", &format!("public_key={K2}\n{s}\nerrno=0\n"), now);
        }
    }
}
