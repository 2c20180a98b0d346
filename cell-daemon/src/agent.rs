//! The `hive.v1.CellAgent` service: what the box daemon asks of this cell.
//!
//! One build per cell: RunBuild starts it on a task and returns at once; Events replays and
//! follows its [`EventLog`]; Cancel forwards to the running step; Shutdown asks `main` to stop
//! the build, kill everything and power off.

use crate::build::{self, BuildSpec, CancelRequest, PrepStatus, Prepared};
use crate::config::Config;
use crate::log::EventLog;
use crate::reaper::Reaper;
use crate::source::Source;
use hive_proto::v1::cell_agent_server::CellAgent;
use hive_proto::v1::{
    ArtifactData, BuildState, CellCancelReply, CellCancelRequest, CellEvent, CellEventsRequest,
    CellHealthReply, CellHealthRequest, PrepareTunnelReply, PrepareTunnelRequest,
    ReadArtifactRequest, RunBuildReply, RunBuildRequest, ShutdownReply, ShutdownRequest,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Bytes of an artefact per ReadArtifact message.
const ARTIFACT_CHUNK: usize = 256 * 1024;

/// Default PATH of a step (the build's env may override it).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The cell agent.
#[derive(Clone)]
pub struct Agent {
    shared: Arc<Shared>,
}

struct Shared {
    cfg: Arc<Config>,
    reaper: Arc<Reaper>,
    started: Instant,
    build: Mutex<Option<Current>>,
    shutdown: watch::Sender<bool>,
    /// The container made ahead of the build, until RunBuild takes it.
    prepared: Mutex<Option<Prepared>>,
    /// How far that set-up got (None: no prewarm, the build makes its container).
    prep_status: Option<watch::Receiver<PrepStatus>>,
    /// The key pair PrepareTunnel made (build id, keys and the interface being made with
    /// them), until RunBuild takes it. Memory only.
    tunnel_keys: Mutex<Option<(String, crate::privnet::Prepared)>>,
    /// PrepareTunnel was called once: a cell makes one key pair, ever.
    tunnel_prepared: std::sync::atomic::AtomicBool,
    /// The prepared container's network namespace, once it is ready.
    prepared_netns: Option<Arc<std::sync::OnceLock<std::path::PathBuf>>>,
    /// `hwg0` made with the warm cell (`--tunnel-ready`), until PrepareTunnel or RunBuild takes
    /// it.
    standby: Mutex<Option<crate::privnet::Standby>>,
}

struct Current {
    id: String,
    log: Arc<EventLog>,
    /// Its artefacts, held open for ReadArtifact once it has finished.
    artifacts: Arc<crate::artifacts::Held>,
    cancel: watch::Sender<CancelRequest>,
    /// Who follows the build's events (the box), for fencing.
    watch: Arc<Watchers>,
}

/// How many CellEvents streams follow the build, and since when none has.
#[derive(Debug)]
struct Watchers(Mutex<(usize, Instant)>);

impl Watchers {
    fn new() -> Self {
        Watchers(Mutex::new((0, Instant::now())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Instant)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start(&self) {
        self.lock().0 += 1;
    }

    fn stop(&self) {
        let mut w = self.lock();
        w.0 = w.0.saturating_sub(1);
        if w.0 == 0 {
            w.1 = Instant::now();
        }
    }

    /// How long nobody has followed the build (None while somebody does).
    fn unwatched_for(&self) -> Option<Duration> {
        let w = self.lock();
        (w.0 == 0).then(|| w.1.elapsed())
    }
}

/// Stops the build once no box has followed it for `after` (the box is gone, and the control
/// plane will place the build again when its lease runs out): a build never runs twice at once.
async fn fence(
    log: Arc<EventLog>,
    watch: Arc<Watchers>,
    cancel: watch::Sender<CancelRequest>,
    after: Duration,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        if log.is_finished() {
            return;
        }
        let Some(gone) = watch.unwatched_for() else {
            continue;
        };
        if gone >= after {
            let reason = format!(
                "fenced: no box has followed this build for {}s (its box is gone; the control \
                 plane runs the build again elsewhere), so the cell stopped it",
                gone.as_secs()
            );
            tracing::warn!(
                unwatched_ms = gone.as_millis() as u64,
                "no box follows the build: stopping it (fence)"
            );
            log.system(0, format!("hive: {reason}"));
            cancel.send_if_modified(|v| {
                if v.is_none() {
                    *v = Some((BuildState::Cancelled, reason));
                    true
                } else {
                    false
                }
            });
            return;
        }
    }
}

impl Agent {
    pub fn new(
        cfg: Arc<Config>,
        reaper: Arc<Reaper>,
        prepared: Option<(
            Prepared,
            watch::Receiver<PrepStatus>,
            Arc<std::sync::OnceLock<std::path::PathBuf>>,
        )>,
    ) -> Self {
        let (prepared, prep_status, prepared_netns) = match prepared {
            Some((p, s, n)) => (Some(p), Some(s), Some(n)),
            None => (None, None, None),
        };
        Agent {
            shared: Arc::new(Shared {
                cfg,
                reaper,
                started: Instant::now(),
                build: Mutex::new(None),
                shutdown: watch::channel(false).0,
                prepared: Mutex::new(prepared),
                prep_status,
                tunnel_keys: Mutex::new(None),
                tunnel_prepared: std::sync::atomic::AtomicBool::new(false),
                prepared_netns,
                standby: Mutex::new(None),
            }),
        }
    }

    /// With `--tunnel-ready`: once the build container is up, starts making its stand-by
    /// `hwg0` (unless a build or PrepareTunnel came first).
    pub fn make_standby_tunnel(&self) {
        let (Some(mut status), Some(netns)) = (
            self.shared.prep_status.clone(),
            self.shared.prepared_netns.clone(),
        ) else {
            return;
        };
        let agent = self.clone();
        tokio::spawn(async move {
            let ready = status
                .wait_for(|s| *s != PrepStatus::Pending)
                .await
                .map(|s| *s == PrepStatus::Ready)
                .unwrap_or(false);
            let Some(netns) = netns.get().filter(|_| ready).cloned() else {
                return;
            };
            let mut slot = agent.standby();
            if agent
                .shared
                .tunnel_prepared
                .load(std::sync::atomic::Ordering::SeqCst)
                || agent.current().is_some()
                || *agent.shared.shutdown.borrow()
            {
                return;
            }
            *slot = Some(crate::privnet::Standby::start(netns));
        });
    }

    fn standby(&self) -> std::sync::MutexGuard<'_, Option<crate::privnet::Standby>> {
        self.shared
            .standby
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// For a build without a tunnel: removes the warm cell's stand-by `hwg0` and any interface
    /// a PrepareTunnel made, off the async threads. The build awaits the handle before its first
    /// step, so no step sees them.
    fn discard_tunnels(&self) -> Option<tokio::task::JoinHandle<()>> {
        let standby = self.standby().take();
        let prepared = self
            .shared
            .tunnel_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if standby.is_none() && prepared.is_none() {
            return None;
        }
        Some(tokio::task::spawn_blocking(move || {
            if let Some(s) = standby {
                s.discard();
            }
            if let Some((_, p)) = prepared {
                p.discard();
            }
        }))
    }

    /// Removes the container made ahead of a build that never came.
    pub async fn discard_prepared(&self) {
        let prepared = self
            .shared
            .prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = prepared {
            if let Ok(Ok(c)) = h.await {
                c.destroy().await;
            }
        }
    }

    /// The network namespace of the container made ahead of the build, once it is up (it
    /// stays where RunBuild finds it); `None` without one, or when it shares the cell's.
    async fn container_netns(&self) -> Option<std::path::PathBuf> {
        let handle = self
            .shared
            .prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        let result = handle.await.unwrap_or_else(|e| {
            Err(crate::container::ContainerError::Setup(format!(
                "set-up task failed: {e}"
            )))
        });
        let netns = result.as_ref().ok().and_then(|c| c.netns_path());
        *self
            .shared
            .prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(tokio::spawn(async move { result }));
        netns
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        self.shared.build.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Becomes true when the Shutdown rpc was called.
    pub fn shutdown_requested(&self) -> watch::Receiver<bool> {
        self.shared.shutdown.subscribe()
    }

    /// Cancels the build (if one runs) and waits up to `wait` for it to end.
    pub async fn stop_build(&self, reason: &str, wait: Duration) {
        let log = {
            let cur = self.current();
            match cur.as_ref() {
                Some(c) => {
                    c.cancel.send_if_modified(|v| {
                        if v.is_none() {
                            *v = Some((BuildState::Cancelled, reason.to_string()));
                            true
                        } else {
                            false
                        }
                    });
                    c.log.clone()
                }
                None => return,
            }
        };
        let mut changed = log.subscribe();
        let _ = tokio::time::timeout(wait, async {
            while !log.is_finished() {
                if changed.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    fn state_name(&self) -> &'static str {
        match self.current().as_ref() {
            None => "idle",
            Some(c) if c.log.is_finished() => "finished",
            Some(_) => "running",
        }
    }

    /// The log of the named build (empty id = the cell's build).
    fn log_of(&self, build_id: &str) -> Result<Arc<EventLog>, Status> {
        let cur = self.current();
        match cur.as_ref() {
            None => Err(Status::failed_precondition(
                "this cell has no build yet (call RunBuild first)",
            )),
            Some(c) if !build_id.is_empty() && c.id != build_id => Err(Status::not_found(format!(
                "build {build_id:?} is not this cell's build ({:?})",
                c.id
            ))),
            Some(c) => Ok(c.log.clone()),
        }
    }
}

/// Checks a RunBuild request and turns it into a [`BuildSpec`].
pub fn build_spec(req: RunBuildRequest, cfg: &Config) -> Result<BuildSpec, Status> {
    if req.build_id.is_empty() {
        return Err(Status::invalid_argument("build_id is empty"));
    }
    if req.build_id.len() > 200 || req.build_id.chars().any(|c| c.is_control()) {
        return Err(Status::invalid_argument(
            "build_id must be at most 200 printable characters",
        ));
    }
    for (i, step) in req.steps.iter().enumerate() {
        if step.trim().is_empty() {
            return Err(Status::invalid_argument(format!("step {} is empty", i + 1)));
        }
        if step.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "step {} contains a NUL byte",
                i + 1
            )));
        }
    }
    let mut env = vec![
        ("PATH".to_string(), DEFAULT_PATH.to_string()),
        ("HOME".to_string(), "/work".to_string()),
        ("HIVE_BUILD_ID".to_string(), req.build_id.clone()),
    ];
    let mut keys: Vec<_> = req.env.keys().cloned().collect();
    keys.sort();
    for k in keys {
        let v = &req.env[&k];
        let key_ok = !k.is_empty()
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !key_ok {
            return Err(Status::invalid_argument(format!(
                "env key {k:?}: must match [A-Za-z_][A-Za-z0-9_]*"
            )));
        }
        if v.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "env {k}: value contains a NUL byte"
            )));
        }
        env.retain(|(ek, _)| ek != &k);
        env.push((k, v.clone()));
    }
    // Secrets: in the environment like env (and winning over it), and masked in the output.
    let mut secrets = Vec::new();
    let mut names: Vec<_> = req.secrets.keys().cloned().collect();
    names.sort();
    let secret_names = names.clone();
    for k in names {
        let v = &req.secrets[&k];
        let key_ok = !k.is_empty()
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !key_ok || v.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "secret {k:?}: the name must match [A-Za-z_][A-Za-z0-9_]* and the value hold no NUL"
            )));
        }
        env.retain(|(ek, _)| ek != &k);
        env.push((k, v.clone()));
        secrets.push(v.clone());
    }
    let source = Source {
        repo_url: req.repo_url,
        revision: req.revision,
        git_ref: req.git_ref,
        auth: clone_auth(req.clone_auth.unwrap_or_default())?,
    };
    source
        .validate()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    // The clone's credentials are masked like secrets, but stay out of the steps' environment.
    secrets.extend(source.auth_secrets());
    let secs = if req.timeout_secs == 0 {
        cfg.default_timeout_secs
    } else {
        req.timeout_secs
    };
    Ok(BuildSpec {
        id: req.build_id,
        source,
        steps: req.steps,
        env,
        secrets,
        secret_names,
        timeout: Duration::from_secs(u64::from(secs)),
        artifact_cap: req.artifact_cap_bytes,
    })
}

