//! hivectl: the operator CLI for a Hive control plane, over its gRPC API (`hive.v1.ControlPlane`).
//!
//! Thin by design: every command is one or two RPCs, then rendering (`render`). Errors from the
//! transport or a gRPC status become one line naming what failed, with a documented exit code.
//! `cli` holds the command line; each area (`projects`, `builds`, `boxes`, `networks`,
//! `tokens`) runs its subcommands over the connection `ctl` opens, which carries the API token.
#![forbid(unsafe_code)]

mod boxes;
mod builds;
mod cli;
mod ctl;
mod networks;
mod projects;
mod render;
mod tokens;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::cli::{
    Cli, Command, ConnectorCommand, NetworkCommand, ProjectCommand, SecretCommand, TokenCommand,
};
use crate::ctl::{CliError, Ctl};

/// Connects, then hands the subcommand to its area.
async fn run(cli: Cli) -> Result<(), CliError> {
    let token = ctl::token(cli.token, cli.token_file.as_deref())?;
    let trust = ctl::Trust::new(cli.ca_sha256.as_deref(), cli.ca_file.as_deref())?;
    let mut ctl = Ctl::connect(
        &cli.addr,
        token,
        &trust,
        Duration::from_secs(cli.connect_timeout.max(1)),
        cli.json,
    )
    .await?;
    let ctl = &mut ctl;
    let now = hive_sys::now_ms();
    match cli.command {
        Command::Project(ProjectCommand::Add(a)) => projects::add(ctl, *a).await,
        Command::Project(ProjectCommand::Rm { name }) => projects::remove(ctl, name).await,
        Command::Project(ProjectCommand::Show { name }) => projects::show(ctl, name, now).await,
        Command::Projects => projects::list(ctl, now).await,
        Command::Project(ProjectCommand::DeployKey {
            project,
            rotate,
            known_hosts,
            forge_host_keys,
        }) => projects::deploy_key(ctl, project, rotate, known_hosts, forge_host_keys).await,
        Command::Project(ProjectCommand::HttpsToken {
            project,
            user,
            remove,
        }) => projects::https_token(ctl, project, user, remove).await,
        Command::Project(ProjectCommand::Status(a)) => projects::forge_status(ctl, *a).await,
        Command::Network(NetworkCommand::Add {
            name,
            prefixes,
            tunnel_subnet,
        }) => networks::add(ctl, name, prefixes, tunnel_subnet).await,
        Command::Network(NetworkCommand::List) => networks::list(ctl).await,
        Command::Network(NetworkCommand::Rm { name }) => networks::remove(ctl, name).await,
        Command::Connector(ConnectorCommand::Add {
            network,
            endpoint,
            public_key,
        }) => networks::add_connector(ctl, network, endpoint, public_key).await,
        Command::Connector(ConnectorCommand::List { network }) => {
            networks::list_connectors(ctl, network).await
        }
        Command::Connector(ConnectorCommand::Rm { connector }) => {
            networks::remove_connector(ctl, connector).await
        }
        Command::Submit {
            project,
            rev,
            git_ref,
            request_id,
            wait,
        } => builds::submit(ctl, project, rev, git_ref, request_id, wait).await,
        Command::Rebuild { id, wait } => builds::rebuild(ctl, id, wait).await,
        Command::Builds {
            project,
            state,
            limit,
        } => builds::list(ctl, project, state, limit, now).await,
        Command::Build { id } => builds::show(ctl, id, now).await,
        Command::Logs { id, follow, from } => builds::logs(ctl, id, follow, from).await,
        Command::Watch { id } => builds::watch(ctl, id).await,
        Command::Artifacts { id, get, output } => match get {
            None => builds::artifacts(ctl, id).await,
            Some(path) => builds::get_artifact(ctl, id, path, output).await,
        },
        Command::Cancel { id, reason } => builds::cancel(ctl, id, reason).await,
        Command::Boxes => boxes::list(ctl, now).await,
        Command::Cells { box_id } => boxes::cells(ctl, box_id, now).await,
        Command::BoxCmd(cmd) => boxes::action(ctl, cmd, now).await,
        Command::Classes => boxes::classes(ctl).await,
        Command::Token(TokenCommand::Create {
            role,
            project,
            name,
        }) => tokens::create(ctl, role, project, name, now).await,
        Command::Token(TokenCommand::List) => tokens::list(ctl, now).await,
        Command::Secret(SecretCommand::Set {
            project,
            name,
            refs,
        }) => tokens::set_secret(ctl, project, name, refs).await,
        Command::Secret(SecretCommand::List { project }) => {
            tokens::list_secrets(ctl, project, now).await
        }
        Command::Secret(SecretCommand::Rm { project, name }) => {
            tokens::delete_secret(ctl, project, name).await
        }
        Command::Token(TokenCommand::Revoke { id }) => tokens::revoke(ctl, id, now).await,
        Command::Audit { limit } => tokens::audit(ctl, limit, now).await,
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
