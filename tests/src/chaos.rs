//! The chaos soak (issue 11): proves exactly-once execution under faults with the real daemons.
//!
//! One control plane (SQLite, 10 s lease, 500 ms heartbeat), two sandbox boxes (`small=2`) that
//! reach it through a [`Proxy`] (its ports change on every restart), and one project whose step
//! runs `sleep` under a command line unique to the build (`hive-chaos-<build id>`), cloned from
//! a real `git daemon` at a commit of its own per delivery. While signed push webhooks and API
//! submissions (SubmitBuild with a request id) arrive at a steady rate (some redelivered under
//! the same delivery or request id, which must make no build; unanswered ones sent again), a
//! fault driver `kill -9`s, at seeded random, the control plane, a box (sometimes left dead for
//! longer than the lease) or a running cell's process, and restarts what it killed. A sampler
//! lists the host's processes every 100 ms: two alive with one build's command line is an
//! overlap. At the end everything is brought back, every accepted build must end, each accepted
//! delivery must have exactly one build and it terminal, and once the boxes and the control plane
//! have stopped nothing of theirs may be left: cell dirs, netns, veths, cgroups, processes.
//!
//! Neighbours: [`crate::controlplane`] and [`crate::cluster`] run the daemons; `hive-bench chaos`
//! and `tests/tests/chaos.rs` drive [`run`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hive_proto::v1::{
    BuildState, CreateProjectRequest, GetBuildRequest, ListBuildsRequest, SubmitBuildRequest,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cluster::{BoxDaemon, BoxOptions, GitHost, Proxy};
use crate::controlplane::{ControlPlane, ControlPlaneOptions, HarnessError};
use crate::github::{push_payload, WebhookClient};

/// The control plane's lease; boxes are told the same.
const LEASE_SECS: u64 = 10;
const SECRET: &str = "chaos-secret";
const PROJECT: &str = "chaos";
/// What a build's step process is called on the host: this, then the build id.
const MARKER: &str = "hive-chaos-";
/// How long the end waits for every accepted build to end.
const DRAIN: Duration = Duration::from_secs(240);

/// One run's settings.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// How long load and faults go on.
    pub seconds: u64,
    /// Seeds the fault schedule and the load's choices.
    pub seed: u64,
    /// New webhook deliveries per second.
    pub rate: f64,
    /// How long each build's step sleeps (s).
    pub step_secs: u32,
    /// Where the daemons' logs and the fault timeline are copied at the end (None: not kept).
    pub logs_dir: Option<PathBuf>,
    /// Run the control plane on a PostgreSQL server of the run's own, and make `kill -9` of
    /// that server (then its crash recovery) one of the faults.
    pub postgres: bool,
}

impl Default for ChaosOptions {
    fn default() -> Self {
        ChaosOptions {
            seconds: 60,
            seed: 1,
            rate: 1.0,
            step_secs: 2,
            logs_dir: None,
            postgres: false,
        }
    }
}

/// What stops a run before it can count.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    #[error("--seconds must be at least 1 and --rate between 0.05 and 20 per second (got {seconds} s, {rate}/s)")]
    Options { seconds: u64, rate: f64 },
    #[error("set up the git repository: {0}")]
    Git(String),
    #[error("start the run's PostgreSQL server: {0}")]
    Postgres(#[from] crate::pgserver::PgError),
    #[error("start the control plane: {0}")]
    ControlPlane(#[from] HarnessError),
    #[error("start a box: {0}")]
    Box(String),
    #[error("connect to the control plane: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("gRPC {what}: {source}")]
    Grpc {
        what: &'static str,
        #[source]
        source: tonic::Status,
    },
    #[error("the fault driver stopped: {0}")]
    Driver(String),
}

/// What a run counted.
#[derive(Debug, Default, Clone)]
pub struct ChaosReport {
    pub cp_kills: u32,
    /// Kills of the PostgreSQL server (`--postgres` runs).
    pub db_kills: u32,
    /// Control-plane kills after which it stayed dead for longer than the lease.
    pub long_cp_outages: u32,
    pub box_kills: u32,
    /// Box kills after which the box stayed dead for longer than the lease.
    pub long_box_outages: u32,
    pub cell_kills: u32,
    /// Distinct submissions sent (redeliveries not counted): webhook deliveries and API calls.
    pub deliveries: usize,
    /// Of them, API submissions (SubmitBuild with a request id).
    pub api: usize,
    /// Deliveries answered 202 with a build: the builds that must each run to an end, once.
    pub builds: usize,
    /// Redeliveries of accepted deliveries (same id) that were answered.
    pub redeliveries: usize,
    /// Deliveries that got no answer at first (control plane down) and were sent again.
    pub retried: usize,
    /// Deliveries never accepted, even after the control plane was back for good.
    pub unanswered: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub overlapping: usize,
    pub orphans: usize,
    /// Builds the sampler saw running their step (at least once).
    pub runs_seen: usize,
    /// The accepted builds by end state, and by attempts taken.
    pub states: BTreeMap<String, usize>,
    pub attempts: BTreeMap<u32, usize>,
    /// From the end of the load to every accepted build ended.
    pub drain: Duration,
    /// What was found wrong, with the ids to look up.
    pub evidence: Vec<String>,
}

impl ChaosReport {
    pub fn kills(&self) -> u32 {
        self.cp_kills + self.db_kills + self.box_kills + self.cell_kills
    }

    /// The one line a run ends with.
    pub fn line(&self) -> String {
        format!(
            "chaos: kills={} builds={} lost={} duplicated={} overlapping={} orphans={}",
            self.kills(),
            self.builds,
            self.lost,
            self.duplicated,
            self.overlapping,
            self.orphans
        )
    }

    /// Whether the run proved what it should: something was killed and nothing went wrong.
    pub fn passed(&self) -> bool {
        self.kills() > 0
            && self.lost == 0
            && self.duplicated == 0
            && self.overlapping == 0
            && self.orphans == 0
    }

    /// The details behind [`ChaosReport::line`], several lines.
    pub fn details(&self) -> String {
        let mut s = format!(
            "kills: {} control plane ({} dead past the lease), {} database, {} box ({} dead past \
             the lease), {} cell\n\
             submissions: {} sent ({} through the API), {} accepted, {} redelivered (answered), \
             {} sent again after no answer, {} never accepted\n\
             accepted builds by state: {:?}; by attempts: {:?}; drained {:.1}s after the load\n\
             the sampler saw {} builds' steps running\n",
            self.cp_kills,
            self.long_cp_outages,
            self.db_kills,
            self.box_kills,
            self.long_box_outages,
            self.cell_kills,
            self.deliveries,
            self.api,
            self.builds,
            self.redeliveries,
            self.retried,
            self.unanswered,
            self.states,
            self.attempts,
            self.drain.as_secs_f64(),
            self.runs_seen
        );
        for e in &self.evidence {
            s.push_str("evidence: ");
            s.push_str(e);
            s.push('\n');
        }
        s
    }
}

/// splitmix64: a small seeded generator, so a run's choices follow from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        Duration::from_secs_f64(lo + (hi - lo) * self.unit())
    }
}

