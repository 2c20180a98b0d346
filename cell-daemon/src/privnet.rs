//! The build's private-network tunnel (issue 5): the key pair made at `PrepareTunnel` (memory
//! only, one per cell), the plan RunBuild's `TunnelConfig` turns into, and bringing it up in the
//! build container's network namespace before the clone. The WireGuard interface lives in the
//! container's netns, its UDP socket stays in the cell's (the build sees only `hwg0` and cannot
//! reach the connector except through the tunnel); `down()` wipes the key when the build ends.
//! When the build container already exists at `PrepareTunnel`, `hwg0` is made there and then,
//! with the key but no address or peer, while the box runs the key exchange; RunBuild only adds
//! the address and the connector. The project's egress policy (`HIVE_EGRESS`) is read here too.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hive_proto::v1::TunnelConfig;
use hive_wg::{KeyPair, PeerSpec, Prefix, PublicKey, Tunnel, TunnelSpec};

/// The tunnel interface inside the build container.
pub const IFACE: &str = "hwg0";
/// Handshake wait when the control plane gives none.
const DEFAULT_HANDSHAKE_SECS: u32 = 10;

/// The build environment variable that carries the project's egress policy (set with
/// `hivectl project add --env HIVE_EGRESS=none`): `public` (the default) or `none`. With
/// `none` the build reaches nothing outside the cell except through its private-network
/// tunnel; the cell itself then sends only to the connector's WireGuard endpoint.
pub const EGRESS_ENV: &str = "HIVE_EGRESS";

/// Where a build may send traffic besides its private network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Through the cell's NAT to any public address (the box's firewall still applies).
    Public,
    /// Nowhere: only the private-network tunnel, if the build has one.
    None,
}

/// The egress policy in a build's environment (the last `HIVE_EGRESS` wins, as for the steps).
/// An unknown or empty value is an error: a typo, or `HIVE_EGRESS=$UNSET`, must not leave a
/// build open.
pub fn egress_policy(env: &[(String, String)]) -> Result<Egress, String> {
    match env.iter().rev().find(|(k, _)| k == EGRESS_ENV) {
        None => Ok(Egress::Public),
        Some((_, v)) => match v.trim() {
            "public" => Ok(Egress::Public),
            "none" => Ok(Egress::None),
            other => Err(format!(
                "{EGRESS_ENV}={other:?}: the egress policy must be \"public\" or \"none\""
            )),
        },
    }
}

/// A tunnel config that does not make sense; the message names the field and the value.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("tunnel.connector_public_key {input:?}: {reason}")]
    ConnectorKey { input: String, reason: String },
    #[error("tunnel.connector_endpoint {0:?} does not resolve to HOST:PORT")]
    Endpoint(String),
    #[error("tunnel.tunnel_address {input:?}: {reason}")]
    Address { input: String, reason: String },
    #[error("tunnel.allowed_prefixes {input:?}: {reason}")]
    Prefix { input: String, reason: String },
}

/// Where the time to a working tunnel went (the build log shows it).
#[derive(Debug, Clone, Copy)]
pub struct UpTimes {
    /// Interface, key, peer, addresses and routes in place.
    pub setup: Duration,
    /// From then to the first completed handshake.
    pub handshake: Duration,
    /// New handshakes started because the previous one had not completed.
    pub rearms: u32,
    /// With an interface made ahead: when and how fast (None: it was all made at `bring_up`).
    pub early: Option<Early>,
}

/// An interface made ahead of `bring_up`.
#[derive(Debug, Clone, Copy)]
pub struct Early {
    /// "with the warm cell" or "at PrepareTunnel".
    pub when: &'static str,
    /// How long making it took, on its own thread.
    pub made: Duration,
    /// How much of `UpTimes::setup` went to waiting for that thread.
    pub waited: Duration,
}

impl UpTimes {
    pub fn total(&self) -> Duration {
        self.setup + self.handshake
    }
}

