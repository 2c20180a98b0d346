//! Issue 11, the cell's side: a cell daemon shares its VM with the build, so every answer the box
//! reads from a cell (`RunBuild`, the `Events` stream, `ReadArtifact`, `Health`, `PrepareTunnel`,
//! `Cancel`) is hostile. The real box agent and warm pool run against a real in-process control
//! plane (SQLite file store) over a fake cell backend: each cell is a tonic `CellAgent` server on
//! a Unix socket that plays a seeded script of misbehaviour (absurd sequence numbers, repeats,
//! messages at the gRPC size limit and past it, unknown enum values, non-terminal ends, thousands
//! of artefacts, artefact reads that lie, streams that end, fail or hang, answers that never
//! come, a cell that dies). For every case: nothing in the process panics, the build ends in the
//! state the box should have reported within a bound, its stored message is bounded, the box
//! releases the cell, stays connected with a bounded outbox, and still runs a well-behaved build
//! to SUCCEEDED at the end.
//!
//! `HIVE_FUZZ_SEED` (decimal or 0x-hex) replays a seed; `HIVE_FUZZ_CASES` changes the number of
//! cases, `HIVE_FUZZ_KINDS` (indices into `KINDS`) keeps only some kinds. Every case says its
//! seed, index and what its cell did when it fails.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use hive_box::agent::outbox::OUTBOX_CAP_BYTES;
use hive_box::agent::{Agent, AgentConfig};
use hive_box::backend::{BackendError, CellBackend, CellRecord, CellSpec, Leftover};
use hive_box::cell::{Cell, CellError, Connector};
use hive_box::config::builtin_shape;
use hive_box::pool::{ClassConfig, Pool};
use hive_control_plane::server::{self, Config};
use hive_proto::auth::Bearer;
use hive_proto::v1::cell_agent_server::{CellAgent, CellAgentServer};
use hive_proto::v1::control_plane_client::ControlPlaneClient;
use hive_proto::v1::{
    ArtifactData, ArtifactFile, Build, BuildState, CellCancelReply, CellCancelRequest, CellEvent,
    CellEventKind, CellEventsRequest, CellHealthReply, CellHealthRequest, CreateNetworkRequest,
    CreateProjectRequest, GetBuildRequest, ListArtifactsRequest, ListBuildsRequest, LogStream,
    PrepareTunnelReply, PrepareTunnelRequest, ReadArtifactRequest, RunBuildReply, RunBuildRequest,
    ShutdownReply, ShutdownRequest, SubmitBuildRequest,
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// tonic's default largest message, which the box's cell client decodes at most.
const GRPC_LIMIT: usize = 4 * 1024 * 1024;
/// The control plane cuts a build's message to this many bytes and marks the cut with `…`.
const STORED_MESSAGE_MAX: usize =
    hive_control_plane::grpc::boxes::MAX_UPDATE_MESSAGE + '…'.len_utf8();
/// The control plane's artefact cap in these tests (and so the assignments').
const ARTIFACT_CAP: u64 = 16 * 1024 * 1024;
/// The box's timeout for one call into a cell, kept short so hanging cells cost little.
const CELL_CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Timeout of the `short` project, whose cases only end by a timeout.
const SHORT_TIMEOUT_SECS: u32 = 3;
/// How long the slowest cases may take to end in the control plane: they end by the box's own
/// backstop (a cell that never sends an event: the timeout plus 30 s) or by the patience it has
/// for an event stream it cannot open (20 s).
const SLOW: Duration = Duration::from_secs(50);
/// How long any other case may take: its cell ends it at once, or after artefact reads that
/// each take the box's cell call timeout a few times.
const QUICK: Duration = Duration::from_secs(25);

// ---------------------------------------------------------------------------------------------
// Panics anywhere in the process (a build task, the link, the control plane's tasks) are
// recorded: tokio catches a panic in a spawned task and only its JoinHandle would tell.

static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static HOOK: Once = Once::new();

thread_local! {
    /// Set on a test function's own thread: its panics (assertions) fail that test anyway,
    /// and must not fail another test running beside it in the same process.
    static TEST_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn record_panics() {
    TEST_THREAD.with(|t| t.set(true));
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !TEST_THREAD.with(|t| t.get()) {
                let thread = std::thread::current();
                let name = thread.name().unwrap_or("<unnamed>");
                PANICS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("thread {name}: {info}"));
            }
            previous(info);
        }));
    });
}

fn panics() -> Vec<String> {
    PANICS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

// ---------------------------------------------------------------------------------------------
// A small seeded PRNG (SplitMix64): reproducible cases without another crate.

#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    fn pick<T: Clone>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize].clone()
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

fn seed() -> u64 {
    match std::env::var("HIVE_FUZZ_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("HIVE_FUZZ_SEED {s:?} is not a number"))
        }
        Err(_) => 0x11_ce11_5eed,
    }
}

fn now_ms() -> i64 {
    hive_sys::now_ms()
}

// ---------------------------------------------------------------------------------------------
// What a fake cell does: a script per build, chosen by the build's revision.

/// One step of a cell's `Events` stream. A cursor over the script survives across `Events` calls:
/// a call that ends (or fails) at an item is continued after it by the box's next call.
#[derive(Debug, Clone)]
enum Item {
    Ev(CellEvent),
    /// The stream ends here without BUILD_FINISHED.
    End,
    /// The stream fails here with this status message.
    Fail(String),
    Pause(Duration),
    /// The stream stays open and says nothing more, until the box hangs up.
    Silence,
    /// The cell daemon "exits": its socket stops answering and `is_alive` turns false.
    Die,
    /// Log events of `piece` bytes with rising numbers until `total` bytes went out, whatever
    /// the box asks (a build that ignores a cancel and floods its output).
    Flood {
        piece: usize,
        total: usize,
    },
}

/// How a unary call is answered.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Answer {
    Ok,
    /// RunBuild: `accepted = false`.
    Refuse,
    Fail,
    /// Never: the call waits until the cell is destroyed.
    Hang,
}

/// How one artefact is served by `ReadArtifact`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Serve {
    Good,
    /// Pieces that claim another offset than asked.
    WrongOffset,
    /// A piece without bytes.
    Empty,
    /// More bytes than the artefact's listed size.
    Overlong,
    /// Half of what is left, then the stream ends.
    EndEarly,
    /// An error status instead of a stream.
    Fail,
    /// No answer at all.
    Hang,
    /// One piece, then silence.
    HangMid,
    /// The whole file in one piece as large as a message may be.
    OnePiece,
}

#[derive(Debug, Clone)]
enum Tunnel {
    Key(String),
    Fail,
    Hang,
}

#[derive(Debug, Clone)]
struct Script {
    /// What the case does, for failure messages.
    what: String,
    /// fuzz (timeout 60 s: only the box ends its builds), short (timeout 3 s) or privnet (a
    /// private network).
    project: &'static str,
    run_build: Answer,
    run_delay: Duration,
    /// `Events` calls refused with an error before one is answered.
    open_failures: u32,
    /// `Events` never answers (not even the response headers).
    open_hangs: bool,
    items: Vec<Item>,
    /// Size and behaviour of each artefact path the script's BUILD_FINISHED lists.
    artifacts: HashMap<String, (u64, Serve)>,
    cancel: Answer,
    tunnel: Option<Tunnel>,
    /// The states the control plane may end the build in.
    expect: Vec<BuildState>,
    /// Text the build's stored message must hold.
    message_has: Option<&'static str>,
    /// How long the build may take to end in the control plane.
    within: Duration,
    /// How many of its artefacts must arrive whole at the control plane.
    complete_artifacts: usize,
}

impl Script {
    fn new(what: impl Into<String>, expect: BuildState) -> Self {
        Script {
            what: what.into(),
            project: "fuzz",
            run_build: Answer::Ok,
            run_delay: Duration::ZERO,
            open_failures: 0,
            open_hangs: false,
            items: Vec::new(),
            artifacts: HashMap::new(),
            cancel: Answer::Ok,
            tunnel: None,
            expect: vec![expect],
            message_has: None,
            within: QUICK,
            complete_artifacts: 0,
        }
    }
}

