-- FAST tokens (XEP-0484). Each client of an account (its SASL2 user-agent id) holds
-- at most two tokens: the one in use (slot 0) and a newer one it has not used yet
-- (slot 1), so a client that missed the newer one can still log in. Only proofs are
-- kept, never a token: the SHA-256 of what the client sends (initiator), and what the
-- server answers (responder). `last_used` is 0 for a token never used.
-- Keep sqlite/ and postgres/ in step.
CREATE TABLE fast_tokens (
    owner      TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    client     TEXT NOT NULL,
    slot       BIGINT NOT NULL,
    mechanism  TEXT NOT NULL,
    initiator  TEXT NOT NULL,
    responder  TEXT NOT NULL,
    software   TEXT NOT NULL,
    device     TEXT NOT NULL,
    issued     BIGINT NOT NULL,
    expires    BIGINT NOT NULL,
    last_used  BIGINT NOT NULL,
    PRIMARY KEY (owner, client, slot)
);
CREATE INDEX fast_tokens_expires ON fast_tokens (expires);
