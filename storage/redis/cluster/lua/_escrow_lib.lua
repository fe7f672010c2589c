-- Shared by the escrow scripts (prefixed to each by storage/redis/cluster/escrow.py).
-- Every amount is an integer number of fen below 2^53, exact in Lua's doubles.

local function num(value) return tonumber(value or '0') or 0 end

-- A canonical decimal integer: Lua numbers are doubles, and Redis (or cjson, with its 14
-- digits) would write a large one with an exponent. Every amount leaves a script through here,
-- as a string in JSON answers and records.
local function int(n) return string.format('%d', n) end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The shard's ledger stream: one entry per change of its money (the writer's input, as the
-- one-Redis ledger stream is).
local function emit(stream, event, fields)
  local flat = {'event', event}
  for k, v in pairs(fields) do
    flat[#flat + 1] = k
    flat[#flat + 1] = type(v) == 'number' and int(v) or v
  end
  redis.call('XADD', stream, '*', unpack(flat))
end

-- A replayed answer (the id was seen) writes too: WAIT vouches for the writes of *its own
-- connection*, and a retry comes on a new one whose last write offset is 0, so a read-only
-- replay would be "acknowledged" at once even when the first attempt's write (made on the old
-- connection) has not reached the replica yet. Replication is one ordered stream: once the
-- replica has this counter's increment it has everything written before it.
local function replayed(escrow) redis.call('HINCRBY', escrow, 'replays', 1) end

local function conflict(what) return redis.error_reply('ESCROW_CONFLICT ' .. what) end
