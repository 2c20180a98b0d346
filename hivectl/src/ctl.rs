//! The connection to the control plane and what every command shares: [`Ctl`] (the client,
//! output, gRPC status to error), [`CliError`] with its exit codes, and following a build's
//! states ([`follow_states`], [`Progress`]).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use hive_proto::auth::Bearer;
use hive_proto::v1::control_plane_client::ControlPlaneClient;
use hive_proto::v1::{Build, BuildState, GetBuildRequest, WatchBuildRequest};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::render;

/// Everything that can make hivectl fail, each with its exit code.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error("invalid --addr {addr:?}: {why}")]
    BadAddr { addr: String, why: String },
    #[error(
        "cannot reach control plane at {addr}: {why} — is hive-control-plane running? \
         (set --addr or HIVE_ADDR)"
    )]
    Unreachable { addr: String, why: String },
    #[error("{what}: not found: {message}")]
    NotFound { what: String, message: String },
    #[error("{what}: {message}")]
    Denied { what: String, message: String },
    #[error("API token: {0}")]
    BadToken(String),
    #[error("TLS: {why}")]
    BadTrust { why: String },
    #[error("{what}: {message}")]
    Refused { what: String, message: String },
    #[error("write output: {0}")]
    Output(#[source] std::io::Error),
    #[error("build {id} ended {}{detail}", state.short_name())]
    BuildEnded {
        id: String,
        state: BuildState,
        detail: String,
    },
    #[error("{what}: the stream ended before the build did (control plane stopped?)")]
    StreamCut { what: String },
    #[error("write {path}")]
    WriteFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl CliError {
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            CliError::BadAddr { .. } | CliError::BadToken(_) | CliError::BadTrust { .. } => 2,
            CliError::Unreachable { .. } | CliError::StreamCut { .. } => 3,
            CliError::NotFound { .. } => 4,
            CliError::Denied { .. } => 5,
            CliError::Refused { .. } | CliError::Output(_) | CliError::WriteFile { .. } => 1,
            CliError::BuildEnded { state, .. } => match state {
                BuildState::Cancelled => 11,
                BuildState::TimedOut => 12,
                _ => 10,
            },
        }
    }
}

/// The innermost cause, lower-cased and without the "(os error N)" tail: "connection refused".
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    let s = cur.to_string();
    let s = match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    };
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => "unknown error".to_string(),
    }
}

/// The API token to send: `--token` / HIVE_TOKEN, else the file of `--token-file` /
/// HIVE_TOKEN_FILE, else none (the control plane then says how to get one).
pub(crate) fn token(
    token: Option<String>,
    file: Option<&std::path::Path>,
) -> Result<Bearer, CliError> {
    let text = match (token, file) {
        (Some(t), _) if !t.trim().is_empty() => t,
        (_, Some(path)) => std::fs::read_to_string(path).map_err(|e| {
            CliError::BadToken(format!("read --token-file {}: {e}", path.display()))
        })?,
        _ => String::new(),
    };
    // The message never shows the token.
    Bearer::new(&text).map_err(|e| CliError::BadToken(e.to_string()))
}

/// What an https:// control plane is trusted by: its CA's SHA-256 or a CA file.
pub(crate) enum Trust {
    None,
    Pin(String),
    CaPem(String),
}

impl Trust {
    pub(crate) fn new(
        pin: Option<&str>,
        file: Option<&std::path::Path>,
    ) -> Result<Trust, CliError> {
        if let Some(path) = file {
            let pem = std::fs::read_to_string(path).map_err(|e| CliError::BadTrust {
                why: format!("read --ca-file {}: {e}", path.display()),
            })?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(CliError::BadTrust {
                    why: format!(
                        "--ca-file {} holds no PEM certificate (expected e.g. the hive's \
                         <data-dir>/pki/ca.pem)",
                        path.display()
                    ),
                });
            }
            return Ok(Trust::CaPem(pem));
        }
        match pin.map(str::trim).filter(|p| !p.is_empty()) {
            None => Ok(Trust::None),
            Some(p) => {
                let p = p.strip_prefix("sha256:").unwrap_or(p).to_ascii_lowercase();
                if p.len() != 64 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(CliError::BadTrust {
                        why: "--ca-sha256 must be 64 hex digits (the control plane's log shows \
                              it as ca_sha256=...)"
                            .to_string(),
                    });
                }
                Ok(Trust::Pin(p))
            }
        }
    }
}

