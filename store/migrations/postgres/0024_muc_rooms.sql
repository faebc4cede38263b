-- Multi-user chat rooms (XEP-0045) kept across restarts: each persistent room of
-- this cluster with its configuration, subject and affiliations ("jid affiliation"
-- lines). `version` orders writes (the router's clock, microseconds): an older one is
-- ignored. A room destroyed or made temporary stays as a tombstone (destroyed = 1)
-- for a day, so a late write of an older version cannot bring it back. Keep sqlite/
-- and postgres/ in step.
CREATE TABLE muc_rooms (
    name               TEXT PRIMARY KEY,
    version            BIGINT NOT NULL,
    destroyed          BIGINT NOT NULL,
    title              TEXT NOT NULL,
    description        TEXT NOT NULL,
    public             BIGINT NOT NULL,
    members_only       BIGINT NOT NULL,
    moderated          BIGINT NOT NULL,
    password           TEXT,
    max_users          BIGINT NOT NULL,
    whois_anyone       BIGINT NOT NULL,
    history_length     BIGINT NOT NULL,
    private_messages   TEXT NOT NULL,
    subject_by_anyone  BIGINT NOT NULL,
    subject            TEXT,
    subject_by         TEXT NOT NULL,
    affiliations       TEXT NOT NULL
);
