-- shard_debit.lua: step 1 of a transfer between consumer shards, in the lender's slot. Takes up
-- to `asked` fen of the lender's available budget (total minus the used fields: reserved and
-- spent, as authorize.lua computes it; for a quota, claimed, as claim_qualification.lua does;
-- never below 0) off its <category>:total and records the transfer (its amount is what the
-- borrower will be credited), idempotent on the transfer id.
-- KEYS: budget (hash; for a quota, the quota hash), transfers (hash: id -> JSON record), open
-- (zset: id by debit time, ms), replays, ledger (absent for a quota: no money, no event).
-- ARGV: transfer id, campaign, category, asked, borrower shard, then the used fields' names
-- (budget: reserved, spent; quota: claimed).
-- Answer: {state = new|again, amount, available}; amount 0 writes nothing.
local budget, transfers, open, replays, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
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
local names = {category .. ':funded', category .. ':total'}
for i = 6, #ARGV do names[#names + 1] = category .. ':' .. ARGV[i] end
local fields = redis.call('HMGET', budget, unpack(names))
if not fields[1] then return redis.error_reply('ESCROW_NOT_FUNDED ' .. campaign .. ' ' .. category) end
local available = num(fields[2])
for i = 3, #fields do available = available - num(fields[i]) end
local amount = math.min(asked, available)
if amount <= 0 then return cjson.encode({state = 'new', amount = '0', available = int(available)}) end
local now = now_ms()
local record = {category = category, to = borrower, asked = int(asked), amount = int(amount), state = 'DEBITED', at = int(now)}
redis.call('HINCRBY', budget, category .. ':total', int(-amount))
redis.call('HSET', transfers, id, cjson.encode(record))
redis.call('ZADD', open, int(now), id)
if ledger then
  emit(ledger, 'TRANSFER_OUT', {id = id, campaign = campaign, category = category, amount = amount, to = borrower, at = now})
end
return cjson.encode({state = 'new', amount = int(amount), available = int(available - amount)})
