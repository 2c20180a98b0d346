//! Private networks (issue 5): a network's prefixes and tunnel subnet, its connectors (public
//! key, endpoint, hashed token) and the tunnel leases: one row per private-network build
//! attempt with the cell's public key and its tunnel address. Every public key ever issued stays
//! in `tunnel_leases` (revoked ones too), which is how a key is refused the second time. Nothing
//! secret is stored: keys are public halves, the connector token only as its SHA-256.
//!
//! `keyexchange` drives the leases; `api` and `connector` read and write the rest.

use std::net::{IpAddr, Ipv4Addr};

use hive_wg::Prefix;
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;

use crate::store::{get, new_id, now_ms, q, DbKind, Store, StoreError};

/// The tunnel subnet a network gets when none is given.
pub const DEFAULT_TUNNEL_SUBNET: &str = "10.250.0.0/24";
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
        format!("{}/{}", Ipv4Addr::from(net + 1), len)
    }
}

/// A connector as stored (its token only hashed).
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectorRow {
    pub id: String,
    pub network: String,
    pub public_key: String,
    pub endpoint: String,
    pub created_at_ms: i64,
}

/// One issued cell key.
#[derive(Debug, Clone, PartialEq)]
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

/// Checks a network's name.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(NetworkError::Name(name.to_string()))
    }
}