fn log_event(seq: u64, data: Vec<u8>) -> CellEvent {
    CellEvent {
        seq,
        kind: CellEventKind::Log as i32,
        stream: LogStream::Stdout as i32,
        data,
        at_ms: now_ms(),
        ..Default::default()
    }
}

fn step_event(seq: u64, kind: CellEventKind, step: u32, exit_code: i32) -> CellEvent {
    CellEvent {
        seq,
        kind: kind as i32,
        step,
        exit_code,
        at_ms: now_ms(),
        ..Default::default()
    }
}

fn finished(seq: u64, state: i32, exit_code: i32, message: String) -> CellEvent {
    CellEvent {
        seq,
        kind: CellEventKind::BuildFinished as i32,
        state,
        exit_code,
        message,
        at_ms: now_ms(),
        ..Default::default()
    }
}

const TERMINAL: [BuildState; 4] = [
    BuildState::Succeeded,
    BuildState::Failed,
    BuildState::Cancelled,
    BuildState::TimedOut,
];

/// 0 to 3 ordinary log lines with dense sequence numbers from `*seq`.
fn prelude(rng: &mut Rng, items: &mut Vec<Item>, seq: &mut u64, at_least: u64) {
    for _ in 0..rng.range(at_least, 3) {
        let line = format!("line {} of a build\n", *seq).into_bytes();
        items.push(Item::Ev(log_event(*seq, line)));
        *seq += 1;
    }
}

/// A terminal end with a random state; the script expects it.
fn finish(rng: &mut Rng, s: &mut Script, seq: u64) {
    let state = rng.pick(&TERMINAL);
    let exit = if state == BuildState::Succeeded { 0 } else { 1 };
    s.items.push(Item::Ev(finished(
        seq,
        state as i32,
        exit,
        format!("the build ended {}", state.short_name()),
    )));
    s.expect = vec![state];
}

/// The well-behaved build every run ends with.
fn plain() -> Script {
    let mut s = Script::new("a well-behaved cell", BuildState::Succeeded);
    s.items = vec![
        Item::Ev(step_event(0, CellEventKind::StepStarted, 0, 0)),
        Item::Ev(log_event(1, b"hello from a well-behaved cell\n".to_vec())),
        Item::Ev(step_event(2, CellEventKind::StepFinished, 0, 0)),
        Item::Ev(finished(
            3,
            BuildState::Succeeded as i32,
            0,
            "all steps passed".into(),
        )),
    ];
    s
}

/// The regression of issue 11: an event numbered u64::MAX. The box takes `seq + 1` as the next
/// number it asks for; unchecked, that overflowed (a panic in a debug build, killing the build's
/// task and leaking its cell).
fn seq_max_exact() -> Script {
    let mut s = Script::new(
        "an event numbered u64::MAX, then BUILD_FINISHED numbered u64::MAX",
        BuildState::Succeeded,
    );
    s.items = vec![
        Item::Ev(log_event(u64::MAX, b"the last number there is\n".to_vec())),
        // Numbered below what the box now expects: it must be skipped, not relayed.
        Item::Ev(finished(3, BuildState::Failed as i32, 1, "stale".into())),
        Item::Ev(finished(
            u64::MAX,
            BuildState::Succeeded as i32,
            0,
            "done at u64::MAX".into(),
        )),
    ];
    s
}

fn b_plain(rng: &mut Rng) -> Script {
    let mut s = Script::new("ordinary events", BuildState::Succeeded);
    let mut seq = 0;
    prelude(rng, &mut s.items, &mut seq, 0);
    s.items
        .push(Item::Ev(step_event(seq, CellEventKind::StepStarted, 0, 0)));
    s.items.push(Item::Ev(step_event(
        seq + 1,
        CellEventKind::StepFinished,
        0,
        0,
    )));
    finish(rng, &mut s, seq + 2);
    s
}

fn b_seq_max(rng: &mut Rng) -> Script {
    let mut s = Script::new("events numbered u64::MAX", BuildState::Succeeded);
    let mut seq = 0;
    prelude(rng, &mut s.items, &mut seq, 0);
    for _ in 0..rng.range(1, 4) {
        s.items.push(Item::Ev(log_event(
            u64::MAX,
            b"at the end of u64\n".to_vec(),
        )));
    }
    // Lower numbers after u64::MAX are old news to the box.
    s.items
        .push(Item::Ev(log_event(seq, b"skipped\n".to_vec())));
    finish(rng, &mut s, u64::MAX);
    s
}

fn b_seq_chaos(rng: &mut Rng) -> Script {
    let mut s = Script::new(
        "sequence numbers going backwards, jumping and repeating",
        BuildState::Succeeded,
    );
    let mut seq = 0u64;
    let mut max = 0u64;
    for _ in 0..rng.range(5, 40) {
        seq = match rng.below(4) {
            0 => seq.saturating_add(1),
            1 => seq.saturating_add(rng.range(2, 1 << 40)),
            2 => seq.saturating_sub(rng.range(1, 1000)),
            _ => seq,
        };
        max = max.max(seq);
        s.items.push(Item::Ev(log_event(
            seq,
            format!("seq {seq}\n").into_bytes(),
        )));
    }
    finish(rng, &mut s, max + 1);
    s
}

fn b_repeats(rng: &mut Rng) -> Script {
    let mut s = Script::new("every event repeated many times", BuildState::Succeeded);
    let mut seq = 0;
    for _ in 0..rng.range(1, 5) {
        for _ in 0..rng.range(1, 50) {
            s.items
                .push(Item::Ev(log_event(seq, b"again and again\n".to_vec())));
        }
        seq += 1;
    }
    let before = s.items.len();
    finish(rng, &mut s, seq);
    let end = s.items[before].clone();
    for _ in 0..rng.range(1, 20) {
        s.items.push(end.clone());
    }
    s
}

fn b_huge_data(rng: &mut Rng) -> Script {
    let mut s = Script::new("log events of megabytes", BuildState::Succeeded);
    let mut seq = 0;
    prelude(rng, &mut s.items, &mut seq, 0);
    for _ in 0..rng.range(1, 3) {
        let n = rng.range(1 << 20, GRPC_LIMIT as u64 * 39 / 40) as usize;
        s.items.push(Item::Ev(log_event(seq, rng.bytes(n))));
        seq += 1;
    }
    finish(rng, &mut s, seq);
    s
}

/// A log event whose encoding is `slack` bytes short of the gRPC limit: the cell may send it,
/// and the box's log chunk around its bytes (build id, numbers) must still reach the control
/// plane, whose limit is the same 4 MiB.
fn edge_event(seq: u64, slack: usize) -> CellEvent {
    let mut ev = log_event(seq, vec![b'e'; GRPC_LIMIT]);
    let over = ev.encoded_len() - (GRPC_LIMIT - slack);
    ev.data.truncate(GRPC_LIMIT - over);
    assert_eq!(ev.encoded_len(), GRPC_LIMIT - slack);
    ev
}

fn b_edge_data(rng: &mut Rng) -> Script {
    let mut s = Script::new(
        "a log event right at the 4 MiB message limit",
        BuildState::Succeeded,
    );
    let mut seq = 0;
    prelude(rng, &mut s.items, &mut seq, 0);
    s.items
        .push(Item::Ev(edge_event(seq, rng.range(0, 64) as usize)));
    finish(rng, &mut s, seq + 1);
    s
}

fn b_over_limit(rng: &mut Rng) -> Script {
    // The box cannot decode them, so it opens the stream again and again; then the cell goes
    // silent and the control plane's timeout ends the build.
    let mut s = Script::new(
        "log events past the 4 MiB message limit",
        BuildState::TimedOut,
    );
    s.project = "short";
    let mut seq = 0;
    prelude(rng, &mut s.items, &mut seq, 1);
    for _ in 0..rng.range(1, 3) {
        let n = GRPC_LIMIT + rng.range(1, 64 * 1024) as usize;
        s.items.push(Item::Ev(log_event(seq, vec![b'o'; n])));
        seq += 1;
    }
    s.items.push(Item::Silence);
    s
}

