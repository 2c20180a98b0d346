//! One build, start to end: container up, clone (phase 0, SYSTEM stream), each step in order,
//! container down, BUILD_FINISHED. Timeout and cancel stop the running step with SIGTERM to its
//! process group, then SIGKILL after the grace period.

use crate::config::Config;
use crate::container::{pipe_reader, Container, ContainerSpec};
use crate::log::EventLog;
use crate::reaper::{Exit, Reaper};
use crate::source::Source;
use hive_proto::v1::{BuildState, LogStream};
use hive_sys::error_chain;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// A cancel request: the terminal state (cancelled or timed_out) and why.
pub type CancelRequest = Option<(BuildState, String)>;

/// A validated build request.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    pub id: String,
    pub source: Source,
    pub steps: Vec<String>,
    /// The whole environment of every step, in order (later entries win).
    pub env: Vec<(String, String)>,
    /// Secret values (also in `env`): masked in the output (`crate::mask`).
    pub secrets: Vec<String>,
    /// The names of the project's secrets (a pipeline may not set them).
    pub secret_names: Vec<String>,
    pub timeout: Duration,
    /// Most bytes of artefacts collected (0: none).
    pub artifact_cap: u64,
}

/// A container being set up ahead of the build (see [`prepare`]).
pub type Prepared = tokio::task::JoinHandle<Result<Container, crate::container::ContainerError>>;

/// The cell's container: the same for every build, so it can be made before one arrives.
pub fn container_spec(cfg: &Config) -> ContainerSpec {
    ContainerSpec {
        image: cfg.build_image.clone(),
        dir: cfg.work_dir.join("container"),
        hostname: cfg.cell_id.clone(),
        uid: cfg.build_uid,
        gid: cfg.build_gid,
        net: cfg.container_net,
    }
}

/// Where the ahead-of-time container set-up is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrepStatus {
    Pending,
    Ready,
    Failed,
}

/// Starts setting up the build container now, so RunBuild only has to exec the first command:
/// a cell waits in the warm pool with its container (overlay, namespaces, network) ready.
/// The container's network namespace is in `.2` once it is Ready (when it has its own).
pub fn prepare(
    cfg: &Config,
    reaper: Arc<Reaper>,
) -> (
    Prepared,
    watch::Receiver<PrepStatus>,
    Arc<std::sync::OnceLock<std::path::PathBuf>>,
) {
    let spec = container_spec(cfg);
    let (tx, rx) = watch::channel(PrepStatus::Pending);
    let netns = Arc::new(std::sync::OnceLock::new());
    let netns_out = netns.clone();
    let task = tokio::spawn(async move {
        let t0 = Instant::now();
        let r = Container::start(spec, reaper).await;
        match &r {
            Ok(c) => {
                tracing::info!(
                    ms = t0.elapsed().as_millis() as u64,
                    "build container ready"
                );
                if let Some(p) = c.netns_path() {
                    let _ = netns.set(p);
                }
                tx.send_replace(PrepStatus::Ready);
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(e), "build container set-up failed");
                tx.send_replace(PrepStatus::Failed);
            }
        }
        r
    });
    (task, rx, netns_out)
}

/// How a step (or the clone) ended.
enum StepEnd {
    Exited(Exit),
    /// Stopped by timeout or cancel: the state, the message, the exit status it died with.
    Stopped(BuildState, String, Exit),
    /// Could not be started at all.
    NotStarted(String),
}

/// Runs the build and closes `log` with its BUILD_FINISHED event.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    cfg: Arc<Config>,
    reaper: Arc<Reaper>,
    spec: BuildSpec,
    log: Arc<EventLog>,
    cancel: watch::Receiver<CancelRequest>,
    prepared: Option<Prepared>,
    tunnel: Option<crate::privnet::Plan>,
    tunnels_gone: Option<tokio::task::JoinHandle<()>>,
    held: Arc<crate::artifacts::Held>,
) {
    let started = Instant::now();
    let ((state, code, message), files) = run_inner(
        &cfg,
        reaper,
        &spec,
        &log,
        cancel,
        prepared,
        tunnel,
        tunnels_gone,
    )
    .await;
    // Held before BUILD_FINISHED announces them: the box reads them once it sees that event.
    held.set(files);
    tracing::info!(
        build = %spec.id,
        state = state.short_name(),
        exit_code = code,
        ms = started.elapsed().as_millis() as u64,
        "build finished"
    );
    log.finish_with(state, code, message, held.list());
}

