-- escrow_credit.lua: step 2 of a transfer, in the borrower's slot: adds the amount the lender's
-- record holds, once per transfer id (the credited hash is the proof, kept for good).
-- KEYS: escrow (hash), credited (hash: transfer id -> amount), ledger.
-- ARGV: transfer id, category, amount, lender shard.
local escrow, credited, ledger = KEYS[1], KEYS[2], KEYS[3]
local id, category, amount = ARGV[1], ARGV[2], tonumber(ARGV[3])
local seen = redis.call('HGET', credited, id)
if seen then
  if tonumber(seen) ~= amount then return conflict('credit ' .. seen) end
  replayed(escrow)
  return cjson.encode({state = 'again', amount = int(amount)})
end
if not redis.call('HGET', escrow, category .. ':alloc') then
  return redis.error_reply('ESCROW_NOT_FUNDED ' .. category)
end
redis.call('HINCRBY', escrow, category .. ':alloc', int(amount))
redis.call('HSET', credited, id, int(amount))
emit(ledger, 'TRANSFER_IN', {id = id, category = category, amount = amount, from = ARGV[4], at = now_ms()})
return cjson.encode({state = 'new', amount = int(amount)})
