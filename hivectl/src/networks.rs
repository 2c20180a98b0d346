//! `network add|list|rm` and `connector add|list|rm`: private networks and their connectors.

use hive_proto::v1 as pb;

use crate::ctl::{CliError, Ctl};

/// `network add`.
pub(crate) async fn add(
    ctl: &mut Ctl,
    name: String,
    prefixes: Vec<String>,
    tunnel_subnet: Option<String>,
) -> Result<(), CliError> {
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

/// `network list`.
pub(crate) async fn list(ctl: &mut Ctl) -> Result<(), CliError> {
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

/// `network rm`.
pub(crate) async fn remove(ctl: &mut Ctl, name: String) -> Result<(), CliError> {
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

/// `connector add`: prints the token, once.
pub(crate) async fn add_connector(
    ctl: &mut Ctl,
    network: String,
    endpoint: String,
    public_key: String,
) -> Result<(), CliError> {
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
        v["ca_sha256"] = serde_json::Value::String(r.ca_sha256);
        ctl.out_json(&v)
    } else {
        ctl.out(&format!(
            "connector {} added to network {}\ntoken (shown only now): {}\n\
             control plane CA sha256: {}\n\
             run: hive-connector --control-plane https://CONTROL-PLANE:50052 --ca-sha256 {} \
             --network {} --token TOKEN --key-file KEY --endpoint {}\n",
            c.id, c.network, r.token, r.ca_sha256, r.ca_sha256, c.network, c.endpoint
        ))
    }
}

/// `connector list`.
pub(crate) async fn list_connectors(
    ctl: &mut Ctl,
    network: Option<String>,
) -> Result<(), CliError> {
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

/// `connector rm`.
pub(crate) async fn remove_connector(ctl: &mut Ctl, connector: String) -> Result<(), CliError> {
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
