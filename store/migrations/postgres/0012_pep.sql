-- Personal eventing (XEP-0163): each account's PEP nodes with their configuration, and
-- the items they keep, newest the highest seq. Keep sqlite/ and postgres/ in step.
CREATE TABLE pep_nodes (
    owner          TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    node           TEXT NOT NULL,
    access_model   TEXT NOT NULL,
    persist_items  BIGINT NOT NULL,
    max_items      BIGINT NOT NULL,
    send_last      TEXT NOT NULL,
    notify_retract BIGINT NOT NULL,
    PRIMARY KEY (owner, node)
);

CREATE TABLE pep_items (
    owner    TEXT NOT NULL,
    node     TEXT NOT NULL,
    item_id  TEXT NOT NULL,
    payload  TEXT NOT NULL,
    seq      BIGINT NOT NULL,
    PRIMARY KEY (owner, node, item_id),
    FOREIGN KEY (owner, node) REFERENCES pep_nodes(owner, node) ON DELETE CASCADE
);
CREATE INDEX pep_items_seq ON pep_items(owner, node, seq);
