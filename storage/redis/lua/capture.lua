-- capture.lua: makes a PENDING hold final (PENDING -> CAPTURED), moving the reserved subsidy
-- to spent. Capturing an authorization that is already captured (or refunded since) returns
-- it as it is, so a client that lost the first answer recovers.
--
-- KEYS[1] authorization hash  KEYS[2] holds zset  KEYS[3] budget hash  KEYS[4] usage hash
-- KEYS[5] ledger stream  KEYS[6] idempotency  KEYS[7] nonce  KEYS[8] calling terminal hash
-- KEYS[9] its merchant hash  KEYS[10..14] the authorization's qualification: hash, campaign
-- quota hash, holder hash, expiry zset, qualification stream (placeholders when it has none)
-- KEYS[15..] serial keys
-- of the lines that carry a serial (derived by the caller from the immutable lines)
--
-- ARGV[1] payload hash  ARGV[2] request id  ARGV[3] caller's merchant id  ARGV[4] idempotency
-- ttl (s)  ARGV[5] nonce ttl (s)  ARGV[6] campaign id  ARGV[7] consumer key  ARGV[8] calling
-- terminal id
--
-- Returns {kind, JSON}: {"authorization": view} or {"error": "INVALID_STATE", "state": ...}.

local keys = lifecycle_keys(10)
local auth, now = begin_lifecycle(keys)
if auth == nil then return now end
if auth.state == 'VOIDED' or auth.state == 'EXPIRED' then
  return fail('INVALID_STATE', {state = auth.state})
end
if auth.state == 'PENDING' then
  local sums, _, order = per_category(auth.lines)
  for _, category in ipairs(order) do
    hincrby(keys.budget, category .. ':reserved', -sums[category])
    hincrby(keys.budget, category .. ':spent', sums[category])
  end
  redis.call('ZREM', keys.holds, auth.id)
  auth.state, auth.updated_ms, auth.last_request_id = 'CAPTURED', now, ARGV[2]
  redis.call('HSET', keys.auth, 'state', 'CAPTURED', 'updated_ms', now, 'last_request_id', ARGV[2])
  emit(keys.stream, 'CAPTURED', auth, auth.lines, tonumber(auth.subsidy_fen), now, ARGV[1])
  -- The qualification this payment reserved is now used.
  if (auth.qualification or '') ~= '' then
    local q = load_hash(keys.qual)
    if q ~= nil and q.state == 'RESERVED' and q.authorization == auth.id then
      redis.call('HSET', keys.qual, 'state', 'REDEEMED', 'updated_ms', now)
      redis.call('ZREM', keys.expiry, q.code)
      mirror_qualification(keys.events, keys.qual)
    end
  end
end
return finish_lifecycle(auth)
