-- shard_credit.lua: step 2 of a transfer between consumer shards, in the borrower's slot: adds
-- the amount the lender's record holds to <category>:total, once per transfer id (the credited
-- hash, id -> "<lender>|<amount>", is the proof, kept for good).
-- KEYS: budget (hash; for a quota, the quota hash), credited (hash), replays, ledger (absent for
-- a quota: no money, no event).
-- ARGV: transfer id, campaign, category, amount, lender shard.
local budget, credited, replays, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, campaign, category, amount, lender = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local proof = lender .. '|' .. int(amount)
local seen = redis.call('HGET', credited, id)
if seen then
  if seen ~= proof then return conflict('credit ' .. seen) end
  replayed(replays)
  return cjson.encode({state = 'again', amount = int(amount)})
end
if not redis.call('HGET', budget, category .. ':funded') then
  return redis.error_reply('ESCROW_NOT_FUNDED ' .. campaign .. ' ' .. category)
end
redis.call('HINCRBY', budget, category .. ':total', int(amount))
redis.call('HSET', credited, id, proof)
if ledger then
  emit(ledger, 'TRANSFER_IN', {id = id, campaign = campaign, category = category, amount = amount, from = lender, at = now_ms()})
end
return cjson.encode({state = 'new', amount = int(amount)})
