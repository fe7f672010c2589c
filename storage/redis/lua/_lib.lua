-- _lib.lua: helpers shared by every script. The loader puts the helpers a script uses (and
-- those they use) before it at SCRIPT LOAD, so each script stays one atomic unit with no
-- cross-script calls (storage/redis/scripts.py).
--
-- Conventions for all scripts:
--   * A script reads its KEYS and ARGV by name, KEY.<name> and ARG.<name>, as its declaration in
--     storage/redis/contract.py names them (integer arguments as numbers, but those it marks
--     IntAsSent as the decimal the caller sent); the loader turns each into the read of KEYS or
--     ARGV it stands for, and refuses to load a script that reads a name its declaration lacks.
--     Helpers here read the KEY and ARG of the script they are loaded with, so only scripts that
--     declare the names a helper reads may call it.
--   * Money is integer fen. Lua numbers are doubles, exact below 2^53; the server validates
--     prices (< 1e10 fen) and budgets (< 1e13 fen) so every product and sum stays exact.
--   * Time comes from Redis TIME (milliseconds), never from the application's clock.
--   * A script returns {kind, JSON}: kind "new" (this call acted), "replay" (the stored answer
--     to an earlier call with the same request id) or "error" (nothing was written, except
--     that a hold found past its expiry is expired first, as the sweeper would have done).
--     The JSON of each is declared in storage/redis/contract.py, which decodes it.
--   * Every check runs before the first write, so a script never half-applies.

-- A canonical decimal integer for HINCRBY / INCRBY / ZADD / HSET arguments. Lua numbers are
-- doubles: passed as they are, Redis formats them with %.17g, so -0 becomes "-0" (which HINCRBY
-- rejects) and large values may take an exponent. Every counter argument goes through here.
local function int(n)
  return string.format('%d', n)
end

-- HINCRBY with a canonical amount; adding nothing is not a command at all.
local function hincrby(key, field, amount)
  if amount ~= 0 then redis.call('HINCRBY', key, field, int(amount)) end
end

local function now_ms()
  local t = redis.call('TIME')
  -- The reply's strings converted by the arithmetic: once each, where tonumber converts twice.
  return t[1] * 1000 + math.floor(t[2] / 1000)
end

local function fail(code, extra)
  local result = extra or {}
  result['error'] = code
  return {'error', cjson.encode(result)}
end

-- Reads an authorization hash into a table; nil when it does not exist.
local function load_auth(key)
  local raw = redis.call('HGETALL', key)
  if #raw == 0 then return nil end
  local auth = {}
  for i = 1, #raw, 2 do auth[raw[i]] = raw[i + 1] end
  auth.lines = cjson.decode(auth.lines)
  return auth
end

-- The public view of an authorization, as stored in idempotency records and returned.
local function auth_view(auth)
  return {
    id = auth.id, state = auth.state, campaign = auth.campaign, merchant = auth.merchant,
    terminal = auth.terminal, channel = tonumber(auth.channel), lines = auth.lines,
    total_fen = tonumber(auth.total_fen), subsidy_fen = tonumber(auth.subsidy_fen),
    refunded_fen = tonumber(auth.refunded_fen), created_ms = tonumber(auth.created_ms),
    expires_ms = tonumber(auth.expires_ms), updated_ms = tonumber(auth.updated_ms),
    qualification = auth.qualification or '',
    -- Present once a capture gave one (nil fields are left out of the JSON).
    channel_reference = auth.channel_reference,
  }
end

