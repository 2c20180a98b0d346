//! Private networks, their connectors and tunnel leases (admin's to change). Input is checked by
//! `domain::network`; a removed connector's or network's sessions are ended.

use hive_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{net_err, ControlPlaneService};
use crate::auth::Right;
use crate::domain::network;
use crate::store::{ConnectorRow, NetworkRow};

fn network_to_proto(n: &NetworkRow) -> pb::PrivateNetwork {
    pb::PrivateNetwork {
        name: n.name.clone(),
        prefixes: n.prefixes.clone(),
        tunnel_subnet: n.tunnel_subnet.clone(),
        created_at_ms: n.created_at_ms,
    }
}

impl ControlPlaneService {
    async fn connector_info(&self, r: &ConnectorRow) -> Result<pb::ConnectorInfo, Status> {
        let active = self
            .hive
            .store
            .list_tunnel_leases(&r.network, "", true)
            .await
            .map_err(net_err)?;
        Ok(pb::ConnectorInfo {
            id: r.id.clone(),
            network: r.network.clone(),
            public_key: r.public_key.clone(),
            endpoint: r.endpoint.clone(),
            created_at_ms: r.created_at_ms,
            connected: self.hive.connectors.is_connected(&r.id),
            active_peers: u32::try_from(active.len()).unwrap_or(u32::MAX),
        })
    }
}

pub(super) async fn create_network(
    svc: &ControlPlaneService,
    request: Request<pb::CreateNetworkRequest>,
) -> Result<Response<pb::PrivateNetwork>, Status> {
    let caller = svc.caller(&request, "CreateNetwork", Right::Admin).await?;
    let req = request.into_inner();
    let name = req.name.trim();
    network::validate_name(name).map_err(net_err)?;
    let prefixes = network::validate_prefixes(&req.prefixes).map_err(net_err)?;
    let subnet = network::validate_tunnel_subnet(&req.tunnel_subnet, &prefixes).map_err(net_err)?;
    let row = svc
        .hive
        .store
        .create_network(
            name,
            &prefixes,
            &subnet,
            &caller.audit("CreateNetwork", name),
        )
        .await
        .map_err(net_err)?;
    tracing::info!(network = %row.name, prefixes = ?row.prefixes, tunnel_subnet = %row.tunnel_subnet, "private network created");
    Ok(Response::new(network_to_proto(&row)))
}

pub(super) async fn list_networks(
    svc: &ControlPlaneService,
    request: Request<pb::ListNetworksRequest>,
) -> Result<Response<pb::ListNetworksReply>, Status> {
    svc.caller(&request, "ListNetworks", Right::Read).await?;
    let rows = svc.hive.store.list_networks().await.map_err(net_err)?;
    Ok(Response::new(pb::ListNetworksReply {
        networks: rows.iter().map(network_to_proto).collect(),
    }))
}

pub(super) async fn delete_network(
    svc: &ControlPlaneService,
    request: Request<pb::DeleteNetworkRequest>,
) -> Result<Response<pb::DeleteNetworkReply>, Status> {
    let caller = svc.caller(&request, "DeleteNetwork", Right::Admin).await?;
    let name = request.into_inner().name;
    let connectors = svc
        .hive
        .store
        .list_connectors(Some(&name))
        .await
        .map_err(net_err)?;
    svc.hive
        .store
        .delete_network(&name, &caller.audit("DeleteNetwork", &name))
        .await
        .map_err(net_err)?;
    for c in connectors {
        svc.hive.connectors.kick(&c.id);
    }
    tracing::info!(network = %name, "private network deleted");
    Ok(Response::new(pb::DeleteNetworkReply {}))
}

pub(super) async fn add_connector(
    svc: &ControlPlaneService,
    request: Request<pb::AddConnectorRequest>,
) -> Result<Response<pb::AddConnectorReply>, Status> {
    let caller = svc.caller(&request, "AddConnector", Right::Admin).await?;
    let req = request.into_inner();
    let endpoint = network::validate_endpoint(&req.endpoint).map_err(net_err)?;
    let key = network::validate_public_key(&req.public_key).map_err(net_err)?;
    let token = network::new_token();
    let row = svc
        .hive
        .store
        .add_connector(
            req.network.trim(),
            &key,
            &endpoint,
            &crate::store::networks::token_hash(&token),
            &caller
                .audit("AddConnector", req.network.trim())
                .with_detail(format!("endpoint {endpoint} key {key}")),
        )
        .await
        .map_err(net_err)?;
    tracing::info!(network = %row.network, connector_id = %row.id, public_key = %row.public_key, endpoint = %row.endpoint, "connector added");
    let info = svc.connector_info(&row).await?;
    Ok(Response::new(pb::AddConnectorReply {
        connector: Some(info),
        token,
        ca_sha256: svc.hive.ca.sha256().to_string(),
    }))
}

pub(super) async fn list_connectors(
    svc: &ControlPlaneService,
    request: Request<pb::ListConnectorsRequest>,
) -> Result<Response<pb::ListConnectorsReply>, Status> {
    svc.caller(&request, "ListConnectors", Right::Read).await?;
    let network = request.into_inner().network;
    let rows = svc
        .hive
        .store
        .list_connectors((!network.is_empty()).then_some(network.as_str()))
        .await
        .map_err(net_err)?;
    let mut connectors = Vec::with_capacity(rows.len());
    for r in &rows {
        connectors.push(svc.connector_info(r).await?);
    }
    Ok(Response::new(pb::ListConnectorsReply { connectors }))
}

pub(super) async fn remove_connector(
    svc: &ControlPlaneService,
    request: Request<pb::RemoveConnectorRequest>,
) -> Result<Response<pb::RemoveConnectorReply>, Status> {
    let caller = svc
        .caller(&request, "RemoveConnector", Right::Admin)
        .await?;
    let which = request.into_inner().connector;
    let row = svc
        .hive
        .store
        .remove_connector(which.trim(), &caller.audit("RemoveConnector", which.trim()))
        .await
        .map_err(net_err)?
        .ok_or_else(|| Status::not_found(format!("connector {which:?} not found")))?;
    svc.hive.connectors.kick(&row.id);
    tracing::info!(network = %row.network, connector_id = %row.id, "connector removed");
    Ok(Response::new(pb::RemoveConnectorReply {}))
}

pub(super) async fn list_tunnel_leases(
    svc: &ControlPlaneService,
    request: Request<pb::ListTunnelLeasesRequest>,
) -> Result<Response<pb::ListTunnelLeasesReply>, Status> {
    svc.caller(&request, "ListTunnelLeases", Right::Operate)
        .await?;
    let req = request.into_inner();
    let rows = svc
        .hive
        .store
        .list_tunnel_leases(&req.network, &req.build_id, false)
        .await
        .map_err(net_err)?;
    Ok(Response::new(pb::ListTunnelLeasesReply {
        leases: rows
            .into_iter()
            .map(|l| pb::TunnelLease {
                build_id: l.build_id,
                network: l.network,
                public_key: l.public_key,
                tunnel_address: l.tunnel_address,
                state: l.state,
                issued_at_ms: l.issued_at_ms,
                revoked_at_ms: l.revoked_at_ms,
                lease_id: l.lease_id,
            })
            .collect(),
    }))
}
