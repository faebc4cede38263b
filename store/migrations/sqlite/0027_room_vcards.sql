-- A room's vCard-temp (its avatar, XEP-0486), as its owner set it; NULL when none.
-- Keep sqlite/ and postgres/ in step.
ALTER TABLE muc_rooms ADD COLUMN vcard TEXT;
