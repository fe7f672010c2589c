-- serial_settle.lua: what becomes of a serial's reservation, in its home shard: "confirm" (the
-- authorization was captured: the device is subsidised for good), "release" (voided, expired,
-- declined, refunded or never made: the device is free again), "extend" (the hold still
-- lives: looked at again at the new expiry). Acts only while the holder is that authorization,
-- so a late or repeated step never touches another sale's reservation.
-- KEYS: owner, pending, replays. ARGV: serial, authorization id, action, new expiry (ms; extend).
-- Answer: {state = done|again|other}.
local owner, pending, replays = KEYS[1], KEYS[2], KEYS[3]
local serial, id, action, expires = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local held = redis.call('GET', owner)
if not held or string.sub(held, 3) ~= id then
  replayed(replays)
  return cjson.encode({state = 'other'})
end
if action == 'confirm' then
  if held == 'C:' .. id then
    redis.call('ZREM', pending, serial)  -- a stale entry (an extend that lost a race) goes too
    replayed(replays)
    return cjson.encode({state = 'again'})
  end
  redis.call('SET', owner, 'C:' .. id)
  redis.call('ZREM', pending, serial)
elseif action == 'release' then
  redis.call('DEL', owner)
  redis.call('ZREM', pending, serial)
elseif action == 'extend' then
  -- Only a reservation still pending: one confirmed since the sweep read its sale stays out of
  -- the pending set (else it would sit there for good, answered "again" by every sweep).
  if held ~= 'P:' .. id then
    redis.call('ZREM', pending, serial)
    replayed(replays)
    return cjson.encode({state = 'again'})
  end
  redis.call('ZADD', pending, expires, serial)
else
  return redis.error_reply('ESCROW_BAD_ACTION ' .. action)
end
return cjson.encode({state = 'done'})
