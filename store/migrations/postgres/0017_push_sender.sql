-- Push notifications name the last message's sender only when the client asked for
-- it (`include-sender` in its enable form), as they carry its body only when asked.
-- Keep sqlite/ and postgres/ in step.
ALTER TABLE push_registrations ADD COLUMN include_sender BIGINT NOT NULL DEFAULT 0;
