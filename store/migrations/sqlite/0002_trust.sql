-- The trust store ("Tomcat trust"): CA certificates, and peer certificates pinned as
-- they are. Keep in step with ../postgres/0002_trust.sql.
CREATE TABLE trust_entries (
    fingerprint  TEXT PRIMARY KEY NOT NULL,
    kind         TEXT NOT NULL,
    subject      TEXT NOT NULL,
    pem          TEXT NOT NULL,
    source       TEXT NOT NULL,
    peer         TEXT,
    added_at     BIGINT NOT NULL
);
CREATE INDEX trust_entries_peer ON trust_entries(peer);
