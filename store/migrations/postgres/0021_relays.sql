-- The cluster's TURN relays, one row per node: where clients reach it, its load and
-- its last heartbeat. A relay above its configured load sends new allocations to the
-- least loaded healthy one (300 Try Alternate). Keep sqlite/ and postgres/ in step.
CREATE TABLE relays (
    node        TEXT PRIMARY KEY NOT NULL,
    address     TEXT NOT NULL,
    allocations BIGINT NOT NULL,
    capacity    BIGINT NOT NULL,
    heartbeat   BIGINT NOT NULL
);
