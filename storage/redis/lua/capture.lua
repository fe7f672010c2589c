-- capture.lua: makes a PENDING hold final (PENDING -> CAPTURED), moving the reserved subsidy
-- to spent. Capturing an authorization that is already captured (or refunded since) returns
-- it as it is, so a client that lost the first answer recovers; one that names another
-- payment-channel reference than the capture recorded (or one when the capture recorded none) is
-- refused CHANNEL_REFERENCE_CONFLICT: one authorization is one channel payment, and the ledger's
-- CAPTURED event, which reconciliation matches against the channel's bill, carries the first.
--
-- KEY and ARG: storage/redis/contract.py, CAPTURE (the caller's keys, the authorization's, its
-- qualification's, and KEY.serials: the serial keys of its lines that carry one; ARG.channel_reference:
-- the payment channel's transaction id, kept on the authorization and in the event, or '').
--
-- Returns {kind, JSON}: {"authorization": view} or {"error": "INVALID_STATE" or "CHANNEL_REFERENCE_CONFLICT", "state": ...}
-- (MERCHANT_SUSPENDED with "refusal": "MERCHANT_BLOCKED" for a pending hold of a blocked merchant).

local auth, now = begin_lifecycle()
if auth == nil then return now end
if auth.state == 'VOIDED' or auth.state == 'EXPIRED' then
  return fail('INVALID_STATE', {state = auth.state})
end
if auth.state ~= 'PENDING' and ARG.channel_reference ~= '' and ARG.channel_reference ~= (auth.channel_reference or '') then
  return fail('CHANNEL_REFERENCE_CONFLICT', {state = auth.state})
end
-- A merchant on the operator's block list is paid nothing: its pending holds stay PENDING with
-- their reservation (the sweeper still expires them at their usual time, which pays nothing),
-- and capture is refused without writing anything, so it succeeds once the block is lifted.
if auth.state == 'PENDING' and blocked(redis.call('HGET', KEY.blocks, 'MERCHANT:' .. auth.merchant), now) then
  return fail('MERCHANT_SUSPENDED', {state = auth.state, refusal = 'MERCHANT_BLOCKED'})
end
if auth.state == 'PENDING' then
  local sums, _, order = per_category(auth.lines)
  for _, category in ipairs(order) do
    hincrby(KEY.budget, category .. ':reserved', -sums[category])
    hincrby(KEY.budget, category .. ':spent', sums[category])
  end
  redis.call('ZREM', KEY.holds, auth.id)
  auth.state, auth.updated_ms, auth.last_request_id = 'CAPTURED', now, ARG.request_id
  redis.call('HSET', KEY.authorization, 'state', 'CAPTURED', 'updated_ms', now, 'last_request_id', ARG.request_id)
  if ARG.channel_reference ~= '' then
    auth.channel_reference = ARG.channel_reference
    redis.call('HSET', KEY.authorization, 'channel_reference', ARG.channel_reference)
  end
  emit(KEY.ledger, 'CAPTURED', auth, auth.lines, tonumber(auth.subsidy_fen), now, ARG.payload_hash,
    ARG.channel_reference)
  -- The qualification this payment reserved is now used.
  if (auth.qualification or '') ~= '' then
    local q = load_hash(KEY.qualification)
    if q ~= nil and q.state == 'RESERVED' and q.authorization == auth.id then
      redis.call('HSET', KEY.qualification, 'state', 'REDEEMED', 'updated_ms', now)
      redis.call('ZREM', KEY.qualification_expiry, q.code)
      mirror_qualification(KEY.qualification_events, KEY.qualification)
    end
  end
end
return finish_lifecycle(auth)
