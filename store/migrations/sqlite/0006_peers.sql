-- Intercluster peers, the credentials of each peering, the directory of remote users
-- and the sync state per peer. Keep sqlite/ and postgres/ in step.

-- One row per peer cluster.
--   address:      host:port of its AXL endpoint (as the admin gave it, or as it came)
--   server_name:  the name the TLS client expects (pinned certificates ignore it)
--   state:        'active' (we sync from it) or 'pending' (it added us; our admin has
--                 not accepted yet)
--   origin:       'local' (our admin added it) or 'remote' (it added us)
--   our_token:    the credential we call it with (it issued it to us)
--   their_token_hash: SHA-256 (hex) of the credential it calls us with (we issued it)
CREATE TABLE peers (
    cluster           TEXT PRIMARY KEY NOT NULL,
    address           TEXT NOT NULL,
    server_name       TEXT NOT NULL,
    state             TEXT NOT NULL,
    origin            TEXT NOT NULL,
    our_token         TEXT,
    their_token_hash  TEXT,
    added_at          BIGINT NOT NULL,
    accepted_at       BIGINT
);

-- Users homed in peer clusters, as each peer's listUsers reported them. A peer's
-- slice is replaced or changed a whole page at a time, in one transaction.
CREATE TABLE remote_users (
    peer          TEXT NOT NULL REFERENCES peers(cluster) ON DELETE CASCADE,
    username      TEXT NOT NULL,
    home_cluster  TEXT NOT NULL,
    home_node     TEXT NOT NULL,
    usn           BIGINT NOT NULL,
    -- the full sync that last saw this user; a full sync ends by removing the
    -- users of an older one
    full_gen      BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (peer, username)
);
CREATE INDEX remote_users_username ON remote_users(username);

-- Where each peer's sync stands; written in the same transaction as the page applied.
CREATE TABLE peer_sync (
    peer                TEXT PRIMARY KEY NOT NULL REFERENCES peers(cluster) ON DELETE CASCADE,
    applied_usn         BIGINT NOT NULL DEFAULT 0,
    full_gen            BIGINT NOT NULL DEFAULT 0,
    -- a full listing in progress: its snapshot and the last USN applied from it
    full_snapshot_usn   BIGINT,
    full_after_usn      BIGINT,
    last_full_at        BIGINT,
    last_full_usn       BIGINT,
    last_full_ms        BIGINT,
    last_full_users     BIGINT,
    last_incr_at        BIGINT,
    last_incr_usn       BIGINT,
    last_incr_ms        BIGINT,
    last_incr_changes   BIGINT
);