/// Parses and normalizes private prefixes (host bits cleared); refuses `/0`.
pub fn validate_prefixes(input: &[String]) -> Result<Vec<String>> {
    if input.is_empty() {
        return Err(NetworkError::NoPrefix);
    }
    let mut out = Vec::new();
    for raw in input {
        let p: Prefix = raw
            .trim()
            .parse()
            .map_err(|e: hive_wg::prefix::PrefixError| NetworkError::Prefix {
                input: raw.clone(),
                reason: e.to_string(),
            })?;
        if p.is_default() {
            return Err(NetworkError::Prefix {
                input: raw.clone(),
                reason: "a /0 would send all of the build's traffic into the tunnel".into(),
            });
        }
        let s = p.network().to_string();
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

/// Parses an IPv4 subnet into (network as u32, length).
fn parse_v4_subnet(s: &str) -> Option<(u32, u8)> {
    let p: Prefix = s.parse().ok()?;
    match p.network().addr() {
        IpAddr::V4(a) => Some((u32::from(a), p.prefix_len())),
        IpAddr::V6(_) => None,
    }
}

/// Checks the tunnel subnet: IPv4, /16 to /29, not overlapping the network's prefixes.
pub fn validate_tunnel_subnet(input: &str, prefixes: &[String]) -> Result<String> {
    let raw = if input.trim().is_empty() {
        DEFAULT_TUNNEL_SUBNET
    } else {
        input.trim()
    };
    let bad = |reason: &str| NetworkError::TunnelSubnet {
        input: raw.to_string(),
        reason: reason.to_string(),
    };
    let p: Prefix = raw
        .parse()
        .map_err(|e: hive_wg::prefix::PrefixError| bad(&e.to_string()))?;
    if !p.addr().is_ipv4() {
        return Err(bad("must be IPv4"));
    }
    if !(16..=29).contains(&p.prefix_len()) {
        return Err(bad("length must be /16 to /29"));
    }
    let net = p.network();
    for other in prefixes {
        if let Ok(o) = other.parse::<Prefix>() {
            if o.contains(&net) || net.contains(&o) {
                return Err(NetworkError::Overlap {
                    subnet: net.to_string(),
                    prefix: other.clone(),
                });
            }
        }
    }
    Ok(net.to_string())
}

/// Checks `HOST:PORT` (host a name or an address, port 1-65535).
pub fn validate_endpoint(input: &str) -> Result<String> {
    let s = input.trim();
    let bad = || NetworkError::Endpoint(input.to_string());
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.chars().any(char::is_whitespace) {
        return Err(bad());
    }
    Ok(s.to_string())
}

/// Checks a WireGuard public key (base64 of 32 bytes), returned in canonical form.
pub fn validate_public_key(input: &str) -> Result<String> {
    input
        .trim()
        .parse::<hive_wg::PublicKey>()
        .map(|k| k.to_base64())
        .map_err(|e| NetworkError::PublicKey {
            input: input.to_string(),
            reason: e.to_string(),
        })
}

/// A new connector token: 32 random bytes, hex. Shown once; stored as [`token_hash`].
pub fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("hct_{}", hex::encode(b))
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
    ) -> Result<NetworkRow> {
        let row = NetworkRow {
            name: name.to_string(),
            prefixes: prefixes.to_vec(),
            tunnel_subnet: tunnel_subnet.to_string(),
            created_at_ms: now_ms(),
        };
        let res = sqlx::query(
            "INSERT INTO private_networks (name, prefixes_json, tunnel_subnet, created_at_ms) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&row.name)
        .bind(serde_json::to_string(&row.prefixes).unwrap_or_else(|_| "[]".into()))
        .bind(&row.tunnel_subnet)
        .bind(row.created_at_ms)
        .execute(self.pool())
        .await
        .map_err(q("insert private network"))?;
        if res.rows_affected() == 0 {
            return Err(NetworkError::Exists(row.name));
        }
        Ok(row)
    }

    pub async fn get_network(&self, name: &str) -> Result<Option<NetworkRow>> {
        let row = sqlx::query(
            "SELECT name, prefixes_json, tunnel_subnet, created_at_ms FROM private_networks \
             WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(self.pool())
        .await
        .map_err(q("select private network"))?;
        row.map(|r| network_from_row(&r)).transpose()
    }

    pub async fn list_networks(&self) -> Result<Vec<NetworkRow>> {
        let rows = sqlx::query(
            "SELECT name, prefixes_json, tunnel_subnet, created_at_ms FROM private_networks \
             ORDER BY name",
        )
        .fetch_all(self.pool())
        .await
        .map_err(q("list private networks"))?;
        rows.iter().map(network_from_row).collect()
    }

    /// Deletes a network and its connectors; refused while a project names it.
    pub async fn delete_network(&self, name: &str) -> Result<()> {
        let users = sqlx::query("SELECT name FROM projects WHERE private_network = $1")
            .bind(name)
            .fetch_all(self.pool())
            .await
            .map_err(q("projects of a network"))?;
        if !users.is_empty() {
            let names: Vec<String> = users
                .iter()
                .map(|r| get::<String>(r, "name"))
                .collect::<Result<_, _>>()?;
            return Err(NetworkError::InUse {
                network: name.to_string(),
                projects: names.join(", "),
            });
        }
        let mut tx = self.begin_tx().await?;
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
        tx.commit().await.map_err(q("commit delete network"))?;
        Ok(())
    }

    pub async fn add_connector(
        &self,
        network: &str,
        public_key: &str,
        endpoint: &str,
        token_hash: &str,
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
        .execute(self.pool())
        .await
        .map_err(q("insert connector"))?;
        if res.rows_affected() == 0 {
            return Err(NetworkError::ConnectorExists(row.public_key));
        }
        Ok(row)
    }

    /// Connectors of one network, or all (`None`).
    pub async fn list_connectors(&self, network: Option<&str>) -> Result<Vec<ConnectorRow>> {
        let rows = sqlx::query(
            "SELECT id, network, public_key, endpoint, created_at_ms FROM connectors \
             WHERE $1 = '' OR network = $1 ORDER BY network, created_at_ms",
        )
        .bind(network.unwrap_or(""))
        .fetch_all(self.pool())
        .await
        .map_err(q("list connectors"))?;
        rows.iter().map(connector_from_row).collect()
    }

    /// The connector holding this token (by hash), if any.
    pub async fn connector_by_token(&self, token: &str) -> Result<Option<ConnectorRow>> {
        let row = sqlx::query(
            "SELECT id, network, public_key, endpoint, created_at_ms FROM connectors \
             WHERE token_hash = $1",
        )
        .bind(token_hash(token))
        .fetch_optional(self.pool())
        .await
        .map_err(q("select connector by token"))?;
        row.map(|r| connector_from_row(&r)).transpose()
    }

    /// Removes a connector by id or public key; false if none matched.
    pub async fn remove_connector(&self, id_or_key: &str) -> Result<Option<ConnectorRow>> {
        let row = sqlx::query(
            "SELECT id, network, public_key, endpoint, created_at_ms FROM connectors \
             WHERE id = $1 OR public_key = $1",
        )
        .bind(id_or_key)
        .fetch_optional(self.pool())
        .await
        .map_err(q("select connector"))?;
        let Some(row) = row.map(|r| connector_from_row(&r)).transpose()? else {
            return Ok(None);
        };
        sqlx::query("DELETE FROM connectors WHERE id = $1")
            .bind(&row.id)
            .execute(self.pool())
            .await
            .map_err(q("delete connector"))?;
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
        let mut tx = self.begin_tx().await?;
        if self.kind() == DbKind::Postgres {
            sqlx::query("SELECT name FROM private_networks WHERE name = $1 FOR UPDATE")
                .bind(&net.name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(q("lock private network"))?;
        }
        let seen = sqlx::query(&format!(
            "SELECT {TL_COLUMNS} FROM tunnel_leases WHERE public_key = $1"
        ))
        .bind(public_key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(q("look up public key"))?;
        if let Some(row) = seen {
            let row = lease_from_row(&row)?;
            if row.build_id == build_id && row.lease_id == lease_id && row.state == ACTIVE {
                return Ok(Issued::Again(row));
            }
            return Ok(Issued::KeySeen);
        }
        let used = sqlx::query(
            "SELECT address FROM tunnel_leases WHERE network = $1 AND state = 'active' \
             ORDER BY address",
        )
        .bind(&net.name)
        .fetch_all(&mut *tx)
        .await
        .map_err(q("active tunnel addresses"))?;
        let used: std::collections::BTreeSet<i64> = used
            .iter()
            .map(|r| get::<i64>(r, "address"))
            .collect::<Result<_, _>>()?;
        // Host 0 is the network, 1 the connector, the last the broadcast address.
        let Some(host) = (2..size - 1).find(|h| !used.contains(h)) else {
            return Err(NetworkError::PoolExhausted {
                network: net.name.clone(),
                subnet: net.tunnel_subnet.clone(),
            });
        };
        let addr = Ipv4Addr::from(base + host as u32);
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
        .execute(self.pool())
        .await
        .map_err(q("revoke tunnel lease"))?;
        Ok(res.rows_affected() > 0)
    }

    /// Active leases whose build attempt is over: the build ended, or its lease changed
    /// (re-queued, lease lost).
    pub async fn stale_tunnel_leases(&self) -> Result<Vec<TunnelLeaseRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {TL} FROM tunnel_leases t LEFT JOIN builds b ON b.id = t.build_id \
             WHERE t.state = 'active' AND (b.id IS NULL OR b.lease_id <> t.lease_id \
             OR b.state IN ('succeeded', 'failed', 'cancelled', 'timed_out'))",
            TL = TL_COLUMNS_T
        ))
        .fetch_all(self.pool())
        .await
        .map_err(q("stale tunnel leases"))?;
        rows.iter().map(lease_from_row).collect()
    }

    /// Tunnel leases, filtered by network and/or build ('' = any).
    pub async fn list_tunnel_leases(
        &self,
        network: &str,
        build_id: &str,
        active_only: bool,
    ) -> Result<Vec<TunnelLeaseRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {TL_COLUMNS} FROM tunnel_leases WHERE ($1 = '' OR network = $1) \
             AND ($2 = '' OR build_id = $2) AND ($3 = 0 OR state = 'active') \
             ORDER BY issued_at_ms, public_key"
        ))
        .bind(network)
        .bind(build_id)
        .bind(active_only as i64)
        .fetch_all(self.pool())
        .await
        .map_err(q("list tunnel leases"))?;
        rows.iter().map(lease_from_row).collect()
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