fn b_enum_chaos(rng: &mut Rng) -> Script {
    let mut s = Script::new(
        "unknown event kinds, log streams and end states",
        BuildState::Failed,
    );
    let mut seq = 0;
    for _ in 0..rng.range(2, 10) {
        let mut ev = log_event(seq, b"odd\n".to_vec());
        if rng.one_in(2) {
            ev.kind = rng.pick(&[-1, 0, 5, 99, i32::MAX, i32::MIN]);
        }
        ev.stream = rng.pick(&[-7, 0, 4, 1000, i32::MAX, i32::MIN]);
        s.items.push(Item::Ev(ev));
        seq += 1;
    }
    let state = rng.pick(&[-1, 8, 99, i32::MAX, i32::MIN]);
    s.items
        .push(Item::Ev(finished(seq, state, 3, "odd end".into())));
    s
}

fn b_non_terminal(rng: &mut Rng) -> Script {
    let mut s = Script::new(
        "BUILD_FINISHED in a state that is no end",
        BuildState::Failed,
    );
    let mut seq = 0;
    prelude(rng, &mut s.items, &mut seq, 0);
    let state = rng.pick(&[
        BuildState::Unspecified,
        BuildState::Queued,
        BuildState::Placed,
        BuildState::Running,
    ]);
    s.what = format!("BUILD_FINISHED in state {}", state.short_name());
    s.items
        .push(Item::Ev(finished(seq, state as i32, 0, "not over".into())));
    s
}

/// BUILD_FINISHED with a message that takes the event right to the 4 MiB limit.
fn b_edge_message(rng: &mut Rng) -> Script {
    let mut s = Script::new(
        "a BUILD_FINISHED message right at the 4 MiB message limit",
        BuildState::Succeeded,
    );
    let state = rng.pick(&TERMINAL);
    let slack = rng.range(0, 64) as usize;
    let mut end = finished(0, state as i32, 0, "m".repeat(GRPC_LIMIT));
    let over = end.encoded_len() - (GRPC_LIMIT - slack);
    end.message.truncate(GRPC_LIMIT - over);
    assert_eq!(end.encoded_len(), GRPC_LIMIT - slack);
    s.items.push(Item::Ev(end));
    s.expect = vec![state];
    s
}

fn b_huge_message(rng: &mut Rng) -> Script {
    let mut s = Script::new(
        "a BUILD_FINISHED message of megabytes",
        BuildState::Succeeded,
    );
    let mut seq = 0;
    prelude(rng, &mut s.items, &mut seq, 0);
    // Multi-byte characters, so a cut in the wrong place would split one.
    let unit = rng.pick(&["é", "€", "𝄞", "ab€", "x"]);
    let target = rng.range(64 * 1024, GRPC_LIMIT as u64 - 512) as usize;
    let message = unit.repeat(target / unit.len());
    let state = rng.pick(&TERMINAL);
    s.items
        .push(Item::Ev(finished(seq, state as i32, 0, message)));
    s.expect = vec![state];
    s
}

/// Content of artefact `path` at `offset`.
fn artifact_byte(path: &str, offset: u64) -> u8 {
    (offset as u8).wrapping_mul(31) ^ (path.len() as u8)
}

fn b_many_artifacts(rng: &mut Rng) -> Script {
    let mut s = Script::new("thousands of artefacts", BuildState::Succeeded);
    let mut seq = 0;
    prelude(rng, &mut s.items, &mut seq, 0);
    let mut list = Vec::new();
    // First names the control plane refuses (or may): the box must not trip over them.
    for path in [
        "../../etc/passwd".to_string(),
        "/etc/shadow".into(),
        String::new(),
        "a\0b".into(),
        "ü/é.txt".into(),
        "x".repeat(2000),
    ] {
        s.artifacts.insert(path.clone(), (3, Serve::Good));
        list.push(ArtifactFile { path, size: 3 });
    }
    for i in 0..rng.range(1000, 2500) {
        let path = format!("out/{i}.bin");
        let size = if rng.one_in(10) {
            rng.range(1, 2048)
        } else {
            0
        };
        s.artifacts.insert(path.clone(), (size, Serve::Good));
        list.push(ArtifactFile { path, size });
    }
    let mut end = finished(seq, BuildState::Succeeded as i32, 0, "many files".into());
    end.artifacts = list;
    s.items.push(Item::Ev(end));
    // The control plane stores (or refuses) each of the thousand the box passes on one at a
    // time: about 10 ms each in a debug build. It keeps a thousand at most; the box must not
    // have dropped the ordinary ones among the first thousand for the rest of the list.
    s.within = SLOW;
    s.complete_artifacts = 990;
    s
}

fn b_artifact_sizes(rng: &mut Rng) -> Script {
    let mut s = Script::new("artefacts of absurd sizes", BuildState::Succeeded);
    let mut seq = 0;
    prelude(rng, &mut s.items, &mut seq, 0);
    let mut list = Vec::new();
    let sizes = [
        rng.range(1, 1000),
        u64::MAX,
        u64::MAX - 1,
        ARTIFACT_CAP + 1,
        1 << 63,
    ];
    for (i, size) in sizes.into_iter().enumerate() {
        let path = format!("big/{i}");
        s.artifacts.insert(path.clone(), (size, Serve::Good));
        list.push(ArtifactFile { path, size });
    }
    let state = rng.pick(&TERMINAL);
    let mut end = finished(seq, state as i32, 0, "absurd sizes".into());
    end.artifacts = list;
    s.items.push(Item::Ev(end));
    s.expect = vec![state];
    // The first, of a plausible size, arrives; the rest are past the cap.
    s.complete_artifacts = 1;
    s
}

fn b_artifact_reads(rng: &mut Rng) -> Script {
    let mut s = Script::new("artefact reads that lie", BuildState::Succeeded);
    let mut seq = 0;
    prelude(rng, &mut s.items, &mut seq, 0);
    let mut list = Vec::new();
    let mut kinds = Vec::new();
    for i in 0..rng.range(3, 8) {
        let path = format!("lies/{i}");
        let size = rng.range(1, 600 * 1024);
        let serve = rng.pick(&[
            Serve::Good,
            Serve::WrongOffset,
            Serve::Empty,
            Serve::Overlong,
            Serve::EndEarly,
            Serve::Fail,
            Serve::Hang,
            Serve::HangMid,
        ]);
        kinds.push(format!("{serve:?}"));
        s.artifacts.insert(path.clone(), (size, serve));
        list.push(ArtifactFile { path, size });
    }
    s.what = format!("artefact reads that lie: {}", kinds.join(", "));
    let mut end = finished(seq, BuildState::Succeeded as i32, 0, "lying files".into());
    end.artifacts = list;
    s.items.push(Item::Ev(end));
    s
}

fn b_artifact_path_edge(rng: &mut Rng) -> Script {
    let mut s = Script::new(
        "an artefact whose path is almost 4 MiB",
        BuildState::Succeeded,
    );
    let mut seq = 0;
    prelude(rng, &mut s.items, &mut seq, 0);
    let path = "p/".repeat((GRPC_LIMIT - 8 * 1024) / 2);
    let size = rng.range(64 * 1024, 1 << 20);
    s.artifacts.insert(path.clone(), (size, Serve::Good));
    let mut end = finished(seq, BuildState::Succeeded as i32, 0, "long path".into());
    end.artifacts = vec![ArtifactFile { path, size }];
    s.items.push(Item::Ev(end));
    s
}

/// An artefact read in one piece right at the 4 MiB limit: the box's chunk around it (path,
/// ids, size) would pass the control plane's limit.
fn b_artifact_edge_piece(rng: &mut Rng) -> Script {
    let mut s = Script::new(
        "an artefact piece right at the 4 MiB message limit",
        BuildState::Succeeded,
    );
    let slack = rng.range(0, 64) as usize;
    let path = format!("edge/{}.bin", rng.below(1000));
    let probe = ArtifactData {
        offset: 0,
        data: vec![0; GRPC_LIMIT],
    };
    let size = (GRPC_LIMIT - (probe.encoded_len() - (GRPC_LIMIT - slack))) as u64;
    s.artifacts.insert(path.clone(), (size, Serve::OnePiece));
    let mut end = finished(0, BuildState::Succeeded as i32, 0, "edge piece".into());
    end.artifacts = vec![ArtifactFile { path, size }];
    s.items.push(Item::Ev(end));
    s.complete_artifacts = 1;
    s
}

