//! The `Connector.Session` stream: one per running `hive-connector`. The first message is a
//! `ConnectorHello` with the token `AddConnector` returned (checked against its SHA-256), the
//! network and the connector's public key; it is answered with the full wanted peer set
//! (`SyncPeers`), then carries `AddPeer`/`RemovePeer` down (from `domain::keyexchange`, through `registry::connectors`) and
//! `PeerApplied`/`ConnectorStatus` up.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use hive_proto::v1::connector_command::Cmd;
use hive_proto::v1::connector_message::Msg;
use hive_proto::v1::connector_server::Connector;
use hive_proto::v1::{ConnectorCommand, ConnectorMessage};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::domain::keyexchange::sync_for;
use crate::registry::connectors::ConnectorConn;
use crate::state::Hive;

/// How long a new session may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC `Connector` service.
#[derive(Clone)]
pub struct ConnectorService {
    pub hive: Arc<Hive>,
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<ConnectorCommand, Status>> + Send>>;

#[tonic::async_trait]
impl Connector for ConnectorService {
    type SessionStream = CommandStream;

    async fn session(
        &self,
        request: Request<Streaming<ConnectorMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let hive = self.hive.clone();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no ConnectorHello within 10s"))??;
        let Some(ConnectorMessage {
            msg: Some(Msg::Hello(hello)),
            ..
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message of a connector session must be ConnectorHello",
            ));
        };
        let internal = |e: crate::store::NetworkError| Status::internal(e.to_string());
        let row = hive
            .store
            .connector_by_token(&hello.token)
            .await
            .map_err(internal)?;
        let Some(row) = row.filter(|r| r.network == hello.network) else {
            tracing::warn!(network = %hello.network, "connector hello with a bad token refused");
            return Err(Status::unauthenticated(format!(
                "connector token is not valid for network {:?}",
                hello.network
            )));
        };
        if row.public_key != hello.public_key.trim() {
            return Err(Status::permission_denied(format!(
                "connector public key {} does not match the one registered for this token ({})",
                hello.public_key, row.public_key
            )));
        }
        let net = hive
            .store
            .get_network(&row.network)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("network {:?} is gone", row.network)))?;
        let sync = sync_for(&hive, &net)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;

        let (tx, rx) = mpsc::channel(1024);
        let conn = ConnectorConn {
            id: hive.connectors.next_conn_id(),
            connector_id: row.id.clone(),
            public_key: row.public_key.clone(),
            endpoint: row.endpoint.clone(),
            tx: tx.clone(),
            kill: Arc::new(Notify::new()),
        };
        tx.try_send(Ok(ConnectorCommand {
            id: hive.connectors.command_id(),
            cmd: Some(Cmd::Sync(sync)),
        }))
        .map_err(|_| Status::internal("connector channel full at hello"))?;
        hive.connectors.connect(&net.name, conn.clone());
        tracing::info!(network = %net.name, connector_id = %row.id, public_key = %row.public_key,
            endpoint = %row.endpoint, peers = hello.peers.len(), version = %hello.version,
            "connector connected");

        let network = net.name.clone();
        tokio::spawn(async move {
            let mut shutdown = hive.shutdown.clone();
            let why = loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    _ = conn.kill.notified() => break "session replaced or connector removed",
                    _ = crate::events::stopped(&mut shutdown) => break "control plane shutting down",
                };
                match next {
                    Ok(Some(ConnectorMessage {
                        msg: Some(Msg::Applied(a)),
                        ..
                    })) => {
                        hive.connectors.applied(conn.id, a.command_id, a.error);
                    }
                    Ok(Some(ConnectorMessage {
                        msg: Some(Msg::Status(s)),
                        ..
                    })) => {
                        tracing::debug!(network = %network, peers = s.peers.len(), "connector status");
                    }
                    Ok(Some(_)) => {
                        tracing::warn!(network = %network, "unexpected connector message ignored");
                    }
                    Ok(None) => break "connector closed the stream",
                    Err(status) => {
                        tracing::info!(network = %network, %status, "connector stream error");
                        break "stream error";
                    }
                }
            };
            hive.connectors.disconnect(&network, conn.id);
            tracing::info!(network = %network, why, "connector disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
