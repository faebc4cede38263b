-- Messages for users homed on another cluster whose router link is down: kept here
-- in order until the link returns, or bounced when their time to live runs out.
-- Keep sqlite/ and postgres/ in step.
CREATE TABLE outbox (
    id          BIGSERIAL PRIMARY KEY,
    node        TEXT NOT NULL,
    cluster     TEXT NOT NULL,
    stanza      TEXT NOT NULL,
    queued_at   BIGINT NOT NULL
);
CREATE INDEX outbox_node ON outbox(node, id);