/// Whether `host` (from a URL) names this machine's loopback.
fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The endpoint for one address: plaintext only to loopback; https with the CA trusted.
async fn endpoint(addr: &str, trust: &Trust) -> Result<Endpoint, CliError> {
    let bad = |why: String| CliError::BadAddr {
        addr: addr.to_string(),
        why,
    };
    let endpoint = Endpoint::from_shared(addr.to_string())
        .map_err(|e| bad(format!("{e} (expected e.g. http://127.0.0.1:50051)")))?;
    let host = endpoint.uri().host().unwrap_or_default().to_string();
    match endpoint.uri().scheme_str() {
        Some("http") if is_loopback_host(&host) => Ok(endpoint),
        Some("http") => Err(bad(format!(
            "plain http:// to {host}, which is not this machine, would send your token in the \
             clear, and the control plane serves only TLS there: use https://{host}:PORT with \
             --ca-sha256 HEX (HIVE_CA_SHA256) or --ca-file PEM (HIVE_CA_FILE)"
        ))),
        Some("https") => {
            let ca = match trust {
                Trust::CaPem(pem) => pem.clone(),
                Trust::Pin(pin) => {
                    hive_proto::pin::fetch_pinned_ca(addr, pin)
                        .await
                        .map_err(|e| match e {
                            hive_proto::pin::PinError::Reach(why) => CliError::Unreachable {
                                addr: addr.to_string(),
                                why,
                            },
                            other => CliError::BadTrust {
                                why: format!("{addr}: {other}"),
                            },
                        })?
                }
                Trust::None => {
                    return Err(CliError::BadTrust {
                        why: format!(
                            "{addr} is https: say which CA to trust with --ca-sha256 HEX \
                             (HIVE_CA_SHA256; the control plane logs it at start as \
                             ca_sha256=...) or --ca-file PEM (HIVE_CA_FILE; e.g. a copy of \
                             the hive's <data-dir>/pki/ca.pem)"
                        ),
                    })
                }
            };
            let name = host.trim_start_matches('[').trim_end_matches(']');
            hive_proto::pin::endpoint(addr, name, &ca, None).map_err(bad)
        }
        _ => Err(bad(
            "expected an http:// (loopback) or https:// URL, e.g. http://127.0.0.1:50051"
                .to_string(),
        )),
    }
}

pub(crate) struct Ctl {
    pub(crate) addr: String,
    pub(crate) client: ControlPlaneClient<InterceptedService<Channel, Bearer>>,
    pub(crate) json: bool,
}