/// What a thread that makes `hwg0` ahead returns: the tunnel, how long it took, and when it
/// was made (for the build log).
type Making = std::thread::JoinHandle<Result<(Tunnel, Duration, &'static str), String>>;

const AT_PREPARE: &str = "at PrepareTunnel";
const WITH_WARM_CELL: &str = "with the warm cell";

/// Makes `hwg0` in `netns` (the build container's), its UDP socket in this (the cell's)
/// namespace, with `keys` and no address or peer, on a thread of its own.
fn make_early(keys: KeyPair, netns: PathBuf, when: &'static str) -> Making {
    let spawned = std::thread::Builder::new()
        .name("hwg0-early".into())
        .spawn(move || {
            let t0 = Instant::now();
            let mut spec = TunnelSpec::new(IFACE);
            spec.underlay_netns = Some(PathBuf::from("/proc/self/ns/net"));
            spec.netns = Some(netns);
            Tunnel::up(spec, keys)
                .map(|t| (t, t0.elapsed(), when))
                .map_err(|e| {
                    tracing::warn!(error = %e, when, "making the tunnel interface ahead failed");
                    format!("tunnel set-up failed: {e}")
                })
        });
    // The keys went with the closure that never ran: say so at bring_up.
    spawned.unwrap_or_else(|e| std::thread::spawn(move || Err(format!("tunnel thread: {e}"))))
}

/// A warm cell's `hwg0` (`--tunnel-ready`), made when its build container is: moving an
/// interface into another namespace costs 15-50 ms of the kernel's time here (a network
/// synchronisation under the global netlink lock), which a build's tunnel no longer waits for.
/// Its key is a throwaway that never leaves the cell and is replaced by the build's own at
/// `PrepareTunnel`; it has no address and no peer, so it carries nothing until then.
#[derive(Debug)]
pub struct Standby {
    netns: PathBuf,
    making: Making,
}

impl Standby {
    /// Starts making the interface in `netns`.
    pub fn start(netns: PathBuf) -> Self {
        Standby {
            making: make_early(KeyPair::generate(), netns.clone(), WITH_WARM_CELL),
            netns,
        }
    }

    /// Removes the interface (a build without a tunnel). Blocking.
    pub fn discard(self) {
        match self.making.join() {
            Ok(Ok((t, _, _))) => {
                if let Err(e) = t.down() {
                    tracing::warn!(error = %e, "removing the stand-by tunnel interface");
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "the stand-by tunnel interface was never made")
            }
            Err(_) => tracing::warn!("the stand-by tunnel thread panicked"),
        }
    }
}

/// What `PrepareTunnel` left for the build: the key pair, and (when the build container was
/// already made) the interface being made with it in the container's namespace, so that work
/// runs while the key exchange does instead of after it.
#[derive(Debug)]
pub struct Prepared {
    public: PublicKey,
    start: Start,
}

#[derive(Debug)]
enum Start {
    /// Nothing made yet: `bring_up` makes the whole tunnel.
    Keys(KeyPair),
    /// `hwg0` with the key and no address or peer, being made (or given the key) on a thread.
    Early(Making),
}

impl Prepared {
    /// Keeps the key pair only; the interface is made at `bring_up`.
    pub fn keys(keys: KeyPair) -> Self {
        Prepared {
            public: keys.public(),
            start: Start::Keys(keys),
        }
    }

    /// Starts making `hwg0` with `keys` in `netns` (the build container's), its UDP socket in
    /// this (the cell's) namespace, on a thread of its own. If the build never comes, the
    /// tunnel is torn down (and the key wiped) when this is dropped and the thread ends.
    pub fn early(keys: KeyPair, netns: PathBuf) -> Self {
        Prepared {
            public: keys.public(),
            start: Start::Early(make_early(keys, netns, AT_PREPARE)),
        }
    }

    /// Gives the warm cell's stand-by `hwg0` the build's `keys` (on a thread: the stand-by
    /// may still be in the making). If the stand-by failed, the interface is made again, as
    /// `early` does.
    pub fn from_standby(keys: KeyPair, standby: Standby) -> Self {
        let public = keys.public();
        let Standby { netns, making } = standby;
        let spawned = std::thread::Builder::new()
            .name("hwg0-key".into())
            .spawn(move || match making.join() {
                Ok(Ok((mut t, made, when))) => match t.replace_key(keys) {
                    Ok(()) => Ok((t, made, when)),
                    Err(e) => {
                        let _ = t.down();
                        Err(format!("tunnel key: {e}"))
                    }
                },
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e,
                        _ => "its thread panicked".into(),
                    };
                    tracing::warn!(error = %why, "the stand-by tunnel interface failed; making it now");
                    make_early(keys, netns, AT_PREPARE)
                        .join()
                        .unwrap_or_else(|_| Err("tunnel thread panicked".into()))
                }
            });
        let making = spawned
            .unwrap_or_else(|e| std::thread::spawn(move || Err(format!("tunnel thread: {e}"))));
        Prepared {
            public,
            start: Start::Early(making),
        }
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// Removes an interface made for a build that then came without a tunnel, and wipes the
    /// key. Blocking.
    pub fn discard(self) {
        if let Start::Early(making) = self.start {
            if let Ok(Ok((t, _, _))) = making.join() {
                if let Err(e) = t.down() {
                    tracing::warn!(error = %e, "removing an unused tunnel interface");
                }
            }
        }
    }
}

