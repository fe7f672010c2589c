-- shard_debit.lua: step 1 of a transfer between consumer shards, in the lender's slot. Takes up
-- to `asked` fen of the lender's available budget (total - reserved - spent, as authorize.lua
-- computes it; never below 0) off its <category>:total and records the transfer (its amount is
-- what the borrower will be credited), idempotent on the transfer id.
-- KEYS: budget (hash), transfers (hash: id -> JSON record), open (zset: id by debit time, ms),
-- ledger, replays. ARGV: transfer id, campaign, category, asked, borrower shard.
-- Answer: {state = new|again, amount, available}; amount 0 writes nothing.
local budget, transfers, open, ledger, replays = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, campaign, category, asked, borrower = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local seen = redis.call('HGET', transfers, id)
if seen then
  local record = cjson.decode(seen)
  if record.category ~= category or record.to ~= borrower or tonumber(record.asked) ~= asked then
    return conflict('transfer ' .. seen)
  end
  replayed(replays)
  return cjson.encode({state = 'again', amount = record.amount})
end
local fields = redis.call('HMGET', budget, category .. ':funded', category .. ':total',
  category .. ':reserved', category .. ':spent')
if not fields[1] then return redis.error_reply('ESCROW_NOT_FUNDED ' .. campaign .. ' ' .. category) end
local available = num(fields[2]) - num(fields[3]) - num(fields[4])
local amount = math.min(asked, available)
if amount <= 0 then return cjson.encode({state = 'new', amount = '0', available = int(available)}) end
local now = now_ms()
local record = {category = category, to = borrower, asked = int(asked), amount = int(amount), state = 'DEBITED', at = int(now)}
redis.call('HINCRBY', budget, category .. ':total', int(-amount))
redis.call('HSET', transfers, id, cjson.encode(record))
redis.call('ZADD', open, int(now), id)
emit(ledger, 'TRANSFER_OUT', {id = id, campaign = campaign, category = category, amount = amount, to = borrower, at = now})
return cjson.encode({state = 'new', amount = int(amount), available = int(available - amount)})
