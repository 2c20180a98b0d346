//! Issue 14, end to end with real processes: the pipeline in the repository (`hive.toml`) and
//! artefacts. A real control plane, a real sandbox box, a real `git daemon` on a test host, and
//! repositories that carry a `hive.toml`: its steps run instead of the project's, a broken one
//! fails the build with the file, line and column in the log, and an artefact a step wrote comes
//! back byte-identical through `hivectl artifacts --get`. Needs root and the Debian build image.
use std::time::Duration;

use hive_proto::v1::{BuildState, CreateProjectRequest};
use hive_tests::cluster::{self, BoxDaemon, BoxOptions, GitHost};
use hive_tests::controlplane::{ControlPlane, ControlPlaneOptions};
use hive_tests::github::{push_payload, WebhookClient};

const SECRET: &str = "pipeline-secret";

/// Separates tests that run at once: names, subnets and addresses carry it.
use hive_tests::run_id;

struct Hive {
    cp: ControlPlane,
    boxd: BoxDaemon,
    git: GitHost,
}

/// A hive for test `slot` (0, 1): its own test-host address, box subnet and names, as nextest
/// runs the tests of this file at once.
async fn hive(slot: u8) -> Hive {
    let tag = format!("pipe{slot}x{}", run_id());
    let git = GitHost::start(&tag, &format!("198.18.{}.{}", 1 + run_id(), 61 + slot));
    let cp = tokio::task::spawn_blocking(|| {
        ControlPlane::start(ControlPlaneOptions {
            lease_secs: 10,
            heartbeat_interval_ms: 500,
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .expect("control plane");
    let url = cp.grpc_url();
    let tag2 = tag.clone();
    let boxd = tokio::task::spawn_blocking(move || {
        BoxDaemon::start(
            &url,
            BoxOptions {
                tag: tag2,
                subnet_octet: (run_id() * 20 + 1 + u32::from(slot)) as u8,
                pool: "small=1".into(),
                lease_secs: 10,
                block: vec![],
                extra: vec![],
            },
        )
    })
    .await
    .unwrap();
    assert!(
        boxd.wait_connected(Duration::from_secs(30)).await,
        "box never connected; box log:\n{}",
        boxd.log()
    );
    assert!(
        boxd.wait_pool("small", 1, Duration::from_secs(60)).await,
        "pool never warm; box log:\n{}",
        boxd.log()
    );
    Hive { cp, boxd, git }
}

impl Hive {
    /// A project on a repository with these files added; pushes it and waits for its build.
    async fn build(
        &self,
        name: &str,
        files: &[(&str, &[u8])],
        steps: &[&str],
    ) -> (hive_proto::v1::Build, String) {
        let (repo_url, head) = self.git.add_repo_with(name, files);
        let mut client = hive_tests::controlplane::api(&self.cp.grpc_url())
            .await
            .unwrap();
        client
            .create_project(CreateProjectRequest {
                name: name.into(),
                repo_url: repo_url.clone(),
                secret: SECRET.into(),
                branch: "main".into(),
                size_class: "small".into(),
                steps: steps.iter().map(|s| s.to_string()).collect(),
                timeout_secs: 120,
                env: [("FROM_PROJECT".to_string(), "project-env".to_string())].into(),
                ..Default::default()
            })
            .await
            .expect("CreateProject");
        let body = push_payload(&repo_url, "refs/heads/main", &head, false);
        let answer = WebhookClient::new()
            .send_signed(
                &self.cp.webhook_url(),
                SECRET,
                "push",
                &uuid::Uuid::new_v4().to_string(),
                body,
            )
            .await
            .expect("webhook");
        assert_eq!(answer.status, 202, "webhook answer: {}", answer.body);
        let id = answer.json()["build_id"].as_str().unwrap().to_string();
        let b = cluster::wait_build(&self.cp.grpc_url(), &id, Duration::from_secs(120)).await;
        let (log, _) = cluster::build_log(&self.cp.grpc_url(), &id).await;
        (b, log)
    }

    fn context(&self) -> String {
        format!(
            "\n--- box log ---\n{}\n--- control plane log ---\n{}",
            tail(&self.boxd.log(), 40),
            tail(&self.cp.log(), 30)
        )
    }

    async fn finish(mut self) {
        assert!(self.boxd.stop(), "hive-box did not exit cleanly");
        self.cp.stop();
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn state(b: &hive_proto::v1::Build) -> BuildState {
    BuildState::try_from(b.state).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repositorys_pipeline_runs_and_a_broken_one_fails_with_its_position() {
    let h = hive(0).await;

    // The repository's steps run instead of the project's, with its env over the project's.
    let (b, log) = h
        .build(
            "piped",
            &[(
                "hive.toml",
                b"# the pipeline\nsteps = [\"echo pipeline-step-one $GREETING $FROM_PROJECT\", \"sh ./build.sh\"]\ntimeout_secs = 60\n\n[env]\nGREETING = \"hello-from-hive-toml\"\n",
            )],
            &["echo the-project-step-ran"],
        )
        .await;
    assert_eq!(
        state(&b),
        BuildState::Succeeded,
        "{b:?}\nlog:\n{log}{}",
        h.context()
    );
    assert!(
        log.contains("pipeline-step-one hello-from-hive-toml project-env"),
        "{log}"
    );
    assert!(log.contains("build line 3"), "{log}");
    assert!(!log.contains("the-project-step-ran"), "{log}");
    assert!(
        log.contains("hive.toml: 2 steps (instead of the project's); env GREETING; timeout 60 s"),
        "{log}"
    );

    // A broken file fails the build before any step, naming the file, line and column.
    let (b, log) = h
        .build(
            "broken",
            &[(
                "hive.toml",
                b"steps = [\"echo never\"]\n[env]\nGOOD = \"x\"\nBAD = 3\n",
            )],
            &["echo the-project-step-ran"],
        )
        .await;
    assert_eq!(
        state(&b),
        BuildState::Failed,
        "{b:?}\nlog:\n{log}{}",
        h.context()
    );
    assert!(log.contains("hive: hive.toml:4:7: "), "{log}");
    assert!(b.message.contains("hive.toml:4:7"), "{b:?}");
    assert!(
        !log.contains("never\n") && !log.contains("the-project-step-ran"),
        "{log}"
    );

    // A timeout above the project's is refused: a pipeline may only lower it.
    let (b, log) = h
        .build(
            "greedy",
            &[("hive.toml", b"steps = [\"echo x\"]\ntimeout_secs = 7200\n")],
            &["echo the-project-step-ran"],
        )
        .await;
    assert_eq!(state(&b), BuildState::Failed, "{b:?}\n{log}");
    assert!(
        log.contains("hive.toml:2:16: timeout_secs 7200 is over the project's 120 s"),
        "{log}"
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_comes_back_byte_identical_through_hivectl() {
    let h = hive(1).await;
    // 700 KiB of bytes from the test (several pieces on every hop), committed to the
    // repository; the step copies it and writes a second file; the build fails afterwards, and
    // its artefacts are still collected.
    let data: Vec<u8> = (0..700 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (b, log) = h
        .build(
            "artful",
            &[
                (
                    "hive.toml",
                    b"steps = [\"mkdir -p out/sub && cp data.bin out/sub/data.bin && seq 1 1000 > out/numbers.txt && : > out/empty && ln -s /etc/passwd out/evil && ln -s ../../README out/up && mkfifo out/fifo && exit 3\"]\nartifacts = [\"out\", \"missing.txt\"]\n",
                ),
                ("data.bin", &data),
            ],
            &["echo the-project-step-ran"],
        )
        .await;
    assert_eq!(
        state(&b),
        BuildState::Failed,
        "{b:?}\nlog:\n{log}{}",
        h.context()
    );
    for line in [
        "hive: artifacts: missing.txt: no such file; left out",
        "hive: artifacts: out/evil: a symlink leading out of the checkout; left out",
        "hive: artifacts: out/up: a symlink leading out of the checkout; left out",
        "hive: artifacts: out/fifo: not a regular file",
        "hive: artifacts: 3 files, ",
    ] {
        assert!(log.contains(line), "{line:?} missing from\n{log}");
    }
    let out =
        h.cp.hivectl(&["artifacts", &b.id, "--json"])
            .expect("hivectl artifacts");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let paths: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        vec!["out/empty", "out/numbers.txt", "out/sub/data.bin"],
        "{list}"
    );
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|a| a["complete"] == true),
        "{list}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.bin");
    let out =
        h.cp.hivectl(&[
            "artifacts",
            &b.id,
            "--get",
            "out/sub/data.bin",
            "-o",
            file.to_str().unwrap(),
        ])
        .expect("hivectl artifacts --get");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = std::fs::read(&file).unwrap();
    assert!(
        got == data,
        "the artifact differs: {} bytes, want {}",
        got.len(),
        data.len()
    );
    let numbers: String = (1..=1000).map(|i| format!("{i}\n")).collect();
    let out =
        h.cp.hivectl(&["artifacts", &b.id, "--get", "out/numbers.txt", "-o", "-"])
            .expect("hivectl artifacts --get -o -");
    assert_eq!(String::from_utf8_lossy(&out.stdout), numbers);
    // A path that is not there, and one that tries to leave the build's directory.
    for (path, want) in [("out/nope", "no artifact"), ("../../hive.db", "..")] {
        let out =
            h.cp.hivectl(&["artifacts", &b.id, "--get", path, "-o", "-"])
                .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{path}: {err}");
    }
    h.finish().await;
}
