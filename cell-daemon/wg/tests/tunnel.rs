//! Real tunnels between real network namespaces (root required; boringtun when the kernel has
//! no WireGuard). Each test uses its own namespaces, interface names and underlay subnet, so
//! they run in parallel.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{echo, echo_until, ip, Echo, Pair};
use hive_wg::tunnel::TunnelError;
use hive_wg::{BackendChoice, KeyPair, Tunnel, TunnelSpec};

#[test]
fn traffic_flows_and_a_removed_peer_is_refused() {
    let pair = Pair::new("rev", 11);
    let connector = pair.connector(KeyPair::generate());
    let cell_keys = KeyPair::generate();
    let cell_key = cell_keys.public();
    connector
        .add_peer(Pair::cell_as_peer(2, cell_key))
        .expect("connector accepts the cell");
    let cell = Tunnel::up(pair.cell_spec(2, connector.public_key()), cell_keys).expect("cell up");
    eprintln!("backend: {:?}", cell.backend());

    let took = cell
        .wait_handshake(Duration::from_secs(5))
        .expect("handshake");
    eprintln!("handshake after {took:?}");
    let _server = Echo::start(&pair.conn, "10.250.0.1:7000");
    echo(
        &pair.cell,
        "10.250.0.1:7000",
        "hello through the tunnel",
        Duration::from_secs(3),
    )
    .expect("echo over the tunnel");

    // The interface looks as specified.
    let addrs = ip(&pair.cell, &["-4", "addr", "show", "dev", cell.iface()]);
    assert!(
        addrs.contains("10.250.0.2/24") && addrs.contains(",UP"),
        "{addrs}"
    );
    let routes = ip(&pair.cell, &["-4", "route", "show", "dev", cell.iface()]);
    assert!(
        routes.contains("10.20.0.0/16"),
        "private prefix routed: {routes}"
    );
    let link = ip(&pair.cell, &["link", "show", "dev", cell.iface()]);
    assert!(link.contains("mtu 1420"), "{link}");
    let peers = connector.peers().unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].public_key, cell_key);
    assert!(peers[0].last_handshake.is_some() && peers[0].rx_bytes > 0);
    assert_eq!(
        peers[0].endpoint.map(|e| e.ip().to_string()),
        Some(format!("198.18.{}.2", pair.n)),
        "connector learned the cell's endpoint from the handshake"
    );

    // Revoke: the connector forgets the cell.
    assert!(connector.remove_peer(&cell_key).unwrap());
    assert!(
        !connector.remove_peer(&cell_key).unwrap(),
        "second removal is a no-op"
    );
    assert!(connector.peers().unwrap().is_empty());
    let err = echo(
        &pair.cell,
        "10.250.0.1:7000",
        "after revoke",
        Duration::from_secs(1),
    );
    assert!(err.is_err(), "traffic must stop after the peer is removed");

    // A new handshake from the revoked key: reset the cell's peer so it starts from scratch.
    let conn_peer = pair.cell_spec(2, connector.public_key()).peers.remove(0);
    assert!(cell.remove_peer(&connector.public_key()).unwrap());
    cell.add_peer(conn_peer).unwrap();
    match cell.wait_handshake(Duration::from_secs(3)) {
        Err(TunnelError::HandshakeTimeout { .. }) => {}
        other => panic!("revoked key completed a handshake: {other:?}"),
    }
    assert!(connector.peers().unwrap().is_empty());

    // Down removes the interface, its routes and the control socket.
    let iface = cell.iface().to_string();
    cell.down().expect("cell down");
    let link = ip(&pair.cell, &["link", "show", "dev", &iface]);
    assert!(link.contains("does not exist"), "{link}");
    assert!(!ip(&pair.cell, &["route"]).contains("10.20.0.0/16"));
    assert!(!hive_wg::uapi::socket_path(&iface).exists());
    connector.down().expect("connector down");
}

#[test]
fn fifty_tunnels_in_a_row_each_with_its_own_key() {
    let pair = Pair::new("r50", 12);
    let connector = pair.connector(KeyPair::generate());
    let _server = Echo::start(&pair.conn, "10.250.0.1:7000");
    let mut seen = HashSet::new();
    let mut times = Vec::new();
    for i in 0..50u32 {
        let start = Instant::now();
        let keys = KeyPair::generate();
        let key = keys.public();
        assert!(seen.insert(key), "key reused at tunnel {i}");
        connector.add_peer(Pair::cell_as_peer(2, key)).unwrap();
        let cell = Tunnel::up(pair.cell_spec(2, connector.public_key()), keys)
            .unwrap_or_else(|e| panic!("tunnel {i}: {e}"));
        echo_until(
            &pair.cell,
            "10.250.0.1:7000",
            &format!("build {i}"),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("tunnel {i}: echo: {e}"));
        times.push(start.elapsed());
        // The connector saw exactly this key.
        let peers = connector.peers().unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].public_key, key);
        assert!(connector.remove_peer(&key).unwrap());
        cell.down()
            .unwrap_or_else(|e| panic!("tunnel {i}: down: {e}"));
    }
    assert_eq!(seen.len(), 50);
    times.sort();
    eprintln!(
        "50 tunnels: up -> echo median {:?}, max {:?}",
        times[times.len() / 2],
        times[times.len() - 1]
    );
}

