-- authorize.lua: every check and the whole reservation of one authorization, atomically.
--
-- KEYS[1]  nonce        string  P:nonce:<terminal>:<nonce>
-- KEYS[2]  idempotency  string  P:idem:<terminal>:<request_id>   "<payload hash>|<answer JSON>"
-- KEYS[3]  terminal     hash    status, merchant
-- KEYS[4]  merchant     hash    status, categories (",a,b," or "" for every category)
-- KEYS[5]  campaign     hash    status, starts_ms, ends_ms
-- KEYS[6]  rules        hash    category -> rule JSON (see storage/redis/reference.py)
-- KEYS[7]  budget       hash    <category>:total|reserved|spent|refunded, fen
-- KEYS[8]  usage        hash    category -> units held or bought by this consumer
-- KEYS[9]  authorization hash   written on approval
-- KEYS[10] holds        zset    authorization id scored by hold expiry (ms)
-- KEYS[11] ledger       stream  one event per reservation
-- KEYS[12] qualification hash   the redemption code's (a placeholder, never read, without one)
-- KEYS[13] external     hash    category -> provider that reported this consumer using it
-- KEYS[14] qualification stream  the qualification's new state, mirrored into PostgreSQL
-- KEYS[15 + 2(i-1)]     product hash of line i: active, category, grade, reference_price_fen, serial_required
-- KEYS[16 + 2(i-1)]     serial key of line i: P:serial:<gtin>:<serial> (unused when no serial)
--
-- ARGV[1] payload hash  ARGV[2] request id  ARGV[3] terminal id  ARGV[4] merchant id
-- ARGV[5] campaign id   ARGV[6] consumer key  ARGV[7] channel (int)  ARGV[8] new authorization id
-- ARGV[9] hold ttl (s)  ARGV[10] idempotency ttl (s)  ARGV[11] nonce ttl (s)  ARGV[12] line count n
-- ARGV[13] redemption code ("" when none)
-- ARGV[14 + 4(i-1) ..]  line i: line id, gtin, unit price (fen), serial ("" when none)
--
-- Returns {kind, JSON} (see _lib.lua); the answer is {"decision": "APPROVED", "authorization": ...}
-- or {"decision": "DECLINED", "reason": <DeclineReason number>, "line_id": ...}.

-- Decline reasons, numbered as DeclineReason in authorization.proto: lower wins.
local TERMINAL_INACTIVE, MERCHANT_INACTIVE, CAMPAIGN_NOT_FOUND, CAMPAIGN_NOT_ACTIVE = 1, 2, 3, 4
local PRODUCT_NOT_ELIGIBLE, CATEGORY_NOT_COVERED, MERCHANT_CATEGORY_NOT_ALLOWED = 5, 6, 7
local GRADE_NOT_ELIGIBLE, PRICE_ABOVE_CEILING, PRICE_BELOW_THRESHOLD = 8, 9, 10
local SERIAL_REQUIRED, SERIAL_ALREADY_SUBSIDISED = 11, 12
local CONSUMER_LIMIT_REACHED, BUDGET_EXHAUSTED = 13, 14
local QUALIFICATION_REQUIRED, QUALIFICATION_NOT_FOUND, QUALIFICATION_NOT_USABLE = 15, 16, 17
local QUALIFICATION_EXPIRED, QUALIFICATION_CATEGORY_MISMATCH, CONSUMER_USED_ELSEWHERE = 18, 19, 20
local NO_SUBSIDY = 21

local payload_hash, request_id = ARGV[1], ARGV[2]
local terminal_id, merchant_id, campaign_id = ARGV[3], ARGV[4], ARGV[5]
local consumer_key, channel, authorization_id = ARGV[6], tonumber(ARGV[7]), ARGV[8]
local hold_ttl_s, idempotency_ttl_s, nonce_ttl_s = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local line_count = tonumber(ARGV[12])
local redemption_code = ARGV[13]

if not claim_nonce(KEYS[1], nonce_ttl_s) then return fail('NONCE_REUSED') end
local stored, conflict = idempotent_answer(KEYS[2], payload_hash)
if conflict then return fail('IDEMPOTENCY_CONFLICT') end
if stored then return {'replay', stored} end

local now = now_ms()

local function decline(reason, line_id)
  local answer = cjson.encode({decision = 'DECLINED', reason = reason, line_id = line_id or ''})
  remember(KEYS[2], payload_hash, answer, idempotency_ttl_s)
  return {'new', answer}
end