/// How the build ended (state, exit code, message).
type Ended = (BuildState, i32, String);

#[allow(clippy::too_many_arguments)]
async fn run_inner(
    cfg: &Config,
    reaper: Arc<Reaper>,
    spec: &BuildSpec,
    log: &EventLog,
    cancel: watch::Receiver<CancelRequest>,
    prepared: Option<Prepared>,
    tunnel: Option<crate::privnet::Plan>,
    tunnels_gone: Option<tokio::task::JoinHandle<()>>,
) -> (Ended, Vec<crate::artifacts::Collected>) {
    log.system(
        0,
        format!("hive: build {} in cell {}", spec.id, cfg.cell_id),
    );
    let started = match prepared {
        Some(h) => h.await.unwrap_or_else(|e| {
            Err(crate::container::ContainerError::Setup(format!(
                "set-up task failed: {e}"
            )))
        }),
        None => Container::start(container_spec(cfg), reaper.clone()).await,
    };
    let container = match started {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("container set-up failed: {}", error_chain(&e));
            log.system(0, format!("hive: {msg}"));
            return ((BuildState::Failed, -1, msg), Vec::new());
        }
    };
    // A build without public egress loses its way out before anything of it runs; the cell
    // keeps only the UDP flow to its connector.
    match crate::privnet::egress_policy(&spec.env) {
        Ok(crate::privnet::Egress::Public) => {}
        Ok(crate::privnet::Egress::None) => {
            let endpoint = tunnel.as_ref().map(|p| p.endpoint);
            if let Err(e) = container.deny_public_egress(endpoint).await {
                let msg = format!("no-egress firewall failed: {}", error_chain(&e));
                log.system(0, format!("hive: {msg}"));
                container.destroy().await;
                return ((BuildState::Failed, -1, msg), Vec::new());
            }
            log.system(
                0,
                match endpoint {
                    Some(ep) => format!(
                        "hive: no public egress: the build reaches only its private network \
                         (the cell sends only to the connector at {ep}/udp)"
                    ),
                    None => "hive: no public egress: the build reaches nothing outside".into(),
                },
            );
        }
        Err(msg) => {
            log.system(0, format!("hive: {msg}"));
            container.destroy().await;
            return ((BuildState::Failed, -1, msg), Vec::new());
        }
    }
    // The private network comes up before the clone: the repository may live there.
    let tunnel = match tunnel {
        None => None,
        Some(plan) => {
            let net = plan.network.clone();
            log.system(
                0,
                format!(
                    "hive: private network {net}: tunnel {} -> {} ({})",
                    plan.address,
                    plan.endpoint_text,
                    plan.keys.public()
                ),
            );
            let netns = container.netns_path();
            let up = tokio::task::spawn_blocking(move || plan.bring_up(netns))
                .await
                .unwrap_or_else(|e| Err(format!("private network {net}: tunnel task: {e}")));
            match up {
                Ok((t, took)) => {
                    log.system(
                        0,
                        format!(
                            "hive: private network {net}: tunnel up ({} WireGuard), first \
                             handshake after {} ms (interface {} ms, handshake {} ms, {} re-arms){}",
                            match t.backend() {
                                hive_wg::tunnel::Backend::Kernel => "kernel",
                                hive_wg::tunnel::Backend::Userspace => "userspace",
                            },
                            took.total().as_millis(),
                            took.setup.as_millis(),
                            took.handshake.as_millis(),
                            took.rearms,
                            match took.early {
                                Some(e) => format!(
                                    "; interface made {} in {} ms, {} ms of it waited for",
                                    e.when,
                                    e.made.as_millis(),
                                    e.waited.as_millis()
                                ),
                                None => String::new(),
                            }
                        ),
                    );
                    Some(t)
                }
                Err(msg) => {
                    log.system(0, format!("hive: {msg}"));
                    container.destroy().await;
                    return ((BuildState::Failed, -1, msg), Vec::new());
                }
            }
        }
    };
    let mut runner = Runner {
        cfg,
        reaper,
        container: &container,
        log,
        spec,
        cancel,
        started: Instant::now(),
        deadline: Instant::now() + spec.timeout,
        timeout: spec.timeout,
        steps: spec.steps.clone(),
        env: spec.env.clone(),
        artifacts: Vec::new(),
        capture_clone: false,
        clone_output: std::sync::Mutex::new(Vec::new()),
        tunnels_gone,
    };
    let result = runner.steps().await;
    let patterns = std::mem::take(&mut runner.artifacts);
    let last_step = runner.steps.len() as u32;
    drop(runner);
    if let Some(t) = tunnel {
        // Removes the interface and wipes the private key; the control plane revokes the peer.
        match tokio::task::spawn_blocking(move || t.down()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "tunnel down failed"),
            Err(e) => tracing::warn!(error = %e, "tunnel down task failed"),
        }
    }
    let mut container = container;
    let files = if patterns.is_empty() {
        Vec::new()
    } else if !matches!(result.0, BuildState::Succeeded | BuildState::Failed) {
        log.system(
            last_step,
            format!(
                "hive: no artifacts collected: the build was {}",
                result.0.short_name()
            ),
        );
        Vec::new()
    } else {
        // Nothing of the build runs any more while its files are measured and opened.
        container.kill().await;
        collect_artifacts(cfg, spec, log, &container, &patterns, last_step)
    };
    container.destroy().await;
    (result, files)
}

