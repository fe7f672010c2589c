-- expire_qualification.lua: expires one ISSUED qualification whose validity has passed (Redis
-- TIME), returning its quota to the pool exactly once. Racing a redemption is safe: whichever
-- script runs first changes the state, and the other sees a qualification that is no longer
-- ISSUED (a RESERVED one is settled when its authorization is captured, voided or expires).
--
-- KEYS[1] qualification hash  KEYS[2] campaign quota hash  KEYS[3] holder hash  KEYS[4] expiry zset
-- KEYS[5] qualification stream
-- ARGV[1] the redemption code
--
-- Returns {kind, JSON}: {"expired": true|false, "state": ...}.

local q = load_hash(KEYS[1])
if q == nil then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return {'new', cjson.encode({expired = false, state = 'MISSING'})}
end
if q.state ~= 'ISSUED' then
  redis.call('ZREM', KEYS[4], q.code)
  return {'new', cjson.encode({expired = false, state = q.state})}
end
local now = now_ms()
if now < tonumber(q.expires_ms) then return {'new', cjson.encode({expired = false, state = 'ISSUED'})} end
local qkeys = {qual = KEYS[1], quota = KEYS[2], holder = KEYS[3], expiry = KEYS[4], events = KEYS[5]}
return_qualification(qkeys, q, 'EXPIRED', now)
return {'new', cjson.encode({expired = true, state = 'EXPIRED'})}
