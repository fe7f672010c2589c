-- cancel_qualification.lua: the consumer gives an ISSUED qualification back (ISSUED ->
-- CANCELLED); its quota returns to the pool, and the consumer may claim again only if the
-- campaign sets reclaim_after_expiry (claim_qualification.lua). Cancelling a CANCELLED
-- qualification returns it as it is.
--
-- KEY and ARG: storage/redis/contract.py, CANCEL.
--
-- Returns {kind, JSON}: {"qualification": view} or {"error": ...}.

local early = open_request()
if early then return early end
local q = load_hash(KEY.qualification)
-- Another partner's qualification is reported as absent, so codes cannot be probed.
if q == nil or q.partner ~= ARG.partner_id then return fail('QUALIFICATION_NOT_FOUND') end
if q.campaign ~= ARG.campaign_id or q.consumer ~= ARG.consumer_key then return fail('KEYS_MISMATCH') end
if q.state == 'ISSUED' then
  return_qualification(q, 'CANCELLED', now_ms())
elseif q.state ~= 'CANCELLED' then
  return fail('INVALID_STATE', {state = q.state})
end
return answer({qualification = qualification_view(q)})