fn network_from_row(r: &AnyRow) -> Result<NetworkRow> {
    let prefixes_json: String = get(r, "prefixes_json")?;
    Ok(NetworkRow {
        name: get(r, "name")?,
        prefixes: serde_json::from_str(&prefixes_json)
            .map_err(|e| StoreError::Corrupt(format!("column prefixes_json: {e}")))?,
        tunnel_subnet: get(r, "tunnel_subnet")?,
        created_at_ms: get(r, "created_at_ms")?,
    })
}

fn connector_from_row(r: &AnyRow) -> Result<ConnectorRow> {
    Ok(ConnectorRow {
        id: get(r, "id")?,
        network: get(r, "network")?,
        public_key: get(r, "public_key")?,
        endpoint: get(r, "endpoint")?,
        created_at_ms: get(r, "created_at_ms")?,
    })
}

fn lease_from_row(r: &AnyRow) -> Result<TunnelLeaseRow> {
    Ok(TunnelLeaseRow {
        public_key: get(r, "public_key")?,
        build_id: get(r, "build_id")?,
        lease_id: get(r, "lease_id")?,
        network: get(r, "network")?,
        tunnel_address: get(r, "tunnel_address")?,
        state: get(r, "state")?,
        issued_at_ms: get(r, "issued_at_ms")?,
        revoked_at_ms: get(r, "revoked_at_ms")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_normalized_and_checked() {
        assert_eq!(
            validate_prefixes(&["10.20.3.4/16".into()]).unwrap(),
            vec!["10.20.0.0/16".to_string()]
        );
        assert!(validate_prefixes(&[]).is_err());
        assert!(validate_prefixes(&["0.0.0.0/0".into()]).is_err());
        let e = validate_prefixes(&["10.20.0.0".into()]).unwrap_err();
        assert!(e.to_string().contains("10.20.0.0"), "{e}");
    }

    #[test]
    fn tunnel_subnet_rules() {
        let p = vec!["10.20.0.0/16".to_string()];
        assert_eq!(
            validate_tunnel_subnet("", &p).unwrap(),
            DEFAULT_TUNNEL_SUBNET
        );
        assert!(validate_tunnel_subnet("10.20.5.0/24", &p).is_err());
        assert!(validate_tunnel_subnet("10.0.0.0/8", &p).is_err());
        assert!(validate_tunnel_subnet("10.251.0.0/30", &p).is_err());
        assert!(validate_tunnel_subnet("fd00::/64", &p).is_err());
    }

    #[test]
    fn endpoints_and_keys() {
        assert!(validate_endpoint("198.18.0.50:51820").is_ok());
        assert!(validate_endpoint("vpn.example.com:51820").is_ok());
        assert!(validate_endpoint("198.18.0.50").is_err());
        assert!(validate_endpoint("x:0").is_err());
        let k = hive_wg::KeyPair::generate().public().to_base64();
        assert_eq!(validate_public_key(&format!(" {k} ")).unwrap(), k);
        assert!(validate_public_key("abc").is_err());
    }

    #[test]
    fn tokens_hash_stably_and_differ() {
        let a = new_token();
        assert_ne!(a, new_token());
        assert_eq!(token_hash(&a), token_hash(&a));
        assert!(!token_hash(&a).contains(&a));
    }
}
