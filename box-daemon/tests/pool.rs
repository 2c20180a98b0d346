//! The warm pool over the real sandbox backend: fills to target, hands out warm cells at once,
//! cold-starts when empty, replaces a dead cell, tops up after use, and leaves nothing on shutdown.
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hive_box::backend::CellBackend;
use hive_box::pool::{ClassConfig, Pool, PoolError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_keeps_target_hands_out_warm_cells_and_replaces_dead_ones() {
    let tb = common::sandbox("pool", 203);
    let pool = Pool::new(
        Arc::clone(&tb.sandbox),
        vec![ClassConfig {
            size: common::small(),
            target: 2,
            capacity: 4,
        }],
        64,
        Duration::from_secs(30),
    );
    let t0 = Instant::now();
    pool.top_up();
    assert!(
        pool.wait_warm("small", 2, Duration::from_secs(60)).await,
        "pool never reached 2 warm: {:?}",
        pool.states()
    );
    let fill = t0.elapsed();
    let stats = pool.stats();
    eprintln!(
        "filled 2 cells in {fill:?}; mean boot {:?}",
        stats.total_boot / stats.booted.max(1) as u32
    );

    // Warm hand-out is immediate and says warm.
    let t = Instant::now();
    let (a, warm) = pool.take("small").await.unwrap();
    let took = t.elapsed();
    assert!(warm);
    assert!(took < Duration::from_millis(20), "warm take took {took:?}");
    // Its replacement waits for the build to start (the agent tops up then) or REFILL_AFTER,
    // so the boot does not run beside the build's dispatch.
    let booting = pool.states()[0].booting;
    if t.elapsed() < hive_box::pool::REFILL_AFTER {
        assert_eq!(booting, 0, "the replacement booted at the take");
    }
    assert_eq!(a.health(Duration::from_secs(2)).await, Ok(true));

    // Unknown class: a clear error, not a panic.
    match pool.take("huge").await {
        Err(PoolError::UnknownClass(c, known)) => {
            assert_eq!((c.as_str(), known.as_str()), ("huge", "small"))
        }
        other => panic!("expected UnknownClass, got {other:?}"),
    }

    // Nobody tops up (no agent here): REFILL_AFTER does. Then kill a warm cell's PID 1: the health check replaces it.
    assert!(pool.wait_warm("small", 2, Duration::from_secs(60)).await);
    let (victim, _) = pool.warm_ids()[0].clone();
    let pid: i32 = std::fs::read_to_string(tb.sandbox.cell_dir(&victim).join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    pool.check_health().await;
    assert!(
        !pool.warm_ids().iter().any(|(id, _)| *id == victim),
        "dead cell still warm"
    );
    assert!(
        !tb.sandbox.cell_dir(&victim).exists(),
        "dead cell not destroyed"
    );
    assert!(
        pool.wait_warm("small", 2, Duration::from_secs(60)).await,
        "dead cell not replaced"
    );

    // Drain the warm cells; the next take is a cold start and says so.
    let (b, _) = pool.take("small").await.unwrap();
    let (c, _) = pool.take("small").await.unwrap();
    let state = pool.states()[0].clone();
    let (d, warm_d) = pool.take("small").await.unwrap();
    eprintln!("state before 4th take: {state:?}, 4th warm={warm_d}");
    assert_eq!(pool.states()[0].busy, 4);
    // At capacity: the next take is refused with the counts.
    if let Err(e) = pool.take("small").await {
        assert!(e.to_string().contains("capacity 4"), "{e}");
    } else {
        panic!("take beyond capacity succeeded");
    }

    // Release everything: cells destroyed, pool back to its target.
    for cell in [a, b, c, d] {
        let id = cell.id.clone();
        pool.release(cell).await;
        assert!(!tb.sandbox.cell_dir(&id).exists());
    }
    assert!(pool.wait_warm("small", 2, Duration::from_secs(60)).await);
    assert_eq!(pool.states()[0].busy, 0);

    pool.shutdown().await;
    assert!(
        tb.sandbox.inspect().is_empty(),
        "cells left after shutdown: {:?}",
        tb.sandbox.inspect()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_pool_cold_starts_and_says_so() {
    let tb = common::sandbox("cold", 205);
    let pool = Pool::new(
        Arc::clone(&tb.sandbox),
        vec![ClassConfig {
            size: common::small(),
            target: 0,
            capacity: 1,
        }],
        64,
        Duration::from_secs(30),
    );
    let (cell, warm) = pool.take("small").await.expect("cold start");
    assert!(
        !warm,
        "a cell from an empty pool must be reported as a cold start"
    );
    assert_eq!(cell.health(Duration::from_secs(2)).await, Ok(true));
    assert_eq!(pool.states()[0].busy, 1);
    let id = cell.id.clone();
    pool.release(cell).await;
    assert!(!tb.sandbox.cell_dir(&id).exists());
    assert_eq!(pool.states()[0].warm, 0, "target 0: nothing is kept warm");
}

/// Benchmark (issue 3): cells the pool brings to "answered health" per second per core.
/// `cargo test -p hive-box --test pool bench -- --ignored --nocapture` (HIVE_BENCH_CELLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run explicitly"]
async fn bench_cells_per_second_per_core() {
    let n: u32 = std::env::var("HIVE_BENCH_CELLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let tb = common::sandbox("bench", 204);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let mut rates = Vec::new();
    for round in 0..3 {
        let pool = Pool::new(
            Arc::clone(&tb.sandbox),
            vec![ClassConfig {
                size: common::small(),
                target: n,
                capacity: n,
            }],
            64,
            Duration::from_secs(60),
        );
        let t0 = Instant::now();
        pool.top_up();
        assert!(
            pool.wait_warm("small", n, Duration::from_secs(120)).await,
            "{:?}",
            pool.states()
        );
        let dt = t0.elapsed().as_secs_f64();
        let stats = pool.stats();
        let rate = f64::from(n) / dt;
        println!(
            "BENCH round {round}: {n} cells warm in {dt:.2}s = {rate:.1} cells/s = {:.1} cells/s/core ({cores} cores); mean boot {:?}, failures {}",
            rate / cores,
            stats.total_boot / stats.booted.max(1) as u32,
            stats.boot_failures
        );
        rates.push(rate / cores);
        pool.shutdown().await;
    }
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("BENCH cells/s/core median of 3: {:.1}", rates[1]);
}