/// Checks the clone's credentials: sizes bounded, nothing that could break out of the file
/// or the HTTP header they go into.
fn clone_auth(a: hive_proto::v1::CloneAuth) -> Result<crate::source::CloneAuth, Status> {
    let bad = |what: &str, why: &str| Status::invalid_argument(format!("clone_auth.{what}: {why}"));
    if a.ssh_private_key.len() > 16 * 1024 || a.ssh_private_key.contains('\0') {
        return Err(bad("ssh_private_key", "at most 16 KiB, no NUL"));
    }
    if a.known_hosts.len() > 256 * 1024 || a.known_hosts.contains('\0') {
        return Err(bad("known_hosts", "at most 256 KiB, no NUL"));
    }
    if a.https_token.len() > 4096 || a.https_token.chars().any(|c| c.is_control()) {
        return Err(bad("https_token", "at most 4 KiB, no control characters"));
    }
    if a.https_user.len() > 256
        || a.https_user.contains(':')
        || a.https_user.chars().any(|c| c.is_control())
    {
        return Err(bad(
            "https_user",
            "at most 256 characters, no ':' or control characters",
        ));
    }
    Ok(crate::source::CloneAuth {
        ssh_private_key: a.ssh_private_key,
        known_hosts: a.known_hosts,
        https_user: a.https_user,
        https_token: a.https_token,
    })
}