fn b_stream_ends(rng: &mut Rng) -> Script {
    let mut s = Script::new("event streams that end early", BuildState::Succeeded);
    let mut seq = 0;
    for _ in 0..rng.range(1, 6) {
        prelude(rng, &mut s.items, &mut seq, 1);
        s.items.push(Item::End);
    }
    finish(rng, &mut s, seq);
    s
}

fn b_stream_errors(rng: &mut Rng) -> Script {
    let mut s = Script::new("event streams that fail", BuildState::Succeeded);
    s.open_failures = rng.range(0, 4) as u32;
    let mut seq = 0;
    for _ in 0..rng.range(1, 4) {
        prelude(rng, &mut s.items, &mut seq, 0);
        let junk = String::from_utf8_lossy(&rng.bytes(200)).into_owned();
        s.items.push(Item::Fail(junk));
    }
    finish(rng, &mut s, seq);
    s
}

fn b_run_refused(_: &mut Rng) -> Script {
    let mut s = Script::new("RunBuild answers accepted=false", BuildState::Failed);
    s.run_build = Answer::Refuse;
    s.message_has = Some("refused");
    s
}

fn b_run_error(_: &mut Rng) -> Script {
    let mut s = Script::new("RunBuild answers an error", BuildState::Failed);
    s.run_build = Answer::Fail;
    s.message_has = Some("RunBuild");
    s
}

fn b_run_hangs(_: &mut Rng) -> Script {
    let mut s = Script::new("RunBuild never answers", BuildState::Failed);
    s.run_build = Answer::Hang;
    s.message_has = Some("did not answer RunBuild");
    s
}

fn b_events_hang(_: &mut Rng) -> Script {
    let mut s = Script::new("Events never answers", BuildState::Failed);
    s.project = "short";
    s.open_hangs = true;
    s.message_has = Some("event stream");
    s.within = SLOW;
    s
}

fn b_silent_from_start(rng: &mut Rng) -> Script {
    // No event ever: the control plane never sees it run, so only the box's backstop (the
    // timeout and 30 s) ends it.
    let mut s = Script::new(
        "an event stream that never says anything",
        BuildState::TimedOut,
    );
    s.project = "short";
    s.cancel = rng.pick(&[Answer::Ok, Answer::Fail, Answer::Hang]);
    s.items.push(Item::Silence);
    s.within = SLOW;
    s
}

fn b_silent_after_start(rng: &mut Rng) -> Script {
    let mut s = Script::new(
        "an event stream that goes silent; Cancel answered badly",
        BuildState::TimedOut,
    );
    s.project = "short";
    s.cancel = rng.pick(&[Answer::Ok, Answer::Fail, Answer::Hang]);
    let mut seq = 0;
    prelude(rng, &mut s.items, &mut seq, 1);
    s.items.push(Item::Silence);
    s
}

fn b_ignores_cancel(rng: &mut Rng) -> Script {
    let mut s = Script::new(
        "a cell that floods its log and ignores the cancel",
        BuildState::TimedOut,
    );
    s.project = "short";
    s.cancel = rng.pick(&[Answer::Ok, Answer::Fail, Answer::Hang]);
    let mut seq = 0;
    prelude(rng, &mut s.items, &mut seq, 1);
    s.items.push(Item::Flood {
        piece: rng.range(1024, 256 * 1024) as usize,
        total: rng.range(1 << 20, 24 << 20) as usize,
    });
    s.items.push(Item::Silence);
    s
}

fn b_times_and_steps(rng: &mut Rng) -> Script {
    let mut s = Script::new(
        "absurd times, step numbers and exit codes",
        BuildState::Succeeded,
    );
    let mut seq = 0;
    for _ in 0..rng.range(3, 12) {
        let kind = rng.pick(&[
            CellEventKind::Log,
            CellEventKind::StepStarted,
            CellEventKind::StepFinished,
        ]);
        let mut ev = step_event(
            seq,
            kind,
            rng.pick(&[u32::MAX, u32::MAX - 1, 1 << 31, 0]),
            rng.pick(&[i32::MIN, i32::MAX, -1, 255]),
        );
        ev.at_ms = rng.pick(&[i64::MIN, -1, 0, i64::MAX, i64::MAX - 1, 1]);
        ev.data = b"when?\n".to_vec();
        s.items.push(Item::Ev(ev));
        seq += 1;
    }
    let state = rng.pick(&TERMINAL);
    let mut end = finished(seq, state as i32, i32::MIN, "odd times".into());
    end.at_ms = rng.pick(&[i64::MIN, i64::MAX]);
    end.step = u32::MAX;
    s.items.push(Item::Ev(end));
    s.expect = vec![state];
    s
}

fn b_cell_dies(rng: &mut Rng) -> Script {
    let mut s = Script::new("the cell dies during the build", BuildState::Failed);
    let mut seq = 0;
    prelude(rng, &mut s.items, &mut seq, 0);
    if rng.one_in(2) {
        s.items
            .push(Item::Pause(Duration::from_millis(rng.range(1, 300))));
    }
    s.items.push(Item::Die);
    s.message_has = Some("died");
    s
}

fn b_private_network(rng: &mut Rng) -> Script {
    let key = match rng.below(4) {
        0 => Tunnel::Key(format!("{}=", "A".repeat(43))),
        1 => Tunnel::Key(String::from_utf8_lossy(&rng.bytes(100)).into_owned()),
        2 => Tunnel::Fail,
        _ => Tunnel::Hang,
    };
    private_network(rng, key)
}

/// A public key as large as the answer may be: the box's key exchange request around it would
/// pass the control plane's message limit.
fn b_tunnel_huge_key(rng: &mut Rng) -> Script {
    let slack = rng.range(0, 64) as usize;
    let reply = PrepareTunnelReply {
        public_key: "k".repeat(GRPC_LIMIT),
    };
    let over = reply.encoded_len() - (GRPC_LIMIT - slack);
    private_network(rng, Tunnel::Key("k".repeat(GRPC_LIMIT - over)))
}

fn private_network(rng: &mut Rng, key: Tunnel) -> Script {
    let mut s = Script::new(
        format!(
            "PrepareTunnel answers {}",
            match &key {
                Tunnel::Key(k) => format!("a key of {} bytes", k.len()),
                other => format!("{other:?}"),
            }
        ),
        BuildState::Failed,
    );
    s.project = "privnet";
    s.tunnel = Some(key);
    s.message_has = Some("private network");
    // Should RunBuild come after all, the build still ends.
    let mut seq = 0;
    prelude(rng, &mut s.items, &mut seq, 0);
    s.items.push(Item::Ev(finished(
        seq,
        BuildState::Failed as i32,
        1,
        "should not have run".into(),
    )));
    s
}

fn b_log_flood(rng: &mut Rng) -> Script {
    let mut s = Script::new("thousands of tiny log events", BuildState::Succeeded);
    let mut seq = 0;
    for _ in 0..rng.range(2000, 5000) {
        let n = rng.range(1, 100) as usize;
        s.items.push(Item::Ev(log_event(seq, rng.bytes(n))));
        seq += 1;
    }
    finish(rng, &mut s, seq);
    s
}

fn b_finish_then_more(rng: &mut Rng) -> Script {
    let mut s = Script::new("events after BUILD_FINISHED", BuildState::Succeeded);
    let mut seq = 0;
    prelude(rng, &mut s.items, &mut seq, 0);
    finish(rng, &mut s, seq);
    let first = s.expect[0];
    let other = TERMINAL.iter().copied().find(|t| *t != first).unwrap();
    s.items
        .push(Item::Ev(log_event(seq + 1, b"after the end\n".to_vec())));
    s.items.push(Item::Ev(finished(
        seq + 2,
        other as i32,
        9,
        "a second end".into(),
    )));
    s
}

