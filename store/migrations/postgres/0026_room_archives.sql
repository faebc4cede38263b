-- Rooms have archives too (XEP-0313 on a room's address), kept beside the accounts'
-- in archive_blocks and archive_zones under the room's bare JID as their owner
-- (accounts are local parts, which hold no '@'). The owner therefore no longer refers
-- to an account: deleting an account deletes its archive explicitly
-- (store/src/users.rs), and ending a room deletes the room's. A room says whether it
-- is archived. Keep sqlite/ and postgres/ in step.
ALTER TABLE archive_blocks DROP CONSTRAINT archive_blocks_owner_fkey;
ALTER TABLE archive_zones DROP CONSTRAINT archive_zones_owner_fkey;
ALTER TABLE muc_rooms ADD COLUMN archived BIGINT NOT NULL DEFAULT 1;
