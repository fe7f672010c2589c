-- _lib.lua: helpers shared by every script. The loader prepends this file to each script
-- before SCRIPT LOAD, so each script stays one atomic unit with no cross-script calls.
--
-- Conventions for all scripts:
--   * Money is integer fen. Lua numbers are doubles, exact below 2^53; the server validates
--     prices (< 1e10 fen) and budgets (< 1e13 fen) so every product and sum stays exact.
--   * Time comes from Redis TIME (milliseconds), never from the application's clock.
--   * A script returns {kind, JSON}: kind "new" (this call acted), "replay" (the stored answer
--     to an earlier call with the same request id) or "error" (nothing was written, except
--     that a hold found past its expiry is expired first, as the sweeper would have done).
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
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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
  }
end

-- Sums subsidy and unit counts per category over the given lines.
local function per_category(lines)
  local sums, counts, order = {}, {}, {}
  for _, line in ipairs(lines) do
    if sums[line.c] == nil then
      sums[line.c] = 0; counts[line.c] = 0; order[#order + 1] = line.c
    end
    sums[line.c] = sums[line.c] + line.s
    counts[line.c] = counts[line.c] + 1
  end
  return sums, counts, order
end

-- Appends one ledger event. The event carries everything the ledger needs to post it and
-- to rebuild the Redis counters from history: per-line category, subsidy and serial.
local function emit(stream_key, event_type, auth, lines, amount_fen, at_ms, payload_hash)
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
  }
  return redis.call('XADD', stream_key, '*', 'e', cjson.encode(event))
end

