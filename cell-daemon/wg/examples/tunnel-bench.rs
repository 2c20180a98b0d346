//! Tunnel set-up latency, the way a secure build meets it: a fresh cell key, the connector told
//! about it, the cell's tunnel brought up, then the first TCP exchange through it. Runs on real
//! namespaces (root), on kernel WireGuard if present, else boringtun.
//!
//! `cargo run --release -p hive-wg --example tunnel-bench -- --runs 200`

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use clap::Parser;
use hive_wg::netns::{self, NetNs, VethEnd};
use hive_wg::{KeyPair, PeerSpec, Tunnel, TunnelSpec};

/// Measures WireGuard tunnel up -> first packet through, between two network namespaces.
#[derive(Parser)]
struct Args {
    /// How many tunnels to bring up, one after the other.
    #[arg(long, default_value_t = 200, env = "HIVE_WG_BENCH_RUNS")]
    runs: usize,
    /// Pause between runs (not measured). WireGuard answers with cookies (DoS protection)
    /// when one interface sees more than 100 handshakes a second, which back-to-back runs
    /// exceed; a pause of ~10 ms keeps the connector under that.
    #[arg(long, default_value_t = 0, env = "HIVE_WG_BENCH_PACE_MS")]
    pace_ms: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let pid = std::process::id();
    let cell_ns = NetNs::create(&format!("hwg-bench-{pid}-cell"))?;
    let conn_ns = NetNs::create(&format!("hwg-bench-{pid}-conn"))?;
    netns::link_veth(
        &VethEnd {
            netns: conn_ns.path(),
            iface: "up0",
            address: "198.18.200.1/24".parse()?,
        },
        &VethEnd {
            netns: cell_ns.path(),
            iface: "eth0",
            address: "198.18.200.2/24".parse()?,
        },
    )?;

    let mut spec = TunnelSpec::new("hwgbenchc");
    spec.netns = Some(conn_ns.path().to_path_buf());
    spec.listen_port = Some(51820);
    spec.addresses = vec!["10.250.0.1/24".parse()?];
    let connector = Tunnel::up(spec, KeyPair::generate())?;
    let listener = netns::run_in(conn_ns.path(), || TcpListener::bind("10.250.0.1:7000"))??;
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 64];
            if let Ok(n) = s.read(&mut buf) {
                let _ = s.write_all(&buf[..n]);
            }
        }
    });

    let target: SocketAddr = "10.250.0.1:7000".parse()?;
    let threads_before = threads();
    let (mut up, mut handshake, mut first) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.runs {
        std::thread::sleep(Duration::from_millis(args.pace_ms));
        let start = Instant::now();
        let keys = KeyPair::generate();
        let key = keys.public();
        connector.add_peer(PeerSpec {
            public_key: key,
            endpoint: None,
            allowed_ips: vec!["10.250.0.2/32".parse()?],
            persistent_keepalive: None,
        })?;
        let mut spec = TunnelSpec::new("hwgbenchx");
        spec.netns = Some(cell_ns.path().to_path_buf());
        spec.addresses = vec!["10.250.0.2/24".parse()?];
        spec.peers = vec![PeerSpec {
            public_key: connector.public_key(),
            endpoint: Some("198.18.200.1:51820".parse()?),
            allowed_ips: vec!["10.250.0.0/24".parse()?, "10.20.0.0/16".parse()?],
            persistent_keepalive: Some(25),
        }];
        let cell = Tunnel::up(spec, keys)?;
        up.push(start.elapsed());
        cell.wait_handshake(Duration::from_secs(10))?;
        handshake.push(start.elapsed());
        let msg = format!("run {i}");
        netns::run_in(cell_ns.path(), || -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(10))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(msg.as_bytes())?;
            let mut buf = vec![0u8; msg.len()];
            s.read_exact(&mut buf)?;
            if buf != msg.as_bytes() {
                return Err(std::io::Error::other("echo mismatch"));
            }
            Ok(())
        })??;
        first.push(start.elapsed());
        connector.remove_peer(&key)?;
        cell.down()?;
    }
    // Every cell tunnel's boringtun threads must be gone again.
    let threads_after = threads();
    let backend = connector.backend();
    connector.down()?;
    println!(
        "tunnel-bench: {} runs, {} ms apart, backend {backend:?}",
        args.runs, args.pace_ms
    );
    println!("  threads in this process before/after the runs: {threads_before}/{threads_after}");
    for (name, v) in [
        ("key + connector peer + tunnel up", &mut up),
        ("... + handshake complete", &mut handshake),
        ("... + first TCP echo through", &mut first),
    ] {
        v.sort();
        println!(
            "  {name:<34} median {:>8.2} ms   p99 {:>8.2} ms   max {:>8.2} ms",
            ms(v[v.len() / 2]),
            ms(v[(v.len() * 99).div_ceil(100) - 1]),
            ms(v[v.len() - 1]),
        );
    }
    Ok(())
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