-- Sums subsidy and unit counts per category over the given lines. A line counts one unit,
-- unless it carries u (a basket voucher's line: 1 on the basket's first line, 0 on the others,
-- so the basket counts once; refund.lua sets u to what a refund gives back).
local function per_category(lines)
  local sums, counts, order = {}, {}, {}
  for _, line in ipairs(lines) do
    if sums[line.c] == nil then
      sums[line.c] = 0; counts[line.c] = 0; order[#order + 1] = line.c
    end
    sums[line.c] = sums[line.c] + line.s
    counts[line.c] = counts[line.c] + (line.u or 1)
  end
  return sums, counts, order
end

-- floor(x * y / d) and (x * y) mod d, exactly. The product of a basket's amount off and a
-- line's price reaches 10^20, past the 2^53 Lua's doubles hold exactly, so it is built one bit
-- of y at a time (long multiplication modulo d), every intermediate value below 2d.
-- Needs integers 0 <= x <= d, y >= 0 and 2d < 2^53 (a basket's total is below 10^12 fen).
local function muldiv(x, y, d)
  local bits = {}
  while y > 0 do
    local bit = y % 2
    bits[#bits + 1] = bit
    y = (y - bit) / 2
  end
  local q, r = 0, 0
  for i = #bits, 1, -1 do
    q, r = q * 2, r * 2
    if r >= d then q, r = q + 1, r - d end
    if bits[i] == 1 then
      r = r + x
      if r >= d then q, r = q + 1, r - d end
    end
  end
  return q, r
end

-- A basket voucher's amount off shared among its lines' prices by largest remainder, to the
-- fen: floor(off * price / total) each, then the fen left over one each to the largest
-- remainders, ties to the earlier line. server/domain/basket.py's apportion() is the same rule
-- in Python (tests/integration/test_basket_apportion.py runs both). Needs every price >= 1 and
-- off <= the prices' total (the basket met its threshold, which is at least off).
local function apportion(off, prices)
  local total = 0
  for _, price in ipairs(prices) do total = total + price end
  local shares, remainders, order, left = {}, {}, {}, off
  for i, price in ipairs(prices) do
    shares[i], remainders[i] = muldiv(off, price, total)
    left = left - shares[i]
    order[i] = i
  end
  table.sort(order, function(a, b)
    if remainders[a] ~= remainders[b] then return remainders[a] > remainders[b] end
    return a < b
  end)
  for k = 1, left do shares[order[k]] = shares[order[k]] + 1 end
  return shares
end

-- The programme day an authorization was counted on (its campaign's per-merchant daily
-- limit), or nil when it was not counted.
local function day_of(auth)
  local day = tonumber(auth.day or '0') or 0
  if day > 0 then return day end
  return nil
end

-- The consumer's usage field counting payments at a merchant on a programme day.
local function day_field(day, merchant)
  return 'day:' .. string.format('%d', day) .. ':' .. merchant
end

-- Appends one ledger event. The event carries everything the ledger needs to post it and
-- to rebuild the Redis counters from history: per-line category, subsidy and serial.
-- channel_reference: the payment channel's transaction id of a capture or refund (nil or '':
-- the event carries none).
local function emit(stream_key, event_type, auth, lines, amount_fen, at_ms, payload_hash, channel_reference)
  if channel_reference == '' then channel_reference = nil end
  local event = {
    type = event_type, authorization_id = auth.id, campaign = auth.campaign,
    -- The terminal that acted (capture, void and refund may come from another till of the
    -- same merchant); expiry is the server's own act, recorded under the authorizing terminal.
    merchant = auth.merchant, terminal = auth.acting_terminal or auth.terminal,
    authorization_terminal = auth.terminal, consumer = auth.consumer,
    request_id = auth.last_request_id, payload_hash = payload_hash or '', amount_fen = amount_fen,
    at_ms = at_ms, lines = lines,
    -- The authorization as it stands after this event, so the ledger's authorizations table
    -- can be written from any single event, whatever order a redelivery brings them in.
    state = auth.state, channel = tonumber(auth.channel), total_fen = tonumber(auth.total_fen),
    subsidy_fen = tonumber(auth.subsidy_fen), refunded_fen = tonumber(auth.refunded_fen),
    created_ms = tonumber(auth.created_ms), expires_ms = tonumber(auth.expires_ms),
    all_lines = auth.lines, qualification = auth.qualification or '',
    -- The programme day of an authorization counted against a per-merchant daily limit (nil,
    -- left out, when not counted): reconcile and rebuild derive the daily counters from it.
    day = day_of(auth),
    channel_reference = channel_reference,
    -- A claw-back's risk case (clawback.lua; nil, left out, in every other event).
    risk_case = auth.risk_case,
  }
  return redis.call('XADD', stream_key, '*', 'e', cjson.encode(event))
end

-- Whether a block read from the block hash (its expiry in ms, "0" until lifted; false when the
-- subject is not blocked) is in force at now_ms. An expired block is ignored here and removed
-- from the hash by the next publication of the list (storage/redis/blocks.py).
local function blocked(value, now_ms)
  if not value then return false end
  local expires_ms = tonumber(value) or 0
  return expires_ms == 0 or now_ms < expires_ms
end

-- Appends one risk event (a decline by a risk rule, or a flag) to the risk event stream, from
-- which the ledger writer process writes it into PostgreSQL once (contract.py RiskEventRecord).
-- Called in the same script call as the decision, before its answer is stored, so a replay of
-- the request (the stored answer) appends nothing.
local function risk_event(stream_key, action, rule, subject_kind, subject_id, fields, evidence, at_ms)
  local event = {
    action = action, rule = rule, subject_kind = subject_kind, subject_id = subject_id,
    campaign = fields.campaign, merchant = fields.merchant or '', terminal = fields.terminal or '',
    request_id = fields.request_id, authorization = fields.authorization or '',
    evidence = evidence or {}, at_ms = at_ms,
  }
  redis.call('XADD', stream_key, '*', 'r', cjson.encode(event))
end

-- The view of a qualification, as stored in idempotency records and returned.
local function qualification_view(q)
  return {
    code = q.code, state = q.state, campaign = q.campaign, category = q.category,
    consumer = q.consumer, issued_ms = tonumber(q.issued_ms), expires_ms = tonumber(q.expires_ms),
    updated_ms = tonumber(q.updated_ms), authorization = q.authorization or '',
    masked_id = q.masked_id or '', masked_phone = q.masked_phone or '', cell = q.cell or '',
    pack = q.pack or '', threshold_fen = tonumber(q.threshold_fen or '0'), off_fen = tonumber(q.off_fen or '0'),
  }
end

local function load_hash(key)
  local raw = redis.call('HGETALL', key)
  if #raw == 0 then return nil end
  local record = {}
  for i = 1, #raw, 2 do record[raw[i]] = raw[i + 1] end
  return record
end

-- Appends the qualification as it now stands to the qualification stream, from which the
-- ledger writer process mirrors it into PostgreSQL (storage/postgres/qualifications.py).
local function mirror_qualification(stream_key, qual_key)
  local q = load_hash(qual_key)
  if q ~= nil then redis.call('XADD', stream_key, '*', 'q', cjson.encode(q)) end
end

-- Gives a qualification's quota back to the pool and the consumer's claim back (expiry,
-- cancellation): called exactly once per qualification, on its one transition out of use.
-- Reads the script's KEY: the qualification's keys (contract.py's QualificationKeys).
-- A pack's voucher (q.pack) counts against its pack, not its category: the pack's vouchers
-- still out (pack:<id>:live in the holder's hash) go down by one, and the pack itself returns
-- to the pool, and to the person, only with the last of them, so only when every voucher of it
-- expired unused or was cancelled (a redeemed one never comes back here: the pack stays used).
local function return_qualification(q, new_state, at_ms)
  if (q.pack or '') ~= '' then
    local pack = 'pack:' .. q.pack
    if redis.call('HINCRBY', KEY.qualification_holder, pack .. ':live', -1) <= 0 then
      redis.call('HDEL', KEY.qualification_holder, pack .. ':live')
      hincrby(KEY.qualification_quota, pack .. ':claimed', -1)
      hincrby(KEY.qualification_holder, pack, -1)
    end
  else
    hincrby(KEY.qualification_quota, q.category .. ':claimed', -1)
    hincrby(KEY.qualification_holder, q.category, -1)
  end
  redis.call('ZREM', KEY.qualification_expiry, q.code)
  q.state, q.updated_ms, q.authorization = new_state, at_ms, ''
  redis.call('HSET', KEY.qualification, 'state', new_state, 'updated_ms', at_ms, 'authorization', '')
  mirror_qualification(KEY.qualification_events, KEY.qualification)
end

-- A RESERVED qualification whose authorization was voided or expired: ISSUED again until its
-- own expiry, or EXPIRED (quota back to the pool) when that has passed meanwhile.
local function unreserve_qualification(auth, at_ms)
  if (auth.qualification or '') == '' then return end
  local q = load_hash(KEY.qualification)
  if q == nil or q.state ~= 'RESERVED' or q.authorization ~= auth.id then return end
  if at_ms >= tonumber(q.expires_ms) then
    return_qualification(q, 'EXPIRED', at_ms)
  else
    redis.call('HSET', KEY.qualification, 'state', 'ISSUED', 'updated_ms', at_ms, 'authorization', '')
    redis.call('ZADD', KEY.qualification_expiry, int(tonumber(q.expires_ms)), q.code)
    mirror_qualification(KEY.qualification_events, KEY.qualification)
  end
end

-- Releases a PENDING hold (void or expiry): budget reservation, consumer quota and serials.
-- Reads the script's KEY: the authorization's keys (contract.py's HoldKeys) and its serials.
local function release_hold(auth, new_state, at_ms, request_id, payload_hash)
  local sums, counts, order = per_category(auth.lines)
  for _, category in ipairs(order) do
    hincrby(KEY.budget, category .. ':reserved', -sums[category])
    hincrby(KEY.usage, category, -counts[category])
  end
  for _, serial_key in ipairs(KEY.serials) do
    if redis.call('GET', serial_key) == auth.id then redis.call('DEL', serial_key) end
  end
  -- A payment that never happened gives its slot of the per-merchant daily limit back (a
  -- refund does not: the redemption took place). A field back at 0 is removed.
  local day = day_of(auth)
  if day then
    local field = day_field(day, auth.merchant)
    if redis.call('HINCRBY', KEY.usage, field, -1) <= 0 then redis.call('HDEL', KEY.usage, field) end
  end
  redis.call('ZREM', KEY.holds, auth.id)
  unreserve_qualification(auth, at_ms)
  auth.state = new_state
  auth.updated_ms = at_ms
  auth.last_request_id = request_id
  redis.call('HSET', KEY.authorization, 'state', new_state, 'updated_ms', at_ms,
    'last_request_id', request_id)
  emit(KEY.ledger, new_state, auth, auth.lines, tonumber(auth.subsidy_fen), at_ms, payload_hash)
end

-- Returns the stored answer for an idempotency key: nil when unused, or (answer, conflict).
local function idempotent_answer(idem_key, payload_hash)
  local stored = redis.call('GET', idem_key)
  if not stored then return nil, false end
  local separator = string.find(stored, '|', 1, true)
  if string.sub(stored, 1, separator - 1) ~= payload_hash then return nil, true end
  return string.sub(stored, separator + 1), false
end

local function remember(idem_key, payload_hash, answer, ttl_s)
  redis.call('SET', idem_key, payload_hash .. '|' .. answer, 'EX', ttl_s)
end

-- Records a request nonce; false when it was seen within its lifetime (a replayed call).
local function claim_nonce(nonce_key, ttl_s)
  return redis.call('SET', nonce_key, '1', 'NX', 'EX', ttl_s) ~= false
end

-- The opening of every script a caller signs (authorize, claim_qualification,
-- cancel_qualification, capture, void, refund): the call's nonce is claimed, then its request
-- id looked up. Returns nil to go on, or the reply to return at once: NONCE_REUSED,
-- IDEMPOTENCY_CONFLICT (the request id with another payload), or the stored answer (a replay).
-- KEY.nonce, KEY.idempotency; ARG.payload_hash, ARG.nonce_ttl_s.
local function open_request()
  if not claim_nonce(KEY.nonce, ARG.nonce_ttl_s) then return fail('NONCE_REUSED') end
  local stored, conflict = idempotent_answer(KEY.idempotency, ARG.payload_hash)
  if conflict then return fail('IDEMPOTENCY_CONFLICT') end
  if stored then return {'replay', stored} end
  return nil
end

-- Stores a signed call's answer under its request id (ARG.idempotency_ttl_s) and returns it.
local function answer(body)
  local encoded = cjson.encode(body)
  remember(KEY.idempotency, ARG.payload_hash, encoded, ARG.idempotency_ttl_s)
  return {'new', encoded}
end

-- What a release schedule has released by now_ms (a campaign's budget in fen, or its
-- qualification quota in claims): the whole total without tranches, else the cumulative amount
-- of the last tranche due, at most the total. tranches: {{release ms, cumulative amount}, ...}
-- in time order, as storage/redis/reference.py publishes them; server/domain/budget.py's
-- released() is the same rule in Python (tests/integration/test_script_contract.py runs both).
local function released(tranches, total, now_ms)
  if tranches == nil or #tranches == 0 then return total end
  local amount = 0
  for _, tranche in ipairs(tranches) do
    if tranche[1] <= now_ms then amount = tranche[2] end
  end
  return math.min(amount, total)
end

-- The common opening of capture, void and refund (contract.py's LifecycleKeys and
-- LifecycleArgs): the nonce and request id, the calling terminal and its merchant, then the
-- authorization. Returns auth and now, or nil and the reply to return at once.
local function begin_lifecycle()
  local early = open_request()
  if early then return nil, early end
  -- A suspended terminal or merchant may not move money, in either direction.
  local terminal = redis.call('HMGET', KEY.terminal, 'status', 'merchant')
  if terminal[1] ~= 'ACTIVE' or terminal[2] ~= ARG.merchant_id then return nil, fail('TERMINAL_INACTIVE') end
  if redis.call('HGET', KEY.merchant, 'status') ~= 'ACTIVE' then return nil, fail('MERCHANT_INACTIVE') end
  local auth = load_auth(KEY.authorization)
  -- Another merchant's authorization is reported as absent, so ids cannot be probed.
  if auth == nil or auth.merchant ~= ARG.merchant_id then return nil, fail('AUTHORIZATION_NOT_FOUND') end
  -- The caller derived the budget, usage and serial keys from this authorization's immutable
  -- fields; a mismatch is a bug in the caller, never a business outcome.
  if auth.campaign ~= ARG.campaign_id or auth.consumer ~= ARG.consumer_key then
    return nil, fail('KEYS_MISMATCH')
  end
  local now = now_ms()
  if auth.state == 'PENDING' and now >= tonumber(auth.expires_ms) then
    release_hold(auth, 'EXPIRED', now, '')
  end
  auth.acting_terminal = ARG.terminal_id
  return auth, now
end

-- Stores and returns a lifecycle answer.
local function finish_lifecycle(auth, extra)
  local body = extra or {}
  body.authorization = auth_view(auth)
  return answer(body)
end