/// Finds the artefacts after the steps (succeeded or failed) and says in the log what was
/// taken and what was left out.
fn collect_artifacts(
    cfg: &Config,
    spec: &BuildSpec,
    log: &EventLog,
    container: &Container,
    patterns: &[String],
    step: u32,
) -> Vec<crate::artifacts::Collected> {
    if spec.artifact_cap == 0 {
        log.system(
            step,
            "hive: no artifacts collected: the control plane takes none (--artifact-cap-mib 0)",
        );
        return Vec::new();
    }
    let dir = match crate::pipeline::open_checkout(container.rootfs()) {
        Ok(d) => d,
        Err(e) => {
            log.system(
                step,
                format!("hive: no artifacts collected: open the checkout: {e}"),
            );
            return Vec::new();
        }
    };
    let out = crate::artifacts::collect(
        &dir,
        patterns,
        &crate::artifacts::Limits {
            cap_bytes: spec.artifact_cap,
            owner: cfg.build_uid,
        },
    );
    for n in &out.notes {
        log.system(step, format!("hive: artifacts: {n}"));
    }
    let total: u64 = out.files.iter().map(|f| f.size).sum();
    log.system(
        step,
        format!(
            "hive: artifacts: {} file{}, {total} bytes{}{}",
            out.files.len(),
            if out.files.len() == 1 { "" } else { "s" },
            if out.files.is_empty() { "" } else { ": " },
            out.files
                .iter()
                .take(20)
                .map(|f| format!("{} ({} bytes)", f.path, f.size))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    out.files
}

struct Runner<'a> {
    cfg: &'a Config,
    reaper: Arc<Reaper>,
    container: &'a Container,
    log: &'a EventLog,
    spec: &'a BuildSpec,
    cancel: watch::Receiver<CancelRequest>,
    started: Instant,
    deadline: Instant,
    /// The build's timeout: the project's, or the pipeline's lower one.
    timeout: Duration,
    /// The steps and their environment: the project's, or as `hive.toml` sets them.
    steps: Vec<String>,
    env: Vec<(String, String)>,
    /// The artefact paths `hive.toml` names.
    artifacts: Vec<String>,
    /// While the clone runs: keep its output to explain a failure.
    capture_clone: bool,
    clone_output: std::sync::Mutex<Vec<u8>>,
    /// Removing tunnel interfaces a build without a tunnel must not see (the warm cell's
    /// stand-by `hwg0`): awaited before the first step, while the clone runs meanwhile.
    tunnels_gone: Option<tokio::task::JoinHandle<()>>,
}

impl Runner<'_> {
    async fn steps(&mut self) -> (BuildState, i32, String) {
        let source = &self.spec.source;
        if source.is_empty() {
            self.log.system(
                0,
                "hive: no repository given; starting in an empty /work/src",
            );
        } else {
            self.log.step_started(0, "clone");
            self.log
                .system(0, format!("hive: cloning {}", source.describe()));
            match self.clone_source().await {
                StepEnd::Exited(Exit::Code(0)) => {
                    self.log.step_finished(0, 0, String::new());
                }
                StepEnd::Exited(exit) => {
                    let output = std::mem::take(
                        &mut *self.clone_output.lock().unwrap_or_else(|p| p.into_inner()),
                    );
                    if let Some(hint) = source.failure_hint(&String::from_utf8_lossy(&output)) {
                        self.log.system(0, hint);
                    }
                    let msg = format!("clone of {} failed ({exit})", source.describe());
                    self.log.step_finished(0, exit.code(), msg.clone());
                    return (BuildState::Failed, exit.code(), msg);
                }
                StepEnd::Stopped(state, msg, exit) => {
                    self.log.step_finished(0, exit.code(), msg.clone());
                    return (state, exit.code(), msg);
                }
                StepEnd::NotStarted(msg) => return (BuildState::Failed, -1, msg),
            }
            if let Err(msg) = self.apply_pipeline() {
                return (BuildState::Failed, -1, msg);
            }
        }
        if let Some(gone) = self.tunnels_gone.take() {
            let _ = gone.await;
        }
        let steps = self.steps.clone();
        for (i, step) in steps.iter().enumerate() {
            let n = i as u32 + 1;
            if let Some((state, reason)) = self.cancel.borrow().clone() {
                return (state, -1, format!("{reason} (before step {n})"));
            }
            if Instant::now() >= self.deadline {
                return (BuildState::TimedOut, -1, self.timeout_message(n, step));
            }
            self.log.step_started(n, step);
            self.log.system(n, format!("$ {step}"));
            let argv = vec!["/bin/sh".into(), "-c".into(), step.clone()];
            match self.run_step(n, argv, false).await {
                StepEnd::Exited(Exit::Code(0)) => {
                    self.log.step_finished(n, 0, String::new());
                }
                StepEnd::Exited(exit) => {
                    let msg = match exit {
                        Exit::Code(c) => format!("step {n} `{step}` exited with {c}"),
                        Exit::Signal(s) => format!("step {n} `{step}` was killed by signal {s}"),
                    };
                    self.log.step_finished(n, exit.code(), msg.clone());
                    self.log.system(n, format!("hive: {msg}"));
                    return (BuildState::Failed, exit.code(), msg);
                }
                StepEnd::Stopped(state, msg, exit) => {
                    self.log.step_finished(n, exit.code(), msg.clone());
                    self.log.system(n, format!("hive: {msg}"));
                    return (state, exit.code(), msg);
                }
                StepEnd::NotStarted(msg) => return (BuildState::Failed, -1, msg),
            }
        }
        let n = self.steps.len();
        (
            BuildState::Succeeded,
            0,
            format!("{n} step{} succeeded", if n == 1 { "" } else { "s" }),
        )
    }

    /// The clone: the private repository's key and known hosts written for it (0600, the build
    /// user's) and deleted as soon as it ends, before any step can run; its environment adds
    /// only what reaches the repository (`Source::clone_env`).
    async fn clone_source(&mut self) -> StepEnd {
        let source = &self.spec.source;
        let files = source.auth_files();
        let dir = self
            .container
            .rootfs()
            .join(crate::source::AUTH_DIR.trim_start_matches('/'));
        if !files.is_empty() {
            if let Err(e) = write_auth_files(&dir, &files, self.cfg.build_uid, self.cfg.build_gid) {
                let _ = std::fs::remove_dir_all(&dir);
                let msg = format!("could not write the clone's ssh files: {e}");
                self.log.system(0, format!("hive: {msg}"));
                return StepEnd::NotStarted(msg);
            }
            let hosts = source
                .auth
                .known_hosts
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
                .count();
            self.log.system(
                0,
                format!(
                    "hive: ssh to {}: {}, {hosts} trusted host key{} (StrictHostKeyChecking=yes)",
                    source.host(),
                    if source.auth.ssh_private_key.is_empty() {
                        "no deploy key"
                    } else {
                        "the project's deploy key"
                    },
                    if hosts == 1 { "" } else { "s" },
                ),
            );
        } else if source.transport() == crate::source::Transport::Https
            && !source.auth.https_token.is_empty()
        {
            self.log
                .system(0, "hive: https: the project's token, sent as a header");
        }
        let mut env = self.spec.env.clone();
        for (k, v) in source.clone_env() {
            env.retain(|(ek, _)| ek != &k);
            env.push((k, v));
        }
        self.capture_clone = true;
        let end = self.run_step_env(0, source.clone_argv(), true, &env).await;
        self.capture_clone = false;
        if !files.is_empty() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                // No step may run while the key could still be there.
                let msg = format!(
                    "could not delete the clone's ssh files {}: {e}; the build is stopped",
                    dir.display()
                );
                self.log.system(0, format!("hive: {msg}"));
                return StepEnd::NotStarted(msg);
            }
        }
        end
    }

    /// Reads `hive.toml` from the checkout and, when there is one, takes its steps, env and
    /// timeout. A bad file fails the build: the message names the file, line and column.
    fn apply_pipeline(&mut self) -> Result<(), String> {
        let limits = crate::pipeline::Limits {
            project_timeout_secs: self.spec.timeout.as_secs(),
            reserved_env: self.spec.secret_names.clone(),
        };
        let text = crate::pipeline::open_checkout(self.container.rootfs())
            .map_err(|e| crate::pipeline::PipelineError {
                file: crate::pipeline::FILE_NAME.into(),
                line: 1,
                column: 1,
                message: format!("open the checkout: {e}"),
                excerpt: String::new(),
            })
            .and_then(|dir| crate::pipeline::read(&dir, self.cfg.build_uid))
            .and_then(|text| match text {
                None => Ok(None),
                Some(t) => crate::pipeline::parse(&t, &limits).map(Some),
            });
        let p = match text {
            Ok(None) => {
                self.log.system(
                    0,
                    format!(
                        "hive: no {} in the repository: the project's steps",
                        crate::pipeline::FILE_NAME
                    ),
                );
                return Ok(());
            }
            Ok(Some(p)) => p,
            Err(e) => {
                self.log.system(0, e.log_text());
                return Err(format!("bad pipeline file {e}"));
            }
        };
        let mut said = Vec::new();
        if let Some(steps) = p.steps {
            said.push(format!(
                "{} step{} (instead of the project's)",
                steps.len(),
                if steps.len() == 1 { "" } else { "s" }
            ));
            self.steps = steps;
        }
        if !p.env.is_empty() {
            let names: Vec<&str> = p.env.iter().map(|(k, _)| k.as_str()).collect();
            said.push(format!("env {}", names.join(", ")));
            for (k, v) in p.env {
                self.env.retain(|(ek, _)| ek != &k);
                self.env.push((k, v));
            }
        }
        if let Some(t) = p.timeout_secs {
            said.push(format!("timeout {t} s"));
            self.timeout = Duration::from_secs(u64::from(t));
            self.deadline = self.deadline.min(self.started + self.timeout);
        }
        if !p.artifacts.is_empty() {
            said.push(format!("artifacts {}", p.artifacts.join(", ")));
            self.artifacts = p.artifacts;
        }
        self.log.system(
            0,
            format!(
                "hive: {}: {}",
                crate::pipeline::FILE_NAME,
                if said.is_empty() {
                    "sets nothing; the project's steps".to_string()
                } else {
                    said.join("; ")
                }
            ),
        );
        Ok(())
    }

    fn timeout_message(&self, n: u32, step: &str) -> String {
        let what = if n == 0 {
            "the clone".to_string()
        } else {
            format!("step {n} `{step}`")
        };
        format!(
            "build timed out after {} s (during {what})",
            self.timeout.as_secs()
        )
    }

    /// Runs one command in the container, streaming its output into the log.
    async fn run_step(&mut self, n: u32, argv: Vec<String>, system: bool) -> StepEnd {
        let env = self.env.clone();
        self.run_step_env(n, argv, system, &env).await
    }

    /// As [`Runner::run_step`], with this environment.
    async fn run_step_env(
        &mut self,
        n: u32,
        argv: Vec<String>,
        system: bool,
        env: &[(String, String)],
    ) -> StepEnd {
        let mut cmd = self.container.command(&argv, env, "/work/src", true);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (mut child, mut exited) = match self.reaper.spawn(&mut cmd) {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("could not start step {n}: {e}");
                self.log.system(n, format!("hive: {msg}"));
                return StepEnd::NotStarted(msg);
            }
        };
        let pgid = Pid::from_raw(child.id() as i32);
        let (out_stream, err_stream) = if system {
            (LogStream::System, LogStream::System)
        } else {
            (LogStream::Stdout, LogStream::Stderr)
        };
        let mut pumps = Vec::new();
        for (pipe, stream) in [
            (pipe_reader(child.stdout.take()), out_stream),
            (pipe_reader(child.stderr.take()), err_stream),
        ] {
            match pipe {
                Ok(p) => pumps.push(pump(
                    p,
                    n,
                    stream,
                    self.log,
                    &self.spec.secrets,
                    self.capture_clone.then_some(&self.clone_output),
                )),
                Err(e) => tracing::warn!(error = %e, "step output pipe"),
            }
        }
        let step_text = argv.last().cloned().unwrap_or_default();
        let timeout_msg = self.timeout_message(n, if n == 0 { "" } else { &step_text });
        let grace = self.cfg.kill_grace_ms;
        let deadline = self.deadline;
        let cancel = &mut self.cancel;
        let waiting = async {
            tokio::select! {
                r = &mut exited => StepEnd::Exited(r.unwrap_or(Exit::Signal(9))),
                _ = tokio::time::sleep_until(deadline) => {
                    let exit = terminate(pgid, &mut exited, grace).await;
                    StepEnd::Stopped(BuildState::TimedOut, timeout_msg, exit)
                }
                (state, reason) = wait_cancel(cancel) => {
                    let exit = terminate(pgid, &mut exited, grace).await;
                    StepEnd::Stopped(state, reason, exit)
                }
            }
        };
        // Output is read while we wait; the step's end is reported only after its output is
        // in the log (or after a short drain if a background child still holds the pipe).
        let pumping = futures::future::join_all(pumps);
        tokio::pin!(pumping);
        let mut end = None;
        tokio::pin!(waiting);
        let mut pumped = false;
        loop {
            tokio::select! {
                e = &mut waiting, if end.is_none() => end = Some(e),
                _ = &mut pumping, if !pumped => pumped = true,
            }
            if end.is_some() {
                if !pumped {
                    let _ = tokio::time::timeout(Duration::from_millis(500), &mut pumping).await;
                }
                break;
            }
        }
        end.unwrap_or(StepEnd::Exited(Exit::Signal(9)))
    }
}

