-- impmesh store, SQLite flavour. Keep in step with ../postgres/0001_initial.sql.
CREATE TABLE nodes (
    name        TEXT PRIMARY KEY NOT NULL,
    cluster     TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE users (
    username      TEXT PRIMARY KEY NOT NULL,
    home_cluster  TEXT NOT NULL,
    home_node     TEXT NOT NULL,
    scram_sha1    TEXT NOT NULL,
    scram_sha256  TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);

CREATE TABLE roster_items (
    owner         TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    contact       TEXT NOT NULL,
    name          TEXT,
    subscription  TEXT NOT NULL,
    ask           BIGINT NOT NULL DEFAULT 0,
    groups_json   TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (owner, contact)
);

CREATE TABLE roster_versions (
    owner    TEXT PRIMARY KEY NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    version  BIGINT NOT NULL
);

CREATE TABLE subscription_requests (
    owner    TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    contact  TEXT NOT NULL,
    stanza   TEXT NOT NULL,
    PRIMARY KEY (owner, contact)
);

CREATE TABLE offline_messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    owner       TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    stanza      TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX offline_messages_owner ON offline_messages(owner, id);

CREATE TABLE vcards (
    owner  TEXT PRIMARY KEY NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    vcard  TEXT NOT NULL
);

CREATE TABLE private_storage (
    owner  TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    ns     TEXT NOT NULL,
    xml    TEXT NOT NULL,
    PRIMARY KEY (owner, ns)
);

CREATE TABLE blocklist (
    owner  TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    jid    TEXT NOT NULL,
    PRIMARY KEY (owner, jid)
);
