-- What peers learn about each node of the cluster (getClusterInfo, getCertificates),
-- and the admin accounts of the admin API. Keep sqlite/ and postgres/ in step.
ALTER TABLE nodes ADD COLUMN host TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN c2s_port INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN c2s_tls_port INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN link_port INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN https_port INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN cert_pem TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN fingerprint TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN updated_at BIGINT NOT NULL DEFAULT 0;

CREATE TABLE admin_users (
    username      TEXT PRIMARY KEY NOT NULL,
    scram_sha256  TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);
