-- The username index of the directory of remote users carries the peer, so "is this
-- user claimed by another peer" is answered from the index alone (SQLite gets the same
-- from a WITHOUT ROWID table). Keep sqlite/ and postgres/ in step.
DROP INDEX remote_users_username;
CREATE INDEX remote_users_username ON remote_users(username, peer);
