-- refund.lua: refunds captured lines (CAPTURED -> PARTIALLY_REFUNDED -> REFUNDED). Each
-- refunded line gives its subsidy back to the budget, one unit back to the consumer's quota
-- (a basket voucher's lines: one unit for the whole basket, see below) and frees its serial.
-- A line is refunded at most once, whole (there is no refund of part of a line's price), and
-- never after a claw-back.
--
-- KEY and ARG: storage/redis/contract.py, REFUND (as CAPTURE, and ARG.line_ids: the line ids
-- to refund; none means every line not yet refunded). ARG.channel_reference is the refund's
-- own id in the payment channel, carried in the event only (the authorization keeps the capture's).
--
-- Returns {kind, JSON}: {"authorization": view, "refunded_fen": n} or {"error": ...}.

local auth, now = begin_lifecycle()
if auth == nil then return now end
if auth.state ~= 'CAPTURED' and auth.state ~= 'PARTIALLY_REFUNDED' then
  return fail('INVALID_STATE', {state = auth.state})
end

-- Choose the lines; every check before the first write.
-- A line clawed back (r = 2, clawback.lua: a confirmed fraud) is never refunded: its subsidy
-- is no longer the merchant's to give back.
local wanted, chosen, clawed = {}, {}, nil
for _, line_id in ipairs(ARG.line_ids) do wanted[line_id] = true end
local explicit = #ARG.line_ids > 0
for _, line in ipairs(auth.lines) do
  if not explicit or wanted[line.l] then
    if line.r == 1 and explicit then return fail('LINE_ALREADY_REFUNDED', {line_id = line.l}) end
    if line.r == 2 and explicit then return fail('LINE_CLAWED_BACK', {line_id = line.l}) end
    if line.r == 0 then chosen[#chosen + 1] = line end
    if line.r == 2 and clawed == nil then clawed = line.l end
    wanted[line.l] = nil
  end
end
local unknown = next(wanted)
if unknown then return fail('LINE_NOT_FOUND', {line_id = unknown}) end
if #chosen == 0 then return fail('LINE_CLAWED_BACK', {line_id = clawed or ''}) end

-- What the refund moves, line by line (the event's lines): each line's own subsidy, its share
-- for a basket voucher's line (authorize.lua apportioned the amount off, so the shares of a
-- basket refunded line by line add up to exactly what was granted). A basket counts one unit
-- against the per-person limit (u): it goes back only when this one refund takes the whole
-- basket back; a refund of some of its lines counts the voucher as used, so neither it nor a
-- later refund of the rest gives the unit back (u = 0 on the event's lines).
local whole = {}
for _, line in ipairs(auth.lines) do
  if line.u ~= nil and whole[line.c] == nil then whole[line.c] = true end
end
local moved = {}
for _, line in ipairs(chosen) do moved[line.l] = true end
for _, line in ipairs(auth.lines) do
  if line.u ~= nil and not moved[line.l] then whole[line.c] = false end
end
local refunded_lines = {}
for i, line in ipairs(chosen) do
  local copy = {}
  for field, value in pairs(line) do copy[field] = value end
  copy.r = 1
  if line.u ~= nil and not whole[line.c] then copy.u = 0 end
  refunded_lines[i] = copy
end

local sums, counts, order = per_category(refunded_lines)
local refunded_fen = 0
for _, category in ipairs(order) do
  hincrby(KEY.budget, category .. ':spent', -sums[category])
  hincrby(KEY.budget, category .. ':refunded', sums[category])
  hincrby(KEY.usage, category, -counts[category])
  refunded_fen = refunded_fen + sums[category]
end
local all_refunded = true
for _, line in ipairs(auth.lines) do
  for _, picked in ipairs(chosen) do if picked.l == line.l then line.r = 1 end end
  if line.r == 0 then all_refunded = false end
end
-- Serial keys arrive in line order, one per line that carries a serial.
local serial_index = 0
for _, line in ipairs(auth.lines) do
  if line.sn ~= '' then
    serial_index = serial_index + 1
    local serial_key = KEY.serials[serial_index]
    for _, picked in ipairs(chosen) do
      if picked.l == line.l and redis.call('GET', serial_key) == auth.id then
        redis.call('DEL', serial_key)
      end
    end
  end
end
-- The campaign's refund rule (fixed on the qualification when it was claimed): one refund of
-- the whole payment within the qualification's validity restores it with its original expiry;
-- a partial, split or late refund counts as used.
if all_refunded and #chosen == #auth.lines and (auth.qualification or '') ~= '' then
  local q = load_hash(KEY.qualification)
  if q ~= nil and q.state == 'REDEEMED' and q.authorization == auth.id
      and q.refund_policy == 'RESTORE_ON_FULL_REFUND' and now < tonumber(q.expires_ms) then
    redis.call('HSET', KEY.qualification, 'state', 'ISSUED', 'authorization', '', 'updated_ms', now)
    redis.call('ZADD', KEY.qualification_expiry, int(tonumber(q.expires_ms)), q.code)
    mirror_qualification(KEY.qualification_events, KEY.qualification)
  end
end
auth.state = all_refunded and 'REFUNDED' or 'PARTIALLY_REFUNDED'
auth.refunded_fen = tonumber(auth.refunded_fen) + refunded_fen
auth.updated_ms, auth.last_request_id = now, ARG.request_id
redis.call('HSET', KEY.authorization, 'state', auth.state, 'lines', cjson.encode(auth.lines),
  'refunded_fen', auth.refunded_fen, 'updated_ms', now, 'last_request_id', ARG.request_id)
emit(KEY.ledger, 'REFUNDED', auth, refunded_lines, refunded_fen, now, ARG.payload_hash, ARG.channel_reference)
return finish_lifecycle(auth, {refunded_fen = refunded_fen})
