-- Masked ID and phone numbers are no longer kept in clear (issue 10, item 9; docs/privacy.md).
-- Beside the consumer key, 330***********123X let anyone holding the programme key, which every
-- provider shares, find the ID number in seconds. A mask at rest is now '' or a token sealed
-- under the provider's local data key (server/domain/sealing.py, "s1." + base64url). Masks
-- stored before are blanked, not re-sealed: SQL has no key, and they are support data only.
-- Redis's copies are blanked by the writer at start (storage/redis/masks.py).
-- The old values stay in dead tuples until VACUUM, and in WAL and backups taken before: see
-- docs/privacy.md for what an operator does about those.
UPDATE qualifications SET masked_id_number = ''
WHERE masked_id_number <> '' AND masked_id_number !~ '^s1\.[A-Za-z0-9_-]{40,200}$';
UPDATE qualifications SET masked_phone_number = ''
WHERE masked_phone_number <> '' AND masked_phone_number !~ '^s1\.[A-Za-z0-9_-]{40,200}$';
ALTER TABLE qualifications
    ADD CONSTRAINT qualifications_masked_id_sealed
        CHECK (masked_id_number = '' OR masked_id_number ~ '^s1\.[A-Za-z0-9_-]{40,200}$'),
    ADD CONSTRAINT qualifications_masked_phone_sealed
        CHECK (masked_phone_number = '' OR masked_phone_number ~ '^s1\.[A-Za-z0-9_-]{40,200}$');
COMMENT ON COLUMN qualifications.masked_id_number IS
    'Empty, or a token sealed under the provider''s local data key; never a mask in clear (docs/privacy.md)';
COMMENT ON COLUMN qualifications.masked_phone_number IS
    'Empty, or a token sealed under the provider''s local data key; never a mask in clear (docs/privacy.md)';