-- Caller-level checks, in precedence order.
local terminal = redis.call('HMGET', KEYS[3], 'status', 'merchant')
if terminal[1] ~= 'ACTIVE' then return decline(TERMINAL_INACTIVE) end
-- The merchant comes from the credential cache; a terminal re-bound since then must re-authenticate.
if terminal[2] ~= merchant_id then return fail('TERMINAL_MERCHANT_MISMATCH') end
local merchant = redis.call('HMGET', KEYS[4], 'status', 'categories')
if merchant[1] ~= 'ACTIVE' then return decline(MERCHANT_INACTIVE) end
local campaign = redis.call('HMGET', KEYS[5], 'status', 'starts_ms', 'ends_ms', 'q_validity_s')
if campaign[1] ~= 'ACTIVE' then return decline(CAMPAIGN_NOT_FOUND) end
if now < tonumber(campaign[2]) or now >= tonumber(campaign[3]) then
  return decline(CAMPAIGN_NOT_ACTIVE)
end
local merchant_scope = merchant[2] or ''

-- Computes one line's subsidy under its rule; returns subsidy, or nil and a decline reason.
local function line_subsidy(rule, grade, price, reference_price)
  local rate = 0
  if rule.kind == 'PERCENT' then
    rate = rule.rates_bp[grade]
    if rate == nil then return nil, GRADE_NOT_ELIGIBLE end
  end
  if rule.price_ceiling_fen > 0 and price > rule.price_ceiling_fen then return nil, PRICE_ABOVE_CEILING end
  if reference_price > 0 and price > reference_price then return nil, PRICE_ABOVE_CEILING end
  if rule.kind == 'FIXED' then
    if price < rule.threshold_fen then return nil, PRICE_BELOW_THRESHOLD end
    return math.min(rule.off_fen, price), nil
  end
  return math.min(math.floor(price * rate / 10000), rule.cap_fen), nil
end

-- Line-level checks. Every line is checked so that the reported reason is the one with the
-- highest precedence over the whole request, not merely the first line's.
local rules, lines = {}, {}
local worst_reason, worst_line = nil, ''
-- The first line whose subsidy is 0 fen: declined NO_SUBSIDY, the last reason in precedence.
local nothing_line = nil
local function note(reason, line_id)
  if worst_reason == nil or reason < worst_reason then worst_reason, worst_line = reason, line_id end
