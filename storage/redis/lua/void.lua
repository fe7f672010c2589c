-- void.lua: releases a PENDING hold (PENDING -> VOIDED): budget reservation, the consumer's
-- quota and the serials go back. Voiding an already VOIDED authorization returns it as it is.
--
-- KEY and ARG: storage/redis/contract.py, VOID (as CAPTURE).
--
-- Returns {kind, JSON}: {"authorization": view} or {"error": "INVALID_STATE", "state": ...}.

local auth, now = begin_lifecycle()
if auth == nil then return now end
if auth.state == 'PENDING' then
  release_hold(auth, 'VOIDED', now, ARG.request_id, ARG.payload_hash)
elseif auth.state ~= 'VOIDED' then
  return fail('INVALID_STATE', {state = auth.state})
end
return finish_lifecycle(auth)
