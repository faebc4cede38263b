-- The archive pages by id (time-ordered: microseconds, then random), not by seq: the
-- (owner, seq) index and AUTOINCREMENT's counter were written for every row and
-- served nothing the (owner, id) index does not. seq stays as the rowid. Keep
-- sqlite/ and postgres/ in step.
CREATE TABLE archive_new (
    seq        INTEGER PRIMARY KEY,
    owner      TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    id         TEXT NOT NULL,
    peer       TEXT NOT NULL,
    resource   TEXT NOT NULL,
    ts         BIGINT NOT NULL,
    outgoing   BIGINT NOT NULL,
    stanza     TEXT NOT NULL
);
INSERT INTO archive_new (seq, owner, id, peer, resource, ts, outgoing, stanza)
    SELECT seq, owner, id, peer, resource, ts, outgoing, stanza FROM archive;
DROP TABLE archive;
ALTER TABLE archive_new RENAME TO archive;
CREATE UNIQUE INDEX archive_owner_id ON archive(owner, id);
CREATE INDEX archive_owner_peer ON archive(owner, peer, id);
CREATE INDEX archive_ts ON archive(ts);