#[tonic::async_trait]
impl CellAgent for Agent {
    async fn health(
        &self,
        _req: Request<CellHealthRequest>,
    ) -> Result<Response<CellHealthReply>, Status> {
        // Ready = listening and, when prewarming, the build container is set up: the box's
        // pool counts a cell warm only then. A failed set-up stays not ready (the box replaces
        // the cell; the reason is in the cell's log).
        let ready = match &self.shared.prep_status {
            None => true,
            Some(s) => *s.borrow() == PrepStatus::Ready,
        };
        Ok(Response::new(CellHealthReply {
            ready,
            cell_id: self.shared.cfg.cell_id.clone(),
            version: crate::VERSION.to_string(),
            uptime_ms: self.shared.started.elapsed().as_millis() as u64,
            state: self.state_name().to_string(),
        }))
    }

    async fn run_build(
        &self,
        req: Request<RunBuildRequest>,
    ) -> Result<Response<RunBuildReply>, Status> {
        if *self.shared.shutdown.borrow() {
            return Err(Status::unavailable("the cell is shutting down"));
        }
        let mut req = req.into_inner();
        let fence_after = Duration::from_secs(u64::from(req.fence_after_secs));
        let tunnel_cfg = req.tunnel.take();
        let spec = build_spec(req, &self.shared.cfg)?;
        let tunnel = match tunnel_cfg {
            None => None,
            Some(t) => {
                let keys = {
                    let mut k = self
                        .shared
                        .tunnel_keys
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    match k.take() {
                        Some((id, keys)) if id == spec.id => keys,
                        Some(other) => {
                            *k = Some(other);
                            return Err(Status::failed_precondition(format!(
                                "the tunnel key pair was made for another build than {:?}",
                                spec.id
                            )));
                        }
                        None => {
                            return Err(Status::failed_precondition(
                                "RunBuild with a tunnel needs PrepareTunnel first",
                            ))
                        }
                    }
                };
                Some(
                    crate::privnet::Plan::new(t, keys)
                        .map_err(|e| Status::invalid_argument(e.to_string()))?,
                )
            }
        };
        let log = Arc::new(
            EventLog::new(self.shared.cfg.max_log_bytes).with_secrets(spec.secrets.clone()),
        );
        let (cancel_tx, cancel_rx) = watch::channel(None);
        let held = Arc::new(crate::artifacts::Held::default());
        {
            let mut cur = self.current();
            if let Some(c) = cur.as_ref() {
                return Err(Status::failed_precondition(format!(
                    "this cell already ran build {:?}; a cell runs one build",
                    c.id
                )));
            }
            let watch = Arc::new(Watchers::new());
            if !fence_after.is_zero() {
                tokio::spawn(fence(
                    log.clone(),
                    watch.clone(),
                    cancel_tx.clone(),
                    fence_after,
                ));
            }
            *cur = Some(Current {
                id: spec.id.clone(),
                log: log.clone(),
                artifacts: held.clone(),
                cancel: cancel_tx,
                watch,
            });
        }
        tracing::info!(build = %spec.id, steps = spec.steps.len(), "build accepted");
        // A build without a tunnel keeps no tunnel interface.
        let tunnels_gone = if tunnel.is_none() {
            self.discard_tunnels()
        } else {
            None
        };
        let prepared = self
            .shared
            .prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        tokio::spawn(build::run(
            self.shared.cfg.clone(),
            self.shared.reaper.clone(),
            spec,
            log,
            cancel_rx,
            prepared,
            tunnel,
            tunnels_gone,
            held,
        ));
        Ok(Response::new(RunBuildReply { accepted: true }))
    }

