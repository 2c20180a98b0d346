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

fn run_id() -> u32 {
    std::process::id() % 12
}

struct Hive {
    cp: ControlPlane,
    boxd: BoxDaemon,
    git: GitHost,
}

async fn hive() -> Hive {
    let tag = format!("pipe{}", run_id());
    let git = GitHost::start(&tag, &format!("198.18.{}.61", 1 + run_id()));
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
                subnet_octet: (run_id() * 20 + 1) as u8,
                pool: "small=1".into(),
                lease_secs: 10,
                block: vec![],
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
    let h = hive().await;

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
    assert!(!log.contains("never\n") && !log.contains("the-project-step-ran"), "{log}");

    // A timeout above the project's is refused: a pipeline may only lower it.
    let (b, log) = h
        .build(
            "greedy",
            &[("hive.toml", b"steps = [\"echo x\"]\ntimeout_secs = 7200\n")],
            &["echo the-project-step-ran"],
        )
        .await;
    assert_eq!(state(&b), BuildState::Failed, "{b:?}\n{log}");
    assert!(log.contains("hive.toml:2:16: timeout_secs 7200 is over the project's 120 s"), "{log}");
    h.finish().await;
}