/// Copies a pipe into the log in chunks as they arrive.
async fn pump(
    mut pipe: tokio::net::unix::pipe::Receiver,
    step: u32,
    stream: LogStream,
    log: &EventLog,
    secrets: &[String],
    keep: Option<&std::sync::Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut masker = crate::mask::Masker::new(secrets);
    let out_chunk = |out: Vec<u8>| {
        if let Some(k) = keep {
            let mut k = k.lock().unwrap_or_else(|p| p.into_inner());
            let room = CLONE_OUTPUT_KEPT.saturating_sub(k.len());
            k.extend_from_slice(&out[..out.len().min(room)]);
        }
        log.log(step, stream, out);
    };
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let out = masker.feed(&buf[..n]);
                if !out.is_empty() {
                    out_chunk(out);
                }
            }
        }
    }
    let rest = masker.finish();
    if !rest.is_empty() {
        out_chunk(rest);
    }
}

/// How much of the clone's (masked) output is kept to explain a failure.
const CLONE_OUTPUT_KEPT: usize = 16 * 1024;

/// Writes the clone's ssh files: a fresh directory (0700) and files (0600), all the build
/// user's, created new (a file already there is an error, not something to follow).
fn write_auth_files(
    dir: &std::path::Path,
    files: &[crate::source::AuthFile],
    uid: u32,
    gid: u32,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(parent) = dir.parent() {
        if parent.symlink_metadata()?.file_type().is_symlink() {
            return Err(std::io::Error::other(format!(
                "{} is a symlink",
                parent.display()
            )));
        }
    }
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    for f in files {
        let path = dir.join(f.name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        file.write_all(f.contents.as_bytes())?;
    }
    Ok(())
}

async fn wait_cancel(rx: &mut watch::Receiver<CancelRequest>) -> (BuildState, String) {
    loop {
        if let Some(req) = rx.borrow_and_update().clone() {
            return req;
        }
        if rx.changed().await.is_err() {
            // The agent is gone; nobody can cancel any more.
            std::future::pending::<()>().await;
        }
    }
}

/// SIGTERM to the step's process group, SIGKILL after the grace period.
async fn terminate(pgid: Pid, exited: &mut oneshot::Receiver<Exit>, grace_ms: u64) -> Exit {
    let _ = killpg(pgid, Signal::SIGTERM);
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(grace_ms), &mut *exited).await {
        return r.unwrap_or(Exit::Signal(9));
    }
    let _ = killpg(pgid, Signal::SIGKILL);
    match tokio::time::timeout(Duration::from_secs(5), exited).await {
        Ok(Ok(e)) => e,
        _ => Exit::Signal(9),
    }
}
