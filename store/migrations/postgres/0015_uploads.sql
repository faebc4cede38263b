-- HTTP file upload (XEP-0363): each slot handed out, on the node that keeps its file.
-- A slot counts against its owner's quota from the moment it is given (size is what
-- the client announced); `stored` becomes 1 once the PUT completed. Times are Unix
-- seconds. The token's SHA-256 (hex) authorizes the PUT. Keep sqlite/ and postgres/ in
-- step.
CREATE TABLE uploads (
    id            TEXT PRIMARY KEY NOT NULL,
    owner         TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    node          TEXT NOT NULL,
    filename      TEXT NOT NULL,
    size          BIGINT NOT NULL,
    content_type  TEXT NOT NULL,
    token_sha256  TEXT NOT NULL,
    created       BIGINT NOT NULL,
    put_before    BIGINT NOT NULL,
    stored        BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX uploads_owner ON uploads(owner);
CREATE INDEX uploads_created ON uploads(created);

-- Where each node's files are served (`[upload] public_url`; '' without uploads), for
-- the nodes of this cluster and as peers announce theirs in getClusterInfo: a GET for
-- a file of another node is redirected there.
ALTER TABLE nodes ADD COLUMN upload_url TEXT NOT NULL DEFAULT '';
ALTER TABLE peer_nodes ADD COLUMN upload_url TEXT NOT NULL DEFAULT '';