#[test]
fn two_cells_on_one_connector_cannot_use_each_others_address() {
    let pair = Pair::new("two", 13);
    let connector = pair.connector(KeyPair::generate());
    let _server = Echo::start(&pair.conn, "10.250.0.1:7000");
    let (ka, kb) = (KeyPair::generate(), KeyPair::generate());
    // Only cell A's key is allowed 10.250.0.2; cell B is allowed 10.250.0.3.
    connector
        .add_peer(Pair::cell_as_peer(2, ka.public()))
        .unwrap();
    connector
        .add_peer(Pair::cell_as_peer(3, kb.public()))
        .unwrap();
    assert_eq!(connector.peers().unwrap().len(), 2);
    // Cell B comes up claiming A's address: its handshake works but its packets are dropped.
    let liar = Tunnel::up(pair.cell_spec(2, connector.public_key()), kb).unwrap();
    liar.wait_handshake(Duration::from_secs(5)).unwrap();
    assert!(
        echo(
            &pair.cell,
            "10.250.0.1:7000",
            "spoof",
            Duration::from_secs(1)
        )
        .is_err(),
        "a cell must not send from another cell's tunnel address"
    );
    liar.down().unwrap();
    let honest = Tunnel::up(pair.cell_spec(2, connector.public_key()), ka).unwrap();
    echo_until(
        &pair.cell,
        "10.250.0.1:7000",
        "honest",
        Duration::from_secs(5),
    )
    .unwrap();
    honest.down().unwrap();
}

#[test]
fn interface_in_a_build_namespace_with_the_socket_outside() {
    let pair = Pair::new("split", 16);
    // The "build container": a namespace with nothing in it but what the tunnel brings.
    let build = hive_wg::netns::NetNs::create("hwg-split-build").unwrap();
    let connector = pair.connector(KeyPair::generate());
    let keys = KeyPair::generate();
    connector
        .add_peer(Pair::cell_as_peer(2, keys.public()))
        .unwrap();
    let mut spec = pair.cell_spec(2, connector.public_key());
    spec.underlay_netns = Some(pair.cell.path().to_path_buf());
    spec.netns = Some(build.path().to_path_buf());
    let tunnel = Tunnel::up(spec, keys).expect("tunnel up across namespaces");
    tunnel.wait_handshake(Duration::from_secs(5)).unwrap();
    let _server = Echo::start(&pair.conn, "10.250.0.1:7000");
    echo(
        &build,
        "10.250.0.1:7000",
        "from the build",
        Duration::from_secs(3),
    )
    .expect("echo from the build namespace");
    // The build sees the tunnel only: no underlay link, no route to the connector's endpoint.
    let links = ip(&build, &["-o", "link"]);
    assert!(
        links.contains(tunnel.iface()) && !links.contains("eth0"),
        "{links}"
    );
    let err = echo(
        &build,
        &format!("198.18.{}.1:7000", pair.n),
        "x",
        Duration::from_secs(1),
    )
    .expect_err("the build must not reach the underlay");
    assert_eq!(
        err.raw_os_error(),
        Some(nix::errno::Errno::ENETUNREACH as i32),
        "{err}"
    );
    // The cell side keeps its socket but not the interface.
    assert!(ip(&pair.cell, &["link", "show", "dev", tunnel.iface()]).contains("does not exist"));
    let iface = tunnel.iface().to_string();
    tunnel.down().unwrap();
    assert!(ip(&build, &["link", "show", "dev", &iface]).contains("does not exist"));
}