end
for i = 1, line_count do
  local base = 14 + 4 * (i - 1)
  local line_id, gtin, price, serial = ARGV[base], ARGV[base + 1], tonumber(ARGV[base + 2]), ARGV[base + 3]
  local product = redis.call('HMGET', KEYS[15 + 2 * (i - 1)],
    'active', 'category', 'grade', 'reference_price_fen', 'serial_required')
  local category = product[2]
  if product[1] ~= '1' then
    note(PRODUCT_NOT_ELIGIBLE, line_id)
  elseif redis.call('HEXISTS', KEYS[6], category) == 0 then
    note(CATEGORY_NOT_COVERED, line_id)
  elseif merchant_scope ~= '' and not string.find(merchant_scope, ',' .. category .. ',', 1, true) then
    note(MERCHANT_CATEGORY_NOT_ALLOWED, line_id)
  else
    if rules[category] == nil then rules[category] = cjson.decode(redis.call('HGET', KEYS[6], category)) end
    local subsidy, reason = line_subsidy(rules[category], product[3], price, tonumber(product[4]))
    if reason then
      note(reason, line_id)
    elseif product[5] == '1' and serial == '' then
      note(SERIAL_REQUIRED, line_id)
    elseif serial ~= '' and redis.call('EXISTS', KEYS[16 + 2 * (i - 1)]) == 1 then
      note(SERIAL_ALREADY_SUBSIDISED, line_id)
    else
      if subsidy == 0 and nothing_line == nil then nothing_line = line_id end
      lines[#lines + 1] = {l = line_id, g = gtin, c = category, p = price, s = subsidy, sn = serial, r = 0}
    end
  end
end
if worst_reason then return decline(worst_reason, worst_line) end

-- Aggregate checks: the consumer's quota, then the budget, per category.
local sums, counts, order = per_category(lines)
local function first_line_of(category)
  for _, line in ipairs(lines) do if line.c == category then return line.l end end
end
for _, category in ipairs(order) do
  local used = tonumber(redis.call('HGET', KEYS[8], category) or '0')
  if used + counts[category] > rules[category].per_person_limit then
    return decline(CONSUMER_LIMIT_REACHED, first_line_of(category))
  end
end
-- The released budget: the whole budget, or the tranches due by now (cumulative amounts).
local function released(category, total)
  local tranches = rules[category].tranches
  if tranches == nil or #tranches == 0 then return total end
  local amount = 0
  for _, tranche in ipairs(tranches) do
    if tranche[1] <= now then amount = tranche[2] end
  end
  return math.min(amount, total)
end
for _, category in ipairs(order) do
  local budget = redis.call('HMGET', KEYS[7], category .. ':total', category .. ':reserved', category .. ':spent')
  local available = released(category, tonumber(budget[1] or '0')) - tonumber(budget[2] or '0')
    - tonumber(budget[3] or '0')
  if sums[category] > available then return decline(BUDGET_EXHAUSTED, first_line_of(category)) end
end

-- The qualification: required by campaigns that issue them, refused by the others. Its
-- consumer and campaign must match (else it is reported as absent, so codes cannot be probed).
local qualification = nil
if tonumber(campaign[4] or '0') > 0 then
  if redemption_code == '' then return decline(QUALIFICATION_REQUIRED) end
  local q = redis.call('HMGET', KEYS[12], 'state', 'campaign', 'consumer', 'category', 'expires_ms')
  if q[1] == false or q[2] ~= campaign_id or q[3] ~= consumer_key then
    return decline(QUALIFICATION_NOT_FOUND)
  end
  if q[1] ~= 'ISSUED' then return decline(QUALIFICATION_NOT_USABLE) end
  if now >= tonumber(q[5]) then return decline(QUALIFICATION_EXPIRED) end
  for _, line in ipairs(lines) do
    if line.c ~= q[4] then return decline(QUALIFICATION_CATEGORY_MISMATCH, line.l) end
  end
  qualification = redemption_code
elseif redemption_code ~= '' then
  return decline(QUALIFICATION_NOT_FOUND)
end
-- Another service provider reported this consumer using one of the categories.
for _, category in ipairs(order) do
  if redis.call('HEXISTS', KEYS[13], category) == 1 then
    return decline(CONSUMER_USED_ELSEWHERE, first_line_of(category))
  end
end

if nothing_line then return decline(NO_SUBSIDY, nothing_line) end

-- Every check passed: reserve, record, and append the ledger event.
local total_fen, subsidy_fen = 0, 0
for _, line in ipairs(lines) do
  total_fen = total_fen + line.p
  subsidy_fen = subsidy_fen + line.s
end
for _, category in ipairs(order) do
  hincrby(KEYS[7], category .. ':reserved', sums[category])
  hincrby(KEYS[8], category, counts[category])
end
for i, line in ipairs(lines) do
  if line.sn ~= '' then redis.call('SET', KEYS[16 + 2 * (i - 1)], authorization_id) end
end
local expires_ms = now + hold_ttl_s * 1000
local auth = {
  id = authorization_id, state = 'PENDING', campaign = campaign_id, merchant = merchant_id,
  terminal = terminal_id, consumer = consumer_key, channel = channel, lines = lines,
  total_fen = total_fen, subsidy_fen = subsidy_fen, refunded_fen = 0, created_ms = now,
  expires_ms = expires_ms, updated_ms = now, last_request_id = request_id,
  qualification = qualification or '',
}
redis.call('HSET', KEYS[9], 'id', authorization_id, 'state', 'PENDING', 'campaign', campaign_id,
  'merchant', merchant_id, 'terminal', terminal_id, 'consumer', consumer_key, 'channel', channel,
  'lines', cjson.encode(lines), 'total_fen', total_fen, 'subsidy_fen', subsidy_fen,
  'refunded_fen', 0, 'created_ms', now, 'expires_ms', expires_ms, 'updated_ms', now,
  'request_id', request_id, 'last_request_id', request_id, 'qualification', qualification or '')
if qualification then
  redis.call('HSET', KEYS[12], 'state', 'RESERVED', 'authorization', authorization_id, 'updated_ms', now)
  mirror_qualification(KEYS[14], KEYS[12])
end
redis.call('ZADD', KEYS[10], int(expires_ms), authorization_id)
emit(KEYS[11], 'AUTHORIZED', auth, lines, subsidy_fen, now, payload_hash)
local answer = cjson.encode({decision = 'APPROVED', authorization = auth_view(auth)})
remember(KEYS[2], payload_hash, answer, idempotency_ttl_s)
return {'new', answer}
