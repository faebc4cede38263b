-- The history with one contact is found through the zones of ids in which the two
-- exchanged messages (an id's first five characters: 2^36 microseconds, about 19
-- hours), not through an index by contact: that index had an entry written for every
-- archived message, in a page of its own for each account, and cost as much as the
-- rest of storing a message. A zone is written once per account, contact and 19
-- hours. Keep sqlite/ and postgres/ in step.
CREATE TABLE archive_zones (
    owner  TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    peer   TEXT NOT NULL,
    zone   TEXT NOT NULL,
    PRIMARY KEY (owner, peer, zone)
);
-- Expiry drops the zones whose messages have all expired.
CREATE INDEX archive_zones_zone ON archive_zones(zone);
INSERT INTO archive_zones (owner, peer, zone)
    SELECT DISTINCT owner, peer, substr(id, 1, 5) FROM archive
    ON CONFLICT DO NOTHING;
DROP INDEX archive_owner_peer;
