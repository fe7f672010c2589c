-- claim_qualification.lua: every check and the whole claim of one qualification, atomically:
-- first come first served against the released quota, one consumer's limit per category.
--
-- KEYS[1] nonce          string  P:nonce:<partner>:<nonce>
-- KEYS[2] idempotency    string  P:idem:<partner>:<request_id>   "<payload hash>|<answer JSON>"
-- KEYS[3] campaign       hash    status, starts_ms, ends_ms, q_validity_s, q_refund
-- KEYS[4] rules          hash    category -> rule JSON (q_quota, q_tranches, per_person_limit)
-- KEYS[5] quota          hash    <category>:claimed -> qualifications out of the pool
-- KEYS[6] holder         hash    category -> this consumer's qualifications out of the pool
-- KEYS[7] external       hash    category -> provider that reported this consumer using it
-- KEYS[8] qualification  hash    written when issued
-- KEYS[9] consumer list  zset    the consumer's codes by issue time
-- KEYS[10] expiry        zset    codes by expiry (ms), for the sweeper
-- KEYS[11] qualification stream  the new qualification, mirrored into PostgreSQL
--
-- ARGV[1] payload hash  ARGV[2] request id  ARGV[3] partner id  ARGV[4] campaign id
-- ARGV[5] category  ARGV[6] consumer key  ARGV[7] new redemption code
-- ARGV[8] location verdict (0, or the ClaimDeclineReason the service computed)
-- ARGV[9] idempotency ttl (s)  ARGV[10] nonce ttl (s)
-- ARGV[11] masked ID number, ARGV[12] masked phone: each sealed under the provider's local data
--   key, or "" (no key, no phone); never a mask in clear (docs/privacy.md)
-- ARGV[13] coarse location cell
--
-- Returns {kind, JSON}: {"decision": "ISSUED", "qualification": view} or
-- {"decision": "DECLINED", "reason": <ClaimDeclineReason number>}; error UNKNOWN_CATEGORY.

-- Decline reasons, numbered as ClaimDeclineReason in qualification.proto: lower wins.
local CAMPAIGN_NOT_FOUND, CAMPAIGN_NOT_ACTIVE, USED_ELSEWHERE = 1, 2, 3
local PERSON_LIMIT_REACHED, NOT_YET_RELEASED, QUOTA_EXHAUSTED = 8, 9, 10

local payload_hash, request_id, partner_id = ARGV[1], ARGV[2], ARGV[3]
local campaign_id, category, consumer_key, code = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local location_verdict = tonumber(ARGV[8])
local idempotency_ttl_s, nonce_ttl_s = tonumber(ARGV[9]), tonumber(ARGV[10])

if not claim_nonce(KEYS[1], nonce_ttl_s) then return fail('NONCE_REUSED') end
local stored, conflict = idempotent_answer(KEYS[2], payload_hash)
if conflict then return fail('IDEMPOTENCY_CONFLICT') end
if stored then return {'replay', stored} end

local now = now_ms()

local function decline(reason)
  local answer = cjson.encode({decision = 'DECLINED', reason = reason})
  remember(KEYS[2], payload_hash, answer, idempotency_ttl_s)
  return {'new', answer}
end

local campaign = redis.call('HMGET', KEYS[3], 'status', 'starts_ms', 'ends_ms', 'q_validity_s', 'q_refund')
local validity_s = tonumber(campaign[4] or '0')
if campaign[1] ~= 'ACTIVE' or validity_s == 0 then return decline(CAMPAIGN_NOT_FOUND) end
-- A category the campaign does not cover is a malformed request, not a business outcome.
local raw_rule = redis.call('HGET', KEYS[4], category)
if not raw_rule then return fail('UNKNOWN_CATEGORY') end
if now < tonumber(campaign[2]) or now >= tonumber(campaign[3]) then return decline(CAMPAIGN_NOT_ACTIVE) end
if redis.call('HEXISTS', KEYS[7], category) == 1 then return decline(USED_ELSEWHERE) end
if location_verdict ~= 0 then return decline(location_verdict) end

local rule = cjson.decode(raw_rule)
if tonumber(redis.call('HGET', KEYS[6], category) or '0') >= rule.per_person_limit then
  return decline(PERSON_LIMIT_REACHED)
end
-- The released quota: the whole quota, or the tranches due by now (cumulative counts).
local released = rule.q_quota
if rule.q_tranches ~= nil and #rule.q_tranches > 0 then
  released = 0
  for _, tranche in ipairs(rule.q_tranches) do
    if tranche[1] <= now then released = math.min(tranche[2], rule.q_quota) end
  end
end
if released == 0 then return decline(NOT_YET_RELEASED) end
if tonumber(redis.call('HGET', KEYS[5], category .. ':claimed') or '0') >= released then
  return decline(QUOTA_EXHAUSTED)
end

-- Every check passed: issue.
local expires_ms = now + validity_s * 1000
local q = {
  code = code, state = 'ISSUED', campaign = campaign_id, category = category, consumer = consumer_key,
  issued_ms = now, expires_ms = expires_ms, updated_ms = now, authorization = '',
  masked_id = ARGV[11], masked_phone = ARGV[12], cell = ARGV[13],
}
hincrby(KEYS[5], category .. ':claimed', 1)
hincrby(KEYS[6], category, 1)
redis.call('HSET', KEYS[8], 'code', code, 'state', 'ISSUED', 'campaign', campaign_id, 'category', category,
  'consumer', consumer_key, 'partner', partner_id, 'issued_ms', now, 'expires_ms', expires_ms,
  'updated_ms', now, 'authorization', '', 'refund_policy', campaign[5] or 'COUNT_AS_USED',
  'masked_id', ARGV[11], 'masked_phone', ARGV[12], 'cell', ARGV[13], 'request_id', request_id)
redis.call('ZADD', KEYS[9], int(now), code)
redis.call('ZADD', KEYS[10], int(expires_ms), code)
mirror_qualification(KEYS[11], KEYS[8])
local answer = cjson.encode({decision = 'ISSUED', qualification = qualification_view(q)})
remember(KEYS[2], payload_hash, answer, idempotency_ttl_s)
return {'new', answer}
