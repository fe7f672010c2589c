-- shard_version.lua: the deployment's reference version, moved once a publication has reached
-- every shard (shards.py publish_to_shards), through run_acked: a version a failover took back
-- would be handed out again by the next publication, and a gateway that had cached the lost
-- number would never reload (storage/redis/credentials.py reloads when the number differs).
-- A retry after an unmet WAIT moves it again: the number only ever grows, which is all a
-- reader needs.
-- KEYS: the version key. Answer: {version = n}.
return cjson.encode({version = redis.call('INCR', KEYS[1])})
