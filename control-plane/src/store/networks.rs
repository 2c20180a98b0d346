//! Private networks (issue 5): a network's prefixes and tunnel subnet, its connectors (public
//! key, endpoint, hashed token) and the tunnel leases: one row per private-network build
//! attempt with the cell's public key and its tunnel address. Every public key ever issued stays
//! in `tunnel_leases` (revoked ones too), which is how a key is refused the second time. Nothing
//! secret is stored: keys are public halves, the connector token only as its SHA-256.
//!
//! `domain::keyexchange` drives the leases; `grpc::api` and `grpc::connector` read and write the
//! rest; `domain::network` checks what goes in.

use std::net::{IpAddr, Ipv4Addr};

use hive_types::Prefix;
use sha2::{Digest, Sha256};

use super::audit::{insert_audit_tx, Audit};
use super::{new_id, now_ms, q, DbKind, Store, StoreError};

/// Lease states as stored.
pub const ACTIVE: &str = "active";
pub const REVOKED: &str = "revoked";

/// Bad network or connector input; each names the field and the value.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network name {0:?} must be 1-64 characters of letters, digits, '-', '_', '.'")]
    Name(String),
    #[error("network needs at least one --prefix")]
    NoPrefix,
    #[error("prefix {input:?}: {reason}")]
    Prefix { input: String, reason: String },
    #[error("tunnel subnet {input:?}: {reason}")]
    TunnelSubnet { input: String, reason: String },
    #[error("tunnel subnet {subnet} overlaps prefix {prefix}")]
    Overlap { subnet: String, prefix: String },
    #[error("endpoint {0:?} must be HOST:PORT")]
    Endpoint(String),
    #[error("public key {input:?}: {reason}")]
    PublicKey { input: String, reason: String },
    #[error("network {0:?} already exists")]
    Exists(String),
    #[error("network {0:?} not found")]
    NotFound(String),
    #[error("network {network:?} is used by project(s) {projects}; remove them first")]
    InUse { network: String, projects: String },
    #[error("a connector with public key {0} already exists")]
    ConnectorExists(String),
    #[error("tunnel subnet {subnet} of network {network:?} has no free address")]
    PoolExhausted { network: String, subnet: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Result<T, E = NetworkError> = std::result::Result<T, E>;

/// A private network as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkRow {
    pub name: String,
    pub prefixes: Vec<String>,
    pub tunnel_subnet: String,
    pub created_at_ms: i64,
}

impl NetworkRow {
    /// The connector's tunnel address (first host of the subnet), with the subnet length.
    pub fn connector_address(&self) -> String {
        let (net, len) = parse_v4_subnet(&self.tunnel_subnet).unwrap_or((0, 24));
        format!("{}/{}", Ipv4Addr::from(net.saturating_add(1)), len)
    }
}

/// A connector as stored (its token only hashed; every column maps as it is).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ConnectorRow {
    pub id: String,
    pub network: String,
    pub public_key: String,
    pub endpoint: String,
    pub created_at_ms: i64,
}

/// One issued cell key (every column maps as it is).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TunnelLeaseRow {
    pub public_key: String,
    pub build_id: String,
    pub lease_id: String,
    pub network: String,
    pub tunnel_address: String,
    pub state: String,
    pub issued_at_ms: i64,
    pub revoked_at_ms: i64,
}

/// What `issue_lease` decided.
#[derive(Debug)]
pub enum Issued {
    Lease(TunnelLeaseRow),
    /// The same build attempt asked again with the same key while its lease is active (the
    /// box re-sends a request whose answer a reconnect lost): the same lease, answered again.
    Again(TunnelLeaseRow),
    /// The key was issued before (to any build): refuse it.
    KeySeen,
}

/// How often `issue_lease` starts over after losing a race for an address or a key.
const ISSUE_ATTEMPTS: usize = 8;

/// Parses an IPv4 subnet into (network as u32, length).
pub(crate) fn parse_v4_subnet(s: &str) -> Option<(u32, u8)> {
    let p: Prefix = s.parse().ok()?;
    match p.network().addr() {
        IpAddr::V4(a) => Some((u32::from(a), p.prefix_len())),
        IpAddr::V6(_) => None,
    }
}

