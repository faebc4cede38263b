-- The archive keeps each account's messages in blocks: one row per account and
-- writer batch (at most 64 messages, ids within 10 s of the block's first), not one
-- per message. The index by account was written for every archived message, in a page
-- of each account's own, and cost as much as the rest of storing it; a block costs one
-- entry. A block's body is its messages one after another, each field as its length
-- in bytes (eight hex digits) then its bytes: id, peer, resource; then ts (sixteen hex
-- digits), outgoing (one digit) and the stanza (length and bytes), as
-- store/src/archive.rs encodes them. Existing messages become blocks of one. Keep
-- sqlite/ and postgres/ in step (only seq's type differs).
CREATE TABLE archive_blocks (
    seq       BIGSERIAL PRIMARY KEY,
    owner     TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    first_id  TEXT NOT NULL,
    last_id   TEXT NOT NULL,
    last_ts   BIGINT NOT NULL,
    body      TEXT NOT NULL
);
INSERT INTO archive_blocks (seq, owner, first_id, last_id, last_ts, body)
    SELECT seq, owner, id, id, ts,
        lpad(to_hex(octet_length(id)), 8, '0') || id
        || lpad(to_hex(octet_length(peer)), 8, '0') || peer
        || lpad(to_hex(octet_length(resource)), 8, '0') || resource
        || lpad(to_hex(ts), 16, '0') || outgoing::text
        || lpad(to_hex(octet_length(stanza)), 8, '0') || stanza
    FROM archive ORDER BY seq;
SELECT setval(pg_get_serial_sequence('archive_blocks', 'seq'),
    COALESCE((SELECT MAX(seq) FROM archive_blocks), 0) + 1, false);
DROP TABLE archive;
CREATE INDEX archive_blocks_owner ON archive_blocks(owner, first_id, seq);
