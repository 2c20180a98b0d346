//! hivectl: the operator CLI for a Hive control plane, over its gRPC API (`hive.v1.ControlPlane`).
//!
//! Thin by design: every command is one or two RPCs, then rendering (`render`). Errors from the
//! transport or a gRPC status become one line naming what failed, with a documented exit code.
#![forbid(unsafe_code)]

#[path = "hivectl/render.rs"]
mod render;

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use hive_proto::v1 as pb;
use hive_proto::v1::control_plane_client::ControlPlaneClient;
use hive_proto::v1::{
    BoxActionRequest, Build, BuildState, CancelBuildRequest, CreateProjectRequest,
    DeleteProjectRequest, GetBuildRequest, GetProjectRequest, ListBoxesRequest, ListBuildsRequest,
    ListCellsRequest, ListProjectsRequest, ListSizeClassesRequest, StreamLogsRequest,
    SubmitBuildRequest, WatchBuildRequest,
};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

const EXIT_CODES: &str = "\
Exit codes:
  0   success (for `logs -f`, `watch`, `submit --wait`: the build succeeded)
  1   the control plane refused the request (invalid input, already exists, ...) or failed
  2   bad command line (unknown flag, missing argument, bad --addr)
  3   cannot reach the control plane (not running, wrong --addr, connection lost)
  4   not found (project, build or box)
  10  the followed build failed
  11  the followed build was cancelled
  12  the followed build timed out
  130 interrupted (SIGINT/SIGTERM) while waiting

Environment: HIVE_ADDR (same as --addr).";

