-- The cluster's TURN secrets (the TURN REST API scheme: credentials are an HMAC of
-- the username with the secret). One per rotation period (`generation`, the Unix
-- time divided by the period), so nodes sharing the store agree on it; the current
-- and the previous are kept. Keep sqlite/ and postgres/ in step.
CREATE TABLE turn_secrets (
    generation  BIGINT PRIMARY KEY NOT NULL,
    secret      TEXT NOT NULL,
    created     BIGINT NOT NULL
);
