//! Test topology: a "cell" namespace and a "connector" namespace joined by a veth on 198.18.N.0/24
//! (the test-internet range), plus a TCP echo server and client that live in a namespace.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hive_wg::netns::{self, NetNs, VethEnd};
use hive_wg::{KeyPair, PeerSpec, Prefix, Tunnel, TunnelSpec};

pub fn p(s: &str) -> Prefix {
    s.parse().unwrap()
}

/// Two namespaces joined by a veth; removed on drop (also when a test panics).
pub struct Pair {
    pub tag: String,
    pub n: u8,
    pub cell: NetNs,
    pub conn: NetNs,
}

impl Pair {
    /// `n` picks the underlay subnet 198.18.n.0/24 and must differ between concurrent tests.
    pub fn new(tag: &str, n: u8) -> Pair {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "hive_wg=info".into()),
            )
            .with_test_writer()
            .try_init();
        let cell = NetNs::create(&format!("hwg-{tag}-cell")).expect("create cell netns");
        let conn = NetNs::create(&format!("hwg-{tag}-conn")).expect("create connector netns");
        netns::link_veth(
            &VethEnd {
                netns: conn.path(),
                iface: "up0",
                address: p(&format!("198.18.{n}.1/24")),
            },
            &VethEnd {
                netns: cell.path(),
                iface: "eth0",
                address: p(&format!("198.18.{n}.2/24")),
            },
        )
        .expect("veth between cell and connector");
        Pair {
            tag: tag.to_string(),
            n,
            cell,
            conn,
        }
    }

    pub fn connector_endpoint(&self) -> SocketAddr {
        format!("198.18.{}.1:51820", self.n).parse().unwrap()
    }

    /// The connector side: 10.250.0.1/24, port 51820, no peers yet.
    pub fn connector(&self, keys: KeyPair) -> Tunnel {
        let mut spec = TunnelSpec::new(format!("hwgc{}", self.tag));
        spec.netns = Some(self.conn.path().to_path_buf());
        spec.listen_port = Some(51820);
        spec.addresses = vec![p("10.250.0.1/24")];
        Tunnel::up(spec, keys).expect("connector tunnel up")
    }

    /// The cell side at 10.250.0.`host`, one peer: the connector (tunnel subnet + a private
    /// prefix that needs its own route).
    pub fn cell_spec(&self, host: u8, connector: hive_wg::PublicKey) -> TunnelSpec {
        let mut spec = TunnelSpec::new(format!("hwgx{}", self.tag));
        spec.netns = Some(self.cell.path().to_path_buf());
        spec.addresses = vec![p(&format!("10.250.0.{host}/24"))];
        spec.peers = vec![PeerSpec {
            public_key: connector,
            endpoint: Some(self.connector_endpoint()),
            allowed_ips: vec![p("10.250.0.0/24"), p("10.20.0.0/16")],
            persistent_keepalive: Some(25),
        }];
        spec
    }

    /// The connector's view of a cell: that one address, nothing else.
    pub fn cell_as_peer(host: u8, key: hive_wg::PublicKey) -> PeerSpec {
        PeerSpec {
            public_key: key,
            endpoint: None,
            allowed_ips: vec![p(&format!("10.250.0.{host}/32"))],
            persistent_keepalive: None,
        }
    }
}

/// A TCP echo server bound inside a namespace; stops on drop.
pub struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    pub fn start(ns: &NetNs, addr: &str) -> Echo {
        let addr: SocketAddr = addr.parse().unwrap();
        let listener = netns::run_in(ns.path(), || TcpListener::bind(addr))
            .unwrap()
            .expect("bind echo server");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).ok();
                        s.set_read_timeout(Some(Duration::from_secs(2))).ok();
                        let mut buf = [0u8; 256];
                        if let Ok(n) = s.read(&mut buf) {
                            let _ = s.write_all(&buf[..n]);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(_) => break,
                }
            }
        });
        Echo {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `msg` from inside `ns` to the echo server at `addr` and checks the reply.
pub fn echo(ns: &NetNs, addr: &str, msg: &str, timeout: Duration) -> io::Result<()> {
    let addr: SocketAddr = addr.parse().unwrap();
    let mut s = netns::run_in(ns.path(), || TcpStream::connect_timeout(&addr, timeout))
        .map_err(io::Error::other)??;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(msg.as_bytes())?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf)?;
    if buf != msg.as_bytes() {
        return Err(io::Error::other(format!(
            "echo returned {:?}, sent {msg:?}",
            String::from_utf8_lossy(&buf)
        )));
    }
    Ok(())
}

/// Retries `echo` until it works or `deadline` passes (the first SYN may wait for the handshake).
pub fn echo_until(ns: &NetNs, addr: &str, msg: &str, deadline: Duration) -> io::Result<Duration> {
    let start = std::time::Instant::now();
    loop {
        match echo(ns, addr, msg, Duration::from_millis(500)) {
            Ok(()) => return Ok(start.elapsed()),
            Err(e) if start.elapsed() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Runs `ip -n <ns> <args>` (read-only checks of what the library did).
pub fn ip(ns: &NetNs, args: &[&str]) -> String {
    let name = ns.path().file_name().unwrap().to_str().unwrap();
    let out = std::process::Command::new("ip")
        .args(["-n", name])
        .args(args)
        .output()
        .expect("run ip");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
