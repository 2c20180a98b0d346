//! Throughput figures (ignored by default; they print numbers rather than check behaviour):
//!   cargo test -p hive-control-plane --release --test bench -- --ignored --nocapture --test-threads 1
//! With `HIVE_TEST_POSTGRES_URL` set, each runs on PostgreSQL too.

mod common;

use std::time::{Duration, Instant};

use common::{api, fake_box, http, pool, start_with};
use hive_control_plane::http::webhook::sign;
use hive_control_plane::store::BuildRow;
use hive_proto::v1::CreateProjectRequest;
use hive_testkit::TestDb;

async fn dbs(name: &str) -> Vec<(String, TestDb)> {
    let mut out = vec![("sqlite".to_string(), TestDb::sqlite())];
    if let Some(pg) = TestDb::postgres(name).await {
        out.push(("postgres".to_string(), pg));
    }
    out
}

/// Signed push webhooks accepted per second, each a durable commit (delivery + build +
/// transition), 16 senders, a new TCP connection per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn webhooks_per_second() {
    const N: usize = 2000;
    const SENDERS: usize = 16;
    for (kind, db) in dbs("webhooks_per_second").await {
        let handle = start_with(&db.url, |_| {}).await;
        api(&handle)
            .await
            .create_project(CreateProjectRequest {
                name: "bench".into(),
                repo_url: "https://git.example/o/bench".into(),
                secret: "bench-secret".into(),
                steps: vec!["true".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        let addr = handle.http_addr;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for s in 0..SENDERS {
            tasks.push(tokio::spawn(async move {
                let mut ok = 0;
                for i in (s..N).step_by(SENDERS) {
                    let body = serde_json::json!({
                        "ref": "refs/heads/main",
                        "after": format!("{i:040x}"),
                        "repository": { "clone_url": "https://git.example/o/bench.git" },
                    })
                    .to_string();
                    let sig = sign(b"bench-secret", body.as_bytes());
                    let delivery = format!("bench-{i}");
                    let r = http(
                        addr,
                        "POST",
                        "/webhooks/github",
                        &[
                            ("X-GitHub-Event", "push"),
                            ("X-GitHub-Delivery", &delivery),
                            ("X-Hub-Signature-256", &sig),
                        ],
                        body.as_bytes(),
                    )
                    .await;
                    assert_eq!(r.status, 202, "{}", r.body);
                    ok += 1;
                }
                ok
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "BENCH webhooks {kind}: {total} signed pushes accepted in {secs:.2}s = {:.0}/s",
            total as f64 / secs
        );
        handle.shutdown().await;
        db.drop_db().await;
    }
}

/// Scheduler placements per second: 100 boxes, 10,000 queued builds, one pass timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn placements_per_second() {
    const BOXES: usize = 100;
    const BUILDS: usize = 10_000;
    for (kind, db) in dbs("placements_per_second").await {
        // No tick and no heartbeats: the pass below is the only one that places.
        let handle = start_with(&db.url, |c| {
            c.tick = Duration::from_secs(3600);
            c.heartbeat_interval = Duration::from_secs(600);
            c.lease = Duration::from_secs(1200);
        })
        .await;
        let project = {
            let p = api(&handle)
                .await
                .create_project(CreateProjectRequest {
                    name: "bench".into(),
                    repo_url: "git://h/bench".into(),
                    steps: vec!["true".into()],
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            handle.store().get_project(&p.id).await.unwrap().unwrap()
        };
        // Boxes first (nothing to place yet), then the queue straight into the store (no
        // wake-up), so the timed passes below do all the placing.
        let mut boxes = Vec::new();
        for i in 0..BOXES {
            // 100 warm cells each: room for every build.
            let (b, _) = fake_box(
                &handle,
                &format!("bench-{i:03}"),
                vec![pool("small", 100, 100)],
            )
            .await;
            boxes.push(b);
        }
        // Let the passes the registrations woke finish before the queue fills.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let fill = Instant::now();
        for _ in 0..BUILDS {
            let b = BuildRow::new_queued(&project, "", "HEAD", "bench");
            handle.store().insert_build(&b, "bench").await.unwrap();
        }
        println!(
            "BENCH queue fill {kind}: {BUILDS} builds inserted one transaction each in {:.2}s",
            fill.elapsed().as_secs_f64()
        );
        let started = Instant::now();
        let mut placed = 0;
        loop {
            let n = handle.schedule_now().await.unwrap().placed;
            placed += n;
            if n == 0 {
                break;
            }
        }
        let store_placed = handle
            .store()
            .count_builds_by_state()
            .await
            .unwrap()
            .get("placed")
            .copied()
            .unwrap_or(0);
        let secs = started.elapsed().as_secs_f64();
        println!(
            "BENCH placements {kind}: {store_placed} of {BUILDS} builds placed on {BOXES} boxes in \
             {secs:.2}s = {:.0}/s ({placed} by the timed passes)",
            store_placed as f64 / secs
        );
        assert_eq!(store_placed as usize, BUILDS);
        drop(boxes);
        handle.shutdown().await;
        db.drop_db().await;
    }
}

/// Dashboard pages with 10,000 builds in the store: each page's time to answer (a signed-in GET
/// on loopback, so all but a little of it is the server's), median and worst of 20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn dashboard_pages_with_10k_builds() {
    const N: usize = 10_000;
    for (kind, db) in dbs("dashboard_pages_with_10k_builds").await {
        let handle = start_with(&db.url, |_| {}).await;
        let token = handle.admin_token().unwrap().to_string();
        api(&handle)
            .await
            .create_project(CreateProjectRequest {
                name: "bench".into(),
                repo_url: "https://git.example/o/bench".into(),
                steps: vec!["true".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        let store = handle.store().clone();
        let p = store.get_project("bench").await.unwrap().unwrap();
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..8 {
            let store = store.clone();
            let p = p.clone();
            tasks.push(tokio::spawn(async move {
                for i in (w..N).step_by(8) {
                    let b =
                        BuildRow::new_queued(&p, &format!("{i:040x}"), "refs/heads/main", "bench");
                    store.insert_build(&b, "bench").await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        println!("{kind}: {N} builds stored in {:?}", t0.elapsed());
        let some = store
            .list_builds(&hive_control_plane::store::BuildFilter {
                limit: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .remove(0);
        for i in 0..200u32 {
            store
                .append_system_log(
                    &some.id,
                    &format!("\x1b[32mline {i}\x1b[0m of the log <b>\n"),
                )
                .await
                .unwrap();
        }
        let addr = handle.http_addr;
        let form = format!("token={token}");
        let r = http(
            addr,
            "POST",
            "/ui/signin",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            form.as_bytes(),
        )
        .await;
        let cookie = r
            .header("set-cookie")
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        for path in [
            "/ui/builds".to_string(),
            "/ui/builds?state=queued".to_string(),
            "/ui/builds?project=bench".to_string(),
            format!("/ui/builds/{}", some.id),
            "/ui/projects/bench".to_string(),
            "/ui/boxes".to_string(),
        ] {
            let mut times = Vec::new();
            for _ in 0..20 {
                let t = Instant::now();
                let r = http(addr, "GET", &path, &[("Cookie", &cookie)], b"").await;
                times.push(t.elapsed());
                assert_eq!(r.status, 200, "{path}");
            }
            times.sort();
            println!(
                "{kind}: GET {path}: median {:?}, worst {:?} ({N} builds in the store)",
                times[times.len() / 2],
                times[times.len() - 1]
            );
            assert!(
                times[times.len() / 2] < Duration::from_millis(100),
                "{kind}: {path} takes {:?}",
                times[times.len() / 2]
            );
        }
        handle.shutdown().await;
        db.drop_db().await;
    }
}
