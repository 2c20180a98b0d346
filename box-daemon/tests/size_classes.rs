//! Size classes come from the control plane: a real box agent and warm pool (sandbox backend)
//! register with a real control plane whose operator file reshapes `small`, and the pool then
//! boots its cells, and replaces any it booted from the built-in shape, in the control plane's
//! shape (checked on the cells' cgroups). Needs root and the Debian build image.
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hive_box::agent::{Agent, AgentConfig};
use hive_box::config::builtin_shape;
use hive_box::pool::{ClassConfig, Pool};
use hive_control_plane::server::{self, Config};
use hive_control_plane::sizeclass::{SizeClassConfig, SizeClasses};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn box_registers_then_boots_the_control_planes_shape() {
    let tb = common::sandbox("sizes", 206);
    let db_dir = tempfile::tempdir().unwrap();
    // Not the built-in small (2 vCPU, 2 GiB): a shape the box can only have heard of.
    let reshaped = SizeClassConfig {
        name: "small".into(),
        vcpus: 1,
        memory_mib: 640,
        disk_mib: 1024,
        net_bytes_per_sec: 0,
        disk_bytes_per_sec: 0,
        disk_ops_per_sec: 0,
        pids_max: 300,
    };
    let cp = server::start(Config {
        http_addr: "127.0.0.1:0".parse().unwrap(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        box_addr: "127.0.0.1:0".parse().unwrap(),
        // This test is about size classes; box certificates have their own tests.
        insecure_boxes: true,
        db: Some(format!("sqlite://{}/hive.db", db_dir.path().display())),
        // Its admin.token goes there too, not into the working directory.
        data_dir: db_dir.path().to_path_buf(),
        size_classes: SizeClasses::with_overrides(&[reshaped]).unwrap(),
        ..Config::default()
    })
    .await
    .expect("control plane starts");

    let builtin = builtin_shape("small");
    assert_eq!(
        builtin.memory_mib, 2048,
        "the box starts from the shared built-in"
    );
    let pool = Pool::new(
        Arc::clone(&tb.sandbox),
        vec![ClassConfig {
            size: builtin,
            target: 1,
            capacity: 2,
        }],
        64,
        Duration::from_secs(30),
    );
    // Booting starts before registration, as in the daemon: the first cell may be built-in.
    pool.top_up();
    let agent = Agent::new(
        AgentConfig {
            control_plane: format!("http://{}", cp.grpc_addr),
            credentials: None,
            box_id: "box-sizes".into(),
            hostname: "box-sizes.test".into(),
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(1),
            room_heartbeat_gap: Some(Duration::from_millis(100)),
            cancel_grace: Duration::from_secs(5),
            cell_call_timeout: Duration::from_secs(10),
        },
        Arc::clone(&pool),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(Arc::clone(&agent).run(stopped));

    let want = 640 * 1024 * 1024;
    let deadline = Instant::now() + Duration::from_secs(60);
    let limits = loop {
        let warm = pool.warm_ids();
        let limits: Vec<u64> = warm
            .iter()
            .map(|(id, _)| {
                let cg = tb.sandbox.cgroups().open("hive-test-sizes", id);
                cg.memory_limit().unwrap_or(0)
            })
            .collect();
        if agent.is_connected() && !limits.is_empty() && limits.iter().all(|&l| l == want) {
            break limits;
        }
        assert!(
            Instant::now() < deadline,
            "no warm cell in the control plane's shape: connected={} shape={:?} limits={limits:?}",
            agent.is_connected(),
            pool.shape("small")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(limits.len(), 1);
    let shape = pool.shape("small").unwrap();
    assert_eq!(
        (shape.vcpus, shape.memory_mib, shape.pids_max),
        (1, 640, 300)
    );

    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
    pool.shutdown().await;
    cp.shutdown().await;
}
