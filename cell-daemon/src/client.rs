//! A small CellAgent client: `hive-cell probe` (used by deploy/guest/boot-check.sh) and tests.

use hive_proto::v1::cell_agent_client::CellAgentClient;
use hive_proto::v1::{
    BuildState, CellEventKind, CellEventsRequest, CellHealthRequest, LogStream, RunBuildRequest,
};
use std::io::Write;
use std::path::PathBuf;
use tonic::transport::{Channel, Endpoint};

/// Errors talking to a cell.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect address {0:?}: expected unix:/ABS/PATH or tcp:HOST:PORT")]
    Address(String),
    #[error("connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{rpc} rpc")]
    Rpc {
        rpc: &'static str,
        #[source]
        source: tonic::Status,
    },
    #[error("cell did not report ready within {0} s")]
    NotReady(u64),
    #[error("event stream ended before the build finished")]
    EventsEnded,
}

/// Connects to `unix:/path` or `tcp:host:port`.
pub async fn connect(addr: &str) -> Result<CellAgentClient<Channel>, ClientError> {
    let conn_err = |source| ClientError::Connect {
        addr: addr.to_string(),
        source,
    };
    let channel = if let Some(path) = addr.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(ClientError::Address(addr.to_string()));
        }
        // The URI is required by the API but unused: the connector below decides where to go.
        Endpoint::from_static("http://cell.invalid")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .map_err(conn_err)?
    } else if let Some(hp) = addr.strip_prefix("tcp:") {
        Endpoint::from_shared(format!("http://{hp}"))
            .map_err(|_| ClientError::Address(addr.to_string()))?
            .connect()
            .await
            .map_err(conn_err)?
    } else {
        return Err(ClientError::Address(addr.to_string()));
    };
    Ok(CellAgentClient::new(channel))
}

/// What `probe` found.
#[derive(Debug)]
pub struct ProbeResult {
    pub cell_id: String,
    pub state: Option<BuildState>,
}

/// Health, and with `step`, a one-step build whose log goes to `out`.
pub async fn probe(
    addr: &str,
    step: Option<&str>,
    repo: &str,
    timeout_secs: u32,
    wait_ready: std::time::Duration,
    out: &mut dyn Write,
) -> Result<ProbeResult, ClientError> {
    let mut client = connect(addr).await?;
    // A cell answers Health as soon as it listens; it is ready once its build container is
    // set up. Wait for that (bounded), so a zero exit means "ready".
    let deadline = std::time::Instant::now() + wait_ready;
    let h = loop {
        let h = client
            .health(CellHealthRequest {})
            .await
            .map_err(|source| ClientError::Rpc {
                rpc: "Health",
                source,
            })?
            .into_inner();
        if h.ready || std::time::Instant::now() >= deadline {
            break h;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let _ = writeln!(
        out,
        "cell {} ready={} state={} version={} uptime_ms={}",
        h.cell_id, h.ready, h.state, h.version, h.uptime_ms
    );
    if !h.ready {
        return Err(ClientError::NotReady(wait_ready.as_secs()));
    }
    let Some(step) = step else {
        return Ok(ProbeResult {
            cell_id: h.cell_id,
            state: None,
        });
    };
    let build_id = format!("probe-{}-{}", std::process::id(), hive_sys::now_ms());
    client
        .run_build(RunBuildRequest {
            build_id: build_id.clone(),
            repo_url: repo.to_string(),
            steps: vec![step.to_string()],
            timeout_secs,
            ..Default::default()
        })
        .await
        .map_err(|source| ClientError::Rpc {
            rpc: "RunBuild",
            source,
        })?;
    let mut events = client
        .events(CellEventsRequest {
            build_id,
            from_seq: 0,
        })
        .await
        .map_err(|source| ClientError::Rpc {
            rpc: "Events",
            source,
        })?
        .into_inner();
    while let Some(ev) = events.message().await.map_err(|source| ClientError::Rpc {
        rpc: "Events",
        source,
    })? {
        if ev.kind == CellEventKind::Log as i32 {
            if ev.stream == LogStream::System as i32 {
                let _ = write!(out, "[hive] ");
            }
            let _ = out.write_all(&ev.data);
        } else if ev.kind == CellEventKind::BuildFinished as i32 {
            let state = BuildState::try_from(ev.state).unwrap_or(BuildState::Unspecified);
            let _ = writeln!(
                out,
                "build finished: {} exit_code={} {}",
                state.short_name(),
                ev.exit_code,
                ev.message
            );
            return Ok(ProbeResult {
                cell_id: h.cell_id,
                state: Some(state),
            });
        }
    }
    Err(ClientError::EventsEnded)
}
