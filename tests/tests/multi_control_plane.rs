//! Issue 13, end to end with real processes: three `hive-control-plane`s on one PostgreSQL,
//! two real sandbox `hive-box`es that know all three, signed pushes spread over the three
//! while two of them are killed (`kill -9`) one after the other. Checked: every push that was
//! answered 202 has exactly one build, each ran once (one placement) and succeeded; each box
//! was back on a surviving control plane within seconds; `hivectl logs -f` on a surviving
//! control plane followed a build that the first dead one had placed, to its last line. The
//! figures end in one line: `multi-cp: accepted=N builds=N succeeded=N lost=N duplicated=N
//! overlapping=N failover_ms=[..]`. Needs root, the build image and PostgreSQL
//! (`HIVE_TEST_POSTGRES_URL`; SKIPPED without it).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use hive_proto::v1::{BuildState, CreateProjectRequest, GetBuildRequest, ListBuildsRequest};
use hive_testkit::TestDb;
use hive_tests::cluster::{BoxDaemon, BoxOptions, GitHost};
use hive_tests::controlplane::{hivectl_bin, ControlPlane, ControlPlaneOptions};
use hive_tests::github::{push_payload, WebhookClient};
use sqlx::Connection;

const SECRET: &str = "multi-cp-secret";
/// Pushes sent in all; the first control plane dies after the first third, the second after
/// the second third.
const PUSHES: usize = 18;

/// Separates tests that run at once: names, subnets and addresses carry it.
use hive_tests::run_id;

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

async fn start_cp(opts: ControlPlaneOptions) -> ControlPlane {
    tokio::task::spawn_blocking(move || ControlPlane::start(opts))
        .await
        .unwrap()
        .expect("control plane")
}

