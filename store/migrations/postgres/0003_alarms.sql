-- Alarms: the active ones, and the history of every raise and clear.
-- Keep in step with ../sqlite/0003_alarms.sql.
CREATE TABLE alarms_active (
    name      TEXT NOT NULL,
    subject   TEXT NOT NULL,
    severity  TEXT NOT NULL,
    message   TEXT NOT NULL,
    since     BIGINT NOT NULL,
    PRIMARY KEY (name, subject)
);

CREATE TABLE alarm_events (
    id        BIGSERIAL PRIMARY KEY,
    name      TEXT NOT NULL,
    subject   TEXT NOT NULL,
    severity  TEXT NOT NULL,
    raised    BIGINT NOT NULL,
    message   TEXT NOT NULL,
    at        BIGINT NOT NULL
);
