-- expire_qualification.lua: expires one ISSUED qualification whose validity has passed (Redis
-- TIME), returning its quota to the pool exactly once. Racing a redemption is safe: whichever
-- script runs first changes the state, and the other sees a qualification that is no longer
-- ISSUED (a RESERVED one is settled when its authorization is captured, voided or expires).
--
-- KEY and ARG: storage/redis/contract.py, EXPIRE_QUALIFICATION.
--
-- Returns {kind, JSON}: {"expired": true|false, "state": ...}.

local q = load_hash(KEY.qualification)
if q == nil then
  redis.call('ZREM', KEY.qualification_expiry, ARG.redemption_code)
  return {'new', cjson.encode({expired = false, state = 'MISSING'})}
end
if q.state ~= 'ISSUED' then
  redis.call('ZREM', KEY.qualification_expiry, q.code)
  return {'new', cjson.encode({expired = false, state = q.state})}
end
local now = now_ms()
if now < tonumber(q.expires_ms) then return {'new', cjson.encode({expired = false, state = 'ISSUED'})} end
return_qualification(q, 'EXPIRED', now)
return {'new', cjson.encode({expired = true, state = 'EXPIRED'})}
