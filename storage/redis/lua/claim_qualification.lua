-- claim_qualification.lua: every check and the whole claim of one qualification, atomically:
-- first come first served against the released quota, one consumer's limit per category.
--
-- KEY, ARG and the decline reasons (numbered as ClaimDeclineReason in qualification.proto:
-- lower wins; ARG.location_verdict is 0 or the reason the service's location check gave):
-- storage/redis/contract.py, CLAIM.
--
-- Returns {kind, JSON}: {"decision": "ISSUED", "qualification": view} or
-- {"decision": "DECLINED", "reason": <ClaimDeclineReason number>}; error UNKNOWN_CATEGORY.

local category, code = ARG.category, ARG.redemption_code

local early = open_request(KEY, ARG)
if early then return early end

local now = now_ms()

local function decline(reason)
  return answer(KEY, ARG, {decision = 'DECLINED', reason = reason})
end

local campaign = redis.call('HMGET', KEY.campaign, 'status', 'starts_ms', 'ends_ms', 'q_validity_s', 'q_refund',
  'q_reclaim')
local validity_s = tonumber(campaign[4] or '0')
if campaign[1] ~= 'ACTIVE' or validity_s == 0 then return decline(CAMPAIGN_NOT_FOUND) end
-- A category the campaign does not cover is a malformed request, not a business outcome.
local raw_rule = redis.call('HGET', KEY.rules, category)
if not raw_rule then return fail('UNKNOWN_CATEGORY') end
if now < tonumber(campaign[2]) or now >= tonumber(campaign[3]) then return decline(CAMPAIGN_NOT_ACTIVE) end
if redis.call('HEXISTS', KEY.external_consumer, category) == 1 then return decline(USED_ELSEWHERE) end
if ARG.location_verdict ~= 0 then return decline(ARG.location_verdict) end

local rule = cjson.decode(raw_rule)
-- Held now (out of the pool), and ever issued to this person in the campaign: claim once per
-- round means an expired or cancelled one still counts, unless the campaign lets them reclaim.
local holder = redis.call('HMGET', KEY.qualification_holder, category, category .. ':issued')
if tonumber(holder[1] or '0') >= rule.per_person_limit then return decline(PERSON_LIMIT_REACHED) end
if campaign[6] ~= '1' and tonumber(holder[2] or '0') >= rule.per_person_limit then
  return decline(ALREADY_CLAIMED_THIS_ROUND)
end
-- The released quota: the whole quota, or the tranches due by now (see released in _lib.lua).
local quota = released(rule.q_tranches, rule.q_quota, now)
if quota == 0 then return decline(NOT_YET_RELEASED) end
if tonumber(redis.call('HGET', KEY.qualification_quota, category .. ':claimed') or '0') >= quota then
  return decline(QUOTA_EXHAUSTED)
end

-- Every check passed: issue.
local expires_ms = now + validity_s * 1000
local q = {
  code = code, state = 'ISSUED', campaign = ARG.campaign_id, category = category, consumer = ARG.consumer_key,
  issued_ms = now, expires_ms = expires_ms, updated_ms = now, authorization = '',
  masked_id = ARG.masked_id_number, masked_phone = ARG.masked_phone_number, cell = ARG.location_cell,
}
hincrby(KEY.qualification_quota, category .. ':claimed', 1)
hincrby(KEY.qualification_holder, category, 1)
hincrby(KEY.qualification_holder, category .. ':issued', 1)
redis.call('HSET', KEY.qualification, 'code', code, 'state', 'ISSUED', 'campaign', ARG.campaign_id,
  'category', category, 'consumer', ARG.consumer_key, 'partner', ARG.partner_id, 'issued_ms', now,
  'expires_ms', expires_ms, 'updated_ms', now, 'authorization', '',
  'refund_policy', campaign[5] or 'COUNT_AS_USED', 'masked_id', ARG.masked_id_number,
  'masked_phone', ARG.masked_phone_number, 'cell', ARG.location_cell, 'request_id', ARG.request_id)
redis.call('ZADD', KEY.consumer_qualifications, int(now), code)
redis.call('ZADD', KEY.qualification_expiry, int(expires_ms), code)
mirror_qualification(KEY.qualification_events, KEY.qualification)
return answer(KEY, ARG, {decision = 'ISSUED', qualification = qualification_view(q)})
