-- clawback.lua: claws back the subsidy of captured lines of a fraudulent sale, on a CONFIRMED
-- risk case (the service checks the case; this script the money). Each line clawed back is
-- marked r = 2 on the authorization; its subsidy is no longer owed to the merchant and is
-- counted in the budget's <category>:clawed_back. The budget's spent stays as it is: recovered
-- public money is not granted again by a later payment (README "Claw-back"). The consumer's
-- quota, the device serial and the qualification stay used: the sale happened, fraudulently.
-- One CLAWED_BACK ledger event carries the lines and the risk case.
--
-- KEY and ARG: storage/redis/contract.py, CLAW_BACK (ARG.line_ids: the lines to claw back;
-- none means every line neither refunded nor clawed back). An operator's call: no nonce and no
-- terminal; its request id is kept under "operator:<operator id>".
--
-- Returns {kind, JSON}: {"authorization": view, "clawed_back_fen": n, "line_ids": [...]} or
-- {"error": ...}.

local stored, conflict = idempotent_answer(KEY.idempotency, ARG.payload_hash)
if conflict then return fail('IDEMPOTENCY_CONFLICT') end
if stored then return {'replay', stored} end
local auth = load_auth(KEY.authorization)
if auth == nil then return fail('AUTHORIZATION_NOT_FOUND') end
if auth.campaign ~= ARG.campaign_id then return fail('KEYS_MISMATCH') end
if auth.state ~= 'CAPTURED' and auth.state ~= 'PARTIALLY_REFUNDED' then
  return fail('INVALID_STATE', {state = auth.state})
end

-- Choose the lines; every check before the first write.
local wanted, chosen, clawed = {}, {}, nil
for _, line_id in ipairs(ARG.line_ids) do wanted[line_id] = true end
local explicit = #ARG.line_ids > 0
for _, line in ipairs(auth.lines) do
  if not explicit or wanted[line.l] then
    if explicit and line.r == 1 then return fail('LINE_ALREADY_REFUNDED', {line_id = line.l}) end
    if explicit and line.r == 2 then return fail('LINE_CLAWED_BACK', {line_id = line.l}) end
    if line.r == 0 then chosen[#chosen + 1] = line end
    if line.r == 2 and clawed == nil then clawed = line.l end
    wanted[line.l] = nil
  end
end
local unknown = next(wanted)
if unknown then return fail('LINE_NOT_FOUND', {line_id = unknown}) end
if #chosen == 0 then return fail('LINE_CLAWED_BACK', {line_id = clawed or ''}) end

local sums, _, order = per_category(chosen)
local clawed_back_fen = 0
for _, category in ipairs(order) do
  hincrby(KEY.budget, category .. ':clawed_back', sums[category])
  clawed_back_fen = clawed_back_fen + sums[category]
end
for _, line in ipairs(auth.lines) do
  for _, picked in ipairs(chosen) do if picked.l == line.l then line.r = 2 end end
end
local now = now_ms()
auth.updated_ms, auth.last_request_id = now, ARG.request_id
auth.acting_terminal = 'operator:' .. ARG.operator_id
auth.risk_case = ARG.risk_case
redis.call('HSET', KEY.authorization, 'lines', cjson.encode(auth.lines), 'updated_ms', now,
  'last_request_id', ARG.request_id)
emit(KEY.ledger, 'CLAWED_BACK', auth, chosen, clawed_back_fen, now, ARG.payload_hash)
local line_ids = {}
for _, line in ipairs(chosen) do line_ids[#line_ids + 1] = line.l end
local body = {authorization = auth_view(auth), clawed_back_fen = clawed_back_fen, line_ids = line_ids}
local encoded = cjson.encode(body)
remember(KEY.idempotency, ARG.payload_hash, encoded, ARG.idempotency_ttl_s)
return {'new', encoded}
