-- authorize.lua: every check and the whole reservation of one authorization, atomically.
--
-- KEY, ARG and the decline reasons (numbered as DeclineReason in authorization.proto: among
-- line-level reasons lower wins; the later ones rank where their checks run, as the proto
-- says: STORE_OUTSIDE_REGION (22) after CAMPAIGN_NOT_ACTIVE, LOCATION_* (24-28) right after
-- it, MERCHANT_DAILY_LIMIT_REACHED (23) after CONSUMER_LIMIT_REACHED; the blocks (34-38) as
-- the comments below say): storage/redis/contract.py, AUTHORIZE. KEY.lines[i] and ARG.lines[i] are line i's.
--
-- Returns {kind, JSON} (see _lib.lua); the answer is {"decision": "APPROVED", "authorization": ...}
-- or {"decision": "DECLINED", "reason": <DeclineReason number>, "line_id": ...}.

-- A redemption code is one voucher. Under a LINE-scope rule it takes its amount off one line,
-- so its payment has exactly one line (refused as a bad request, INVALID_ARGUMENT naming lines,
-- as the service refused it before basket rules); under a BASKET rule it covers the payment's
-- lines of its category. An unknown code is refused the same way (nothing to say it is a basket).
-- Checked before the nonce and request id, like the service's own validation of a request.
if ARG.redemption_code ~= '' and #ARG.lines > 1 then
  local category = redis.call('HGET', KEY.qualification, 'category')
  local raw_rule = category and redis.call('HGET', KEY.rules, category)
  if not raw_rule or cjson.decode(raw_rule).threshold_scope ~= 'BASKET' then return fail('VOUCHER_NEEDS_ONE_LINE') end
end

local early = open_request()
if early then return early end

local now = now_ms()

local function decline(reason, line_id)
  return answer({decision = 'DECLINED', reason = reason, line_id = line_id or ''})
end

-- A decline by a risk rule: the same answer, and one risk event in this same call (a replay
-- returns the stored answer before reaching here, so a retried request adds no second event).
-- The event's fields are a table built only here: the approval path builds no table it does not use.
local function risk_decline(reason, rule, subject_kind, subject_id, evidence, line_id)
  risk_event(KEY.risk_events, 'DECLINE', rule, subject_kind, subject_id, {campaign = ARG.campaign_id,
    merchant = ARG.merchant_id, terminal = ARG.terminal_id, request_id = ARG.request_id}, evidence, now)
  return decline(reason, line_id)
end