#[test]
fn bad_requests_fail_with_errors_that_name_the_problem() {
    // A namespace that does not exist.
    let mut spec = TunnelSpec::new("hwgbad0");
    spec.netns = Some("/run/netns/hwg-no-such-ns".into());
    let e = Tunnel::up(spec, KeyPair::generate())
        .unwrap_err()
        .to_string();
    assert!(e.contains("/run/netns/hwg-no-such-ns"), "{e}");

    let pair = Pair::new("bad", 14);
    // An interface name that is taken in the namespace.
    let mut spec = TunnelSpec::new("eth0");
    spec.netns = Some(pair.cell.path().to_path_buf());
    let e = Tunnel::up(spec, KeyPair::generate())
        .unwrap_err()
        .to_string();
    assert!(e.contains("eth0") && e.contains("already exists"), "{e}");

    // Kernel WireGuard demanded on a kernel without it.
    let kernel_has_wg = std::path::Path::new("/sys/module/wireguard").exists();
    let mut spec = TunnelSpec::new("hwgkern");
    spec.netns = Some(pair.cell.path().to_path_buf());
    spec.backend = BackendChoice::Kernel;
    match Tunnel::up(spec, KeyPair::generate()) {
        Ok(t) => {
            assert!(kernel_has_wg, "kernel backend worked without the module?");
            t.down().unwrap();
        }
        Err(e) => {
            assert!(!kernel_has_wg, "{e}");
            let e = e.to_string();
            assert!(
                e.contains("kernel WireGuard is not available") && e.contains("hwgkern"),
                "{e}"
            );
        }
    }

    // A route that another interface already owns: the tunnel is not left half-built.
    let mut spec = pair.cell_spec(2, KeyPair::generate().public());
    spec.peers[0].allowed_ips.push(common::p("198.18.14.0/24"));
    let iface = spec.iface.clone();
    let e = Tunnel::up(spec, KeyPair::generate())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("198.18.14.0/24") && e.contains("already exists"),
        "{e}"
    );
    assert!(ip(&pair.cell, &["link", "show", "dev", &iface]).contains("does not exist"));
    assert!(!hive_wg::uapi::socket_path(&iface).exists());

    // Invalid specs never reach the kernel.
    let mut spec = TunnelSpec::new("much-too-long-name");
    spec.netns = Some(pair.cell.path().to_path_buf());
    let e = Tunnel::up(spec, KeyPair::generate())
        .unwrap_err()
        .to_string();
    assert!(e.contains("much-too-long-name"), "{e}");
}

#[test]
fn no_connector_means_a_clear_timeout_and_drop_cleans_up() {
    let pair = Pair::new("tmo", 17);
    // Nothing listens on the connector endpoint: the handshake can never complete.
    let tunnel = Tunnel::up(
        pair.cell_spec(2, KeyPair::generate().public()),
        KeyPair::generate(),
    )
    .unwrap();
    let iface = tunnel.iface().to_string();
    let e = tunnel
        .wait_handshake(Duration::from_millis(1200))
        .unwrap_err();
    assert!(matches!(e, TunnelError::HandshakeTimeout { .. }), "{e}");
    let e = e.to_string();
    assert!(e.contains(&iface) && e.contains("no handshake"), "{e}");
    // Dropped without down(): still torn down.
    drop(tunnel);
    assert!(ip(&pair.cell, &["link", "show", "dev", &iface]).contains("does not exist"));
    assert!(!hive_wg::uapi::socket_path(&iface).exists());
}

#[test]
fn ipv6_inside_the_tunnel() {
    let pair = Pair::new("six", 18);
    let mut spec = TunnelSpec::new(format!("hwgc{}", pair.tag));
    spec.netns = Some(pair.conn.path().to_path_buf());
    spec.listen_port = Some(51820);
    spec.addresses = vec![common::p("10.250.0.1/24"), common::p("fd00:250::1/64")];
    let connector = Tunnel::up(spec, KeyPair::generate()).unwrap();
    let keys = KeyPair::generate();
    let mut as_peer = Pair::cell_as_peer(2, keys.public());
    as_peer.allowed_ips.push(common::p("fd00:250::2/128"));
    connector.add_peer(as_peer).unwrap();
    let mut spec = pair.cell_spec(2, connector.public_key());
    spec.addresses.push(common::p("fd00:250::2/64"));
    spec.peers[0].allowed_ips.push(common::p("fd00:250::/64"));
    spec.peers[0].allowed_ips.push(common::p("fd00:20::/48"));
    let cell = Tunnel::up(spec, keys).unwrap();
    let routes = ip(&pair.cell, &["-6", "route", "show", "dev", cell.iface()]);
    assert!(routes.contains("fd00:20::/48"), "{routes}");
    let _server = Echo::start(&pair.conn, "[fd00:250::1]:7000");
    echo_until(
        &pair.cell,
        "[fd00:250::1]:7000",
        "over v6",
        Duration::from_secs(5),
    )
    .expect("echo over IPv6 in the tunnel");
    cell.down().unwrap();
    connector.down().unwrap();
}

