-- void.lua: releases a PENDING hold (PENDING -> VOIDED): budget reservation, the consumer's
-- quota and the serials go back. Voiding an already VOIDED authorization returns it as it is.
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
if auth.state == 'PENDING' then
  release_hold(keys, auth, 'VOIDED', now, ARGV[2], ARGV[1])
elseif auth.state ~= 'VOIDED' then
  return fail('INVALID_STATE', {state = auth.state})
end
return finish_lifecycle(auth)