/// Waits until the box is connected to a control plane other than `not`; returns which.
async fn wait_moved(b: &BoxDaemon, not: &str, timeout: Duration) -> Option<String> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        let h = b.health().await;
        if h["control_plane_connected"] == true {
            if let Some(cp) = h["control_plane"].as_str() {
                if cp != not {
                    return Some(cp.to_string());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_control_planes_on_one_postgres_lose_nothing_when_two_die() {
    let Some(db) = TestDb::postgres("three_control_planes_on_one_postgres").await else {
        return;
    };
    let run = run_id();
    let tag = format!("mcp{run}");

    // One hive: the first control plane makes the CA and secrets key; the others get copies.
    let opts = ControlPlaneOptions {
        db: Some(db.url.clone()),
        lease_secs: 10,
        heartbeat_interval_ms: 500,
        ..Default::default()
    };
    let cp1 = start_cp(opts.clone()).await;
    let mut cps: Vec<Option<ControlPlane>> = vec![Some(cp1)];
    for _ in 0..2 {
        let first_dir = cps[0].as_ref().unwrap();
        let cp =
            ControlPlane::start_sharing(first_dir, opts.clone()).expect("second control plane");
        cps.push(Some(cp));
    }
    let grpc: Vec<String> = cps.iter().map(|c| c.as_ref().unwrap().grpc_url()).collect();
    let hooks: Vec<String> = cps
        .iter()
        .map(|c| c.as_ref().unwrap().webhook_url())
        .collect();

    // A control plane with another CA on the same database refuses to start.
    {
        let other = tokio::task::spawn_blocking({
            let opts = opts.clone();
            move || ControlPlane::start(opts)
        })
        .await
        .unwrap();
        match other {
            Ok(mut c) => {
                c.crash();
                panic!("a control plane with its own CA started on the hive's database");
            }
            Err(e) => assert!(
                e.to_string().contains("same CA"),
                "refusal does not say why: {e}"
            ),
        }
    }

    let git = GitHost::start(&tag, &format!("198.18.{}.50", 1 + run));
    let repo = git.add_repo("multi");
    let mut api = hive_tests::controlplane::api(&grpc[0]).await.unwrap();
    api.create_project(CreateProjectRequest {
        name: "multi".into(),
        repo_url: repo,
        secret: SECRET.into(),
        branch: "main".into(),
        size_class: "small".into(),
        steps: vec!["echo start; sleep 2; echo done-$HIVE_BUILD_ID".into()],
        timeout_secs: 120,
        ..Default::default()
    })
    .await
    .expect("CreateProject");

    // Box A knows cp1 first, box B cp2 first: each starts on its own control plane.
    let lists = [
        format!("{},{},{}", grpc[0], grpc[1], grpc[2]),
        format!("{},{},{}", grpc[1], grpc[2], grpc[0]),
    ];
    let mut boxes = Vec::new();
    for (i, list) in lists.iter().enumerate() {
        let list = list.clone();
        let opts = BoxOptions {
            tag: format!("{tag}{}", ["a", "b"][i]),
            subnet_octet: (run * 20 + 5 + i as u32) as u8,
            pool: "small=2".into(),
            lease_secs: 10,
            block: vec![],
            extra: vec![],
        };
        let b = tokio::task::spawn_blocking(move || BoxDaemon::start(&list, opts))
            .await
            .unwrap();
        boxes.push(b);
    }
    let box_urls: Vec<String> = lists
        .iter()
        .map(|l| hive_tests::controlplane::box_endpoint(l).0)
        .collect();
    for b in &boxes {
        assert!(
            b.wait_connected(Duration::from_secs(30)).await,
            "box never connected:\n{}",
            tail(&b.log(), 40)
        );
        assert!(
            b.wait_pool("small", 2, Duration::from_secs(60)).await,
            "pool never warm:\n{}",
            tail(&b.log(), 40)
        );
    }
    let first_cp_of = |i: usize| box_urls[i].split(',').next().unwrap().to_string();
    assert_eq!(
        boxes[0].health().await["control_plane"].as_str(),
        Some(first_cp_of(0).as_str())
    );

    let client = WebhookClient::new();
    let mut accepted: BTreeSet<String> = BTreeSet::new();
    let mut refused = 0usize;
    let mut alive = [true, true, true];
    let mut failover_ms: Vec<u128> = Vec::new();
    let mut follower: Option<(String, std::thread::JoinHandle<std::process::Output>)> = None;
    for i in 0..PUSHES {
        if i == PUSHES / 3 {
            // A build box A (on cp1) runs now: follow it from cp3, then kill cp1.
            let t0 = Instant::now();
            let on_a = loop {
                let builds = api
                    .list_builds(ListBuildsRequest {
                        limit: 100,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .builds;
                if let Some(b) = builds.iter().find(|b| {
                    b.state == BuildState::Running as i32 && b.box_id == format!("box-{tag}a")
                }) {
                    break b.id.clone();
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "no build ran on box A; builds: {builds:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let addr = grpc[2].clone();
            let token = cps[0].as_ref().unwrap().admin_token().unwrap();
            let id = on_a.clone();
            let h = std::thread::spawn(move || {
                std::process::Command::new(hivectl_bin())
                    .args(["logs", "-f", &id])
                    .env("HIVE_ADDR", addr)
                    .env("HIVE_TOKEN", token)
                    .output()
                    .expect("hivectl logs -f")
            });
            follower = Some((on_a, h));
            tokio::time::sleep(Duration::from_millis(300)).await;
            let t = Instant::now();
            cps[0].as_mut().unwrap().crash();
            alive[0] = false;
            let moved = wait_moved(&boxes[0], &first_cp_of(0), Duration::from_secs(20)).await;
            assert!(
                moved.is_some(),
                "box A did not fail over:\n{}",
                tail(&boxes[0].log(), 40)
            );
            failover_ms.push(t.elapsed().as_millis());
        }
        if i == 2 * PUSHES / 3 {
            let t = Instant::now();
            cps[1].as_mut().unwrap().crash();
            alive[1] = false;
            let mut last = 0;
            for b in &boxes {
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(20) {
                    let h = b.health().await;
                    let on = h["control_plane"].as_str().unwrap_or_default().to_string();
                    if h["control_plane_connected"] == true
                        && !on.is_empty()
                        && box_urls[0].split(',').nth(2) == Some(on.as_str())
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                last = last.max(t.elapsed().as_millis());
            }
            failover_ms.push(last);
        }
        // Spread over the live control planes.
        let live: Vec<usize> = (0..3).filter(|&k| alive[k]).collect();
        let to = live[i % live.len()];
        let body = push_payload(
            &format!("git://{}/multi.git", git.addr),
            "refs/heads/main",
            &git.head,
            false,
        );
        let delivery = uuid::Uuid::new_v4().to_string();
        match client
            .send_signed(&hooks[to], SECRET, "push", &delivery, body)
            .await
        {
            Ok(a) if a.status == 202 => {
                accepted.insert(
                    a.json()["build_id"]
                        .as_str()
                        .expect("build id in a 202")
                        .to_string(),
                );
            }
            Ok(a) => panic!(
                "push to control plane {to} answered {}: {}",
                a.status, a.body
            ),
            Err(_) => refused += 1,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every accepted push ends, as seen from the survivor.
    let mut survivor = hive_tests::controlplane::api(&grpc[2]).await.unwrap();
    let mut states: BTreeMap<String, i32> = BTreeMap::new();
    for id in &accepted {
        let t0 = Instant::now();
        loop {
            let b = survivor
                .get_build(GetBuildRequest { id: id.clone() })
                .await
                .unwrap_or_else(|s| panic!("build {id} unknown to the survivor: {s}"))
                .into_inner();
            if BuildState::try_from(b.state).is_ok_and(|s| s.is_terminal()) {
                states.insert(id.clone(), b.state);
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "build {id} not ended: {b:?}\nbox A:\n{}\nbox B:\n{}\ncp3:\n{}",
                tail(&boxes[0].log(), 30),
                tail(&boxes[1].log(), 30),
                tail(&cps[2].as_ref().unwrap().log(), 30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The follower on cp3 saw the build that cp1 placed to its end.
    let (followed, h) = follower.expect("a followed build");
    let out = tokio::task::spawn_blocking(move || h.join().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&format!("done-{followed}")),
        "hivectl logs -f on a survivor did not follow {followed} to its end (exit {:?}):\n{text}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );

    // From the database: builds of the project, and how often each was placed.
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let all: Vec<(String, String)> = sqlx::query_as("SELECT id, state FROM builds")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let placements: Vec<(String, i64)> = sqlx::query_as(
        "SELECT build_id, COUNT(*) FROM build_transitions WHERE state = 'placed' GROUP BY build_id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let _ = conn.close().await;
    let stored: BTreeSet<String> = all.iter().map(|(id, _)| id.clone()).collect();
    let lost = accepted.difference(&stored).count();
    let duplicated = stored.difference(&accepted).count();
    let overlapping = placements.iter().filter(|(_, n)| *n > 1).count();
    let succeeded = all.iter().filter(|(_, s)| s == "succeeded").count();
    println!(
        "multi-cp: accepted={} refused={refused} builds={} succeeded={succeeded} lost={lost} \
         duplicated={duplicated} overlapping={overlapping} failover_ms={failover_ms:?}",
        accepted.len(),
        stored.len()
    );
    assert_eq!(
        refused, 0,
        "a push to a live control plane was not answered"
    );
    assert_eq!(accepted.len(), PUSHES);
    assert_eq!((lost, duplicated, overlapping), (0, 0, 0));
    assert_eq!(
        succeeded,
        accepted.len(),
        "not every build succeeded: {states:?}"
    );
    assert!(
        failover_ms.iter().all(|&ms| ms < 10_000),
        "a box took over 10 s to fail over: {failover_ms:?}"
    );

    for b in &mut boxes {
        assert!(b.stop(), "hive-box did not exit cleanly");
    }
    if let Some(c) = cps[2].as_mut() {
        c.stop();
    }
}
