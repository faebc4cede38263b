-- The last good DNS answer for every peer name the sync agent resolves, so that a DNS
-- outage does not cut peers that are already known (they are identified by their
-- pinned certificates, not by DNS). Keep sqlite/ and postgres/ in step.
CREATE TABLE dns_cache (
    name         TEXT PRIMARY KEY NOT NULL,
    addresses    TEXT NOT NULL,
    resolved_at  BIGINT NOT NULL
);
