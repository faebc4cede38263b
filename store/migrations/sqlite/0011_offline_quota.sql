-- Offline quotas by sender and by bytes (XEP-0160): each row records who sent it and
-- its size, so "how much does this sender hold for this owner" is an index range, not
-- a scan of the stanzas. Keep sqlite/ and postgres/ in step.
ALTER TABLE offline_messages ADD COLUMN sender TEXT NOT NULL DEFAULT '';
ALTER TABLE offline_messages ADD COLUMN size BIGINT NOT NULL DEFAULT 0;
UPDATE offline_messages SET size = length(CAST(stanza AS BLOB));
CREATE INDEX offline_messages_sender ON offline_messages(owner, sender);
