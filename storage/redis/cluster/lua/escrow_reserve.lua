-- escrow_reserve.lua: reserve an amount from this shard's allocation, idempotent on the
-- reservation id. KEYS: escrow (hash), reservations (hash: id -> "category|amount"), ledger.
-- ARGV: reservation id, category, amount.
-- Answer: {decision = APPROVED, available} (state new or again) or {decision = SHORT,
-- available}: this shard cannot cover it (a SHORT is not remembered: after a borrow the same
-- id may be approved).
local escrow, reservations, ledger = KEYS[1], KEYS[2], KEYS[3]
local id, category, amount = ARGV[1], ARGV[2], tonumber(ARGV[3])
local fields = redis.call('HMGET', escrow, category .. ':alloc', category .. ':reserved')
if not fields[1] then return redis.error_reply('ESCROW_NOT_FUNDED ' .. category) end
local available = num(fields[1]) - num(fields[2])
local seen = redis.call('HGET', reservations, id)
if seen then
  if seen ~= category .. '|' .. ARGV[3] then return conflict('reservation ' .. seen) end
  replayed(escrow)
  return cjson.encode({decision = 'APPROVED', state = 'again', available = int(available)})
end
if amount > available then return cjson.encode({decision = 'SHORT', available = int(available)}) end
redis.call('HINCRBY', escrow, category .. ':reserved', int(amount))
redis.call('HSET', reservations, id, category .. '|' .. ARGV[3])
emit(ledger, 'RESERVED', {id = id, category = category, amount = amount, at = now_ms()})
return cjson.encode({decision = 'APPROVED', state = 'new', available = int(available - amount)})