/// Where the load and the end checks find the control plane (its ports change on restart).
#[derive(Debug, Clone)]
struct Links {
    webhook: String,
    grpc: String,
}

/// What the fault driver owns: the daemons it kills and restarts.
struct Daemons {
    cp: Option<ControlPlane>,
    /// The run's own PostgreSQL server (`--postgres`), which the driver also kills.
    pg: Option<crate::pgserver::PgServer>,
    boxes: Vec<BoxDaemon>,
    /// For each box: when to restart it, while it is down.
    down: Vec<Option<Instant>>,
    proxy: Arc<Proxy>,
    links: Arc<Mutex<Links>>,
    /// The fault timeline, one line a fault.
    timeline: Vec<String>,
}

impl Daemons {
    fn cp(&self) -> &ControlPlane {
        self.cp
            .as_ref()
            .expect("the control plane is up between faults")
    }

    /// Points the box proxy, the load and the checks at the (restarted) control plane.
    fn relink(&self) {
        let cp = self.cp();
        self.proxy.set_upstream(&cp.box_addr);
        self.proxy.cut();
        crate::controlplane::proxy_boxes(self.proxy.addr.port(), &cp.grpc_url());
        *lock(&self.links) = Links {
            webhook: cp.webhook_url(),
            grpc: cp.grpc_url(),
        };
    }

    /// Restarts box `i` (it joins through the proxy; a restarted box keeps its certificate).
    fn restart_box(&mut self, i: usize) -> Result<(), String> {
        let url = self.proxy.url();
        let b = &mut self.boxes[i];
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.restart(&url)))
            .map_err(|p| format!("restart box {}: {}", b.opts.tag, panic_text(&p)))?;
        self.down[i] = None;
        Ok(())
    }

    /// Restarts the boxes whose time has come (all of them with `all`).
    fn restart_due(&mut self, all: bool, t0: Instant) -> Result<(), String> {
        for i in 0..self.boxes.len() {
            if let Some(at) = self.down[i] {
                if all || Instant::now() >= at {
                    self.restart_box(i)?;
                    let line = format!(
                        "+{:.1}s box {} restarted",
                        t0.elapsed().as_secs_f64(),
                        self.boxes[i].opts.tag
                    );
                    eprintln!("chaos: {line}");
                    self.timeline.push(line);
                }
            }
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Kill counts, shared by the fault driver and the report.
#[derive(Debug, Default)]
struct Kills {
    cp: u32,
    db: u32,
    cp_long: u32,
    boxes: u32,
    long: u32,
    cells: u32,
}

/// A process of this host: pid, parent, argv.
struct Proc {
    pid: i32,
    ppid: i32,
    argv: Vec<String>,
}

fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // A zombie's cmdline is empty: it runs no more.
        let raw = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if raw.is_empty() {
            continue;
        }
        let argv = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // After the command's closing parenthesis: state, then the parent's pid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        out.push(Proc { pid, ppid, argv });
    }
    out
}

/// The build a step process runs, from its `hive-chaos-<build id>` name.
fn marked_build(p: &Proc) -> Option<&str> {
    p.argv.first()?.strip_prefix(MARKER)
}

/// What the sampler saw.
#[derive(Debug, Default)]
struct Seen {
    /// Builds seen with two step processes alive at once, with the evidence.
    overlaps: BTreeMap<String, String>,
    /// Every cell id seen on the boxes' disks.
    cells: BTreeSet<String>,
    /// Every build seen running its step (so the sampler is known to see them).
    running: BTreeSet<String>,
    samples: u64,
}

