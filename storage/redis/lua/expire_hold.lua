-- expire_hold.lua: expires one PENDING hold whose expiry (Redis TIME) has passed, releasing
-- budget, quota and serials exactly once. Racing a capture or void is safe: whichever script
-- runs first changes the state, and the other sees a non-PENDING authorization.
--
-- KEYS[1] authorization hash  KEYS[2] holds zset  KEYS[3] budget hash  KEYS[4] usage hash
-- KEYS[5] ledger stream  KEYS[6..10] the authorization's qualification keys (see _lib.lua)
-- KEYS[11..] serial keys of the authorization's lines with a serial
--
-- Returns {kind, JSON}: {"expired": true|false, "state": ...}.

local keys = lifecycle_keys(6)
local auth = load_auth(keys.auth)
if auth == nil then
  redis.call('ZREM', keys.holds, string.match(keys.auth, '[^:]+$'))
  return {'new', cjson.encode({expired = false, state = 'MISSING'})}
end
local now = now_ms()
if auth.state ~= 'PENDING' then
  redis.call('ZREM', keys.holds, auth.id)
  return {'new', cjson.encode({expired = false, state = auth.state})}
end
if now < tonumber(auth.expires_ms) then return {'new', cjson.encode({expired = false, state = 'PENDING'})} end
release_hold(keys, auth, 'EXPIRED', now, '')
return {'new', cjson.encode({expired = true, state = 'EXPIRED'})}
