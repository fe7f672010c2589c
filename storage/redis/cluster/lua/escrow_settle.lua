-- escrow_settle.lua: step 3 of a transfer, in the lender's slot, run only once its credit was
-- acknowledged: the record becomes CREDITED and leaves the open set. Idempotent.
-- KEYS: transfers (hash), open (zset), escrow (hash: only its replay counter). ARGV: transfer id.
local transfers, open, escrow, id = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local seen = redis.call('HGET', transfers, id)
if not seen then return redis.error_reply('ESCROW_UNKNOWN_TRANSFER ' .. id) end
local record = cjson.decode(seen)
if record.state == 'CREDITED' then
  replayed(escrow)
  return cjson.encode({state = 'again', amount = record.amount})
end
record.state = 'CREDITED'
redis.call('HSET', transfers, id, cjson.encode(record))
redis.call('ZREM', open, id)
return cjson.encode({state = 'new', amount = record.amount})