    type EventsStream = ReceiverStream<Result<CellEvent, Status>>;

    async fn events(
        &self,
        req: Request<CellEventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let req = req.into_inner();
        let log = self.log_of(&req.build_id)?;
        let watch = self
            .current()
            .as_ref()
            .map(|c| c.watch.clone())
            .ok_or_else(|| Status::failed_precondition("this cell has no build"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        watch.start();
        tokio::spawn(async move {
            // Counted as followed until the box's end of the stream is gone (a silent build
            // sends nothing that would notice earlier).
            let gone = tx.clone();
            tokio::select! {
                _ = log.follow(req.from_seq, tx) => {}
                _ = gone.closed() => {}
            }
            watch.stop();
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel(
        &self,
        req: Request<CellCancelRequest>,
    ) -> Result<Response<CellCancelReply>, Status> {
        let req = req.into_inner();
        let state = match BuildState::try_from(req.state) {
            Ok(BuildState::Unspecified) => BuildState::Cancelled,
            Ok(s @ (BuildState::Cancelled | BuildState::TimedOut)) => s,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "cancel state {}: must be cancelled or timed_out",
                    req.state
                )))
            }
        };
        let reason = if req.reason.is_empty() {
            match state {
                BuildState::TimedOut => "build timed out (told by the control plane)".to_string(),
                _ => "build cancelled".to_string(),
            }
        } else {
            req.reason
        };
        self.log_of(&req.build_id)?;
        let cur = self.current();
        if let Some(c) = cur.as_ref() {
            tracing::info!(build = %c.id, state = state.short_name(), "cancel requested");
            // The first cancel wins; a later one (say timed_out after cancelled) changes nothing.
            c.cancel.send_if_modified(|v| {
                if v.is_none() {
                    *v = Some((state, reason));
                    true
                } else {
                    false
                }
            });
        }
        Ok(Response::new(CellCancelReply {}))
    }

    async fn prepare_tunnel(
        &self,
        req: Request<PrepareTunnelRequest>,
    ) -> Result<Response<PrepareTunnelReply>, Status> {
        let build_id = req.into_inner().build_id;
        if build_id.is_empty() {
            return Err(Status::invalid_argument("build_id is empty"));
        }
        if self.current().is_some() {
            return Err(Status::failed_precondition(
                "this cell already runs its build; PrepareTunnel comes before RunBuild",
            ));
        }
        if self
            .shared
            .tunnel_prepared
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(Status::failed_precondition(
                "this cell already made its one tunnel key pair",
            ));
        }
        let keys = hive_wg::KeyPair::generate();
        let public_key = keys.public().to_base64();
        // With the build container already made, its `hwg0` is made now, beside the key
        // exchange the box is about to run, instead of after it.
        let standby = self.standby().take();
        let prepared = match standby {
            Some(standby) => crate::privnet::Prepared::from_standby(keys, standby),
            None => match self.container_netns().await {
                Some(netns) => crate::privnet::Prepared::early(keys, netns),
                None => crate::privnet::Prepared::keys(keys),
            },
        };
        *self
            .shared
            .tunnel_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((build_id.clone(), prepared));
        tracing::info!(build = %build_id, %public_key, "tunnel key pair made (memory only)");
        Ok(Response::new(PrepareTunnelReply { public_key }))
    }

