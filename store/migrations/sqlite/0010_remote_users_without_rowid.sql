-- The directory of remote users as one b-tree keyed by (peer, username) instead of a
-- rowid table plus two indexes: each applied row writes two b-trees instead of three,
-- and the username index now carries the peer (a WITHOUT ROWID table's secondary
-- index holds its primary key), so "is this user claimed by another peer" is answered
-- from the index alone. Keep sqlite/ and postgres/ in step.
CREATE TABLE remote_users_new (
    peer          TEXT NOT NULL REFERENCES peers(cluster) ON DELETE CASCADE,
    username      TEXT NOT NULL,
    home_cluster  TEXT NOT NULL,
    home_node     TEXT NOT NULL,
    usn           BIGINT NOT NULL,
    full_gen      BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (peer, username)
) WITHOUT ROWID;
INSERT INTO remote_users_new (peer, username, home_cluster, home_node, usn, full_gen)
    SELECT peer, username, home_cluster, home_node, usn, full_gen FROM remote_users;
DROP TABLE remote_users;
ALTER TABLE remote_users_new RENAME TO remote_users;
CREATE INDEX remote_users_username ON remote_users(username);
