-- Location at redemption (issue 13, item 2), validated by server/domain/reference.py and
-- published into the campaign's Redis hash (loc_redeem), where authorize.lua reads it in the
-- same single call as every other check.
--
-- require_location_at_redemption: Authorize needs AuthorizeRequest.consumer_location and checks
--   it as a claim's (mock flag, age, accuracy, inside the region), declining LOCATION_*.
--   Needs a region. Off by default.
ALTER TABLE campaigns
    ADD COLUMN require_location_at_redemption boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT campaigns_location_at_redemption_needs_region
        CHECK (NOT require_location_at_redemption OR region IS NOT NULL);
