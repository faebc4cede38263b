-- Rooms have archives too (XEP-0313 on a room's address), kept beside the accounts'
-- in archive_blocks and archive_zones under the room's bare JID as their owner
-- (accounts are local parts, which hold no '@'). The owner therefore no longer refers
-- to an account: deleting an account deletes its archive explicitly
-- (store/src/users.rs), and ending a room deletes the room's. A room says whether it
-- is archived. Keep sqlite/ and postgres/ in step.
CREATE TABLE archive_blocks_new (
    seq       INTEGER PRIMARY KEY,
    owner     TEXT NOT NULL,
    first_id  TEXT NOT NULL,
    last_id   TEXT NOT NULL,
    last_ts   BIGINT NOT NULL,
    body      TEXT NOT NULL
);
INSERT INTO archive_blocks_new (seq, owner, first_id, last_id, last_ts, body)
    SELECT seq, owner, first_id, last_id, last_ts, body FROM archive_blocks;
DROP TABLE archive_blocks;
ALTER TABLE archive_blocks_new RENAME TO archive_blocks;
CREATE INDEX archive_blocks_owner ON archive_blocks(owner, first_id);
CREATE TABLE archive_zones_new (
    owner  TEXT NOT NULL,
    peer   TEXT NOT NULL,
    zone   TEXT NOT NULL,
    PRIMARY KEY (owner, peer, zone)
) WITHOUT ROWID;
INSERT INTO archive_zones_new (owner, peer, zone)
    SELECT owner, peer, zone FROM archive_zones;
DROP TABLE archive_zones;
ALTER TABLE archive_zones_new RENAME TO archive_zones;
CREATE INDEX archive_zones_zone ON archive_zones(zone);
ALTER TABLE muc_rooms ADD COLUMN archived BIGINT NOT NULL DEFAULT 1;
