-- cancel_qualification.lua: the consumer gives an ISSUED qualification back (ISSUED ->
-- CANCELLED); its quota returns to the pool and the consumer may claim again. Cancelling a
-- CANCELLED qualification returns it as it is.
--
-- KEYS[1] nonce  KEYS[2] idempotency  KEYS[3] qualification hash  KEYS[4] campaign quota hash
-- KEYS[5] holder hash  KEYS[6] expiry zset  KEYS[7] qualification stream
--
-- ARGV[1] payload hash  ARGV[2] request id  ARGV[3] partner id  ARGV[4] idempotency ttl (s)
-- ARGV[5] nonce ttl (s)  ARGV[6] campaign id  ARGV[7] consumer key (as the caller read them)
--
-- Returns {kind, JSON}: {"qualification": view} or {"error": ...}.

if not claim_nonce(KEYS[1], tonumber(ARGV[5])) then return fail('NONCE_REUSED') end
local stored, conflict = idempotent_answer(KEYS[2], ARGV[1])
if conflict then return fail('IDEMPOTENCY_CONFLICT') end
if stored then return {'replay', stored} end
local q = load_hash(KEYS[3])
-- Another partner's qualification is reported as absent, so codes cannot be probed.
if q == nil or q.partner ~= ARGV[3] then return fail('QUALIFICATION_NOT_FOUND') end
if q.campaign ~= ARGV[6] or q.consumer ~= ARGV[7] then return fail('KEYS_MISMATCH') end
if q.state == 'ISSUED' then
  local qkeys = {qual = KEYS[3], quota = KEYS[4], holder = KEYS[5], expiry = KEYS[6], events = KEYS[7]}
  return_qualification(qkeys, q, 'CANCELLED', now_ms())
elseif q.state ~= 'CANCELLED' then
  return fail('INVALID_STATE', {state = q.state})
end
local answer = cjson.encode({qualification = qualification_view(q)})
remember(KEYS[2], ARGV[1], answer, tonumber(ARGV[4]))
return {'new', answer}
