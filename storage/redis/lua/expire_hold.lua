-- expire_hold.lua: expires one PENDING hold whose expiry (Redis TIME) has passed, releasing
-- budget, quota and serials exactly once. Racing a capture or void is safe: whichever script
-- runs first changes the state, and the other sees a non-PENDING authorization.
--
-- KEY: storage/redis/contract.py, EXPIRE_HOLD (the authorization's keys, its qualification's,
-- and KEY.serials); no ARG.
--
-- Returns {kind, JSON}: {"expired": true|false, "state": ...}.

local auth = load_auth(KEY.authorization)
if auth == nil then
  redis.call('ZREM', KEY.holds, string.match(KEY.authorization, '[^:]+$'))
  return {'new', cjson.encode({expired = false, state = 'MISSING'})}
end
local now = now_ms()
if auth.state ~= 'PENDING' then
  redis.call('ZREM', KEY.holds, auth.id)
  return {'new', cjson.encode({expired = false, state = auth.state})}
end
if now < tonumber(auth.expires_ms) then return {'new', cjson.encode({expired = false, state = 'PENDING'})} end
release_hold(auth, 'EXPIRED', now, '')
return {'new', cjson.encode({expired = true, state = 'EXPIRED'})}
