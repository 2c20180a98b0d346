-- Private networks (issue 5). Public keys only: no private key and no connector token in clear
-- is ever stored here (tokens are SHA-256 hashed).
CREATE TABLE private_networks (
    name TEXT PRIMARY KEY,
    prefixes_json TEXT NOT NULL,
    tunnel_subnet TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE connectors (
    id TEXT PRIMARY KEY,
    network TEXT NOT NULL,
    public_key TEXT NOT NULL UNIQUE,
    endpoint TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX connectors_network ON connectors (network);

-- Every cell public key ever issued, one row per private-network build attempt. A key is never
-- accepted twice (UNIQUE), so a revoked key can never come back. `address` is the host number
-- inside the network's tunnel subnet; only one active lease may hold it.
CREATE TABLE tunnel_leases (
    public_key TEXT PRIMARY KEY,
    build_id TEXT NOT NULL,
    lease_id TEXT NOT NULL,
    network TEXT NOT NULL,
    address BIGINT NOT NULL,
    tunnel_address TEXT NOT NULL,
    state TEXT NOT NULL,
    issued_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX tunnel_leases_active_address ON tunnel_leases (network, address) WHERE state = 'active';
CREATE INDEX tunnel_leases_state ON tunnel_leases (state);
CREATE INDEX tunnel_leases_build ON tunnel_leases (build_id);
