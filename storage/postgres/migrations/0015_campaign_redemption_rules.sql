-- Redemption-side rules of a campaign (issue 13, items 1, 3 and 4), validated by
-- server/domain/reference.py and published into the campaign's Redis hash, where the authorize
-- and claim scripts read them in the same single call as every other check.
--
-- redeem_in_region_only: Authorize declines STORE_OUTSIDE_REGION unless the terminal's store
--   lies inside the campaign's region (needs a region). Off by default.
-- per_merchant_daily_limit: approved payments per consumer per merchant per programme day
--   (MERCHANT_DAILY_LIMIT_REACHED); NULL means no limit, 0 is refused.
-- reclaim_after_expiry: a person whose qualification expired unused or was cancelled may claim
--   again in this campaign (ALREADY_CLAIMED_THIS_ROUND otherwise). Off by default.
ALTER TABLE campaigns
    ADD COLUMN redeem_in_region_only boolean NOT NULL DEFAULT false,
    ADD COLUMN per_merchant_daily_limit integer CHECK (per_merchant_daily_limit BETWEEN 1 AND 1000),
    ADD COLUMN reclaim_after_expiry boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT campaigns_region_bound_needs_region CHECK (NOT redeem_in_region_only OR region IS NOT NULL);
