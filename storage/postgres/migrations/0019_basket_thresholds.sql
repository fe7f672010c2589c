-- Basket vouchers (issue 13, item 6): what a FIXED rule's threshold ("X off Y") applies to,
-- validated by server/domain/reference.py and published in the rule's JSON in Redis, where
-- authorize.lua reads it in the same single call as every other check.
--
-- threshold_scope: LINE, each line on its own (every rule before this column); BASKET, the
--   payment's lines of the category together, the amount off shared among them by largest
--   remainder (server/domain/basket.py). Only FIXED rules have a basket.
ALTER TABLE campaign_rules
    ADD COLUMN threshold_scope text NOT NULL DEFAULT 'LINE' CHECK (threshold_scope IN ('LINE', 'BASKET')),
    ADD CONSTRAINT campaign_rules_basket_is_fixed CHECK (threshold_scope = 'LINE' OR kind = 'FIXED');