-- The operator's blocks of the caller rank first, before its status (TERMINAL_INACTIVE): a
-- block is a risk decision about this subject, and every attempt of a blocked terminal or
-- merchant is recorded as a risk event, whatever else would have declined it. Terminal, then
-- merchant, as their statuses rank.
-- A sale without a redemption code knows its consumer and (no) partner app already, so the block
-- hash is read once here: the caller's fields, then the person's (consumer, partner app, devices;
-- see below). With a code, the person's are read once the code's owner and app are known.
local person_fields_known = ARG.consumer_key ~= '' and ARG.redemption_code == ''
local function person_block_fields(fields, consumer_id, partner_id)
  fields[#fields + 1] = 'CONSUMER:' .. consumer_id
  fields[#fields + 1] = 'PARTNER_APP:' .. partner_id
  for _, line in ipairs(ARG.lines) do
    if line.serial_number ~= '' then fields[#fields + 1] = 'DEVICE:' .. line.serial_number end
  end
  return fields
end
local caller_fields = {'TERMINAL:' .. ARG.terminal_id, 'MERCHANT:' .. ARG.merchant_id}
if person_fields_known then person_block_fields(caller_fields, ARG.consumer_key, '') end
local caller_blocks = redis.call('HMGET', KEY.blocks, unpack(caller_fields))
if blocked(caller_blocks[1], now) then
  return risk_decline(TERMINAL_BLOCKED, 'TERMINAL_BLOCKED', 'TERMINAL', ARG.terminal_id,
    {block_expires_ms = tonumber(caller_blocks[1])})
end
if blocked(caller_blocks[2], now) then
  return risk_decline(MERCHANT_BLOCKED, 'MERCHANT_BLOCKED', 'MERCHANT', ARG.merchant_id,
    {block_expires_ms = tonumber(caller_blocks[2])})
end

-- Caller-level checks, in precedence order.
local terminal = redis.call('HMGET', KEY.terminal, 'status', 'merchant', 'store')
if terminal[1] ~= 'ACTIVE' then return decline(TERMINAL_INACTIVE) end
-- The merchant comes from the credential cache; a terminal re-bound since then must re-authenticate.
if terminal[2] ~= ARG.merchant_id then return fail('TERMINAL_MERCHANT_MISMATCH') end
local merchant = redis.call('HMGET', KEY.merchant, 'status', 'categories')
if merchant[1] ~= 'ACTIVE' then return decline(MERCHANT_INACTIVE) end
local campaign = redis.call('HMGET', KEY.campaign, 'status', 'starts_ms', 'ends_ms', 'q_validity_s',
  'region_bound', 'day_limit', 'loc_redeem', 'risk')
if campaign[1] ~= 'ACTIVE' then return decline(CAMPAIGN_NOT_FOUND) end
-- Redis's replies are strings. Lua's arithmetic converts one itself, once; tonumber converts it
-- twice (is it a number? then: the number), behind a C call, about 1,100 instructions more. So the
-- approval path compares `reply + 0` (a comparison does not convert) and adds and subtracts replies
-- as they are (README, "The authorize script inside Redis").
if now < campaign[2] + 0 or now >= campaign[3] + 0 then
  return decline(CAMPAIGN_NOT_ACTIVE)
end
-- Region-bound redemption: the terminal's store must be one of those the publisher found
-- inside the campaign's region (a terminal without a store has no location). A caller-level
-- check, so it ranks here, before every line-level reason, whatever its number.
if campaign[5] == '1' then
  local store = terminal[3] or ''
  if store == '' or redis.call('SISMEMBER', KEY.region_stores, store) == 0 then
    return decline(STORE_OUTSIDE_REGION)
  end
end
local merchant_scope = merchant[2] or ''

-- Who pays: the request's consumer key (a partner app's, or the gateway's from an ID number
-- the till read), or, when the till sent only a redemption code, the qualification's owner,
-- read here in this same call. Its per-person keys are then named from the declared
-- prefixes KEY.usage and KEY.external_consumer (storage/redis/keys.py with an empty consumer
-- key): every key of a deployment shares one hash tag, so they are in the declared keys' slot.
-- An unknown code, or one of another campaign, has no owner: QUALIFICATION_NOT_FOUND, ranked
-- here (before the line-level reasons) because nothing per-person can be checked without one.
local consumer, usage_key, external_key = ARG.consumer_key, KEY.usage, KEY.external_consumer
-- The partner app that issued the redemption code ('' without one, or when the code is not this
-- consumer's in this campaign: the qualification checks below report that).
local partner = ''
if consumer == '' then
  local owner = redis.call('HMGET', KEY.qualification, 'consumer', 'campaign', 'partner')
  if not owner[1] or owner[2] ~= ARG.campaign_id then return decline(QUALIFICATION_NOT_FOUND) end
  consumer = owner[1]
  usage_key, external_key = KEY.usage .. consumer, KEY.external_consumer .. consumer
  partner = owner[3] or ''
elseif ARG.redemption_code ~= '' then
  local owner = redis.call('HMGET', KEY.qualification, 'consumer', 'campaign', 'partner')
  if owner[1] == consumer and owner[2] == ARG.campaign_id then partner = owner[3] or '' end
end

-- Location at redemption: the service judged the phone's reported location against its copy
-- of the campaign's rule and region (at most a second old) and passed 0 or the LOCATION_*
-- reason; whether the campaign requires it is read here, in this call, so a campaign switched
-- on a moment ago already declines a payment without a location. A caller-level check, ranked
-- right after STORE_OUTSIDE_REGION (and a code-only request's unknown code).
if campaign[7] == '1' and ARG.location_verdict ~= 0 then return decline(ARG.location_verdict) end

-- The operator's blocks of the person, the devices and the issuing app: ranked once the
-- consumer is known, after the location reasons, before every line-level reason (a blocked
-- device is refused whatever else its line has wrong). Consumer, then the lines' devices in
-- line order, then the partner app.
local person_blocks, at = caller_blocks, 2
if not person_fields_known then
  person_blocks, at = redis.call('HMGET', KEY.blocks, unpack(person_block_fields({}, consumer, partner))), 0
end
if blocked(person_blocks[at + 1], now) then
  return risk_decline(CONSUMER_BLOCKED, 'CONSUMER_BLOCKED', 'CONSUMER', consumer,
    {block_expires_ms = tonumber(person_blocks[at + 1])})
end
do
  local n = at + 2
  for _, line in ipairs(ARG.lines) do
    if line.serial_number ~= '' then
      n = n + 1
      if blocked(person_blocks[n], now) then
        return risk_decline(DEVICE_BLOCKED, 'DEVICE_BLOCKED', 'DEVICE', line.serial_number,
          {block_expires_ms = tonumber(person_blocks[n]), gtin = line.gtin}, line.line_id)
      end
    end
  end
end
if partner ~= '' and blocked(person_blocks[at + 2], now) then
  return risk_decline(PARTNER_APP_BLOCKED, 'PARTNER_APP_BLOCKED', 'PARTNER_APP', partner,
    {block_expires_ms = tonumber(person_blocks[at + 2])})
end

-- Computes one line's subsidy under its rule; returns subsidy, or nil and a decline reason. A
-- basket rule's line has no subsidy of its own: its share is apportioned once the basket is known.
local function line_subsidy(rule, grade, price, reference_price)
  local rate = 0
  if rule.kind == 'PERCENT' then
    rate = rule.rates_bp[grade]
    if rate == nil then return nil, GRADE_NOT_ELIGIBLE end
  end
  if rule.price_ceiling_fen > 0 and price > rule.price_ceiling_fen then return nil, PRICE_ABOVE_CEILING end
  if reference_price > 0 and price > reference_price then return nil, PRICE_ABOVE_CEILING end
  if rule.kind == 'FIXED' then
    if rule.threshold_scope == 'BASKET' then return 0, nil end
    if price < rule.threshold_fen then return nil, PRICE_BELOW_THRESHOLD end
    return math.min(rule.off_fen, price), nil
  end
  return math.min(math.floor(price * rate / 10000), rule.cap_fen), nil
end

-- Hot-path risk rules (Campaign.risk_limits; "" when the campaign has none): {terminal per
-- minute, terminal per hour, merchant per day, consumer per hour, price-flag minimum sales,
-- price-flag ratio in percent}, 0 = off (storage/redis/reference.py risk_field).
local limits = nil
if campaign[8] and campaign[8] ~= '' then
  limits = {}
  for value in string.gmatch(campaign[8], '[^,]+') do limits[#limits + 1] = tonumber(value) end
end
local price_flag = limits ~= nil and limits[5] > 0
-- With the price flag on: per approved line (index in lines), the cap threshold of its PERCENT
-- rule (the lowest price whose percentage reaches the cap), when it has one.
local cap_thresholds = price_flag and {}

-- Line-level checks. Every line is checked so that the reported reason is the one with the
-- highest precedence over the whole request, not merely the first line's.
local rules, lines = {}, {}
-- A pack's voucher carries its own "X off Y" (claim_qualification.lua): its category's FIXED
-- rule applies with the voucher's threshold_fen and off_fen in place of the rule's. A code of
-- another campaign, or without amounts, leaves the rules as they are (its checks come below).
if ARG.redemption_code ~= '' then
  local voucher = redis.call('HMGET', KEY.qualification, 'category', 'threshold_fen', 'off_fen', 'campaign')
  local raw_rule = voucher[2] and voucher[4] == ARG.campaign_id and redis.call('HGET', KEY.rules, voucher[1])
  if raw_rule then
    local rule = cjson.decode(raw_rule)
    if rule.kind == 'FIXED' then
      rule.threshold_fen, rule.off_fen = tonumber(voucher[2]), tonumber(voucher[3])
      rules[voucher[1]] = rule
    end
  end
end
local worst_reason, worst_line = nil, ''
-- The first line whose subsidy is 0 fen: declined NO_SUBSIDY, the last reason in precedence.
local nothing_line = nil
-- BASKET_BELOW_THRESHOLD (29) ranks where PRICE_BELOW_THRESHOLD (10) does, right after it.
local function rank(reason)
  if reason == BASKET_BELOW_THRESHOLD then return PRICE_BELOW_THRESHOLD + 0.5 end
  return reason
end
local function note(reason, line_id)
  if worst_reason == nil or rank(reason) < rank(worst_reason) then worst_reason, worst_line = reason, line_id end
end
-- Basket rules (threshold_scope BASKET): per category, in order of first line, the total of
-- the lines the rule covers (product active, category covered, merchant allowed) and the first
-- such line. A line failing a later check of its own still counts here, so the reported reason
-- is that line's rather than a basket made short by leaving it out.
local baskets, basket_order = {}, {}
for i, line in ipairs(ARG.lines) do
  local line_id, gtin, price, serial = line.line_id, line.gtin, line.unit_price_fen, line.serial_number
  local product = redis.call('HMGET', KEY.lines[i].product,
    'active', 'category', 'grade', 'reference_price_fen', 'serial_required')
  local category = product[2]
  -- The category's rule, read once (false: not covered), decoded once its line gets that far.
  local raw_rule = rules[category] ~= nil or product[1] ~= '1' or redis.call('HGET', KEY.rules, category)
  if product[1] ~= '1' then
    note(PRODUCT_NOT_ELIGIBLE, line_id)
  elseif not raw_rule then
    note(CATEGORY_NOT_COVERED, line_id)
  elseif merchant_scope ~= '' and not string.find(merchant_scope, ',' .. category .. ',', 1, true) then
    note(MERCHANT_CATEGORY_NOT_ALLOWED, line_id)
  else
    if rules[category] == nil then rules[category] = cjson.decode(raw_rule) end
    local basket = rules[category].kind == 'FIXED' and rules[category].threshold_scope == 'BASKET'
    if basket then
      if baskets[category] == nil then
        baskets[category] = {total = 0, first = line_id}
        basket_order[#basket_order + 1] = category
      end
      baskets[category].total = baskets[category].total + price
    end
    local subsidy, reason = line_subsidy(rules[category], product[3], price, product[4] + 0)
    if reason then
      note(reason, line_id)
    elseif product[5] == '1' and serial == '' then
      note(SERIAL_REQUIRED, line_id)
    elseif serial ~= '' and redis.call('EXISTS', KEY.lines[i].serial) == 1 then
      note(SERIAL_ALREADY_SUBSIDISED, line_id)
    else
      if subsidy == 0 and nothing_line == nil and not basket then nothing_line = line_id end
      -- u: set below on a basket's lines (nil, left out, on the others).
      lines[#lines + 1] = {l = line_id, g = gtin, c = category, p = price, s = subsidy, sn = serial, r = 0, u = nil}
      local rule = rules[category]
      if price_flag and rule.kind == 'PERCENT' and rule.cap_fen > 0 then
        local rate = rule.rates_bp[product[3]]
        if rate and rate > 0 then cap_thresholds[#lines] = math.ceil(rule.cap_fen * 10000 / rate) end
      end
    end
  end
end
-- A basket's threshold applies to its total (reported on its first line).
for _, category in ipairs(basket_order) do
  if baskets[category].total < rules[category].threshold_fen then
    note(BASKET_BELOW_THRESHOLD, baskets[category].first)
  end
end
if worst_reason then return decline(worst_reason, worst_line) end
-- Every line passed: each basket takes its amount off once, shared among its lines by largest
-- remainder to the fen (apportion in _lib.lua), so a refund of some lines returns exactly their
-- part. One voucher, one unit: the basket's first line counts 1 against the per-person limit and
-- the others 0 (u, read by per_category in _lib.lua; lines without u count 1 each).
for _, category in ipairs(basket_order) do
  local members, prices = {}, {}
  for _, line in ipairs(lines) do
    if line.c == category then
      members[#members + 1] = line
      prices[#prices + 1] = line.p
      line.u = 0
    end
  end
  local shares = apportion(rules[category].off_fen, prices)
  for i, line in ipairs(members) do line.s = shares[i] end
  members[1].u = 1
end

-- Aggregate checks: the consumer's quota, then the budget, per category.
local sums, counts, order = per_category(lines)
local function first_line_of(category)
  for _, line in ipairs(lines) do if line.c == category then return line.l end end
end
for _, category in ipairs(order) do
  local used = redis.call('HGET', usage_key, category) or 0
  if used + counts[category] > rules[category].per_person_limit then
    return decline(CONSUMER_LIMIT_REACHED, first_line_of(category))
  end
end
-- The per-merchant daily limit: this consumer's payments of the campaign at this merchant on
-- the programme day (Redis TIME shifted by the programme zone's offset), ranked right after
-- the per-person limit and before the budget.
local day_limit = tonumber(campaign[6] or '0') or 0
local day = 0
if day_limit > 0 then
  day = math.floor((now + ARG.day_offset_ms) / 86400000)
  if tonumber(redis.call('HGET', usage_key, day_field(day, ARG.merchant_id)) or '0') >= day_limit then
    return decline(MERCHANT_DAILY_LIMIT_REACHED)
  end
end
for _, category in ipairs(order) do
  local budget = redis.call('HMGET', KEY.budget, category .. ':total', category .. ':reserved', category .. ':spent')
  -- The released budget: the whole budget, or the tranches due by now (see released in _lib.lua).
  local available = released(rules[category].tranches, (budget[1] or 0) + 0, now) - (budget[2] or 0) - (budget[3] or 0)
  if sums[category] > available then return decline(BUDGET_EXHAUSTED, first_line_of(category)) end
end

-- The qualification: required by campaigns that issue them, refused by the others. Its
-- consumer and campaign must match (else it is reported as absent, so codes cannot be probed).
local qualification = nil
if (campaign[4] or 0) + 0 > 0 then
  if ARG.redemption_code == '' then return decline(QUALIFICATION_REQUIRED) end
  local q = redis.call('HMGET', KEY.qualification, 'state', 'campaign', 'consumer', 'category', 'expires_ms')
  if q[1] == false or q[2] ~= ARG.campaign_id or q[3] ~= consumer then
    return decline(QUALIFICATION_NOT_FOUND)
  end
  if q[1] ~= 'ISSUED' then return decline(QUALIFICATION_NOT_USABLE) end
  if now >= tonumber(q[5]) then return decline(QUALIFICATION_EXPIRED) end
  for _, line in ipairs(lines) do
    if line.c ~= q[4] then return decline(QUALIFICATION_CATEGORY_MISMATCH, line.l) end
  end
  qualification = ARG.redemption_code
elseif ARG.redemption_code ~= '' then
  return decline(QUALIFICATION_NOT_FOUND)
end
-- Another service provider reported this consumer using one of the categories.
for _, category in ipairs(order) do
  if redis.call('HEXISTS', external_key, category) == 1 then
    return decline(CONSUMER_USED_ELSEWHERE, first_line_of(category))
  end
end

if nothing_line then return decline(NO_SUBSIDY, nothing_line) end

-- Velocity limits (Campaign.risk_limits), after every other check: only a payment that would
-- otherwise be approved is a sale that could exceed one. Counted per campaign from approvals
-- only, never given back (a void or expiry still moved a hold: what a fraud pattern repeats).
-- Terminal per minute, per hour, merchant per programme day, consumer per hour: each decline
-- is a risk event with the limit and the count. Sliding windows are the sales of the last
-- 60 s / 3,600 s by Redis TIME, kept in a sorted set trimmed to the hour.
local velocity_consumer = KEY.velocity_consumer
if ARG.consumer_key == '' then velocity_consumer = KEY.velocity_consumer .. consumer end
-- The programme day the velocity limits count by (only with limits: read nowhere else).
local velocity_day = limits and math.floor((now + ARG.day_offset_ms) / 86400000)
if limits then
  local function over(limit, seen, reason, rule, subject_kind, subject_id, window_s)
    if limit > 0 and seen >= limit then
      return risk_decline(reason, rule, subject_kind, subject_id, {limit = limit, sales = seen, window_s = window_s})
    end
  end
  local function recent(key, window_ms) return redis.call('ZCOUNT', key, '(' .. int(now - window_ms), '+inf') end
  local refused = nil
  if limits[1] > 0 then
    refused = over(limits[1], recent(KEY.velocity_terminal, 60000), TERMINAL_VELOCITY_MINUTE,
      'TERMINAL_VELOCITY_MINUTE', 'TERMINAL', ARG.terminal_id, 60)
    if refused then return refused end
  end
  if limits[2] > 0 then
    refused = over(limits[2], recent(KEY.velocity_terminal, 3600000), TERMINAL_VELOCITY_HOUR,
      'TERMINAL_VELOCITY_HOUR', 'TERMINAL', ARG.terminal_id, 3600)
    if refused then return refused end
  end
  if limits[3] > 0 then
    local seen = tonumber(redis.call('HGET', KEY.velocity_merchant, int(velocity_day)) or '0')
    if seen >= limits[3] then
      return risk_decline(MERCHANT_VELOCITY_DAY, 'MERCHANT_VELOCITY_DAY', 'MERCHANT', ARG.merchant_id,
        {limit = limits[3], sales = seen, day = velocity_day})
    end
  end
  if limits[4] > 0 then
    refused = over(limits[4], recent(velocity_consumer, 3600000), CONSUMER_VELOCITY_HOUR,
      'CONSUMER_VELOCITY_HOUR', 'CONSUMER', consumer, 3600)
    if refused then return refused end
  end
end

-- Every check passed: reserve, record, and append the ledger event.
local total_fen, subsidy_fen = 0, 0
for _, line in ipairs(lines) do
  total_fen = total_fen + line.p
  subsidy_fen = subsidy_fen + line.s
end
for _, category in ipairs(order) do
  hincrby(KEY.budget, category .. ':reserved', sums[category])
  hincrby(usage_key, category, counts[category])
end
if day > 0 then redis.call('HINCRBY', usage_key, day_field(day, ARG.merchant_id), 1) end
for i, line in ipairs(lines) do
  if line.sn ~= '' then redis.call('SET', KEY.lines[i].serial, ARG.authorization_id) end
end
local expires_ms = now + ARG.hold_ttl_s * 1000
local authorization_id = ARG.authorization_id
-- The approval's hash, ledger event and answer share their pieces: each number formatted once, as
-- an integer (string.format, not the "%.14g" Redis and cjson give a Lua number, which cost more),
-- each text JSON-encoded once, the lines' JSON once (used four times), and the event's and the
-- answer's JSON put together from them instead of cjson.encode of a table built for each (what emit
-- and auth_view in _lib.lua give: the same fields and values, in another order, which their readers
-- ignore: contract.py, storage/postgres/ledger.py). Measured: README, "The authorize script inside
-- Redis".
local json_string = cjson.encode
local now_text, expires_text = int(now), int(expires_ms)
-- ARG.channel is the decimal the caller sent (IntAsSent in contract.py).
local total_text, subsidy_text, channel_text = int(total_fen), int(subsidy_fen), ARG.channel
-- The programme day, 0 when not counted against a per-merchant daily limit (day_of in _lib.lua).
local day_text = '0'
if day > 0 then day_text = int(day) end
local lines_json = cjson.encode(lines)
local qualification_text = qualification or ''
redis.call('HSET', KEY.authorization, 'id', authorization_id, 'state', 'PENDING', 'campaign', ARG.campaign_id,
  'merchant', ARG.merchant_id, 'terminal', ARG.terminal_id, 'consumer', consumer, 'channel', channel_text,
  'lines', lines_json, 'total_fen', total_text, 'subsidy_fen', subsidy_text,
  'refunded_fen', '0', 'created_ms', now_text, 'expires_ms', expires_text, 'updated_ms', now_text,
  'request_id', ARG.request_id, 'last_request_id', ARG.request_id, 'qualification', qualification_text,
  'day', day_text)
if qualification then
  redis.call('HSET', KEY.qualification, 'state', 'RESERVED', 'authorization', authorization_id, 'updated_ms', now_text)
  mirror_qualification(KEY.qualification_events, KEY.qualification)
end
redis.call('ZADD', KEY.holds, expires_text, authorization_id)
local id_json, campaign_json = json_string(authorization_id), json_string(ARG.campaign_id)
local merchant_json, terminal_json = json_string(ARG.merchant_id), json_string(ARG.terminal_id)
local qualification_json = json_string(qualification_text)
-- The event's day: the programme day of an authorization counted against a per-merchant daily
-- limit, left out when not counted (day_of in _lib.lua).
local day_json = ''
if day > 0 then day_json = ',"day":' .. day_text end
redis.call('XADD', KEY.ledger, '*', 'e',
  '{"type":"AUTHORIZED","authorization_id":' .. id_json .. ',"campaign":' .. campaign_json
  .. ',"merchant":' .. merchant_json .. ',"terminal":' .. terminal_json .. ',"authorization_terminal":' .. terminal_json
  .. ',"consumer":' .. json_string(consumer) .. ',"request_id":' .. json_string(ARG.request_id)
  .. ',"payload_hash":' .. json_string(ARG.payload_hash) .. ',"amount_fen":' .. subsidy_text .. ',"at_ms":' .. now_text
  .. ',"lines":' .. lines_json .. ',"state":"PENDING","channel":' .. channel_text .. ',"total_fen":' .. total_text
  .. ',"subsidy_fen":' .. subsidy_text .. ',"refunded_fen":0,"created_ms":' .. now_text .. ',"expires_ms":' .. expires_text
  .. ',"all_lines":' .. lines_json .. ',"qualification":' .. qualification_json .. day_json .. '}')
if limits then
  -- This sale, counted by the velocity limits that are set (sorted sets trimmed to the hour
  -- and gone an hour after their last sale; the merchant's day counts gone two days after).
  local function count_sale(key)
    redis.call('ZADD', key, int(now), authorization_id)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now - 3600000))
    redis.call('PEXPIRE', key, 3600000)
  end
  if limits[1] > 0 or limits[2] > 0 then count_sale(KEY.velocity_terminal) end
  if limits[3] > 0 then
    redis.call('HINCRBY', KEY.velocity_merchant, int(velocity_day), 1)
    redis.call('PEXPIRE', KEY.velocity_merchant, 2 * 86400000)
  end
  if limits[4] > 0 then count_sale(velocity_consumer) end
  -- The price flag (flags, never declines; campaign.proto RiskLimits): today's approved lines
  -- of each capped PERCENT category, all merchants and this one, and those priced exactly at
  -- the cap threshold, in one hash per programme day. A line at the threshold compares this
  -- merchant's share with the other merchants' (their count at it taken as at least 1); once
  -- over price_flag_ratio_percent of it, with price_flag_min_sales on each side, the merchant
  -- is flagged for the category and day, once (a risk event on this authorization).
  if price_flag then
    local mix = KEY.price_mix .. int(velocity_day)
    local minimum, ratio, merchant_id = limits[5], limits[6], ARG.merchant_id
    for i, line in ipairs(lines) do
      local threshold = cap_thresholds[i]
      if threshold then
        local own = line.c .. ':' .. merchant_id
        local all_n = redis.call('HINCRBY', mix, line.c .. ':n', 1)
        local own_n = redis.call('HINCRBY', mix, own .. ':n', 1)
        if line.p == threshold then
          local all_t = redis.call('HINCRBY', mix, line.c .. ':t', 1)
          local own_t = redis.call('HINCRBY', mix, own .. ':t', 1)
          local others_n, others_t = all_n - own_n, all_t - own_t
          if own_n >= minimum and others_n >= minimum
            and 100 * own_t * others_n > ratio * own_n * math.max(others_t, 1)
            and redis.call('HSETNX', mix, own .. ':flagged', authorization_id) == 1 then
            risk_event(KEY.risk_events, 'FLAG', 'PRICE_AT_CAP_THRESHOLD', 'MERCHANT', merchant_id,
              {campaign = ARG.campaign_id, merchant = merchant_id, terminal = ARG.terminal_id,
               request_id = ARG.request_id, authorization = authorization_id},
              {category = line.c, threshold_fen = threshold, day = velocity_day, merchant_lines = own_n,
               merchant_at_threshold = own_t, others_lines = others_n, others_at_threshold = others_t,
               ratio_percent = ratio, min_sales = minimum}, now)
          end
        end
      end
    end
    redis.call('PEXPIRE', mix, 2 * 86400000)
  end
end
local approved = '{"decision":"APPROVED","authorization":{"id":' .. id_json .. ',"state":"PENDING","campaign":'
  .. campaign_json .. ',"merchant":' .. merchant_json .. ',"terminal":' .. terminal_json .. ',"channel":' .. channel_text
  .. ',"lines":' .. lines_json .. ',"total_fen":' .. total_text .. ',"subsidy_fen":' .. subsidy_text
  .. ',"refunded_fen":0,"created_ms":' .. now_text .. ',"expires_ms":' .. expires_text .. ',"updated_ms":' .. now_text
  .. ',"qualification":' .. qualification_json .. '}}'
remember(KEY.idempotency, ARG.payload_hash, approved, ARG.idempotency_ttl_s)
return {'new', approved}
