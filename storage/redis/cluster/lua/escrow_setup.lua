-- escrow_setup.lua: give this shard its initial slice of a campaign category's budget, once.
-- KEYS: escrow (hash), ledger (stream). ARGV: category, slice (fen), budget (fen), shards.
-- A second call with the same slice is a no-op; with another one it is refused (the budget of
-- a running campaign is changed by transfers, never by re-splitting it).
local escrow, ledger = KEYS[1], KEYS[2]
local category, slice = ARGV[1], tonumber(ARGV[2])
local current = redis.call('HGET', escrow, category .. ':slice')
if current then
  if tonumber(current) ~= slice then return conflict('slice ' .. current) end
  replayed(escrow)
  return cjson.encode({state = 'again', slice = int(slice)})
end
redis.call('HSET', escrow, category .. ':slice', int(slice), category .. ':alloc', int(slice), category .. ':reserved', 0)
emit(ledger, 'SHARD_FUNDED', {category = category, amount = slice, budget = ARGV[3], shards = ARGV[4]})
return cjson.encode({state = 'new', slice = int(slice)})