-- The view of a qualification, as stored in idempotency records and returned.
local function qualification_view(q)
  return {
    code = q.code, state = q.state, campaign = q.campaign, category = q.category,
    consumer = q.consumer, issued_ms = tonumber(q.issued_ms), expires_ms = tonumber(q.expires_ms),
    updated_ms = tonumber(q.updated_ms), authorization = q.authorization or '',
    masked_id = q.masked_id or '', masked_phone = q.masked_phone or '', cell = q.cell or '',
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
-- qkeys: {qual=, quota=, holder=, expiry=, events=}
local function return_qualification(qkeys, q, new_state, at_ms)
  hincrby(qkeys.quota, q.category .. ':claimed', -1)
  hincrby(qkeys.holder, q.category, -1)
  redis.call('ZREM', qkeys.expiry, q.code)
  q.state, q.updated_ms, q.authorization = new_state, at_ms, ''
  redis.call('HSET', qkeys.qual, 'state', new_state, 'updated_ms', at_ms, 'authorization', '')
  mirror_qualification(qkeys.events, qkeys.qual)
end

-- A RESERVED qualification whose authorization was voided or expired: ISSUED again until its
-- own expiry, or EXPIRED (quota back to the pool) when that has passed meanwhile.
local function unreserve_qualification(qkeys, auth, at_ms)
  if (auth.qualification or '') == '' then return end
  local q = load_hash(qkeys.qual)
  if q == nil or q.state ~= 'RESERVED' or q.authorization ~= auth.id then return end
  if at_ms >= tonumber(q.expires_ms) then
    return_qualification(qkeys, q, 'EXPIRED', at_ms)
  else
    redis.call('HSET', qkeys.qual, 'state', 'ISSUED', 'updated_ms', at_ms, 'authorization', '')
    redis.call('ZADD', qkeys.expiry, int(tonumber(q.expires_ms)), q.code)
    mirror_qualification(qkeys.events, qkeys.qual)
  end
end

-- Releases a PENDING hold (void or expiry): budget reservation, consumer quota and serials.
-- keys: {auth=, holds=, budget=, usage=, stream=, serials={serial key per line with a serial},
--        qual=, quota=, holder=, expiry=, events= (the authorization's qualification, if any)}
local function release_hold(keys, auth, new_state, at_ms, request_id, payload_hash)
  local sums, counts, order = per_category(auth.lines)
  for _, category in ipairs(order) do
    hincrby(keys.budget, category .. ':reserved', -sums[category])
    hincrby(keys.usage, category, -counts[category])
  end
  for _, serial_key in ipairs(keys.serials) do
    if redis.call('GET', serial_key) == auth.id then redis.call('DEL', serial_key) end
  end
  redis.call('ZREM', keys.holds, auth.id)
  unreserve_qualification(keys, auth, at_ms)
  auth.state = new_state
  auth.updated_ms = at_ms
  auth.last_request_id = request_id
  redis.call('HSET', keys.auth, 'state', new_state, 'updated_ms', at_ms,
    'last_request_id', request_id)
  emit(keys.stream, new_state, auth, auth.lines, tonumber(auth.subsidy_fen), at_ms, payload_hash)
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

-- The keys of capture, void, refund and expire_hold: KEYS[1..5], the five keys of the
-- authorization's qualification from `first_qualification` (hash, quota, holder, expiry set,
-- qualification stream; placeholders, never touched, when it has none), then serial keys.
local function lifecycle_keys(first_qualification)
  local serials = {}
  for i = first_qualification + 5, #KEYS do serials[#serials + 1] = KEYS[i] end
  local q = first_qualification
  return {auth = KEYS[1], holds = KEYS[2], budget = KEYS[3], usage = KEYS[4], stream = KEYS[5],
    qual = KEYS[q], quota = KEYS[q + 1], holder = KEYS[q + 2], expiry = KEYS[q + 3],
    events = KEYS[q + 4], serials = serials}
end

-- The common opening of capture, void and refund (KEYS[6] idempotency, KEYS[7] nonce,
-- KEYS[8] the calling terminal, KEYS[9] its merchant, KEYS[10..14] the qualification's keys;
-- ARGV[1] payload hash, ARGV[3] caller's
-- merchant, ARGV[5] nonce ttl, ARGV[6] campaign, ARGV[7] consumer key, ARGV[8] calling
-- terminal). Returns auth and now, or nil and the reply to return at once.
local function begin_lifecycle(keys)
  if not claim_nonce(KEYS[7], tonumber(ARGV[5])) then return nil, fail('NONCE_REUSED') end
  local stored, conflict = idempotent_answer(KEYS[6], ARGV[1])
  if conflict then return nil, fail('IDEMPOTENCY_CONFLICT') end
  if stored then return nil, {'replay', stored} end
  -- A suspended terminal or merchant may not move money, in either direction.
  local terminal = redis.call('HMGET', KEYS[8], 'status', 'merchant')
  if terminal[1] ~= 'ACTIVE' or terminal[2] ~= ARGV[3] then return nil, fail('TERMINAL_INACTIVE') end
  if redis.call('HGET', KEYS[9], 'status') ~= 'ACTIVE' then return nil, fail('MERCHANT_INACTIVE') end
  local auth = load_auth(keys.auth)
  -- Another merchant's authorization is reported as absent, so ids cannot be probed.
  if auth == nil or auth.merchant ~= ARGV[3] then return nil, fail('AUTHORIZATION_NOT_FOUND') end
  -- The caller derived the budget, usage and serial keys from this authorization's immutable
  -- fields; a mismatch is a bug in the caller, never a business outcome.
  if auth.campaign ~= ARGV[6] or auth.consumer ~= ARGV[7] then return nil, fail('KEYS_MISMATCH') end
  local now = now_ms()
  if auth.state == 'PENDING' and now >= tonumber(auth.expires_ms) then
    release_hold(keys, auth, 'EXPIRED', now, '')
  end
  auth.acting_terminal = ARGV[8]
  return auth, now
end

-- Stores and returns a lifecycle answer.
local function finish_lifecycle(auth, extra)
  local answer = extra or {}
  answer.authorization = auth_view(auth)
  local encoded = cjson.encode(answer)
  remember(KEYS[6], ARGV[1], encoded, tonumber(ARGV[4]))
  return {'new', encoded}
end
