//! The command line: flags, subcommands and their arguments (clap), and the parsers of
//! argument values. What each subcommand does lives in its area's module.

use clap::{Args, Parser, Subcommand};
use hive_proto::v1::BuildState;

pub(crate) const EXIT_CODES: &str = "\
Exit codes:
  0   success (for `logs -f`, `watch`, `submit --wait`: the build succeeded)
  1   the control plane refused the request (invalid input, already exists, ...) or failed
  2   bad command line (unknown flag, missing argument, bad --addr), or a TLS trust problem
      (no --ca-sha256/--ca-file for https://, or the server's CA is not the one given)
  3   cannot reach the control plane (not running, wrong --addr, connection lost)
  4   not found (project, build or box)
  5   not authenticated (no, unknown or revoked token) or not permitted (the token's role)
  10  the followed build failed
  11  the followed build was cancelled
  12  the followed build timed out
  130 interrupted (SIGINT/SIGTERM) while waiting

Environment: HIVE_ADDR (same as --addr), HIVE_TOKEN (same as --token), HIVE_TOKEN_FILE
(same as --token-file), HIVE_CA_SHA256 (--ca-sha256), HIVE_CA_FILE (--ca-file).
A control plane on another host is dialled as https://HOST:PORT with --ca-sha256 or --ca-file;
plain http:// is for loopback only (the token would cross the network in the clear). On its first start the control plane writes an admin token to
<data-dir>/admin.token: export HIVE_TOKEN=$(cat <data-dir>/admin.token).";

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
pub(crate) struct Cli {
    /// Control plane gRPC address; several control planes of one hive comma-separated (tried
    /// in turn, the first that answers serves the command).
    #[arg(
        long,
        env = "HIVE_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub(crate) addr: String,
    /// Print JSON instead of tables: listings an array, show commands an object; `logs` and
    /// `watch` one object per line (chunk / state change).
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// API token (from `hivectl token create`, or the admin token in the control plane's
    /// <data-dir>/admin.token). Prefer HIVE_TOKEN or --token-file: an argument shows in `ps`.
    #[arg(long, env = "HIVE_TOKEN", hide_env_values = true, global = true)]
    pub(crate) token: Option<String>,
    /// Read the API token from this file (used when --token / HIVE_TOKEN is not set).
    #[arg(long, env = "HIVE_TOKEN_FILE", global = true, value_name = "PATH")]
    pub(crate) token_file: Option<std::path::PathBuf>,
    /// SHA-256 (hex) of the hive's CA certificate, to trust an https:// --addr by (the control
    /// plane logs it at start as ca_sha256; join tokens carry it too).
    #[arg(long, env = "HIVE_CA_SHA256", global = true, value_name = "HEX")]
    pub(crate) ca_sha256: Option<String>,
    /// PEM file of the CA to trust an https:// --addr by (the hive's <data-dir>/pki/ca.pem, or
    /// the CA of the operator's --tls-cert); used instead of --ca-sha256.
    #[arg(long, env = "HIVE_CA_FILE", global = true, value_name = "PATH")]
    pub(crate) ca_file: Option<std::path::PathBuf>,
    /// Give up connecting after this many seconds.
    #[arg(long, default_value_t = 5, global = true, value_name = "SECS")]
    pub(crate) connect_timeout: u64,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
        /// Idempotency key: submitting again with the same one answers with the build it
        /// made instead of queuing another (1-128 of A-Z a-z 0-9 . _ : -). Default: a fresh
        /// one, which this command reuses when it retries after losing the control plane.
        #[arg(long = "request-id")]
        request_id: Option<String>,
        /// Wait until the build ends, showing progress; exit code tells how it ended.
        #[arg(long)]
        wait: bool,
    },
    /// Build again: a new build of the same project, revision and ref (with the project's
    /// steps as they are now).
    Rebuild {
        /// The build to run again.
        id: String,
        /// Wait until the new build ends, showing progress; exit code tells how it ended.
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
    /// List a build's artefacts (what its `hive.toml` names under `artifacts`), or download
    /// one with --get.
    Artifacts {
        /// Build id.
        id: String,
        /// Download this artefact (a path as listed).
        #[arg(long, value_name = "PATH")]
        get: Option<String>,
        /// With --get: write it to FILE (default: the artefact's file name in the current
        /// directory; `-` for stdout).
        #[arg(short = 'o', long = "output", value_name = "FILE", requires = "get")]
        output: Option<String>,
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
    /// Cordon, uncordon, drain or forget a box.
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
    /// Project secrets (set, list, rm): values in, names out. A value is stored encrypted,
    /// given only to the build's cell as an environment variable, and masked (***) in the log.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// API tokens (create, list, revoke); admin only.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The audit log: who changed what, newest first; admin only.
    Audit {
        /// At most this many entries (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum SecretCommand {
    /// Set a secret (operator), reading its value from stdin so it shows in no process list or
    /// shell history: `printf %s "$VALUE" | hivectl secret set PROJECT NAME`, or type it and
    /// end with Ctrl-D. One trailing newline is dropped.
    Set {
        /// Project name or id.
        project: String,
        /// The environment variable the steps see it as ([A-Za-z_][A-Za-z0-9_]*, not HIVE_*).
        name: String,
        /// Which builds get it, comma-separated globs: branch names (`main,release/*`), full
        /// refs (`refs/tags/v*`), or `*` for every build (any branch, tag or revision; also
        /// builds of branches anyone with push access can make). Default: the project's
        /// branch pattern, so a build of another branch or a tag does not see it.
        #[arg(long, value_name = "GLOBS")]
        refs: Option<String>,
    },
    /// List a project's secrets: names, the refs that get them and when they were set, never
    /// values.
    List {
        /// Project name or id.
        project: String,
    },
    /// Delete a secret (operator); builds placed from now on run without it.
    Rm {
        /// Project name or id.
        project: String,
        /// Secret name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Make a token; prints it once (only its hash is kept).
    Create {
        /// admin, operator, read-only or submitter (see the README's role table).
        #[arg(long)]
        role: String,
        /// For a submitter: the only project (name or id) it may submit and cancel builds of.
        #[arg(long)]
        project: Option<String>,
        /// A name to tell it by in `token list` and the audit log (default: role and id).
        #[arg(long)]
        name: Option<String>,
    },
    /// List tokens (never their secrets), revoked ones too.
    List,
    /// Revoke a token by id: refused from the next call on.
    Revoke {
        /// Token id (from `token list`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum NetworkCommand {
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
pub(crate) enum ConnectorCommand {
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
pub(crate) enum ProjectCommand {
    /// Register a project: pushes to its repository make builds.
    Add(Box<ProjectAdd>),
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
    /// The project's ssh deploy key for cloning a private repository: made (ed25519) on the
    /// control plane if there is none; prints the public key to add to the repository on the
    /// forge (read access). The private key never leaves the control plane but to the clone.
    DeployKey {
        /// Project name or id.
        project: String,
        /// Make a new key pair (the old public key no longer works: remove it from the forge).
        #[arg(long)]
        rotate: bool,
        /// Trust these ssh host keys (a known_hosts file, e.g. from `ssh-keyscan HOST`, checked
        /// against what the server's operator publishes) instead of the built-in keys of
        /// github.com, gitlab.com and codeberg.org.
        #[arg(long, value_name = "FILE", conflicts_with = "forge_host_keys")]
        known_hosts: Option<std::path::PathBuf>,
        /// Drop the project's own known hosts: trust the built-in forge keys again.
        #[arg(long)]
        forge_host_keys: bool,
    },
    /// The token an https clone of the project's repository sends (HTTP basic auth), read
    /// from stdin: `printf %s "$TOKEN" | hivectl project https-token PROJECT`. Stored sealed;
    /// given to the clone only (never to the steps), never put in a URL.
    HttpsToken {
        /// Project name or id.
        project: String,
        /// User name sent with the token (default x-access-token, which GitHub, GitLab and
        /// Gitea accept with a token).
        #[arg(long)]
        user: Option<String>,
        /// Remove the token.
        #[arg(long)]
        remove: bool,
    },
    /// Commit statuses back to the forge: every build of the project sets the status
    /// `hive/<project>` of its commit on GitHub, GitLab or Gitea/Forgejo (pending, running,
    /// then success, failure or error). Without --forge or --off, shows the settings and the
    /// statuses still waiting to be sent.
    Status(Box<ProjectStatus>),
}

#[derive(Debug, Args)]
pub(crate) struct ProjectStatus {
    /// Project name or id.
    pub(crate) project: String,
    /// The forge: github, gitlab, or gitea (Forgejo too).
    #[arg(long, value_parser = ["github", "gitlab", "gitea", "forgejo"],
          conflicts_with = "off", requires = "credentials")]
    pub(crate) forge: Option<String>,
    /// The forge's API base URL (GitHub Enterprise, self-hosted GitLab or Gitea); default
    /// from the repository's host: https://api.github.com, https://HOST/api/v3, /api/v4 or
    /// /api/v1.
    #[arg(long, value_name = "URL", requires = "forge")]
    pub(crate) api: Option<String>,
    /// Read the forge token (allowed to set commit statuses) from this file, `-` for stdin.
    #[arg(long, value_name = "PATH", group = "credentials", requires = "forge")]
    pub(crate) forge_token_file: Option<std::path::PathBuf>,
    /// GitHub only: a GitHub App's id, with --app-key-file, instead of a token.
    #[arg(long, value_name = "N", group = "credentials", requires_all = ["app_key_file", "forge"])]
    pub(crate) app_id: Option<u64>,
    /// The GitHub App's private key (the .pem GitHub made).
    #[arg(long, value_name = "PATH", requires = "app_id")]
    pub(crate) app_key_file: Option<std::path::PathBuf>,
    /// Stop sending statuses and forget the credentials.
    #[arg(long)]
    pub(crate) off: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ProjectAdd {
    /// Project name (unique).
    pub(crate) name: String,
    /// Repository URL as the git host reports it (clone, ssh, git or html URL).
    #[arg(long)]
    pub(crate) repo: String,
    /// Webhook secret shared with the git host (HMAC-SHA256 key). Leave it out for a project
    /// built only through the API (`hivectl submit`): no webhook can trigger it.
    /// (It shows in `ps` and shell history: prefer --secret-file.)
    #[arg(long, value_parser = parse_secret, conflicts_with = "secret_file")]
    pub(crate) secret: Option<String>,
    /// Read the webhook secret from this file (`-` for stdin; one trailing newline dropped),
    /// so it shows in no process list.
    #[arg(long, value_name = "PATH")]
    pub(crate) secret_file: Option<std::path::PathBuf>,
    /// Only pushes to this branch make builds: a name or a glob, `release/*` (default: every
    /// branch).
    #[arg(long)]
    pub(crate) branch: Option<String>,
    /// Pushed tags that make builds: a glob, `v*`, or `*` for all (default: no tag builds).
    #[arg(long, value_name = "GLOB")]
    pub(crate) tags: Option<String>,
    /// Size class of the cells (default: the control plane's, `small`).
    #[arg(long)]
    pub(crate) size: Option<String>,
    /// Private network the builds join.
    #[arg(long)]
    pub(crate) private_network: Option<String>,
    /// Build timeout in seconds, 1 to 604800 (a week) (default: the control plane's, 1800).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u32).range(1..=604_800))]
    pub(crate) timeout: Option<u32>,
    /// Environment for every step, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub(crate) env: Vec<(String, String)>,
    /// A build step, run with /bin/sh -c (repeatable, in order; at least one, unless --hive
    /// names another hive).
    #[arg(long = "step", value_name = "CMD", required_unless_present = "hive")]
    pub(crate) steps: Vec<String>,
    /// The hive that builds the project, when it is not this one (its --hive-name): pushes
    /// for it are checked here and forwarded there (the control planes' --peer-hive). Give
    /// the repository and the secret; the steps belong to the project on that hive.
    #[arg(long, value_name = "NAME")]
    pub(crate) hive: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum BoxCommand {
    /// Give the box no new builds (running ones go on).
    Cordon {
        /// Box id.
        id: String,
    },
    /// Undo `cordon` or `drain`: the box gets new builds again (a drained box once it is
    /// started again).
    Uncordon {
        /// Box id.
        id: String,
    },
    /// Let the box finish its builds, take no new ones, then leave.
    Drain {
        /// Box id.
        id: String,
    },
    /// Remove a box gone for good from the list (it must be disconnected, with no live
    /// builds); should it come back, it registers as new.
    Forget {
        /// Box id.
        id: String,
    },
    /// Print a one-time token a new box joins with (admin): `hive-box --join-token TOKEN`
    /// (HIVE_BOX_JOIN_TOKEN). It also pins this control plane's CA. The token alone goes to
    /// stdout; how to use it, to stderr. `join-token list` and `join-token revoke ID` show
    /// and withdraw tokens.
    #[command(args_conflicts_with_subcommands = true)]
    JoinToken {
        #[command(subcommand)]
        action: Option<JoinTokenAction>,
        /// How long the token may be used: SECS, or with a unit (90s, 30m, 2h, 1d); at most 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: u64,
        /// Only a box of this id may join with it; the certificates that id held end when it
        /// is used (to move an id to a new machine; without it a token cannot take an id that
        /// holds a certificate).
        #[arg(long)]
        box_id: Option<String>,
    },
    /// Refuse the box's certificates from now on and end its session (admin); its builds are
    /// handled as for a lost box. To bring the machine back, join it again with a new token.
    Revoke {
        /// Box id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum JoinTokenAction {
    /// The join tokens kept (admin): id, the box it is for, unused / used by / expired, who
    /// made it. Never a secret. Used and expired ones go with retention.
    List,
    /// Withdraw an unused join token (admin): no box can join with it any more.
    Revoke {
        /// Its id (from `join-token list`), or the whole token.
        id: String,
    },
}

/// `90`, `90s`, `30m`, `2h`, `1d` -> seconds.
pub(crate) fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 600, 90s, 30m, 2h, 1d)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    let secs = n.saturating_mul(mult);
    if secs == 0 || secs > 7 * 86_400 {
        return Err(format!(
            "{s:?}: a join token lives between 1 second and 7 days"
        ));
    }
    Ok(secs)
}

pub(crate) fn parse_state(s: &str) -> Result<BuildState, String> {
    BuildState::from_short_name(s).ok_or_else(|| {
        format!(
            "unknown build state {s:?} (expected queued, placed, running, succeeded, failed, \
             cancelled or timed_out)"
        )
    })
}

pub(crate) fn parse_secret(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err(
            "an empty secret verifies no webhook: give the secret the git host signs with, \
             or leave --secret out for a project built only through the API"
                .to_string(),
        )
    } else {
        Ok(s.to_string())
    }
}

pub(crate) fn parse_env(s: &str) -> Result<(String, String), String> {
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
