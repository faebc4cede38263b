-- The archive pages by id (time-ordered: microseconds, then random), not by seq: the
-- (owner, seq) index was written for every row and served nothing the (owner, id)
-- index does not. Keep sqlite/ and postgres/ in step.
DROP INDEX archive_owner_seq;
DROP INDEX archive_owner_peer;
CREATE INDEX archive_owner_peer ON archive(owner, peer, id);