/// Every kind of case; case `i` of a run is kind `i % len` with its own random details.
const KINDS: &[fn(&mut Rng) -> Script] = &[
    b_seq_max,
    b_plain,
    b_seq_chaos,
    b_repeats,
    b_huge_data,
    b_edge_data,
    b_over_limit,
    b_enum_chaos,
    b_non_terminal,
    b_huge_message,
    b_edge_message,
    b_many_artifacts,
    b_artifact_sizes,
    b_artifact_reads,
    b_artifact_path_edge,
    b_artifact_edge_piece,
    b_stream_ends,
    b_stream_errors,
    b_run_refused,
    b_run_error,
    b_run_hangs,
    b_events_hang,
    b_silent_from_start,
    b_silent_after_start,
    b_ignores_cancel,
    b_times_and_steps,
    b_cell_dies,
    b_private_network,
    b_tunnel_huge_key,
    b_log_flood,
    b_finish_then_more,
];

/// The cases of a run: `n` seeded ones (only the kinds `HIVE_FUZZ_KINDS` lists, comma-separated
/// indices into [`KINDS`], when set: for replaying one kind of failure).
fn seeded_cases(seed: u64, n: usize) -> Vec<Script> {
    let only: Option<Vec<usize>> = std::env::var("HIVE_FUZZ_KINDS")
        .ok()
        .map(|v| v.split(',').filter_map(|k| k.trim().parse().ok()).collect());
    (0..n)
        .filter(|i| only.as_ref().is_none_or(|o| o.contains(&(i % KINDS.len()))))
        .map(|i| {
            let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0xA076_1D64_78BD_642F));
            let mut s = KINDS[i % KINDS.len()](&mut rng);
            // Some latency in front of RunBuild's answer, now and then.
            if s.run_build != Answer::Hang && rng.one_in(3) {
                s.run_delay = Duration::from_millis(rng.range(1, 300));
            }
            s
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The fake cell: a CellAgent server on a Unix socket.

/// How a cell answers Health, picked per cell when it is created.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Health {
    Normal,
    /// Ready, with megabytes of nonsense in every other field.
    Garbage,
    /// The first answer takes longer than the box waits for one.
    SlowFirst,
    /// The first answers are errors or not ready.
    FlakyFirst,
    /// Ready while it boots, then never again (the pool's health check replaces it).
    Decays,
}

struct FakeCell {
    id: String,
    socket: PathBuf,
    scripts: Arc<Vec<Arc<Script>>>,
    health: Health,
    health_calls: AtomicU32,
    alive: AtomicBool,
    killed: watch::Sender<bool>,
    /// The script RunBuild chose (by the build's revision).
    script: Mutex<Option<Arc<Script>>>,
    /// Position in the script's items; held by the one stream feeding at a time.
    cursor: tokio::sync::Mutex<usize>,
    events_calls: AtomicU32,
    /// What `record_build` said, as the real backends keep it on disk for the reaper.
    record: Mutex<CellRecord>,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl FakeCell {
    async fn killed(&self) {
        let mut rx = self.killed.subscribe();
        let _ = rx.wait_for(|k| *k).await;
    }

    /// Waits `d`; false if the cell was stopped meanwhile.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.killed() => false,
        }
    }

    /// Never answers; the call fails once the cell is gone.
    async fn hang<T>(&self) -> Result<T, Status> {
        self.killed().await;
        Err(Status::unavailable("the cell stopped"))
    }

    fn stop(&self) {
        self.alive.store(false, Ordering::SeqCst);
        self.killed.send_replace(true);
    }

    fn script(&self) -> Result<Arc<Script>, Status> {
        self.script
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| Status::failed_precondition("no build yet"))
    }
}

#[derive(Clone)]
struct CellService(Arc<FakeCell>);

type EventTx = mpsc::Sender<Result<CellEvent, Status>>;

/// Sends one item; false when the box hung up or the cell stopped.
async fn send(cell: &FakeCell, tx: &EventTx, item: Result<CellEvent, Status>) -> bool {
    tokio::select! {
        r = tx.send(item) => r.is_ok(),
        _ = cell.killed() => false,
    }
}

/// Feeds one `Events` stream from the script, from where the previous stream stopped.
async fn feed(cell: Arc<FakeCell>, script: Arc<Script>, tx: EventTx) {
    let mut cursor = cell.cursor.lock().await;
    loop {
        let Some(item) = script.items.get(*cursor) else {
            // Nothing more to say: the stream ends (as a real cell's does after the end).
            return;
        };
        let sent = match item {
            Item::Ev(ev) => send(&cell, &tx, Ok(ev.clone())).await,
            Item::End => {
                *cursor += 1;
                return;
            }
            Item::Fail(m) => {
                *cursor += 1;
                let _ = send(&cell, &tx, Err(Status::internal(m.clone()))).await;
                return;
            }
            Item::Pause(d) => cell.sleep(*d).await,
            Item::Silence => {
                tokio::select! {
                    _ = tx.closed() => {}
                    _ = cell.killed() => {}
                }
                return;
            }
            Item::Die => {
                cell.stop();
                return;
            }
            Item::Flood { piece, total } => {
                let mut seq = 1u64 << 40;
                let mut sent = 0;
                let mut ok = true;
                while ok && sent < *total {
                    ok = send(&cell, &tx, Ok(log_event(seq, vec![b'f'; *piece]))).await;
                    seq += 1;
                    sent += *piece;
                }
                ok
            }
        };
        if !sent {
            // The box hung up: the item is played again to its next stream.
            return;
        }
        *cursor += 1;
    }
}

#[tonic::async_trait]
impl CellAgent for CellService {
    async fn health(
        &self,
        _: Request<CellHealthRequest>,
    ) -> Result<Response<CellHealthReply>, Status> {
        let cell = &self.0;
        let n = cell.health_calls.fetch_add(1, Ordering::SeqCst);
        let mut reply = CellHealthReply {
            ready: true,
            cell_id: cell.id.clone(),
            version: "fake".into(),
            uptime_ms: u64::from(n),
            state: "idle".into(),
        };
        match cell.health {
            Health::Normal => {}
            Health::Garbage => {
                reply.cell_id = "c".repeat(1 << 20);
                reply.version = "\u{0}\u{feff}\u{202e}".repeat(10_000);
                reply.state = "running?".repeat(50_000);
                reply.uptime_ms = u64::MAX;
            }
            Health::SlowFirst if n == 0 => {
                if !cell.sleep(Duration::from_millis(1500)).await {
                    return Err(Status::unavailable("stopped"));
                }
            }
            Health::SlowFirst => {}
            Health::FlakyFirst if n < 3 => {
                if n.is_multiple_of(2) {
                    return Err(Status::unavailable("not yet"));
                }
                reply.ready = false;
            }
            Health::FlakyFirst => {}
            Health::Decays => reply.ready = n < 1,
        }
        Ok(Response::new(reply))
    }

    async fn run_build(
        &self,
        req: Request<RunBuildRequest>,
    ) -> Result<Response<RunBuildReply>, Status> {
        let cell = &self.0;
        let req = req.into_inner();
        let script = req
            .revision
            .strip_prefix("c0de")
            .and_then(|h| usize::from_str_radix(h, 16).ok())
            .and_then(|i| cell.scripts.get(i))
            .cloned()
            .ok_or_else(|| Status::invalid_argument("no script for this revision"))?;
        {
            let mut current = cell.script.lock().unwrap();
            if current.is_some() {
                return Err(Status::failed_precondition("this cell ran its build"));
            }
            *current = Some(Arc::clone(&script));
        }
        if !cell.sleep(script.run_delay).await {
            return Err(Status::unavailable("stopped"));
        }
        match script.run_build {
            Answer::Ok => Ok(Response::new(RunBuildReply { accepted: true })),
            Answer::Refuse => Ok(Response::new(RunBuildReply { accepted: false })),
            Answer::Fail => Err(Status::internal(format!(
                "no: {}\u{0}\r\n{}",
                "\u{202e}€".repeat(100),
                "x".repeat(500)
            ))),
            Answer::Hang => cell.hang().await,
        }
    }

    type EventsStream = ReceiverStream<Result<CellEvent, Status>>;

