-- shard_fund.lua: set a consumer shard's funding of a campaign category to its part of the
-- released budget (storage/redis/cluster/shard_budget.py), idempotently; or, the same way, its
-- part of a released qualification quota (ShardQuota: counted in vouchers, not fen).
-- KEYS: budget (the shard's budget hash, the one authorize.lua reads; for a quota, its quota
-- hash, the one claim_qualification.lua reads), replays (hash: the shard's replay counter),
-- ledger (the shard's stream; absent for a quota, whose moves are no money and no event).
-- ARGV: campaign, category (for a quota: a category or "pack:<id>"), target (fen, or vouchers).
-- <category>:funded is the cumulative target applied; <category>:total (what authorize.lua
-- approves against on a cluster, where shards are published without tranches) moves by
-- target - funded, down too: a lowered budget may leave total below reserved + spent, which
-- only stops new approvals in that shard.
-- ARGV[4], the plan's version (the reference version of the publication that made it): a call
-- with an older version than the one applied moves nothing ({state = stale}), so a keeper that
-- read the plans before a publication cannot re-apply the budget that publication replaced.
local budget, replays, ledger = KEYS[1], KEYS[2], KEYS[3]
local campaign, category, target, version = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local applied = tonumber(redis.call('HGET', budget, category .. ':funded_version') or '0')
if version < applied then
  replayed(replays)
  return cjson.encode({state = 'stale', funded = int(num(redis.call('HGET', budget, category .. ':funded'))), delta = '0'})
end
if version > applied then redis.call('HSET', budget, category .. ':funded_version', int(version)) end
local funded = redis.call('HGET', budget, category .. ':funded')
local delta = target - num(funded)
if funded and delta == 0 then
  replayed(replays)
  return cjson.encode({state = 'again', funded = int(target), delta = '0'})
end
redis.call('HINCRBY', budget, category .. ':total', int(delta))
redis.call('HSET', budget, category .. ':funded', int(target))
if ledger then
  emit(ledger, 'SHARD_FUNDED', {campaign = campaign, category = category, amount = delta, funded = target, at = now_ms()})
end
return cjson.encode({state = 'new', funded = int(target), delta = int(delta)})