#[test]
fn a_name_in_use_in_another_namespace_is_refused() {
    let pair = Pair::new("dup", 19);
    let connector = pair.connector(KeyPair::generate());
    if connector.backend() == hive_wg::Backend::Kernel {
        eprintln!("SKIP: kernel WireGuard has no control socket to collide on");
        return;
    }
    let keys = KeyPair::generate();
    connector
        .add_peer(Pair::cell_as_peer(2, keys.public()))
        .unwrap();
    let cell = Tunnel::up(pair.cell_spec(2, connector.public_key()), keys).unwrap();
    // Same interface name as the connector's, but in the cell's namespace.
    let mut spec = TunnelSpec::new(connector.iface());
    spec.netns = Some(pair.cell.path().to_path_buf());
    spec.backend = BackendChoice::Userspace;
    let e = Tunnel::up(spec, KeyPair::generate()).unwrap_err();
    assert!(matches!(e, TunnelError::SocketInUse { .. }), "{e}");
    assert!(e.to_string().contains(connector.iface()), "{e}");
    // The connector was not disturbed.
    let _server = Echo::start(&pair.conn, "10.250.0.1:7000");
    echo_until(
        &pair.cell,
        "10.250.0.1:7000",
        "still here",
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(connector.peers().unwrap().len(), 1);
    cell.down().unwrap();
    connector.down().unwrap();
}

/// The cell's early interface: made with its key before the address and the connector are
/// known (the key exchange runs meanwhile), then given both; traffic flows as with `up`.
#[test]
fn an_interface_made_early_gets_its_address_and_peer_later() {
    let pair = Pair::new("erl", 20);
    let connector = pair.connector(KeyPair::generate());
    let cell_keys = KeyPair::generate();
    connector
        .add_peer(Pair::cell_as_peer(2, cell_keys.public()))
        .unwrap();
    let full = pair.cell_spec(2, connector.public_key());
    let mut early = TunnelSpec::new(full.iface.clone());
    early.netns = full.netns.clone();
    let cell = Tunnel::up(early, cell_keys).expect("early interface");
    assert!(cell.peers().unwrap().is_empty());
    cell.add_address(full.addresses[0]).unwrap();
    cell.add_peer(full.peers[0].clone()).unwrap();
    cell.wait_handshake(Duration::from_secs(5))
        .expect("handshake");
    let _server = Echo::start(&pair.conn, "10.250.0.1:7000");
    echo(
        &pair.cell,
        "10.250.0.1:7000",
        "late",
        Duration::from_secs(3),
    )
    .expect("echo");
    let addrs = ip(&pair.cell, &["-4", "addr", "show", "dev", cell.iface()]);
    assert!(addrs.contains("10.250.0.2/24"), "{addrs}");
    let routes = ip(&pair.cell, &["-4", "route", "show", "dev", cell.iface()]);
    // The private prefix is routed; the tunnel subnet is the address's own (no extra route).
    assert!(routes.contains("10.20.0.0/16"), "{routes}");
    assert_eq!(routes.matches("10.250.0.0/24").count(), 1, "{routes}");
    cell.down().unwrap();
    connector.down().unwrap();
}

/// A warm cell's stand-by interface: made with a key nobody learns, long before a build asks
/// for a tunnel; the build's own key replaces it, and only that key gets through. A key is
/// replaced only before the first peer.
#[test]
fn a_standby_interface_takes_the_builds_own_key() {
    let pair = Pair::new("sby", 21);
    let connector = pair.connector(KeyPair::generate());
    let full = pair.cell_spec(2, connector.public_key());
    let mut standby = TunnelSpec::new(full.iface.clone());
    standby.netns = full.netns.clone();
    let mut cell = Tunnel::up(standby, KeyPair::generate()).expect("stand-by interface");
    let throwaway = cell.public_key();
    let build_keys = KeyPair::generate();
    let build_key = build_keys.public();
    connector
        .add_peer(Pair::cell_as_peer(2, build_key))
        .unwrap();
    cell.replace_key(build_keys).expect("the build's key");
    assert_eq!(cell.public_key(), build_key);
    assert_ne!(cell.public_key(), throwaway);
    cell.add_address(full.addresses[0]).unwrap();
    cell.add_peer(full.peers[0].clone()).unwrap();
    cell.wait_handshake(Duration::from_secs(5))
        .expect("handshake with the build's key");
    let _server = Echo::start(&pair.conn, "10.250.0.1:7000");
    echo(
        &pair.cell,
        "10.250.0.1:7000",
        "swapped",
        Duration::from_secs(3),
    )
    .expect("echo");
    let peers = connector.peers().unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].public_key, build_key);
    assert!(peers[0].last_handshake.is_some());
    // With a peer, the key stays: its sessions belong to it.
    let e = cell.replace_key(KeyPair::generate()).unwrap_err();
    assert!(e.to_string().contains("already has peers"), "{e}");
    assert_eq!(cell.public_key(), build_key);
    cell.down().unwrap();
    connector.down().unwrap();
}
