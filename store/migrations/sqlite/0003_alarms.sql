-- Alarms: the active ones, and the history of every raise and clear.
-- Keep in step with ../postgres/0003_alarms.sql.
CREATE TABLE alarms_active (
    name      TEXT NOT NULL,
    subject   TEXT NOT NULL,
    severity  TEXT NOT NULL,
    message   TEXT NOT NULL,
    since     BIGINT NOT NULL,
    PRIMARY KEY (name, subject)
);

CREATE TABLE alarm_events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    name      TEXT NOT NULL,
    subject   TEXT NOT NULL,
    severity  TEXT NOT NULL,
    raised    BIGINT NOT NULL,
    message   TEXT NOT NULL,
    at        BIGINT NOT NULL
);
