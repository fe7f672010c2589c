-- Voucher packs (issue 13, item 5).
--
-- campaigns.voucher_packs: the campaign's packs as validated by server/domain/reference.py
--   (pack_id, vouchers [{category, threshold_fen, off_fen}], quota, tranches [{release_at,
--   count}]), published into the campaign's Redis hash (field "packs") where
--   claim_qualification.lua reads them. '[]' for a campaign without packs.
-- qualifications.pack_id, threshold_fen, off_fen: a pack voucher's pack and its own "X off Y",
--   mirrored from Redis so that a rebuild restores the vouchers' amounts and the packs'
--   counters ('' and 0 for a qualification claimed by category).
ALTER TABLE campaigns
    ADD COLUMN voucher_packs jsonb NOT NULL DEFAULT '[]'::jsonb;
ALTER TABLE qualifications
    ADD COLUMN pack_id text NOT NULL DEFAULT '',
    ADD COLUMN threshold_fen bigint NOT NULL DEFAULT 0 CHECK (threshold_fen >= 0),
    ADD COLUMN off_fen bigint NOT NULL DEFAULT 0 CHECK (off_fen >= 0 AND off_fen <= threshold_fen);
