-- serial_reserve.lua: a device serial reserved for an authorization, in the serial's home shard
-- (storage/redis/cluster/serials.py), before the sale's own script runs in the consumer's
-- shard. Idempotent on the authorization id: a retry of the same sale reserves nothing new.
-- KEYS: owner (string: "P:<authorization id>" pending, "C:<id>" confirmed), pending (sorted set:
-- serial by the reservation's expiry, ms), replays (hash).
-- ARGV: serial, authorization id, expiry (ms).
-- Answer: {state = new|again} (again: this authorization holds it; a pending reservation's expiry
-- is moved out to ARGV's if later) or {state = held, by = <the holder's authorization id>}.
local owner, pending, replays = KEYS[1], KEYS[2], KEYS[3]
local serial, id, expires = ARGV[1], ARGV[2], ARGV[3]
local held = redis.call('GET', owner)
if held then
  if string.sub(held, 3) == id then
    -- A retry of the sale: its reservation lives at least as long as this attempt's hold (the
    -- sweep must not release it between this answer and the retry's script).
    if held == 'P:' .. id then redis.call('ZADD', pending, 'GT', expires, serial) end
    replayed(replays)
    return cjson.encode({state = 'again'})
  end
  replayed(replays)
  return cjson.encode({state = 'held', by = string.sub(held, 3)})
end
redis.call('SET', owner, 'P:' .. id)
redis.call('ZADD', pending, expires, serial)
return cjson.encode({state = 'new'})
