-- claim_qualification.lua: every check and the whole claim of one qualification, atomically:
-- first come first served against the released quota, one consumer's limit per category.
--
-- KEY, ARG and the decline reasons (numbered as ClaimDeclineReason in qualification.proto:
-- lower wins; ARG.location_verdict is 0 or the reason the service's location check gave):
-- storage/redis/contract.py, CLAIM.
--
-- A pack claim (ARG.pack_id) issues every voucher of the campaign's pack or none, with the
-- same checks in the same order, counted per pack instead of per category: the pack's quota
-- counts packs (<pack>:claimed in the quota hash, <pack> = "pack:<id>"), the person holds the
-- pack at most once (<pack> in their holder hash; PERSON_LIMIT_REACHED) and claims it once per
-- round (<pack>:issued; ALREADY_CLAIMED_THIS_ROUND unless q_reclaim), and <pack>:live counts
-- its vouchers not yet returned (return_qualification in _lib.lua gives the pack back with
-- the last). Each voucher is a qualification of its category with its own code, expiry and
-- amounts (threshold_fen, off_fen, read by authorize.lua instead of the rule's).
--
-- Returns {kind, JSON}: {"decision": "ISSUED", "qualification": view, "qualifications":
-- [view, ...]} or {"decision": "DECLINED", "reason": <ClaimDeclineReason number>}; errors
-- UNKNOWN_CATEGORY, CATEGORY_IN_PACK (a claim by category of a pack's category), UNKNOWN_PACK,
-- PACK_TOO_LARGE (fewer candidate codes than vouchers).

local category, code = ARG.category, ARG.redemption_code

local early = open_request()
if early then return early end

local now = now_ms()

local function decline(reason)
  return answer({decision = 'DECLINED', reason = reason})
end

-- The operator's blocks (qualification.proto): the partner app making the claim ranks first, the
-- consumer right after CAMPAIGN_NOT_ACTIVE. Each decline is a risk event, appended in this same
-- call (a replay returns the stored answer before reaching here). One HMGET for both.
local claim_blocks = redis.call('HMGET', KEY.blocks, 'PARTNER_APP:' .. ARG.partner_id, 'CONSUMER:' .. ARG.consumer_key)
local function block_decline(reason, rule, subject_kind, subject_id, value)
  risk_event(KEY.risk_events, 'DECLINE', rule, subject_kind, subject_id,
    {campaign = ARG.campaign_id, terminal = ARG.partner_id, request_id = ARG.request_id},
    {block_expires_ms = tonumber(value), category = category}, now)
  return decline(reason)
end
if blocked(claim_blocks[1], now) then
  return block_decline(PARTNER_APP_BLOCKED, 'PARTNER_APP_BLOCKED', 'PARTNER_APP', ARG.partner_id, claim_blocks[1])
end

local campaign = redis.call('HMGET', KEY.campaign, 'status', 'starts_ms', 'ends_ms', 'q_validity_s', 'q_refund',
  'q_reclaim', 'packs')
local validity_s = tonumber(campaign[4] or '0')
if campaign[1] ~= 'ACTIVE' or validity_s == 0 then return decline(CAMPAIGN_NOT_FOUND) end

-- Writes one issued qualification (its hash, the consumer's list, the expiry set, the mirror)
-- and returns its view; pack is nil for a claim by category, else {id, threshold, off}.
local function issue(key, code, category, masked_id, masked_phone, expires_ms, pack)
  local q = {
    code = code, state = 'ISSUED', campaign = ARG.campaign_id, category = category, consumer = ARG.consumer_key,
    issued_ms = now, expires_ms = expires_ms, updated_ms = now, authorization = '',
    masked_id = masked_id, masked_phone = masked_phone, cell = ARG.location_cell,
  }
  redis.call('HSET', key, 'code', code, 'state', 'ISSUED', 'campaign', ARG.campaign_id,
    'category', category, 'consumer', ARG.consumer_key, 'partner', ARG.partner_id, 'issued_ms', now,
    'expires_ms', expires_ms, 'updated_ms', now, 'authorization', '',
    'refund_policy', campaign[5] or 'COUNT_AS_USED', 'masked_id', masked_id,
    'masked_phone', masked_phone, 'cell', ARG.location_cell, 'request_id', ARG.request_id)
  if pack then
    q.pack, q.threshold_fen, q.off_fen = pack[1], pack[2], pack[3]
    redis.call('HSET', key, 'pack', pack[1], 'threshold_fen', pack[2], 'off_fen', pack[3])
  end
  redis.call('ZADD', KEY.consumer_qualifications, int(now), code)
  redis.call('ZADD', KEY.qualification_expiry, int(expires_ms), code)
  mirror_qualification(KEY.qualification_events, key)
  return qualification_view(q)
end

if ARG.pack_id ~= '' then
  local pack = cjson.decode(campaign[7] or '{}')[ARG.pack_id]
  -- An unknown pack, or one naming a category the campaign has no rule for (the campaign's
  -- validation refuses those), is a malformed request: nothing is written.
  if type(pack) ~= 'table' then return fail('UNKNOWN_PACK') end
  if #pack.v > #KEY.vouchers then return fail('PACK_TOO_LARGE') end
  for _, voucher in ipairs(pack.v) do
    if redis.call('HEXISTS', KEY.rules, voucher[1]) == 0 then return fail('UNKNOWN_CATEGORY') end
  end
  if now < tonumber(campaign[2]) or now >= tonumber(campaign[3]) then return decline(CAMPAIGN_NOT_ACTIVE) end
  if blocked(claim_blocks[2], now) then
    return block_decline(CONSUMER_BLOCKED, 'CONSUMER_BLOCKED', 'CONSUMER', ARG.consumer_key, claim_blocks[2])
  end
  for _, voucher in ipairs(pack.v) do
    if redis.call('HEXISTS', KEY.external_consumer, voucher[1]) == 1 then return decline(USED_ELSEWHERE) end
  end
  if ARG.location_verdict ~= 0 then return decline(ARG.location_verdict) end
  local field = 'pack:' .. ARG.pack_id
  local holder = redis.call('HMGET', KEY.qualification_holder, field, field .. ':issued')
  if tonumber(holder[1] or '0') >= 1 then return decline(PERSON_LIMIT_REACHED) end
  if campaign[6] ~= '1' and tonumber(holder[2] or '0') >= 1 then return decline(ALREADY_CLAIMED_THIS_ROUND) end
  local quota = released(pack.qt, pack.q, now)
  if quota == 0 then return decline(NOT_YET_RELEASED) end
  -- A consumer shard's slice when it has one (<pack>:total; see the claim by category below).
  local counts = redis.call('HMGET', KEY.qualification_quota, field .. ':claimed', field .. ':total')
  if tonumber(counts[1] or '0') >= math.min(quota, tonumber(counts[2] or quota)) then
    return decline(QUOTA_EXHAUSTED)
  end
  -- Every check passed: the whole pack, in one step.
  hincrby(KEY.qualification_quota, field .. ':claimed', 1)
  hincrby(KEY.qualification_holder, field, 1)
  hincrby(KEY.qualification_holder, field .. ':issued', 1)
  redis.call('HSET', KEY.qualification_holder, field .. ':live', #pack.v)
  local expires_ms = now + validity_s * 1000
  local views = {}
  for i, voucher in ipairs(pack.v) do
    local arg = ARG.vouchers[i]
    views[i] = issue(KEY.vouchers[i], arg.code, voucher[1], arg.masked_id_number, arg.masked_phone_number, expires_ms,
      {ARG.pack_id, voucher[2], voucher[3]})
  end
  return answer({decision = 'ISSUED', qualification = views[1], qualifications = views})
end

-- A category the campaign does not cover is a malformed request, not a business outcome.
local raw_rule = redis.call('HGET', KEY.rules, category)
if not raw_rule then return fail('UNKNOWN_CATEGORY') end
-- A category the campaign issues in packs is claimed in its pack only, never one voucher alone.
if campaign[7] and campaign[7] ~= '{}' then
  for _, pack in pairs(cjson.decode(campaign[7])) do
    for _, voucher in ipairs(pack.v) do
      if voucher[1] == category then return fail('CATEGORY_IN_PACK') end
    end
  end
end
if now < tonumber(campaign[2]) or now >= tonumber(campaign[3]) then return decline(CAMPAIGN_NOT_ACTIVE) end
if blocked(claim_blocks[2], now) then
  return block_decline(CONSUMER_BLOCKED, 'CONSUMER_BLOCKED', 'CONSUMER', ARG.consumer_key, claim_blocks[2])
end
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
-- On a Redis Cluster deployment each consumer shard issues at most its slice of it,
-- <category>:total, which storage/redis/cluster/shard_budget.py (ShardQuota) funds and moves
-- between shards; on one Redis that field does not exist and the quota is the released one.
local quota = released(rule.q_tranches, rule.q_quota, now)
if quota == 0 then return decline(NOT_YET_RELEASED) end
local counts = redis.call('HMGET', KEY.qualification_quota, category .. ':claimed', category .. ':total')
if tonumber(counts[1] or '0') >= math.min(quota, tonumber(counts[2] or quota)) then
  return decline(QUOTA_EXHAUSTED)
end

-- Every check passed: issue.
hincrby(KEY.qualification_quota, category .. ':claimed', 1)
hincrby(KEY.qualification_holder, category, 1)
hincrby(KEY.qualification_holder, category .. ':issued', 1)
local view = issue(KEY.qualification, code, category, ARG.masked_id_number, ARG.masked_phone_number,
  now + validity_s * 1000, nil)
return answer({decision = 'ISSUED', qualification = view, qualifications = {view}})
