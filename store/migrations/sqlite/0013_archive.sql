-- Message archives (XEP-0313): every archived message of each account, in the order
-- it was archived (seq), with its stanza-id (id), the other party's bare JID (peer)
-- and resource, and the time in microseconds. Preferences per account. Keep sqlite/
-- and postgres/ in step (only seq's type differs).
CREATE TABLE archive (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    owner      TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    id         TEXT NOT NULL,
    peer       TEXT NOT NULL,
    resource   TEXT NOT NULL,
    ts         BIGINT NOT NULL,
    outgoing   BIGINT NOT NULL,
    stanza     TEXT NOT NULL
);
CREATE UNIQUE INDEX archive_owner_id ON archive(owner, id);
CREATE INDEX archive_owner_seq ON archive(owner, seq);
CREATE INDEX archive_owner_peer ON archive(owner, peer, seq);
CREATE INDEX archive_ts ON archive(ts);

CREATE TABLE archive_prefs (
    owner         TEXT PRIMARY KEY NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    default_mode  TEXT NOT NULL,
    always_jids   TEXT NOT NULL,
    never_jids    TEXT NOT NULL
);
