//! Tunnel lease allocation against real databases (SQLite file; PostgreSQL with
//! `HIVE_TEST_POSTGRES_URL`): concurrent key exchanges on one network get distinct addresses,
//! and a box's repeated request for the same build, lease and key gets the same lease again
//! while any other reuse of a key is refused.

mod common;

use std::collections::BTreeSet;

use hive_control_plane::store::{Audit, Issued, NetworkRow, Store};

/// A fresh public key (any 32 bytes are one; the store only needs them distinct).
fn key() -> String {
    hive_types::PublicKey::from_bytes(rand::random()).to_base64()
}

async fn network(store: &Store) -> NetworkRow {
    store
        .create_network(
            "corp",
            &["10.20.0.0/16".to_string()],
            "10.250.0.0/24",
            &Audit::system("StoreTest", "corp"),
        )
        .await
        .unwrap()
}

/// 24 exchanges at once, each its own build and key, on several pool connections: no two get
/// the same address, none fails.
async fn concurrent_exchanges_get_distinct_addresses(url: String) {
    let store = Store::open(&url).await.unwrap();
    let net = network(&store).await;
    let mut tasks = Vec::new();
    for i in 0..24 {
        let (store, net) = (store.clone(), net.clone());
        tasks.push(tokio::spawn(async move {
            store
                .issue_lease(&net, &format!("b{i}"), &format!("l{i}"), &key())
                .await
        }));
    }
    let mut addresses = BTreeSet::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(Issued::Lease(l)) => {
                assert!(
                    addresses.insert(l.tunnel_address.clone()),
                    "address {} issued twice",
                    l.tunnel_address
                );
            }
            other => panic!("exchange failed: {other:?}"),
        }
    }
    assert_eq!(addresses.len(), 24);
    // Lowest free first: .2 .. .25 (.1 is the connector).
    assert!(addresses.contains("10.250.0.2/24") && addresses.contains("10.250.0.25/24"));
    store.close().await;
}
hive_testkit::on_both!(db => concurrent_exchanges_get_distinct_addresses);

/// The same build attempt asking again with the same key (its first answer lost) gets the same
/// lease, also when both requests race; another build, another lease of the same build, or a
/// revoked lease never gets the key.
async fn a_repeated_request_gets_the_same_lease(url: String) {
    let store = Store::open(&url).await.unwrap();
    let net = network(&store).await;
    let k = key();
    let (a, b) = tokio::join!(
        store.issue_lease(&net, "b1", "l1", &k),
        store.issue_lease(&net, "b1", "l1", &k)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let lease = match (&a, &b) {
        (Issued::Lease(l), Issued::Again(m)) | (Issued::Again(m), Issued::Lease(l)) => {
            assert_eq!(l, m);
            l.clone()
        }
        other => panic!("want one Lease and one Again, got {other:?}"),
    };
    match store.issue_lease(&net, "b1", "l1", &k).await.unwrap() {
        Issued::Again(l) => assert_eq!(l, lease),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store
            .list_tunnel_leases("corp", "b1", false)
            .await
            .unwrap()
            .len(),
        1
    );
    for (build, lease_id) in [("b2", "l2"), ("b1", "l9")] {
        assert!(matches!(
            store.issue_lease(&net, build, lease_id, &k).await.unwrap(),
            Issued::KeySeen
        ));
    }
    assert!(store.revoke_lease(&k).await.unwrap());
    assert!(matches!(
        store.issue_lease(&net, "b1", "l1", &k).await.unwrap(),
        Issued::KeySeen
    ));
    store.close().await;
}
hive_testkit::on_both!(db => a_repeated_request_gets_the_same_lease);