/// Everything needed to bring the tunnel up, checked.
#[derive(Debug)]
pub struct Plan {
    pub network: String,
    pub endpoint_text: String,
    pub endpoint: SocketAddr,
    pub connector: PublicKey,
    pub address: Prefix,
    pub allowed: Vec<Prefix>,
    pub keepalive: Option<u16>,
    pub handshake_timeout: Duration,
    pub keys: Prepared,
}

impl Plan {
    /// Checks `cfg` and pairs it with the cell's key pair (and early interface).
    pub fn new(cfg: TunnelConfig, keys: Prepared) -> Result<Plan, PlanError> {
        let connector =
            cfg.connector_public_key
                .parse()
                .map_err(|e: hive_wg::keys::KeyError| PlanError::ConnectorKey {
                    input: cfg.connector_public_key.clone(),
                    reason: e.to_string(),
                })?;
        let endpoint = cfg
            .connector_endpoint
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| PlanError::Endpoint(cfg.connector_endpoint.clone()))?;
        let address = cfg
            .tunnel_address
            .parse()
            .map_err(|e: hive_wg::prefix::PrefixError| PlanError::Address {
                input: cfg.tunnel_address.clone(),
                reason: e.to_string(),
            })?;
        let mut allowed = Vec::new();
        for p in &cfg.allowed_prefixes {
            let prefix: Prefix =
                p.parse()
                    .map_err(|e: hive_wg::prefix::PrefixError| PlanError::Prefix {
                        input: p.clone(),
                        reason: e.to_string(),
                    })?;
            if prefix.is_default() {
                return Err(PlanError::Prefix {
                    input: p.clone(),
                    reason: "a /0 is not allowed".into(),
                });
            }
            allowed.push(prefix);
        }
        if allowed.is_empty() {
            return Err(PlanError::Prefix {
                input: String::new(),
                reason: "no prefixes".into(),
            });
        }
        let secs = if cfg.handshake_timeout_secs == 0 {
            DEFAULT_HANDSHAKE_SECS
        } else {
            cfg.handshake_timeout_secs.min(120)
        };
        Ok(Plan {
            network: cfg.network,
            endpoint_text: cfg.connector_endpoint,
            endpoint,
            connector,
            address,
            allowed,
            keepalive: (cfg.persistent_keepalive_secs > 0)
                .then(|| cfg.persistent_keepalive_secs.min(u32::from(u16::MAX)) as u16),
            handshake_timeout: Duration::from_secs(u64::from(secs)),
            keys,
        })
    }

    /// Brings the tunnel up in `netns` (the container's; `None` = the cell's) and waits for the
    /// first handshake: with an early interface, adds the address and the connector to it;
    /// else makes the whole tunnel. Blocking: call from `spawn_blocking`. The error text is the
    /// build's failure message.
    pub fn bring_up(self, netns: Option<PathBuf>) -> Result<(Tunnel, UpTimes), String> {
        let t0 = Instant::now();
        let net = self.network.clone();
        let endpoint = self.endpoint_text.clone();
        let peer = PeerSpec {
            public_key: self.connector,
            endpoint: Some(self.endpoint),
            allowed_ips: self.allowed.clone(),
            persistent_keepalive: self.keepalive,
        };
        let mut early = None;
        let tunnel = match self.keys.start {
            Start::Keys(keys) => {
                let mut spec = TunnelSpec::new(IFACE);
                spec.underlay_netns = netns.as_ref().map(|_| PathBuf::from("/proc/self/ns/net"));
                spec.netns = netns;
                spec.addresses = vec![self.address];
                spec.peers = vec![peer];
                Tunnel::up(spec, keys)
                    .map_err(|e| format!("private network {net}: tunnel set-up failed: {e}"))?
            }
            Start::Early(thread) => {
                let (tunnel, made, when) = thread
                    .join()
                    .map_err(|_| format!("private network {net}: tunnel thread panicked"))?
                    .map_err(|e| format!("private network {net}: {e}"))?;
                early = Some(Early {
                    when,
                    made,
                    waited: t0.elapsed(),
                });
                let finish = tunnel
                    .add_address(self.address)
                    .and_then(|()| tunnel.add_peer(peer));
                if let Err(e) = finish {
                    let _ = tunnel.down();
                    return Err(format!("private network {net}: tunnel set-up failed: {e}"));
                }
                tunnel
            }
        };
        let setup = t0.elapsed();
        match tunnel.wait_handshake(self.handshake_timeout) {
            Ok(handshake) => {
                let rearms = tunnel.rearms();
                Ok((
                    tunnel,
                    UpTimes {
                        setup,
                        handshake,
                        rearms,
                        early,
                    },
                ))
            }
            Err(hive_wg::TunnelError::HandshakeTimeout { .. }) => {
                let _ = tunnel.down();
                Err(format!(
                    "private network {net}: tunnel to {endpoint} not up within {} s",
                    self.handshake_timeout.as_secs()
                ))
            }
            Err(e) => {
                let _ = tunnel.down();
                Err(format!("private network {net}: tunnel to {endpoint}: {e}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TunnelConfig {
        TunnelConfig {
            connector_public_key: KeyPair::generate().public().to_base64(),
            connector_endpoint: "198.18.0.50:51820".into(),
            tunnel_address: "10.250.0.2/24".into(),
            allowed_prefixes: vec!["10.20.0.0/16".into(), "10.250.0.0/24".into()],
            persistent_keepalive_secs: 25,
            handshake_timeout_secs: 0,
            network: "corp".into(),
        }
    }

    #[test]
    fn egress_policy_from_env() {
        let env = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(egress_policy(&env(&[])), Ok(Egress::Public));
        assert_eq!(
            egress_policy(&env(&[("HIVE_EGRESS", "none")])),
            Ok(Egress::None)
        );
        assert_eq!(
            egress_policy(&env(&[("HIVE_EGRESS", "none"), ("HIVE_EGRESS", "public")])),
            Ok(Egress::Public)
        );
        let e = egress_policy(&env(&[("HIVE_EGRESS", "nope")])).unwrap_err();
        assert!(e.contains("\"nope\""), "{e}");
        // An empty value (an unset variable in the project's set-up) is not "public".
        let e = egress_policy(&env(&[("HIVE_EGRESS", "")])).unwrap_err();
        assert!(e.contains("must be"), "{e}");
    }

    #[test]
    fn plans_are_checked() {
        let p = Plan::new(cfg(), Prepared::keys(KeyPair::generate())).unwrap();
        assert_eq!(p.handshake_timeout, Duration::from_secs(10));
        assert_eq!(p.keepalive, Some(25));
        let bad = [
            TunnelConfig {
                connector_public_key: "nope".into(),
                ..cfg()
            },
            TunnelConfig {
                connector_endpoint: "198.18.0.50".into(),
                ..cfg()
            },
            TunnelConfig {
                tunnel_address: "10.250.0.2".into(),
                ..cfg()
            },
            TunnelConfig {
                allowed_prefixes: vec!["0.0.0.0/0".into()],
                ..cfg()
            },
            TunnelConfig {
                allowed_prefixes: vec![],
                ..cfg()
            },
        ];
        for c in bad {
            let e = Plan::new(c, Prepared::keys(KeyPair::generate())).unwrap_err();
            assert!(!e.to_string().is_empty());
        }
    }
}
