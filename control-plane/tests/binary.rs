//! The `hive-control-plane` binary itself: starts with no set-up (SQLite file created in the
//! data dir), writes the ready file, serves, rejects bad configuration with a clear message,
//! and on SIGTERM ends open streams and exits 0.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hive_proto::v1::{CreateProjectRequest, SubmitBuildRequest, WatchBuildRequest};

const BIN: &str = env!("CARGO_BIN_EXE_hive-control-plane");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready.json");
    let data = dir.path().join("data");
    let mut child = Command::new(BIN)
        .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--ready-file")
        .arg(&ready)
        .env("HIVE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hive-control-plane");
    let t0 = Instant::now();
    let addrs: serde_json::Value = loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            break serde_json::from_str(&text).expect("ready file is JSON");
        }
        assert!(child.try_wait().unwrap().is_none(), "exited before ready");
        assert!(t0.elapsed() < Duration::from_secs(30), "not ready in 30s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        data.join("hive.db").exists(),
        "SQLite file created on first start"
    );
    let http: std::net::SocketAddr = addrs["http"].as_str().unwrap().parse().unwrap();
    let grpc = addrs["grpc"].as_str().unwrap().to_string();
    let h = common::http(http, "GET", "/healthz", &[], b"").await;
    assert_eq!(h.status, 200, "{}", h.body);

    // The first start wrote an admin token, readable by its owner only.
    let token_file = data.join("admin.token");
    let token = std::fs::read_to_string(&token_file).expect("admin.token written on first start");
    let token = token.trim().to_string();
    assert!(token.starts_with("hvt_"), "{token}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "admin.token mode {mode:o}");
    }

    // An open WatchBuild stream must not hold shutdown up.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = hive_proto::v1::control_plane_client::ControlPlaneClient::with_interceptor(
        channel,
        hive_proto::auth::Bearer::new(&token).unwrap(),
    );
    client
        .create_project(CreateProjectRequest {
            name: "p".into(),
            repo_url: "git://h/p".into(),
            steps: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let b = client
        .submit_build(SubmitBuildRequest {
            project: "p".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut watch = client
        .watch_build(WatchBuildRequest { id: b.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(watch.message().await.unwrap().is_some());

    let stopped = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "still running 10s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("database closed"), "{log}");
    // It says where the admin token is, and never shows it.
    assert!(log.contains("wrote an admin token"), "{log}");
    assert!(log.contains("admin.token"), "{log}");
    assert!(!log.contains(&token), "the log shows the admin token");
    // The stream ended rather than hanging.
    let end = tokio::time::timeout(Duration::from_secs(5), watch.message()).await;
    assert!(end.is_ok(), "watch stream still open after shutdown");

    // The build survives a restart.
    let store =
        hive_control_plane::store::Store::open(&format!("sqlite://{}/hive.db", data.display()))
            .await
            .unwrap();
    assert!(store.get_build(&b.id).await.unwrap().is_some());
    store.close().await;
}

#[test]
fn bad_configuration_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run(&["--db", "mysql://x/y", "--http-addr", "127.0.0.1:0"]);
    assert!(
        e.contains("\"mysql://x/y\" is neither sqlite:// nor postgres://"),
        "{e}"
    );
    let e = run(&["--lease-secs", "0"]);
    assert!(e.contains("lease 0ns is shorter than 500ms"), "{e}");
    let e = run(&["--http-addr", "nonsense"]);
    assert!(
        e.contains("invalid value 'nonsense' for '--http-addr"),
        "{e}"
    );
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--http-addr",
        "--grpc-addr",
        "--data-dir",
        "--db",
        "--lease-secs",
        "--ready-file",
        "HIVE_DB",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}