/// Operator CLI for a Hive control plane.
#[derive(Debug, Parser)]
#[command(
    name = "hivectl",
    version,
    about = "Operate a Hive control plane: projects, builds, logs, boxes and cells.",
    long_about = "Operate a Hive control plane over its gRPC API: register projects, submit and \
                  cancel builds, follow their state and logs, inspect and cordon/drain boxes.\n\n\
                  Output is human tables by default; --json gives stable JSON for scripts \
                  (build states as short names: queued, placed, running, succeeded, failed, \
                  cancelled, timed_out).",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Control plane gRPC address.
    #[arg(
        long,
        env = "HIVE_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    addr: String,
    /// Print JSON instead of tables: listings an array, show commands an object; `logs` and
    /// `watch` one object per line (chunk / state change).
    #[arg(long, global = true)]
    json: bool,
    /// Give up connecting after this many seconds.
    #[arg(long, default_value_t = 5, global = true, value_name = "SECS")]
    connect_timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage one project (add, rm, show).
    #[command(subcommand)]
    Project(ProjectCommand),
    /// List projects.
    Projects,
    /// Queue a build of a project (as if pushed), optionally waiting for it to end.
    Submit {
        /// Project name or id.
        project: String,
        /// Commit to build (default: the tip of --ref).
        #[arg(long = "rev")]
        rev: Option<String>,
        /// Git ref, e.g. refs/heads/main (default: the project's branch).
        #[arg(long = "ref")]
        git_ref: Option<String>,
        /// Wait until the build ends, showing progress; exit code tells how it ended.
        #[arg(long)]
        wait: bool,
    },
    /// List builds, newest first.
    Builds {
        /// Only this project (name or id).
        #[arg(long)]
        project: Option<String>,
        /// Only this state (queued, placed, running, succeeded, failed, cancelled, timed_out).
        #[arg(long, value_parser = parse_state)]
        state: Option<BuildState>,
        /// At most this many builds.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one build with its state history.
    Build {
        /// Build id.
        id: String,
    },
    /// Print a build's log (raw bytes as the build wrote them).
    Logs {
        /// Build id.
        id: String,
        /// Keep streaming until the build ends; exit non-zero if it did not succeed.
        #[arg(short, long)]
        follow: bool,
        /// Start at this log chunk sequence number.
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Print the build's states so far, then each change until it ends. With --json: one
    /// object per line, `kind` "transition" (a state it already left) or "build" (the build now).
    Watch {
        /// Build id.
        id: String,
    },
    /// Cancel a build (queued or running).
    Cancel {
        /// Build id.
        id: String,
        /// Why (recorded with the state change).
        #[arg(long, default_value = "cancelled with hivectl")]
        reason: String,
    },
    /// List boxes with their pools.
    Boxes,
    /// List cells.
    Cells {
        /// Only the cells of this box.
        #[arg(long = "box")]
        box_id: Option<String>,
    },
    /// Cordon or drain a box.
    #[command(subcommand, name = "box")]
    BoxCmd(BoxCommand),
    /// List size classes (cell shapes).
    Classes,
    /// Private networks builds can join (add, list, rm).
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Connectors that front private networks (add, list, rm).
    #[command(subcommand)]
    Connector(ConnectorCommand),
}

#[derive(Debug, Subcommand)]
enum NetworkCommand {
    /// Create a private network: the prefixes its builds reach through its connector.
    Add {
        /// Network name (unique).
        name: String,
        /// A prefix behind the connector, e.g. 10.20.0.0/16 (repeatable, at least one).
        #[arg(long = "prefix", value_name = "CIDR", required = true)]
        prefixes: Vec<String>,
        /// Tunnel addresses for cells and the connector (default 10.250.0.0/24).
        #[arg(long, value_name = "CIDR")]
        tunnel_subnet: Option<String>,
    },
    /// List private networks.
    List,
    /// Delete a private network and its connectors (refused while a project uses it).
    Rm {
        /// Network name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConnectorCommand {
    /// Register a connector; prints its token once (give it to hive-connector --token).
    Add {
        /// Network the connector fronts.
        network: String,
        /// HOST:PORT cells send WireGuard packets to.
        #[arg(long)]
        endpoint: String,
        /// The connector's public key (hive-connector --print-public-key).
        #[arg(long)]
        public_key: String,
    },
    /// List connectors.
    List {
        /// Only the connectors of this network.
        #[arg(long)]
        network: Option<String>,
    },
    /// Remove a connector (by id or public key); its session ends.
    Rm {
        /// Connector id or public key.
        connector: String,
    },
}

#[derive(Debug, Subcommand)]
enum ProjectCommand {
    /// Register a project: pushes to its repository make builds.
    Add(ProjectAdd),
    /// Delete a project.
    Rm {
        /// Project name or id.
        name: String,
    },
    /// Show a project.
    Show {
        /// Project name or id.
        name: String,
    },
}

#[derive(Debug, Args)]
struct ProjectAdd {
    /// Project name (unique).
    name: String,
    /// Repository URL as the git host reports it (clone, ssh, git or html URL).
    #[arg(long)]
    repo: String,
    /// Webhook secret shared with the git host (HMAC-SHA256 key).
    #[arg(long)]
    secret: String,
    /// Only pushes to this branch make builds (default: every branch).
    #[arg(long)]
    branch: Option<String>,
    /// Size class of the cells (default: the control plane's, `small`).
    #[arg(long)]
    size: Option<String>,
    /// Private network the builds join.
    #[arg(long)]
    private_network: Option<String>,
    /// Build timeout in seconds (default: the control plane's).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u32>,
    /// Environment for every step, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// A build step, run with /bin/sh -c (repeatable, in order; at least one).
    #[arg(long = "step", value_name = "CMD", required = true)]
    steps: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum BoxCommand {
    /// Give the box no new builds (running ones go on).
    Cordon {
        /// Box id.
        id: String,
    },
    /// Let the box finish its builds, take no new ones, then leave.
    Drain {
        /// Box id.
        id: String,
    },
}

fn network_json(n: &pb::PrivateNetwork) -> serde_json::Value {
    serde_json::json!({
        "name": n.name,
        "prefixes": n.prefixes,
        "tunnel_subnet": n.tunnel_subnet,
        "created_at_ms": n.created_at_ms,
    })
}

fn connector_json(c: &pb::ConnectorInfo) -> serde_json::Value {
    serde_json::json!({
        "id": c.id,
        "network": c.network,
        "public_key": c.public_key,
        "endpoint": c.endpoint,
        "connected": c.connected,
        "active_peers": c.active_peers,
        "created_at_ms": c.created_at_ms,
    })
}

fn parse_state(s: &str) -> Result<BuildState, String> {
    BuildState::from_short_name(s).ok_or_else(|| {
        format!(
            "unknown build state {s:?} (expected queued, placed, running, succeeded, failed, \
             cancelled or timed_out)"
        )
    })
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains(char::is_whitespace) => {
            Ok((k.to_string(), v.to_string()))
        }
        Some(_) => Err(format!(
            "bad environment entry {s:?}: the key before '=' must be a non-empty word"
        )),
        None => Err(format!("bad environment entry {s:?}: expected KEY=VALUE")),
    }
}

/// Everything that can make hivectl fail, each with its exit code.
#[derive(Debug, thiserror::Error)]
enum CliError {
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
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::BadAddr { .. } => 2,
            CliError::Unreachable { .. } | CliError::StreamCut { .. } => 3,
            CliError::NotFound { .. } => 4,
            CliError::Refused { .. } | CliError::Output(_) => 1,
            CliError::BuildEnded { state, .. } => match state {
                BuildState::Cancelled => 11,
                BuildState::TimedOut => 12,
                _ => 10,
            },
        }
    }
}

