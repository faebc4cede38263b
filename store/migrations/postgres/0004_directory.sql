-- Update sequence numbers (USNs) for the user directory, tombstones for deleted users,
-- and the intercluster application (AXL) users. Keep sqlite/ and postgres/ in step.

-- One row: the last USN handed out. Taking the next one locks the row until the
-- change commits, so USNs become visible in order and a reader of "changes since N"
-- never skips one.
CREATE TABLE usn_counter (
    id     INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    value  BIGINT NOT NULL
);
INSERT INTO usn_counter (id, value) VALUES (1, 0);

-- Tombstones below this USN were pruned: a peer asking for changes since an older USN
-- must do a full sync.
CREATE TABLE directory_state (
    name   TEXT PRIMARY KEY NOT NULL,
    value  BIGINT NOT NULL
);
INSERT INTO directory_state (name, value) VALUES ('tombstones_pruned_below', 0);

ALTER TABLE users ADD COLUMN usn BIGINT NOT NULL DEFAULT 0;
-- Users created before USNs existed get one each, in name order.
UPDATE users SET usn = (SELECT COUNT(*) FROM users u2 WHERE u2.username <= users.username);
UPDATE usn_counter SET value = (SELECT COUNT(*) FROM users);
CREATE INDEX users_usn ON users(usn);

CREATE TABLE user_tombstones (
    username      TEXT PRIMARY KEY NOT NULL,
    home_cluster  TEXT NOT NULL,
    home_node     TEXT NOT NULL,
    usn           BIGINT NOT NULL,
    deleted_at    BIGINT NOT NULL
);
CREATE INDEX user_tombstones_usn ON user_tombstones(usn);

-- The intercluster application user(s) that peers authenticate as on /axl/.
-- scram_sha256: for HTTP Basic over an already-trusted channel.
-- opaque_record: the OPAQUE registration record for the channel-bound first contact
-- (base64); the password itself is never stored.
CREATE TABLE axl_users (
    username       TEXT PRIMARY KEY NOT NULL,
    scram_sha256   TEXT NOT NULL,
    opaque_record  TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);

-- Cluster-wide secrets shared by every node of the cluster (base64), such as the
-- OPAQUE server setup.
CREATE TABLE cluster_secrets (
    name        TEXT PRIMARY KEY NOT NULL,
    value       TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
