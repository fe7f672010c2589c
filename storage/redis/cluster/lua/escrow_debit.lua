-- escrow_debit.lua: step 1 of a transfer, in the lender's slot. Takes up to `asked` fen of the
-- lender's unreserved allocation and records the transfer (its amount is what the borrower
-- will be credited, whatever it asked), idempotent on the transfer id.
-- KEYS: escrow (hash), transfers (hash: id -> JSON record), open (zset: id by debit time, ms),
-- ledger. ARGV: transfer id, category, asked, borrower shard.
-- Answer: {state = new|again, amount, record}; amount 0 writes nothing.
local escrow, transfers, open, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, category, asked, borrower = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local seen = redis.call('HGET', transfers, id)
if seen then
  local record = cjson.decode(seen)
  if record.category ~= category or record.to ~= borrower or tonumber(record.asked) ~= asked then
    return conflict('transfer ' .. seen)
  end
  replayed(escrow)
  return cjson.encode({state = 'again', amount = record.amount, record = record})
end
local fields = redis.call('HMGET', escrow, category .. ':alloc', category .. ':reserved')
if not fields[1] then return redis.error_reply('ESCROW_NOT_FUNDED ' .. category) end
local amount = math.min(asked, num(fields[1]) - num(fields[2]))
if amount <= 0 then return cjson.encode({state = 'new', amount = '0'}) end
local now = now_ms()
local record = {category = category, to = borrower, asked = int(asked), amount = int(amount), state = 'DEBITED', at = int(now)}
redis.call('HINCRBY', escrow, category .. ':alloc', int(-amount))
redis.call('HSET', transfers, id, cjson.encode(record))
redis.call('ZADD', open, int(now), id)
emit(ledger, 'TRANSFER_OUT', {id = id, category = category, amount = amount, to = borrower, at = now})
return cjson.encode({state = 'new', amount = int(amount), record = record})
