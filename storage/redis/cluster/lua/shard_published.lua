-- shard_published.lua: did this publication's write reach the shard's primary? Run by
-- shards.py publish_to_shards after the shard's MULTI, through run_acked (WAIT on the same
-- connection). The MULTI set the marker to the publication's token; this reads it back and
-- writes the acknowledgement key either way, so that the WAIT that follows vouches for an
-- offset past the MULTI (replication is one ordered stream: a replica that has this write has
-- the MULTI before it). A marker without the token means the MULTI was lost (a failover took
-- an unacknowledged write back): the caller writes the shard again.
-- KEYS: marker, acknowledged. ARGV: token. Answer: {present = 0|1}.
local marker, acknowledged, token = KEYS[1], KEYS[2], ARGV[1]
local present = redis.call('GET', marker) == token
redis.call('SET', acknowledged, token)
return cjson.encode({present = present and 1 or 0})