/// The innermost cause, lower-cased and without the "(os error N)" tail: "connection refused".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
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

struct Ctl {
    addr: String,
    client: ControlPlaneClient<Channel>,
    json: bool,
}

impl Ctl {
    async fn connect(addr: &str, timeout: Duration, json: bool) -> Result<Self, CliError> {
        let endpoint = Endpoint::from_shared(addr.to_string()).map_err(|e| CliError::BadAddr {
            addr: addr.to_string(),
            why: format!("{e} (expected e.g. http://127.0.0.1:50051)"),
        })?;
        if endpoint.uri().scheme_str() != Some("http")
            && endpoint.uri().scheme_str() != Some("https")
        {
            return Err(CliError::BadAddr {
                addr: addr.to_string(),
                why: "expected an http:// URL, e.g. http://127.0.0.1:50051".to_string(),
            });
        }
        let channel = match tokio::time::timeout(
            timeout,
            endpoint.connect_timeout(timeout).connect(),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(CliError::Unreachable {
                    addr: addr.to_string(),
                    why: root_cause(&e),
                })
            }
            Err(_) => {
                return Err(CliError::Unreachable {
                    addr: addr.to_string(),
                    why: format!("no answer within {}s", timeout.as_secs()),
                })
            }
        };
        Ok(Self {
            addr: addr.to_string(),
            client: ControlPlaneClient::new(channel),
            json,
        })
    }

    /// Turns a gRPC status into a one-line error about `what`.
    fn status(&self, what: impl Into<String>, s: tonic::Status) -> CliError {
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
            _ => CliError::Refused { what, message },
        }
    }

    fn out(&self, text: &str) -> Result<(), CliError> {
        let mut o = std::io::stdout().lock();
        o.write_all(text.as_bytes()).map_err(CliError::Output)?;
        o.flush().map_err(CliError::Output)
    }

    fn out_json(&self, v: &serde_json::Value) -> Result<(), CliError> {
        let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".to_string());
        s.push('\n');
        self.out(&s)
    }

    async fn get_build(&mut self, id: &str) -> Result<Build, CliError> {
        self.client
            .get_build(GetBuildRequest { id: id.to_string() })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status(format!("build {id}"), s))
    }
}

/// Shows what a wait is doing: a redrawn spinner line on a terminal, plain lines otherwise.
struct Progress {
    tty: bool,
    frame: usize,
    line: String,
    started: Instant,
    last_plain: String,
}

