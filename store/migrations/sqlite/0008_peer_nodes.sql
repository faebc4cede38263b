-- The nodes of each peer cluster as its getClusterInfo announced them: where the
-- router links and clients reach them. Replaced whole at every cluster-info fetch.
-- Keep sqlite/ and postgres/ in step.
CREATE TABLE peer_nodes (
    name          TEXT PRIMARY KEY NOT NULL,
    peer          TEXT NOT NULL REFERENCES peers(cluster) ON DELETE CASCADE,
    host          TEXT NOT NULL,
    c2s_port      INTEGER NOT NULL,
    c2s_tls_port  INTEGER NOT NULL,
    link_port     INTEGER NOT NULL,
    fingerprint   TEXT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX peer_nodes_peer ON peer_nodes(peer);