    type ReadArtifactStream = ReceiverStream<Result<ArtifactData, Status>>;

    async fn read_artifact(
        &self,
        req: Request<ReadArtifactRequest>,
    ) -> Result<Response<Self::ReadArtifactStream>, Status> {
        let req = req.into_inner();
        let log = self.log_of(&req.build_id)?;
        if !log.is_finished() {
            return Err(Status::failed_precondition(
                "the build has not finished; artifacts are read after BUILD_FINISHED",
            ));
        }
        let held = match self.current().as_ref() {
            Some(c) => c.artifacts.clone(),
            None => return Err(Status::failed_precondition("this cell has no build")),
        };
        if held.read(&req.path, 0, 0).is_none() {
            return Err(Status::not_found(format!(
                "{:?} is not one of the build's artifacts",
                req.path
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut offset = req.offset;
            loop {
                let chunk = match held.read(&req.path, offset, ARTIFACT_CHUNK) {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("read {}: {e}", req.path))))
                            .await;
                        return;
                    }
                    None => return,
                };
                if chunk.is_empty() {
                    return;
                }
                let n = chunk.len() as u64;
                if tx
                    .send(Ok(ArtifactData {
                        offset,
                        data: chunk,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
                offset += n;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn shutdown(
        &self,
        _req: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownReply>, Status> {
        tracing::info!("shutdown requested over the agent api");
        self.shared.shutdown.send_replace(true);
        Ok(Response::new(ShutdownReply {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            cell_id: "c1".into(),
            listen: crate::config::ListenAddr::Vsock(1024),
            build_image: "/".into(),
            work_dir: "/var/lib/hive".into(),
            init: false,
            work_tmpfs: true,
            container_net: crate::config::NetMode::Isolated,
            kill_grace_ms: 5000,
            default_timeout_secs: 3600,
            max_log_bytes: 1 << 20,
            build_uid: 1000,
            build_gid: 1000,
            prewarm: true,
            tunnel_ready: false,
        }
    }

    #[test]
    fn run_build_requests_are_checked() {
        let ok = RunBuildRequest {
            build_id: "b1".into(),
            steps: vec!["make".into()],
            env: [
                ("FOO".to_string(), "1".to_string()),
                ("PATH".to_string(), "/x".to_string()),
            ]
            .into(),
            ..Default::default()
        };
        let spec = build_spec(ok.clone(), &cfg()).unwrap();
        assert_eq!(spec.timeout, Duration::from_secs(3600));
        assert!(spec.env.contains(&("PATH".into(), "/x".into())));
        assert_eq!(spec.env.iter().filter(|(k, _)| k == "PATH").count(), 1);

        let bad = [
            RunBuildRequest {
                build_id: String::new(),
                ..ok.clone()
            },
            RunBuildRequest {
                steps: vec!["  ".into()],
                ..ok.clone()
            },
            RunBuildRequest {
                env: [("A=B".to_string(), String::new())].into(),
                ..ok.clone()
            },
            RunBuildRequest {
                repo_url: "-oops".into(),
                ..ok.clone()
            },
        ];
        for req in bad {
            let st = build_spec(req, &cfg()).unwrap_err();
            assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
        }
    }
}