    async fn events(
        &self,
        _: Request<CellEventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let cell = &self.0;
        let script = cell.script()?;
        let call = cell.events_calls.fetch_add(1, Ordering::SeqCst);
        if script.open_hangs {
            return cell.hang().await;
        }
        if call < script.open_failures {
            return Err(Status::unavailable(format!("not now (call {call})")));
        }
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(feed(Arc::clone(cell), script, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel(
        &self,
        _: Request<CellCancelRequest>,
    ) -> Result<Response<CellCancelReply>, Status> {
        let cell = &self.0;
        match cell.script().map(|s| s.cancel).unwrap_or(Answer::Ok) {
            Answer::Ok | Answer::Refuse => Ok(Response::new(CellCancelReply {})),
            Answer::Fail => Err(Status::internal("will not stop")),
            Answer::Hang => cell.hang().await,
        }
    }

    async fn shutdown(
        &self,
        _: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownReply>, Status> {
        Ok(Response::new(ShutdownReply {}))
    }

    async fn prepare_tunnel(
        &self,
        req: Request<PrepareTunnelRequest>,
    ) -> Result<Response<PrepareTunnelReply>, Status> {
        let cell = &self.0;
        // PrepareTunnel comes before RunBuild, so the script is not chosen yet: the build id
        // is all there is. Private-network cases find theirs by it (see `Harness::submit`).
        // The test records it right after SubmitBuild answers; placement may be quicker.
        let build_id = req.into_inner().build_id;
        let mut tunnel = tunnel_of(&build_id);
        for _ in 0..25 {
            if tunnel.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            tunnel = tunnel_of(&build_id);
        }
        let tunnel = tunnel.unwrap_or(Tunnel::Key(format!("{}=", "B".repeat(43))));
        match tunnel {
            Tunnel::Key(public_key) => Ok(Response::new(PrepareTunnelReply { public_key })),
            Tunnel::Fail => Err(Status::internal("no keys today")),
            Tunnel::Hang => cell.hang().await,
        }
    }

    type ReadArtifactStream = ReceiverStream<Result<ArtifactData, Status>>;

    async fn read_artifact(
        &self,
        req: Request<ReadArtifactRequest>,
    ) -> Result<Response<Self::ReadArtifactStream>, Status> {
        let cell = Arc::clone(&self.0);
        let req = req.into_inner();
        let script = cell.script()?;
        let Some(&(size, serve)) = script.artifacts.get(&req.path) else {
            return Err(Status::not_found("no such artefact"));
        };
        match serve {
            Serve::Fail => return Err(Status::internal("disk on fire")),
            Serve::Hang => return cell.hang().await,
            _ => {}
        }
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let path = req.path;
            let mut offset = req.offset;
            let piece = |offset: u64, n: u64| -> Vec<u8> {
                (offset..offset + n)
                    .map(|o| artifact_byte(&path, o))
                    .collect()
            };
            let left = size.saturating_sub(offset);
            let out: Vec<ArtifactData> = match serve {
                Serve::Good => {
                    // Piece by piece, as the real cell daemon does (a listed size may be huge).
                    while offset < size {
                        let n = (size - offset).min(256 * 1024);
                        let d = ArtifactData {
                            offset,
                            data: piece(offset, n),
                        };
                        let ok = tokio::select! {
                            r = tx.send(Ok(d)) => r.is_ok(),
                            _ = cell.killed() => false,
                        };
                        if !ok {
                            return;
                        }
                        offset += n;
                    }
                    Vec::new()
                }
                Serve::WrongOffset => vec![ArtifactData {
                    offset: offset.wrapping_add(7),
                    data: piece(offset, left.min(1000)),
                }],
                Serve::Empty => vec![ArtifactData {
                    offset,
                    data: Vec::new(),
                }],
                Serve::Overlong => vec![ArtifactData {
                    offset,
                    data: piece(offset, left.min(1 << 20) + 1000),
                }],
                Serve::EndEarly => vec![ArtifactData {
                    offset,
                    data: piece(offset, left.div_ceil(2)),
                }],
                Serve::HangMid => vec![ArtifactData {
                    offset,
                    data: piece(offset, left.min(1000)),
                }],
                Serve::OnePiece => vec![ArtifactData {
                    offset,
                    data: piece(offset, left),
                }],
                Serve::Fail | Serve::Hang => Vec::new(),
            };
            for d in out {
                let ok = tokio::select! {
                    r = tx.send(Ok(d)) => r.is_ok(),
                    _ = cell.killed() => false,
                };
                if !ok {
                    return;
                }
            }
            if serve == Serve::HangMid {
                tokio::select! {
                    _ = tx.closed() => {}
                    _ = cell.killed() => {}
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Private-network cases by build id: PrepareTunnel comes before the script is known.
static TUNNELS: Mutex<Option<HashMap<String, Tunnel>>> = Mutex::new(None);

fn tunnel_of(build_id: &str) -> Option<Tunnel> {
    TUNNELS
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(build_id))
        .cloned()
}

// ---------------------------------------------------------------------------------------------
// The fake backend: cells are servers in this process.

struct FakeBackend {
    dir: tempfile::TempDir,
    scripts: Arc<Vec<Arc<Script>>>,
    rng: Mutex<Rng>,
    cells: Mutex<HashMap<String, Arc<FakeCell>>>,
}

impl FakeBackend {
    fn new(seed: u64, scripts: Arc<Vec<Arc<Script>>>) -> Self {
        FakeBackend {
            dir: tempfile::Builder::new()
                .prefix("hive-hostile-cell-")
                .tempdir()
                .unwrap(),
            scripts,
            rng: Mutex::new(Rng::new(seed ^ 0xCE11_CE11)),
            cells: Mutex::new(HashMap::new()),
        }
    }

    fn cell(&self, id: &str) -> Option<Arc<FakeCell>> {
        self.cells.lock().unwrap().get(id).cloned()
    }

    /// Ids of the cells not destroyed.
    fn live(&self) -> Vec<String> {
        let mut v: Vec<String> = self.cells.lock().unwrap().keys().cloned().collect();
        v.sort();
        v
    }
}

impl CellBackend for FakeBackend {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    async fn create(&self, spec: CellSpec) -> Result<Cell, BackendError> {
        let socket = self.dir.path().join(format!("{}.sock", spec.id));
        let listener =
            tokio::net::UnixListener::bind(&socket).map_err(|source| BackendError::CellDir {
                path: socket.clone(),
                source,
            })?;
        let health = {
            let mut rng = self.rng.lock().unwrap();
            rng.pick(&[
                Health::Normal,
                Health::Normal,
                Health::Garbage,
                Health::SlowFirst,
                Health::FlakyFirst,
                Health::Decays,
            ])
        };
        let cell = Arc::new(FakeCell {
            id: spec.id.clone(),
            socket: socket.clone(),
            scripts: Arc::clone(&self.scripts),
            health,
            health_calls: AtomicU32::new(0),
            alive: AtomicBool::new(true),
            killed: watch::channel(false).0,
            script: Mutex::new(None),
            cursor: tokio::sync::Mutex::new(0),
            events_calls: AtomicU32::new(0),
            record: Mutex::new(CellRecord {
                id: spec.id.clone(),
                size_class: spec.size_class.name.clone(),
                slot: spec.slot,
                created_at_ms: now_ms(),
                ..Default::default()
            }),
            server: Mutex::new(None),
        });
        let stopped = {
            let cell = Arc::clone(&cell);
            async move { cell.killed().await }
        };
        let server = tonic::transport::Server::builder()
            .add_service(CellAgentServer::new(CellService(Arc::clone(&cell))))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped);
        *cell.server.lock().unwrap() = Some(tokio::spawn(async move {
            let _ = server.await;
        }));
        self.cells
            .lock()
            .unwrap()
            .insert(spec.id.clone(), Arc::clone(&cell));
        Ok(Cell::new(
            spec.id,
            spec.size_class.name,
            Connector::Unix(socket),
        ))
    }

    async fn wait_ready(&self, cell: &Cell, timeout: Duration) -> Result<(), BackendError> {
        // As the real backends do: poll health until it says ready, the cell dies, or time is up.
        let start = Instant::now();
        let mut last = String::from("no answer yet");
        while start.elapsed() < timeout {
            if !self.is_alive(&cell.id) {
                return Err(CellError::Died {
                    cell: cell.id.clone(),
                    detail: "fake cell stopped".into(),
                }
                .into());
            }
            let left = timeout.saturating_sub(start.elapsed());
            match cell.health(left.min(Duration::from_millis(500))).await {
                Ok(true) => return Ok(()),
                Ok(false) => last = "ready=false".into(),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(CellError::NotReady {
            cell: cell.id.clone(),
            waited: timeout,
            last,
        }
        .into())
    }

    fn is_alive(&self, cell_id: &str) -> bool {
        self.cell(cell_id)
            .is_some_and(|c| c.alive.load(Ordering::SeqCst))
    }

    async fn destroy(&self, cell_id: &str) -> Result<(), BackendError> {
        let cell = self.cells.lock().unwrap().remove(cell_id);
        if let Some(cell) = cell {
            cell.stop();
            if let Some(server) = cell.server.lock().unwrap().take() {
                server.abort();
            }
            let _ = std::fs::remove_file(&cell.socket);
        }
        Ok(())
    }

    fn inspect(&self) -> Vec<Leftover> {
        self.cells
            .lock()
            .unwrap()
            .values()
            .map(|c| Leftover {
                id: c.id.clone(),
                dir: c.socket.clone(),
                record: Some(c.record.lock().unwrap().clone()),
            })
            .collect()
    }

    fn record_build(&self, cell_id: &str, build_id: &str, lease_id: &str) {
        if let Some(c) = self.cell(cell_id) {
            let mut r = c.record.lock().unwrap();
            r.build_id = build_id.into();
            r.lease_id = lease_id.into();
        }
    }

    fn last_words(&self, cell_id: &str) -> String {
        match self.cell(cell_id) {
            Some(c) => format!("fake cell, health {:?}", c.health),
            None => "fake cell, destroyed".into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A control plane and a box around the fake backend.

type Api = ControlPlaneClient<InterceptedService<Channel, Bearer>>;

struct Harness {
    _db: tempfile::TempDir,
    cp: Option<server::Handle>,
    api: Api,
    backend: Arc<FakeBackend>,
    pool: Arc<Pool<FakeBackend>>,
    agent: Arc<Agent<FakeBackend>>,
    stop: watch::Sender<bool>,
    run: Option<tokio::task::JoinHandle<()>>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
    outbox_max: Arc<AtomicUsize>,
    disconnects: Arc<AtomicU32>,
    /// Scripts by index (the revision says which).
    scripts: Arc<Vec<Arc<Script>>>,
}

impl Harness {
    /// `scripts` are the cases; the well-behaved [`plain`] build is added as the last one.
    async fn start(seed: u64, mut scripts: Vec<Script>) -> Harness {
        record_panics();
        // Quiet unless RUST_LOG asks: the control plane warns about every chunk it refuses.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
            )
            .with_test_writer()
            .try_init();
        scripts.push(plain());
        let scripts: Arc<Vec<Arc<Script>>> = Arc::new(scripts.into_iter().map(Arc::new).collect());
        let db = tempfile::tempdir().unwrap();
        let cp = server::start(Config {
            http_addr: "127.0.0.1:0".parse().unwrap(),
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            box_addr: "127.0.0.1:0".parse().unwrap(),
            // The session over plaintext on loopback; box certificates have their own tests.
            insecure_boxes: true,
            db: Some(format!("sqlite://{}/hive.db", db.path().display())),
            data_dir: db.path().to_path_buf(),
            // The production heartbeat: the control plane takes a box for silent after three
            // missed ones, measured across its own handling of what the box sent, which for the
            // cases with megabytes of output takes a while in a debug build on two cores.
            lease: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(2),
            tick: Duration::from_millis(100),
            // Less to write for the cases that flood their log.
            log_cap: 8 * 1024 * 1024,
            artifact_cap: ARTIFACT_CAP,
            ..Config::default()
        })
        .await
        .expect("control plane starts");
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut api = ControlPlaneClient::with_interceptor(
            channel,
            Bearer::new(cp.admin_token().unwrap()).unwrap(),
        );
        api.create_network(CreateNetworkRequest {
            name: "corp".into(),
            prefixes: vec!["10.77.0.0/24".into()],
            tunnel_subnet: String::new(),
        })
        .await
        .expect("create network");
        for (name, timeout_secs, network) in [
            ("fuzz", 60, ""),
            ("short", SHORT_TIMEOUT_SECS, ""),
            ("privnet", 30, "corp"),
        ] {
            api.create_project(CreateProjectRequest {
                name: name.into(),
                repo_url: format!("git://198.18.0.2/{name}.git"),
                secret: "s".into(),
                steps: vec!["true".into()],
                timeout_secs,
                private_network: network.into(),
                ..Default::default()
            })
            .await
            .expect("create project");
        }

        let backend = Arc::new(FakeBackend::new(seed, Arc::clone(&scripts)));
        let pool = Pool::with_health_timeout(
            Arc::clone(&backend),
            vec![ClassConfig {
                size: builtin_shape("small"),
                target: 6,
                capacity: 80,
            }],
            256,
            Duration::from_secs(5),
            Duration::from_millis(500),
        );
        pool.top_up();
        let agent = Agent::new(
            AgentConfig {
                control_plane: format!("http://{}", cp.grpc_addr),
                credentials: None,
                box_id: "box-hostile".into(),
                hostname: "box-hostile.test".into(),
                lease: Duration::from_secs(10),
                heartbeat: Duration::from_secs(2),
                room_heartbeat_gap: Some(Duration::from_millis(100)),
                cancel_grace: Duration::from_secs(1),
                cell_call_timeout: CELL_CALL_TIMEOUT,
            },
            Arc::clone(&pool),
        );
        let (stop, stopped) = watch::channel(false);
        let run = tokio::spawn(Arc::clone(&agent).run(stopped));

        let mut watchers = Vec::new();
        // The daemon's periodic health check of warm cells (main.rs), faster.
        {
            let pool = Arc::clone(&pool);
            watchers.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    pool.check_health().await;
                }
            }));
        }
        // The outbox's size and the link, sampled all along.
        let outbox_max = Arc::new(AtomicUsize::new(0));
        let disconnects = Arc::new(AtomicU32::new(0));
        {
            let (agent, outbox_max, disconnects) = (
                Arc::clone(&agent),
                Arc::clone(&outbox_max),
                Arc::clone(&disconnects),
            );
            watchers.push(tokio::spawn(async move {
                let mut was_connected = false;
                loop {
                    let bytes = agent.outbox_state()["bytes"].as_u64().unwrap_or(0) as usize;
                    outbox_max.fetch_max(bytes, Ordering::SeqCst);
                    let connected = agent.is_connected();
                    if was_connected && !connected {
                        disconnects.fetch_add(1, Ordering::SeqCst);
                    }
                    was_connected = connected;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while !agent.is_connected() {
            assert!(Instant::now() < deadline, "the box never registered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Harness {
            _db: db,
            cp: Some(cp),
            api,
            backend,
            pool,
            agent,
            stop,
            run: Some(run),
            watchers,
            outbox_max,
            disconnects,
            scripts,
        }
    }

    /// Submits case `i`; returns its build id.
    async fn submit(&mut self, i: usize) -> String {
        let s = &self.scripts[i];
        let build = self
            .api
            .submit_build(SubmitBuildRequest {
                project: s.project.into(),
                revision: format!("c0de{i:08x}"),
                git_ref: "refs/heads/main".into(),
                request_id: String::new(),
            })
            .await
            .expect("submit")
            .into_inner();
        if let Some(t) = &s.tunnel {
            // Placement may be under way already; PrepareTunnel answers a key that the box
            // forwards (and the control plane refuses: no connector) for an unknown build.
            TUNNELS
                .lock()
                .unwrap()
                .get_or_insert_with(HashMap::new)
                .insert(build.id.clone(), t.clone());
        }
        build.id
    }

    async fn get(&mut self, id: &str) -> Build {
        self.api
            .get_build(GetBuildRequest { id: id.into() })
            .await
            .expect("get build")
            .into_inner()
    }

    /// How many of the build's artefacts the control plane holds whole.
    async fn complete_artifacts(&mut self, id: &str) -> usize {
        self.api
            .list_artifacts(ListArtifactsRequest {
                build_id: id.into(),
            })
            .await
            .expect("list artifacts")
            .into_inner()
            .artifacts
            .iter()
            .filter(|a| a.complete)
            .count()
    }

    /// Waits until every build in `ids` has ended in the control plane; returns the ones that
    /// had not within `within`.
    async fn wait_ended(&mut self, ids: &[String], within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let builds = self
                .api
                .list_builds(ListBuildsRequest {
                    project: String::new(),
                    state: 0,
                    limit: 10_000,
                })
                .await
                .expect("list builds")
                .into_inner()
                .builds;
            let open: Vec<String> = ids
                .iter()
                .filter(|id| {
                    !builds.iter().any(|b| {
                        b.id == **id
                            && BuildState::try_from(b.state).is_ok_and(BuildState::is_terminal)
                    })
                })
                .cloned()
                .collect();
            // A panic fails the run anyway; the builds it stranded would only be waited for.
            if open.is_empty() || Instant::now() >= deadline || !panics().is_empty() {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits (bounded) until the box runs nothing, holds no cell beyond its warm ones and has
    /// everything acknowledged; a description of what is wrong otherwise.
    async fn settled(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let running = self.agent.running_builds();
            let busy: u32 = self.pool.states().iter().map(|p| p.busy).sum();
            let mut warm: Vec<String> =
                self.pool.warm_ids().into_iter().map(|(id, _)| id).collect();
            warm.sort();
            let booting: u32 = self.pool.states().iter().map(|p| p.booting).sum();
            let live = self.backend.live();
            let leaked: Vec<&String> = live.iter().filter(|id| !warm.contains(id)).collect();
            let unacked = self.agent.unacked();
            let ok = running.is_empty()
                && busy == 0
                && leaked.len() as u32 <= booting
                && unacked == 0
                && self.agent.is_connected();
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "box not settled after {within:?}: running builds {running:?}, busy cells \
                     {busy}, booting {booting}, cells neither warm nor booting {leaked:?}, \
                     unacked messages {unacked}, connected {}",
                    self.agent.is_connected()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The well-behaved build must still succeed.
    async fn plain_build_succeeds(&mut self) {
        let i = self.scripts.len() - 1;
        let id = self.submit(i).await;
        let open = self
            .wait_ended(std::slice::from_ref(&id), Duration::from_secs(20))
            .await;
        let b = self.get(&id).await;
        assert!(
            open.is_empty() && b.state == BuildState::Succeeded as i32,
            "after the hostile cells, a well-behaved build did not succeed: state {}, message \
             {:?}",
            BuildState::try_from(b.state).map_or("?", |s| s.short_name()),
            b.message
        );
    }

    /// Every check that holds for any run, after its cases ended.
    async fn check_box(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let patience = if panics().is_empty() {
            Duration::from_secs(15)
        } else {
            Duration::ZERO
        };
        if let Err(e) = self.settled(patience).await {
            problems.push(e);
        }
        let max = self.outbox_max.load(Ordering::SeqCst);
        // Past the cap only log output is dropped; updates and artefact pieces (which wait for
        // the outbox to be half empty) may overshoot by a few messages.
        if max > OUTBOX_CAP_BYTES + 16 * 1024 * 1024 {
            problems.push(format!(
                "the outbox held {max} bytes (cap {OUTBOX_CAP_BYTES})"
            ));
        }
        let d = self.disconnects.load(Ordering::SeqCst);
        if d > 0 {
            problems.push(format!(
                "the box lost its control plane session {d} times (a message it cannot deliver?)"
            ));
        }
        problems
    }

    async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(run) = self.run.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
        }
        for w in &self.watchers {
            w.abort();
        }
        self.pool.shutdown().await;
        for id in self.backend.live() {
            let _ = self.backend.destroy(&id).await;
        }
        if let Some(cp) = self.cp.take() {
            cp.shutdown().await;
        }
    }
}

/// Checks one ended case against its script.
fn check_case(seed: u64, i: usize, s: &Script, b: &Build) -> Option<String> {
    let state = BuildState::try_from(b.state).unwrap_or(BuildState::Unspecified);
    let mut wrong = Vec::new();
    if !s.expect.contains(&state) {
        wrong.push(format!(
            "ended {} (expected {})",
            state.short_name(),
            s.expect
                .iter()
                .map(|e| e.short_name())
                .collect::<Vec<_>>()
                .join(" or ")
        ));
    }
    let took = Duration::from_millis(u64::try_from(b.updated_at_ms - b.created_at_ms).unwrap_or(0));
    if took > s.within {
        wrong.push(format!("took {took:?} to end (at most {:?})", s.within));
    }
    if let Some(has) = s.message_has {
        if !b.message.contains(has) {
            wrong.push(format!("message lacks {has:?}"));
        }
    }
    if b.message.len() > STORED_MESSAGE_MAX {
        wrong.push(format!("message of {} bytes stored", b.message.len()));
    }
    if let Some(t) = b
        .transitions
        .iter()
        .find(|t| t.reason.len() > STORED_MESSAGE_MAX)
    {
        wrong.push(format!(
            "transition reason of {} bytes stored",
            t.reason.len()
        ));
    }
    (!wrong.is_empty()).then(|| {
        format!(
            "seed {seed:#x} case {i} ({}; build {}): {}; message {:?}",
            s.what,
            b.id,
            wrong.join("; "),
            b.message.chars().take(300).collect::<String>()
        )
    })
}

/// Runs `cases` at once against one box, then the well-behaved build; panics with every
/// problem found.
async fn run_cases(seed: u64, cases: Vec<Script>) {
    let started = Instant::now();
    let n = cases.len();
    let mut h = Harness::start(seed, cases).await;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(h.submit(i).await);
    }
    let within = h.scripts[..n]
        .iter()
        .map(|s| s.within)
        .max()
        .unwrap_or(QUICK);
    let open = h.wait_ended(&ids, within).await;
    let mut problems = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let b = h.get(id).await;
        if open.contains(id) {
            problems.push(format!(
                "seed {seed:#x} case {i} ({}; build {id}): not ended (waited up to {within:?}, less after a panic; state {})",
                h.scripts[i].what,
                BuildState::try_from(b.state).map_or("?", |s| s.short_name())
            ));
        } else if let Some(p) = check_case(seed, i, &h.scripts[i], &b) {
            problems.push(p);
        } else if h.scripts[i].complete_artifacts > 0 {
            let whole = h.complete_artifacts(id).await;
            if whole < h.scripts[i].complete_artifacts {
                problems.push(format!(
                    "seed {seed:#x} case {i} ({}; build {id}): {whole} artefacts arrived whole, \
                     not {}",
                    h.scripts[i].what, h.scripts[i].complete_artifacts
                ));
            }
        }
    }
    problems.extend(h.check_box().await);
    let p = panics();
    if !p.is_empty() {
        problems.push(format!("{} panics: {}", p.len(), p.join("\n")));
    }
    if problems.is_empty() {
        h.plain_build_succeeds().await;
        let p = panics();
        assert!(p.is_empty(), "panics: {}", p.join("\n"));
    }
    eprintln!(
        "seed {seed:#x}: {n} hostile cells in {:?}, outbox at most {} bytes, {} problems",
        started.elapsed(),
        h.outbox_max.load(Ordering::SeqCst),
        problems.len()
    );
    h.shutdown().await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_cells_cannot_break_the_box() {
    let seed = seed();
    let n = std::env::var("HIVE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2 * KINDS.len());
    eprintln!("hostile_cell: seed {seed:#x} (HIVE_FUZZ_SEED), {n} cases (HIVE_FUZZ_CASES)");
    run_cases(seed, seeded_cases(seed, n)).await;
}

/// The event numbered u64::MAX on its own (issue 11; the full run has it as kind 0 too). How it
/// was checked: `next = ev.seq.saturating_add(1)` in `Agent::relay` (agent/run.rs) was changed
/// back to `next = ev.seq + 1`, this test run, and the line restored. Unfixed, it fails within
/// seconds: the build task panics with "attempt to add with overflow" (the panic hook records
/// it), the build stays `placed` in the control plane, and its cell is never released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_numbered_u64_max_does_not_overflow_the_box() {
    run_cases(seed(), vec![seq_max_exact()]).await;
}
