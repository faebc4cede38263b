-- The directory of chat rooms (XEP-0045), a kind of its own beside users: room `team`
-- does not block user `team`. Each room is homed on one cluster and node; peers learn
-- of it through the same listing as users (USNs from the same counter, tombstones
-- pruned with the users'), when both announce the `rooms` feature. Keep sqlite/ and
-- postgres/ in step.

-- The rooms homed in this cluster. created_at (microseconds) decides between two
-- clusters that created the same name before either learnt of the other's: the older
-- room wins, then the smaller cluster name.
CREATE TABLE room_directory (
    name          TEXT PRIMARY KEY NOT NULL,
    home_cluster  TEXT NOT NULL,
    home_node     TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    usn           BIGINT NOT NULL
);
CREATE INDEX room_directory_usn ON room_directory(usn);

CREATE TABLE room_tombstones (
    name          TEXT PRIMARY KEY NOT NULL,
    home_cluster  TEXT NOT NULL,
    home_node     TEXT NOT NULL,
    usn           BIGINT NOT NULL,
    deleted_at    BIGINT NOT NULL
);
CREATE INDEX room_tombstones_usn ON room_tombstones(usn);

-- The rooms of peer clusters, as each peer listed them.
CREATE TABLE remote_rooms (
    peer          TEXT NOT NULL REFERENCES peers(cluster) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    home_cluster  TEXT NOT NULL,
    home_node     TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    usn           BIGINT NOT NULL,
    full_gen      BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (peer, name)
);
CREATE INDEX remote_rooms_name ON remote_rooms(name, peer);

-- Whether a peer's applied USN covers its rooms too (both announced `rooms` when it
-- was synced): when that changes, the next sync is a full one.
ALTER TABLE peer_sync ADD COLUMN rooms BIGINT NOT NULL DEFAULT 0;