/// SHA-256 of a token, hex: what the database holds.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Store {
    pub async fn create_network(
        &self,
        name: &str,
        prefixes: &[String],
        tunnel_subnet: &str,
        audit: &Audit,
    ) -> Result<NetworkRow> {
        let row = NetworkRow {
            name: name.to_string(),
            prefixes: prefixes.to_vec(),
            tunnel_subnet: tunnel_subnet.to_string(),
            created_at_ms: now_ms(),
        };
        let mut tx = self.begin().await?;
        let res = sqlx::query(
            "INSERT INTO private_networks (name, prefixes_json, tunnel_subnet, created_at_ms) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&row.name)
        .bind(serde_json::to_string(&row.prefixes).unwrap_or_else(|_| "[]".into()))
        .bind(&row.tunnel_subnet)
        .bind(row.created_at_ms)
        .execute(&mut *tx)
        .await
        .map_err(q("insert private network"))?;
        if res.rows_affected() == 0 {
            return Err(NetworkError::Exists(row.name));
        }
        insert_audit_tx(&mut tx, audit).await?;
        tx.commit().await.map_err(q("commit new private network"))?;
        Ok(row)
    }

    pub async fn get_network(&self, name: &str) -> Result<Option<NetworkRow>> {
        let row = sqlx::query_as::<_, NetworkRecord>(
            "SELECT name, prefixes_json, tunnel_subnet, created_at_ms FROM private_networks \
             WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("select private network"))?;
        row.map(NetworkRow::try_from).transpose()
    }

    pub async fn list_networks(&self) -> Result<Vec<NetworkRow>> {
        let rows = sqlx::query_as::<_, NetworkRecord>(
            "SELECT name, prefixes_json, tunnel_subnet, created_at_ms FROM private_networks \
             ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("list private networks"))?;
        rows.into_iter().map(NetworkRow::try_from).collect()
    }

    /// Deletes a network and its connectors; refused while a project names it.
    pub async fn delete_network(&self, name: &str, audit: &Audit) -> Result<()> {
        let names: Vec<String> =
            sqlx::query_scalar("SELECT name FROM projects WHERE private_network = $1")
                .bind(name)
                .fetch_all(&self.pool)
                .await
                .map_err(q("projects of a network"))?;
        if !names.is_empty() {
            return Err(NetworkError::InUse {
                network: name.to_string(),
                projects: names.join(", "),
            });
        }
        let mut tx = self.begin().await?;
        let res = sqlx::query("DELETE FROM private_networks WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(q("delete private network"))?;
        if res.rows_affected() == 0 {
            return Err(NetworkError::NotFound(name.to_string()));
        }
        sqlx::query("DELETE FROM connectors WHERE network = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(q("delete connectors of network"))?;
        insert_audit_tx(&mut tx, audit).await?;
        tx.commit().await.map_err(q("commit delete network"))?;
        Ok(())
    }

    pub async fn add_connector(
        &self,
        network: &str,
        public_key: &str,
        endpoint: &str,
        token_hash: &str,
        audit: &Audit,
    ) -> Result<ConnectorRow> {
        if self.get_network(network).await?.is_none() {
            return Err(NetworkError::NotFound(network.to_string()));
        }
        let row = ConnectorRow {
            id: new_id(),
            network: network.to_string(),
            public_key: public_key.to_string(),
            endpoint: endpoint.to_string(),
            created_at_ms: now_ms(),
        };
        let mut tx = self.begin().await?;
        let res = sqlx::query(
            "INSERT INTO connectors (id, network, public_key, endpoint, token_hash, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (public_key) DO NOTHING",
        )
        .bind(&row.id)
        .bind(&row.network)
        .bind(&row.public_key)
        .bind(&row.endpoint)
        .bind(token_hash)
        .bind(row.created_at_ms)
        .execute(&mut *tx)
        .await
        .map_err(q("insert connector"))?;
        if res.rows_affected() == 0 {
            return Err(NetworkError::ConnectorExists(row.public_key));
        }
        insert_audit_tx(&mut tx, audit).await?;
        tx.commit().await.map_err(q("commit new connector"))?;
        Ok(row)
    }

    /// Connectors of one network, or all (`None`).
    pub async fn list_connectors(&self, network: Option<&str>) -> Result<Vec<ConnectorRow>> {
        let rows = sqlx::query_as::<_, ConnectorRow>(
            "SELECT id, network, public_key, endpoint, created_at_ms FROM connectors \
             WHERE $1 = '' OR network = $1 ORDER BY network, created_at_ms",
        )
        .bind(network.unwrap_or(""))
        .fetch_all(&self.pool)
        .await
        .map_err(q("list connectors"))?;
        Ok(rows)
    }

    /// The connector holding this token (by hash), if any.
    pub async fn connector_by_token(&self, token: &str) -> Result<Option<ConnectorRow>> {
        let row = sqlx::query_as::<_, ConnectorRow>(
            "SELECT id, network, public_key, endpoint, created_at_ms FROM connectors \
             WHERE token_hash = $1",
        )
        .bind(token_hash(token))
        .fetch_optional(&self.pool)
        .await
        .map_err(q("select connector by token"))?;
        Ok(row)
    }

    /// Removes a connector by id or public key and records who did (`audit`, whose target is
    /// completed with the connector's id); None if none matched.
    pub async fn remove_connector(
        &self,
        id_or_key: &str,
        audit: &Audit,
    ) -> Result<Option<ConnectorRow>> {
        let mut tx = self.begin().await?;
        let row = sqlx::query_as::<_, ConnectorRow>(
            "SELECT id, network, public_key, endpoint, created_at_ms FROM connectors \
             WHERE id = $1 OR public_key = $1",
        )
        .bind(id_or_key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(q("select connector"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        sqlx::query("DELETE FROM connectors WHERE id = $1")
            .bind(&row.id)
            .execute(&mut *tx)
            .await
            .map_err(q("delete connector"))?;
        let mut audit = audit.clone();
        audit.target = format!("{} (network {})", row.id, row.network);
        insert_audit_tx(&mut tx, &audit).await?;
        tx.commit().await.map_err(q("commit removed connector"))?;
        Ok(Some(row))
    }

    /// Records a new cell key for a build attempt and gives it the lowest free tunnel address.
    /// A key seen before is refused, unless it is the same build attempt's active lease
    /// ([`Issued::Again`]).
    ///
    /// Two exchanges at once may pick the same lowest free address (or, a box's repeated
    /// request beside the first, insert the same key): the unique index on active addresses
    /// and the key's primary key refuse the second insert, and that exchange starts over and
    /// sees the winner's row. On PostgreSQL a row lock on the network serializes allocations
    /// of one network first, so the retry is rare there; SQLite has one writer anyway.
    pub async fn issue_lease(
        &self,
        net: &NetworkRow,
        build_id: &str,
        lease_id: &str,
        public_key: &str,
    ) -> Result<Issued> {
        let mut attempt = 1;
        loop {
            match self
                .try_issue_lease(net, build_id, lease_id, public_key)
                .await
            {
                Err(NetworkError::Store(StoreError::Query { source, .. }))
                    if is_unique_violation(&source) && attempt < ISSUE_ATTEMPTS =>
                {
                    tracing::debug!(network = %net.name, build_id, attempt,
                        "tunnel lease insert lost a race; starting over");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn try_issue_lease(
        &self,
        net: &NetworkRow,
        build_id: &str,
        lease_id: &str,
        public_key: &str,
    ) -> Result<Issued> {
        let (base, len) =
            parse_v4_subnet(&net.tunnel_subnet).ok_or_else(|| NetworkError::TunnelSubnet {
                input: net.tunnel_subnet.clone(),
                reason: "stored subnet does not parse".into(),
            })?;
        let size: i64 = 1i64 << (32 - u32::from(len));
        let mut tx = self.begin().await?;
        if self.kind() == DbKind::Postgres {
            sqlx::query("SELECT name FROM private_networks WHERE name = $1 FOR UPDATE")
                .bind(&net.name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(q("lock private network"))?;
        }
        let seen = sqlx::query_as::<_, TunnelLeaseRow>(&format!(
            "SELECT {TL_COLUMNS} FROM tunnel_leases WHERE public_key = $1"
        ))
        .bind(public_key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(q("look up public key"))?;
        if let Some(row) = seen {
            if row.build_id == build_id && row.lease_id == lease_id && row.state == ACTIVE {
                return Ok(Issued::Again(row));
            }
            return Ok(Issued::KeySeen);
        }
        let used: std::collections::BTreeSet<i64> = sqlx::query_scalar(
            "SELECT address FROM tunnel_leases WHERE network = $1 AND state = 'active' \
             ORDER BY address",
        )
        .bind(&net.name)
        .fetch_all(&mut *tx)
        .await
        .map_err(q("active tunnel addresses"))?
        .into_iter()
        .collect();
        // Host 0 is the network, 1 the connector, the last the broadcast address.
        let Some(host) = (2..size - 1).find(|h| !used.contains(h)) else {
            return Err(NetworkError::PoolExhausted {
                network: net.name.clone(),
                subnet: net.tunnel_subnet.clone(),
            });
        };
        // `host` < size <= 2^16 (a /16 at most), so it fits and the sum stays in the subnet.
        let addr = u32::try_from(host)
            .ok()
            .and_then(|h| base.checked_add(h))
            .map(Ipv4Addr::from)
            .ok_or_else(|| NetworkError::TunnelSubnet {
                input: net.tunnel_subnet.clone(),
                reason: format!("host {host} is outside the subnet"),
            })?;
        let row = TunnelLeaseRow {
            public_key: public_key.to_string(),
            build_id: build_id.to_string(),
            lease_id: lease_id.to_string(),
            network: net.name.clone(),
            tunnel_address: format!("{addr}/{len}"),
            state: ACTIVE.to_string(),
            issued_at_ms: now_ms(),
            revoked_at_ms: 0,
        };
        sqlx::query(
            "INSERT INTO tunnel_leases (public_key, build_id, lease_id, network, address, \
             tunnel_address, state, issued_at_ms, revoked_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0)",
        )
        .bind(&row.public_key)
        .bind(&row.build_id)
        .bind(&row.lease_id)
        .bind(&row.network)
        .bind(host)
        .bind(&row.tunnel_address)
        .bind(&row.state)
        .bind(row.issued_at_ms)
        .execute(&mut *tx)
        .await
        .map_err(q("insert tunnel lease"))?;
        tx.commit().await.map_err(q("commit tunnel lease"))?;
        Ok(Issued::Lease(row))
    }

    /// Marks a lease revoked; true if it was active.
    pub async fn revoke_lease(&self, public_key: &str) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE tunnel_leases SET state = 'revoked', revoked_at_ms = $1 \
             WHERE public_key = $2 AND state = 'active'",
        )
        .bind(now_ms())
        .bind(public_key)
        .execute(&self.pool)
        .await
        .map_err(q("revoke tunnel lease"))?;
        Ok(res.rows_affected() > 0)
    }

    /// Active leases whose build attempt is over: the build ended, or its lease changed
    /// (re-queued, lease lost).
    pub async fn stale_tunnel_leases(&self) -> Result<Vec<TunnelLeaseRow>> {
        let rows = sqlx::query_as::<_, TunnelLeaseRow>(&format!(
            "SELECT {TL} FROM tunnel_leases t LEFT JOIN builds b ON b.id = t.build_id \
             WHERE t.state = 'active' AND (b.id IS NULL OR b.lease_id <> t.lease_id \
             OR b.state IN ('succeeded', 'failed', 'cancelled', 'timed_out'))",
            TL = TL_COLUMNS_T
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(q("stale tunnel leases"))?;
        Ok(rows)
    }

    /// Tunnel leases, filtered by network and/or build ('' = any).
    pub async fn list_tunnel_leases(
        &self,
        network: &str,
        build_id: &str,
        active_only: bool,
    ) -> Result<Vec<TunnelLeaseRow>> {
        let rows = sqlx::query_as::<_, TunnelLeaseRow>(&format!(
            "SELECT {TL_COLUMNS} FROM tunnel_leases WHERE ($1 = '' OR network = $1) \
             AND ($2 = '' OR build_id = $2) AND ($3 = 0 OR state = 'active') \
             ORDER BY issued_at_ms, public_key"
        ))
        .bind(network)
        .bind(build_id)
        .bind(i64::from(active_only))
        .fetch_all(&self.pool)
        .await
        .map_err(q("list tunnel leases"))?;
        Ok(rows)
    }
}

const TL_COLUMNS: &str = "public_key, build_id, lease_id, network, tunnel_address, state, \
    issued_at_ms, revoked_at_ms";

const TL_COLUMNS_T: &str = "t.public_key, t.build_id, t.lease_id, t.network, t.tunnel_address, \
    t.state, t.issued_at_ms, t.revoked_at_ms";

/// A unique index or key refused the row (the other side of a race won).
fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// A `private_networks` row as the database holds it.
#[derive(sqlx::FromRow)]
struct NetworkRecord {
    name: String,
    prefixes_json: String,
    tunnel_subnet: String,
    created_at_ms: i64,
}

impl TryFrom<NetworkRecord> for NetworkRow {
    type Error = NetworkError;

    fn try_from(r: NetworkRecord) -> Result<Self> {
        Ok(NetworkRow {
            name: r.name,
            prefixes: super::from_json("prefixes_json", &r.prefixes_json)?,
            tunnel_subnet: r.tunnel_subnet,
            created_at_ms: r.created_at_ms,
        })
    }
}