/// Every ~100 ms until `stop`: the step processes per build, and the cells on disk.
fn sample(cells_dirs: Vec<PathBuf>, seen: Arc<Mutex<Seen>>, stop: Arc<AtomicBool>, t0: Instant) {
    while !stop.load(Ordering::SeqCst) {
        let mut by_build: HashMap<String, Vec<i32>> = HashMap::new();
        for p in processes() {
            if let Some(b) = marked_build(&p) {
                by_build.entry(b.to_string()).or_default().push(p.pid);
            }
        }
        let mut cells = Vec::new();
        for dir in &cells_dirs {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                cells.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        let mut s = lock(&seen);
        s.samples += 1;
        s.cells.extend(cells);
        for (build, pids) in by_build {
            s.running.insert(build.clone());
            if pids.len() > 1 && !s.overlaps.contains_key(&build) {
                let cgroups: Vec<String> = pids
                    .iter()
                    .map(|p| {
                        let cg = std::fs::read_to_string(format!("/proc/{p}/cgroup"))
                            .unwrap_or_default();
                        let line = cg.lines().find(|l| l.contains(":pids:")).unwrap_or("");
                        format!("pid {p} in {line}")
                    })
                    .collect();
                s.overlaps.insert(
                    build.clone(),
                    format!(
                        "build {build} ran twice at once at +{:.1}s: {}",
                        t0.elapsed().as_secs_f64(),
                        cgroups.join("; ")
                    ),
                );
            }
        }
        drop(s);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A cell's box (index), id and process.
type LiveCell = (usize, String, i32);

/// The cell (box index, cell id, pid) of every live cell process on the boxes; those that run
/// a build step first.
fn live_cells(boxes: &[BoxDaemon]) -> (Vec<LiveCell>, Vec<LiveCell>) {
    let mut cells = Vec::new();
    for (i, b) in boxes.iter().enumerate() {
        let dir = b.data_dir.path().join("data/cells");
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let pid = std::fs::read_to_string(e.path().join("pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
            if let Some(pid) = pid.filter(|p| Path::new(&format!("/proc/{p}")).exists()) {
                cells.push((i, id, pid));
            }
        }
    }
    let procs = processes();
    let parent: HashMap<i32, i32> = procs.iter().map(|p| (p.pid, p.ppid)).collect();
    let mut busy_pids = BTreeSet::new();
    for p in procs.iter().filter(|p| marked_build(p).is_some()) {
        let mut at = p.pid;
        for _ in 0..32 {
            busy_pids.insert(at);
            match parent.get(&at) {
                Some(&pp) if pp > 1 => at = pp,
                _ => break,
            }
        }
    }
    let (busy, idle) = cells
        .into_iter()
        .partition(|(_, _, pid)| busy_pids.contains(pid));
    (busy, idle)
}

/// The kinds of fault; each run has every kind among its first five faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The control plane, back within 2 s.
    ControlPlane,
    /// The control plane, back after more than a lease.
    ControlPlaneLong,
    /// A box, back within 2 s.
    Box,
    /// A box, back after more than a lease (its cells have fenced themselves by then).
    BoxLong,
    /// A cell's process, one that runs a build when there is one.
    Cell,
    /// The PostgreSQL server (`--postgres` runs only), restarted after up to 3 s.
    Database,
}

impl Fault {
    fn pick(rng: &mut Rng, database: bool) -> Fault {
        let roll = rng.unit();
        match roll {
            r if database && r < 0.15 => Fault::Database,
            r if r < 0.20 => Fault::ControlPlane,
            r if r < 0.25 => Fault::ControlPlaneLong,
            r if r < 0.45 => Fault::Box,
            r if r < 0.55 => Fault::BoxLong,
            _ => Fault::Cell,
        }
    }
}

/// Kills, at random, one of the control plane, a box or a cell every 2-6 s until `stop`.
fn drive_faults(
    d: &mut Daemons,
    mut rng: Rng,
    kills: &Mutex<Kills>,
    stop: &AtomicBool,
    t0: Instant,
) -> Result<(), String> {
    // Every kind once first, in a seeded order; then at random.
    let mut first = vec![
        Fault::ControlPlane,
        Fault::ControlPlaneLong,
        Fault::Box,
        Fault::BoxLong,
        Fault::Cell,
    ];
    let database = d.pg.is_some();
    if database {
        first.push(Fault::Database);
    }
    for i in (1..first.len()).rev() {
        first.swap(i, rng.below(i + 1));
    }
    first.reverse();
    loop {
        let next = Instant::now() + rng.secs(2.0, 6.0);
        while Instant::now() < next {
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            d.restart_due(false, t0)?;
            std::thread::sleep(Duration::from_millis(50));
        }
        let at = t0.elapsed().as_secs_f64();
        let any_box_down = d.down.iter().any(Option::is_some);
        let mut fault = first
            .pop()
            .unwrap_or_else(|| Fault::pick(&mut rng, database));
        if any_box_down && matches!(fault, Fault::Box | Fault::BoxLong) {
            // One box down at a time, so the builds go on; a later fault takes this one's place.
            first.push(fault);
            fault = Fault::Cell;
        }
        let line = if fault == Fault::Database {
            let down = rng.secs(0.2, 3.0);
            let pg =
                d.pg.as_mut()
                    .expect("a database fault only in --postgres runs");
            pg.crash();
            lock(kills).db += 1;
            std::thread::sleep(down);
            pg.restart()
                .map_err(|e| format!("restart PostgreSQL: {e}"))?;
            format!(
                "+{at:.1}s kill -9 PostgreSQL, restarted (crash recovery) after {:.1}s",
                down.as_secs_f64()
            )
        } else if matches!(fault, Fault::ControlPlane | Fault::ControlPlaneLong) {
            let cp = d.cp.as_mut().expect("control plane");
            cp.crash();
            let long = fault == Fault::ControlPlaneLong;
            {
                let mut k = lock(kills);
                k.cp += 1;
                k.cp_long += u32::from(long);
            }
            let down = if long {
                rng.secs(LEASE_SECS as f64 + 1.0, LEASE_SECS as f64 + 4.0)
            } else {
                rng.secs(0.0, 2.0)
            };
            let sleep_until = Instant::now() + down;
            while Instant::now() < sleep_until {
                std::thread::sleep(Duration::from_millis(50));
            }
            let cp = d.cp.take().expect("control plane");
            d.cp = Some(
                cp.restart()
                    .map_err(|e| format!("restart control plane: {e}"))?,
            );
            d.relink();
            format!(
                "+{at:.1}s kill -9 control plane, restarted after {:.1}s",
                down.as_secs_f64()
            )
        } else if matches!(fault, Fault::Box | Fault::BoxLong) {
            let i = rng.below(d.boxes.len());
            d.boxes[i].crash();
            let long = fault == Fault::BoxLong;
            let down = if long {
                rng.secs(LEASE_SECS as f64 + 2.0, LEASE_SECS as f64 + 8.0)
            } else {
                rng.secs(0.2, 2.0)
            };
            d.down[i] = Some(Instant::now() + down);
            let mut k = lock(kills);
            k.boxes += 1;
            k.long += u32::from(long);
            format!(
                "+{at:.1}s kill -9 box {}, restart in {:.1}s",
                d.boxes[i].opts.tag,
                down.as_secs_f64()
            )
        } else {
            let (busy, idle) = live_cells(&d.boxes);
            let pick = if !busy.is_empty() {
                Some(busy[rng.below(busy.len())].clone())
            } else if !idle.is_empty() {
                Some(idle[rng.below(idle.len())].clone())
            } else {
                None
            };
            let Some((i, cell, pid)) = pick else {
                continue;
            };
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_err() {
                continue;
            }
            lock(kills).cells += 1;
            format!(
                "+{at:.1}s kill -9 cell {cell} (pid {pid}, {}) on box {}",
                if busy.iter().any(|c| c.2 == pid) {
                    "running a build"
                } else {
                    "warm"
                },
                d.boxes[i].opts.tag
            )
        };
        eprintln!("chaos: {line}");
        d.timeline.push(line);
    }
}

/// How a submission reaches the control plane.
#[derive(Debug, Clone)]
enum Via {
    /// A signed push webhook with this body (keyed by its delivery id).
    Webhook(Vec<u8>),
    /// SubmitBuild of this commit (keyed by its request id), as an internal service would.
    Api { commit: String },
}

/// What the load submits through the API: this share of new submissions.
const API_SHARE: f64 = 0.3;

/// One submission the load sent, by delivery id (webhook) or request id (API).
#[derive(Debug, Clone)]
struct Sent {
    via: Via,
    build: Option<String>,
    in_flight: bool,
    tries: u32,
    next_try: Instant,
}

#[derive(Debug, Default)]
struct Ledger {
    sent: BTreeMap<String, Sent>,
    /// In the order they were accepted (for picking redeliveries).
    accepted: Vec<String>,
    redeliveries: usize,
    retried: usize,
    /// Deliveries answered with a second, different build.
    doubled: BTreeMap<String, String>,
}

/// Sends submission `id` (again, if `redelivery`) and books the answer.
async fn send(
    client: WebhookClient,
    links: Arc<Mutex<Links>>,
    ledger: Arc<Mutex<Ledger>>,
    id: String,
    redelivery: bool,
) {
    let Some(via) = lock(&ledger).sent.get(&id).map(|s| s.via.clone()) else {
        return;
    };
    let links_now = lock(&links).clone();
    let accepted = match via {
        Via::Webhook(body) => {
            let answer = tokio::time::timeout(
                Duration::from_secs(15),
                client.send_signed(&links_now.webhook, SECRET, "push", &id, body),
            )
            .await;
            match &answer {
                Ok(Ok(a)) if a.status == 202 => a.json()["build_id"].as_str().map(str::to_string),
                _ => None,
            }
        }
        Via::Api { commit } => {
            let call = async {
                let mut api = crate::controlplane::api(&links_now.grpc).await.ok()?;
                api.submit_build(SubmitBuildRequest {
                    project: PROJECT.into(),
                    revision: commit,
                    git_ref: "refs/heads/main".into(),
                    request_id: id.clone(),
                })
                .await
                .ok()
                .map(|b| b.into_inner().id)
            };
            tokio::time::timeout(Duration::from_secs(15), call)
                .await
                .ok()
                .flatten()
        }
    };
    let mut l = lock(&ledger);
    let ledger = &mut *l;
    let Some(s) = ledger.sent.get_mut(&id) else {
        return;
    };
    if !redelivery {
        s.in_flight = false;
    }
    match (accepted, s.build.clone()) {
        (Some(b), None) => {
            s.build = Some(b);
            ledger.accepted.push(id);
        }
        (Some(b), Some(first)) if b != first => {
            ledger.doubled.insert(
                id.clone(),
                format!("submission {id} answered with build {first}, then with build {b}"),
            );
        }
        (Some(_), Some(_)) => {
            if redelivery {
                ledger.redeliveries += 1;
            }
        }
        (None, None) => {
            // No answer (the control plane was down): sent again later, as an operator would.
            s.tries += 1;
            s.next_try = Instant::now() + Duration::from_millis(500 * u64::from(s.tries.min(6)));
        }
        (None, Some(_)) => {}
    }
}

/// Submissions at `rate` per second until `until`: signed pushes, and ([`API_SHARE`]) API
/// submissions with a request id; a fifth of them redeliveries (or resubmissions) of accepted
/// ones under the same id; those that got no answer are sent again.
async fn load(
    rate: f64,
    until: Instant,
    mut rng: Rng,
    repo_url: String,
    commits: Vec<String>,
    links: Arc<Mutex<Links>>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let client = WebhookClient::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut n = 0usize;
    while Instant::now() < until {
        tick.tick().await;
        let redeliver = {
            let l = lock(&ledger);
            (!l.accepted.is_empty() && rng.chance(0.2))
                .then(|| l.accepted[rng.below(l.accepted.len())].clone())
        };
        if let Some(id) = redeliver {
            tasks.spawn(send(
                client.clone(),
                links.clone(),
                ledger.clone(),
                id,
                true,
            ));
        } else {
            let commit = &commits[n % commits.len()];
            n += 1;
            let (id, via) = if rng.chance(API_SHARE) {
                (
                    format!("req-{}", uuid::Uuid::new_v4()),
                    Via::Api {
                        commit: commit.clone(),
                    },
                )
            } else {
                (
                    uuid::Uuid::new_v4().to_string(),
                    Via::Webhook(push_payload(&repo_url, "refs/heads/main", commit, false)),
                )
            };
            lock(&ledger).sent.insert(
                id.clone(),
                Sent {
                    via,
                    build: None,
                    in_flight: true,
                    tries: 0,
                    next_try: Instant::now(),
                },
            );
            tasks.spawn(send(
                client.clone(),
                links.clone(),
                ledger.clone(),
                id,
                false,
            ));
        }
        for id in due_retries(&ledger, 2) {
            tasks.spawn(send(
                client.clone(),
                links.clone(),
                ledger.clone(),
                id,
                false,
            ));
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Up to `max` unanswered deliveries due to be sent again (marked in flight).
fn due_retries(ledger: &Mutex<Ledger>, max: usize) -> Vec<String> {
    let mut l = lock(ledger);
    let now = Instant::now();
    let due: Vec<String> = l
        .sent
        .iter()
        .filter(|(_, s)| s.build.is_none() && !s.in_flight && s.next_try <= now)
        .map(|(id, _)| id.clone())
        .take(max)
        .collect();
    for id in &due {
        if let Some(s) = l.sent.get_mut(id) {
            s.in_flight = true;
        }
    }
    l.retried += due.len();
    due
}

/// Makes `n` commits on `main` of the bare repository `repo` (one `git fast-import`); returns
/// them oldest first.
fn add_commits(repo: &Path, n: usize) -> Result<Vec<String>, ChaosError> {
    use std::io::Write;
    let git = |args: &[&str]| -> Result<String, ChaosError> {
        let out = Command::new("git")
            .arg("--git-dir")
            .arg(repo)
            .args(args)
            .output()
            .map_err(|e| ChaosError::Git(format!("run git {args:?}: {e}")))?;
        if !out.status.success() {
            return Err(ChaosError::Git(format!(
                "git {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let tip = git(&["rev-parse", "refs/heads/main"])?;
    let mut stream = String::new();
    for i in 0..n {
        let msg = format!("chaos {i}\n");
        stream.push_str(&format!(
            "commit refs/heads/main\ncommitter Hive Chaos <chaos@hive> {} +0000\ndata {}\n{msg}",
            1_700_000_000 + i,
            msg.len()
        ));
        if i == 0 {
            stream.push_str(&format!("from {tip}\n"));
        }
        stream.push('\n');
    }
    let mut child = Command::new("git")
        .arg("--git-dir")
        .arg(repo)
        .args(["fast-import", "--quiet"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| ChaosError::Git(format!("run git fast-import: {e}")))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stream.as_bytes())
        .map_err(|e| ChaosError::Git(format!("feed git fast-import: {e}")))?;
    let status = child
        .wait()
        .map_err(|e| ChaosError::Git(format!("wait for git fast-import: {e}")))?;
    if !status.success() {
        return Err(ChaosError::Git(format!("git fast-import: {status}")));
    }
    let list = git(&["rev-list", "--reverse", &format!("{tip}..refs/heads/main")])?;
    let commits: Vec<String> = list.lines().map(str::to_string).collect();
    if commits.len() != n {
        return Err(ChaosError::Git(format!(
            "made {} commits, wanted {n}",
            commits.len()
        )));
    }
    Ok(commits)
}

/// What of the stopped boxes is still there: cell dirs, netns, veths, cgroups, firewall
/// entries, processes (by the cells and builds seen, and by the boxes' data dirs and ids).
fn leftovers(
    boxes: &[BoxDaemon],
    cells: &BTreeSet<String>,
    builds: &BTreeSet<String>,
) -> Vec<String> {
    let mut found = Vec::new();
    for b in boxes {
        for c in b.cells_on_disk() {
            found.push(format!("cell dir {c} on box {}", b.opts.tag));
        }
        for ctrl in ["cpu", "memory", "pids"] {
            let parent = PathBuf::from(format!("/sys/fs/cgroup/{ctrl}/hive-e2e-{}", b.opts.tag));
            for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    found.push(format!("cgroup {}", e.path().display()));
                }
            }
        }
        let set = Command::new("nft")
            .args([
                "list",
                "set",
                "inet",
                &format!("hive_e2e_{}", b.opts.tag),
                "cells",
            ])
            .output();
        if let Ok(out) = set {
            let text = String::from_utf8_lossy(&out.stdout);
            for c in cells {
                if text.contains(&format!("hv-{c}")) {
                    found.push(format!("firewall entry hv-{c} on box {}", b.opts.tag));
                }
            }
        }
    }
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let link_names: BTreeSet<&str> = links
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or(""))
        .collect();
    for c in cells {
        if Path::new(&format!("/run/netns/hive-{c}")).exists() {
            found.push(format!("netns hive-{c}"));
        }
        if link_names.contains(format!("hv-{c}").as_str()) {
            found.push(format!("veth hv-{c}"));
        }
    }
    let dirs: Vec<String> = boxes
        .iter()
        .map(|b| b.data_dir.path().display().to_string())
        .collect();
    let ids: Vec<String> = boxes
        .iter()
        .map(|b| format!("box-{}", b.opts.tag))
        .collect();
    for p in processes() {
        let ours = marked_build(&p).is_some_and(|b| builds.contains(b))
            || p.argv.iter().any(|a| {
                cells.contains(a)
                    || ids.contains(a)
                    || dirs.iter().any(|d| a.starts_with(d.as_str()))
            });
        if ours {
            found.push(format!("process {} {:?}", p.pid, p.argv.join(" ")));
        }
    }
    found
}

/// Runs the soak and counts. Needs root, the Debian build image and the daemons' binaries
/// (built on first use, like the tests).
pub async fn run(opts: ChaosOptions) -> Result<ChaosReport, ChaosError> {
    if opts.seconds == 0 || !(0.05..=20.0).contains(&opts.rate) {
        return Err(ChaosError::Options {
            seconds: opts.seconds,
            rate: opts.rate,
        });
    }
    // Apart from other runs on this machine (the e2e suites and other soaks hold the other run
    // ids, see `crate::run_id`): names, subnets and addresses carry the run.
    let run = crate::run_id();
    let git = {
        let (name, addr) = (format!("chaos{run}"), format!("198.18.{}.20", 1 + run));
        tokio::task::spawn_blocking(move || {
            std::panic::catch_unwind(|| GitHost::start(&name, &addr))
                .map_err(|p| ChaosError::Git(panic_text(&p)))
        })
        .await
        .map_err(|e| ChaosError::Git(e.to_string()))??
    };
    let repo_url = git.add_repo(PROJECT);
    let want = (opts.seconds as f64 * opts.rate).ceil() as usize + 16;
    let commits = add_commits(&git.root.path().join(format!("{PROJECT}.git")), want)?;

    let pg = if opts.postgres {
        // A port per run, away from the machine's own server (5432).
        let port = 55_400 + run as u16;
        Some(
            tokio::task::spawn_blocking(move || crate::pgserver::PgServer::start(port))
                .await
                .map_err(|e| ChaosError::Driver(e.to_string()))??,
        )
    } else {
        None
    };
    let db = pg.as_ref().map(crate::pgserver::PgServer::url);
    let cp = tokio::task::spawn_blocking(move || {
        ControlPlane::start(ControlPlaneOptions {
            db,
            lease_secs: LEASE_SECS,
            heartbeat_interval_ms: 500,
            ..Default::default()
        })
    })
    .await
    .map_err(|e| ChaosError::Driver(e.to_string()))??;
    let proxy = Arc::new(Proxy::start_boxes(&cp).await);
    let links = Arc::new(Mutex::new(Links {
        webhook: cp.webhook_url(),
        grpc: cp.grpc_url(),
    }));
    let mut boxes = Vec::new();
    for (k, letter) in ["a", "b"].iter().enumerate() {
        let url = proxy.url();
        let opts = BoxOptions {
            tag: format!("ch{letter}{run}"),
            // 100.96.252-255.0/24: no other test's boxes use these (the e2e tests take
            // run * 20 + 1..19 and e2e_private_repo 228..251), so a chaos run beside the
            // suite never shares a cell subnet with another box.
            subnet_octet: 252 + (run % 2) as u8 * 2 + k as u8,
            pool: "small=2".into(),
            lease_secs: LEASE_SECS,
            block: vec![],
            extra: vec![],
        };
        let b = tokio::task::spawn_blocking(move || {
            std::panic::catch_unwind(|| BoxDaemon::start(&url, opts))
                .map_err(|p| ChaosError::Box(panic_text(&p)))
        })
        .await
        .map_err(|e| ChaosError::Box(e.to_string()))??;
        if !b.wait_connected(Duration::from_secs(30)).await
            || !b.wait_pool("small", 2, Duration::from_secs(90)).await
        {
            return Err(ChaosError::Box(format!(
                "box {} never connected with a warm pool; its log:\n{}",
                b.opts.tag,
                b.log()
            )));
        }
        boxes.push(b);
    }
    let mut api = crate::controlplane::api(&cp.grpc_url()).await?;
    let step = format!(
        "echo chaos build $HIVE_BUILD_ID; exec bash -c 'exec -a \"{MARKER}$HIVE_BUILD_ID\" sleep {}'",
        opts.step_secs
    );
    api.create_project(CreateProjectRequest {
        name: PROJECT.into(),
        repo_url: repo_url.clone(),
        secret: SECRET.into(),
        branch: "main".into(),
        size_class: "small".into(),
        steps: vec![step],
        timeout_secs: 120,
        ..Default::default()
    })
    .await
    .map_err(|source| ChaosError::Grpc {
        what: "CreateProject",
        source,
    })?;

    // Load, faults and the sampler, for `seconds`.
    let t0 = Instant::now();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let sampler_stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let dirs = boxes
            .iter()
            .map(|b| b.data_dir.path().join("data/cells"))
            .collect();
        let (seen, stop) = (seen.clone(), sampler_stop.clone());
        std::thread::spawn(move || sample(dirs, seen, stop, t0))
    };
    let kills = Arc::new(Mutex::new(Kills::default()));
    let faults_stop = Arc::new(AtomicBool::new(false));
    let mut daemons = Daemons {
        cp: Some(cp),
        pg,
        down: vec![None; boxes.len()],
        boxes,
        proxy,
        links: links.clone(),
        timeline: Vec::new(),
    };
    let driver = {
        let (kills, stop) = (kills.clone(), faults_stop.clone());
        let rng = Rng(opts.seed);
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                drive_faults(&mut daemons, rng, &kills, &stop, t0)
            }))
            .unwrap_or_else(|p| Err(panic_text(&p)));
            (daemons, r)
        })
    };
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    load(
        opts.rate,
        t0 + Duration::from_secs(opts.seconds),
        Rng(opts.seed ^ 0x5EED_5EED),
        repo_url,
        commits,
        links.clone(),
        ledger.clone(),
    )
    .await;
    faults_stop.store(true, Ordering::SeqCst);
    let (mut daemons, driven) = tokio::task::spawn_blocking(move || driver.join())
        .await
        .map_err(|e| ChaosError::Driver(e.to_string()))?
        .map_err(|p| ChaosError::Driver(panic_text(&p)))?;
    driven.map_err(ChaosError::Driver)?;
    eprintln!(
        "chaos: +{:.1}s load and faults stopped; bringing everything back",
        t0.elapsed().as_secs_f64()
    );

    // Everything back up; unanswered deliveries sent until the control plane takes them.
    let (d, restarted) = tokio::task::spawn_blocking(move || {
        let r = daemons.restart_due(true, t0);
        (daemons, r)
    })
    .await
    .map_err(|e| ChaosError::Driver(e.to_string()))?;
    restarted.map_err(ChaosError::Driver)?;
    let client = WebhookClient::new();
    let retry_until = Instant::now() + Duration::from_secs(60);
    loop {
        for s in lock(&ledger).sent.values_mut() {
            s.next_try = Instant::now();
        }
        let due = due_retries(&ledger, usize::MAX);
        if due.is_empty() || Instant::now() > retry_until {
            break;
        }
        for id in due {
            send(client.clone(), links.clone(), ledger.clone(), id, false).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Every accepted build ends.
    let drain_t0 = Instant::now();
    let grpc = lock(&links).grpc.clone();
    let mut api = crate::controlplane::api(&grpc).await?;
    let accepted: BTreeMap<String, String> = lock(&ledger)
        .sent
        .iter()
        .filter_map(|(id, s)| Some((id.clone(), s.build.clone()?)))
        .collect();
    let builds = loop {
        let list = api
            .list_builds(ListBuildsRequest {
                project: PROJECT.into(),
                limit: 10_000,
                ..Default::default()
            })
            .await
            .map_err(|source| ChaosError::Grpc {
                what: "ListBuilds",
                source,
            })?
            .into_inner()
            .builds;
        let open = list
            .iter()
            .filter(|b| accepted.values().any(|id| *id == b.id))
            .filter(|b| !state(b).is_terminal())
            .count();
        if open == 0 || drain_t0.elapsed() > DRAIN {
            break list;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let drain = drain_t0.elapsed();

    // Count: each accepted delivery has exactly one build, and it ended.
    let mut report = ChaosReport {
        drain,
        ..Default::default()
    };
    let mut by_trigger: HashMap<&str, Vec<&hive_proto::v1::Build>> = HashMap::new();
    for b in &builds {
        if let Some(d) = b
            .trigger
            .strip_prefix("webhook:")
            .or_else(|| b.trigger.strip_prefix("api:"))
        {
            by_trigger.entry(d).or_default().push(b);
        }
    }
    let mut duplicated: BTreeMap<String, String> = {
        let l = lock(&ledger);
        report.deliveries = l.sent.len();
        report.api = l
            .sent
            .values()
            .filter(|s| matches!(s.via, Via::Api { .. }))
            .count();
        report.redeliveries = l.redeliveries;
        report.retried = l.retried;
        l.doubled.clone()
    };
    report.builds = accepted.len();
    report.unanswered = report.deliveries - accepted.len();
    let mut suspects = BTreeSet::new();
    for (delivery, build) in &accepted {
        let found = by_trigger
            .get(delivery.as_str())
            .cloned()
            .unwrap_or_default();
        if found.len() > 1 {
            let ids: Vec<&str> = found.iter().map(|b| b.id.as_str()).collect();
            duplicated.insert(
                delivery.clone(),
                format!("delivery {delivery} has {} builds: {ids:?}", found.len()),
            );
            suspects.extend(ids.iter().map(|s| s.to_string()));
        }
        match found.iter().find(|b| b.id == *build) {
            Some(b) if state(b).is_terminal() => {
                *report
                    .states
                    .entry(state(b).short_name().to_string())
                    .or_default() += 1;
                *report.attempts.entry(b.attempt).or_default() += 1;
            }
            Some(b) => {
                report.lost += 1;
                report.evidence.push(format!(
                    "build {build} of delivery {delivery} still {} after {:?}: {}",
                    state(b).short_name(),
                    DRAIN,
                    b.message
                ));
                suspects.insert(build.clone());
            }
            None => {
                report.lost += 1;
                report.evidence.push(format!(
                    "build {build} of delivery {delivery} is not in the store"
                ));
            }
        }
    }
    report.duplicated = duplicated.len();
    report.evidence.extend(duplicated.into_values());
    for id in &suspects {
        if let Ok(b) = api.get_build(GetBuildRequest { id: id.clone() }).await {
            let b = b.into_inner();
            let path: Vec<String> = b
                .transitions
                .iter()
                .map(|t| {
                    let st = BuildState::try_from(t.state).unwrap_or_default();
                    format!("{}@{}", st.short_name(), t.at_ms)
                })
                .collect();
            report.evidence.push(format!(
                "build {id}: attempt {}, box {}, cell {}, {}: {}",
                b.attempt,
                b.box_id,
                b.cell_id,
                path.join(" -> "),
                b.message
            ));
        }
    }

    // The sampler has watched every run to its end.
    sampler_stop.store(true, Ordering::SeqCst);
    let _ = tokio::task::spawn_blocking(move || sampler.join()).await;
    let mut cells = {
        let s = lock(&seen);
        report.overlapping = s.overlaps.len();
        report.runs_seen = s.running.len();
        report.evidence.extend(s.overlaps.values().cloned());
        eprintln!("chaos: the sampler looked {} times", s.samples);
        s.cells.clone()
    };
    cells.extend(builds.iter().map(|b| b.cell_id.clone()));
    cells.remove("");
    {
        let k = lock(&kills);
        report.cp_kills = k.cp;
        report.db_kills = k.db;
        report.long_cp_outages = k.cp_long;
        report.box_kills = k.boxes;
        report.long_box_outages = k.long;
        report.cell_kills = k.cells;
    }

    // Graceful stops; then nothing of the boxes may be left.
    let build_ids: BTreeSet<String> = builds.iter().map(|b| b.id.clone()).collect();
    let logs_dir = opts.logs_dir.clone();
    let (found, unclean) = tokio::task::spawn_blocking(move || {
        let mut d = d;
        let mut unclean = Vec::new();
        for b in &mut d.boxes {
            if !b.stop() {
                unclean.push(format!(
                    "box {} did not exit cleanly on SIGTERM",
                    b.opts.tag
                ));
            }
        }
        if let Some(cp) = d.cp.as_mut() {
            if !cp.stop() {
                unclean.push("the control plane did not exit cleanly on SIGTERM".into());
            }
        }
        let t = Instant::now();
        let found = loop {
            let found = leftovers(&d.boxes, &cells, &build_ids);
            if found.is_empty() || t.elapsed() > Duration::from_secs(10) {
                break found;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if let Some(dir) = logs_dir {
            keep_logs(&d, &dir);
        }
        (found, unclean)
    })
    .await
    .map_err(|e| ChaosError::Driver(e.to_string()))?;
    report.orphans = found.len();
    report.evidence.extend(found);
    report.evidence.extend(unclean);
    drop(git);
    Ok(report)
}

fn state(b: &hive_proto::v1::Build) -> BuildState {
    BuildState::try_from(b.state).unwrap_or_default()
}

/// Copies the control plane's logs (one per start), the boxes' logs and the fault timeline.
fn keep_logs(d: &Daemons, dir: &Path) {
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("chaos: keep logs in {}: {e}", dir.display());
        return;
    }
    if let Some(cp) = &d.cp {
        for e in std::fs::read_dir(&cp.data_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("control-plane-") && name.ends_with(".log") {
                let _ = std::fs::copy(e.path(), dir.join(&name));
            }
        }
    }
    for b in &d.boxes {
        let _ = std::fs::write(dir.join(format!("box-{}.log", b.opts.tag)), b.log());
    }
    if let Some(pg) = &d.pg {
        let _ = std::fs::write(dir.join("postgres.log"), pg.log());
    }
    let _ = std::fs::write(dir.join("faults.txt"), d.timeline.join("\n") + "\n");
    eprintln!("chaos: logs kept in {}", dir.display());
}

/// `hive-bench chaos`: runs the soak, prints the details and the one final line; fails when
/// the run could not count or counted anything wrong (or killed nothing).
pub async fn cli(opts: ChaosOptions) -> std::process::ExitCode {
    eprintln!(
        "chaos: {} s at {}/s, seed {}, step sleep {} s",
        opts.seconds, opts.rate, opts.seed, opts.step_secs
    );
    match run(opts).await {
        Ok(report) => {
            print!("{}", report.details());
            println!("{}", report.line());
            if report.passed() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("hive-bench chaos: {}", hive_sys::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