impl Ctl {
    pub(crate) async fn connect(
        addrs: &str,
        token: Bearer,
        trust: &Trust,
        timeout: Duration,
        json: bool,
    ) -> Result<Self, CliError> {
        // Several control planes of one hive: comma-separated, tried in turn; the first that
        // answers serves the command. Every address is checked before any is dialled.
        let addrs_list: Vec<&str> = addrs
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        for addr in &addrs_list {
            if addr.starts_with("http://") {
                endpoint(addr, &Trust::None).await?;
            }
        }
        let mut endpoints = Vec::new();
        let mut last = None;
        for addr in addrs_list {
            match endpoint(addr, trust).await {
                Ok(e) => endpoints.push((addr, e)),
                // A control plane that does not answer the CA fetch: try the next one.
                Err(e @ CliError::Unreachable { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        if endpoints.is_empty() {
            if let Some(e) = last {
                return Err(e);
            }
            return Err(CliError::BadAddr {
                addr: addrs.to_string(),
                why: "no address given (expected e.g. http://127.0.0.1:50051)".to_string(),
            });
        }
        let mut reached = None;
        for (addr, endpoint) in endpoints {
            match tokio::time::timeout(timeout, endpoint.connect_timeout(timeout).connect()).await {
                Ok(Ok(c)) => {
                    reached = Some((addr, c));
                    break;
                }
                Ok(Err(e)) => {
                    last = Some(CliError::Unreachable {
                        addr: addr.to_string(),
                        why: root_cause(&e),
                    })
                }
                Err(_) => {
                    last = Some(CliError::Unreachable {
                        addr: addr.to_string(),
                        why: format!("no answer within {}s", timeout.as_secs()),
                    })
                }
            }
        }
        let Some((addr, channel)) = reached else {
            return Err(last.unwrap_or_else(|| CliError::BadAddr {
                addr: addrs.to_string(),
                why: "no address given".to_string(),
            }));
        };
        Ok(Self {
            addr: addr.to_string(),
            client: ControlPlaneClient::with_interceptor(channel, token),
            json,
        })
    }

    /// Turns a gRPC status into a one-line error about `what`.
    pub(crate) fn status(&self, what: impl Into<String>, s: tonic::Status) -> CliError {
        use tonic::Code;
        let what = what.into();
        let message = if s.message().is_empty() {
            format!("{:?}", s.code())
        } else {
            s.message().to_string()
        };
        match s.code() {
            Code::Unavailable => CliError::Unreachable {
                addr: self.addr.clone(),
                why: match std::error::Error::source(&s) {
                    Some(src) => root_cause(src),
                    None => message,
                },
            },
            Code::NotFound => CliError::NotFound { what, message },
            Code::Unauthenticated | Code::PermissionDenied => CliError::Denied { what, message },
            _ => CliError::Refused { what, message },
        }
    }

    pub(crate) fn out(&self, text: &str) -> Result<(), CliError> {
        let mut o = std::io::stdout().lock();
        o.write_all(text.as_bytes()).map_err(CliError::Output)?;
        o.flush().map_err(CliError::Output)
    }

    pub(crate) fn out_json(&self, v: &serde_json::Value) -> Result<(), CliError> {
        let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".to_string());
        s.push('\n');
        self.out(&s)
    }

    pub(crate) async fn get_build(&mut self, id: &str) -> Result<Build, CliError> {
        self.client
            .get_build(GetBuildRequest { id: id.to_string() })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status(format!("build {id}"), s))
    }
}

/// Shows what a wait is doing: a redrawn spinner line on a terminal, plain lines otherwise.
pub(crate) struct Progress {
    pub(crate) tty: bool,
    pub(crate) frame: usize,
    pub(crate) line: String,
    pub(crate) started: Instant,
    pub(crate) last_plain: String,
}

impl Progress {
    pub(crate) fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            frame: 0,
            line: String::new(),
            started: Instant::now(),
            last_plain: String::new(),
        }
    }

    pub(crate) fn set(&mut self, line: String) {
        if self.tty {
            self.line = line;
            self.draw();
        } else if line != self.last_plain {
            let _ = writeln!(std::io::stderr(), "{line}");
            self.last_plain = line;
        }
    }

    pub(crate) fn draw(&mut self) {
        if !self.tty {
            return;
        }
        const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
        self.frame = (self.frame + 1) % FRAMES.len();
        let mut e = std::io::stderr().lock();
        let _ = write!(
            e,
            "\r\x1b[2K{} {} ({}s)",
            FRAMES[self.frame],
            self.line,
            self.started.elapsed().as_secs()
        );
        let _ = e.flush();
    }

    pub(crate) fn finish(&mut self, line: String) {
        if self.tty {
            let mut e = std::io::stderr().lock();
            let _ = writeln!(e, "\r\x1b[2K{line}");
        } else if line != self.last_plain {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }
}

pub(crate) fn progress_line(b: &Build) -> String {
    let mut s = format!("build {}: {}", b.id, render::state_name(b.state));
    if !b.box_id.is_empty() {
        s.push_str(&format!(" on {}", b.box_id));
    }
    if !b.message.is_empty() {
        s.push_str(&format!(" — {}", b.message));
    }
    s
}

/// Ok for a succeeded build, the matching error for any other terminal state.
pub(crate) fn outcome(b: &Build) -> Result<(), CliError> {
    let state = BuildState::try_from(b.state).unwrap_or(BuildState::Unspecified);
    if state == BuildState::Succeeded {
        return Ok(());
    }
    let mut detail = String::new();
    if b.exit_code >= 0 && state == BuildState::Failed {
        detail.push_str(&format!(" (exit code {})", b.exit_code));
    }
    if !b.message.is_empty() {
        detail.push_str(&format!(": {}", b.message));
    }
    Err(CliError::BuildEnded {
        id: b.id.clone(),
        state,
        detail,
    })
}

/// Follows WatchBuild until the build ends, calling `on_change` for each new state.
pub(crate) async fn follow_states(
    ctl: &mut Ctl,
    id: &str,
    mut on_change: impl FnMut(&Build, Option<&mut Progress>),
    mut progress: Option<&mut Progress>,
) -> Result<Build, CliError> {
    let mut stream = ctl
        .client
        .watch_build(WatchBuildRequest { id: id.to_string() })
        .await
        .map_err(|s| ctl.status(format!("watch build {id}"), s))?
        .into_inner();
    let mut last: Option<(i32, u32, String)> = None;
    let mut latest: Option<Build> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            item = stream.next() => {
                match item {
                    Some(Ok(b)) => {
                        let key = (b.state, b.attempt, b.box_id.clone());
                        if last.as_ref() != Some(&key) {
                            on_change(&b, progress.as_deref_mut());
                            last = Some(key);
                        }
                        let done = BuildState::try_from(b.state).is_ok_and(BuildState::is_terminal);
                        latest = Some(b);
                        if done {
                            break;
                        }
                    }
                    Some(Err(s)) => return Err(ctl.status(format!("watch build {id}"), s)),
                    None => break,
                }
            }
            _ = tick.tick() => {
                if let Some(p) = progress.as_deref_mut() {
                    p.draw();
                }
            }
        }
    }
    match latest {
        Some(b) if BuildState::try_from(b.state).is_ok_and(BuildState::is_terminal) => Ok(b),
        _ => {
            // The stream ended early: ask once more, the build may have ended meanwhile.
            let b = ctl.get_build(id).await?;
            if BuildState::try_from(b.state).is_ok_and(BuildState::is_terminal) {
                on_change(&b, progress);
                Ok(b)
            } else {
                Err(CliError::StreamCut {
                    what: format!("watch build {id}"),
                })
            }
        }
    }
}