impl Progress {
    fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            frame: 0,
            line: String::new(),
            started: Instant::now(),
            last_plain: String::new(),
        }
    }

    fn set(&mut self, line: String) {
        if self.tty {
            self.line = line;
            self.draw();
        } else if line != self.last_plain {
            let _ = writeln!(std::io::stderr(), "{line}");
            self.last_plain = line;
        }
    }

    fn draw(&mut self) {
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

    fn finish(&mut self, line: String) {
        if self.tty {
            let mut e = std::io::stderr().lock();
            let _ = writeln!(e, "\r\x1b[2K{line}");
        } else if line != self.last_plain {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }
}

fn progress_line(b: &Build) -> String {
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
fn outcome(b: &Build) -> Result<(), CliError> {
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
async fn follow_states(
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

async fn run(cli: Cli) -> Result<(), CliError> {
    let mut ctl = Ctl::connect(
        &cli.addr,
        Duration::from_secs(cli.connect_timeout.max(1)),
        cli.json,
    )
    .await?;
    let now = render::now_ms();
    match cli.command {
        Command::Project(ProjectCommand::Add(a)) => {
            let req = CreateProjectRequest {
                name: a.name.clone(),
                repo_url: a.repo,
                secret: a.secret,
                branch: a.branch.unwrap_or_default(),
                size_class: a.size.unwrap_or_default(),
                private_network: a.private_network.unwrap_or_default(),
                steps: a.steps,
                timeout_secs: a.timeout.unwrap_or(0),
                env: a.env.into_iter().collect::<HashMap<_, _>>(),
            };
            let p = ctl
                .client
                .create_project(req)
                .await
                .map_err(|s| ctl.status(format!("add project {:?}", a.name), s))?
                .into_inner();
            if ctl.json {
                ctl.out_json(&render::project_json(&p))
            } else {
                ctl.out(&format!("project {} added (id {})\n", p.name, p.id))
            }
        }
        Command::Project(ProjectCommand::Rm { name }) => {
            ctl.client
                .delete_project(DeleteProjectRequest {
                    project: name.clone(),
                })
                .await
                .map_err(|s| ctl.status(format!("delete project {name:?}"), s))?;
            if ctl.json {
                ctl.out_json(&serde_json::json!({ "deleted": name }))
            } else {
                ctl.out(&format!("project {name} deleted\n"))
            }
        }
        Command::Project(ProjectCommand::Show { name }) => {
            let p = ctl
                .client
                .get_project(GetProjectRequest {
                    project: name.clone(),
                })
                .await
                .map_err(|s| ctl.status(format!("project {name:?}"), s))?
                .into_inner();
            if ctl.json {
                ctl.out_json(&render::project_json(&p))
            } else {
                ctl.out(&render::project_text(&p, now))
            }
        }
        Command::Network(NetworkCommand::Add {
            name,
            prefixes,
            tunnel_subnet,
        }) => {
            let n = ctl
                .client
                .create_network(pb::CreateNetworkRequest {
                    name: name.clone(),
                    prefixes,
                    tunnel_subnet: tunnel_subnet.unwrap_or_default(),
                })
                .await
                .map_err(|s| ctl.status(format!("add network {name:?}"), s))?
                .into_inner();
            if ctl.json {
                ctl.out_json(&network_json(&n))
            } else {
                ctl.out(&format!(
                    "network {} added: prefixes {}, tunnel subnet {}\n",
                    n.name,
                    n.prefixes.join(", "),
                    n.tunnel_subnet
                ))
            }
        }
        Command::Network(NetworkCommand::List) => {
            let ns = ctl
                .client
                .list_networks(pb::ListNetworksRequest {})
                .await
                .map_err(|s| ctl.status("list networks", s))?
                .into_inner()
                .networks;
            if ctl.json {
                ctl.out_json(&serde_json::Value::Array(
                    ns.iter().map(network_json).collect(),
                ))
            } else {
                let mut out = format!("{:<20} {:<18} {}\n", "NAME", "TUNNEL SUBNET", "PREFIXES");
                for n in &ns {
                    out.push_str(&format!(
                        "{:<20} {:<18} {}\n",
                        n.name,
                        n.tunnel_subnet,
                        n.prefixes.join(",")
                    ));
                }
                ctl.out(&out)
            }
        }
        Command::Network(NetworkCommand::Rm { name }) => {
            ctl.client
                .delete_network(pb::DeleteNetworkRequest { name: name.clone() })
                .await
                .map_err(|s| ctl.status(format!("delete network {name:?}"), s))?;
            if ctl.json {
                ctl.out_json(&serde_json::json!({ "deleted": name }))
            } else {
                ctl.out(&format!("network {name} deleted\n"))
            }
        }
        Command::Connector(ConnectorCommand::Add {
            network,
            endpoint,
            public_key,
        }) => {
            let r = ctl
                .client
                .add_connector(pb::AddConnectorRequest {
                    network: network.clone(),
                    endpoint,
                    public_key,
                })
                .await
                .map_err(|s| ctl.status(format!("add connector to network {network:?}"), s))?
                .into_inner();
            let c = r.connector.unwrap_or_default();
            if ctl.json {
                let mut v = connector_json(&c);
                v["token"] = serde_json::Value::String(r.token);
                ctl.out_json(&v)
            } else {
                ctl.out(&format!(
                    "connector {} added to network {}\ntoken (shown only now): {}\n",
                    c.id, c.network, r.token
                ))
            }
        }
        Command::Connector(ConnectorCommand::List { network }) => {
            let cs = ctl
                .client
                .list_connectors(pb::ListConnectorsRequest {
                    network: network.unwrap_or_default(),
                })
                .await
                .map_err(|s| ctl.status("list connectors", s))?
                .into_inner()
                .connectors;
            if ctl.json {
                ctl.out_json(&serde_json::Value::Array(
                    cs.iter().map(connector_json).collect(),
                ))
            } else {
                let mut out = format!(
                    "{:<37} {:<14} {:<22} {:<10} {:<6} {}\n",
                    "ID", "NETWORK", "ENDPOINT", "CONNECTED", "PEERS", "PUBLIC KEY"
                );
                for c in &cs {
                    out.push_str(&format!(
                        "{:<37} {:<14} {:<22} {:<10} {:<6} {}\n",
                        c.id,
                        c.network,
                        c.endpoint,
                        if c.connected { "yes" } else { "no" },
                        c.active_peers,
                        c.public_key
                    ));
                }
                ctl.out(&out)
            }
        }
        Command::Connector(ConnectorCommand::Rm { connector }) => {
            ctl.client
                .remove_connector(pb::RemoveConnectorRequest {
                    connector: connector.clone(),
                })
                .await
                .map_err(|s| ctl.status(format!("remove connector {connector:?}"), s))?;
            if ctl.json {
                ctl.out_json(&serde_json::json!({ "removed": connector }))
            } else {
                ctl.out(&format!("connector {connector} removed\n"))
            }
        }
        Command::Projects => {
            let ps = ctl
                .client
                .list_projects(ListProjectsRequest {})
                .await
                .map_err(|s| ctl.status("list projects", s))?
                .into_inner()
                .projects;
            if ctl.json {
                ctl.out_json(&serde_json::Value::Array(
                    ps.iter().map(render::project_json).collect(),
                ))
            } else {
                ctl.out(&render::projects_table(&ps, now))
            }
        }
        Command::Submit {
            project,
            rev,
            git_ref,
            wait,
        } => {
            let b = ctl
                .client
                .submit_build(SubmitBuildRequest {
                    project: project.clone(),
                    revision: rev.unwrap_or_default(),
                    git_ref: git_ref.unwrap_or_default(),
                })
                .await
                .map_err(|s| ctl.status(format!("submit build of {project:?}"), s))?
                .into_inner();
            if !wait {
                return if ctl.json {
                    ctl.out_json(&render::build_json(&b))
                } else {
                    ctl.out(&format!("build {} {}\n", b.id, render::state_name(b.state)))
                };
            }
            let mut progress = Progress::new();
            progress.set(progress_line(&b));
            let end = follow_states(
                &mut ctl,
                &b.id,
                |b, p| {
                    if let Some(p) = p {
                        p.set(progress_line(b));
                    }
                },
                Some(&mut progress),
            )
            .await?;
            progress.finish(progress_line(&end));
            if ctl.json {
                ctl.out_json(&render::build_json(&end))?;
            } else {
                ctl.out(&format!(
                    "build {} {}\n",
                    end.id,
                    render::state_name(end.state)
                ))?;
            }
            outcome(&end)
        }
        Command::Builds {
            project,
            state,
            limit,
        } => {
            let bs = ctl
                .client
                .list_builds(ListBuildsRequest {
                    project: project.unwrap_or_default(),
                    state: state.unwrap_or(BuildState::Unspecified) as i32,
                    limit,
                })
                .await
                .map_err(|s| ctl.status("list builds", s))?
                .into_inner()
                .builds;
            if ctl.json {
                ctl.out_json(&serde_json::Value::Array(
                    bs.iter().map(render::build_json).collect(),
                ))
            } else {
                ctl.out(&render::builds_table(&bs, now))
            }
        }
        Command::Build { id } => {
            let b = ctl.get_build(&id).await?;
            if ctl.json {
                ctl.out_json(&render::build_json(&b))
            } else {
                ctl.out(&render::build_text(&b, now))
            }
        }
        Command::Logs { id, follow, from } => {
            let mut stream = ctl
                .client
                .stream_logs(StreamLogsRequest {
                    build_id: id.clone(),
                    from_seq: from,
                    follow,
                })
                .await
                .map_err(|s| ctl.status(format!("logs of build {id}"), s))?
                .into_inner();
            while let Some(item) = stream.next().await {
                let chunk = item.map_err(|s| ctl.status(format!("logs of build {id}"), s))?;
                if ctl.json {
                    let mut line = render::log_json(&chunk).to_string();
                    line.push('\n');
                    ctl.out(&line)?;
                } else {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&chunk.data).map_err(CliError::Output)?;
                    o.flush().map_err(CliError::Output)?;
                }
            }
            if !follow {
                return Ok(());
            }
            let b = ctl.get_build(&id).await?;
            if !BuildState::try_from(b.state).is_ok_and(BuildState::is_terminal) {
                return Err(CliError::StreamCut {
                    what: format!("logs of build {id}"),
                });
            }
            outcome(&b)
        }
        Command::Watch { id } => {
            let json = ctl.json;
            // Transitions already printed: the first answer carries the history, so a watch
            // that attaches late still shows every state the build went through, in order.
            let mut shown = 0usize;
            let end = follow_states(
                &mut ctl,
                &id,
                |b, _| {
                    let mut out = String::new();
                    let earlier = b.transitions.len().saturating_sub(1);
                    for t in b.transitions.iter().take(earlier).skip(shown) {
                        out.push_str(&render::transition_line(t, &b.id, json));
                        out.push('\n');
                    }
                    shown = shown.max(b.transitions.len());
                    if json {
                        let mut v = render::build_json(b);
                        if let Some(o) = v.as_object_mut() {
                            o.remove("transitions");
                            o.insert("kind".into(), "build".into());
                        }
                        out.push_str(&v.to_string());
                    } else {
                        out.push_str(&render::state_change_line(b));
                    }
                    // A closed stdout only ends the output, not the wait.
                    let _ = writeln!(std::io::stdout().lock(), "{out}");
                },
                None,
            )
            .await?;
            outcome(&end)
        }
        Command::Cancel { id, reason } => {
            let b = ctl
                .client
                .cancel_build(CancelBuildRequest {
                    id: id.clone(),
                    reason,
                })
                .await
                .map_err(|s| ctl.status(format!("cancel build {id}"), s))?
                .into_inner();
            if ctl.json {
                ctl.out_json(&render::build_json(&b))
            } else {
                ctl.out(&format!("build {} {}\n", b.id, render::state_name(b.state)))
            }
        }
        Command::Boxes => {
            let bs = ctl
                .client
                .list_boxes(ListBoxesRequest {})
                .await
                .map_err(|s| ctl.status("list boxes", s))?
                .into_inner()
                .boxes;
            if ctl.json {
                ctl.out_json(&serde_json::Value::Array(
                    bs.iter().map(render::box_json).collect(),
                ))
            } else {
                ctl.out(&render::boxes_table(&bs, now))
            }
        }
        Command::Cells { box_id } => {
            let cs = ctl
                .client
                .list_cells(ListCellsRequest {
                    box_id: box_id.unwrap_or_default(),
                })
                .await
                .map_err(|s| ctl.status("list cells", s))?
                .into_inner()
                .cells;
            if ctl.json {
                ctl.out_json(&serde_json::Value::Array(
                    cs.iter().map(render::cell_json).collect(),
                ))
            } else {
                ctl.out(&render::cells_table(&cs, now))
            }
        }
        Command::BoxCmd(cmd) => {
            let (verb, id) = match &cmd {
                BoxCommand::Cordon { id } => ("cordon", id.clone()),
                BoxCommand::Drain { id } => ("drain", id.clone()),
            };
            let req = BoxActionRequest { box_id: id.clone() };
            let r = match cmd {
                BoxCommand::Cordon { .. } => ctl.client.cordon_box(req).await,
                BoxCommand::Drain { .. } => ctl.client.drain_box(req).await,
            };
            let b = r
                .map_err(|s| ctl.status(format!("{verb} box {id}"), s))?
                .into_inner();
            if ctl.json {
                ctl.out_json(&render::box_json(&b))
            } else {
                ctl.out(&render::box_text(&b, now))
            }
        }
        Command::Classes => {
            let cs = ctl
                .client
                .list_size_classes(ListSizeClassesRequest {})
                .await
                .map_err(|s| ctl.status("list size classes", s))?
                .into_inner()
                .classes;
            if ctl.json {
                ctl.out_json(&serde_json::Value::Array(
                    cs.iter().map(render::class_json).collect(),
                ))
            } else {
                ctl.out(&render::classes_table(&cs))
            }
        }
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn main() -> ExitCode {
    // Errors go to the user as one line; tracing is for debugging the client (RUST_LOG).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "hivectl: start async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        tokio::select! {
            r = run(cli) => Some(r),
            _ = shutdown_signal() => None,
        }
    });
    let Some(result) = result else {
        // Interrupted while waiting: leave the terminal line clean, exit as killed by a signal.
        let _ = writeln!(std::io::stderr());
        return ExitCode::from(130);
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            // `hivectl logs X | head` closing the pipe is not an error.
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "hivectl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
