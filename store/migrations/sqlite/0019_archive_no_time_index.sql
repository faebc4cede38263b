-- No index by time: expiry finds the old rows by seq (rows are stored in the order
-- they came, each batch within a few seconds; a binary search over seq finds where
-- the old ones end), so archiving a row writes one index fewer. Keep sqlite/ and
-- postgres/ in step.
DROP INDEX archive_ts;
